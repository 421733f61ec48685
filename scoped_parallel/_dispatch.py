"""The one resolver/dispatch template of the adapters (re-exported by :mod:`scoped_parallel._scope`).

Patched library functions answer from the active state. Their wrappers are built
here, from one template, so that the resolution rule of
:mod:`scoped_parallel._scope` and its fast path exist once: adapters say what to
call inside a scope and what outside, nothing else. This module reads the scope's
ContextVar only through ``_scope._get`` (its bound ``get``) and never writes it.
Standard library only.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable

from scoped_parallel._scope import _get, current_state_or_none
from scoped_parallel._scope_registry import ACTIVE as _ACTIVE
from scoped_parallel.errors import NoActiveStateError

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = ["dispatching", "forget_memo", "is_strict", "resolve", "set_strict"]


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
    frame = _get()
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
    (or raises in strict mode). With ``memoize=True`` the answer of a call *without
    arguments* is kept per state in the state's ``_memo`` dict until
    :func:`forget_memo` (the state clears it on ``destroy()``); calls with arguments
    always ask ``inside``. Use it for readers whose answer depends only on the state
    and on inputs that call ``forget_memo`` when they change.

    Worked example (what the DeepSpeed adapter does for a getter)::

        groups._get_data_parallel_group = dispatching(
            original, lambda state: state.get_data_parallel_group(),
            "deepspeed.utils.groups._get_data_parallel_group", memoize=True)
    """
    # Every name the wrappers use is a closure cell (a local-speed lookup), and the
    # first test is the only one a call inside a scope makes before answering.
    get, active, strict = _get, _ACTIVE, _STRICT

    if not memoize:

        @functools.wraps(original)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            frame = get()
            if frame is not None:
                return inside(frame[0], *args, **kwargs)
            state = resolve(what) if (active or strict.on) else None
            if state is None:
                return original(*args, **kwargs)
            return inside(state, *args, **kwargs)

        return scoped

    key = object()  # hashed by identity: the cheapest key a dict has

    if not inspect.signature(original).parameters:

        @functools.wraps(original)
        def scoped_reader() -> Any:
            frame = get()
            if frame is None:
                if not (active or strict.on):
                    return original()
                state = resolve(what)
                if state is None:
                    return original()
            else:
                state = frame[0]
            try:
                return state._memo[key]
            except KeyError:
                answer = state._memo[key] = inside(state)
                return answer

        return scoped_reader

    @functools.wraps(original)
    def scoped_getter(*args: Any, **kwargs: Any) -> Any:
        frame = get()
        if frame is None:
            state = resolve(what) if (active or strict.on) else None
            if state is None:
                return original(*args, **kwargs)
        else:
            state = frame[0]
        if args or kwargs:
            return inside(state, *args, **kwargs)
        try:
            return state._memo[key]
        except KeyError:
            answer = state._memo[key] = inside(state)
            return answer

    return scoped_getter
