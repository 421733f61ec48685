"""One rank's part of a reshard between tiled layouts, planned without any other rank's transfers (no torch).

A tiled layout holds each tensor in *copies*: disjoint groups of ranks, each group holding
one whole copy. Along one dimension (:class:`Split`) the tensor is cut into tiles of
``part`` elements (the last one shorter where the size does not divide); member ``i`` of a
copy of ``n`` ranks holds tiles ``i, i + n, ..., i + (stride - 1) * n`` side by side. That
is Megatron's tensor-parallel split (``partition_dim``; ``partition_stride`` 2 for SwiGLU's
``[gate, up]``: member ``i`` holds gate tile ``i`` and up tile ``i``), and with one flat
dimension and stride 1 it is a ZeRO-3 partition (:mod:`scoped_parallel.resharding.flat`). A
side that does not split a tensor holds it whole on each member (``Split()``, copies of one
rank each, as a TP group's ranks each hold a LayerNorm weight).

Both layouts are described compactly, the same on every rank: per tensor a
:class:`TiledTensor` (name, global shape, dtype, each side's split and the key of its
copies) and, per key, the copies' rank tuples (for Megatron: the TP groups of the pipeline
stages holding the tensor; shared by every tensor with that key). From these alone each
rank derives what it receives, what it sends and the gathers it takes part in
(:func:`plan_tiled_local`):

* a destination rank fills each tensor from **one source copy**: the one it belongs to
  (whatever it holds itself is copied locally), else copy ``rank % copies`` (so ranks
  outside the source spread over its copies), each tile from the member that holds it;
* a source rank sends to the destination ranks that picked its copy (found once per pair
  of keys), each the intersection of its tiles with theirs, found by division: the cost is
  its own sends, not every rank's;
* where the destination is a whole replica on exactly the ranks of the source copies and
  the source splits the first dimension with stride 1 (ZeRO-3 trained, replicas resharded
  on the same ranks; a column-parallel weight into TP=1 on the TP ranks), every member of a
  copy needs the same thing: one :class:`~scoped_parallel.resharding.plan.Gather` per tensor (an
  all-gather over the copy's group, batched into buckets) instead of ``n * (n - 1)``
  point-to-point messages;
* where the destination is whole replicas on ranks outside the source, in groups of as many
  ranks as a source copy has, the same kind of source is *relayed*: member ``j`` of each
  group receives source member ``j``'s range, then the group all-gathers (a ``Gather`` with
  ``relay`` set); each source rank sends one message per group reading its copy, not one
  per replica.

Planning takes time and memory in the rank's own transfers plus, once per pair of keys,
the ranks of the two layouts (never ranks squared). The checks are local: each rank's
destination pieces are written exactly once and its reads lie inside its source pieces;
``pairing`` digests both ends of its transfers so that one sum over the participants
shows every send has its receive (:func:`pairing_holds`; the backend does the sum).

Worked example: an ``8 x 2`` weight split on dim 0 by TP=2 on ranks 0-1, into TP=4 on
ranks 0-3 (ranks 2 and 3 are in no source copy: both read copy 0)::

    >>> w = TiledTensor("w", (8, 2), 4, "torch.float32", "tp2", Split(0, 4), "tp4", Split(0, 2))
    >>> copies = {"tp2": ((0, 1),)}, {"tp4": ((0, 1, 2, 3),)}
    >>> [(x.src_rank, x.dst_rank, x.src_box, x.dst_box) for x in plan_tiled_local(0, [w], *copies).transfers]
    [(0, 0, ((0, 2), (0, 2)), ((0, 2), (0, 2))), (0, 1, ((2, 4), (0, 2)), ((0, 2), (0, 2)))]
    >>> plan_tiled_local(3, [w], *copies).transfers[0].src_box
    ((2, 4), (0, 2))

A SwiGLU ``fc1`` (``[gate; up]``, stride 2) from TP=2 to TP=1 on another rank: rank 2
receives each member's gate tile, then each member's up tile, in global order::

    >>> fc1 = TiledTensor("fc1", (8, 2), 4, "torch.float32", "tp2", Split(0, 2, 2), "one", Split())
    >>> part = plan_tiled_local(2, [fc1], {"tp2": ((0, 1),)}, {"one": ((2,),)})
    >>> [(x.src_rank, x.src_box[0], x.dst_box[0]) for x in part.transfers]
    [(0, (0, 2), (0, 2)), (1, (0, 2), (2, 4)), (0, (2, 4), (4, 6)), (1, (2, 4), (6, 8))]
    >>> part.problems()
    []
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from scoped_parallel.resharding.plan import Box, Gather, Piece, ReshardPlan, Transfer

__all__ = ["Copies", "Split", "TiledTensor", "pairing_holds", "plan_tiled_local"]

#: per key, the copies of one layout: disjoint rank tuples, each holding one whole copy
Copies = Mapping[str, Sequence[tuple[int, ...]]]

_MOD = (1 << 31) - 1


@dataclass(frozen=True)
class Split:
    """How one side cuts a tensor: along ``dim`` (None: whole on every member) into tiles of
    ``part`` elements, each member holding ``stride`` of them (see the module docstring)."""

    dim: int | None = None
    part: int = 0
    stride: int = 1


@dataclass(frozen=True)
class TiledTensor:
    """One tensor as both layouts hold it (the same on every rank).

    ``shape``: global. ``itemsize``/``dtype``: the destination's element (what travels;
    ``cast`` names it where the sender converts, and ``src_itemsize`` is then the source's).
    ``src``/``dst``: keys of each side's copies; ``src_split``/``dst_split``: how each cuts it.
    Where both sides split, they split the same dimension (the backend checks that first)."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    dtype: str
    src: str
    src_split: Split
    dst: str
    dst_split: Split
    cast: str = ""
    src_itemsize: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor on the wire."""
        return math.prod(self.shape) * self.itemsize

    @property
    def axis(self) -> int | None:
        """The dimension the tiles cut (None where neither side splits)."""
        return self.src_split.dim if self.src_split.dim is not None else self.dst_split.dim


class _Pairing:
    """What every tensor with the same pair of keys shares: who is in which copy, which
    source copy each destination rank reads, which destination copies read each source
    copy, and whether the pair can be one all-gather."""

    def __init__(self, src: Sequence[tuple[int, ...]], dst: Sequence[tuple[int, ...]]) -> None:
        self.src, self.dst = src, dst
        self.src_at = {r: (j, i) for j, group in enumerate(src) for i, r in enumerate(group)}
        self.dst_at = {r: (j, i) for j, group in enumerate(dst) for i, r in enumerate(group)}
        self.gathered = (
            all(len(group) == 1 for group in dst) and len(self.src_at) == len(self.dst_at)
            and all(r in self.src_at for r in self.dst_at) and any(len(group) > 1 for group in src)
        )
        self._readers: dict[int, list[int]] | None = None
        # a relay (scatter, then all-gather among the receivers): replicas on ranks outside the
        # source, the source copies of one size k > 1, the replicas in groups of k (in layout order)
        sizes = {len(group) for group in src}
        k = sizes.pop() if len(sizes) == 1 else 0
        singles = [group[0] for group in dst] if all(len(group) == 1 for group in dst) else []
        relayed = k > 1 and bool(singles) and len(singles) % k == 0 and not any(r in self.src_at for r in singles)
        self.relays = [tuple(singles[i: i + k]) for i in range(0, len(singles), k)] if relayed else []
        self.relay_at = {r: (g, j) for g, group in enumerate(self.relays) for j, r in enumerate(group)}

    def choose(self, rank: int) -> int:
        """The source copy destination ``rank`` reads: its own, else ``rank % copies``."""
        at = self.src_at.get(rank)
        return at[0] if at is not None else rank % len(self.src)

    def readers(self, copy: int) -> list[int]:
        """The destination copies with at least one member reading source ``copy`` (once per pair)."""
        if self._readers is None:
            self._readers = {}
            for j, group in enumerate(self.dst):
                for c in sorted({self.choose(r) for r in group}):
                    self._readers.setdefault(c, []).append(j)
        return self._readers.get(copy, [])


def _tiles(split: Split, members: int, index: int, length: int) -> Iterator[tuple[int, int, int]]:
    """``(global start, global stop, local start)`` along the axis of each tile member
    ``index`` of a copy of ``members`` ranks holds, in local order."""
    if split.dim is None:
        yield 0, length, 0
        return
    local = 0
    for k in range(split.stride):
        start = min((index + members * k) * split.part, length)
        stop = min(start + split.part, length)
        yield start, stop, local
        local += stop - start


def _covering(split: Split, members: int, start: int, stop: int, length: int) -> Iterator[tuple[int, int, int, int]]:
    """``(member, tile start, tile stop, tile's local start)`` of every tile that overlaps
    ``[start, stop)`` along the axis, found by division (a whole side: member 0 of a copy of one)."""
    if split.dim is None:
        yield 0, 0, length, 0
        return
    if stop <= start or split.part <= 0:
        return
    for tile in range(start // split.part, (stop - 1) // split.part + 1):
        if tile // members >= split.stride:
            return  # no member holds these elements: the coverage check reports them
        t0 = tile * split.part
        yield tile % members, t0, min(t0 + split.part, length), (tile // members) * split.part


def _box(shape: tuple[int, ...], axis: int | None, start: int, stop: int) -> Box:
    return tuple((start, stop) if d == axis else (0, n) for d, n in enumerate(shape))


def _local_shape(shape: tuple[int, ...], axis: int | None, tiles: Iterable[tuple[int, int, int]]) -> tuple[int, ...]:
    if axis is None:
        return shape
    return tuple(sum(b - a for a, b, _ in tiles) if d == axis else n for d, n in enumerate(shape))


def _digest(t: Transfer) -> tuple[int, int]:
    """Two hashes of a transfer, the same at both of its ends (each end derives it alike)."""
    key = f"{t.src_rank}>{t.dst_rank}:{t.src_name}{t.src_box}:{t.dst_name}{t.dst_box}".encode()
    return zlib.crc32(key) % _MOD, zlib.adler32(key[::-1]) % _MOD


def _transfer(t: TiledTensor, src_rank: int, dst_rank: int, src_tile: tuple[int, int, int],
              dst_tile: tuple[int, int, int], src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> Transfer | None:
    """The copy of the overlap of a source tile and a destination tile (None: they do not overlap)."""
    (s0, s1, sl), (d0, d1, dl) = src_tile, dst_tile
    o0, o1 = max(s0, d0), min(s1, d1)
    if o1 <= o0:
        return None
    axis = t.axis
    return Transfer(src_rank, dst_rank, t.name, t.name,
                    _box(src_shape, axis, sl + o0 - s0, sl + o1 - s0),
                    _box(dst_shape, axis, dl + o0 - d0, dl + o1 - d0), t.itemsize, t.cast)


def plan_tiled_local(
    rank: int,
    tensors: Iterable[TiledTensor],
    src_copies: Copies,
    dst_copies: Copies,
    *,
    backend: str = "tiled",
    participants: tuple[int, ...] = (),
) -> ReshardPlan:
    """``rank``'s part of the reshard of ``tensors`` (see the module docstring): a
    :class:`~scoped_parallel.resharding.plan.ReshardPlan` with ``rank`` set, holding the transfers
    ``rank`` sends or receives (local copies included), the gathers it takes part in and its
    own pieces. ``tensors`` must be in the same order on every rank (it orders the buckets).
    A key missing from the copies raises KeyError (a backend bug, not input)."""
    pairings: dict[tuple[str, str], _Pairing] = {}
    transfers: list[Transfer] = []
    gathers: list[Gather] = []
    sources: list[Piece] = []
    targets: list[Piece] = []
    order: list[tuple[str, int]] = []
    digest = [0, 0, 0, 0]  # sends (two hashes), receives (two hashes)

    def record(x: Transfer | None) -> None:
        """Keep a transfer of this rank and add it to the send or receive digest (not a local copy)."""
        if x is None:
            return
        transfers.append(x)
        if not x.local:
            at = 0 if x.src_rank == rank else 2
            h1, h2 = _digest(x)
            digest[at], digest[at + 1] = (digest[at] + h1) % _MOD, (digest[at + 1] + h2) % _MOD

    for t in tensors:
        order.append((t.name, t.nbytes))
        pair = pairings.get((t.src, t.dst))
        if pair is None:
            pair = pairings[(t.src, t.dst)] = _Pairing(src_copies[t.src], dst_copies[t.dst])
        axis = t.axis
        length = t.shape[axis] if axis is not None else 1
        ss, ds = t.src_split, t.dst_split
        src_at, dst_at = pair.src_at.get(rank), pair.dst_at.get(rank)
        if src_at is not None:
            n = len(pair.src[src_at[0]])
            mine_src = list(_tiles(ss, n, src_at[1], length))
            src_shape = _local_shape(t.shape, axis, mine_src)
            sources.append(Piece(rank, t.name, src_shape, t.src_itemsize or t.itemsize))
        if dst_at is not None:
            m = len(pair.dst[dst_at[0]])
            mine_dst = list(_tiles(ds, m, dst_at[1], length))
            dst_shape = _local_shape(t.shape, axis, mine_dst)
            targets.append(Piece(rank, t.name, dst_shape, t.itemsize))
        if pair.gathered and ss.dim == 0 and ss.stride == 1:
            if src_at is not None:
                row = math.prod(t.shape[1:])
                gathers.append(Gather(pair.src[src_at[0]], t.name, math.prod(t.shape), ss.part * row, t.itemsize, t.dtype, t.cast))
            continue
        if pair.relays and ss.dim == 0 and ss.stride == 1 and (ds.dim is None or ds.part * ds.stride >= length):
            # a relay: member j of each group of k replicas receives source member j's range, then they all-gather
            copies = len(pair.src)
            if dst_at is not None:
                g, j = pair.relay_at[rank]
                holder = pair.src[g % copies][j]
                tile = (min(j * ss.part, length), min((j + 1) * ss.part, length), 0)
                record(_transfer(t, holder, rank, tile, mine_dst[0], _local_shape(t.shape, axis, [tile]), dst_shape))
                row = math.prod(t.shape[1:])
                gathers.append(Gather(pair.relays[g], t.name, math.prod(t.shape), ss.part * row, t.itemsize, t.dtype, relay=True))
            if src_at is not None:
                c, i = src_at
                whole = next(iter(_tiles(ds, 1, 0, length)))
                whole_shape = _local_shape(t.shape, axis, [whole])
                for g in range(c, len(pair.relays), copies):
                    record(_transfer(t, rank, pair.relays[g][i], mine_src[0], whole, src_shape, whole_shape))
            continue
        if dst_at is not None:  # receives and local copies, from the chosen copy
            group = pair.src[pair.choose(rank)]
            n = len(group)
            for tile in mine_dst:
                for member, a, b, local in _covering(ss, n, tile[0], tile[1], length):
                    held = list(_tiles(ss, n, member, length))
                    record(_transfer(t, group[member], rank, (a, b, local), tile, _local_shape(t.shape, axis, held), dst_shape))
        if src_at is not None:  # sends, to the destination ranks that read this copy
            copy = src_at[0]
            for j in pair.readers(copy):
                group = pair.dst[j]
                m = len(group)
                for tile in mine_src:
                    for member, a, b, local in _covering(ds, m, tile[0], tile[1], length):
                        d = group[member]
                        if d == rank or pair.choose(d) != copy:
                            continue
                        held = list(_tiles(ds, m, member, length))
                        record(_transfer(t, rank, d, tile, (a, b, local), src_shape, _local_shape(t.shape, axis, held)))
    return ReshardPlan(backend, tuple(transfers), tuple(sources), tuple(targets), {}, (), rank=rank,
                       gathers=tuple(gathers), order=tuple(order), pairing=(digest[0], digest[1], digest[2], digest[3]),
                       participants=participants)


def pairing_holds(sums: Sequence[int]) -> bool:
    """Whether the participants' ``pairing`` digests, summed element-wise, show every send
    matched by its receive (sends' sums equal receives' sums modulo the digest's modulus).

    >>> w = TiledTensor("w", (8,), 4, "torch.float32", "dp", Split(0, 2), "replica", Split())
    >>> copies = {"dp": ((0, 1, 2, 3),)}, {"replica": ((4,), (5,))}
    >>> parts = [plan_tiled_local(r, [w], *copies) for r in range(6)]
    >>> pairing_holds([sum(p.pairing[i] for p in parts) for i in range(4)])
    True
    >>> pairing_holds([sum(p.pairing[i] for p in parts[:-1]) for i in range(4)])  # rank 5's receives missing
    False
    """
    s1, s2, r1, r2 = sums
    return (s1 - r1) % _MOD == 0 and (s2 - r2) % _MOD == 0
