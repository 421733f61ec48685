"""DeepSpeed adapter, MoE expert groups and AutoTP groups: per state, never shared by accident.

Behaviours proved (4-rank gloo world):

* unpatched, a second MoE model with the same ``ep_size`` reuses the first model's
  expert groups; with the adapters each model's engine and MoE layer hold its own
  state's ``ep``/``edp`` groups and dicts, its all-to-alls run over its state's EP
  group, and DeepSpeed's module globals are left as they were;
* the creators build exactly DeepSpeed's expert layout: the rank math
  (``expert_and_data_groups``, ``expert_data_and_model_groups``) equals what DeepSpeed's
  own creators record and create, rank by rank (run against a fake ``dist``), and
  refuses what they refuse; the state's ``ep``/``edp`` groups are adopted only where they
  are those groups, otherwise DeepSpeed's are derived per state (shared with identical
  groups, in the state's own dicts), and DeepSpeed's teardown hook makes those dicts
  forget a released group; TP/PP sizes come from a compat handle or no mpu alike;
* a TP=2 x EP=2 state (expert TP 2) trains a DeepSpeed MoE MLP (ZeRO 0, 1, 2) bitwise
  like vanilla DeepSpeed with a hand-written TP=2 mpu, alone and interleaved with an
  EP=4 partner in its own state; with expert TP 1 the state's groups are adopted and
  train bitwise alike; the old adopt rule (EP size only) fails that comparison;
* unpatched, a second AutoTP model reuses the first model's TP group; with the
  adapters each one shards over its own state's TP group (and the public AutoTP
  getters answer from the active state);
* ``_init_tp_mesh_device`` in a TP=2 scope returns the state's groups for size 2 and
  raises a LayoutError naming both sizes for size 4.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

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


def _moe_engine(mpu: Any, **config: Any) -> Any:
    torch.manual_seed(0)
    return support.engine(_MoENet(ep_size=2), support.config(**config), mpu=mpu)


#: DeepSpeed's config switch for the D + E expert topology (EDP blocks, strided EP groups)
DATA_BEFORE_EXPERT = {"use_data_before_expert_parallelism": True}


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
                engine_2 = _moe_engine(second, **DATA_BEFORE_EXPERT)
                out["unpatched second ep"] = support.ranks(engine_2.expert_parallel_group["ep_size_2"])
                out["unpatched shared"] = (
                    engine_2.expert_parallel_group["ep_size_2"] is engine_1.expert_parallel_group["ep_size_2"]
                )
                support.drop(engine_1, engine_2)
            with support.installed():
                snap = support.globals_snapshot()
                with first.activate():
                    engine_1 = _moe_engine(first)
                with second.activate():  # "dp" before "ep": DeepSpeed's D + E topology, adopted
                    engine_2 = _moe_engine(second, **DATA_BEFORE_EXPERT)
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


def _rank_expert_creator_other_size(rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from deepspeed.utils import groups

    from scoped_parallel.groups.create import creation_count

    with support.isolated():
        state = support.state(name="ep2", expert_model_parallel_size=2)
        out: dict[str, Any] = {}
        try:
            with support.installed():
                snap = support.globals_snapshot()
                with state.activate():
                    before = creation_count()
                    try:
                        groups._create_expert_and_data_parallel(3)
                        out["ep3"] = "no error"
                    except LayoutError as err:
                        out["ep3"] = ("LayoutError", "ep_size 3" in str(err), creation_count() - before)
                    groups._create_expert_and_data_parallel(4)  # not the state's ep size: DeepSpeed's groups
                    ep4 = groups._get_expert_parallel_group("ep_size_4")
                    edp4 = groups._get_expert_data_parallel_group("ep_size_4")
                    groups._create_expert_and_data_parallel(4)  # DeepSpeed skips an existing name: so do we
                    out["again"] = (
                        groups._get_expert_parallel_group("ep_size_4") is ep4,
                        groups._get_expert_data_parallel_group("ep_size_4") is edp4,
                    )
                    out["ep4 ranks"] = tuple(groups._get_expert_parallel_group_ranks("ep_size_4"))
                    out["edp4 ranks"] = tuple(groups._get_expert_data_parallel_group_ranks("ep_size_4"))
                    out["ep4 size"] = groups._get_expert_parallel_world_size("ep_size_4")
                    out["max name"] = groups._get_max_expert_size_name()
                    out["in-scope dict"] = sorted(groups._get_expert_parallel_group_dict())
                # the 4-rank EP group is shared with the default group (the creation module's rule)
                out["ep4 is WORLD"] = ep4 is dist.group.WORLD
                out["globals changed"] = support.globals_changed(snap)
                out["module dict"] = sorted(groups._get_expert_parallel_group_dict())
                groups._release_process_group_references(ep4)  # DeepSpeed's teardown hook forgets it
                with state.activate():
                    out["after release"] = (
                        sorted(groups._get_expert_parallel_group_dict()),
                        sorted(groups._get_expert_data_parallel_group_dict()),
                    )
        finally:
            support.destroy(state)  # releases the derived single-rank EDP group (the world checks)
        return out


@pytest.mark.world
def test_expert_groups_of_another_size_are_deepspeeds_per_state(world):
    """Another ep size gets DeepSpeed's groups in the state's own dicts; a bad size is refused first."""
    for rank, out in enumerate(world.run(_rank_expert_creator_other_size, timeout=WORLD_TIMEOUT)):
        expected = {
            "ep3": ("LayoutError", True, 0),
            "again": (True, True),
            "ep4 ranks": (0, 1, 2, 3),
            "edp4 ranks": (rank,),
            "ep4 size": 4,
            "max name": "ep_size_4",
            "in-scope dict": ["ep_size_4"],
            "ep4 is WORLD": True,
            "globals changed": [],
            "module dict": [],
            "after release": ([], ["ep_size_4"]),
        }
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"


def _autotp_engine(tp: int) -> Any:
    torch.manual_seed(0)
    autotp = {"autotp_size": tp, "partition_config": support.AUTOTP_PARTITION}
    return support.engine(support.TPNet(), support.config(tensor_parallel=autotp))


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


# ====================================================================== DeepSpeed's expert layout, exactly
#
# DeepSpeed's MoE layer (enable_expert_tensor_parallelism off) builds EP blocks of consecutive
# ranks; a Megatron expert layout with expert TP 2 (the default: expert TP = TP) has strided EP
# groups. Adopting the state's groups there trains something else than DeepSpeed does.


class _FakeDist:
    """What DeepSpeed's creators ask of ``deepspeed.comm``, for one rank of a world that is not there."""

    def __init__(self, world_size: int) -> None:
        self.world_size, self.rank, self.created = world_size, 0, []

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group: Any = None) -> int:
        return self.world_size

    def get_rank(self, group: Any = None) -> int:
        return self.rank

    def new_group(self, ranks: Any, **_: Any) -> Any:
        self.created.append(tuple(ranks))
        return ("group", tuple(ranks))


