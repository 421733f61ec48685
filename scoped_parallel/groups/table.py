"""One table of every group a state holds, and how a state gets it.

A ``GroupTable`` maps what a group *is* to a ``GroupEntry`` (its ranks, the
process group and this rank's index in it). Keys:

=======================  ======================================================
key                      what
=======================  ======================================================
``"tp"``, ``"dp-cp"``    a layout kind (canonical spelling, see ``layout.kinds``)
``"gloo:dp"``            the gloo twin of a kind or optional slot
``"opt:intra-dp-cp"``    one of Megatron's optional groups (``layout.optional``
                         slots); an optional group with the ranks of a kind
                         *is* that kind's group (no second communicator)
``"derived:hpz:0,1"``    a group an adapter derived from the layout (ZeRO++'s)
=======================  ======================================================

``build`` is the whole construction of a state's groups (plan, agreement with
the peers, creation by member-only requests or by splitting) and returns the table;
``GroupTable.release`` gives every group back (``ParallelState.destroy``).
Entries whose group another key already holds are not held twice.

Worked example on 8 ranks, ``tensor_model_parallel_size=2,
pipeline_model_parallel_size=2``, rank 5: ``table["tp"]`` is
``GroupEntry(ranks=(4, 5), group=<pg>, index=1)``, ``table["dp"].ranks`` is (5, 7),
and ``table["opt:dist-opt"]`` (Megatron's distributed-optimizer instance) spans all 8
ranks; with ``create_gloo_process_groups=True`` ``table["gloo:dp"]`` is a gloo group
over (5, 7).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import torch.distributed as dist

from scoped_parallel.errors import UnsupportedSetupError
from scoped_parallel.groups import create, split
from scoped_parallel.groups import torch_compat as compat
from scoped_parallel.groups.plan import StateSpec, agree_with_peers, construction_tag, plan_requests
from scoped_parallel.layout.grid import ParallelLayout
from scoped_parallel.layout.optional import UNSHARED_SLOTS, OptionalGroups, optional_ranks

__all__ = ["GroupEntry", "GroupTable", "build", "derive"]

GLOO = "gloo:"
OPTIONAL = "opt:"
DERIVED = "derived:"


class GroupEntry(NamedTuple):
    """One group of a state on this rank."""

    ranks: tuple[int, ...]
    group: Any
    index: int


class GroupTable:
    """Every group a state holds on this rank, keyed by what it is (see the module doc)."""

    __slots__ = ("entries", "_held")

    def __init__(self) -> None:
        #: key -> entry (see the module doc)
        self.entries: dict[str, GroupEntry] = {}
        self._held: list[Any] = []  # one item per acquisition: what release() gives back

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> GroupEntry:
        return self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> GroupEntry | None:
        """The entry of ``key``, or ``None``."""
        return self.entries.get(key)

    def kinds(self) -> tuple[str, ...]:
        """The layout kinds held (keys without a prefix), in build order."""
        return tuple(k for k in self.entries if ":" not in k)

    def with_prefix(self, prefix: str) -> dict[str, GroupEntry]:
        """Entries under ``prefix`` (``"opt:"``, ``"gloo:"``, ``"derived:"``), the prefix removed."""
        n = len(prefix)
        return {k[n:]: e for k, e in self.entries.items() if k.startswith(prefix)}

    def add(self, key: str, ranks: tuple[int, ...], group: Any, rank: int) -> None:
        """Record ``key`` (the group is held by an earlier :meth:`hold` or by another key)."""
        try:
            index = ranks.index(rank)
        except ValueError:
            index = -1
        self.entries[key] = GroupEntry(ranks, group, index)

    def hold(self, group: Any) -> Any:
        """Count one acquisition of ``group`` (given back by :meth:`release`); return it."""
        self._held.append(group)
        return group

    def release(self) -> None:
        """Give back every acquisition (a shared group dies with its last user) and forget the entries."""
        held, self._held = self._held, []
        self.entries.clear()
        for group in reversed(held):
            create.release(group)


def build(
    spec: StateSpec, optional: OptionalGroups, rank: int, world: int, describe: Callable[[], str]
) -> tuple[GroupTable, str]:
    """Plan, agree on and create a state's groups on this rank: ``(table, construction tag)``.

    Member-only creation: a rank outside the layout takes part in nothing. With a
    default group bound to a device the whole world splits together (see
    :mod:`scoped_parallel.groups.split`). Raises before any group exists when peers
    disagree (:class:`~scoped_parallel.errors.StateMismatchError`) or a requested group
    cannot be built in this mode; a failed creation gives back what it made.
    """
    layout = spec.layout
    table = GroupTable()
    bound = compat.bound_device() is not None
    member = layout.contains(rank)
    if not bound and not member:
        return table, ""
    ranks_of: dict[str, tuple[int, ...]] = {}
    opt_ranks: dict[str, tuple[int, ...]] = {}
    alias: dict[str, str] = {}
    if member:
        ranks_of = dict(layout.groups_of(rank))
        opt_ranks = optional_ranks(layout, rank, optional, ranks_of)
        by_ranks = {ranks: kind for kind, ranks in reversed(ranks_of.items())}
        alias = {
            slot: by_ranks[ranks]
            for slot, ranks in opt_ranks.items()
            if slot not in UNSHARED_SLOTS and not slot.startswith("intra-") and ranks in by_ranks
        }
        own = sorted(slot for slot in opt_ranks if slot not in alias)
        if bound and own:
            raise UnsupportedSetupError(
                f"{describe()} needs Megatron's optional group(s) {own}, which are created on their "
                "members only; with a default group bound to a device (init_process_group(device_id=...)) "
                "groups can only be split collectively. Initialize the default group without device_id, "
                "or drop the options that need these groups."
            )
    planned = {**ranks_of, **{slot: r for slot, r in opt_ranks.items() if slot not in alias}}
    tag = construction_tag(layout, (0, world) if bound else None)
    if str(dist.get_backend()) != "fake":
        agree_with_peers(
            spec,
            rank,
            {"world": tuple(range(world))} if bound else planned,
            tag,
            compat.default_store(),
            spec.timeout or compat.default_timeout(),
            describe,
            span_size=world if bound else None,
        )
    try:
        by_split: dict[str, Any] = {}
        if bound:
            steps = split.plan_splits(spec, world, str(dist.get_backend()))
            by_split, parents = split.create_by_split(
                steps,
                rank,
                world,
                share=spec.share,
                split=compat.split_group,
                world=compat.default_group(),
                default_timeout=spec.timeout or compat.default_timeout(),
            )
            for group in parents:
                table.hold(group)
            for group in by_split.values():  # one acquisition per kind (split retains per kind)
                table.hold(group)
        if not member:
            return table, tag
        groups: dict[str, Any] = dict(by_split)
        for slot, request in plan_requests(spec, planned, tag, skip=frozenset(by_split)):
            share = spec.share and slot not in UNSHARED_SLOTS
            groups[slot] = table.hold(create.acquire(request, share=share))
    except BaseException:
        table.release()
        raise
    for kind, ranks in ranks_of.items():
        table.add(kind, ranks, groups[kind], rank)
    for slot, ranks in opt_ranks.items():
        table.add(OPTIONAL + slot, ranks, groups[alias[slot]] if slot in alias else groups[slot], rank)
    for slot, group in groups.items():
        if slot.startswith(GLOO):
            table.add(slot, planned[slot[len(GLOO):]], group, rank)
    return table, tag


def derive(
    table: GroupTable, spec: StateSpec, tag: str, purpose: str, rank_sets: Any, label: str
) -> tuple[Any, ...]:
    """Groups over ``rank_sets`` for ``purpose``, built once each and kept in ``table``.

    ``ParallelState.derived_groups``: groups an adapter derives from the layout that are no
    layout kind (ZeRO++'s hpZ and all-to-all groups). Each set must hold this rank and lie
    inside the state's ranks (checked before any communication; ``label`` names the state in
    the messages). Member-only, shared with an identical group, in the one global order (as
    the state's own groups); returns them in the order of ``rank_sets``.
    """
    rank = dist.get_rank()
    if compat.bound_device() is not None:
        raise UnsupportedSetupError(
            f"derived_groups({purpose!r}) on {label}: the default group is bound to a "
            "device, so groups can only be split collectively from it, and derived groups are created "
            "on their members only. Initialize the default group without device_id to use them."
        )
    wanted = _derived_rank_sets(purpose, rank_sets, rank, spec.layout, label)
    keys = [f"{DERIVED}{purpose}:{','.join(map(str, r))}" for r in wanted]
    missing = sorted({r for r, k in zip(wanted, keys) if k not in table}, key=lambda r: (len(r), r))
    for ranks in missing:  # one global order, as for the state's own groups
        request = create.GroupRequest(
            ranks=ranks,
            backend=spec.backend,
            timeout=spec.timeout,
            desc=f"{spec.name or 'state'}:{purpose}",
            tag=f"{tag}/{purpose}",
        )
        group = table.hold(create.acquire(request, share=spec.share))
        table.add(f"{DERIVED}{purpose}:{','.join(map(str, ranks))}", ranks, group, rank)
    return tuple(table[k].group for k in keys)


def _derived_rank_sets(
    purpose: str, rank_sets: Any, rank: int, layout: ParallelLayout, label: str
) -> list[tuple[int, ...]]:
    """The rank sets of :func:`derive`, checked: each holds ``rank``, inside the layout."""
    wanted: list[tuple[int, ...]] = []
    for ranks in rank_sets:
        ranks = tuple(int(r) for r in ranks)
        if rank not in ranks or len(set(ranks)) != len(ranks):
            raise ValueError(
                f"derived_groups({purpose!r}): {ranks} must be distinct ranks holding this rank "
                f"({rank}); pass only the groups this rank belongs to"
            )
        outside = [r for r in ranks if not layout.contains(r)]
        if outside:
            raise ValueError(
                f"derived_groups({purpose!r}): ranks {outside} of {ranks} are not ranks of "
                f"{label}; derived groups stay inside the state's ranks"
            )
        wanted.append(ranks)
    return wanted
