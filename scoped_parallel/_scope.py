"""The active-state scope: one private ContextVar and the functions around it.

Only this module reads or writes the variable. It holds an immutable frame, the
tuple ``(state, task)`` (``task``: the asyncio task that entered it, 0 outside an
event loop), so copying a context (``asyncio.create_task``,
``contextvars.copy_context``) shares frames safely and a child's changes never
reach its parent.

Threads that did not inherit a context (``threading.Thread``, torch's autograd
device threads on CUDA) see no frame. For them :func:`current_state` falls back
to the process-wide picture (:mod:`scoped_parallel._scope_registry`):

1. while backwards started inside scopes are running (:func:`carrying_backward`
   records them), the state of those backwards if they all have the same one;
   backwards of two different states at once raise
   :class:`~scoped_parallel.errors.AmbiguousStateError` naming both;
2. else, if exactly one state is the innermost active scope of every place that
   has one, that state; two different innermost states raise
   :class:`~scoped_parallel.errors.AmbiguousStateError`.

Adapters never touch the variable either: they build their patched callables
with :func:`dispatching` (and ask :func:`resolve` on cold paths), wrap autograd's
entry point with :func:`carrying_backward` and hooks with :func:`hook_in_scope`,
so the resolution rule and its fast paths live here only.

This module imports only the standard library.
"""

from __future__ import annotations

import contextvars
import functools
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from scoped_parallel import _scope_registry as _registry
from scoped_parallel._scope_registry import ACTIVE as _ACTIVE
from scoped_parallel._scope_registry import BACKWARDS as _BACKWARDS
from scoped_parallel._scope_registry import LOCAL as _LOCAL
from scoped_parallel._scope_registry import _current_task, _get_running_loop, active_states
from scoped_parallel._scope_registry import new_stack as _new_stack
from scoped_parallel._scope_registry import remove_frame as _remove_frame
from scoped_parallel._scope_registry import running_backward_states

_thread_stack = _registry.thread_stack  # the calling thread's frames (tests clean up with it)

from scoped_parallel.errors import (
    AmbiguousStateError,
    NoActiveStateError,
    ScopeNestingError,
)

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = [
    "Activation",
    "carrying_backward",
    "current_state",
    "current_state_or_none",
    "dispatching",
    "forget_memo",
    "hook_in_scope",
    "is_strict",
    "propagate",
    "resolve",
    "set_strict",
]

F = TypeVar("F", bound=Callable[..., Any])

_CURRENT: contextvars.ContextVar[tuple[Any, int] | None] = contextvars.ContextVar(
    "scoped_parallel.current_frame", default=None
)
# Bound once: the hot paths below call these without an attribute lookup.
_get = _CURRENT.get
_set = _CURRENT.set
_reset = _CURRENT.reset
_push_active = _ACTIVE.append
_pop_active = _ACTIVE.pop


def _forget_all_scopes() -> None:
    """Drop every scope record (for test guards that found a leak): not for production use."""
    _CURRENT.set(None)
    _registry.clear()


def current_state_or_none() -> ParallelState | None:
    """The active state, or ``None`` when no scope applies.

    Resolution: the calling context's innermost ``activate()`` scope; else, in a
    thread that inherited no scope, the state of the backwards running now (a
    backward called inside a scope carries it to the threads that run its hooks),
    else the single state active anywhere in the process. Raises
    :class:`AmbiguousStateError` when that fallback finds several different states
    (a wrong process group would corrupt training silently, so this never guesses).
    """
    frame = _get()
    if frame is not None:
        return frame[0]  # type: ignore[no-any-return]
    if not _ACTIVE:
        return None
    if _registry.has_own_stack():
        # A scope is active in this very thread (another asyncio task of it, or a parent
        # that awaits a child): this context simply has none of its own. The fallback is
        # for threads where no scope is active at all.
        return None
    if _BACKWARDS:
        states = running_backward_states()
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


def current_state() -> ParallelState:
    """The active state; raises :class:`NoActiveStateError` when there is none.

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


def _describe(state: Any) -> str:
    name = getattr(state, "name", None)
    return repr(name) if name else repr(state)


def _names(states: tuple[Any, ...]) -> str:
    return ", ".join(_describe(s) for s in states)


class Activation:
    """What ``state.activate()`` returns: a context manager and a decorator.

    The object is cheap and re-entrant: entering it while it is already
    entered nests (it keeps one token per entry). ``__enter__`` returns the
    state. Exiting checks that this scope is the innermost one in the calling
    context; if not, :class:`ScopeNestingError` names both states and the scope
    is left untouched. An object that is entered once and exited many times
    (``act = state.activate()`` kept and re-entered) skips the construction, the
    larger part of a switch's cost (see the README's benchmarks).
    """

    __slots__ = ("_state", "_entries")

    def __init__(self, state: Any) -> None:
        self._state = state
        self._entries: list[tuple[contextvars.Token[Any], tuple[Any, int]]] = []

    def __repr__(self) -> str:
        return f"<Activation of {_describe(self._state)}, entered {len(self._entries)}x>"

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
                f"exit of the scope of {_describe(self._state)} that was not entered "
                "(exited twice?); use each `with state.activate():` block once per entry"
            )
        current = _get()
        # One activation object may be entered by several tasks or threads at once (a
        # shared object): exit the entry that this context entered.
        entry = next((e for e in reversed(entries) if e[1] is current), None)
        if entry is None:
            found = "no scope" if current is None else f"the scope of {_describe(current[0])}"
            raise ScopeNestingError(
                f"out-of-order exit: leaving the scope of {_describe(self._state)} but the "
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
            f"the scope of {_describe(self._state)} was entered in another context "
            "(thread or asyncio task) than the one exiting it; exit it where it was "
            "entered. The scope was left unchanged."
        )

    def __call__(self, fn: F) -> F:
        """Use the activation as a decorator: every call runs inside the scope."""
        from scoped_parallel._scope_decorate import decorate

        return decorate(self._state, fn)


from scoped_parallel._scope_decorate import propagate  # noqa: E402  (re-exported: public here)

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


# The dispatch template for adapters lives next door (it only reads the variable, through
# ``_get``); re-exported here, where adapters have always found it.
from scoped_parallel._dispatch import (  # noqa: E402
    dispatching,
    forget_memo,
    is_strict,
    resolve,
    set_strict,
)
