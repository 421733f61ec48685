"""``ParallelState``: one model's process groups, switched in with a scope.

A state is built collectively by the ranks of its layout (each rank creates only
the groups it belongs to), answers Megatron's and DeepSpeed's getter names from
its own groups (the mixins :class:`~scoped_parallel._megatron_getters.MegatronGetters`
and :class:`~scoped_parallel._deepspeed_getters.DeepSpeedGetters`), and is made
current with ``with state.activate():``. It is a complete DeepSpeed ``mpu``:
``deepspeed.initialize(model=..., mpu=state)``. Planning and the agreement check
live in :mod:`scoped_parallel._plan`, group creation in :mod:`scoped_parallel._groups`,
engine binding in :mod:`scoped_parallel._bind`, the DeviceMesh view in
:mod:`scoped_parallel._mesh`.

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

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from scoped_parallel import _bind, _build, _groups, _mesh
from scoped_parallel import _torch_compat as compat
from scoped_parallel._deepspeed_getters import DeepSpeedGetters
from scoped_parallel._kinds import normalise_kind
from scoped_parallel._megatron_getters import MegatronGetters
from scoped_parallel._megatron_optional import MegatronOptionalGetters
from scoped_parallel._optional_groups import OptionalGroups
from scoped_parallel._plan import StateSpec, agree_with_peers, construction_tag
from scoped_parallel._scope import Activation
from scoped_parallel._state_args import check_world, keyword_signature, layout_in_world, per_kind
from scoped_parallel.errors import GroupNotAvailableError, RankNotInLayoutError, ScopedParallelError
from scoped_parallel.layout import ParallelLayout

__all__ = ["BOUND_METHODS", "ParallelState"]

BOUND_METHODS = _bind.BOUND_METHODS


class ParallelState(MegatronOptionalGetters, MegatronGetters, DeepSpeedGetters):
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
            as in :mod:`scoped_parallel._optional_groups`, with Megatron's rank sets.

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
        world = check_world()
        self._layout = layout_in_world(layout, name, world, layout_keywords)
        optional.check(self._layout)
        self._optional = optional
        self._spec = StateSpec(
            layout=self._layout,
            name=name,
            backend=backend,
            timeout=timeout,
            share=bool(share_groups),
            backends=per_kind(backends, "backends"),
            options=per_kind(pg_options, "pg_options"),
            gloo_twins=bool(create_gloo_process_groups),
            optional=optional.fingerprint(),
        )
        self._name = name
        self._rank = dist.get_rank()
        self._groups: dict[str, Any] = {}
        self._gloo: dict[str, Any] = {}
        #: groups derived from the layout for an adapter (hpZ, all-to-all): (purpose, ranks) -> group
        self._derived: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._ranks_of: dict[str, tuple[int, ...]] = {}
        #: Megatron's optional groups (slot -> ranks / group), see scoped_parallel._optional_groups
        self._opt_ranks: dict[str, tuple[int, ...]] = {}
        self._opt_groups: dict[str, Any] = {}
        self._opt_alias: dict[str, str] = {}
        self._live_ranks: dict[str, tuple[int, ...]] = {}  # empty unless usable
        self._my_index: dict[str, int] = {}
        self._destroyed = False
        #: per-state data of the adapters (keyed by adapter name); opaque to the core
        self._adapter_slots: dict[str, Any] = {}
        #: answers memoized by scoped_parallel._scope.dispatching(memoize=True)
        self._memo: dict[Any, Any] = {}
        self._tag = ""
        self._parents: list[Any] = []  # split mode: the parent group over the state's ranks
        bound = compat.bound_device() is not None
        member = self._layout.contains(self._rank)
        if not bound and not member:
            return  # member-only creation: a non-member takes part in nothing
        if member:
            self._ranks_of = dict(self._layout.groups_of(self._rank))
            self._plan_optional_groups(optional, bound)
        # With a device-bound default group the whole world splits together (see _split).
        self._tag = construction_tag(self._layout, (0, world) if bound else None)
        if str(dist.get_backend()) != "fake":
            agree_with_peers(
                self._spec,
                self._rank,
                {"world": tuple(range(world))} if bound else self._planned_ranks(),
                self._tag,
                compat.default_store(),
                timeout or compat.default_timeout(),
                self._label,
                span_size=world if bound else None,
            )
        split: dict[str, Any] = self._create_by_split(world) if bound else {}
        if not member:
            return
        self._create_groups(split)
        self._live_ranks = dict(self._ranks_of)
        self._my_index = {k: r.index(self._rank) for k, r in self._ranks_of.items()}

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> ParallelState:
        """Build a state from a DeepSpeed config (dict, JSON path or ``DeepSpeedConfig``).

        Sizes come from ``overrides`` first, then the config (``tensor_parallel.autotp_size``,
        ``sequence_parallel_size``, a ``scoped_parallel`` section, ... see
        :mod:`scoped_parallel._config`), then the defaults. Contradictory or unknown values
        raise :class:`~scoped_parallel.errors.LayoutError` naming the key, before any
        communication.

        Example::

            ParallelState.from_config({"train_batch_size": 8, "sequence_parallel_size": 2},
                                      name="actor")
        """
        from scoped_parallel._config import check_data_parallel_size, load_config, sizes_from_config

        kwargs = sizes_from_config(load_config(config), overrides)
        expected_dp = kwargs.pop("_data_parallel_size", None)
        if expected_dp is not None and dist.is_available() and dist.is_initialized():
            check_data_parallel_size(kwargs, expected_dp, dist.get_world_size())
        return cls(**kwargs)

    def _create_by_split(self, world: int) -> dict[str, Any]:
        return _build.create_by_split(self, world)

    def _plan_optional_groups(self, optional: Any, bound: bool) -> None:
        _build.plan_optional_groups(self, optional, bound)

    def _planned_ranks(self) -> dict[str, tuple[int, ...]]:
        return _build.planned_ranks(self)

    def _create_groups(self, split: dict[str, Any]) -> None:
        _build.create_groups(self, split)

    def destroy(self) -> None:
        """Release this state's groups (a shared group dies with its last user). Idempotent.

        Local, like torch's ``destroy_process_group``: no rank waits for another. Destroy a
        state after its ranks have used it (or passed a barrier); a gloo group destroyed right
        after its creation can close the sockets of a slower peer that is still connecting it.
        """
        if self._destroyed:
            return
        self._destroyed = True
        self._live_ranks = {}
        self._my_index = {}
        self._adapter_slots.clear()  # adapters may cache answers derived from the groups
        self._memo.clear()
        held = list(self._groups.values()) + list(self._gloo.values()) + list(self._opt_groups.values())
        held += list(self._derived.values()) + self._parents
        self._groups.clear()
        self._gloo.clear()
        self._opt_groups.clear()
        self._derived.clear()
        self._parents = []
        for group in held:
            _groups.release(group)

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
        return self._layout.contains(self._rank)

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` was called."""
        return self._destroyed

    def _label(self) -> str:
        return f"ParallelState {self._name!r}" if self._name else "ParallelState"

    def __repr__(self) -> str:
        sizes = repr(self._layout)[len("ParallelLayout(") : -1]
        where = f"rank {self._rank}" if self.is_member else f"rank {self._rank} (not a member)"
        gone = ", destroyed" if self._destroyed else ""
        head = f"{self._name!r}, " if self._name else ""
        return f"ParallelState({head}{sizes}; {where}{gone})"

    def activate(self) -> Activation:
        """A context manager / decorator making this state the current one.

        ``with actor.activate(): ...`` — nestable, exception-safe, per thread and per
        asyncio task (see the README's scope rules).
        """
        if self._destroyed:
            raise ScopedParallelError(
                f"{self._label()} was destroyed and cannot be activated; build a new ParallelState "
                "(with the same arguments on every rank) if you need its layout again"
            )
        return Activation(self)

    def bind(self, engine: Any) -> Any:
        """Make ``engine``'s calls run inside this state's scope; return the engine.

        Wraps ``engine(...)`` (``__call__``) and, where the engine has them,
        ``BOUND_METHODS`` (forward, backward, step, train/eval batch, checkpoint
        save/load), so a training loop need not wrap every call in ``with``.
        Reversible with :meth:`unbind`; binding an engine that another state holds
        raises ``ScopedParallelError``.
        """
        return _bind.bind(self, engine)

    def unbind(self, engine: Any) -> Any:
        """Undo :meth:`bind`; return the engine."""
        return _bind.unbind(self, engine)

    def device_mesh(self, dims: tuple[str, ...] | None = None, device_type: str | None = None) -> Any:
        """A ``torch.distributed.device_mesh.DeviceMesh`` over this state's own groups.

        No communicator is created: each mesh dimension is the state's group of that axis.
        ``dims`` names the dimensions, outermost first, from ``tp``, ``cp``, ``sp``, ``dp``,
        ``pp``; by default every axis of size > 1 in the layout's order, slowest first
        (e.g. ``("pp", "dp", "tp")`` for the default order), or ``("dp",)`` when all are 1.
        Every axis of size > 1 must be named, so the mesh covers exactly the state's ranks.
        """
        return _mesh.device_mesh(self, dims, device_type)

    # ------------------------------------------------------------------ groups by kind

    def _require(self, kind: str) -> str:
        if self._destroyed:
            raise GroupNotAvailableError(
                f"{self._label()} was destroyed; its groups are gone. Build a new ParallelState "
                "to use this layout again"
            )
        if not self.is_member:
            lo = self._layout.rank_offset
            raise RankNotInLayoutError(
                f"rank {self._rank} is not part of {self._label()} (ranks {lo}..{lo + self._layout.world_size - 1}), "
                "so it holds none of its groups; only call its getters on its own ranks "
                "(check state.is_member)."
            )
        kind = normalise_kind(kind)
        if kind not in self._ranks_of:
            if kind in ("embd", "pos-embd"):
                raise GroupNotAvailableError(
                    f"rank {self._rank} is not in an {kind!r} group of {self._label()} (only the "
                    "first/last pipeline stages are); check is_rank_in_embedding_group() first."
                )
            raise GroupNotAvailableError(
                f"{self._label()} holds no {kind!r} group; it holds {sorted(self._ranks_of)}."
            )
        return kind

    def group(self, kind: str) -> Any:
        """The process group of ``kind`` (e.g. ``"tp"``, ``"dp-cp"``, ``"etp-ep"``) on this rank."""
        return self._groups[self._require(kind)]

    def ranks(self, kind: str) -> tuple[int, ...]:
        """Global ranks of this rank's ``kind`` group."""
        return self._ranks_of[self._require(kind)]

    def size(self, kind: str) -> int:
        """How many ranks this rank's ``kind`` group has."""
        return len(self.ranks(kind))

    def rank_in(self, kind: str) -> int:
        """This rank's index inside its ``kind`` group."""
        return self.ranks(kind).index(self._rank)

    def kinds(self) -> tuple[str, ...]:
        """The group kinds this rank holds."""
        return tuple(self._ranks_of)

    def gloo_group(self, kind: str) -> Any:
        """The gloo twin of ``kind`` (dp, dp-cp or edp) built with ``create_gloo_process_groups=True``."""
        kind = self._require(kind)
        if kind not in self._gloo:
            raise GroupNotAvailableError(
                f"{self._label()} has no gloo twin of {kind!r}; build it with "
                "create_gloo_process_groups=True (twins exist for dp, dp-cp and edp)."
            )
        return self._gloo[kind]

    def derived_groups(self, purpose: str, rank_sets: Any) -> tuple[Any, ...]:
        """Process groups over ``rank_sets`` (each a subset of the state's ranks holding this rank).

        For groups an adapter derives from the layout that are no layout kind (ZeRO++'s hpZ
        and all-to-all groups), built like the state's own: member-only (every member of a set
        calls this with the same ``purpose``), shared with an identical group, in the one
        global order, once per ``(purpose, ranks)``, released by :meth:`destroy`. Returns
        the groups in the order of ``rank_sets``.
        """
        return _build.derived_groups(self, purpose, rank_sets)

    # Fast versions of group/ranks/size/rank_in for the getter mixins: ``kind`` is
    # canonical there, so a dict lookup answers; anything unusual (destroyed,
    # non-member, missing kind) takes the slow path, which raises the explanatory error.
    def _kind_group(self, kind: str) -> Any:
        try:
            return self._groups[kind]
        except KeyError:
            return self.group(kind)

    def _kind_ranks(self, kind: str) -> tuple[int, ...]:
        try:
            return self._live_ranks[kind]
        except KeyError:
            return self.ranks(kind)

    def _kind_size(self, kind: str) -> int:
        try:
            return len(self._live_ranks[kind])
        except KeyError:
            return self.size(kind)

    def _kind_rank(self, kind: str) -> int:
        try:
            return self._my_index[kind]
        except KeyError:
            return self.rank_in(kind)


ParallelState.__init__.__signature__ = keyword_signature(ParallelState.__init__)  # type: ignore[attr-defined]
