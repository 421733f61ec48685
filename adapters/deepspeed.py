"""DeepSpeed adapter: DeepSpeed's process-wide parallel state, answered by the active scope.

DeepSpeed 0.19.x keeps one model's parallel layout in module globals: the ``mpu``
handed to ``deepspeed.initialize`` (``groups.mpu``, last writer wins), a
``mesh_device``, AutoTP's tensor/data groups, the MoE expert group dicts and the
sequence-parallel groups of ``parallel_state_sp``. Two models with different
layouts in one process (actor and critic in RLHF) therefore read each other's
groups. After :func:`install`, inside ``with state.activate():`` every one of those
reads answers from ``state``; outside any scope each patched function calls the
original, so DeepSpeed behaves exactly as unpatched (with ``install(strict=True)``
a patched function called outside a scope raises ``NoActiveStateError``).

What is re-pointed, and how
===========================

``deepspeed.utils.groups`` functions (*function patch*: ``groups.f = scoped_f``,
which also reaches callers inside ``groups.py``; every other ``deepspeed.*``
module binding the same function object, e.g. the star re-export in
``deepspeed.utils``, is patched too):

* readers of ``mpu``/``mesh_device`` (``_get_data_parallel_*``,
  ``_get_model_parallel_world_size``, ``_get_sequence_parallel_*``,
  ``_get_sequence_data_parallel_*``, ``_get_broadcast_src_rank``): DeepSpeed's own
  decision rules, evaluated against the *scope's* mpu and mesh. The scope's mpu is
  whatever was assigned to ``groups.mpu`` inside a scope of that state (the engine
  does so in ``deepspeed.initialize(mpu=...)``), else the state itself (a complete
  mpu). The scope's mesh is ``None`` unless one was assigned inside that scope.
* AutoTP's globals (``get_tensor_model_parallel_*``, ``get_model_parallel_*``,
  ``get_data_parallel_*``, ``set_tensor_model_parallel_*``, ``_init_tp_mesh_device``,
  ``_init_tp_groups_with_new_group``): the state's ``tp`` and ``dp`` groups. As in
  DeepSpeed, "model parallel" here means the TP group. ``_init_tp_mesh_device``
  creates nothing inside a scope; it checks that the requested TP (and DP) size is
  the state's and raises :class:`~scoped_parallel.errors.LayoutError` naming both
  sizes otherwise. A second AutoTP model in another scope gets its own groups.
* expert groups (``_get_expert_*``, ``_get_max_expert_*``, the two creators,
  ``_get_expert_model_parallel_world_size``): one record per state holds its own
  ``_EXPERT_PARALLEL_GROUP``/``_EXPERT_DATA_PARALLEL_GROUP`` dicts, their ``_RANKS``
  dicts and its ``expert_tensor_parallel_world_size``; the ``*_dict()`` getters return
  these dict objects, so an engine built in a scope captures its state's dicts.
  A creator asked for ``ep_size_N`` inside a scope *adopts the state's own* ``ep``
  and ``edp`` groups when N is the state's ``expert_model_parallel_size`` (and no
  AutoEP folding spec or data-before-expert ordering is requested): the state is the
  authority on the layout and nothing is created. Otherwise DeepSpeed's creator runs
  with the module globals temporarily bound to the state's dicts (under a lock; other
  threads reading those globals meanwhile see them), which needs a state spanning the
  whole world because DeepSpeed builds groups over all ranks.
* ``_release_process_group_references`` also drops what the per-state records hold
  for a destroyed group (or everything, on WORLD teardown).

``groups.mpu`` and ``groups.mesh_device`` as attributes (*module class*: the module's
class becomes a subclass with two properties). Inside a scope a read returns the
scope's mpu/mesh (above) and a write is recorded for that state only (kept in a
``WeakKeyDictionary``); outside any scope reads and writes use the module's own
``__dict__`` as before. Code inside ``groups.py`` reads the ``__dict__`` directly;
that is why its readers are function-patched.

``deepspeed.runtime.sequence_parallel.parallel_state_sp``: its getters and its
``get_model_parallel_*`` aliases (separate bindings of the SP functions) answer from
the state's ``sp`` and ``sp-dp`` groups; ``initialize_sequence_parallel(n)`` inside a
scope creates nothing, is idempotent, and raises ``LayoutError`` when ``n`` is not the
state's sequence-parallel size.

``deepspeed.initialize``: called outside any scope with ``mpu=<ParallelState>``, it
runs inside that state's scope (so the ``groups.mpu`` write and the groups the engine
captures belong to that state). Called inside a scope with ``mpu=None``, the state is
passed as the mpu, as ``groups.mpu`` would answer anyway, unless DeepSpeed picks the
mpu itself (AutoTP ``autotp_size > 1``, ``tp_model_init``, a mesh, a pipeline module)
or the config is not a dict; a state with TP > 1 would otherwise crash the engine
(``engine.mpu`` is ``None`` but the model-parallel size is > 1).

ZeRO-3 with a state of SP > 1 as mpu: ``DeepSpeedZeRoOffload._convert_to_zero_parameters``
partitions parameters over the mpu's data-parallel group while gradients are reduced over
SP x DP; the patch gives it the state's SP x DP group there (plain DeepSpeed gets WORLD from
``parallel_state_sp``, which is SP x DP when the model spans the world).

Not re-pointed: the hpZ group (``_ZERO_PARAM_INTRA_PARALLEL_GROUP``), the cloned WORLD
and all-to-all caches (shared by every model), activation checkpointing, pipeline
``p2p`` and Domino globals, and the step-time paths themselves: run each engine's
``forward``/``backward``/``step`` inside its state's scope, because ZeRO-0, BF16 and
gradient clipping look the data-parallel group up at step time.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import types
import weakref
from collections.abc import Mapping
from typing import Any, Callable

from scoped_parallel._scope import _ACTIVE, _CURRENT, current_state_or_none
from scoped_parallel.adapters._common import _STRICT, active_state
from scoped_parallel.errors import AdapterError, LayoutError

__all__ = [
    "GROUPS_FUNCTIONS",
    "OWNER",
    "SEQUENCE_PARALLEL_FUNCTIONS",
    "install",
    "uninstall",
]

OWNER = "deepspeed"
_GROUPS_MODULE = "deepspeed.utils.groups"

_UNSET: Any = object()


class _Mods:
    """The DeepSpeed modules the in-scope implementations use (filled by install)."""

    groups: Any = None
    comm: Any = None
    bwc: Any = None


# ---------------------------------------------------------------------- per-state records


class _Record:
    """What DeepSpeed would keep in module globals, kept for one state."""

    __slots__ = (
        "_mpu",
        "_mesh_device",
        "answers",
        "ep",
        "ep_ranks",
        "edp",
        "edp_ranks",
        "expert_tp_world_size",
        "tp_world_size",
        "tp_rank",
        "sp_size",
    )

    def __init__(self) -> None:
        #: answers of the argument-free mpu/mesh readers (_CACHEABLE), valid while the
        #: record's mpu and mesh stay as they are (their setters clear it)
        self.answers: dict[str, Any] = {}
        self._mpu: Any = _UNSET  # _UNSET: the state itself is the mpu
        self._mesh_device: Any = None
        self.ep: dict[str, Any] = {}
        self.ep_ranks: dict[str, Any] = {}
        self.edp: dict[str, Any] = {}
        self.edp_ranks: dict[str, Any] = {}
        self.expert_tp_world_size = 1
        self.tp_world_size: int | None = None  # set_tensor_model_parallel_world_size
        self.tp_rank: int | None = None  # set_tensor_model_parallel_rank
        self.sp_size: int | None = None  # initialize_sequence_parallel

    @property
    def mpu(self) -> Any:
        return self._mpu

    @mpu.setter
    def mpu(self, value: Any) -> None:
        self._mpu = value
        self.answers = {}

    @property
    def mesh_device(self) -> Any:
        return self._mesh_device

    @mesh_device.setter
    def mesh_device(self, value: Any) -> None:
        self._mesh_device = value
        self.answers = {}


_RECORDS: "weakref.WeakKeyDictionary[Any, _Record]" = weakref.WeakKeyDictionary()
_RECORDS_LOCK = threading.Lock()
# Held while a DeepSpeed creator runs with the module globals bound to a state's dicts.
_CREATE_LOCK = threading.RLock()


def _record(state: Any) -> _Record:
    # Fast path: the record cached in the state's adapter slots (patched getters are hot).
    slots = getattr(state, "_adapter_slots", None)
    if slots is not None:
        rec = slots.get(OWNER)
        if rec is not None:
            return rec  # type: ignore[no-any-return]
    with _RECORDS_LOCK:
        rec = _RECORDS.get(state)
        if rec is None:
            rec = _RECORDS[state] = _Record()
        else:
            rec.answers = {}  # the slot was cleared (state destroyed): nothing cached survives
        if slots is not None:
            slots[OWNER] = rec
        return rec


def _mpu_of(state: Any) -> Any:
    rec = _record(state)
    return state if rec.mpu is _UNSET else rec.mpu


def _label(state: Any) -> str:
    name = getattr(state, "name", None)
    return f"ParallelState {name!r}" if name else "the active ParallelState"


def _is_sp_only(mpu: Any) -> bool:
    # DeepSpeed treats an mpu with this attribute as parallel_state_sp (DP group = WORLD).
    # A ParallelState never has it (and a failing hasattr is slow on a hot path).
    if type(mpu) is _state_class():
        return False
    return hasattr(mpu, "initialize_sequence_parallel")


@functools.lru_cache(maxsize=None)
def _state_class() -> type:
    from scoped_parallel.state import ParallelState

    return ParallelState


def _spans_world(state: Any) -> bool:
    layout = state.layout
    return layout.rank_offset == 0 and layout.world_size == _Mods.comm.get_world_size()


# ---------------------------------------------------------------------- groups: mpu/mesh readers
#
# Each implementation takes the active state first, then the caller's arguments.

_GROUPS_IMPL: dict[str, Callable[..., Any]] = {}
_SP_IMPL: dict[str, Callable[..., Any]] = {}
_ORIGINALS: dict[str, Any] = {}


def _impl(
    table: dict[str, Callable[..., Any]], *names: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            table[name] = fn
        return fn

    return register


@_impl(_GROUPS_IMPL, "_get_data_parallel_group")
def _dp_group(state: Any) -> Any:
    rec = _record(state)
    mpu = state if rec.mpu is _UNSET else rec.mpu
    if rec.mesh_device is not None:
        return rec.mesh_device.get_group(mesh_dim="data_parallel")
    if mpu is None:
        return _Mods.groups._clone_world_group()
    if _is_sp_only(mpu):
        return None
    return mpu.get_data_parallel_group()


@_impl(_GROUPS_IMPL, "_get_data_parallel_group_ranks")
def _dp_group_ranks(state: Any) -> Any:
    mpu = _mpu_of(state)
    if mpu is None:
        return range(_Mods.comm.get_world_size())
    return mpu.get_data_parallel_group_ranks()


@_impl(_GROUPS_IMPL, "_get_data_parallel_world_size")
def _dp_world_size(state: Any) -> Any:
    rec = _record(state)
    mpu = _mpu_of(state)
    if rec.mesh_device is not None:
        return _Mods.comm.get_world_size(rec.mesh_device.get_group(mesh_dim="data_parallel"))
    if mpu is not None:
        return None if _is_sp_only(mpu) else mpu.get_data_parallel_world_size()
    return _Mods.comm.get_world_size(group=_dp_group(state))


@_impl(_GROUPS_IMPL, "_get_data_parallel_rank")
def _dp_rank(state: Any) -> int:
    return _Mods.comm.get_rank(group=_dp_group(state))


@_impl(_GROUPS_IMPL, "_get_model_parallel_world_size")
def _mp_world_size(state: Any) -> int:
    mpu = _mpu_of(state)
    if mpu is None or _is_sp_only(mpu):
        return 1
    return mpu.get_model_parallel_world_size()


@_impl(_GROUPS_IMPL, "_get_sequence_parallel_world_size")
def _sp_world_size(state: Any) -> int:
    rec = _record(state)
    mpu = _mpu_of(state)
    if rec.mesh_device is not None:
        return _Mods.comm.get_world_size(rec.mesh_device.get_group(mesh_dim="sequence_parallel"))
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_world_size"):
        return mpu.get_sequence_parallel_world_size()
    return 1


@_impl(_GROUPS_IMPL, "_get_sequence_parallel_rank")
def _sp_rank(state: Any) -> int:
    rec = _record(state)
    mpu = _mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_rank"):
        return mpu.get_sequence_parallel_rank()
    if rec.mesh_device is not None:
        return _Mods.comm.get_rank(rec.mesh_device.get_group(mesh_dim="sequence_parallel"))
    return 0


@_impl(_GROUPS_IMPL, "_get_sequence_parallel_group")
def _sp_group(state: Any) -> Any:
    rec = _record(state)
    mpu = _mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_group"):
        return mpu.get_sequence_parallel_group()
    if rec.mesh_device is not None:
        return rec.mesh_device.get_group(mesh_dim="sequence_parallel")
    raise KeyError(f"no sequence parallel group: the mpu of {_label(state)} has none and no mesh was set")


@_impl(_GROUPS_IMPL, "_get_sequence_data_parallel_world_size")
def _sdp_world_size(state: Any) -> Any:
    mpu = _mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_world_size"):
        return mpu.get_sequence_data_parallel_world_size()
    return _dp_world_size(state)


@_impl(_GROUPS_IMPL, "_get_sequence_data_parallel_rank")
def _sdp_rank(state: Any) -> int:
    mpu = _mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_rank"):
        return mpu.get_sequence_data_parallel_rank()
    return _dp_rank(state)


@_impl(_GROUPS_IMPL, "_get_sequence_data_parallel_group")
def _sdp_group(state: Any) -> Any:
    mpu = _mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_group"):
        return mpu.get_sequence_data_parallel_group()
    return _dp_group(state)


@_impl(_GROUPS_IMPL, "_get_broadcast_src_rank")
def _broadcast_src_rank(state: Any) -> int:
    return _Mods.comm.get_global_rank(_sdp_group(state), 0)


# ---------------------------------------------------------------------- groups: AutoTP globals


@_impl(_GROUPS_IMPL, "get_tensor_model_parallel_group", "get_model_parallel_group")
def _tp_group(state: Any) -> Any:
    return state.get_tensor_model_parallel_group()


@_impl(_GROUPS_IMPL, "get_data_parallel_group")
def _public_dp_group(state: Any) -> Any:
    return state.get_data_parallel_group()


@_impl(_GROUPS_IMPL, "get_tensor_model_parallel_world_size", "get_model_parallel_world_size")
def _tp_world_size(state: Any) -> int:
    override = _record(state).tp_world_size
    return state.get_tensor_model_parallel_world_size() if override is None else override


@_impl(_GROUPS_IMPL, "get_tensor_model_parallel_rank", "get_model_parallel_rank")
def _tp_rank(state: Any) -> int:
    override = _record(state).tp_rank
    return state.get_tensor_model_parallel_rank() if override is None else override


@_impl(_GROUPS_IMPL, "get_tensor_model_parallel_src_rank")
def _tp_src_rank(state: Any) -> int:
    return state.get_tensor_model_parallel_src_rank()


@_impl(_GROUPS_IMPL, "get_data_parallel_world_size")
def _public_dp_world_size(state: Any) -> int:
    return state.get_data_parallel_world_size()


@_impl(_GROUPS_IMPL, "get_data_parallel_rank")
def _public_dp_rank(state: Any) -> int:
    return state.get_data_parallel_rank()


@_impl(_GROUPS_IMPL, "set_tensor_model_parallel_world_size")
def _set_tp_world_size(state: Any, world_size: Any) -> None:
    _record(state).tp_world_size = world_size


@_impl(_GROUPS_IMPL, "set_tensor_model_parallel_rank")
def _set_tp_rank(state: Any, rank: Any) -> None:
    _record(state).tp_rank = rank


@_impl(_GROUPS_IMPL, "_init_tp_mesh_device", "_init_tp_groups_with_new_group")
def _init_tp(state: Any, tensor_model_parallel_size: int = 1, data_parallel_size: int | None = None) -> Any:
    tp = state.get_tensor_model_parallel_world_size()
    if tensor_model_parallel_size != tp:
        raise LayoutError(
            f"DeepSpeed asked for tensor parallel size {tensor_model_parallel_size} (AutoTP "
            f"autotp_size / tp_model_init tp_size) inside the scope of {_label(state)}, whose tensor "
            f"parallel size is {tp}. Build the state with "
            f"tensor_model_parallel_size={tensor_model_parallel_size}, or set autotp_size to {tp}."
        )
    dp = state.get_data_parallel_world_size()
    if data_parallel_size is not None and data_parallel_size != dp:
        raise LayoutError(
            f"DeepSpeed asked for data parallel size {data_parallel_size} with tensor parallel size "
            f"{tensor_model_parallel_size} inside the scope of {_label(state)}, whose data parallel "
            f"size is {dp}. Build the state with the sizes DeepSpeed expects, or pass "
            f"data_parallel_size={dp}."
        )
    # DeepSpeed returns (data parallel group, model parallel group = TP group).
    return state.get_data_parallel_group(), state.get_tensor_model_parallel_group()


# ---------------------------------------------------------------------- groups: expert groups


def _lookup(table: dict[str, Any], name: str, what: str, state: Any) -> Any:
    if name not in table:
        raise AssertionError(
            f"{what} {name!r} is not initialized for {_label(state)} (it has {sorted(table)}); "
            "create the MoE layers / engine inside this state's scope"
        )
    return table[name]


@_impl(_GROUPS_IMPL, "_get_expert_parallel_group")
def _ep_group(state: Any, group_name: str) -> Any:
    return _lookup(_record(state).ep, group_name, "expert parallel group", state)


@_impl(_GROUPS_IMPL, "_get_expert_parallel_group_ranks")
def _ep_group_ranks(state: Any, group_name: str) -> Any:
    return _lookup(_record(state).ep_ranks, group_name, "expert parallel group", state)


@_impl(_GROUPS_IMPL, "_get_expert_parallel_group_dict")
def _ep_dict(state: Any) -> dict[str, Any]:
    return _record(state).ep


@_impl(_GROUPS_IMPL, "_get_expert_data_parallel_group")
def _edp_group(state: Any, group_name: str) -> Any:
    return _lookup(_record(state).edp, group_name, "expert data parallel group", state)


@_impl(_GROUPS_IMPL, "_get_expert_data_parallel_group_ranks")
def _edp_group_ranks(state: Any, group_name: str) -> Any:
    return _lookup(_record(state).edp_ranks, group_name, "expert data parallel group", state)


@_impl(_GROUPS_IMPL, "_get_expert_data_parallel_group_dict")
def _edp_dict(state: Any) -> dict[str, Any]:
    return _record(state).edp


@_impl(_GROUPS_IMPL, "_get_max_expert_size")
def _max_expert_size(state: Any) -> int | None:
    sizes = [int(key.rsplit("_", 1)[-1]) for key in _record(state).ep]
    return max(sizes) if sizes else None


@_impl(_GROUPS_IMPL, "_get_max_expert_size_name")
def _max_expert_size_name(state: Any) -> str:
    return f"ep_size_{_max_expert_size(state)}"


@_impl(_GROUPS_IMPL, "_get_max_expert_parallel_group")
def _max_ep_group(state: Any) -> Any:
    return _ep_group(state, _max_expert_size_name(state))


@_impl(_GROUPS_IMPL, "_get_expert_broadcast_src_rank")
def _expert_broadcast_src_rank(state: Any, group_name: str) -> int:
    return _Mods.comm.get_global_rank(_edp_group(state, group_name), 0)


@_impl(_GROUPS_IMPL, "_get_expert_parallel_world_size")
def _ep_world_size(state: Any, group_name: str) -> int:
    return _Mods.comm.get_world_size(group=_ep_group(state, group_name))


@_impl(_GROUPS_IMPL, "_get_expert_data_parallel_world_size")
def _edp_world_size(state: Any, group_name: str) -> int:
    return _Mods.comm.get_world_size(group=_edp_group(state, group_name))


@_impl(_GROUPS_IMPL, "_get_expert_parallel_rank")
def _ep_rank(state: Any, group_name: str) -> int:
    return _Mods.comm.get_rank(group=_ep_group(state, group_name))


@_impl(_GROUPS_IMPL, "_get_expert_parallel_src_rank")
def _ep_src_rank(state: Any, group_name: str) -> int:
    # DeepSpeed computes this arithmetically for contiguous groups; the group's first
    # member is the same answer there and the right one for strided state groups.
    return _Mods.comm.get_global_rank(_ep_group(state, group_name), 0)


@_impl(_GROUPS_IMPL, "_get_expert_data_parallel_rank")
def _edp_rank(state: Any, group_name: str) -> int:
    return _Mods.comm.get_rank(group=_edp_group(state, group_name))


@_impl(_GROUPS_IMPL, "_get_expert_model_parallel_world_size")
def _expert_tp_world_size(state: Any) -> int:
    return _record(state).expert_tp_world_size


def _bound_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The creator's arguments by parameter name, defaults included."""
    bound = inspect.signature(_ORIGINALS[name]).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _adopt_state_expert_groups(state: Any, rec: _Record, group_name: str) -> None:
    if group_name not in rec.ep:
        rec.ep[group_name] = state.get_expert_model_parallel_group()
        rec.ep_ranks[group_name] = list(state.ranks("ep"))
    if group_name not in rec.edp:
        rec.edp[group_name] = state.get_expert_data_parallel_group()
        rec.edp_ranks[group_name] = list(state.ranks("edp"))


