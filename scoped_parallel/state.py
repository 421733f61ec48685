"""``ParallelState``: one model's process groups, switched in with a scope.

A state is built collectively by the ranks of its layout (each rank creates only
the groups it belongs to; ``scoped_parallel.groups.table.build`` returns the one
``~scoped_parallel.groups.table.GroupTable`` the state keeps), answers every
getter name of :mod:`scoped_parallel.getters.table` from that table (Megatron's and
DeepSpeed's names, through :class:`~scoped_parallel.getters.Getters`), and is made
current with ``with state.activate():``. It is a complete DeepSpeed ``mpu``:
``deepspeed.initialize(model=..., mpu=state)``. This module also checks the
constructor's arguments before any communication.

A state is three parts, each public and each with one job: ``state.layout`` (the pure
rank math), ``state.groups`` (a :class:`~scoped_parallel.groups.view.GroupView`, this
rank's view of the group table, all the getters read) and ``state.store`` (a
:class:`~scoped_parallel.store.StateStore`, the adapters' records, Megatron's override
values and memoized answers).

Worked example on 8 ranks, ``ParallelState(name="actor", tensor_model_parallel_size=2,
pipeline_model_parallel_size=2)`` (so data parallel size 2). On rank 5:

===========================================  ===============
getter                                       rank 5 sees
===========================================  ===============
``get_tensor_model_parallel_group()``        ranks (4, 5), rank 1 of 2
``get_data_parallel_group()``                ranks (5, 7), rank 0 of 2
``get_pipeline_model_parallel_group()``      ranks (1, 5), rank 1 of 2 (last stage)
``get_model_parallel_group()``               ranks (0, 1, 4, 5) = tp x pp, rank 3 of 4
===========================================  ===============
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from scoped_parallel import scope
from scoped_parallel.errors import (
    DistributedNotInitializedError,
    LayoutError,
    ScopedParallelError,
    describe_state,
)
from scoped_parallel.getters import Getters
from scoped_parallel.groups import table as group_table
from scoped_parallel.groups.plan import StateSpec
from scoped_parallel.groups.view import GroupView
from scoped_parallel.layout.axes import AXES
from scoped_parallel.layout.checks import DEFAULT_ORDER, as_int
from scoped_parallel.layout.grid import ParallelLayout
from scoped_parallel.layout.kinds import normalise_kind
from scoped_parallel.layout.optional import OptionalGroups
from scoped_parallel.store import StateStore

__all__ = ["ParallelState"]

class ParallelState(Getters):
    """The process groups of one model's parallel layout.

    Build it from a :class:`~scoped_parallel.ParallelLayout`, or with the layout's
    keywords directly (Megatron's names)::

        actor = ParallelState(ParallelLayout(8, tensor_model_parallel_size=2), name="actor")
        critic = ParallelState(name="critic", tensor_model_parallel_size=2)  # same thing

    Args:
        layout: the rank layout. Without it, the keyword form applies:
            ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
            ``context_parallel_size``, ``sequence_parallel_size``,
            ``expert_model_parallel_size``, ``expert_tensor_parallel_size`` and ``order``
            as in :class:`~scoped_parallel.ParallelLayout`; ``world_size`` (default: the
            rest of the world after ``rank_offset``) and ``rank_offset`` place a model on a
            subset of ranks, e.g. an actor on ranks 0-3 and a critic on 4-7.
        name: a label used in messages, ``repr`` and group descriptions.
        backend: backend of every group (default: the default group's backend).
        timeout: a :class:`datetime.timedelta` for group creation/collectives and for the
            agreement check between ranks.
        share_groups: reuse a process group already held by another state when the ranks,
            backend, options and timeout are identical (reference-counted).
        backends: per-kind backend, e.g. ``{"dp": "gloo"}``.
        pg_options: per-kind backend options, e.g. ``{"dp": ProcessGroupNCCL.Options(...)}``.
        create_gloo_process_groups: also build gloo twins of the dp, dp-cp and edp groups
            (Megatron's CPU-side groups for checkpoint collectives).
        num_distributed_optimizer_instances: Megatron's option (partial dp-cp/edp groups).
        hierarchical_context_parallel_sizes: Megatron's option (CP sub-groups per level).
        hybrid_context_parallel: Megatron's option (power-of-two slices of dp-cp).
        create_all_gather_group: Megatron's option (a second dp-cp communicator); all four
            as in :mod:`scoped_parallel.layout.optional`, with Megatron's rank sets.

    A rank outside the layout's ranks may construct the state (it builds nothing and
    waits for nobody); every getter then raises
    :class:`~scoped_parallel.errors.RankNotInLayoutError`.
    """

    def __init__(
        self,
        layout: ParallelLayout | None = None,
        *,
        name: str | None = None,
        backend: str | None = None,
        timeout: timedelta | None = None,
        share_groups: bool = True,
        backends: Mapping[str, str] | None = None,
        pg_options: Mapping[str, Any] | None = None,
        create_gloo_process_groups: bool = False,
        num_distributed_optimizer_instances: int = 1,
        hierarchical_context_parallel_sizes: Any = None,
        hybrid_context_parallel: bool = False,
        create_all_gather_group: bool = False,
        **layout_keywords: Any,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(
                f"timeout must be a datetime.timedelta (as in torch.distributed), got {timeout!r}; "
                "e.g. timeout=datetime.timedelta(minutes=10)"
            )
        optional = OptionalGroups.from_arguments(
            num_distributed_optimizer_instances,
            hierarchical_context_parallel_sizes,
            hybrid_context_parallel,
            create_all_gather_group,
        )
        world = _check_world()
        self._layout = _layout_in_world(layout, name, world, layout_keywords)
        optional.check(self._layout)
        self._optional = optional
        self._spec = StateSpec(
            layout=self._layout,
            name=name,
            backend=backend,
            timeout=timeout,
            share=bool(share_groups),
            backends=_per_kind(backends, "backends"),
            options=_per_kind(pg_options, "pg_options"),
            gloo_twins=bool(create_gloo_process_groups),
            optional=optional.fingerprint(),
        )
        self._name = name
        self._rank = dist.get_rank()
        describe = _describer(self)
        #: the adapters' records, Megatron's override values and memoized answers (one store)
        self.store = StateStore(describe)
        # An empty view until build() returns: messages raised during the build may describe
        # the state, and a failed build leaves nothing held.
        #: this rank's view of the group table: what every getter reads
        self.groups = GroupView(group_table.GroupTable(), self._layout, self._rank, describe)
        self._table, self._tag = group_table.build(self._spec, optional, self._rank, world, describe)
        self.groups = GroupView(self._table, self._layout, self._rank, describe)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> ParallelState:
        """Build a state from a DeepSpeed config (dict, JSON path or ``DeepSpeedConfig``).

        Sizes come from ``overrides`` first, then the config (``tensor_parallel.autotp_size``,
        ``sequence_parallel_size``, a ``scoped_parallel`` section, ... see
        :mod:`scoped_parallel.layout.config`), then the defaults. Contradictory or unknown values
        raise :class:`~scoped_parallel.errors.LayoutError` naming the key, before any
        communication.

        Example::

            ParallelState.from_config({"train_batch_size": 8, "sequence_parallel_size": 2},
                                      name="actor")
        """
        from scoped_parallel.layout.config import check_data_parallel_size, load_config, sizes_from_config

        kwargs = sizes_from_config(load_config(config), overrides)
        expected_dp = kwargs.pop("_data_parallel_size", None)
        if expected_dp is not None and dist.is_available() and dist.is_initialized():
            check_data_parallel_size(kwargs, expected_dp, dist.get_world_size())
        return cls(**kwargs)

    def destroy(self) -> None:
        """Release this state's groups (a shared group dies with its last user). Idempotent.

        Local, like torch's ``destroy_process_group``: no rank waits for another. Destroy a
        state after its ranks have used it (or passed a barrier); a gloo group destroyed right
        after its creation can close the sockets of a slower peer that is still connecting it.
        """
        if self.groups.closed:
            return
        self.groups.close()
        self.store.close(self)  # adapters may cache answers derived from the groups
        self._table.release()

    def set_override(self, key: str, value: Any) -> None:
        """Set (``None``: clear) one of Megatron's per-process override values, for this state.

        Megatron's ``set_tensor_model_parallel_world_size`` and friends write module globals
        that its getters answer first; here every state has its own: the keys are those of
        :data:`scoped_parallel.getters.table.SETTERS` (``"tp_size"``, ``"vpp_rank"``, ...), and
        the getters whose table row names the key answer the value first. The Megatron and
        DeepSpeed adapters and ``compat`` route their setters here. Example::

            state.set_override("tp_size", 4)
            state.get_tensor_model_parallel_world_size()   # 4
        """
        self.store.set_override(key, value)

    def override(self, key: str) -> Any:
        """The value :meth:`set_override` set for ``key`` in this state, or ``None``."""
        return self.store.override(key)

    def adapter_record(self, owner: str, factory: Callable[[ParallelState], Any]) -> Any:
        """The per-state data of adapter ``owner``: ``factory(state)`` on first use, then the same object.

        The one storage contract for adapters (and compat): whatever an adapter derives from
        a state lives here, under the adapter's name, and :meth:`destroy` drops it (first
        calling the record's ``state_destroyed(state)`` if it has one). Example::

            record = state.adapter_record("deepspeed", Record)   # Record(state) once per state
        """
        return self.store.record(owner, factory, self)

    # ------------------------------------------------------------------ identity

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self._rank

    @property
    def name(self) -> str | None:
        """The label given at construction (messages, ``repr``, group descriptions)."""
        return self._name

    @property
    def layout(self) -> ParallelLayout:
        """The state's :class:`~scoped_parallel.ParallelLayout` (pure rank math)."""
        return self._layout

    @property
    def is_member(self) -> bool:
        """Whether this rank belongs to the state's ranks."""
        return self.groups.member

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` was called."""
        return self.groups.closed

    @property
    def optional_groups(self) -> OptionalGroups:
        """The Megatron options for optional groups this state was built with (:mod:`scoped_parallel.layout.optional`)."""
        return self._optional

    def __repr__(self) -> str:
        sizes = repr(self._layout)[len("ParallelLayout(") : -1]
        where = f"rank {self._rank}" if self.is_member else f"rank {self._rank} (not a member)"
        gone = ", destroyed" if self.groups.closed else ""
        head = f"{self._name!r}, " if self._name else ""
        return f"ParallelState({head}{sizes}; {where}{gone})"

    def activate(self) -> scope.Activation:
        """A context manager / decorator making this state the current one.

        ``with actor.activate(): ...`` — nestable, exception-safe, per thread and per
        asyncio task (see the README's scope rules).
        """
        if self.groups.closed:
            raise ScopedParallelError(
                f"{describe_state(self)} was destroyed and cannot be activated; build a new ParallelState "
                "(with the same arguments on every rank) if you need its layout again"
            )
        return scope.Activation(self)

    def bind(self, engine: Any) -> Any:
        """Make ``engine``'s calls run inside this state's scope; return the engine.

        Wraps ``engine(...)`` (``__call__``) and, where the engine has them,
        ``scoped_parallel.scope.BOUND_METHODS`` (forward, backward, step, train/eval batch, checkpoint
        save/load), so a training loop need not wrap every call in ``with``.
        Reversible with :meth:`unbind`; binding an engine that another state holds
        raises ``ScopedParallelError``.
        """
        return scope.bind(self, engine)

    def unbind(self, engine: Any) -> Any:
        """Undo :meth:`bind`; return the engine."""
        return scope.unbind(self, engine)

    # ------------------------------------------------------------------ groups by kind

    def group(self, kind: str) -> Any:
        """The process group of ``kind`` (e.g. ``"tp"``, ``"dp-cp"``, ``"etp-ep"``) on this rank."""
        return self.groups.checked(kind).group

    def ranks(self, kind: str) -> tuple[int, ...]:
        """Global ranks of this rank's ``kind`` group."""
        return self.groups.checked(kind).ranks

    def size(self, kind: str) -> int:
        """How many ranks this rank's ``kind`` group has."""
        return len(self.groups.checked(kind).ranks)

    def rank_in(self, kind: str) -> int:
        """This rank's index inside its ``kind`` group."""
        return self.groups.checked(kind).index

    def kinds(self) -> tuple[str, ...]:
        """The group kinds this rank holds."""
        return self.groups.kinds()

    def gloo_group(self, kind: str) -> Any:
        """The gloo twin of ``kind`` (dp, dp-cp or edp) built with ``create_gloo_process_groups=True``."""
        return self.groups.gloo(kind)

    def derived_groups(self, purpose: str, rank_sets: Any) -> tuple[Any, ...]:
        """Process groups over ``rank_sets`` (each a subset of the state's ranks holding this rank).

        For groups an adapter derives from the layout that are no layout kind (ZeRO++'s hpZ
        and all-to-all groups), built like the state's own: member-only (every member of a set
        calls this with the same ``purpose``), shared with an identical group, in the one
        global order, once per ``(purpose, ranks)``, kept in the state's group table and
        released by :meth:`destroy`. Returns the groups in the order of ``rank_sets``
        (see ``scoped_parallel.groups.table.derive``).
        """
        self.groups.check_member()  # destroyed or not a member: the explanatory error
        return group_table.derive(self._table, self._spec, self._tag, purpose, rank_sets, describe_state(self))


def _describer(state: ParallelState) -> Callable[[], str]:
    """How the state's view and store name it in messages (a weak reference: no cycle keeps it
    alive; a view or store that outlives its state names it as it was built)."""
    ref = weakref.ref(state)
    fallback = f"ParallelState {state.name!r}" if state.name else "a ParallelState that no longer exists"

    def describe() -> str:
        alive = ref()
        return describe_state(alive) if alive is not None else fallback

    return describe


# ---------------------------------------------------------------------- constructor arguments
#
# Checked and normalised before any communication, in this order: torch.distributed is
# up, the layout (given or built from the keyword form) fits the world, per-kind
# backends and options under canonical kinds.

def _per_kind(mapping: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping from group kind to value, got {mapping!r}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            out[normalise_kind(key)] = value
        except LayoutError as err:
            raise LayoutError(f"{what}: {err}") from None
    return out


def _check_world() -> int:
    """The world size; raises when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedNotInitializedError(
            "ParallelState needs torch.distributed to be initialized first: call "
            "torch.distributed.init_process_group(...) (or deepspeed.init_distributed()) "
            "before building a state."
        )
    return dist.get_world_size()


def _layout_in_world(
    layout: ParallelLayout | None, name: str | None, world: int, keywords: dict[str, Any]
) -> ParallelLayout:
    """The state's layout: given, or built from the keyword form on the rest of the world."""
    if layout is not None:
        if not isinstance(layout, ParallelLayout):
            raise TypeError(f"layout must be a ParallelLayout, got {layout!r}")
        if keywords:
            raise TypeError(
                f"ParallelState got a layout and also {sorted(keywords)}; the layout already fixes "
                "the sizes, order, world_size and rank_offset: pass one or the other"
            )
        rank_offset, world_size = layout.rank_offset, layout.world_size
    else:
        rank_offset = as_int("rank_offset", keywords.pop("rank_offset", 0))
        world_size = keywords.pop("world_size", None)
        world_size = world - rank_offset if world_size is None else as_int("world_size", world_size)
    if rank_offset >= world or rank_offset + world_size > world:
        raise LayoutError(
            f"ParallelState {name!r} spans ranks {rank_offset}..{rank_offset + world_size - 1} "
            f"(rank_offset={rank_offset}, world_size={world_size}) but the process world has "
            f"{world} ranks (0..{world - 1}); lower world_size or rank_offset."
        )
    if layout is None:
        layout = ParallelLayout(world_size, rank_offset=rank_offset, **keywords)
    return layout


def _keyword_signature(init: Any) -> inspect.Signature:
    """``ParallelState.__init__`` as introspection shows it: the layout keywords spelled out."""
    base = inspect.signature(init)
    params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    P = inspect.Parameter
    params += [
        P(axis.keyword, P.KEYWORD_ONLY, default=axis.default, annotation="int | None" if axis.default is None else "int")
        for axis in AXES
    ]
    params += [
        P("order", P.KEYWORD_ONLY, default=DEFAULT_ORDER, annotation="str"),
        P("world_size", P.KEYWORD_ONLY, default=None, annotation="int | None"),
        P("rank_offset", P.KEYWORD_ONLY, default=0, annotation="int"),
    ]
    return base.replace(parameters=params)


ParallelState.__init__.__signature__ = _keyword_signature(ParallelState.__init__)  # type: ignore[attr-defined]
