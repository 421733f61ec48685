"""The only module that creates or destroys process groups.

Member-only creation
--------------------
Each rank creates only the groups it belongs to. torch's public
``new_group(ranks, use_local_synchronization=True)`` allows that, but names the
group after a hash of its ranks *and of how many groups the calling process has
registered*; ranks that belong to different numbers of groups (an actor on
ranks 0-3 and a reference on 0-7, say) then compute different names for the
same group and wait for each other forever (``tests/state/test_state_world.py`` shows
the names diverge). So groups are named here from what every member agrees on
(the group's ranks and backend, and the ``tag`` of the state construction that
creates it, which the state's agreement check has compared between peers) and
built with torch's group constructor under that name. Nothing in the name
depends on a rank's history, so an earlier failure cannot desynchronise it.

Ranks create their groups in one global order (sorted by group key), which
rules out circular waits between overlapping groups.

Sharing
-------
Identical requests (ranks, backend, options object, timeout) share one process
group, reference-counted; ``release`` destroys it with its last user.

A shared request whose group would equal the default group (every rank of the world,
the default backend, no options, no timeout of its own) *is* the default group: no
second world-sized communicator is built (on NCCL each would hold its own buffers).
It is counted like any shared group and never destroyed here. With ``share=False``
(Megatron's behaviour: every kind its own communicator) a world-sized group is built.
"""

from __future__ import annotations

import array
import hashlib
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from scoped_parallel.groups import torch_compat as compat
from scoped_parallel.layout.grid import rank_span

__all__ = ["GroupRequest", "acquire", "adopt", "creation_count", "live_groups", "release", "retain"]


@dataclass(frozen=True)
class GroupRequest:
    """What a state asks for: ranks, backend (None = default), options, timeout."""

    ranks: tuple[int, ...]
    backend: str | None = None
    options: Any = None
    timeout: timedelta | None = None
    desc: str = "scoped_parallel"
    #: names the creation: the state construction's agreed tag and, within it, how many
    #: earlier requests had the same ranks and backend (equal on every member)
    tag: str = ""

    def order_key(self) -> tuple[Any, ...]:
        """A key every rank computes alike: the global creation order."""
        return (len(self.ranks), self.ranks, str(self.backend), self.desc)


@dataclass
class _Entry:
    group: Any
    request: GroupRequest
    users: int = 1
    #: the default group, held but never destroyed here
    borrowed: bool = False


_LOCK = threading.RLock()
_SHARED: dict[_ShareKey, _Entry] = {}
_BY_GROUP: dict[Any, tuple[_ShareKey | None, _Entry]] = {}


class _Counter:
    __slots__ = ("created",)

    def __init__(self) -> None:
        self.created = 0


_COUNT = _Counter()


def creation_count() -> int:
    """How many process groups this module has created in this process."""
    return _COUNT.created


def live_groups() -> int:
    """How many process groups created here are still alive."""
    with _LOCK:
        _forget_dead()
        return len(_BY_GROUP)


def _forget_dead() -> None:
    """Drop entries whose group torch no longer knows (the world was torn down under them)."""
    dead = [group for group in _BY_GROUP if not compat.is_registered(group)]
    for group in dead:
        key, _entry = _BY_GROUP.pop(group)
        if key is not None and key in _SHARED and _SHARED[key].group is group:
            del _SHARED[key]


def _is_the_default_group(request: GroupRequest) -> bool:
    """Whether ``request`` asks for what the default group already is (see the module doc).

    O(1) for every group smaller than the world (the length decides); only a
    world-sized request, whose ranks are O(world) anyway, is compared rank by rank.
    """
    world_size = dist.get_world_size()
    if len(request.ranks) != world_size or request.options is not None or request.timeout is not None:
        return False
    if request.backend is not None and str(request.backend).lower() != str(dist.get_backend()).lower():
        return False
    ranks, world = request.ranks, rank_span(0, world_size)
    return ranks is world or (ranks[0] == 0 and ranks[-1] == world_size - 1 and ranks == world)


