"""Re-point ``megatron.core.parallel_state``'s getters at the active scope.

Inside ``with state.activate():`` each getter listed in :data:`GETTERS` answers
from the state (same name, same meaning); outside any scope it is Megatron's
own function, unchanged (or raises, with ``install(strict=True)``).

Megatron code usually imports the module (``from megatron.core import
parallel_state`` / ``mpu``) and reads attributes at call time, which the module
patch covers. Copies made with ``from megatron.core.parallel_state import
get_...`` in modules already imported are patched too
(:meth:`~scoped_parallel.adapters._ledger.Ledger.patch_everywhere` walks every
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

from typing import Any, Callable

from scoped_parallel._scope import dispatching
from scoped_parallel.adapters._ledger import require
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


def _inside(name: str, supported: bool) -> Callable[..., Any]:
    """What the getter ``name`` does inside a scope: the state's answer, or a refusal."""
    if supported:

        def answer(state: Any, *args: Any, **kwargs: Any) -> Any:
            return getattr(state, name)(*args, **kwargs)

        return answer

    def refuse(state: Any, *args: Any, **kwargs: Any) -> Any:
        raise GroupNotAvailableError(
            f"megatron.core.parallel_state.{name}() inside the scope of {state!r}: scoped_parallel "
            "does not build this group, and Megatron's global one belongs to another layout. Build "
            "it yourself from state.layout, or call this outside any scope if the global layout is "
            "meant."
        )

    return refuse


def install(ledger: Any) -> None:
    """Patch every getter of :data:`GETTERS` and :data:`UNSUPPORTED`, and their copies in ``megatron.*``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about Apex/TE on CPU
        from megatron.core import parallel_state as ps

    replacements = {}
    for name in GETTERS + UNSUPPORTED:
        original = require(OWNER, ps, name)  # refuses (loudly) a name that is gone
        # A state's answers never change while it lives, so argument-free calls of the
        # supported getters are memoized per state (the state forgets them on destroy()).
        # exact=True: each replacement is compiled with the getter's own parameters (no
        # argument packing; introspection shows Megatron's signature).
        replacements[name] = dispatching(
            original, _inside(name, name in GETTERS), f"megatron.core.parallel_state.{name}()",
            memoize=name in GETTERS, exact=True,
        )
    ledger.patch_everywhere(OWNER, ps, replacements, package="megatron")
