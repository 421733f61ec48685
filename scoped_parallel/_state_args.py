"""Arguments of ``ParallelState``: checked and normalised before any communication.

The state's constructor calls these in order: :func:`check_world` (torch.distributed
is up), :func:`layout_in_world` (the layout, given
or built from the keyword form, fits the world), :func:`per_kind` (per-kind backends
and options under canonical kinds). :func:`keyword_signature` spells the keyword
form out for ``help()`` and IDEs, from the axis table.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from scoped_parallel._axes import AXES
from scoped_parallel._kinds import normalise_kind
from scoped_parallel._layout_checks import DEFAULT_ORDER, as_int
from scoped_parallel.errors import DistributedNotInitializedError, LayoutError
from scoped_parallel.layout import ParallelLayout

__all__ = ["check_world", "derived_rank_sets", "keyword_signature", "layout_in_world", "per_kind"]


def per_kind(mapping: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping from group kind to value, got {mapping!r}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            out[normalise_kind(key)] = value
        except LayoutError as err:
            raise LayoutError(f"{what}: {err}") from None
    return out


def check_world() -> int:
    """The world size; raises when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedNotInitializedError(
            "ParallelState needs torch.distributed to be initialized first: call "
            "torch.distributed.init_process_group(...) (or deepspeed.init_distributed()) "
            "before building a state."
        )
    return dist.get_world_size()


def layout_in_world(
    layout: ParallelLayout | None, name: str | None, world: int, keywords: dict[str, Any]
) -> ParallelLayout:
    """The state's layout: given, or built from the keyword form on the rest of the world."""
    if layout is not None:
        if not isinstance(layout, ParallelLayout):
            raise TypeError(f"layout must be a ParallelLayout, got {layout!r}")
        if keywords:
            raise TypeError(
                f"ParallelState got a layout and also {sorted(keywords)}; the layout already fixes "
                "the sizes, order, world_size and rank_offset: pass one or the other"
            )
        rank_offset, world_size = layout.rank_offset, layout.world_size
    else:
        rank_offset = as_int("rank_offset", keywords.pop("rank_offset", 0))
        world_size = keywords.pop("world_size", None)
        world_size = world - rank_offset if world_size is None else as_int("world_size", world_size)
    if rank_offset >= world or rank_offset + world_size > world:
        raise LayoutError(
            f"ParallelState {name!r} spans ranks {rank_offset}..{rank_offset + world_size - 1} "
            f"(rank_offset={rank_offset}, world_size={world_size}) but the process world has "
            f"{world} ranks (0..{world - 1}); lower world_size or rank_offset."
        )
    if layout is None:
        layout = ParallelLayout(world_size, rank_offset=rank_offset, **keywords)
    return layout


def keyword_signature(init: Any) -> inspect.Signature:
    """``ParallelState.__init__`` as introspection shows it: the layout keywords spelled out."""
    base = inspect.signature(init)
    params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    P = inspect.Parameter
    params += [
        P(axis.keyword, P.KEYWORD_ONLY, default=axis.default, annotation="int | None" if axis.default is None else "int")
        for axis in AXES
    ]
    params += [
        P("order", P.KEYWORD_ONLY, default=DEFAULT_ORDER, annotation="str"),
        P("world_size", P.KEYWORD_ONLY, default=None, annotation="int | None"),
        P("rank_offset", P.KEYWORD_ONLY, default=0, annotation="int"),
    ]
    return base.replace(parameters=params)


def derived_rank_sets(
    purpose: str, rank_sets: Any, rank: int, layout: ParallelLayout, label: str
) -> list[tuple[int, ...]]:
    """Check the rank sets of ``ParallelState.derived_groups``: each holds ``rank``, inside the layout."""
    wanted: list[tuple[int, ...]] = []
    for ranks in rank_sets:
        ranks = tuple(int(r) for r in ranks)
        if rank not in ranks or len(set(ranks)) != len(ranks):
            raise ValueError(
                f"derived_groups({purpose!r}): {ranks} must be distinct ranks holding this rank "
                f"({rank}); pass only the groups this rank belongs to"
            )
        outside = [r for r in ranks if not layout.contains(r)]
        if outside:
            raise ValueError(
                f"derived_groups({purpose!r}): ranks {outside} of {ranks} are not ranks of "
                f"{label}; derived groups stay inside the state's ranks"
            )
        wanted.append(ranks)
    return wanted
