"""Run a :class:`~scoped_parallel.resharding.plan.ReshardPlan` with torch's point-to-point calls.

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

The backends' agreement among the ranks of a reshard lives here too: :func:`from_each`
(descriptions broadcast from the ranks that hold them), :func:`agree` (one error on every
rank, or none) and :func:`confirm_part` (rank parts planned alone fit together).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from scoped_parallel.errors import ReshardError
from scoped_parallel.resharding.plan import Box, Gather, ReshardPlan, Transfer, box_is_contiguous, box_slices
from scoped_parallel.resharding.tiled import pairing_holds

__all__ = ["agree", "comm_device", "confirm_part", "from_each", "participants", "participants_group", "peak_staging", "relay_groups", "run_plan"]


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


def _buckets(plan: ReshardPlan, bucket_bytes: int) -> tuple[list[int], dict[str, int]]:
    """The bucket of each transfer and of each tensor, from the plan alone (every rank
    computes the same); kept on the plan for the next run."""
    memo = plan.__dict__.setdefault("_buckets_memo", {})  # a frozen dataclass; this bypasses nothing it checks
    if bucket_bytes not in memo:
        memo[bucket_bytes] = _cut(plan, bucket_bytes)
    return memo[bucket_bytes]  # type: ignore[no-any-return]


def _cut(plan: ReshardPlan, bucket_bytes: int) -> tuple[list[int], dict[str, int]]:
    """A global plan is cut by its transfers' place in it; a rank's part (which lists only
    its own transfers) by the tensor order every rank shares (``plan.order``), whole tensors
    per bucket, so that both ends of every transfer put it in the same bucket."""
    if plan.rank is not None:
        of_tensor: dict[str, int] = {}
        filled, bucket = 0, 0
        for name, nbytes in plan.order:
            if filled and filled + nbytes > bucket_bytes:
                bucket, filled = bucket + 1, 0
            of_tensor[name] = bucket
            filled += nbytes
        return [of_tensor[t.dst_name] for t in plan.transfers], of_tensor
    out, filled, bucket = [], 0, 0
    for t in plan.transfers:
        if filled and filled + t.nbytes > bucket_bytes:
            bucket, filled = bucket + 1, 0
        out.append(bucket)
        filled += t.nbytes
    return out, {}


def _run_gathers(gathers: list[Gather], rank: int, sources: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                 groups: Mapping[tuple[int, ...], object], sent: dict[int, int]) -> None:
    """One bucket's gathers: per (group, wire dtype), in one order on every member, this
    rank's partitions (converted, zero-padded to ``part``) side by side in one buffer, one
    ``all_gather_into_tensor``, and every member's ranges copied into the whole destination
    tensors. Peak extra memory: the send buffer and the gathered one (about the bucket)."""
    batches: dict[tuple[tuple[int, ...], str], list[Gather]] = {}
    for g in gathers:
        batches.setdefault((g.group, g.dtype, g.relay), []).append(g)
    for (members, dtype_name, _), batch in sorted(batches.items()):
        group = groups[members]
        device = comm_device(group)
        index = members.index(rank)
        dtype = _wire_dtype(dtype_name)
        width = sum(g.part for g in batch)
        mine = torch.zeros(width, dtype=dtype, device=device)
        offset = 0
        for g in batch:
            start, stop = g.span(index)
            # a relay's member contributes what it received into its destination (already converted)
            held = targets[g.name].view(-1)[start:stop] if g.relay else sources[g.name].view(-1)[: stop - start]
            mine[offset: offset + stop - start].copy_(held)
            offset += g.part
        gathered = torch.empty(width * len(members), dtype=dtype, device=device)
        dist.all_gather_into_tensor(gathered, mine, group=group)
        offset = 0
        for g in batch:
            target = targets[g.name].view(-1)
            for i, peer in enumerate(members):
                start, stop = g.span(i)
                if stop > start:
                    base = i * width + offset
                    target[start:stop].copy_(gathered[base: base + stop - start])
                    if peer != members[index]:
                        sent[peer] = sent.get(peer, 0) + (g.span(index)[1] - g.span(index)[0]) * g.itemsize
            offset += g.part


def _wire_order(t: Transfer) -> tuple[object, ...]:
    """The order in which a bucket's transfers are posted: the same for the two ends of each pair."""
    return (t.dst_name, t.dst_box, t.src_name, t.src_box, t.src_rank, t.dst_rank)


