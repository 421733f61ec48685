"""Rank-side helpers of the Megatron reshard tests: megatron-core GPTModels built in scopes
(no group passed), their full logits through Megatron's own forward-only schedule, and one
reshard scenario per call.

CPU shims as in ``examples/megatron_two_models.py`` (``cpu_shims``). Source and destination
get different initial weights (seeds 1 and 2), so a destination element that the reshard
does not write shows up in the logits.
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import _megatron_gpt as gpt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "megatron_two_models.py"
VOCAB, SEQ, BATCH = 64, 8, 2


def example() -> Any:
    module = sys.modules.get("megatron_two_models_example")
    if module is None:
        spec = importlib.util.spec_from_file_location("megatron_two_models_example", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def build(layout: dict[str, int], seed: int, swiglu: bool = False, experts: int = 0, layers: int = 4, tied: bool = False,
          bf16: bool = False, expert_bias: bool = False) -> list[Any]:
    """This rank's chunks of a tiny GPTModel laid out by the active scope's state; ``bf16``:
    each chunk wrapped in megatron-core's ``Float16Module`` (bf16 weights, as mixed-precision
    training holds them), which the reshard unwraps."""
    gpt.parallel_state()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if experts:
        gpt.moe_shim()
    vpp = layout.get("vpp", 1)
    moe = dict(num_moe_experts=experts, moe_router_topk=2, moe_token_dispatcher_type="allgather",
               moe_grouped_gemm=False, moe_aux_loss_coeff=0.0, add_bias_linear=expert_bias,
               expert_model_parallel_size=layout.get("ep", 1), expert_tensor_parallel_size=layout.get("etp")) if experts else {}
    config = gpt.cpu_config(
        num_layers=layers, tensor_model_parallel_size=layout.get("tp", 1), pipeline_model_parallel_size=layout.get("pp", 1),
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        gated_linear_unit=swiglu, activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        **moe,
    )
    spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False) if experts else get_gpt_layer_local_spec()
    chunks = gpt.gpt_chunks(config, spec, VOCAB, SEQ, seed, share_embeddings_and_output_weights=tied)
    if expert_bias:  # megatron-core zeroes biases: give each expert its own, the same on every holder
        from scoped_parallel.adapters.megatron_reshard import canonical_tensors

        filled = 0
        for name, tensor in canonical_tensors(chunks):
            if ".experts." in name and name.endswith("bias"):
                g = torch.Generator().manual_seed(seed * 100_003 + zlib.crc32(name.encode()))
                tensor.data.copy_(torch.randn(tensor.shape, generator=g))
                filled += 1
        assert filled, "no expert bias found to fill"
    if bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    return chunks


def tokens(seed: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return ids, positions, mask


def logits(chunks: list[Any]) -> torch.Tensor:
    """The model's full logits ``[batch, seq, vocab]`` on every rank (Megatron's forward-only
    schedule in the active scope, vocab shards gathered over TP, handed out from the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward(data: Any, model: Any) -> Any:
        ids, positions, mask = next(data)
        out = model(ids, positions, mask)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach().clone()})

    batch = tokens()
    for chunk in chunks:  # inference: MoE with TP refuses training mode without sequence parallelism
        chunk.eval()
    micro = ps.get_pipeline_model_parallel_world_size()  # the interleaved schedule wants >= PP micro-batches
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward,
            data_iterator=[iter([batch] * micro) for _ in chunks] if len(chunks) > 1 else iter([batch] * micro),
            model=chunks, num_microbatches=micro, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
        )
    mine = None
    if results:
        shard = results[0]["logits"]
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        mine = torch.cat(parts, dim=-1)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next(x for x in everyone if x is not None)


def _state(name: str, layout: dict[str, int]) -> Any:
    from scoped_parallel import ParallelState

    offset, size = layout.get("ranks", (0, None))  # a state on ranks offset .. offset + size - 1 only
    return ParallelState(
        name=name, tensor_model_parallel_size=layout.get("tp", 1), pipeline_model_parallel_size=layout.get("pp", 1),
        expert_model_parallel_size=layout.get("ep", 1), expert_tensor_parallel_size=layout.get("etp"),
        world_size=size, rank_offset=offset,
    )


