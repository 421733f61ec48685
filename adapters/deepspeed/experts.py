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
  ``_create_expert_data_and_model_parallel``) called inside a scope first compute, as
  pure rank math (``expert_and_data_groups()``, ``expert_data_and_model_groups()``),
  every EP and EDP group DeepSpeed's own rule gives for that call: from the creator's
  arguments (``ep_size``, ``mp_size``/``pp_size``/``mp_mode``,
  ``use_data_before_expert_parallel_``), the TP size of the ``mpu`` argument and the PP
  size of that mpu (the legacy creator: its ``pp_size``, else the scope's ``groups.mpu``,
  a ParallelState, a compat handle or a hand-written mpu; ``None`` counts as size 1),
  over the state's ranks as DeepSpeed's world (for a state spanning the world, exactly
  the groups vanilla DeepSpeed builds). Sizes DeepSpeed would reject raise
  :class:`~scoped_parallel.errors.LayoutError` (``NotImplementedError`` cases:
  :class:`~scoped_parallel.errors.UnsupportedSetupError`) before any group exists, on
  every rank alike. Then, for each of the two families DeepSpeed would create (it skips
  a name its dicts hold, with its own rules per creator):

  - **adopt**: where DeepSpeed's groups of that family are exactly the state's own
    ``ep`` (resp. ``edp``) groups, every group of the layout compared as a rank set, the
    state's group is used and nothing is created;
  - **derive**: otherwise this rank's group of DeepSpeed's layout is created through
    ``state.derived_groups("deepspeed-moe", ...)``: member-only, shared with an
    identical group that already exists (for TP=2 x EP=2 with expert TP 2, DeepSpeed's
    EP groups are the state's ``tp`` groups and its EDP groups the ``dp`` groups),
    released by ``state.destroy()``, no module global touched.

  So a TP=2 x EP=2 state (expert TP 2: EP (0,2),(1,3), single-rank EDP groups) gets
  DeepSpeed's EP (0,1),(2,3) and EDP (0,2),(1,3) for a MoE layer that does not shard its
  experts over TP, as vanilla DeepSpeed with a TP=2 mpu does; with
  ``expert_tensor_parallel_size=1`` the state's groups are DeepSpeed's and are adopted.
  Where derived groups cannot be created (a default group bound to a device), a state
  spanning the world runs DeepSpeed's creator with the module globals temporarily bound
  to the record's dicts (``Ledger.swapped``; other threads reading those globals
  meanwhile see them), and any other state is refused with ``UnsupportedSetupError``
  naming both layouts. An AutoEP folding spec with ``mp_size > 1`` always runs
  DeepSpeed's creator that way (a state not spanning the world: ``LayoutError``).

DeepSpeed's ``_release_process_group_references`` also drops what the records hold
for a destroyed group (see ``_records.scoped_release``).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from scoped_parallel.adapters.deepspeed._records import Record, mpu_of, record_of
from scoped_parallel.adapters.deepspeed._shared import (
    GROUPS_IMPL,
    ORIGINALS,
    OWNER,
    Mods,
    impl,
    spans_world,
)
from scoped_parallel.errors import LayoutError, UnsupportedSetupError, describe_state

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


# ---------------------------------------------------------------------- DeepSpeed's rule, as rank math

#: the ``derived_groups`` purpose of the expert groups DeepSpeed's rule asks for and the state lacks
DERIVED_PURPOSE = "deepspeed-moe"
#: the two creators, by the names ``groups`` gives them
EXPERT_AND_DATA = "_create_expert_and_data_parallel"
EXPERT_DATA_AND_MODEL = "_create_expert_data_and_model_parallel"


