"""Tier 4 (shared 4-rank gloo world): DeepSpeed PR #7726's wrapper API as a drop-in.

Every public name of ``scoped_parallel.compat.parallel_state_wrappers`` is called on
real gloo ranks; ``deepspeed.initialize(mpu=instance)`` trains a TP=2 model with
ZeRO-1, two named instances train one after the other, and the scope set by
``set_current_parallel_state`` is per thread. The "switched off" check: without the
adapters, DeepSpeed's own getter inside ``set_current_parallel_state("actor")`` answers
from its global, not from the actor.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import _adapter_deepspeed_support as support
from _adapter_deepspeed_support import WORLD_TIMEOUT

pytest.importorskip("deepspeed")


def _wrappers() -> Any:
    from scoped_parallel.compat import parallel_state_wrappers as ps

    return ps


def _rank_every_name(rank: int) -> dict[str, Any]:
    ps = _wrappers()
    out: dict[str, Any] = {}
    with support.isolated():
        actor = ps.get_parallel_state_instance("actor")
        critic = ps.get_parallel_state_instance("critic")
        out["same object"] = actor is ps.get_parallel_state_instance("actor")
        out["default is __default__"] = ps.get_parallel_state_instance(None) is ps.get_parallel_state_instance("__default__")
        out["before init"] = (actor.is_initialized(), ps.is_initialized("actor"))
        try:
            # TP=2 with SP=2 on 4 ranks (the PR refuses SP with TP); CP=2 refused (DeepSpeed has no CP).
            actor.initialize_model_parallel(tensor_model_parallel_size=2)
            try:
                critic.initialize_model_parallel(context_parallel_size=2)
            except NotImplementedError as error:
                out["cp refused"] = (type(error).__name__, isinstance(error, ValueError), str(error), critic.is_initialized())
            critic.initialize_model_parallel(pipeline_model_parallel_size=2)
            try:
                critic.initialize_model_parallel(pipeline_model_parallel_size=2)
            except AssertionError as error:
                out["twice"] = type(error).__name__
            out["pr shape"] = (
                isinstance(actor, ps.ParallelState),
                type(ps.ParallelState()).__name__,
                ps.ParallelState().is_initialized(),
            )
            out["model parallel is tp"] = (
                critic.get_model_parallel_world_size(),
                critic.get_model_parallel_rank(),
                ps.get_model_parallel_world_size("critic"),
                critic.state.get_model_parallel_world_size(),  # the core keeps Megatron's meaning (tp x pp)
            )
            out["dp ranks type"] = type(critic.get_data_parallel_group_ranks()).__name__
            sp = ps.get_parallel_state_instance("sp")
            sp.initialize_model_parallel(tensor_model_parallel_size=2, sequence_parallel_size=2)
            out["after init"] = (actor.is_initialized(), ps.is_initialized("actor"))
            names = sorted(n for n in ps.__all__ if n.startswith("get_") and n not in (
                "get_parallel_state_instance", "get_parallel_state", "get_current_parallel_state",
                "get_all_to_all_groups"))
            answers: dict[str, Any] = {}
            for n in names:
                fn = getattr(ps, n)
                target = "critic" if "context" in n else "actor"
                try:
                    by_name = fn(name=target)
                    with ps.set_current_parallel_state(target):
                        in_scope = fn()
                    value = by_name if isinstance(by_name, (int, bool, type(None))) else support.ranks(by_name)
                    answers[n] = (value, by_name is in_scope or by_name == in_scope)
                except Exception as error:  # noqa: BLE001  (reported, asserted in the test)
                    answers[n] = ("error", f"{type(error).__name__}: {error}")
            out["answers"] = answers
            out["sp groups"] = (support.ranks(ps.get_sequence_parallel_group("sp")), ps.get_sequence_parallel_world_size("sp"))
            with ps.set_current_parallel_state("actor"):
                out["current"] = ps.get_current_parallel_state() is actor and ps.get_parallel_state() is actor
            out["no scope current is default"] = ps.get_current_parallel_state() is ps.get_parallel_state_instance(None)
            ps.set_tensor_model_parallel_world_size(7, name="actor")
            ps.set_tensor_model_parallel_rank(5, name="actor")
            out["tp overrides"] = (ps.get_tensor_model_parallel_world_size("actor"), ps.get_model_parallel_rank("actor"))
            out["tp overrides on the instance"] = (
                actor.get_tensor_model_parallel_world_size(), actor.get_model_parallel_world_size(), actor.get_tensor_model_parallel_rank()
            )
            out["all to all"] = {k: support.ranks(g) for k, g in ps.initialize_all_to_all_groups("actor").items()}
            out["all to all again"] = ps.get_all_to_all_groups("actor") is ps.initialize_all_to_all_groups("actor")
            # Scopes are per thread: another thread's switch does not leak (the PR's module global does).
            seen: list[Any] = []
            entered, leave = threading.Event(), threading.Event()

            def other() -> None:
                with ps.set_current_parallel_state("critic"):
                    entered.set()
                    leave.wait(60)
                    seen.append(ps.get_current_parallel_state().name)

            with ps.set_current_parallel_state("actor"):
                thread = threading.Thread(target=other)
                thread.start()
                entered.wait(60)
                seen.append(ps.get_current_parallel_state().name)
                leave.set()
                thread.join()
            out["other thread"] = seen
            try:
                ps.get_parallel_state_instance("nobody").initialize_model_parallel(hierarchical_context_parallel_sizes=[2])
            except NotImplementedError as error:
                out["refused"] = (type(error).__name__, str(error))
            try:
                ps.get_tensor_model_parallel_group(name="never-initialized")
            except AssertionError as error:
                out["uninitialized"] = (type(error).__name__, str(error))
            config = {"train_batch_size": 4, "tensor_parallel": {"autotp_size": 2}}
            again = ps.initialize_parallel_state_from_config(config, name="actor")
            out["from config existing"] = again is actor
            try:
                ps.initialize_parallel_state_from_config(config, name="actor", tensor_model_parallel_size=4)
            except ValueError as error:
                out["from config conflict"] = (type(error).__name__, str(error))
            fresh = ps.initialize_parallel_state_from_config(config, name="from-config", pipeline_model_parallel_size=2)
            out["from config sizes"] = (fresh.get_tensor_model_parallel_world_size(), fresh.get_pipeline_model_parallel_world_size())
        finally:
            for instance in list(ps._REGISTRY.values()):
                instance.destroy()
            ps._REGISTRY.clear()
    return out


@pytest.mark.world
def test_every_wrapper_name_answers_from_the_named_or_current_instance(world):
    """Each getter by name equals the getter in the instance's scope; registry, overrides, threads, config."""
    for rank, out in enumerate(world.run(_rank_every_name, timeout=WORLD_TIMEOUT)):
        where = f"rank {rank}"
        assert out["same object"] and out["default is __default__"], where
        assert out["before init"] == (False, False) and out["after init"] == (True, True), where
        errors = {n: a for n, a in out["answers"].items() if a[0] == "error"}
        # Non-pipeline ranks are in no embedding group only when PP > 1; here PP = 1, so none may fail.
        assert errors == {}, f"{where}: getters failed: {errors}"
        differ = sorted(n for n, (_, same) in out["answers"].items() if not same)
        assert differ == [], f"{where}: by name and in scope differ for {differ}"
        tp = (rank // 2 * 2, rank // 2 * 2 + 1)
        expected = {
            "get_tensor_model_parallel_group": (tp, True),
            "get_tensor_model_parallel_world_size": (2, True),
            "get_model_parallel_world_size": (2, True),
            "get_data_parallel_group": ((rank % 2, rank % 2 + 2), True),
            "get_context_parallel_world_size": (1, True),
        }
        got = {n: out["answers"][n] for n in expected}
        assert got == expected, f"{where}: expected {expected}, got {got}"
        assert out["sp groups"] == ((rank % 2, rank % 2 + 2), 2), f"{where}: SP with TP: {out['sp groups']}"
        assert out["current"] and out["no scope current is default"], where
        assert out["tp overrides"] == (7, 5), f"{where}: overrides expected (7, 5), got {out['tp overrides']}"
        assert out["all to all"] == {"local_0": (rank % 2, rank % 2 + 2)}, f"{where}: all-to-all {out['all to all']}"
        assert out["all to all again"], where
        assert out["other thread"] == ["actor", "critic"], f"{where}: another thread saw {out['other thread']}"
        assert out["refused"][0] == "UnsupportedArgumentError", (where, out["refused"])
        assert "does not support hierarchical_context_parallel_sizes" in out["refused"][1], (where, out["refused"])
        name, also_value_error, message, initialized = out["cp refused"]
        assert (name, also_value_error, initialized) == ("UnsupportedArgumentError", True, False), (where, out["cp refused"])
        assert "does not support context_parallel_size=2" in message and "DeepSpeed has no context parallelism" in message, message
        assert out["twice"] == "ParallelStateAlreadyInitializedError", (where, out.get("twice"))
        assert out["pr shape"] == (True, "ParallelStateInstance", False), (where, out["pr shape"])
        # critic: TP=1 x PP=2. The PR's model-parallel size is TP; the core state's is Megatron's TP x PP.
        assert out["model parallel is tp"] == (1, 0, 1, 2), (where, out["model parallel is tp"])
        assert out["dp ranks type"] == "list", (where, out["dp ranks type"])
        assert out["tp overrides on the instance"] == (7, 7, 5), (where, out["tp overrides on the instance"])
        assert out["uninitialized"][0] == "ParallelStateNotInitializedError", (where, out["uninitialized"])
        assert "initialize_model_parallel" in out["uninitialized"][1], where
        assert out["from config existing"], where
        assert out["from config conflict"][0] == "LayoutError" and "requested 4, has 2" in out["from config conflict"][1], where
        assert out["from config sizes"] == (2, 2), f"{where}: from config {out['from config sizes']}"


def _rank_deepspeed_with_instances(rank: int, steps: int) -> dict[str, Any]:
    ps = _wrappers()
    out: dict[str, Any] = {}
    with support.isolated():
        try:
            actor = ps.get_parallel_state_instance("actor")
            actor.initialize_model_parallel(tensor_model_parallel_size=2)
            critic = ps.initialize_parallel_state_from_config(support.config(stage=1), name="critic")
            import deepspeed.utils.groups as groups

            with ps.set_current_parallel_state("actor"):  # adapters off: DeepSpeed's getter ignores it
                out["off"] = support.ranks(groups._get_data_parallel_group())
            with support.installed():
                with ps.set_current_parallel_state("actor"):
                    out["on"] = support.ranks(groups._get_data_parallel_group())
                trained = {}
                for name, instance, seed in (("actor", actor, 1), ("critic", critic, 2)):  # one after the other
                    engine = support.engine(support.model(seed), support.config(stage=1), mpu=instance)
                    with ps.set_current_parallel_state(name), support.observe_collectives() as log:
                        losses = [float(support.step(engine, support.batch(rank, i, seed))) for i in range(steps)]
                    trained[name] = {
                        "losses": losses,
                        "zero dp": support.ranks(engine.optimizer.dp_process_group),
                        "groups": sorted({r for _, _, r in log}, key=repr),
                        "params": [p.detach().clone() for p in engine.module.parameters()],
                    }
                    support.drop(engine)
            with support.unpatched_run():  # vanilla DeepSpeed, the actor's layout alone
                engine = support.engine(support.model(1), support.config(stage=1), mpu=actor.state)
                vanilla = [float(support.step(engine, support.batch(rank, i, 1))) for i in range(steps)]
                vanilla_params = [p.detach().clone() for p in engine.module.parameters()]
                support.drop(engine)
            out["trained"] = {n: {k: v for k, v in t.items() if k != "params"} for n, t in trained.items()}
            out["actor dp"] = actor.get_data_parallel_group_ranks()
            out["vanilla equal"] = trained["actor"]["losses"] == vanilla and all(
                map(torch.equal, trained["actor"]["params"], vanilla_params)
            )
        finally:
            for instance in list(ps._REGISTRY.values()):
                instance.destroy()
            ps._REGISTRY.clear()
    return out


@pytest.mark.world
@pytest.mark.slow
def test_deepspeed_initialize_with_named_instances_trains_each_on_its_own_groups(world):
    """mpu=instance: TP=2 with ZeRO-1 and a DP=4 critic, trained one after the other, each on its groups."""
    for rank, out in enumerate(world.run(_rank_deepspeed_with_instances, 2, timeout=WORLD_TIMEOUT)):
        dp = tuple(out["actor dp"])
        assert out["off"] != dp, f"rank {rank}: adapters off, expected DeepSpeed's global DP group, got the actor's {dp}"
        assert out["on"] == dp, f"rank {rank}: adapters on, expected the actor's DP group {dp}, got {out['on']}"
        actor, critic = out["trained"]["actor"], out["trained"]["critic"]
        assert actor["zero dp"] == dp, f"rank {rank}: actor ZeRO group expected {dp}, got {actor['zero dp']}"
        assert critic["zero dp"] == (0, 1, 2, 3), f"rank {rank}: critic ZeRO group {critic['zero dp']}"
        assert (0, 1, 2, 3) not in actor["groups"], f"rank {rank}: actor stepped over the world: {actor['groups']}"
        assert out["vanilla equal"], f"rank {rank}: actor differs from vanilla DeepSpeed with the same mpu"