def run_plan(
    plan: ReshardPlan,
    sources: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    *,
    group: object = None,
    bucket_bytes: int = 1 << 26,
    gather_groups: Mapping[tuple[int, ...], object] | None = None,
) -> dict[int, int]:
    """Copy this rank's part of ``plan``: read boxes of ``sources`` (this rank's source
    pieces by name), write boxes of ``targets``. Point-to-point over ``group`` (ranks are
    global ranks; the default group unless given); the plan's gathers run on
    ``gather_groups[ranks]`` (the process group of those ranks), bucket by bucket before
    that bucket's point-to-point batch, in one order on every rank. Returns the bytes this
    rank sent (a gather: its own range, once per peer), by peer (for comparison with the
    plan's prediction)."""
    rank = dist.get_rank()
    device = comm_device(group)
    bucket_of, tensor_bucket = _buckets(plan, bucket_bytes)
    mine = plan.for_rank(rank)
    sent: dict[int, int] = {}
    gathers: dict[int, list[Gather]] = {}
    for g in plan.gathers:
        gathers.setdefault(tensor_bucket.get(g.name, 0), []).append(g)
    with torch.no_grad():
        for bucket in sorted({bucket_of[i] for i, _ in mine} | set(gathers)):
            first = [g for g in gathers.get(bucket, []) if not g.relay]
            if first:
                _run_gathers(first, rank, sources, targets, gather_groups or {}, sent)
            ops: list[dist.P2POp] = []
            writebacks: list[tuple[torch.Tensor, torch.Tensor]] = []
            # one order at both ends of every pair (the two ends of a per-rank plan list a pair's
            # transfers in orders of their own; messages between two ranks match in posting order)
            for _, t in sorted(((i, t) for i, t in mine if bucket_of[i] == bucket), key=lambda it: _wire_order(it[1])):
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
            relayed = [g for g in gathers.get(bucket, []) if g.relay]
            if relayed:  # after the bucket's receives: each member passes on what it received
                _run_gathers(relayed, rank, sources, targets, gather_groups or {}, sent)
    return sent


def peak_staging(part: ReshardPlan, bucket_bytes: int) -> int:
    """Peak extra bytes :func:`run_plan` needs on the rank of ``part`` (a rank's part of a
    plan) with ``bucket_bytes``: per bucket, the copies of its sends that are converted or
    not contiguous, the buffers of its receives into non-contiguous boxes, plus its largest
    gather batch (the send buffer and the gathered buffer)."""
    bucket_of, tensor_bucket = _buckets(part, bucket_bytes)
    shapes = {("src", p.name): p.shape for p in part.sources if p.rank == part.rank}
    shapes.update({("dst", p.name): p.shape for p in part.targets if p.rank == part.rank})
    per_bucket: dict[int, int] = {}
    for i, t in part.for_rank(part.rank):  # type: ignore[arg-type]
        staged = t.src_rank == part.rank and (
            bool(t.cast) or (not t.local and not box_is_contiguous(t.src_box, shapes.get(("src", t.src_name), ()))))
        received = t.dst_rank == part.rank and not t.local and not box_is_contiguous(t.dst_box, shapes.get(("dst", t.dst_name), ()))
        if staged or received:
            per_bucket[bucket_of[i]] = per_bucket.get(bucket_of[i], 0) + t.nbytes * (int(staged) + int(received))
    batches: dict[tuple[int, tuple[int, ...], str], int] = {}
    for g in part.gathers:
        key = (tensor_bucket[g.name], g.group, g.dtype)
        batches[key] = batches.get(key, 0) + g.part * g.itemsize
    gathered: dict[int, int] = {}
    for (bucket, group, _), width in batches.items():
        gathered[bucket] = max(gathered.get(bucket, 0), width * (len(group) + 1))
    return max([per_bucket.get(b, 0) + gathered.get(b, 0) for b in set(per_bucket) | set(gathered)], default=0)


class _ParticipantGroups:
    """One state's process groups over the ranks of two states (its
    ``adapter_record("reshard-participants")``), released when the state is destroyed."""

    def __init__(self, state: object) -> None:
        self.groups: dict[tuple[int, ...], object] = {}

    def state_destroyed(self, state: object) -> None:
        from scoped_parallel.groups import create

        for group in self.groups.values():
            create.release(group)
        self.groups.clear()


#: per participant rank set, how many reshard groups over it this process has made
_MADE_OVER: dict[tuple[int, ...], int] = {}


