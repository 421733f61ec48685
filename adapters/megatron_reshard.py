"""Refit megatron-core models between two states: each rank plans its own part.

``scoped_parallel.reshard(actor, actor_state, rollout, rollout_state)`` with megatron-core
models (``GPTModel`` and friends, one module or a list of virtual-pipeline chunks, bare or
wrapped in DDP / ``Float16Module``) lands here, on one of two backends:

* ``"megatron"`` (the default, every megatron-core version): **each rank plans its own
  part** (:func:`scoped_parallel.refit.tiled.plan_tiled_local`). Each side is described
  compactly, per tensor a :class:`~scoped_parallel.refit.staged.TensorRow` (canonical name, global shape, dtype, TP or
  expert-TP split with its partition stride, or whole; the expert slot), broadcast once from
  one rank per pipeline stage and expert slot (:mod:`scoped_parallel.refit.staged`); every rank
  compares its own tensors with that description, and derives each tensor's holders (the
  TP groups, expert-TP groups or ranks of the stages holding it) from the state's layout
  alone. Planning time and memory grow with the rank's own pieces and the number of
  tensors, never with ranks squared; no rank holds another's transfers. The states may lie
  on other, partial or overlapping rank sets of the world (an actor on ranks 0-7 and a
  rollout copy on 8-11): only their ranks call, every collective runs over them. A tensor
  split on its first dimension into replicas on the same ranks is one all-gather per bucket.
* ``"megatron-core"`` (``backend="megatron-core"``): megatron-core's own planner
  (``megatron.core.resharding``: ``build_local_reshard_plan`` where it exists, 0.19+, else
  ``build_centralized_reshard_plan``, 0.16-0.18), its ops gathered on every rank and
  checked as one global plan (both states on the whole world). With ``service=`` (a
  megatron-core ``CopyService`` or a backend name such as ``"nccl"``) megatron-core's own
  ``execute_reshard_plan`` runs it.

What both add around the plan:

* **models built in a scope need no groups.** A model that carries its own
  ``pg_collection`` must have been built with the state's groups (else a
  :class:`~scoped_parallel.errors.ReshardError`: the wrong state was passed).
* **canonical names.** Every chunk's tensors under one name each (global layer number from
  ``layer_number``, global expert number from the MoE layer's ``local_expert_indices``, a
  tied output weight under the word embedding's name), so PP x VPP matches PP=1 or any
  other split (megatron-core's own planner plans one chunk: ``model[0]``).
* **SwiGLU.** ``linear_fc1`` of a gated MLP holds ``[gate, up]`` per TP rank: partition
  stride 2. megatron-core sets that on the parameter from 0.19 on; for older versions the
  description says so (the model is not changed).
* **expert tensors** are recognised by name (:func:`is_expert`: a path component
  ``experts``) as well as by megatron-core's ``allreduce=False``, which megatron-core sets
  only under EP > 1: an EP=1 expert is split over the expert-TP group (its ``allreduce``
  is True like a dense tensor's), so the checks use the expert-TP size (TP=2 x EP=1 with
  expert TP=1 -> EP=2).
* **casts** (``reshard(..., dtype=)``): resolved per canonical name on the described
  dtypes; the sender converts.
* **errors before anything moves, on every rank.** Names, global shapes, dtypes and that
  the TP tiling divides are checked on data every rank holds, and all raise the same
  :class:`~scoped_parallel.errors.ReshardError`; a rank's own problems (a model built in
  another state, a tensor described otherwise than its stage's lead does) are agreed with
  one all-reduce.
* **no stale reads after ``optimizer.step()``.** Under megatron-core's DDP with
  ``overlap_param_gather=True`` the step updates only this rank's shard of the parameter
  buffer; the other shards arrive with the all-gathers the next forward's pre-hooks finish.
  Before reading (or writing) any weight, :func:`finish_param_gathers` finishes those
  gathers on the source, and waits for any in flight on the destination (see there).
* **execution** is :func:`scoped_parallel.refit.execute.run_plan` (batched point-to-point,
  receives straight into contiguous destination slices, buckets of ``bucket_bytes``),
  because megatron-core 0.17+'s executor synchronises CUDA and 0.16's gloo service
  allocates a CUDA stream.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
import sys
import warnings
from typing import Any, Mapping, NamedTuple

import torch
import torch.distributed as dist

from scoped_parallel.errors import ReshardError, UnsupportedSetupError, describe_state
from scoped_parallel.refit import (
    CastSpec,
    Piece,
    ReshardPlan,
    Transfer,
    box_is_contiguous,
    box_slices,
    pieces_match,
    register_backend,
    resolve_casts,
    unmatched_names,
)
from scoped_parallel.refit.execute import (
    agree, confirm_part, from_each, participants, participants_group, peak_staging, relay_groups, run_plan,
)
from scoped_parallel.refit.staged import WHOLE, Held, StageCopies, TensorRow, merge, own_problems, tiled_tensors
from scoped_parallel.refit.tiled import plan_tiled_local

__all__ = ["MegatronBackend", "canonical_tensors", "finish_param_gathers", "is_expert"]

class _Op(NamedTuple):
    """One receive or send of megatron-core's plan on one rank: its task id (the same at both
    ends), the tensor's name in the view, the peer rank and this rank's slice."""

    task: Any
    name: str
    peer: int
    slice: tuple[slice, ...]


#: what megatron-core's ``extract_param_metadata`` reads from a parameter (0.16-0.19)
_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "partition_sizes", "allreduce")
_EXPERT_INDEX = re.compile(r"^(weight|bias)(\d+)$")


def _resharding() -> tuple[Any, Any]:
    """megatron-core's resharding package and the plan builder of this version."""
    try:
        from megatron.core import resharding
        from megatron.core.resharding import planner
    except ImportError as err:
        try:
            from megatron.core import package_info

            version = package_info.__version__
        except ImportError:
            version = "(not installed)"
        raise UnsupportedSetupError(
            f"megatron-core {version} has no megatron.core.resharding (added in 0.16); "
            "a Megatron refit needs megatron-core >= 0.16"
        ) from err
    build = getattr(planner, "build_local_reshard_plan", None) or resharding.build_centralized_reshard_plan
    return resharding, build


