"""Tier 3 (fake backend): state.bind(engine) runs an engine's calls inside its state's scope.

Proves: a bound engine's call, forward hooks, backward and step see the bound state,
even inside another state's scope; unbind() restores the class and instance methods;
binding to a second state raises.
"""

from __future__ import annotations

import pytest
import torch

from scoped_parallel import ParallelState, ScopedParallelError, current_state_or_none
from scoped_parallel.testing import fake_world


class Engine(torch.nn.Module):
    """A stand-in with the engine methods bind() wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.seen: list[object] = []

    def forward(self, x):
        self.seen.append(("forward", current_state_or_none()))
        return self.lin(x)

    def backward(self, loss):
        self.seen.append(("backward", current_state_or_none()))
        loss.backward()

    def step(self):
        self.seen.append(("step", current_state_or_none()))


@pytest.fixture
def states():
    with fake_world(4, 0):
        a, b = ParallelState(name="a"), ParallelState(name="b")
        yield a, b
        a.destroy()
        b.destroy()


def test_bound_engine_runs_call_hooks_backward_and_step_in_scope(states):
    """engine(x), its forward hooks, backward and step all see the bound state."""
    a, _ = states
    engine = a.bind(Engine())
    hook_seen = []
    engine.register_forward_pre_hook(lambda m, i: hook_seen.append(current_state_or_none()))
    engine.backward(engine(torch.ones(2)).sum())
    engine.step()
    assert hook_seen == [a]
    assert engine.seen == [("forward", a), ("backward", a), ("step", a)]
    assert current_state_or_none() is None
    assert isinstance(engine, Engine)


def test_binding_is_reversible(states):
    """unbind() restores the original class and methods."""
    a, _ = states
    engine = Engine()
    cls, forward = type(engine), engine.forward
    a.bind(engine)
    a.unbind(engine)
    assert type(engine) is cls and engine.forward == forward and "forward" not in engine.__dict__
    engine(torch.ones(2))
    assert engine.seen == [("forward", None)]


def test_binding_to_two_states_is_an_error(states):
    """An engine belongs to one state; binding it to another raises."""
    a, b = states
    engine = a.bind(Engine())
    assert a.bind(engine) is engine  # binding twice to the same state is a no-op
    with pytest.raises(ScopedParallelError, match="already bound"):
        b.bind(engine)
    with pytest.raises(ScopedParallelError, match="bound to"):
        b.unbind(engine)


def test_bound_engine_inside_another_scope_uses_its_own_state(states):
    """A bound engine called inside another state's scope still runs in its own."""
    a, b = states
    engine = a.bind(Engine())
    with b.activate():
        engine(torch.ones(2))
        assert current_state_or_none() is b
    assert engine.seen == [("forward", a)]


def test_unbind_restores_instance_methods_patched_before_bind(states):
    """A method patched onto the instance before bind() is back after unbind()."""
    a, _ = states
    engine = Engine()
    custom = lambda loss: "custom"  # noqa: E731
    engine.backward = custom
    a.bind(engine)
    assert engine.backward(None) == "custom"  # still the instance's method, now scoped
    a.unbind(engine)
    assert engine.backward is custom
