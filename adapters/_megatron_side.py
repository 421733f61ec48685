"""Megatron's per-process side state, made per state: overrides, virtual pipeline, RNG, buffer.

Part of the ``megatron`` adapter (installed by :func:`scoped_parallel.adapters.megatron.install`).
Inside ``with state.activate():``

* the ``set_*_world_size`` / ``set_*_rank`` overrides and
  ``set_virtual_pipeline_model_parallel_rank/world_size`` write to the active state's
  record (``state._adapter_slots["megatron"]``), never to Megatron's globals; the
  matching getters read the record first, as Megatron reads its ``_MPU_*`` globals, so
  interleaved virtual-pipeline code keeps one value per model;
* ``tensor_parallel.get_cuda_rng_tracker()`` returns the state's own tracker (built
  by Megatron's ``initialize_rng_tracker``, so the tracker class is Megatron's choice),
  and ``model_parallel_cuda_manual_seed(seed)`` seeds that tracker from the state's
  TP/EP/expert-TP ranks. Megatron's functions run unchanged with the module's two
  tracker globals bound to the state's for the call (one lock; threads reading those
  globals outside any scope meanwhile see the state's tracker);
* ``get_global_memory_buffer()`` returns one ``GlobalMemoryBuffer`` shared by every
  state of the process (scratch space: a buffer is reused only within one call, and
  models in one thread run one at a time), separate from Megatron's own, which code
  outside any scope keeps using. ``destroy_global_memory_buffer()`` inside a scope
  drops the shared one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from scoped_parallel._scope import dispatching
from scoped_parallel.adapters._ledger import require

__all__ = ["OVERRIDDEN_GETTERS", "SETTERS", "SideRecord", "install", "record", "uninstall"]

OWNER = "megatron"

#: setter -> the record key it writes (Megatron's ``_MPU_*`` / virtual pipeline globals)
SETTERS: dict[str, str] = {
    "set_tensor_model_parallel_world_size": "tp_size",
    "set_tensor_model_parallel_rank": "tp_rank",
    "set_pipeline_model_parallel_world_size": "pp_size",
    "set_pipeline_model_parallel_rank": "pp_rank",
    "set_data_parallel_rank": "dp_rank",
    "set_expert_model_parallel_world_size": "ep_size",
    "set_expert_model_parallel_rank": "ep_rank",
    "set_expert_tensor_parallel_world_size": "etp_size",
    "set_expert_tensor_parallel_rank": "etp_rank",
    "set_virtual_pipeline_model_parallel_world_size": "vpp_size",
    "set_virtual_pipeline_model_parallel_rank": "vpp_rank",
}

#: getter -> the record key that overrides the state's answer when set
OVERRIDDEN_GETTERS: dict[str, str] = {
    "get_tensor_model_parallel_world_size": "tp_size",
    "get_tensor_model_parallel_rank": "tp_rank",
    "get_pipeline_model_parallel_world_size": "pp_size",
    "get_pipeline_model_parallel_rank": "pp_rank",
    "get_data_parallel_rank": "dp_rank",
    "get_expert_model_parallel_world_size": "ep_size",
    "get_expert_model_parallel_rank": "ep_rank",
    "get_expert_tensor_parallel_world_size": "etp_size",
    "get_expert_tensor_parallel_rank": "etp_rank",
}


@dataclass
class SideRecord:
    """One state's Megatron side state (overrides, virtual pipeline, RNG tracker)."""

    values: dict[str, Any] = field(default_factory=dict)
    rng_tracker: Any = None
    rng_initialized: bool = False


def record(state: Any) -> SideRecord:
    """The state's :class:`SideRecord` (created on first use; ``destroy()`` drops it)."""
    slot = state._adapter_slots.get(OWNER)
    if slot is None:
        slot = state._adapter_slots[OWNER] = SideRecord()
    return slot  # type: ignore[no-any-return]


class _Buffer:
    """The memory buffer every state shares (see module docstring)."""

    lock = threading.Lock()
    buffer: Any = None


def _shared_buffer(factory: Callable[[], Any]) -> Any:
    with _Buffer.lock:
        if _Buffer.buffer is None:
            _Buffer.buffer = factory()
        return _Buffer.buffer


def _drop_buffer(*_: Any) -> None:
    with _Buffer.lock:
        _Buffer.buffer = None


def uninstall() -> None:
    """Forget the shared memory buffer."""
    _drop_buffer()


# ---------------------------------------------------------------------- parallel_state


def _setter(key: str) -> Callable[..., Any]:
    def write(state: Any, value: Any) -> None:
        record(state).values[key] = value

    return write


def _overridden(name: str, key: str) -> Callable[..., Any]:
    def read(state: Any, *args: Any, **kwargs: Any) -> Any:
        value = record(state).values.get(key)
        if value is not None:
            return value
        return getattr(state, name)(*args, **kwargs)

    return read