class _ShareKey:
    """What makes two requests share one group; hashed once (a tuple of a group's ranks
    would be hashed again, O(group size), on every dict operation)."""

    __slots__ = ("_hash", "_value")

    def __init__(self, request: GroupRequest) -> None:
        self._value = (
            request.ranks,
            str(request.backend),
            None if request.options is None else id(request.options),
            request.timeout,
        )
        self._hash = hash(self._value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ShareKey) and self._hash == other._hash and self._value == other._value


#: the share key of every request that is the default group (see ``acquire``)
_DEFAULT_KEY = _ShareKey(GroupRequest(ranks=(), desc="the default group"))


def acquire(request: GroupRequest, *, share: bool) -> Any:
    """Return a process group for ``request``, created or shared.

    The calling rank must be in ``request.ranks``.
    """
    with _LOCK:
        _forget_dead()  # never hand out a group from a world that was destroyed
        # Every request that is the default group shares one key: the group is the registry's
        # key in _BY_GROUP, so two keys for it (backend None and "gloo" spelled out) would
        # overwrite each other's count there and leave one behind in _SHARED.
        is_default = share and _is_the_default_group(request)
        key = _DEFAULT_KEY if is_default else _ShareKey(request)
        if share:
            entry = _SHARED.get(key)
            if entry is not None:
                entry.users += 1
                return entry.group
            if is_default:
                entry = _Entry(compat.default_group(), request, borrowed=True)
                _BY_GROUP[entry.group] = (key, entry)
                _SHARED[key] = entry
                return entry.group
        group = _create(request)
        entry = _Entry(group, request)
        _BY_GROUP[group] = (key if share else None, entry)
        if share:
            _SHARED[key] = entry
        return group


def adopt(request: GroupRequest, group: Any, *, share: bool) -> Any:
    """Register ``group``, created elsewhere (a split), for ``request``; return the group to use.

    With ``share=True`` and an identical live group already held, that one is used and
    ``group`` is destroyed at once (a split is collective, so it cannot be skipped on one
    rank; sharing is decided after it).
    """
    with _LOCK:
        _forget_dead()
        key = _ShareKey(request)
        if share:
            entry = _SHARED.get(key)
            if entry is not None:
                entry.users += 1
                if dist.is_initialized() and compat.is_registered(group):
                    dist.destroy_process_group(group)
                return entry.group
        entry = _Entry(group, request)
        _BY_GROUP[group] = (key if share else None, entry)
        if share:
            _SHARED[key] = entry
        _COUNT.created += 1
        return group


def retain(group: Any) -> None:
    """Add one user to ``group`` (held here); ``release`` drops it again."""
    with _LOCK:
        found = _BY_GROUP.get(group)
        if found is None:
            raise KeyError(f"{group!r} is not a group created or adopted by scoped_parallel")
        found[1].users += 1


def release(group: Any) -> None:
    """Drop one user of ``group``; destroy it when none is left."""
    with _LOCK:
        found = _BY_GROUP.get(group)
        if found is None:
            return
        key, entry = found
        entry.users -= 1
        if entry.users > 0:
            return
        del _BY_GROUP[group]
        if key is not None and _SHARED.get(key) is entry:
            del _SHARED[key]
        if entry.borrowed:
            return
    if dist.is_initialized() and compat.is_registered(group):
        dist.destroy_process_group(group)


def users(group: Any) -> int:
    """How many states hold ``group`` (0 when unknown or released)."""
    with _LOCK:
        found = _BY_GROUP.get(group)
        return 0 if found is None else found[1].users


def _group_name(request: GroupRequest, backend: str) -> str:
    # the ranks as fixed-width integers (no text of every rank: O(group size) in C)
    digest = hashlib.sha1(array.array("q", request.ranks).tobytes(), usedforsecurity=False)
    digest.update(b"|" + backend.encode())
    digest_text = digest.hexdigest()[:20]
    return f"scoped_parallel:{digest_text}:{request.tag}"


def _create(request: GroupRequest) -> Any:
    backend = str(request.backend or dist.get_backend())
    # An explicit timeout wins; else the backend options' own; else torch's default.
    timeout = request.timeout or getattr(request.options, "_timeout", None) or compat.default_timeout(backend)
    group = compat.create_group(
        list(request.ranks),
        backend,
        _group_name(request, str(dist.Backend(backend))),
        options=request.options,
        timeout=timeout,
        desc=request.desc,
    )
    _COUNT.created += 1
    return group
