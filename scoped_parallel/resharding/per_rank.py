"""The template of a reshard backend whose ranks each plan their own part.

``"flat"`` (torch modules, DeepSpeed engines) and ``"megatron"`` (megatron-core models)
take the same steps; :class:`PerRankBackend` owns them and a backend supplies only what
differs, two methods:

===================================  =====================================================
step (this class)                    the backend's part
===================================  =====================================================
the participants and their group     --
describe, share, check, plan         :meth:`PerRankBackend.plan_part`: summarise each side
                                     as named rows, share them, raise the same error on
                                     every rank, plan this rank's part
confirm the pairing, staging, notes  --
where this rank's tensors live       :meth:`PerRankBackend.hold`: a :class:`Holdings`
confirm the pieces, relays, run      --
after the run                        :meth:`PerRankBackend.after` (optional)
===================================  =====================================================

Every step with a collective runs over the ranks of the two states only
(:func:`~scoped_parallel.resharding.execute.participants_group`), and every check that can fail
does so on every rank alike, before anything moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch.distributed as dist

from scoped_parallel.errors import ReshardError
from scoped_parallel.resharding.api import pieces_match
from scoped_parallel.resharding.execute import confirm_part, participants, participants_group, peak_staging, relay_groups, run_plan
from scoped_parallel.resharding.plan import CastSpec, Piece, ReshardPlan

__all__ = ["BUCKET_BYTES", "Holdings", "PerRankBackend"]

#: the bucket the plan's staging figure assumes (the executor's default)
BUCKET_BYTES = 1 << 26


@dataclasses.dataclass(frozen=True)
class Holdings:
    """Where this rank's tensors of both models live, as :meth:`PerRankBackend.hold` finds them now."""

    #: source tensors by canonical name (read in place)
    sources: Mapping[str, Any]
    #: destination tensors by canonical name (written in place)
    targets: Mapping[str, Any]
    #: this rank's pieces of each side, compared with the plan's before anything moves
    source_pieces: list[Piece]
    target_pieces: list[Piece]
    #: all-gather groups by ranks: the source's own partition groups (``execute`` adds the relay groups)
    gather_groups: Mapping[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)


class PerRankBackend:
    """A reshard backend whose ranks each plan their own part (see the module doc)."""

    name: str = ""
    #: the states may lie on other, overlapping or partial rank sets of the world
    partial_ranks = True
    #: what the plan's notes say about its planner and executor (the staging figure is added)
    notes: str = ""

    def claims(self, model: Any) -> bool:
        """Whether this backend knows how ``model`` is laid out."""
        raise NotImplementedError

    def plan_part(self, me: int, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, cast: CastSpec,
                  ranks: tuple[int, ...], group: Any) -> ReshardPlan:
        """This rank's part of the plan: describe each side as named rows, share them over
        ``group``, raise the same :class:`~scoped_parallel.errors.ReshardError` on every rank
        for anything that does not match, and plan (collective over ``group``)."""
        raise NotImplementedError

    def hold(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any) -> Holdings:
        """This rank's tensors of both models, read now, after any step that finishes their
        pending updates (a model is None where this rank is not in its state)."""
        raise NotImplementedError

    def after(self, dst_model: Any) -> None:
        """What the destination needs once its tensors are written (nothing by default)."""

    def plan(self, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any, *, cast: CastSpec = None) -> ReshardPlan:
        """This rank's part of the checked plan (collective over the ranks of both states)."""
        ranks = participants(src_state, dst_state)
        group = participants_group(src_state, dst_state, ranks)
        part = self.plan_part(dist.get_rank(), src_model, src_state, dst_model, dst_state, cast, ranks, group)
        confirm_part(part, group)
        notes = (f"{self.notes}; staging: peak extra bytes with bucket_bytes={BUCKET_BYTES}",)
        return dataclasses.replace(part, staging={part.rank: peak_staging(part, BUCKET_BYTES)}, notes=notes)

    def execute(self, plan: ReshardPlan, src_model: Any, src_state: Any, dst_model: Any, dst_state: Any,
                bucket_bytes: int = BUCKET_BYTES, **options: Any) -> dict[int, int] | None:
        """Run this rank's part of ``plan``; returns the bytes sent by peer, or None on every
        rank when the models no longer hold the planned pieces (nothing moved)."""
        if options:  # the same on every rank: all raise before anything moves
            raise ReshardError(
                f"the {self.name!r} reshard backend takes bucket_bytes= only, not {sorted(options)} (nothing was moved)"
            )
        group = participants_group(src_state, dst_state, participants(src_state, dst_state))
        held = self.hold(src_model, src_state, dst_model, dst_state)
        if not pieces_match(plan, held.source_pieces, held.target_pieces, group=group):
            return None
        # disjoint keys: a relay group holds no rank of the source
        gather_groups = {**relay_groups(plan, src_state, dst_state), **held.gather_groups}
        sent = run_plan(plan, held.sources, held.targets, group=group, bucket_bytes=bucket_bytes, gather_groups=gather_groups)
        if dst_model is not None:
            self.after(dst_model)
        return sent
