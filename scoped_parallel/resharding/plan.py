"""What a reshard moves, as plain data: the tensors each rank holds and must fill, the
transfers between them, the checks a plan must pass and the report (no torch).

A reshard copies a model laid out by one state (the *source*) into the same architecture
laid out by another (the *destination*). Every rank lists the pieces it holds
(:class:`Piece`: a tensor of the source, or one it must fill in the destination); a
backend (:func:`~scoped_parallel.resharding.tiled.plan_tiled_local` on each rank, or
megatron-core's planner, or the global :func:`plan_flat` for flat ZeRO-style partitions) turns the pieces into :class:`Transfer` s, each a box of a source
piece copied into an equal box of a destination piece, on the same rank or between two.
Boxes are in the pieces' *local* coordinates: per dimension, ``(start, stop)``.

Worked example, 4 ranks: one ``8 x 4`` weight split on dim 0 by TP=2 (Megatron's TP
groups ``[0, 1]`` and ``[2, 3]``: ranks 0 and 2 hold rows 0-3, ranks 1 and 3 rows 4-7)
into TP=4 (rank ``r`` holds rows ``2r`` and ``2r + 1``)::

    >>> src = [Piece(r, "w", (4, 4), 4) for r in range(4)]
    >>> dst = [Piece(r, "w", (2, 4), 4) for r in range(4)]
    >>> moves = [
    ...     Transfer(0, 0, "w", "w", ((0, 2), (0, 4)), ((0, 2), (0, 4)), 4),  # rows 0-1: rank 0 keeps them
    ...     Transfer(2, 1, "w", "w", ((2, 4), (0, 4)), ((0, 2), (0, 4)), 4),  # rows 2-3: from rank 2
    ...     Transfer(3, 2, "w", "w", ((0, 2), (0, 4)), ((0, 2), (0, 4)), 4),  # rows 4-5: from rank 3
    ...     Transfer(3, 3, "w", "w", ((2, 4), (0, 4)), ((0, 2), (0, 4)), 4),  # rows 6-7: rank 3 keeps them
    ... ]
    >>> plan = ReshardPlan("example", tuple(moves), tuple(src), tuple(dst))
    >>> plan.problems(), plan.bytes_between()
    ([], {(2, 1): 32, (3, 2): 32})

The checks see coverage and bounds, not meaning (a swapped shard passes them; the tests'
logits comparison catches it)::

    >>> ReshardPlan("example", tuple(moves[:3]), tuple(src), tuple(dst)).problems()
    ["destination 'w' on rank 3: 32 of 32 bytes never written"]
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

from scoped_parallel.errors import ReshardError

__all__ = [
    "Box", "CastSpec", "Gather", "Piece", "ReshardPlan", "Transfer", "box_is_contiguous", "box_slices", "is_floating", "plan_flat",
    "resolve_casts", "unmatched_names",
]

#: per dimension ``(start, stop)``, local coordinates of one piece
Box = tuple[tuple[int, int], ...]

#: what ``dtype=`` of ``reshard``/``plan_reshard`` becomes once torch dtypes are spelled as
#: strings (``str(torch.bfloat16) == "torch.bfloat16"``): None (no cast), one dtype for every
#: floating tensor, ``{canonical name: dtype}``, or a function of the name (None: no cast)
CastSpec = Union[None, str, Mapping[str, str], Callable[[str], Union[str, None]]]


def is_floating(dtype: str) -> bool:
    """Whether ``dtype`` (a torch dtype's ``str``) is a floating-point type, the only kind a
    reshard casts (integer, bool and complex tensors are copied as they are).

    >>> is_floating("torch.bfloat16"), is_floating("torch.float8_e4m3fn"), is_floating("torch.int64")
    (True, True, False)
    """
    return dtype.startswith(("torch.float", "torch.bfloat", "torch.half", "torch.double"))


def resolve_casts(spec: CastSpec, pairs: Mapping[str, tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The wire dtype of every tensor that changes dtype, and the problems: ``pairs`` is
    ``{name: (source dtype, destination dtype)}`` for the tensors both models hold.

    A tensor is cast only where both its dtypes are floating and ``spec`` names a dtype
    for it (``spec`` a dtype: every floating tensor; a mapping: the names it lists; a
    callable: what it returns, None for no cast). That dtype must be the destination
    tensor's (the cast happens on the sending side, so the wire carries the destination's
    bytes). A tensor whose dtypes differ with no cast asked is a problem naming the fix; so
    is a cast asked for an integer/bool tensor, or for a name no model holds.

    >>> resolve_casts("torch.bfloat16", {"w": ("torch.float32", "torch.bfloat16"), "step": ("torch.int64", "torch.int64")})
    ({'w': 'torch.bfloat16'}, [])
    >>> resolve_casts(None, {"w": ("torch.float32", "torch.bfloat16")})[1]
    ["'w': source dtype torch.float32 but destination torch.bfloat16; resharding moves tensors between layouts and converts dtypes only when asked: pass dtype=torch.bfloat16 (or a mapping / function naming these tensors) to convert on the sending side"]
    """
    casts: dict[str, str] = {}
    problems: list[str] = []
    uncast: dict[tuple[str, str], list[str]] = {}  # (source, destination dtype) -> names: one line per pair
    mistargeted: dict[tuple[str, str], list[str]] = {}  # (asked, destination dtype) -> names
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(pairs))
        if unknown:
            problems.append(f"dtype= names tensors that the models do not both hold: {unknown[:3]} (of {len(unknown)}); "
                            "use canonical names (plan.targets lists them)")
    for name in sorted(pairs):
        src, dst = pairs[name]
        floating = is_floating(src) and is_floating(dst)
        wanted: str | None = None
        if isinstance(spec, str):
            wanted = spec if floating else None
        elif isinstance(spec, Mapping):
            wanted = spec.get(name)
            if wanted is not None and not floating:
                problems.append(f"{name!r}: dtype= asks for {wanted}, but a {src} -> {dst} tensor is never cast (integer/bool)")
                continue
        elif spec is not None and floating:
            wanted = spec(name)
        if wanted is None:
            if src != dst:
                uncast.setdefault((src, dst), []).append(name)
        elif wanted != dst:
            mistargeted.setdefault((wanted, dst), []).append(name)
        elif wanted != src:
            casts[name] = wanted
    for (src, dst), names in uncast.items():
        problems.append(
            f"{_names(names)}: source dtype {src} but destination {dst}; resharding moves tensors between layouts and converts "
            f"dtypes only when asked: pass dtype={dst} (or a mapping / function naming these tensors) to convert on the sending side"
        )
    for (wanted, dst), names in mistargeted.items():
        problems.append(f"{_names(names)}: dtype= casts to {wanted}, but the destination tensor is {dst} "
                        "(the cast target must be the destination's dtype)")
    return casts, problems


