"""The agreement check run before a state creates any group.

Every rank of a state publishes a fingerprint of the state it is building. For
each group, its *leader* (lowest rank) reads every member's fingerprint, and
every other member reads the leader's, so a disagreement is seen at once by the
ranks involved. The outcome is then decided once for the whole state: the first
rank that finds a problem writes it to a single *decision* key, and the rank
whose success completes the count of the state's ranks writes "ok" there (first
writer wins, with ``compare_set``). Every rank waits for that decision, so either
all ranks of the state go on to create groups, or all raise
:class:`~scoped_parallel.errors.StateMismatchError` with the same message; no rank can succeed while a
member of one of its groups failed (which would leave it waiting in group
creation).

Costs: a non-leader reads about one key per distinct leader; a leader reads its
groups' members; every rank does O(1) counter and decision operations. Reads
never block (``compare_set`` with an impossible expected value reads without
waiting), and every wait also watches the decision, so a failure anywhere ends
all waits. On success the last reader of each key deletes it: nothing stays in
the store. Works on any torch ``Store``, so it is unit-tested on a ``HashStore``
with threads standing in for ranks.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from scoped_parallel.errors import StateMismatchError

__all__ = ["agree"]

_POLL_S = 0.002
_POLL_MAX_S = 0.05
_ABSENT = b"\x00scoped_parallel:absent\x00"
_OK = "ok"


class _Round:
    """One agreement round of one rank: key access under a prefix, with a deadline."""

    def __init__(self, store: Any, prefix: str, deadline: float) -> None:
        self.store = store
        self.prefix = prefix
        self.deadline = deadline

    def peek(self, key: str) -> str | None:
        """The value of ``key``, or None if it does not exist (never blocks)."""
        raw = self.store.compare_set(self.prefix + key, _ABSENT, _ABSENT)
        return None if raw == _ABSENT else raw.decode()

    def decided(self) -> str | None:
        return self.peek("decision")

    def decide(self, verdict: str) -> str:
        """Propose ``verdict``; return the decision that stands (the first one written)."""
        raw = self.store.compare_set(self.prefix + "decision", "", verdict)
        return raw.decode()

    def fail_if_decided(self) -> None:
        verdict = self.decided()
        if verdict is not None and verdict != _OK:
            raise StateMismatchError(verdict)

    def wait(self, keys: Iterable[str]) -> list[str]:
        """Wait until every key exists; return those still missing at the deadline.

        Raises at once if a failure has been decided meanwhile.
        """
        pending = list(keys)
        pause = _POLL_S
        while pending:
            pending = [k for k in pending if not self.store.check([self.prefix + k])]
            if not pending or time.monotonic() > self.deadline:
                break
            self.fail_if_decided()
            time.sleep(pause)
            pause = min(pause * 1.5, _POLL_MAX_S)  # back off: many ranks poll one store
        return pending

    def take(self, key: str, agreeing: str) -> str | None:
        """Read a fingerprint key; if it equals ``agreeing``, count the read.

        The last counted reader deletes the key. Only agreeing reads count: a rank that
        agrees with the writer has its layout, hence is one of the readers the writer
        expected. None means the key vanished (its expected readers are done, so this
        rank is not one of them: it built another layout).
        """
        value = self.peek(key)
        if value is None:
            return None
        readers, _, fingerprint = value.partition("\n")
        full = self.prefix + key
        if fingerprint == agreeing and self.store.add(full + "/n", 1) == int(readers):
            self.store.delete_key(full)
            self.store.delete_key(full + "/n")
        return fingerprint


def agree(
    store: Any,
    prefix: str,
    rank: int,
    span_size: int,
    groups: Iterable[Sequence[int]],
    fingerprint: str,
    timeout_s: float,
    describe: Callable[[], str],
) -> None:
    """Return if every rank of the state built ``fingerprint``; raise StateMismatchError otherwise.

    Called by each of the ``span_size`` ranks of the state with its own ``groups``;
    ``describe()`` names the state and the construction for messages.
    """
    if span_size <= 1:
        return
    mine = sorted({tuple(g) for g in groups if len(g) > 1})
    led = [g for g in mine if min(g) == rank]
    leaders = sorted({min(g) for g in mine} - {rank})
    # Who reads my key: the leaders of my groups, and the members of the groups I lead.
    readers = (set(leaders) | {m for g in led for m in g}) - {rank}
    if readers:
        store.set(prefix + f"fp/{rank}", f"{len(readers)}\n{fingerprint}")
    start = time.monotonic()
    io = _Round(store, prefix, start + timeout_s)
    try:
        _check(io, rank, mine, led, leaders, fingerprint, timeout_s, describe)
    except StateMismatchError as err:
        verdict = io.decide(str(err))  # an earlier failure elsewhere may already stand
        _finish(io, rank, span_size, readers)
        raise StateMismatchError(verdict) from None
    # Everything this rank can see agrees: count it; the rank completing the count decides ok.
    if store.add(prefix + "agreed", 1) == span_size:
        io.decide(_OK)
    io.deadline = start + timeout_s * 1.5 + 1.0  # outlast the leaders' own waits
    pause = _POLL_S
    while (verdict := io.decided()) is None or verdict == "":
        if time.monotonic() > io.deadline:
            verdict = io.decide(
                f"{describe()}: no decision within {timeout_s * 1.5 + 1.0:g} s; some rank of the "
                "state never constructed it, or built a state over another span "
                "(world_size/rank_offset)."
            )
            break
        time.sleep(pause)
        pause = min(pause * 1.5, _POLL_MAX_S)
    _finish(io, rank, span_size, readers)
    if verdict != _OK:
        raise StateMismatchError(verdict)


def _check(
    io: _Round,
    rank: int,
    mine: list[tuple[int, ...]],
    led: list[tuple[int, ...]],
    leaders: list[int],
    fingerprint: str,
    timeout_s: float,
    describe: Callable[[], str],
) -> None:
    """This rank's comparisons: its leaders' fingerprints, then its led groups' members."""
    read: dict[int, str] = {}
    for leader in leaders:
        if io.wait([f"fp/{leader}"]):
            raise StateMismatchError(_missing(describe(), [leader], rank, timeout_s))
        read[leader] = io.take(f"fp/{leader}", fingerprint) or _not_a_member(leader)
        if read[leader] != fingerprint:
            raise StateMismatchError(_differ(describe(), rank, fingerprint, leader, read[leader]))
    for group in led:
        members = [m for m in group if m != rank and m not in read]
        missing = [int(k.split("/")[1]) for k in io.wait(f"fp/{m}" for m in members)]
        if missing:
            raise StateMismatchError(_missing(describe(), missing, rank, timeout_s))
        for m in members:
            read[m] = io.take(f"fp/{m}", fingerprint) or _not_a_member(m)
            if read[m] != fingerprint:
                raise StateMismatchError(_differ(describe(), rank, fingerprint, m, read[m]))


