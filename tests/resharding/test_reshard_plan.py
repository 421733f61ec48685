"""The reshard plan as plain data (``scoped_parallel.resharding.plan``): the flat planner, the
checks every plan passes before anything moves, and the report. No torch.distributed."""

from __future__ import annotations

import pytest

from scoped_parallel import ReshardError
from scoped_parallel.resharding import Piece, ReshardPlan, Transfer, box_is_contiguous, plan_flat


def _zero3(ranks: int, numel: int, name: str = "w") -> list[tuple[int, str, int, int, int]]:
    size = -(-numel // ranks)
    return [(r, name, min(r * size, numel), min((r + 1) * size, numel), 4) for r in range(ranks)]


def test_flat_whole_replicas_copy_locally_and_move_nothing():
    """Replica -> replica on the same ranks: every element comes from the rank itself."""
    plan = plan_flat("flat", [(r, "w", 0, 10, 4) for r in range(4)], [(r, "w", 0, 10, 4) for r in range(4)])
    assert plan.bytes_between() == {}, plan.bytes_between()
    assert [(t.src_rank, t.dst_rank) for t in plan.transfers] == [(r, r) for r in range(4)]


def test_flat_zero3_into_replicas_receives_what_each_rank_does_not_hold():
    """4 ZeRO-3 partitions of 10 elements (3, 3, 3, 1) into whole replicas: each rank
    receives the other ranks' partitions, one transfer per peer."""
    plan = plan_flat("flat", _zero3(4, 10), [(r, "w", 0, 10, 4) for r in range(4)])
    assert plan.problems() == []
    for rank in range(4):
        held = min((rank + 1) * 3, 10) - min(rank * 3, 10)
        assert plan.bytes_received(rank) == (10 - held) * 4, (rank, plan.bytes_received(rank))
    assert plan.bytes_between()[(3, 0)] == 4  # rank 3 holds the one element left


def test_flat_zero3_regroup_takes_each_element_once_and_prefers_local():
    """4 partitions -> 2 partitions per replica pair (rank r holds half r % 2... as ranks
    0-1 and 2-3 here): local elements are copied, the rest received, nothing twice."""
    dst = [(r, "w", 0 if r % 2 == 0 else 8, 8 if r % 2 == 0 else 16, 4) for r in range(4)]
    plan = plan_flat("flat", _zero3(4, 16), dst)
    assert plan.problems() == []
    local = {t.dst_rank: t.nbytes for t in plan.transfers if t.local}
    assert local == {0: 16, 3: 16}, local  # rank 0 holds [0, 4) of [0, 8); rank 3 holds [12, 16) of [8, 16)


def test_flat_replicated_sources_share_the_sending():
    """Two replica holders, four receivers: each holder sends to two (least loaded first)."""
    sources = [(0, "w", 0, 8, 4), (1, "w", 0, 8, 4)]
    targets = [(r, "w", 0, 8, 4) for r in range(2, 6)]
    plan = plan_flat("flat", sources, targets)
    sent = {r: plan.bytes_sent(r) for r in (0, 1)}
    assert sent == {0: 64, 1: 64}, sent


def test_flat_missing_elements_raise_naming_the_tensor_and_the_range():
    with pytest.raises(ReshardError, match=r"'w': elements \[6, 8\) needed on rank 1"):
        plan_flat("flat", [(0, "w", 0, 6, 4)], [(1, "w", 0, 8, 4)])


def _pieces() -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    return (Piece(0, "w", (4, 4), 4), Piece(1, "w", (4, 4), 4)), (Piece(0, "w", (8, 4), 4),)


def _whole() -> list[Transfer]:
    return [
        Transfer(0, 0, "w", "w", ((0, 4), (0, 4)), ((0, 4), (0, 4)), 4),
        Transfer(1, 0, "w", "w", ((0, 4), (0, 4)), ((4, 8), (0, 4)), 4),
    ]


def test_a_sound_plan_has_no_problems_and_reports_the_pair_bytes():
    src, dst = _pieces()
    plan = ReshardPlan("test", tuple(_whole()), src, dst, {0: 64})
    assert plan.problems() == []
    assert plan.bytes_between() == {(1, 0): 64}
    report = plan.report()
    assert "every destination element written exactly once" in report and "1->0: 64" in report, report


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda ts: ts[:1], "64 of 128 bytes never written"),
        (lambda ts: ts + ts[:1], "both write the same elements"),
        (lambda ts: [ts[0], Transfer(1, 0, "w", "w", ((0, 4), (0, 4)), ((4, 9), (0, 4)), 4)], "outside its shape"),
        (lambda ts: [ts[0], Transfer(2, 0, "w", "w", ((0, 4), (0, 4)), ((4, 8), (0, 4)), 4)], "which does not hold it"),
        (lambda ts: [ts[0], Transfer(1, 0, "w", "w", ((0, 2), (0, 4)), ((4, 8), (0, 4)), 4)], "differ in size"),
        (lambda ts: ts + [Transfer(1, 1, "w", "w", ((0, 4), (0, 4)), ((0, 4), (0, 4)), 4)], "not a destination tensor there"),
    ],
    ids=["gap", "overlap", "out-of-bounds", "wrong-holder", "size-mismatch", "unknown-destination"],
)
def test_each_kind_of_broken_plan_is_reported_and_check_raises(change, expected):
    src, dst = _pieces()
    plan = ReshardPlan("test", tuple(change(_whole())), src, dst)
    problems = plan.problems()
    assert any(expected in p for p in problems), f"expected a problem containing {expected!r}, got {problems}"
    with pytest.raises(ReshardError, match="Nothing was moved"):
        plan.check()