class _SizesMpu:
    """An mpu that knows its sizes only (all DeepSpeed's creators read)."""

    def __init__(self, tp: int, pp: int, dp: int) -> None:
        self.tp, self.pp, self.dp = tp, pp, dp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


_EXPERT_DICTS = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_PARALLEL_GROUP_RANKS",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
)


def _deepspeed_creator_groups(monkeypatch: Any, world_size: int, mpu: Any, create: Any) -> Any:
    """Run DeepSpeed's own creator once per rank of a fake world: each rank's (EP, EDP) ranks and every group made."""
    from deepspeed.utils import groups

    from scoped_parallel import adapters

    assert not adapters.is_installed("deepspeed"), "the oracle must run DeepSpeed's own creators"
    fake = _FakeDist(world_size)
    monkeypatch.setattr(groups, "dist", fake)
    monkeypatch.setattr(groups, "mpu", mpu)
    monkeypatch.setattr(groups, "mesh_device", None)
    per_rank = {}
    for rank in range(world_size):
        fake.rank = rank
        for name in _EXPERT_DICTS:
            monkeypatch.setattr(groups, name, {})
        create(groups)
        (key,) = groups._EXPERT_PARALLEL_GROUP_RANKS
        per_rank[rank] = (
            tuple(groups._EXPERT_PARALLEL_GROUP_RANKS[key]),
            tuple(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[key]),
        )
    return per_rank, set(fake.created)