def _vpp(key: str) -> Callable[..., Any]:
    return lambda state: record(state).values.get(key)


def _pp_rank(state: Any) -> int:
    value = record(state).values.get("pp_rank")
    return state.get_pipeline_model_parallel_rank() if value is None else value


def _pp_size(state: Any) -> int:
    value = record(state).values.get("pp_size")
    return state.get_pipeline_model_parallel_world_size() if value is None else value


def _first_stage(state: Any, ignore_virtual: bool = True, vp_stage: Any = None) -> bool:
    vpp = record(state).values.get("vpp_size")
    if not ignore_virtual and vpp is not None:
        assert vp_stage is not None, "vp_stage must be passed if virtual pipeline is enabled"
        if vp_stage != 0:
            return False
    return _pp_rank(state) == 0


def _last_stage(state: Any, ignore_virtual: bool = True, vp_stage: Any = None) -> bool:
    vpp = record(state).values.get("vpp_size")
    if not ignore_virtual and vpp is not None:
        assert vp_stage is not None, "vp_stage must be passed if virtual pipeline is enabled"
        if vp_stage != vpp - 1:
            return False
    return _pp_rank(state) == _pp_size(state) - 1


def _in_embedding_group(state: Any, ignore_virtual: bool = True, vp_stage: Any = None) -> bool:
    if not state.is_rank_in_embedding_group():
        return False
    if ignore_virtual:
        return True
    ranks = state.ranks("embd")
    if state.rank == ranks[0]:
        return _first_stage(state, False, vp_stage)
    if state.rank == ranks[-1]:
        return _last_stage(state, False, vp_stage)
    return True


def parallel_state_replacements(ps: Any) -> dict[str, Callable[..., Any]]:
    """What the side-state names of ``parallel_state`` do inside a scope, by name."""
    inside: dict[str, Callable[..., Any]] = {name: _setter(key) for name, key in SETTERS.items()}
    inside.update({name: _overridden(name, key) for name, key in OVERRIDDEN_GETTERS.items()})
    inside["get_virtual_pipeline_model_parallel_rank"] = _vpp("vpp_rank")
    inside["get_virtual_pipeline_model_parallel_world_size"] = _vpp("vpp_size")
    inside["is_pipeline_first_stage"] = _first_stage
    inside["is_pipeline_last_stage"] = _last_stage
    inside["is_rank_in_embedding_group"] = _in_embedding_group
    from megatron.core.utils import GlobalMemoryBuffer

    inside["get_global_memory_buffer"] = lambda state: _shared_buffer(GlobalMemoryBuffer)
    inside["destroy_global_memory_buffer"] = _drop_buffer
    out = {}
    for name, fn in inside.items():
        original = require(OWNER, ps, name)
        out[name] = dispatching(original, fn, f"megatron.core.parallel_state.{name}()")
    return out


# ---------------------------------------------------------------------- RNG tracker

class _Swap:
    """Which state's tracker the current thread has bound Megatron's globals to."""

    local = threading.local()


_RNG_GLOBALS = ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
RNG_FUNCTIONS = ("get_cuda_rng_tracker", "initialize_rng_tracker", "model_parallel_cuda_manual_seed", "get_all_rng_states")


def rng_replacements(ledger: Any, random: Any) -> dict[str, Callable[..., Any]]:
    """``tensor_parallel.random``'s tracker functions, run on the active state's tracker."""

    def on_state_tracker(original: Callable[..., Any]) -> Callable[..., Any]:
        def inside(state: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_Swap.local, "state", None) is state:  # nested call: globals already bound
                return original(*args, **kwargs)
            rec = record(state)
            values = dict(zip(_RNG_GLOBALS, (rec.rng_tracker, rec.rng_initialized)))
            previous = getattr(_Swap.local, "state", None)
            with ledger.swapped(OWNER, random, values) as final:
                _Swap.local.state = state
                try:
                    result = original(*args, **kwargs)
                finally:
                    _Swap.local.state = previous
            rec.rng_tracker, rec.rng_initialized = (final[n] for n in _RNG_GLOBALS)
            return result

        return inside

    out = {}
    for name in RNG_FUNCTIONS:
        original = require(OWNER, random, name)
        out[name] = dispatching(original, on_state_tracker(original), f"megatron.core.tensor_parallel.random.{name}()")
    return out


def install(ledger: Any, ps: Any) -> None:
    """Patch the side-state functions of ``parallel_state`` and ``tensor_parallel.random``."""
    from megatron.core.tensor_parallel import random

    for name in _RNG_GLOBALS:
        require(OWNER, random, name)
    ledger.patch_everywhere(OWNER, ps, parallel_state_replacements(ps), package="megatron")
    ledger.patch_everywhere(OWNER, random, rng_replacements(ledger, random), package="megatron")
