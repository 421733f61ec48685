"""Rank layout of a parallel configuration: pure integer math, no torch.

A :class:`ParallelLayout` describes how ``world_size`` consecutive ranks are
split into tensor (tp), context (cp), Ulysses sequence (sp), data (dp) and
pipeline (pp) parallel groups for dense layers, and into expert tensor (etp),
expert model (ep) and expert data (edp) parallel groups for expert layers.
The rank numbering follows Megatron-Core's ``RankGenerator`` so that the
groups listed here are exactly the groups Megatron would build for the same
sizes and ``order``.

The module imports only the standard library; it is safe to use before (or
without) ``torch.distributed``.
"""

from __future__ import annotations

import itertools
import operator
from functools import lru_cache
from typing import Any, Iterator

from scoped_parallel.errors import LayoutError, RankNotInLayoutError

__all__ = ["ParallelLayout", "DENSE_KINDS", "EXPERT_KINDS", "canonical_kind"]

#: Dense group kinds a state builds by default (canonical spelling).
DENSE_KINDS: tuple[str, ...] = (
    "tp",
    "pp",
    "dp",
    "cp",
    "sp",
    "tp-pp",
    "dp-cp",
    "sp-dp",
    "tp-dp",
    "tp-cp",
    "tp-dp-cp",
)
#: Expert group kinds a state builds by default (canonical spelling).
EXPERT_KINDS: tuple[str, ...] = ("ep", "etp", "edp", "etp-ep", "etp-ep-pp")
#: Megatron's word-embedding and position-embedding groups.
EMBEDDING_KINDS: tuple[str, ...] = ("embd", "pos-embd")

_DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# Tokens that may appear in ``order``.
_ORDER_TOKENS = ("tp", "cp", "ep", "dp", "pp", "sp")
# Megatron appends absent (size 1) tokens in this sequence.
_APPEND_SEQUENCE = ("tp", "pp", "dp", "ep", "cp")
# Canonical token sequence of dense and expert kinds.
_DENSE_KIND_TOKENS = ("tp", "sp", "dp", "cp", "pp")
_EXPERT_KIND_TOKENS = ("etp", "ep", "edp", "pp")
_EXPERT_ONLY_TOKENS = frozenset(("etp", "ep", "edp"))
_DENSE_ONLY_TOKENS = frozenset(("tp", "sp", "dp", "cp"))
# Kind token of the expert family -> order token of the expert generator.
_EXPERT_TOKEN_TO_ORDER = {"etp": "tp", "ep": "ep", "edp": "dp", "pp": "pp"}
# Keys of ``coordinates()``.
_DENSE_AXES = ("tp", "cp", "sp", "dp", "pp")
_EXPERT_AXES = ("etp", "ep", "edp")

_SIZE_PARAMS = (
    ("tensor_model_parallel_size", "tp"),
    ("pipeline_model_parallel_size", "pp"),
    ("context_parallel_size", "cp"),
    ("sequence_parallel_size", "sp"),
    ("expert_model_parallel_size", "ep"),
)

# Above this many ranks ``table()`` prints only the first few groups.
_TABLE_FULL_LIMIT = 4096
_TABLE_HEAD_GROUPS = 4
_TABLE_MAX_MEMBERS = 16


def _valid_kinds_text() -> str:
    return (
        "valid kinds are any '-'-joined set of the dense tokens tp, sp, dp, cp, pp; "
        "any '-'-joined set of the expert tokens etp, ep, edp (optionally with pp); "
        "or 'embd' / 'pos-embd' (standard kinds: "
        + ", ".join(DENSE_KINDS + EXPERT_KINDS + EMBEDDING_KINDS)
        + ")"
    )


@lru_cache(maxsize=256)
def _parse_kind(kind: str) -> tuple[str, str, tuple[str, ...]]:
    """Return (canonical kind, family, kind tokens) for a lower-case kind string.

    family is "dense", "expert", "embd" or "pos-embd".
    """
    if kind in EMBEDDING_KINDS:
        return kind, kind, ()
    tokens = kind.split("-")
    valid = set(_DENSE_KIND_TOKENS) | _EXPERT_ONLY_TOKENS
    for token in tokens:
        if token not in valid:
            shown = repr(token) if token else "an empty token"
            raise LayoutError(f"kind {kind!r} has {shown}; {_valid_kinds_text()}")
    if len(set(tokens)) != len(tokens):
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        raise LayoutError(
            f"kind {kind!r} repeats {', '.join(repr(t) for t in dup)}; "
            f"name each token once; {_valid_kinds_text()}"
        )
    token_set = set(tokens)
    expert = token_set & _EXPERT_ONLY_TOKENS
    dense = token_set & _DENSE_ONLY_TOKENS
    if expert and dense:
        raise LayoutError(
            f"kind {kind!r} mixes dense tokens ({', '.join(sorted(dense))}) with expert "
            f"tokens ({', '.join(sorted(expert))}); dense and expert groups come from "
            f"different rank generators, so ask for them separately; {_valid_kinds_text()}"
        )
    if expert:
        ordered = tuple(t for t in _EXPERT_KIND_TOKENS if t in token_set)
        return "-".join(ordered), "expert", ordered
    ordered = tuple(t for t in _DENSE_KIND_TOKENS if t in token_set)
    return "-".join(ordered), "dense", ordered


