"""Megatron's optional groups as methods of a state, and its explicit group collection.

:class:`MegatronOptionalGetters` is a mixin of :class:`~scoped_parallel.ParallelState`.
Each method answers what megatron-core's getter of the same name answers after
``initialize_model_parallel`` with the same options (checked against megatron-core by
``tests/test_megatron_oracle.py``): a group the state's options did not ask for is
``None`` with ``check_initialized=False`` (Megatron's answer), or the group Megatron
uses in its place (the dp-cp group as the "partial" group with one
distributed-optimizer instance); asked for with ``check_initialized=True``, where
Megatron's assertion fails, it raises
:class:`~scoped_parallel.errors.GroupNotAvailableError` naming the option to set.

:meth:`~MegatronOptionalGetters.process_group_collection` hands the state's groups to
Megatron's explicit-groups API (``GPTModel(..., pg_collection=...)``). It is the one
place the core imports megatron-core, lazily, inside the method.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from scoped_parallel.errors import GroupNotAvailableError

__all__ = ["MegatronOptionalGetters", "COLLECTION_FIELDS"]

#: ``ProcessGroupCollection`` field -> (state method, keyword arguments): what
#: ``ProcessGroupCollection.use_mpu_process_groups()`` asks parallel_state for.
COLLECTION_FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp": ("get_tensor_model_parallel_group", {}),
    "pp": ("get_pipeline_model_parallel_group", {}),
    "mp": ("get_model_parallel_group", {}),
    "embd": ("get_embedding_group", {"check_initialized": False}),
    "pos_embd": ("get_position_embedding_group", {"check_initialized": False}),
    "cp": ("get_context_parallel_group", {}),
    "tp_cp": ("get_tensor_and_context_parallel_group", {}),
    "hcp": ("get_hierarchical_context_parallel_groups", {"check_initialized": False}),
    "ep": ("get_expert_model_parallel_group", {}),
    "expt_tp": ("get_expert_tensor_parallel_group", {}),
    "tp_ep": ("get_expert_tensor_and_model_parallel_group", {}),
    "tp_ep_pp": ("get_expert_tensor_model_pipeline_parallel_group", {}),
    "tp_dp_cp": ("get_tensor_and_data_parallel_group", {"with_context_parallel": True}),
    "dp": ("get_data_parallel_group", {}),
    "dp_cp": ("get_data_parallel_group", {"with_context_parallel": True}),
    "expt_dp": ("get_expert_data_parallel_group", {}),
    "intra_dp_cp": ("get_data_parallel_group", {"with_context_parallel": True, "partial_data_parallel": True}),
    "intra_expt_dp": ("get_expert_data_parallel_group", {"partial_expert_data_parallel": True}),
    "inter_dist_opt": ("get_inter_distributed_optimizer_instance_group", {"check_initialized": False}),
    "intra_dist_opt": ("get_intra_distributed_optimizer_instance_group", {"check_initialized": False}),
}


class MegatronOptionalGetters:
    """Megatron's getters of optional groups, and :meth:`process_group_collection`."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by ParallelState
        _opt_ranks: dict[str, tuple[int, ...]]
        _opt_groups: dict[str, Any]
        _opt_alias: dict[str, str]
        _optional: Any

        def _require(self, kind: str) -> str:
            raise NotImplementedError

        def _kind_group(self, kind: str) -> Any:
            raise NotImplementedError

        def _kind_ranks(self, kind: str) -> tuple[int, ...]:
            raise NotImplementedError

        def _kind_rank(self, kind: str) -> int:
            raise NotImplementedError

        def _label(self) -> str:
            raise NotImplementedError

        def gloo_group(self, kind: str) -> Any:
            raise NotImplementedError

        def get_expert_data_parallel_group(self, check_initialized: bool = True, partial_expert_data_parallel: bool = False) -> Any:
            raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _opt_group(self, slot: str) -> Any:
        self._require("tp")  # destroyed / not a member: the explanatory error
        alias = self._opt_alias.get(slot)
        return self._kind_group(alias) if alias is not None else self._opt_groups[slot]

    def _missing(self, what: str, option: str) -> GroupNotAvailableError:
        return GroupNotAvailableError(
            f"{self._label()} has no {what}: Megatron builds it only with {option}; build the "
            f"state with ParallelState(..., {option}) (check_initialized=False answers None, as "
            "Megatron does)"
        )

    def _intra_ranks(self, kind: str) -> tuple[int, ...]:
        """Ranks of the partial (one optimizer instance) ``kind`` group: ``dp-cp`` or ``edp``."""
        self._require("tp")
        return self._opt_ranks.get("intra-" + kind) or self._kind_ranks(kind)

    def _intra_group(self, kind: str, gloo: bool = False) -> Any:
        """The partial ``kind`` group; with one instance Megatron's answer is the full group."""
        slot = "intra-" + kind
        if slot not in self._opt_ranks:
            return self.gloo_group(kind) if gloo else self._kind_group(kind)
        if gloo:
            return self.gloo_group(slot)
        return self._opt_group(slot)

    # ------------------------------------------------------------------ distributed optimizer

    def get_intra_distributed_optimizer_instance_group(self, check_initialized: bool = True) -> Any:
        """Every rank of this rank's distributed-optimizer instance (all the state's ranks with one)."""
        return self._opt_group("dist-opt")

    def get_inter_distributed_optimizer_instance_group(self, check_initialized: bool = True) -> Any:
        """The group across distributed-optimizer instances (expert data parallel ranks that
        hold the same shard); ``None`` with one instance, as in Megatron."""
        if "inter-edp" in self._opt_ranks:
            return self._opt_group("inter-edp")
        self._require("tp")
        if check_initialized:
            raise self._missing("inter distributed-optimizer instance group", "num_distributed_optimizer_instances=2")
        return None

    # ------------------------------------------------------------------ context parallel variants

    def get_hierarchical_context_parallel_groups(self, check_initialized: bool = True) -> Any:
        """The context parallel sub-groups of each level (``hierarchical_context_parallel_sizes``)."""
        levels = len(self._optional.hierarchical_context_parallel_sizes)
        if levels:
            return [self._opt_group(f"hcp/{level}") for level in range(levels)]
        self._require("tp")
        if check_initialized:
            raise self._missing("hierarchical context parallel groups", "hierarchical_context_parallel_sizes=[...]")
        return None

    def get_hybrid_data_context_parallel_groups(self, check_initialized: bool = True, group_size: int | None = None) -> Any:
        """The hybrid data x context parallel group of ``group_size`` ranks holding this rank
        (the dp-cp group itself when ``group_size`` is its size)."""
        if len(self._kind_ranks("dp-cp")) == group_size:
            return self._kind_group("dp-cp")
        slot = f"hybrid/{group_size}"
        if slot in self._opt_ranks:
            return self._opt_group(slot)
        if not self._optional.hybrid_context_parallel:
            raise self._missing(f"hybrid data x context parallel group of size {group_size!r}", "hybrid_context_parallel=True")
        sizes = sorted(int(s.split("/")[1]) for s in self._opt_ranks if s.startswith("hybrid/"))
        raise GroupNotAvailableError(
            f"{self._label()} has no hybrid data x context parallel group of size {group_size!r}; "
            f"Megatron builds sizes {sizes} and {len(self._kind_ranks('dp-cp'))} (the dp-cp group)"
        )

    def has_separate_all_gather_group(self) -> bool:
        """Whether the state has a separate all-gather twin of dp-cp (``create_all_gather_group=True``)."""
        self._require("tp")
        return "dp-cp/ag" in self._opt_ranks

    def _all_gather_group(self) -> Any:
        if "dp-cp/ag" in self._opt_ranks:
            return self._opt_group("dp-cp/ag")
        raise self._missing("separate all-gather dp-cp group", "create_all_gather_group=True")

    # ------------------------------------------------------------------ other Megatron getters

    def get_amax_reduction_group(self, with_context_parallel: bool = False, tp_only_amax_red: bool = False) -> Any:
        """FP8 amax reduction group: Megatron's choice among tp-dp(-cp), tp-cp and tp."""
        if tp_only_amax_red:
            return self._kind_group("tp-cp" if with_context_parallel else "tp")
        return self._kind_group("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_expert_model_parallel_src_rank(self) -> int:
        """Global rank of the first member of this rank's expert model parallel group."""
        return self._kind_ranks("ep")[0]

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
        """This rank's tp, dp, cp, pp and ep indices joined by ``_`` (Megatron's format)."""
        return "_".join(str(self._kind_rank(k)) for k in ("tp", "dp", "cp", "pp", "ep"))

    # ------------------------------------------------------------------ explicit groups

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
        names) for the others. Imports megatron-core lazily, the one place the core does.
        """
        import dataclasses

        from scoped_parallel.errors import UnsupportedSetupError

        cls = collection_class
        if cls is None:
            try:
                from megatron.core import process_groups_config as pgc
            except ImportError as err:
                raise ImportError(
                    "state.process_group_collection() needs megatron-core (pip install "
                    "'scoped-parallel[megatron]')"
                ) from err
            cls = getattr(pgc, "ProcessGroupCollection", None) or getattr(pgc, "ModelCommProcessGroups", None)
            if cls is None:
                raise UnsupportedSetupError(
                    "this megatron-core has neither ProcessGroupCollection nor ModelCommProcessGroups; "
                    "pass collection_class= explicitly"
                )
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"collection_class must be a dataclass of process groups, got {cls!r}")
        defined = [f.name for f in dataclasses.fields(cls)]
        names = defined if required_pgs is None else list(required_pgs)
        unknown = [n for n in names if n not in defined]
        if unknown:
            raise ValueError(f"unknown process group fields {unknown}; {cls.__name__} defines {defined}")
        strange = [n for n in names if n not in COLLECTION_FIELDS]
        if strange:
            raise UnsupportedSetupError(
                f"{cls.__name__} fields {strange} are not known to scoped_parallel (known: "
                f"{sorted(COLLECTION_FIELDS)}); pass required_pgs without them"
            )
        collection = cls()
        for name in names:
            method, kwargs = COLLECTION_FIELDS[name]
            setattr(collection, name, getattr(self, method)(**kwargs))
        return collection
