"""Tier 2 (no torch.distributed): scope semantics with stub states.

Proves: activate() sets, nests, re-enters and restores the current state, also on
exceptions; out-of-order or foreign exits raise ScopeNestingError and change nothing;
the decorator form covers sync and async functions and refuses generators; asyncio
tasks inherit their creator's scope without leaking theirs back; a thread without a
scope falls back to the single active state and raises when that is ambiguous;
propagate() carries a scope into thread pools.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from scoped_parallel import (
    AmbiguousStateError,
    NoActiveStateError,
    ScopeNestingError,
    current_state,
    current_state_or_none,
    propagate,
)
from scoped_parallel.scope import Activation, active_states


class Stub:
    """Stands in for a ParallelState: the scope only needs identity and a name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def activate(self) -> Activation:
        return Activation(self)

    def __repr__(self) -> str:
        return f"Stub({self.name})"


actor, critic, ref = Stub("actor"), Stub("critic"), Stub("ref")


def test_no_scope_raises_lookup_error_with_fix():
    """current_state() outside any scope raises a LookupError that says how to fix it."""
    with pytest.raises(LookupError, match="state.activate()"):
        current_state()
    assert current_state_or_none() is None
    with pytest.raises(NoActiveStateError):
        current_state()


def test_enter_returns_state_and_sets_it():
    """`with s.activate() as x` binds x to s and makes s current."""
    with actor.activate() as got:
        assert got is actor
        assert current_state() is actor
    assert current_state_or_none() is None


def test_nesting_restores_previous_scope():
    """Nested scopes restore exactly the enclosing state on exit."""
    with actor.activate():
        with critic.activate():
            assert current_state() is critic
            with actor.activate():
                assert current_state() is actor
            assert current_state() is critic
        assert current_state() is actor


def test_same_activation_object_is_reentrant():
    """One activation object entered twice nests and unwinds correctly."""
    act = actor.activate()
    with act:
        with critic.activate():
            with act:
                assert current_state() is actor
            assert current_state() is critic
        assert current_state() is actor
    assert current_state_or_none() is None


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt, GeneratorExit, SystemExit])
def test_exception_restores_scope_and_propagates(exc):
    """Any BaseException leaving the block restores the outer scope and is not swallowed."""
    with actor.activate():
        with pytest.raises(exc):
            with critic.activate():
                raise exc()
        assert current_state() is actor


def test_out_of_order_exit_raises_and_leaves_scope_unchanged():
    """Exiting an outer scope before the inner one raises, naming both, and changes nothing."""
    outer, inner = actor.activate(), critic.activate()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ScopeNestingError, match=r"'actor'.*'critic'"):
        outer.__exit__(None, None, None)
    assert current_state() is critic
    inner.__exit__(None, None, None)
    assert current_state() is actor
    outer.__exit__(None, None, None)
    assert current_state_or_none() is None


def test_exit_without_enter_raises():
    """Exiting an activation that was never entered is a nesting error."""
    with pytest.raises(ScopeNestingError, match="not entered"):
        actor.activate().__exit__(None, None, None)


def test_decorator_sync_preserves_metadata():
    """@state.activate() runs the function inside the scope and keeps name and docstring."""

    @critic.activate()
    def step(x: int) -> str:
        """Doc."""
        return f"{current_state().name}:{x}"

    assert step(3) == "critic:3"
    assert step.__name__ == "step" and step.__doc__ == "Doc."
    assert current_state_or_none() is None


def test_decorator_async_covers_the_whole_await():
    """An async def decorated with activate() sees the scope across awaits."""

    @actor.activate()
    async def work() -> list[str]:
        seen = [current_state().name]
        await asyncio.sleep(0)
        seen.append(current_state().name)
        return seen

    assert asyncio.run(work()) == ["actor", "actor"]


def test_decorator_rejects_generators():
    """Generator and async-generator functions are rejected with a TypeError."""

    def gen():
        yield 1

    async def agen():
        yield 1

    with pytest.raises(TypeError, match="generator"):
        actor.activate()(gen)
    with pytest.raises(TypeError, match="generator"):
        actor.activate()(agen)


