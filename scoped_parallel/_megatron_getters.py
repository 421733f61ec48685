"""Megatron's ``parallel_state`` getters, as methods of a state.

:class:`MegatronGetters` is a mixin of :class:`~scoped_parallel.ParallelState`:
every method has Megatron's name and signature (megatron-core 0.16) and answers
from the state's own groups through four primitives the state provides,
``_kind_group``, ``_kind_ranks``, ``_kind_size`` and ``_kind_rank`` (fast versions
of :meth:`~scoped_parallel.ParallelState.group`, ``ranks``, ``size`` and
``rank_in`` for canonical kinds). Keyword arguments Megatron uses to pick a variant
the state does not build raise :class:`~scoped_parallel.errors.GroupNotAvailableError`.

On rank 5 of 8 with ``tensor_model_parallel_size=2, pipeline_model_parallel_size=2``:
``get_tensor_model_parallel_group()`` spans ranks (4, 5) and
``get_tensor_model_parallel_rank()`` is 1; ``get_data_parallel_group()`` spans
(5, 7); ``is_pipeline_last_stage()`` is true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scoped_parallel.errors import GroupNotAvailableError

__all__ = ["MegatronGetters"]


class MegatronGetters:
    """Megatron-core's getter names, answered from the state's groups."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by ParallelState
        _destroyed: bool
        _groups: dict[str, Any]
        _ranks_of: dict[str, tuple[int, ...]]

        def _kind_group(self, kind: str) -> Any:
            raise NotImplementedError

        def _kind_ranks(self, kind: str) -> tuple[int, ...]:
            raise NotImplementedError

        def _kind_size(self, kind: str) -> int:
            raise NotImplementedError

        def _kind_rank(self, kind: str) -> int:
            raise NotImplementedError

        def _require(self, kind: str) -> str:
            raise NotImplementedError

        def gloo_group(self, kind: str) -> Any:
            raise NotImplementedError

        _rank: int

        def _intra_group(self, kind: str, gloo: bool = False) -> Any:
            raise NotImplementedError

        def _intra_ranks(self, kind: str) -> tuple[int, ...]:
            raise NotImplementedError

        def _all_gather_group(self) -> Any:
            raise NotImplementedError

        @property
        def is_member(self) -> bool:
            raise NotImplementedError

    # ------------------------------------------------------------------ Megatron: tensor / pipeline

    def is_initialized(self) -> bool:
        """Whether the state still holds its groups (false after :meth:`destroy`)."""
        return not self._destroyed

    def model_parallel_is_initialized(self) -> bool:
        """Whether the state holds groups on this rank (a live member)."""
        return not self._destroyed and self.is_member

    def get_tensor_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's tensor model parallel group."""
        return self._kind_group("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        """Size of this rank's tensor model parallel group."""
        return self._kind_size("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        """This rank's index in its tensor model parallel group."""
        return self._kind_rank("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of the first member of this rank's tensor model parallel group."""
        return self._kind_ranks("tp")[0]

    def get_tensor_model_parallel_last_rank(self) -> int:
        """Global rank of the last member of this rank's tensor model parallel group."""
        return self._kind_ranks("tp")[-1]

    def get_tensor_model_parallel_ranks(self) -> tuple[int, ...]:
        """Global ranks of this rank's tensor model parallel group."""
        return self._kind_ranks("tp")

    def get_pipeline_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's pipeline model parallel group."""
        return self._kind_group("pp")

    def get_pipeline_model_parallel_world_size(self) -> int:
        """Size of this rank's pipeline model parallel group."""
        return self._kind_size("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        """This rank's index in its pipeline model parallel group."""
        return self._kind_rank("pp")

    def get_pipeline_model_parallel_first_rank(self) -> int:
        """Global rank of the first member of this rank's pipeline model parallel group."""
        return self._kind_ranks("pp")[0]

    def get_pipeline_model_parallel_last_rank(self) -> int:
        """Global rank of the last member of this rank's pipeline model parallel group."""
        return self._kind_ranks("pp")[-1]

    def get_pipeline_model_parallel_next_rank(self) -> int:
        """Global rank of the next pipeline stage (the last wraps to the first)."""
        ranks = self._kind_ranks("pp")
        return ranks[(self._kind_rank("pp") + 1) % len(ranks)]

    def get_pipeline_model_parallel_prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (the first wraps to the last)."""
        ranks = self._kind_ranks("pp")
        return ranks[(self._kind_rank("pp") - 1) % len(ranks)]

    def is_pipeline_first_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank is in the first pipeline stage (no virtual pipeline in a state)."""
        return self._kind_rank("pp") == 0

    def is_pipeline_last_stage(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank is in the last pipeline stage (no virtual pipeline in a state)."""
        return self._kind_rank("pp") == self._kind_size("pp") - 1

    # ------------------------------------------------------------------ model parallel = tp x pp

    def get_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """Megatron's model-parallel group: tensor x pipeline parallel ranks.

        Group, size and rank always describe this same group (Megatron's legacy
        ``get_model_parallel_world_size`` reported TP's size, which is only the same
        thing when PP == 1).
        """
        return self._kind_group("tp-pp")

    def get_model_parallel_world_size(self) -> int:
        """Size of this rank's model parallel (tensor x pipeline) group."""
        return self._kind_size("tp-pp")

    def get_model_parallel_rank(self) -> int:
        """This rank's index in its model parallel (tensor x pipeline) group."""
        return self._kind_rank("tp-pp")

    def get_model_parallel_src_rank(self) -> int:
        """Global rank of the first member of this rank's model parallel (tensor x pipeline) group."""
        return self._kind_ranks("tp-pp")[0]

    # ------------------------------------------------------------------ data / context parallel

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
    ) -> Any:
        """Data-parallel group; excludes SP ranks (they see the same batch), see sequence_data.

        ``partial_data_parallel=True`` (with context parallel): the dp-cp ranks of this
        rank's distributed-optimizer instance; ``independent_all_gather=True``: the
        separate all-gather twin of dp-cp (``create_all_gather_group=True``).
        """
        if not (with_context_parallel or partial_data_parallel):
            group = self._groups.get("dp")  # hot: DeepSpeed asks at every step
            if group is not None:
                return group
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        if partial_data_parallel:
            return self._intra_group("dp-cp")
        if with_context_parallel and independent_all_gather:
            return self._all_gather_group()
        return self._kind_group(kind)

    def get_data_parallel_group_gloo(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> Any:
        """The gloo twin of this rank's data parallel group, dp x cp with ``with_context_parallel=True`` (``create_gloo_process_groups=True``)."""
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        return self._intra_group(kind, gloo=True) if partial_data_parallel else self.gloo_group(kind)

    def get_data_parallel_world_size(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> int:
        """Size of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        return len(self._intra_ranks(kind)) if partial_data_parallel else self._kind_size(kind)

    def get_data_parallel_rank(
        self, with_context_parallel: bool = False, partial_data_parallel: bool = False
    ) -> int:
        """This rank's index in its data parallel group (dp x cp with ``with_context_parallel=True``)."""
        kind = self._dp_kind(with_context_parallel, partial_data_parallel)
        if partial_data_parallel:
            return self._intra_ranks(kind).index(self._rank)
        return self._kind_rank(kind)

    def get_data_parallel_src_rank(self, with_context_parallel: bool = False) -> int:
        """Global rank of the first member of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self._kind_ranks(self._dp_kind(with_context_parallel))[0]

    def get_data_parallel_group_ranks(self) -> tuple[int, ...]:
        """Global ranks of this rank's data parallel group."""
        return self._kind_ranks("dp")

    def get_data_parallel_global_ranks(self, with_context_parallel: bool = False) -> tuple[int, ...]:
        """Global ranks of this rank's data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self._kind_ranks(self._dp_kind(with_context_parallel))

    def get_context_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's context parallel group."""
        return self._kind_group("cp")

    def get_context_parallel_world_size(self) -> int:
        """Size of this rank's context parallel group."""
        return self._kind_size("cp")

    def get_context_parallel_rank(self) -> int:
        """This rank's index in its context parallel group."""
        return self._kind_rank("cp")

    def get_context_parallel_global_ranks(self, check_initialized: bool = True) -> tuple[int, ...]:
        """Global ranks of this rank's context parallel group."""
        return self._kind_ranks("cp")

    def get_tensor_and_data_parallel_group(
        self, check_initialized: bool = True, with_context_parallel: bool = False
    ) -> Any:
        """This rank's tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self._kind_group("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_world_size(self, with_context_parallel: bool = False) -> int:
        """Size of this rank's tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self._kind_size("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        """This rank's index in its tensor and data parallel group (dp x cp with ``with_context_parallel=True``)."""
        return self._kind_rank("tp-dp-cp" if with_context_parallel else "tp-dp")

    def get_tensor_and_context_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's tensor and context parallel group."""
        return self._kind_group("tp-cp")

    def get_tensor_and_context_parallel_world_size(self) -> int:
        """Size of this rank's tensor and context parallel group."""
        return self._kind_size("tp-cp")

    def get_tensor_and_context_parallel_rank(self) -> int:
        """This rank's index in its tensor and context parallel group."""
        return self._kind_rank("tp-cp")

    # ------------------------------------------------------------------ experts

    def get_expert_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's expert model parallel group."""
        return self._kind_group("ep")

    def get_expert_model_parallel_world_size(self) -> int:
        """Size of this rank's expert model parallel group."""
        return self._kind_size("ep")

    def get_expert_model_parallel_rank(self) -> int:
        """This rank's index in its expert model parallel group."""
        return self._kind_rank("ep")

    def get_expert_tensor_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's expert tensor parallel group."""
        return self._kind_group("etp")

    def get_expert_tensor_parallel_world_size(self) -> int:
        """Size of this rank's expert tensor parallel group."""
        return self._kind_size("etp")

    def get_expert_tensor_parallel_rank(self) -> int:
        """This rank's index in its expert tensor parallel group."""
        return self._kind_rank("etp")

    def get_expert_tensor_and_model_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's expert tensor and model parallel group."""
        return self._kind_group("etp-ep")

    def get_expert_tensor_and_model_parallel_world_size(self) -> int:
        """Size of this rank's expert tensor and model parallel group."""
        return self._kind_size("etp-ep")

    def get_expert_tensor_and_model_parallel_rank(self) -> int:
        """This rank's index in its expert tensor and model parallel group."""
        return self._kind_rank("etp-ep")

    def get_expert_tensor_model_pipeline_parallel_group(self, check_initialized: bool = True) -> Any:
        """This rank's expert tensor, model and pipeline parallel group."""
        return self._kind_group("etp-ep-pp")

    def get_expert_data_parallel_group(
        self, check_initialized: bool = True, partial_expert_data_parallel: bool = False
    ) -> Any:
        """This rank's expert data parallel group (of its distributed-optimizer instance with ``partial_expert_data_parallel=True``)."""
        if partial_expert_data_parallel:
            return self._intra_group("edp")
        return self._kind_group("edp")

    def get_expert_data_parallel_group_gloo(self, partial_expert_data_parallel: bool = False) -> Any:
        """The gloo twin of this rank's expert data parallel group (``create_gloo_process_groups=True``)."""
        if partial_expert_data_parallel:
            return self._intra_group("edp", gloo=True)
        return self.gloo_group("edp")

    def get_expert_data_parallel_world_size(self, partial_expert_data_parallel: bool = False) -> int:
        """Size of this rank's expert data parallel group."""
        return len(self._intra_ranks("edp")) if partial_expert_data_parallel else self._kind_size("edp")

    def get_expert_data_parallel_rank(self, partial_expert_data_parallel: bool = False) -> int:
        """This rank's index in its expert data parallel group."""
        if partial_expert_data_parallel:
            return self._intra_ranks("edp").index(self._rank)
        return self._kind_rank("edp")

    # ------------------------------------------------------------------ embeddings

    def is_rank_in_embedding_group(self, ignore_virtual: bool = True, vp_stage: int | None = None) -> bool:
        """Whether this rank holds a word-embedding group (first or last pipeline stage)."""
        self._require("tp")
        return "embd" in self._ranks_of

    def is_rank_in_position_embedding_group(self) -> bool:
        """Whether this rank holds a position-embedding group (first pipeline stage)."""
        self._require("tp")
        return "pos-embd" in self._ranks_of

    def get_embedding_group(self, check_initialized: bool = True) -> Any:
        """This rank's word-embedding group (``None`` off the embedding stages with ``check_initialized=False``, as in Megatron)."""
        if not check_initialized and self._require("tp") and "embd" not in self._ranks_of:
            return None
        return self._kind_group("embd")

    def get_position_embedding_group(self, check_initialized: bool = True) -> Any:
        """This rank's position-embedding group (``None`` off the first stage with ``check_initialized=False``, as in Megatron)."""
        if not check_initialized and self._require("tp") and "pos-embd" not in self._ranks_of:
            return None
        return self._kind_group("pos-embd")
