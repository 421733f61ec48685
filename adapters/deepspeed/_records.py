"""The per-state record: what DeepSpeed keeps in module globals, kept for one state.

One :class:`Record` per state lives in the state's adapter storage,
``state.adapter_record("deepspeed", ...)``, so it goes away with ``state.destroy()``
(and survives an uninstall/install cycle). A weak set of every record lets
DeepSpeed's teardown hook, ``_release_process_group_references``, reach them all.

The record's ``mpu`` and ``mesh_device`` are what ``groups.mpu``/``groups.mesh_device``
answer inside the state's scope; the memoized readers depend on them, so changing
either makes the state forget its memoized answers (``forget_memo``).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

from scoped_parallel.dispatch import forget_memo
from scoped_parallel.adapters._ledger import MISSING
from scoped_parallel.adapters.deepspeed._shared import OWNER

__all__ = ["Record", "all_records", "mpu_of", "record_of", "scoped_release"]


class Record:
    """One state's share of DeepSpeed's parallel globals."""

    __slots__ = (
        "_state",
        "_mpu",
        "_mesh_device",
        "ep",
        "ep_ranks",
        "edp",
        "edp_ranks",
        "expert_tp_world_size",
        "sp_size",
        "hpz",
        "hpz_ranks",
        "all_to_all",
        "checkpointing",
        "__weakref__",
    )

    def __init__(self, state: Any) -> None:
        self._state = weakref.ref(state)  # the state holds the record: no strong cycle
        self._mpu: Any = MISSING  # MISSING: the state itself is the mpu
        self._mesh_device: Any = None
        #: the state's _EXPERT_PARALLEL_GROUP, _EXPERT_DATA_PARALLEL_GROUP and their _RANKS
        self.ep: dict[str, Any] = {}
        self.ep_ranks: dict[str, Any] = {}
        self.edp: dict[str, Any] = {}
        self.edp_ranks: dict[str, Any] = {}
        self.expert_tp_world_size = 1
        self.sp_size: int | None = None  # initialize_sequence_parallel
        #: ZeRO++ hpZ: the state's secondary-partition group and its ranks (see zeropp)
        self.hpz: Any = None
        self.hpz_ranks: tuple[int, ...] = ()
        #: ZeRO++ qgZ: the state's all-to-all groups by DeepSpeed's key, or None (see zeropp)
        self.all_to_all: dict[str, Any] | None = None
        #: activation checkpointing's module globals for this state (see checkpointing)
        self.checkpointing: dict[str, Any] | None = None

    def _changed(self) -> None:
        state = self._state()
        if state is not None:
            forget_memo(state)

    @property
    def mpu(self) -> Any:
        """The mpu assigned inside the state's scope, or MISSING (the state itself)."""
        return self._mpu

    @mpu.setter
    def mpu(self, value: Any) -> None:
        self._mpu = value
        self._changed()

    @property
    def mesh_device(self) -> Any:
        return self._mesh_device

    @mesh_device.setter
    def mesh_device(self, value: Any) -> None:
        self._mesh_device = value
        self._changed()

    def release(self, group: Any) -> None:
        """Forget ``group`` (destroyed), or everything when ``group`` is None (WORLD teardown)."""
        if group is None:
            self._mpu = MISSING
            self._mesh_device = None
            for table in (self.ep, self.ep_ranks, self.edp, self.edp_ranks):
                table.clear()
            self.expert_tp_world_size = 1
        else:
            for table, ranks in ((self.ep, self.ep_ranks), (self.edp, self.edp_ranks)):
                for key, value in list(table.items()):
                    if value is group:
                        del table[key]
                        ranks.pop(key, None)
        self._changed()


_ALL: weakref.WeakSet[Record] = weakref.WeakSet()
_LOCK = threading.Lock()


def record_of(state: Any) -> Record:
    """The state's record, created on first use."""
    return state.adapter_record(OWNER, _new_record)  # type: ignore[no-any-return]


def _new_record(state: Any) -> Record:
    rec = Record(state)
    with _LOCK:
        _ALL.add(rec)
    return rec


def all_records() -> list[Record]:
    with _LOCK:
        return list(_ALL)


def mpu_of(state: Any) -> Any:
    """The mpu DeepSpeed sees in the state's scope: the one assigned there, else the state."""
    mpu = record_of(state).mpu
    return state if mpu is MISSING else mpu


def scoped_release(original: Any) -> Any:
    """DeepSpeed's ``_release_process_group_references``, which also cleans every record."""

    @functools.wraps(original)
    def _release_process_group_references(group: Any = None) -> Any:
        result = original(group=group)
        for rec in all_records():
            rec.release(group)
        return result

    return _release_process_group_references
