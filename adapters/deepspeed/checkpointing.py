"""Activation checkpointing (``deepspeed.checkpointing``), configured per state.

``deepspeed.checkpointing.configure(mpu_=...)`` stores one mpu, its model-parallel
rank, size and group, the flags (``partition_activations``, CPU checkpointing,
contiguous buffers, ...) and an RNG tracker in module globals of
``deepspeed.runtime.activation_checkpointing.checkpointing``; the last ``configure``
wins for every model. With partitioned activations, a model with TP = 2 then splits
its saved inputs over another model's model-parallel group and gathers them back from
the wrong ranks: silently wrong gradients.

Each state keeps its own copy of those globals (``GLOBALS``, DeepSpeed's defaults
until configured). Inside a scope, ``configure`` and the module's functions listed in
``FUNCTIONS`` run with the module globals bound to the active state's copy (the
ledger's ``swapped``: other threads reading them meanwhile see that state's values),
and what they change is kept for that state. ``CheckpointFunction`` remembers the state
of its forward on the autograd context, so its backward (the recompute and the gather
of partitioned activations) uses the same state wherever ``loss.backward()`` runs,
autograd threads included. Outside any scope the module behaves as unpatched.

``non_reentrant_checkpoint`` cannot be served by a swap: its saved-tensor hooks are
closures that read the module globals at backward time, after the call has returned.
Inside a scope it runs as a copy of DeepSpeed's function whose globals are the state's
namespace (``Namespace``: the state's copy of ``GLOBALS`` and copies of the
module's functions, every other name read live from the module), so the closures it
creates, and the module functions they call (the gather of partitioned activations,
the RNG tracker), read and write that state's values whenever backward runs. The same
namespace holds what ``configure`` set for the state, so both paths see one
configuration per state. The other functions keep the swap rather than running as
namespace copies: some are decorated in DeepSpeed (``checkpoint`` is wrapped by
``compiler.lazy_disable``), and a copy of the inner function would drop the decorator.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

from scoped_parallel.scope import current_state_or_none
from scoped_parallel.dispatch import dispatching
from scoped_parallel.adapters._ledger import require
from scoped_parallel.adapters.deepspeed._records import record_of
from scoped_parallel.adapters.deepspeed._shared import OWNER, ModuleGlobals, Mods, own_functions

#: the module globals each state holds its own copy of
GLOBALS = (
    "mpu",
    "mp_rank",
    "mp_size",
    "mp_group",
    "num_layers",
    "deepspeed_checkpointing_enabled",
    "PARTITION_ACTIVATIONS",
    "CPU_CHECKPOINT",
    "CONTIGUOUS_CHECKPOINTING",
    "SYNCHRONIZE",
    "PROFILE_TIME",
    "contiguous_data_buffers",
    "data_offsets",
    "contiguous_size_buffers",
    "size_offsets",
    "_CUDA_RNG_STATE_TRACKER",
)
#: the module functions that run with the active state's globals
FUNCTIONS = (
    "configure",
    "is_configured",
    "checkpoint",
    "partition_activations_in_checkpoint",
    "set_num_layers",
    "reset",
    "get_cuda_rng_tracker",
    "model_parallel_cuda_manual_seed",
    "model_parallel_reconfigure_tp_seed",
    "get_partition_start",
    "get_partition_size",
    "gather_partitioned_activations",
)
#: the attribute of a ``CheckpointFunction`` context holding its forward's state
CTX_STATE = "_scoped_parallel_state"


class _Module:
    """The checkpointing module and its original functions (set by :func:`install`)."""

    module: Any = None
    functions: dict[str, types.FunctionType] = {}


class Namespace(ModuleGlobals):
    """One state's globals for copies of the checkpointing module's functions: the state's
    values of :data:`GLOBALS` (see :class:`ModuleGlobals` for how the copies read them)."""

    __slots__ = ()


def _defaults(module: Any) -> dict[str, Any]:
    """DeepSpeed's initial values of :data:`GLOBALS` (fresh lists and RNG tracker)."""
    return {
        "mpu": None,
        "mp_rank": 0,
        "mp_size": 1,
        "mp_group": None,
        "num_layers": None,
        "deepspeed_checkpointing_enabled": False,
        "PARTITION_ACTIVATIONS": False,
        "CPU_CHECKPOINT": False,
        "CONTIGUOUS_CHECKPOINTING": False,
        "SYNCHRONIZE": False,
        "PROFILE_TIME": False,
        "contiguous_data_buffers": [],
        "data_offsets": [],
        "contiguous_size_buffers": [],
        "size_offsets": [],
        "_CUDA_RNG_STATE_TRACKER": type(module._CUDA_RNG_STATE_TRACKER)(),
    }


