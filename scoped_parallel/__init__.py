"""scoped_parallel: several parallel layouts in one process, switched with a scope.

Each model's process groups live in a :class:`ParallelState`; ``with
state.activate():`` makes it the current one for the calling thread or asyncio
task, and the adapters (``scoped_parallel.adapters``) re-point DeepSpeed's and
Megatron's module-level getters at it::

    actor = ParallelState(name="actor", tensor_model_parallel_size=2)
    critic = ParallelState(name="critic")
    with actor.activate():
        assert current_state() is actor

``ParallelLayout`` (the rank math) imports no torch; importing
``ParallelState`` imports ``torch.distributed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scoped_parallel import errors
from scoped_parallel.layout.report import shared_groups
from scoped_parallel.scope import Activation, current_state, current_state_or_none, propagate
from scoped_parallel.errors import (
    AdapterError,
    AmbiguousStateError,
    DistributedNotInitializedError,
    GroupNotAvailableError,
    LayoutError,
    NoActiveStateError,
    RankNotInLayoutError,
    ReshardError,
    ScopedParallelError,
    ScopeNestingError,
    StateMismatchError,
    UnsupportedSetupError,
)
from scoped_parallel.layout import ParallelLayout
from scoped_parallel.resharding import ReshardPlan, plan_reshard, reshard

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "AdapterError",
    "AmbiguousStateError",
    "DistributedNotInitializedError",
    "GroupNotAvailableError",
    "LayoutError",
    "NoActiveStateError",
    "ParallelLayout",
    "ParallelState",
    "RankNotInLayoutError",
    "ReshardError",
    "ReshardPlan",
    "ScopeNestingError",
    "ScopedParallelError",
    "StateMismatchError",
    "UnsupportedSetupError",
    "__version__",
    "current_state",
    "current_state_or_none",
    "errors",
    "plan_reshard",
    "propagate",
    "reshard",
    "shared_groups",
]


def __getattr__(name: str) -> Any:
    # ParallelState needs torch.distributed; import it on first use so that the
    # layout math and the CLI stay importable without torch.
    if name == "ParallelState":
        from scoped_parallel.state import ParallelState

        return ParallelState
    raise AttributeError(f"module 'scoped_parallel' has no attribute {name!r}")
