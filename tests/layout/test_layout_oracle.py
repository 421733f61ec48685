"""Tier 1 (pure layout math): ParallelLayout checked against an oracle and by properties.

Proves: on a grid of valid and invalid cases (with and without rank_offset), the layout
equals Megatron-Core's RankGenerator or raises where it does; for random layouts every
kind partitions the ranks, groups_of agrees with groups, and coordinates are a bijection.
The oracle tests need megatron-core (they skip without it); the hypothesis property
tests run everywhere.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout import DENSE_KINDS, EXPERT_KINDS, ParallelLayout

# Our kind -> the token megatron's dense generator takes.
DENSE_ORACLE = {
    "tp": "tp",
    "pp": "pp",
    "dp": "dp",
    "cp": "cp",
    "tp-pp": "tp-pp",
    "dp-cp": "dp-cp",
    "tp-dp-cp": "tp-dp-cp",
    "tp-dp": "tp-dp",
    "tp-cp": "tp-cp",
}
# Our kind -> the token megatron's expert generator takes.
EXPERT_ORACLE = {
    "ep": "ep",
    "etp": "tp",
    "edp": "dp",
    "etp-ep": "tp-ep",
    "etp-ep-pp": "tp-ep-pp",
}

FULL_ORDERS = tuple("-".join(p) for p in itertools.permutations(("tp", "cp", "ep", "dp", "pp")))
SHORT_ORDERS = ("tp-dp-pp", "tp-pp-dp", "tp-cp-dp-pp", "tp-ep-dp-pp", "pp-tp-dp", "tp-pp", "dp-pp")
ORDERS = FULL_ORDERS + SHORT_ORDERS
WORLD_SIZES = tuple(range(1, 65)) + (72, 96, 128, 256)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _case_id(case: tuple) -> str:
    ws, tp, pp, cp, ep, etp, order = case
    return f"ws{ws}-tp{tp}-pp{pp}-cp{cp}-ep{ep}-etp{etp}-{order}"


def _build_grid() -> list[tuple]:
    """(world, tp, pp, cp, ep, etp, order) cases: sampled per world plus all orders for a few."""
    rng = random.Random(1606)
    cases = set()
    for ws in WORLD_SIZES:
        small = [d for d in _divisors(ws) if d <= 8]
        for _ in range(12):
            # Mostly divisors (valid sizes), sometimes any small size (often invalid).
            pool = small if rng.random() < 0.85 else (1, 2, 3, 4, 8)
            tp, pp, cp, ep = (rng.choice(pool) for _ in range(4))
            etp = rng.choice((None, None, 1, rng.choice(pool)))
            cases.add((ws, tp, pp, cp, ep, etp, rng.choice(ORDERS)))
    # Every order for a few configurations where the order matters on each axis.
    fixed = ((16, 2, 2, 2, 2, 1), (8, 2, 2, 1, 2, 1), (24, 2, 3, 2, 2, None), (8, 2, 2, 2, 1, None))
    for config in fixed:
        for order in ORDERS:
            cases.add(config + (order,))
    return sorted(cases, key=lambda c: (c[0], _case_id(c)))


GRID = _build_grid()


@pytest.fixture(scope="module")
def mcore():
    """megatron.core.parallel_state, imported with its CPU-only warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.parallel_state")


def megatron_generators(ps, ws, tp, pp, cp, ep, etp, order, rank_offset=0):
    """(dense, expert) RankGenerators, or None where initialize_model_parallel rejects the sizes.

    Mirrors the checks megatron runs before building any group: dense and expert
    divisibility, RankGenerator's missing-token error, the pp-last condition and
    equal pipeline groups.
    """
    if ws % (tp * pp * cp):
        return None
    dp = ws // (tp * pp * cp)
    try:
        dense = ps.RankGenerator(
            tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order, rank_offset=rank_offset
        )
    except RuntimeError:
        return None
    etp = tp if etp is None else etp
    if ws % (etp * ep * pp):
        return None
    edp = ws // (etp * ep * pp)
    try:
        expert = ps.RankGenerator(
            tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order, rank_offset=rank_offset
        )
    except RuntimeError:
        return None
    if not (order.endswith("pp") or pp == 1 or edp == dp):
        return None
    if dense.get_ranks("pp") != expert.get_ranks("pp"):
        return None
    return dense, expert


def _layout(ws, tp, pp, cp, ep, etp, order, rank_offset=0) -> ParallelLayout:
    return ParallelLayout(
        ws,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        order=order,
        rank_offset=rank_offset,
    )


def _assert_same_groups(layout, dense, expert):
    for ours, theirs in DENSE_ORACLE.items():
        assert [list(g) for g in layout.groups(ours)] == dense.get_ranks(theirs), ours
    for ours, theirs in EXPERT_ORACLE.items():
        assert [list(g) for g in layout.groups(ours)] == expert.get_ranks(theirs), ours


