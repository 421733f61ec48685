"""Reshard planning cost per rank: the per-rank planner against the global one, and its curve to 8,192 ranks.

    python benchmarks/reshard_planning.py [--json benchmarks/reshard_planning.json]

Pure functions, one process: each row plans what ONE rank of a world of N ranks does (the
rank in the middle of the world), for a 70B-like model: the shapes of an 80-layer Llama
with hidden 8,192, FFN 28,672, 8 KV heads of 128 and a 128,256-token vocabulary (723
tensors, bf16), in three flat layout pairs:

* **ZeRO-3 -> replicas**: partitioned over all N ranks, resharded into a whole replica on
  each of them (the RL actor -> rollout copy on the same GPUs): one all-gather per tensor;
* **ZeRO-3 -> ZeRO-3 x8**: partitioned over all N ranks, resharded into 8 copies each
  partitioned over N/8 ranks (another DP split: point-to-point, each rank receives from
  the few ranks whose range overlaps its own);
* **ZeRO-3 -> replicas, disjoint**: an actor on ranks 0..N/2-1, replicas on N/2..N-1 (rollout
  GPUs apart): a relay (each source rank sends its range to one replica of the group of
  N/2, which then all-gathers); planned for a source rank and for a replica.

and in two Megatron layout pairs, planned from the compact per-stage descriptions the
``"megatron"`` backend exchanges (``scoped_parallel.resharding.staged``: each side's holders
derived from its ``ParallelLayout``, counted in the time):

* **Megatron TP=8 x PP=4 -> TP=4**: the same 70B-like model in megatron-core's naming (fused
  QKV, fused gate/up with partition stride 2: 483 tensors), trained under TP=8 x PP=4 and
  resharded into TP=4 replicas of the whole model on the same ranks;
* **Megatron EP=8 -> EP=4**: a Qwen3-30B-A3B-like MoE (48 layers, hidden 2,048, 128 experts of
  FFN 768 each: 12,531 tensors, the experts in megatron-core's ``SequentialMLP`` naming),
  EP=8 into EP=4 on the same ranks.

Time is the fastest of ``--rounds`` runs; memory is tracemalloc's peak during one run
(Python objects of the plan and everything built to make it). The global planner
(``plan_flat``: every rank's transfers on every rank, what the reshard did before) is timed
side by side at 16/32/64 ranks on 100 tensors (it grows with ranks squared: 128 ranks take
half a minute and 770 MB), and the
ratio printed. Numbers are machine-dependent; the ratios and the growth are the result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scoped_parallel.layout import ParallelLayout  # noqa: E402
from scoped_parallel.resharding.flat import FlatTensor, plan_flat_local  # noqa: E402
from scoped_parallel.resharding.plan import plan_flat  # noqa: E402
from scoped_parallel.resharding.staged import WHOLE, Held, StageCopies, TensorRow, tiled_tensors  # noqa: E402
from scoped_parallel.resharding.tiled import plan_tiled_local  # noqa: E402


def llama_70b_shapes() -> list[tuple[int, ...]]:
    """The 723 parameter shapes of an 80-layer, 70B-like Llama (untied embeddings)."""
    h, ffn, kv, vocab = 8192, 28672, 1024, 128256
    shapes: list[tuple[int, ...]] = [(vocab, h), (h,), (vocab, h)]
    for _ in range(80):
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (ffn, h), (ffn, h), (h, ffn), (h,), (h,)]
    return shapes


def _groups(first: int, count: int, size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(g, g + size)) for g in range(first, first + count, size))


def case(name: str, world: int) -> tuple[list[FlatTensor], dict[str, Any], dict[str, Any], int]:
    """The tensors and both sides' copies of one layout pair at ``world`` ranks, and the rank planned."""
    numels = [math.prod(s) for s in llama_70b_shapes()]
    if name == "ZeRO-3 -> replicas":
        src, dst = {"dp": _groups(0, world, world)}, {"replica": _groups(0, world, 1)}
        tensors = [FlatTensor(f"p{i}", n, 2, "torch.bfloat16", "dp", math.ceil(n / world), "replica", n) for i, n in enumerate(numels)]
    elif name == "ZeRO-3 -> ZeRO-3 x8":
        part = world // 8
        src, dst = {"dp": _groups(0, world, world)}, {"dp": _groups(0, world, part)}
        tensors = [FlatTensor(f"p{i}", n, 2, "torch.bfloat16", "dp", math.ceil(n / world), "dp", math.ceil(n / part))
                   for i, n in enumerate(numels)]
    else:
        half = world // 2
        src, dst = {"dp": _groups(0, half, half)}, {"replica": _groups(half, half, 1)}
        tensors = [FlatTensor(f"p{i}", n, 2, "torch.bfloat16", "dp", math.ceil(n / half), "replica", n) for i, n in enumerate(numels)]
    return tensors, src, dst, world // 2 - 1


