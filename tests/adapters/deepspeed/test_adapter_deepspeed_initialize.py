"""DeepSpeed adapter, ``deepspeed.initialize``: an engine is built for, and captures, its own state.

Behaviours proved (4-rank gloo world):

* unpatched, a critic engine built without mpu after a TP=2 actor engine crashes
  (it inherits the actor's ``groups.mpu``); with the adapters, in the critic's scope,
  it captures the critic's DP and SP x DP groups, and the actor engine keeps its own;
* ``deepspeed.initialize(mpu=state)`` called outside any scope runs in that state's
  scope: the module's own ``groups.mpu`` stays untouched and the mpu is recorded for
  the state;
* ``deepspeed.initialize(mpu=actor)`` inside the critic's scope builds an actor engine,
  leaves the critic's answers alone, and a foreign ``groups.mpu = actor`` write in the
  critic's scope is refused naming both states;
* ``deepspeed.initialize()`` without mpu inside a TP=2 scope uses the state as mpu.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("deepspeed")

import _adapter_deepspeed_support as support  # noqa: E402
from _adapter_deepspeed_support import WORLD_TIMEOUT, identify, state_groups  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _rank_critic_after_actor(rank: int) -> dict[str, Any]:
    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        critic = support.state(name="critic")
        # one kind per lookup: with SP = 1 a state's dp and sp-dp are the same group object
        dp = {**state_groups("actor", actor, ("dp",)), **state_groups("critic", critic, ("dp",))}
        sdp = {**state_groups("actor", actor, ("sp-dp",)), **state_groups("critic", critic, ("sp-dp",))}
        out: dict[str, Any] = {}
        try:
            with support.unpatched_run():
                engine_a = support.engine(support.model(1), support.config(), mpu=actor)
                try:
                    support.engine(support.model(2), support.config())
                    out["unpatched"] = "initialized"
                except Exception as err:  # the bug: the critic inherits the actor's mpu
                    out["unpatched"] = f"{type(err).__name__}: {err}"
                support.drop(engine_a)
            with support.installed():
                with actor.activate():
                    engine_a = support.engine(support.model(1), support.config(), mpu=actor)
                with critic.activate():
                    engine_c = support.engine(support.model(2), support.config())
                out["critic"] = {
                    "dp": identify(engine_c.data_parallel_group, dp),
                    "sp-dp": identify(engine_c.seq_data_parallel_group, sdp),
                    "dp ranks": support.ranks(engine_c.data_parallel_group),
                    "dp world size": engine_c.dp_world_size,
                }
                out["actor"] = {
                    "sp-dp": identify(engine_a.seq_data_parallel_group, sdp),
                    "sp-dp ranks": support.ranks(engine_a.seq_data_parallel_group),
                }
                support.drop(engine_a, engine_c)
        finally:
            support.destroy(actor, critic)
        return out


@pytest.mark.world
def test_critic_initialized_after_actor_captures_its_own_dp_group(world):
    """A critic engine built after a TP=2 actor crashes unpatched and gets the critic's DP group with adapters."""
    for rank, out in enumerate(world.run(_rank_critic_after_actor, timeout=WORLD_TIMEOUT)):
        unpatched = out["unpatched"]
        assert unpatched.startswith("AttributeError") and "get_model_parallel_rank" in unpatched, (
            f"rank {rank}: unpatched critic initialize gave {unpatched!r}, expected the AttributeError "
            "about get_model_parallel_rank"
        )
        expected_critic = {"dp": "critic dp", "sp-dp": "critic sp-dp", "dp ranks": (0, 1, 2, 3), "dp world size": 4}
        assert out["critic"] == expected_critic, f"rank {rank}: critic engine {out['critic']}, expected {expected_critic}"
        expected_actor = {"sp-dp": "actor sp-dp", "sp-dp ranks": (0, 2) if rank % 2 == 0 else (1, 3)}
        assert out["actor"] == expected_actor, f"rank {rank}: actor engine {out['actor']}, expected {expected_actor}"


