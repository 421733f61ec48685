"""``state.device_mesh()``: a torch ``DeviceMesh`` over a state's own groups.

No communicator is created; each mesh dimension is the state's group of that
axis, so torch code that takes a mesh (FSDP2, DTensor) runs on the same groups
as the getters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout import DENSE_AXES

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = ["device_mesh"]


def device_mesh(state: ParallelState, dims: tuple[str, ...] | None = None, device_type: str | None = None) -> Any:
    """A ``torch.distributed.device_mesh.DeviceMesh`` over this state's own groups.

    No communicator is created: each mesh dimension is the state's group of that axis.
    ``dims`` names the dimensions, outermost first, from ``tp``, ``cp``, ``sp``, ``dp``,
    ``pp``; by default every axis of size > 1 in the layout's order, slowest first
    (e.g. ``("pp", "dp", "tp")`` for the default order), or ``("dp",)`` when all are 1.
    Every axis of size > 1 must be named, so the mesh covers exactly the state's ranks.
    """
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    state._require("tp")
    sizes = state.layout.sizes()
    tokens = [t for t in state.layout.order.split("-") if t in DENSE_AXES]
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
    grid = torch.arange(state.layout.world_size, dtype=torch.int).reshape(
        [sizes[t] for t in reversed(tokens)]
    ) + state.layout.rank_offset
    axes = list(reversed(tokens))
    keep = list(dims) + [t for t in axes if t not in dims]
    mesh = grid.permute([axes.index(t) for t in keep]).reshape([sizes[t] for t in dims])
    if device_type is None:
        device_type = "cuda" if str(dist.get_backend(state.group(dims[0]))) == "nccl" else "cpu"
    groups = [state.group(d) for d in dims]
    return DeviceMesh.from_group(
        groups if len(groups) > 1 else groups[0],
        device_type,
        mesh=mesh if len(groups) > 1 else mesh.reshape(-1).tolist(),
        mesh_dim_names=dims,
    )