_EXPERT_GLOBALS = (
    ("_EXPERT_PARALLEL_GROUP", "ep"),
    ("_EXPERT_PARALLEL_GROUP_RANKS", "ep_ranks"),
    ("_EXPERT_DATA_PARALLEL_GROUP", "edp"),
    ("_EXPERT_DATA_PARALLEL_GROUP_RANKS", "edp_ranks"),
)


def _run_creator_on_state_dicts(
    state: Any, rec: _Record, name: str, ep_size: int, args: Any, kwargs: Any
) -> Any:
    """Run DeepSpeed's creator with the module globals bound to the state's record."""
    if not _spans_world(state):
        raise LayoutError(
            f"DeepSpeed asked for expert parallel size {ep_size} inside the scope of {_label(state)}, "
            f"whose expert_model_parallel_size is {state.get_expert_model_parallel_world_size()} and "
            "which does not span the whole world, so DeepSpeed cannot build the groups itself. Build "
            f"the state with expert_model_parallel_size={ep_size}."
        )
    namespace = vars(_Mods.groups)
    keys = [key for key, _ in _EXPERT_GLOBALS] + ["expert_tensor_parallel_world_size", "mpu"]
    with _CREATE_LOCK:
        missing = [key for key in keys if key not in namespace]
        if missing:
            raise AdapterError(
                f"{OWNER}: {_GROUPS_MODULE} has no {', '.join(missing)} (renamed upstream?); "
                "this adapter supports deepspeed 0.19.x"
            )
        saved = {key: namespace[key] for key in keys}
        for key, slot in _EXPERT_GLOBALS:
            namespace[key] = getattr(rec, slot)
        namespace["expert_tensor_parallel_world_size"] = rec.expert_tp_world_size
        namespace["mpu"] = _mpu_of(state)  # the legacy creator reads the pipeline size from it
        try:
            return _ORIGINALS[name](*args, **kwargs)
        finally:
            for key, slot in _EXPERT_GLOBALS:
                setattr(rec, slot, namespace[key])
            rec.expert_tp_world_size = namespace["expert_tensor_parallel_world_size"]
            namespace.update(saved)


