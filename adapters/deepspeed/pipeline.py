"""Pipeline parallelism: every ``PipelineEngine`` sends and receives over its own grid.

DeepSpeed's point-to-point layer, ``deepspeed.runtime.pipe.p2p``, routes by module
globals: ``_grid`` (this rank's stage id, stage -> global rank, the number of stages),
``_groups`` (per-pair broadcast groups, used only where torch lacks send/recv) and
``_async`` (pending operations). ``PipelineEngine.__init__`` sets the first two with
``p2p.init_process_groups(self.grid)``, so the last pipeline engine built wins for every
engine. A PP=2 engine stepped after a PP=4 one was built uses the PP=4 stage ids and
ranks: on 4 ranks, ranks 1 and 2 fail DeepSpeed's "adjacent ranks only" assertion and
ranks 0 and 3 send to and wait for the wrong peers until the collective timeout.

After ``install()`` each engine has its own copy of those globals (``P2PNamespace``):

* ``PipelineEngine.__init__`` runs with a fresh namespace (``_grid``/``_groups`` ``None``,
  an empty ``_async``); ``init_process_groups`` called there fills that namespace, and also
  writes the module's globals exactly as unpatched DeepSpeed does (last engine wins there,
  for code that reads them outside any engine). The namespace stays with the engine
  (a weak map: it goes with the engine).
* The engine's methods that run point-to-point traffic (``ENTRY_POINTS`` and every
  ``PipelineEngine`` method whose code names ``p2p``, found at install) make their
  engine *the running pipeline engine* for their duration: a ``ContextVar``, so each
  thread and task has its own, nested calls of another engine are restored on return,
  and an exception restores it too. Nothing is locked and no module global is swapped,
  so two threads may step two pipeline engines at once. (A ``Ledger.swapped`` of the
  module globals would hold the ledger's swap lock for a whole step, and activation
  checkpointing's backward, which swaps under that lock on autograd's device threads
  on GPUs, would wait for it forever.)
* The ``p2p`` functions that read those globals (found at install: ``send``, ``recv``,
  ``wait``, ``init_process_groups``, ...) are patched: while an engine runs, each runs
  as a copy of DeepSpeed's own function whose globals are that engine's namespace (every
  other name, ``dist``, ``torch``, ..., is read live from the module), so the adjacency
  check, the peer rank and the pending list are that engine's. Outside any pipeline
  engine they are DeepSpeed's functions, reading the module. (``send_obj``,
  ``recv_obj`` and ``can_send_recv`` read none of them and stay as they are.)
* ``p2p._grid``, ``p2p._groups`` and ``p2p._async`` read or written as module attributes
  (a module-class property) are the running engine's, else the module's own.
* An engine built before ``install()`` has no namespace; at its first step it gets one
  on its own grid (``engine.grid``). Where torch has no point-to-point send/recv, p2p
  needs the per-pair groups that only the last ``init_process_groups`` created; if those
  belong to another engine, the step is refused with
  :class:`~scoped_parallel.errors.UnsupportedSetupError` before anything is sent (every
  rank decides alike: they all built their engines in one order).

Nothing here depends on a scope: the grid belongs to the engine (``PipelineModule``
builds it from ``num_stages``), so even two pipeline engines stepped outside any scope
use their own grids. The engine's data-parallel lookups at step time still need its
state's scope (see the package doc): run ``train_batch``/``eval_batch`` inside it, or
``state.bind(engine)``.

Not re-pointed, because nothing there is per model: ``DualPipeVEngine`` sends with
``dist.batch_isend_irecv`` to ``self.grid``'s ranks (it inherits this re-pointing for
the warm-up in ``__init__``); ``engine.py``'s ``LOG_STAGE``/``DATA_PARALLEL_ID``/
``TARGET_ID`` (debug constants) and ``mem_alloced``/``mem_cached`` (never written);
``schedule.py`` and ``topology.py`` keep no module state. A user subclass that
overrides an entry point without calling ``super()`` and calls ``p2p`` outside every
method listed above runs on the module's globals.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import types
import weakref
from typing import Any, Callable

from scoped_parallel.adapters._ledger import require
from scoped_parallel.adapters.deepspeed._shared import OWNER, ModuleGlobals, own_functions
from scoped_parallel.errors import UnsupportedSetupError

__all__ = ["ENTRY_POINTS", "GLOBALS", "P2PNamespace", "describe_grid", "install", "namespace_of"]

#: the module globals of ``p2p`` each pipeline engine has its own copy of
GLOBALS = ("_grid", "_groups", "_async")
#: ``PipelineEngine`` methods that always make their engine the running one (besides
#: every method whose own code names ``p2p``)
ENTRY_POINTS = ("__init__", "train_batch", "eval_batch", "_exec_schedule")


class _Module:
    """``p2p``, its original functions and ``PipelineEngine`` (set by ``install()``)."""

    p2p: Any = None
    functions: dict[str, types.FunctionType] = {}
    engine_class: Any = None


class P2PNamespace(ModuleGlobals):
    """One engine's ``p2p`` globals (``GLOBALS``), and copies of ``p2p``'s functions that
    read them (:class:`ModuleGlobals`); ``init_process_groups`` and ``wait`` write here."""

    __slots__ = ()


_RUNNING: contextvars.ContextVar[P2PNamespace | None] = contextvars.ContextVar(
    "scoped_parallel_running_pipeline_engine", default=None
)
_NAMESPACES: weakref.WeakKeyDictionary[Any, P2PNamespace] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _new_namespace(grid: Any = None, groups: Any = None) -> P2PNamespace:
    return P2PNamespace(_grid=grid, _groups=groups, _async=[]).bind(_Module.p2p, _Module.functions)


def namespace_of(engine: Any) -> P2PNamespace:
    """``engine``'s p2p namespace; an engine built before install gets one on its own grid.

    Raises UnsupportedSetupError (before anything is sent) when that engine's p2p would
    need per-pair groups that another engine's ``init_process_groups`` created.
    """
    namespace = _NAMESPACES.get(engine)
    if namespace is not None:
        return namespace
    grid = getattr(engine, "grid", None)
    module = vars(_Module.p2p)
    groups = module["_groups"] if module["_grid"] is grid else None
    if grid is not None and getattr(engine, "is_pipe_parallel", False) and groups is None:
        if not module["can_send_recv"]():
            raise UnsupportedSetupError(
                f"this {type(engine).__name__} (grid: {describe_grid(grid)}) was built before "
                "scoped_parallel.adapters.install(), and DeepSpeed's p2p module now holds the grid of "
                f"another engine ({describe_grid(module['_grid'])}). On this torch p2p sends through "
                "per-pair broadcast groups that only the last engine built created, so this engine "
                "cannot be given its own. Build every pipeline engine after adapters.install() "
                "(each then keeps its own groups), or build this one last."
            )
    namespace = _new_namespace(grid, groups)
    with _LOCK:
        return _NAMESPACES.setdefault(engine, namespace)


def describe_grid(grid: Any) -> str:
    """``"2 stages x 2 data parallel x 1 model parallel (this rank: stage 1)"``, or ``"none"``."""
    if grid is None:
        return "none"
    pipe, data, model = (getattr(grid, f"{axis}_parallel_size", "?") for axis in ("pipe", "data", "model"))
    return (
        f"{pipe} stages x {data} data parallel x {model} model parallel "
        f"(this rank: stage {getattr(grid, 'stage_id', '?')})"
    )


# ---------------------------------------------------------------------- engine methods


def _scoped_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        namespace = _new_namespace()
        with _LOCK:  # registered first: a method of the engine called during __init__ finds it
            _NAMESPACES[self] = namespace
        token = _RUNNING.set(namespace)
        try:
            original(self, *args, **kwargs)
        except BaseException:
            with _LOCK:
                _NAMESPACES.pop(self, None)
            raise
        finally:
            _RUNNING.reset(token)

    return __init__


def _scoped_method(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _RUNNING.set(namespace_of(self))
        try:
            return original(self, *args, **kwargs)
        finally:
            _RUNNING.reset(token)

    return method


# ---------------------------------------------------------------------- p2p functions


def _scoped_function(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    if name == "init_process_groups":

        @functools.wraps(original)
        def init_process_groups(*args: Any, **kwargs: Any) -> Any:
            namespace = _RUNNING.get()
            if namespace is None:
                return original(*args, **kwargs)
            result = namespace[name](*args, **kwargs)
            # The module's globals as unpatched DeepSpeed leaves them (last engine wins there).
            vars(_Module.p2p).update(_grid=namespace["_grid"], _groups=namespace["_groups"])
            return result

        return init_process_groups

    @functools.wraps(original)
    def p2p_function(*args: Any, **kwargs: Any) -> Any:
        namespace = _RUNNING.get()
        if namespace is None:
            return original(*args, **kwargs)
        return namespace[name](*args, **kwargs)

    return p2p_function


def _module_attribute(name: str) -> property:
    """A property of the p2p module class: the running engine's value, else ``__dict__``'s."""

    def read(module: types.ModuleType) -> Any:
        namespace = _RUNNING.get()
        if namespace is not None:
            return namespace[name]
        try:
            return vars(module)[name]
        except KeyError:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None

    def write(module: types.ModuleType, value: Any) -> None:
        namespace = _RUNNING.get()
        (vars(module) if namespace is None else namespace)[name] = value

    return property(read, write, None, f"p2p.{name}: the running pipeline engine's value, else the module's")


def _scoped_module_class(base: type) -> type:
    return type(
        "ScopedDeepSpeedP2PModule",
        (base,),
        {
            "__doc__": "deepspeed.runtime.pipe.p2p with per-engine `_grid`, `_groups`, `_async` (scoped_parallel).",
            "__module__": __name__,
            **{name: _module_attribute(name) for name in GLOBALS},
        },
    )


def _names_in(code: types.CodeType) -> set[str]:
    """Every global or attribute name ``code`` and the code nested in it (comprehensions) use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in(const)
    return names


