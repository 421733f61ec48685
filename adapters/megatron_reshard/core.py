"""The ``"megatron-core"`` reshard backend: megatron-core's own planner, and with ``service=`` its executor.

Chosen by name (``backend="megatron-core"``). megatron-core plans
(``build_local_reshard_plan`` on 0.19+, ``build_centralized_reshard_plan`` on 0.16-0.18)
over flat views of the models under canonical names; its ops are gathered from every rank
and paired into one global :class:`~scoped_parallel.resharding.plan.ReshardPlan` (both states on
the whole world), checked, with two repairs: whole-tensor reads of expert tensors from ranks
that lack them are rerouted to a holder (:func:`reroute_replicated`), and a transfer between
tensors of different global names is refused (:func:`misnamed_transfers`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from scoped_parallel.adapters.megatron_reshard import checks
from scoped_parallel.adapters.megatron_reshard.names import (
    canonical_tensors, chunks_of, describe, gated_fc1, is_expert, is_megatron_model, stand_in,
)
from scoped_parallel.errors import ReshardError, UnsupportedSetupError
from scoped_parallel.resharding import CastSpec, Piece, ReshardPlan, Transfer, box_is_contiguous, box_slices, pieces_match, resolve_casts
from scoped_parallel.resharding.execute import run_plan

__all__ = ["MegatronCoreBackend", "misnamed_transfers", "reroute_replicated", "resharding_api"]


class _Op(NamedTuple):
    """One receive or send of megatron-core's plan on one rank: its task id (the same at both
    ends), the tensor's name in the view, the peer rank and this rank's slice."""

    task: Any
    name: str
    peer: int
    slice: tuple[slice, ...]


def resharding_api() -> tuple[Any, Any]:
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
            "a Megatron reshard needs megatron-core >= 0.16"
        ) from err
    build = getattr(planner, "build_local_reshard_plan", None) or resharding.build_centralized_reshard_plan
    return resharding, build


class View(torch.nn.Module):
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


def _box(slices: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(slices, shape):
        start, stop, _ = s.indices(n)
        out.append((start, stop))
    return tuple(out)


def reroute_replicated(transfers: list[Transfer], full_reads: set[int], src_global: dict[tuple[int, str], str],
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


def misnamed_transfers(transfers: list[Transfer], src_global: dict[tuple[int, str], str], dst_global: dict[tuple[int, str], str]) -> list[str]:
    """Transfers that read another tensor than the one they write, by global name (a plan
    that pairs a grouped-GEMM expert with another expert would otherwise pass every size check)."""
    return [
        f"transfer into {dst_global[(t.dst_rank, t.dst_name)]!r} on rank {t.dst_rank} reads "
        f"{src_global.get((t.src_rank, t.src_name), t.src_name)!r} on rank {t.src_rank}"
        for t in transfers
        if src_global.get((t.src_rank, t.src_name)) not in (None, dst_global[(t.dst_rank, t.dst_name)])
    ]


class MegatronCoreBackend:
    """The ``"megatron-core"`` reshard backend: megatron-core's own planner (global: both
    states on the whole world; see the module docstring), and with ``service=`` its executor."""

    name = "megatron-core"

    def claims(self, model: Any) -> bool:
        """Whether every chunk of ``model`` (unwrapped) is a megatron-core ``MegatronModule``."""
        return is_megatron_model(model)

    def _views(self, model: Any) -> tuple[list[Any], list[tuple[str, torch.Tensor]], set[int]]:
        chunks = chunks_of(model)
        return chunks, canonical_tensors(chunks), gated_fc1(chunks)

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """The checked plan (collective over the world; see the module docstring). ``cast``:
        ``reshard``'s ``dtype=`` (dtypes as strings), resolved per canonical name (global
        layer and expert numbers) on the gathered dtypes, so every rank decides alike."""
        resharding, build = resharding_api()
        src_chunks, src_named, src_gated = self._views(src_model)
        dst_chunks, dst_named, dst_gated = self._views(dst_model)
        src_groups, dst_groups = src_state.process_group_collection(), dst_state.process_group_collection()
        experts = getattr(src_chunks[0].config, "num_moe_experts", None)
        local = checks.built_in(src_chunks, src_state, "source", src_groups) + checks.built_in(dst_chunks, dst_state, "destination", dst_groups)
        local += checks.param_sync_steps(src_model, "source")[1] + checks.param_sync_steps(dst_model, "destination")[1]
        for role, named in (("source", src_named), ("destination", dst_named)):
            twice = sorted(n for n, count in Counter(n for n, _ in named).items() if count > 1)
            if twice:
                local.append(f"{role} tensors {twice[:3]} appear twice under their canonical names")
        world = dist.get_world_size()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (local, describe(src_model, src_state), describe(dst_model, dst_state)))
        # every decision below is made on that one gather: (rank, Local) per tensor of each side
        src_locals = [(r, one) for r, g in enumerate(gathered) for one in g[1]]
        dst_locals = [(r, one) for r, g in enumerate(gathered) for one in g[2]]
        problems = [f"rank {r}: {p}" for r, (probs, _, _) in enumerate(gathered) for p in probs]
        src, dst = checks.by_name(src_locals, "source", problems), checks.by_name(dst_locals, "destination", problems)
        problems += checks.match(src, dst)
        casts, cast_problems = resolve_casts(cast, {n: (src[n].row.dtype, h.row.dtype) for n, h in dst.items() if n in src})
        problems += cast_problems
        if problems:
            raise ReshardError("cannot reshard this pair of Megatron models (nothing was moved):\n  " + "\n  ".join(problems[:20]))

        src_view = View([(n, stand_in(n, t, id(t) in src_gated)) for n, t in src_named], src_groups, src_chunks[0].config)
        dst_view = View([(n, stand_in(n, t, id(t) in dst_gated)) for n, t in dst_named], dst_groups, dst_chunks[0].config)
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
        rerouted = reroute_replicated(transfers, full_reads, src_global, dst_global, {key: one.shape for key, one in src_at.items()})
        if casts:  # the sender converts: the wire carries the destination's dtype (Transfer.itemsize is already its)
            transfers = [dataclasses.replace(t, cast=casts[dst_global[(t.dst_rank, t.dst_name)]])
                         if dst_global[(t.dst_rank, t.dst_name)] in casts else t for t in transfers]
        wrong = misnamed_transfers(transfers, src_global, dst_global)
        if wrong:
            raise ReshardError("megatron-core's plan copies between different tensors (nothing was moved):\n  " + "\n  ".join(wrong[:20]))

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
            f"planner: megatron-core {build.__module__}.{build.__name__}; executor: scoped_parallel.resharding.execute.run_plan "
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
        checks.finish_param_gathers(src_model, "source")
        checks.finish_param_gathers(dst_model, "destination")
        src = dict(canonical_tensors(chunks_of(src_model)))
        dst = dict(canonical_tensors(chunks_of(dst_model)))

        def pieces(tensors: dict[str, torch.Tensor]) -> list[Piece]:
            return [Piece(rank, n, tuple(t.shape), t.element_size(), str(t.dtype)) for n, t in tensors.items()]

        if not pieces_match(plan, pieces(src), pieces(dst)):
            return None
        if service is None:
            return run_plan(plan, {n: t.data for n, t in src.items()}, {n: t.data for n, t in dst.items()}, bucket_bytes=bucket_bytes)
        resharding, _ = resharding_api()
        op = resharding.TransferOp
        mplan = resharding.ReshardPlan(
            [op(t.src_name, t.dst_rank, True, box_slices(t.src_box), box_slices(t.dst_box), task_id=i) for i, t in plan.for_rank(rank) if t.src_rank == rank],
            [op(t.dst_name, t.src_rank, False, box_slices(t.dst_box), box_slices(t.src_box), task_id=i) for i, t in plan.for_rank(rank) if t.dst_rank == rank],
        )
        if isinstance(service, str):
            service = resharding.get_or_create_service(service)
        resharding.execute_reshard_plan(mplan, View(list(src.items()), None, None), View(list(dst.items()), None, None), service=service)
        return {}


