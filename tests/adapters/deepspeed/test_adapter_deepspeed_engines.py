"""DeepSpeed adapter, engines at step time: each engine's collectives use its own state's groups.

Behaviours proved (4-rank gloo world; collectives observed, never mocked):

* unpatched, stepping engine A after engine B was built all-reduces A's gradients
  over B's group; with the adapters, in A's scope or with A bound to its state, over
  A's SP x DP group (gradient clipping over A's SP x DP and TP groups);
* actor (TP=2 x DP=2) and critic (DP=4) engines stepped alternately, for ZeRO 0-3,
  give bit-identical losses and parameters to each trained alone, use only their
  state's groups, and leave DeepSpeed's module globals as they were;
* with an SP=2 state as mpu, ZeRO-3 partitions parameters over SP x DP, the group
  that reduces their gradients;
* with the adapters installed but no scope, an engine trains bit-identically to
  unpatched DeepSpeed, with the same collectives.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

import _adapter_deepspeed_support as support  # noqa: E402
from _adapter_deepspeed_support import N_PARAMS, WORLD_TIMEOUT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _all_reduces(log: list[tuple[str, int, Any]]) -> list[tuple[str, int, Any]]:
    return [(n, k, r) for n, k, r in log if n == "all_reduce"]


def _rank_step_uses_own_group(rank: int) -> dict[str, Any]:
    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        critic = support.state(name="critic")
        config = support.config(stage=0, clip=1.0)
        out: dict[str, Any] = {"actor_sdp": actor.ranks("sp-dp"), "actor_tp": actor.ranks("tp")}
        try:
            with support.unpatched_run():
                engine_a = support.engine(support.model(1), config, mpu=actor)
                engine_b = support.engine(support.model(2), config, mpu=critic)
                with support.observe_collectives() as log:
                    support.step(engine_a, support.batch(rank, 0, 1))
                out["unpatched"] = _all_reduces(log)
                support.drop(engine_a, engine_b)
            with support.installed():
                with actor.activate():
                    engine_a = support.engine(support.model(1), config, mpu=actor)
                with critic.activate():
                    engine_b = support.engine(support.model(2), config, mpu=critic)
                with actor.activate(), support.observe_collectives() as log:
                    support.step(engine_a, support.batch(rank, 0, 1))
                out["patched"] = _all_reduces(log)
                actor.bind(engine_a)  # a bound engine steps in its scope without `with`
                try:
                    with support.observe_collectives() as log:
                        support.step(engine_a, support.batch(rank, 1, 1))
                finally:
                    actor.unbind(engine_a)
                out["bound"] = _all_reduces(log)
                support.drop(engine_a, engine_b)
        finally:
            support.destroy(actor, critic)
        return out


@pytest.mark.world
def test_step_of_first_engine_reduces_over_its_own_group(world):
    """Stepping engine A after B all-reduces A's gradients over B's group unpatched, over A's with adapters."""
    for rank, out in enumerate(world.run(_rank_step_uses_own_group, timeout=WORLD_TIMEOUT)):
        actor_sdp, actor_tp = tuple(out["actor_sdp"]), tuple(out["actor_tp"])
        grads = {run: {r for _, n, r in out[run] if n == N_PARAMS} for run in ("unpatched", "patched", "bound")}
        assert grads["unpatched"] == {(0, 1, 2, 3)}, (
            f"rank {rank}: unpatched gradient all-reduce groups {grads['unpatched']}, expected the critic's (0, 1, 2, 3)"
        )
        for run in ("patched", "bound"):
            assert grads[run] == {actor_sdp}, f"rank {rank}: {run} gradient groups {grads[run]}, expected {{{actor_sdp}}}"
        clip = {r for _, n, r in out["patched"] if n == 1}
        assert clip == {actor_sdp, actor_tp}, f"rank {rank}: clip norm groups {clip}, expected {{{actor_sdp}, {actor_tp}}}"
        unpatched_clip = {r for _, n, r in out["unpatched"] if n == 1}
        assert (0, 1, 2, 3) in unpatched_clip, f"rank {rank}: unpatched clip groups {unpatched_clip} lack the critic's"


def _full_params_of_seed(name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in support.model(1 if name == "actor" else 2).parameters()]


def _rank_interleaved_training(rank: int, stages: tuple[int, ...], steps: int) -> dict[str, Any]:
    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        critic = support.state(name="critic")
        specs = (("actor", actor, 1, actor), ("critic", critic, 2, None))
        allowed = {
            "actor": sorted({actor.ranks("tp"), actor.ranks("dp"), actor.ranks("sp-dp"), actor.ranks("tp-pp")}),
            "critic": sorted({critic.ranks("dp"), critic.ranks("sp-dp"), critic.ranks("tp-pp")}),
        }
        out: dict[str, Any] = {"allowed": allowed, "stages": {}}
        try:
            with support.installed():
                snap = support.globals_snapshot()
                for stage in stages:
                    config = support.config(stage=stage, clip=1.0)
                    alone: dict[str, Any] = {}
                    for name, state, seed, mpu in specs:
                        with state.activate():
                            engine = support.engine(support.model(seed), config, mpu=mpu)
                            losses = [support.step(engine, support.batch(rank, i, seed)) for i in range(steps)]
                            alone[name] = (losses, support.full_params(engine))
                        support.drop(engine)
                    engines = {}
                    for name, state, seed, mpu in specs:
                        with state.activate():
                            engines[name] = support.engine(support.model(seed), config, mpu=mpu)
                    together: dict[str, list[torch.Tensor]] = {"actor": [], "critic": []}
                    seen: dict[str, set[Any]] = {"actor": set(), "critic": set()}
                    for i in range(steps):
                        for name, state, seed, _ in specs:
                            with state.activate(), support.observe_collectives() as log:
                                together[name].append(support.step(engines[name], support.batch(rank, i, seed)))
                            seen[name].update((collective, r) for collective, _, r in log)
                    result = {}
                    for name, state, _, _ in specs:
                        with state.activate():
                            params = support.full_params(engines[name])
                        result[name] = {
                            "losses alone": [float(x) for x in alone[name][0]],
                            "losses together": [float(x) for x in together[name]],
                            "params equal": all(map(torch.equal, alone[name][1], params)),
                            "params moved": not all(map(torch.equal, _full_params_of_seed(name), params)),
                            "collectives": sorted(seen[name], key=repr),
                        }
                    support.drop(*engines.values())
                    out["stages"][stage] = result
                out["globals_changed"] = support.globals_changed(snap)
        finally:
            support.destroy(actor, critic)
        return out


