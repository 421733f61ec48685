"""ZeRO++ groups of ``deepspeed.utils.groups`` (hpZ and qgZ all-to-all), per state.

DeepSpeed keeps one hpZ secondary-partition group (``_ZERO_PARAM_INTRA_PARALLEL_GROUP``,
created once by ``_create_zero_param_parallel_group``, which asserts on a second call)
and one dict of all-to-all groups (``_ALL_TO_ALL_GROUP``, filled by
``_get_local_all_to_all_group``), both cut from the whole world. A second model with
another layout or another ``zero_hpz_partition_size`` gets the first model's groups, or
an assertion. Inside a scope:

* ``_create_zero_param_parallel_group(n)`` cuts the state's ZeRO data-parallel ranks
  (its sequence-data-parallel group, the group ZeRO shards over) into consecutive
  blocks of ``min(n, size)`` ranks and creates this rank's block through the state
  (:meth:`~scoped_parallel.ParallelState.derived_groups`: member-only, shared when
  the ranks match an existing group, released by ``state.destroy()``). For a model
  whose data-parallel group is the world these are exactly DeepSpeed's blocks.
  Calling it again with the same size is a no-op; another size raises
  :class:`~scoped_parallel.errors.LayoutError`, as does a size that does not divide
  the data-parallel size (before any group is created).
* ``_get_zero_param_intra_parallel_group`` and its ``_ranks``, ``_world_size`` and
  ``_rank_in_mygroup`` companions answer from the state (``None`` before creation, as
  in DeepSpeed); ``_zero_param_parallel_is_initialized`` returns whether the state has
  its hpZ group (DeepSpeed's returns ``False`` or ``None``).
* ``_get_local_all_to_all_group()`` returns the state's dict, creating it on first
  use: ``local_<node>`` holds the state's data-parallel ranks on this rank's node and,
  when they span several nodes, ``global_<local rank>`` holds those at this rank's
  position on every node, under the keys DeepSpeed's ``all_to_all_quant_reduce``
  looks up. Only this rank's own groups are in the dict (member-only creation).

Nodes: a node holds ``LOCAL_WORLD_SIZE`` consecutive ranks (set by ``torchrun`` and
the DeepSpeed launcher), else the accelerator's ``device_count()`` (DeepSpeed's own
rule). ``LOCAL_WORLD_SIZE`` wins because on the CPU accelerator ``device_count()``
counts NUMA nodes, not processes per node.
"""

from __future__ import annotations

import os
from typing import Any

from scoped_parallel.adapters.deepspeed._records import record_of
from scoped_parallel.adapters.deepspeed._shared import GROUPS_IMPL, Mods, impl
from scoped_parallel.errors import LayoutError, describe_state

#: the ``derived_groups`` purposes of the two ZeRO++ families
HPZ, ALL_TO_ALL = "zero-hpz", "zero-all-to-all"


def zero_ranks(state: Any) -> tuple[int, ...]:
    """The ranks ZeRO shards over in ``state``: its sequence-data-parallel group."""
    return state.ranks("sp-dp")  # type: ignore[no-any-return]


def hpz_block(state: Any, group_size: Any) -> tuple[int, ...]:
    """This rank's hpZ block of ``state`` for ``zero_hpz_partition_size = group_size``."""
    ranks = zero_ranks(state)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise LayoutError(
            f"zero_hpz_partition_size must be a positive int, got {group_size!r}; set it in the "
            "ZeRO section of the DeepSpeed config (1 turns hpZ off)"
        )
    size = min(group_size, len(ranks))
    if len(ranks) % size:
        raise LayoutError(
            f"zero_hpz_partition_size={group_size} does not divide the ZeRO data-parallel size "
            f"{len(ranks)} of {describe_state(state)} (ranks {ranks}); use a divisor of {len(ranks)}"
        )
    at = ranks.index(state.rank) // size * size
    return ranks[at : at + size]


