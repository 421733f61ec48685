"""Tier 4 (shared 4-rank gloo world): ``deepspeed.checkpointing`` configured per state.

Two models with different TP sizes (actor TP=2, critic TP=4) checkpoint a block
with ``partition_activations``: the saved input is split over the model-parallel
group and gathered back in backward. Unpatched, the last ``configure`` wins and the
actor gathers its input over the critic's group, mixing in other data-parallel
ranks' data; with the adapter each model uses its own group, and interleaved steps
are bit-identical to vanilla DeepSpeed configured for that model alone. The same holds
for ``checkpoint`` (``CheckpointFunction``) and for ``non_reentrant_checkpoint``, whose
saved-tensor hooks read the configuration at backward time, after the call returned.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import _adapter_deepspeed_support as support
from _adapter_deepspeed_support import WORLD_TIMEOUT

pytest.importorskip("deepspeed")


def _block(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def _input(state: Any, step: int, seed: int) -> torch.Tensor:
    # Every rank of a TP group sees the same batch (its data-parallel rank's).
    generator = torch.Generator().manual_seed(seed * 1000 + step * 10 + state.get_data_parallel_rank())
    return torch.randn(4, 8, generator=generator).requires_grad_(True)


def _train(checkpointing: Any, models: dict[str, Any], order: list[str], steps: int, how: str) -> dict[str, Any]:
    """Interleaved steps: the checkpointed forward inside the model's scope, backward after it
    (where the configuration is read again: the recompute and the gather of the partitions)."""
    results: dict[str, Any] = {name: {"losses": [], "grads": []} for name in order}
    for i in range(steps):
        for name in order:
            state, block, seed = models[name]
            with state.activate():
                loss = getattr(checkpointing, how)(block, _input(state, i, seed)).pow(2).mean()
            loss.backward()
            results[name]["losses"].append(float(loss.detach()))
            results[name]["grads"].append([p.grad.detach().clone() for p in block.parameters()])
            with torch.no_grad():
                for p in block.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    return results


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["losses"] == b["losses"] and all(
        all(map(torch.equal, x, y)) for x, y in zip(a["grads"], b["grads"])
    )


def _module_globals(checkpointing: Any) -> tuple[Any, ...]:
    module = vars(checkpointing)
    return tuple(module[k] for k in ("mpu", "mp_size", "mp_group", "PARTITION_ACTIVATIONS"))


def _rank_checkpointing(rank: int, steps: int, how: str) -> dict[str, Any]:
    import deepspeed

    checkpointing = deepspeed.checkpointing
    out: dict[str, Any] = {}
    with support.isolated():
        actor = support.state(name="actor", tensor_model_parallel_size=2)
        critic = support.state(name="critic", tensor_model_parallel_size=4)
        seeds = {"actor": 1, "critic": 2}
        states = {"actor": actor, "critic": critic}
        try:
            with support.unpatched_run():
                alone = {}
                for name in ("actor", "critic"):  # vanilla DeepSpeed, one model at a time
                    checkpointing.configure(mpu_=states[name], partition_activations=True)
                    models = {name: (states[name], _block(seeds[name]), seeds[name])}
                    alone[name] = _train(checkpointing, models, [name], steps, how)[name]
                checkpointing.configure(mpu_=actor, partition_activations=True)
                checkpointing.configure(mpu_=critic, partition_activations=True)  # the last one wins
                models = {n: (states[n], _block(seeds[n]), seeds[n]) for n in states}
                unpatched = _train(checkpointing, models, ["actor", "critic"], steps, how)
            # The process-wide configuration is the critic's (as code outside any scope may
            # leave it): inside its scope each model must use its own, whenever the
            # configuration is read (non_reentrant_checkpoint reads it in backward too).
            checkpointing.configure(mpu_=critic, partition_activations=True)
            before = _module_globals(checkpointing)
            with support.installed():
                for name, state in states.items():
                    with state.activate():
                        checkpointing.configure(mpu_=state, partition_activations=True)
                models = {n: (states[n], _block(seeds[n]), seeds[n]) for n in states}
                patched = _train(checkpointing, models, ["actor", "critic"], steps, how)
                out["module globals untouched"] = _module_globals(checkpointing) == before
            checkpointing.configure(mpu_=None)  # back to DeepSpeed's defaults
            for name in states:
                out[name] = {
                    "unpatched equal": _same(unpatched[name], alone[name]),
                    "patched equal": _same(patched[name], alone[name]),
                    "losses patched": patched[name]["losses"],
                    "losses alone": alone[name]["losses"],
                }
        finally:
            support.destroy(actor, critic)
    return out


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.parametrize("how", ["checkpoint", "non_reentrant_checkpoint"])
def test_partitioned_activation_checkpointing_uses_each_models_own_tp_group(world, how):
    """Actor TP=2 and critic TP=4 checkpointing interleaved match vanilla DeepSpeed alone, bitwise."""
    for rank, out in enumerate(world.run(_rank_checkpointing, 3, how, timeout=WORLD_TIMEOUT)):
        assert not out["actor"]["unpatched equal"], (
            f"rank {rank}: unpatched, expected the actor to gather over the critic's TP group and differ "
            "from training alone (the bug), but it matched"
        )
        for name in ("actor", "critic"):
            facts = out[name]
            assert facts["patched equal"], (
                f"rank {rank}, {name}: losses/grads interleaved differ from vanilla alone: "
                f"losses {facts['losses patched']} vs {facts['losses alone']}"
            )
        assert out["module globals untouched"], f"rank {rank}: configure() inside a scope changed the module globals"