def _chunks(model: Any) -> list[Any]:
    from megatron.core.utils import unwrap_model

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return [unwrap_model(c) for c in chunks]


def _rewrite(name: str, prefixes: dict[str, str]) -> str:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        mapped = prefixes.get(".".join(parts[:i]))
        if mapped is not None:
            return ".".join([mapped, *parts[i:]])
    return name


def canonical_tensors(chunks: list[Any]) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and persistent buffer of a rank's model chunks under its canonical
    name: the same tensor has the same name in any layout (global layer and expert
    numbers; a tied output layer under the word embedding's name)."""
    out: list[tuple[str, torch.Tensor]] = []
    for chunk in chunks:
        layers: dict[str, str] = {}
        experts: dict[str, str] = {}
        buffers: list[tuple[str, torch.Tensor]] = []
        for path, module in chunk.named_modules():
            parts = path.split(".")
            number = getattr(module, "layer_number", None)
            if isinstance(number, int) and len(parts) > 1 and parts[-2] == "layers" and parts[-1].isdigit():
                layers[path] = ".".join([*parts[:-1], str(number - 1)])
            indices = getattr(module, "local_expert_indices", None)
            local = getattr(getattr(module, "experts", None), "local_experts", None)
            if indices is not None and local is not None:
                base = f"{path}.experts.local_experts" if path else "experts.local_experts"
                experts.update({f"{base}.{i}": f"{base}.{g}" for i, g in enumerate(indices)})
            if module._buffers:
                skip = module._non_persistent_buffers_set
                buffers += [(f"{path}.{b}" if path else b, t) for b, t in module._buffers.items() if t is not None and b not in skip]
        tied = bool(getattr(chunk, "share_embeddings_and_output_weights", False))
        for name, tensor in list(chunk.named_parameters()) + buffers:
            canonical = _rewrite(_rewrite(name, experts), layers)
            if tied and name == "output_layer.weight":
                canonical = "embedding.word_embeddings.weight"
            out.append((canonical, tensor))
    return out


class _View(torch.nn.Module):
    """A model's tensors under canonical names, with its state's groups, for megatron-core's
    planner (stand-ins on the meta device) and executor (the real tensors)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], pg_collection: Any, config: Any) -> None:
        super().__init__()
        self._named = named
        self.pg_collection = pg_collection
        self.config = config

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:  # type: ignore[override]
        for name, tensor in self._named:
            yield prefix + name, tensor


def _is_megatron_model(model: Any) -> bool:
    """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
    if "megatron.core" not in sys.modules:  # no Megatron model exists without it
        return False
    from megatron.core.transformer.module import MegatronModule

    try:
        return all(isinstance(c, MegatronModule) for c in _chunks(model))
    except Exception:  # noqa: BLE001 - not a Megatron model
        return False


def _megatron_version() -> tuple[int, int]:
    from megatron.core import package_info

    return tuple(int(x) for x in package_info.__version__.split(".")[:2])  # type: ignore[return-value]


def _gated_fc1(chunks: list[Any]) -> set[int]:
    """``id`` of the ``linear_fc1`` weight and bias of every MLP whose own config is gated
    (SwiGLU: ``[gate, up]`` per TP rank, partition stride 2), for megatron-core < 0.19, which
    leaves the stride at 1 (0.19 sets it on the parameter itself: trusted as it is)."""
    if _megatron_version() >= (0, 19):
        return set()
    out = set()
    for chunk in chunks:
        for module in chunk.named_modules():
            mlp = module[1]
            fc1 = getattr(mlp, "linear_fc1", None)
            if fc1 is not None and bool(getattr(getattr(mlp, "config", None), "gated_linear_unit", False)):
                out.update(id(t) for t in (getattr(fc1, "weight", None), getattr(fc1, "bias", None)) if t is not None)
    return out


def is_expert(name: str, tensor: Any = None) -> bool:
    """Whether the tensor of canonical ``name`` belongs to a routed MoE expert: a path
    component ``experts`` (the MoE layer's ``experts`` module in every megatron-core expert
    class: ``...mlp.experts.local_experts.K.linear_fc1.weight`` of ``SequentialMLP``,
    ``...mlp.experts.weight1`` of ``GroupedMLP``, ``...mlp.experts.linear_fc1.weightK`` of
    ``TEGroupedMLP``; not ``shared_experts``, not the router), or megatron-core's own marker
    ``allreduce=False``.

    The marker alone is not enough: megatron-core sets ``allreduce = not (is_expert and
    expert_parallel)`` (0.16-0.19), so with EP=1 an expert's tensors say ``allreduce=True``
    like a dense tensor, and would be taken as split over the dense TP group instead of
    the expert TP group (TP=2 x EP=1 with expert TP=1: each rank holds the whole expert)."""
    return "experts" in name.split(".") or (tensor is not None and getattr(tensor, "allreduce", True) is False)


def _stand_in(name: str, tensor: torch.Tensor, gated: bool) -> torch.Tensor:
    """A meta tensor with ``tensor``'s shape, dtype and the Megatron sharding attributes
    megatron-core's planner reads (stride 2 where ``gated`` and the parameter says 1;
    ``allreduce=False`` on every expert tensor, :func:`is_expert`, which is how
    megatron-core's planner picks the expert-parallel and expert-TP groups for it)."""
    stand = torch.nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), requires_grad=False)
    for attr in _TP_ATTRS:
        if hasattr(tensor, attr):
            setattr(stand, attr, getattr(tensor, attr))
    if gated and getattr(tensor, "tensor_model_parallel", False) and int(getattr(tensor, "partition_stride", 1)) == 1:
        stand.partition_stride = 2  # type: ignore[attr-defined]
    if is_expert(name, tensor):
        stand.allreduce = False  # type: ignore[attr-defined]
    return stand