@pytest.mark.parametrize(
    "box, shape, contiguous",
    [
        (((0, 8), (0, 4)), (8, 4), True),
        (((2, 5), (0, 4)), (8, 4), True),  # rows of a row-major matrix
        (((0, 8), (0, 2)), (8, 4), False),  # columns
        (((3, 4), (1, 3)), (8, 4), True),  # part of one row
        (((0, 2), (1, 3)), (8, 4), False),
        (((2, 6),), (8,), True),
    ],
)
def test_box_contiguity(box, shape, contiguous):
    assert box_is_contiguous(box, shape) is contiguous


def test_reshard_without_a_backend_for_the_models_names_the_types():
    """No registered backend claims a plain object: the error names both types and the fix."""
    import scoped_parallel as sp

    with pytest.raises(ReshardError, match=r"no reshard backend knows both object and object .*scoped_parallel.adapters"):
        sp.plan_reshard(object(), None, object(), None)


class _FakeState:
    """Duck-typed stand-in for a ParallelState (the cache reads layout, kinds, ranks, records)."""

    def __init__(self, tp_ranks: tuple[int, ...], layout: str = "tp=2") -> None:
        self.layout, self.destroyed, self._tp, self._records = layout, False, tp_ranks, {}

    def kinds(self) -> tuple[str, ...]:
        return ("tp",)

    def ranks(self, kind: str) -> tuple[int, ...]:
        return self._tp

    def adapter_record(self, owner: str, factory):  # noqa: ANN001
        if owner not in self._records:
            self._records[owner] = factory(self)
        return self._records[owner]

    def destroy(self) -> None:
        self.destroyed = True
        for record in self._records.values():
            record.state_destroyed(self)
        self._records.clear()


class _CountingBackend:
    name = "counting"

    def __init__(self) -> None:
        self.planned = 0

    def claims(self, model) -> bool:  # noqa: ANN001
        return isinstance(model, _Model)

    def plan(self, *args) -> ReshardPlan:  # noqa: ANN002
        self.planned += 1
        return ReshardPlan("counting", (), (), ())


class _Model:
    pass


def test_plan_cache_is_keyed_on_rank_lists_and_leaves_both_states_on_destroy(monkeypatch):
    """Same models and states: planned once. A state with the same sizes but other rank
    lists: planned again. Destroying either state drops the entry from both."""
    from scoped_parallel.resharding import api

    backend = _CountingBackend()
    monkeypatch.setattr(api, "_BACKENDS", [backend])
    monkeypatch.setattr(api, "_check_ranks", lambda *args, **kwargs: None)
    src, dst, model_a, model_b = _FakeState((0, 1)), _FakeState((0, 2)), _Model(), _Model()
    first = api.plan_reshard(model_a, src, model_b, dst)
    assert api.plan_reshard(model_a, src, model_b, dst) is first and backend.planned == 1
    other = _FakeState((0, 1))  # the same sizes as dst, other TP ranks on this rank
    api.plan_reshard(model_a, src, model_b, other)
    assert backend.planned == 2, "a state with other rank lists must not reuse the plan"
    assert len(src.adapter_record("reshard", None).entries) == 2
    dst.destroy()
    assert len(src.adapter_record("reshard", None).entries) == 1, "destroying dst left its entry in src's cache"
    api.plan_reshard(model_a, src, _Model(), other)
    assert backend.planned == 3, "another destination model must not reuse the plan"