def _legacy_cases() -> Iterator[tuple[int, int, int, Any, str, bool]]:
    for world_size in (4, 8, 16):
        for pp in (1, 2, 4):
            stage = world_size // pp
            for ep in (1, 2, 4, 8):
                if world_size % pp or stage % ep or ep > stage:
                    continue
                for dbe in (False, True):
                    yield world_size, ep, pp, None, "tp", dbe
                for mp in (2, 4):
                    if stage % mp == 0:
                        for mode in ("tp", "sp"):
                            yield world_size, ep, pp, mp, mode, False


def test_rank_math_is_deepspeeds_expert_and_data_parallel(monkeypatch):
    """expert_and_data_groups gives, rank by rank, the groups DeepSpeed's own creator records and creates."""
    from scoped_parallel.adapters.deepspeed.experts import expert_and_data_groups

    cases = list(_legacy_cases())
    assert len(cases) > 40
    for world_size, ep, pp, mp, mode, dbe in cases:
        per_rank, created = _deepspeed_creator_groups(
            monkeypatch,
            world_size,
            _SizesMpu(1, pp, world_size),
            lambda g: g._create_expert_and_data_parallel(ep, mp_size=mp, mp_mode=mode, use_data_before_expert_parallel_=dbe),
        )
        ours = expert_and_data_groups(world_size, ep, mp_size=mp, pp_size=pp, mp_mode=mode, data_before_expert=dbe)
        case = f"world {world_size}, ep {ep}, pp {pp}, mp {mp} ({mode}), data before expert {dbe}"
        assert {r: ours.of(r) for r in range(world_size)} == per_rank, f"{case}: {ours} vs DeepSpeed's {per_rank}"
        assert set(ours.ep) | set(ours.edp) == created, f"{case}: DeepSpeed created {sorted(created)}, we {ours}"
    # shifted onto a state's ranks
    assert expert_and_data_groups(4, 2, first_rank=4) == ((((4, 5), (6, 7)), ((4, 6), (5, 7))))


def test_rank_math_is_deepspeeds_expert_data_and_model_parallel(monkeypatch):
    """expert_data_and_model_groups gives, rank by rank, the groups DeepSpeed's own creator records and creates."""
    from scoped_parallel.adapters.deepspeed.experts import expert_data_and_model_groups

    count = 0
    for world_size in (4, 8, 16):
        for tp in (1, 2, 4):
            for pp in (1, 2):
                if world_size % (tp * pp):
                    continue
                dp = world_size // (tp * pp)
                for ep in (1, 2, 4):
                    if dp % ep:
                        continue
                    for dbe in (False, True):
                        mpu = _SizesMpu(tp, pp, dp)
                        per_rank, created = _deepspeed_creator_groups(
                            monkeypatch,
                            world_size,
                            mpu,
                            lambda g: g._create_expert_data_and_model_parallel(ep, mpu, use_data_before_expert_parallel_=dbe),
                        )
                        ours = expert_data_and_model_groups(world_size, ep, tp_size=tp, pp_size=pp, data_before_expert=dbe)
                        case = f"world {world_size}, tp {tp}, pp {pp}, ep {ep}, data before expert {dbe}"
                        assert {r: ours.of(r) for r in range(world_size)} == per_rank, f"{case}: {ours} vs {per_rank}"
                        assert set(ours.ep) | set(ours.edp) == created, f"{case}: DeepSpeed created {sorted(created)}"
                        count += 1
    assert count > 30


def test_rank_math_refuses_what_deepspeed_refuses(monkeypatch):
    """Sizes DeepSpeed asserts on are a LayoutError; its NotImplementedError an UnsupportedSetupError."""
    from scoped_parallel.adapters.deepspeed.experts import expert_and_data_groups, expert_data_and_model_groups
    from scoped_parallel.errors import UnsupportedSetupError

    with pytest.raises(AssertionError):
        _deepspeed_creator_groups(monkeypatch, 4, None, lambda g: g._create_expert_and_data_parallel(3))
    with pytest.raises(LayoutError, match="ep_size 3"):
        expert_and_data_groups(4, 3)
    with pytest.raises(NotImplementedError):
        _deepspeed_creator_groups(
            monkeypatch, 4, None, lambda g: g._create_expert_and_data_parallel(2, mp_size=2, use_data_before_expert_parallel_=True)
        )
    with pytest.raises(UnsupportedSetupError, match="use_data_before_expert_parallel_"):
        expert_and_data_groups(4, 2, mp_size=2, data_before_expert=True)
    with pytest.raises(AssertionError):
        mpu = _SizesMpu(2, 1, 2)
        _deepspeed_creator_groups(monkeypatch, 4, mpu, lambda g: g._create_expert_data_and_model_parallel(4, mpu))
    with pytest.raises(LayoutError, match="data parallel size 2"):
        expert_data_and_model_groups(4, 4, tp_size=2)