def _rank_initialize_outside_scope(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        out: dict[str, Any] = {}
        try:
            with support.installed():
                before = vars(groups)["mpu"]
                engine = support.engine(support.model(1), support.config(), mpu=actor)  # no scope
                after = vars(groups)["mpu"]
                out["module mpu"] = "untouched" if after is before else identify(after, {"actor": actor})
                out["engine"] = (
                    identify(engine.data_parallel_group, state_groups("actor", actor, ("dp",))),
                    identify(engine.seq_data_parallel_group, state_groups("actor", actor, ("sp-dp",))),
                    engine.mp_world_size,
                )
                with actor.activate():
                    out["groups.mpu in actor scope"] = identify(groups.mpu, {"actor": actor})
                support.drop(engine)
        finally:
            support.destroy(actor)
        return out


@pytest.mark.world
def test_initialize_outside_any_scope_with_a_state_mpu_runs_in_its_scope(world):
    """deepspeed.initialize(mpu=state) outside a scope records groups.mpu for that state, not the module."""
    expected = {
        "module mpu": "untouched",
        "engine": ("actor dp", "actor sp-dp", 2),
        "groups.mpu in actor scope": "actor",
    }
    for rank, out in enumerate(world.run(_rank_initialize_outside_scope, timeout=WORLD_TIMEOUT)):
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"


def _rank_initialize_with_another_states_mpu(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    from scoped_parallel.errors import AdapterError

    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        critic = support.state(name="critic")
        known = {**state_groups("actor", actor, ("dp",)), **state_groups("critic", critic, ("dp",))}
        known.update(actor=actor, critic=critic)
        out: dict[str, Any] = {}
        try:
            with support.installed(), critic.activate():
                engine = support.engine(support.model(1), support.config(), mpu=actor)  # actor's, in critic's scope
                out["engine dp"] = identify(engine.data_parallel_group, known)
                out["critic scope dp"] = identify(groups._get_data_parallel_group(), known)
                with actor.activate():
                    out["groups.mpu in actor scope"] = identify(groups.mpu, known)
                try:
                    groups.mpu = actor
                    out["foreign write"] = "accepted"
                except AdapterError as err:
                    out["foreign write"] = str(err)
                support.drop(engine)
        finally:
            support.destroy(actor, critic)
        return out


@pytest.mark.world
def test_initialize_with_another_states_mpu_runs_in_that_state(world):
    """deepspeed.initialize(mpu=actor) inside critic's scope builds an actor engine and leaves critic intact."""
    for rank, out in enumerate(world.run(_rank_initialize_with_another_states_mpu, timeout=WORLD_TIMEOUT)):
        refused = out.pop("foreign write")
        expected = {"engine dp": "actor dp", "critic scope dp": "critic dp", "groups.mpu in actor scope": "actor"}
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"
        assert "'actor'" in refused and "'critic'" in refused, (
            f"rank {rank}: groups.mpu = actor inside critic's scope gave {refused!r}, expected an "
            "AdapterError naming both states"
        )


def _rank_initialize_in_scope_without_mpu(rank: int) -> dict[str, Any]:
    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        known = {**state_groups("actor", actor, ("dp",)), "actor": actor}
        out: dict[str, Any] = {}
        try:
            with support.installed(), actor.activate():
                engine = support.engine(support.model(1), support.config())  # no mpu: the state becomes it
                out = {
                    "engine mpu": identify(engine.mpu, known),
                    "mp world size": engine.mp_world_size,
                    "config world size": engine._config.world_size,
                    "engine dp": identify(engine.data_parallel_group, known),
                }
                support.drop(engine)
        finally:
            support.destroy(actor)
        return out


@pytest.mark.world
def test_initialize_inside_a_scope_without_mpu_uses_the_state_as_mpu(world):
    """deepspeed.initialize() without mpu inside a TP=2 scope builds an engine whose mpu is the state."""
    expected = {"engine mpu": "actor", "mp world size": 2, "config world size": 2, "engine dp": "actor dp"}
    for rank, out in enumerate(world.run(_rank_initialize_in_scope_without_mpu, timeout=WORLD_TIMEOUT)):
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"


def _rank_context_parallel_state_refused(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    with support.isolated():
        cp = support.state(name="cp", context_parallel_size=2)
        out: dict[str, Any] = {}
        try:
            with support.installed():
                for how in ("mpu=state", "in its scope"):
                    before = len(dist.distributed_c10d._world.pg_map)
                    try:
                        if how == "mpu=state":
                            support.engine(support.model(1), support.config(stage=1), mpu=cp)
                        else:
                            with cp.activate():
                                support.engine(support.model(1), support.config(stage=1))
                        out[how] = "initialized"
                    except Exception as err:  # noqa: BLE001 - the type is the claim
                        out[how] = (type(err).__name__, "context_parallel_size=2" in str(err), str(cp.ranks("dp-cp")) in str(err))
                    out[how + " groups created"] = len(dist.distributed_c10d._world.pg_map) - before
        finally:
            support.destroy(cp)
        return out


@pytest.mark.world
def test_a_context_parallel_state_is_refused_before_deepspeed_runs(world):
    """DeepSpeed has no CP: an engine for a CP=2 state would reduce over DP only; it is refused, no group made."""
    refused = ("UnsupportedSetupError", True, True)
    expected = {"mpu=state": refused, "mpu=state groups created": 0, "in its scope": refused, "in its scope groups created": 0}
    for rank, out in enumerate(world.run(_rank_context_parallel_state_refused, timeout=WORLD_TIMEOUT)):
        assert out == expected, f"rank {rank}: expected {expected}, got {out}"
