"""``deepspeed.runtime.sequence_parallel.parallel_state_sp``, answered by the active state.

DeepSpeed's ``parallel_state_sp`` holds one pair of sequence-parallel groups for the
process: a second ``initialize_sequence_parallel`` asserts, and every model reads the
same groups. Inside a scope:

* its getters, and its ``get_model_parallel_*`` aliases (separate bindings of the
  same functions, patched by name), answer from the state's ``sp`` and ``sp-dp``
  groups;
* ``initialize_sequence_parallel(n)`` creates nothing and is idempotent; it raises
  :class:`~scoped_parallel.errors.LayoutError` when ``n`` is not the state's
  sequence-parallel size.
"""

from __future__ import annotations

from typing import Any

from scoped_parallel.adapters.deepspeed._records import record_of
from scoped_parallel.adapters.deepspeed._shared import SP_IMPL, forward, impl
from scoped_parallel.errors import LayoutError, describe_state


@impl(SP_IMPL, "initialize_sequence_parallel")
def initialize(state: Any, sequence_parallel_size: int) -> None:
    if sequence_parallel_size <= 1:
        raise ValueError(f"sequence_parallel_size must be greater than 1, got {sequence_parallel_size}")
    have = state.get_sequence_parallel_world_size()
    if sequence_parallel_size != have:
        raise LayoutError(
            f"initialize_sequence_parallel({sequence_parallel_size}) was called inside the scope of "
            f"{describe_state(state)}, whose sequence parallel size is {have}; groups are never re-created "
            f"inside a scope. Build the state with sequence_parallel_size={sequence_parallel_size}, "
            f"or pass {have}."
        )
    record_of(state).sp_size = sequence_parallel_size


# its getters and their get_model_parallel_* aliases are the state's sp and sp-dp getters
forward(SP_IMPL, {
    "get_sequence_parallel_group": "get_sequence_parallel_group",
    "get_model_parallel_group": "get_sequence_parallel_group",
    "get_sequence_parallel_world_size": "get_sequence_parallel_world_size",
    "get_model_parallel_world_size": "get_sequence_parallel_world_size",
    "get_sequence_parallel_rank": "get_sequence_parallel_rank",
    "get_model_parallel_rank": "get_sequence_parallel_rank",
    "get_sequence_data_parallel_group": "get_sequence_data_parallel_group",
    "get_sequence_data_parallel_world_size": "get_sequence_data_parallel_world_size",
    "get_sequence_data_parallel_rank": "get_sequence_data_parallel_rank",
})
