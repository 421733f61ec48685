"""Refit torch modules (Hugging Face models, DeepSpeed engines, ZeRO-3 partitions) between two states.

The ``"flat"`` reshard backend: each parameter is a flat run of elements; a rank holds all
of it (a replica: no ZeRO, ZeRO-1/2 model weights, Ulysses SP which splits activations,
not weights) or one ZeRO-3 partition of it (``param.ds_tensor``: elements
``[i * p, (i + 1) * p)`` for partition ``i`` of the parameter's ``ds_process_group``, the
last one padded). Each rank describes its models compactly (per parameter: shape, dtype,
itemsize, the kind of the state's groups it is partitioned over or ``"replica"``, the
partition size); the description of each side is broadcast from its state's first rank
and compared by every rank, and :func:`scoped_parallel.refit.flat.plan_flat_local` makes
this rank's part of the plan from the descriptions and the states' layouts alone (see
there: one source copy per destination rank, the rank's own elements copied locally, a
ZeRO-3 source into replicas on its own ranks gathered with one all-gather per bucket, a
ZeRO-3 destination receiving only its own partition). Receives land in the destination's
own storage. The states may lie on other, partial or overlapping rank sets of the world:
every collective here runs over the participants (the ranks of either state).
With ``reshard(..., dtype=)`` (casts resolved per parameter name on the gathered dtypes) the
sender converts each run before sending: a bf16 destination of an fp32 source receives bf16
bytes (the converted copies are the sender's staging).

8-rank example: actor ZeRO-3 under SP=2 x DP=4 (partitions over the 8 ranks of SP x DP),
rollout ZeRO-0 under SP=8 (a full replica per rank): one all-gather per bucket over the
8 ranks; each rollout rank receives 7/8 of every parameter, one eighth from each peer.
The same actor into a rollout on 8 other ranks (``rank_offset=8``): each rollout rank
receives every eighth from the actor rank holding it, point-to-point.

A ZeRO-3 destination is always written in its partitions; every parameter that is whole
at that moment (the ones DeepSpeed keeps whole between forwards, ``ds_persist``, below
``stage3_param_persistence_threshold``, and any other ``AVAILABLE`` one: inside
``GatheredParameters``, left gathered by the prefetcher) is then gathered again from them,
and ZeRO++'s secondary partitions (hpZ, ``ds_secondary_tensor``) are dropped, as DeepSpeed
drops them after a step, to be rebuilt from the refitted weights.

No stale reads: before anything is read or written, every ZeRO-3 parameter of either model
whose all-gather is in flight (``ds_status`` ``INFLIGHT``: a prefetch, registered with its
handle in the module's ``ds_inflight_param_registry``) is waited for (:func:`settle`); a
parameter in flight whose handle the refit cannot reach is refused (ReshardError on every
rank, nothing moved). A source is read from its partitions (``ds_tensor``), which the
optimizer step writes, never from a gathered copy.
A destination engine with an optimizer that keeps its own master copy (ZeRO >= 1, or
fp16/bf16) is refused: its next step would overwrite the refitted weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from scoped_parallel.errors import ReshardError, describe_state
from scoped_parallel.refit import CastSpec, Piece, ReshardPlan, pieces_match, register_backend, resolve_casts, unmatched_names
from scoped_parallel.refit.execute import agree, comm_device, confirm_part, from_each, participants, participants_group, peak_staging, run_plan
from scoped_parallel.refit.flat import FlatTensor, plan_flat_local

__all__ = ["FlatBackend", "flat_pieces", "settle"]


def _module(model: Any) -> torch.nn.Module:
    inner = getattr(model, "module", None)  # a DeepSpeed engine or DDP wrapper
    return inner if isinstance(inner, torch.nn.Module) else model


def _partition(param: Any) -> tuple[int, int, torch.Tensor]:
    """``(start, stop, flat tensor)`` of the ZeRO-3 partition this rank holds of ``param``."""
    size = int(param.ds_tensor.ds_numel)
    index = dist.get_rank(param.ds_process_group)
    start = min(index * size, int(param.ds_numel))
    stop = min(start + size, int(param.ds_numel))
    return start, stop, param.ds_tensor.data.view(-1)[: stop - start]


def flat_pieces(model: Any) -> list[tuple[str, tuple[int, ...], str, int, int, int, torch.Tensor, Any]]:
    """``(name, full shape, dtype, itemsize, start, stop, flat tensor, partition group)`` per
    parameter of ``model`` on this rank (``partition group`` is None for a whole replica)."""
    out = []
    for name, param in _module(model).named_parameters():
        if hasattr(param, "ds_tensor") and param.ds_tensor is not None:
            start, stop, flat = _partition(param)
            dtype = param.ds_tensor.dtype
            out.append((name, tuple(param.ds_shape), str(dtype), flat.element_size(), start, stop, flat, param.ds_process_group))
        else:
            flat = param.data.view(-1)
            out.append((name, tuple(param.shape), str(param.dtype), param.element_size(), 0, flat.numel(), flat, None))
    return out


def _zero3_params(model: Any) -> list[Any]:
    return [p for p in _module(model).parameters() if getattr(p, "ds_tensor", None) is not None and hasattr(p, "ds_status")]


def _status(param: Any) -> str:
    return str(getattr(param.ds_status, "name", param.ds_status))


def _in_flight(model: Any) -> tuple[list[Any], list[str]]:
    """``(handles, unreachable)``: the distinct registered handles of ``model``'s ZeRO-3
    parameters in flight (status ``INFLIGHT``), and the names of those in flight without one."""
    module = _module(model)
    registry = getattr(module, "ds_inflight_param_registry", None)
    handles = getattr(registry, "data", registry) if registry is not None else {}
    out: dict[int, Any] = {}
    unreachable = []
    for name, param in module.named_parameters():
        if getattr(param, "ds_tensor", None) is None or not hasattr(param, "ds_status") or _status(param) != "INFLIGHT":
            continue
        handle = handles.get(param) if isinstance(handles, dict) else None
        if handle is None:
            unreachable.append(name)
        else:
            out.setdefault(id(handle), handle)
    return list(out.values()), unreachable


def settle(model: Any) -> list[str]:
    """Wait for every all-gather in flight of ``model``'s ZeRO-3 parameters (status
    ``INFLIGHT``); returns the names of those it could not wait for.

    DeepSpeed's parameter coordinator keeps a prefetched parameter's handle in the
    module's ``ds_inflight_param_registry`` (param -> handle) until the module that needs
    it runs; the handle's ``wait()`` makes the parameter ``AVAILABLE`` (whole, gathered
    from the partitions as they were when the gather began). The handles are waited for
    where they are, not taken out of the registry: the coordinator's own ``wait()`` on
    them later is a no-op, and its bookkeeping (what it counts as available) stays its own.
    A parameter in flight under a handle that is not registered (a caller's own
    ``all_gather_coalesced``) cannot be waited for here: it is returned, and the refit refused.
    No communication of its own (the gathers already run on every rank of their group)."""
    handles, unreachable = _in_flight(model)
    for handle in handles:
        handle.wait()
    return unreachable


def _in_flight_problems(model: Any, role: str) -> list[str]:
    """The refusal for parameters in flight that :func:`settle` cannot wait for (no communication)."""
    stuck = _in_flight(model)[1]
    if not stuck:
        return []
    return [f"{role} ZeRO-3 parameters {stuck[:3]} are being gathered (INFLIGHT) under a handle that is not in "
            "the module's ds_inflight_param_registry: wait for that handle before the refit"]


def _refresh_gathered(model: Any) -> None:
    """After the partitions changed: every ZeRO-3 parameter that is whole now (``AVAILABLE``:
    ``ds_persist`` after a first forward, inside ``GatheredParameters``, left gathered by the
    prefetcher) or persistent is gathered again from its partitions over its partition group,
    and its hpZ secondary partition (``ds_secondary_tensor``, a copy of part of the old
    weights) is dropped, as DeepSpeed's ``invalidate_secondary_tensor`` does after a step:
    the next partition rebuilds it from the refitted whole parameter.

    Which parameters to gather is agreed over each partition group (one small all-reduce
    per group, the groups in one order on every rank), so a rank on which a parameter is
    whole and a peer on which it is not still make the same collective calls; every rank of a
    group walks the same parameters in the same order, as DeepSpeed's own gathers need."""
    by_group: dict[tuple[int, ...], tuple[Any, list[Any]]] = {}
    for param in _zero3_params(model):
        if getattr(param, "ds_secondary_tensor", None) is not None:
            param.ds_secondary_tensor = None
        group = param.ds_process_group
        by_group.setdefault(tuple(dist.get_process_group_ranks(group)), (group, []))[1].append(param)
    for ranks in sorted(by_group):
        group, params = by_group[ranks]
        device = comm_device(group)
        wanted = torch.tensor([int(_status(p) == "AVAILABLE" or bool(getattr(p, "ds_persist", False))) for p in params], device=device)
        if len(ranks) > 1:
            dist.all_reduce(wanted, op=dist.ReduceOp.MAX, group=group)
        for param, want in zip(params, wanted.tolist()):
            if not want:
                continue
            part = param.ds_tensor.data.view(-1).to(device).contiguous()
            gathered = torch.empty(part.numel() * len(ranks), dtype=part.dtype, device=device)
            dist.all_gather_into_tensor(gathered, part, group=group)
            if param.data.numel() == int(param.ds_numel):  # whole on this rank: refresh it
                with torch.no_grad():
                    param.data.view(-1).copy_(gathered[: int(param.ds_numel)])


