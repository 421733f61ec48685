"""DeepSpeed's mpu names that Megatron does not have, as methods of a state.

:class:`DeepSpeedGetters` is a mixin of :class:`~scoped_parallel.ParallelState`
(with :class:`~scoped_parallel._megatron_getters.MegatronGetters` it makes the
state a complete DeepSpeed ``mpu``): the pipeline names of DeepSpeed's
``PipelineParallelGrid`` (``deepspeed.utils.bwc`` probes them) and the Ulysses
sequence-parallel getters. On rank 5 of 8 with ``sequence_parallel_size=2``:
``get_sequence_parallel_group()`` spans ranks (4, 5) and
``get_sequence_data_parallel_group()`` all 8 ranks.

The state must never grow an ``initialize_sequence_parallel`` method: DeepSpeed
takes an mpu that has one for its SP-only module and uses WORLD as the
data-parallel group (a test guards this).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DeepSpeedGetters"]


class DeepSpeedGetters:
    """DeepSpeed's sequence-parallel and pipeline-grid getter names."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by ParallelState
        _groups: dict[str, Any]

        def _kind_group(self, kind: str) -> Any:
            raise NotImplementedError

        def _kind_size(self, kind: str) -> int:
            raise NotImplementedError

        def _kind_rank(self, kind: str) -> int:
            raise NotImplementedError

    # DeepSpeed's PipelineParallelGrid names (utils/bwc.py probes these).
    def get_pipe_parallel_group(self) -> Any:
        """This rank's pipeline model parallel group."""
        return self._kind_group("pp")

    def get_pipe_parallel_world_size(self) -> int:
        """Size of this rank's pipeline model parallel group."""
        return self._kind_size("pp")

    def get_pipe_parallel_rank(self) -> int:
        """This rank's index in its pipeline model parallel group."""
        return self._kind_rank("pp")

    # ------------------------------------------------------------------ DeepSpeed sequence parallel

    def get_sequence_parallel_group(self) -> Any:
        """This rank's sequence parallel group."""
        return self._kind_group("sp")

    def get_sequence_parallel_world_size(self) -> int:
        """Size of this rank's sequence parallel group."""
        return self._kind_size("sp")

    def get_sequence_parallel_rank(self) -> int:
        """This rank's index in its sequence parallel group."""
        return self._kind_rank("sp")

    def get_sequence_data_parallel_group(self) -> Any:
        """SP x DP: the ranks that shard ZeRO state and all-reduce gradients together."""
        group = self._groups.get("sp-dp")  # hot: DeepSpeed asks at every step
        return group if group is not None else self._kind_group("sp-dp")

    def get_sequence_data_parallel_world_size(self) -> int:
        """Size of this rank's sequence and data parallel (SP x DP) group."""
        return self._kind_size("sp-dp")

    def get_sequence_data_parallel_rank(self) -> int:
        """This rank's index in its sequence and data parallel (SP x DP) group."""
        return self._kind_rank("sp-dp")
