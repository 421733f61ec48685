"""``@state.activate()`` on functions, and :func:`propagate` for threads.

Both are built on :class:`scoped_parallel._scope.Activation` and
``contextvars.copy_context``; neither reads the scope's ContextVar itself.
Standard library only.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any, Callable

__all__ = ["decorate", "propagate"]


def decorate(state: Any, fn: Any) -> Any:
    """``fn`` with every call inside ``state``'s scope (sync and ``async def``; no generators)."""
    from scoped_parallel._scope import Activation

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
