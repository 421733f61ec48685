"""A tiny megatron-core GPTModel on CPU, as this rank's model chunks: what the Megatron
matrix (``tests/_matrix_megatron.py``) and the Megatron reshard tests (``tests/_reshard_megatron.py``)
both build, each with its own sizes and options.

* :func:`cpu_config` is a ``TransformerConfig`` with every fusion off, CPU initialisation and
  batched point-to-point without a CUDA synchronise;
* :func:`moe_shim` names ``te_general_gemm`` for megatron-core 0.16's MoE router on a
  machine without Transformer Engine;
* :func:`gpt_chunks` builds one ``GPTModel`` per virtual stage, first/last stage from
  ``parallel_state`` (the active scope's state with the adapters installed, else Megatron's
  globals), weights from ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def parallel_state() -> Any:
    """``megatron.core.parallel_state``, imported without megatron-core's import-time warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps

        import megatron.core.models.gpt  # noqa: F401
    return ps


def moe_shim() -> None:
    """megatron-core 0.16 names ``te_general_gemm`` only when Transformer Engine imports; its
    router reads it either way (None: the torch matmul path)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def cpu_config(**sizes_and_options: Any) -> Any:
    """A ``TransformerConfig`` of the tiny model (hidden 32, 4 heads, FFN 48) for CPU runs."""
    parallel_state()
    from megatron.core.transformer.transformer_config import TransformerConfig

    options: dict[str, Any] = dict(
        hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, pipeline_dtype=torch.float32,
        batch_p2p_sync=False, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False,
    )
    options.update(sizes_and_options)
    return TransformerConfig(**options)


def gpt_chunks(config: Any, spec: Any, vocab: int, seq: int, seed: int, **model: Any) -> list[Any]:
    """This rank's chunks of the GPTModel, one per virtual stage of ``config``."""
    ps = parallel_state()
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size or 1
    torch.manual_seed(seed)
    chunks = []
    for chunk in range(vpp):
        vp_stage = chunk if vpp > 1 else None
        kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
        chunks.append(GPTModel(
            config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=seq,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            **model, **kwargs,
        ))
    return chunks
