"""The active-state scope: one private ContextVar and everything built on it.

Only this module reads or writes the variable. It holds an immutable frame, the
tuple ``(state, task)`` (``task``: the asyncio task that entered it, 0 outside an
event loop), so copying a context (``asyncio.create_task``,
``contextvars.copy_context``) shares frames safely and a child's changes never
reach its parent.

Threads that did not inherit a context (``threading.Thread``, torch's autograd
device threads on CUDA) see no frame. For them :func:`current_state` falls back
to the process-wide picture kept below (every thread's stack of entered frames,
the count of scopes entered anywhere, the running backwards):

1. while backwards started inside scopes are running (:func:`carrying_backward`
   records them), the state of those backwards if they all have the same one;
   backwards of two different states at once raise
   :class:`~scoped_parallel.errors.AmbiguousStateError` naming both;
2. else, if exactly one state is the innermost active scope of every place that
   has one, that state; two different innermost states raise
   :class:`~scoped_parallel.errors.AmbiguousStateError`.

The sections, in order: the process-wide picture; resolution
(:func:`current_state`, :func:`~scoped_parallel.scope.current_state_or_none`); :class:`Activation` (token
exit that checks nesting); functions and threads (``@state.activate()``,
:func:`propagate`); engines (:func:`bind`, :func:`unbind`); autograd carriers
(:func:`carrying_backward`, :func:`hook_in_scope`). Adapters use the public
:mod:`scoped_parallel.dispatch`, which reads the variable through ``_get`` only.

Worked example on 8 ranks (``actor`` TP=2 on all 8, ``critic`` DP=8)::

    with actor.activate():                  # this thread/task: actor
        assert current_state() is actor
        with critic.activate():             # nested: critic until the inner block ends
            assert current_state() is critic
        pool.submit(propagate(fn))          # fn runs with actor in a worker thread

This module imports only the standard library.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import weakref
from asyncio import current_task as _current_task
from asyncio.events import _get_running_loop
from types import TracebackType
from typing import Any, Callable, TypeVar

from scoped_parallel.errors import (
    AmbiguousStateError,
    NoActiveStateError,
    ScopedParallelError,
    ScopeNestingError,
    describe_state,
)

__all__ = [
    "BOUND_METHODS",
    "Activation",
    "active_states",
    "bind",
    "carrying_backward",
    "current_state",
    "current_state_or_none",
    "decorate",
    "hook_in_scope",
    "propagate",
    "unbind",
]

F = TypeVar("F", bound=Callable[..., Any])

# ---------------------------------------------------------------------- the process-wide picture
#
# Every thread keeps its own stack of the frames it entered (no lock on the hot path);
# a registry holds the stacks weakly so finished threads drop out, and one list counts
# the scopes entered and not yet exited anywhere (``append``/``pop`` are atomic under
# the GIL, so "no scope anywhere" needs no lock). The running backwards: one entry per
# call into autograd's engine made inside a scope, for the duration of the call.


class _Stack(list):  # type: ignore[type-arg]
    """The frames a thread has entered and not exited yet, in entry order."""

    __slots__ = ("__weakref__",)


#: Per-thread storage: ``_LOCAL.stack`` is the thread's :class:`_Stack` once it entered a scope.
_LOCAL = threading.local()
#: One item per entered, not yet exited scope, anywhere in the process.
_ACTIVE: list[None] = []
#: One item per backward running inside a scope: a key unique to the call -> its state.
_BACKWARDS: dict[object, Any] = {}
_STACKS: weakref.WeakValueDictionary[int, _Stack] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def _new_stack() -> _Stack:
    """Give the calling thread its (empty) stack and register it; return it."""
    stack = _LOCAL.stack = _Stack()
    with _REGISTRY_LOCK:
        _STACKS[id(stack)] = stack
    return stack


def _thread_stack() -> _Stack:
    """The calling thread's stack of entered frames (created on first use)."""
    stack: _Stack | None = getattr(_LOCAL, "stack", None)
    return _new_stack() if stack is None else stack


def _stacks() -> list[_Stack]:
    with _REGISTRY_LOCK:
        return list(_STACKS.values())


def active_states() -> tuple[Any, ...]:
    """The distinct states that are the innermost scope somewhere in the process.

    Innermost per thread *and* asyncio task: a task nested in another state does
    not hide its parent task's own scope.
    """
    innermost: dict[tuple[int, int], Any] = {}
    for stack in _stacks():
        for frame in tuple(stack):  # a snapshot; the owning thread may be changing it
            innermost[(id(stack), frame[1])] = frame  # later entries of an owner are nested deeper
    return _distinct(f[0] for f in innermost.values())


