"""Tier 2 (no torch.distributed world): the agreement protocol on an in-process HashStore.

Threads stand in for ranks. Proves: a successful agreement leaves no key and each rank
reads only about its own groups; one disagreeing rank, a rank with another layout, a
missing rank or a leader arriving late makes every rank raise StateMismatchError, fast
or within the deadline, never succeeding alone; one- and two-rank states clean up.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch.distributed as dist

from scoped_parallel import ParallelLayout, StateMismatchError
from scoped_parallel.groups.agree import agree


class CountingStore:
    """A HashStore that counts each thread's reads of distinct keys (observation only)."""

    def __init__(self) -> None:
        self.inner = dist.HashStore()
        self.reads: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def compare_set(self, key, expected, desired):
        who = threading.current_thread().name
        if (who, key) not in self._seen:  # polls of the same key count once
            self._seen.add((who, key))
            self.reads[who] += 1
        return self.inner.compare_set(key, expected, desired)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run(layout, fingerprints, skip=(), timeout_s=2.0, layouts=None, delays=None):
    store = CountingStore()
    results: dict[int, object] = {}
    layouts, delays = layouts or {}, delays or {}

    def rank_main(rank: int) -> None:
        time.sleep(delays.get(rank, 0.0))
        mine = layouts.get(rank, layout)
        try:
            agree(store, "t/", rank, mine.world_size, mine.groups_of(rank).values(), fingerprints[rank],
                  timeout_s, lambda: "ParallelState 'x' (test)")
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


def _not_ok(results):
    """The ranks whose agree() did not return normally, with what they got instead."""
    return {r: v for r, v in sorted(results.items()) if v != "ok"}


def _not_failed(results, ranks):
    """The ranks that did not raise StateMismatchError, with what they got instead."""
    return {r: results.get(r, "no result") for r in ranks if not isinstance(results.get(r), StateMismatchError)}


# How long a rank may wait for the decision: the protocol's own deadline
# (timeout * 1.5 + 1 s, see _agree.agree) plus slack for threads on a loaded machine.
def _decision_deadline(timeout_s):
    protocol_s, slack_s = timeout_s * 1.5 + 1.0, 2.0
    return protocol_s + slack_s


def test_success_leaves_no_key_and_reads_follow_group_sizes():
    """On 64 ranks all succeed, nothing stays in the store, and reads grow with own groups only."""
    layout = ParallelLayout(64, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    store, results = _run(layout, {r: "same" for r in layout.ranks}, timeout_s=20.0)
    assert _not_ok(results) == {}, f"ranks that did not agree: {_not_ok(results)}"
    left = store.inner.num_keys()
    assert left == 0, f"{left} keys left in the store, expected none"
    followers = []
    for r in layout.ranks:
        groups = {g for g in layout.groups_of(r).values() if len(g) > 1}
        leaders = {min(g) for g in groups} - {r}
        members_led = {m for g in groups if min(g) == r for m in g} - {r}
        if not members_led:
            followers.append(r)
        # one read per leader and per member led, plus the decision
        bound = len(leaders) + len(members_led) + 1
        got = store.reads[str(r)]
        assert got <= bound, f"rank {r}: read {got} distinct keys, expected at most {bound}"
    follower_reads = {r: store.reads[str(r)] for r in followers}
    assert followers, "the layout should have ranks that lead no group"
    # a rank that leads no group reads a few keys, however large the world
    few = 8
    assert max(follower_reads.values()) <= few, f"reads by ranks leading no group: {follower_reads}, expected <= {few}"


@pytest.mark.parametrize("bad", [1, 5])
def test_one_disagreeing_rank_fails_every_rank_of_the_state(bad):
    """No rank succeeds (and then waits in group creation) when any rank of the state disagrees."""
    layout = ParallelLayout(8, pipeline_model_parallel_size=2)
    prints = {r: "pp=2" for r in layout.ranks}
    prints[bad] = "pp=4"
    start = time.monotonic()
    _, results = _run(layout, prints, timeout_s=5.0)
    wrong = _not_failed(results, layout.ranks)
    assert wrong == {}, f"ranks that did not raise StateMismatchError: {wrong}"
    silent = {r: str(results[r]) for r in layout.ranks if "pp=4" not in str(results[r])}
    assert silent == {}, f"errors that do not name the odd fingerprint pp=4: {silent}"
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"took {elapsed:.1f} s: decided by the 5 s timeout, not by comparison"


def test_a_rank_with_another_layout_makes_everyone_fail_fast():
    """A rank computing other groups (and other readers of its key) fails all ranks, none blocks."""
    layout = ParallelLayout(8, pipeline_model_parallel_size=2)
    prints = {r: "pp=2" for r in layout.ranks}
    prints[5] = "tp=2"
    start = time.monotonic()
    _, results = _run(layout, prints, layouts={5: ParallelLayout(8, tensor_model_parallel_size=2)},
                      timeout_s=5.0)
    wrong = _not_failed(results, layout.ranks)
    assert wrong == {}, f"ranks that did not raise StateMismatchError: {wrong}"
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"took {elapsed:.1f} s: some rank waited for the 5 s timeout"


def test_missing_rank_is_named_and_fails_everyone():
    """A rank that never arrives is named, and every other rank raises within the deadline."""
    layout = ParallelLayout(8, tensor_model_parallel_size=2)
    start = time.monotonic()
    timeout_s = 0.5
    _, results = _run(layout, {r: "same" for r in layout.ranks}, skip=(6,), timeout_s=timeout_s)
    present = [r for r in layout.ranks if r != 6]
    wrong = _not_failed(results, present)
    assert wrong == {}, f"ranks that did not raise StateMismatchError: {wrong}"
    naming = [r for r in present if "[6]" in str(results[r])]
    assert naming, f"no error names the missing rank 6: {results}"
    elapsed, deadline = time.monotonic() - start, _decision_deadline(timeout_s)
    assert elapsed < deadline, f"took {elapsed:.1f} s, expected under {deadline:.1f} s"


def test_leader_arriving_after_the_timeout_cannot_succeed_alone():
    """Ranks that arrive after another rank gave up learn the failure instead of succeeding."""
    layout = ParallelLayout(3)
    _, results = _run(layout, {r: "same" for r in layout.ranks}, timeout_s=0.5, delays={0: 0.9, 2: 0.9})
    wrong = _not_failed(results, layout.ranks)
    assert wrong == {}, f"ranks that did not raise StateMismatchError: {wrong}"


@pytest.mark.parametrize("ranks", [1, 2])
def test_tiny_worlds_succeed_and_clean_up(ranks):
    """A one-rank state needs no store; a two-rank one cleans up after itself."""
    layout = ParallelLayout(ranks)
    store, results = _run(layout, {r: "same" for r in layout.ranks})
    assert _not_ok(results) == {}, f"ranks that did not agree: {_not_ok(results)}"
    left = store.inner.num_keys()
    assert left == 0, f"{left} keys left in the store, expected none"