def _global_expert_name(name: str, state: Any, experts: int | None) -> str:
    """For the checks only: a grouped-GEMM expert tensor ``...weightK`` under its global
    expert number (megatron-core's planner renames these itself; the view keeps them local)."""
    parts = name.split(".")
    found = _EXPERT_INDEX.match(parts[-1])
    if not found or not experts:
        return name
    per_rank = experts // state.get_expert_model_parallel_world_size()
    parts[-1] = f"{found.group(1)}{state.get_expert_model_parallel_rank() * per_rank + int(found.group(2))}"
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class _Local:
    """One tensor of this rank's chunks: its :class:`~scoped_parallel.refit.staged.TensorRow`
    (global shape, split, expert slot), its ``shape`` here and its name in the planner's
    view (grouped-GEMM expert tensors keep rank-local numbers there)."""

    row: TensorRow
    shape: tuple[int, ...]
    view: str


def _describe(model: Any, state: Any) -> list[_Local]:
    """This rank's tensors of ``model`` as megatron-core's planner reads them (through
    :func:`_stand_in`: stride 2 for a gated fc1 before 0.19, ``allreduce=False`` on every
    expert tensor), split over the expert-TP group for experts, the TP group otherwise."""
    chunks = _chunks(model)
    gated = _gated_fc1(chunks)
    tp = state.get_tensor_model_parallel_world_size()
    etp = state.get_expert_tensor_parallel_world_size()
    slot = state.layout.coordinates(dist.get_rank())["ep"]
    experts = getattr(chunks[0].config, "num_moe_experts", None)
    out = []
    for name, tensor in canonical_tensors(chunks):
        stand = _stand_in(name, tensor, id(tensor) in gated)
        expert = is_expert(name, tensor)
        sharded = bool(getattr(stand, "tensor_model_parallel", False))
        ways = (etp if expert else tp) if sharded else 1
        dim = int(getattr(stand, "partition_dim", 0)) if sharded else None
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] *= ways
        row = TensorRow(
            _global_expert_name(name, state, experts) if expert else name, tuple(shape), str(tensor.dtype),
            tensor.element_size(), ("etp" if expert else "tp") if sharded else WHOLE, dim,
            int(getattr(stand, "partition_stride", 1)) if sharded else 1, ways, slot if expert else -1,
        )
        out.append(_Local(row, tuple(tensor.shape), name))
    return out


