"""``groups.mpu`` and ``groups.mesh_device`` as attributes, per scope.

Code outside ``groups.py`` reads and writes these two globals as module
attributes (``deepspeed.initialize`` writes ``groups.mpu``). The adapter gives the
module object a subclass of its class with two properties (``Ledger.swap_module_class``):

* inside a scope a read returns the scope's mpu (the one written in a scope of that
  state, else the state itself) and mesh (``None`` unless written there), and a
  write or ``del`` changes that state's record only;
* writing *another* state as ``groups.mpu`` inside a scope is refused with an
  :class:`~scoped_parallel.errors.AdapterError`: that state's groups would answer this
  scope's lookups;
* outside any scope reads and writes use the module's own ``__dict__``, as unpatched.

Code inside ``groups.py`` reads its ``__dict__`` directly, never these properties;
its readers are patched as functions (see ``readers``).
"""

from __future__ import annotations

import types
from typing import Any

from scoped_parallel.scope import current_state_or_none
from scoped_parallel.adapters._ledger import MISSING
from scoped_parallel.adapters.deepspeed._records import mpu_of, record_of
from scoped_parallel.adapters.deepspeed._shared import state_class
from scoped_parallel.errors import AdapterError, describe_state

#: the module attributes this turns into properties
ATTRIBUTES = ("mpu", "mesh_device")


def _module_attribute(name: str) -> property:
    """A property of the groups module class: per-state inside a scope, ``__dict__`` outside."""

    def read(module: types.ModuleType) -> Any:
        state = current_state_or_none()
        if state is None:
            try:
                return vars(module)[name]
            except KeyError:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None
        if name == "mpu":
            return mpu_of(state)
        return record_of(state).mesh_device

    def write(module: types.ModuleType, value: Any) -> None:
        state = current_state_or_none()
        if state is None:
            vars(module)[name] = value
        elif name == "mpu":
            if value is not state and type(value) is state_class():
                raise AdapterError(
                    f"groups.mpu = {describe_state(value)} inside the scope of {describe_state(state)}: another "
                    "state's groups would answer this scope's DeepSpeed lookups. Assign it inside "
                    f"`with {getattr(value, 'name', None) or 'that state'}.activate():` instead."
                )
            # The state itself is the default: recorded as MISSING, not as a second reference.
            record_of(state).mpu = MISSING if value is state else value
        else:
            record_of(state).mesh_device = value

    def delete(module: types.ModuleType) -> None:
        state = current_state_or_none()
        if state is None:
            try:
                del vars(module)[name]
            except KeyError:
                raise AttributeError(name) from None
        elif name == "mpu":
            record_of(state).mpu = MISSING
        else:
            record_of(state).mesh_device = None

    return property(read, write, delete, f"groups.{name}: the active state's value inside a scope")


def scoped_module_class(base: type) -> type:
    """A subclass of ``base`` (the groups module's class) with the two scoped properties."""
    return type(
        "ScopedDeepSpeedGroupsModule",
        (base,),
        {
            "__doc__": "deepspeed.utils.groups with scope-aware `mpu` and `mesh_device` (scoped_parallel).",
            "__module__": __name__,
            **{name: _module_attribute(name) for name in ATTRIBUTES},
        },
    )
