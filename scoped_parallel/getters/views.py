"""Views of a state for other libraries: a DeviceMesh and Megatron's ``ProcessGroupCollection``.

Both hand a library that takes process groups explicitly the state's *own* groups; no
communicator is created. ``ParallelState.device_mesh()`` and
``ParallelState.process_group_collection()`` are these two functions:

* :func:`device_mesh`: a ``torch.distributed.device_mesh.DeviceMesh`` whose dimensions
  are the state's groups of those axes (FSDP2, DTensor, torchtitan-style code);
* :func:`process_group_collection`: a megatron-core ``ProcessGroupCollection`` (or any
  dataclass with its field names) whose fields hold what
  ``ProcessGroupCollection.use_mpu_process_groups()`` finds inside the state's scope;
  :data:`COLLECTION_FIELDS` is that mapping. The one place the core imports megatron-core,
  lazily, inside the function.

Like the rest of :mod:`scoped_parallel.getters`, the module imports no torch when it loads
(torch and megatron-core are imported inside the functions).

Worked example on 8 ranks, ``tensor_model_parallel_size=2, pipeline_model_parallel_size=2``,
rank 5: ``device_mesh(state)`` has ``mesh_dim_names == ("pp", "dp", "tp")`` and its
``"tp"`` dimension is the group (4, 5); ``process_group_collection(state).dp`` is the
data parallel group (5, 7).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scoped_parallel.errors import LayoutError, UnsupportedSetupError
from scoped_parallel.layout.grid import DENSE_AXES

__all__ = ["COLLECTION_FIELDS", "device_mesh", "process_group_collection"]

#: ``ProcessGroupCollection`` field -> (state method, keyword arguments): what
#: ``ProcessGroupCollection.use_mpu_process_groups()`` asks parallel_state for, in every
#: supported megatron-core minor (a method of "" is Megatron's constant ``None``).
COLLECTION_FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp": ("get_tensor_model_parallel_group", {}),
    "pp": ("get_pipeline_model_parallel_group", {}),
    "mp": ("get_model_parallel_group", {}),
    "embd": ("get_embedding_group", {"check_initialized": False}),
    "pos_embd": ("get_position_embedding_group", {"check_initialized": False}),
    "cp": ("get_context_parallel_group", {}),
    "tp_cp": ("get_tensor_and_context_parallel_group", {}),
    "hcp": ("get_hierarchical_context_parallel_groups", {"check_initialized": False}),
    "ep": ("get_expert_model_parallel_group", {}),
    "expt_tp": ("get_expert_tensor_parallel_group", {}),
    "tp_ep": ("get_expert_tensor_and_model_parallel_group", {}),
    "tp_ep_pp": ("get_expert_tensor_model_pipeline_parallel_group", {}),
    "tp_ep_pp_with_egtp_remat": ("get_expert_tensor_model_pipeline_parallel_group", {"with_egtp_remat": True}),
    "tp_dp_cp": ("get_tensor_and_data_parallel_group", {"with_context_parallel": True}),
    "dp": ("get_data_parallel_group", {}),
    "dp_cp": ("get_data_parallel_group", {"with_context_parallel": True}),
    "dp_cp_gtp_remat": ("get_data_parallel_group", {"with_context_parallel": True}),
    "dp_cp_ag": ("", {}),  # megatron-core 0.18+: filled by the caller from create_all_gather_groups()
    "expt_dp": ("get_expert_data_parallel_group", {}),
    "expt_dp_gtp_remat": ("get_expert_data_parallel_group", {}),
    "expt_dp_ag": ("", {}),
    "gtp_remat": ("get_gtp_weight_remat_group", {"check_initialized": False}),
    "expt_gtp_remat": ("get_expert_gtp_weight_remat_group", {"check_initialized": False}),
    "intra_dp_cp": ("get_data_parallel_group", {"with_context_parallel": True, "partial_data_parallel": True}),
    "intra_expt_dp": ("get_expert_data_parallel_group", {"partial_expert_data_parallel": True}),
    "inter_dist_opt": ("get_inter_distributed_optimizer_instance_group", {"check_initialized": False}),
    "intra_dist_opt": ("get_intra_distributed_optimizer_instance_group", {"check_initialized": False}),
}


def process_group_collection(state: Any, required_pgs: list[str] | None = None, collection_class: Any = None) -> Any:
    """Megatron's ``ProcessGroupCollection`` holding ``state``'s own groups (see
    ``ParallelState.process_group_collection``)."""
    cls = collection_class
    if cls is None:
        try:
            from megatron.core import process_groups_config as pgc
        except ImportError as err:
            raise ImportError(
                "state.process_group_collection() needs megatron-core (pip install "
                "'scoped-parallel[megatron]')"
            ) from err
        cls = getattr(pgc, "ProcessGroupCollection", None) or getattr(pgc, "ModelCommProcessGroups", None)
        if cls is None:
            raise UnsupportedSetupError(
                "this megatron-core has neither ProcessGroupCollection nor ModelCommProcessGroups; "
                "pass collection_class= explicitly"
            )
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"collection_class must be a dataclass of process groups, got {cls!r}")
    defined = [f.name for f in dataclasses.fields(cls)]
    names = defined if required_pgs is None else list(required_pgs)
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise ValueError(f"unknown process group fields {unknown}; {cls.__name__} defines {defined}")
    strange = [n for n in names if n not in COLLECTION_FIELDS]
    if strange:
        raise UnsupportedSetupError(
            f"{cls.__name__} fields {strange} are not known to scoped_parallel (known: "
            f"{sorted(COLLECTION_FIELDS)}); pass required_pgs without them"
        )
    collection = cls()
    for name in names:
        method, kwargs = COLLECTION_FIELDS[name]
        setattr(collection, name, getattr(state, method)(**kwargs) if method else None)
    return collection


def device_mesh(state: Any, dims: tuple[str, ...] | None = None, device_type: str | None = None) -> Any:
    """A DeviceMesh over ``state``'s own groups (see ``ParallelState.device_mesh``)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    state.groups.check_member()
    layout = state.layout
    sizes = layout.sizes()
    tokens = [t for t in layout.order.split("-") if t in DENSE_AXES]
    if dims is None:
        dims = tuple(t for t in reversed(tokens) if sizes[t] > 1) or ("dp",)
    dims = tuple(dims)
    bad = [d for d in dims if d not in tokens]
    missing = [t for t in tokens if sizes[t] > 1 and t not in dims]
    if bad or missing or len(set(dims)) != len(dims):
        raise LayoutError(
            f"device_mesh(dims={dims!r}): dims must be distinct axes from {tokens} and include "
            f"every axis of size > 1 ({[t for t in tokens if sizes[t] > 1]}); "
            f"unknown: {bad}, missing: {missing}"
        )
    # Ranks of the state as a grid with one dimension per order token, slowest first.
    grid = torch.arange(layout.world_size, dtype=torch.int).reshape(
        [sizes[t] for t in reversed(tokens)]
    ) + layout.rank_offset
    axes = list(reversed(tokens))
    keep = list(dims) + [t for t in axes if t not in dims]
    mesh = grid.permute([axes.index(t) for t in keep]).reshape([sizes[t] for t in dims])
    groups = [state.groups.group(d) for d in dims]
    if device_type is None:
        device_type = "cuda" if str(dist.get_backend(groups[0])) == "nccl" else "cpu"
    return DeviceMesh.from_group(
        groups if len(groups) > 1 else groups[0],
        device_type,
        mesh=mesh if len(groups) > 1 else mesh.reshape(-1).tolist(),
        mesh_dim_names=dims,
    )
