"""One reversible record of every attribute the adapters replace.

Like pytest's ``monkeypatch``: each patch remembers the object it replaced,
patches are undone in reverse order, and an attribute that does not exist is
refused with an :class:`~scoped_parallel.errors.AdapterError` naming it (an
upstream rename fails loudly instead of leaving a getter unpatched).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

from scoped_parallel.errors import AdapterError

__all__ = ["Ledger", "LEDGER"]

_MISSING = object()


@dataclass(frozen=True)
class _Record:
    owner: str
    target: Any
    name: str
    original: Any
    replacement: Any


def _where(target: Any) -> str:
    return getattr(target, "__name__", None) or type(target).__name__


class Ledger:
    """Patches grouped by owner (one adapter module each)."""

    def __init__(self) -> None:
        self._records: list[_Record] = []
        self._lock = threading.RLock()

    def owners(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(dict.fromkeys(r.owner for r in self._records))

    def is_patched(self, owner: str) -> bool:
        return owner in self.owners()

    def records(self, owner: str | None = None) -> list[_Record]:
        with self._lock:
            return [r for r in self._records if owner is None or r.owner == owner]

    def patch(self, owner: str, target: Any, name: str, replacement: Any) -> Any:
        """Replace ``target.name`` by ``replacement``; return the original object.

        The attribute must be defined on ``target`` itself (its ``__dict__``), so a
        renamed or moved upstream attribute is refused rather than shadowed.
        """
        with self._lock:
            namespace = vars(target)
            if name not in namespace:
                raise AdapterError(
                    f"{owner}: cannot patch {_where(target)}.{name}: the attribute does not exist "
                    "there (renamed or moved upstream?). This adapter supports the versions listed "
                    "in the README; pin one of them, or install without this adapter."
                )
            original = namespace[name]
            setattr(target, name, replacement)
            self._records.append(_Record(owner, target, name, original, replacement))
            return original

    def swap_module_class(self, owner: str, module: ModuleType, cls: type) -> None:
        """Give ``module`` the class ``cls`` (a ModuleType subclass adding properties)."""
        with self._lock:
            original = type(module)
            module.__class__ = cls
            self._records.append(_Record(owner, module, "__class__", original, cls))

    def patch_aliases(
        self, owner: str, original: Any, replacement: Any, modules: Iterable[ModuleType]
    ) -> int:
        """Patch every module-level name bound to ``original`` in ``modules``.

        This reaches star re-exports such as ``deepspeed.utils.<getter>``.
        Returns how many bindings were replaced.
        """
        count = 0
        for module in modules:
            for name, value in list(vars(module).items()):
                if value is original:
                    self.patch(owner, module, name, replacement)
                    count += 1
        return count

    def undo(self, owner: str | None = None) -> None:
        """Restore, in reverse order, every patch of ``owner`` (all owners when None).

        Every original object is put back by identity. If something else replaced one
        of our replacements meanwhile, the original is still restored and an
        AdapterError lists those attributes afterwards.
        """
        with self._lock:
            keep: list[_Record] = []
            undo: list[_Record] = []
            for record in self._records:
                (undo if owner is None or record.owner == owner else keep).append(record)
            conflicts: list[str] = []
            for record in reversed(undo):
                if record.name == "__class__":
                    current: Any = type(record.target)
                else:
                    current = vars(record.target).get(record.name, _MISSING)
                if current is not record.replacement:
                    conflicts.append(f"{_where(record.target)}.{record.name}")
                setattr(record.target, record.name, record.original)
            self._records = keep
            _sweep_copies({id(r.replacement): r for r in undo if r.name != "__class__"})
        if conflicts:
            raise AdapterError(
                "restored the originals, but these attributes had been replaced again by someone "
                f"else after scoped_parallel patched them: {', '.join(conflicts)}"
            )


def _sweep_copies(by_id: dict[int, _Record]) -> None:
    """Restore copies of replacements made after install (``from m import getter`` in a
    module imported while the adapters were installed)."""
    if not by_id:
        return
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            record = by_id.get(id(value))
            if record is not None and value is record.replacement:
                namespace[name] = record.original


LEDGER = Ledger()