def _built_in(chunks: list[Any], state: Any, role: str, collection: Any) -> list[str]:
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


def _by_name(described: list[tuple[int, _Local]], role: str, problems: list[str]) -> dict[str, Held]:
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


def _match(src: Mapping[str, Held], dst: Mapping[str, Held]) -> list[str]:
    """The reasons the destination cannot be filled from the source, per tensor (names,
    global shapes, TP tiling; dtypes are :func:`~scoped_parallel.refit.plan.resolve_casts`'s)."""
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


def _box(slices: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(slices, shape):
        start, stop, _ = s.indices(n)
        out.append((start, stop))
    return tuple(out)


def _reroute_replicated(transfers: list[Transfer], full_reads: set[int], src_global: dict[tuple[int, str], str],
                        dst_global: dict[tuple[int, str], str], shapes_src: dict[tuple[int, str], tuple[int, ...]]) -> list[str]:
    """Give a holder to each whole-tensor read of an expert's tensor that megatron-core's
    replicated fallback (``_finalize_dp_transfers``) sent to a rank without that tensor;
    returns the destination names of the reads it moved.

    That fallback takes the source from the parameter's dense data-parallel group. An expert's
    tensor that TP does not shard (``linear_fc2.bias``) is held only by the ranks of its
    expert-parallel slot, so across EP sizes the fallback reads it from ranks without it
    (EP=4 -> EP=2, 4 ranks: expert 1's bias read on rank 0). Holders are found by global
    name (``src_global``/``dst_global``: (rank, name in the view) -> name with global layer
    and expert numbers; grouped-GEMM view names are rank-local), and the tensor is whole on
    every holder, so any holder is right: the destination rank itself where it holds it (a
    local copy), else the holders in turn by destination rank. Only the transfers indexed in
    ``full_reads`` (the source slice was the whole tensor) into expert tensors are touched;
    the global-name pairing check and ``ReshardPlan.check()`` still judge the result."""
    holders: dict[str, list[tuple[int, str]]] = {}
    for (rank, view), name in sorted(src_global.items()):
        holders.setdefault(name, []).append((rank, view))
    moved = []
    for i in sorted(full_reads):
        t = transfers[i]
        wanted = dst_global[(t.dst_rank, t.dst_name)]
        found = holders.get(wanted)
        if not is_expert(wanted) or not found or src_global.get((t.src_rank, t.src_name)) == wanted:
            continue
        views = dict(found)
        rank = t.dst_rank if t.dst_rank in views else found[t.dst_rank % len(found)][0]
        view = views[rank]
        box = tuple((0, n) for n in shapes_src[(rank, view)])
        transfers[i] = Transfer(rank, t.dst_rank, view, t.dst_name, box, t.dst_box, t.itemsize)
        moved.append(t.dst_name)
    return moved


def _misnamed(transfers: list[Transfer], src_global: dict[tuple[int, str], str], dst_global: dict[tuple[int, str], str]) -> list[str]:
    """Transfers that read another tensor than the one they write, by global name (a plan
    that pairs a grouped-GEMM expert with another expert would otherwise pass every size check)."""
    return [
        f"transfer into {dst_global[(t.dst_rank, t.dst_name)]!r} on rank {t.dst_rank} reads "
        f"{src_global.get((t.src_rank, t.src_name), t.src_name)!r} on rank {t.src_rank}"
        for t in transfers
        if src_global.get((t.src_rank, t.src_name)) not in (None, dst_global[(t.dst_rank, t.dst_name)])
    ]


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


def _version_text() -> str:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except ImportError:  # pragma: no cover - megatron-core without package_info
        return "(unknown version)"


def _param_sync_steps(model: Any, role: str) -> tuple[list[Any], list[str]]:
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
      ``align_param_gather``, a refit between micro-batches) is finished on a source with the
      group's own ``finish_param_sync(skip_next_bucket_dispatch=True)``: dispatched if need be,
      waited for, its post-processing (FP8 / MXFP8 copies) done, and marked done, so the next
      forward's hooks find nothing left to do;
    * on a destination only a gather in flight is waited for (it would land on the refitted
      values); one never dispatched gathers, at the next forward, shards that the refit has
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
            f"the {role} model's megatron-core {_version_text()} DistributedDataParallel gathers parameters lazily "
            "(overlap_param_gather=True) but has none of bucket_groups / expert_parallel_bucket_groups with "
            f"{', '.join(_BUCKET_GROUP_ATTRS)}, nor start_param_sync(force_sync=True): its weights may be a step old "
            "and cannot be made current here; run one forward of the model (or build its DDP with "
            "overlap_param_gather=False) before the refit"
        )
    return steps, problems


