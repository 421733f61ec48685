"""``deepspeed.initialize``: an engine belongs to the state it is built for.

* Called outside any scope with ``mpu=<ParallelState>``, it runs inside that state's
  scope, so the ``groups.mpu`` write and every group the engine captures belong to
  that state (the module's own ``groups.mpu`` stays untouched).
* Called inside one state's scope with *another* state as ``mpu``, it runs in that
  other state's scope, likewise.
* A handle of :mod:`scoped_parallel.compat.parallel_state_wrappers` as ``mpu`` stays
  DeepSpeed's mpu (``engine.mpu is`` the handle, as with the PR); its state's scope
  applies as above.
* Called inside a scope with ``mpu=None``, the state is passed as the mpu (as
  ``groups.mpu`` would answer anyway), unless DeepSpeed picks the mpu itself or the
  config cannot be read here (see ``state_may_be_mpu``); a state with TP > 1 would
  otherwise crash the engine (``engine.mpu`` is ``None`` but the model-parallel size
  is > 1).
* The state the engine is built for must have no context parallelism: DeepSpeed has
  none, so with CP > 1 its gradient all-reduce and ZeRO partitions would span the DP
  group only and silently leave the CP peers out. Such a state is refused with
  :class:`~scoped_parallel.errors.UnsupportedSetupError` before DeepSpeed runs (no
  group is created); fold CP into DP for the DeepSpeed model's state.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any

from scoped_parallel.adapters.deepspeed._shared import state_class
from scoped_parallel.errors import UnsupportedSetupError, describe_state
from scoped_parallel.scope import current_state_or_none


def scoped_initialize(original: Any) -> Any:
    """The replacement of ``deepspeed.initialize`` (see the module doc)."""
    signature = inspect.signature(original)
    parallel_state = state_class()

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        mpu = bound.arguments.get("mpu")
        # a compat handle stays DeepSpeed's mpu (engine.mpu is the caller's object); its state scopes
        inner = getattr(mpu, "_scoped_parallel_state_", None)
        target = inner if isinstance(inner, parallel_state) else mpu if isinstance(mpu, parallel_state) else None
        state = current_state_or_none()
        _refuse_context_parallel(target if target is not None else state if mpu is None else None)
        if target is not None and target is not state:
            with target.activate():
                return original(*args, **kwargs)
        if state is None:
            return original(*args, **kwargs)
        if mpu is None and state_may_be_mpu(bound.arguments):
            bound.arguments["mpu"] = state
            return original(*bound.args, **bound.kwargs)
        return original(*args, **kwargs)

    return initialize


def _refuse_context_parallel(state: Any) -> None:
    """Raise before DeepSpeed runs when the engine's state has context parallelism (see the module doc)."""
    if state is None or state.layout.context_parallel_size == 1:
        return
    dp = state.ranks("dp") if state.is_member else ()
    dp_cp = state.ranks("dp-cp") if state.is_member else ()
    raise UnsupportedSetupError(
        f"deepspeed.initialize for {describe_state(state)}, which has context_parallel_size="
        f"{state.layout.context_parallel_size}: DeepSpeed has no context parallelism, so its gradient "
        f"all-reduce and ZeRO partitions would span this rank's data parallel group {dp} and leave the "
        f"context parallel peers out (the ranks that must reduce together are {dp_cp}). Build the "
        "DeepSpeed model's ParallelState with context_parallel_size=1 (the CP ranks become data "
        "parallel ranks), or train this model with Megatron's DistributedDataParallel."
    )


def state_may_be_mpu(arguments: Mapping[str, Any]) -> bool:
    """Whether ``deepspeed.initialize`` called with these arguments leaves the mpu to its caller.

    Not when: the config is not a dict (or a readable JSON/YAML file), a mesh is given
    (``mesh_param``), the config sets both ``sequence_parallel_size`` and
    ``data_parallel_size`` (DeepSpeed builds a mesh), AutoTP is on (``autotp_size > 1``),
    ``tp_model_init`` ran, or the model is a pipeline module.
    """
    config = arguments.get("config")
    if config is None:
        config = arguments.get("config_params")
    if isinstance(config, (str, os.PathLike)):
        from scoped_parallel.layout.config import load_config

        try:
            config = load_config(config)
        except (ValueError, TypeError):
            return False  # let DeepSpeed report its own error about the config
    if not isinstance(config, Mapping) or arguments.get("mesh_param"):
        return False
    if "sequence_parallel_size" in config and "data_parallel_size" in config:
        return False
    tensor_parallel = config.get("tensor_parallel") or {}
    if isinstance(tensor_parallel, Mapping) and (tensor_parallel.get("autotp_size") or 0) > 1:
        return False
    init_utils = sys.modules.get("deepspeed.runtime.tensor_parallel.init_utils")
    if init_utils is not None and getattr(init_utils, "_TP_MODEL_INIT_ARGS", None) is not None:
        return False
    pipe = sys.modules.get("deepspeed.runtime.pipe.module")
    pipeline_module = getattr(pipe, "PipelineModule", None)
    if pipeline_module is not None and isinstance(arguments.get("model"), pipeline_module):
        return False
    return True