def megatron_70b(tp: int, pp: int) -> dict[str, Held]:
    """The 70B-like model in megatron-core's naming as ``StageCopies`` leads describe it under TP x PP."""
    h, ffn, kv, vocab, layers = 8192, 28672, 1024, 128256, 80

    def row(name: str, shape: tuple[int, ...], dim: int | None, stride: int = 1) -> TensorRow:
        return TensorRow(name, shape, "torch.bfloat16", 2, "tp" if dim is not None else WHOLE, dim, stride, tp if dim is not None else 1, -1)

    out = {"embedding.word_embeddings.weight": Held(row("embedding.word_embeddings.weight", (vocab, h), 0), (0,), 0)}
    last = pp - 1
    for layer in range(layers):
        stage = layer * pp // layers
        base = f"decoder.layers.{layer}"
        for r in (row(f"{base}.input_layernorm.weight", (h,), None),
                  row(f"{base}.self_attention.linear_qkv.weight", (h + 2 * kv, h), 0),
                  row(f"{base}.self_attention.linear_proj.weight", (h, h), 1),
                  row(f"{base}.pre_mlp_layernorm.weight", (h,), None),
                  row(f"{base}.mlp.linear_fc1.weight", (2 * ffn, h), 0, 2),
                  row(f"{base}.mlp.linear_fc2.weight", (h, ffn), 1)):
            out[r.name] = Held(r, (stage,), 0)
    for r in (row("decoder.final_layernorm.weight", (h,), None), row("output_layer.weight", (vocab, h), 0)):
        out[r.name] = Held(r, (last,), 0)
    return out


def qwen3_moe(ep: int) -> dict[str, Held]:
    """The 30B-A3B-like MoE in megatron-core's naming under EP (TP=1, expert TP=1, PP=1)."""
    h, q, kv, vocab, layers, experts, ffn = 2048, 4096, 512, 151936, 48, 128, 768

    def row(name: str, shape: tuple[int, ...], slot: int = -1, stride: int = 1) -> TensorRow:
        return TensorRow(name, shape, "torch.bfloat16", 2, "etp" if slot >= 0 else WHOLE, 0 if slot >= 0 else None, stride, 1, slot)

    rows = [row("embedding.word_embeddings.weight", (vocab, h)), row("decoder.final_layernorm.weight", (h,)),
            row("output_layer.weight", (vocab, h))]
    for layer in range(layers):
        base = f"decoder.layers.{layer}"
        rows += [row(f"{base}.input_layernorm.weight", (h,)), row(f"{base}.self_attention.linear_qkv.weight", (q + 2 * kv, h)),
                 row(f"{base}.self_attention.linear_proj.weight", (h, q)), row(f"{base}.pre_mlp_layernorm.weight", (h,)),
                 row(f"{base}.mlp.router.weight", (experts, h))]
        for e in range(experts):
            slot = e // (experts // ep)
            rows += [row(f"{base}.mlp.experts.local_experts.{e}.linear_fc1.weight", (2 * ffn, h), slot, 2),
                     row(f"{base}.mlp.experts.local_experts.{e}.linear_fc2.weight", (h, ffn), slot)]
    return {r.name: Held(r, (0,), 0) for r in rows}


def megatron_plan(name: str, world: int, rank: int) -> Any:
    """One rank's part of a Megatron pair at ``world`` ranks, from the descriptions (holders derived here)."""
    if name == "Megatron TP=8 x PP=4 -> TP=4":
        src_layout = ParallelLayout(world_size=world, tensor_model_parallel_size=8, pipeline_model_parallel_size=4)
        dst_layout = ParallelLayout(world_size=world, tensor_model_parallel_size=4)
        src, dst = megatron_70b(8, 4), megatron_70b(4, 1)
    else:
        src_layout = ParallelLayout(world_size=world, expert_model_parallel_size=8, expert_tensor_parallel_size=1)
        dst_layout = ParallelLayout(world_size=world, expert_model_parallel_size=4, expert_tensor_parallel_size=1)
        src, dst = qwen3_moe(8), qwen3_moe(4)
    tensors = tiled_tensors(src, dst)
    return lambda: plan_tiled_local(rank, tensors, StageCopies(src_layout), StageCopies(dst_layout)), len(tensors)


