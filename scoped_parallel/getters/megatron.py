"""The Megatron getters that are more than one kind's group: variants, optional groups, virtual stages.

``MegatronMethods`` is the one base class of a state's getters: its methods
answer the ``METHOD`` rows of :mod:`scoped_parallel.getters.table` (variant keywords
such as ``with_context_parallel``, the embedding groups, Megatron's optional groups and
``process_group_collection()``); :mod:`scoped_parallel.getters` adds a method per simple
row. Everything is answered from three public fields of the state: ``groups``, its
:class:`~scoped_parallel.groups.view.GroupView` (a kind's group in one dict lookup, the
explanatory errors, Megatron's optional groups by slot), ``store``, its
:class:`~scoped_parallel.store.StateStore` (the values Megatron's setters wrote), and
``optional_groups`` (the options Megatron's optional groups were built with).

Optional groups answer what megatron-core's getter of the same name answers after
``initialize_model_parallel`` with the same options (checked against megatron-core by
``tests/getters/test_megatron_oracle.py``): a group the state's options did not ask for is
``None`` with ``check_initialized=False`` (Megatron's answer), or the group Megatron
uses in its place (the dp-cp group as the "partial" group with one
distributed-optimizer instance); asked for with ``check_initialized=True``, where
Megatron's assertion fails, it raises :class:`~scoped_parallel.errors.GroupNotAvailableError`
naming the option to set. ``process_group_collection()`` and ``device_mesh()`` are the
views for other libraries of :mod:`scoped_parallel.getters.views`.

On rank 5 of 8 with ``tensor_model_parallel_size=2, pipeline_model_parallel_size=2``:
``get_data_parallel_group()`` spans (5, 7), ``get_data_parallel_src_rank()`` is 5,
``is_pipeline_last_stage()`` is true and ``get_pipeline_model_parallel_next_rank()`` is 1.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

from scoped_parallel.errors import GroupNotAvailableError, describe_state
from scoped_parallel.getters import views

if TYPE_CHECKING:
    from scoped_parallel.groups.view import GroupView
    from scoped_parallel.layout.optional import OptionalGroups
    from scoped_parallel.store import StateStore

__all__ = ["MegatronMethods"]


class MegatronMethods:
    """Megatron's getters with variants, optional groups and virtual stages, and the views for other libraries (see the module doc)."""

    __slots__ = ()

    if TYPE_CHECKING:  # the public fields of scoped_parallel.state.ParallelState the getters read
        groups: GroupView
        store: StateStore
        optional_groups: OptionalGroups

    # ------------------------------------------------------------------ tensor / pipeline

    def is_initialized(self) -> bool:
        """Whether the state still holds its groups (false after :meth:`destroy`)."""
        return not self.groups.closed

    def model_parallel_is_initialized(self) -> bool:
        """Whether the state holds groups on this rank (a live member)."""
        return not self.groups.closed and self.groups.member

    def get_pipeline_model_parallel_next_rank(self) -> int:
        """Global rank of the next pipeline stage (the last wraps to the first)."""
        ranks = self.groups.ranks("pp")
        return ranks[(self.groups.index("pp") + 1) % len(ranks)]

    def get_pipeline_model_parallel_prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (the first wraps to the last)."""
        ranks = self.groups.ranks("pp")
        return ranks[(self.groups.index("pp") - 1) % len(ranks)]

    def get_virtual_pipeline_model_parallel_rank(self) -> int | None:
        """The virtual pipeline rank set with Megatron's setter in this state's scope (``None`` unset)."""
        return self.store.overrides.get("vpp_rank")  # type: ignore[no-any-return]

    def get_virtual_pipeline_model_parallel_world_size(self) -> int | None:
        """The virtual pipeline size set with Megatron's setter in this state's scope (``None`` unset)."""
        return self.store.overrides.get("vpp_size")  # type: ignore[no-any-return]

    def _virtual_stage_is(self, ignore_virtual: bool, vp_stage: int | None, wanted: int) -> bool:
        """Megatron's virtual-stage test: true unless virtual stages count and ``vp_stage`` is not ``wanted``."""
        vpp = self.store.overrides.get("vpp_size")
        if ignore_virtual or vpp is None:
            return True
        assert vp_stage is not None, "vp_stage must be passed if virtual pipeline is enabled"
        return vp_stage == (wanted if wanted >= 0 else vpp + wanted)

    def is_pipeline_first_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank is in the first pipeline stage (and, with virtual stages counted, ``vp_stage`` 0)."""
        if not self._virtual_stage_is(ignore_virtual, vp_stage, 0):
            return False
        return self.get_pipeline_model_parallel_rank() == 0  # type: ignore[attr-defined, no-any-return]

    def is_pipeline_last_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank is in the last pipeline stage (and, with virtual stages counted, the last ``vp_stage``)."""
        if not self._virtual_stage_is(ignore_virtual, vp_stage, -1):
            return False
        rank = self.get_pipeline_model_parallel_rank()  # type: ignore[attr-defined]
        return rank == self.get_pipeline_model_parallel_world_size() - 1  # type: ignore[attr-defined, no-any-return]

    def _dp_kind(self, with_context_parallel: bool, partial_data_parallel: bool = False) -> str:
        if partial_data_parallel and not with_context_parallel:
            raise GroupNotAvailableError(
                "partial_data_parallel=True needs with_context_parallel=True (Megatron: the "
                "partial data parallel group of a distributed-optimizer instance includes CP)"
            )
        return "dp-cp" if with_context_parallel else "dp"

    def get_data_parallel_group(
        self,
        with_context_parallel: bool = False,
        partial_data_parallel: bool = False,
        independent_all_gather: bool = False,
        with_gtp_remat: bool = True,
    ) -> Any:
        """Data-parallel group; excludes SP ranks (they see the same batch), see sequence_data.

        ``partial_data_parallel=True`` (with context parallel): the dp-cp ranks of this
        rank's distributed-optimizer instance; ``independent_all_gather=True``: the
        separate all-gather twin of dp-cp (``create_all_gather_group=True``).
        """
        if not (with_context_parallel or partial_data_parallel):
            return self.groups.group("dp")  # hot: DeepSpeed asks at every step
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        if partial_data_parallel:
            return self._intra_group("dp-cp")
        if with_context_parallel and independent_all_gather:
            return self._all_gather_group()
        return self.groups.group(kind)

    def get_data_parallel_group_gloo(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> Any:
        """The gloo twin of this rank's data parallel group, dp x cp with ``with_context_parallel=True`` (``create_gloo_process_groups=True``)."""
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        return self._intra_group(kind, gloo=True) if partial_data_parallel else self.groups.gloo(kind)

    def get_data_parallel_world_size(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False, with_gtp_remat: bool = True
    ) -> int:
        """Size of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        return len(self._intra_ranks(kind)) if partial_data_parallel else self.groups.size(kind)

    def get_data_parallel_rank(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False, with_gtp_remat: bool = True
    ) -> int:
        """This rank's index in its data parallel group (dp x cp with ``with_context_parallel=True``).

        A value set with Megatron's ``set_data_parallel_rank`` in this state's scope answers first.
        """
        value = self.store.overrides.get("dp_rank")
        if value is not None:
            return value  # type: ignore[no-any-return]
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        if partial_data_parallel:
            return self._intra_ranks(kind).index(self.groups.rank)
        return self.groups.index(kind)

    def get_data_parallel_src_rank(self, with_context_parallel: bool = False) -> int:
        """Global rank of the first member of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self.groups.ranks(self._dp_kind(with_context_parallel))[0]

    def get_data_parallel_global_ranks(self, with_context_parallel: bool = False) -> tuple[int, ...]:
        """Global ranks of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self.groups.ranks(self._dp_kind(with_context_parallel))

    def get_tensor_and_data_parallel_group(
        self, check_initialized: bool = True, with_context_parallel: bool = False
    ) -> Any:
        """This rank's tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self.groups.group("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_world_size(self, with_context_parallel: bool = False) -> int:
        """Size of this rank's tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self.groups.size("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        """This rank's index in its tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self.groups.index("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_expert_data_parallel_group(
        self, check_initialized: bool = True, partial_expert_data_parallel: bool = False, with_gtp_remat: bool = True
    ) -> Any:
        """This rank's expert data parallel group (of its distributed-optimizer instance with ``partial_expert_data_parallel=True``)."""
        if partial_expert_data_parallel:
            return self._intra_group("edp")
        return self.groups.group("edp")

    def get_expert_data_parallel_group_gloo(self, partial_expert_data_parallel: bool = False) -> Any:
        """The gloo twin of this rank's expert data parallel group (``create_gloo_process_groups=True``)."""
        if partial_expert_data_parallel:
            return self._intra_group("edp", gloo=True)
        return self.groups.gloo("edp")

    def get_expert_data_parallel_world_size(self, partial_expert_data_parallel: bool = False, with_gtp_remat: bool = True) -> int:
        """Size of this rank's expert data parallel group."""
        return len(self._intra_ranks("edp")) if partial_expert_data_parallel else self.groups.size("edp")

    def get_expert_data_parallel_rank(self, partial_expert_data_parallel: bool = False, with_gtp_remat: bool = True) -> int:
        """This rank's index in its expert data parallel group."""
        if partial_expert_data_parallel:
            return self._intra_ranks("edp").index(self.groups.rank)
        return self.groups.index("edp")

    def get_expert_tensor_model_pipeline_parallel_group(
        self, check_initialized: bool = True, with_egtp_remat: bool = False
    ) -> Any:
        """This rank's expert tensor x expert model x pipeline parallel group (the same with
        ``with_egtp_remat=True``: every state's expert GTP size is 1)."""
        return self.groups.group("etp-ep-pp")

    # megatron-core 0.19's generalized tensor parallelism with weight rematerialisation (GTP):
    # a state has no GTP axis, so its GTP groups are Megatron's for gtp_remat_size=1, a group of
    # this rank alone; the with_gtp_remat/with_egtp_remat variants of the data parallel getters
    # therefore have the same ranks as the plain ones.

    def get_gtp_weight_remat_group(self, check_initialized: bool = True) -> Any:
        """This rank's GTP weight-rematerialisation group: this rank alone (gtp_remat_size is 1)."""
        return self._opt_group("gtp")

    def get_gtp_weight_remat_world_size(self) -> int:
        """1: a state has no GTP axis (megatron-core 0.19's gtp_remat_size=1)."""
        self.groups.check_member()
        return 1

    def get_gtp_weight_remat_rank(self) -> int:
        """0: this rank is its GTP group's only member."""
        self.groups.check_member()
        return 0

    def get_gtp_weight_remat_global_ranks(self, check_initialized: bool = True) -> tuple[int, ...]:
        """``(this rank,)``: the members of this rank's GTP group."""
        self.groups.check_member()
        return (self.groups.rank,)

    def get_expert_gtp_weight_remat_group(self, check_initialized: bool = True) -> Any:
        """The expert twin of :meth:`get_gtp_weight_remat_group` (the same group of this rank alone)."""
        return self.get_gtp_weight_remat_group(check_initialized)

    def get_expert_gtp_weight_remat_world_size(self) -> int:
        """1, as :meth:`get_gtp_weight_remat_world_size`."""
        return self.get_gtp_weight_remat_world_size()

    def get_expert_gtp_weight_remat_rank(self) -> int:
        """0, as :meth:`get_gtp_weight_remat_rank`."""
        return self.get_gtp_weight_remat_rank()

    def get_expert_gtp_weight_remat_global_ranks(self, check_initialized: bool = True) -> tuple[int, ...]:
        """``(this rank,)``, as :meth:`get_gtp_weight_remat_global_ranks`."""
        return self.get_gtp_weight_remat_global_ranks()

    def is_rank_in_embedding_group(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank holds a word-embedding group (first or last pipeline stage).

        With virtual stages counted (``ignore_virtual=False``), only for the first virtual
        stage on the first rank of the group and the last one on its last rank, as in Megatron.
        """
        if not self.groups.holds("embd"):
            return False
        entry = self.groups.entry("embd")
        if ignore_virtual:
            return True
        if self.groups.rank == entry.ranks[0]:
            return self.is_pipeline_first_stage(False, vp_stage)
        if self.groups.rank == entry.ranks[-1]:
            return self.is_pipeline_last_stage(False, vp_stage)
        return True

    def is_rank_in_position_embedding_group(self) -> bool:
        """Whether this rank holds a position-embedding group (first pipeline stage)."""
        return self.groups.holds("pos-embd")

    def get_embedding_group(self, check_initialized: bool = True) -> Any:
        """This rank's word-embedding group (``None`` off the embedding stages with ``check_initialized=False``, as in Megatron)."""
        if not check_initialized and not self.groups.holds("embd"):
            return None
        return self.groups.group("embd")

    def get_position_embedding_group(self, check_initialized: bool = True) -> Any:
        """This rank's position-embedding group (``None`` off the first stage with ``check_initialized=False``, as in Megatron)."""
        if not check_initialized and not self.groups.holds("pos-embd"):
            return None
        return self.groups.group("pos-embd")

    # ------------------------------------------------------------------ optional groups

    def _opt_group(self, slot: str) -> Any:
        entry = self.groups.optional(slot)  # destroyed / not a member: the explanatory error
        if entry is None:
            raise GroupNotAvailableError(f"{describe_state(self)} holds no optional group {slot!r}")
        return entry.group

    def _missing(self, what: str, option: str) -> GroupNotAvailableError:
        return GroupNotAvailableError(
            f"{describe_state(self)} has no {what}: Megatron builds it only with {option}; build the "
            f"state with ParallelState(..., {option}) (check_initialized=False answers None, as "
            "Megatron does)"
        )

    def _intra_ranks(self, kind: str) -> tuple[int, ...]:
        """Ranks of the partial (one optimizer instance) ``kind`` group: ``dp-cp`` or ``edp``."""
        entry = self.groups.optional("intra-" + kind)
        return entry.ranks if entry is not None else self.groups.ranks(kind)

    def _intra_group(self, kind: str, gloo: bool = False) -> Any:
        """The partial ``kind`` group; with one instance Megatron's answer is the full group."""
        slot = "intra-" + kind
        entry = self.groups.optional(slot)
        if entry is None:
            return self.groups.gloo(kind) if gloo else self.groups.group(kind)
        return self.groups.gloo(slot) if gloo else entry.group

    def get_intra_distributed_optimizer_instance_group(self, check_initialized: bool = True) -> Any:
        """Every rank of this rank's distributed-optimizer instance (all the state's ranks with one)."""
        return self._opt_group("dist-opt")

    def get_inter_distributed_optimizer_instance_group(self, check_initialized: bool = True) -> Any:
        """The group across distributed-optimizer instances (expert data parallel ranks that
        hold the same shard); ``None`` with one instance, as in Megatron."""
        entry = self.groups.optional("inter-edp")
        if entry is not None:
            return entry.group
        if check_initialized:
            raise self._missing("inter distributed-optimizer instance group", "num_distributed_optimizer_instances=2")
        return None

    def get_hierarchical_context_parallel_groups(self, check_initialized: bool = True) -> Any:
        """The context parallel sub-groups of each level (``hierarchical_context_parallel_sizes``)."""
        levels = len(self.optional_groups.hierarchical_context_parallel_sizes)
        if levels:
            return [self._opt_group(f"hcp/{level}") for level in range(levels)]
        self.groups.check_member()
        if check_initialized:
            raise self._missing("hierarchical context parallel groups", "hierarchical_context_parallel_sizes=[...]")
        return None

    def get_hybrid_data_context_parallel_groups(self, check_initialized: bool = True, group_size: int | None = None) -> Any:
        """The hybrid data x context parallel group of ``group_size`` ranks holding this rank
        (the dp-cp group itself when ``group_size`` is its size)."""
        if len(self.groups.ranks("dp-cp")) == group_size:
            return self.groups.group("dp-cp")
        entry = self.groups.optional(f"hybrid/{group_size}")
        if entry is not None:
            return entry.group
        if not self.optional_groups.hybrid_context_parallel:
            raise self._missing(f"hybrid data x context parallel group of size {group_size!r}", "hybrid_context_parallel=True")
        sizes = sorted(int(slot.split("/")[1]) for slot in self.groups.optional_slots("hybrid/"))
        raise GroupNotAvailableError(
            f"{describe_state(self)} has no hybrid data x context parallel group of size {group_size!r}; "
            f"Megatron builds sizes {sizes} and {len(self.groups.ranks('dp-cp'))} (the dp-cp group)"
        )

    def has_separate_all_gather_group(self) -> bool:
        """Whether the state has a separate all-gather twin of dp-cp (``create_all_gather_group=True``)."""
        return self.groups.optional("dp-cp/ag") is not None

    def _all_gather_group(self) -> Any:
        entry = self.groups.optional("dp-cp/ag")
        if entry is None:
            raise self._missing("separate all-gather dp-cp group", "create_all_gather_group=True")
        return entry.group

    def get_amax_reduction_group(self, with_context_parallel: bool = False, tp_only_amax_red: bool = False) -> Any:
        """FP8 amax reduction group: Megatron's choice among tp-dp(-cp), tp-cp and tp."""
        if tp_only_amax_red:
            return self.groups.group("tp-cp" if with_context_parallel else "tp")
        return self.groups.group("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_data_modulo_expert_parallel_group(self, partial_expert_data_parallel: bool = False) -> Any:
        """Deprecated alias of ``get_expert_data_parallel_group`` (warns, as Megatron does)."""
        warnings.warn(
            "get_data_modulo_expert_parallel_group is deprecated, please use "
            "get_expert_data_parallel_group instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.get_expert_data_parallel_group(partial_expert_data_parallel=partial_expert_data_parallel)

    def get_all_ranks(self) -> str:
        """This rank's tp, dp, cp, pp and ep indices joined by ``_`` (Megatron's format).

        With a megatron-core that has GTP (0.19) loaded, its format: the GTP index (always 0
        here) follows the tp index, e.g. ``"1_0_0_0_1_0"``.
        """
        ranks = [self.groups.index(k) for k in ("tp", "dp", "cp", "pp", "ep")]
        megatron = sys.modules.get("megatron.core.parallel_state")
        if megatron is not None and hasattr(megatron, "get_gtp_weight_remat_rank"):
            ranks.insert(1, 0)
        return "_".join(map(str, ranks))

    def process_group_collection(self, required_pgs: list[str] | None = None, collection_class: Any = None) -> Any:
        """Megatron's ``ProcessGroupCollection`` holding this state's own groups (none created).

        For models and DDP that take groups explicitly, with no scope needed:
        ``GPTModel(config, spec, ..., pg_collection=state.process_group_collection())``.
        Each field holds what ``ProcessGroupCollection.use_mpu_process_groups()`` would
        find inside this state's scope (``None`` where Megatron has ``None``, e.g. ``embd``
        off the first/last pipeline stage); only the fields the installed megatron-core
        defines are filled. ``required_pgs`` restricts the fields, as in Megatron.

        megatron-core 0.13/0.14 have no ``ProcessGroupCollection``: the default there is
        ``ModelCommProcessGroups`` (what their models take as ``model_comm_pgs=``); pass
        ``collection_class=GradCommProcessGroups`` (or any dataclass with Megatron's field
        names) for the others. See :mod:`scoped_parallel.getters.views`.
        """
        return views.process_group_collection(self, required_pgs, collection_class)

    def device_mesh(self, dims: tuple[str, ...] | None = None, device_type: str | None = None) -> Any:
        """A ``torch.distributed.device_mesh.DeviceMesh`` over this state's own groups.

        No communicator is created: each mesh dimension is the state's group of that axis.
        ``dims`` names the dimensions, outermost first, from ``tp``, ``cp``, ``sp``, ``dp``,
        ``pp``; by default every axis of size > 1 in the layout's order, slowest first
        (e.g. ``("pp", "dp", "tp")`` for the default order), or ``("dp",)`` when all are 1.
        Every axis of size > 1 must be named, so the mesh covers exactly the state's ranks.
        See :mod:`scoped_parallel.getters.views`.
        """
        return views.device_mesh(self, dims, device_type)
