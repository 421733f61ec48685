"""Before anything moves (the Megatron reshard backends' second job): that a model was built in
the state it is passed with, that both sides describe the same tensors with tiles that fit,
and that no weight is read stale after ``optimizer.step()`` (megatron-core's DDP with
``overlap_param_gather``: :func:`finish_param_gathers`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist

from scoped_parallel.adapters.megatron_reshard.names import Local, version_text
from scoped_parallel.errors import ReshardError, describe_state
from scoped_parallel.resharding import unmatched_names
from scoped_parallel.resharding.staged import WHOLE, Held

__all__ = ["built_in", "by_name", "finish_param_gathers", "match", "param_sync_steps"]


def built_in(chunks: list[Any], state: Any, role: str, collection: Any) -> list[str]:
    """Problems with the claim that ``chunks`` were built with ``state``'s groups: a model's
    own ``pg_collection`` must hold the state's TP, PP, EP, expert-TP and DP ranks."""
    for chunk in chunks:
        own = getattr(chunk, "pg_collection", None)
        for field in ("tp", "pp", "ep", "expt_tp", "dp"):
            built, given = getattr(own, field, None), getattr(collection, field, None)
            if built is None or given is None:
                continue
            built_ranks, given_ranks = dist.get_process_group_ranks(built), dist.get_process_group_ranks(given)
            if built_ranks != given_ranks:
                return [
                    f"the {role} model was built with {field} group {built_ranks}, but {describe_state(state)} "
                    f"has {given_ranks} on this rank: pass the state the model was built in"
                ]
    return []


def by_name(described: list[tuple[int, Local]], role: str, problems: list[str]) -> dict[str, Held]:
    """Per global name the tensor as the first rank describing it does (``Held.first``); a
    rank that gives it another global shape or dtype is a line in ``problems``."""
    out: dict[str, Held] = {}
    for rank, local in described:
        row = local.row
        seen = out.setdefault(row.name, Held(row, (), rank))
        if (seen.row.shape, seen.row.dtype) != (row.shape, row.dtype):
            problems.append(f"{role} {row.name!r}: global shape/dtype {(seen.row.shape, seen.row.dtype)} on rank {seen.first} "
                            f"but {(row.shape, row.dtype)} on rank {rank}")
    return out


def match(src: Mapping[str, Held], dst: Mapping[str, Held]) -> list[str]:
    """The reasons the destination cannot be filled from the source, per tensor (names,
    global shapes, TP tiling; dtypes are :func:`~scoped_parallel.resharding.plan.resolve_casts`'s)."""
    problems = unmatched_names(src, {name: held.first for name, held in dst.items()})
    for name, held in dst.items():
        if name not in src:
            continue
        s, d = src[name].row, held.row
        s_dim = s.dim if s.kind != WHOLE else None
        dim = d.dim if d.kind != WHOLE else None
        if s.shape != d.shape:
            problems.append(f"{name!r}: source global shape {s.shape} (split {s.ways}) but destination {d.shape} (split {d.ways})")
        elif dim is not None or s_dim is not None:
            if dim is not None and s_dim is not None and dim != s_dim:
                problems.append(f"{name!r}: split on dim {s_dim} in the source but dim {dim} in the destination")
                continue
            axis = dim if dim is not None else s_dim
            n_src = s.ways * (s.stride if s_dim is not None else 1)
            n_dst = d.ways * (d.stride if dim is not None else 1)
            tile = n_src * n_dst // math.gcd(n_src, n_dst)
            if d.shape[axis] % tile:  # type: ignore[index]
                problems.append(
                    f"{name!r}: dim {axis} of size {d.shape[axis]} does not divide into the {tile} tiles that "  # type: ignore[index]
                    f"{s.ways}-way (stride {s.stride}) -> {d.ways}-way (stride {d.stride}) splitting needs"
                )
    return problems


#: what the finish below reads of megatron-core's DDP bucket groups (the same names 0.16-0.20)
_BUCKET_GROUP_ATTRS = ("param_gather_dispatched", "param_gather_handle", "finish_param_sync")


def _is_megatron_ddp(obj: Any) -> bool:
    """megatron-core's ``DistributedDataParallel`` (by class, or by its ``ddp_config`` and
    ``bucket_groups`` where the class moved); not Megatron-FSDP, which keeps no whole weights."""
    if hasattr(getattr(obj, "ddp_config", None), "overlap_param_gather") and hasattr(obj, "bucket_groups"):
        return True
    try:
        from megatron.core.distributed import DistributedDataParallel
    except ImportError:  # pragma: no cover - a megatron-core without it
        return False
    return isinstance(obj, DistributedDataParallel)


