"""Ulysses adapter: one ``UlyssesSPAttentionHF`` per state, one dispatching attention wrapper.

DeepSpeed's ``UlyssesSPAttentionHF.register_with_transformers`` initializes the
process-wide ``parallel_state_sp`` (a second call asserts), wraps whatever
``ALL_ATTENTION_FUNCTIONS[core]`` holds at that moment (so a forced second call
nests two all-to-alls) and overwrites that entry for every model. With this
adapter installed, a call made inside ``with state.activate():``

* checks ``sequence_parallel_size`` against the state's SP size,
* builds (once) an ``UlyssesSPAttentionHF`` on the state's SP group with the
  model's head counts, wrapping the *original* core attention function,
* maps the model's modules (and its config) to that instance,
* installs, once per core implementation, a dispatcher under
  ``ALL_ATTENTION_FUNCTIONS[core]``,
* returns the active state (a full ``mpu``) instead of ``parallel_state_sp``.

Per attention call the dispatcher picks the instance bound to the HF attention
``module`` argument (then to ``module.config``), else the active scope's
instance, else calls the original core function unchanged. A model whose state
has SP size 1 always goes straight to core attention. Module-keyed dispatch
needs no scope, so HF gradient-checkpoint recompute on autograd threads finds
the right instance too. Outside any scope ``register_with_transformers`` runs
DeepSpeed's original code. In strict mode (``adapters.install(strict=True)``) both
the registration and the dispatch of a module registered nowhere raise instead of
falling back when no scope is active.

Every ``ALL_ATTENTION_FUNCTIONS`` entry a dispatcher replaces is recorded in the
adapters' ledger (``Ledger.setitem``), which restores it on uninstall.
deepspeed and transformers are imported only by :func:`install` and by the
patched calls; per-state data lives in each state's ``adapter_record("ulysses", ...)``
(dropped with the state) and per-module bindings in a weak map here, so the core stays
DeepSpeed-agnostic.
"""

from __future__ import annotations

import inspect
import re
import threading
import weakref
from typing import Any, Callable

from scoped_parallel.dispatch import resolve
from scoped_parallel.adapters._ledger import Ledger
from scoped_parallel.errors import AdapterError, DistributedNotInitializedError, LayoutError, ScopedParallelError

__all__ = ["install", "uninstall", "instance_for"]

OWNER = "ulysses"
_METHOD = "register_with_transformers"
# The parameters of DeepSpeed 0.19.8's register_with_transformers, in order; the
# patched method mirrors them so positional calls keep working.
_PARAMETERS = (
    "model_name_or_path",
    "core_attn_implementation",
    "sequence_parallel_size",
    "micro_batch_size",
    "seq_length",
    "seq_length_is_variable",
    "disable_in_eval",
    "max_length",
)

_LOCK = threading.RLock()


class _Installed:
    """What install() found: the ledger, and the classmethod in the class ``__dict__``."""

    ledger: Ledger | None = None
    register: Any = None
    generation = 0  # counts uninstalls: per-state records of an earlier install are stale


class _StateRecord:
    """What one state registered: instances by build key, and the scope default per core.

    Kept in ``state.adapter_record("ulysses", ...)``; ``generation`` is the install it
    belongs to (an uninstall makes every record stale: its registrations are gone).
    """

    __slots__ = ("instances", "default", "generation")

    def __init__(self, state: Any = None) -> None:
        self.instances: dict[tuple[Any, ...], Any] = {}
        self.default: dict[str, Any] = {}  # core -> instance, or None for SP size 1
        self.generation = _Installed.generation


def _record(state: Any) -> _StateRecord:
    """The state's record of the current install (a stale one starts over)."""
    record: _StateRecord = state.adapter_record(OWNER, _StateRecord)
    if record.generation != _Installed.generation:
        record.instances.clear()
        record.default.clear()
        record.generation = _Installed.generation
    return record


class _Binding:
    """A registered model's link to its state's instance for one core implementation."""

    __slots__ = ("state_ref", "core", "instance")

    def __init__(self, state: Any, core: str, instance: Any) -> None:
        self.state_ref = weakref.ref(state)
        self.core = core
        self.instance = instance

    def resolve(self, core: str) -> Any:
        if core != self.core or self.instance is None:
            return None
        state = self.state_ref()
        if state is None or getattr(state, "destroyed", False):
            what = "was garbage-collected" if state is None else f"({state!r}) was destroyed"
            raise ScopedParallelError(
                f"a model registered with UlyssesSPAttentionHF.register_with_transformers ran its "
                f"{core!r} attention, but the ParallelState it was registered under {what}, and "
                "its sequence-parallel group with it. Keep the state alive while the model runs, "
                "or register the model again inside the scope of a live state."
            )
        return self.instance


