"""Rank-side helpers of the DeepSpeed reshard tests: a tiny Hugging Face Llama, an actor engine
trained one step in a state, and the actor's whole weights on every rank."""

from __future__ import annotations

from typing import Any

import torch

import _adapter_deepspeed_support as support

VOCAB, SEQ = 64, 8


def llama(seed: int, hidden: int = 32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config)


def trained_actor(state: Any, stage: int) -> Any:
    ds = support._ds()
    module = llama(1)
    with state.activate():
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        config = support.config(stage=stage, train_micro_batch_size_per_gpu=1,
                                zero_optimization={"stage": stage, "stage3_param_persistence_threshold": 0})
        engine, *_ = ds.initialize(model=module, optimizer=optimizer, config=config, mpu=state)
        tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(5))
        engine.backward(engine(input_ids=tokens).logits.float().pow(2).mean())
        engine.step()
    return engine


def actor_weights(engine: Any, holder: int) -> list[torch.Tensor]:
    """The actor's whole parameters on every rank: gathered on the actor's ranks, broadcast from ``holder``."""
    import deepspeed
    import torch.distributed as dist

    box: list[Any] = [None]
    if engine is not None:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            box[0] = [p.detach().clone() for p in params]
    dist.broadcast_object_list(box, src=holder)
    return box[0]  # type: ignore[no-any-return]