def install(ledger: Any) -> None:
    """Give every pipeline engine its own ``p2p`` globals (see the module doc)."""
    import deepspeed.runtime.pipe.engine as pipe_engine
    import deepspeed.runtime.pipe.p2p as p2p

    for name in GLOBALS:
        require(OWNER, p2p, name)
    engine_class = require(OWNER, pipe_engine, "PipelineEngine")
    require(OWNER, pipe_engine, "p2p")
    require(OWNER, p2p, "can_send_recv")
    _Module.p2p, _Module.engine_class = p2p, engine_class
    _Module.functions = own_functions(p2p)  # before any is replaced: the originals
    readers = sorted(n for n, fn in _Module.functions.items() if _names_in(fn.__code__) & set(GLOBALS))
    for name in ("init_process_groups", "send", "recv"):
        require(OWNER, p2p, name)
    methods = dict.fromkeys(ENTRY_POINTS)
    for name, fn in vars(engine_class).items():
        if isinstance(fn, types.FunctionType) and "p2p" in _names_in(fn.__code__):
            methods[name] = None
    originals = {name: require(OWNER, engine_class, name) for name in methods}

    ledger.patch_everywhere(
        OWNER, p2p, {name: _scoped_function(name, _Module.functions[name]) for name in readers}, "deepspeed"
    )
    ledger.swap_module_class(OWNER, p2p, _scoped_module_class(type(p2p)))
    for name, original in originals.items():
        wrap = _scoped_init if name == "__init__" else _scoped_method
        ledger.patch(OWNER, engine_class, name, wrap(original))
