"""The process-wide picture of entered scopes, for the fallback rule of :mod:`scoped_parallel._scope`.

Every thread keeps its own stack of the frames it entered (no lock on the hot
path); a registry holds the stacks weakly so finished threads drop out, and one
list counts the scopes entered and not yet exited anywhere (``append``/``pop``
are atomic under the GIL, so "no scope anywhere" needs no lock). Only
:mod:`scoped_parallel._scope` writes here. Standard library only.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

__all__ = ["ACTIVE", "active_states", "all_frames", "clear", "has_own_stack", "owner", "thread_stack"]


class _Stack(list):  # type: ignore[type-arg]
    """The frames a thread has entered and not exited yet, in entry order."""

    __slots__ = ("__weakref__",)


_LOCAL = threading.local()
#: One item per entered, not yet exited scope, anywhere in the process.
ACTIVE: list[None] = []
_STACKS: weakref.WeakValueDictionary[int, _Stack] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def thread_stack() -> _Stack:
    stack: _Stack | None = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = _Stack()
        with _REGISTRY_LOCK:
            _STACKS[id(stack)] = stack
    return stack


_get_ident = threading.get_ident


class _AsyncioProbe:
    """asyncio's running-loop and current-task functions, looked up once asyncio is imported."""

    __slots__ = ("running_loop", "current_task")

    def __init__(self) -> None:
        self.running_loop: Callable[[], Any] | None = None
        self.current_task: Callable[[], Any] | None = None


_ASYNCIO = _AsyncioProbe()


def owner() -> tuple[int, int]:
    """The (thread, asyncio task) that is running, as identities."""
    probe = _ASYNCIO
    if probe.running_loop is None:
        asyncio = sys.modules.get("asyncio")
        if asyncio is None:
            return (_get_ident(), 0)
        probe.current_task = asyncio.current_task
        probe.running_loop = asyncio._get_running_loop
    if probe.running_loop() is None:
        return (_get_ident(), 0)
    task = probe.current_task()  # type: ignore[misc]
    return (_get_ident(), 0 if task is None else id(task))


def all_frames() -> list[Any]:
    with _REGISTRY_LOCK:
        stacks = list(_STACKS.values())
    frames: list[Any] = []
    for stack in stacks:
        frames.extend(tuple(stack))  # a snapshot; the owning thread may be changing it
    return frames


def active_states() -> tuple[Any, ...]:
    """The distinct states that are the innermost scope somewhere in the process.

    Innermost per thread *and* asyncio task: a task nested in another state does
    not hide its parent task's own scope.
    """
    innermost: dict[tuple[int, int], Any] = {}
    for frame in all_frames():
        innermost[frame[1]] = frame  # later entries of the same owner are nested deeper
    return tuple(dict.fromkeys(f[0] for f in innermost.values()))




def clear() -> None:
    """Forget every recorded scope (test guards that found a leak)."""
    with _REGISTRY_LOCK:
        stacks = list(_STACKS.values())
    for stack in stacks:
        stack.clear()
    ACTIVE.clear()


def has_own_stack() -> bool:
    """Whether the calling thread has entered a scope that it has not exited."""
    return bool(getattr(_LOCAL, "stack", None))
