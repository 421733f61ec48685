"""Refit planning cost per rank: the per-rank planner against the global one, and its curve to 8,192 ranks.

    python benchmarks/refit_planning.py [--json benchmarks/refit_planning.json]

Pure functions, one process: each row plans what ONE rank of a world of N ranks does (the
rank in the middle of the world), for a 70B-like model: the shapes of an 80-layer Llama
with hidden 8,192, FFN 28,672, 8 KV heads of 128 and a 128,256-token vocabulary (723
tensors, bf16), in three flat layout pairs:

* **ZeRO-3 -> replicas**: partitioned over all N ranks, refitted into a whole replica on
  each of them (the RL actor -> rollout copy on the same GPUs): one all-gather per tensor;
* **ZeRO-3 -> ZeRO-3 x8**: partitioned over all N ranks, refitted into 8 copies each
  partitioned over N/8 ranks (another DP split: point-to-point, each rank receives from
  the few ranks whose range overlaps its own);
* **ZeRO-3 -> replicas, disjoint**: an actor on ranks 0..N/2-1, replicas on N/2..N-1 (rollout
  GPUs apart); the sender's part is every receiver of its copy, so it grows with N/2
  (a scatter to the receivers and an all-gather among them would not; the row shows what
  the point-to-point plan costs, and is skipped above 1,024 ranks: 3 M sends on one rank).

Time is the fastest of ``--rounds`` runs; memory is tracemalloc's peak during one run
(Python objects of the plan and everything built to make it). The global planner
(``plan_flat``: every rank's transfers on every rank, what the refit did before) is timed
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

from scoped_parallel.refit.flat import FlatTensor, plan_flat_local  # noqa: E402
from scoped_parallel.refit.plan import plan_flat  # noqa: E402


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
    print(f"{'layout pair':<32} {'ranks':>6} {'tensors':>8} {'plan s':>8} {'peak MB':>8} {'transfers':>10} {'gathers':>8}")
    for name in ("ZeRO-3 -> replicas", "ZeRO-3 -> ZeRO-3 x8", "ZeRO-3 -> replicas, disjoint"):
        for world in args.worlds:
            tensors, src, dst, rank = case(name, world)
            if name.endswith("disjoint") and world > 1024:
                print(f"{name:<32} {world:>6} {len(tensors):>8} skipped: {len(tensors) * world // 2:,} point-to-point sends on the "
                      "planned rank (every receiver of its copy); a scatter + all-gather plan is the fix, not yet built", flush=True)
                continue
            seconds, peak, plan = measure(lambda: plan_flat_local(rank, tensors, src, dst), args.rounds)
            rows.append({"pair": name, "ranks": world, "tensors": len(tensors), "plan s": seconds, "peak MB": peak,
                         "transfers": len(plan.transfers), "gathers": len(plan.gathers)})
            print(f"{name:<32} {world:>6} {len(tensors):>8} {seconds:>8.3f} {peak:>8.1f} {len(plan.transfers):>10} {len(plan.gathers):>8}",
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