def test_megatron_core_without_resharding_is_named_with_its_version():
    """megatron-core < 0.16 has no megatron.core.resharding: the Megatron backend says so,
    naming the installed version (runs in the 0.13-0.15 venvs of make test-megatron-versions)."""
    pytest.importorskip("megatron.core")
    try:
        import megatron.core.resharding  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this megatron-core has megatron.core.resharding")
    from scoped_parallel import UnsupportedSetupError
    from scoped_parallel.adapters.megatron_reshard.core import resharding_api as _resharding

    with pytest.raises(UnsupportedSetupError, match=r"megatron-core 0\.1[0-5]\.\d+ has no megatron.core.resharding \(added in 0.16\)"):
        _resharding()


def test_two_transfers_into_one_scalar_are_reported_not_crashed():
    """0-d tensors have empty boxes: two writes of one scalar are an overlap, reported as such."""
    one = Transfer(0, 1, "s", "s", (), (), 4)
    plan = ReshardPlan("test", (one, one), (Piece(0, "s", (), 4),), (Piece(1, "s", (), 4),))
    assert any("both write the same elements" in p for p in plan.problems()), plan.problems()
    assert ReshardPlan("test", (one,), (Piece(0, "s", (), 4),), (Piece(1, "s", (), 4),)).problems() == []


# ---------------------------------------------------------------- casts (dtype=)


