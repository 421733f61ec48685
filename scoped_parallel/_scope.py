"""The active-state scope: one private ContextVar and the functions around it.

Only this module reads or writes the variable. It holds an immutable
:class:`_Frame` (the state and the thread/task that
entered it), so copying a context (``asyncio.create_task``,
``contextvars.copy_context``) shares frames safely and a child's changes never
reach its parent.

Threads that did not inherit a context (``threading.Thread``, torch's autograd
device threads on CUDA) see no frame. For them :func:`current_state` falls back
to the process-wide picture: if exactly one state is the innermost active scope
of every place that has one, that state is the answer; if two different states
are innermost in different threads or tasks, it raises
:class:`~scoped_parallel.errors.AmbiguousStateError`.

Adapters never touch the variable either: they build their patched callables
with :func:`dispatching` (and ask :func:`resolve` on cold paths), so the
resolution rule and its fast path live here only.

This module imports only the standard library.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from scoped_parallel import _scope_registry as _registry
from scoped_parallel._scope_registry import ACTIVE as _ACTIVE
from scoped_parallel._scope_registry import active_states
from scoped_parallel._scope_registry import owner as _owner
from scoped_parallel._scope_registry import thread_stack as _thread_stack
from scoped_parallel.errors import (
    AmbiguousStateError,
    NoActiveStateError,
    ScopeNestingError,
)

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = [
    "Activation",
    "current_state",
    "current_state_or_none",
    "dispatching",
    "forget_memo",
    "is_strict",
    "propagate",
    "resolve",
    "set_strict",
]

F = TypeVar("F", bound=Callable[..., Any])


class _Frame(tuple):  # type: ignore[type-arg]
    """One entered scope: ``(state, owner)``. Immutable; compared by identity."""

    __slots__ = ()

    @property
    def state(self) -> Any:
        return self[0]

    @property
    def owner(self) -> tuple[int, int]:
        return self[1]  # type: ignore[no-any-return]


_CURRENT: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar(
    "scoped_parallel.current_frame", default=None
)


def _forget_all_scopes() -> None:
    """Drop every scope record (for test guards that found a leak): not for production use."""
    _CURRENT.set(None)
    _registry.clear()


def current_state_or_none() -> ParallelState | None:
    """The active state, or ``None`` when no scope applies.

    Resolution: the calling context's innermost ``activate()`` scope; else, in a
    thread that inherited no scope, the single state active anywhere in the
    process. Raises :class:`AmbiguousStateError` when that fallback finds
    several different states (a wrong process group would corrupt training
    silently, so this never guesses).
    """
    frame = _CURRENT.get()
    if frame is not None:
        return frame[0]
    if not _ACTIVE:
        return None
    if _registry.has_own_stack():
        # A scope is active in this very thread (another asyncio task of it, or a parent
        # that awaits a child): this context simply has none of its own. The fallback is
        # for threads where no scope is active at all.
        return None
    states = active_states()
    if not states:
        return None
    if len(states) == 1:
        return states[0]  # type: ignore[no-any-return]
    names = ", ".join(_describe(s) for s in states)
    raise AmbiguousStateError(
        f"this thread has no active scope and {len(states)} different states are active in "
        f"other threads or tasks ({names}), so the state to use is ambiguous. Enter the right "
        "state here with `with state.activate():`, or hand the caller's scope to this thread "
        "with scoped_parallel.propagate(fn)."
    )


def current_state() -> ParallelState:
    """The active state; raises :class:`NoActiveStateError` when there is none.

    Example::

        with actor.activate():
            assert scoped_parallel.current_state() is actor
    """
    frame = _CURRENT.get()
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


class Activation:
    """What ``state.activate()`` returns: a context manager and a decorator.

    The object is cheap and re-entrant: entering it while it is already
    entered nests (it keeps one token per entry). ``__enter__`` returns the
    state. Exiting checks that this scope is the innermost one in the calling
    context; if not, :class:`ScopeNestingError` names both states and the scope
    is left untouched.
    """

    __slots__ = ("_state", "_entries")

    def __init__(self, state: Any) -> None:
        self._state = state
        self._entries: list[tuple[contextvars.Token[_Frame | None], _Frame]] = []

    def __repr__(self) -> str:
        return f"<Activation of {_describe(self._state)}, entered {len(self._entries)}x>"

    def __enter__(self) -> Any:
        state = self._state
        frame = _Frame((state, _owner()))
        token = _CURRENT.set(frame)
        _thread_stack().append(frame)
        _ACTIVE.append(None)
        self._entries.append((token, frame))
        return state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entries:
            raise ScopeNestingError(
                f"exit of the scope of {_describe(self._state)} that was not entered "
                "(exited twice?); use each `with state.activate():` block once per entry"
            )
        current = _CURRENT.get()
        # One activation object may be entered by several tasks or threads at once (a
        # shared decorator-less object): exit the entry that this context entered.
        index = len(self._entries) - 1
        while index >= 0 and self._entries[index][1] is not current:
            index -= 1
        token, frame = self._entries[index if index >= 0 else -1]
        if current is not frame:
            found = "no scope" if current is None else f"the scope of {_describe(current.state)}"
            raise ScopeNestingError(
                f"out-of-order exit: leaving the scope of {_describe(self._state)} but the "
                f"innermost active scope here is {found}. Scopes must be exited in reverse "
                "order of entry, in the thread or task that entered them (a scope held across "
                "`yield`/`await` and closed elsewhere causes this). The scope was left unchanged."
            )
        try:
            _CURRENT.reset(token)
        except ValueError as err:
            raise ScopeNestingError(
                f"the scope of {_describe(self._state)} was entered in another context "
                "(thread or asyncio task) than the one exiting it; exit it where it was "
                "entered. The scope was left unchanged."
            ) from err
        del self._entries[index]
        _ACTIVE.pop()
        stack = _thread_stack()
        if stack and stack[-1] is frame:
            stack.pop()
        else:  # asyncio tasks of one thread may exit out of entry order
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is frame:
                    del stack[i]
                    break

    def __call__(self, fn: F) -> F:
        """Use the activation as a decorator: every call runs inside the scope."""
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"cannot decorate generator function {fn.__qualname__!r} with activate(): "
                "the scope would end at the first `yield` and resume in whatever scope the "
                "consumer has. Enter `with state.activate():` inside the generator body instead."
            )
        state = self._state
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with Activation(state):
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with Activation(state):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


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


# ---------------------------------------------------------------------- dispatch for adapters
#
# Patched library functions answer from the active state. Their wrappers are built
# here, from one template, so that the resolution rule above and its fast path exist
# once: adapters say what to call inside a scope and what outside, nothing else.


class _Strict:
    """Whether a patched function with no state to answer from raises (True) or falls through."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