@_impl(_GROUPS_IMPL, "_create_expert_and_data_parallel")
def _create_expert_and_data_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    name = "_create_expert_and_data_parallel"
    arguments = _bound_arguments(name, args, kwargs)
    ep_size = next(iter(arguments.values()))
    group_name = f"ep_size_{ep_size}"
    rec = _record(state)
    adopt = (
        ep_size == state.get_expert_model_parallel_world_size()
        and not arguments.get("use_data_before_expert_parallel_")
        and arguments.get("folding_spec") is None
    )
    if adopt:
        _adopt_state_expert_groups(state, rec, group_name)
        return None
    return _run_creator_on_state_dicts(state, rec, name, ep_size, args, kwargs)


@_impl(_GROUPS_IMPL, "_create_expert_data_and_model_parallel")
def _create_expert_data_and_model_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    name = "_create_expert_data_and_model_parallel"
    arguments = _bound_arguments(name, args, kwargs)
    ep_size = next(iter(arguments.values()))
    group_name = f"ep_size_{ep_size}"
    rec = _record(state)
    adopt = ep_size == state.get_expert_model_parallel_world_size() and not arguments.get(
        "use_data_before_expert_parallel_"
    )
    if adopt:
        rec.expert_tp_world_size = _Mods.bwc.bwc_tensor_model_parallel_world_size(arguments.get("mpu"))
        _adopt_state_expert_groups(state, rec, group_name)
        return None
    return _run_creator_on_state_dicts(state, rec, name, ep_size, args, kwargs)


