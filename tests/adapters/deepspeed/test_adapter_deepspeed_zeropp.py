"""Tier 4 (shared 4-rank gloo world): ZeRO++ hpZ and qgZ all-to-all groups per state.

Each scenario runs DeepSpeed unpatched first (the bug: the second engine reuses the
first one's hpZ group, all-to-all groups are cut from the world), then with the
adapter. Rank sets are read from what DeepSpeed holds: each parameter's
``ds_zero_param_process_group`` and the engine's ``local_all_to_all_group``.
qgZ's quantized reduction has no CPU kernel, so for qgZ only the groups are proven;
hpZ trains on CPU and interleaved steps are compared bitwise with training alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import _adapter_deepspeed_support as support
from _adapter_deepspeed_support import WORLD_TIMEOUT

pytest.importorskip("deepspeed")


def _hpz_config(size: int) -> dict[str, Any]:
    return support.config(stage=3, zero_optimization={"stage": 3, "zero_hpz_partition_size": size})


def _hpz_ranks(engine: Any) -> Any:
    found = {support.ranks(p.ds_zero_param_process_group) for p in engine.module.parameters()}
    return sorted(found, key=repr)


def _rank_hpz_groups(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with support.isolated():
        # critic: DP=4 with hpZ 4; actor: TP=2 x DP=2 with hpZ 2 (its DP group).
        critic = support.state(name="critic")
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        try:
            out["actor dp"] = actor.ranks("dp")
            with support.unpatched_run():
                first = support.engine(support.model(2), _hpz_config(4))
                second = support.engine(support.model(1), _hpz_config(2), mpu=actor)
                out["unpatched"] = {"critic": _hpz_ranks(first), "actor": _hpz_ranks(second)}
                support.drop(first, second)
            with support.installed():
                with critic.activate():
                    first = support.engine(support.model(2), _hpz_config(4))
                with actor.activate():
                    second = support.engine(support.model(1), _hpz_config(2), mpu=actor)
                out["patched"] = {"critic": _hpz_ranks(first), "actor": _hpz_ranks(second)}
                import deepspeed.utils.groups as groups

                with actor.activate():
                    out["actor getters"] = (
                        groups._get_zero_param_intra_parallel_group_ranks(),
                        groups._get_zero_param_intra_parallel_group_world_size(),
                        groups._get_zero_param_intra_parallel_rank_in_mygroup(),
                        groups._zero_param_parallel_is_initialized(),
                    )
                out["global hpZ group untouched"] = vars(groups)["_ZERO_PARAM_INTRA_PARALLEL_GROUP"] is None
                support.drop(first, second)
        finally:
            support.destroy(actor, critic)
    return out


@pytest.mark.world
@pytest.mark.slow
def test_hpz_group_is_cut_from_each_engines_own_data_parallel_ranks(world):
    """Two ZeRO-3 engines (DP=4 hpZ=4, TP=2 x DP=2 hpZ=2) each partition over their own hpZ group."""
    for rank, out in enumerate(world.run(_rank_hpz_groups, timeout=WORLD_TIMEOUT)):
        world_ranks = (0, 1, 2, 3)
        assert out["unpatched"]["actor"] == [world_ranks], (
            f"rank {rank}: unpatched, expected the actor to reuse the critic's hpZ group {world_ranks} "
            f"(the bug), got {out['unpatched']['actor']}"
        )
        expected = {"critic": [world_ranks], "actor": [out["actor dp"]]}
        assert out["patched"] == expected, f"rank {rank}: hpZ groups expected {expected}, got {out['patched']}"
        dp = out["actor dp"]
        getters = (list(dp), 2, dp.index(rank), True)
        assert out["actor getters"] == getters, f"rank {rank}: getters expected {getters}, got {out['actor getters']}"
        assert out["global hpZ group untouched"], f"rank {rank}: groups._ZERO_PARAM_INTRA_PARALLEL_GROUP was set"


def _train(engine: Any, rank: int, seed: int, steps: int) -> list[float]:
    return [float(support.step(engine, support.batch(rank, i, seed))) for i in range(steps)]


def _rank_hpz_interleaved(rank: int, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with support.isolated():
        critic = support.state(name="critic")
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        specs = (("critic", critic, 2, None, 2), ("actor", actor, 1, actor, 2))
        try:
            with support.unpatched_run():  # vanilla DeepSpeed, the critic alone (DP = world)
                engine = support.engine(support.model(2), _hpz_config(2))
                vanilla = (_train(engine, rank, 2, steps), support.full_params(engine))
                support.drop(engine)
            with support.installed():
                alone = {}
                for name, state, seed, mpu, hpz in specs:
                    with state.activate():
                        engine = support.engine(support.model(seed), _hpz_config(hpz), mpu=mpu)
                        alone[name] = (_train(engine, rank, seed, steps), support.full_params(engine))
                    support.drop(engine)
                engines = {}
                for name, state, seed, mpu, hpz in specs:
                    with state.activate():
                        engines[name] = support.engine(support.model(seed), _hpz_config(hpz), mpu=mpu)
                together: dict[str, list[float]] = {name: [] for name, *_ in specs}
                for i in range(steps):
                    for name, state, seed, _, _ in specs:
                        with state.activate():
                            together[name].append(float(support.step(engines[name], support.batch(rank, i, seed))))
                for name, state, *_ in specs:
                    with state.activate():
                        params = support.full_params(engines[name])
                    out[name] = {
                        "losses alone": alone[name][0],
                        "losses together": together[name],
                        "params equal": all(map(torch.equal, alone[name][1], params)),
                    }
                    if name == "critic":
                        out[name]["vanilla losses"] = vanilla[0]
                        out[name]["vanilla params equal"] = all(map(torch.equal, vanilla[1], params))
                support.drop(*engines.values())
        finally:
            support.destroy(actor, critic)
    return out


@pytest.mark.world
@pytest.mark.slow
def test_hpz_interleaved_training_is_bit_identical_to_training_alone(world):
    """ZeRO-3 + hpZ: critic (DP=4) and actor (TP=2) stepped alternately match each alone, critic matches vanilla."""
    for rank, out in enumerate(world.run(_rank_hpz_interleaved, 3, timeout=WORLD_TIMEOUT)):
        for name in ("critic", "actor"):
            facts = out[name]
            assert facts["losses together"] == facts["losses alone"], (
                f"rank {rank}, {name}: losses interleaved {facts['losses together']}, alone {facts['losses alone']}"
            )
            assert facts["params equal"], f"rank {rank}, {name}: parameters differ from training alone"
        critic = out["critic"]
        assert critic["losses together"] == critic["vanilla losses"], (
            f"rank {rank}: critic losses {critic['losses together']}, vanilla DeepSpeed alone {critic['vanilla losses']}"
        )
        assert critic["vanilla params equal"], f"rank {rank}: critic parameters differ from vanilla DeepSpeed alone"


def _a2a(engine: Any) -> dict[str, Any]:
    return {key: support.ranks(group) for key, group in sorted(engine.local_all_to_all_group.items())}


def _rank_all_to_all_groups(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    config = support.config(stage=3, zero_optimization={"stage": 3, "zero_quantized_gradients": True})
    with support.isolated():
        critic = support.state(name="critic")
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        try:
            out["actor dp"] = actor.ranks("dp")
            with support.unpatched_run():
                first = support.engine(support.model(2), config)
                second = support.engine(support.model(1), config, mpu=actor)
                out["unpatched actor"] = _a2a(second)
                support.drop(first, second)
            with support.installed():
                with critic.activate():
                    first = support.engine(support.model(2), config)
                with actor.activate():
                    second = support.engine(support.model(1), config, mpu=actor)
                out["patched"] = {"critic": _a2a(first), "actor": _a2a(second)}
                import deepspeed.utils.groups as groups

                out["global dict untouched"] = dict(vars(groups)["_ALL_TO_ALL_GROUP"]) == {}
                support.drop(first, second)
        finally:
            support.destroy(actor, critic)
    return out


@pytest.mark.world
@pytest.mark.slow
def test_all_to_all_groups_are_cut_from_each_engines_own_data_parallel_ranks(world):
    """qgZ: each engine's local all-to-all group holds its own ZeRO ranks on the node (one node of 4 here)."""
    for rank, out in enumerate(world.run(_rank_all_to_all_groups, timeout=WORLD_TIMEOUT)):
        dp = out["actor dp"]
        assert out["unpatched actor"].get("local_0") != dp, (
            f"rank {rank}: unpatched, expected the actor's all-to-all groups not to be its DP group {dp}, "
            f"got {out['unpatched actor']}"
        )
        expected = {"critic": {"local_0": (0, 1, 2, 3)}, "actor": {"local_0": dp}}
        assert out["patched"] == expected, f"rank {rank}: all-to-all expected {expected}, got {out['patched']}"
        assert out["global dict untouched"], f"rank {rank}: groups._ALL_TO_ALL_GROUP was filled"


