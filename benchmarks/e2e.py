"""PPO step time with scopes and adapters (interleaved) against plain DeepSpeed, one model at a time.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/e2e.py [--steps 6] [--rounds 3] [--json benchmarks/e2e.json]

The models and the step are ``examples/rl_ppo.py``'s. The interleaved run (scopes and
adapters, every model in its own state) is timed against each model alone on plain
DeepSpeed without adapters (a single model needs no scope; DeepSpeed's process-wide state
is reset between models), in alternating rounds, so a busy shared machine slows both alike;
plain DeepSpeed must reproduce the scoped results bit for bit. On a busy 2-core machine
run-to-run noise is several percent, more than the overhead being measured:
``benchmarks/overhead.py`` is the measure that does not depend on noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import rl_ppo  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.sequence_parallel import parallel_state_sp  # noqa: E402
from deepspeed.utils import groups  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from scoped_parallel import ParallelState, adapters  # noqa: E402


@contextlib.contextmanager
def plain_deepspeed() -> Any:
    """One model on plain DeepSpeed; afterwards, reset the process-wide state it set.

    DeepSpeed keeps one layout per process: register_with_transformers initializes
    parallel_state_sp (a second call asserts) and replaces ALL_ATTENTION_FUNCTIONS["sdpa"]
    for every model, and deepspeed.initialize sets groups.mpu. The baseline therefore runs
    one model at a time and puts these back in between (the groups live until the end).
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        parallel_state_sp._release_sequence_parallel_groups()
        groups.mpu = None


def plain_run(batches: list[rl_ppo.Batch], stats: list[rl_ppo.StepStats]) -> dict[str, tuple[list[float], bool]]:
    """Each model alone on plain DeepSpeed (adapters uninstalled): its seconds per step, and
    whether it reproduced the interleaved run's outputs and losses bit for bit."""
    out = {}
    for name, spec in rl_ppo.SPECS.items():
        with plain_deepspeed():
            model = rl_ppo.build_model(spec, None)
            alone = rl_ppo.replay(model, batches)
            rl_ppo.free({name: model})
        out[name] = (alone["seconds"], alone["outputs_identical"] and alone["losses"] == rl_ppo.losses_of(stats, name))
    return out


def bench(states: dict[str, ParallelState], batches: list[rl_ppo.Batch], stats: list[rl_ppo.StepStats],
          rounds: int, path: str, show: bool) -> None:
    """Model time per step: scopes + adapters (interleaved) vs plain DeepSpeed (one model at a time).

    Rounds alternate the two (the interleaved training run is the first scoped round), so a
    busy shared machine slows both alike; each model's fastest step after the first of each
    round is compared (the least disturbed), medians are reported too. Rank 0's clock: the
    collectives inside every call keep the ranks in step.
    """
    scoped: dict[str, list[float]] = {name: [] for name in rl_ppo.SPECS}
    plain: dict[str, list[float]] = {name: [] for name in rl_ppo.SPECS}
    same = dict.fromkeys(rl_ppo.SPECS, True)
    for round_ in range(rounds):
        if round_:
            adapters.install()
            _, stats, _ = rl_ppo.interleaved_run(states, len(batches), len(batches[0].tokens), show=False)
        adapters.uninstall()
        for name, (seconds, identical) in plain_run(batches, stats).items():
            # alone, the actor samples itself; interleaved, its rollout copy does (reshard + sampling)
            scoped[name] += rl_ppo.steady([s.model_seconds[name] + (s.model_seconds["rollout"] if name == "actor" else 0.0) for s in stats])
            plain[name] += rl_ppo.steady(seconds)
            same[name] = same[name] and rl_ppo.world_all(identical)
    runs = {"scoped": scoped, "plain": plain}
    fastest = {kind: sum(map(min, per_model.values())) for kind, per_model in runs.items()}
    median = {kind: sum(map(statistics.median, per_model.values())) for kind, per_model in runs.items()}
    ratio = fastest["scoped"] / fastest["plain"]
    result = {
        "what": "seconds per PPO step in each model's calls, scoped + adapters (interleaved) vs plain "
                "DeepSpeed (alone); fastest and median over steps 2..N of every round",
        "steps": len(batches),
        "rounds": rounds,
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "device": str(rl_ppo.device()),
        "scoped": {name: {"fastest": min(x), "median": statistics.median(x)} for name, x in scoped.items()},
        "plain": {name: {"fastest": min(x), "median": statistics.median(x)} for name, x in plain.items()},
        "fastest_total": fastest,
        "median_total": median,
        "ratio": ratio,
        "ratio_of_medians": median["scoped"] / median["plain"],
        "overhead_percent": 100 * (ratio - 1),
        "goal_percent": 2.0,
        "plain_reproduces_scoped_bit_for_bit": same,
    }
    if show:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
        print(f"bench: ms per step in each model's calls, fastest (median) of {rounds} rounds x steps 2..N\n"
              "            scoped + adapters, interleaved   plain DeepSpeed, one model alone")
        for name in rl_ppo.SPECS:
            print(f"  {name:<9} {min(scoped[name]) * 1e3:9.1f} ({statistics.median(scoped[name]) * 1e3:7.1f})"
                  f"          {min(plain[name]) * 1e3:9.1f} ({statistics.median(plain[name]) * 1e3:7.1f})"
                  f"       {'bit-identical results' if same[name] else 'DIFFERENT results'}")
        print(f"  total     {fastest['scoped'] * 1e3:9.1f} ({median['scoped'] * 1e3:7.1f})"
              f"          {fastest['plain'] * 1e3:9.1f} ({median['plain'] * 1e3:7.1f})\n"
              f"  ratio {ratio:.4f} ({100 * (ratio - 1):+.2f}%, goal <= +2%; medians: "
              f"{median['scoped'] / median['plain']:.4f}) -> {path}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--json", default=os.path.join(HERE, "e2e.json"), help="where the result goes")
    args = parser.parse_args()
    adapters.install()
    rl_ppo.init_distributed()
    rl_ppo.deepspeed.utils.logger.setLevel(40)
    show = dist.get_rank() == 0
    states = rl_ppo.build_states()
    batches, stats, _ = rl_ppo.interleaved_run(states, args.steps, rl_ppo.ROLLOUTS_PER_RANK * dist.get_world_size(), show=False)
    bench(states, batches, stats, args.rounds, args.json, show)
    for state in states.values():
        state.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