def _release_references(state_records: list[_Record], group: Any) -> None:
    for rec in state_records:
        if group is None:
            rec.mpu = _UNSET
            rec.mesh_device = None
            for _, slot in _EXPERT_GLOBALS:
                getattr(rec, slot).clear()
            rec.expert_tp_world_size = 1
            continue
        for groups_slot, ranks_slot in (("ep", "ep_ranks"), ("edp", "edp_ranks")):
            table, ranks = getattr(rec, groups_slot), getattr(rec, ranks_slot)
            for key, value in list(table.items()):
                if value is group:
                    del table[key]
                    ranks.pop(key, None)


def _scoped_release(original: Any) -> Any:
    @functools.wraps(original)
    def _release_process_group_references(group: Any = None) -> Any:
        result = original(group=group)
        with _RECORDS_LOCK:
            records = list(_RECORDS.values())
        _release_references(records, group)
        return result

    return _release_process_group_references


# ---------------------------------------------------------------------- parallel_state_sp


@_impl(_SP_IMPL, "initialize_sequence_parallel")
def _sp_initialize(state: Any, sequence_parallel_size: int) -> None:
    if sequence_parallel_size <= 1:
        raise ValueError(f"sequence_parallel_size must be greater than 1, got {sequence_parallel_size}")
    have = state.get_sequence_parallel_world_size()
    if sequence_parallel_size != have:
        raise LayoutError(
            f"initialize_sequence_parallel({sequence_parallel_size}) was called inside the scope of "
            f"{_label(state)}, whose sequence parallel size is {have}; groups are never re-created "
            f"inside a scope. Build the state with sequence_parallel_size={sequence_parallel_size}, "
            f"or pass {have}."
        )
    _record(state).sp_size = sequence_parallel_size