def _rank_bad_hpz(rank: int) -> dict[str, Any]:
    from scoped_parallel.groups.create import creation_count

    out: dict[str, Any] = {}
    with support.isolated():
        critic = support.state(name="critic")
        try:
            with support.installed():
                import deepspeed.utils.groups as groups

                with critic.activate():
                    before = creation_count()
                    for size in (3, "2"):
                        try:
                            groups._create_zero_param_parallel_group(size)
                        except ValueError as error:  # LayoutError is a ValueError
                            out[repr(size)] = (type(error).__name__, str(error))
                    out["created"] = creation_count() - before
                    groups._create_zero_param_parallel_group(2)
                    groups._create_zero_param_parallel_group(2)  # same size again: a no-op
                    try:
                        groups._create_zero_param_parallel_group(4)
                    except ValueError as error:
                        out["other size"] = (type(error).__name__, str(error))
        finally:
            support.destroy(critic)
    return out


@pytest.mark.world
def test_bad_hpz_size_raises_layout_error_before_any_group_is_created(world):
    """hpZ 3 on DP 4, a non-int size and a second, different size raise LayoutError naming the value."""
    for rank, out in enumerate(world.run(_rank_bad_hpz, timeout=WORLD_TIMEOUT)):
        assert out["created"] == 0, f"rank {rank}: {out['created']} groups created before the error"
        kind, text = out["3"]
        assert kind == "LayoutError" and "zero_hpz_partition_size=3" in text and "divisor of 4" in text, (rank, text)
        kind, text = out["'2'"]
        assert kind == "LayoutError" and "'2'" in text, (rank, text)
        kind, text = out["other size"]
        assert kind == "LayoutError" and "already exists" in text, (rank, text)
