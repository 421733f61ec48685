"""The one getter table: every getter name a state answers, what it answers, where it comes from.

Like Megatron's own ``pg_to_func``, one row per name. A row of a *simple* getter
(``GROUP``, ``SIZE``, ``RANK``, ``RANKS``, ``FIRST``, ``LAST`` of one kind) is all there
is to it: :mod:`scoped_parallel.getters` makes the state's method from the row. A
``METHOD`` row is answered by a hand-written method of
``scoped_parallel.getters.megatron.MegatronMethods`` (variant keywords, optional
groups, composite answers). Everything else derives from this table:

* the state's getter methods (``scoped_parallel.getters``);
* the Megatron adapter's patch list (``family == "megatron"``) and its setters
  (:data:`SETTERS`); a row's ``override`` is the key a setter writes, which the
  state's method answers first (Megatron's ``_MPU_*`` globals, per state);
* the getters of ``scoped_parallel.compat.parallel_state_wrappers``: which state method
  answers and which flags each takes (``keywords``: the variant keywords a getter takes,
  which the compat getters offer where the PR did);
* the tests that compare every row with megatron-core.

Adding a getter that a new megatron-core minor brings is one row (plus a method
when it is no simple getter). Pure data; no torch import.

Worked example on 8 ranks, ``tensor_model_parallel_size=2,
pipeline_model_parallel_size=2``, rank 5: the row ``get_data_parallel_src_rank`` is a
``METHOD`` (it takes ``with_context_parallel``) and answers 5; the row
``get_pipeline_model_parallel_first_rank = Getter("pp", FIRST)`` answers 1 (the pp group
is (1, 5)); ``get_tensor_model_parallel_world_size`` has ``override="tp_size"``: after
``set_tensor_model_parallel_world_size(4)`` inside the state's scope it answers 4 there.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ANSWERS", "FAMILIES", "GETTERS", "KIND_TEXT", "METHOD", "OVERRIDE_KEYS", "SETTERS", "Getter", "family"]

GROUP, SIZE, RANK, RANKS, FIRST, LAST = "group", "size", "rank", "ranks", "first", "last"
#: The answer of a row that a hand-written method of ``MegatronMethods`` gives.
METHOD = "method"
#: What a simple getter answers about its kind's group on this rank.
ANSWERS = (GROUP, SIZE, RANK, RANKS, FIRST, LAST)
#: ``megatron``: a name of ``megatron.core.parallel_state`` (patched by the Megatron adapter);
#: ``deepspeed``: a name DeepSpeed asks an ``mpu`` for; ``state``: the state's own addition.
FAMILIES = ("megatron", "deepspeed", "state")

#: How messages and docstrings call the group of a kind.
KIND_TEXT = {
    "tp": "tensor model parallel",
    "pp": "pipeline model parallel",
    "cp": "context parallel",
    "sp": "sequence parallel",
    "dp": "data parallel",
    "tp-pp": "model parallel (tensor x pipeline)",
    "tp-cp": "tensor and context parallel",
    "sp-dp": "sequence and data parallel (SP x DP)",
    "ep": "expert model parallel",
    "etp": "expert tensor parallel",
    "etp-ep": "expert tensor and model parallel",
    "etp-ep-pp": "expert tensor, model and pipeline parallel",
}


class Getter(NamedTuple):
    """One row: a getter name and what it answers."""

    #: the kind a simple getter answers about (``None`` for most ``METHOD`` rows)
    kind: str | None
    #: one of :data:`ANSWERS`, or ``METHOD`` (a hand-written method answers)
    answer: str
    #: one of :data:`FAMILIES`
    family: str = "megatron"
    #: the key a Megatron ``set_*`` setter writes; inside a scope its value answers first
    override: str | None = None
    #: the first megatron-core minor that has the name ("": every supported minor up to ``until``)
    since: str = ""
    #: the last megatron-core minor that has the name ("": every minor from ``since`` on)
    until: str = ""
    #: ``False``: no per-state answer exists; inside a scope the patched name raises
    supported: bool = True
    #: Megatron's variant keywords the getter takes (besides ``check_initialized``)
    keywords: tuple[str, ...] = ()


_DP = ("with_context_parallel", "partial_data_parallel")
_EDP = ("partial_expert_data_parallel",)
_VIRTUAL = ("ignore_virtual", "vp_stage")

#: name -> row. Megatron's names follow megatron-core 0.16's ``parallel_state``.
GETTERS: dict[str, Getter] = {
    # tensor / pipeline / model parallel
    "get_tensor_model_parallel_group": Getter("tp", GROUP),
    "get_tensor_model_parallel_world_size": Getter("tp", SIZE, override="tp_size"),
    "get_tensor_model_parallel_rank": Getter("tp", RANK, override="tp_rank"),
    "get_tensor_model_parallel_src_rank": Getter("tp", FIRST),
    "get_tensor_model_parallel_last_rank": Getter("tp", LAST, family="state"),
    "get_tensor_model_parallel_ranks": Getter("tp", RANKS, family="state"),
    "get_pipeline_model_parallel_group": Getter("pp", GROUP),
    "get_pipeline_model_parallel_world_size": Getter("pp", SIZE, override="pp_size"),
    "get_pipeline_model_parallel_rank": Getter("pp", RANK, override="pp_rank"),
    "get_pipeline_model_parallel_first_rank": Getter("pp", FIRST),
    "get_pipeline_model_parallel_last_rank": Getter("pp", LAST),
    "get_pipeline_model_parallel_next_rank": Getter("pp", METHOD),
    "get_pipeline_model_parallel_prev_rank": Getter("pp", METHOD),
    "is_pipeline_first_stage": Getter("pp", METHOD, keywords=_VIRTUAL),
    "is_pipeline_last_stage": Getter("pp", METHOD, keywords=_VIRTUAL),
    "get_model_parallel_group": Getter("tp-pp", GROUP),
    "get_model_parallel_world_size": Getter("tp-pp", SIZE, family="state"),
    "get_model_parallel_rank": Getter("tp-pp", RANK, family="state"),
    "get_model_parallel_src_rank": Getter("tp-pp", FIRST),
    "get_virtual_pipeline_model_parallel_rank": Getter(None, METHOD, override="vpp_rank"),
    "get_virtual_pipeline_model_parallel_world_size": Getter(None, METHOD, override="vpp_size"),
    "is_initialized": Getter(None, METHOD),
    "model_parallel_is_initialized": Getter(None, METHOD),
    # data / context parallel
    "get_data_parallel_group": Getter("dp", METHOD, keywords=_DP + ("independent_all_gather",)),
    "get_data_parallel_group_gloo": Getter("dp", METHOD, keywords=_DP),
    "get_data_parallel_world_size": Getter("dp", METHOD, keywords=_DP),
    "get_data_parallel_rank": Getter("dp", METHOD, override="dp_rank", keywords=_DP),
    "get_data_parallel_src_rank": Getter("dp", METHOD, keywords=("with_context_parallel",)),
    "get_data_parallel_group_ranks": Getter("dp", RANKS, family="state"),
    "get_data_parallel_global_ranks": Getter("dp", METHOD, family="state", keywords=("with_context_parallel",)),
    "get_context_parallel_group": Getter("cp", GROUP),
    "get_context_parallel_world_size": Getter("cp", SIZE),
    "get_context_parallel_rank": Getter("cp", RANK),
    "get_context_parallel_global_ranks": Getter("cp", RANKS),
    "get_tensor_and_data_parallel_group": Getter("tp-dp", METHOD, keywords=("with_context_parallel",)),
    "get_tensor_and_data_parallel_world_size": Getter("tp-dp", METHOD, family="state", keywords=("with_context_parallel",)),
    "get_tensor_and_data_parallel_rank": Getter("tp-dp", METHOD, family="state", keywords=("with_context_parallel",)),
    "get_tensor_and_context_parallel_group": Getter("tp-cp", GROUP),
    "get_tensor_and_context_parallel_world_size": Getter("tp-cp", SIZE),
    "get_tensor_and_context_parallel_rank": Getter("tp-cp", RANK),
    # experts
    "get_expert_model_parallel_group": Getter("ep", GROUP),
    "get_expert_model_parallel_world_size": Getter("ep", SIZE, override="ep_size"),
    "get_expert_model_parallel_rank": Getter("ep", RANK, override="ep_rank"),
    "get_expert_model_parallel_src_rank": Getter("ep", FIRST, since="0.16"),
    "get_expert_tensor_parallel_group": Getter("etp", GROUP),
    "get_expert_tensor_parallel_world_size": Getter("etp", SIZE, override="etp_size"),
    "get_expert_tensor_parallel_rank": Getter("etp", RANK, override="etp_rank"),
    "get_expert_tensor_and_model_parallel_group": Getter("etp-ep", GROUP),
    "get_expert_tensor_and_model_parallel_world_size": Getter("etp-ep", SIZE),
    "get_expert_tensor_and_model_parallel_rank": Getter("etp-ep", RANK),
    "get_expert_tensor_model_pipeline_parallel_group": Getter("etp-ep-pp", METHOD, keywords=("with_egtp_remat",)),
    "get_expert_data_parallel_group": Getter("edp", METHOD, keywords=_EDP),
    "get_expert_data_parallel_group_gloo": Getter("edp", METHOD, keywords=_EDP),
    "get_expert_data_parallel_world_size": Getter("edp", METHOD, keywords=_EDP),
    "get_expert_data_parallel_rank": Getter("edp", METHOD, keywords=_EDP),
    "get_data_modulo_expert_parallel_group": Getter("edp", METHOD, until="0.16", keywords=_EDP),
    # embeddings
    "is_rank_in_embedding_group": Getter("embd", METHOD, keywords=_VIRTUAL),
    "is_rank_in_position_embedding_group": Getter("pos-embd", METHOD),
    "get_embedding_group": Getter("embd", METHOD),
    "get_position_embedding_group": Getter("pos-embd", METHOD),
    # Megatron's optional groups and composite answers
    "get_intra_distributed_optimizer_instance_group": Getter(None, METHOD),
    "get_inter_distributed_optimizer_instance_group": Getter(None, METHOD),
    "get_hierarchical_context_parallel_groups": Getter("cp", METHOD),
    "get_hybrid_data_context_parallel_groups": Getter("dp-cp", METHOD, since="0.16", keywords=("group_size",)),
    "has_separate_all_gather_group": Getter("dp-cp", METHOD, since="0.16", until="0.17"),
    # 0.18: the all-gather twins are made on request, outside initialize_model_parallel
    "create_all_gather_groups": Getter(None, METHOD, since="0.18", supported=False),
    # 0.19: generalized TP with weight rematerialisation (GTP); every state has gtp_remat_size 1
    "get_gtp_weight_remat_group": Getter(None, METHOD, since="0.19"),
    "get_gtp_weight_remat_world_size": Getter(None, METHOD, since="0.19"),
    "get_gtp_weight_remat_rank": Getter(None, METHOD, since="0.19"),
    "get_gtp_weight_remat_global_ranks": Getter(None, METHOD, since="0.19"),
    "get_expert_gtp_weight_remat_group": Getter(None, METHOD, since="0.19"),
    "get_expert_gtp_weight_remat_world_size": Getter(None, METHOD, since="0.19"),
    "get_expert_gtp_weight_remat_rank": Getter(None, METHOD, since="0.19"),
    "get_expert_gtp_weight_remat_global_ranks": Getter(None, METHOD, since="0.19"),
    "get_amax_reduction_group": Getter(None, METHOD, keywords=("with_context_parallel", "tp_only_amax_red")),
    "get_all_ranks": Getter(None, METHOD),
    "get_global_symmetric_memory_buffer": Getter(None, METHOD, since="0.16", until="0.16", supported=False),
    # DeepSpeed's mpu names: PipelineParallelGrid's (deepspeed.utils.bwc probes them) and Ulysses'
    "get_pipe_parallel_group": Getter("pp", GROUP, family="deepspeed"),
    "get_pipe_parallel_world_size": Getter("pp", SIZE, family="deepspeed"),
    "get_pipe_parallel_rank": Getter("pp", RANK, family="deepspeed"),
    "get_sequence_parallel_group": Getter("sp", GROUP, family="deepspeed"),
    "get_sequence_parallel_world_size": Getter("sp", SIZE, family="deepspeed"),
    "get_sequence_parallel_rank": Getter("sp", RANK, family="deepspeed"),
    "get_sequence_data_parallel_group": Getter("sp-dp", GROUP, family="deepspeed"),
    "get_sequence_data_parallel_world_size": Getter("sp-dp", SIZE, family="deepspeed"),
    "get_sequence_data_parallel_rank": Getter("sp-dp", RANK, family="deepspeed"),
}


#: Megatron's setters -> the override key they write (``ParallelState.set_override``): inside a
#: scope they set the active state's value, which the rows with that ``override`` answer first.
SETTERS: dict[str, str] = {
    "set_tensor_model_parallel_world_size": "tp_size",
    "set_tensor_model_parallel_rank": "tp_rank",
    "set_pipeline_model_parallel_world_size": "pp_size",
    "set_pipeline_model_parallel_rank": "pp_rank",
    "set_data_parallel_rank": "dp_rank",
    "set_expert_model_parallel_world_size": "ep_size",
    "set_expert_model_parallel_rank": "ep_rank",
    "set_expert_tensor_parallel_world_size": "etp_size",
    "set_expert_tensor_parallel_rank": "etp_rank",
    "set_virtual_pipeline_model_parallel_world_size": "vpp_size",
    "set_virtual_pipeline_model_parallel_rank": "vpp_rank",
}
#: Every key an override may have.
OVERRIDE_KEYS = frozenset(SETTERS.values())


def family(name: str) -> dict[str, Getter]:
    """The rows of one family (see :data:`FAMILIES`), in table order."""
    if name not in FAMILIES:
        raise ValueError(f"unknown getter family {name!r}; the families are {FAMILIES}")
    return {n: row for n, row in GETTERS.items() if row.family == name}
