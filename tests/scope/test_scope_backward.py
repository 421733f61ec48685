"""Tier 2 (no torch.distributed): a backward carries its state to scope-less threads.

The device-thread situation of CUDA, reproduced on CPU: the trainer thread is held
inside ``backward()`` under state A (a hook waits), a fresh thread with no scope reads
the state while two other threads hold B and C. Without the ``autograd`` adapter the
read is ambiguous; with it, A; after the backward, ambiguous again; two backwards of
different states at once stay ambiguous. Also: ``torch.autograd.grad``, checkpoint
recompute (both kinds), the hook-registration case the backward record alone gets
wrong, and ``uninstall()``.
"""

from __future__ import annotations


import pytest
import torch
import torch.utils.checkpoint as ckpt


from _backward_scenario import Stub, catch, concurrent_read, holding, read_during  # noqa: E402

from scoped_parallel import AmbiguousStateError, adapters, current_state  # noqa: E402
from scoped_parallel.dispatch import dispatching  # noqa: E402
from scoped_parallel.scope import active_states  # noqa: E402
from scoped_parallel.scope import _BACKWARDS as BACKWARDS  # noqa: E402


A, B, C = Stub("A"), Stub("B"), Stub("C")

# a patched getter built like every adapter's (answers the state's name)
getter = dispatching(lambda: "global", lambda state: state.name, "getter", memoize=True)


@pytest.fixture
def carrier(request):
    """The autograd adapter on (param True) or off (False)."""
    on = request.param
    if on:
        adapters.install(targets=("autograd",))
    try:
        yield on
    finally:
        if on:
            adapters.uninstall(("autograd",))
        assert not BACKWARDS, f"backward records left behind: {BACKWARDS}"


def _backward_in(state, kind="tensor"):
    def run(pause):
        with state.activate():
            x = torch.ones(3, requires_grad=True)
            y = x * 2
            y.register_hook(lambda g: (pause(), g)[1])
            loss = y.sum()
            if kind == "tensor":
                loss.backward()
            elif kind == "autograd.backward":
                torch.autograd.backward([loss])
            else:
                torch.autograd.grad(loss, [x])

    return run


def _read():
    return current_state(), getter()


@pytest.mark.parametrize("carrier", [False], indirect=True)
def test_without_the_carrier_a_scopeless_thread_is_ambiguous_during_backward(carrier):
    """Feature off: the read during A's backward, with B and C held elsewhere, raises."""
    with holding(B, C):
        got = read_during(_backward_in(A), _read)
    assert isinstance(got, AmbiguousStateError), f"expected AmbiguousStateError, got {got!r}"


@pytest.mark.parametrize("kind", ["tensor", "autograd.backward", "autograd.grad"])
@pytest.mark.parametrize("carrier", [True], indirect=True)
def test_a_scopeless_thread_resolves_to_the_running_backwards_state(carrier, kind):
    """Feature on: during A's backward a scope-less thread sees A, whatever B and C hold."""
    with holding(B, C):
        got = read_during(_backward_in(A, kind), _read)
        after = catch(_read)
    assert got == (A, "A"), f"expected (A, 'A') during the backward, got {got!r}"
    assert isinstance(after, AmbiguousStateError), f"expected AmbiguousStateError after it, got {after!r}"


@pytest.mark.parametrize("carrier", [True], indirect=True)
def test_two_concurrent_backwards_of_different_states_are_ambiguous(carrier):
    """Backwards of A and B running at once: the scope-less read raises naming both."""
    got = concurrent_read(_backward_in(A), _backward_in(B), _read)
    assert isinstance(got, AmbiguousStateError), f"expected AmbiguousStateError, got {got!r}"
    assert "'A'" in str(got) and "'B'" in str(got), f"the error should name A and B: {got}"


@pytest.mark.parametrize("carrier", [True], indirect=True)
def test_two_concurrent_backwards_of_the_same_state_resolve(carrier):
    """Two backwards of A at once are one answer, A."""
    got = concurrent_read(_backward_in(A), _backward_in(A), _read)
    assert got == (A, "A"), f"expected (A, 'A'), got {got!r}"


class _Block(torch.nn.Module):
    def __init__(self, pause_on_recompute):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.calls = 0
        self.pause = pause_on_recompute

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:  # the recompute, inside the backward
            self.pause()
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("carrier", [False, True], indirect=True)
def test_checkpoint_recompute_carries_the_state(carrier, reentrant):
    """A checkpointed forward's recompute is read as A only with the carrier on."""

    def run(pause):
        with A.activate():
            block = _Block(pause)
            x = torch.ones(2, 3, requires_grad=True)
            ckpt.checkpoint(block, x, use_reentrant=reentrant).sum().backward()
            assert block.calls == 2, f"expected one forward and one recompute, got {block.calls} calls"

    with holding(B, C):
        got = read_during(run, _read)
    if carrier:
        assert got == (A, "A"), f"expected (A, 'A') during the recompute, got {got!r}"
    else:
        assert isinstance(got, AmbiguousStateError), f"expected AmbiguousStateError, got {got!r}"


@pytest.mark.parametrize("carrier", [False, True], indirect=True)
def test_a_hook_registered_in_a_scope_runs_in_it_in_another_states_backward(carrier):
    """One backward through two models (actor loss + critic loss under the actor's scope):
    the critic's hook sees the critic only with the adapter's registration wrapper; the
    backward record alone would answer the actor."""
    seen = []
    with B.activate():  # the critic
        w = torch.ones(3, requires_grad=True)
        w.register_post_accumulate_grad_hook(lambda p: seen.append(current_state().name))
        critic_loss = (w * 3).sum()
    with A.activate():  # the actor
        x = torch.ones(3, requires_grad=True)
        (critic_loss + (x * 2).sum()).backward()
    expected = "B" if carrier else "A"
    assert seen == [expected], f"the critic's hook saw {seen}, expected [{expected!r}]"


def test_uninstall_restores_torch_by_identity():
    """install() then uninstall() puts torch's functions back as they were."""
    import torch.autograd.graph as graph

    before = (graph._engine_run_backward, torch.autograd._engine_run_backward, torch.Tensor.register_hook,
              torch.Tensor.register_post_accumulate_grad_hook, torch.nn.Module.register_full_backward_hook,
              torch.nn.Module.register_full_backward_pre_hook)
    with adapters.installed(targets=("autograd",)):
        assert graph._engine_run_backward is not before[0]
        assert torch.autograd._engine_run_backward is graph._engine_run_backward
    after = (graph._engine_run_backward, torch.autograd._engine_run_backward, torch.Tensor.register_hook,
             torch.Tensor.register_post_accumulate_grad_hook, torch.nn.Module.register_full_backward_hook,
             torch.nn.Module.register_full_backward_pre_hook)
    assert all(a is b for a, b in zip(before, after)), "uninstall() left a torch function replaced"
    assert active_states() == ()