def test_decorator_is_recursion_safe():
    """A decorated function calling itself nests scopes and unwinds cleanly."""

    @actor.activate()
    def down(n: int) -> int:
        return 0 if n == 0 else 1 + down(n - 1)

    assert down(5) == 5
    assert current_state_or_none() is None


def test_asyncio_tasks_inherit_and_do_not_leak():
    """A task sees its creator's scope; its own scope changes never reach the parent."""

    async def child(ready: asyncio.Event, go: asyncio.Event) -> tuple[str, str]:
        first = current_state().name
        with critic.activate():
            ready.set()
            await go.wait()
            inner = current_state().name
        return first, inner

    async def main() -> tuple[tuple[str, str], str]:
        ready, go = asyncio.Event(), asyncio.Event()
        with actor.activate():
            task = asyncio.create_task(child(ready, go))
            await ready.wait()
            during = current_state().name  # the child is inside critic right now
            go.set()
            result = await task
        return result, during

    (first, inner), during = asyncio.run(main())
    assert (first, inner, during) == ("actor", "critic", "actor")


def test_interleaved_tasks_each_keep_their_scope():
    """Two tasks in different scopes, forced to interleave, each see only their own."""
    log: list[tuple[str, str]] = []

    async def worker(state: Stub, turns: list[asyncio.Event], mine: int) -> None:
        with state.activate():
            for _ in range(3):
                await turns[mine].wait()
                turns[mine].clear()
                log.append((state.name, current_state().name))
                turns[1 - mine].set()

    async def main() -> None:
        turns = [asyncio.Event(), asyncio.Event()]
        turns[0].set()
        await asyncio.gather(worker(actor, turns, 0), worker(critic, turns, 1))

    asyncio.run(main())
    turns = [worker for worker, _ in log]
    assert turns == ["actor", "critic"] * 3, f"the workers ran in the order {turns}, expected strict alternation"
    wrong = [(worker, seen) for worker, seen in log if worker != seen]
    assert wrong == [], f"(worker, state it saw) pairs that differ: {wrong}"


def test_plain_thread_does_not_inherit_but_falls_back_to_the_single_active_state():
    """A new thread has no scope of its own; with one state active it resolves to it."""
    seen = []
    with actor.activate():
        t = threading.Thread(target=lambda: seen.append(current_state()))
        t.start()
        t.join()
    assert seen == [actor]


def test_fallback_uses_innermost_state_of_a_thread():
    """A thread's nested scopes count as their innermost state for the fallback."""
    seen = []
    with actor.activate(), critic.activate():
        t = threading.Thread(target=lambda: seen.append(current_state()))
        t.start()
        t.join()
    assert seen == [critic]


def test_fallback_with_two_threads_in_different_states_is_ambiguous():
    """Two states active in two threads make a scope-less thread raise instead of guessing."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        with critic.activate():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    errors = []
    try:
        with actor.activate():
            t = threading.Thread(target=lambda: errors.append(_catch(current_state)))
            t.start()
            t.join()
            assert current_state() is actor  # the thread with a scope is unaffected
    finally:
        release.set()
        holder.join()
    assert isinstance(errors[0], AmbiguousStateError)
    assert "'actor'" in str(errors[0]) and "'critic'" in str(errors[0])


def test_fallback_same_state_in_two_threads_is_not_ambiguous():
    """The same state active in two threads is one answer, not an ambiguity."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        with actor.activate():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    seen = []
    try:
        with actor.activate():
            t = threading.Thread(target=lambda: seen.append(current_state()))
            t.start()
            t.join()
    finally:
        release.set()
        holder.join()
    assert seen == [actor]