def _running_backward_states() -> tuple[Any, ...]:
    """The distinct states of the backwards running now (a snapshot, oldest first)."""
    return _distinct(list(_BACKWARDS.values()))


def _distinct(states: Any) -> tuple[Any, ...]:
    seen: dict[int, Any] = {}
    for state in states:
        seen.setdefault(id(state), state)
    return tuple(seen.values())


def _remove_frame(frame: Any) -> None:
    """Take ``frame`` off whichever thread's stack holds it (exits out of entry order)."""
    stack = getattr(_LOCAL, "stack", None)
    candidates = ([stack] if stack is not None else []) + _stacks()
    for stack in candidates:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is frame:
                del stack[i]
                return


def _has_own_stack() -> bool:
    """Whether the calling thread has entered a scope that it has not exited."""
    return bool(getattr(_LOCAL, "stack", None))


# ---------------------------------------------------------------------- the variable and resolution

_CURRENT: contextvars.ContextVar[tuple[Any, int] | None] = contextvars.ContextVar(
    "scoped_parallel.current_frame", default=None
)
# Bound once: the hot paths call these without an attribute lookup. ``_get`` is also
# what scoped_parallel.dispatch reads the variable with (it never writes it).
_get = _CURRENT.get
_set = _CURRENT.set
_reset = _CURRENT.reset
_push_active = _ACTIVE.append
_pop_active = _ACTIVE.pop


def _forget_all_scopes() -> None:
    """Drop every scope record (for test guards that found a leak): not for production use."""
    _CURRENT.set(None)
    for stack in _stacks():
        stack.clear()
    _ACTIVE.clear()

def current_state_or_none() -> Any:
    """The active state, or ``None`` when no scope applies.

    Resolution: the calling context's innermost ``activate()`` scope; else, in a
    thread that inherited no scope, the state of the backwards running now (a
    backward called inside a scope carries it to the threads that run its hooks),
    else the single state active anywhere in the process. Raises
    :class:`~scoped_parallel.errors.AmbiguousStateError` when that fallback finds several different states
    (a wrong process group would corrupt training silently, so this never guesses).
    """
    frame = _get()
    if frame is not None:
        return frame[0]  # type: ignore[no-any-return]
    if not _ACTIVE:
        return None
    if _has_own_stack():
        # A scope is active in this very thread (another asyncio task of it, or a parent
        # that awaits a child): this context simply has none of its own. The fallback is
        # for threads where no scope is active at all.
        return None
    if _BACKWARDS:
        states = _running_backward_states()
        if len(states) == 1:
            return states[0]  # type: ignore[no-any-return]
        if states:
            raise AmbiguousStateError(
                f"this thread has no active scope and backwards of {len(states)} different states "
                f"are running at the same time ({_names(states)}), so the state to use is ambiguous. "
                "Run the backwards of different states one after the other, or enter the right state "
                "here with `with state.activate():`."
            )
    states = active_states()
    if not states:
        return None
    if len(states) == 1:
        return states[0]  # type: ignore[no-any-return]
    raise AmbiguousStateError(
        f"this thread has no active scope and {len(states)} different states are active in "
        f"other threads or tasks ({_names(states)}), so the state to use is ambiguous. Enter the "
        "right state here with `with state.activate():`, or hand the caller's scope to this "
        "thread with scoped_parallel.propagate(fn)."
    )


def current_state() -> Any:
    """The active state; raises :class:`~scoped_parallel.errors.NoActiveStateError` when there is none.

    Example::

        with actor.activate():
            assert scoped_parallel.current_state() is actor
    """
    frame = _get()
    if frame is not None:
        return frame[0]  # type: ignore[no-any-return]
    state = current_state_or_none()
    if state is None:
        raise NoActiveStateError(
            "no ParallelState is active here. Wrap the call in `with state.activate():`, "
            "decorate the function with `@state.activate()`, or bind an engine with "
            "`state.bind(engine)`; for thread pools, submit scoped_parallel.propagate(fn)."
        )
    return state


def _names(states: tuple[Any, ...]) -> str:
    return ", ".join(describe_state(s) for s in states)


