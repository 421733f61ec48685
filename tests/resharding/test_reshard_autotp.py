"""Reshard into and out of DeepSpeed AutoTP (4 gloo ranks): the Hybrid Engine's job, a ZeRO-3
actor into a tensor-parallel rollout copy, with one ``reshard`` call.

The actor is a tiny ``LlamaForCausalLM`` under DeepSpeed ZeRO-3 on all 4 ranks, trained one
step. The rollout is the same architecture (other initial weights) in a DeepSpeed engine
with ``tensor_parallel.autotp_size=2`` (TP=2 x DP=2, ZeRO-0): AutoTP splits the attention
and MLP projections by column (q/k/v/gate/up: dim 0) and by row (o/down: dim 1). After the
reshard:

* every rollout weight, gathered by DeepSpeed's own AutoTP layers (``gather_params``), equals
  the actor's (gathered by ``GatheredParameters``) bit for bit;
* the rollout's logits equal those of the same Llama loaded whole with the actor's weights,
  within 1e-5 (TP=2 sums the row-parallel products in another order; the rollout before the
  reshard is off by ~0.1);
* the AutoTP rollout, now a source, reshards a plain Hugging Face replica on ranks 2-3 bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import _adapter_deepspeed_support as support  # noqa: E402
from _reshard_deepspeed import SEQ, VOCAB, actor_weights, llama, trained_actor  # noqa: E402

pytestmark = [pytest.mark.world, pytest.mark.slow]
TOLERANCE = 1e-5


def _autotp_engine(state: Any, seed: int) -> Any:
    ds = support._ds()
    module = llama(seed)
    with state.activate():
        config = support.config(stage=0, train_micro_batch_size_per_gpu=1, tensor_parallel={"autotp_size": 2})
        engine, *_ = ds.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2), config=config, mpu=state)
    return engine


def _autotp_whole(engine: Any) -> list[torch.Tensor]:
    """Every parameter whole, in ``named_parameters`` order: each AutoTP layer's own
    ``gather_params`` (DeepSpeed's gather over its TP group), copied, then split back."""
    layers = [m for m in engine.module.modules() if getattr(m, "mp_group", None) is not None and hasattr(m, "gather_params")]
    for layer in layers:
        layer.gather_params([layer.weight, layer.bias])
    whole = [p.detach().clone() for p in engine.module.parameters()]
    for layer in layers:
        layer._tp_partition([layer.weight, layer.bias])
    return whole


def _logits(module: Any) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return module(input_ids=tokens).logits.float()


def rank_autotp_reshards(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    import scoped_parallel as sp

    out: dict[str, Any] = {}
    with support.isolated():
        actor_state = support.state(name="zero3-actor")
        tp_state = support.state(name="autotp-rollout", tensor_model_parallel_size=2)
        apart = support.state(name="replica-apart", world_size=2, rank_offset=2)
        actor = rollout = None
        try:
            with support.installed():
                actor = trained_actor(actor_state, 3)
                expected = actor_weights(actor, 0)
                rollout = _autotp_engine(tp_state, 2)
                attention = rollout.module.model.layers[0].self_attn
                out["local shapes"] = {"q_proj": tuple(attention.q_proj.weight.shape), "o_proj": tuple(attention.o_proj.weight.shape)}
                whole = llama(1)
                with torch.no_grad():
                    for p, w in zip(whole.parameters(), expected):
                        p.copy_(w)
                want = _logits(whole)
                with tp_state.activate():
                    out["before"] = float((_logits(rollout.module) - want).abs().max())
                plan = sp.plan_reshard(actor, actor_state, rollout, tp_state)
                done = sp.reshard(actor, actor_state, rollout, tp_state)
                out["into"] = {"problems": plan.problems(), "sent": done.sent, "transfers": len(plan.transfers),
                               "predicted": {d: n for (s, d), n in plan.bytes_between().items() if s == rank}}
                got = _autotp_whole(rollout)
                out["into"]["equal"] = len(got) == len(expected) and all(map(torch.equal, got, expected))
                with tp_state.activate():
                    out["into"]["logit diff"] = float((_logits(rollout.module) - want).abs().max())
                dist.barrier()
                replica = llama(3) if apart.is_member else None
                plan = sp.plan_reshard(rollout, tp_state, replica, apart)
                done = sp.reshard(rollout, tp_state, replica, apart)
                out["from"] = {"problems": plan.problems(), "sent": done.sent,
                               "predicted": {d: n for (s, d), n in plan.bytes_between().items() if s == rank}}
                if replica is not None:
                    out["from"]["equal"] = all(map(torch.equal, replica.parameters(), expected))
                dist.barrier()
        finally:
            support.drop(actor, rollout)
            support.destroy(actor_state, tp_state, apart)
    return out


@pytest.fixture(scope="module")
def reshards(world):
    return world.run(rank_autotp_reshards, timeout=600.0)


def test_a_zero3_actor_reshards_an_autotp_rollout_bit_for_bit(reshards):
    for rank, out in enumerate(reshards):
        # AutoTP did split: q_proj by column (32 -> 16 rows), o_proj by row (32 -> 16 columns)
        assert out["local shapes"] == {"q_proj": (16, 32), "o_proj": (32, 16)}, f"rank {rank}: {out['local shapes']}"
        got = out["into"]
        assert got["problems"] == [], f"rank {rank}: {got['problems']}"
        assert got["sent"] == got["predicted"], f"rank {rank}: sent {got['sent']}, plan said {got['predicted']}"
        assert got["equal"], f"rank {rank}: the AutoTP rollout's gathered weights differ from the actor's"


def test_the_autotp_rollout_computes_the_whole_models_logits(reshards):
    for rank, out in enumerate(reshards):
        assert out["before"] > 1e-2, f"rank {rank}: the rollout started too close to the actor ({out['before']})"
        diff = out["into"]["logit diff"]
        assert diff <= TOLERANCE, f"rank {rank}: max |logit diff| {diff}, expected <= {TOLERANCE}"


def test_an_autotp_source_reshards_a_replica_on_other_ranks_bit_for_bit(reshards):
    for rank, out in enumerate(reshards):
        got = out["from"]
        assert got["problems"] == [], f"rank {rank}: {got['problems']}"
        assert got["sent"] == got["predicted"], f"rank {rank}: sent {got['sent']}, plan said {got['predicted']}"
        if rank in (2, 3):
            assert got["equal"], f"rank {rank}: the replica's weights differ from the actor's"
