"""The thread scenario of the backward carrier, shared by the CPU tests and the GPU script.

CPU autograd runs hooks on the thread that called ``backward()``, so the device-thread
situation is reproduced directly: the backward is held inside a hook (``pause``) while a
fresh thread with no scope reads, and other threads hold other states' scopes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from scoped_parallel.store import StateStore

TIMEOUT = 60.0


class Stub:
    """A stand-in state: a name, a store for patched getters' memo, and ``activate()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.store = StateStore(lambda: name)  # what patched getters memoize in

    def activate(self) -> Any:
        from scoped_parallel.scope import Activation

        return Activation(self)

    def __repr__(self) -> str:
        return f"Stub({self.name})"


def catch(fn: Callable[[], Any]) -> Any:
    """``fn()``, or the exception it raised (handed back to the asserting thread)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return err


@contextlib.contextmanager
def holding(*states: Any) -> Iterator[None]:
    """Threads that each hold one of ``states``' scopes for the duration of the block."""
    release = threading.Event()
    entered: list[threading.Event] = []
    threads = []

    def hold(state: Any, ready: threading.Event) -> None:
        with state.activate():
            ready.set()
            release.wait(TIMEOUT)

    for state in states:
        ready = threading.Event()
        entered.append(ready)
        threads.append(threading.Thread(target=hold, args=(state, ready), daemon=True))
        threads[-1].start()
    try:
        for ready in entered:
            assert ready.wait(TIMEOUT), "a holder thread did not enter its scope"
        yield
    finally:
        release.set()
        for t in threads:
            t.join(TIMEOUT)


def read_during(start_backward: Callable[[Callable[..., Any]], Any], read: Callable[[], Any]) -> Any:
    """What ``read()`` gives in a fresh scope-less thread while a backward is held.

    ``start_backward(pause)`` must run a backward whose work calls ``pause()`` once (a
    hook, a Function's backward, a recompute); ``pause`` blocks until the fresh thread
    has read. Returns the value read, or the exception it raised.
    """
    inside, done = threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def pause(*_: Any) -> None:
        inside.set()
        done.wait(TIMEOUT)

    def probe() -> None:
        try:
            out["read"] = catch(read) if inside.wait(TIMEOUT) else TimeoutError("the backward never paused")
        finally:
            done.set()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        start_backward(pause)
    finally:
        done.set()
        thread.join(TIMEOUT)
    return out.get("read", TimeoutError("the probe did not finish"))


def concurrent_read(first: Callable[[Callable[..., Any]], Any], second: Callable[[Callable[..., Any]], Any],
                    read: Callable[[], Any]) -> Any:
    """``read()`` in a fresh thread while two backwards (``first`` here, ``second`` in a thread) are held."""
    second_inside, release = threading.Event(), threading.Event()

    def pause_second(*_: Any) -> None:
        second_inside.set()
        release.wait(TIMEOUT)

    thread = threading.Thread(target=lambda: second(pause_second), daemon=True)
    thread.start()
    try:
        assert second_inside.wait(TIMEOUT), "the second backward never paused"
        return read_during(first, read)
    finally:
        release.set()
        thread.join(TIMEOUT)
