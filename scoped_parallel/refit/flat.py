"""One rank's part of a refit between flat layouts, planned without any other rank's transfers (no torch).

A flat layout holds each tensor as a flat run of elements in *copies*: disjoint groups of
ranks, each group holding one whole copy, member ``i`` of a group elements ``[i * part,
min((i + 1) * part, numel))``. A ZeRO-3 model under DP=4 x TP=2 is two copies (its two
partition groups), each partitioned four ways; a replica on 8 ranks is eight copies of one
rank each (``part == numel``). Both layouts are described compactly, the same on every
rank: per tensor a :class:`FlatTensor` (name, size, dtype, the key of each side's copies,
each side's partition size) and, per key, the copies' rank tuples (the state's groups of
one kind, from its layout: shared by every tensor partitioned over that kind).

From these alone each rank derives what it receives, what it sends and the gathers it
takes part in (:func:`plan_flat_local`):

* a destination rank fills each tensor from **one source copy**: the one it belongs to
  (whatever it holds itself is copied locally), else copy ``rank % copies`` (so ranks
  outside the source spread over its copies), each element from the member that holds it;
* a source rank sends its range to every destination rank that picked its copy and needs
  part of that range; it finds them per destination copy by division, so the cost is its
  own sends, not every rank's;
* where the destination is a whole replica on exactly the ranks of the source copies
  (ZeRO-3 trained, replicas refitted on the same ranks), every member of a copy needs the
  same thing: one :class:`~scoped_parallel.refit.plan.Gather` per tensor (an all-gather over
  the copy's group, which the executor batches into buckets) instead of ``k * (k - 1)``
  point-to-point messages.

Planning takes time and memory in the rank's own transfers plus, once per pair of keys,
the ranks of the two layouts (never ranks squared). The plan's checks are local: each
rank's destination pieces are written exactly once and its reads lie inside its source
pieces; ``pairing`` digests its sends and receives so that one sum over the participants
shows every send has its receive (the backend does that sum).

Worked example: a tensor of 8 elements ZeRO-3-partitioned over ranks 0-3 (2 each), into a
replica on ranks 4 and 5 (ranks outside the source: both pick copy 0)::

    >>> t = FlatTensor("w", 8, 4, "torch.float32", "dp", 2, "replica", 8)
    >>> copies = {"dp": ((0, 1, 2, 3),)}, {"replica": ((4,), (5,))}
    >>> part = plan_flat_local(4, [t], *copies)
    >>> [(x.src_rank, x.dst_rank, x.dst_box) for x in part.transfers]
    [(0, 4, ((0, 2),)), (1, 4, ((2, 4),)), (2, 4, ((4, 6),)), (3, 4, ((6, 8),))]
    >>> [(x.src_rank, x.dst_rank, x.src_box) for x in plan_flat_local(1, [t], *copies).transfers]
    [(1, 4, ((0, 2),)), (1, 5, ((0, 2),))]
    >>> part.problems()
    []

The same tensor into replicas on ranks 0-3 themselves is one all-gather::

    >>> part = plan_flat_local(2, [FlatTensor("w", 8, 4, "torch.float32", "dp", 2, "replica", 8)],
    ...                        {"dp": ((0, 1, 2, 3),)}, {"replica": ((0,), (1,), (2,), (3,))})
    >>> part.transfers, [(g.group, g.part) for g in part.gathers], part.problems()
    ((), [((0, 1, 2, 3), 2)], [])
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from scoped_parallel.refit.plan import Gather, Piece, ReshardPlan, Transfer

__all__ = ["Copies", "FlatTensor", "pairing_holds", "plan_flat_local"]

#: per key, the copies of one layout: disjoint rank tuples, each holding one whole copy
Copies = Mapping[str, Sequence[tuple[int, ...]]]

_MOD = (1 << 31) - 1


@dataclass(frozen=True)
class FlatTensor:
    """One tensor as both layouts hold it (the same on every rank).

    ``itemsize``/``dtype``: the destination's element (what travels; ``cast`` names it where
    the sender converts, and ``src_itemsize`` is then the source's). ``src``/``dst``: keys of
    the copies of each side; ``src_part``/``dst_part``: elements per member of a copy
    (``numel`` for a whole copy per rank)."""

    name: str
    numel: int
    itemsize: int
    dtype: str
    src: str
    src_part: int
    dst: str
    dst_part: int
    cast: str = ""
    src_itemsize: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor on the wire."""
        return self.numel * self.itemsize


class _Pairing:
    """What every tensor with the same pair of keys shares: who is in which copy, which
    source copy each destination rank reads, and whether the pair is one all-gather."""

    def __init__(self, src: Sequence[tuple[int, ...]], dst: Sequence[tuple[int, ...]]) -> None:
        self.src, self.dst = src, dst
        self.src_at = {r: (j, i) for j, group in enumerate(src) for i, r in enumerate(group)}
        self.dst_at = {r: (j, i) for j, group in enumerate(dst) for i, r in enumerate(group)}
        self.replica = all(len(group) == 1 for group in dst)
        self.gathered = (
            self.replica and len(self.src_at) == len(self.dst_at) and all(r in self.src_at for r in self.dst_at)
            and any(len(group) > 1 for group in src)
        )
        self._choosers: dict[int, list[int]] | None = None

    def choose(self, rank: int) -> int:
        """The source copy destination ``rank`` reads: its own, else ``rank % copies``."""
        at = self.src_at.get(rank)
        return at[0] if at is not None else rank % len(self.src)

    def choosers(self, copy: int) -> list[int]:
        """The destination ranks (of a whole-replica destination) that read source ``copy``."""
        if self._choosers is None:
            self._choosers = {}
            for group in self.dst:
                self._choosers.setdefault(self.choose(group[0]), []).append(group[0])
        return self._choosers.get(copy, [])


