"""One reversible record of every change the adapters make to other libraries.

Like pytest's ``monkeypatch``, each change remembers what it replaced and
:meth:`Ledger.undo` reverts them in reverse order, putting every original back by
identity. The kinds of change:

* :meth:`Ledger.patch`: an attribute of a module or class (it must already exist
  there: an upstream rename is refused with an :class:`AdapterError` naming it,
  instead of leaving a getter silently unpatched);
* :meth:`Ledger.patch_everywhere`: attributes of one module *and* every other
  module of the same package that holds a copy of them (``from m import f``
  bindings and star re-exports);
* :meth:`Ledger.setitem`: an item of a mapping (a registry such as transformers'
  ``ALL_ATTENTION_FUNCTIONS``); an item that did not exist is removed again on undo;
* :meth:`Ledger.swap_module_class`: the class of a module object;
* :meth:`Ledger.swapped`: a temporary change of module globals for the duration of a
  ``with`` block (not kept in the ledger).

Conflicts are handled the same way for every kind: if, at undo time, something
else has replaced one of our replacements, the original is restored anyway and an
:class:`AdapterError` naming every such target is raised once all are restored.

:data:`MISSING` is the one "no value" marker of the adapters.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Mapping, MutableMapping

from scoped_parallel.errors import AdapterError

__all__ = ["LEDGER", "MISSING", "Ledger"]


class _Missing:
    """The type of :data:`MISSING`: one instance, falsy, with a readable repr."""

    __slots__ = ()
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"


#: "No value here": an item that did not exist before a patch, a record field not set.
MISSING: Any = _Missing()

_ATTRIBUTE, _ITEM, _CLASS = "attribute", "item", "class"


def _where(target: Any) -> str:
    return getattr(target, "__name__", None) or type(target).__name__


@dataclass(frozen=True)
class _Change:
    """One change: ``target``'s ``name`` (attribute, item key or ``__class__``) went from
    ``original`` to ``replacement``."""

    owner: str
    kind: str
    target: Any
    name: Any
    original: Any
    replacement: Any
    label: str

    def current(self) -> Any:
        if self.kind == _CLASS:
            return type(self.target)
        if self.kind == _ITEM:
            return self.target.get(self.name, MISSING)
        return vars(self.target).get(self.name, MISSING)

    def restore(self) -> None:
        if self.kind == _ITEM:
            if self.original is MISSING:
                self.target.pop(self.name, None)
            else:
                self.target[self.name] = self.original
        else:
            setattr(self.target, self.name, self.original)


def require(owner: str, target: Any, name: str) -> Any:
    """``target``'s own attribute ``name`` (from its ``__dict__``), or an AdapterError naming it.

    The one check of every adapter that an upstream attribute it patches or reads still
    exists where the adapter expects it (a renamed or moved function fails loudly).
    """
    try:
        return vars(target)[name]
    except KeyError:
        raise AdapterError(
            f"{owner}: cannot patch {_where(target)}.{name}: the attribute does not exist there "
            f"(renamed or moved upstream?). The {owner!r} adapter supports the versions listed in "
            f"the README; pin one of them, or install the adapters without {owner!r}."
        ) from None


def _in_package(module_name: str, package: str | None) -> bool:
    return package is None or module_name == package or module_name.startswith(package + ".")


def module_bindings(
    objects: Mapping[int, Any], package: str | None = None, skip: tuple[Any, ...] = ()
) -> Iterator[tuple[ModuleType, str, Any]]:
    """``(module, name, value)`` for every module-level name bound to one of ``objects``.

    ``objects`` maps ``id(obj)`` to ``obj``. Only modules named ``package`` or
    ``package.*`` are searched (every loaded module when ``package`` is None), except
    those in ``skip``. This is the one walk over ``sys.modules`` of the adapters.
    """
    for module_name, module in list(sys.modules.items()):
        if module is None or not _in_package(module_name, package) or any(module is s for s in skip):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            wanted = objects.get(id(value), MISSING)
            if wanted is not MISSING and wanted is value:
                yield module, name, value


class Ledger:
    """Changes grouped by owner (one adapter each), undone in reverse order."""

    def __init__(self) -> None:
        self._changes: list[_Change] = []
        self._lock = threading.RLock()
        # Serialises temporary swaps of module globals (see swapped()).
        self._swap_lock = threading.RLock()

    # ------------------------------------------------------------------ queries

    def owners(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(dict.fromkeys(c.owner for c in self._changes))

    def is_patched(self, owner: str) -> bool:
        return owner in self.owners()

    def records(self, owner: str | None = None) -> list[_Change]:
        with self._lock:
            return [c for c in self._changes if owner is None or c.owner == owner]

    # ------------------------------------------------------------------ changes

    def _add(self, change: _Change) -> None:
        self._changes.append(change)

    def patch(self, owner: str, target: Any, name: str, replacement: Any) -> Any:
        """Replace ``target.name`` (defined on ``target`` itself) by ``replacement``; return the original."""
        with self._lock:
            original = require(owner, target, name)
            setattr(target, name, replacement)
            self._add(_Change(owner, _ATTRIBUTE, target, name, original, replacement, f"{_where(target)}.{name}"))
            return original

    def patch_everywhere(
        self, owner: str, target: ModuleType, replacements: Mapping[str, Any], package: str
    ) -> dict[str, Any]:
        """Patch ``target``'s names and every copy of them in the other modules of ``package``.

        Every name is checked first (nothing is patched if one is missing). A copy is a
        module-level binding of the same original object in a loaded module named
        ``package`` or ``package.*`` (a star re-export, ``from target import f``). Several
        names bound to one object in ``target`` (an in-module alias) are patched by name,
        each with its own replacement; copies elsewhere get the first name's replacement.
        Returns the originals by name.
        """
        with self._lock:
            originals = {name: require(owner, target, name) for name in replacements}
            first: dict[int, Any] = {}
            for name, original in originals.items():
                first.setdefault(id(original), replacements[name])
            wanted = {id(original): original for original in originals.values()}
            copies = list(module_bindings(wanted, package, skip=(target,)))
            for name, replacement in replacements.items():
                self.patch(owner, target, name, replacement)
            for module, name, original in copies:
                self.patch(owner, module, name, first[id(original)])
            return originals

    def setitem(self, owner: str, mapping: MutableMapping[Any, Any], key: Any, value: Any, label: str = "") -> Any:
        """Set ``mapping[key] = value``; return the previous value, or MISSING if there was none.

        On undo the previous value is put back, or the key removed when it was MISSING.
        ``label`` names the mapping in error messages (e.g. ``"ALL_ATTENTION_FUNCTIONS"``).
        """
        with self._lock:
            original = mapping.get(key, MISSING)
            mapping[key] = value
            where = f"{label or _where(mapping)}[{key!r}]"
            self._add(_Change(owner, _ITEM, mapping, key, original, value, where))
            return original

    def swap_module_class(self, owner: str, module: ModuleType, cls: type) -> None:
        """Give ``module`` the class ``cls`` (a ModuleType subclass adding properties)."""
        with self._lock:
            original = type(module)
            module.__class__ = cls
            self._add(_Change(owner, _CLASS, module, "__class__", original, cls, f"type({_where(module)})"))

    @contextlib.contextmanager
    def swapped(self, owner: str, module: ModuleType, values: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Bind ``module``'s globals to ``values`` for the block, then put the previous ones back.

        Every name must exist already (see :func:`require`). The module's ``__dict__`` is
        written directly, so properties of a swapped module class are bypassed. The
        yielded dict is filled, when the block ends, with the values the names had at
        that moment (code run in the block may rebind them). Swaps are serialised by
        one lock; other threads reading those globals meanwhile see the swapped values.
        """
        for name in values:
            require(owner, module, name)
        namespace = vars(module)
        final: dict[str, Any] = {}
        with self._swap_lock:
            saved = {name: namespace[name] for name in values}
            namespace.update(values)
            try:
                yield final
            finally:
                final.update({name: namespace.get(name, MISSING) for name in values})
                namespace.update(saved)

    # ------------------------------------------------------------------ undo

    def undo(self, owner: str | None = None) -> None:
        """Revert, in reverse order, every change of ``owner`` (of everyone when None).

        Every original object is put back by identity, and copies of attribute
        replacements made since (a ``from m import f`` run while patched) are reverted
        too. If something else had replaced one of our replacements, the original is
        restored anyway and an AdapterError names those targets afterwards.
        """
        with self._lock:
            keep: list[_Change] = []
            undo: list[_Change] = []
            for change in self._changes:
                (undo if owner is None or change.owner == owner else keep).append(change)
            conflicts: list[str] = []
            for change in reversed(undo):
                if change.current() is not change.replacement:
                    conflicts.append(change.label)
                change.restore()
            self._changes = keep
            late = {id(c.replacement): c for c in undo if c.kind == _ATTRIBUTE}
            if late:
                wanted = {key: c.replacement for key, c in late.items()}
                for module, name, value in list(module_bindings(wanted)):
                    vars(module)[name] = late[id(value)].original
        if conflicts:
            raise AdapterError(
                "restored the originals, but these had been replaced again by someone else after "
                f"scoped_parallel patched them: {', '.join(conflicts)}"
            )


LEDGER = Ledger()
