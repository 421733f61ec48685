"""A state's getter methods, made from the one getter table.

``Getters`` is the base class of :class:`~scoped_parallel.ParallelState` that
carries every name of :data:`scoped_parallel.getters.table.GETTERS`: the hand-written
methods of ``~scoped_parallel.getters.megatron.MegatronMethods`` for ``METHOD``
rows, and one method per simple row, made here (their frames show this module; their
docstrings say what they answer). On rank 5 of 8 with
``tensor_model_parallel_size=2``: ``state.get_tensor_model_parallel_group()`` spans
(4, 5), ``state.get_tensor_model_parallel_rank()`` is 1 and
``state.get_sequence_data_parallel_world_size()`` is 4.
"""

from __future__ import annotations

from typing import Any, Callable

from scoped_parallel.getters.megatron import MegatronMethods
from scoped_parallel.getters.table import FIRST, GETTERS, GROUP, KIND_TEXT, LAST, RANK, RANKS, SIZE, Getter
from scoped_parallel.getters.views import COLLECTION_FIELDS

__all__ = ["COLLECTION_FIELDS", "GETTERS", "Getter", "Getters"]


def _simple(name: str, row: Getter) -> Callable[..., Any]:
    """The state's method for a simple row: one kind, one answer."""
    kind = row.kind
    assert kind is not None, name
    text = KIND_TEXT[kind]
    answer = row.answer
    megatron = row.family == "megatron"  # Megatron's group and rank-list getters take check_initialized

    if answer == GROUP:
        doc = f"This rank's {text} group."
        if megatron:

            def method(self: Any, check_initialized: bool = True) -> Any:
                return self.groups.group(kind)

        else:

            def method(self: Any) -> Any:
                return self.groups.group(kind)

    elif answer in (SIZE, RANK) and row.override is not None:
        key = row.override
        what = "Size of this rank's" if answer == SIZE else "This rank's index in its"
        doc = f"{what} {text} group (the value set with Megatron's setter in this state's scope first)."
        if answer == SIZE:

            def method(self: Any) -> Any:
                value = self.store.overrides.get(key)
                return self.groups.size(kind) if value is None else value

        else:

            def method(self: Any) -> Any:
                value = self.store.overrides.get(key)
                return self.groups.index(kind) if value is None else value

    elif answer == SIZE:
        doc = f"Size of this rank's {text} group."

        def method(self: Any) -> Any:
            return self.groups.size(kind)

    elif answer == RANK:
        doc = f"This rank's index in its {text} group."

        def method(self: Any) -> Any:
            return self.groups.index(kind)

    elif answer == RANKS:
        doc = f"Global ranks of this rank's {text} group."
        if megatron:

            def method(self: Any, check_initialized: bool = True) -> Any:
                return self.groups.ranks(kind)

        else:

            def method(self: Any) -> Any:
                return self.groups.ranks(kind)

    elif answer == FIRST:
        doc = f"Global rank of the first member of this rank's {text} group."

        def method(self: Any) -> Any:
            return self.groups.ranks(kind)[0]

    elif answer == LAST:
        doc = f"Global rank of the last member of this rank's {text} group."

        def method(self: Any) -> Any:
            return self.groups.ranks(kind)[-1]

    else:  # pragma: no cover - the table test keeps answers valid
        raise ValueError(f"getter {name!r}: unknown answer {answer!r}")
    method.__name__ = name
    method.__qualname__ = f"Getters.{name}"
    method.__doc__ = doc
    return method


class Getters(MegatronMethods):
    """Every getter name of the table, answered from the state's groups."""

    __slots__ = ()


def _attach() -> None:
    for name, row in GETTERS.items():
        if row.answer == "method":
            if row.supported and not callable(getattr(MegatronMethods, name, None)):
                raise TypeError(f"getter table row {name!r} is a METHOD row but MegatronMethods has no {name}()")
            continue
        if name in vars(MegatronMethods):
            raise TypeError(f"getter table row {name!r} is simple but MegatronMethods also defines it")
        setattr(Getters, name, _simple(name, row))


_attach()