def _names(names: list[str]) -> str:
    """``'a'``, or ``'a', 'b', 'c' and 5 more tensors``: the tensors one problem line is about."""
    shown = ", ".join(repr(n) for n in names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more tensors"


def _volume(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def _extents(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def _inside(box: Box, shape: tuple[int, ...]) -> bool:
    return len(box) == len(shape) and all(0 <= a <= b <= n for (a, b), n in zip(box, shape))


def _overlap(a: Box, b: Box) -> bool:
    return all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b))


def _first_overlap(boxes: list[Box]) -> tuple[Box, Box] | None:
    """Two boxes that share an element, or None: a sweep along the dimension where the boxes
    differ most, comparing each box only with those still open along it."""
    if len(boxes) < 2:
        return None
    if not boxes[0]:  # a scalar: any two boxes are the same element
        return boxes[0], boxes[1]
    dim = max(range(len(boxes[0])), key=lambda d: len({b[d][0] for b in boxes}))
    open_: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[dim]):
        open_ = [a for a in open_ if a[dim][1] > box[dim][0]]
        for other in open_:
            if _overlap(other, box):
                return other, box
        open_.append(box)
    return None


def unmatched_names(source: Iterable[str], destination: Mapping[str, int]) -> list[str]:
    """The tensors one model has and the other lacks (``destination``: name -> a rank that
    fills it), as a backend's plan check reports them: a reshard needs the same architecture.

    >>> unmatched_names(["a", "b"], {"a": 0, "c": 2})
    ["source tensors ['b'] (of 1) have no counterpart in the destination model (another architecture?)", "destination 'c' (rank 2) has no counterpart in the source model (another architecture?)"]
    """
    source = set(source)
    problems = []
    extra = sorted(source - set(destination))
    if extra:
        problems.append(f"source tensors {extra[:3]} (of {len(extra)}) have no counterpart in the destination model (another architecture?)")
    problems += [
        f"destination {name!r} (rank {rank}) has no counterpart in the source model (another architecture?)"
        for name, rank in destination.items() if name not in source
    ]
    return problems


