"""Tiers 1 and 3: creation by ``split_group`` when the default group is bound to a device.

Proves, on the CPU (the real NCCL splits run in the prepared GPU script):
* the plan: a state on part of the world first splits the world into its ranks (the
  parent), then splits the parent once per distinct partition, in one order that does
  not depend on the rank; kinds with the same partition share a split; kinds on another
  backend are left to member-only creation;
* the execution, with torch's split recorded on a fake world: every rank of the world
  makes the same calls with the same partitions (parent-local ranks); a rank outside the
  state stops after the parent split and holds nothing; a member gets the groups of its
  layout; sharing between states and ``destroy()`` keep their meaning.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist

from scoped_parallel import ParallelLayout, ParallelState
from scoped_parallel.groups import create as _groups
from scoped_parallel.groups import torch_compat as compat
from scoped_parallel.groups.plan import StateSpec
from scoped_parallel.groups.split import plan_splits
from scoped_parallel.errors import RankNotInLayoutError
from scoped_parallel.testing import fake_world


def _steps(layout: ParallelLayout, world: int, **spec: Any) -> list[tuple[str, tuple, tuple]]:
    return [(s.parent, s.partition, s.kinds) for s in plan_splits(StateSpec(layout=layout, **spec), world, "nccl")]


def test_subset_state_splits_the_world_into_a_parent_first():
    """A state on ranks 4-7 of 8: the first split is the world into [4..7], then the parent."""
    steps = _steps(ParallelLayout(4, tensor_model_parallel_size=2, rank_offset=4), 8)
    assert steps[0] == ("world", ((4, 5, 6, 7),), ("parent",)), f"first step {steps[0]}"
    by_kind = {kind: (parent, partition) for parent, partition, kinds in steps[1:] for kind in kinds}
    assert by_kind["tp"] == ("state", ((4, 5), (6, 7))), f"tp step {by_kind['tp']}"
    assert by_kind["dp"] == ("state", ((4, 6), (5, 7))), f"dp step {by_kind['dp']}"


def test_whole_world_state_has_no_parent_split():
    steps = _steps(ParallelLayout(8, tensor_model_parallel_size=2), 8)
    parents = [s for s in steps if s[0] == "world"]
    assert parents == [], f"unexpected parent splits {parents}"


def test_kinds_with_one_partition_share_one_split():
    """tp, tp-cp, etp and etp-ep have the same partition when cp = ep = 1: one split serves them."""
    steps = _steps(ParallelLayout(8, tensor_model_parallel_size=2), 8)
    (tp_step,) = [kinds for _, partition, kinds in steps if "tp" in kinds]
    assert {"tp", "tp-cp", "etp", "etp-ep"} <= set(tp_step), f"kinds split together with tp: {tp_step}"
    partitions = [partition for _, partition, _ in steps]
    assert len(partitions) == len(set(partitions)), "two splits with the same partition"


def test_every_kind_of_the_layout_is_split_exactly_once():
    layout = ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    kinds = [k for _, _, ks in _steps(layout, 8) for k in ks]
    assert len(kinds) == len(set(kinds)), f"kinds split twice: {kinds}"
    expected = set(layout.groups_of(0)) | set(layout.groups_of(7)) | {"embd", "pos-embd"}
    assert set(kinds) == expected, f"split kinds {sorted(kinds)}, expected {sorted(expected)}"


def test_kind_on_another_backend_is_not_split():
    steps = _steps(ParallelLayout(8, tensor_model_parallel_size=2), 8, backends={"dp": "gloo"})
    kinds = {k for _, _, ks in steps for k in ks}
    assert "dp" not in kinds, f"dp (gloo) was planned as a split: {sorted(kinds)}"
    assert "tp" in kinds


# ---------------------------------------------------------------------- execution, recorded


class _RecordedSplit:
    """Stands in for torch's split_group on a fake world: records, then builds this rank's part."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: list[tuple[tuple[int, ...], list[list[int]], str]] = []

    def __call__(self, parent: Any, parts: list[list[int]], *, timeout: Any, options: Any, desc: str) -> Any:
        parent_ranks = (
            tuple(range(self.world)) if parent is compat.default_group() else tuple(dist.get_process_group_ranks(parent))
        )
        self.calls.append((parent_ranks, parts, desc))
        me = parent_ranks.index(dist.get_rank()) if dist.get_rank() in parent_ranks else None
        mine = next((part for part in parts if me in part), None)
        if mine is None:
            return None
        ranks = [parent_ranks[i] for i in mine]
        name = f"recorded-split-{len(self.calls)}-{'-'.join(map(str, ranks))}"
        return compat.create_group(ranks, "fake", name, timeout=timeout, desc=desc)


