"""The process-wide picture of entered scopes, for the fallback rule of :mod:`scoped_parallel._scope`.

Every thread keeps its own stack of the frames it entered (no lock on the hot
path); a registry holds the stacks weakly so finished threads drop out, and one
list counts the scopes entered and not yet exited anywhere (``append``/``pop``
are atomic under the GIL, so "no scope anywhere" needs no lock). A frame is the
tuple ``(state, task)``: ``task`` is the identity of the asyncio task that entered
it, 0 outside a running event loop (the thread is the stack's).

The picture also holds the **running backwards**: one entry per call into
autograd's engine made inside a scope, added when it starts and removed when it
returns (see :func:`scoped_parallel._scope.carrying_backward`); nothing is
recorded per hook. Only :mod:`scoped_parallel._scope` writes here. Standard
library only.
"""

from __future__ import annotations

import threading
import weakref
from asyncio import current_task as _current_task
from asyncio.events import _get_running_loop
from typing import Any

__all__ = [
    "ACTIVE",
    "BACKWARDS",
    "LOCAL",
    "active_states",
    "all_frames",
    "clear",
    "has_own_stack",
    "new_stack",
    "owner",
    "remove_frame",
    "running_backward_states",
    "task",
    "thread_stack",
]


class _Stack(list):  # type: ignore[type-arg]
    """The frames a thread has entered and not exited yet, in entry order."""

    __slots__ = ("__weakref__",)


#: Per-thread storage: ``LOCAL.stack`` is the thread's :class:`_Stack` once it entered a scope.
LOCAL = threading.local()
#: One item per entered, not yet exited scope, anywhere in the process.
ACTIVE: list[None] = []
#: One item per backward running inside a scope: a key unique to the call -> its state.
BACKWARDS: dict[object, Any] = {}
_STACKS: weakref.WeakValueDictionary[int, _Stack] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def new_stack() -> _Stack:
    """Give the calling thread its (empty) stack and register it; return it."""
    stack = LOCAL.stack = _Stack()
    with _REGISTRY_LOCK:
        _STACKS[id(stack)] = stack
    return stack


def thread_stack() -> _Stack:
    """The calling thread's stack of entered frames (created on first use)."""
    stack: _Stack | None = getattr(LOCAL, "stack", None)
    return new_stack() if stack is None else stack


def task() -> int:
    """The identity of the running asyncio task, 0 outside an event loop."""
    loop = _get_running_loop()
    return 0 if loop is None else id(_current_task(loop))


def owner() -> tuple[int, int]:
    """The (thread, asyncio task) that is running, as identities."""
    return (threading.get_ident(), task())


def _stacks() -> list[_Stack]:
    with _REGISTRY_LOCK:
        return list(_STACKS.values())


def all_frames() -> list[Any]:
    """Every frame entered and not exited, thread by thread, in entry order."""
    frames: list[Any] = []
    for stack in _stacks():
        frames.extend(tuple(stack))  # a snapshot; the owning thread may be changing it
    return frames


def active_states() -> tuple[Any, ...]:
    """The distinct states that are the innermost scope somewhere in the process.

    Innermost per thread *and* asyncio task: a task nested in another state does
    not hide its parent task's own scope.
    """
    innermost: dict[tuple[int, int], Any] = {}
    for stack in _stacks():
        for frame in tuple(stack):
            innermost[(id(stack), frame[1])] = frame  # later entries of an owner are nested deeper
    return _distinct(f[0] for f in innermost.values())


def running_backward_states() -> tuple[Any, ...]:
    """The distinct states of the backwards running now (a snapshot, oldest first)."""
    return _distinct(list(BACKWARDS.values()))


def _distinct(states: Any) -> tuple[Any, ...]:
    seen: dict[int, Any] = {}
    for state in states:
        seen.setdefault(id(state), state)
    return tuple(seen.values())


def remove_frame(frame: Any) -> None:
    """Take ``frame`` off whichever thread's stack holds it (exits out of entry order)."""
    stack = getattr(LOCAL, "stack", None)
    candidates = ([stack] if stack is not None else []) + _stacks()
    for stack in candidates:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is frame:
                del stack[i]
                return


def clear() -> None:
    """Forget every recorded scope (test guards that found a leak); running backwards stay."""
    for stack in _stacks():
        stack.clear()
    ACTIVE.clear()


def has_own_stack() -> bool:
    """Whether the calling thread has entered a scope that it has not exited."""
    return bool(getattr(LOCAL, "stack", None))
