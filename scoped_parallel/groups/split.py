"""Groups of a state when the default group is bound to a device: ``split_group``.

With ``init_process_group(..., device_id=...)`` torch creates NCCL subgroups by
splitting a parent communicator (``ncclCommSplit``): every rank of the parent
must call the split, with the same partition. Member-only creation (the
default path, :mod:`scoped_parallel.groups.create`) is impossible there, so a state
plans its creation as a sequence of collective splits instead:

1. when the state covers only part of the world, one split of the default group
   whose only part is the state's ranks: the *parent* (every rank of the world
   takes part; a rank outside the state gets nothing and stops here);
2. then one split of the parent per distinct partition, in one order every rank
   computes alike (the kinds' static order): kinds with the same partition,
   backend and options object share one split and one group.

Kinds with another backend than the default group's (``backends={"dp": "gloo"}``)
and the gloo twins are not split: they are created member-only as usual.
Sharing between states is decided after each split (a split cannot be skipped on
one rank): an identical live group is reused and the new one destroyed.

Worked example, 8 ranks bound to GPUs, a state on ranks 4-7 with TP=2: the plan
is the parent split ``[[4, 5, 6, 7]]`` of the world, then e.g. ``tp`` ->
``[[4, 5], [6, 7]]`` and ``dp`` -> ``[[4, 6], [5, 7]]`` as splits of the parent
(passed to torch as parent-local ranks ``[[0, 1], [2, 3]]`` and ``[[0, 2], [1, 3]]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from scoped_parallel.groups import create as _groups
from scoped_parallel.groups.create import GroupRequest
from scoped_parallel.layout.kinds import DENSE_KINDS, EMBEDDING_KINDS, EXPERT_KINDS
from scoped_parallel.groups.plan import StateSpec

__all__ = ["SplitStep", "create_by_split", "plan_splits", "split_kinds"]

#: The static order of kinds: what every rank iterates, whatever its own groups.
_KIND_ORDER = DENSE_KINDS + EXPERT_KINDS + EMBEDDING_KINDS


@dataclass(frozen=True)
class SplitStep:
    """One collective split: its parent, the partition (global ranks) and the kinds it serves."""

    parent: str  # "world" (the default group) or "state" (the state's parent group)
    partition: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...] = ()
    backend: str | None = None
    options: Any = None
    timeout: timedelta | None = None
    desc: str = ""


def split_kinds(spec: StateSpec, default_backend: str) -> tuple[str, ...]:
    """The kinds created by splitting: those on the default group's backend."""
    out = []
    for kind in _KIND_ORDER:
        backend = spec.backends.get(kind, spec.backend)
        if backend is None or str(backend) == str(default_backend):
            out.append(kind)
    return tuple(out)


def plan_splits(spec: StateSpec, world_size: int, default_backend: str) -> list[SplitStep]:
    """Every split of the state, in the order all ranks of the world perform them."""
    layout = spec.layout
    label = spec.name or "state"
    steps: list[SplitStep] = []
    if layout.world_size != world_size:
        steps.append(
            SplitStep("world", (tuple(layout.ranks),), ("parent",), timeout=spec.timeout, desc=f"{label}:parent")
        )
    # One options object may serve several kinds: they may share a split, as in the fingerprint.
    first_user: dict[int, str] = {}
    index: dict[tuple[Any, ...], int] = {}
    for kind in split_kinds(spec, default_backend):
        partition = tuple(g for g in layout.groups(kind) if g)
        if not partition:
            continue
        options = spec.options.get(kind)
        owner = None if options is None else first_user.setdefault(id(options), kind)
        key = (partition, spec.backends.get(kind, spec.backend), owner)
        if key in index:
            at = index[key]
            step = steps[at]
            steps[at] = SplitStep(
                step.parent, step.partition, step.kinds + (kind,), step.backend, step.options, step.timeout, step.desc
            )
            continue
        index[key] = len(steps)
        steps.append(
            SplitStep(
                "state",
                partition,
                (kind,),
                spec.backends.get(kind, spec.backend),
                options,
                spec.timeout,
                f"{label}:{kind}",
            )
        )
    return steps


def create_by_split(
    steps: list[SplitStep],
    rank: int,
    world_size: int,
    *,
    share: bool,
    split: Callable[..., Any],
    world: Any,
    default_timeout: timedelta,
) -> tuple[dict[str, Any], list[Any]]:
    """Run the plan on this rank: ``(kind -> group, other groups held)``.

    ``split(parent, parts, timeout=, options=, desc=)`` is torch's ``split_group``
    (tests pass a recorder). A rank outside the state returns after the parent split
    with nothing; groups already registered are released if a split fails.
    """
    parent, parent_ranks = world, list(range(world_size))
    groups: dict[str, Any] = {}
    held: list[Any] = []
    try:
        for step in steps:
            where = {r: i for i, r in enumerate(parent_ranks)}
            parts = [[where[r] for r in part] for part in step.partition]
            timeout = step.timeout or default_timeout
            group = split(parent, parts, timeout=timeout, options=step.options, desc=step.desc)
            mine = next((part for part in step.partition if rank in part), None)
            if step.parent == "world":
                if group is None:
                    return {}, []  # not a member of the state: nothing more to take part in
                request = GroupRequest(ranks=tuple(step.partition[0]), timeout=step.timeout, desc=step.desc)
                parent = _groups.adopt(request, group, share=False)
                held.append(parent)
                parent_ranks = list(step.partition[0])
                continue
            if group is None or mine is None:
                continue  # e.g. an embedding kind on a middle pipeline stage
            request = GroupRequest(
                ranks=mine, backend=step.backend, options=step.options, timeout=step.timeout, desc=step.desc
            )
            group = _groups.adopt(request, group, share=share)
            held.append(group)
            for _ in step.kinds[1:]:  # one user per kind: the state releases each kind
                _groups.retain(group)
                held.append(group)
            for kind in step.kinds:
                groups[kind] = group
    except BaseException:
        for group in reversed(held):
            _groups.release(group)
        raise
    # The kind groups are released through the state's kind map; only the parent stays here.
    return groups, [parent] if parent is not world else []