def test_bug_layouts_differ_from_deepspeeds():
    """The old rule adopted the TP=2 x EP=2 state's groups (EP size matched); they are not DeepSpeed's."""
    from scoped_parallel import ParallelLayout
    from scoped_parallel.adapters.deepspeed.experts import expert_and_data_groups

    deepspeeds = expert_and_data_groups(4, 2, pp_size=1)
    assert deepspeeds == (((0, 1), (2, 3)), ((0, 2), (1, 3)))
    etp2 = ParallelLayout(4, tensor_model_parallel_size=2, expert_model_parallel_size=2)
    assert (etp2.groups("ep"), etp2.groups("edp")) == (((0, 2), (1, 3)), ((0,), (1,), (2,), (3,)))
    etp1 = ParallelLayout(4, tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert (etp1.groups("ep"), etp1.groups("edp")) == deepspeeds


# ---------------------------------------------------------------------- training, bitwise against vanilla


class _MoEMLP(nn.Module):
    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(8, 16)
        expert = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.moe = MoE(hidden_size=16, expert=expert, num_experts=4, ep_size=ep_size, k=1)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, aux, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(hidden), aux


class _HandMpu:
    """A hand-written Megatron-style mpu: TP blocks of ``tp`` consecutive ranks, DP strided by ``tp``."""

    def __init__(self, tp: int) -> None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp_size, self.dp_size = tp, world // tp
        self.own = []
        for kind, sets in (
            ("tp", [list(range(i, i + tp)) for i in range(0, world, tp)]),
            ("dp", [list(range(i, world, tp)) for i in range(tp)]),
        ):
            for ranks in sets:
                group = dist.new_group(ranks)
                if rank in ranks:
                    setattr(self, kind, group)
                    setattr(self, f"{kind}_ranks", ranks)
                    self.own.append(group)

    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_ranks.index(_rank())

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group(self) -> Any:
        return self.dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_ranks.index(_rank())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def destroy(self) -> None:
        import torch.distributed as dist

        for group in self.own:
            dist.destroy_process_group(group)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


STEPS = 3


@contextlib.contextmanager
def gloo_gather_tokens() -> Iterator[None]:
    """Let DeepSpeed's MoE ``gather_tokens`` run on gloo (vanilla and scoped runs alike).

    With TP > 1 the MoE layer all-gathers into a flat buffer of ``world * numel``
    elements; NCCL accepts that, gloo insists on the shape ``(world * d0, *rest)``. The
    shim hands gloo that shape as a view of the same buffer (same memory, same bytes).
    """
    import deepspeed.comm as ds_comm

    original = ds_comm.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor: Any, tensor: Any, group: Any = None, **kwargs: Any) -> Any:
        if output_tensor.dim() == 1 and tensor.dim() > 1 and output_tensor.numel() % tensor.numel() == 0:
            world = output_tensor.numel() // tensor.numel()
            output_tensor = output_tensor.view(world * tensor.shape[0], *tensor.shape[1:])
        return original(output_tensor, tensor, group=group, **kwargs)

    ds_comm.all_gather_into_tensor = all_gather_into_tensor
    try:
        yield
    finally:
        ds_comm.all_gather_into_tensor = original


def _moe_mlp_engine(stage: int, mpu: Any, ep_size: int = 2, seed: int = 0) -> Any:
    """The MoE MLP's engine; the experts in a MoE param group of their own (ZeRO 1/2 require it)."""
    import deepspeed as ds
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(seed)
    net = _MoEMLP(ep_size)
    everything = {"params": list(net.parameters()), "name": "all"}
    param_groups = split_params_into_different_moe_groups_for_optimizer(everything)
    optimizer = torch.optim.AdamW(param_groups, lr=1e-2)
    built, *_ = ds.initialize(model=net, optimizer=optimizer, config=support.config(stage=stage, clip=1.0), mpu=mpu)
    return built


