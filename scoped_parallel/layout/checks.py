"""The checks a :class:`~scoped_parallel.ParallelLayout` runs before it exists.

Each check is a named function that raises :class:`~scoped_parallel.errors.LayoutError` (or
``TypeError`` for a value of the wrong type) whose message names the values and
the fix. They run in the order ``derive`` calls them; a new rule is a new
function here and one line in ``derive``. Pure integer math, no torch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Mapping

from scoped_parallel.layout.axes import APPEND_SEQUENCE, AXES, DENSE_AXES, EXPERT_KIND_TOKENS, ORDER_TOKENS
from scoped_parallel.layout.kinds import token_problems
from scoped_parallel.errors import LayoutError

__all__ = ["DEFAULT_ORDER", "Derived", "as_int", "derive", "normalise_order"]

DEFAULT_ORDER = "tp-cp-ep-dp-pp"


def as_int(name: str, value: Any) -> int:
    """Return ``value`` as a plain int, or raise TypeError naming ``name``."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def normalise_order(order: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (given tokens, full tokens) of an order string, lower-cased.

    >>> normalise_order("tp-dp")[1]
    ('tp', 'sp', 'dp', 'pp', 'ep', 'cp')
    """
    if not isinstance(order, str):
        raise TypeError(f"order must be a str such as {DEFAULT_ORDER!r}, got {order!r}")
    given = tuple(order.lower().split("-"))
    valid = ", ".join(ORDER_TOKENS)
    bad, dup = token_problems(given, ORDER_TOKENS)
    if bad is not None:
        raise LayoutError(
            f"order {order!r} has {bad}; order is '-'-separated tokens from "
            f"{valid} (for example {DEFAULT_ORDER!r})"
        )
    if dup:
        raise LayoutError(
            f"order {order!r} repeats {', '.join(repr(t) for t in dup)}; name each of "
            f"{valid} at most once"
        )
    full = list(given)
    for token in APPEND_SEQUENCE:
        if token not in full:
            full.append(token)
    if "sp" not in full:
        full.insert(full.index("dp"), "sp")
    return given, tuple(full)


@dataclass(frozen=True)
class Derived:
    """Everything a layout is: the sizes by token (dp and edp derived) and the rank grids."""

    world_size: int
    rank_offset: int
    size: Mapping[str, int]  # tp, pp, cp, sp, ep, etp, dp, edp
    given_order: str
    tokens: tuple[str, ...]
    dense_sizes: tuple[int, ...]
    dense_strides: tuple[int, ...]
    expert_sizes: tuple[int, ...]
    expert_strides: tuple[int, ...]


def prefix_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Mixed-radix strides, first size fastest."""
    strides = []
    acc = 1
    for size in sizes:
        strides.append(acc)
        acc *= size
    return tuple(strides)


def derive(world_size: Any, sizes: Mapping[str, Any], order: Any, rank_offset: Any) -> Derived:
    """Run every check on the constructor's arguments and return the layout's fields.

    ``sizes`` maps size keywords (:data:`scoped_parallel.layout.axes.SIZE_KEYWORDS`) to values;
    absent keywords take their axis default.
    """
    ws, given_sizes, offset = _check_types(world_size, sizes, rank_offset)
    _check_positive(ws, given_sizes, offset)
    given, tokens = normalise_order(order)
    size = dict(given_sizes)
    if size["etp"] is None:
        size["etp"] = size["tp"]
    _check_one_sequence_split(size)
    size["dp"] = _check_divides(ws, size, tuple(t for t in DENSE_AXES if t != "dp"), "sizes")
    size["edp"] = _check_divides(ws, size, tuple(t for t in EXPERT_KIND_TOKENS if t != "edp"), "expert sizes")
    _check_order_names_every_split(ws, size, given)
    _check_pp_last_or_matching_data_parallel(ws, size, given)
    dense_by_token = {"tp": size["tp"], "cp": size["cp"], "sp": size["sp"], "dp": size["dp"], "pp": size["pp"], "ep": 1}
    expert_by_token = {"tp": size["etp"], "cp": 1, "sp": 1, "dp": size["edp"], "pp": size["pp"], "ep": size["ep"]}
    dense_sizes = tuple(dense_by_token[t] for t in tokens)
    expert_sizes = tuple(expert_by_token[t] for t in tokens)
    dense_strides, expert_strides = prefix_strides(dense_sizes), prefix_strides(expert_sizes)
    _check_pipeline_groups_agree(tokens, size["pp"], dense_by_token, expert_by_token, dense_strides, expert_strides)
    return Derived(
        ws, offset, size, "-".join(given), tokens, dense_sizes, dense_strides, expert_sizes, expert_strides
    )