def canonical_kind(kind: str) -> str:
    """Return the canonical spelling of a group kind.

    Dense tokens are put in the order tp, sp, dp, cp, pp; expert tokens in the
    order etp, ep, edp, pp.  Matching is case-insensitive.

    >>> canonical_kind("pp-tp")
    'tp-pp'
    >>> canonical_kind("cp-dp-tp")
    'tp-dp-cp'
    >>> canonical_kind("pp-ep-etp")
    'etp-ep-pp'
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str such as 'tp' or 'dp-cp', got {kind!r}")
    return _parse_kind(kind.lower())[0]


def _as_int(name: str, value: Any) -> int:
    """Return ``value`` as a plain int, or raise TypeError naming ``name``."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}"
        ) from None


def _prefix_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for size in sizes:
        strides.append(acc)
        acc *= size
    return tuple(strides)


def _offsets(sizes: tuple[int, ...], strides: tuple[int, ...], axes: tuple[int, ...]) -> list[int]:
    """Linear offsets of all coordinate combinations over ``axes``, first axis fastest."""
    offsets = [0]
    for axis in axes:
        stride = strides[axis]
        offsets = [o + c * stride for c in range(sizes[axis]) for o in offsets]
    return offsets


def _normalise_order(order: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (given tokens, full tokens) of an order string, lower-cased."""
    if not isinstance(order, str):
        raise TypeError(f"order must be a str such as {_DEFAULT_ORDER!r}, got {order!r}")
    given = tuple(order.lower().split("-"))
    valid = ", ".join(_ORDER_TOKENS)
    for token in given:
        if token not in _ORDER_TOKENS:
            shown = repr(token) if token else "an empty token"
            raise LayoutError(
                f"order {order!r} has {shown}; order is '-'-separated tokens from "
                f"{valid} (for example {_DEFAULT_ORDER!r})"
            )
    if len(set(given)) != len(given):
        dup = sorted({t for t in given if given.count(t) > 1})
        raise LayoutError(
            f"order {order!r} repeats {', '.join(repr(t) for t in dup)}; name each of "
            f"{valid} at most once"
        )
    full = list(given)
    for token in _APPEND_SEQUENCE:
        if token not in full:
            full.append(token)
    if "sp" not in full:
        full.insert(full.index("dp"), "sp")
    return given, tuple(full)


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
        "_tp",
        "_pp",
        "_cp",
        "_sp",
        "_ep",
        "_etp",
        "_dp",
        "_edp",
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
        self,
        world_size: int,
        *,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        sequence_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        expert_tensor_parallel_size: int | None = None,
        order: str = _DEFAULT_ORDER,
        rank_offset: int = 0,
    ) -> None:
        values = {
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
            "context_parallel_size": context_parallel_size,
            "sequence_parallel_size": sequence_parallel_size,
            "expert_model_parallel_size": expert_model_parallel_size,
        }
        ws = _as_int("world_size", world_size)
        sizes = {short: _as_int(name, values[name]) for name, short in _SIZE_PARAMS}
        if expert_tensor_parallel_size is None:
            etp_given = None
        else:
            etp_given = _as_int("expert_tensor_parallel_size", expert_tensor_parallel_size)
        offset = _as_int("rank_offset", rank_offset)

        if ws < 1:
            raise LayoutError(f"world_size must be >= 1, got {ws}; pass the number of ranks")
        for name, short in _SIZE_PARAMS:
            if sizes[short] < 1:
                raise LayoutError(
                    f"{name} must be >= 1, got {sizes[short]}; use 1 to switch "
                    f"{short} parallelism off"
                )
        if etp_given is not None and etp_given < 1:
            raise LayoutError(
                f"expert_tensor_parallel_size must be >= 1 or None, got {etp_given}; "
                "None means the same as tensor_model_parallel_size"
            )
        if offset < 0:
            raise LayoutError(
                f"rank_offset must be >= 0, got {offset}; it is the global rank of the "
                "layout's first rank"
            )

        given, tokens = _normalise_order(order)
        tp, pp, cp, sp, ep = sizes["tp"], sizes["pp"], sizes["cp"], sizes["sp"], sizes["ep"]
        etp = tp if etp_given is None else etp_given

        if sp > 1 and cp > 1:
            raise LayoutError(
                f"sequence_parallel_size {sp} and context_parallel_size {cp} are both > 1: "
                "Ulysses SP and context parallelism both split the sequence; use one "
                "(set the other to 1)"
            )
        if sp > 1 and ep > 1:
            raise LayoutError(
                f"sequence_parallel_size {sp} with expert_model_parallel_size {ep} is not "
                "supported: expert layers are not laid out over the Ulysses sequence split; "
                "set one of them to 1"
            )

        model = tp * cp * sp * pp
        if ws % model:
            raise LayoutError(
                f"world_size {ws} is not divisible by tp*cp*sp*pp = {tp}*{cp}*{sp}*{pp} = "
                f"{model}; choose sizes whose product divides world_size"
            )
        dp = ws // model
        expert_model = etp * ep * pp
        if ws % expert_model:
            raise LayoutError(
                f"world_size {ws} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = "
                f"{expert_model}; choose expert sizes whose product divides world_size"
            )
        edp = ws // expert_model

        order_text = "-".join(given)
        dense_by_token = {"tp": tp, "cp": cp, "sp": sp, "dp": dp, "pp": pp, "ep": 1}
        expert_by_token = {"tp": etp, "cp": 1, "sp": 1, "dp": edp, "pp": pp, "ep": ep}
        checks = (
            ("tp", "tp", tp),
            ("cp", "cp", cp),
            ("dp", "dp", dp),
            ("pp", "pp", pp),
            ("etp", "tp", etp),
            ("ep", "ep", ep),
            ("edp", "dp", edp),
        )
        for label, token, size in checks:
            if size > 1 and token not in given:
                what = f"{label} size is {size}"
                if label == "dp":
                    what += f" (world_size {ws} // (tp*cp*sp*pp = {model}))"
                elif label == "edp":
                    what += f" (world_size {ws} // (etp*ep*pp = {expert_model}))"
                elif label == "etp":
                    what += " (expert tensor parallel uses the 'tp' token)"
                raise LayoutError(
                    f"{what} but order {order_text!r} has no {token!r}; add {token!r} to "
                    f"order or make that size 1"
                )

        if not (given[-1] == "pp" or pp == 1 or edp == dp * sp):
            raise LayoutError(
                f"order {order_text!r} does not end with 'pp' and pipeline_model_parallel_size "
                f"is {pp}, so the expert and dense data parallel sizes must match: "
                f"edp = {ws}/(etp*ep*pp) = {ws}/({etp}*{ep}*{pp}) = {edp} but "
                f"dp*sp = {dp}*{sp} = {dp * sp}; put 'pp' last in order or choose "
                f"etp*ep == tp*cp*sp"
            )

        dense_sizes = tuple(dense_by_token[t] for t in tokens)
        expert_sizes = tuple(expert_by_token[t] for t in tokens)
        dense_strides = _prefix_strides(dense_sizes)
        expert_strides = _prefix_strides(expert_sizes)
        if pp > 1:
            at = tokens.index("pp")
            if dense_strides[at] != expert_strides[at]:
                before = tokens[:at]
                dense_terms = [t for t in before if dense_by_token[t] > 1]
                expert_terms = [t for t in before if expert_by_token[t] > 1]

                def _product(terms: list[str], by: dict[str, int], names: dict[str, str]) -> str:
                    if not terms:
                        return "nothing"
                    return (
                        "*".join(names.get(t, t) for t in terms)
                        + " = "
                        + "*".join(str(by[t]) for t in terms)
                    )

                expert_names = {"tp": "etp", "dp": "edp"}
                raise LayoutError(
                    f"pipeline groups of dense and expert layers differ: in order "
                    f"{'-'.join(tokens)!r} the sizes before 'pp' multiply to "
                    f"{dense_strides[at]} for dense layers "
                    f"({_product(dense_terms, dense_by_token, {})}) but to "
                    f"{expert_strides[at]} for expert layers "
                    f"({_product(expert_terms, expert_by_token, expert_names)}); put 'pp' "
                    "last in order or choose sizes whose products before 'pp' match"
                )

        setter = object.__setattr__
        setter(self, "_world_size", ws)
        setter(self, "_tp", tp)
        setter(self, "_pp", pp)
        setter(self, "_cp", cp)
        setter(self, "_sp", sp)
        setter(self, "_ep", ep)
        setter(self, "_etp", etp)
        setter(self, "_dp", dp)
        setter(self, "_edp", edp)
        setter(self, "_rank_offset", offset)
        setter(self, "_given_order", order_text)
        setter(self, "_tokens", tokens)
        setter(self, "_dense_sizes", dense_sizes)
        setter(self, "_dense_strides", dense_strides)
        setter(self, "_expert_sizes", expert_sizes)
        setter(self, "_expert_strides", expert_strides)
        setter(self, "_key", (ws, offset, tp, pp, cp, sp, ep, etp, "-".join(tokens)))

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
        parts = [f"world_size={self._world_size}"]
        for label, size in (
            ("tp", self._tp),
            ("pp", self._pp),
            ("cp", self._cp),
            ("sp", self._sp),
            ("dp", self._dp),
            ("ep", self._ep),
        ):
            if size != 1:
                parts.append(f"{label}={size}")
        if self._etp != self._tp:
            parts.append(f"etp={self._etp}")
        if self._rank_offset:
            parts.append(f"rank_offset={self._rank_offset}")
        if self._given_order != _DEFAULT_ORDER:
            parts.append(f"order={self._given_order!r}")
        return f"ParallelLayout({', '.join(parts)})"

    # ------------------------------------------------------------------ sizes

    @property
    def world_size(self) -> int:
        """Number of ranks in the layout."""
        return self._world_size

    @property
    def tensor_model_parallel_size(self) -> int:
        return self._tp

    @property
    def pipeline_model_parallel_size(self) -> int:
        return self._pp

    @property
    def context_parallel_size(self) -> int:
        return self._cp

    @property
    def sequence_parallel_size(self) -> int:
        """Ulysses sequence parallel size."""
        return self._sp

    @property
    def expert_model_parallel_size(self) -> int:
        return self._ep

    @property
    def expert_tensor_parallel_size(self) -> int:
        """Expert tensor parallel size (``tensor_model_parallel_size`` when not given)."""
        return self._etp

    @property
    def data_parallel_size(self) -> int:
        """Dense data parallel size: world_size / (tp*cp*sp*pp); excludes sp."""
        return self._dp

    @property
    def expert_data_parallel_size(self) -> int:
        """Expert data parallel size: world_size / (etp*ep*pp)."""
        return self._edp

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
        return {
            "tp": self._tp,
            "cp": self._cp,
            "sp": self._sp,
            "dp": self._dp,
            "pp": self._pp,
            "ep": self._ep,
            "etp": self._etp,
            "edp": self._edp,
        }

    def fingerprint(self) -> str:
        """A deterministic compact string of every defining field."""
        ws, off, tp, pp, cp, sp, ep, etp, order = self._key
        return (
            f"ws={ws},off={off},tp={tp},pp={pp},cp={cp},sp={sp},ep={ep},etp={etp},"
            f"order={order}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-ready dict; ``ParallelLayout(**d)`` rebuilds it."""
        return {
            "world_size": self._world_size,
            "tensor_model_parallel_size": self._tp,
            "pipeline_model_parallel_size": self._pp,
            "context_parallel_size": self._cp,
            "sequence_parallel_size": self._sp,
            "expert_model_parallel_size": self._ep,
            "expert_tensor_parallel_size": self._etp,
            "order": self._given_order,
            "rank_offset": self._rank_offset,
        }

    # ------------------------------------------------------------------ ranks

    def contains(self, rank: int) -> bool:
        """Whether the global ``rank`` belongs to this layout."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            return False
        return self._rank_offset <= rank < self._rank_offset + self._world_size

    def _local(self, rank: int) -> int:
        rank = _as_int("rank", rank)
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
        for axis in _DENSE_AXES:
            i = index[axis]
            coords[axis] = (local // self._dense_strides[i]) % self._dense_sizes[i]
        for axis in _EXPERT_AXES:
            i = index[_EXPERT_TOKEN_TO_ORDER[axis]]
            coords[axis] = (local // self._expert_strides[i]) % self._expert_sizes[i]
        return coords

    def rank_at(self, **coords: int) -> int:
        """Global rank at the given dense coordinates (tp, cp, sp, dp, pp; absent = 0)."""
        unknown = sorted(set(coords) - set(_DENSE_AXES))
        if unknown:
            raise TypeError(
                f"rank_at() got unknown axes {', '.join(unknown)}; use {', '.join(_DENSE_AXES)}"
            )
        local = 0
        for i, token in enumerate(self._tokens):
            if token not in coords:
                continue
            value = _as_int(token, coords[token])
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
            wanted = {_EXPERT_TOKEN_TO_ORDER[t] for t in kind_tokens}
            sizes, strides = self._expert_sizes, self._expert_strides
        masked = tuple(i for i, t in enumerate(self._tokens) if t in wanted)
        return sizes, strides, masked

    def _pp_first_last(self, local: int) -> tuple[int, int]:
        """First and last local rank of the pipeline group of ``local``."""
        i = self._tokens.index("pp")
        stride = self._dense_strides[i]
        first = local - ((local // stride) % self._pp) * stride
        return first, first + (self._pp - 1) * stride

    def _embedding_group(self, family: str, first: int, last: int) -> tuple[int, ...]:
        off = self._rank_offset
        if family == "pos-embd" or first == last:
            return (first + off,)
        return (first + off, last + off)

    def _iter_groups(self, kind: str) -> Iterator[tuple[int, ...]]:
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str such as 'tp' or 'dp-cp', got {kind!r}")
        _, family, kind_tokens = _parse_kind(kind.lower())
        off = self._rank_offset
        if family in EMBEDDING_KINDS:
            for first in self._iter_groups_bases("pp"):
                _, last = self._pp_first_last(first)
                yield self._embedding_group(family, first, last)
            return
        sizes, strides, masked = self._generator(family, kind_tokens)
        unmasked = tuple(i for i in range(len(sizes)) if i not in masked)
        offsets = _offsets(sizes, strides, masked)
        for base in self._iter_bases(sizes, strides, unmasked):
            start = base + off
            yield tuple(start + o for o in offsets)

    def _iter_groups_bases(self, kind: str) -> Iterator[int]:
        _, family, kind_tokens = _parse_kind(kind)
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
        _, family, kind_tokens = _parse_kind(kind.lower())
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
        start = base + self._rank_offset
        return tuple(start + o for o in _offsets(sizes, strides, masked))

    def groups_of(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The rank's group of every standard kind; embedding kinds only where it is a member."""
        local = self._local(rank)
        result: dict[str, tuple[int, ...]] = {}
        for kind in DENSE_KINDS + EXPERT_KINDS:
            _, family, kind_tokens = _parse_kind(kind)
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
        if max_groups is None:
            max_groups = (
                self._world_size if self._world_size <= _TABLE_FULL_LIMIT else _TABLE_HEAD_GROUPS
            )
        s = self.sizes()
        first = self._rank_offset
        lines = [
            repr(self),
            f"ranks {first}..{first + self._world_size - 1}, order {self.order}",
            "dense  " + " ".join(f"{k}={s[k]}" for k in ("tp", "cp", "sp", "dp", "pp")),
            "expert " + " ".join(f"{k}={s[k]}" for k in ("etp", "ep", "edp", "pp")),
        ]
        kinds = DENSE_KINDS + EXPERT_KINDS + EMBEDDING_KINDS
        width = max(len(k) for k in kinds)
        for kind in kinds:
            _, family, kind_tokens = _parse_kind(kind)
            if family in EMBEDDING_KINDS:
                count = self._world_size // self._pp
                size_text = "2" if (family == "embd" and self._pp > 1) else "1"
            else:
                sizes, _, masked = self._generator(family, kind_tokens)
                group_size = 1
                for i in masked:
                    group_size *= sizes[i]
                count = self._world_size // group_size
                size_text = str(group_size)
                if group_size == 1:
                    lines.append(f"{kind:<{width}}  {count} x 1  (every rank alone)")
                    continue
            shown = [
                self._render_group(g) for g in itertools.islice(self._iter_groups(kind), max_groups)
            ]
            more = f" ... (+{count - len(shown)} more)" if count > len(shown) else ""
            lines.append(f"{kind:<{width}}  {count} x {size_text}  {' '.join(shown)}{more}")
        return "\n".join(lines)

    @staticmethod
    def _render_group(group: tuple[int, ...]) -> str:
        if len(group) <= _TABLE_MAX_MEMBERS:
            return "(" + ",".join(str(r) for r in group) + ")"
        head = ",".join(str(r) for r in group[:3])
        return f"({head},...,{group[-1]})"