def _ddp_wrappers(model: Any) -> list[Any]:
    """The megatron-core ``DistributedDataParallel`` wrappers in ``model``'s chunks (each
    chunk's ``.module`` chain, outermost first), in chunk order."""
    out = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        seen: set[int] = set()
        obj = chunk
        while obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            if _is_megatron_ddp(obj):
                out.append(obj)
            obj = obj.__dict__.get("_modules", {}).get("module") if isinstance(obj, torch.nn.Module) else getattr(obj, "module", None)
    return out


def param_sync_steps(model: Any, role: str) -> tuple[list[Any], list[str]]:
    """What must run before ``model``'s weights are read (``role="source"``) or written
    (``"destination"``): ``(steps, problems)``, no communication.

    Only a DDP wrapper whose parameters are gathered by forward pre-hooks has anything
    pending (``use_forward_hook``: ``overlap_param_gather`` with the distributed optimizer,
    or, from 0.17, the layer-wise optimizer); without it ``optimizer.step()`` gathers
    synchronously. Per bucket group (dense, then expert-parallel, in the wrapper's order):

    * a gather never dispatched since the last gradient reduction
      (``param_gather_dispatched`` is False: ``finish_grad_sync`` clears it, the step then
      updates this rank's shard only) or dispatched and still in flight
      (``param_gather_handle``: ``overlap_param_gather_with_optimizer_step``,
      ``align_param_gather``, a reshard between micro-batches) is finished on a source with the
      group's own ``finish_param_sync(skip_next_bucket_dispatch=True)``: dispatched if need be,
      waited for, its post-processing (FP8 / MXFP8 copies) done, and marked done, so the next
      forward's hooks find nothing left to do;
    * on a destination only a gather in flight is waited for (it would land on the resharded
      values); one never dispatched gathers, at the next forward, shards that the reshard has
      already written on every data-parallel peer alike, so it needs nothing now.

    A wrapper that gathers in its hooks but lacks these names (a megatron-core version after
    0.20 that renamed them) falls back to its own ``start_param_sync(force_sync=True)`` (what
    ``disable_forward_pre_hook`` runs: waits for a gather in flight, gathers the rest
    synchronously; on a destination the values it gathers are then overwritten); without
    that either, it is a problem naming
    ``overlap_param_gather`` (raised as ReshardError on every rank alike)."""
    steps: list[Any] = []
    problems: list[str] = []
    for ddp in _ddp_wrappers(model):
        hooked = getattr(ddp, "use_forward_hook", None)
        if hooked is None:
            hooked = bool(getattr(getattr(ddp, "ddp_config", None), "overlap_param_gather", True))
        if not hooked:
            continue
        groups = [getattr(ddp, name, None) for name in ("bucket_groups", "expert_parallel_bucket_groups")]
        known = all(isinstance(g, (list, tuple)) for g in groups) and all(
            all(hasattr(bg, attr) for attr in _BUCKET_GROUP_ATTRS) for g in groups for bg in g)
        if known:
            for bucket_group in [bg for g in groups for bg in g]:
                in_flight = bucket_group.param_gather_handle is not None
                if in_flight or (role == "source" and not bucket_group.param_gather_dispatched):
                    steps.append(lambda bg=bucket_group: bg.finish_param_sync(skip_next_bucket_dispatch=True))
            continue
        force = getattr(ddp, "start_param_sync", None)
        if callable(force):
            steps.append(lambda f=force: f(force_sync=True))
            continue
        problems.append(
            f"the {role} model's megatron-core {version_text()} DistributedDataParallel gathers parameters lazily "
            "(overlap_param_gather=True) but has none of bucket_groups / expert_parallel_bucket_groups with "
            f"{', '.join(_BUCKET_GROUP_ATTRS)}, nor start_param_sync(force_sync=True): its weights may be a step old "
            "and cannot be made current here; run one forward of the model (or build its DDP with "
            "overlap_param_gather=False) before the reshard"
        )
    return steps, problems


def finish_param_gathers(model: Any, role: str = "source") -> int:
    """Finish what megatron-core's DDP left pending on ``model`` (see ``param_sync_steps`` (below)),
    so that a ``role="source"`` model's parameters on this rank hold the last step's weights
    and no gather is in flight on either model. Collective over each bucket group's
    data-parallel group (every rank of it finds the same groups pending: megatron-core's own
    forward hooks rely on that as well). Raises ReshardError, before any communication, where
    the wrapper's names are unknown. Returns the number of bucket groups (or wrappers) finished."""
    steps, problems = param_sync_steps(model, role)
    if problems:
        raise ReshardError("cannot reshard (nothing was moved): " + "; ".join(problems))
    with torch.no_grad():
        for step in steps:
            step()
    return len(steps)