def _span(index: int, part: int, numel: int) -> tuple[int, int]:
    start = min(index * part, numel)
    return start, min(start + part, numel)


def _digest(src: int, dst: int, name: str, start: int) -> tuple[int, int]:
    key = f"{src}>{dst}:{start}:{name}".encode()
    return zlib.crc32(key) % _MOD, zlib.adler32(key[::-1]) % _MOD


def plan_flat_local(
    rank: int,
    tensors: Iterable[FlatTensor],
    src_copies: Copies,
    dst_copies: Copies,
    *,
    backend: str = "flat",
    participants: tuple[int, ...] = (),
) -> ReshardPlan:
    """``rank``'s part of the refit of ``tensors`` (see the module docstring): a
    :class:`~scoped_parallel.refit.plan.ReshardPlan` with ``rank`` set, holding the transfers
    ``rank`` sends or receives (local copies included), the gathers it takes part in and its
    own pieces. ``tensors`` must be in the same order on every rank (it orders the buckets).
    A ``src``/``dst`` key missing from the copies raises KeyError (a backend bug, not input)."""
    pairings: dict[tuple[str, str], _Pairing] = {}
    transfers: list[Transfer] = []
    gathers: list[Gather] = []
    sources: list[Piece] = []
    targets: list[Piece] = []
    order: list[tuple[str, int]] = []
    digest = [0, 0, 0, 0]  # sends (two hashes), receives (two hashes)
    for t in tensors:
        order.append((t.name, t.nbytes))
        pair = pairings.get((t.src, t.dst))
        if pair is None:
            pair = pairings[(t.src, t.dst)] = _Pairing(src_copies[t.src], dst_copies[t.dst])
        n, ps, pd = t.numel, t.src_part, t.dst_part
        src_at, dst_at = pair.src_at.get(rank), pair.dst_at.get(rank)
        if src_at is not None:
            lo, hi = _span(src_at[1], ps, n)
            sources.append(Piece(rank, t.name, (hi - lo,), t.src_itemsize or t.itemsize))
        if dst_at is not None:
            a, b = _span(dst_at[1], pd, n)
            targets.append(Piece(rank, t.name, (b - a,), t.itemsize))
        if pair.gathered:
            if src_at is not None:
                gathers.append(Gather(pair.src[src_at[0]], t.name, n, ps, t.itemsize, t.dtype, t.cast))
            continue
        if dst_at is not None and b > a:  # receives and local copies, from the chosen copy
            group = pair.src[pair.choose(rank)]
            for i in range(a // ps, (b - 1) // ps + 1):
                if i >= len(group):
                    break  # no member holds these elements: the coverage check reports them
                s0, s1 = _span(i, ps, n)
                o0, o1 = max(a, s0), min(b, s1)
                if o1 <= o0:
                    continue
                holder = group[i]
                transfers.append(Transfer(holder, rank, t.name, t.name, ((o0 - s0, o1 - s0),), ((o0 - a, o1 - a),), t.itemsize, t.cast))
                if holder != rank:
                    h1, h2 = _digest(holder, rank, t.name, o0)
                    digest[2], digest[3] = (digest[2] + h1) % _MOD, (digest[3] + h2) % _MOD
        if src_at is not None and hi > lo:  # sends, to the destination ranks that read this copy
            copy = src_at[0]
            if pair.replica:
                readers = [(d, 0) for d in pair.choosers(copy)]
            else:
                readers = [(group[k], k) for group in pair.dst
                           for k in range(lo // pd, min((hi - 1) // pd, len(group) - 1) + 1)
                           if pair.choose(group[k]) == copy]
            for d, k in readers:
                if d == rank:
                    continue
                d0, d1 = _span(k, pd, n)
                o0, o1 = max(lo, d0), min(hi, d1)
                if o1 <= o0:
                    continue
                transfers.append(Transfer(rank, d, t.name, t.name, ((o0 - lo, o1 - lo),), ((o0 - d0, o1 - d0),), t.itemsize, t.cast))
                h1, h2 = _digest(rank, d, t.name, o0)
                digest[0], digest[1] = (digest[0] + h1) % _MOD, (digest[1] + h2) % _MOD
    return ReshardPlan(backend, tuple(transfers), tuple(sources), tuple(targets), {}, (), rank=rank,
                       gathers=tuple(gathers), order=tuple(order), pairing=(digest[0], digest[1], digest[2], digest[3]),
                       participants=participants)


def pairing_holds(sums: Sequence[int]) -> bool:
    """Whether the participants' ``pairing`` digests, summed element-wise, show every send
    matched by its receive (sends' sums equal receives' sums modulo the digest's modulus).

    >>> t = FlatTensor("w", 8, 4, "torch.float32", "dp", 2, "replica", 8)
    >>> copies = {"dp": ((0, 1, 2, 3),)}, {"replica": ((4,), (5,))}
    >>> parts = [plan_flat_local(r, [t], *copies) for r in range(6)]
    >>> pairing_holds([sum(p.pairing[i] for p in parts) for i in range(4)])
    True
    >>> pairing_holds([sum(p.pairing[i] for p in parts[:-1]) for i in range(4)])  # rank 5's receives missing
    False
    """
    s1, s2, r1, r2 = sums
    return (s1 - r1) % _MOD == 0 and (s2 - r2) % _MOD == 0