@_impl(_SP_IMPL, "get_sequence_parallel_group", "get_model_parallel_group")
def _sp_module_group(state: Any) -> Any:
    return state.get_sequence_parallel_group()


@_impl(_SP_IMPL, "get_sequence_parallel_world_size", "get_model_parallel_world_size")
def _sp_module_world_size(state: Any) -> int:
    return state.get_sequence_parallel_world_size()


@_impl(_SP_IMPL, "get_sequence_parallel_rank", "get_model_parallel_rank")
def _sp_module_rank(state: Any) -> int:
    return state.get_sequence_parallel_rank()


@_impl(_SP_IMPL, "get_sequence_data_parallel_group")
def _sp_module_sdp_group(state: Any) -> Any:
    return state.get_sequence_data_parallel_group()


@_impl(_SP_IMPL, "get_sequence_data_parallel_world_size")
def _sp_module_sdp_world_size(state: Any) -> int:
    return state.get_sequence_data_parallel_world_size()


@_impl(_SP_IMPL, "get_sequence_data_parallel_rank")
def _sp_module_sdp_rank(state: Any) -> int:
    return state.get_sequence_data_parallel_rank()


#: ``deepspeed.utils.groups`` functions re-pointed at the active scope.
GROUPS_FUNCTIONS: tuple[str, ...] = tuple(_GROUPS_IMPL)
#: ``parallel_state_sp`` functions (aliases included) re-pointed at the active scope.
SEQUENCE_PARALLEL_FUNCTIONS: tuple[str, ...] = tuple(_SP_IMPL)


