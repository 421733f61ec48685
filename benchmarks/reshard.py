"""Reshard time and peak memory: scoped_parallel.reshard against the two ways the field does it.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/reshard.py [--rounds 11] [--json benchmarks/reshard.json]

One megatron-core GPTModel (local spec, hidden 256, FFN 1024, 4 layers, vocab 2048: about
4.2 M parameters, 16 MiB in fp32) trained in state "actor" (TP=2 x DP=2), copied into the same
architecture in state "rollout" (TP=4), on 4 CPU ranks over gloo, three ways, interleaved
(ours, (a), (b), ours, ...) for ``--rounds`` rounds (11) after one warm-up round each:

* **ours**: ``scoped_parallel.reshard(actor, actor_state, rollout, rollout_state)``
  (each rank plans its own part, ``scoped_parallel.resharding.tiled``; plan cached, ``run_plan``
  executing);
* **(a) all-gather then re-split**, what slime and ROLL do: every TP-sharded tensor
  all-gathered to full size over the actor's TP group, then each rank cuts its rollout
  shard out of it; one bucket of the whole model (what a bucket size above the model size
  gives), which is when the full model sits on every rank at once;
* **(b) megatron-core's ``swap_model_weights`` called directly**, each model given a
  hand-built ``ProcessGroupCollection`` (tp, pp, dp, ep from the states' groups: 0.17+
  reads ``ep`` for its plan-cache key), with a CPU
  copy service (megatron-core 0.16's gloo service allocates a CUDA stream); megatron-core
  caches its plan on the target model, so both (b) and ours time the copy, not the planning.
  With megatron-core 0.17+ and no GPU, (b) is left out (its executor calls
  ``torch.cuda.synchronize()``).

Each method's result is checked against the others bit for bit (the rollout's parameters).
Time: the slowest rank's wall time of one call (barrier before, barrier after), fastest
round reported with the median. Peak memory: per rank, the kernel's high-water mark of
resident memory (``VmHWM``, reset before each call through ``/proc/self/clear_refs``) above
the resident size before the call, with glibc told to return every allocation above 64 KiB
to the kernel at free (``MALLOC_MMAP_THRESHOLD_``; set by re-executing this script), so a
call's buffers show as they are allocated; the largest over ranks is reported.
The bytes sent are counted by ``run_plan`` (ours, compared with ``plan.bytes_between()``)
and by the copy service ((b)); both totals are printed: each plan picks its own senders, and
ours reads whatever a rank holds itself locally.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from typing import Any

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # before any allocation: re-execute with it set
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HIDDEN, FFN, LAYERS, VOCAB = 256, 1024, 4, 2048


def _kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def measured(fn: Any) -> tuple[float, int]:
    """(slowest rank's seconds, largest rank's peak bytes above the start) of one call of ``fn``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    base = _kib("VmRSS")
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = max(0, _kib("VmHWM") - base) * 1024
    out = torch.tensor([seconds, float(peak)], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out[0]), int(out[1])


def build(state: Any, seed: int) -> list[Any]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

    tp = state.get_tensor_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=8, ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        attention_dropout=0.0, hidden_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    torch.manual_seed(seed)
    with state.activate():
        return [GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                         max_sequence_length=64, share_embeddings_and_output_weights=False)]


def allgather_resplit(src: list[Any], src_state: Any, dst: list[Any], dst_state: Any) -> None:
    """(a): every TP-sharded tensor gathered to full size (all of them held at once: one
    bucket of the whole model), then each rank's destination shard cut out of it."""
    from scoped_parallel.adapters.megatron_reshard import canonical_tensors

    group, size = src_state.group("tp"), src_state.get_tensor_model_parallel_world_size()
    dst_size, dst_rank = dst_state.get_tensor_model_parallel_world_size(), dst_state.get_tensor_model_parallel_rank()
    targets = dict(canonical_tensors(dst))
    full: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in canonical_tensors(src):
            if getattr(tensor, "tensor_model_parallel", False):
                parts = [torch.empty_like(tensor) for _ in range(size)]
                dist.all_gather(parts, tensor.data.contiguous(), group=group)
                full[name] = torch.cat(parts, dim=tensor.partition_dim)
                del parts
            else:
                full[name] = tensor.data
        for name, target in targets.items():
            value = full[name]
            if getattr(target, "tensor_model_parallel", False):
                value = value.chunk(dst_size, dim=target.partition_dim)[dst_rank]
            target.data.copy_(value)
    del full


