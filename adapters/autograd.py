"""autograd: a backward carries its caller's state to every thread that runs its work.

On CUDA, torch's autograd engine runs tensor and post-accumulate-grad hooks, module
backward hooks, ``autograd.Function.backward`` and activation-checkpoint recompute
on its device threads, which see no ContextVar. Two patches, both through the
adapters' ledger (so :func:`scoped_parallel.adapters.uninstall` restores torch's
objects by identity):

* **The engine's entry point** ``torch.autograd.graph._engine_run_backward`` (and its
  copy in ``torch.autograd``), which ``Tensor.backward``, ``torch.autograd.backward``
  and ``torch.autograd.grad`` all call (and so DeepSpeed's ``engine.backward``), is
  wrapped with :func:`scoped_parallel.scope.carrying_backward`: a backward called
  inside state A's scope records A in the process-wide picture while it runs (one
  entry per call, nothing per hook), and a thread with no scope of its own resolves
  to A meanwhile. Backwards of two different states at once stay ambiguous.
* **Hook registration** (:data:`REGISTRARS`): a hook registered inside a scope runs in
  that scope wherever it runs (:func:`scoped_parallel.scope.hook_in_scope`). This is
  what the backward record alone gets wrong: one backward that reaches two models'
  hooks (a summed actor + critic loss, a reward computed through another model),
  and two concurrent backwards of different states, where each ZeRO hook still
  knows its own state. ``autograd.Function.backward`` and checkpoint recompute have
  no registration, so they rely on the backward record.

Why an adapter and not the core: both patch torch objects process-wide, which the
core never does on import; the ledger makes them reversible and detects conflicts,
and ``install()`` is where a user opts in. The core keeps the rule
(:mod:`scoped_parallel.scope`, standard library only) and never imports torch for it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from scoped_parallel.scope import carrying_backward, hook_in_scope
from scoped_parallel.adapters._ledger import require

__all__ = ["REGISTRARS", "install"]

OWNER = "autograd"

#: (class path, method) of every hook registration whose hooks keep their scope
REGISTRARS: tuple[tuple[str, str], ...] = (
    ("torch.Tensor", "register_hook"),
    ("torch.Tensor", "register_post_accumulate_grad_hook"),
    ("torch.nn.Module", "register_full_backward_hook"),
    ("torch.nn.Module", "register_full_backward_pre_hook"),
)


def _registering_in_scope(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def register(self: Any, hook: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, hook_in_scope(hook), *args, **kwargs)

    return register


def install(ledger: Any) -> None:
    """Wrap autograd's engine entry point and the hook registrations (see the module doc)."""
    import torch
    import torch.autograd
    import torch.autograd.graph

    classes = {"torch.Tensor": torch.Tensor, "torch.nn.Module": torch.nn.Module}
    run = require(OWNER, torch.autograd.graph, "_engine_run_backward")
    copy = require(OWNER, torch.autograd, "_engine_run_backward")
    originals = [require(OWNER, classes[path], name) for path, name in REGISTRARS]
    carried = carrying_backward(run)
    ledger.patch(OWNER, torch.autograd.graph, "_engine_run_backward", carried)
    ledger.patch(OWNER, torch.autograd, "_engine_run_backward", carried if copy is run else carrying_backward(copy))
    for (path, name), original in zip(REGISTRARS, originals):
        ledger.patch(OWNER, classes[path], name, _registering_in_scope(original))
