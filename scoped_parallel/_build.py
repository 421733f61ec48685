"""How a ``ParallelState`` gets its groups: member-only requests, splits, optional and derived groups.

The state's constructor decides the mode (a default group bound to a device means
splits, see :mod:`scoped_parallel._split`) and calls these; they fill the state's
group maps and undo what they made if a creation fails. Package-internal: they read
and write the state's private fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from scoped_parallel import _groups, _split
from scoped_parallel import _torch_compat as compat
from scoped_parallel._optional_groups import UNSHARED_SLOTS, optional_ranks
from scoped_parallel._plan import plan_requests
from scoped_parallel._state_args import derived_rank_sets
from scoped_parallel.errors import UnsupportedSetupError

if TYPE_CHECKING:  # pragma: no cover
    from scoped_parallel.state import ParallelState

__all__ = ["create_by_split", "create_groups", "derived_groups", "plan_optional_groups", "planned_ranks"]


def create_by_split(self: ParallelState, world: int) -> dict[str, Any]:
    """Create the state's groups by splitting (device-bound default group); kind -> group."""
    steps = _split.plan_splits(self._spec, world, str(dist.get_backend()))
    groups, self._parents = _split.create_by_split(
        steps,
        self._rank,
        world,
        share=self._spec.share,
        split=compat.split_group,
        world=compat.default_group(),
        default_timeout=self._spec.timeout or compat.default_timeout(),
    )
    return groups


def plan_optional_groups(self: ParallelState, optional: Any, bound: bool) -> None:
    """Megatron's optional groups on this rank; an optional group with a kind's ranks is that kind's."""
    self._opt_ranks = optional_ranks(self._layout, self._rank, optional)
    by_ranks = {ranks: kind for kind, ranks in reversed(self._ranks_of.items())}
    self._opt_alias = {
        slot: by_ranks[ranks]
        for slot, ranks in self._opt_ranks.items()
        if slot not in UNSHARED_SLOTS and not slot.startswith("intra-") and ranks in by_ranks
    }
    own = sorted(slot for slot in self._opt_ranks if slot not in self._opt_alias)
    if bound and own:
        raise UnsupportedSetupError(
            f"{self._label()} needs Megatron's optional group(s) {own}, which are created on their "
            "members only; with a default group bound to a device (init_process_group(device_id=...)) "
            "groups can only be split collectively. Initialize the default group without device_id, "
            "or drop the options that need these groups."
        )


def planned_ranks(self: ParallelState) -> dict[str, tuple[int, ...]]:
    """The rank sets this rank creates: its kinds and the optional groups that are no kind."""
    own = {slot: r for slot, r in self._opt_ranks.items() if slot not in self._opt_alias}
    return {**self._ranks_of, **own}


def create_groups(self: ParallelState, split: dict[str, Any]) -> None:
    """Member-only creation of every group not already made by ``split`` (kind -> group)."""
    self._groups.update(split)
    acquired: list[Any] = list(split.values()) + self._parents
    try:
        for slot, request in plan_requests(self._spec, self._planned_ranks(), self._tag, skip=frozenset(split)):
            share = self._spec.share and slot not in UNSHARED_SLOTS
            group = _groups.acquire(request, share=share)
            acquired.append(group)
            if slot.startswith("gloo:"):
                self._gloo[slot[5:]] = group
            elif slot in self._opt_ranks:
                self._opt_groups[slot] = group
            else:
                self._groups[slot] = group
    except BaseException:
        for group in reversed(acquired):
            _groups.release(group)
        self._groups.clear()
        self._gloo.clear()
        self._opt_groups.clear()
        self._parents = []
        raise


def derived_groups(self: ParallelState, purpose: str, rank_sets: Any) -> tuple[Any, ...]:
    """``ParallelState.derived_groups`` (see there)."""
    self._require("dp")  # destroyed or not a member: the explanatory error
    if self._parents or compat.bound_device() is not None:
        raise UnsupportedSetupError(
            f"derived_groups({purpose!r}) on {self._label()}: the default group is bound to a device, "
            "so groups can only be split collectively from it, and derived groups are created on "
            "their members only. Initialize the default group without device_id to use them."
        )
    wanted = derived_rank_sets(purpose, rank_sets, self._rank, self._layout, self._label())
    missing = sorted({r for r in wanted if (purpose, r) not in self._derived}, key=lambda r: (len(r), r))
    for ranks in missing:  # one global order, as for the state's own groups
        request = _groups.GroupRequest(
            ranks=ranks,
            backend=self._spec.backend,
            timeout=self._spec.timeout,
            desc=f"{self._name or 'state'}:{purpose}",
            tag=f"{self._tag}/{purpose}",
        )
        self._derived[(purpose, ranks)] = _groups.acquire(request, share=self._spec.share)
    return tuple(self._derived[(purpose, r)] for r in wanted)
