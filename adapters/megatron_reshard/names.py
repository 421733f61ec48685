"""What a megatron-core model holds, by canonical name (the Megatron reshard backends' first job).

Every parameter and persistent buffer of a rank's model chunks gets one *canonical* name,
the same in any layout: global layer number from ``layer_number``, global expert number
from the MoE layer's ``local_expert_indices``, a tied output weight under the word
embedding's name. :func:`describe` turns this rank's tensors into
:class:`~scoped_parallel.resharding.staged.TensorRow` s as megatron-core's planner reads them
(:func:`stand_in`: stride 2 for a gated fc1 before 0.19, ``allreduce=False`` on every expert
tensor, :func:`is_expert` by name as well as by marker).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import torch
import torch.distributed as dist

from scoped_parallel.resharding.staged import WHOLE, TensorRow

__all__ = ["Local", "canonical_tensors", "chunks_of", "describe", "gated_fc1", "global_expert_name", "global_named", "is_expert",
           "is_megatron_model", "megatron_version", "stand_in", "version_text"]

#: what megatron-core's ``extract_param_metadata`` reads from a parameter (0.16-0.19)
_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "partition_sizes", "allreduce")
_EXPERT_INDEX = re.compile(r"^(weight|bias)(\d+)$")


def chunks_of(model: Any) -> list[Any]:
    """``model``'s chunks (one module or the list of virtual-pipeline chunks), each unwrapped
    from DDP / ``Float16Module`` with megatron-core's ``unwrap_model``."""
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


def is_megatron_model(model: Any) -> bool:
    """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
    if "megatron.core" not in sys.modules:  # no Megatron model exists without it
        return False
    from megatron.core.transformer.module import MegatronModule

    try:
        return all(isinstance(c, MegatronModule) for c in chunks_of(model))
    except Exception:  # noqa: BLE001 - not a Megatron model
        return False


def megatron_version() -> tuple[int, int]:
    from megatron.core import package_info

    return tuple(int(x) for x in package_info.__version__.split(".")[:2])  # type: ignore[return-value]


def gated_fc1(chunks: list[Any]) -> set[int]:
    """``id`` of the ``linear_fc1`` weight and bias of every MLP whose own config is gated
    (SwiGLU: ``[gate, up]`` per TP rank, partition stride 2), for megatron-core < 0.19, which
    leaves the stride at 1 (0.19 sets it on the parameter itself: trusted as it is)."""
    if megatron_version() >= (0, 19):
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


def stand_in(name: str, tensor: torch.Tensor, gated: bool) -> torch.Tensor:
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


def global_expert_name(name: str, state: Any, experts: int | None) -> str:
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
class Local:
    """One tensor of this rank's chunks: its :class:`~scoped_parallel.resharding.staged.TensorRow`
    (global shape, split, expert slot), its ``shape`` here and its name in the planner's
    view (grouped-GEMM expert tensors keep rank-local numbers there)."""

    row: TensorRow
    shape: tuple[int, ...]
    view: str


def describe(model: Any, state: Any) -> list[Local]:
    """This rank's tensors of ``model`` as megatron-core's planner reads them (through
    :func:`stand_in`: stride 2 for a gated fc1 before 0.19, ``allreduce=False`` on every
    expert tensor), split over the expert-TP group for experts, the TP group otherwise."""
    chunks = chunks_of(model)
    gated = gated_fc1(chunks)
    tp = state.get_tensor_model_parallel_world_size()
    etp = state.get_expert_tensor_parallel_world_size()
    slot = state.layout.coordinates(dist.get_rank())["ep"]
    experts = getattr(chunks[0].config, "num_moe_experts", None)
    out = []
    for name, tensor in canonical_tensors(chunks):
        stand = stand_in(name, tensor, id(tensor) in gated)
        expert = is_expert(name, tensor)
        sharded = bool(getattr(stand, "tensor_model_parallel", False))
        ways = (etp if expert else tp) if sharded else 1
        dim = int(getattr(stand, "partition_dim", 0)) if sharded else None
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] *= ways
        row = TensorRow(
            global_expert_name(name, state, experts) if expert else name, tuple(shape), str(tensor.dtype),
            tensor.element_size(), ("etp" if expert else "tp") if sharded else WHOLE, dim,
            int(getattr(stand, "partition_stride", 1)) if sharded else 1, ways, slot if expert else -1,
        )
        out.append(Local(row, tuple(tensor.shape), name))
    return out


def version_text() -> str:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except ImportError:  # pragma: no cover - megatron-core without package_info
        return "(unknown version)"


def global_named(model: Any, state: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """``(global name, tensor, expert)`` of every tensor of this rank's chunks of ``model``
    (grouped-GEMM expert tensors renamed to their global expert numbers)."""
    chunks = chunks_of(model)
    experts = getattr(chunks[0].config, "num_moe_experts", None)
    out = []
    for name, tensor in canonical_tensors(chunks):
        expert = is_expert(name, tensor)
        out.append((global_expert_name(name, state, experts) if expert else name, tensor, expert))
    return out


