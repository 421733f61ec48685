"""Reshard torch modules (Hugging Face models, DeepSpeed engines, ZeRO-3 partitions) between two states.

The ``"flat"`` reshard backend: each parameter is a flat run of elements; a rank holds all
of it (a replica: no ZeRO, ZeRO-1/2 model weights, Ulysses SP which splits activations,
not weights), one ZeRO-3 partition of it (``param.ds_tensor``: elements
``[i * p, (i + 1) * p)`` for partition ``i`` of the parameter's ``ds_process_group``, the
last one padded), or one DeepSpeed AutoTP shard of it (``tensor_parallel.autotp_size``:
a column-parallel weight split on dim 0, a row-parallel one on dim 1, read from the
metadata AutoTP's layers leave on each parameter; even splits only, not the fused
sub-parameter layers: refused, naming the parameter). Each rank describes its models
compactly (per parameter: shape, dtype, itemsize, the kind of the state's groups it is
cut over or ``"replica"``, the cut, :class:`FlatPiece`); the description of each side is broadcast from its state's first rank
and compared by every rank, and :func:`scoped_parallel.resharding.flat.plan_flat_local` makes
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
drops them after a step, to be rebuilt from the resharded weights.

No stale reads: before anything is read or written, every ZeRO-3 parameter of either model
whose all-gather is in flight (``ds_status`` ``INFLIGHT``: a prefetch, registered with its
handle in the module's ``ds_inflight_param_registry``) is waited for (:func:`settle`); a
parameter in flight whose handle the reshard cannot reach is refused (ReshardError on every
rank, nothing moved). A source is read from its partitions (``ds_tensor``), which the
optimizer step writes, never from a gathered copy.
A destination engine with an optimizer that keeps its own master copy (ZeRO >= 1, or
fp16/bf16) is refused: its next step would overwrite the resharded weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from scoped_parallel.errors import ReshardError, describe_state
from scoped_parallel.resharding import CastSpec, Piece, ReshardPlan, register_backend, resolve_casts, unmatched_names
from scoped_parallel.resharding.execute import agree, comm_device, from_each
from scoped_parallel.resharding.flat import FlatTensor, plan_flat_local
from scoped_parallel.resharding.per_rank import Holdings, PerRankBackend

__all__ = ["FlatBackend", "FlatPiece", "FlatRow", "flat_pieces", "settle"]


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


#: the attribute DeepSpeed's AutoTP layers describe each parameter's split in (0.17+)
_AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


@dataclasses.dataclass(frozen=True)
class FlatPiece:
    """One parameter as this rank holds it, flat: ``flat`` (this rank's elements, a view of
    the parameter's storage), the parameter's global ``shape``, and how the elements are
    cut among the members of ``group`` (None: whole on every rank): in tiles of ``part``
    elements of the flattened tensor, ``stride`` tiles per member (a ZeRO-3 partition: one
    tile; an AutoTP row-parallel weight ``[out, in]`` split on ``in``: ``out`` tiles of
    ``in / tp``; see :mod:`scoped_parallel.resharding.tiled`). ``problem``: why the reshard
    cannot describe it (an AutoTP split it does not know), or empty."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    flat: torch.Tensor
    group: Any
    part: int
    stride: int = 1
    problem: str = ""


def _autotp_layers(module: torch.nn.Module) -> dict[int, Any]:
    """``id(parameter) -> mp_group`` for the parameters of DeepSpeed AutoTP layers with a TP group."""
    out = {}
    for layer in module.modules():
        group = getattr(layer, "mp_group", None)
        if group is None or int(getattr(layer, "tp_world_size", 1)) <= 1:
            continue
        for param in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
            if isinstance(param, torch.Tensor):
                out[id(param)] = group
    return out


def _autotp_piece(name: str, param: Any, group: Any) -> FlatPiece:
    """An AutoTP parameter from its layer's metadata: whole where replicated (a row-parallel
    bias), else split evenly on one dimension over ``group``."""
    meta = getattr(param, _AUTOTP_META, None) or {}
    flat = param.data.view(-1)
    if meta.get("replicated") or (meta and meta.get("partition_dim") is None):
        return FlatPiece(name, tuple(param.shape), str(param.dtype), param.element_size(), flat, None, flat.numel())
    shape = tuple(meta.get("logical_shape") or ())
    dim, sizes = meta.get("partition_dim"), tuple(meta.get("partition_sizes") or ())
    problem = ""
    if not shape or dim is None or not sizes:
        problem = "its AutoTP layer left no split metadata"
    elif meta.get("sub_param_shard_widths") or meta.get("unsupported_reason"):
        problem = "AutoTP splits it by sub-parameters (a fused QKV or gate/up layer), which the flat reshard does not know"
    elif len(set(sizes)) != 1:
        problem = f"AutoTP splits it unevenly ({list(sizes)} on dim {dim}), which the flat reshard does not know"
    if problem:
        return FlatPiece(name, tuple(param.shape), str(param.dtype), param.element_size(), flat, group, flat.numel(), problem=problem)
    part = sizes[0] * math.prod(shape[dim + 1:])
    return FlatPiece(name, shape, str(param.dtype), param.element_size(), flat, group, part, math.prod(shape[:dim]))


def flat_pieces(model: Any) -> list[FlatPiece]:
    """This rank's :class:`FlatPiece` per parameter of ``model``: a ZeRO-3 partition, an
    AutoTP shard, or the whole parameter."""
    out = []
    module = _module(model)
    autotp = _autotp_layers(module)
    for name, param in module.named_parameters():
        if hasattr(param, "ds_tensor") and param.ds_tensor is not None:
            start, stop, flat = _partition(param)
            problem = "it is both AutoTP-split and ZeRO-3-partitioned" if id(param) in autotp else ""
            out.append(FlatPiece(name, tuple(param.ds_shape), str(param.ds_tensor.dtype), flat.element_size(), flat,
                                 param.ds_process_group, int(param.ds_tensor.ds_numel), problem=problem))
        elif id(param) in autotp:
            out.append(_autotp_piece(name, param, autotp[id(param)]))
        else:
            flat = param.data.view(-1)
            out.append(FlatPiece(name, tuple(param.shape), str(param.dtype), param.element_size(), flat, None, flat.numel()))
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
    ``all_gather_coalesced``) cannot be waited for here: it is returned, and the reshard refused.
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
            "the module's ds_inflight_param_registry: wait for that handle before the reshard"]


