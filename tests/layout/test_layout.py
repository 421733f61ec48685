"""Tier 1 (pure layout math, no torch.distributed): unit tests of scoped_parallel.layout.

Proves: hand-derived Megatron and DeepSpeed groups for small worlds; kind names and
token orders are normalised and bad ones raise typed errors showing the value; the
layout is frozen, hashable, picklable and has a short repr; coordinates, rank_at,
groups_of, embedding groups and rank_offset agree with the groups; the table and
groups_of stay fast on huge worlds; importing the module does not import torch.
"""

from __future__ import annotations

import doctest
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import scoped_parallel.layout as layout_module
from scoped_parallel.errors import LayoutError, RankNotInLayoutError
from scoped_parallel.layout import (
    DENSE_KINDS,
    EXPERT_KINDS,
    ParallelLayout,
    canonical_kind,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL_KINDS = DENSE_KINDS + EXPERT_KINDS


def tp2_pp2() -> ParallelLayout:
    return ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def test_docstring_examples_pass():
    """The module's doctests (the 8-rank worked example) pass."""
    result = doctest.testmod(layout_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_tp2_pp2_eight_rank_groups():
    """Eight ranks with tp=2, pp=2 give the hand-derived Megatron groups."""
    layout = tp2_pp2()
    assert layout.data_parallel_size == 2
    expected = {
        "tp": ((0, 1), (2, 3), (4, 5), (6, 7)),
        "pp": ((0, 4), (1, 5), (2, 6), (3, 7)),
        "dp": ((0, 2), (1, 3), (4, 6), (5, 7)),
        "cp": tuple((r,) for r in range(8)),
        "sp": tuple((r,) for r in range(8)),
        "tp-pp": ((0, 1, 4, 5), (2, 3, 6, 7)),
        "dp-cp": ((0, 2), (1, 3), (4, 6), (5, 7)),
        "sp-dp": ((0, 2), (1, 3), (4, 6), (5, 7)),
        "tp-dp": ((0, 1, 2, 3), (4, 5, 6, 7)),
        "tp-cp": ((0, 1), (2, 3), (4, 5), (6, 7)),
        "tp-dp-cp": ((0, 1, 2, 3), (4, 5, 6, 7)),
        "ep": tuple((r,) for r in range(8)),
        "etp": ((0, 1), (2, 3), (4, 5), (6, 7)),
        "edp": ((0, 2), (1, 3), (4, 6), (5, 7)),
        "etp-ep": ((0, 1), (2, 3), (4, 5), (6, 7)),
        "etp-ep-pp": ((0, 1, 4, 5), (2, 3, 6, 7)),
    }
    for kind, groups in expected.items():
        assert layout.groups(kind) == groups, kind


def test_sp_only_groups_match_deepspeed_contiguous_layout():
    """World 8 with sp=2: contiguous SP groups and strided DP groups, as DeepSpeed builds them."""
    layout = ParallelLayout(8, sequence_parallel_size=2)
    assert layout.data_parallel_size == 4
    assert layout.groups("sp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.groups("sp-dp") == (tuple(range(8)),)
    assert layout.groups("dp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    # Expert layers see the full sp*dp replica set as their data parallel group.
    assert layout.expert_data_parallel_size == 8
    assert layout.groups("edp") == (tuple(range(8)),)


def test_sp_with_tp_and_pp_sits_between_tp_and_dp():
    """With tp=2, sp=2, pp=2 on 16 ranks, sp groups stride over tp and dp strides over tp*sp."""
    layout = ParallelLayout(
        16, tensor_model_parallel_size=2, sequence_parallel_size=2, pipeline_model_parallel_size=2
    )
    assert layout.order == "tp-cp-ep-sp-dp-pp"
    assert layout.groups("tp")[:2] == ((0, 1), (2, 3))
    assert layout.groups("sp")[:4] == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert layout.groups("dp")[:4] == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert layout.groups("pp")[:2] == ((0, 8), (1, 9))
    assert layout.group_of(5, "sp-dp") == (1, 3, 5, 7)


@pytest.mark.parametrize(
    ("kind", "canonical"),
    [
        ("pp-tp", "tp-pp"),
        ("cp-dp", "dp-cp"),
        ("dp-sp", "sp-dp"),
        ("cp-dp-tp", "tp-dp-cp"),
        ("pp-ep-etp", "etp-ep-pp"),
        ("edp-etp", "etp-edp"),
        ("TP", "tp"),
        ("embd", "embd"),
        ("pos-embd", "pos-embd"),
    ],
)
def test_canonical_kind(kind, canonical):
    """Kinds are canonicalised to tp,sp,dp,cp,pp (dense) or etp,ep,edp,pp (expert) order."""
    assert canonical_kind(kind) == canonical


def test_groups_accept_any_token_order():
    """groups('pp-tp') is the same as groups('tp-pp')."""
    layout = tp2_pp2()
    assert layout.groups("pp-tp") == layout.groups("tp-pp")
    assert layout.group_of(3, "cp-dp-tp") == layout.group_of(3, "tp-dp-cp")


@pytest.mark.parametrize(
    ("kind", "shown"),
    [
        ("xp", "'xp'"),
        ("tp-tp", "'tp'"),
        ("tp--dp", "empty"),
        ("", "empty"),
        ("tp-ep", "mixes"),
        ("dp-edp", "mixes"),
        ("embd-pp", "'embd'"),
    ],
)
def test_bad_kind_raises_layout_error_listing_valid_kinds(kind, shown):
    """Unknown, duplicate, empty or dense/expert-mixed kinds raise LayoutError listing kinds."""
    with pytest.raises(LayoutError) as info:
        tp2_pp2().groups(kind)
    assert shown in str(info.value)
    assert "tp-dp-cp" in str(info.value)
    with pytest.raises(LayoutError):
        canonical_kind(kind)


@pytest.mark.parametrize(
    "param",
    [
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "sequence_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "rank_offset",
        "world_size",
    ],
)
@pytest.mark.parametrize("bad", [True, 2.0, "2"], ids=["bool", "float", "str"])
def test_non_int_sizes_raise_type_error(param, bad):
    """bool, float and str sizes raise TypeError naming the parameter and the value."""
    kwargs = {"world_size": 8, param: bad}
    world_size = kwargs.pop("world_size")
    with pytest.raises(TypeError) as info:
        ParallelLayout(world_size, **kwargs)
    assert param in str(info.value)
    assert repr(bad) in str(info.value)


def test_integer_like_sizes_are_accepted():
    """Objects implementing __index__ (e.g. numpy integers) are taken as plain ints."""

    class Four:
        def __index__(self):
            return 4

    layout = ParallelLayout(Four(), tensor_model_parallel_size=Four())
    assert layout.world_size == 4 and type(layout.world_size) is int


def test_non_str_order_raises_type_error():
    """order must be a str."""
    with pytest.raises(TypeError, match="order"):
        ParallelLayout(8, order=("tp", "dp"))


def test_constructor_is_keyword_only_after_world_size():
    """Sizes must be passed by keyword."""
    with pytest.raises(TypeError):
        ParallelLayout(8, 2)  # type: ignore[misc]


LAYOUT_ERRORS = [
    # (world_size, kwargs, substrings the message must contain)
    (0, {}, ["world_size", "0"]),
    (8, {"tensor_model_parallel_size": 0}, ["tensor_model_parallel_size", "got 0"]),
    (8, {"pipeline_model_parallel_size": -2}, ["pipeline_model_parallel_size", "-2"]),
    (8, {"context_parallel_size": 0}, ["context_parallel_size", "got 0"]),
    (8, {"sequence_parallel_size": 0}, ["sequence_parallel_size", "got 0"]),
    (8, {"expert_model_parallel_size": 0}, ["expert_model_parallel_size", "got 0"]),
    (8, {"expert_tensor_parallel_size": 0}, ["expert_tensor_parallel_size", "got 0"]),
    (8, {"rank_offset": -1}, ["rank_offset", "-1"]),
    (8, {"order": "tp-xx-dp-pp"}, ["'xx'", "tp, cp, ep, dp, pp, sp"]),
    (8, {"order": "tp--dp-pp"}, ["empty token", "tp, cp, ep, dp, pp, sp"]),
    (8, {"order": ""}, ["empty token"]),
    (8, {"order": "tp-dp-TP"}, ["repeats 'tp'"]),
    (8, {"expert_model_parallel_size": 2, "order": "tp-dp-pp"},
     ["ep size is 2", "'tp-dp-pp'", "'ep'"]),
    (8, {"context_parallel_size": 2, "order": "tp-dp-pp"}, ["cp size is 2", "'cp'"]),
    (8, {"pipeline_model_parallel_size": 2, "order": "tp-dp"}, ["pp size is 2", "'pp'"]),
    (8, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "order": "tp-pp"},
     ["dp size is 2", "'dp'"]),
    (8, {"expert_tensor_parallel_size": 2, "order": "dp-pp"}, ["etp size is 2", "'tp'"]),
    (8, {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2,
         "expert_tensor_parallel_size": 1, "order": "tp-pp"}, ["edp size is 4", "'dp'"]),
    (12, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 8},
     ["world_size 12", "tp*cp*sp*pp = 2*1*1*8 = 16"]),
    (8, {"expert_model_parallel_size": 3}, ["world_size 8", "etp*ep*pp = 1*3*1 = 3"]),
    (8, {"sequence_parallel_size": 2, "context_parallel_size": 2},
     ["sequence_parallel_size 2", "use one"]),
    (8, {"sequence_parallel_size": 2, "expert_model_parallel_size": 2},
     ["expert_model_parallel_size 2", "not supported"]),
    # pp not last and edp != dp*sp (megatron's first assert).
    (16, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
          "expert_tensor_parallel_size": 1, "order": "tp-pp-dp"},
     ["'tp-pp-dp'", "= 8", "dp*sp = 4*1 = 4"]),
    # edp == dp but the dense and expert pipeline strides differ (megatron's second assert).
    (8, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
         "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1, "order": "tp-pp-ep-dp"},
     ["multiply to 2 for dense", "to 1 for expert"]),
]


@pytest.mark.parametrize(("world_size", "kwargs", "needles"), LAYOUT_ERRORS)
def test_invalid_layout_raises_layout_error_showing_the_value(world_size, kwargs, needles):
    """Each invalid configuration raises LayoutError whose message shows the bad value."""
    with pytest.raises(LayoutError) as info:
        ParallelLayout(world_size, **kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_rank_outside_layout_raises_rank_not_in_layout_error():
    """Ranks outside [rank_offset, rank_offset+world_size) raise RankNotInLayoutError."""
    layout = ParallelLayout(4, tensor_model_parallel_size=2, rank_offset=8)
    for call in (
        lambda: layout.group_of(3, "tp"),
        lambda: layout.groups_of(12),
        lambda: layout.coordinates(7),
    ):
        with pytest.raises(RankNotInLayoutError) as info:
            call()
        assert "8..11" in str(info.value)
    with pytest.raises(RankNotInLayoutError, match="rank 3 "):
        layout.group_of(3, "tp")
    assert issubclass(RankNotInLayoutError, LayoutError)


def test_rank_argument_must_be_int():
    """A bool or float rank raises TypeError."""
    with pytest.raises(TypeError):
        tp2_pp2().group_of(True, "tp")
    with pytest.raises(TypeError):
        tp2_pp2().coordinates(1.0)


def test_contains_and_ranks():
    """contains() and ranks reflect rank_offset .. rank_offset + world_size - 1."""
    layout = ParallelLayout(4, rank_offset=8)
    assert layout.ranks == range(8, 12)
    assert [layout.contains(r) for r in (7, 8, 11, 12)] == [False, True, True, False]
    assert not layout.contains(True)


def test_layout_is_frozen():
    """Setting, adding or deleting attributes raises AttributeError."""
    layout = tp2_pp2()
    with pytest.raises(AttributeError):
        layout._world_size = 4
    with pytest.raises(AttributeError):
        layout.world_size = 4
    with pytest.raises(AttributeError):
        layout.anything = 1
    with pytest.raises(AttributeError):
        del layout._tp


def test_layout_is_hashable_with_value_equality():
    """Equal sizes give equal layouts, equal hashes and the same dict slot."""
    a = tp2_pp2()
    b = ParallelLayout(8, pipeline_model_parallel_size=2, tensor_model_parallel_size=2,
                       expert_tensor_parallel_size=2)
    assert a == b and hash(a) == hash(b)
    assert {a: "x"}[b] == "x"
    assert a != ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                               rank_offset=8)
    assert a != ParallelLayout(8, tensor_model_parallel_size=4, pipeline_model_parallel_size=2)
    assert a != "not a layout"


def test_pickle_round_trip():
    """A layout survives pickling despite being frozen."""
    layout = ParallelLayout(16, tensor_model_parallel_size=2, expert_model_parallel_size=2,
                            order="tp-ep-dp-pp", rank_offset=3)
    clone = pickle.loads(pickle.dumps(layout))
    assert clone == layout and repr(clone) == repr(layout)


@pytest.mark.parametrize(
    ("layout", "text"),
    [
        (ParallelLayout(8, tensor_model_parallel_size=2),
         "ParallelLayout(world_size=8, tp=2, dp=4)"),
        (ParallelLayout(1), "ParallelLayout(world_size=1)"),
        (ParallelLayout(8, sequence_parallel_size=2, rank_offset=8),
         "ParallelLayout(world_size=8, sp=2, dp=4, rank_offset=8)"),
        (ParallelLayout(8, expert_model_parallel_size=4, expert_tensor_parallel_size=2,
                        order="tp-ep-dp-pp"),
         "ParallelLayout(world_size=8, dp=8, ep=4, etp=2, order='tp-ep-dp-pp')"),
    ],
)
def test_repr_names_only_non_trivial_sizes(layout, text):
    """repr shows sizes other than 1, and rank_offset/order only when not default."""
    assert repr(layout) == text


def test_sizes_and_properties():
    """Properties and sizes() report every size; etp defaults to tp; dp excludes sp."""
    layout = ParallelLayout(32, tensor_model_parallel_size=2, sequence_parallel_size=2,
                            pipeline_model_parallel_size=2)
    assert layout.sizes() == {
        "tp": 2, "cp": 1, "sp": 2, "dp": 4, "pp": 2, "ep": 1, "etp": 2, "edp": 8
    }
    assert layout.expert_tensor_parallel_size == 2
    assert layout.data_parallel_size == 4
    assert layout.expert_data_parallel_size == 8
    assert layout.sequence_parallel_size == 2
    assert (layout.world_size, layout.rank_offset) == (32, 0)


@pytest.mark.parametrize(
    ("order", "normalised"),
    [
        ("tp-cp-ep-dp-pp", "tp-cp-ep-sp-dp-pp"),
        ("TP-DP-PP", "tp-sp-dp-pp-ep-cp"),
        ("tp-pp-dp", "tp-pp-sp-dp-ep-cp"),
        ("dp-tp", "sp-dp-tp-pp-ep-cp"),
        ("tp-dp-sp-pp", "tp-dp-sp-pp-ep-cp"),
    ],
)
def test_order_is_normalised(order, normalised):
    """Order is lower-cased, absent tokens appended (tp,pp,dp,ep,cp), sp inserted before dp."""
    assert ParallelLayout(4, order=order).order == normalised


def test_explicit_sp_position_is_respected():
    """An explicit 'sp' token places the SP axis where the order says."""
    layout = ParallelLayout(8, sequence_parallel_size=2, order="dp-sp-tp-pp")
    assert layout.groups("sp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert layout.groups("dp") == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_coordinates_and_rank_at():
    """coordinates() has exactly the 8 axes and rank_at() inverts the dense ones."""
    layout = ParallelLayout(16, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                            expert_model_parallel_size=2, expert_tensor_parallel_size=1,
                            rank_offset=4)
    coords = layout.coordinates(4 + 13)
    assert list(coords) == ["tp", "cp", "sp", "dp", "pp", "etp", "ep", "edp"]
    assert coords == {"tp": 1, "cp": 0, "sp": 0, "dp": 2, "pp": 1, "etp": 0, "ep": 1, "edp": 2}
    assert layout.rank_at(tp=1, dp=2, pp=1) == 17
    with pytest.raises(LayoutError, match="dp coordinate 4"):
        layout.rank_at(dp=4)
    with pytest.raises(TypeError, match="ep"):
        layout.rank_at(ep=1)


@pytest.mark.parametrize(
    "layout",
    [
        tp2_pp2(),
        ParallelLayout(16, context_parallel_size=2, pipeline_model_parallel_size=2,
                       expert_model_parallel_size=2, expert_tensor_parallel_size=1, rank_offset=5),
        ParallelLayout(24, tensor_model_parallel_size=2, sequence_parallel_size=3,
                       order="sp-tp-dp-pp"),
        ParallelLayout(12, pipeline_model_parallel_size=3, order="pp-tp-dp"),
    ],
    ids=repr,
)
def test_groups_of_matches_membership_in_groups(layout):
    """groups_of(r)[k] is the group of groups(k) containing r; embedding kinds only for members."""
    for rank in layout.ranks:
        mine = layout.groups_of(rank)
        for kind in ALL_KINDS:
            (expected,) = [g for g in layout.groups(kind) if rank in g]
            assert mine[kind] == expected
        for kind in ("embd", "pos-embd"):
            member_of = [g for g in layout.groups(kind) if rank in g]
            assert mine.get(kind, ()) == (member_of[0] if member_of else ())


def test_groups_of_never_enumerates_the_world_on_131072_ranks(monkeypatch):
    """groups_of at 131072 ranks computes the rank's own groups only (no group listing is touched).

    The cost is structural, not timed (timings belong to benchmarks/run.py)."""
    layout = ParallelLayout(131072, tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
                            context_parallel_size=2, expert_model_parallel_size=8)

    def refuse(*_args, **_kwargs):
        raise AssertionError("groups_of enumerated every group")

    monkeypatch.setattr(ParallelLayout, "groups", refuse)
    monkeypatch.setattr(ParallelLayout, "_iter_groups", refuse)
    for rank in (0, 77777, 131071):
        mine = layout.groups_of(rank)
        got = (rank in mine["tp-dp-cp"], len(mine["tp-dp-cp"]))
        assert got == (True, 8 * 512 * 2), f"rank {rank}: (member, size) of its tp-dp-cp group is {got}"


def test_embedding_groups_are_first_and_last_pipeline_stage():
    """embd = first and last rank of each pp group, pos-embd = its first; others get ()."""
    layout = ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=4)
    assert layout.groups("pp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert layout.groups("embd") == ((0, 6), (1, 7))
    assert layout.groups("pos-embd") == ((0,), (1,))
    assert layout.group_of(6, "embd") == (0, 6)
    assert layout.group_of(2, "embd") == ()
    assert layout.group_of(6, "pos-embd") == ()
    assert "embd" not in layout.groups_of(2)
    assert layout.groups_of(0)["pos-embd"] == (0,)


def test_embedding_groups_without_pipeline_are_single_ranks():
    """With pp=1 every rank is its own embedding and position-embedding group."""
    layout = ParallelLayout(4, tensor_model_parallel_size=2)
    assert layout.groups("embd") == layout.groups("pos-embd") == ((0,), (1,), (2,), (3,))
    assert layout.groups_of(3)["embd"] == (3,)


def test_rank_offset_shifts_every_rank():
    """rank_offset adds to every group member and leaves coordinates unchanged."""
    kwargs = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                  expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    base = ParallelLayout(16, **kwargs)
    shifted = ParallelLayout(16, rank_offset=100, **kwargs)
    for kind in ALL_KINDS + ("embd", "pos-embd"):
        assert shifted.groups(kind) == tuple(tuple(r + 100 for r in g) for g in base.groups(kind))
    for rank in base.ranks:
        assert shifted.coordinates(rank + 100) == base.coordinates(rank)
        assert shifted.groups_of(rank + 100) == {
            k: tuple(r + 100 for r in g) for k, g in base.groups_of(rank).items()
        }


def test_fingerprint_and_to_dict():
    """fingerprint() is stable and distinguishes layouts; to_dict() rebuilds an equal layout."""
    layout = ParallelLayout(8, tensor_model_parallel_size=2, order="tp-dp-pp")
    expected = "ws=8,off=0,tp=2,pp=1,cp=1,sp=1,ep=1,etp=2,order=tp-sp-dp-pp-ep-cp"
    assert layout.fingerprint() == expected
    same = ParallelLayout(8, tensor_model_parallel_size=2, order="tp-dp-pp")
    assert same.fingerprint() == expected
    moved = ParallelLayout(8, tensor_model_parallel_size=2, rank_offset=8)
    assert moved.fingerprint() != expected
    assert ParallelLayout(**layout.to_dict()) == layout


def test_table_lists_every_kind():
    """table() shows the sizes and the groups of every standard kind."""
    text = tp2_pp2().table()
    assert text.splitlines()[0] == "ParallelLayout(world_size=8, tp=2, pp=2, dp=2)"
    for kind in ALL_KINDS + ("embd", "pos-embd"):
        assert any(line.split()[0] == kind for line in text.splitlines()), f"the table has no row for {kind}:\n{text}"
    assert "(0,1) (2,3) (4,5) (6,7)" in text
    assert "(0,4) (1,5) (2,6) (3,7)" in text


def test_table_of_huge_world_lists_only_the_first_groups(monkeypatch):
    """For more than 4096 ranks table() shows counts and draws only the first few groups per kind."""
    from scoped_parallel.layout.grid import TABLE_HEAD_GROUPS

    layout = ParallelLayout(131072, tensor_model_parallel_size=8, pipeline_model_parallel_size=4)
    drawn = []
    original = ParallelLayout._iter_groups

    def counting(self, kind):
        for group in original(self, kind):
            drawn.append(kind)
            yield group

    monkeypatch.setattr(ParallelLayout, "_iter_groups", counting)
    text = layout.table()
    per_kind = {kind: drawn.count(kind) for kind in set(drawn)}
    too_many = {k: n for k, n in per_kind.items() if n > TABLE_HEAD_GROUPS}
    assert too_many == {}, f"groups drawn per kind {too_many}, expected at most {TABLE_HEAD_GROUPS}"
    assert len(text) < 10_000, f"table is {len(text)} characters"
    assert "16384 x 8" in text and "more)" in text


def test_import_does_not_import_torch():
    """Importing scoped_parallel.layout in a fresh interpreter leaves torch unimported."""
    code = "import sys, scoped_parallel.layout; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_ordering_of_tokens_names_only_known_tokens():
    """The orderings in layout/axes.py name tokens of the axis table (or derived dp/edp), each once."""
    from scoped_parallel.layout import axes

    orderings = {
        name: tuple(getattr(axes, name))
        for name in ("DENSE_AXES", "EXPERT_AXES", "SIZE_ORDER", "REPR_SIZES", "DENSE_KIND_TOKENS",
                     "EXPERT_KIND_TOKENS", "ORDER_TOKENS", "APPEND_SEQUENCE")
    }
    orderings["EXPERT_TOKEN_TO_ORDER"] = tuple(axes.EXPERT_TOKEN_TO_ORDER) + tuple(axes.EXPERT_TOKEN_TO_ORDER.values())
    problems = {
        name: [t for t in tokens if t not in axes.TOKENS]
        for name, tokens in orderings.items()
        if any(t not in axes.TOKENS for t in tokens)
    }
    repeated = {n: t for n, t in orderings.items() if n != "EXPERT_TOKEN_TO_ORDER" and len(set(t)) != len(t)}
    assert (problems, repeated) == ({}, {}), f"unknown tokens {problems}; repeated tokens {repeated}"
    assert set(axes.SIZE_ORDER) == set(axes.TOKENS), f"sizes() keys {axes.SIZE_ORDER} vs tokens {axes.TOKENS}"
