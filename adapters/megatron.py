"""Re-point ``megatron.core.parallel_state`` (and Megatron's RNG tracker) at the active scope.

Inside ``with state.activate():`` each getter of the getter table's ``megatron``
family (:mod:`scoped_parallel.getters.table`) answers from the state (same name, same meaning, Megatron's answer for the same
configuration, checked against megatron-core by ``tests/getters/test_megatron_oracle.py``);
outside any scope it is Megatron's own function, unchanged (or raises, with
``install(strict=True)``). So ``ProcessGroupCollection.use_mpu_process_groups()`` and
the model classes that call it (``GPTModel``, ``TransformerBlock``, ...) work in a scope.

Megatron code usually imports the module (``from megatron.core import
parallel_state`` / ``mpu``) and reads attributes at call time, which the module
patch covers. Copies made with ``from megatron.core.parallel_state import
get_...`` in modules already imported are patched too
(:meth:`~scoped_parallel.adapters._ledger.Ledger.patch_everywhere` walks every
loaded ``megatron.*`` module); modules imported later pick up the patched
function.

Optional groups (distributed-optimizer instances, hierarchical and hybrid context
parallel, the separate all-gather group) answer as Megatron does when the state was
built without the option (``None``, or the dp-cp group as the partial group with one
instance) and are real groups when it was built with it. The per-process side state
(``set_*`` overrides, virtual pipeline rank/size, the CUDA RNG tracker, the global
memory buffer) is per state:

* the ``set_*_world_size`` / ``set_*_rank`` setters and
  ``set_virtual_pipeline_model_parallel_rank/world_size`` write the active state's
  override (``state.set_override``), never Megatron's globals; the getters answer it
  first, as Megatron reads its ``_MPU_*`` globals, so interleaved virtual-pipeline code
  keeps one value per model;
* the CUDA RNG tracker follows Megatron's rules per state: configured or seeded inside
  the scope (``initialize_rng_tracker``, ``model_parallel_cuda_manual_seed(seed)``, seeded
  from the state's TP/EP/expert-TP ranks), ``tensor_parallel.get_cuda_rng_tracker()`` is
  the state's own tracker; never configured there, it is what vanilla Megatron uses, the
  process-wide tracker with the configuration set up once outside any scope (seeding in
  the scope then starts from a copy of that tracker). Megatron's functions run unchanged with the module's two
  tracker globals bound to the state's for the call (one lock; threads reading those
  globals outside any scope meanwhile see the state's tracker);
* ``get_global_memory_buffer()`` returns one ``GlobalMemoryBuffer`` shared by every
  state of the process (scratch space: a buffer is reused only within one call, and
  models in one thread run one at a time), separate from Megatron's own, which code
  outside any scope keeps using. ``destroy_global_memory_buffer()`` inside a scope
  drops the shared one.

Still not per state (rows with ``supported=False``, an error inside a scope):
``get_global_symmetric_memory_buffer`` (a CUDA symmetric-memory allocation over the
TP group, built by Megatron only for its NVLS inference path; there is nothing to
build it on CPU and no per-state version of the allocation).
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from scoped_parallel.adapters._ledger import require
from scoped_parallel.dispatch import dispatching
from scoped_parallel.errors import GroupNotAvailableError, describe_state
from scoped_parallel.getters.table import SETTERS, family

__all__ = ["GETTERS", "RNG_FUNCTIONS", "UNSUPPORTED", "VERSIONED_GETTERS", "install", "uninstall"]

OWNER = "megatron"

#: ``megatron.core.parallel_state`` getters answered by the active state (the table's rows).
GETTERS: tuple[str, ...] = tuple(n for n, row in family("megatron").items() if row.supported)
#: Names with no per-state answer: an error inside a scope.
UNSUPPORTED: tuple[str, ...] = tuple(n for n, row in family("megatron").items() if not row.supported)
#: Names that only some supported megatron-core minors have (the row's ``since``/``until``):
#: patched where present.
VERSIONED_GETTERS: frozenset[str] = frozenset(n for n, row in family("megatron").items() if row.since or row.until)


def _inside(name: str, supported: bool, params: tuple[str, ...] = ()) -> Callable[..., Any]:
    """What the getter ``name`` does inside a scope: the state's answer, or a refusal.

    Positional arguments are passed on by the names of the installed Megatron's own
    parameters (``params``), so a minor whose getter orders them differently (0.14's
    ``get_tensor_and_data_parallel_group(with_context_parallel)``) still means the same.
    """
    if supported:

        def answer(state: Any, *args: Any, **kwargs: Any) -> Any:
            if args:
                kwargs.update(zip(params, args))
            return getattr(state, name)(**kwargs)

        return answer

    def refuse(state: Any, *args: Any, **kwargs: Any) -> Any:
        raise GroupNotAvailableError(
            f"megatron.core.parallel_state.{name}() inside the scope of {describe_state(state)}: "
            "scoped_parallel has no per-state version of it (see scoped_parallel.adapters.megatron), "
            "and Megatron's global one belongs to another layout; call it outside any scope if the "
            "global layout is meant."
        )

    return refuse


def _setter(key: str) -> Callable[..., Any]:
    def write(state: Any, value: Any) -> None:
        state.set_override(key, value)

    return write


# ---------------------------------------------------------------------- the shared memory buffer


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
    """Drop what the adapter holds besides its patches (the shared memory buffer)."""
    _drop_buffer()


# ---------------------------------------------------------------------- RNG tracker


@dataclass
class RngRecord:
    """One state's CUDA RNG tracker (its ``adapter_record("megatron", RngRecord)``)."""

    state: Any = None
    tracker: Any = None
    initialized: bool = False


