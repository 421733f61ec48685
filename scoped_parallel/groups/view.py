"""``GroupView``: one state's group table as this rank's getters read it.

The getters (:mod:`scoped_parallel.getters`) read a state's groups from this object
alone, never from the state's private fields (the state's ``store`` and ``optional_groups``
hold the rest of what they read):

* a kind's group, ranks, size and this rank's index in one dict lookup
  (:meth:`GroupView.group`, :meth:`~GroupView.ranks`, :meth:`~GroupView.size`,
  :meth:`~GroupView.index`); anything unusual (a destroyed state, a rank outside the
  layout, a kind this rank does not hold, a kind spelled as an alias) takes the slow
  path, :meth:`~GroupView.require`, which normalises the kind or raises the
  explanatory error;
* Megatron's optional groups by slot (:meth:`~GroupView.optional`, the one reader of
  the table's ``"opt:"`` keys) and the gloo twins (:meth:`~GroupView.gloo`).

Worked example on 8 ranks, ``tensor_model_parallel_size=2``, rank 5:
``view.ranks("tp")`` is (4, 5), ``view.index("tp")`` is 1, ``view.ranks("TP")`` the
same (an alias, normalised on the slow path), ``view.optional("dist-opt").ranks`` is
(0, ..., 7), and after ``state.destroy()`` every question about a group raises
``GroupNotAvailableError`` (``kinds()`` is then empty).
"""

from __future__ import annotations

from typing import Any, Callable

from scoped_parallel.errors import GroupNotAvailableError, RankNotInLayoutError
from scoped_parallel.groups.table import GLOO, OPTIONAL, GroupEntry, GroupTable
from scoped_parallel.layout.grid import ParallelLayout
from scoped_parallel.layout.kinds import normalise_kind

__all__ = ["GroupView"]


class GroupView:
    """This rank's read-only view of one state's :class:`~scoped_parallel.groups.table.GroupTable`."""

    __slots__ = ("_entries", "_table", "_layout", "_describe", "rank", "closed")

    def __init__(self, table: GroupTable, layout: ParallelLayout, rank: int, describe: Callable[[], str]) -> None:
        self._table = table
        self._entries = table.entries  # the hot getters' one dict lookup
        self._layout = layout
        self._describe = describe
        #: this process's global rank
        self.rank = rank
        #: set by :meth:`close` (the state was destroyed)
        self.closed = False

    @property
    def member(self) -> bool:
        """Whether this rank is one of the state's ranks."""
        return self._layout.contains(self.rank)

    def close(self) -> None:
        """Mark the view's state destroyed: every later question raises the explanatory error."""
        self.closed = True

    # ------------------------------------------------------------------ the explanatory path

    def check_member(self) -> None:
        """Raise unless the state is alive and this rank is one of its ranks."""
        if self.closed:
            raise GroupNotAvailableError(
                f"{self._describe()} was destroyed; its groups are gone. Build a new ParallelState "
                "to use this layout again"
            )
        if not self.member:
            lo = self._layout.rank_offset
            raise RankNotInLayoutError(
                f"rank {self.rank} is not part of {self._describe()} (ranks {lo}..{lo + self._layout.world_size - 1}), "
                "so it holds none of its groups; only call its getters on its own ranks "
                "(check state.is_member)."
            )

    def require(self, kind: str) -> str:
        """``kind`` canonical, when this rank holds its group; else the explanatory error."""
        self.check_member()
        kind = normalise_kind(kind)
        if kind not in self._entries:
            if kind in ("embd", "pos-embd"):
                raise GroupNotAvailableError(
                    f"rank {self.rank} is not in an {kind!r} group of {self._describe()} (only the "
                    "first/last pipeline stages are); check is_rank_in_embedding_group() first."
                )
            raise GroupNotAvailableError(
                f"{self._describe()} holds no {kind!r} group; it holds {sorted(self._table.kinds())}."
            )
        return kind

    def checked(self, kind: str) -> GroupEntry:
        """The entry of ``kind`` after :meth:`require`'s checks (an alias is normalised, a table
        key that is no kind is refused): the public ``state.group(kind)`` and its siblings."""
        return self._entries[self.require(kind)]

    # ------------------------------------------------------------------ one kind (fast)

    def entry(self, kind: str) -> GroupEntry:
        """The table's entry of ``kind`` on this rank."""
        try:
            return self._entries[kind]
        except KeyError:
            return self._entries[self.require(kind)]

    def group(self, kind: str) -> Any:
        """The process group of ``kind`` (e.g. ``"tp"``, ``"dp-cp"``) on this rank."""
        try:
            return self._entries[kind].group
        except KeyError:
            return self._entries[self.require(kind)].group

    def ranks(self, kind: str) -> tuple[int, ...]:
        """Global ranks of this rank's ``kind`` group."""
        try:
            return self._entries[kind].ranks
        except KeyError:
            return self._entries[self.require(kind)].ranks

    def size(self, kind: str) -> int:
        """How many ranks this rank's ``kind`` group has."""
        try:
            return len(self._entries[kind].ranks)
        except KeyError:
            return len(self._entries[self.require(kind)].ranks)

    def index(self, kind: str) -> int:
        """This rank's index inside its ``kind`` group."""
        try:
            return self._entries[kind].index
        except KeyError:
            return self._entries[self.require(kind)].index

    def holds(self, kind: str) -> bool:
        """Whether this rank holds a group of canonical ``kind`` (``"embd"`` off the end stages: no)."""
        self.check_member()
        return kind in self._entries

    def kinds(self) -> tuple[str, ...]:
        """The layout kinds this rank holds, in build order."""
        return self._table.kinds()

    # ------------------------------------------------------------------ optional groups, gloo twins

    def optional(self, slot: str) -> GroupEntry | None:
        """The entry of Megatron's optional group ``slot`` (``"dist-opt"``, ``"intra-dp-cp"``,
        ``"hcp/0"``, ...), or ``None`` when the state's options did not build it."""
        self.check_member()
        return self._entries.get(OPTIONAL + slot)

    def optional_slots(self, prefix: str) -> list[str]:
        """The optional slots held whose name starts with ``prefix`` (e.g. ``"hybrid/"``)."""
        self.check_member()
        return sorted(slot for slot in self._table.with_prefix(OPTIONAL) if slot.startswith(prefix))

    def gloo(self, kind: str) -> Any:
        """The gloo twin of ``kind`` (dp, dp-cp, edp, or a partial ``intra-`` slot)."""
        if kind.startswith("intra-"):  # the twin of a partial (one optimizer instance) group
            self.check_member()
        else:
            kind = self.require(kind)
        entry = self._entries.get(GLOO + kind)
        if entry is None:
            raise GroupNotAvailableError(
                f"{self._describe()} has no gloo twin of {kind!r}; build it with "
                "create_gloo_process_groups=True (twins exist for dp, dp-cp and edp)."
            )
        return entry.group
