"""ZeRO-3 with a state of SP > 1 as mpu: partition over the group that reduces gradients.

``DeepSpeedZeRoOffload._convert_to_zero_parameters`` partitions parameters over the
mpu's data-parallel group, while the engine reduces their gradients over the
sequence-data-parallel group (SP x DP). For a state with SP > 1 those differ (its DP
group excludes the SP ranks, for DeepSpeed's batch math), which silently corrupts
gradients. The patch hands that one call a view of the state whose data-parallel
group is SP x DP. (Plain DeepSpeed gets WORLD from ``parallel_state_sp`` there, which
is SP x DP when the model spans the world.)
"""

from __future__ import annotations

import functools
from typing import Any

from scoped_parallel.adapters.deepspeed._shared import state_class


class ZeroPartitionView:
    """A state seen by ZeRO-3's parameter conversion: its data-parallel group is SP x DP.

    Everything else, batch math included, is the state's own answer.
    """

    def __init__(self, state: Any) -> None:
        self._state = state

    def get_data_parallel_group(self) -> Any:
        return self._state.get_sequence_data_parallel_group()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def scoped_convert_to_zero_parameters(original: Any) -> Any:
    """The replacement of ``DeepSpeedZeRoOffload._convert_to_zero_parameters``."""

    @functools.wraps(original)
    def convert(self: Any, ds_config: Any, module: Any, mpu: Any) -> Any:
        if type(mpu) is state_class() and mpu.get_sequence_parallel_world_size() > 1:
            mpu = ZeroPartitionView(mpu)
        return original(self, ds_config, module, mpu)

    return convert
