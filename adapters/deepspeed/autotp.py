"""AutoTP's globals in ``deepspeed.utils.groups``, answered by the active state.

AutoTP (``tensor_parallel.autotp_size``, ``tp_model_init``) keeps one tensor and one
data parallel group in module globals, so a second AutoTP model in the same process
reuses the first one's groups. Inside a scope:

* ``get_tensor_model_parallel_*``, ``get_model_parallel_*`` and
  ``get_data_parallel_*`` answer with the state's ``tp`` and ``dp`` groups. As in
  DeepSpeed, "model parallel" here means the TP group;
* ``set_tensor_model_parallel_world_size``/``_rank`` override the answers for that
  state only;
* ``_init_tp_mesh_device`` and ``_init_tp_groups_with_new_group`` create nothing: they
  check that the requested TP (and DP) size is the state's, return the state's
  groups, and raise :class:`~scoped_parallel.errors.LayoutError` naming both sizes
  otherwise. A second AutoTP model in another scope gets its own groups.
"""

from __future__ import annotations

from typing import Any

from scoped_parallel.adapters.deepspeed._shared import GROUPS_IMPL, forward, impl
from scoped_parallel.errors import LayoutError, describe_state


# DeepSpeed's AutoTP getters that are the state's: as in DeepSpeed, "model parallel" is the TP group
forward(GROUPS_IMPL, {
    "get_tensor_model_parallel_group": "get_tensor_model_parallel_group",
    "get_model_parallel_group": "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_world_size": "get_tensor_model_parallel_world_size",
    "get_model_parallel_world_size": "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_rank": "get_tensor_model_parallel_rank",
    "get_model_parallel_rank": "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_src_rank": "get_tensor_model_parallel_src_rank",
    "get_data_parallel_group": "get_data_parallel_group",
    "get_data_parallel_world_size": "get_data_parallel_world_size",
    "get_data_parallel_rank": "get_data_parallel_rank",
})


@impl(GROUPS_IMPL, "set_tensor_model_parallel_world_size")
def set_tp_world_size(state: Any, world_size: Any) -> None:
    state.set_override("tp_size", world_size)  # the state's one store of Megatron-style overrides


@impl(GROUPS_IMPL, "set_tensor_model_parallel_rank")
def set_tp_rank(state: Any, rank: Any) -> None:
    state.set_override("tp_rank", rank)


@impl(GROUPS_IMPL, "_init_tp_mesh_device", "_init_tp_groups_with_new_group")
def init_tp(state: Any, tensor_model_parallel_size: int = 1, data_parallel_size: int | None = None) -> Any:
    tp = state.get_tensor_model_parallel_world_size()
    if tensor_model_parallel_size != tp:
        raise LayoutError(
            f"DeepSpeed asked for tensor parallel size {tensor_model_parallel_size} (AutoTP "
            f"autotp_size / tp_model_init tp_size) inside the scope of {describe_state(state)}, whose tensor "
            f"parallel size is {tp}. Build the state with "
            f"tensor_model_parallel_size={tensor_model_parallel_size}, or set autotp_size to {tp}."
        )
    dp = state.get_data_parallel_world_size()
    if data_parallel_size is not None and data_parallel_size != dp:
        raise LayoutError(
            f"DeepSpeed asked for data parallel size {data_parallel_size} with tensor parallel size "
            f"{tensor_model_parallel_size} inside the scope of {describe_state(state)}, whose data parallel "
            f"size is {dp}. Build the state with the sizes DeepSpeed expects, or pass "
            f"data_parallel_size={dp}."
        )
    # DeepSpeed returns (data parallel group, model parallel group = TP group).
    return state.get_data_parallel_group(), state.get_tensor_model_parallel_group()
