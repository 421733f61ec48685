"""Adapters that re-point other libraries' global parallel state at the active scope.

This folder is installed as the ``scoped_parallel.adapters`` subpackage (never as a
top-level ``adapters`` package). One module per target, each importing its target
lazily and skipped when the target is not installed:

=================  ====================================================================
``deepspeed``      ``deepspeed.utils.groups`` getters, ``groups.mpu``/``mesh_device``,
                   expert groups, AutoTP groups, ``parallel_state_sp``
``ulysses``        ``UlyssesSPAttentionHF``: one instance per state, one dispatcher
``megatron``       ``megatron.core.parallel_state`` getters
``autograd``       a backward carries its caller's state to autograd's threads; hooks
                   registered in a scope run in it
=================  ====================================================================

Every change to another library goes through one :class:`~._ledger.Ledger`
(``_ledger.py``), and every patched function finds its state with the scope's
``dispatching``/``resolve`` (``scoped_parallel.dispatch``).

Usage::

    from scoped_parallel import adapters
    adapters.install()            # idempotent; adapters.uninstall() restores every original
    with adapters.installed(): ...
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Iterator

from scoped_parallel.dispatch import is_strict, set_strict
from scoped_parallel.adapters._ledger import LEDGER
from scoped_parallel.errors import AdapterError

__all__ = ["TARGETS", "install", "installed", "is_installed", "uninstall", "available"]

#: adapter module -> the top-level packages it needs
TARGETS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("deepspeed",),
    "ulysses": ("deepspeed", "transformers"),
    "megatron": ("megatron",),
    "autograd": ("torch",),
}


def available() -> tuple[str, ...]:
    """The adapters whose target libraries are all importable here."""
    return tuple(
        name
        for name, packages in TARGETS.items()
        if all(importlib.util.find_spec(p) is not None for p in packages)
    )


def _module(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"scoped_parallel.adapters.{name}")


def install(strict: bool | None = None, targets: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Patch every available target (or ``targets``); return the adapters now installed.

    Idempotent: an installed adapter is left as it is. ``strict=True`` makes a
    patched getter called outside any scope raise instead of falling back to the
    library's own globals; ``None`` keeps the current setting (off at first).
    """
    names = available() if targets is None else tuple(targets)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; choose from {sorted(TARGETS)}")
    if strict is not None:
        set_strict(strict)
    for name in names:
        if LEDGER.is_patched(name):
            continue
        module = _module(name)
        try:
            module.install(LEDGER)
        except BaseException:
            LEDGER.undo(name)
            raise
    return LEDGER.owners()


def uninstall(targets: tuple[str, ...] | None = None) -> None:
    """Restore every original object (by identity) patched by the adapters.

    Every adapter is undone even when one of them finds a conflict (a patched object
    replaced again by someone else); the AdapterErrors are raised afterwards, together.
    """
    names = LEDGER.owners() if targets is None else tuple(targets)
    conflicts: list[AdapterError] = []
    for name in reversed(names):
        module = _module(name)
        hook = getattr(module, "uninstall", None)
        try:
            if hook is not None:
                hook()
        finally:
            try:
                LEDGER.undo(name)
            except AdapterError as err:
                conflicts.append(err)
    if not LEDGER.owners():
        set_strict(False)
    if len(conflicts) == 1:
        raise conflicts[0]
    if conflicts:
        raise AdapterError("; ".join(str(err) for err in conflicts))


def is_installed(target: str | None = None) -> bool:
    """Whether ``target`` (an adapter name), or any adapter when None, is installed now."""
    return bool(LEDGER.owners()) if target is None else LEDGER.is_patched(target)


@contextlib.contextmanager
def installed(strict: bool | None = None, targets: tuple[str, ...] | None = None) -> Iterator[tuple[str, ...]]:
    """``with adapters.installed(): ...`` installs for the block and restores afterwards.

    Adapters that were installed before the block stay installed after it.
    """
    before = LEDGER.owners()
    previous_strict = is_strict()
    names = install(strict=strict, targets=targets)
    try:
        yield names
    finally:
        added = tuple(n for n in LEDGER.owners() if n not in before)
        try:
            if added:
                uninstall(added)
        finally:
            set_strict(previous_strict)


# The reshard backends of scoped_parallel.reshard, asked in this order (Megatron models
# first, any other torch module second); importing them patches nothing.
from scoped_parallel.adapters import megatron_reshard, zero_reshard  # noqa: E402,F401
