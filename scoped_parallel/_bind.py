"""``state.bind(engine)``: every call of an engine runs inside its state's scope.

Binding wraps the engine's entry points (:data:`BOUND_METHODS` and ``__call__``)
with ``state.activate()``; the call operator needs a class-level ``__call__``, so a
callable engine's class is swapped for a cached subclass that enters the scope
first. :func:`unbind` restores the instance attributes and the class. Works for
any object (DeepSpeed engines, ``nn.Module`` s); nothing here imports DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scoped_parallel.errors import ScopedParallelError

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = ["BOUND_METHODS", "bind", "unbind"]

#: Engine methods that :meth:`ParallelState.bind` runs inside the state's scope.
BOUND_METHODS = (
    "forward",
    "backward",
    "step",
    "train_batch",
    "eval_batch",
    "save_checkpoint",
    "load_checkpoint",
)
_BOUND_ATTR = "_scoped_parallel_bound_state"
_SAVED_ATTR = "_scoped_parallel_saved_methods"
_SCOPED_CLASSES: dict[type, type] = {}


def _scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    state = self.__dict__[_BOUND_ATTR]
    with state.activate():
        return super(type(self), self).__call__(*args, **kwargs)


def _scoped_class(cls: type) -> type:
    sub = _SCOPED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__call__": _scoped_call, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SCOPED_CLASSES[cls] = sub
    return sub


def bind(state: ParallelState, engine: Any) -> Any:
    """Wrap ``engine``'s entry points in ``state``'s scope; return the engine (see the module doc)."""
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is state:
        return engine
    if holder is not None:
        raise ScopedParallelError(
            f"{type(engine).__name__} is already bound to {holder._label()}; an engine belongs to "
            f"one state. Call {holder._label()}.unbind(engine) first if you really mean to move it."
        )
    wrapped = {}
    for name in BOUND_METHODS:
        method = getattr(engine, name, None)
        if callable(method):
            wrapped[name] = state.activate()(method)
    # Instance attributes of those names that existed before (patched methods) come back on unbind.
    saved = {name: engine.__dict__[name] for name in wrapped if name in engine.__dict__}
    object.__setattr__(engine, _BOUND_ATTR, state)
    object.__setattr__(engine, _SAVED_ATTR, saved)
    for name, fn in wrapped.items():
        object.__setattr__(engine, name, fn)
    if callable(engine):
        object.__setattr__(engine, "__class__", _scoped_class(type(engine)))
    return engine


def unbind(state: ParallelState, engine: Any) -> Any:
    """Undo :func:`bind`; return the engine."""
    holder = getattr(engine, "__dict__", {}).get(_BOUND_ATTR)
    if holder is None:
        return engine
    if holder is not state:
        raise ScopedParallelError(
            f"{type(engine).__name__} is bound to {holder._label()}, not to {state._label()}; "
            f"call {holder._label()}.unbind(engine) instead"
        )
    for name in BOUND_METHODS:
        engine.__dict__.pop(name, None)
    engine.__dict__.update(engine.__dict__.pop(_SAVED_ATTR, {}))
    del engine.__dict__[_BOUND_ATTR]
    if type(engine) in _SCOPED_CLASSES.values():
        object.__setattr__(engine, "__class__", type(engine).__mro__[1])
    return engine