_STRICT = _Strict()


def set_strict(strict: bool) -> None:
    """Make patched functions called where no state resolves raise (``True``) or fall through."""
    _STRICT.on = bool(strict)


def is_strict() -> bool:
    """Whether patched functions raise where no state resolves (see :func:`set_strict`)."""
    return _STRICT.on


def resolve(what: str) -> ParallelState | None:
    """The state a patched function named ``what`` answers from, or ``None`` to fall through.

    The full rule (innermost scope, then the fallback of :func:`current_state_or_none`),
    plus strict mode: with ``set_strict(True)`` no state raises
    :class:`NoActiveStateError` naming ``what``. Hot paths use :func:`dispatching`,
    which inlines the common cases of this function.
    """
    frame = _CURRENT.get()
    if frame is not None:
        return frame[0]  # type: ignore[no-any-return]
    state = current_state_or_none() if _ACTIVE else None
    if state is None and _STRICT.on:
        raise NoActiveStateError(
            f"{what} was called outside any scope while scoped_parallel adapters are installed "
            "in strict mode. Call it inside `with state.activate():` (or on an engine bound with "
            "state.bind(engine)), or install the adapters with strict=False to fall back to the "
            "library's own global state."
        )
    return state


def forget_memo(state: Any) -> None:
    """Drop the answers :func:`dispatching` memoized for ``state`` (its inputs changed)."""
    memo = getattr(state, "_memo", None)
    if memo is not None:
        memo.clear()


def dispatching(
    original: Callable[..., Any],
    inside: Callable[..., Any],
    what: str,
    *,
    memoize: bool = False,
) -> Callable[..., Any]:
    """A replacement for ``original`` that answers ``inside(state, *args)`` in a scope.

    Where :func:`resolve` finds no state, the replacement calls ``original(*args)``
    (or raises in strict mode). With ``memoize=True`` the function must take no
    arguments and its answer is kept per state in the state's ``_memo`` dict until
    :func:`forget_memo` (the state clears it on ``destroy()``); use it for readers whose
    answer depends only on the state and on inputs that call ``forget_memo`` when they
    change.

    Worked example (what the DeepSpeed adapter does for a getter)::

        groups._get_data_parallel_group = dispatching(
            original, lambda state: state.get_data_parallel_group(),
            "deepspeed.utils.groups._get_data_parallel_group", memoize=True)
    """
    if not memoize:

        @functools.wraps(original)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            frame = _CURRENT.get()
            if frame is not None:
                return inside(frame[0], *args, **kwargs)
            state = resolve(what) if (_ACTIVE or _STRICT.on) else None
            if state is None:
                return original(*args, **kwargs)
            return inside(state, *args, **kwargs)

        return scoped

    key = (what, inside)

    @functools.wraps(original)
    def scoped_reader(
        *,
        _get: Any = _CURRENT.get,
        _active: Any = _ACTIVE,
        _strict: Any = _STRICT,
        _original: Any = original,
        _inside: Any = inside,
        _key: Any = key,
    ) -> Any:
        # The same rule for argument-free hot readers, with every name bound as a default
        # (a local lookup) and the answer memoized per state.
        frame = _get()
        if frame is None:
            state = resolve(what) if (_active or _strict.on) else None
            if state is None:
                return _original()
        else:
            state = frame[0]
        memo = state._memo
        try:
            return memo[_key]
        except KeyError:
            answer = memo[_key] = _inside(state)
            return answer

    return scoped_reader
