"""What the DeepSpeed adapter's modules share: DeepSpeed's modules, the patch tables, helpers.

Each area module (``readers``, ``autotp``, ``experts``, ``sequence``) registers its
in-scope implementations in :data:`GROUPS_IMPL` (``deepspeed.utils.groups``) or
:data:`SP_IMPL` (``parallel_state_sp``) with :func:`impl`. An implementation takes
the active state first, then the caller's arguments; the package's ``install``
wraps each one with the scope's ``dispatching`` so that outside any scope the
original DeepSpeed function runs.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

OWNER = "deepspeed"


class Mods:
    """The DeepSpeed modules and the ledger the in-scope implementations use (set by install)."""

    groups: Any = None
    comm: Any = None
    bwc: Any = None
    ledger: Any = None


#: ``deepspeed.utils.groups`` function name -> implementation(state, *args, **kwargs)
GROUPS_IMPL: dict[str, Callable[..., Any]] = {}
#: ``parallel_state_sp`` function name -> implementation(state, *args, **kwargs)
SP_IMPL: dict[str, Callable[..., Any]] = {}
#: groups readers without arguments whose answer depends only on the state and on the
#: mpu/mesh recorded for it: memoized per state (the record forgets them on a change)
MEMOIZED: set[str] = set()
#: DeepSpeed's original ``groups`` functions by name (filled by install)
ORIGINALS: dict[str, Any] = {}


def impl(
    table: dict[str, Callable[..., Any]], *names: str, memoize: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the in-scope implementation of ``names``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            table[name] = fn
            if memoize:
                MEMOIZED.add(name)
        return fn

    return register


def forward(table: dict[str, Callable[..., Any]], answers: dict[str, str]) -> None:
    """Register, for each upstream name in ``answers``, the state's getter named there as its
    in-scope implementation (a DeepSpeed getter that means exactly a state getter: one row
    of data each, not one hand-written function each)."""
    for name, method in answers.items():
        table[name] = _forwarder(method)


@functools.lru_cache(maxsize=None)
def _forwarder(method: str) -> Callable[[Any], Any]:
    def answer(state: Any) -> Any:
        return getattr(state, method)()

    answer.__name__ = answer.__qualname__ = method  # tracebacks and profilers name the state getter
    answer.__doc__ = f"The active state's ``{method}()``."
    return answer


@functools.lru_cache(maxsize=None)
def state_class() -> type:
    from scoped_parallel.state import ParallelState

    return ParallelState


def is_sp_only(mpu: Any) -> bool:
    """Whether DeepSpeed would treat ``mpu`` as ``parallel_state_sp`` (its DP group is WORLD).

    DeepSpeed recognises that module by its ``initialize_sequence_parallel`` attribute.
    A ParallelState never has one (and a failing ``hasattr`` is slow on a hot path).
    """
    if type(mpu) is state_class():
        return False
    return hasattr(mpu, "initialize_sequence_parallel")


def spans_world(state: Any) -> bool:
    layout = state.layout
    return layout.rank_offset == 0 and layout.world_size == Mods.comm.get_world_size()


class ModuleGlobals(dict):  # type: ignore[type-arg]
    """A private set of some of a module's globals, for copies of the module's own functions.

    Holds the private values and a copy of each of the module's functions whose globals
    are this namespace (:meth:`bind`); any other name is read from the live module
    (``__missing__``), so imports and constants need no copy. A ``global`` assignment in a
    copy writes here, never to the module. (``checkpointing`` keeps one per state,
    ``pipeline`` one per pipeline engine.)
    """

    __slots__ = ("live",)

    def __missing__(self, name: str) -> Any:
        return self.live[name]

    def bind(self, module: Any, functions: dict[str, types.FunctionType]) -> "ModuleGlobals":
        """Read other names from ``module``; add a copy of each of ``functions`` running on this namespace."""
        self.live = vars(module)
        for name, fn in functions.items():
            copy = types.FunctionType(fn.__code__, self, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__kwdefaults__ = fn.__kwdefaults__
            copy.__qualname__ = fn.__qualname__
            self[name] = copy
        return self


def own_functions(module: Any) -> dict[str, types.FunctionType]:
    """The plain functions defined in ``module`` itself (their globals are the module's)."""
    namespace = vars(module)
    return {
        name: obj
        for name, obj in namespace.items()
        if type(obj) is types.FunctionType and obj.__globals__ is namespace
    }