class Activation:
    """What ``state.activate()`` returns: a context manager and a decorator.

    The object is cheap and re-entrant: entering it while it is already
    entered nests (it keeps one token per entry). ``__enter__`` returns the
    state. Exiting checks that this scope is the innermost one in the calling
    context; if not, :class:`~scoped_parallel.errors.ScopeNestingError` names both states and the scope
    is left untouched. An object that is entered once and exited many times
    (``act = state.activate()`` kept and re-entered) skips the construction, the
    larger part of a switch's cost (see the README's benchmarks).
    """

    __slots__ = ("_state", "_entries")

    def __init__(self, state: Any) -> None:
        self._state = state
        self._entries: list[tuple[contextvars.Token[Any], tuple[Any, int]]] = []

    def __repr__(self) -> str:
        return f"<Activation of {describe_state(self._state)}, entered {len(self._entries)}x>"

    def __enter__(self) -> Any:
        # Everything inlined: one frame tuple, the ContextVar, the thread's stack and the
        # process-wide count (the fallback's picture), the token for the exit.
        state = self._state
        loop = _get_running_loop()
        frame = (state, 0 if loop is None else id(_current_task(loop)))
        token = _set(frame)
        try:
            _LOCAL.stack.append(frame)
        except AttributeError:
            _new_stack().append(frame)
        _push_active(None)
        self._entries.append((token, frame))
        return state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entries = self._entries
        if entries:
            token, frame = entry = entries[-1]
            if _get() is frame:  # the common case: the innermost scope, exited where entered
                try:
                    _reset(token)
                except ValueError:
                    self._refuse_foreign()
                entries.remove(entry)
                _pop_active()
                stack = getattr(_LOCAL, "stack", None)
                if stack and stack[-1] is frame:
                    stack.pop()
                else:  # asyncio tasks of one thread may exit out of entry order
                    _remove_frame(frame)
                return
        self._exit_slow()

    def _exit_slow(self) -> None:
        entries = self._entries
        if not entries:
            raise ScopeNestingError(
                f"exit of the scope of {describe_state(self._state)} that was not entered "
                "(exited twice?); use each `with state.activate():` block once per entry"
            )
        current = _get()
        # One activation object may be entered by several tasks or threads at once (a
        # shared object): exit the entry that this context entered.
        entry = next((e for e in reversed(entries) if e[1] is current), None)
        if entry is None:
            found = "no scope" if current is None else f"the scope of {describe_state(current[0])}"
            raise ScopeNestingError(
                f"out-of-order exit: leaving the scope of {describe_state(self._state)} but the "
                f"innermost active scope here is {found}. Scopes must be exited in reverse "
                "order of entry, in the thread or task that entered them (a scope held across "
                "`yield`/`await` and closed elsewhere causes this). The scope was left unchanged."
            )
        try:
            _reset(entry[0])
        except ValueError:
            self._refuse_foreign()
        entries.remove(entry)
        _pop_active()
        _remove_frame(entry[1])

    def _refuse_foreign(self) -> None:
        raise ScopeNestingError(
            f"the scope of {describe_state(self._state)} was entered in another context "
            "(thread or asyncio task) than the one exiting it; exit it where it was "
            "entered. The scope was left unchanged."
        )

    def __call__(self, fn: F) -> F:
        """Use the activation as a decorator: every call runs inside the scope."""
        return decorate(self._state, fn)


# ---------------------------------------------------------------------- functions and threads


def decorate(state: Any, fn: Any) -> Any:
    """``fn`` with every call inside ``state``'s scope (sync and ``async def``; no generators)."""
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"cannot decorate generator function {fn.__qualname__!r} with activate(): "
            "the scope would end at the first `yield` and resume in whatever scope the "
            "consumer has. Enter `with state.activate():` inside the generator body instead."
        )
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with Activation(state):
                return await fn(*args, **kwargs)

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with Activation(state):
            return fn(*args, **kwargs)

    return wrapper


