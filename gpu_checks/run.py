"""Prepared GPU checks: what only CUDA and NCCL can show. Not part of CI; skipped without CUDA.

Run on a machine with N GPUs, once per default-group mode (see docs/gpu-checks.md)::

    torchrun --standalone --nproc-per-node N gpu_checks/run.py --mode unbound --out OUT/unbound.json
    torchrun --standalone --nproc-per-node N gpu_checks/run.py --mode bound   --out OUT/bound.json

``--mode bound`` initializes NCCL with ``device_id`` (groups are then created by
``split_group``), ``unbound`` without it (member-only creation). Each check records
what it saw and a verdict (``ok``, ``FAIL`` with expected vs seen, or ``skipped``
with the reason); rank 0 writes the JSON: device, torch/CUDA/NCCL versions,
verdicts and group-creation timings. Checks:

1. NCCL groups: an all-reduce in every kind's group, per-kind NCCL options on the
   created group, sharing between two states, ``destroy()``, and (N >= 2) a rank
   building another layout raising ``StateMismatchError`` within the timeout.
2. Autograd device threads: which thread runs a tensor hook, a post-accumulate-grad
   hook, an ``autograd.Function.backward`` and a checkpoint recompute, and what
   ``current_state_or_none()`` and a patched ``deepspeed.utils.groups`` getter answer
   there: one state, two nested states, and another thread holding another state.
3. DeepSpeed ZeRO-2 and ZeRO-3 engines of two states, trained under ``bind``, with a
   gradient hook checking the data-parallel group it sees.
4. Megatron's RNG tracker per state, when the installed adapter provides it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS: dict[str, Any] = {"checks": {}}


def verdict(name: str, expected: Any, seen: Any) -> None:
    RESULTS["checks"][name] = {"verdict": "ok" if expected == seen else "FAIL", "expected": repr(expected), "seen": repr(seen)}


def skipped(name: str, why: str) -> None:
    RESULTS["checks"][name] = {"verdict": "skipped", "why": why}


def guarded(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as err:  # a check that breaks is a verdict, the others still run
        RESULTS["checks"][name] = {"verdict": "FAIL", "error": f"{type(err).__name__}: {err}"}


# ---------------------------------------------------------------------- 1. NCCL groups


def check_groups(world: int) -> None:
    import torch
    import torch.distributed as dist

    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups

    tp = 2 if world % 2 == 0 else 1
    start = time.perf_counter()
    a = ParallelState(name="a", tensor_model_parallel_size=tp, timeout=datetime.timedelta(seconds=60))
    RESULTS["timings"]["state_construction_s"] = time.perf_counter() - start
    sums = {}
    for kind in a.kinds():
        t = torch.ones(1, device="cuda")
        dist.all_reduce(t, group=a.group(kind))
        sums[kind] = int(t.item())
    verdict("1.all_reduce_sizes", {k: a.size(k) for k in a.kinds()}, sums)
    b = ParallelState(name="b", tensor_model_parallel_size=tp)
    verdict("1.shared_tp_group", True, a.group("tp") is b.group("tp"))
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    c = ParallelState(name="c", pg_options={"dp": options}, share_groups=False)
    backend = c.group("dp")._get_backend(torch.device("cuda"))
    verdict("1.dp_options_reach_group", True, bool(backend.options.is_high_priority_stream))
    for state in (c, b, a):
        state.destroy()
    verdict("1.no_group_alive_after_destroy", 0, _groups.live_groups())
    if world < 2:
        skipped("1.mismatch_raises_within_timeout", "needs 2 ranks")
        return
    from scoped_parallel.errors import StateMismatchError

    start = time.perf_counter()
    try:
        odd = ParallelState(name="odd", tensor_model_parallel_size=2 if dist.get_rank() == 0 else 1,
                            timeout=datetime.timedelta(seconds=20))
        odd.destroy()
        seen = "constructed"
    except StateMismatchError:
        seen = "StateMismatchError"
    verdict("1.mismatch_raises_within_timeout", ("StateMismatchError", True), (seen, time.perf_counter() - start < 30))


# ---------------------------------------------------------------------- 2. autograd threads


def _probe(log: list[Any], where: str, dp_group_of: dict[Any, str]) -> None:
    from scoped_parallel import current_state_or_none

    try:
        state = current_state_or_none()
        seen = getattr(state, "name", None)
    except Exception as err:
        seen = type(err).__name__
    try:
        import deepspeed.utils.groups as groups

        dp = dp_group_of.get(groups._get_data_parallel_group(), "another group")
    except Exception as err:
        dp = type(err).__name__
    log.append((where, threading.get_ident(), seen, dp))


def _backward_under(state: Any, dp_group_of: dict[Any, str]) -> list[Any]:
    import torch
    from torch.utils.checkpoint import checkpoint

    log: list[Any] = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x * 2

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            _probe(log, "function_backward", dp_group_of)
            return grad * 2

    def block(x: Any) -> Any:
        if torch.is_grad_enabled():
            _probe(log, "checkpoint_recompute", dp_group_of)
        return torch.tanh(x)

    w = torch.randn(16, 16, device="cuda", requires_grad=True)
    w.register_post_accumulate_grad_hook(lambda p: _probe(log, "post_accumulate_grad", dp_group_of))
    x = torch.randn(4, 16, device="cuda")
    y = checkpoint(block, Probe.apply(x @ w), use_reentrant=False)
    y.register_hook(lambda g: _probe(log, "tensor_hook", dp_group_of))
    with state.activate():
        log.clear()
        y.sum().backward()
    return log


def check_autograd_threads() -> None:
    from scoped_parallel import ParallelState, adapters

    adapters.install(targets=("deepspeed",))
    a, b, c = ParallelState(name="A"), ParallelState(name="B", share_groups=False), ParallelState(name="C", share_groups=False)
    dp_group_of = {s.get_data_parallel_group(): s.name for s in (a, b, c)}
    main = threading.get_ident()
    try:
        log = _backward_under(a, dp_group_of)
        RESULTS["autograd_threads"] = {where: "caller" if tid == main else "other" for where, tid, _, _ in log}
        verdict("2.one_state", {(w, "A", "A") for w, *_ in log}, {(w, s, d) for w, _, s, d in log})
        with b.activate():
            log = _backward_under(a, dp_group_of)
        verdict("2.nested_inner_wins", {(w, "A", "A") for w, *_ in log}, {(w, s, d) for w, _, s, d in log})
        hold, release = threading.Event(), threading.Event()

        def other() -> None:
            with c.activate():
                hold.set()
                release.wait(60)

        thread = threading.Thread(target=other)
        thread.start()
        hold.wait(60)
        try:
            log = _backward_under(a, dp_group_of)
        finally:
            release.set()
            thread.join(60)
        verdict("2.other_thread_holds_C", {(w, "A", "A") for w, *_ in log}, {(w, s, d) for w, _, s, d in log})
    finally:
        for state in (c, b, a):
            state.destroy()
        adapters.uninstall()


# ---------------------------------------------------------------------- 3. DeepSpeed engines


def check_deepspeed_engines(world: int) -> None:
    import deepspeed
    import torch
    from torch import nn

    from scoped_parallel import ParallelState, adapters

    adapters.install(targets=("deepspeed",))
    states = {"actor": ParallelState(name="actor"), "critic": ParallelState(name="critic", share_groups=False)}
    seen: dict[str, set[str]] = {name: set() for name in states}
    names = {s.get_data_parallel_group(): n for n, s in states.items()}
    try:
        for stage, name in ((2, "actor"), (3, "critic")):
            state = states[name]
            with state.activate():
                torch.manual_seed(0)
                net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).cuda()
                config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
                          "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
                engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters()), config=config)
            state.bind(engine)
            for p in net.parameters():
                p.register_hook(lambda g, n=name: (seen[n].add(names.get(deepspeed.utils.groups._get_data_parallel_group(), "other")), g)[1])
            for _ in range(3):
                loss = engine(torch.randn(4, 64, device="cuda")).pow(2).mean()
                engine.backward(loss)
                engine.step()
            state.unbind(engine)
        verdict("3.hooks_see_their_state_dp_group", {"actor": {"actor"}, "critic": {"critic"}}, seen)
    finally:
        for state in states.values():
            state.destroy()
        adapters.uninstall()


# ---------------------------------------------------------------------- 4. Megatron RNG


def check_megatron_rng() -> None:
    from scoped_parallel import ParallelState, adapters

    if "megatron" not in adapters.available():
        skipped("4.rng_tracker_per_state", "megatron-core is not installed")
        return
    from megatron.core import tensor_parallel

    adapters.install(targets=("megatron",))
    a, b = ParallelState(name="A"), ParallelState(name="B", share_groups=False)
    try:
        trackers = {}
        for state, seed in ((a, 1234), (b, 4321)):
            with state.activate():
                tensor_parallel.model_parallel_cuda_manual_seed(seed)
                trackers[state.name] = tensor_parallel.get_cuda_rng_tracker()
        if trackers["A"] is trackers["B"]:
            skipped("4.rng_tracker_per_state", "the installed megatron adapter keeps one tracker per process")
            return
        import torch

        masks = {}
        for state in (a, b):
            with state.activate(), tensor_parallel.get_cuda_rng_tracker().fork():
                masks[state.name] = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
        verdict("4.rng_forks_differ_per_state", True, not torch.equal(masks["A"], masks["B"]))
    finally:
        for state in (b, a):
            state.destroy()
        adapters.uninstall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("bound", "unbound"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; nothing to check")
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    start = time.perf_counter()
    dist.init_process_group("nccl", device_id=device if args.mode == "bound" else None)
    world = dist.get_world_size()
    RESULTS.update(
        mode=args.mode, world=world, device=torch.cuda.get_device_name(local), torch=torch.__version__,
        cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
        timings={"init_process_group_s": time.perf_counter() - start},
    )
    guarded("1.groups", lambda: check_groups(world))
    guarded("2.autograd_threads", check_autograd_threads)
    guarded("3.deepspeed_engines", lambda: check_deepspeed_engines(world))
    guarded("4.megatron_rng", check_megatron_rng)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(RESULTS, fh, indent=2, default=str)
        print(json.dumps(RESULTS, indent=2, default=str))
    dist.destroy_process_group()
    failed = [k for k, v in RESULTS["checks"].items() if v["verdict"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