def box_slices(box: Box) -> tuple[slice, ...]:
    """``box`` as the index of a tensor: ``tensor[box_slices(box)]``.

    >>> box_slices(((0, 2), (1, 4)))
    (slice(0, 2, None), slice(1, 4, None))
    """
    return tuple(slice(a, b) for a, b in box)


def box_is_contiguous(box: Box, shape: tuple[int, ...]) -> bool:
    """Whether ``box`` of a row-major tensor of ``shape`` is one contiguous run of memory.

    >>> box_is_contiguous(((0, 2), (0, 4)), (8, 4)), box_is_contiguous(((0, 8), (0, 2)), (8, 4))
    (True, False)
    """
    partial = [d for d, ((a, b), n) in enumerate(zip(box, shape)) if (a, b) != (0, n)]
    if not partial:
        return True
    # every dimension after the last partial one is whole; every one before it has extent 1
    return all(b - a == 1 for (a, b) in box[: partial[-1]])


@dataclass(frozen=True)
class Piece:
    """A tensor one rank holds of the source, or must fill in the destination.

    ``name`` is the tensor's canonical name (the same on every rank and in both models:
    global layer and expert numbers), ``shape`` its local shape on that rank.
    """

    rank: int
    name: str
    shape: tuple[int, ...]
    itemsize: int
    dtype: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the piece."""
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class Transfer:
    """Box ``src_box`` of source piece ``src_name`` on ``src_rank`` into box ``dst_box``
    of destination piece ``dst_name`` on ``dst_rank`` (the same rank: a local copy).

    ``itemsize`` is the size of an element on the wire; ``cast`` the dtype the sender
    converts the box to before sending (``"torch.bfloat16"``; the destination's dtype), or
    ``""`` where the box travels as the source holds it."""

    src_rank: int
    dst_rank: int
    src_name: str
    dst_name: str
    src_box: Box
    dst_box: Box
    itemsize: int
    cast: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes the transfer moves (in the wire dtype)."""
        return _volume(self.dst_box) * self.itemsize

    @property
    def local(self) -> bool:
        """Whether source and destination are the same rank (a copy, no communication)."""
        return self.src_rank == self.dst_rank


@dataclass(frozen=True)
class Gather:
    """Flat tensor ``name`` made whole on every member of ``group`` by one all-gather of
    their source partitions: member ``i`` holds elements ``[i * part, min((i + 1) * part,
    numel))`` and every member fills a whole destination piece of ``numel`` elements.

    ``dtype`` is the wire dtype (the destination's; ``cast`` is set where the sender
    converts), ``itemsize`` its element size. The bytes a member makes available to each
    peer are its own range's (padding is not counted), as a point-to-point plan would send."""

    group: tuple[int, ...]
    name: str
    numel: int
    part: int
    itemsize: int
    dtype: str
    cast: str = ""
    #: a *relay*: each member first receives its own range point-to-point (a transfer of the
    #: plan) and contributes it from its destination tensor; the gather writes the others'
    relay: bool = False

    def span(self, index: int) -> tuple[int, int]:
        """Elements ``[start, stop)`` that member ``index`` contributes."""
        start = min(index * self.part, self.numel)
        return start, min(start + self.part, self.numel)


@dataclass(frozen=True)
class ReshardPlan:
    """Every transfer of one reshard, on every rank, with the checks and the report.

    ``staging`` is the executor's predicted peak of extra memory per rank (receive
    buffers and copies of non-contiguous send boxes), filled in by the backend that
    knows its executor; ``notes`` are the backend's lines for the report.

    A plan is either *global* (``rank`` None: every rank's transfers and pieces, as
    megatron-core's planner hands them over) or *this rank's part* (``rank`` set: the
    transfers it sends or receives, the gathers it takes part in and its own pieces, made
    by :func:`scoped_parallel.resharding.flat.plan_flat_local` without any other rank's
    transfers). A rank's part checks what the rank can see (its destination pieces written
    exactly once, its reads inside its source pieces); ``pairing`` (a digest of its sends
    and of its receives, summed over the participants by the backend) shows that every
    send has its receive. ``order`` (``(tensor name, bytes)``, the same on every rank)
    cuts the buckets; ``participants`` are the ranks of both states (the collective's ranks).
    """

    backend: str
    transfers: tuple[Transfer, ...]
    sources: tuple[Piece, ...]
    targets: tuple[Piece, ...]
    staging: Mapping[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    rank: int | None = None
    gathers: tuple[Gather, ...] = ()
    order: tuple[tuple[str, int], ...] = ()
    pairing: tuple[int, ...] = (0, 0, 0, 0)
    participants: tuple[int, ...] = ()

    # ---------------------------------------------------------------- queries

    @functools.cached_property
    def _by_rank(self) -> dict[int, tuple[tuple[int, Transfer], ...]]:
        out: dict[int, list[tuple[int, Transfer]]] = {}
        for i, t in enumerate(self.transfers):
            out.setdefault(t.src_rank, []).append((i, t))
            if t.dst_rank != t.src_rank:
                out.setdefault(t.dst_rank, []).append((i, t))
        return {rank: tuple(items) for rank, items in out.items()}

    @functools.cached_property
    def _pieces_by_rank(self) -> dict[int, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
        out: dict[int, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {}
        for which, pieces in ((0, self.sources), (1, self.targets)):
            for p in pieces:
                out.setdefault(p.rank, ([], []))[which].append((p.name, p.shape, p.itemsize, p.dtype))
        for src, dst in out.values():
            src.sort()
            dst.sort()
        return out

    def for_rank(self, rank: int) -> tuple[tuple[int, Transfer], ...]:
        """``(index, transfer)`` of the transfers ``rank`` sends or receives, in plan order
        (the index is the transfer's id, the same on both ends). Computed once per plan."""
        return self._by_rank.get(rank, ())

    def pieces_of(self, rank: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """``(name, shape, itemsize, dtype)`` of ``rank``'s source and destination pieces, sorted."""
        return self._pieces_by_rank.get(rank, ([], []))

    def bytes_between(self, include_local: bool = False) -> dict[tuple[int, int], int]:
        """Bytes sent from rank to rank, ``{(src, dst): bytes}`` (local copies left out unless asked)."""
        out: dict[tuple[int, int], int] = {}
        for t in self.transfers:
            if include_local or not t.local:
                key = (t.src_rank, t.dst_rank)
                out[key] = out.get(key, 0) + t.nbytes
        for key, nbytes in self._gathered_pairs().items():
            if include_local or key[0] != key[1]:
                out[key] = out.get(key, 0) + nbytes
        return dict(sorted(out.items()))

    def _gathered_pairs(self, gathers: Iterable[Gather] | None = None) -> dict[tuple[int, int], int]:
        """What the gathers (all, or those given) make available, ``{(member, peer): bytes}`` of
        the member's own range (the whole table in a global plan; only this rank's pairs in a
        rank's part)."""
        out: dict[tuple[int, int], int] = {}
        for g in self.gathers if gathers is None else gathers:
            for i, member in enumerate(g.group):
                start, stop = g.span(i)
                for peer in g.group:
                    if self.rank is None or self.rank in (member, peer):
                        out[(member, peer)] = out.get((member, peer), 0) + (stop - start) * g.itemsize
        return out

    def bytes_sent(self, rank: int) -> int:
        """Bytes ``rank`` sends to other ranks (local copies not counted)."""
        return sum(n for (s, d), n in self.bytes_between().items() if s == rank)

    def bytes_received(self, rank: int) -> int:
        """Bytes ``rank`` receives from other ranks (local copies not counted)."""
        return sum(n for (s, d), n in self.bytes_between().items() if d == rank)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Every rank that holds a source piece or fills a destination piece (in a rank's
        part: the participants)."""
        if self.rank is not None:
            return self.participants
        return tuple(sorted({p.rank for p in self.sources} | {p.rank for p in self.targets}))

    # ---------------------------------------------------------------- checks

    def problems(self, limit: int = 20) -> list[str]:
        """What is wrong with the plan (empty when it is sound): every destination element
        written exactly once, every box inside its piece, every source piece where the
        transfer says it is, the two boxes of a transfer the same size."""
        found: list[str] = []
        sources = {(p.rank, p.name): p for p in self.sources}
        targets = {(p.rank, p.name): p for p in self.targets}
        written: dict[tuple[int, str], list[Box]] = {key: [] for key in targets}
        mine = self.rank
        for t in self.transfers:
            if mine is not None and mine not in (t.src_rank, t.dst_rank):
                found.append(f"rank {mine}'s part of the plan lists a transfer between ranks {t.src_rank} and {t.dst_rank}")
                continue
            if mine is not None and t.dst_rank != mine:  # a send: its receiver checks the destination side
                src = sources.get((t.src_rank, t.src_name))
                if src is None:
                    found.append(f"rank {mine} sends {t.src_name!r}, which it does not hold")
                elif not _inside(t.src_box, src.shape):
                    found.append(f"source box {t.src_box} of {t.src_name!r} on rank {mine} is outside its shape {src.shape}")
                continue
            src = sources.get((t.src_rank, t.src_name)) if mine is None or t.src_rank == mine else Piece(t.src_rank, t.src_name, tuple(b for _, b in t.src_box), t.itemsize)
            dst = targets.get((t.dst_rank, t.dst_name))
            if src is None:
                found.append(f"transfer into {t.dst_name!r} on rank {t.dst_rank} reads {t.src_name!r} on rank {t.src_rank}, which does not hold it")
            elif not _inside(t.src_box, src.shape):
                found.append(f"source box {t.src_box} of {t.src_name!r} on rank {t.src_rank} is outside its shape {src.shape}")
            if dst is None:
                found.append(f"transfer writes {t.dst_name!r} on rank {t.dst_rank}, which is not a destination tensor there")
                continue
            if not _inside(t.dst_box, dst.shape):
                found.append(f"destination box {t.dst_box} of {t.dst_name!r} on rank {t.dst_rank} is outside its shape {dst.shape}")
                continue
            if _volume(t.src_box) != _volume(t.dst_box) or (
                len(t.src_box) == len(t.dst_box) and _extents(t.src_box) != _extents(t.dst_box)
            ):
                found.append(f"transfer {t.src_name!r} rank {t.src_rank} -> {t.dst_name!r} rank {t.dst_rank}: box {t.src_box} and box {t.dst_box} differ in size")
            if t.cast:
                if dst.dtype and t.cast != dst.dtype:
                    found.append(f"{t.dst_name!r} on rank {t.dst_rank}: cast to {t.cast}, but the destination is {dst.dtype}")
                if t.itemsize != dst.itemsize:
                    found.append(f"{t.dst_name!r} on rank {t.dst_rank}: {t.itemsize}-byte elements on the wire into {dst.itemsize}-byte destination elements")
            elif src is not None and src.itemsize != dst.itemsize:
                found.append(f"{t.dst_name!r}: {src.itemsize}-byte source elements into {dst.itemsize}-byte destination elements")
            written[(t.dst_rank, t.dst_name)].append(t.dst_box)
        for g in self.gathers:
            for rank in g.group if mine is None else (mine,):
                key = (rank, g.name)
                shape = targets[key].shape if key in targets else ()
                row = math.prod(shape[1:])
                spans = [g.span(i) for i in range(len(g.group)) if g.span(i)[1] > g.span(i)[0]]
                if key not in written or math.prod(shape) != g.numel or not shape or any(a % row or b % row for a, b in spans):
                    found.append(f"gather of {g.name!r} over {g.group[:8]} writes rank {rank}, which does not hold it whole "
                                 "as a destination (in whole rows of its first dimension)")
                    continue
                mine_span = g.span(g.group.index(rank)) if g.relay else None  # received point-to-point: not the gather's
                written[key] += [((a // row, b // row), *((0, n) for n in shape[1:])) for a, b in spans if (a, b) != mine_span]
        for (rank, name), boxes in written.items():
            piece = targets[(rank, name)]
            total = sum(_volume(b) for b in boxes)
            overlap = _first_overlap(boxes)
            if overlap:
                found.append(f"destination {name!r} on rank {rank}: boxes {overlap[0]} and {overlap[1]} both write the same elements")
            elif total != math.prod(piece.shape):
                missing = (math.prod(piece.shape) - total) * piece.itemsize
                found.append(f"destination {name!r} on rank {rank}: {missing} of {piece.nbytes} bytes never written")
            if len(found) >= limit:
                break
        return found[:limit]

    def check(self) -> ReshardPlan:
        """Raise :class:`~scoped_parallel.errors.ReshardError` listing the problems, or return the plan."""
        problems = self.problems()
        if problems:
            raise ReshardError(
                f"the {self.backend} reshard plan failed its checks ({len(problems)} shown):\n  "
                + "\n  ".join(problems)
                + "\nNothing was moved. A wrong state for a model (src_state/dst_state must be the "
                "states the models were built in) is the usual cause."
            )
        return self

    # ---------------------------------------------------------------- report

    def report(self) -> str:
        """What will move, before it moves: bytes per rank pair, per-rank totals and staging."""
        pairs = self.bytes_between()
        total_remote = sum(pairs.values())
        local = sum(t.nbytes for t in self.transfers if t.local)
        filled = sum(p.nbytes for p in self.targets)
        scope = "" if self.rank is None else f" rank {self.rank}'s part of {len(self.participants)} ranks"
        gathers = f", {len(self.gathers)} all-gathers" if self.gathers else ""
        lines = [
            f"reshard plan ({self.backend}){scope}: {len(self.transfers)} transfers{gathers}, "
            f"{total_remote} bytes between ranks, {local} bytes copied locally, "
            f"{filled} destination bytes on {len({p.rank for p in self.targets})} ranks",
            "coverage: " + ("every destination element written exactly once" if not self.problems() else "FAILED: " + "; ".join(self.problems(3))),
            "rank   sends B    receives B   local B     staging peak B",
        ]
        for rank in (self.ranks if self.rank is None else (self.rank,)):
            own_local = sum(t.nbytes for t in self.transfers if t.local and t.dst_rank == rank)
            lines.append(
                f"{rank:<6} {self.bytes_sent(rank):<10} {self.bytes_received(rank):<12} {own_local:<11} {self.staging.get(rank, 0)}"
            )
        if pairs:
            lines.append("bytes by pair (src -> dst): " + ", ".join(f"{s}->{d}: {b}" for (s, d), b in pairs.items()))
        cast = [t for t in self.transfers if t.cast]
        cast_gathers = {g.name for g in self.gathers if g.cast}
        if cast or cast_gathers:
            held = {(p.rank, p.name): p for p in self.sources}
            source_itemsize = {p.name: p.itemsize for p in self.sources}
            wire = sum(t.nbytes for t in cast if not t.local)
            uncast = sum(_volume(t.dst_box) * held[(t.src_rank, t.src_name)].itemsize for t in cast
                         if not t.local and (t.src_rank, t.src_name) in held)
            for g in self.gathers:
                if g.cast:
                    moved = sum(n for (m, p), n in self._gathered_pairs([g]).items() if m != p)
                    wire += moved
                    uncast += moved // g.itemsize * source_itemsize.get(g.name, g.itemsize)
            names = {t.dst_name for t in cast} | cast_gathers
            targets = {t.cast for t in cast} | {g.cast for g in self.gathers if g.cast}
            lines.append(
                f"casts on the sending side: {len(names)} tensors to {', '.join(sorted(targets))}; "
                f"{wire} bytes between ranks for them ({uncast} uncast)"
            )
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


# ---------------------------------------------------------------------- flat partitions


def plan_flat(
    backend: str,
    sources: Iterable[tuple[int, str, int, int, int]],
    targets: Iterable[tuple[int, str, int, int, int]],
    casts: Mapping[str, str] | None = None,
) -> ReshardPlan:
    """Transfers between flat partitions of the same tensors (ZeRO-3 shards, full replicas).

    ``sources`` and ``targets`` are ``(rank, name, start, stop, itemsize)``: rank holds (or
    must fill) elements ``[start, stop)`` of the flattened tensor ``name``. Each needed
    element comes from the destination rank itself where it holds it, else from the holder
    that has been given the fewest bytes to send so far (ties: the nearest rank after the
    destination), so replicas share the sending. ``casts`` (name -> wire dtype, from
    :func:`resolve_casts`) marks the transfers the sender converts: their ``itemsize`` is the
    destination's, the bytes that travel. Raises :class:`~scoped_parallel.errors.ReshardError` naming the
    tensor and the elements that no source holds.

    >>> plan = plan_flat("flat", [(0, "w", 0, 4, 4), (1, "w", 4, 8, 4)], [(r, "w", 0, 8, 4) for r in (0, 1)])
    >>> [(t.src_rank, t.dst_rank, t.src_box, t.dst_box) for t in plan.transfers]
    [(0, 0, ((0, 4),), ((0, 4),)), (1, 0, ((0, 4),), ((4, 8),)), (0, 1, ((0, 4),), ((0, 4),)), (1, 1, ((0, 4),), ((4, 8),))]
    """
    sources = sorted(sources)
    targets = sorted(targets, key=lambda t: (t[1], t[0], t[2]))
    world = max([s[0] for s in sources] + [t[0] for t in targets], default=0) + 1
    # per tensor: the cut points of every source piece, and who holds each elementary segment
    cuts: dict[str, list[int]] = {}
    holders: dict[str, list[dict[int, int]]] = {}  # segment index -> {rank: its piece's start}
    by_name: dict[str, list[tuple[int, int, int]]] = {}
    for rank, name, start, stop, _ in sources:
        if stop > start:
            by_name.setdefault(name, []).append((start, stop, rank))
    for name, pieces in by_name.items():
        points = sorted({p for a, b, _ in pieces for p in (a, b)})
        cuts[name], holders[name] = points, [{} for _ in points[:-1]]
        for a, b, rank in pieces:
            for i in range(bisect.bisect_left(points, a), bisect.bisect_left(points, b)):
                holders[name][i].setdefault(rank, a)
    load: dict[int, int] = {}
    transfers: list[Transfer] = []
    for dst_rank, name, start, stop, itemsize in targets:
        points, held = cuts.get(name, []), holders.get(name, [])
        first = max(bisect.bisect_right(points, start) - 1, 0)
        bounds = sorted({start, stop} | {p for p in points if start < p < stop})
        runs: list[list[int]] = []  # [src_rank, src_piece_start, seg_start, seg_stop]
        index = first
        for a, b in zip(bounds, bounds[1:]):
            while index + 1 < len(points) and points[index + 1] <= a:
                index += 1
            inside = index + 1 < len(points) and points[index] <= a and b <= points[index + 1]
            who = held[index] if inside else {}
            if not who:
                raise ReshardError(
                    f"{name!r}: elements [{a}, {b}) needed on rank {dst_rank} are held by no source rank "
                    "(the source and destination models differ in this tensor's size)"
                )
            if dst_rank in who:
                rank = dst_rank
            else:
                rank = min(who, key=lambda h: (load.get(h, 0), (h - dst_rank) % world))
                load[rank] = load.get(rank, 0) + (b - a) * itemsize
            piece_start = who[rank]
            if runs and runs[-1][0] == rank and runs[-1][1] == piece_start and runs[-1][3] == a:
                runs[-1][3] = b
            else:
                runs.append([rank, piece_start, a, b])
        for rank, piece_start, a, b in runs:
            transfers.append(Transfer(rank, dst_rank, name, name, ((a - piece_start, b - piece_start),), ((a - start, b - start),), itemsize,
                                      (casts or {}).get(name, "")))
    src_pieces = tuple(Piece(r, n, (b - a,), i) for r, n, a, b, i in sources)
    dst_pieces = tuple(Piece(r, n, (b - a,), i) for r, n, a, b, i in targets)
    return ReshardPlan(backend, tuple(transfers), src_pieces, dst_pieces)
