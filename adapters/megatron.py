"""Re-point ``megatron.core.parallel_state`` (and Megatron's RNG tracker) at the active scope.

Inside ``with state.activate():`` each getter listed in :data:`GETTERS` answers
from the state (same name, same meaning, Megatron's answer for the same
configuration, checked against megatron-core by ``tests/test_megatron_oracle.py``);
outside any scope it is Megatron's own function, unchanged (or raises, with
``install(strict=True)``). So ``ProcessGroupCollection.use_mpu_process_groups()`` and
the model classes that call it (``GPTModel``, ``TransformerBlock``, ...) work in a scope.

Megatron code usually imports the module (``from megatron.core import
parallel_state`` / ``mpu``) and reads attributes at call time, which the module
patch covers. Copies made with ``from megatron.core.parallel_state import
get_...`` in modules already imported are patched too
(:meth:`~scoped_parallel.adapters._ledger.Ledger.patch_everywhere` walks every
loaded ``megatron.*`` module); modules imported later pick up the patched
function.

Optional groups (distributed-optimizer instances, hierarchical and hybrid context
parallel, the separate all-gather group) answer as Megatron does when the state was
built without the option (``None``, or the dp-cp group as the partial group with one
instance) and are real groups when it was built with it. The per-process side state
(``set_*`` overrides, virtual pipeline rank/size, the CUDA RNG tracker, the global
memory buffer) is per state: :mod:`scoped_parallel.adapters._megatron_side`.

Still not per state (:data:`UNSUPPORTED`, an error inside a scope):
``get_global_symmetric_memory_buffer`` (a CUDA symmetric-memory allocation over the
TP group, built by Megatron only for its NVLS inference path; there is nothing to
build it on CPU and no per-state version of the allocation).
"""

from __future__ import annotations

from typing import Any, Callable

from scoped_parallel._scope import dispatching
from scoped_parallel.adapters._ledger import require
from scoped_parallel.errors import GroupNotAvailableError

__all__ = ["GETTERS", "NEWER_GETTERS", "UNSUPPORTED", "install", "uninstall"]

OWNER = "megatron"

#: Megatron getters answered by the active state (megatron-core 0.16). The side-state
#: getters (overrides, virtual pipeline, stages) are in ``_megatron_side``.
GETTERS: tuple[str, ...] = (
    "get_all_ranks",
    "get_amax_reduction_group",
    "get_context_parallel_global_ranks",
    "get_context_parallel_group",
    "get_context_parallel_rank",
    "get_context_parallel_world_size",
    "get_data_modulo_expert_parallel_group",
    "get_data_parallel_group",
    "get_data_parallel_group_gloo",
    "get_data_parallel_src_rank",
    "get_data_parallel_world_size",
    "get_embedding_group",
    "get_expert_data_parallel_group",
    "get_expert_data_parallel_group_gloo",
    "get_expert_data_parallel_rank",
    "get_expert_data_parallel_world_size",
    "get_expert_model_parallel_group",
    "get_expert_model_parallel_src_rank",
    "get_expert_tensor_and_model_parallel_group",
    "get_expert_tensor_and_model_parallel_rank",
    "get_expert_tensor_and_model_parallel_world_size",
    "get_expert_tensor_model_pipeline_parallel_group",
    "get_expert_tensor_parallel_group",
    "get_hierarchical_context_parallel_groups",
    "get_hybrid_data_context_parallel_groups",
    "get_inter_distributed_optimizer_instance_group",
    "get_intra_distributed_optimizer_instance_group",
    "get_model_parallel_group",
    "get_model_parallel_src_rank",
    "get_pipeline_model_parallel_first_rank",
    "get_pipeline_model_parallel_group",
    "get_pipeline_model_parallel_last_rank",
    "get_pipeline_model_parallel_next_rank",
    "get_pipeline_model_parallel_prev_rank",
    "get_position_embedding_group",
    "get_tensor_and_context_parallel_group",
    "get_tensor_and_context_parallel_rank",
    "get_tensor_and_context_parallel_world_size",
    "get_tensor_and_data_parallel_group",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_src_rank",
    "has_separate_all_gather_group",
    "is_initialized",
    "is_rank_in_position_embedding_group",
    "model_parallel_is_initialized",
)

#: Names of :data:`GETTERS` / :data:`UNSUPPORTED` that older megatron-core minors lack
#: (0.13/0.14; patched where present).
NEWER_GETTERS: frozenset[str] = frozenset(
    {
        "get_hybrid_data_context_parallel_groups",
        "has_separate_all_gather_group",
        "get_global_symmetric_memory_buffer",
        "get_expert_model_parallel_src_rank",
    }
)

#: Megatron functions with no per-state answer: an error inside a scope.
UNSUPPORTED: tuple[str, ...] = ("get_global_symmetric_memory_buffer",)


def _inside(name: str, supported: bool, params: tuple[str, ...] = ()) -> Callable[..., Any]:
    """What the getter ``name`` does inside a scope: the state's answer, or a refusal.

    Positional arguments are passed on by the names of the installed Megatron's own
    parameters (``params``), so a minor whose getter orders them differently (0.14's
    ``get_tensor_and_data_parallel_group(with_context_parallel)``) still means the same.
    """
    if supported:

        def answer(state: Any, *args: Any, **kwargs: Any) -> Any:
            if args:
                kwargs.update(zip(params, args))
            return getattr(state, name)(**kwargs)

        return answer

    def refuse(state: Any, *args: Any, **kwargs: Any) -> Any:
        raise GroupNotAvailableError(
            f"megatron.core.parallel_state.{name}() inside the scope of {state!r}: scoped_parallel "
            "has no per-state version of it (see scoped_parallel.adapters.megatron), and Megatron's "
            "global one belongs to another layout; call it outside any scope if the global layout "
            "is meant."
        )

    return refuse


def install(ledger: Any) -> None:
    """Patch :data:`GETTERS`, :data:`UNSUPPORTED` and the side state, and their copies in ``megatron.*``."""
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about Apex/TE on CPU
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel  # noqa: F401  (loads the RNG tracker module)

    from scoped_parallel.adapters import _megatron_side

    replacements = {}
    for name in GETTERS + UNSUPPORTED:
        if name in NEWER_GETTERS and not hasattr(ps, name):
            continue
        original = require(OWNER, ps, name)  # refuses (loudly) a name that is gone
        # A state's answers never change while it lives, so argument-free calls of the
        # supported getters are memoized per state (the state forgets them on destroy()).
        # exact=True: each replacement is compiled with the getter's own parameters (no
        # argument packing; introspection shows Megatron's signature).
        params = tuple(inspect.signature(original).parameters)
        replacements[name] = dispatching(
            original, _inside(name, name in GETTERS, params), f"megatron.core.parallel_state.{name}()",
            memoize=name in GETTERS, exact=True,
        )
    ledger.patch_everywhere(OWNER, ps, replacements, package="megatron")
    _megatron_side.install(ledger, ps)


def uninstall() -> None:
    """Drop what the adapter holds besides its patches (the shared memory buffer)."""
    from scoped_parallel.adapters import _megatron_side

    _megatron_side.uninstall()