def participants(src_state: object, dst_state: object) -> tuple[int, ...]:
    """The ranks of either state, ascending: the ranks a reshard between them runs on."""
    return tuple(sorted(set(src_state.layout.ranks) | set(dst_state.layout.ranks)))  # type: ignore[attr-defined]


def participants_group(src_state: object, dst_state: object, ranks: tuple[int, ...]) -> object:
    """The process group over ``ranks`` (:func:`participants`): None (the default group)
    when they are the whole world, else one group made member-only (only these ranks call
    this, in the same order), shared with an identical group, held by both states and
    released with the first of them destroyed."""
    if len(ranks) == dist.get_world_size():
        return None
    return _held_group(src_state, dst_state, ranks, "reshard")


def relay_groups(part: ReshardPlan, src_state: object, dst_state: object) -> dict[tuple[int, ...], object]:
    """The process groups of the relays this rank's part takes part in (``Gather.relay``: replicas
    on ranks outside the source that all-gather what each received), by their ranks: made
    member-only, in ascending order of their ranks on every member (so no two members wait
    on each other), held by both states like the participants' group."""
    wanted = sorted({g.group for g in part.gathers if g.relay})
    return {ranks: _held_group(src_state, dst_state, ranks, "reshard relay") for ranks in wanted}


def _held_group(src_state: object, dst_state: object, ranks: tuple[int, ...], what: str) -> object:
    """The group over ``ranks`` both states hold for reshards (made once, member-only)."""
    from scoped_parallel.groups import create

    held = [s.adapter_record("reshard-participants", _ParticipantGroups) for s in (src_state, dst_state)]  # type: ignore[attr-defined]
    if all(ranks in h.groups for h in held):
        return held[0].groups[ranks]
    # the how-manyth group over these ranks this process makes: every member makes each one
    # (they all call this), so the number agrees, and a group made again after its states
    # were destroyed is never named like the old one (torch keeps a destroyed group's store keys)
    number = _MADE_OVER.get(ranks, 0)
    _MADE_OVER[ranks] = number + 1
    tag = f"{what}:{number}:{src_state.layout.fingerprint()}:{dst_state.layout.fingerprint()}"  # type: ignore[attr-defined]
    group = None
    for h in held:
        if ranks not in h.groups:
            h.groups[ranks] = create.acquire(create.GroupRequest(ranks=ranks, desc=f"scoped_parallel {what}", tag=tag), share=True)
        group = h.groups[ranks]
    return group


# ------------------------------------------------------------------ agreement among the participants


def from_each(value: object, senders: Sequence[int], group: object = None) -> list[object]:
    """``value`` as each of ``senders`` holds it, in that order, on every rank of ``group``
    (one ``broadcast_object_list`` per sender: the bytes are the senders' values, not the
    group's size times the largest)."""
    me = dist.get_rank()
    out = []
    for sender in senders:
        box = [value if me == sender else None]
        dist.broadcast_object_list(box, src=sender, group=group)
        out.append(box[0])
    return out


def agree(problems: list[str], group: object = None, what: str = "this pair of models", everywhere: Sequence[str] = ()) -> None:
    """Raise the same ReshardError on every rank of ``group`` if any has a problem (one small
    all-reduce; the problems themselves are gathered only then). ``everywhere``: problems
    every rank found alike (from data they all hold), listed once after the ranks' own."""
    flag = torch.tensor([len(problems) + len(everywhere)], device=comm_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return
    everyone: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (dist.get_rank(), problems), group=group)
    lines = [f"rank {r}: {p}" for r, probs in sorted(everyone) for p in probs]  # type: ignore[misc]
    lines += list(everywhere)
    raise ReshardError(f"cannot reshard {what} (nothing was moved):\n  " + "\n  ".join(lines[:20]))


def confirm_part(part: ReshardPlan, group: object = None) -> None:
    """That every rank's part of a plan planned alone (``part.rank`` set) is sound and that
    the parts fit together: each rank's local checks plus one all-reduce of the pairing
    digests (every send has its receive); a problem anywhere raises the same ReshardError
    on every rank of ``group``, before anything moves."""
    found = part.problems()
    sums = torch.tensor(list(part.pairing) + [len(found)], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(sums, group=group)
    if sums[4].item() or not pairing_holds(sums[:4].tolist()):  # the same answer on every rank: all raise
        agree(found if sums[4].item() else ["the ranks' sends and receives do not pair up (a planner bug)"], group)