def measure(fn: Callable[[], Any], rounds: int) -> tuple[float, float, Any]:
    """(fastest seconds, peak MB of one traced run, the result)."""
    best = math.inf
    result = None
    for _ in range(rounds):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return best, peak, result


def _old_vs_new(world: int, rounds: int) -> dict[str, Any]:
    """Global ``plan_flat`` (every rank's transfers) vs one rank's part, 100 tensors of 1 M
    elements, ZeRO-3 over ``world`` ranks into replicas on them (p2p everywhere in the old one)."""
    n, count = 1 << 20, 100
    part = math.ceil(n / world)
    sources = [(r, f"p{i}", min(r * part, n), min((r + 1) * part, n), 2) for i in range(count) for r in range(world)]
    targets = [(r, f"p{i}", 0, n, 2) for i in range(count) for r in range(world)]
    old_s, old_mb, old = measure(lambda: plan_flat("flat", sources, targets).problems(), 1)
    tensors = [FlatTensor(f"p{i}", n, 2, "torch.bfloat16", "dp", part, "replica", n) for i in range(count)]
    copies = {"dp": _groups(0, world, world)}, {"replica": _groups(0, world, 1)}
    new_s, new_mb, plan = measure(lambda: plan_flat_local(world // 2, tensors, *copies), rounds)
    return {"world": world, "global s": old_s, "global MB": old_mb, "per-rank s": new_s, "per-rank MB": new_mb,
            "time ratio": old_s / new_s, "global transfers": world * world * count, "per-rank gathers": len(plan.gathers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[256, 1024, 8192])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    print(f"{'layout pair':<44} {'ranks':>6} {'tensors':>8} {'plan s':>8} {'peak MB':>8} {'transfers':>10} {'gathers':>8}")
    for name in ("ZeRO-3 -> replicas", "ZeRO-3 -> ZeRO-3 x8", "ZeRO-3 -> replicas, disjoint"):
        for world in args.worlds:
            tensors, src, dst, rank = case(name, world)
            planned = [(name, rank)]
            if name.endswith("disjoint"):  # a source rank (above) and a replica rank
                planned = [(name + " (a source rank)", rank), (name + " (a replica)", world // 2)]
            for label, who in planned:
                seconds, peak, plan = measure(lambda: plan_flat_local(who, tensors, src, dst), args.rounds)
                rows.append({"pair": label, "ranks": world, "tensors": len(tensors), "plan s": seconds, "peak MB": peak,
                             "transfers": len(plan.transfers), "gathers": len(plan.gathers)})
                print(f"{label:<44} {world:>6} {len(tensors):>8} {seconds:>8.3f} {peak:>8.1f} {len(plan.transfers):>10} "
                      f"{len(plan.gathers):>8}", flush=True)
    for name in ("Megatron TP=8 x PP=4 -> TP=4", "Megatron EP=8 -> EP=4"):
        for world in args.worlds:
            planned, count = megatron_plan(name, world, world // 2 - 1)
            seconds, peak, plan = measure(planned, args.rounds)
            problems = plan.problems()
            assert not problems, f"{name} at {world} ranks: {problems[:3]}"
            rows.append({"pair": name, "ranks": world, "tensors": count, "plan s": seconds, "peak MB": peak,
                         "transfers": len(plan.transfers), "gathers": len(plan.gathers)})
            print(f"{name:<44} {world:>6} {count:>8} {seconds:>8.3f} {peak:>8.1f} {len(plan.transfers):>10} {len(plan.gathers):>8}",
                  flush=True)
    print("\nglobal plan (every rank's transfers, as before) vs one rank's part; 100 tensors, ZeRO-3 -> replicas")
    print(f"{'ranks':>6} {'global s':>9} {'global MB':>10} {'per-rank s':>11} {'per-rank MB':>12} {'time ratio':>11}")
    compared = []
    for world in (16, 32, 64):
        row = _old_vs_new(world, args.rounds)
        compared.append(row)
        print(f"{world:>6} {row['global s']:>9.3f} {row['global MB']:>10.1f} {row['per-rank s']:>11.4f} {row['per-rank MB']:>12.2f} "
              f"{row['time ratio']:>10.0f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"per rank": rows, "global vs per rank": compared}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