def finish_param_gathers(model: Any, role: str = "source") -> int:
    """Finish what megatron-core's DDP left pending on ``model`` (see :func:`_param_sync_steps`),
    so that a ``role="source"`` model's parameters on this rank hold the last step's weights
    and no gather is in flight on either model. Collective over each bucket group's
    data-parallel group (every rank of it finds the same groups pending: megatron-core's own
    forward hooks rely on that as well). Raises ReshardError, before any communication, where
    the wrapper's names are unknown. Returns the number of bucket groups (or wrappers) finished."""
    steps, problems = _param_sync_steps(model, role)
    if problems:
        raise ReshardError("cannot refit (nothing was moved): " + "; ".join(problems))
    with torch.no_grad():
        for step in steps:
            step()
    return len(steps)


# ---------------------------------------------------------------- per-rank planning


def _global_named(model: Any, state: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """``(global name, tensor, expert)`` of every tensor of this rank's chunks of ``model``
    (grouped-GEMM expert tensors renamed to their global expert numbers)."""
    chunks = _chunks(model)
    experts = getattr(chunks[0].config, "num_moe_experts", None)
    out = []
    for name, tensor in canonical_tensors(chunks):
        expert = is_expert(name, tensor)
        out.append((_global_expert_name(name, state, experts) if expert else name, tensor, expert))
    return out


#: the bucket the plan's staging figure assumes (the executor's default)
_BUCKET = 1 << 26


class MegatronBackend:
    """The ``"megatron"`` reshard backend: each rank plans its own part (see the module docstring)."""

    name = "megatron"
    #: the states may lie on other, overlapping or partial rank sets of the world
    partial_ranks = True

    def claims(self, model: Any) -> bool:
        """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
        return _is_megatron_model(model)

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """This rank's part of the checked plan (collective over the ranks of both states)."""
        ranks = participants(src_state, dst_state)
        group = participants_group(src_state, dst_state, ranks)
        me = dist.get_rank()
        local: list[str] = []
        sides = []
        for role, model, state in (("source", src_model, src_state), ("destination", dst_model, dst_state)):
            mine: list[TensorRow] = []
            if model is not None:
                chunks = _chunks(model)
                local += _built_in(chunks, state, role, state.process_group_collection())
                local += _param_sync_steps(model, role)[1]
                mine = [local.row for local in _describe(model, state)]
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
        everywhere += unmatched_names(src, {name: held.first for name, held in dst.items()})
        everywhere += _match(src, dst)
        casts, cast_problems = resolve_casts(cast, {n: (src[n].row.dtype, h.row.dtype) for n, h in dst.items() if n in src})
        everywhere += cast_problems
        agree(local, group, "this pair of Megatron models", everywhere=everywhere)

        part = plan_tiled_local(me, tiled_tensors(src, dst, casts), src_copies, dst_copies, backend="megatron", participants=ranks)
        confirm_part(part, group)
        notes = (
            "planner: scoped_parallel.refit.tiled.plan_tiled_local (each rank plans its own part from both layouts' "
            "descriptions, broadcast once from one rank per pipeline stage and expert slot); executor: "
            "scoped_parallel.refit.execute.run_plan; a source split on its first dimension into replicas on the same "
            f"ranks is one all-gather per bucket over its TP group; staging: peak extra bytes with bucket_bytes={_BUCKET}",
        )
        return dataclasses.replace(part, staging={me: peak_staging(part, _BUCKET)}, notes=notes)

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any,
                bucket_bytes: int = _BUCKET, service: Any = None) -> dict[int, int] | None:
        """Run this rank's part of ``plan``; returns the bytes sent by peer, or None on every
        rank when the models no longer hold the planned pieces (nothing moved)."""
        if service is not None:  # the same on every rank: all raise before anything moves
            raise ReshardError("reshard(..., service=...) runs megatron-core's own executor on megatron-core's own plan: "
                               "pass backend='megatron-core' as well (nothing was moved)")
        rank = dist.get_rank()
        group = participants_group(src_state, dst_state, participants(src_state, dst_state))
        held = []
        for model, state, role in ((src_model, src_state, "source"), (dst_model, dst_state, "destination")):
            if model is not None:  # before any weight is read or written: the last step on every shard
                finish_param_gathers(model, role)
            held.append({n: t.data for n, t, _ in _global_named(model, state)} if model is not None else {})
        src, dst = held

        def pieces(tensors: dict[str, torch.Tensor]) -> list[Piece]:
            return [Piece(rank, n, tuple(t.shape), t.element_size()) for n, t in tensors.items()]

        if not pieces_match(plan, pieces(src), pieces(dst), group=group):
            return None
        gather_groups = relay_groups(plan, src_state, dst_state)
        if src_model is not None:
            gather_groups.update({src_state.ranks(k): src_state.group(k) for k in ("tp", "etp") if k in src_state.kinds()})
        return run_plan(plan, src, dst, group=group, bucket_bytes=bucket_bytes, gather_groups=gather_groups)


