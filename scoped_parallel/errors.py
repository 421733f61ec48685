"""Typed errors raised by scoped_parallel.

Every error derives from :class:`ScopedParallelError` and from the builtin that
describes its nature, so callers may catch either::

    ScopedParallelError
    ├── LayoutError (ValueError)           bad sizes, order, ranks; raised before any collective
    │   └── RankNotInLayoutError           a rank asked about a layout it is not part of
    ├── StateMismatchError (RuntimeError)  ranks built different layouts / a peer never arrived
    ├── NoActiveStateError (LookupError)   no ``activate()`` scope is active
    ├── AmbiguousStateError (RuntimeError) a thread without a scope while several are active
    ├── ScopeNestingError (RuntimeError)   a scope exited out of order
    ├── GroupNotAvailableError (LookupError) a getter for a group this rank does not hold
    ├── AdapterError (RuntimeError)        an adapter could not patch or restore its target
    ├── DistributedNotInitializedError (RuntimeError)  torch.distributed is not initialized
    ├── UnsupportedSetupError (RuntimeError)  e.g. a device-bound NCCL default group
    └── ReshardError (ValueError)          a reshard that cannot be done as asked (names the tensor);
                                           raised on every rank before anything moves
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AmbiguousStateError",
    "DistributedNotInitializedError",
    "GroupNotAvailableError",
    "LayoutError",
    "NoActiveStateError",
    "RankNotInLayoutError",
    "ReshardError",
    "ScopeNestingError",
    "ScopedParallelError",
    "StateMismatchError",
    "UnsupportedSetupError",
    "describe_state",
]


class ScopedParallelError(Exception):
    """Base class of every error this library raises on purpose."""


class LayoutError(ScopedParallelError, ValueError):
    """A parallel layout is invalid: sizes, order tokens, world size or ranks."""


class RankNotInLayoutError(LayoutError):
    """A rank was asked about a layout (or state) that does not contain it."""


class StateMismatchError(ScopedParallelError, RuntimeError):
    """Ranks of one state disagree on its layout, or some never constructed it."""


class NoActiveStateError(ScopedParallelError, LookupError):
    """No ``ParallelState`` is active in the calling context."""


class AmbiguousStateError(ScopedParallelError, RuntimeError):
    """A thread with no scope of its own found several different active states."""


class ScopeNestingError(ScopedParallelError, RuntimeError):
    """A scope was exited while it was not the innermost one (or twice)."""


class GroupNotAvailableError(ScopedParallelError, LookupError):
    """A getter asked for a process group that this state does not hold on this rank."""


class AdapterError(ScopedParallelError, RuntimeError):
    """An adapter could not patch (or restore) an attribute of its target library."""


class DistributedNotInitializedError(ScopedParallelError, RuntimeError):
    """``torch.distributed`` must be initialized before a ``ParallelState`` is built."""


class UnsupportedSetupError(ScopedParallelError, RuntimeError):
    """The distributed setup cannot support member-only group creation safely."""


class ReshardError(ScopedParallelError, ValueError):
    """A reshard between two layouts cannot be done as asked, or its plan failed its checks.

    Raised on every rank alike (the decision is taken on data all ranks gathered), before
    any weight moves, so the destination is left untouched and no rank waits for another.
    """


def describe_state(state: object) -> str:
    """How every message names a state: ``ParallelState 'actor'``, or its ``repr`` without a name.

    The one naming rule of the library and its adapters (a message about a wrong group
    must say which model's state it is about).
    """
    name = getattr(state, "name", None)
    if name:
        return f"{type(state).__name__} {name!r}"
    return repr(state)
