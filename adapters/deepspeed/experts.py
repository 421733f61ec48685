"""MoE expert groups of ``deepspeed.utils.groups``, kept per state.

DeepSpeed keeps every expert group in module-global dicts
(``_EXPERT_PARALLEL_GROUP``, ``_EXPERT_DATA_PARALLEL_GROUP`` and their ``_RANKS``
dicts, keyed ``ep_size_N``) plus ``expert_tensor_parallel_world_size``, so a second
MoE model with the same ``ep_size`` reuses the first model's groups. Here each
state's record holds its own dicts and size:

* the readers (``_get_expert_*``, ``_get_max_expert_*``,
  ``_get_expert_model_parallel_world_size``) answer from the active state's record;
  the ``*_dict()`` getters return the record's dict objects, so an engine built in a
  scope captures its state's dicts;
* the creators (``_create_expert_and_data_parallel``,
  ``_create_expert_data_and_model_parallel``) asked for ``ep_size_N`` inside a scope
  *adopt the state's own* ``ep`` and ``edp`` groups when N is the state's
  ``expert_model_parallel_size`` (and no AutoEP folding spec or data-before-expert
  ordering is requested): the state is the authority on the layout and nothing is
  created. Otherwise DeepSpeed's creator runs with the module globals temporarily
  bound to the record's dicts (``Ledger.swapped``; other threads reading those
  globals meanwhile see them), which needs a state spanning the whole world because
  DeepSpeed builds groups over all ranks.

DeepSpeed's ``_release_process_group_references`` also drops what the records hold
for a destroyed group (see ``_records.scoped_release``).
"""

from __future__ import annotations

import inspect
from typing import Any

from scoped_parallel.adapters.deepspeed._records import Record, mpu_of, record_of
from scoped_parallel.adapters.deepspeed._shared import (
    GROUPS_IMPL,
    ORIGINALS,
    OWNER,
    Mods,
    impl,
    spans_world,
)
from scoped_parallel.errors import LayoutError, describe_state

#: DeepSpeed's module global -> the record field holding the state's own value
EXPERT_GLOBALS = (
    ("_EXPERT_PARALLEL_GROUP", "ep"),
    ("_EXPERT_PARALLEL_GROUP_RANKS", "ep_ranks"),
    ("_EXPERT_DATA_PARALLEL_GROUP", "edp"),
    ("_EXPERT_DATA_PARALLEL_GROUP_RANKS", "edp_ranks"),
    ("expert_tensor_parallel_world_size", "expert_tp_world_size"),
)


def _lookup(table: dict[str, Any], name: str, what: str, state: Any) -> Any:
    if name not in table:
        raise AssertionError(
            f"{what} {name!r} is not initialized for {describe_state(state)} (it has {sorted(table)}); "
            "create the MoE layers / engine inside this state's scope"
        )
    return table[name]


@impl(GROUPS_IMPL, "_get_expert_parallel_group")
def ep_group(state: Any, group_name: str) -> Any:
    return _lookup(record_of(state).ep, group_name, "expert parallel group", state)


@impl(GROUPS_IMPL, "_get_expert_parallel_group_ranks")
def ep_group_ranks(state: Any, group_name: str) -> Any:
    return _lookup(record_of(state).ep_ranks, group_name, "expert parallel group", state)


@impl(GROUPS_IMPL, "_get_expert_parallel_group_dict")
def ep_dict(state: Any) -> dict[str, Any]:
    return record_of(state).ep


@impl(GROUPS_IMPL, "_get_expert_data_parallel_group")
def edp_group(state: Any, group_name: str) -> Any:
    return _lookup(record_of(state).edp, group_name, "expert data parallel group", state)


@impl(GROUPS_IMPL, "_get_expert_data_parallel_group_ranks")
def edp_group_ranks(state: Any, group_name: str) -> Any:
    return _lookup(record_of(state).edp_ranks, group_name, "expert data parallel group", state)


@impl(GROUPS_IMPL, "_get_expert_data_parallel_group_dict")
def edp_dict(state: Any) -> dict[str, Any]:
    return record_of(state).edp


@impl(GROUPS_IMPL, "_get_max_expert_size")
def max_expert_size(state: Any) -> int | None:
    sizes = [int(key.rsplit("_", 1)[-1]) for key in record_of(state).ep]
    return max(sizes) if sizes else None


@impl(GROUPS_IMPL, "_get_max_expert_size_name")
def max_expert_size_name(state: Any) -> str:
    return f"ep_size_{max_expert_size(state)}"


@impl(GROUPS_IMPL, "_get_max_expert_parallel_group")
def max_ep_group(state: Any) -> Any:
    return ep_group(state, max_expert_size_name(state))


