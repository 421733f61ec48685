"""Re-point ``megatron.core.parallel_state``'s getters at the active scope.

Inside ``with state.activate():`` each getter listed in :data:`GETTERS` answers
from the state (same name, same meaning); outside any scope it is Megatron's
own function, unchanged (or raises, with ``install(strict=True)``).

Megatron code usually imports the module (``from megatron.core import
parallel_state`` / ``mpu``) and reads attributes at call time, which the module
patch covers. Copies made with ``from megatron.core.parallel_state import
get_...`` in modules already imported are patched too (the ledger walks every
loaded ``megatron.*`` module); modules imported later pick up the patched
function.

Groups a state does not build (:data:`UNSUPPORTED`: FP8 amax reduction, the
distributed-optimizer instance groups, hierarchical/hybrid context parallel,
...) raise :class:`~scoped_parallel.errors.GroupNotAvailableError` inside a scope
instead of silently answering from Megatron's globals (another layout). Still
falling through: virtual pipeline rank/size (no virtual pipeline in a state),
memory buffers, and ``set_*`` overrides of sizes and ranks.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from scoped_parallel.adapters._common import active_state
from scoped_parallel.errors import GroupNotAvailableError

__all__ = ["GETTERS", "UNSUPPORTED", "install"]

OWNER = "megatron"

#: Megatron getters answered by the active state (megatron-core 0.16).
GETTERS: tuple[str, ...] = (
    "get_context_parallel_global_ranks",
    "get_context_parallel_group",
    "get_context_parallel_rank",
    "get_context_parallel_world_size",
    "get_data_parallel_group",
    "get_data_parallel_group_gloo",
    "get_data_parallel_rank",
    "get_data_parallel_src_rank",
    "get_data_parallel_world_size",
    "get_embedding_group",
    "get_expert_data_parallel_group",
    "get_expert_data_parallel_group_gloo",
    "get_expert_data_parallel_rank",
    "get_expert_data_parallel_world_size",
    "get_expert_model_parallel_group",
    "get_expert_model_parallel_rank",
    "get_expert_model_parallel_world_size",
    "get_expert_tensor_and_model_parallel_group",
    "get_expert_tensor_and_model_parallel_rank",
    "get_expert_tensor_and_model_parallel_world_size",
    "get_expert_tensor_model_pipeline_parallel_group",
    "get_expert_tensor_parallel_group",
    "get_expert_tensor_parallel_rank",
    "get_expert_tensor_parallel_world_size",
    "get_model_parallel_group",
    "get_model_parallel_src_rank",
    "get_pipeline_model_parallel_first_rank",
    "get_pipeline_model_parallel_group",
    "get_pipeline_model_parallel_last_rank",
    "get_pipeline_model_parallel_next_rank",
    "get_pipeline_model_parallel_prev_rank",
    "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_world_size",
    "get_position_embedding_group",
    "get_tensor_and_context_parallel_group",
    "get_tensor_and_context_parallel_rank",
    "get_tensor_and_context_parallel_world_size",
    "get_tensor_and_data_parallel_group",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_src_rank",
    "get_tensor_model_parallel_world_size",
    "is_initialized",
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
    "is_rank_in_embedding_group",
    "is_rank_in_position_embedding_group",
    "model_parallel_is_initialized",
)


#: Megatron getters of groups a state does not build: an error inside a scope.
UNSUPPORTED: tuple[str, ...] = (
    "get_all_ranks",
    "get_amax_reduction_group",
    "get_data_modulo_expert_parallel_group",
    "get_expert_model_parallel_src_rank",
    "get_hierarchical_context_parallel_groups",
    "get_hybrid_data_context_parallel_groups",
    "get_inter_distributed_optimizer_instance_group",
    "get_intra_distributed_optimizer_instance_group",
)


def _wrap(name: str, original: Callable[..., Any], supported: bool) -> Callable[..., Any]:
    """Megatron's getter outside any scope; inside one, the state's answer (or a refusal)."""
    what = f"megatron.core.parallel_state.{name}()"

    @functools.wraps(original)
    def getter(*args: Any, **kwargs: Any) -> Any:
        state = active_state(what)
        if state is None:
            return original(*args, **kwargs)
        if supported:
            return getattr(state, name)(*args, **kwargs)
        raise GroupNotAvailableError(
            f"{what} inside the scope of {state!r}: scoped_parallel does not build this group, "
            "and Megatron's global one belongs to another layout. Build it yourself from "
            "state.layout, or call this outside any scope if the global layout is meant."
        )

    return getter


def install(ledger: Any) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about Apex/TE on CPU
        from megatron.core import parallel_state as ps

    for name in GETTERS + UNSUPPORTED:
        original = vars(ps).get(name)
        replacement = _wrap(name, original, name in GETTERS) if original is not None else None
        ledger.patch(OWNER, ps, name, replacement)  # refuses (loudly) a name that is gone
        others = [
            m
            for key, m in list(sys.modules.items())
            if m is not None and m is not ps and key.startswith("megatron.")
        ]
        ledger.patch_aliases(OWNER, original, replacement, others)