def test_async_child_scope_does_not_hide_parent_for_fallback():
    """A task nested in another state keeps the parent task's state visible to the fallback."""
    result = []

    async def child(ready: asyncio.Event, go: asyncio.Event) -> None:
        with critic.activate():
            ready.set()
            await go.wait()

    async def main() -> None:
        ready, go = asyncio.Event(), asyncio.Event()
        with actor.activate():
            task = asyncio.create_task(child(ready, go))
            await ready.wait()
            states = set(active_states())
            t = threading.Thread(target=lambda: result.append(_catch(current_state)))
            t.start()
            t.join()
            go.set()
            await task
        result.append(states)

    asyncio.run(main())
    assert isinstance(result[0], AmbiguousStateError)
    assert result[1] == {actor, critic}


def test_bookkeeping_is_empty_after_scopes_end():
    """After every scope ends, no state counts as active for the fallback."""
    with actor.activate(), critic.activate(), actor.activate():
        assert set(active_states()) == {actor}
    assert active_states() == ()


def test_propagate_carries_scope_into_thread_pool():
    """propagate(fn) runs fn in the caller's scope inside a ThreadPoolExecutor."""
    with ThreadPoolExecutor(2) as pool, critic.activate():
        plain = pool.submit(lambda: contextvars.copy_context().run(current_state_or_none))
        plain_result = plain.result()
        futures = [pool.submit(propagate(lambda: current_state().name)) for _ in range(4)]
        assert [f.result() for f in futures] == ["critic"] * 4
    # without propagate, the worker only sees the process-wide fallback (critic is the single state)
    assert plain_result is critic


def test_propagate_concurrent_calls_do_not_interfere():
    """The same propagated callable runs concurrently in several threads without errors."""
    with actor.activate():
        fn = propagate(lambda: current_state().name)
    barrier = threading.Barrier(4)

    def call():
        barrier.wait(5)
        return fn()

    with ThreadPoolExecutor(4) as pool:
        assert [f.result() for f in [pool.submit(call) for _ in range(4)]] == ["actor"] * 4


def test_thread_pool_workers_each_see_their_own_scope():
    """Ten workers each entering their own state see only that state."""
    states = [Stub(f"s{i}") for i in range(10)]
    barrier = threading.Barrier(10)

    def work(s: Stub) -> tuple[str, list[str]]:
        with s.activate():
            barrier.wait(5)
            return s.name, sorted({current_state().name for _ in range(100)})

    with ThreadPoolExecutor(10) as pool:
        for name, seen in pool.map(work, states):
            assert seen == [name], f"worker in {name} saw the states {seen}, expected only {name}"


def test_exit_in_another_task_raises_nesting_error():
    """A scope entered in one task and exited in another is refused, not silently reset."""
    act = actor.activate()

    async def enter():
        act.__enter__()

    async def main():
        await asyncio.create_task(enter())  # entered inside the child's copied context
        with pytest.raises(ScopeNestingError):
            act.__exit__(None, None, None)

    asyncio.run(main())
    # clean the bookkeeping that the child task left (its context is gone)
    from scoped_parallel import scope as _scope

    token, frame = act._entries.pop()
    _scope._thread_stack().remove(frame)


def _catch(fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - returned to the asserting thread
        return err


def test_parent_task_without_scope_does_not_see_its_childs_scope():
    """A coroutine with no scope never sees the scope its child task entered (no fallback there)."""

    async def child(ready: asyncio.Event, go: asyncio.Event) -> None:
        with actor.activate():
            ready.set()
            await go.wait()

    async def main() -> object:
        ready, go = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(child(ready, go))
        await ready.wait()
        seen = current_state_or_none()
        go.set()
        await task
        return seen

    assert asyncio.run(main()) is None


def test_one_activation_shared_by_interleaved_tasks_exits_cleanly():
    """The same activation object entered by two tasks exits each task's own entry."""
    act = actor.activate()

    async def use(first: asyncio.Event, second: asyncio.Event, wait_first: bool) -> None:
        with act:
            if wait_first:
                first.set()
                await second.wait()
            else:
                await first.wait()
                second.set()
                await asyncio.sleep(0)

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(use(a, b, True), use(a, b, False))

    asyncio.run(main())
    assert active_states() == () and act._entries == []