@impl(GROUPS_IMPL, "_get_expert_broadcast_src_rank")
def expert_broadcast_src_rank(state: Any, group_name: str) -> int:
    return Mods.comm.get_global_rank(edp_group(state, group_name), 0)  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_parallel_world_size")
def ep_world_size(state: Any, group_name: str) -> int:
    return Mods.comm.get_world_size(group=ep_group(state, group_name))  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_data_parallel_world_size")
def edp_world_size(state: Any, group_name: str) -> int:
    return Mods.comm.get_world_size(group=edp_group(state, group_name))  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_parallel_rank")
def ep_rank(state: Any, group_name: str) -> int:
    return Mods.comm.get_rank(group=ep_group(state, group_name))  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_parallel_src_rank")
def ep_src_rank(state: Any, group_name: str) -> int:
    # DeepSpeed computes this arithmetically for contiguous groups; the group's first
    # member is the same answer there and the right one for strided state groups.
    return Mods.comm.get_global_rank(ep_group(state, group_name), 0)  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_data_parallel_rank")
def edp_rank(state: Any, group_name: str) -> int:
    return Mods.comm.get_rank(group=edp_group(state, group_name))  # type: ignore[no-any-return]


@impl(GROUPS_IMPL, "_get_expert_model_parallel_world_size")
def expert_tp_world_size(state: Any) -> int:
    return record_of(state).expert_tp_world_size


# ---------------------------------------------------------------------- creators


def _bound_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The creator's arguments by parameter name, defaults included."""
    bound = inspect.signature(ORIGINALS[name]).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _adopt_state_groups(state: Any, rec: Record, group_name: str) -> None:
    if group_name not in rec.ep:
        rec.ep[group_name] = state.get_expert_model_parallel_group()
        rec.ep_ranks[group_name] = list(state.ranks("ep"))
    if group_name not in rec.edp:
        rec.edp[group_name] = state.get_expert_data_parallel_group()
        rec.edp_ranks[group_name] = list(state.ranks("edp"))


def _run_creator_on_state_dicts(
    state: Any, rec: Record, name: str, ep_size: int, args: Any, kwargs: Any
) -> Any:
    """Run DeepSpeed's creator with the module globals bound to the state's record."""
    if not spans_world(state):
        raise LayoutError(
            f"DeepSpeed asked for expert parallel size {ep_size} inside the scope of {describe_state(state)}, "
            f"whose expert_model_parallel_size is {state.get_expert_model_parallel_world_size()} and "
            "which does not span the whole world, so DeepSpeed cannot build the groups itself. Build "
            f"the state with expert_model_parallel_size={ep_size}."
        )
    values = {global_name: getattr(rec, field) for global_name, field in EXPERT_GLOBALS}
    values["mpu"] = mpu_of(state)  # the legacy creator reads the pipeline size from it
    after: dict[str, Any] = {}
    try:
        with Mods.ledger.swapped(OWNER, Mods.groups, values) as after:
            return ORIGINALS[name](*args, **kwargs)
    finally:
        if after:  # filled when the swap ends: keep what the creator made
            for global_name, field in EXPERT_GLOBALS:
                setattr(rec, field, after[global_name])


@impl(GROUPS_IMPL, "_create_expert_and_data_parallel")
def create_expert_and_data_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    name = "_create_expert_and_data_parallel"
    arguments = _bound_arguments(name, args, kwargs)
    ep_size = next(iter(arguments.values()))
    rec = record_of(state)
    adopt = (
        ep_size == state.get_expert_model_parallel_world_size()
        and not arguments.get("use_data_before_expert_parallel_")
        and arguments.get("folding_spec") is None
    )
    if adopt:
        _adopt_state_groups(state, rec, f"ep_size_{ep_size}")
        return None
    return _run_creator_on_state_dicts(state, rec, name, ep_size, args, kwargs)


@impl(GROUPS_IMPL, "_create_expert_data_and_model_parallel")
def create_expert_data_and_model_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    name = "_create_expert_data_and_model_parallel"
    arguments = _bound_arguments(name, args, kwargs)
    ep_size = next(iter(arguments.values()))
    rec = record_of(state)
    adopt = ep_size == state.get_expert_model_parallel_world_size() and not arguments.get(
        "use_data_before_expert_parallel_"
    )
    if adopt:
        rec.expert_tp_world_size = Mods.bwc.bwc_tensor_model_parallel_world_size(arguments.get("mpu"))
        _adopt_state_groups(state, rec, f"ep_size_{ep_size}")
        return None
    return _run_creator_on_state_dicts(state, rec, name, ep_size, args, kwargs)