def _kind_of(state: Any, ranks: tuple[int, ...]) -> str | None:
    """The kind of ``state`` whose group on this rank is ``ranks`` and that its layout knows
    for every rank (so all its copies can be derived without communication); the shortest
    name first, so every rank picks the same one."""
    me = dist.get_rank()
    for kind in sorted(state.kinds(), key=lambda k: (len(k), k)):
        if tuple(state.ranks(kind)) != ranks:
            continue
        try:
            if tuple(state.layout.group_of(me, kind)) == ranks:
                return kind
        except Exception:  # noqa: BLE001 - a kind the layout does not derive (opt:, gloo twins)
            continue
    return None


def _describe(model: Any, state: Any, role: str, problems: list[str]) -> tuple[tuple[Any, ...], ...] | None:
    """This rank's compact description of ``model`` (None where this rank is not in
    ``state``): per parameter ``(name, shape, dtype, itemsize, key, part)``, ``key`` the kind
    of the state's groups it is partitioned over (``"replica"``: whole on every rank of the
    state) and ``part`` the elements per member; the same on every rank of the state."""
    if model is None:
        return None
    out = []
    for name, shape, dtype, itemsize, start, stop, _, group in flat_pieces(model):
        numel = math.prod(shape)
        if group is None:
            out.append((name, shape, dtype, itemsize, _REPLICA, numel))
            continue
        ranks = tuple(dist.get_process_group_ranks(group))
        kind = _kind_of(state, ranks)
        if kind is None:
            problems.append(
                f"{role} {name!r} is partitioned over ranks {list(ranks)}, which is no group of "
                f"{describe_state(state)}: pass the state the model was built in"
            )
            return None
        out.append((name, shape, dtype, itemsize, kind, int(_module_param(model, name).ds_tensor.ds_numel)))
    return tuple(out)