class ExpertGroups(NamedTuple):
    """Every expert-parallel and expert-data-parallel group one creator call builds.

    Each group lists its ranks in the order DeepSpeed records them (its ``_RANKS``
    dicts); the process group over them is the same whatever the order.
    """

    ep: tuple[tuple[int, ...], ...]
    edp: tuple[tuple[int, ...], ...]

    def of(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``rank``'s EP group and EDP group."""
        (ep,) = (group for group in self.ep if rank in group)
        (edp,) = (group for group in self.edp if rank in group)
        return ep, edp


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise LayoutError(f"DeepSpeed's MoE expert groups cannot be built: {problem}")


def _checked(ep: list[Any], edp: list[Any], world_size: int, first_rank: int) -> ExpertGroups:
    """The groups shifted to ``first_rank``, checked to cut the ranks into EP and into EDP groups."""
    every = list(range(world_size))
    for family, groups in (("expert parallel", ep), ("expert data parallel", edp)):
        covered = sorted(rank for group in groups for rank in group)
        _require(
            covered == every,
            f"DeepSpeed's rule would give the {family} groups {[list(g) for g in groups]}, which do not hold "
            f"each of the {world_size} ranks exactly once",
        )
    shift = lambda groups: tuple(tuple(first_rank + rank for rank in group) for group in groups)  # noqa: E731
    return ExpertGroups(shift(ep), shift(edp))


def expert_and_data_groups(
    world_size: int,
    ep_size: int,
    *,
    mp_size: int | None = None,
    pp_size: int = 1,
    mp_mode: str = "tp",
    data_before_expert: bool = False,
    first_rank: int = 0,
) -> ExpertGroups:
    """The groups of ``groups._create_expert_and_data_parallel`` (without an AutoEP folding spec).

    ``world_size`` ranks from ``first_rank``; ``pp_size`` is the pipeline size it resolves
    (its ``pp_size`` argument, else the mpu's). Raises :class:`LayoutError` where
    DeepSpeed would fail its divisibility assertion or leave a rank without a group, and
    :class:`UnsupportedSetupError` where it raises ``NotImplementedError``.
    """
    _require(pp_size > 0 and world_size % pp_size == 0, f"pipeline size {pp_size} does not divide {world_size} ranks")
    stage = world_size // pp_size  # ranks per pipeline stage
    _require(
        ep_size > 0 and stage % ep_size == 0, f"ep_size {ep_size} does not divide the {stage} ranks of a pipeline stage"
    )
    starts = range(0, world_size, stage)
    mp = 1 if mp_size is None else mp_size
    if mp <= 1:
        # consecutive ordering: EP blocks of ep_size, EDP strided by ep_size (or, data before
        # expert, EDP blocks of stage/ep_size and EP strided by that)
        block = stage // ep_size
        if data_before_expert:
            edp = [range(s + i * block, s + (i + 1) * block) for s in starts for i in range(ep_size)]
            ep = [range(s + i, s + stage, block) for s in starts for i in range(block)]
        else:
            edp = [range(s + i, s + stage, ep_size) for s in starts for i in range(ep_size)]
            ep = [range(i, i + ep_size) for i in range(0, world_size, ep_size)]
        return _checked(ep, edp, world_size, first_rank)
    if data_before_expert:
        raise UnsupportedSetupError(
            f"DeepSpeed's _create_expert_and_data_parallel(mp_size={mp_size}) does not support "
            "use_data_before_expert_parallel_ (DeepSpeed raises NotImplementedError): turn it off in the config"
        )
    _require(stage % mp == 0, f"mp_size {mp} does not divide the {stage} ranks of a pipeline stage")
    ep, edp = [], []
    for s in starts:
        if mp_mode == "tp":  # lanes of equal TP rank first: each lane's ranks, then the next lane's
            ordered = [s + lane + mp * g for lane in range(mp) for g in range(stage // mp)]
        else:
            ordered = list(range(s, s + stage))
        blocks = [ordered[i : i + ep_size] for i in range(0, stage, ep_size)]
        ep += blocks
        edp += [[b[pos] for b in blocks] for pos in range(ep_size)]
    return _checked(ep, edp, world_size, first_rank)


def expert_data_and_model_groups(
    world_size: int,
    ep_size: int,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    data_before_expert: bool = False,
    first_rank: int = 0,
) -> ExpertGroups:
    """The groups of ``groups._create_expert_data_and_model_parallel`` (expert tensor parallelism).

    Each pipeline stage's data-parallel lanes (one per TP rank) are cut into EP blocks of
    ``ep_size``; the ranks at one position of those blocks form an EDP group.
    """
    _require(tp_size > 0 and pp_size > 0, f"sizes tp={tp_size}, pp={pp_size} must be positive")
    _require(world_size % (tp_size * pp_size) == 0, f"tp {tp_size} x pp {pp_size} does not divide {world_size} ranks")
    dp = world_size // (tp_size * pp_size)
    _require(ep_size > 0 and dp % ep_size == 0, f"ep_size {ep_size} does not divide the data parallel size {dp}")
    stage = world_size // pp_size
    lanes: list[list[int]] = []
    for s in range(0, world_size, stage):
        for t in range(tp_size):
            if data_before_expert:
                # interleave: every (stride)-th lane rank first, then the next offset
                stride = dp // ep_size
                lanes.append([s + t + tp_size * (d + stride * k) for d in range(stride) for k in range(ep_size)])
            else:
                lanes.append([s + t + tp_size * k for k in range(dp)])
    ep, edp = [], []
    for lane in lanes:
        blocks = [lane[i : i + ep_size] for i in range(0, dp, ep_size)]
        ep += blocks
        edp += [list(column) for column in zip(*blocks)]
    return _checked(ep, edp, world_size, first_rank)


def _format(groups: Any, limit: int = 8) -> str:
    shown = ", ".join(str(tuple(g)) for g in list(groups)[:limit])
    return shown + (f", ... ({len(groups)} groups)" if len(groups) > limit else "")


# ---------------------------------------------------------------------- creators


def _bound_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The creator's arguments by parameter name, defaults included."""
    bound = inspect.signature(ORIGINALS[name]).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _pp_size(mpu: Any) -> int:
    return 1 if mpu is None else int(Mods.bwc.bwc_pipeline_parallel_world_size(mpu))


def _same_groups(wanted: Any, state_groups: Any) -> bool:
    def normal(groups: Any) -> set[tuple[int, ...]]:
        return {tuple(sorted(group)) for group in groups}

    return normal(wanted) == normal(state_groups)


def _run_creator_on_state_dicts(state: Any, rec: Record, name: str, args: Any, kwargs: Any) -> Any:
    """Run DeepSpeed's creator with the module globals bound to the state's record.

    DeepSpeed then creates every group of its layout over the whole world (collectively,
    not shared, not released by ``state.destroy()``), so the state must span the world.
    """
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


def _refuse_without_derived_groups(state: Any, name: str, ep_size: int, wanted: ExpertGroups, why: str) -> None:
    raise UnsupportedSetupError(
        f"DeepSpeed's {name}(ep_size={ep_size}) inside the scope of {describe_state(state)}: DeepSpeed "
        f"builds the expert parallel groups {_format(wanted.ep)} and expert data parallel groups "
        f"{_format(wanted.edp)}, but the state's are {_format(state.layout.groups('ep'))} and "
        f"{_format(state.layout.groups('edp'))}, and DeepSpeed's cannot be created for it: {why}. Build the "
        f"state so that its expert groups are DeepSpeed's (e.g. expert_model_parallel_size={ep_size} with "
        "expert_tensor_parallel_size=1: DeepSpeed's MoE layer does not shard experts over TP unless "
        "enable_expert_tensor_parallelism is set), or initialize the default group without device_id."
    )


def _create(state: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One creator call in ``state``'s scope (see the module doc for the rule)."""
    arguments = _bound_arguments(name, args, kwargs)
    ep_size = next(iter(arguments.values()))
    data_before_expert = bool(arguments.get("use_data_before_expert_parallel_"))
    rec = record_of(state)
    key = f"ep_size_{ep_size}"
    layout = state.layout
    span = {"world_size": layout.world_size, "first_rank": layout.rank_offset}
    if name == EXPERT_DATA_AND_MODEL:
        mpu = arguments.get("mpu")
        tp_size = int(Mods.bwc.bwc_tensor_model_parallel_world_size(mpu))
        rec.expert_tp_world_size = tp_size  # set on every call, as DeepSpeed does
        if key in rec.ep or key in rec.edp:
            return None
        dp_size = Mods.groups._get_data_parallel_world_size()
        _require(
            dp_size is None or (ep_size > 0 and dp_size % ep_size == 0),
            f"ep_size {ep_size} does not divide the data parallel size {dp_size} of the scope's mpu",
        )
        wanted = expert_data_and_model_groups(
            ep_size=ep_size, tp_size=tp_size, pp_size=_pp_size(mpu), data_before_expert=data_before_expert, **span
        )
        need = {"ep": True, "edp": True}
    else:
        mp_size = arguments.get("mp_size")
        if (mp_size or 1) > 1 and arguments.get("folding_spec") is not None:
            # AutoEP+AutoTP folding tables: DeepSpeed's own creator, on the state's dicts
            if not spans_world(state):
                raise LayoutError(
                    f"DeepSpeed's AutoEP folding groups (ep_size={ep_size}) inside the scope of "
                    f"{describe_state(state)}, which does not span the whole world: DeepSpeed builds them over "
                    "every rank. Use a state spanning the world for the AutoEP model."
                )
            return _run_creator_on_state_dicts(state, rec, name, args, kwargs)
        pp_size = arguments.get("pp_size")
        wanted = expert_and_data_groups(
            ep_size=ep_size,
            mp_size=mp_size,
            pp_size=_pp_size(mpu_of(state)) if pp_size is None else pp_size,
            mp_mode=arguments.get("mp_mode", "tp"),
            data_before_expert=data_before_expert,
            **span,
        )
        if (mp_size or 1) > 1:  # DeepSpeed builds both unless the EP group exists
            need = dict.fromkeys(("ep", "edp"), key not in rec.ep)
        else:
            need = {"ep": key not in rec.ep, "edp": key not in rec.edp}
    kinds = [kind for kind, needed in need.items() if needed]
    if not kinds:
        return None
    mine = dict(zip(("ep", "edp"), wanted.of(state.rank)))
    families = {"ep": wanted.ep, "edp": wanted.edp}
    groups = {kind: state.group(kind) for kind in kinds if _same_groups(families[kind], layout.groups(kind))}
    derive = [kind for kind in kinds if kind not in groups]
    if derive:
        try:
            made = state.derived_groups(DERIVED_PURPOSE, [mine[kind] for kind in derive])
        except UnsupportedSetupError as err:  # raised on every rank alike, before any group
            if not spans_world(state):
                _refuse_without_derived_groups(state, name, ep_size, wanted, str(err))
            return _run_creator_on_state_dicts(state, rec, name, args, kwargs)
        groups.update(zip(derive, made))
    tables = {"ep": (rec.ep, rec.ep_ranks), "edp": (rec.edp, rec.edp_ranks)}
    for kind in kinds:
        group_table, ranks_table = tables[kind]
        group_table[key] = groups[kind]
        ranks_table[key] = list(mine[kind])
    return None


@impl(GROUPS_IMPL, EXPERT_AND_DATA)
def create_expert_and_data_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    return _create(state, EXPERT_AND_DATA, args, kwargs)


@impl(GROUPS_IMPL, EXPERT_DATA_AND_MODEL)
def create_expert_data_and_model_parallel(state: Any, *args: Any, **kwargs: Any) -> Any:
    return _create(state, EXPERT_DATA_AND_MODEL, args, kwargs)