# ---------------------------------------------------------------------- groups.mpu / mesh_device


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
            return _mpu_of(state)
        return _record(state).mesh_device

    def write(module: types.ModuleType, value: Any) -> None:
        state = current_state_or_none()
        if state is None:
            vars(module)[name] = value
        elif name == "mpu":
            if value is not state and type(value) is _state_class():
                raise AdapterError(
                    f"groups.mpu = {_label(value)} inside the scope of {_label(state)}: another "
                    "state's groups would answer this scope's DeepSpeed lookups. Assign it inside "
                    f"`with {getattr(value, 'name', None) or 'that state'}.activate():` instead."
                )
            # The state itself is the default; not storing it keeps the weak record collectable.
            _record(state).mpu = _UNSET if value is state else value
        else:
            _record(state).mesh_device = value

    def delete(module: types.ModuleType) -> None:
        state = current_state_or_none()
        if state is None:
            try:
                del vars(module)[name]
            except KeyError:
                raise AttributeError(name) from None
        elif name == "mpu":
            _record(state).mpu = _UNSET
        else:
            _record(state).mesh_device = None

    return property(read, write, delete, f"groups.{name}: the active state's value inside a scope")


def _scoped_module_class(base: type) -> type:
    return type(
        "ScopedDeepSpeedGroupsModule",
        (base,),
        {
            "__doc__": "deepspeed.utils.groups with scope-aware `mpu` and `mesh_device` (scoped_parallel).",
            "__module__": __name__,
            "mpu": _module_attribute("mpu"),
            "mesh_device": _module_attribute("mesh_device"),
        },
    )


