"""One rank's part of a reshard between flat layouts, planned without any other rank's transfers (no torch).

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
  (ZeRO-3 trained, replicas resharded on the same ranks), every member of a copy needs the
  same thing: one :class:`~scoped_parallel.resharding.plan.Gather` per tensor (an all-gather over
  the copy's group, which the executor batches into buckets) instead of ``k * (k - 1)``
  point-to-point messages.

A flat layout is the one-dimensional case of a tiled one (:mod:`scoped_parallel.resharding.tiled`,
which plans both): planning takes time and memory in the rank's own transfers plus, once
per pair of keys, the ranks of the two layouts (never ranks squared); the checks are local
plus one digest summed over the participants (:func:`pairing_holds`).

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

from dataclasses import dataclass
from typing import Iterable

from scoped_parallel.resharding.plan import ReshardPlan
from scoped_parallel.resharding.tiled import Copies, Split, TiledTensor, pairing_holds, plan_tiled_local

__all__ = ["Copies", "FlatTensor", "pairing_holds", "plan_flat_local"]


@dataclass(frozen=True)
class FlatTensor:
    """One tensor as both layouts hold it (the same on every rank).

    ``itemsize``/``dtype``: the destination's element (what travels; ``cast`` names it where
    the sender converts, and ``src_itemsize`` is then the source's). ``src``/``dst``: keys of
    the copies of each side; ``src_part``/``dst_part``: elements per tile, each member of a
    copy holding ``src_stride``/``dst_stride`` tiles (one tile of ``numel`` for a whole copy
    per rank; a dimension other than the first split evenly, as AutoTP's row-parallel
    weights are, is ``stride`` tiles: one per row, see :mod:`scoped_parallel.resharding.tiled`)."""

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
    src_stride: int = 1
    dst_stride: int = 1

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor on the wire."""
        return self.numel * self.itemsize

    def tiled(self) -> TiledTensor:
        """The same tensor as a one-dimensional tiled one (each member: ``stride`` tiles of ``part``)."""
        return TiledTensor(self.name, (self.numel,), self.itemsize, self.dtype, self.src, Split(0, self.src_part, self.src_stride),
                           self.dst, Split(0, self.dst_part, self.dst_stride), self.cast, self.src_itemsize)


def plan_flat_local(
    rank: int,
    tensors: Iterable[FlatTensor],
    src_copies: Copies,
    dst_copies: Copies,
    *,
    backend: str = "flat",
    participants: tuple[int, ...] = (),
) -> ReshardPlan:
    """``rank``'s part of the reshard of ``tensors`` (see the module docstring): a
    :class:`~scoped_parallel.resharding.plan.ReshardPlan` with ``rank`` set, holding the transfers
    ``rank`` sends or receives (local copies included), the gathers it takes part in and its
    own pieces. ``tensors`` must be in the same order on every rank (it orders the buckets).
    A ``src``/``dst`` key missing from the copies raises KeyError (a backend bug, not input)."""
    return plan_tiled_local(rank, [t.tiled() for t in tensors], src_copies, dst_copies, backend=backend,
                            participants=participants)
