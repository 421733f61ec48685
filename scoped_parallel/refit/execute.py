"""Run a :class:`~scoped_parallel.refit.plan.ReshardPlan` with torch's point-to-point calls.

Every rank walks the same plan in the same order: transfers are cut into buckets of about
``bucket_bytes`` by their place in the plan (so the ranks agree on the cut without
talking), and each bucket is one ``batch_isend_irecv`` that every rank waits for before
the next. A receive lands straight in the destination tensor when its box is contiguous
there (flat partitions always are), else in a buffer copied in afterwards; a send reads
the source box in place when it is contiguous. Local transfers are plain copies.

A transfer with a ``cast`` (``reshard(..., dtype=)``) is converted on the sending side:
the sender sends ``box.to(cast)`` (so the wire carries the destination's dtype and its
bytes), and a local copy converts the same way; the receiver gets exactly the destination's
dtype. The bytes reported sent are those of the tensors handed to ``isend``.

All transfers go over one device, :func:`comm_device` (the GPU under NCCL, else the CPU):
a tensor elsewhere (ZeRO-3 partitions offloaded to host memory, under NCCL) is sent from a
copy on that device and received into a buffer there, then copied in. On CPU with gloo
nothing is staged (the staging path needs a GPU to run).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

from scoped_parallel.refit.plan import Box, ReshardPlan, box_is_contiguous, box_slices

__all__ = ["comm_device", "run_plan"]


def comm_device(group: object = None) -> torch.device:
    """The one device every rank communicates from over ``group``: this process's current
    GPU where NCCL is the group's CUDA backend (``"nccl"``, ``"cpu:gloo,cuda:nccl"``) and a
    GPU is present, else the CPU. Every rank derives it from the group's configuration alone,
    so sender and receiver always use the same backend for a transfer."""
    config = str(dist.get_backend_config(group))
    backends = dict(part.split(":", 1) for part in config.split(",") if ":" in part) or {"cuda" if config == "nccl" else "cpu": config}
    if backends.get("cuda") == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _view(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    return tensor[box_slices(box)]


def _wire_dtype(cast: str) -> torch.dtype:
    """``"torch.bfloat16"`` -> ``torch.bfloat16`` (a plan spells dtypes as strings)."""
    dtype = getattr(torch, cast.split(".", 1)[-1], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the plan casts to {cast!r}, which is no torch dtype")
    return dtype


def _buckets(plan: ReshardPlan, bucket_bytes: int) -> list[int]:
    """The bucket of each transfer, from the plan alone (every rank computes the same);
    kept on the plan for the next run."""
    memo = plan.__dict__.setdefault("_buckets_memo", {})  # a frozen dataclass; this bypasses nothing it checks
    if bucket_bytes not in memo:
        memo[bucket_bytes] = _cut(plan, bucket_bytes)
    return memo[bucket_bytes]  # type: ignore[no-any-return]


def _cut(plan: ReshardPlan, bucket_bytes: int) -> list[int]:
    out, filled, bucket = [], 0, 0
    for t in plan.transfers:
        if filled and filled + t.nbytes > bucket_bytes:
            bucket, filled = bucket + 1, 0
        out.append(bucket)
        filled += t.nbytes
    return out


def run_plan(
    plan: ReshardPlan,
    sources: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    *,
    group: object = None,
    bucket_bytes: int = 1 << 26,
) -> dict[int, int]:
    """Copy this rank's part of ``plan``: read boxes of ``sources`` (this rank's source
    pieces by name), write boxes of ``targets``. Collective over ``group`` (the default
    group: the plan's ranks are global ranks). Returns the bytes this rank sent, by peer
    (for comparison with the plan's prediction)."""
    rank = dist.get_rank()
    device = comm_device(group)
    bucket_of = _buckets(plan, bucket_bytes)
    mine = plan.for_rank(rank)
    sent: dict[int, int] = {}
    with torch.no_grad():
        for bucket in sorted({bucket_of[i] for i, _ in mine}):
            ops: list[dist.P2POp] = []
            writebacks: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i, t in mine:
                if bucket_of[i] != bucket:
                    continue
                if t.local:
                    data = _view(sources[t.src_name], t.src_box)
                    _view(targets[t.dst_name], t.dst_box).copy_(data.to(_wire_dtype(t.cast)) if t.cast else data)
                elif t.src_rank == rank:
                    data = _view(sources[t.src_name], t.src_box)
                    data = data.to(device, dtype=_wire_dtype(t.cast) if t.cast else None).contiguous()
                    ops.append(dist.P2POp(dist.isend, data, t.dst_rank, group=group))
                    sent[t.dst_rank] = sent.get(t.dst_rank, 0) + data.numel() * data.element_size()
                else:
                    target = targets[t.dst_name]
                    view = _view(target, t.dst_box)
                    if box_is_contiguous(t.dst_box, tuple(target.shape)) and target.is_contiguous() and target.device == device:
                        ops.append(dist.P2POp(dist.irecv, view, t.src_rank, group=group))
                    else:
                        buffer = torch.empty(view.shape, dtype=view.dtype, device=device)
                        ops.append(dist.P2POp(dist.irecv, buffer, t.src_rank, group=group))
                        writebacks.append((view, buffer))
            if ops:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            for view, buffer in writebacks:
                view.copy_(buffer)
    return sent