def _refresh_gathered(model: Any) -> None:
    """After the partitions changed: every ZeRO-3 parameter that is whole now (``AVAILABLE``:
    ``ds_persist`` after a first forward, inside ``GatheredParameters``, left gathered by the
    prefetcher) or persistent is gathered again from its partitions over its partition group,
    and its hpZ secondary partition (``ds_secondary_tensor``, a copy of part of the old
    weights) is dropped, as DeepSpeed's ``invalidate_secondary_tensor`` does after a step:
    the next partition rebuilds it from the resharded whole parameter.

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


class FlatRow(NamedTuple):
    """One parameter in a side's compact description: the same on every rank of the state
    (what is broadcast and compared; :class:`FlatPiece` is this rank's own, with its tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    #: the kind of the state's groups the parameter is cut over, or ``"replica"`` (whole on every rank)
    key: str
    #: elements per tile, ``stride`` tiles per member (:class:`FlatPiece`)
    part: int
    stride: int


def _describe(model: Any, state: Any, role: str, problems: list[str]) -> tuple[FlatRow, ...] | None:
    """This rank's compact description of ``model`` (None where this rank is not in
    ``state``, or where a parameter cannot be described: the reason is added to ``problems``)."""
    if model is None:
        return None
    out = []
    for piece in flat_pieces(model):
        if piece.problem:
            problems.append(f"{role} {piece.name!r}: {piece.problem}")
            return None
        if piece.group is None:
            out.append(FlatRow(piece.name, piece.shape, piece.dtype, piece.itemsize, _REPLICA, math.prod(piece.shape), 1))
            continue
        ranks = tuple(dist.get_process_group_ranks(piece.group))
        kind = _kind_of(state, ranks)
        if kind is None:
            problems.append(
                f"{role} {piece.name!r} is partitioned over ranks {list(ranks)}, which is no group of "
                f"{describe_state(state)}: pass the state the model was built in"
            )
            return None
        out.append(FlatRow(piece.name, piece.shape, piece.dtype, piece.itemsize, kind, piece.part, piece.stride))
    return tuple(out)


def _keeps_master(model: Any) -> list[str]:
    optimizer = getattr(model, "optimizer", None)  # ZeRO-3 inference holds a parameter manager here, no step()
    keeps_master = callable(getattr(optimizer, "step", None)) and (
        getattr(model, "zero_optimization_stage", lambda: 0)() > 0
        or getattr(model, "bfloat16_enabled", lambda: False)()
        or getattr(model, "fp16_enabled", lambda: False)()
    )
    if keeps_master:
        return ["the destination engine has an optimizer with its own master weights (ZeRO >= 1 or fp16/bf16); "
                "its next step would overwrite the resharded weights: reshard into an engine built without an optimizer"]
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


class FlatBackend(PerRankBackend):
    """The ``"flat"`` reshard backend (see the module docstring)."""

    name = "flat"
    notes = (
        "planner: scoped_parallel.resharding.flat.plan_flat_local (each rank plans its own part from both layouts' "
        "descriptions); executor: scoped_parallel.resharding.execute.run_plan; receives land in the destination's own "
        "storage; a ZeRO-3 source into replicas on its own ranks is one all-gather per bucket over its partition "
        "group; gather buffers and converted send copies are staged"
    )

    def claims(self, model: Any) -> bool:
        """Whether ``model`` is one torch module (or an engine / wrapper holding one as ``.module``)."""
        models = model if isinstance(model, (list, tuple)) else [model]
        return len(models) == 1 and isinstance(_module(models[0]), torch.nn.Module)

    def plan_part(self, me: int, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, cast: CastSpec,
                  ranks: tuple[int, ...], group: Any) -> ReshardPlan:
        """Describe each side as :class:`FlatRow` s, share each from its state's first rank, check,
        and plan this rank's part; ``cast``: ``reshard``'s ``dtype=`` keyed by parameter name."""
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
        src = {row.name: row for row in src_rows}
        dst = {row.name: row for row in dst_rows}
        problems += unmatched_names(src, dict.fromkeys(dst, dst_state.layout.ranks[0]))
        for name, row in dst.items():
            if name in src and src[name].shape != row.shape:
                problems.append(f"{name!r}: source {src[name].shape} {src[name].dtype} but destination {row.shape} "
                                f"{row.dtype}; resharding moves tensors between layouts of the same global shape, it does not reshape them")
        casts, cast_problems = resolve_casts(cast, {name: (src[name].dtype, row.dtype) for name, row in dst.items()
                                                    if name in src and src[name].shape == row.shape})
        problems += cast_problems
        if problems:  # the same on every rank: made from the agreed descriptions alone
            raise ReshardError("cannot reshard this pair of models (nothing was moved):\n  " + "\n  ".join(problems[:20]))

        tensors = [
            FlatTensor(row.name, math.prod(row.shape), row.itemsize, row.dtype, src[row.name].key, src[row.name].part,
                       row.key, row.part, casts.get(row.name, ""), src[row.name].itemsize, src[row.name].stride, row.stride)
            for row in dst.values()
        ]
        return plan_flat_local(me, tensors, _copies(src_state, {row.key for row in src.values()}),
                               _copies(dst_state, {row.key for row in dst.values()}), participants=ranks)

    def hold(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any) -> Holdings:
        """Both models' flat pieces, after waiting for any ZeRO-3 gather in flight; the source's
        partition groups gather a ZeRO-3 source into replicas on its own ranks."""
        rank = dist.get_rank()
        # no gather in flight on either model while partitions are read and written
        stuck = (settle(src_model) if src_model is not None else []) + (settle(dst_model) if dst_model is not None else [])
        src_rows = flat_pieces(src_model) if src_model is not None else []
        dst_rows = flat_pieces(dst_model) if dst_model is not None else []

        def pieces(rows: list[FlatPiece]) -> list[Piece]:
            return [Piece(rank, row.name, (row.flat.numel(),), row.itemsize) for row in rows]

        # a parameter in flight out of reach makes this rank's pieces differ from the plan's:
        # every rank returns None, and reshard() plans again, where it is refused on every rank
        held = pieces(src_rows) + [Piece(rank, f"<in flight: {n}>", (0,), 1) for n in stuck]
        gather_groups = {tuple(dist.get_process_group_ranks(row.group)): row.group for row in src_rows if row.group is not None}
        return Holdings({row.name: row.flat for row in src_rows}, {row.name: row.flat for row in dst_rows}, held,
                        pieces(dst_rows), gather_groups)

    def after(self, dst_model: Any) -> None:
        """Gather again every destination parameter that is whole now (DeepSpeed keeps it so)."""
        _refresh_gathered(dst_model)


register_backend(FlatBackend())
