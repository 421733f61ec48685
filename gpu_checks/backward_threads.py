"""GPU check (not on CI's path): the backward carrier on real CUDA autograd device threads.

    python gpu_checks/backward_threads.py      # exits 0 when every check holds, 77 without CUDA

On CUDA, hooks and ``autograd.Function.backward`` run on torch's device threads, which
see no ContextVar. With threads holding states B and C, a backward under A:

1. a ``Function.backward`` (no registration to wrap) reads ``current_state()`` on the
   device thread: ambiguous without the ``autograd`` adapter, A with it;
2. the CPU scenario (a fresh scope-less thread reads while the backward is held), and
   two concurrent backwards of A and B (ambiguous, naming both);
3. a checkpointed block's recompute reads A.
Stub states stand in for ParallelState (the scope needs only identity and a name), so
no process group is needed. Prints one line per check; nothing here is simulated.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _backward_scenario import Stub, catch, concurrent_read, holding, read_during  # noqa: E402

from scoped_parallel import AmbiguousStateError, adapters, current_state  # noqa: E402

A, B, C = Stub("A"), Stub("B"), Stub("C")
SEEN: list = []


class Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        SEEN.append((threading.current_thread() is threading.main_thread(), catch(lambda: current_state().name)))
        return g * 2


def function_backward_reads() -> tuple:
    SEEN.clear()
    with A.activate():
        x = torch.ones(4, device="cuda", requires_grad=True)
        Probe.apply(x).sum().backward()
    return SEEN[0]


def backward_in(state, pause_where="hook"):
    def run(pause):
        with state.activate():
            x = torch.ones(4, device="cuda", requires_grad=True)
            y = x * 2
            y.register_hook(lambda g: (pause(), g)[1])
            y.sum().backward()
    return run


def recompute_in(state):
    def run(pause):
        calls = [0]

        def block(h):
            calls[0] += 1
            if calls[0] == 2:
                pause()
            return torch.tanh(h)

        with state.activate():
            x = torch.ones(4, device="cuda", requires_grad=True)
            torch.utils.checkpoint.checkpoint(block, x * 2, use_reentrant=False).sum().backward()
    return run


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 77
    read = lambda: current_state().name  # noqa: E731
    failures = []

    def check(label, got, ok):
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {got!r}")
        if not ok:
            failures.append(label)

    with holding(B, C):
        on_main, got = function_backward_reads()
        check(f"off: Function.backward on a device thread (main thread: {on_main})", got,
              isinstance(got, AmbiguousStateError) and not on_main)
        got = read_during(backward_in(A), read)
        check("off: fresh thread during A's backward", got, isinstance(got, AmbiguousStateError))
        with adapters.installed(targets=("autograd",)):
            on_main, got = function_backward_reads()
            check(f"on: Function.backward on a device thread (main thread: {on_main})", got, got == "A")
            got = read_during(backward_in(A), read)
            check("on: fresh thread during A's backward", got, got == "A")
            got = read_during(recompute_in(A), read)
            check("on: fresh thread during A's checkpoint recompute", got, got == "A")
            got = catch(read)
            check("on: after the backward", got, isinstance(got, AmbiguousStateError))
    with adapters.installed(targets=("autograd",)):
        got = concurrent_read(backward_in(A), backward_in(B), read)
        check("on: backwards of A and B at once", got, isinstance(got, AmbiguousStateError) and "'A'" in str(got))
    print("all checks hold" if not failures else f"{len(failures)} check(s) failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
