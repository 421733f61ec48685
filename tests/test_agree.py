"""The agreement protocol on an in-process HashStore, with threads standing in for ranks."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch.distributed as dist

from scoped_parallel import ParallelLayout, StateMismatchError
from scoped_parallel._agree import agree


class CountingStore:
    """A HashStore that counts the keys each thread reads (observation only)."""

    def __init__(self) -> None:
        self.inner = dist.HashStore()
        self.reads: Counter[str] = Counter()

    def get(self, key):
        self.reads[threading.current_thread().name] += 1
        return self.inner.get(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run(layout: ParallelLayout, fingerprints: dict[int, str], skip=(), timeout_s=2.0, layouts=None):
    store = CountingStore()
    results: dict[int, object] = {}
    layouts = layouts or {}

    def rank_main(rank: int) -> None:
        mine = layouts.get(rank, layout)
        try:
            agree(store, "t/", rank, mine.groups_of(rank).values(), fingerprints[rank], timeout_s,
                  lambda: "ParallelState 'x' (test)")
            results[rank] = "ok"
        except StateMismatchError as err:
            results[rank] = err

    threads = [threading.Thread(target=rank_main, args=(r,), name=str(r), daemon=True)
               for r in layout.ranks if r not in skip]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"ranks {stuck} never returned from agree()"
    return store, results


def test_agreement_reads_grow_with_group_sizes_not_the_world_squared():
    """On 64 ranks, non-leaders read about two keys per group; nothing is left in the store."""
    layout = ParallelLayout(64, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    store, results = _run(layout, {r: "same" for r in layout.ranks}, timeout_s=20.0)
    assert set(results.values()) == {"ok"}
    groups_of = {r: {g for g in layout.groups_of(r).values() if len(g) > 1} for r in layout.ranks}
    for r in layout.ranks:
        if not any(min(g) == r for g in groups_of[r]):  # ranks that lead nothing
            assert store.reads[str(r)] <= 2 * len(groups_of[r])
    total_group_sizes = sum(len(g) for r in layout.ranks for g in groups_of[r] if min(g) == r)
    assert sum(store.reads.values()) <= 2 * total_group_sizes
    assert store.inner.num_keys() == 0


def test_one_disagreeing_rank_fails_every_member_of_its_groups():
    """Rank 5 builds another state: every rank sharing a group with it raises, naming rank 5."""
    layout = ParallelLayout(16, tensor_model_parallel_size=2)
    prints = {r: "tp=2" for r in layout.ranks}
    prints[5] = "tp=4"
    _, results = _run(layout, prints)
    peers = {m for g in layout.groups_of(5).values() for m in g}
    for r in peers:
        assert isinstance(results[r], StateMismatchError), (r, results[r])
        assert "tp=4" in str(results[r]) and "tp=2" in str(results[r])
    for r in set(layout.ranks) - peers:
        assert results[r] == "ok"


def test_a_rank_with_another_layout_makes_everyone_fail_fast_without_hanging():
    """Rank 3 computes other groups (so other readers of its key): all ranks raise, none blocks."""
    import time

    layout = ParallelLayout(4, tensor_model_parallel_size=2)
    prints = {0: "tp=2", 1: "tp=2", 2: "tp=2", 3: "tp=1"}
    start = time.monotonic()
    _, results = _run(layout, prints, layouts={3: ParallelLayout(4)}, timeout_s=5.0)
    assert all(isinstance(results[r], StateMismatchError) for r in range(4)), results
    assert time.monotonic() - start < 5.0  # detected by comparison, not by waiting out the timeout


def test_missing_rank_is_named_within_the_timeout():
    """A rank that never arrives is named by its groups' leaders and their members."""
    layout = ParallelLayout(8, tensor_model_parallel_size=2)
    _, results = _run(layout, {r: "same" for r in layout.ranks}, skip=(6,), timeout_s=0.5)
    peers = {m for g in layout.groups_of(6).values() for m in g} - {6}
    for r in peers:
        assert isinstance(results[r], StateMismatchError), (r, results[r])
        assert "6" in str(results[r])


@pytest.mark.parametrize("world", [1, 2])
def test_tiny_worlds_need_no_store_traffic_beyond_their_groups(world):
    """A one-rank state writes nothing; a two-rank one cleans up after itself."""
    layout = ParallelLayout(world)
    store, results = _run(layout, {r: "same" for r in layout.ranks})
    assert set(results.values()) == {"ok"} and store.inner.num_keys() == 0
