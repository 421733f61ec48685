"""The ``"megatron"`` reshard backend: each rank plans its own part (the default for megatron-core models).

Each side is described compactly (:func:`~scoped_parallel.adapters.megatron_reshard.names.describe`),
broadcast once from one rank per pipeline stage and expert slot
(:class:`~scoped_parallel.resharding.staged.StageCopies` ``leads``), merged and checked on every
rank alike, and :func:`~scoped_parallel.resharding.tiled.plan_tiled_local` plans this rank's part;
the steps around these are :class:`~scoped_parallel.resharding.per_rank.PerRankBackend`'s.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from scoped_parallel.adapters.megatron_reshard import checks
from scoped_parallel.adapters.megatron_reshard.names import chunks_of, describe, global_named, is_megatron_model
from scoped_parallel.errors import ReshardError
from scoped_parallel.resharding import CastSpec, Piece, ReshardPlan, resolve_casts
from scoped_parallel.resharding.execute import agree, from_each
from scoped_parallel.resharding.per_rank import BUCKET_BYTES, Holdings, PerRankBackend
from scoped_parallel.resharding.staged import StageCopies, TensorRow, merge, own_problems, tiled_tensors
from scoped_parallel.resharding.tiled import plan_tiled_local

__all__ = ["MegatronBackend"]


class MegatronBackend(PerRankBackend):
    """The ``"megatron"`` reshard backend: each rank plans its own part (see the module docstring)."""

    name = "megatron"
    notes = (
        "planner: scoped_parallel.resharding.tiled.plan_tiled_local (each rank plans its own part from both layouts' "
        "descriptions, broadcast once from one rank per pipeline stage and expert slot); executor: "
        "scoped_parallel.resharding.execute.run_plan; a source split on its first dimension into replicas on the same "
        "ranks is one all-gather per bucket over its TP group"
    )

    def claims(self, model: Any) -> bool:
        """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
        return is_megatron_model(model)

    def plan_part(self, me: int, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, cast: CastSpec,
                  ranks: tuple[int, ...], group: Any) -> ReshardPlan:
        """Describe each side as :class:`~scoped_parallel.resharding.staged.TensorRow` s, share them from
        one lead per pipeline stage and expert slot, check, and plan this rank's part."""
        local: list[str] = []
        sides = []
        for role, model, state in (("source", src_model, src_state), ("destination", dst_model, dst_state)):
            mine: list[TensorRow] = []
            if model is not None:
                chunks = chunks_of(model)
                local += checks.built_in(chunks, state, role, state.process_group_collection())
                local += checks.param_sync_steps(model, role)[1]
                mine = [one.row for one in describe(model, state)]
                twice = sorted(n for n, count in Counter(r.name for r in mine).items() if count > 1)
                if twice:
                    local.append(f"{role} tensors {twice[:3]} appear twice under their canonical names")
            sides.append((role, state, mine, model is not None))
        everywhere: list[str] = []
        merged = []
        for role, state, mine, holds in sides:
            copies = StageCopies(state.layout)
            side = merge(from_each(mine if me in copies.leads else None, copies.leads, group), copies, role, everywhere)
            if holds:
                local += own_problems(me, mine, side, copies, role)
            merged.append((side, copies))
        (src, src_copies), (dst, dst_copies) = merged
        everywhere += checks.match(src, dst)  # names both ways, global shapes, TP tiling
        casts, cast_problems = resolve_casts(cast, {n: (src[n].row.dtype, h.row.dtype) for n, h in dst.items() if n in src})
        everywhere += cast_problems
        agree(local, group, "this pair of Megatron models", everywhere=everywhere)
        return plan_tiled_local(me, tiled_tensors(src, dst, casts), src_copies, dst_copies, backend="megatron", participants=ranks)

    def hold(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any) -> Holdings:
        """Both models' tensors under canonical names, after finishing their parameter gathers;
        the source's TP and expert-TP groups gather a source split into replicas."""
        rank = dist.get_rank()
        held = []
        for model, state, role in ((src_model, src_state, "source"), (dst_model, dst_state, "destination")):
            if model is not None:  # before any weight is read or written: the last step on every shard
                checks.finish_param_gathers(model, role)
            held.append({n: t.data for n, t, _ in global_named(model, state)} if model is not None else {})
        src, dst = held

        def pieces(tensors: dict[str, torch.Tensor]) -> list[Piece]:
            return [Piece(rank, n, tuple(t.shape), t.element_size()) for n, t in tensors.items()]

        gather_groups = {}
        if src_model is not None:
            gather_groups = {src_state.ranks(k): src_state.group(k) for k in ("tp", "etp") if k in src_state.kinds()}
        return Holdings(src, dst, pieces(src), pieces(dst), gather_groups)

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any,
                bucket_bytes: int = BUCKET_BYTES, service: Any = None, **options: Any) -> dict[int, int] | None:
        """Run this rank's part of ``plan`` (:meth:`~scoped_parallel.resharding.per_rank.PerRankBackend.execute`); ``service=`` belongs to
        the ``"megatron-core"`` backend."""
        if service is not None:  # the same on every rank: all raise before anything moves
            raise ReshardError("reshard(..., service=...) runs megatron-core's own executor on megatron-core's own plan: "
                               "pass backend='megatron-core' as well (nothing was moved)")
        return super().execute(plan, src_model, src_state, dst_model, dst_state, bucket_bytes=bucket_bytes, **options)
