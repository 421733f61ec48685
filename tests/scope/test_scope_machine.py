"""Tier 2 (no torch.distributed): a hypothesis state machine over scope operations.

Proves, against a reference stack, for random sequences of enter, re-enter, exit,
out-of-order exit (refused), exceptions, plain and propagated threads and asyncio
tasks: the current state is always the model's innermost one, and the states counted
as active for the fallback are exactly that one.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scoped_parallel import ScopeNestingError, current_state_or_none, propagate
from scoped_parallel.scope import Activation, active_states


class Stub:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


STATES = [Stub(n) for n in ("actor", "critic", "ref")]


class ScopeMachine(RuleBasedStateMachine):
    """The model: a stack of (activation, state) entered in this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[Activation, Stub]] = []

    def expected(self) -> Stub | None:
        return self.stack[-1][1] if self.stack else None

    @rule(i=st.integers(0, 2))
    def enter(self, i: int) -> None:
        act = Activation(STATES[i])
        act.__enter__()
        self.stack.append((act, STATES[i]))

    @rule()
    def reenter_same_activation(self) -> None:
        if self.stack:
            act, state = self.stack[-1]
            act.__enter__()
            self.stack.append((act, state))

    @precondition(lambda self: self.stack)
    @rule()
    def exit_innermost(self) -> None:
        act, _ = self.stack.pop()
        act.__exit__(None, None, None)

    @precondition(lambda self: len(self.stack) >= 2)
    @rule(depth=st.integers(1, 5))
    def exit_out_of_order_is_refused(self, depth: int) -> None:
        k = max(0, len(self.stack) - 1 - depth)
        act, state = self.stack[k]
        if act is self.stack[-1][0]:
            return  # the same object re-entered: exiting it is in order
        with pytest.raises(ScopeNestingError):
            act.__exit__(None, None, None)

    @rule(i=st.integers(0, 2))
    def exception_inside_a_scope(self, i: int) -> None:
        with pytest.raises(KeyError):
            with Activation(STATES[i]):
                assert current_state_or_none() is STATES[i]
                raise KeyError("boom")

    @rule(use_propagate=st.booleans())
    def plain_thread(self, use_propagate: bool) -> None:
        seen: list[object] = []
        fn = (lambda: seen.append(current_state_or_none()))
        t = threading.Thread(target=propagate(fn) if use_propagate else fn)
        t.start()
        t.join()
        # with propagate: the caller's scope; without: the fallback, which here is the
        # innermost state of this (only) thread
        assert seen == [self.expected()], f"thread (propagate={use_propagate}) saw {seen}, expected {self.expected()}"

    @rule(i=st.integers(0, 2))
    def asyncio_task_changes_do_not_leak(self, i: int) -> None:
        async def child() -> tuple[object, object]:
            first = current_state_or_none()
            with Activation(STATES[i]):
                await asyncio.sleep(0)
                inner = current_state_or_none()
            return first, inner

        first, inner = asyncio.run(child())
        assert first is self.expected(), f"the task started in {first}, expected its creator's {self.expected()}"
        assert inner is STATES[i], f"inside its own scope the task saw {inner}, expected {STATES[i]}"

    @invariant()
    def current_matches_model(self) -> None:
        current = current_state_or_none()
        assert current is self.expected(), f"current state {current}, model says {self.expected()}"
        expected = {self.expected()} if self.stack else set()
        active = set(active_states())
        assert active == expected, f"active states {active}, model says {expected}"

    def teardown(self) -> None:
        while self.stack:
            act, _ = self.stack.pop()
            act.__exit__(None, None, None)


ScopeMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_scope_state_machine = ScopeMachine.TestCase
