"""``deepspeed.utils.groups``' readers of ``mpu`` and ``mesh_device``, per scope.

DeepSpeed answers ``_get_data_parallel_*``, ``_get_model_parallel_world_size``,
``_get_sequence_parallel_*``, ``_get_sequence_data_parallel_*`` and
``_get_broadcast_src_rank`` from two module globals: the ``mpu`` handed to
``deepspeed.initialize`` (last writer wins) and a ``mesh_device``. Inside a scope
these implementations apply DeepSpeed's own decision rules to the *scope's* mpu
and mesh instead:

* the scope's mpu is whatever was assigned to ``groups.mpu`` inside a scope of that
  state (the engine does so in ``deepspeed.initialize(mpu=...)``), else the state
  itself (a complete mpu);
* the scope's mesh is ``None`` unless one was assigned inside that scope.

The argument-free readers are memoized per state (their answers depend only on the
state and on that mpu and mesh; the record forgets them when either changes), which
is what keeps a patched getter cheaper than DeepSpeed's own.

Code inside ``groups.py`` reads ``mpu`` from its module ``__dict__`` directly; that
is why these readers are patched as functions and not only through
``module_attrs``.
"""

from __future__ import annotations

from typing import Any

from scoped_parallel.errors import describe_state
from scoped_parallel.adapters.deepspeed._records import mpu_of, record_of
from scoped_parallel.adapters.deepspeed._shared import GROUPS_IMPL, Mods, impl, is_sp_only


@impl(GROUPS_IMPL, "_get_data_parallel_group", memoize=True)
def dp_group(state: Any) -> Any:
    rec = record_of(state)
    if rec.mesh_device is not None:
        return rec.mesh_device.get_group(mesh_dim="data_parallel")
    mpu = mpu_of(state)
    if mpu is None:
        return Mods.groups._clone_world_group()
    if is_sp_only(mpu):
        return None
    return mpu.get_data_parallel_group()


@impl(GROUPS_IMPL, "_get_data_parallel_group_ranks")
def dp_group_ranks(state: Any) -> Any:
    mpu = mpu_of(state)
    if mpu is None:
        return range(Mods.comm.get_world_size())
    return mpu.get_data_parallel_group_ranks()


@impl(GROUPS_IMPL, "_get_data_parallel_world_size", memoize=True)
def dp_world_size(state: Any) -> Any:
    rec = record_of(state)
    mpu = mpu_of(state)
    if rec.mesh_device is not None:
        return Mods.comm.get_world_size(rec.mesh_device.get_group(mesh_dim="data_parallel"))
    if mpu is not None:
        return None if is_sp_only(mpu) else mpu.get_data_parallel_world_size()
    return Mods.comm.get_world_size(group=dp_group(state))


@impl(GROUPS_IMPL, "_get_data_parallel_rank", memoize=True)
def dp_rank(state: Any) -> int:
    return Mods.comm.get_rank(group=dp_group(state))  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_model_parallel_world_size", memoize=True)
def mp_world_size(state: Any) -> int:
    mpu = mpu_of(state)
    if mpu is None or is_sp_only(mpu):
        return 1
    return mpu.get_model_parallel_world_size()  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_sequence_parallel_world_size", memoize=True)
def sp_world_size(state: Any) -> int:
    rec = record_of(state)
    mpu = mpu_of(state)
    if rec.mesh_device is not None:
        return Mods.comm.get_world_size(rec.mesh_device.get_group(mesh_dim="sequence_parallel"))  # type: ignore[no-any-return]
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_world_size"):
        return mpu.get_sequence_parallel_world_size()  # type: ignore[no-any-return]
    return 1


@impl(GROUPS_IMPL, "_get_sequence_parallel_rank", memoize=True)
def sp_rank(state: Any) -> int:
    rec = record_of(state)
    mpu = mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_rank"):
        return mpu.get_sequence_parallel_rank()  # type: ignore[no-any-return]
    if rec.mesh_device is not None:
        return Mods.comm.get_rank(rec.mesh_device.get_group(mesh_dim="sequence_parallel"))  # type: ignore[no-any-return]
    return 0


@impl(GROUPS_IMPL, "_get_sequence_parallel_group", memoize=True)
def sp_group(state: Any) -> Any:
    rec = record_of(state)
    mpu = mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_parallel_group"):
        return mpu.get_sequence_parallel_group()
    if rec.mesh_device is not None:
        return rec.mesh_device.get_group(mesh_dim="sequence_parallel")
    raise KeyError(f"no sequence parallel group: the mpu of {describe_state(state)} has none and no mesh was set")


@impl(GROUPS_IMPL, "_get_sequence_data_parallel_world_size", memoize=True)
def sdp_world_size(state: Any) -> Any:
    mpu = mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_world_size"):
        return mpu.get_sequence_data_parallel_world_size()
    return dp_world_size(state)


@impl(GROUPS_IMPL, "_get_sequence_data_parallel_rank", memoize=True)
def sdp_rank(state: Any) -> int:
    mpu = mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_rank"):
        return mpu.get_sequence_data_parallel_rank()  # type: ignore[no-any-return]
    return dp_rank(state)


@impl(GROUPS_IMPL, "_get_sequence_data_parallel_group", memoize=True)
def sdp_group(state: Any) -> Any:
    mpu = mpu_of(state)
    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_group"):
        return mpu.get_sequence_data_parallel_group()
    return dp_group(state)


@impl(GROUPS_IMPL, "_get_broadcast_src_rank")
def broadcast_src_rank(state: Any) -> int:
    return Mods.comm.get_global_rank(sdp_group(state), 0)  # type: ignore[no-any-return]