# ---------------------------------------------------------------------- deepspeed.initialize


def _scoped_initialize(original: Any) -> Any:
    from scoped_parallel.state import ParallelState

    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        mpu = bound.arguments.get("mpu")
        state = current_state_or_none()
        if isinstance(mpu, ParallelState) and mpu is not state:
            # An engine belongs to the state it was given as mpu: run there, so its
            # groups.mpu write and every group it captures are that state's.
            with mpu.activate():
                return original(*args, **kwargs)
        if state is None:
            return original(*args, **kwargs)
        if mpu is None and _state_may_be_mpu(bound.arguments):
            bound.arguments["mpu"] = state
            return original(*bound.args, **bound.kwargs)
        return original(*args, **kwargs)

    return initialize


def _state_may_be_mpu(arguments: Mapping[str, Any]) -> bool:
    """Whether ``deepspeed.initialize`` would leave the mpu to its caller (see module doc)."""
    config = arguments.get("config")
    if config is None:
        config = arguments.get("config_params")
    if isinstance(config, (str, os.PathLike)):
        from scoped_parallel._config import load_config

        try:
            config = load_config(config)
        except (ValueError, TypeError):
            return False  # let DeepSpeed report its own error about the config
    if not isinstance(config, Mapping) or arguments.get("mesh_param"):
        return False
    if "sequence_parallel_size" in config and "data_parallel_size" in config:
        return False
    tensor_parallel = config.get("tensor_parallel") or {}
    if isinstance(tensor_parallel, Mapping) and (tensor_parallel.get("autotp_size") or 0) > 1:
        return False
    init_utils = sys.modules.get("deepspeed.runtime.tensor_parallel.init_utils")
    if init_utils is not None and getattr(init_utils, "_TP_MODEL_INIT_ARGS", None) is not None:
        return False
    pipe = sys.modules.get("deepspeed.runtime.pipe.module")
    pipeline_module = getattr(pipe, "PipelineModule", None)
    if pipeline_module is not None and isinstance(arguments.get("model"), pipeline_module):
        return False
    return True


# ---------------------------------------------------------------------- install / uninstall


#: mpu/mesh readers without arguments whose answer is fixed for a state while its
#: record's mpu and mesh are unchanged: answered from the record's cache after the first call.
_CACHEABLE = frozenset(
    (
        "_get_data_parallel_group",
        "_get_data_parallel_world_size",
        "_get_data_parallel_rank",
        "_get_model_parallel_world_size",
        "_get_sequence_parallel_group",
        "_get_sequence_parallel_world_size",
        "_get_sequence_parallel_rank",
        "_get_sequence_data_parallel_group",
        "_get_sequence_data_parallel_world_size",
        "_get_sequence_data_parallel_rank",
    )
)
_MISS = object()


def _scoped(label: str, name: str, original: Any, implementation: Callable[..., Any]) -> Any:
    what = f"{label}.{name}"
    cacheable = (
        label.endswith("groups")
        and name in _CACHEABLE
        and not inspect.signature(original).parameters  # an upstream change disables caching
    )

    @functools.wraps(original)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        # active_state() inlined for its two common cases: patched getters are hot.
        frame = _CURRENT.get()
        if frame is not None:
            return implementation(frame[0], *args, **kwargs)
        state = active_state(what) if (_ACTIVE or _STRICT[0]) else None
        if state is None:
            return original(*args, **kwargs)
        return implementation(state, *args, **kwargs)

    if not cacheable:
        return scoped

    @functools.wraps(original)
    def scoped_reader(
        *, _get: Any = _CURRENT.get, _active: Any = _ACTIVE, _strict: Any = _STRICT, _original: Any = original
    ) -> Any:
        # The same, for the argument-free hot readers: no argument packing, names bound as
        # defaults (local lookups), and the answer cached per state.
        frame = _get()
        if frame is None:
            if _active or _strict[0]:
                return scoped()
            return _original()
        state = frame[0]
        # _record()'s fast path, inlined: saves a call on the hottest path (0.6x -> 0.5x).
        slots = getattr(state, "_adapter_slots", None)
        rec = slots.get(OWNER) if slots is not None else None
        if rec is None:
            rec = _record(state)
        answer = rec.answers.get(name, _MISS)
        if answer is _MISS:
            answer = rec.answers[name] = implementation(state)
        return answer

    return scoped_reader