def _check_types(world_size: Any, sizes: Mapping[str, Any], rank_offset: Any) -> tuple[int, dict[str, Any], int]:
    ws = as_int("world_size", world_size)
    unknown = sorted(set(sizes) - {axis.keyword for axis in AXES})
    if unknown:
        raise TypeError(
            f"unknown size keyword(s) {unknown}; the sizes are {[axis.keyword for axis in AXES]}"
        )
    out: dict[str, Any] = {}
    for axis in AXES:
        value = sizes.get(axis.keyword, axis.default)
        out[axis.token] = None if value is None else as_int(axis.keyword, value)
    return ws, out, as_int("rank_offset", rank_offset)


def _check_positive(world_size: int, size: Mapping[str, int | None], rank_offset: int) -> None:
    if world_size < 1:
        raise LayoutError(f"world_size must be >= 1, got {world_size}; pass the number of ranks")
    for axis in AXES:
        value = size[axis.token]
        if value is None:
            continue
        if value < 1:
            if axis.default is None:
                raise LayoutError(
                    f"{axis.keyword} must be >= 1 or None, got {value}; None means the same as "
                    "tensor_model_parallel_size"
                )
            raise LayoutError(
                f"{axis.keyword} must be >= 1, got {value}; use 1 to switch {axis.token} parallelism off"
            )
    if rank_offset < 0:
        raise LayoutError(
            f"rank_offset must be >= 0, got {rank_offset}; it is the global rank of the layout's first rank"
        )


def _check_one_sequence_split(size: Mapping[str, int]) -> None:
    sp, cp, ep = size["sp"], size["cp"], size["ep"]
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


def _check_divides(world_size: int, size: Mapping[str, int], tokens: tuple[str, ...], what: str) -> int:
    product = 1
    for token in tokens:
        product *= size[token]
    if world_size % product:
        names, values = "*".join(tokens), "*".join(str(size[t]) for t in tokens)
        raise LayoutError(
            f"world_size {world_size} is not divisible by {names} = {values} = {product}; "
            f"choose {what} whose product divides world_size"
        )
    return world_size // product


def _check_order_names_every_split(world_size: int, size: Mapping[str, int], given: tuple[str, ...]) -> None:
    order_text = "-".join(given)
    # (size label, order token that lays it out)
    for label, token in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("etp", "tp"), ("ep", "ep"), ("edp", "dp")):
        value = size[label]
        if value > 1 and token not in given:
            what = f"{label} size is {value}"
            if label == "dp":
                model = size["tp"] * size["cp"] * size["sp"] * size["pp"]
                what += f" (world_size {world_size} // (tp*cp*sp*pp = {model}))"
            elif label == "edp":
                what += f" (world_size {world_size} // (etp*ep*pp = {size['etp'] * size['ep'] * size['pp']}))"
            elif label == "etp":
                what += " (expert tensor parallel uses the 'tp' token)"
            raise LayoutError(
                f"{what} but order {order_text!r} has no {token!r}; add {token!r} to order or make that size 1"
            )


def _check_pp_last_or_matching_data_parallel(
    world_size: int, size: Mapping[str, int], given: tuple[str, ...]
) -> None:
    pp, dp, sp, edp = size["pp"], size["dp"], size["sp"], size["edp"]
    if given[-1] == "pp" or pp == 1 or edp == dp * sp:
        return
    etp, ep = size["etp"], size["ep"]
    raise LayoutError(
        f"order {'-'.join(given)!r} does not end with 'pp' and pipeline_model_parallel_size "
        f"is {pp}, so the expert and dense data parallel sizes must match: "
        f"edp = {world_size}/(etp*ep*pp) = {world_size}/({etp}*{ep}*{pp}) = {edp} but "
        f"dp*sp = {dp}*{sp} = {dp * sp}; put 'pp' last in order or choose etp*ep == tp*cp*sp"
    )


def _check_pipeline_groups_agree(
    tokens: tuple[str, ...],
    pp: int,
    dense_by_token: Mapping[str, int],
    expert_by_token: Mapping[str, int],
    dense_strides: tuple[int, ...],
    expert_strides: tuple[int, ...],
) -> None:
    if pp == 1:
        return
    at = tokens.index("pp")
    if dense_strides[at] == expert_strides[at]:
        return
    before = tokens[:at]

    def product(by: Mapping[str, int], names: Mapping[str, str]) -> str:
        terms = [t for t in before if by[t] > 1]
        if not terms:
            return "nothing"
        return "*".join(names.get(t, t) for t in terms) + " = " + "*".join(str(by[t]) for t in terms)

    raise LayoutError(
        f"pipeline groups of dense and expert layers differ: in order "
        f"{'-'.join(tokens)!r} the sizes before 'pp' multiply to "
        f"{dense_strides[at]} for dense layers ({product(dense_by_token, {})}) but to "
        f"{expert_strides[at]} for expert layers ({product(expert_by_token, {'tp': 'etp', 'dp': 'edp'})}); "
        "put 'pp' last in order or choose sizes whose products before 'pp' match"
    )