def _module_param(model: Any, name: str) -> Any:
    return _module(model).get_parameter(name)


def _keeps_master(model: Any) -> list[str]:
    optimizer = getattr(model, "optimizer", None)  # ZeRO-3 inference holds a parameter manager here, no step()
    keeps_master = callable(getattr(optimizer, "step", None)) and (
        getattr(model, "zero_optimization_stage", lambda: 0)() > 0
        or getattr(model, "bfloat16_enabled", lambda: False)()
        or getattr(model, "fp16_enabled", lambda: False)()
    )
    if keeps_master:
        return ["the destination engine has an optimizer with its own master weights (ZeRO >= 1 or fp16/bf16); "
                "its next step would overwrite the refitted weights: refit into an engine built without an optimizer"]
    return []


def _first_difference(mine: tuple[Any, ...], agreed: tuple[Any, ...]) -> str:
    for a, b in zip(mine, agreed):
        if a != b:
            return f"{a} here but {b} there"
    return f"{len(mine)} parameters here but {len(agreed)} there"


def _copies(state: Any, keys: set[str]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per key, the copies of ``state``'s layout: a whole replica per rank, or its groups of that kind."""
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for key in keys:
        out[key] = tuple((r,) for r in state.layout.ranks) if key == _REPLICA else state.layout.groups(key)
    return out


_REPLICA = "replica"
#: the bucket the plan's staging figure assumes (the executor's default)
_BUCKET = 1 << 26


class FlatBackend:
    """The ``"flat"`` reshard backend (see the module docstring)."""

    name = "flat"
    #: the states may lie on other, overlapping or partial rank sets of the world
    partial_ranks = True

    def claims(self, model: Any) -> bool:
        """Whether ``model`` is one torch module (or an engine / wrapper holding one as ``.module``)."""
        models = model if isinstance(model, (list, tuple)) else [model]
        return len(models) == 1 and isinstance(_module(models[0]), torch.nn.Module)

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """This rank's part of the checked plan (collective over the ranks of both states; see
        the module docstring); ``cast``: ``reshard``'s ``dtype=`` (dtypes as strings), keyed by
        parameter name."""
        ranks = participants(src_state, dst_state)
        group = participants_group(src_state, dst_state, ranks)
        me = dist.get_rank()
        local: list[str] = []
        src_desc = _describe(src_model, src_state, "source", local)
        dst_desc = _describe(dst_model, dst_state, "destination", local)
        if src_model is not None:
            local += _in_flight_problems(src_model, "source")
        if dst_model is not None:
            local += _in_flight_problems(dst_model, "destination") + _keeps_master(dst_model)
        # each side's description once, from the first rank of its state; every rank compares its own
        agreed = []
        for role, state, desc in (("source", src_state, src_desc), ("destination", dst_state, dst_desc)):
            first = state.layout.ranks[0]
            (theirs,) = from_each(desc, [first], group)
            if desc is not None and theirs is not None and desc != theirs:
                local.append(f"the {role} model differs from rank {first}'s: {_first_difference(desc, theirs)}")
            agreed.append(theirs)
        agree(local, group)
        src_rows, dst_rows = agreed
        if src_rows is None or dst_rows is None:  # the first rank of a state had a problem: already raised above
            raise ReshardError("a state's first rank described no model (nothing was moved)")

        problems: list[str] = []
        src = {row[0]: row for row in src_rows}
        dst = {row[0]: row for row in dst_rows}
        first_dst = dst_state.layout.ranks[0]
        problems += unmatched_names(src, {name: first_dst for name in dst})
        for name, (_, shape, dtype, *_rest) in dst.items():
            if name in src and src[name][1] != shape:
                problems.append(f"{name!r}: source {src[name][1]} {src[name][2]} but destination {shape} {dtype}; "
                                "refit copies, it does not reshape or cast")
        casts, cast_problems = resolve_casts(cast, {name: (src[name][2], row[2]) for name, row in dst.items()
                                                    if name in src and src[name][1] == row[1]})
        problems += cast_problems
        if problems:  # the same on every rank: made from the agreed descriptions alone
            raise ReshardError("cannot refit this pair of models (nothing was moved):\n  " + "\n  ".join(problems[:20]))

        tensors = [
            FlatTensor(name, math.prod(shape), itemsize, dtype, src[name][4], src[name][5], key, part,
                       casts.get(name, ""), src[name][3])
            for name, shape, dtype, itemsize, key, part in dst_rows
        ]
        part_plan = plan_flat_local(me, tensors, _copies(src_state, {row[4] for row in src_rows}),
                                    _copies(dst_state, {row[4] for row in dst_rows}), participants=ranks)
        confirm_part(part_plan, group)
        notes = (
            "planner: scoped_parallel.refit.flat.plan_flat_local (each rank plans its own part from both layouts' "
            "descriptions); executor: scoped_parallel.refit.execute.run_plan; receives land in the destination's own "
            "storage; a ZeRO-3 source into replicas on its own ranks is one all-gather per bucket over its partition "
            f"group; staging: peak extra bytes with bucket_bytes={_BUCKET} (gather buffers, converted send copies)",
        )
        return dataclasses.replace(part_plan, staging={me: peak_staging(part_plan, _BUCKET)}, notes=notes)

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any,
                bucket_bytes: int = _BUCKET) -> dict[int, int] | None:
        """Run this rank's part of ``plan``; returns the bytes sent by peer, or None on every
        rank when the models no longer hold the planned pieces (nothing moved)."""
        rank = dist.get_rank()
        ranks = participants(src_state, dst_state)
        group = participants_group(src_state, dst_state, ranks)
        # no gather in flight on either model while partitions are read and written
        stuck = (settle(src_model) if src_model is not None else []) + (settle(dst_model) if dst_model is not None else [])
        src_rows = flat_pieces(src_model) if src_model is not None else []
        dst_rows = flat_pieces(dst_model) if dst_model is not None else []

        def pieces(rows: list[Any]) -> list[Piece]:
            return [Piece(rank, name, (stop - start,), itemsize) for name, _, _, itemsize, start, stop, _, _ in rows]

        # a parameter in flight out of reach makes this rank's pieces differ from the plan's:
        # every rank returns None, and reshard() plans again, where it is refused on every rank
        held = pieces(src_rows) + [Piece(rank, f"<in flight: {n}>", (0,), 1) for n in stuck]
        if not pieces_match(plan, held, pieces(dst_rows), group=group):
            return None
        gather_groups = {tuple(dist.get_process_group_ranks(row[7])): row[7] for row in src_rows if row[7] is not None}
        sent = run_plan(plan, {row[0]: row[6] for row in src_rows}, {row[0]: row[6] for row in dst_rows}, group=group,
                        bucket_bytes=bucket_bytes, gather_groups=gather_groups)
        if dst_model is not None:
            _refresh_gathered(dst_model)
        return sent


register_backend(FlatBackend())
