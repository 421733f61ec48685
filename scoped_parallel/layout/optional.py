"""Megatron's optional groups: the options that ask for them, and their rank math. Pure; no torch.

``megatron.core.parallel_state.initialize_model_parallel`` builds, besides the groups
of the rank generators, a few groups that only exist on request or that are slices
of other groups. ``OptionalGroups`` holds the four options of a
:class:`~scoped_parallel.ParallelState` that ask for them (Megatron's keyword names),
checks them against a layout before any communication, and
``optional_ranks`` gives the groups one rank belongs to, each under a slot name:

=====================  ==========================================================
slot                   Megatron's global, and when it exists
=====================  ==========================================================
``dist-opt``           ``_INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP``: always (all
                       ranks of one distributed-optimizer instance)
``intra-dp-cp``        ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``: instances > 1
                       (with one instance Megatron reuses the dp-cp group)
``intra-edp``          ``_INTRA_PARTIAL_EXPERT_DATA_PARALLEL_GROUP``: instances > 1
``inter-edp``          ``_INTER_PARTIAL_EXPERT_DATA_PARALLEL_GROUP``: instances > 1
``hcp/<level>``        ``_HIERARCHICAL_CONTEXT_PARALLEL_GROUPS[level]``:
                       ``hierarchical_context_parallel_sizes`` given
``hybrid/<size>``      ``_HYBRID_DP_CP_GROUPS[size]``: ``hybrid_context_parallel``
``dp-cp/ag``           ``_DATA_PARALLEL_GROUP_WITH_CP_AG``: ``create_all_gather_group``
                       (a second communicator over the dp-cp ranks: never shared)
``gtp``                ``_GTP_WEIGHT_REMAT_GROUP`` (and its expert twin), megatron-core
                       0.19: always; a state has no GTP axis, so it is this rank alone
                       (shared with any other group of this rank alone)
=====================  ==========================================================

Example: 8 ranks, ``tensor_model_parallel_size=2`` (dp=4) and
``num_distributed_optimizer_instances=2``: rank 5's dp-cp group is (1, 3, 5, 7), so
its ``intra-dp-cp`` group is (5, 7) and its ``inter-edp`` group is (1, 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scoped_parallel.errors import LayoutError
from scoped_parallel.layout.grid import rank_span

__all__ = ["OptionalGroups", "UNSHARED_SLOTS", "optional_ranks"]

#: Slots that must be a communicator of their own even when another group has the same ranks.
UNSHARED_SLOTS = frozenset({"dp-cp/ag"})


@dataclass(frozen=True)
class OptionalGroups:
    """The options of ``initialize_model_parallel`` that create optional groups.

    ``num_distributed_optimizer_instances`` (int >= 1, divides dp x cp and expert dp),
    ``hierarchical_context_parallel_sizes`` (sizes whose product is the context
    parallel size, or empty), ``hybrid_context_parallel`` and
    ``create_all_gather_group`` (bools).
    """

    num_distributed_optimizer_instances: int = 1
    hierarchical_context_parallel_sizes: tuple[int, ...] = ()
    hybrid_context_parallel: bool = False
    create_all_gather_group: bool = False

    @classmethod
    def from_arguments(
        cls,
        num_distributed_optimizer_instances: Any = 1,
        hierarchical_context_parallel_sizes: Any = None,
        hybrid_context_parallel: Any = False,
        create_all_gather_group: Any = False,
    ) -> OptionalGroups:
        """Check the types of the four options (``LayoutError`` naming the value) and build them."""
        n = num_distributed_optimizer_instances
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LayoutError(
                f"num_distributed_optimizer_instances must be an int >= 1, got {n!r}; "
                "e.g. num_distributed_optimizer_instances=2"
            )
        sizes = hierarchical_context_parallel_sizes
        if sizes is None:
            sizes = ()
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
            raise LayoutError(
                f"hierarchical_context_parallel_sizes must be a list of ints or None, got {sizes!r}; "
                "e.g. [2, 2] for context_parallel_size=4"
            )
        sizes = tuple(sizes)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise LayoutError(
                f"hierarchical_context_parallel_sizes must hold ints >= 1, got {list(sizes)!r}; "
                "e.g. [2, 2] for context_parallel_size=4"
            )
        for name, flag in (
            ("hybrid_context_parallel", hybrid_context_parallel),
            ("create_all_gather_group", create_all_gather_group),
        ):
            if not isinstance(flag, bool):
                raise LayoutError(f"{name} must be True or False, got {flag!r}")
        return cls(n, sizes, hybrid_context_parallel, create_all_gather_group)

    def check(self, layout: Any) -> None:
        """Megatron's conditions on these options for ``layout``: ``LayoutError`` naming the fix."""
        n = self.num_distributed_optimizer_instances
        dp_cp = layout.data_parallel_size * layout.context_parallel_size
        edp = layout.expert_data_parallel_size
        if dp_cp % n or edp % n:
            raise LayoutError(
                f"num_distributed_optimizer_instances={n} must divide data x context parallel "
                f"size ({dp_cp}) and the expert data parallel size ({edp}); choose a divisor of both"
            )
        hcp = self.hierarchical_context_parallel_sizes
        if hcp and math.prod(hcp) != layout.context_parallel_size:
            raise LayoutError(
                f"hierarchical_context_parallel_sizes={list(hcp)} multiply to {math.prod(hcp)}, "
                f"but context_parallel_size is {layout.context_parallel_size}; give sizes whose "
                "product is the context parallel size"
            )
        if self.hybrid_context_parallel and dp_cp % 2:
            raise LayoutError(
                f"hybrid_context_parallel=True needs an even data x context parallel size, got {dp_cp}"
            )

    def fingerprint(self) -> str:
        """What peers must have alike, as text."""
        return (
            f"instances={self.num_distributed_optimizer_instances};"
            f"hcp={list(self.hierarchical_context_parallel_sizes)};"
            f"hybrid={self.hybrid_context_parallel};ag={self.create_all_gather_group}"
        )