def _require(module: types.ModuleType, name: str) -> Any:
    try:
        return vars(module)[name]
    except KeyError:
        raise AdapterError(
            f"{OWNER}: cannot patch {module.__name__}.{name}: the attribute does not exist there "
            "(renamed or moved upstream?). This adapter supports deepspeed 0.19.x; pin it, or "
            "install the adapters without 'deepspeed'."
        ) from None


def _binding_modules(
    originals: list[Any], skip: tuple[types.ModuleType, ...]
) -> dict[int, list[types.ModuleType]]:
    """For each original function, the other ``deepspeed`` modules binding it at top level."""
    wanted = {id(obj) for obj in originals}
    found: dict[int, list[types.ModuleType]] = {key: [] for key in wanted}
    for module_name, module in list(sys.modules.items()):
        if not (module_name == "deepspeed" or module_name.startswith("deepspeed.")):
            continue
        if not isinstance(module, types.ModuleType) or any(module is s for s in skip):
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        seen: set[int] = set()
        for value in values:
            key = id(value)
            if key in wanted and key not in seen:
                seen.add(key)
                found[key].append(module)
    return found


def _patch_module(
    ledger: Any,
    module: types.ModuleType,
    table: dict[str, Callable[..., Any]],
    skip: tuple[types.ModuleType, ...],
) -> dict[str, Any]:
    """Patch ``table``'s names in ``module`` and every other binding of them; return the originals."""
    originals = {name: _require(module, name) for name in table}
    replacements = {name: _scoped(module.__name__, name, originals[name], table[name]) for name in table}
    elsewhere = _binding_modules(list(originals.values()), skip)
    for name in table:
        ledger.patch(OWNER, module, name, replacements[name])
    done: set[int] = set()
    for name in table:
        original = originals[name]
        if id(original) in done:
            continue  # an in-module alias (parallel_state_sp's get_model_parallel_*): patched by name
        done.add(id(original))
        ledger.patch_aliases(OWNER, original, replacements[name], elsewhere[id(original)])
    return originals


# ---------------------------------------------------------------------- ZeRO-3 partition group


class _ZeroPartitionView:
    """A state seen by ZeRO-3's parameter conversion: its data-parallel group is SP x DP.

    ``DeepSpeedZeRoOffload._convert_to_zero_parameters`` partitions parameters over
    ``mpu.get_data_parallel_group()`` while the engine reduces their gradients over the
    sequence-data-parallel group. For a state with SP > 1 those differ (DP excludes the
    SP ranks, for DeepSpeed's batch math), which silently corrupts gradients. Everything
    else, batch math included, is the state's own answer.
    """

    def __init__(self, state: Any) -> None:
        self._state = state

    def get_data_parallel_group(self) -> Any:
        return self._state.get_sequence_data_parallel_group()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def _scoped_convert_to_zero_parameters(original: Any) -> Any:
    @functools.wraps(original)
    def convert(self: Any, ds_config: Any, module: Any, mpu: Any) -> Any:
        if type(mpu) is _state_class() and mpu.get_sequence_parallel_world_size() > 1:
            mpu = _ZeroPartitionView(mpu)
        return original(self, ds_config, module, mpu)

    return convert


def install(ledger: Any) -> None:
    """Re-point DeepSpeed's global parallel state at the active scope (see the module doc)."""
    import deepspeed
    import deepspeed.comm
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as parallel_state_sp
    import deepspeed.utils.bwc
    import deepspeed.utils.groups as groups

    _Mods.groups, _Mods.comm, _Mods.bwc = groups, deepspeed.comm, deepspeed.utils.bwc
    skip = (groups, parallel_state_sp)
    _ORIGINALS.update(_patch_module(ledger, groups, _GROUPS_IMPL, skip))
    _patch_module(ledger, parallel_state_sp, _SP_IMPL, skip)

    release = _require(groups, "_release_process_group_references")
    ledger.patch(OWNER, groups, "_release_process_group_references", _scoped_release(release))

    for name in ("mpu", "mesh_device"):
        _require(groups, name)
    ledger.swap_module_class(OWNER, groups, _scoped_module_class(type(groups)))

    import deepspeed.runtime.zero.parameter_offload as parameter_offload

    offload = _require(parameter_offload, "DeepSpeedZeRoOffload")
    convert = _require(offload, "_convert_to_zero_parameters")
    ledger.patch(OWNER, offload, "_convert_to_zero_parameters", _scoped_convert_to_zero_parameters(convert))

    initialize = _require(deepspeed, "initialize")
    replacement = _scoped_initialize(initialize)
    ledger.patch(OWNER, deepspeed, "initialize", replacement)
    ledger.patch_aliases(
        OWNER, initialize, replacement, _binding_modules([initialize], (deepspeed,))[id(initialize)]
    )


def uninstall() -> None:
    """Forget the originals (the ledger restores every patched object by identity).

    Per-state records stay with their states, so a state keeps the groups DeepSpeed
    created for it if the adapters are installed again.
    """
    _ORIGINALS.clear()