class MegatronCoreBackend:
    """The ``"megatron-core"`` reshard backend: megatron-core's own planner (global: both
    states on the whole world; see the module docstring), and with ``service=`` its executor."""

    name = "megatron-core"

    def claims(self, model: Any) -> bool:
        """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
        return _is_megatron_model(model)

    def _views(self, model: Any) -> tuple[list[Any], list[tuple[str, torch.Tensor]], set[int]]:
        chunks = _chunks(model)
        return chunks, canonical_tensors(chunks), _gated_fc1(chunks)

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """The checked plan (collective over the world; see the module docstring). ``cast``:
        ``reshard``'s ``dtype=`` (dtypes as strings), resolved per canonical name (global
        layer and expert numbers) on the gathered dtypes, so every rank decides alike."""
        resharding, build = _resharding()
        src_chunks, src_named, src_gated = self._views(src_model)
        dst_chunks, dst_named, dst_gated = self._views(dst_model)
        src_groups, dst_groups = src_state.process_group_collection(), dst_state.process_group_collection()
        experts = getattr(src_chunks[0].config, "num_moe_experts", None)
        local = _built_in(src_chunks, src_state, "source", src_groups) + _built_in(dst_chunks, dst_state, "destination", dst_groups)
        local += _param_sync_steps(src_model, "source")[1] + _param_sync_steps(dst_model, "destination")[1]
        for role, named in (("source", src_named), ("destination", dst_named)):
            twice = sorted(n for n, count in Counter(n for n, _ in named).items() if count > 1)
            if twice:
                local.append(f"{role} tensors {twice[:3]} appear twice under their canonical names")
        world = dist.get_world_size()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (local, _describe(src_model, src_state), _describe(dst_model, dst_state)))
        # every decision below is made on that one gather: (rank, _Local) per tensor of each side
        src_locals = [(r, one) for r, g in enumerate(gathered) for one in g[1]]
        dst_locals = [(r, one) for r, g in enumerate(gathered) for one in g[2]]
        problems = [f"rank {r}: {p}" for r, (probs, _, _) in enumerate(gathered) for p in probs]
        src, dst = _by_name(src_locals, "source", problems), _by_name(dst_locals, "destination", problems)
        problems += _match(src, dst)
        casts, cast_problems = resolve_casts(cast, {n: (src[n].row.dtype, h.row.dtype) for n, h in dst.items() if n in src})
        problems += cast_problems
        if problems:
            raise ReshardError("cannot refit this pair of Megatron models (nothing was moved):\n  " + "\n  ".join(problems[:20]))

        src_view = _View([(n, _stand_in(n, t, id(t) in src_gated)) for n, t in src_named], src_groups, src_chunks[0].config)
        dst_view = _View([(n, _stand_in(n, t, id(t) in dst_gated)) for n, t in dst_named], dst_groups, dst_chunks[0].config)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                local_plan = build(src_view, dst_view, num_experts=experts)
        except Exception as err:  # megatron-core 0.19+: raised on every rank alike
            raise ReshardError(f"megatron-core's planner refused the pair: {err}") from err

        ops = ([_Op(o.task_id, o.param_name, o.peer_rank, o.my_slice) for o in local_plan.recv_ops],
               [_Op(o.task_id, o.param_name, o.peer_rank, o.my_slice) for o in local_plan.send_ops])
        all_ops: list[Any] = [None] * world
        dist.all_gather_object(all_ops, ops)
        src_at = {(r, one.view): one for r, one in src_locals}  # (rank, name in the view) -> that rank's tensor
        dst_at = {(r, one.view): one for r, one in dst_locals}
        sends = {op.task: (r, op) for r, (_, rank_sends) in enumerate(all_ops) for op in rank_sends}
        transfers: list[Transfer] = []
        unpaired: list[str] = []
        full_reads: set[int] = set()
        for r, (recvs, _) in enumerate(all_ops):
            for op in recvs:
                sender, send = sends.pop(op.task, (None, None))
                if send is None or sender != op.peer or send.peer != r:
                    unpaired.append(f"receive {op.task} of {op.name!r} on rank {r} from rank {op.peer} has no matching send")
                    continue
                held = src_at.get((op.peer, send.name))
                if all(s == slice(None) for s in send.slice):
                    full_reads.add(len(transfers))
                target = dst_at[(r, op.name)]
                transfers.append(Transfer(op.peer, r, send.name, op.name, _box(send.slice, held.shape if held else ()),
                                          _box(op.slice, target.shape), target.row.itemsize))
        unpaired += [f"send {task} of {op.name!r} from rank {r} to rank {op.peer} has no matching receive" for task, (r, op) in sends.items()]
        if unpaired:
            raise ReshardError("megatron-core's plan does not pair up (nothing was moved):\n  " + "\n  ".join(unpaired[:20]))
        src_global = {key: one.row.name for key, one in src_at.items()}
        dst_global = {key: one.row.name for key, one in dst_at.items()}
        rerouted = _reroute_replicated(transfers, full_reads, src_global, dst_global, {key: one.shape for key, one in src_at.items()})
        if casts:  # the sender converts: the wire carries the destination's dtype (Transfer.itemsize is already its)
            transfers = [dataclasses.replace(t, cast=casts[dst_global[(t.dst_rank, t.dst_name)]])
                         if dst_global[(t.dst_rank, t.dst_name)] in casts else t for t in transfers]
        misnamed = _misnamed(transfers, src_global, dst_global)
        if misnamed:
            raise ReshardError("megatron-core's plan copies between different tensors (nothing was moved):\n  " + "\n  ".join(misnamed[:20]))

        transfers.sort(key=lambda t: (t.dst_name, t.dst_rank, t.dst_box))
        sources = tuple(Piece(r, one.view, one.shape, one.row.itemsize, one.row.dtype) for r, one in src_locals)
        targets = tuple(Piece(r, one.view, one.shape, one.row.itemsize, one.row.dtype) for r, one in dst_locals)
        staging: dict[int, int] = {r: 0 for r in range(world)}
        for t in transfers:
            held = src_at.get((t.src_rank, t.src_name))  # None: a wrong holder, which check() reports
            if t.cast or (not t.local and held is not None and not box_is_contiguous(t.src_box, held.shape)):
                staging[t.src_rank] += t.nbytes  # a copy of the box: converted to the wire dtype, or made contiguous
            if not box_is_contiguous(t.dst_box, dst_at[(t.dst_rank, t.dst_name)].shape):
                staging[t.dst_rank] += t.nbytes
        notes = (
            f"planner: megatron-core {build.__module__}.{build.__name__}; executor: scoped_parallel.refit.execute.run_plan "
            "(staging = receive buffers of non-contiguous destination boxes + copies of non-contiguous or converted source boxes)",
        ) + ((f"{len(rerouted)} whole-tensor reads of expert tensors rerouted to a rank that holds them (megatron-core's "
               "replicated fallback picks from the dense DP group; expert tensors not sharded by TP live on their EP ranks "
               f"only): {', '.join(sorted(set(rerouted))[:4])}{', ...' if len(set(rerouted)) > 4 else ''}",)
             if rerouted else ())
        return ReshardPlan("megatron", tuple(transfers), sources, targets, staging, notes)

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any,
                service: Any = None, bucket_bytes: int = 1 << 26) -> dict[int, int] | None:
        """Run this rank's part of ``plan`` with ``run_plan`` (or megatron-core's executor and
        ``service``, a ``CopyService`` or backend name); returns the bytes sent by peer ({} with
        ``service``), or None on every rank when the models no longer hold the planned pieces."""
        rank = dist.get_rank()
        if service is not None and any(t.cast for t in plan.transfers):  # the plan is the same on every rank
            raise ReshardError("reshard(..., dtype=..., service=...): megatron-core's executor copies without converting; "
                               "leave service= out to run the cast with scoped_parallel's executor (nothing was moved)")
        # before any weight is read or written: the source's last step on every shard, no gather in flight
        finish_param_gathers(src_model, "source")
        finish_param_gathers(dst_model, "destination")
        src = dict(canonical_tensors(_chunks(src_model)))
        dst = dict(canonical_tensors(_chunks(dst_model)))

        def pieces(tensors: dict[str, torch.Tensor]) -> list[Piece]:
            return [Piece(rank, n, tuple(t.shape), t.element_size(), str(t.dtype)) for n, t in tensors.items()]

        if not pieces_match(plan, pieces(src), pieces(dst)):
            return None
        if service is None:
            return run_plan(plan, {n: t.data for n, t in src.items()}, {n: t.data for n, t in dst.items()}, bucket_bytes=bucket_bytes)
        resharding, _ = _resharding()
        op = resharding.TransferOp
        mplan = resharding.ReshardPlan(
            [op(t.src_name, t.dst_rank, True, box_slices(t.src_box), box_slices(t.dst_box), task_id=i) for i, t in plan.for_rank(rank) if t.src_rank == rank],
            [op(t.dst_name, t.src_rank, False, box_slices(t.dst_box), box_slices(t.src_box), task_id=i) for i, t in plan.for_rank(rank) if t.dst_rank == rank],
        )
        if isinstance(service, str):
            service = resharding.get_or_create_service(service)
        resharding.execute_reshard_plan(mplan, _View(list(src.items()), None, None), _View(list(dst.items()), None, None), service=service)
        return {}


register_backend(MegatronBackend())
register_backend(MegatronCoreBackend())