def test_grid_has_valid_and_invalid_cases(mcore):
    """The sampled grid exercises both accepted and rejected configurations."""
    verdicts = [megatron_generators(mcore, *case) is not None for case in GRID]
    assert sum(verdicts) > 300
    assert len(verdicts) - sum(verdicts) > 100


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_matches_megatron(mcore, case):
    """Accepted configs give megatron's groups for every kind; rejected ones raise LayoutError."""
    generators = megatron_generators(mcore, *case)
    if generators is None:
        with pytest.raises(LayoutError):
            _layout(*case)
        return
    _assert_same_groups(_layout(*case), *generators)


OFFSET_CASES = [
    (8, 2, 2, 1, 1, None, "tp-cp-ep-dp-pp", 8),
    (16, 2, 2, 2, 2, 1, "tp-cp-ep-dp-pp", 3),
    (12, 1, 3, 1, 2, 2, "tp-ep-dp-pp", 100),
    (24, 2, 3, 2, 2, None, "pp-dp-ep-cp-tp", 48),
]


@pytest.mark.parametrize("case", OFFSET_CASES, ids=lambda c: _case_id(c[:7]) + f"-off{c[7]}")
def test_rank_offset_matches_megatron(mcore, case):
    """A rank_offset shifts the groups exactly as RankGenerator(rank_offset=...) does."""
    generators = megatron_generators(mcore, *case)
    assert generators is not None
    _assert_same_groups(_layout(*case), *generators)


# ---------------------------------------------------------------------- properties

_TOKENS = ("tp", "cp", "ep", "dp", "pp", "sp")


@st.composite
def layouts(draw) -> ParallelLayout:
    """Random layouts, valid per the construction rules (invalid draws are rejected)."""
    tp = draw(st.sampled_from((1, 2, 3, 4)))
    pp = draw(st.sampled_from((1, 2, 3)))
    dp = draw(st.sampled_from((1, 2, 3, 4)))
    split = draw(st.sampled_from(("cp", "sp", "none")))
    cp = draw(st.sampled_from((1, 2))) if split == "cp" else 1
    sp = draw(st.sampled_from((1, 2, 3))) if split == "sp" else 1
    ws = tp * pp * dp * cp * sp
    ep = 1 if sp > 1 else draw(st.sampled_from([d for d in _divisors(ws // pp) if d <= 8]))
    etp = draw(st.sampled_from([None] + _divisors(ws // (pp * ep))))
    edp = ws // ((tp if etp is None else etp) * ep * pp)
    needed = {
        "tp": max(tp, etp or 1),
        "cp": cp,
        "ep": ep,
        "dp": max(dp, edp),
        "pp": pp,
        "sp": 1,
    }
    tokens = [t for t in _TOKENS if needed[t] > 1 or draw(st.booleans())]
    tokens = draw(st.permutations(tokens)) if tokens else ["tp"]
    offset = draw(st.sampled_from((0, 0, 1, 7, 64)))
    try:
        return ParallelLayout(
            ws,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            sequence_parallel_size=sp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            order="-".join(tokens),
            rank_offset=offset,
        )
    except LayoutError:
        assume(False)


PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)
ALL_KINDS = DENSE_KINDS + EXPERT_KINDS


@PROPERTY_SETTINGS
@given(layouts())
def test_every_kind_partitions_the_ranks(layout):
    """Each kind's groups are disjoint, equally sized and cover exactly the layout's ranks."""
    for kind in ALL_KINDS:
        groups = layout.groups(kind)
        members = [r for g in groups for r in g]
        assert sorted(members) == list(layout.ranks), kind
        assert len({len(g) for g in groups}) == 1, kind


@PROPERTY_SETTINGS
@given(layouts())
def test_groups_of_agrees_with_groups(layout):
    """groups_of(r)[k] is the group of groups(k) that contains r, for every rank and kind."""
    owner = {kind: {r: g for g in layout.groups(kind) for r in g} for kind in ALL_KINDS}
    for rank in layout.ranks:
        mine = layout.groups_of(rank)
        for kind in ALL_KINDS:
            assert mine[kind] == owner[kind][rank] == layout.group_of(rank, kind), (kind, rank)


@PROPERTY_SETTINGS
@given(layouts())
def test_coordinates_are_a_bijection(layout):
    """Distinct ranks have distinct dense and expert coordinates; rank_at inverts them."""
    dense_axes = ("tp", "cp", "sp", "dp", "pp")
    expert_axes = ("etp", "ep", "edp", "pp")
    dense_seen, expert_seen = set(), set()
    for rank in layout.ranks:
        coords = layout.coordinates(rank)
        dense_seen.add(tuple(coords[a] for a in dense_axes))
        expert_seen.add(tuple(coords[a] for a in expert_axes))
        assert layout.rank_at(**{a: coords[a] for a in dense_axes}) == rank
    assert len(dense_seen) == len(expert_seen) == layout.world_size
