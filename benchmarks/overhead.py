"""Overhead accounting of one PPO step: counts x unit costs, as a fraction of the step.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/overhead.py \
        [--steps 6] [--json benchmarks/overhead.json]

The end-to-end ratio of ``benchmarks/e2e.py`` sits inside this machine's noise.
This accounting does not depend on noise:

1. **step time**: the median PPO step (after the first) of ``examples/rl_ppo.py``'s
   interleaved run (actor, critic, reference; scopes and adapters on), uninstrumented.
2. **counts per step**: the same run again, instrumented for that run only: every callable
   the adapters patched (each ledger record of a function: DeepSpeed and Megatron getters,
   autograd's engine entry point, hook registrations, Ulysses dispatchers) is wrapped by a
   counter, and so are ``Activation.__enter__`` (scope switches) and the wrappers
   :func:`~scoped_parallel.scope.hook_in_scope` returns (hook calls). The counts of the
   last step are kept (steady state); the counters are removed afterwards.
3. **unit costs**, measured in this process (``benchmarks/run.py``'s interleaved best-of
   timing): a patched getter called in a scope (its *whole* cost, not the difference to
   the unpatched getter: an upper bound), ``with state.activate(): pass``, a hook wrapper
   that has to enter its scope around a no-op hook minus the no-op, the backward carrier
   around a no-op minus the no-op, a registration wrapper around a no-op minus the no-op.
   A patched callable that cannot be timed alone (needs arguments, or does real work such
   as Ulysses attention) is charged the slowest measured getter.
4. overhead = sum(count x unit cost), reported as a fraction of the median CPU step and of a
   published GPU step of a 7B model on one 8-GPU node (see ``GPU_STEP``); for the GPU step the
   per-parameter counts (hook calls, registrations) are also scaled up to a 7B model's
   parameter tensors.

Rank 0 measures and prints; every rank runs the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
import types
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import rl_ppo  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from scoped_parallel import ParallelState, adapters  # noqa: E402
from scoped_parallel import scope as _scope  # noqa: E402
from scoped_parallel.adapters import autograd as autograd_adapter  # noqa: E402
from scoped_parallel.adapters._ledger import LEDGER  # noqa: E402

#: A published step time of a 7B model on one 8-GPU node: NVIDIA NeMo Framework 24.12
#: performance summary, pre-training LLAMA2-7B on 8 GPUs, FP8, global batch 128, sequence
#: 4096, 16,934 tokens/s/GPU -> 128 * 4096 / (16,934 * 8) = 3.87 s per step.
GPU_STEP = dict(
    source="https://docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/performance_summary.html",
    what="NeMo 24.12 pre-training LLAMA2-7B, 8 GPUs, FP8, GBS 128, seq 4096, 16934 tokens/s/GPU",
    seconds=128 * 4096 / (16934 * 8),
    parameter_tensors=291,  # Llama-2-7B: 32 layers x 9 tensors + embedding, final norm, lm head
)


def _best(fns: dict[str, Callable[[], Any]], number: int = 20000, repeat: int = 5) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            best[k] = min(best[k], timeit.timeit(fn, number=number) / number)
    return best


class Counters:
    """Counting wrappers around every patched callable, Activation.__enter__ and hook wrappers."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.undo: list[Callable[[], None]] = []
        self.callables: dict[str, Any] = {}

    def _counted(self, label: str, fn: Any) -> Any:
        counts = self.counts
        counts.setdefault(label, 0)

        def counting(*args: Any, **kwargs: Any) -> Any:
            counts[label] += 1
            return fn(*args, **kwargs)

        return counting

    def install(self) -> None:
        for change in LEDGER.records():
            value = change.replacement
            if not isinstance(value, types.FunctionType):
                continue
            label = f"{change.owner}: {change.label}"
            self.callables.setdefault(label, value)
            counted = self._counted(label, value)
            if change.kind == "item":
                change.target[change.name] = counted
                self.undo.append(lambda c=change: c.target.__setitem__(c.name, c.replacement))
            elif change.kind == "attribute":
                setattr(change.target, change.name, counted)
                self.undo.append(lambda c=change: setattr(c.target, c.name, c.replacement))
        enter = _scope.Activation.__enter__
        _scope.Activation.__enter__ = self._counted("scope switch (Activation.__enter__)", enter)
        self.undo.append(lambda: setattr(_scope.Activation, "__enter__", enter))
        in_scope = autograd_adapter.hook_in_scope

        def counting_hook_in_scope(hook: Any) -> Any:
            wrapped = in_scope(hook)
            return wrapped if wrapped is hook else self._counted("hook wrapper call", wrapped)

        autograd_adapter.hook_in_scope = counting_hook_in_scope
        self.undo.append(lambda: setattr(autograd_adapter, "hook_in_scope", in_scope))

    def remove(self) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