def _train_step(engine: Any, step: int, data_rank: int, seed: int) -> tuple[float, Any]:
    torch.manual_seed(100 + step)  # the gate's random token selection draws from the global generator
    loss = support.step(engine, support.batch(data_rank, step, seed, shape=(2, 4, 8)))
    norm = engine.get_global_grad_norm()
    return float(loss), None if norm is None else float(norm)


def _result(engine: Any, history: list[Any]) -> dict[str, Any]:
    moe = engine.module.moe
    ep, edp = engine.expert_parallel_group, engine.expert_data_parallel_group
    return {
        "losses": [h[0] for h in history],
        "norms": [h[1] for h in history],
        "params": support.full_params(engine),
        "groups": (
            support.ranks(moe.deepspeed_moe.ep_group),
            support.ranks(ep["ep_size_2"]) if "ep_size_2" in ep else None,
            support.ranks(edp["ep_size_2"]) if "ep_size_2" in edp else None,
        ),
    }


def _train_alone(engine: Any, data_rank: int, seed: int) -> dict[str, Any]:
    history = [_train_step(engine, step, data_rank, seed) for step in range(STEPS)]
    return _result(engine, history)


def _vanilla_tp2(rank: int, stage: int) -> dict[str, Any]:
    """DeepSpeed without adapters: the MoE MLP with a hand-written TP=2 mpu, TP peers on the same batches."""
    with support.unpatched_run():
        mpu = _HandMpu(2)
        engine = _moe_mlp_engine(stage, mpu)
        try:
            return _train_alone(engine, rank // 2, seed=1)
        finally:
            support.drop(engine)
            mpu.destroy()


def _vanilla_partner(rank: int, stage: int) -> dict[str, Any]:
    """DeepSpeed without adapters: the partner, an EP=4 MoE MLP on 4 data-parallel ranks, no mpu."""
    with support.unpatched_run():
        engine = _moe_mlp_engine(stage, None, ep_size=4, seed=7)
        try:
            return _train_alone(engine, rank, seed=2)
        finally:
            support.drop(engine)


def _rank_tp_ep_like_vanilla(rank: int, stage: int) -> dict[str, Any]:
    with support.isolated(), gloo_gather_tokens():
        out: dict[str, Any] = {"vanilla": _vanilla_tp2(rank, stage), "vanilla partner": _vanilla_partner(rank, stage)}
        tp2ep2 = partner = None
        try:
            tp2ep2 = support.state(name="tp2ep2", tensor_model_parallel_size=2, expert_model_parallel_size=2)
            partner = support.state(name="ep4", expert_model_parallel_size=4)
            out["state groups"] = (tp2ep2.ranks("ep"), tp2ep2.ranks("edp"))
            with support.installed():
                snap = support.globals_snapshot()
                with tp2ep2.activate():
                    engine = _moe_mlp_engine(stage, tp2ep2)
                    out["alone"] = _train_alone(engine, rank // 2, seed=1)
                    out["shared"] = (
                        engine.expert_parallel_group["ep_size_2"] is tp2ep2.group("tp"),
                        engine.expert_data_parallel_group["ep_size_2"] is tp2ep2.group("dp"),
                    )
                support.drop(engine)
                # interleaved, step by step, with a partner model of another layout in its own state
                with tp2ep2.activate():
                    engine = _moe_mlp_engine(stage, tp2ep2)
                with partner.activate():
                    other = _moe_mlp_engine(stage, partner, ep_size=4, seed=7)
                mine, theirs = [], []
                for step in range(STEPS):
                    with tp2ep2.activate():
                        mine.append(_train_step(engine, step, rank // 2, seed=1))
                    with partner.activate():
                        theirs.append(_train_step(other, step, rank, seed=2))
                with tp2ep2.activate():
                    out["interleaved"] = _result(engine, mine)
                with partner.activate():
                    out["interleaved partner"] = _result(other, theirs)
                out["partner adopted"] = (
                    other.expert_parallel_group["ep_size_4"] is partner.group("ep"),
                    other.expert_data_parallel_group["ep_size_4"] is partner.group("edp"),
                )
                support.drop(engine, other)
                out["globals changed"] = support.globals_changed(snap)
        finally:
            support.destroy(tp2ep2, partner)
        return out


def _assert_bitwise(rank: int, label: str, got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["losses"] == want["losses"], f"rank {rank}, {label}: losses {got['losses']} vs vanilla {want['losses']}"
    assert got["norms"] == want["norms"], f"rank {rank}, {label}: grad norms {got['norms']} vs vanilla {want['norms']}"
    assert len(got["params"]) == len(want["params"])
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert torch.equal(a, b), f"rank {rank}, {label}: parameter {i} differs from vanilla by {(a - b).abs().max():.3g}"


DEEPSPEED_TP2_EP2 = {0: ((0, 1), (0, 2)), 1: ((0, 1), (1, 3)), 2: ((2, 3), (0, 2)), 3: ((2, 3), (1, 3))}


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_tp2_ep2_state_trains_bitwise_like_vanilla_deepspeed(world, stage):
    """TP=2 x EP=2 state, MoE ep_size=2: DeepSpeed's groups, bitwise vanilla, alone and interleaved with a partner."""
    for rank, out in enumerate(world.run(_rank_tp_ep_like_vanilla, stage, timeout=WORLD_TIMEOUT)):
        ep, edp = DEEPSPEED_TP2_EP2[rank]
        want_groups = (ep, ep, edp)
        assert out["vanilla"]["groups"] == want_groups, f"rank {rank}: vanilla DeepSpeed groups {out['vanilla']['groups']}"
        assert out["state groups"] != (ep, edp), f"rank {rank}: the state's own groups {out['state groups']} are DeepSpeed's"
        for label in ("alone", "interleaved"):
            assert out[label]["groups"] == want_groups, (
                f"rank {rank}, {label}: MoE layer / engine EP / engine EDP groups {out[label]['groups']}, "
                f"expected DeepSpeed's {want_groups} (the state's are {out['state groups']})"
            )
            _assert_bitwise(rank, label, out[label], out["vanilla"])
        assert out["shared"] == (True, True), f"rank {rank}: DeepSpeed's groups not shared with the state's tp/dp"
        _assert_bitwise(rank, "interleaved partner", out["interleaved partner"], out["vanilla partner"])
        assert out["partner adopted"] == (True, True), f"rank {rank}: the EP=4 partner's groups are not its state's"
        assert out["globals changed"] == [], f"rank {rank}: DeepSpeed globals changed: {out['globals changed']}"
        losses = out["vanilla"]["losses"]
        assert len(set(losses)) == STEPS, f"rank {rank}: the model does not train: {losses}"


def _old_adopt_rule(wanted: Any, state_groups: Any) -> bool:
    """The rule before the fix: adopt the state's groups whenever the EP size matched (it does here)."""
    return True


def _rank_adopted_layouts(rank: int) -> dict[str, Any]:
    from scoped_parallel.adapters.deepspeed import experts

    with support.isolated(), gloo_gather_tokens():
        out: dict[str, Any] = {"vanilla": _vanilla_tp2(rank, 0)}
        etp1 = etp2 = None
        try:
            etp1 = support.state(
                name="etp1", tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1
            )
            etp2 = support.state(name="etp2", tensor_model_parallel_size=2, expert_model_parallel_size=2)
            with support.installed():
                with etp1.activate():
                    engine = _moe_mlp_engine(0, etp1)
                    out["etp1"] = _train_alone(engine, rank // 2, seed=1)
                    out["etp1 adopted"] = (
                        engine.expert_parallel_group["ep_size_2"] is etp1.group("ep"),
                        engine.expert_data_parallel_group["ep_size_2"] is etp1.group("edp"),
                    )
                support.drop(engine)
                # sabotage: the old rule, to show the bitwise comparison catches it
                saved = experts._same_groups
                experts._same_groups = _old_adopt_rule
                try:
                    with etp2.activate():
                        engine = _moe_mlp_engine(0, etp2)
                        out["old rule"] = _train_alone(engine, rank // 2, seed=1)
                finally:
                    experts._same_groups = saved
                support.drop(engine)
        finally:
            support.destroy(etp1, etp2)
        return out


@pytest.mark.world
@pytest.mark.slow
def test_expert_tp1_state_is_adopted_and_the_old_rule_diverges(world):
    """ETP=1: the state's groups are DeepSpeed's, adopted, bitwise vanilla; the old rule's groups train differently."""
    for rank, out in enumerate(world.run(_rank_adopted_layouts, timeout=WORLD_TIMEOUT)):
        ep, edp = DEEPSPEED_TP2_EP2[rank]
        assert out["etp1"]["groups"] == (ep, ep, edp), f"rank {rank}: ETP=1 groups {out['etp1']['groups']}"
        assert out["etp1 adopted"] == (True, True), f"rank {rank}: ETP=1 state's groups not adopted"
        _assert_bitwise(rank, "ETP=1", out["etp1"], out["vanilla"])
        old = out["old rule"]
        assert old["groups"][0] != ep, f"rank {rank}: the old rule gave DeepSpeed's EP group {old['groups']}"
        with pytest.raises(AssertionError):
            _assert_bitwise(rank, "old rule", old, out["vanilla"])


def _rank_creators_with_handle_or_no_mpu(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    from scoped_parallel.compat import parallel_state_wrappers as compat

    def mine(key: str, state: Any) -> tuple[Any, ...]:
        ep, edp = groups._get_expert_parallel_group(key), groups._get_expert_data_parallel_group(key)
        known = {**state_groups("state", state, ("ep",)), **state_groups("state", state, ("tp",))}
        known_edp = {**state_groups("state", state, ("edp",)), **state_groups("state", state, ("dp",))}
        return (
            tuple(groups._get_expert_parallel_group_ranks(key)),
            tuple(groups._get_expert_data_parallel_group_ranks(key)),
            identify(ep, known),
            identify(edp, known_edp),
            groups._get_expert_model_parallel_world_size(),
        )

    with support.isolated():
        out: dict[str, Any] = {}
        # registered compat instances (a handle made for a state built elsewhere, by
        # get_current_parallel_state(), currently breaks that state's destroy(): see the report)
        handle = compat.get_parallel_state_instance("experts-handle")
        pp_handle = compat.get_parallel_state_instance("experts-pp2")
        none_state = None
        try:
            handle.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2)
            none_state = support.state(name="none", tensor_model_parallel_size=2, expert_model_parallel_size=2)
            pp_handle.initialize_model_parallel(pipeline_model_parallel_size=2, expert_model_parallel_size=2)
            handle_state, pp_state = handle.state, pp_handle.state
            with support.installed():
                snap = support.globals_snapshot()
                with handle_state.activate():
                    groups.mpu = handle  # what deepspeed.initialize(mpu=handle) does
                    # expert tensor parallelism with TP=2: DeepSpeed's groups are the state's
                    groups._create_expert_data_and_model_parallel(2, mpu=handle)
                    out["handle, expert TP"] = mine("ep_size_2", handle_state)
                with none_state.activate():
                    groups._create_expert_data_and_model_parallel(2, mpu=None)  # TP 1: consecutive EP blocks
                    out["no mpu, expert TP"] = mine("ep_size_2", none_state)
                with pp_state.activate():
                    groups.mpu = pp_handle
                    groups._create_expert_and_data_parallel(2)  # pipeline size 2 from the handle
                    out["handle, PP 2"] = mine("ep_size_2", pp_state)
                out["globals changed"] = support.globals_changed(snap)
        finally:
            handle.destroy()
            pp_handle.destroy()
            support.destroy(none_state)
        return out


@pytest.mark.world
def test_creators_read_sizes_from_a_compat_handle_or_no_mpu(world):
    """Both creators take TP/PP from a compat handle (or none): adopted where equal, DeepSpeed's groups otherwise."""
    for rank, out in enumerate(world.run(_rank_creators_with_handle_or_no_mpu, timeout=WORLD_TIMEOUT)):
        tp_block, dp_stride = DEEPSPEED_TP2_EP2[rank]
        expected = {
            # expert TP: EP over the DP lane, single-rank EDP (the Megatron layout with expert TP 2)
            "handle, expert TP": ((rank % 2, rank % 2 + 2), (rank,), "state ep", "state edp", 2),
            # no mpu: TP 1, so DeepSpeed's consecutive blocks, shared with the state's tp/dp groups
            "no mpu, expert TP": (tp_block, dp_stride, "state tp", "state dp", 1),
            # PP 2: one EP group per stage, single-rank EDP groups: the state's
            "handle, PP 2": (tp_block, (rank,), "state ep", "state edp", 1),
            "globals changed": [],
        }
        assert out == expected, f"rank {rank}: got {out}, expected {expected}"