def _built(state: Any, layout: dict[str, int], seed: int, **model: Any) -> list[Any]:
    from megatron.core import parallel_state as ps

    with state.activate():
        if layout.get("vpp", 1) > 1:
            ps.set_virtual_pipeline_model_parallel_world_size(layout["vpp"])
        return build(layout, seed, **model)


def snapshot(chunks: list[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for c in chunks for p in c.parameters()]


def full_weights(chunks: list[Any] | None, state: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a dense model whole, by canonical name, on every rank of the world: the
    TP shards gathered (``all_gather_object`` over the world, a tiny model; a rank outside
    ``state`` passes None and contributes nothing) and joined on their partition dim in TP
    rank order (stride 1: not for SwiGLU's fc1)."""
    from scoped_parallel.adapters.megatron_reshard import canonical_tensors

    from megatron.core.utils import unwrap_model

    tp_rank = state.get_tensor_model_parallel_rank() if chunks is not None else 0
    mine = []
    for name, tensor in canonical_tensors([unwrap_model(c) for c in chunks or []]):
        dim = int(tensor.partition_dim) if getattr(tensor, "tensor_model_parallel", False) else None
        mine.append((name, tp_rank, dim, tensor.detach().cpu().clone()))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    shards: dict[str, dict[int, tuple[Any, torch.Tensor]]] = {}
    for rows in everyone:
        for name, rank, dim, tensor in rows:
            shards.setdefault(name, {})[rank if dim is not None else 0] = (dim, tensor)
    out = {}
    for name, by_rank in shards.items():
        dim = next(iter(by_rank.values()))[0]
        parts = [by_rank[r][1] for r in sorted(by_rank)]
        out[name] = torch.cat(parts, dim=dim) if dim is not None else parts[0]
    return out


def rank_reshard(rank: int, src_layout: dict[str, int], dst_layout: dict[str, int], model: dict[str, Any], sabotage: str = "") -> dict[str, Any]:
    """Build both models in their states, reshard, and report logits and the plan's facts.

    ``sabotage``: "wrong-state" passes a destination state of another layout (expects a
    ReshardError and an untouched destination); "swap-shard" runs a plan whose first two
    remote transfers into one tensor have their sources swapped; "uncast" reshards an fp32
    source into a bf16 destination without ``dtype=`` (expects a ReshardError and an
    untouched destination). Not a sabotage: "service" runs the plan with megatron-core's own
    executor (``reshard(..., service=)``) and the CPU copy service above, which counts the
    bytes sent; "cast-bf16" plans and reshards with ``dtype=torch.bfloat16`` and reports
    whether every destination tensor equals the gathered source's ``.to(torch.bfloat16)``.
    ``model["dst_bf16"]``: only the destination is built in bf16 (``Float16Module``).
    """
    import scoped_parallel as sp
    from scoped_parallel import adapters

    ex = example()
    out: dict[str, Any] = {}
    states = [_state("src", src_layout), _state("dst", dst_layout)]
    try:
        with ex.cpu_shims(), adapters.installed(targets=("megatron",)):
            src_state, dst_state = states
            model = dict(model)
            backend = {"backend": model.pop("backend")} if "backend" in model else {}
            dst_model = dict(model, bf16=True) if model.pop("dst_bf16", False) else dict(model)
            src = _built(src_state, src_layout, 1, **model)
            dst = _built(dst_state, dst_layout, 2, **dict(dst_model, layers=2) if sabotage == "other-architecture" else dst_model)
            with src_state.activate():
                out["src logits"] = logits(src)
            with dst_state.activate():
                out["dst logits before"] = logits(dst)
            if sabotage in ("other-architecture", "wrong-state", "uncast"):
                target = dst_state
                if sabotage == "wrong-state":
                    target = _state("wrong", {"tp": 2} if dst_layout.get("tp", 1) != 2 else {"tp": 1})
                    states.append(target)
                before = snapshot(dst)
                try:
                    sp.reshard(src, src_state, dst, target, **backend)  # "uncast": fp32 into bf16, no dtype=
                    out["error"] = None
                except sp.ReshardError as err:
                    out["error"] = str(err)
                out["dst untouched"] = all(torch.equal(a, b) for a, b in zip(before, snapshot(dst)))
                return out
            cast = {"dtype": torch.bfloat16} if sabotage == "cast-bf16" else {}
            plan = sp.plan_reshard(src, src_state, dst, dst_state, **cast, **backend)
            out["cached"] = sp.plan_reshard(src, src_state, dst, dst_state, **cast, **backend) is plan
            out["report"] = plan.report()
            out["problems"] = plan.problems()
            out["predicted sent"] = {d: b for (s, d), b in plan.bytes_between().items() if s == rank}
            if sabotage == "swap-shard":
                plan = _swap_first_sources(plan)
            if sabotage == "raw-stride":  # megatron-core's planner on the model's own attributes, no stride fix
                from scoped_parallel.adapters.megatron_reshard import local, names

                fc1 = next(p for c in src for n, p in c.named_parameters() if n.endswith("linear_fc1.weight"))
                out["model's own fc1 stride"] = int(getattr(fc1, "partition_stride", 1))
                fixed = names.stand_in
                names.stand_in = lambda name, tensor, gated: fixed(name, tensor, False)
                try:
                    plan = local.MegatronBackend().plan(src, src_state, dst, dst_state)
                finally:
                    names.stand_in = fixed
            if sabotage == "service":
                service = ex.cpu_copy_service()
                done = sp.reshard(src, src_state, dst, dst_state, plan=plan, service=service, **backend)
                out["sent"] = dict(sorted(service.sent.items()))
                out["reshard sent"] = done.sent  # {} by contract: the bytes are the service's to count
            else:
                done = sp.reshard(src, src_state, dst, dst_state, plan=plan, **backend)
                out["sent"] = done.sent
            if sabotage == "cast-bf16":
                want, got = full_weights(src, src_state), full_weights(dst, dst_state)
                out["weights are the source's .to(bfloat16)"] = sorted(want) == sorted(got) and all(
                    got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n].to(torch.bfloat16)) for n in want)
            with dst_state.activate():
                out["dst logits"] = logits(dst)
            out["plan transfers"] = len(plan.transfers)
    finally:
        for state in states:
            state.destroy()
    return out


def _swap_first_sources(plan: Any) -> Any:
    """This rank's part of the plan with the destination boxes of its first two receives into
    one weight swapped (same sizes: the checks pass, the data lands in the wrong place; the
    senders' parts are unchanged, so the messages still pair up). Every rank receiving two
    such boxes swaps them; a rank with none keeps its part."""
    import dataclasses

    transfers = list(plan.transfers)
    me = plan.rank
    seen: dict[str, int] = {}
    for i, t in enumerate(transfers):
        if t.dst_rank != me or not t.dst_name.endswith("weight") or "norm" in t.dst_name:
            continue
        j = seen.setdefault(t.dst_name, i)
        other = transfers[j]
        if j != i and other.dst_box != t.dst_box and [b - a for a, b in other.dst_box] == [b - a for a, b in t.dst_box]:
            transfers[j] = dataclasses.replace(other, dst_box=t.dst_box)
            transfers[i] = dataclasses.replace(t, dst_box=other.dst_box)
            return dataclasses.replace(plan, transfers=tuple(transfers))
    return plan


def rank_reshards(rank: int, cases: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """``rank_reshard`` for every case, in one world call; logits reduced to the facts the tests need."""
    out = {}
    for name, case in cases.items():
        got = rank_reshard(rank, *case)
        src = got.pop("src logits")
        before = got.pop("dst logits before")
        after = got.pop("dst logits", None)
        got["before diff"] = float((before - src).abs().max())
        if after is not None:
            got["bitwise"] = bool(torch.equal(after, src))
            got["max diff"] = float((after - src).abs().max())
        out[name] = got
    return out


def rank_disjoint_reshards(rank: int, cases: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Per case ``(source layout, destination layout, model options[, dtype])``, each layout
    placed on its own ranks (``"ranks": (offset, size)``): both models built only on their
    state's ranks, one ``reshard`` on the ranks of either state (the others do not call), and
    the destination's whole weights compared with the source's (or their ``.to(dtype)``) bit
    for bit, by canonical name. ``"other architecture"`` in the options builds a 2-layer
    destination and expects a ReshardError on every participant, nothing moved."""
    import scoped_parallel as sp
    from scoped_parallel import adapters

    ex = example()
    out: dict[str, Any] = {}
    with ex.cpu_shims(), adapters.installed(targets=("megatron",)):
        for name, (src_layout, dst_layout, model, *rest) in cases.items():
            dtype = rest[0] if rest else None
            model = dict(model)
            other = model.pop("other architecture", False)
            dst_model = dict(model, bf16=True) if dtype is torch.bfloat16 else dict(model)
            if other:
                dst_model["layers"] = 2
            copies = dst_layout if isinstance(dst_layout, list) else [dst_layout]  # several: one reshard call into all
            states = [_state("src", src_layout)] + [_state(f"dst{i}", layout) for i, layout in enumerate(copies)]
            src_state, dst_states = states[0], states[1:]
            try:
                src = _built(src_state, src_layout, 1, **model) if src_state.is_member else None
                dsts = [_built(state, layout, 2 + i, **dst_model) if state.is_member else None
                        for i, (state, layout) in enumerate(zip(dst_states, copies))]
                dst = next((d for d in dsts if d is not None), None)
                dst_state = next((s for s, d in zip(dst_states, dsts) if d is not None), dst_states[0])
                got: dict[str, Any] = {"called": src is not None or dst is not None}
                before = snapshot(dst) if dst is not None else []
                if got["called"]:
                    try:
                        if len(copies) > 1:
                            done_each = sp.reshard(src, src_state, dsts, dst_states, dtype=dtype)
                            ran = [d for d in done_each if d is not None]
                            plans, sent = [d.plan for d in ran], {}
                            for d in ran:
                                for peer, n in d.sent.items():
                                    sent[peer] = sent.get(peer, 0) + n
                            got["calls"] = len(ran)
                        else:
                            plans = [sp.plan_reshard(src, src_state, dst, dst_state, dtype=dtype)]
                            sent = sp.reshard(src, src_state, dst, dst_state, dtype=dtype).sent
                            from scoped_parallel.resharding import whole_plan

                            whole = whole_plan(plans[0], src_state, dst_state)
                            got["whole"] = {"problems": whole.problems(), "ranks": whole.ranks,
                                            "bytes": sum(whole.bytes_between().values()), "report": whole.report()}
                        predicted: dict[int, int] = {}
                        for plan in plans:
                            for (s, d), n in plan.bytes_between().items():
                                if s == rank:
                                    predicted[d] = predicted.get(d, 0) + n
                        got.update(problems=[p for plan in plans for p in plan.problems()], sent=sent, predicted=predicted,
                                   gathers=sum(len(plan.gathers) for plan in plans),
                                   participants=tuple(sorted({r for plan in plans for r in plan.participants})), error=None)
                    except sp.ReshardError as err:
                        got["error"] = str(err)
                if dst is not None:
                    got["untouched"] = all(torch.equal(a, b) for a, b in zip(before, snapshot(dst)))
                dist.barrier()  # the test's own sync: the next case starts together
                if not other:
                    want = full_weights(src, src_state)
                    got["equal"], got["names"] = True, len(want)
                    for state, model_chunks in zip(dst_states, dsts):
                        have = full_weights(model_chunks, state)
                        got["equal"] = got["equal"] and sorted(want) == sorted(have) and all(
                            torch.equal(have[n], want[n].to(dtype) if dtype is not None else want[n]) for n in want)
                out[name] = got
            finally:
                for state in states:
                    state.destroy()
    return out


def megatron_executor_runs() -> bool:
    """Whether megatron-core's own executor runs here (the example's check)."""
    return bool(example().megatron_executor_runs())
