"""Rank layout of a parallel configuration: pure integer math, no torch.

A :class:`ParallelLayout` describes how ``world_size`` consecutive ranks are
split into tensor (tp), context (cp), Ulysses sequence (sp), data (dp) and
pipeline (pp) parallel groups for dense layers, and into expert tensor (etp),
expert model (ep) and expert data (edp) parallel groups for expert layers.
The rank numbering follows Megatron-Core's ``RankGenerator`` so that the
groups listed here are exactly the groups Megatron would build for the same
sizes and ``order``.

The sizes a layout takes are listed once, in :mod:`scoped_parallel.layout.axes`; the
checks it runs before it exists live in :mod:`scoped_parallel.layout.checks`;
group kinds in :mod:`scoped_parallel.layout.kinds`. The module imports only the
standard library; it is safe to use before (or without) ``torch.distributed``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, Iterator

from scoped_parallel.layout.axes import (
    AXES,
    DENSE_AXES,
    EXPERT_AXES,
    EXPERT_TOKEN_TO_ORDER,
    REPR_SIZES,
    SIZE_ORDER,
)
from scoped_parallel.layout.checks import DEFAULT_ORDER, as_int, derive
from scoped_parallel.layout.kinds import (
    DENSE_KINDS,
    EMBEDDING_KINDS,
    EXPERT_KIND_TOKENS,
    EXPERT_KINDS,
    canonical_kind,
    parse_kind,
)
from scoped_parallel.errors import LayoutError, RankNotInLayoutError

__all__ = [
    "DENSE_AXES",
    "DENSE_KINDS",
    "EMBEDDING_KINDS",
    "EXPERT_KINDS",
    "ParallelLayout",
    "canonical_kind",
    "rank_span",
]


@functools.lru_cache(maxsize=4)
def rank_span(first: int, count: int) -> tuple[int, ...]:
    """``(first, ..., first + count - 1)``: one shared tuple per span.

    A span of a million ranks is a million int objects; the groups that cover a whole
    state (or the world) are built from this one tuple instead of anew each time.
    """
    return tuple(range(first, first + count))


def _offsets(
    sizes: tuple[int, ...], strides: tuple[int, ...], axes: tuple[int, ...], start: int = 0
) -> list[int]:
    """``start`` plus the linear offsets of all coordinate combinations over ``axes``, first axis fastest."""
    offsets = [start]
    for axis in axes:
        stride = strides[axis]
        offsets = [o + c * stride for c in range(sizes[axis]) for o in offsets]
    return offsets


def iter_masked_groups(
    sizes: tuple[int, ...], strides: tuple[int, ...], masked: tuple[int, ...], start: int = 0
) -> Iterator[tuple[int, ...]]:
    """The groups spanning the ``masked`` axes of a rank grid, in Megatron's order.

    ``sizes[i]``/``strides[i]``: axis ``i`` of the grid (the first axis varies fastest).
    Each group holds the ranks that differ only along the masked axes (the first masked
    axis fastest); groups come with the first unmasked axis fastest; ``start`` is added
    to every rank. With sizes (2, 2, 2) and strides (1, 2, 4) (tp-dp-pp on 8 ranks),
    masking axis 1 (dp) gives (0, 2), (1, 3), (4, 6), (5, 7).
    """
    unmasked = tuple(i for i in range(len(sizes)) if i not in masked)
    offsets = _offsets(sizes, strides, masked)
    for base in ParallelLayout._iter_bases(sizes, strides, unmasked):
        yield tuple(start + base + o for o in offsets)


def _rebuild(kwargs: dict[str, Any]) -> ParallelLayout:
    world_size = kwargs.pop("world_size")
    return ParallelLayout(world_size, **kwargs)


class ParallelLayout:
    """Ranks of one parallel configuration, split Megatron-style into groups.

    A rank's coordinates are the mixed-radix digits of ``rank - rank_offset``
    over the sizes listed in ``order``, the first token varying fastest.  A
    group of kind ``"tp-dp"`` holds the ranks that agree on every other
    coordinate.  Dense groups use the sizes tp, cp, sp, dp, pp; expert groups
    use etp (in the place of ``tp``), ep and edp (in the place of ``dp``) and
    the same pp.  ``data_parallel_size`` excludes ``sp``.

    Eight ranks, tensor parallel 2 and pipeline parallel 2, leave data
    parallel 2:

    >>> layout = ParallelLayout(8, tensor_model_parallel_size=2,
    ...                         pipeline_model_parallel_size=2)
    >>> layout
    ParallelLayout(world_size=8, tp=2, pp=2, dp=2)
    >>> layout.groups("tp")
    ((0, 1), (2, 3), (4, 5), (6, 7))
    >>> layout.groups("pp")
    ((0, 4), (1, 5), (2, 6), (3, 7))
    >>> layout.groups("dp")
    ((0, 2), (1, 3), (4, 6), (5, 7))
    >>> layout.group_of(5, "dp")
    (5, 7)
    >>> layout.coordinates(5)
    {'tp': 1, 'cp': 0, 'sp': 0, 'dp': 0, 'pp': 1, 'etp': 1, 'ep': 0, 'edp': 0}

    Layouts are immutable and compare by value:

    >>> layout == ParallelLayout(8, tensor_model_parallel_size=2,
    ...                          pipeline_model_parallel_size=2)
    True
    """

    __slots__ = (
        "_world_size",
        "_size",
        "_rank_offset",
        "_given_order",
        "_tokens",
        "_dense_sizes",
        "_dense_strides",
        "_expert_sizes",
        "_expert_strides",
        "_key",
    )

    def __init__(
        self, world_size: int, *, order: str = DEFAULT_ORDER, rank_offset: int = 0, **sizes: int | None
    ) -> None:
        d = derive(world_size, sizes, order, rank_offset)
        setter = object.__setattr__
        setter(self, "_world_size", d.world_size)
        setter(self, "_size", dict(d.size))
        setter(self, "_rank_offset", d.rank_offset)
        setter(self, "_given_order", d.given_order)
        setter(self, "_tokens", d.tokens)
        setter(self, "_dense_sizes", d.dense_sizes)
        setter(self, "_dense_strides", d.dense_strides)
        setter(self, "_expert_sizes", d.expert_sizes)
        setter(self, "_expert_strides", d.expert_strides)
        given = tuple(d.size[axis.token] for axis in AXES)
        setter(self, "_key", (d.world_size, d.rank_offset) + given + ("-".join(d.tokens),))

    # ------------------------------------------------------------------ value semantics

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ParallelLayout is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ParallelLayout is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParallelLayout):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.to_dict(),))

    def __repr__(self) -> str:
        size = self._size
        parts = [f"world_size={self._world_size}"]
        parts += [f"{token}={size[token]}" for token in REPR_SIZES if size[token] != 1]
        if size["etp"] != size["tp"]:
            parts.append(f"etp={size['etp']}")
        if self._rank_offset:
            parts.append(f"rank_offset={self._rank_offset}")
        if self._given_order != DEFAULT_ORDER:
            parts.append(f"order={self._given_order!r}")
        return f"ParallelLayout({', '.join(parts)})"

    # ------------------------------------------------------------------ sizes
    # One property per axis of scoped_parallel.layout.axes.AXES is added after the class.

    @property
    def world_size(self) -> int:
        """Number of ranks in the layout."""
        return self._world_size

    @property
    def data_parallel_size(self) -> int:
        """Dense data parallel size: world_size / (tp*cp*sp*pp); excludes sp."""
        return self._size["dp"]

    @property
    def expert_data_parallel_size(self) -> int:
        """Expert data parallel size: world_size / (etp*ep*pp)."""
        return self._size["edp"]

    @property
    def order(self) -> str:
        """The full normalised order, with the absent tokens filled in."""
        return "-".join(self._tokens)

    @property
    def rank_offset(self) -> int:
        """Global rank of the layout's first rank."""
        return self._rank_offset

    @property
    def ranks(self) -> range:
        """The global ranks of the layout."""
        return range(self._rank_offset, self._rank_offset + self._world_size)

    def sizes(self) -> dict[str, int]:
        """All sizes by short name: tp, cp, sp, dp, pp, ep, etp, edp."""
        return {token: self._size[token] for token in SIZE_ORDER}

    def fingerprint(self) -> str:
        """A deterministic compact string of every defining field."""
        ws, off = self._key[:2]
        given = ",".join(f"{axis.token}={self._size[axis.token]}" for axis in AXES)
        return f"ws={ws},off={off},{given},order={self.order}"

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-ready dict; ``ParallelLayout(**d)`` rebuilds it."""
        out: dict[str, Any] = {"world_size": self._world_size}
        out.update({axis.keyword: self._size[axis.token] for axis in AXES})
        out["order"] = self._given_order
        out["rank_offset"] = self._rank_offset
        return out

    # ------------------------------------------------------------------ ranks

    def contains(self, rank: int) -> bool:
        """Whether the global ``rank`` belongs to this layout."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            return False
        return self._rank_offset <= rank < self._rank_offset + self._world_size

    def _local(self, rank: int) -> int:
        rank = as_int("rank", rank)
        local = rank - self._rank_offset
        if not 0 <= local < self._world_size:
            first = self._rank_offset
            last = first + self._world_size - 1
            raise RankNotInLayoutError(
                f"rank {rank} is not in this layout, which covers ranks {first}..{last} "
                f"(world_size {self._world_size}, rank_offset {self._rank_offset}); pass "
                f"a rank in that range or use the layout that contains rank {rank}"
            )
        return local

    def coordinates(self, rank: int) -> dict[str, int]:
        """Coordinates of a global rank on the dense and expert axes."""
        local = self._local(rank)
        coords: dict[str, int] = {}
        index = {t: i for i, t in enumerate(self._tokens)}
        for axis in DENSE_AXES:
            i = index[axis]
            coords[axis] = (local // self._dense_strides[i]) % self._dense_sizes[i]
        for axis in EXPERT_AXES:
            i = index[EXPERT_TOKEN_TO_ORDER[axis]]
            coords[axis] = (local // self._expert_strides[i]) % self._expert_sizes[i]
        return coords

    def rank_at(self, **coords: int) -> int:
        """Global rank at the given dense coordinates (tp, cp, sp, dp, pp; absent = 0)."""
        unknown = sorted(set(coords) - set(DENSE_AXES))
        if unknown:
            raise TypeError(
                f"rank_at() got unknown axes {', '.join(unknown)}; use {', '.join(DENSE_AXES)}"
            )
        local = 0
        for i, token in enumerate(self._tokens):
            if token not in coords:
                continue
            value = as_int(token, coords[token])
            size = self._dense_sizes[i]
            if not 0 <= value < size:
                raise LayoutError(
                    f"{token} coordinate {value} is out of range: {token} size is {size}, "
                    f"so use 0..{size - 1}"
                )
            local += value * self._dense_strides[i]
        return local + self._rank_offset

    # ------------------------------------------------------------------ groups

    def _generator(self, family: str, kind_tokens: tuple[str, ...]):
        """Return (sizes, strides, masked axis positions) of a dense or expert kind."""
        if family == "dense":
            wanted = set(kind_tokens)
            sizes, strides = self._dense_sizes, self._dense_strides
        else:
            wanted = {EXPERT_TOKEN_TO_ORDER[t] for t in kind_tokens}
            sizes, strides = self._expert_sizes, self._expert_strides
        masked = tuple(i for i, t in enumerate(self._tokens) if t in wanted)
        return sizes, strides, masked

    def _pp_first_last(self, local: int) -> tuple[int, int]:
        """First and last local rank of the pipeline group of ``local``."""
        i = self._tokens.index("pp")
        stride = self._dense_strides[i]
        first = local - ((local // stride) % self._size["pp"]) * stride
        return first, first + (self._size["pp"] - 1) * stride

    def _embedding_group(self, family: str, first: int, last: int) -> tuple[int, ...]:
        off = self._rank_offset
        if family == "pos-embd" or first == last:
            return (first + off,)
        return (first + off, last + off)

    def _iter_groups(self, kind: str) -> Iterator[tuple[int, ...]]:
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str such as 'tp' or 'dp-cp', got {kind!r}")
        _, family, kind_tokens = parse_kind(kind.lower())
        off = self._rank_offset
        if family in EMBEDDING_KINDS:
            for first in self._iter_groups_bases("pp"):
                _, last = self._pp_first_last(first)
                yield self._embedding_group(family, first, last)
            return
        sizes, strides, masked = self._generator(family, kind_tokens)
        yield from iter_masked_groups(sizes, strides, masked, off)

    def _iter_groups_bases(self, kind: str) -> Iterator[int]:
        _, family, kind_tokens = parse_kind(kind)
        sizes, strides, masked = self._generator(family, kind_tokens)
        unmasked = tuple(i for i in range(len(sizes)) if i not in masked)
        return self._iter_bases(sizes, strides, unmasked)

    @staticmethod
    def _iter_bases(
        sizes: tuple[int, ...], strides: tuple[int, ...], axes: tuple[int, ...]
    ) -> Iterator[int]:
        """First local rank of each group, groups ordered with the first unmasked axis fastest."""
        ranges = [range(0, sizes[i] * strides[i], strides[i]) for i in reversed(axes)]
        for combo in itertools.product(*ranges):
            yield sum(combo)

    def groups(self, kind: str) -> tuple[tuple[int, ...], ...]:
        """All groups of ``kind``, in Megatron's ``RankGenerator.get_ranks`` order."""
        return tuple(self._iter_groups(kind))

    def group_of(self, rank: int, kind: str) -> tuple[int, ...]:
        """The group of ``kind`` that contains the global ``rank``.

        For "embd" and "pos-embd" a rank outside every embedding group gets ``()``.
        """
        local = self._local(rank)
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str such as 'tp' or 'dp-cp', got {kind!r}")
        _, family, kind_tokens = parse_kind(kind.lower())
        return self._group_of_local(local, family, kind_tokens)

    def _group_of_local(
        self, local: int, family: str, kind_tokens: tuple[str, ...]
    ) -> tuple[int, ...]:
        if family in EMBEDDING_KINDS:
            first, last = self._pp_first_last(local)
            group = self._embedding_group(family, first, last)
            return group if local + self._rank_offset in group else ()
        sizes, strides, masked = self._generator(family, kind_tokens)
        base = local
        for i in masked:
            base -= ((local // strides[i]) % sizes[i]) * strides[i]
        return tuple(_offsets(sizes, strides, masked, base + self._rank_offset))

    def groups_of(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The rank's group of every standard kind; embedding kinds only where it is a member."""
        local = self._local(rank)
        result: dict[str, tuple[int, ...]] = {}
        for kind in DENSE_KINDS + EXPERT_KINDS:
            _, family, kind_tokens = parse_kind(kind)
            result[kind] = self._group_of_local(local, family, kind_tokens)
        for kind in EMBEDDING_KINDS:
            group = self._group_of_local(local, kind, ())
            if group:
                result[kind] = group
        return result

    # ------------------------------------------------------------------ rendering

    def table(self, max_groups: int | None = None) -> str:
        """A readable multi-line rendering of the sizes and the groups of every kind.

        ``max_groups`` caps the groups shown per kind; by default all are shown
        up to 4096 ranks and the first few beyond.
        """
        return _layout_table(self, max_groups)

    def iter_groups(self, kind: str) -> Iterator[tuple[int, ...]]:
        """The groups of ``kind`` one at a time (what :meth:`groups` collects)."""
        return self._iter_groups(kind)


def _size_property(token: str, keyword: str, help_text: str) -> property:
    def getter(self: ParallelLayout) -> int:
        return self._size[token]  # type: ignore[no-any-return]

    getter.__name__ = keyword
    getter.__doc__ = f"The {help_text} (``{token}``)."
    return property(getter)


for _axis in AXES:
    setattr(ParallelLayout, _axis.keyword, _size_property(_axis.token, _axis.keyword, _axis.help))
del _axis

# The keyword form of the constructor, as introspection (help(), IDEs, Sphinx) shows it.
ParallelLayout.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("world_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int),
    ]
    + [
        inspect.Parameter(
            axis.keyword,
            inspect.Parameter.KEYWORD_ONLY,
            default=axis.default,
            annotation=int if axis.default is not None else "int | None",
        )
        for axis in AXES
    ]
    + [
        inspect.Parameter("order", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_ORDER, annotation=str),
        inspect.Parameter("rank_offset", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int),
    ],
    return_annotation=None,
)


# ---------------------------------------------------------------------- the table of one layout

# Above this many ranks ``layout_table()`` prints only the first few groups.
TABLE_FULL_LIMIT = 4096
TABLE_HEAD_GROUPS = 4
TABLE_MAX_MEMBERS = 16


def _layout_table(layout: ParallelLayout, max_groups: int | None = None) -> str:
    """:meth:`ParallelLayout.table` (see there)."""
    if max_groups is None:
        max_groups = (
            layout.world_size if layout.world_size <= TABLE_FULL_LIMIT else TABLE_HEAD_GROUPS
        )
    s = layout.sizes()
    first = layout.rank_offset
    lines = [
        repr(layout),
        f"ranks {first}..{first + layout.world_size - 1}, order {layout.order}",
        "dense  " + " ".join(f"{k}={s[k]}" for k in DENSE_AXES),
        "expert " + " ".join(f"{k}={s[k]}" for k in EXPERT_KIND_TOKENS),
    ]
    kinds = DENSE_KINDS + EXPERT_KINDS + EMBEDDING_KINDS
    width = max(len(k) for k in kinds)
    for kind in kinds:
        _, family, kind_tokens = parse_kind(kind)
        if family in EMBEDDING_KINDS:
            count = layout.world_size // layout.pipeline_model_parallel_size
            size_text = "2" if (family == "embd" and layout.pipeline_model_parallel_size > 1) else "1"
        else:
            sizes, _, masked = layout._generator(family, kind_tokens)
            group_size = 1
            for i in masked:
                group_size *= sizes[i]
            count = layout.world_size // group_size
            size_text = str(group_size)
            if group_size == 1:
                lines.append(f"{kind:<{width}}  {count} x 1  (every rank alone)")
                continue
        shown = [
            _render_group(g) for g in itertools.islice(layout.iter_groups(kind), max_groups)
        ]
        more = f" ... (+{count - len(shown)} more)" if count > len(shown) else ""
        lines.append(f"{kind:<{width}}  {count} x {size_text}  {' '.join(shown)}{more}")
    return "\n".join(lines)

def _render_group(group: tuple[int, ...]) -> str:
    if len(group) <= TABLE_MAX_MEMBERS:
        return "(" + ",".join(str(r) for r in group) + ")"
    head = ",".join(str(r) for r in group[:3])
    return f"({head},...,{group[-1]})"