def test_a_cast_plan_counts_the_wire_dtype_bytes():
    """fp32 ZeRO-3 partitions (4-byte elements) into bf16 replicas (2 bytes) with the cast
    marked: every transfer carries the wire dtype, the bytes between ranks are half the
    uncast plan's, the plan passes its checks and the report names the cast and both counts."""
    fp32_targets = [(r, "w", 0, 16, 4) for r in range(4)]
    bf16_targets = [(r, "w", 0, 16, 2) for r in range(4)]
    uncast = plan_flat("flat", _zero3(4, 16), fp32_targets)
    cast = plan_flat("flat", _zero3(4, 16), bf16_targets, {"w": "torch.bfloat16"})
    assert cast.problems() == [], cast.problems()
    assert {t.cast for t in cast.transfers} == {"torch.bfloat16"} and {t.itemsize for t in cast.transfers} == {2}
    assert cast.bytes_between() == {pair: n // 2 for pair, n in uncast.bytes_between().items()}, (cast.bytes_between(), uncast.bytes_between())
    assert sum(cast.bytes_between().values()) == 12 * 4 * 2  # each rank receives the 12 elements it does not hold, 2 bytes each
    assert cast.bytes_sent(0) == uncast.bytes_sent(0) // 2 and cast.bytes_received(3) == uncast.bytes_received(3) // 2
    assert "casts on the sending side: 1 tensors to torch.bfloat16; 96 bytes between ranks for them (192 uncast)" in cast.report(), cast.report()
    assert "casts on the sending side" not in uncast.report()


def test_a_dtype_change_without_a_cast_or_into_another_dtype_fails_the_plan_checks():
    """Unmarked 4-byte source elements into 2-byte destination elements are a problem; so is
    a transfer cast to a dtype other than its destination piece's."""
    unmarked = plan_flat("flat", _zero3(2, 8), [(r, "w", 0, 8, 2) for r in range(2)])
    assert any("4-byte source elements into 2-byte destination elements" in p for p in unmarked.problems()), unmarked.problems()
    t = Transfer(0, 1, "w", "w", ((0, 4),), ((0, 4),), 2, "torch.float16")
    plan = ReshardPlan("test", (t,), (Piece(0, "w", (4,), 4, "torch.float32"),), (Piece(1, "w", (4,), 2, "torch.bfloat16"),))
    assert any("cast to torch.float16, but the destination is torch.bfloat16" in p for p in plan.problems()), plan.problems()


_PAIRS = {
    "w": ("torch.float32", "torch.bfloat16"),
    "b": ("torch.float32", "torch.bfloat16"),
    "same": ("torch.float32", "torch.float32"),
    "steps": ("torch.int64", "torch.int64"),
}


@pytest.mark.parametrize(
    "spec, pairs, casts, problem",
    [
        ("torch.bfloat16", {k: _PAIRS[k] for k in ("w", "b", "steps")}, {"w": "torch.bfloat16", "b": "torch.bfloat16"}, None),
        ("torch.bfloat16", _PAIRS, {"w": "torch.bfloat16", "b": "torch.bfloat16"},
         "'same': dtype= casts to torch.bfloat16, but the destination tensor is torch.float32"),
        ({"w": "torch.bfloat16", "b": "torch.bfloat16"}, _PAIRS, {"w": "torch.bfloat16", "b": "torch.bfloat16"}, None),
        ({"w": "torch.bfloat16"}, _PAIRS, {"w": "torch.bfloat16"},
         "'b': source dtype torch.float32 but destination torch.bfloat16; resharding moves tensors between layouts and converts dtypes only when asked: pass dtype=torch.bfloat16"),
        ({"w": "torch.bfloat16", "b": "torch.bfloat16", "steps": "torch.bfloat16"}, _PAIRS, None, "'steps': dtype= asks for torch.bfloat16, but a torch.int64 -> torch.int64 tensor is never cast"),
        ({"w": "torch.bfloat16", "b": "torch.bfloat16", "typo": "torch.bfloat16"}, _PAIRS, None, "dtype= names tensors that the models do not both hold: ['typo']"),
        (lambda name: "torch.bfloat16" if name in ("w", "b") else None, _PAIRS, {"w": "torch.bfloat16", "b": "torch.bfloat16"}, None),
        (None, _PAIRS, {}, "'b', 'w': source dtype torch.float32 but destination torch.bfloat16"),
        ("torch.float16", {"w": _PAIRS["w"]}, {}, "'w': dtype= casts to torch.float16, but the destination tensor is torch.bfloat16 (the cast target must be the destination's dtype)"),
    ],
    ids=["one-dtype", "one-dtype-into-fp32", "mapping", "mapping-misses-one", "int-never-cast", "unknown-name", "function", "none", "wrong-target"],
)
def test_resolve_casts(spec, pairs, casts, problem):
    """What ``dtype=`` does per tensor: floating tensors only, the target must be the
    destination's dtype, a dtype change nobody asked for names the fix (pure)."""
    from scoped_parallel.resharding import resolve_casts

    got, problems = resolve_casts(spec, pairs)
    if casts is not None:
        assert got == casts, got
    if problem is None:
        assert problems == [], problems
    else:
        assert any(problem in p for p in problems), problems


def test_plans_with_other_casts_are_cached_apart(monkeypatch):
    """``dtype=`` is part of the cache key: the same dtype (or the same mapping, or the same
    function object) reuses the plan; another cast plans again; a bad dtype is refused first."""
    import torch

    from scoped_parallel.resharding import api

    seen = []

    class Casting(_CountingBackend):
        def plan(self, *args, cast=None):  # noqa: ANN002
            seen.append(cast)
            return super().plan(*args)

    backend = Casting()
    monkeypatch.setattr(api, "_BACKENDS", [backend])
    monkeypatch.setattr(api, "_check_ranks", lambda *args, **kwargs: None)
    src, dst, model_a, model_b = _FakeState((0, 1)), _FakeState((0, 2)), _Model(), _Model()
    fn = lambda name: torch.float16  # noqa: E731
    plain = api.plan_reshard(model_a, src, model_b, dst)
    bf16 = api.plan_reshard(model_a, src, model_b, dst, dtype=torch.bfloat16)
    mapped = api.plan_reshard(model_a, src, model_b, dst, dtype={"w": torch.bfloat16})
    by_fn = api.plan_reshard(model_a, src, model_b, dst, dtype=fn)
    assert len({id(p) for p in (plain, bf16, mapped, by_fn)}) == 4 and backend.planned == 4
    assert api.plan_reshard(model_a, src, model_b, dst, dtype=torch.bfloat16) is bf16
    assert api.plan_reshard(model_a, src, model_b, dst, dtype={"w": torch.bfloat16}) is mapped
    assert api.plan_reshard(model_a, src, model_b, dst, dtype=fn) is by_fn and backend.planned == 4
    assert seen[:3] == [None, "torch.bfloat16", {"w": "torch.bfloat16"}] and seen[3]("x") == "torch.float16", seen
    with pytest.raises(ReshardError, match="torch.int32 is not a floating dtype"):
        api.plan_reshard(model_a, src, model_b, dst, dtype=torch.int32)
    with pytest.raises(ReshardError, match="the 'counting' reshard backend does not convert dtypes"):
        monkeypatch.setattr(api, "_BACKENDS", [_CountingBackend()])
        api.plan_reshard(model_a, src, model_b, dst, dtype=torch.float16)