@pytest.fixture
def bound(monkeypatch):
    """A fake world whose default group looks bound to a device, with torch's split recorded."""

    def install(world: int) -> _RecordedSplit:
        recorder = _RecordedSplit(world)
        monkeypatch.setattr(compat, "bound_device", lambda: "cuda:0")
        monkeypatch.setattr(compat, "split_group", recorder)
        return recorder

    return install


def _calls_on(rank: int, world: int, bound: Any, **sizes: Any) -> tuple[list, Any]:
    with fake_world(world, rank):
        recorder = bound(world)
        state = ParallelState(name="s", **sizes)
        try:
            groups = {k: tuple(dist.get_process_group_ranks(state.group(k))) for k in ("tp", "dp")} if state.is_member else {}
        finally:
            state.destroy()
        left = _groups.live_groups()
    return [(parent, parts) for parent, parts, _ in recorder.calls], (groups, left)


def test_every_rank_makes_the_same_split_calls(bound):
    """Rank 0 (outside) and ranks 4, 7 (inside) of a state on 4-7 call split identically up to the parent."""
    sizes = dict(tensor_model_parallel_size=2, world_size=4, rank_offset=4)
    calls = {rank: _calls_on(rank, 8, bound, **sizes)[0] for rank in (0, 4, 7)}
    assert calls[0] == [((0, 1, 2, 3, 4, 5, 6, 7), [[4, 5, 6, 7]])], f"rank 0 calls {calls[0]}"
    assert calls[4] == calls[7], f"ranks 4 and 7 differ:\n{calls[4]}\n{calls[7]}"
    tp_parts = [parts for parent, parts in calls[4] if parent == (4, 5, 6, 7) and parts == [[0, 1], [2, 3]]]
    assert tp_parts, f"no split of the parent into parent-local tp parts [[0, 1], [2, 3]]: {calls[4]}"


def test_member_gets_its_layout_groups_and_outsider_none(bound):
    sizes = dict(tensor_model_parallel_size=2, world_size=4, rank_offset=4)
    _, (groups, left) = _calls_on(5, 8, bound, **sizes)
    assert groups == {"tp": (4, 5), "dp": (5, 7)}, f"rank 5 groups {groups}"
    assert left == 0, f"{left} groups alive after destroy()"
    with fake_world(8, 0):
        bound(8)
        state = ParallelState(name="s", **sizes)
        with pytest.raises(RankNotInLayoutError):
            state.get_tensor_model_parallel_group()
        state.destroy()


def test_identical_partitions_of_two_states_share_one_group(bound):
    with fake_world(8, 5):
        bound(8)
        a = ParallelState(name="a", tensor_model_parallel_size=2)
        b = ParallelState(name="b", tensor_model_parallel_size=2)
        try:
            assert a.group("tp") is b.group("tp"), "two states with equal tp partitions hold two groups"
            c = ParallelState(name="c", tensor_model_parallel_size=2, share_groups=False)
            assert c.group("tp") is not a.group("tp"), "share_groups=False reused a group"
            c.destroy()
        finally:
            b.destroy()
            alive = _groups.users(a.group("tp"))
            a.destroy()
        assert alive >= 1, f"destroying b dropped a's tp group ({alive} users left)"
        assert _groups.live_groups() == 0, f"{_groups.live_groups()} groups alive after destroy()"
