"""Three models with different layouts in one 4-rank world, printing each rank's groups.

Run: torchrun --standalone --nproc-per-node 4 examples/layouts.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from scoped_parallel import ParallelState, current_state


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    actor = ParallelState(name="actor", tensor_model_parallel_size=2)  # TP=2 x DP=2
    critic = ParallelState(name="critic")  # DP=4
    reference = ParallelState(name="reference", sequence_parallel_size=2)  # SP=2 x DP=2
    lines = []
    for state in (actor, critic, reference):
        with state.activate():
            s = current_state()
            x = torch.ones(1)
            dist.all_reduce(x, group=s.get_data_parallel_group())
            lines.append(
                f"rank {rank} {s.name:>9}: tp={s.get_tensor_model_parallel_ranks()} "
                f"dp={s.get_data_parallel_group_ranks()} sp={s.ranks('sp')} "
                f"sp-dp={s.ranks('sp-dp')} (all-reduce over dp summed {int(x.item())} ones)"
            )
    for r in range(dist.get_world_size()):
        if r == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    for state in (actor, critic, reference):
        state.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
