"""DeepSpeed adapter, MoE expert groups and AutoTP groups: per state, never shared by accident.

Behaviours proved (4-rank gloo world):

* unpatched, a second MoE model with the same ``ep_size`` reuses the first model's
  expert groups; with the adapters each model's engine and MoE layer hold its own
  state's ``ep``/``edp`` groups and dicts, its all-to-alls run over its state's EP
  group, and DeepSpeed's module globals are left as they were;
* an ep size other than the state's runs DeepSpeed's own creator into the state's
  dicts (not the module's), and DeepSpeed's teardown hook makes those dicts forget a
  destroyed group;
* unpatched, a second AutoTP model reuses the first model's TP group; with the
  adapters each one shards over its own state's TP group (and the public AutoTP
  getters answer from the active state);
* ``_init_tp_mesh_device`` in a TP=2 scope returns the state's groups for size 2 and
  raises a LayoutError naming both sizes for size 4.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

deepspeed = pytest.importorskip("deepspeed")

import _adapter_deepspeed_support as support  # noqa: E402
from _adapter_deepspeed_support import WORLD_TIMEOUT, identify, state_groups  # noqa: E402

from scoped_parallel.errors import LayoutError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


class _MoENet(nn.Module):
    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(8, 8)
        self.moe = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=4, ep_size=ep_size, k=1, min_capacity=8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, aux, _ = self.moe(self.inp(x))
        return self.out(hidden), aux


def _moe_engine(mpu: Any) -> Any:
    torch.manual_seed(0)
    return support.engine(_MoENet(ep_size=2), support.config(), mpu=mpu)


def _rank_moe(rank: int) -> dict[str, Any]:
    with support.isolated():
        first = support.state(name="first", expert_model_parallel_size=2)
        second = support.state(name="second", expert_model_parallel_size=2, order="tp-cp-dp-ep-pp")
        # one kind per lookup: groups are shared by ranks, and first's edp has second's ep ranks
        ep = {**state_groups("first", first, ("ep",)), **state_groups("second", second, ("ep",))}
        edp = {**state_groups("first", first, ("edp",)), **state_groups("second", second, ("edp",))}
        out: dict[str, Any] = {"first_ep": first.ranks("ep"), "second_ep": second.ranks("ep")}
        try:
            with support.unpatched_run():
                engine_1 = _moe_engine(first)
                engine_2 = _moe_engine(second)
                out["unpatched second ep"] = support.ranks(engine_2.expert_parallel_group["ep_size_2"])
                out["unpatched shared"] = (
                    engine_2.expert_parallel_group["ep_size_2"] is engine_1.expert_parallel_group["ep_size_2"]
                )
                support.drop(engine_1, engine_2)
            with support.installed():
                snap = support.globals_snapshot()
                with first.activate():
                    engine_1 = _moe_engine(first)
                with second.activate():
                    engine_2 = _moe_engine(second)
                out["all_to_all groups"] = {}
                out["engines"] = {}
                for name, state, engine in (("first", first, engine_1), ("second", second, engine_2)):
                    with state.activate(), support.observe_collectives() as log:
                        support.step(engine, support.batch(rank, 0, 4, shape=(2, 4, 8)))
                    out["all_to_all groups"][name] = sorted({r for n, _, r in log if n.startswith("all_to_all")})
                    out["engines"][name] = (
                        identify(engine.expert_parallel_group["ep_size_2"], ep),
                        identify(engine.expert_data_parallel_group["ep_size_2"], edp),
                        identify(engine.module.moe.deepspeed_moe.ep_group, ep),
                    )
                out["dicts distinct"] = engine_1.expert_parallel_group is not engine_2.expert_parallel_group
                out["globals changed"] = support.globals_changed(snap)
                support.drop(engine_1, engine_2)
        finally:
            support.destroy(first, second)
        return out


@pytest.mark.world
def test_second_moe_model_uses_its_own_expert_groups(world):
    """A second MoE model with the same ep_size reuses the first's expert groups unpatched, its state's patched."""
    for rank, out in enumerate(world.run(_rank_moe, timeout=WORLD_TIMEOUT)):
        first_ep, second_ep = tuple(out["first_ep"]), tuple(out["second_ep"])
        assert first_ep != second_ep, f"rank {rank}: the two layouts should have different EP groups"
        assert out["unpatched shared"] and out["unpatched second ep"] == first_ep, (
            f"rank {rank}: unpatched second model EP group {out['unpatched second ep']} (shared: "
            f"{out['unpatched shared']}), expected the first model's {first_ep}, shared"
        )
        expected = {name: (f"{name} ep", f"{name} edp", f"{name} ep") for name in ("first", "second")}
        assert out["engines"] == expected, f"rank {rank}: engine expert groups {out['engines']}, expected {expected}"
        assert out["dicts distinct"], f"rank {rank}: both engines hold the same expert group dict"
        a2a = {"first": [first_ep], "second": [second_ep]}
        assert out["all_to_all groups"] == a2a, f"rank {rank}: all-to-all groups {out['all_to_all groups']}, expected {a2a}"
        assert out["globals changed"] == [], f"rank {rank}: DeepSpeed globals changed: {out['globals changed']}"


def _rank_expert_creator_fallback(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    with support.isolated():
        state = support.state(name="ep2", expert_model_parallel_size=2)
        out: dict[str, Any] = {}
        try:
            with support.installed():
                snap = support.globals_snapshot()
                with state.activate():
                    groups._create_expert_and_data_parallel(4)  # not the state's ep size: DeepSpeed builds it
                    out["ep4 ranks"] = tuple(groups._get_expert_parallel_group_ranks("ep_size_4"))
                    out["ep4 size"] = groups._get_expert_parallel_world_size("ep_size_4")
                    out["max name"] = groups._get_max_expert_size_name()
                    out["in-scope dict"] = sorted(groups._get_expert_parallel_group_dict())
                out["globals changed"] = support.globals_changed(snap)
                out["module dict"] = sorted(groups._get_expert_parallel_group_dict())
                with state.activate():
                    ep4 = groups._get_expert_parallel_group("ep_size_4")
                deepspeed.comm.destroy_process_group(ep4)  # DeepSpeed's teardown hook must forget it too
                with state.activate():
                    out["after destroy"] = (
                        sorted(groups._get_expert_parallel_group_dict()),
                        sorted(groups._get_expert_data_parallel_group_dict()),
                    )
        finally:
            support.destroy(state)
        return out


@pytest.mark.world
def test_expert_groups_of_another_size_are_built_by_deepspeed_per_state(world):
    """Another ep size runs DeepSpeed's creator into the state's own dicts, which forget destroyed groups."""
    expected = {
        "ep4 ranks": (0, 1, 2, 3),
        "ep4 size": 4,
        "max name": "ep_size_4",
        "in-scope dict": ["ep_size_4"],
        "globals changed": [],
        "module dict": [],
        "after destroy": ([], ["ep_size_4"]),
    }
    for rank, out in enumerate(world.run(_rank_expert_creator_fallback, timeout=WORLD_TIMEOUT)):
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"


class _TPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


def _autotp_engine(tp: int) -> Any:
    specs = [
        {"patterns": [".*up_proj.*"], "partition_type": "column"},
        {"patterns": [".*down_proj.*"], "partition_type": "row"},
    ]
    partition = {"use_default_specs": False, "layer_specs": specs}
    torch.manual_seed(0)
    return support.engine(_TPNet(), support.config(tensor_parallel={"autotp_size": tp, "partition_config": partition}))


def _rank_autotp(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    with support.isolated():
        first = support.state(name="first", tensor_model_parallel_size=2)
        second = support.state(name="second", tensor_model_parallel_size=4)
        tp = {**state_groups("first", first, ("tp",)), **state_groups("second", second, ("tp",))}
        dp = {**state_groups("first", first, ("dp",)), **state_groups("second", second, ("dp",))}
        out: dict[str, Any] = {"first_tp": first.ranks("tp")}
        try:
            with support.unpatched_run():
                engine_1 = _autotp_engine(2)
                engine_2 = _autotp_engine(4)
                out["unpatched second"] = (support.ranks(engine_2.module.up_proj.mp_group), engine_2.module.up_proj.weight.shape[0])
                support.drop(engine_1, engine_2)
            with support.installed():
                with first.activate():
                    engine_1 = _autotp_engine(2)
                    loss_1 = support.step(engine_1, support.batch(rank // 2, 0, 3))
                with second.activate():
                    engine_2 = _autotp_engine(4)
                    loss_2 = support.step(engine_2, support.batch(0, 0, 3))
                    out["public getters in second"] = (
                        identify(groups.get_tensor_model_parallel_group(), tp),
                        identify(groups.get_data_parallel_group(), dp),
                        groups.get_tensor_model_parallel_world_size(),
                        groups.get_tensor_model_parallel_src_rank(),
                    )
                out["tp groups"] = (
                    identify(engine_1.module.up_proj.mp_group, tp),
                    identify(engine_2.module.up_proj.mp_group, tp),
                )
                out["rows"] = (engine_1.module.up_proj.weight.shape[0], engine_2.module.up_proj.weight.shape[0])
                out["losses"] = (float(loss_1), float(loss_2))
                support.drop(engine_1, engine_2)
        finally:
            support.destroy(first, second)
        return out


@pytest.mark.world
def test_second_autotp_model_uses_its_own_tp_group(world):
    """A second AutoTP model reuses the first model's TP group unpatched and gets its state's with adapters."""
    for rank, out in enumerate(world.run(_rank_autotp, timeout=WORLD_TIMEOUT)):
        unpatched = (tuple(out["first_tp"]), 8)
        assert out["unpatched second"] == unpatched, (
            f"rank {rank}: unpatched second model (TP group, rows) {out['unpatched second']}, expected "
            f"the first model's {unpatched}"
        )
        assert out["tp groups"] == ("first tp", "second tp"), f"rank {rank}: TP groups {out['tp groups']}"
        assert out["rows"] == (8, 4), f"rank {rank}: up_proj rows {out['rows']}, expected (8, 4)"
        getters = ("second tp", "second dp", 4, 0)
        assert out["public getters in second"] == getters, (
            f"rank {rank}: public AutoTP getters {out['public getters in second']}, expected {getters}"
        )
        assert all(map(torch.isfinite, map(torch.tensor, out["losses"]))), f"rank {rank}: losses {out['losses']}"


def _rank_autotp_size_mismatch(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    with support.isolated():
        state = support.state(name="tp2", tensor_model_parallel_size=2)
        known = state_groups("tp2", state, ("dp", "tp"))
        out: dict[str, Any] = {}
        try:
            with support.installed(), state.activate():
                dp, tp = groups._init_tp_mesh_device(tensor_model_parallel_size=2)
                out["matching"] = (identify(dp, known), identify(tp, known))
                try:
                    groups._init_tp_mesh_device(tensor_model_parallel_size=4)
                    out["mismatch"] = "no error"
                except LayoutError as err:
                    out["mismatch"] = str(err)
        finally:
            support.destroy(state)
        return out


@pytest.mark.world
def test_autotp_size_other_than_the_states_raises_layout_error(world):
    """Inside a TP=2 scope, _init_tp_mesh_device(4) raises a LayoutError naming both sizes."""
    for rank, out in enumerate(world.run(_rank_autotp_size_mismatch, timeout=WORLD_TIMEOUT)):
        assert out["matching"] == ("tp2 dp", "tp2 tp"), f"rank {rank}: size 2 returned {out['matching']}"
        message = out["mismatch"]
        assert "tensor parallel size 4" in message and "size is 2" in message, (
            f"rank {rank}: size 4 gave {message!r}, expected a LayoutError naming 4 and 2"
        )