def propagate(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return a callable that runs ``fn`` under the caller's current scope.

    Use it where a new thread would otherwise start with no scope::

        with critic.activate():
            pool.submit(scoped_parallel.propagate(compute_values), batch)

    The whole context is captured now (as ``asyncio.create_task`` does); each
    call runs in a fresh copy of it, so concurrent calls do not interfere.
    """
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run_in_captured_scope(*args: Any, **kwargs: Any) -> Any:
        return ctx.copy().run(fn, *args, **kwargs)

    return run_in_captured_scope


# ---------------------------------------------------------------------- engines
#
# ``state.bind(engine)`` wraps the engine's entry points (BOUND_METHODS and ``__call__``)
# with ``state.activate()``; the call operator needs a class-level ``__call__``, so a
# callable engine's class is swapped for a cached subclass that enters the scope first.
# ``unbind`` restores the instance attributes and the class. Works for any object
# (DeepSpeed engines, ``nn.Module`` s); nothing here imports DeepSpeed.

#: Engine methods that :meth:`ParallelState.bind <scoped_parallel.ParallelState.bind>` runs inside the state's scope.
BOUND_METHODS = (
    "forward",
    "backward",
    "step",
    "train_batch",
    "eval_batch",
    "save_checkpoint",
    "load_checkpoint",
)
_BOUND_ATTR = "_scoped_parallel_bound_state"
_SAVED_ATTR = "_scoped_parallel_saved_methods"
_SCOPED_CLASSES: dict[type, type] = {}


def _scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    state = self.__dict__[_BOUND_ATTR]
    with state.activate():
        return super(type(self), self).__call__(*args, **kwargs)


def _scoped_class(cls: type) -> type:
    sub = _SCOPED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__call__": _scoped_call, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SCOPED_CLASSES[cls] = sub
    return sub


def bind(state: Any, engine: Any) -> Any:
    """Wrap ``engine``'s entry points in ``state``'s scope; return the engine (see the module doc)."""
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is state:
        return engine
    if holder is not None:
        raise ScopedParallelError(
            f"{type(engine).__name__} is already bound to {describe_state(holder)}; an engine belongs to "
            f"one state. Call {describe_state(holder)}.unbind(engine) first if you really mean to move it."
        )
    wrapped = {}
    for name in BOUND_METHODS:
        method = getattr(engine, name, None)
        if callable(method):
            wrapped[name] = state.activate()(method)
    # Instance attributes of those names that existed before (patched methods) come back on unbind.
    saved = {name: engine.__dict__[name] for name in wrapped if name in engine.__dict__}
    object.__setattr__(engine, _BOUND_ATTR, state)
    object.__setattr__(engine, _SAVED_ATTR, saved)
    for name, fn in wrapped.items():
        object.__setattr__(engine, name, fn)
    if callable(engine):
        object.__setattr__(engine, "__class__", _scoped_class(type(engine)))
    return engine


def unbind(state: Any, engine: Any) -> Any:
    """Undo :func:`bind`; return the engine."""
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is None:
        return engine
    if holder is not state:
        raise ScopedParallelError(
            f"{type(engine).__name__} is bound to {describe_state(holder)}, not to {describe_state(state)}; "
            f"call {describe_state(holder)}.unbind(engine) instead"
        )
    for name in BOUND_METHODS:
        engine.__dict__.pop(name, None)
    engine.__dict__.update(engine.__dict__.pop(_SAVED_ATTR, {}))
    del engine.__dict__[_BOUND_ATTR]
    if type(engine) in _SCOPED_CLASSES.values():
        object.__setattr__(engine, "__class__", type(engine).__mro__[1])
    return engine


# ---------------------------------------------------------------------- backward and hooks
#
# On CUDA the autograd engine runs hooks, autograd.Function.backward and checkpoint
# recompute on its device threads, which see no ContextVar. Two carriers, both applied
# by the ``autograd`` adapter: the engine's entry point records the caller's state for
# the duration of the backward (the fallback above reads it), and hooks registered
# inside a scope run in that scope wherever they run.


def carrying_backward(run: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap autograd's engine entry point so a backward carries its caller's state.

    While the returned function runs inside a scope of state A, every thread with no
    scope of its own resolves to A (one entry in the process-wide picture per call,
    nothing per hook); outside any scope it is ``run`` unchanged.
    """

    @functools.wraps(run)
    def run_backward(*args: Any, **kwargs: Any) -> Any:
        frame = _get()
        if frame is None:
            return run(*args, **kwargs)
        key = object()
        _BACKWARDS[key] = frame[0]
        try:
            return run(*args, **kwargs)
        finally:
            del _BACKWARDS[key]

    return run_backward


def hook_in_scope(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` bound to the calling context's state: it runs in that scope wherever it runs.

    Outside any scope ``hook`` itself is returned. The wrapper enters the scope only
    when the thread running it is in another one (or none), so a hook of the critic
    reached by a backward called in the actor's scope, on any thread, sees the critic.
    """
    frame = _get()
    if frame is None:
        return hook
    state = frame[0]
    activation = Activation

    def hook_in_its_scope(*args: Any, **kwargs: Any) -> Any:
        current = _get()
        if current is not None and current[0] is state:
            return hook(*args, **kwargs)
        with activation(state):
            return hook(*args, **kwargs)

    hook_in_its_scope.__wrapped__ = hook  # type: ignore[attr-defined]
    return hook_in_its_scope
