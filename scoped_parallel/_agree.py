"""The agreement check run before a state creates any group: one leader per group.

Every rank publishes a fingerprint of the state it is building. For each group
it belongs to, the group's *leader* (its lowest rank) reads the fingerprints of
all members and writes a verdict; the other members read the leader's
fingerprint (to notice a disagreement at once) and then the verdict. So each
rank reads about two keys per group it is in, and only leaders read whole
groups: the store traffic grows with the sizes of the groups, not with the
square of the world. A rank that disagrees, or never arrives, makes every member
of every group it is in raise :class:`StateMismatchError` (the leader names it in
the verdict), instead of a hang in group creation.

Keys are counted as they are read; the last reader deletes them, so a successful
agreement leaves nothing in the store. Works on any torch ``Store``
(``set/get/check/add/delete_key``), so it is unit-tested on a ``HashStore`` with
threads standing in for ranks.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from scoped_parallel.errors import StateMismatchError

__all__ = ["agree"]

_POLL_S = 0.002
_POLL_MAX_S = 0.05
_ABSENT = b"\x00scoped_parallel:absent\x00"


class _Reader:
    """Reads keys of one agreement round, once each, counting reads for cleanup."""

    def __init__(self, store: Any, prefix: str, deadline: float) -> None:
        self.store = store
        self.prefix = prefix
        self.deadline = deadline

    def wait(
        self,
        keys: Iterable[str],
        deadline: float | None = None,
        poll: Callable[[], None] | None = None,
    ) -> list[str]:
        """Wait until every key exists; return the ones still missing at the deadline.

        ``poll`` runs between checks; it may raise to abandon the wait (a bad verdict
        published meanwhile).
        """
        pending = [self.prefix + k for k in keys]
        limit = self.deadline if deadline is None else deadline
        pause = _POLL_S
        while pending:
            pending = [k for k in pending if not self.store.check([k])]
            if not pending or time.monotonic() > limit:
                break
            if poll is not None:
                poll()
            time.sleep(pause)
            pause = min(pause * 1.5, _POLL_MAX_S)  # back off: many ranks poll one store
        return [k[len(self.prefix):] for k in pending]

    def take(self, key: str, agreeing: str) -> str | None:
        """Read ``key``; if it holds ``agreeing``, count the read and let the last reader delete it.

        Only agreeing reads count: a rank that agrees with the key's writer has the same
        layout, hence is one of the readers the writer expected, so the count can only
        reach the expected number once all of them have read. A disagreeing rank (which
        the writer may not expect at all) never deletes anything.

        Returns None when the key vanished after it was seen: its expected readers have
        all read it, so this rank is not one of them (it built another layout). The read
        never blocks (``compare_set`` with an impossible expected value returns the
        current value, or that value itself when the key is gone), since a blocking
        ``get`` on a deleted key would hang until the store's own timeout.
        """
        full = self.prefix + key
        raw = self.store.compare_set(full, _ABSENT, _ABSENT)
        if raw == _ABSENT:
            return None
        readers, _, value = raw.decode().partition("\n")
        if value == agreeing and self.store.add(full + "/n", 1) == int(readers):
            self.store.delete_key(full)
            self.store.delete_key(full + "/n")
        return value


def agree(
    store: Any,
    prefix: str,
    rank: int,
    groups: Iterable[Sequence[int]],
    fingerprint: str,
    timeout_s: float,
    describe: Callable[[], str],
) -> None:
    """Raise StateMismatchError unless every member of every group built ``fingerprint``.

    ``groups`` are this rank's groups (any kind); ``describe()`` names the state and
    the construction for messages. Must be called by every member of those groups.
    """
    mine = sorted({tuple(g) for g in groups if len(g) > 1})
    if not mine:
        return
    led = [g for g in mine if min(g) == rank]
    leaders = sorted({min(g) for g in mine} - {rank})
    # Who reads my fingerprint: the leaders of my groups, and the members of groups I lead.
    readers = set(leaders) | {m for g in led for m in g}
    readers.discard(rank)
    store.set(prefix + f"fp/{rank}", f"{len(readers)}\n{fingerprint}")
    start = time.monotonic()
    io = _Reader(store, prefix, start + timeout_s)

    read: dict[int, str] = {}  # fingerprints taken so far (each key is taken once per rank)

    # 1. Members: compare with each leader at once (a disagreeing rank fails fast).
    for leader in leaders:
        missing = io.wait([f"fp/{leader}"])
        if missing:
            raise StateMismatchError(
                f"{describe()}: rank {leader} did not construct this state within "
                f"{timeout_s:g} s (rank {rank} waited for it). Every rank of a state must "
                "construct it, and states over the same ranks must be built in the same order."
            )
        theirs = read[leader] = io.take(f"fp/{leader}", fingerprint) or _not_a_member(leader)
        if theirs != fingerprint:
            raise StateMismatchError(_differ(describe(), rank, fingerprint, leader, theirs))

    # Verdicts of the groups this rank is a member of (not leader), taken once each.
    verdicts: dict[tuple[int, ...], str] = {}
    followed = [g for g in mine if g not in led]

    def poll_verdicts() -> None:
        for group in followed:
            key = f"verdict/{_gid(group)}"
            if group not in verdicts and store.check([prefix + key]):
                verdicts[group] = io.take(key, "ok") or f"{describe()}: rank {min(group)} does not count rank {rank} in group {group}"
                if verdicts[group] != "ok":
                    raise StateMismatchError(verdicts[group])

    # 2. Leaders: read every member, then publish a verdict for the group. While waiting,
    #    watch the verdicts of other groups: a bad one ends the wait at once.
    pending_verdicts = list(led)
    try:
        for group in led:
            members = [m for m in group if m != rank]
            missing = [
                int(k.split("/")[1])
                for k in io.wait((f"fp/{m}" for m in members if m not in read), poll=poll_verdicts)
            ]
            verdict = "ok"
            if missing:
                verdict = (
                    f"{describe()}: ranks {missing} did not construct this state within {timeout_s:g} s "
                    f"(reported by rank {rank}, first rank of group {group}). Every rank of a state "
                    "must construct it, and states over the same ranks must be built in the same order."
                )
            else:
                for m in members:
                    if m not in read:
                        read[m] = io.take(f"fp/{m}", fingerprint) or _not_a_member(m)
                    if read[m] != fingerprint:
                        verdict = _differ(describe(), rank, fingerprint, m, read[m])
                        break
            _publish(store, prefix, group, verdict)
            pending_verdicts.remove(group)
            if verdict != "ok":
                raise StateMismatchError(verdict)
    except StateMismatchError as err:
        for group in pending_verdicts:  # members of the groups this rank leads learn it too
            _publish(store, prefix, group, str(err))
        raise

    # 3. Members: wait for each group's verdict (a little longer than the leader waits).
    limit = start + timeout_s * 1.5 + 1.0
    pause = _POLL_S
    while True:
        poll_verdicts()  # takes each published verdict once (and raises on a bad one)
        waiting = [g for g in followed if g not in verdicts]
        if not waiting:
            return
        if time.monotonic() > limit:
            raise StateMismatchError(
                f"{describe()}: no agreement verdict from rank {min(waiting[0])} for group "
                f"{waiting[0]} within {timeout_s * 1.5 + 1.0:g} s; that rank is stuck or built "
                "another state."
            )
        time.sleep(pause)
        pause = min(pause * 1.5, _POLL_MAX_S)


def _publish(store: Any, prefix: str, group: tuple[int, ...], verdict: str) -> None:
    store.set(prefix + f"verdict/{_gid(group)}", f"{len(group) - 1}\n{verdict}")


def _not_a_member(other: int) -> str:
    return f"(a state in which rank {other}'s groups do not include this rank: another layout)"


def _gid(group: Sequence[int]) -> str:
    return ",".join(map(str, group))


def _differ(what: str, rank: int, mine: str, other: int, theirs: str) -> str:
    return (
        f"{what}: rank {rank} and rank {other} built different states:\n"
        f"  rank {rank}: {mine}\n  rank {other}: {theirs}\n"
        "Every rank must pass the same arguments and build states in the same order."
    )