def _megatron_example() -> Any:
    """``examples/megatron_two_models.py`` (megatron-core on the CPU: its shims and a CPU copy service)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("megatron_two_models_example", os.path.join(ROOT, "examples", "megatron_two_models.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "reshard.json"))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    if dist.get_world_size() % 4:
        raise SystemExit("run with torchrun --nproc-per-node 4 (or 8): TP=2 -> TP=4 needs a multiple of 4 ranks")
    import scoped_parallel as sp
    from scoped_parallel import ParallelState, adapters
    from megatron.core import resharding
    from megatron.core.process_groups_config import ProcessGroupCollection

    example = _megatron_example()

    rank = dist.get_rank()
    actor_state = ParallelState(name="actor", tensor_model_parallel_size=2)
    rollout_state = ParallelState(name="rollout", tensor_model_parallel_size=4)
    results: dict[str, Any] = {}
    with example.cpu_shims(), adapters.installed(targets=("megatron",)):
        actor, rollout = build(actor_state, 1), build(rollout_state, 2)
        for model, state in ((actor, actor_state), (rollout, rollout_state)):
            model[0].pg_collection = ProcessGroupCollection(
                tp=state.group("tp"), pp=state.group("pp"), dp=state.group("dp"), ep=state.group("ep"))

        start = time.perf_counter()
        plan = sp.plan_reshard(actor, actor_state, rollout, rollout_state)
        plan_seconds = time.perf_counter() - start
        service = example.cpu_copy_service()
        sent: dict[str, dict[int, int]] = {}

        def ours() -> None:
            sent["ours"] = dict(sp.reshard(actor, actor_state, rollout, rollout_state).sent)

        def direct() -> None:
            service.sent.clear()
            resharding.swap_model_weights(actor[0], rollout[0], service)
            sent["direct"] = dict(service.sent)

        def gathered() -> None:
            allgather_resplit(actor, actor_state, rollout, rollout_state)

        # (c) the same bytes between the same ranks in one plain collective: buffers made beforehand,
        # nothing packed or placed, so it is the floor for moving exactly what our plan moves
        pairs = plan.bytes_between()
        send_sizes = [pairs.get((rank, d), 0) for d in range(dist.get_world_size())]
        recv_sizes = [pairs.get((s, rank), 0) for s in range(dist.get_world_size())]
        send_buffer, recv_buffer = torch.zeros(sum(send_sizes), dtype=torch.uint8), torch.empty(sum(recv_sizes), dtype=torch.uint8)

        def plain() -> None:
            dist.all_to_all_single(recv_buffer, send_buffer, recv_sizes, send_sizes)

        def bucketed(size: int) -> Any:
            def run() -> None:
                sent[f"ours, {size >> 10} KiB buckets"] = dict(sp.reshard(actor, actor_state, rollout, rollout_state, bucket_bytes=size).sent)
            return run

        methods = {"ours": ours, "(a) all-gather + re-split": gathered, "(b) swap_model_weights direct": direct,
                   "(c) one all_to_all of the same bytes": plain,
                   "ours, 1024 KiB buckets": bucketed(1 << 20), "ours, 256 KiB buckets": bucketed(1 << 18)}
        direct_runs = example.megatron_executor_runs()
        if not direct_runs:
            del methods["(b) swap_model_weights direct"]
        outcome: dict[str, list[torch.Tensor]] = {}
        times: dict[str, list[float]] = {m: [] for m in methods}
        peaks: dict[str, list[int]] = {m: [] for m in methods}
        for round_ in range(args.rounds + 1):
            for name, fn in methods.items():
                for p in rollout[0].parameters():  # start from other weights each time
                    p.data.zero_()
                seconds, peak = measured(fn)
                if round_:  # round 0 warms up (and plans, for (b))
                    times[name].append(seconds)
                    peaks[name].append(peak)
                outcome[name] = [p.detach().clone() for p in rollout[0].parameters()]
        same = all(all(map(torch.equal, outcome[name], outcome["ours"])) for name in methods if not name.startswith("(c)"))
        predicted = {d: b for (s, d), b in plan.bytes_between().items() if s == rank}
        bytes_ok = torch.tensor([int(all(got == predicted for name, got in sent.items() if name.startswith("ours")))])
        dist.all_reduce(bytes_ok, op=dist.ReduceOp.MIN)
        # the bytes between ranks, all ranks together: ours against megatron-core's own plan
        totals = torch.tensor([sum(sent["ours"].values()), sum(sent["direct"].values()) if direct_runs else 0])
        dist.all_reduce(totals)
        staging = torch.tensor([plan.staging.get(rank, 0)])  # each rank's part predicts its own
        dist.all_reduce(staging, op=dist.ReduceOp.MAX)
        fastest = {m: min(t) for m, t in times.items()}
        results = {
            "what": f"one reshard of a megatron-core GPTModel (about 4.2 M fp32 parameters) from TP=2 x DP={dist.get_world_size() // 2} "
                    f"to TP=4 x DP={dist.get_world_size() // 4} on {dist.get_world_size()} CPU ranks (gloo): slowest rank's "
                    "seconds and largest rank's peak resident bytes above the start of the call",
            "rounds": args.rounds,
            "model_bytes": sum(p.numel() * p.element_size() for p in actor[0].parameters()) * 2,
            "plan_seconds_first_call": plan_seconds,
            "seconds": {m: {"fastest": fastest[m], "median": statistics.median(t)} for m, t in times.items()},
            "peak_bytes": {m: {"min": min(p), "median": statistics.median(p)} for m, p in peaks.items()},
            "predicted_staging_bytes_max_rank": int(staging.item()),
            "bytes_between_ranks": {"ours": int(totals[0]), "(b) swap_model_weights direct": int(totals[1]) if direct_runs else None},
            "ratio_ours_over_direct": fastest["ours"] / fastest["(b) swap_model_weights direct"] if direct_runs else None,
            "goal_ratio_ours_over_direct": 1.0,
            "ratio_ours_over_plain_collective": fastest["ours"] / fastest["(c) one all_to_all of the same bytes"],
            "goal_ratio_ours_over_plain_collective": 1.1,
            "peak_bytes_by_bucket_bytes": {str(size): statistics.median(peaks[name]) for size, name in
                                           ((64 << 20, "ours"), (1 << 20, "ours, 1024 KiB buckets"), (1 << 18, "ours, 256 KiB buckets"))},
            "ranks": dist.get_world_size(),
            "peak_ours_over_allgather": statistics.median(peaks["ours"]) / max(1, statistics.median(peaks["(a) all-gather + re-split"])),
            "results_bit_identical": bool(same),
            "bytes_sent_equal_plan_prediction": bool(bytes_ok.item()),
            "megatron_core": __import__("megatron.core", fromlist=["package_info"]).package_info.__version__,
            "torch": torch.__version__,
        }
    actor_state.destroy()
    rollout_state.destroy()
    if rank == 0:
        world = dist.get_world_size()
        print(f"reshard TP=2 x DP={world // 2} -> TP=4 x DP={world // 4} on {world} ranks, {results['model_bytes'] / 2**20:.1f} MiB per model copy, {args.rounds} rounds "
              f"(plan, first call: {plan_seconds * 1e3:.0f} ms, then cached)")
        print(f"  {'method':<32} {'ms fastest (median)':>20} {'peak MiB median (min)':>24}")
        for m in methods:
            t, p = results["seconds"][m], results["peak_bytes"][m]
            print(f"  {m:<32} {t['fastest'] * 1e3:9.1f} ({t['median'] * 1e3:7.1f}) {p['median'] / 2**20:14.2f} ({p['min'] / 2**20:6.2f})")
        if not direct_runs:
            print("  (b) not run: megatron-core >= 0.17's executor calls torch.cuda.synchronize(), and there is no GPU")
        ratio = results["ratio_ours_over_direct"]
        print(f"  ours / (c) the same bytes in one all_to_all: {results['ratio_ours_over_plain_collective']:.3f} (goal <= 1.1); "
              "peak by bucket_bytes: " + ", ".join(f"{int(size) >> 10} KiB: {peak / 2**20:.2f} MiB"
                                                   for size, peak in results["peak_bytes_by_bucket_bytes"].items()))
        print(f"  ours / (b): {'n/a' if ratio is None else f'{ratio:.3f}'} (goal <= 1.0); peak ours / (a): "
              f"{results['peak_ours_over_allgather']:.3f}; results bit-identical: {same}; "
              f"bytes sent = plan's prediction: {results['bytes_sent_equal_plan_prediction']}; bytes between ranks "
              f"ours {results['bytes_between_ranks']['ours']}, (b) {results['bytes_between_ranks']['(b) swap_model_weights direct']}; "
              f"predicted staging (largest rank) {results['predicted_staging_bytes_max_rank'] / 2**20:.2f} MiB")
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
    dist.destroy_process_group()
    return 0 if results["results_bit_identical"] and results["bytes_sent_equal_plan_prediction"] else 1


if __name__ == "__main__":
    sys.exit(main())
