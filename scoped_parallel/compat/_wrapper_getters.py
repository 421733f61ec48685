"""The module-level getters of :mod:`scoped_parallel.compat.parallel_state_wrappers`, and config init.

Every getter takes ``name=None`` first (then the PR's flags) and asks the named
instance's state, or the current scope's (see the wrappers module doc). As in the PR,
``get_model_parallel_world_size``/``_rank`` report the tensor-parallel size and rank,
while ``get_model_parallel_group`` is the model-parallel (tp x pp) group.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from scoped_parallel.compat import parallel_state_wrappers as _wrappers
from scoped_parallel.errors import LayoutError

_WRAPPERS = "scoped_parallel.compat.parallel_state_wrappers"
_NAME = inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)


def _flag(flag: str) -> inspect.Parameter:
    return inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)


def _getter(public: str, method: str, flags: tuple[str, ...], what: str) -> Callable[..., Any]:
    def getter(name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(flags, args))
        bound.update(kwargs)
        unknown = sorted(set(bound) - set(flags))
        if unknown or len(args) > len(flags):
            raise TypeError(f"{public}() got unexpected arguments {unknown or args[len(flags):]}; it takes name, {flags}")
        return getattr(_wrappers._state(name), method)(**bound)

    getter.__name__ = getter.__qualname__ = public
    getter.__module__ = _WRAPPERS
    getter.__doc__ = f"{what} of the named instance's state, or the current scope's (``name=None``)."
    getter.__signature__ = inspect.Signature([_NAME, *map(_flag, flags)])  # type: ignore[attr-defined]
    return getter


_DP = ("with_context_parallel", "partial_data_parallel")
_EDP = ("partial_expert_data_parallel",)
_TABLE: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("get_tensor_model_parallel_group", "get_tensor_model_parallel_group", (), "The tensor-parallel group"),
    ("get_model_parallel_group", "get_model_parallel_group", (), "The model-parallel (tp x pp) group"),
    ("get_tensor_model_parallel_src_rank", "get_tensor_model_parallel_src_rank", (), "The first global rank of the tensor-parallel group"),
    ("get_data_parallel_group", "get_data_parallel_group", _DP, "The data-parallel group (x cp with ``with_context_parallel``)"),
    ("get_data_parallel_world_size", "get_data_parallel_world_size", _DP, "The data-parallel size"),
    ("get_data_parallel_rank", "get_data_parallel_rank", _DP, "This rank's data-parallel rank"),
    ("get_pipeline_model_parallel_group", "get_pipeline_model_parallel_group", (), "The pipeline group"),
    ("get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_world_size", (), "The pipeline size"),
    ("get_pipeline_model_parallel_rank", "get_pipeline_model_parallel_rank", (), "This rank's pipeline stage"),
    ("get_context_parallel_group", "get_context_parallel_group", (), "The context-parallel group"),
    ("get_context_parallel_world_size", "get_context_parallel_world_size", (), "The context-parallel size"),
    ("get_context_parallel_rank", "get_context_parallel_rank", (), "This rank's context-parallel rank"),
    ("get_sequence_parallel_group", "get_sequence_parallel_group", (), "The Ulysses sequence-parallel group"),
    ("get_sequence_parallel_world_size", "get_sequence_parallel_world_size", (), "The sequence-parallel size"),
    ("get_sequence_parallel_rank", "get_sequence_parallel_rank", (), "This rank's sequence-parallel rank"),
    ("get_sequence_data_parallel_group", "get_sequence_data_parallel_group", (), "The sequence x data parallel group (ZeRO's)"),
    ("get_sequence_data_parallel_world_size", "get_sequence_data_parallel_world_size", (), "The sequence x data parallel size"),
    ("get_sequence_data_parallel_rank", "get_sequence_data_parallel_rank", (), "This rank's sequence x data parallel rank"),
    ("get_expert_model_parallel_group", "get_expert_model_parallel_group", (), "The expert-parallel group"),
    ("get_expert_model_parallel_world_size", "get_expert_model_parallel_world_size", (), "The expert-parallel size"),
    ("get_expert_model_parallel_rank", "get_expert_model_parallel_rank", (), "This rank's expert-parallel rank"),
    ("get_expert_tensor_parallel_group", "get_expert_tensor_parallel_group", (), "The expert tensor-parallel group"),
    ("get_expert_tensor_parallel_world_size", "get_expert_tensor_parallel_world_size", (), "The expert tensor-parallel size"),
    ("get_expert_tensor_parallel_rank", "get_expert_tensor_parallel_rank", (), "This rank's expert tensor-parallel rank"),
    ("get_expert_data_parallel_group", "get_expert_data_parallel_group", _EDP, "The expert data-parallel group"),
    ("get_expert_data_parallel_world_size", "get_expert_data_parallel_world_size", _EDP, "The expert data-parallel size"),
    ("get_expert_data_parallel_rank", "get_expert_data_parallel_rank", _EDP, "This rank's expert data-parallel rank"),
    ("get_embedding_group", "get_embedding_group", (), "The embedding group (first and last pipeline stages)"),
    ("get_tensor_and_data_parallel_group", "get_tensor_and_data_parallel_group", ("with_context_parallel",), "The tensor x data parallel group"),
    ("get_tensor_and_context_parallel_group", "get_tensor_and_context_parallel_group", (), "The tensor x context parallel group"),
)


def _tp_answer(public: str, key: str, method: str) -> Callable[..., Any]:
    def getter(name: str | None = None) -> int:
        state = _wrappers._state(name)
        override = _wrappers._TP_OVERRIDES.get(state, {}).get(key)
        return getattr(state, method)() if override is None else override  # type: ignore[no-any-return]

    getter.__name__ = getter.__qualname__ = public
    getter.__module__ = _WRAPPERS
    what = "size" if key == "world_size" else "rank"
    getter.__doc__ = (
        f"The tensor-parallel {what} of the named (or current) instance, or the value set with "
        f"``set_tensor_model_parallel_{key}``."
    )
    return getter


GETTERS: dict[str, Callable[..., Any]] = {public: _getter(*row) for row in _TABLE for public in row[:1]}
for _public, _key, _method in (
    ("get_tensor_model_parallel_world_size", "world_size", "get_tensor_model_parallel_world_size"),
    ("get_model_parallel_world_size", "world_size", "get_tensor_model_parallel_world_size"),
    ("get_tensor_model_parallel_rank", "rank", "get_tensor_model_parallel_rank"),
    ("get_model_parallel_rank", "rank", "get_tensor_model_parallel_rank"),
):
    GETTERS[_public] = _tp_answer(_public, _key, _method)

#: ``initialize_parallel_state_from_config`` keywords that set a layout size or the order
_SIZE_OVERRIDES = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "sequence_parallel_size",
    "order",
)


def initialize_parallel_state_from_config(
    config: Any,
    name: str | None = None,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
    pipeline_model_parallel_comm_backend: str | None = None,
    context_parallel_size: int | None = None,
    hierarchical_context_parallel_sizes: list[int] | None = None,
    expert_model_parallel_size: int | None = None,
    num_distributed_optimizer_instances: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    sequence_parallel_size: int | None = None,
    nccl_communicator_config_path: str | None = None,
    distributed_timeout_minutes: int | None = None,
    order: str | None = None,
    create_gloo_process_groups: bool | None = None,
    high_priority_stream_groups: list[str] | None = None,
) -> Any:
    """Initialise the named instance from a DeepSpeed config (dict, JSON path or ``DeepSpeedConfig``).

    Arguments > config > defaults. Sizes are read from the config keys
    :meth:`ParallelState.from_config <scoped_parallel.ParallelState.from_config>` reads
    (dotted paths such as ``tensor_parallel.autotp_size`` included). An instance
    initialised already is returned when its layout is the requested one, else a
    :class:`~scoped_parallel.errors.LayoutError` names both. Returns the instance (an
    mpu for ``deepspeed.initialize``).
    """
    from scoped_parallel._config import load_config, sizes_from_config

    for argument, value in (
        ("nccl_communicator_config_path", nccl_communicator_config_path),
        ("high_priority_stream_groups", high_priority_stream_groups),
    ):
        if value is not None:
            raise LayoutError(
                f"{argument}={value!r} is not supported by scoped_parallel; build a ParallelState with "
                "pg_options={kind: options} for per-group backend options instead"
            )
    local = locals()
    overrides = {key: local[key] for key in _SIZE_OVERRIDES if local[key] is not None}
    sizes = sizes_from_config(load_config(config), overrides)
    sizes.pop("name", None)
    expected_dp = sizes.pop("_data_parallel_size", None)
    instance = _wrappers.get_parallel_state_instance(name)
    if instance.is_initialized():
        requested = {k: v for k, v in sizes.items() if k != "order"}
        have = instance.state.layout
        differ = {k: (v, getattr(have, k)) for k, v in requested.items() if getattr(have, k) != v}
        if differ:
            raise LayoutError(
                f"parallel state {instance.name!r} is already initialized with another layout: "
                + ", ".join(f"{k} requested {v[0]}, has {v[1]}" for k, v in differ.items())
                + "; destroy() it first, or use another name"
            )
        return instance
    extra = {
        "virtual_pipeline_model_parallel_size": virtual_pipeline_model_parallel_size,
        "pipeline_model_parallel_comm_backend": pipeline_model_parallel_comm_backend,
        "hierarchical_context_parallel_sizes": hierarchical_context_parallel_sizes,
        "num_distributed_optimizer_instances": num_distributed_optimizer_instances,
        "distributed_timeout_minutes": distributed_timeout_minutes,
        "create_gloo_process_groups": create_gloo_process_groups,
    }
    kwargs = {**sizes, **{k: v for k, v in extra.items() if v is not None}}
    if expected_dp is not None:
        import torch.distributed as dist

        from scoped_parallel._config import check_data_parallel_size

        check_data_parallel_size({k: v for k, v in sizes.items()}, expected_dp, dist.get_world_size())
    instance.initialize_model_parallel(**kwargs)
    return instance


initialize_parallel_state_from_config.__module__ = _WRAPPERS