def unit_costs(states: dict[str, ParallelState], callables: dict[str, Any]) -> dict[str, float]:
    """Seconds per call of each counted thing, measured here (see the module doc)."""
    actor, critic = states["actor"], states["critic"]
    costs: dict[str, float] = {}
    with actor.activate():
        timeable = {}
        for label, fn in callables.items():
            if "autograd" in label or "ulysses" in label:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001  (needs arguments, or a group not built here)
                continue
            timeable[label] = fn
        costs.update(_best(timeable, number=5000, repeat=3))
    slowest_getter = max(costs.values())

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    with critic.activate():
        hook = _scope.hook_in_scope(noop)  # registered in the critic's scope
    carried = _scope.carrying_backward(noop)
    register = autograd_adapter._registering_in_scope(noop)

    def switch() -> None:
        with actor.activate():
            pass

    with actor.activate():  # the hook runs in another scope: the wrapper has to switch
        t = _best({"hook": hook, "carried": carried, "register": lambda: register(None, noop), "noop": noop,
                   "noop_reg": lambda: noop(None, noop)})
    t.update(_best({"switch": switch}))
    for label in callables:
        if label not in costs:
            if label.endswith("_engine_run_backward"):
                costs[label] = max(t["carried"] - t["noop"], 0.0)
            elif "register" in label:
                costs[label] = max(t["register"] - t["noop_reg"], 0.0)
            else:
                costs[label] = slowest_getter
    costs["scope switch (Activation.__enter__)"] = t["switch"]  # enter + exit
    costs["hook wrapper call"] = max(t["hook"] - t["noop"], 0.0)
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=os.path.join(HERE, "overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    adapters.install()
    rl_ppo.init_distributed()
    rl_ppo.deepspeed.utils.logger.setLevel(40)
    show = dist.get_rank() == 0
    states = rl_ppo.build_states()
    batch = rl_ppo.ROLLOUTS_PER_RANK * dist.get_world_size()
    _, stats, _ = rl_ppo.interleaved_run(states, args.steps, batch, show=False)
    step_seconds = statistics.median(rl_ppo.steady([s.seconds for s in stats]))

    counters = Counters()
    counters.install()
    per_step: list[dict[str, int]] = []
    original_step = rl_ppo.ppo_step
    tensors = [0]

    def counted_step(models: dict[str, Any], step: int, n: int) -> Any:
        tensors[0] = sum(len(list(m.engine.module.parameters())) for m in models.values())
        before = dict(counters.counts)
        out = original_step(models, step, n)
        per_step.append({k: v - before.get(k, 0) for k, v in counters.counts.items()})
        return out

    rl_ppo.ppo_step = counted_step
    try:
        rl_ppo.interleaved_run(states, 3, batch, show=False)
    finally:
        rl_ppo.ppo_step = original_step
        counters.remove()
    counts = {k: v for k, v in per_step[-1].items() if v}
    if show:
        costs = unit_costs(states, counters.callables)
        rows = sorted(((counts[k] * costs[k], counts[k], costs[k], k) for k in counts), reverse=True)
        total = sum(r[0] for r in rows)
        per_parameter = sum(r[0] for r in rows if r[3] == "hook wrapper call" or "register" in r[3])
        scale = GPU_STEP["parameter_tensors"] / max(tensors[0] / 3, 1)  # per model
        gpu_total = total + per_parameter * (scale - 1)
        print(f"median PPO step (CPU, 4 gloo ranks, steps 2..{args.steps}): {step_seconds * 1e3:.1f} ms")
        print(f"{'per step':>10} {'unit ns':>9} {'us/step':>9}  what")
        for cost, n, unit, label in rows:
            print(f"{n:>10} {unit * 1e9:>9.0f} {cost * 1e6:>9.1f}  {label}")
        print(f"total {total * 1e6:.1f} us/step = {100 * total / step_seconds:.4f}% of the CPU step (goal < 0.5%)")
        print(f"vs a GPU step of {GPU_STEP['seconds']:.2f} s ({GPU_STEP['what']}): "
              f"{100 * total / GPU_STEP['seconds']:.5f}%; with hook calls and registrations scaled x{scale:.1f} "
              f"to a 7B model's {GPU_STEP['parameter_tensors']} parameter tensors: "
              f"{100 * gpu_total / GPU_STEP['seconds']:.5f}%")
        result = dict(
            step_seconds=step_seconds, counts_per_step=counts, unit_seconds={k: costs[k] for k in counts},
            overhead_seconds=total, fraction_of_cpu_step=total / step_seconds, goal="< 0.005",
            met=total / step_seconds < 0.005, gpu_step=GPU_STEP, parameter_tensors_per_model=tensors[0] / 3,
            gpu_scale=scale, overhead_seconds_gpu_scaled=gpu_total,
            fraction_of_gpu_step=total / GPU_STEP["seconds"],
            fraction_of_gpu_step_scaled=gpu_total / GPU_STEP["seconds"],
        )
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")
    dist.barrier()
    for state in states.values():
        state.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
