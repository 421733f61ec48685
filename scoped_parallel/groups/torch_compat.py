"""Every private torch.distributed piece the core uses, resolved and checked once.

scoped_parallel creates groups on their members only, names them itself and
keeps torch's rank table for them; public torch has no API for that, so a few
private names of ``torch.distributed.distributed_c10d`` are needed. They are
looked up here, at import, and nowhere else; a torch without one of them (or
with a group constructor whose parameters changed) raises
:class:`~scoped_parallel.errors.UnsupportedSetupError` naming the torch version
and the missing piece, instead of failing later inside a collective.

Tested torch versions: ``TESTED_TORCH`` (also the range in ``pyproject.toml``).
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from scoped_parallel.errors import UnsupportedSetupError

__all__ = [
    "TESTED_TORCH",
    "bound_device",
    "create_group",
    "default_store",
    "default_group",
    "default_timeout",
    "fake_store",
    "is_registered",
    "split_group",
]

#: The torch releases the test suite runs on (oldest, newest).
TESTED_TORCH = ("2.13", "2.15")

if not dist.is_available():  # pragma: no cover - every supported wheel has distributed
    raise UnsupportedSetupError(
        f"torch {torch.__version__} was built without torch.distributed; scoped_parallel needs it. "
        "Install a torch build with distributed support (the PyPI wheels have it)."
    )

from torch.distributed import distributed_c10d as _c10d  # noqa: E402

# The constructor's parameters this module passes by name.
_HELPER_PARAMETERS = (
    "group_size",
    "group_rank",
    "global_ranks_in_group",
    "backend",
    "store",
    "group_name",
    "backend_options",
    "timeout",
    "group_desc",
)


def _missing(piece: str) -> UnsupportedSetupError:
    lo, hi = TESTED_TORCH
    return UnsupportedSetupError(
        f"torch {torch.__version__} lacks {piece}, which scoped_parallel uses to create process groups "
        f"on their members only; supported torch versions are {lo}.x to {hi}.x. Install one of them "
        "(pip install 'torch>=2.13,<2.15')."
    )


def _resolve(name: str) -> Any:
    value = getattr(_c10d, name, None)
    if value is None:
        raise _missing(f"torch.distributed.distributed_c10d.{name}")
    return value


_new_process_group_helper = _resolve("_new_process_group_helper")
_get_default_group = _resolve("_get_default_group")
_get_default_store = _resolve("_get_default_store")
_get_default_timeout = _resolve("_get_default_timeout")
_world = _resolve("_world")
for _attr in ("pg_map", "pg_group_ranks"):
    if not hasattr(_world, _attr):
        raise _missing(f"torch.distributed.distributed_c10d._world.{_attr}")
_accepted = inspect.signature(_new_process_group_helper).parameters
_absent = [p for p in _HELPER_PARAMETERS if p not in _accepted]
if _absent:
    raise _missing(f"the parameters {_absent} of distributed_c10d._new_process_group_helper")
del _attr, _accepted, _absent


def default_store() -> Any:
    """The default group's store (agreement keys and group rendezvous use it)."""
    return _get_default_store()


def default_timeout(backend: str | None = None) -> timedelta:
    """torch's default timeout for ``backend`` (the default group's backend when None)."""
    name = backend or dist.get_backend()
    return _get_default_timeout(dist.Backend(name))  # type: ignore[no-any-return]


def bound_device() -> Any:
    """The device the default group is bound to (``init_process_group(device_id=...)``), or None."""
    return getattr(_get_default_group(), "bound_device_id", None)


def is_registered(group: Any) -> bool:
    """Whether torch still knows ``group`` (false once it, or the world, was destroyed)."""
    return group in _world.pg_map


def create_group(
    ranks: list[int],
    backend: str,
    name: str,
    *,
    options: Any = None,
    timeout: timedelta,
    desc: str,
) -> Any:
    """Create a process group on its members only, registered under ``name``.

    Only the ranks in ``ranks`` call this; every one of them must pass the same
    ``name``. The group is entered into torch's rank table, so
    ``dist.get_rank(group)`` and ``get_global_rank`` work on it.
    """
    group, _store = _new_process_group_helper(
        group_size=len(ranks),
        group_rank=ranks.index(dist.get_rank()),
        global_ranks_in_group=ranks,
        backend=dist.Backend(backend),
        store=_get_default_store(),
        group_name=name,
        backend_options=options,
        timeout=timeout,
        group_desc=desc,
    )
    _world.pg_group_ranks[group] = dict(zip(ranks, range(len(ranks))))
    return group


def split_group(parent: Any, split_ranks: list[list[int]], *, timeout: timedelta, options: Any, desc: str) -> Any:
    """``torch.distributed.split_group``: every rank of ``parent`` calls it with the same partition.

    ``split_ranks`` holds ranks *inside* ``parent``; a rank in none of the parts gets None.
    Only for a default group bound to a device (``init_process_group(device_id=...)``).
    """
    split = getattr(dist, "split_group", None)
    if split is None:
        raise _missing("torch.distributed.split_group (needed with a device-bound default group)")
    return split(parent_pg=parent, split_ranks=split_ranks, timeout=timeout, pg_options=options, group_desc=desc)


def default_group() -> Any:
    """The default (world) process group."""
    return _get_default_group()


def fake_store() -> Any:
    """A store for torch's ``fake`` backend (one process acting as any rank of a world).

    ``FakeStore`` lives in torch's private testing package; it is imported only here,
    on first use.
    """
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as err:  # pragma: no cover - present in every tested torch
        raise _missing("torch.testing._internal.distributed.fake_pg.FakeStore (the fake backend's store)") from err
    return FakeStore()
