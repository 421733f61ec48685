"""megatron-core as the oracle: inside a scope every getter answers as vanilla Megatron does.

On each rank of the 4-rank gloo world, one configuration runs twice: vanilla
``initialize_model_parallel(...)`` (Megatron's globals, no adapter), then a
``ParallelState`` with the same sizes and options inside its scope with the megatron
adapter installed. Every call below, and every field of
``ProcessGroupCollection.use_mpu_process_groups()``, is described the same way in both
runs (a group by its sorted ranks, ``None``, a value, or "raises") and the
descriptions must be equal.
"""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest

from _world import new_groups_destroyed

pytest.importorskip("megatron.core.parallel_state")

from scoped_parallel.getters.table import family as getter_family  # noqa: E402

T = timedelta(seconds=60)

#: (label, getter, keyword arguments) asked in both runs: the variants by hand ...
VARIANTS = [
    ("tp", "get_tensor_model_parallel_group", {}),
    ("hcp?", "get_hierarchical_context_parallel_groups", {"check_initialized": False}),
    ("hcp!", "get_hierarchical_context_parallel_groups", {}),
    ("inter?", "get_inter_distributed_optimizer_instance_group", {"check_initialized": False}),
    ("intra_dist_opt?", "get_intra_distributed_optimizer_instance_group", {"check_initialized": False}),
    ("intra_dp_cp", "get_data_parallel_group", {"with_context_parallel": True, "partial_data_parallel": True}),
    ("intra_dp_cp size", "get_data_parallel_world_size", {"with_context_parallel": True, "partial_data_parallel": True}),
    ("intra_dp_cp rank", "get_data_parallel_rank", {"with_context_parallel": True, "partial_data_parallel": True}),
    ("dp partial without cp", "get_data_parallel_group", {"partial_data_parallel": True}),
    ("intra_edp", "get_expert_data_parallel_group", {"partial_expert_data_parallel": True}),
    ("intra_edp size", "get_expert_data_parallel_world_size", {"partial_expert_data_parallel": True}),
    ("intra_edp rank", "get_expert_data_parallel_rank", {"partial_expert_data_parallel": True}),
    ("amax", "get_amax_reduction_group", {}),
    ("amax cp", "get_amax_reduction_group", {"with_context_parallel": True}),
    ("amax tp", "get_amax_reduction_group", {"tp_only_amax_red": True}),
    ("amax tp cp", "get_amax_reduction_group", {"with_context_parallel": True, "tp_only_amax_red": True}),
    ("separate ag", "has_separate_all_gather_group", {}),
    ("ag", "get_data_parallel_group", {"with_context_parallel": True, "independent_all_gather": True}),
    ("hybrid 2", "get_hybrid_data_context_parallel_groups", {"group_size": 2}),
    ("hybrid 4", "get_hybrid_data_context_parallel_groups", {"group_size": 4}),
    ("all ranks", "get_all_ranks", {}),
    ("embd?", "get_embedding_group", {"check_initialized": False}),
    ("pos embd?", "get_position_embedding_group", {"check_initialized": False}),
    ("ep src", "get_expert_model_parallel_src_rank", {}),
]
#: ... and every supported Megatron row of the getter table, called without arguments
CALLS = VARIANTS + [
    (f"{name}()", name, {}) for name, row in getter_family("megatron").items() if row.supported
]

#: (name, initialize_model_parallel / ParallelState keywords) on 4 ranks
CONFIGS = [
    ("tp2", dict(tensor_model_parallel_size=2)),
    ("pp2", dict(pipeline_model_parallel_size=2)),
    ("instances2", dict(num_distributed_optimizer_instances=2)),
    ("ep2 instances2", dict(expert_model_parallel_size=2, num_distributed_optimizer_instances=2)),
    ("cp4 hierarchical", dict(context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2])),
    ("cp2 hybrid", dict(context_parallel_size=2, hybrid_context_parallel=True)),
    ("tp2 all-gather", dict(tensor_model_parallel_size=2, create_all_gather_group=True)),
]


def _ps():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    return parallel_state


def describe(value):
    """A group as ('group', sorted ranks); lists element-wise; anything else as is."""
    import torch.distributed as dist

    if isinstance(value, dist.ProcessGroup):
        return ("group", tuple(sorted(dist.get_process_group_ranks(value))))
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


def ask_everything(ps):
    """Every call of CALLS and every use_mpu_process_groups() field, described."""
    from megatron.core import process_groups_config as pgc

    import inspect

    out = {}
    for label, name, kwargs in CALLS:
        if not hasattr(ps, name):
            continue
        if not set(kwargs) <= set(inspect.signature(getattr(ps, name)).parameters):
            continue  # an older megatron-core without this keyword
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[label] = describe(getattr(ps, name)(**kwargs))
        except (AssertionError, LookupError):  # Megatron asserts; a state raises GroupNotAvailableError
            out[label] = "raises"
    collection_class = getattr(pgc, "ProcessGroupCollection", None)
    if collection_class is not None:  # megatron-core >= 0.15
        collection = collection_class.use_mpu_process_groups()
        for field in sorted(vars(collection)):
            out["pgc." + field] = describe(getattr(collection, field))
    # With one instance Megatron's partial dp-cp group *is* its dp-cp group.
    out["intra_dp_cp is dp_cp"] = ps.get_data_parallel_group(
        with_context_parallel=True, partial_data_parallel=True
    ) is ps.get_data_parallel_group(with_context_parallel=True)
    return out


def _reset_megatron(ps):
    """destroy_model_parallel() leaves a few globals set (see the style notes); clear them too."""
    ps.destroy_model_parallel()
    ps._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None
    ps._HYBRID_DP_CP_GROUPS = {}
    ps._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
    ps._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None


def rank_vanilla_then_scoped(rank, config):
    from scoped_parallel import ParallelState, adapters

    import inspect

    ps = _ps()
    accepted = inspect.signature(ps.initialize_model_parallel).parameters
    missing = [k for k in config if k not in accepted]
    if missing:  # an older megatron-core without this option: nothing to compare with
        return "skip", missing
    megatron_kwargs = dict(config, create_gloo_process_groups=False, distributed_timeout_minutes=1)
    with new_groups_destroyed():  # destroy_model_parallel leaves its groups alive
        ps.initialize_model_parallel(**megatron_kwargs)
        try:
            vanilla = ask_everything(ps)
        finally:
            _reset_megatron(ps)
    state = ParallelState(name="oracle", timeout=T, **config)
    try:
        with adapters.installed(targets=("megatron",)), state.activate():
            scoped = ask_everything(ps)
    finally:
        state.destroy()
    return vanilla, scoped


@pytest.mark.world
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_scoped_getters_answer_like_vanilla_megatron(world, name, config):
    """Each getter and each use_mpu_process_groups() field in a scope equals vanilla Megatron's answer."""
    results = world.run(rank_vanilla_then_scoped, config, timeout=400)
    if results[0][0] == "skip":
        pytest.skip(f"this megatron-core's initialize_model_parallel has no {results[0][1]}")
    for rank, (vanilla, scoped) in enumerate(results):
        diff = {k: (vanilla.get(k), scoped.get(k)) for k in vanilla.keys() | scoped.keys() if vanilla.get(k) != scoped.get(k)}
        assert not diff, f"{name}, rank {rank}: label -> (vanilla Megatron, scoped state): {diff}"
        assert len(vanilla) >= 18, f"{name}: only {sorted(vanilla)} were asked"