def _zero3_world_check(stage: int, collective: str, ranks: Any) -> bool:
    # ZeRO-3's trace-order consistency check (PartitionedParameterCoordinator.reset_step ->
    # assert_ints_same_as_other_ranks) broadcasts over WORLD on every model.
    return stage == 3 and collective == "broadcast" and ranks == "WORLD"


@pytest.mark.world
@pytest.mark.slow
def test_interleaved_training_is_bit_identical_to_training_alone(world):
    """Actor (TP=2 x DP=2) and critic (DP=4) stepped alternately match each trained alone, for ZeRO 0-3."""
    out = world.run(_rank_interleaved_training, (0, 1, 2, 3), 3, timeout=WORLD_TIMEOUT)
    for rank, result in enumerate(out):
        assert result["globals_changed"] == [], f"rank {rank}: DeepSpeed globals changed: {result['globals_changed']}"
        allowed = {name: set(map(tuple, groups)) for name, groups in result["allowed"].items()}
        for stage, models in result["stages"].items():
            for name, facts in models.items():
                where = f"rank {rank}, ZeRO-{stage}, {name}"
                assert facts["losses together"] == facts["losses alone"], (
                    f"{where}: losses interleaved {facts['losses together']}, alone {facts['losses alone']}"
                )
                assert facts["params equal"], f"{where}: parameters differ from training alone"
                assert facts["params moved"], f"{where}: parameters did not change in training"
                used = {r for c, r in facts["collectives"] if not _zero3_world_check(stage, c, r)}
                assert used and used <= allowed[name], (
                    f"{where}: collectives used groups {sorted(used, key=repr)}, allowed {sorted(allowed[name])}"
                )


def _rank_zero3_partitions_over_sp_dp(rank: int) -> dict[str, Any]:
    with support.isolated():
        ref = support.state(name="ref", sequence_parallel_size=2)
        out: dict[str, Any] = {}
        try:
            with support.installed(), ref.activate():
                engine = support.engine(support.model(3), support.config(stage=3), mpu=ref)
                out["partition groups"] = sorted({support.ranks(p.ds_process_group) for p in engine.module.parameters()})
                out["sp-dp"] = ref.ranks("sp-dp")
                out["reduce group"] = support.ranks(engine.seq_data_parallel_group)
                support.drop(engine)
        finally:
            support.destroy(ref)
        return out


@pytest.mark.world
def test_zero3_partitions_parameters_over_the_group_that_reduces_their_gradients(world):
    """With an SP=2 state as mpu, ZeRO-3 partitions over SP x DP, the group its gradients are reduced over."""
    for rank, out in enumerate(world.run(_rank_zero3_partitions_over_sp_dp, timeout=WORLD_TIMEOUT)):
        sp_dp = tuple(out["sp-dp"])
        assert out["partition groups"] == [sp_dp], f"rank {rank}: partition groups {out['partition groups']}, expected [{sp_dp}]"
        assert out["reduce group"] == sp_dp, f"rank {rank}: gradient reduce group {out['reduce group']}, expected {sp_dp}"


def _rank_outside_scope_unchanged(rank: int, steps: int) -> dict[str, Any]:
    def train() -> dict[str, Any]:
        engine = support.engine(support.model(5), support.config(stage=0, clip=1.0))
        with support.observe_collectives() as log:
            losses = [support.step(engine, support.batch(rank, i, 5)) for i in range(steps)]
        params = support.full_params(engine)
        support.drop(engine)
        return {"losses": [float(x) for x in losses], "params": params, "collectives": list(log)}

    with support.isolated():
        with support.unpatched_run():
            plain = train()
        with support.unpatched_run(), support.installed():
            patched = train()
    return {
        "losses": (plain["losses"], patched["losses"]),
        "params equal": all(map(torch.equal, plain["params"], patched["params"])),
        "collectives": (plain["collectives"], patched["collectives"]),
    }


@pytest.mark.world
def test_outside_any_scope_deepspeed_trains_as_unpatched(world):
    """With adapters installed but no scope, an engine trains bit-identically with the same collectives."""
    for rank, out in enumerate(world.run(_rank_outside_scope_unchanged, 3, timeout=WORLD_TIMEOUT)):
        plain, patched = out["losses"]
        assert patched == plain, f"rank {rank}: losses with adapters {patched}, unpatched {plain}"
        assert out["params equal"], f"rank {rank}: parameters differ from unpatched training"
        plain_log, patched_log = out["collectives"]
        assert plain_log, f"rank {rank}: no collective observed in unpatched training"
        assert patched_log == plain_log, f"rank {rank}: collectives with adapters {patched_log}, unpatched {plain_log}"
