"""A model held by the pipeline stages and expert slots of a layout, described compactly (no torch).

A Megatron-style model lives on a :class:`~scoped_parallel.ParallelLayout` so that
every rank of one pipeline stage holds that stage's tensors, an expert's tensors only on
the ranks of its expert-parallel slot, and each tensor whole or split over the rank's TP
(or expert-TP) group. So one description per (stage, expert slot) says who holds what:

* :class:`TensorRow`: one tensor as its holders describe it (canonical name, global shape,
  dtype, how it is split; the expert slot);
* :class:`StageCopies`: one layout's copies of a tensor (the TP groups, expert-TP groups or
  single ranks of the stages and slot holding it), derived from the layout alone, and the
  *leads* (one rank per stage and expert slot) whose descriptions cover the whole model;
* :func:`merge` joins the leads' rows into one :class:`Held` per tensor (the row and the
  stages holding it), :func:`own_problems` says where a rank's own tensors differ from it,
  and :func:`tiled_tensors` turns two sides into the
  :class:`~scoped_parallel.resharding.tiled.TiledTensor` s that
  :func:`~scoped_parallel.resharding.tiled.plan_tiled_local` plans.

Worked example: TP=2 x PP=2 on 4 ranks; the first stage's lead (rank 0) describes a
column-parallel weight, the second stage's (rank 2) a LayerNorm weight::

    >>> from scoped_parallel.layout import ParallelLayout
    >>> copies = StageCopies(ParallelLayout(world_size=4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    >>> copies.leads
    (0, 2)
    >>> fc1 = TensorRow("layers.0.fc1.weight", (8, 4), "torch.float32", 4, "tp", 0, 1, 2, -1)
    >>> norm = TensorRow("layers.1.norm.weight", (4,), "torch.float32", 4, WHOLE, None, 1, 1, -1)
    >>> held = merge([[fc1], [norm]], copies, "source", problems := [])
    >>> held["layers.0.fc1.weight"].key(), copies[held["layers.0.fc1.weight"].key()]
    ('tp:0:-1', ((0, 1),))
    >>> copies[held["layers.1.norm.weight"].key()], problems
    (((2,), (3,)), [])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from scoped_parallel.resharding.tiled import Split, TiledTensor

__all__ = ["WHOLE", "Held", "StageCopies", "TensorRow", "merge", "own_problems", "tiled_tensors"]

#: the kind of a tensor every holder has whole
WHOLE = "whole"


@dataclass(frozen=True)
class TensorRow:
    """One tensor as its holders describe it (the same on each of them).

    ``name``: canonical (global layer and expert numbers). ``shape``: global. ``kind``: the
    kind of the layout's groups that split it (``"tp"``, ``"etp"`` for an expert tensor) or
    :data:`WHOLE` (every holder has all of it); ``dim``, ``stride``, ``ways``: the split
    (``ways`` ranks along ``dim``, Megatron's ``partition_stride``). ``slot``: the
    expert-parallel rank holding it (-1: not an expert tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    kind: str
    dim: int | None
    stride: int
    ways: int
    slot: int

    def split(self) -> Split:
        """How each holder's piece cuts the global tensor."""
        if self.kind == WHOLE or self.dim is None:
            return Split()
        return Split(self.dim, self.shape[self.dim] // (self.ways * self.stride), self.stride)

    def text(self) -> str:
        """The row for an error message."""
        split = f"split {self.ways} ways on dim {self.dim} (stride {self.stride})" if self.kind != WHOLE else "whole"
        return f"{self.shape} {self.dtype} {split}" + (f" on expert slot {self.slot}" if self.slot >= 0 else "")


@dataclass(frozen=True)
class Held:
    """A tensor of one side, merged from its leads' rows: the row, the pipeline stages
    holding it and the first lead that described it."""

    row: TensorRow
    stages: tuple[int, ...]
    first: int

    def key(self) -> str:
        """Which copies hold it (the key of :class:`StageCopies`): kind, stages, expert slot."""
        return f"{self.row.kind}:{','.join(map(str, self.stages))}:{self.row.slot}"


class StageCopies(dict):  # type: ignore[type-arg]
    """One layout's copies per :meth:`Held.key`, derived from the layout alone on first use:
    the groups of the key's kind, or every rank (:data:`WHOLE`), of the stages and expert
    slot the key names. Also each rank's stage and expert slot, and the :attr:`leads`."""

    def __init__(self, layout: Any) -> None:
        super().__init__()
        self.layout = layout
        coords = [layout.coordinates(r) for r in layout.ranks]
        #: per rank, its pipeline stage and its expert-parallel slot
        self.stage = {r: c["pp"] for r, c in zip(layout.ranks, coords)}
        self.slot = {r: c["ep"] for r, c in zip(layout.ranks, coords)}
        #: the ranks that describe the model: one per (stage, expert slot) (expert-TP and
        #: expert-DP rank 0), each holding every tensor of its stage and slot
        self.leads = tuple(r for r, c in zip(layout.ranks, coords) if c["etp"] == 0 and c["edp"] == 0)
        self._groups: dict[str, tuple[tuple[int, ...], ...]] = {}

    def __missing__(self, key: str) -> tuple[tuple[int, ...], ...]:
        kind, stage_text, slot_text = key.split(":")
        stages, slot = {int(x) for x in stage_text.split(",")}, int(slot_text)

        def holds(rank: int) -> bool:
            return self.stage[rank] in stages and (slot < 0 or self.slot[rank] == slot)

        if kind == WHOLE:
            found = tuple((r,) for r in self.layout.ranks if holds(r))
        else:
            if kind not in self._groups:
                self._groups[kind] = self.layout.groups(kind)
            found = tuple(g for g in self._groups[kind] if holds(g[0]))
        self[key] = found
        return found


def merge(described: Sequence[Sequence[TensorRow] | None], copies: StageCopies, role: str,
          problems: list[str]) -> dict[str, Held]:
    """One side's tensors from its leads' rows (``described[i]``: lead ``copies.leads[i]``'s;
    None where it described nothing): per name its row, which every lead holding it must
    describe alike (else a line in ``problems``), and the stages holding it."""
    rows: dict[str, TensorRow] = {}
    stages: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    for lead, lead_rows in zip(copies.leads, described):
        for row in lead_rows or ():
            seen = rows.setdefault(row.name, row)
            if seen != row:
                problems.append(f"{role} {row.name!r} is {seen.text()} on rank {first[row.name]} but {row.text()} on rank {lead}")
                continue
            first.setdefault(row.name, lead)
            stages.setdefault(row.name, set()).add(copies.stage[lead])
    return {name: Held(row, tuple(sorted(stages[name])), first[name]) for name, row in rows.items()}


def own_problems(rank: int, mine: Sequence[TensorRow], merged: Mapping[str, Held], copies: StageCopies, role: str) -> list[str]:
    """How ``rank``'s own tensors differ from the merged description of its side: each must be
    described alike and held on its stage, and it must hold every tensor of its stage and
    expert slot (the layout's promise that the copies are derived from)."""
    stage, slot = copies.stage[rank], copies.slot[rank]
    out = []
    names = set()
    for row in mine:
        names.add(row.name)
        held = merged.get(row.name)
        if held is None or held.row != row or stage not in held.stages:
            there = "absent" if held is None else f"{held.row.text()} on stages {list(held.stages)}"
            out.append(f"{role} {row.name!r} is {row.text()} on stage {stage} here, but {there} on the stage leads")
    missing = sorted(n for n, h in merged.items() if stage in h.stages and h.row.slot in (-1, slot) and n not in names)
    if missing:
        out.append(f"{role} tensors {missing[:3]} (of {len(missing)}) are held by this stage's lead but not here")
    return out


def tiled_tensors(src: Mapping[str, Held], dst: Mapping[str, Held], casts: Mapping[str, str] | None = None) -> list[TiledTensor]:
    """Every destination tensor as the planner sees it, in name order (the same on every
    rank): the destination's shape and element, both sides' splits and copy keys, the cast
    where ``casts`` names one. Every destination name must be in ``src`` (checked before)."""
    casts = casts or {}
    out = []
    for name in sorted(dst):
        s, d = src[name], dst[name]
        out.append(TiledTensor(name, d.row.shape, d.row.itemsize, d.row.dtype, s.key(), s.row.split(),
                               d.key(), d.row.split(), casts.get(name, ""), s.row.itemsize))
    return out