def _chunk(ranks: tuple[int, ...], size: int, rank: int) -> tuple[int, ...]:
    """The consecutive slice of ``size`` members of ``ranks`` that holds ``rank``."""
    i = ranks.index(rank) // size * size
    return ranks[i : i + size]


def hierarchical_group(ranks: tuple[int, ...], sizes: tuple[int, ...], level: int, rank: int) -> tuple[int, ...]:
    """``rank``'s level-``level`` group of Megatron's ``create_hierarchical_groups(ranks, sizes)``.

    Members are ``(l s u)`` in ``ranks``: ``u`` spans the lower levels, ``s`` this level;
    a group fixes ``l`` and ``u`` and runs over ``s``.
    """
    inner = math.prod(sizes[:level])
    span = sizes[level] * inner
    i = ranks.index(rank)
    base = (i // span) * span + i % inner
    return tuple(ranks[base + k * inner] for k in range(sizes[level]))


def _dist_opt_group(layout: Any, rank: int, instances: int) -> tuple[int, ...]:
    """Union of consecutive expert tp-ep-pp groups (Megatron's generation order), one instance."""
    if instances == 1:
        return rank_span(layout.rank_offset, layout.world_size)
    per_instance = layout.expert_data_parallel_size // instances
    members: list[int] = []
    for count, group in enumerate(layout.groups("etp-ep-pp"), start=1):
        members.extend(group)
        if count % per_instance == 0:
            if rank in members:
                return tuple(sorted(members))
            members = []
    raise AssertionError(f"rank {rank} is in no distributed-optimizer instance")  # pragma: no cover


def optional_ranks(
    layout: Any, rank: int, options: OptionalGroups, groups: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """The optional groups ``rank`` belongs to, by slot (see the module docstring).

    ``groups``: ``layout.groups_of(rank)`` where the caller has it already.
    """
    if groups is None:
        groups = layout.groups_of(rank)
    out: dict[str, tuple[int, ...]] = {}
    n = options.num_distributed_optimizer_instances
    out["dist-opt"] = _dist_opt_group(layout, rank, n)
    out["gtp"] = (rank,)
    if n > 1:
        dp_cp, edp = groups["dp-cp"], groups["edp"]
        out["intra-dp-cp"] = _chunk(dp_cp, len(dp_cp) // n, rank)
        sizes = (len(edp) // n, n)
        out["intra-edp"] = hierarchical_group(edp, sizes, 0, rank)
        out["inter-edp"] = hierarchical_group(edp, sizes, 1, rank)
    for level in range(len(options.hierarchical_context_parallel_sizes)):
        out[f"hcp/{level}"] = hierarchical_group(
            groups["cp"], options.hierarchical_context_parallel_sizes, level, rank
        )
    if options.hybrid_context_parallel:
        dp_cp = groups["dp-cp"]
        for size in [2**i for i in range(int(math.log2(len(dp_cp))))][1:]:
            out[f"hybrid/{size}"] = _chunk(dp_cp, size, rank)
    if options.create_all_gather_group:
        out["dp-cp/ag"] = groups["dp-cp"]
    return out