@impl(GROUPS_IMPL, "_create_zero_param_parallel_group")
def create_hpz(state: Any, group_size: Any) -> None:
    rec = record_of(state)
    block = hpz_block(state, group_size)
    if rec.hpz is not None:
        if rec.hpz_ranks != block:
            raise LayoutError(
                f"the hpZ group of {describe_state(state)} already exists with {len(rec.hpz_ranks)} ranks "
                f"{rec.hpz_ranks}; zero_hpz_partition_size={group_size} asks for {block}. Give every "
                "engine of one state the same zero_hpz_partition_size, or build another state"
            )
        return
    (rec.hpz,) = state.derived_groups(HPZ, [block])
    rec.hpz_ranks = block


@impl(GROUPS_IMPL, "_get_zero_param_intra_parallel_group")
def hpz_group(state: Any) -> Any:
    return record_of(state).hpz


@impl(GROUPS_IMPL, "_zero_param_parallel_is_initialized")
def hpz_initialized(state: Any) -> bool:
    return record_of(state).hpz is not None


@impl(GROUPS_IMPL, "_get_zero_param_intra_parallel_rank_in_mygroup")
def hpz_rank(state: Any) -> int:
    return Mods.comm.get_rank(group=record_of(state).hpz)  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_zero_param_intra_parallel_group_world_size")
def hpz_world_size(state: Any) -> int:
    return Mods.comm.get_world_size(group=record_of(state).hpz)  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_zero_param_intra_parallel_group_ranks")
def hpz_ranks(state: Any) -> Any:
    rec = record_of(state)
    if rec.hpz is None:
        return Mods.comm.get_all_ranks_from_group(group=None)
    return list(rec.hpz_ranks)


def node_size() -> int:
    """Ranks per node: ``LOCAL_WORLD_SIZE``, else the accelerator's ``device_count()``."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "")
    if raw:
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if size < 1:
            raise LayoutError(f"LOCAL_WORLD_SIZE={raw!r} is not a positive int; set it to the processes per node")
    else:
        from deepspeed.accelerator import get_accelerator

        size = max(1, int(get_accelerator().device_count()))
    import torch.distributed as dist

    world = dist.get_world_size()
    if world % size and world > size:
        raise LayoutError(
            f"{world} ranks do not fill nodes of {size} ranks (LOCAL_WORLD_SIZE / device_count); "
            "launch the same number of processes on every node"
        )
    return size


def all_to_all_blocks(state: Any, per_node: int) -> dict[str, tuple[int, ...]]:
    """This rank's ZeRO++ all-to-all groups in ``state`` by DeepSpeed's key (see the module doc)."""
    ranks = zero_ranks(state)
    me = state.rank
    by_node: dict[int, list[int]] = {}
    for r in ranks:
        by_node.setdefault(r // per_node, []).append(r)
    node = me // per_node
    mine = tuple(by_node[node])
    blocks = {f"local_{node}": mine}
    if len(by_node) > 1:
        position = mine.index(me)
        sizes = {len(v) for v in by_node.values()}
        if len(sizes) != 1:
            raise LayoutError(
                f"the ZeRO data-parallel ranks {ranks} of {describe_state(state)} are spread unevenly over "
                f"nodes of {per_node} ranks ({ {n: tuple(v) for n, v in by_node.items()} }); qgZ's "
                "two-level all-to-all needs the same count on every node"
            )
        blocks[f"global_{me % per_node}"] = tuple(v[position] for _, v in sorted(by_node.items()))
    return blocks


def all_to_all_groups(state: Any) -> dict[str, Any]:
    """The state's all-to-all dict, created on first use (shared by the compat API)."""
    rec = record_of(state)
    if rec.all_to_all is None:
        blocks = all_to_all_blocks(state, node_size())
        groups = state.derived_groups(ALL_TO_ALL, list(blocks.values()))
        rec.all_to_all = dict(zip(blocks, groups))
    return rec.all_to_all


@impl(GROUPS_IMPL, "_get_local_all_to_all_group")
def local_all_to_all(state: Any) -> dict[str, Any]:
    return all_to_all_groups(state)
