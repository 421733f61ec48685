"""Resharding: copy a model trained in one state into the same architecture laid out by another.

``scoped_parallel.reshard(src_model, src_state, dst_model, dst_state)`` is the one call,
``scoped_parallel.plan_reshard`` its dry run (see :mod:`scoped_parallel.resharding.api`);
:mod:`~scoped_parallel.resharding.plan` is the plan as plain data with its checks and report,
:mod:`~scoped_parallel.resharding.tiled` plans one rank's part of a reshard between tiled layouts
(Megatron's TP tiles; :mod:`~scoped_parallel.resharding.flat`, ZeRO-3's flat partitions, is its
one-dimensional case), :mod:`~scoped_parallel.resharding.staged` describes a model held by a
layout's pipeline stages and expert slots (all four without torch), and
:mod:`~scoped_parallel.resharding.execute` runs a plan with torch's point-to-point calls and
all-gathers.
"""

from scoped_parallel.resharding.api import Backend, ReshardResult, backends, pieces_match, plan_reshard, register_backend, reshard, whole_plan
from scoped_parallel.resharding.plan import (
    Box,
    CastSpec,
    Gather,
    Piece,
    ReshardPlan,
    Transfer,
    box_is_contiguous,
    box_slices,
    is_floating,
    plan_flat,
    resolve_casts,
    unmatched_names,
)

__all__ = [
    "Backend",
    "Box",
    "CastSpec",
    "Gather",
    "Piece",
    "ReshardResult",
    "ReshardPlan",
    "Transfer",
    "backends",
    "box_is_contiguous",
    "box_slices",
    "is_floating",
    "pieces_match",
    "plan_flat",
    "plan_reshard",
    "register_backend",
    "resolve_casts",
    "reshard",
    "unmatched_names",
    "whole_plan",
]