class _Dispatch:
    """The single wrapper installed for one core implementation, and the function it wraps."""

    __slots__ = ("original", "wrapper")

    def __init__(self, original: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
        self.original = original
        self.wrapper = wrapper


_MODULES: weakref.WeakKeyDictionary[Any, _Binding] = weakref.WeakKeyDictionary()
# Configs define __eq__ (so they are unhashable): keyed by id, checked by a weak reference.
_CONFIGS: dict[int, tuple[weakref.ref[Any], _Binding]] = {}
_DISPATCH: dict[str, _Dispatch] = {}


# ---------------------------------------------------------------------- install / uninstall


def install(ledger: Ledger) -> None:
    """Patch ``UlyssesSPAttentionHF.register_with_transformers`` (the dispatchers come later)."""
    import transformers.modeling_utils  # noqa: F401  (fail here, not at the first registration)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    original = vars(UlyssesSPAttentionHF).get(_METHOD)
    if not isinstance(original, classmethod):
        raise AdapterError(
            f"{OWNER}: UlyssesSPAttentionHF.{_METHOD} is {type(original).__name__}, expected a "
            "classmethod (DeepSpeed 0.19.8); this DeepSpeed version is not supported by the adapter."
        )
    found = tuple(inspect.signature(original.__func__).parameters)[1:]
    if found != _PARAMETERS:
        raise AdapterError(
            f"{OWNER}: UlyssesSPAttentionHF.{_METHOD} takes {found}, the adapter was written for "
            f"{_PARAMETERS} (DeepSpeed 0.19.8); pin a supported DeepSpeed or install without this adapter."
        )
    _reset()
    _Installed.ledger = ledger
    _Installed.register = ledger.patch(OWNER, UlyssesSPAttentionHF, _METHOD, classmethod(_register))


def uninstall() -> None:
    """Forget every registration.

    The ledger then restores ``register_with_transformers`` and every
    ``ALL_ATTENTION_FUNCTIONS`` entry a dispatcher replaced (by identity; an entry that
    did not exist before is removed). An entry that someone replaced after the
    dispatcher went in is restored anyway, and the ledger raises an AdapterError
    naming it.
    """
    _reset()


def _reset() -> None:
    with _LOCK:
        _DISPATCH.clear()
        _Installed.generation += 1
        _MODULES.clear()
        _CONFIGS.clear()
        _Installed.ledger = _Installed.register = None


# ---------------------------------------------------------------------- lookup


def _binding_of(module: Any) -> _Binding | None:
    try:
        binding = _MODULES.get(module)
    except TypeError:  # an unhashable or non-weakref-able module
        binding = None
    if binding is not None:
        return binding
    config = getattr(module, "config", None)
    if config is None:
        return None
    entry = _CONFIGS.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def _resolve(core: str, module: Any) -> Any:
    """The instance to run for this call, or None for the original core function."""
    binding = _binding_of(module)
    if binding is not None:
        return binding.resolve(core)
    state = resolve(f"the {core!r} attention dispatcher (a model not registered with Ulysses)")
    if state is None:
        return None
    return _record(state).default.get(core)


def instance_for(module: Any, core: str = "sdpa") -> Any:
    """The ``UlyssesSPAttentionHF`` a call of ``core`` attention on ``module`` would use here.

    ``None`` means the original core function runs (SP size 1, or nothing registered).
    """
    return _resolve(core, module)


def _make_dispatcher(core: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def scoped_ulysses_attention(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any
    ) -> Any:
        uattn = _resolve(core, module)
        if uattn is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        # As DeepSpeed's wrapper: HF built the mask for the local shard, which is wrong after the
        # all-to-all gathers the sequence, so 4D masks are dropped (causality then comes from
        # is_causal and the gathered position_ids); a flex BlockMask is kept and rebuilt by uattn.
        if not (core == "flex_attention" and _is_block_mask(attention_mask)):
            attention_mask = None
        return uattn(module, query, key, value, attention_mask, *args, **kwargs)

    scoped_ulysses_attention.scoped_parallel_core = original  # type: ignore[attr-defined]
    return scoped_ulysses_attention


def _is_block_mask(mask: Any) -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _core_function(core: str) -> Callable[..., Any]:
    """The original core attention function: captured once, when its dispatcher goes in."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    dispatch = _DISPATCH.get(core)
    if dispatch is not None:
        return dispatch.original
    original = ALL_ATTENTION_FUNCTIONS[core]
    if "register_with_transformers.<locals>" in getattr(original, "__qualname__", ""):
        raise AdapterError(
            f"{OWNER}: ALL_ATTENTION_FUNCTIONS[{core!r}] already holds DeepSpeed's Ulysses wrapper "
            "(register_with_transformers was called outside any scope). Wrapping it would run two "
            "all-to-alls per attention call; call register_with_transformers only inside "
            "`with state.activate():` once the adapter is installed."
        )
    return original  # type: ignore[no-any-return]


def _install_dispatcher(core: str, original: Callable[..., Any]) -> None:
    """Put the dispatcher for ``core`` (wrapping ``original``) in place, once, through the ledger."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as mapping

    if core in _DISPATCH:
        return
    ledger = _Installed.ledger
    if ledger is None:
        raise AdapterError(f"{OWNER}: register_with_transformers ran after the adapter was uninstalled")
    # transformers' AttentionInterface writes items into its per-instance dict (the
    # class-wide registry stays untouched); patch that dict so undo removes our entry.
    local = getattr(mapping, "_local_mapping", None)
    target = local if isinstance(local, dict) else mapping
    dispatch = _Dispatch(original, _make_dispatcher(core, original))
    ledger.setitem(OWNER, target, core, dispatch.wrapper, label="ALL_ATTENTION_FUNCTIONS")
    _DISPATCH[core] = dispatch


# ---------------------------------------------------------------------- registration


def _bind(target: Any, model_config: Any, binding: _Binding) -> None:
    modules = getattr(target, "modules", None)
    if callable(modules):
        for module in modules():
            _MODULES[module] = binding
    configs = [model_config]
    text_config = getattr(model_config, "get_text_config", None)
    if callable(text_config):
        configs.append(text_config())
    for config in configs:
        key = id(config)
        _CONFIGS[key] = (weakref.ref(config, lambda _, key=key: _CONFIGS.pop(key, None)), binding)


def _register(
    cls: Any,
    model_name_or_path: Any,
    core_attn_implementation: str,
    sequence_parallel_size: int,
    micro_batch_size: int,
    seq_length: int | None = None,
    seq_length_is_variable: bool = True,
    disable_in_eval: bool = False,
    max_length: int | None = None,
) -> Any:
    """Scope-aware ``register_with_transformers``: returns the active state (see module docstring)."""
    state = resolve("UlyssesSPAttentionHF.register_with_transformers")
    if state is None:
        return _Installed.register.__func__(
            cls,
            model_name_or_path,
            core_attn_implementation,
            sequence_parallel_size,
            micro_batch_size,
            seq_length=seq_length,
            seq_length_is_variable=seq_length_is_variable,
            disable_in_eval=disable_in_eval,
            max_length=max_length,
        )
    core = core_attn_implementation
    sp_size = state.get_sequence_parallel_world_size()
    if sequence_parallel_size != sp_size:
        raise LayoutError(
            f"register_with_transformers(sequence_parallel_size={sequence_parallel_size}) was called "
            f"inside the scope of {state!r}, whose sequence parallel size is {sp_size}. Pass "
            f"sequence_parallel_size={sp_size}, or activate a state built with "
            f"sequence_parallel_size={sequence_parallel_size}."
        )
    if max_length is not None:
        from deepspeed.utils.logging import logger

        logger.warning("register_with_transformers: `max_length` is deprecated, use `seq_length`")
        if seq_length is None:
            seq_length = max_length
    if not seq_length_is_variable and seq_length is None:
        raise ValueError(
            "register_with_transformers: set seq_length (the fixed global sequence length) or "
            "seq_length_is_variable=True."
        )
    config, is_model = model_config(model_name_or_path, core)
    check_core(core)

    with _LOCK:
        original = _core_function(core)
        record = _record(state)
        instance = None
        if sp_size > 1:
            instance = build_instance(
                cls, record.instances, state, core, original, config, micro_batch_size,
                seq_length, seq_length_is_variable, disable_in_eval,
            )  # fmt: skip
        _install_dispatcher(core, original)
        record.default[core] = instance
        if is_model:
            _bind(model_name_or_path, config, _Binding(state, core, instance))
    return state


# ---------------------------------------------------------------------- building an instance


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