def _finish(io: _Round, rank: int, span_size: int, readers: set[int]) -> None:
    """After the decision: the last rank to learn it removes the round's shared keys."""
    if io.decided() != _OK and readers:
        io.store.delete_key(io.prefix + f"fp/{rank}")  # a failed round: drop my own key
        io.store.delete_key(io.prefix + f"fp/{rank}/n")
    if io.store.add(io.prefix + "done", 1) == span_size:
        for key in ("decision", "agreed", "done"):
            io.store.delete_key(io.prefix + key)


def _missing(what: str, ranks: list[int], rank: int, timeout_s: float) -> str:
    return (
        f"{what}: ranks {ranks} did not construct this state within {timeout_s:g} s (rank {rank} "
        "waited for them). Every rank of a state must construct it, over the same "
        "world_size/rank_offset, and states over the same ranks in the same order."
    )


def _not_a_member(other: int) -> str:
    return f"(a state in which rank {other}'s groups do not include this rank: another layout)"


def _differ(what: str, rank: int, mine: str, other: int, theirs: str) -> str:
    return (
        f"{what}: rank {rank} and rank {other} built different states:\n"
        f"  rank {rank}: {mine}\n  rank {other}: {theirs}\n"
        "Every rank must pass the same arguments and build states in the same order."
    )