def values_of(state: Any) -> Namespace:
    """The state's :class:`Namespace`: its checkpointing globals (DeepSpeed's defaults until
    configured) and its copies of the module's functions."""
    rec = record_of(state)
    if rec.checkpointing is None:
        rec.checkpointing = Namespace(_defaults(_Module.module)).bind(_Module.module, _Module.functions)
    return rec.checkpointing  # type: ignore[no-any-return]


def _swapped_call(state: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the checkpointing globals bound to ``state``'s copy."""
    values = values_of(state)
    final: dict[str, Any] = {}
    try:
        with Mods.ledger.swapped(OWNER, _Module.module, {name: values[name] for name in GLOBALS}) as final:
            return fn(*args, **kwargs)
    finally:
        values.update(final)  # what the call rebound (configure, reset, ...) stays with the state


def _non_reentrant(original: Callable[..., Any]) -> Callable[..., Any]:
    def inside(state: Any, *args: Any, **kwargs: Any) -> Any:
        return values_of(state)["non_reentrant_checkpoint"](*args, **kwargs)

    return dispatching(original, inside, f"{_Module.module.__name__}.non_reentrant_checkpoint")


def _in_state(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    def inside(state: Any, *args: Any, **kwargs: Any) -> Any:
        return _swapped_call(state, original, args, kwargs)

    return dispatching(original, inside, f"{_Module.module.__name__}.{name}")


def _forward(original: Any) -> Any:
    fn = original.__func__

    @functools.wraps(fn)
    def forward(ctx: Any, *args: Any) -> Any:
        state = current_state_or_none()
        setattr(ctx, CTX_STATE, state)
        if state is None:
            return fn(ctx, *args)
        return _swapped_call(state, fn, (ctx, *args), {})

    return staticmethod(forward)


def _backward(original: Any) -> Any:
    fn = original.__func__

    @functools.wraps(fn)
    def backward(ctx: Any, *grads: Any) -> Any:
        state = getattr(ctx, CTX_STATE, None)
        if state is None or state.destroyed:
            return fn(ctx, *grads)
        return _swapped_call(state, fn, (ctx, *grads), {})

    return staticmethod(backward)


def install(ledger: Any) -> None:
    """Patch the checkpointing module's functions and ``CheckpointFunction`` (see the module doc)."""
    import deepspeed.runtime.activation_checkpointing.checkpointing as module

    _Module.module = module
    for name in GLOBALS:
        require(OWNER, module, name)
    function_class = require(OWNER, module, "CheckpointFunction")
    forward = require(OWNER, function_class, "forward")
    backward = require(OWNER, function_class, "backward")
    non_reentrant = require(OWNER, module, "non_reentrant_checkpoint")
    _Module.functions = own_functions(module)  # before any is replaced: the originals
    replacements = {name: _in_state(require(OWNER, module, name), name) for name in FUNCTIONS}
    replacements["non_reentrant_checkpoint"] = _non_reentrant(non_reentrant)
    ledger.patch_everywhere(OWNER, module, replacements, "deepspeed")
    ledger.patch(OWNER, function_class, "forward", _forward(forward))
    ledger.patch(OWNER, function_class, "backward", _backward(backward))