class _Swap:
    """Which state's tracker the current thread has bound Megatron's globals to."""

    local = threading.local()


_RNG_GLOBALS = ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
#: ``tensor_parallel.random`` functions that run on the active state's tracker.
RNG_FUNCTIONS = ("get_cuda_rng_tracker", "initialize_rng_tracker", "model_parallel_cuda_manual_seed", "get_all_rng_states")
# The ones that only read the tracker (answered by the process-wide one until the state has its own).
_RNG_READERS = frozenset({"get_cuda_rng_tracker", "get_all_rng_states"})


def _rng_replacements(ledger: Any, random: Any) -> dict[str, Callable[..., Any]]:
    """``tensor_parallel.random``'s tracker functions, by Megatron's rules, per state.

    A state's tracker exists once it was configured or seeded inside its scope
    (``initialize_rng_tracker`` or ``model_parallel_cuda_manual_seed`` there); from then on
    the functions run on it. Before that, inside its scope they answer what vanilla
    Megatron answers: the process-wide tracker with the configuration set up once outside
    any scope. Seeding in a scope a state without a tracker starts from a copy of that
    configured process-wide tracker (its class and options: what vanilla Megatron would
    reset and seed), or a new default tracker when none was configured.
    """

    def on_state_tracker(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)
        reads_only = name in _RNG_READERS

        def inside(state: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_Swap.local, "state", None) is state:  # nested call: globals already bound
                return original(*args, **kwargs)
            rec = state.adapter_record(OWNER, RngRecord)
            if not rec.initialized:
                if reads_only:  # never configured in this scope: the process-wide tracker, as vanilla
                    previous = getattr(_Swap.local, "state", None)
                    _Swap.local.state = state  # nested calls (its lazy initialize) act on the process-wide one
                    try:
                        return original(*args, **kwargs)
                    finally:
                        _Swap.local.state = previous
                if name == "model_parallel_cuda_manual_seed":
                    force = signature.bind_partial(*args, **kwargs).arguments.get("force_reset_rng", False)
                    process_wide = getattr(random, _RNG_GLOBALS[0])
                    if getattr(random, _RNG_GLOBALS[1]) and process_wide is not None and not force:
                        rec.tracker = copy.copy(process_wide)
                        rec.tracker.reset()
                        rec.initialized = True
            values = dict(zip(_RNG_GLOBALS, (rec.tracker, rec.initialized)))
            previous = getattr(_Swap.local, "state", None)
            with ledger.swapped(OWNER, random, values) as final:
                _Swap.local.state = state
                try:
                    result = original(*args, **kwargs)
                finally:
                    _Swap.local.state = previous
            rec.tracker, rec.initialized = (final[n] for n in _RNG_GLOBALS)
            return result

        return inside

    out = {}
    for name in RNG_FUNCTIONS:
        original = require(OWNER, random, name)
        out[name] = dispatching(original, on_state_tracker(name, original), f"megatron.core.tensor_parallel.random.{name}()")
    return out


# ---------------------------------------------------------------------- install


def install(ledger: Any) -> None:
    """Patch the table's getters, the setters, the buffer and the RNG tracker, and their copies in ``megatron.*``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns about Apex/TE on CPU
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import random
        from megatron.core.utils import GlobalMemoryBuffer

    replacements = {}
    for name in GETTERS + UNSUPPORTED:
        if name in VERSIONED_GETTERS and not hasattr(ps, name):
            continue
        original = require(OWNER, ps, name)  # refuses (loudly) a name that is gone
        # A state's answers change only through its overrides, which forget the memo, so
        # argument-free calls of the supported getters are memoized per state.
        # exact=True: each replacement is compiled with the getter's own parameters (no
        # argument packing; introspection shows Megatron's signature).
        params = tuple(inspect.signature(original).parameters)
        replacements[name] = dispatching(
            original, _inside(name, name in GETTERS, params), f"megatron.core.parallel_state.{name}()",
            memoize=name in GETTERS, exact=True,
        )
    side: dict[str, Callable[..., Any]] = {name: _setter(key) for name, key in SETTERS.items()}
    side["get_global_memory_buffer"] = lambda state: _shared_buffer(GlobalMemoryBuffer)
    side["destroy_global_memory_buffer"] = _drop_buffer
    for name, fn in side.items():
        replacements[name] = dispatching(require(OWNER, ps, name), fn, f"megatron.core.parallel_state.{name}()")
    for name in _RNG_GLOBALS:
        require(OWNER, random, name)
    ledger.patch_everywhere(OWNER, ps, replacements, package="megatron")
    ledger.patch_everywhere(OWNER, random, _rng_replacements(ledger, random), package="megatron")
