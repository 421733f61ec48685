"""Checks and construction behind the Ulysses adapter's ``register_with_transformers``.

:func:`model_config` and :func:`check_core` validate a registration before anything is
built; :func:`build_instance` creates (once per state and model shape) the
``UlyssesSPAttentionHF`` that runs a model's attention on its state's SP group.
transformers and DeepSpeed are imported inside the functions, at registration time.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from scoped_parallel.errors import DistributedNotInitializedError

__all__ = ["build_instance", "check_core", "model_config"]

# Attention implementations DeepSpeed refuses: they need a full 4D mask.
_UNSUPPORTED = ("eager", "paged|eager")
# "org/name", optionally "@revision" and ":function": a hub kernel name.
_HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")


def model_config(model_name_or_path: Any, core: str) -> tuple[Any, bool]:
    """The model's config and whether a model (not a name or path) was given."""
    from transformers import AutoConfig, PreTrainedModel

    is_model = hasattr(model_name_or_path, "config") or isinstance(model_name_or_path, PreTrainedModel)
    if not is_model:
        return AutoConfig.from_pretrained(model_name_or_path), False
    config = model_name_or_path.config
    # Only a loaded model's config holds the implementation resolved at load time.
    resolved = getattr(config, "_attn_implementation", None)
    if resolved is not None and resolved != core:
        raise ValueError(
            f"register_with_transformers: core_attn_implementation={core!r} but the model was "
            f"loaded with attn_implementation={resolved!r}; use the same value for both so the "
            "sequence-parallel dispatcher sits on the attention path the model calls."
        )
    return config, True


def check_core(core: str) -> None:
    """Refuse a core attention implementation Ulysses cannot wrap, or one that is not registered."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core in _UNSUPPORTED:
        raise ValueError(
            f"register_with_transformers: {core!r} attention needs a 4D attention mask (O(n^2) "
            "memory), which Ulysses sequence parallelism cannot use; choose 'sdpa', "
            "'flex_attention', a flash attention variant or a hub kernel."
        )
    if isinstance(core, str) and _HUB_KERNEL.search(core) is not None:
        from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

        lazy_import_flash_attention(core)  # hub kernels register themselves lazily
    if core not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"register_with_transformers: {core!r} is not a registered attention implementation; "
            f"valid ones: {ALL_ATTENTION_FUNCTIONS.valid_keys()}"
        )


def build_instance(
    cls: Any,
    instances: dict[tuple[Any, ...], Any],
    state: Any,
    core: str,
    original: Callable[..., Any],
    model_config: Any,
    micro_batch_size: int,
    seq_length: int | None,
    seq_length_is_variable: bool,
    disable_in_eval: bool,
) -> Any:
    """The state's instance for this model shape, from ``instances`` or built (and kept there)."""
    import deepspeed.comm

    arch = model_config.get_text_config()
    heads = arch.num_attention_heads
    head_size = getattr(arch, "head_dim", None) or arch.hidden_size // heads
    sp_size = state.get_sequence_parallel_world_size()
    local = glob = None
    if not seq_length_is_variable:
        local, glob = seq_length // sp_size, seq_length
    key = (
        cls, core, heads, head_size, arch.num_key_value_heads, arch.num_hidden_layers,
        micro_batch_size, seq_length_is_variable, local, glob, disable_in_eval,
    )  # fmt: skip
    instance = instances.get(key)
    if instance is not None:
        return instance
    if not deepspeed.comm.is_initialized():
        raise DistributedNotInitializedError(
            "UlyssesSPAttentionHF runs its collectives through deepspeed.comm, which is not "
            "initialized in this process: call deepspeed.init_distributed() (it reuses an "
            "initialized torch.distributed) before register_with_transformers."
        )
    instance = cls(
        attn=original,
        batch_size=micro_batch_size,
        attn_head_count=heads,
        attn_head_size=head_size,
        kv_head_count=arch.num_key_value_heads,
        num_hidden_layers=arch.num_hidden_layers,
        process_group=state.get_sequence_parallel_group(),
        seq_length_is_variable=seq_length_is_variable,
        local_seq_length=local,
        global_seq_length=glob,
        disable_in_eval=disable_in_eval,
    )
    instance.core_attn_implementation = core
    instances[key] = instance
    return instance
