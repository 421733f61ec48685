"""megatron-core's DistributedDataParallel and distributed optimizer on the CPU (gloo), for tests.

The shims, and what each one does:

* ``ddp_cpu_shims()``: ``examples/megatron_two_models.py``'s ``cpu_shims()``, unchanged: the
  model-parallel RNG tracker's ``fork()`` is a no-op (it would switch the CUDA generator;
  dropout is 0), ``GlobalMemoryBuffer.get_tensor`` allocates on the CPU, a torch function
  mode turns ``device="cuda"`` requests and ``Tensor.cuda()`` into CPU tensors, and
  ``torch.cuda.current_device()`` answers ``"cpu"``. That last one is what DDP needs: its
  parameter and gradient buffers (``_ParamAndGradBuffer``: ``param_data``, ``grad_data``) are
  allocated with ``device=torch.cuda.current_device()``, so they land on the CPU, and gloo
  runs their coalesced ``all_gather_into_tensor`` / ``reduce_scatter_tensor``.
* ``state()``: a ParallelState with gloo twins of the data-parallel groups
  (``create_gloo_process_groups=True``): ``get_megatron_optimizer`` asks for
  ``get_data_parallel_group_gloo`` (not a CPU shim; the optimizer needs it anywhere).
* ``_CudaTypeNames`` (only around ``get_megatron_optimizer``): ``Tensor.type()`` answers
  ``torch.cuda.FloatTensor`` (Half, BFloat16) for a CPU float tensor; the distributed
  optimizer sorts parameters by that string and raises TypeError on ``torch.FloatTensor``.

No other shim: megatron-core's torch AdamW fallback (no Transformer Engine, no Apex),
``finalize_model_grads`` and the schedules run as they are. ``wrap(chunks, ...)`` wraps
model chunks built in the active scope in DDP, ``optimizer(chunks, ...)`` makes the
distributed optimizer over them, and ``train_step`` runs one step through megatron-core's
own schedule, ``finalize_model_grads`` (the buckets' reduce-scatter) and ``optimizer.step()``.
Every function runs on a rank of the shared world (``tests/_world.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

#: what ``Tensor.type()`` answers for CPU tensors inside ``_CudaTypeNames``
_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
              "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class _CudaTypeNames(TorchFunctionMode):
    """``Tensor.type()`` (the query, no argument) answers the CUDA type name of a CPU float
    tensor: megatron-core's distributed optimizer sorts parameters by ``param.type()`` in
    ``'torch.cuda.FloatTensor'``/``HalfTensor``/``BFloat16Tensor`` and raises a TypeError on
    anything else. Only while the optimizer is built (``optimizer()``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            return _CUDA_TYPE.get(out, out)
        return out


@contextlib.contextmanager
def ddp_cpu_shims() -> Iterator[None]:
    """The example's CPU shims for the block (see the module docstring)."""
    from _reshard_megatron import example

    with example().cpu_shims():
        yield


def state(name: str, layout: dict[str, int]) -> Any:
    """A state for a DDP-wrapped model: with gloo twins of the data-parallel groups, which
    megatron-core's ``get_megatron_optimizer`` asks for (``get_data_parallel_group_gloo``)."""
    from scoped_parallel import ParallelState

    return ParallelState(
        name=name, tensor_model_parallel_size=layout.get("tp", 1), pipeline_model_parallel_size=layout.get("pp", 1),
        expert_model_parallel_size=layout.get("ep", 1), expert_tensor_parallel_size=layout.get("etp"),
        create_gloo_process_groups=True,
    )


def wrap(chunks: list[Any], overlap_param_gather: bool = True, bucket_size: int | None = None) -> list[Any]:
    """Each chunk in megatron-core's ``DistributedDataParallel`` (distributed optimizer, grad
    reduce and param gather overlapped; groups from the active scope, as megatron's globals)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=True,
                                           overlap_param_gather=overlap_param_gather, bucket_size=bucket_size)
    out = []
    for i, chunk in enumerate(chunks):
        out.append(DistributedDataParallel(chunk.config, config, chunk, disable_bucketing=i > 0))
    return out


def optimizer(chunks: list[Any], lr: float = 1e-2) -> Any:
    """megatron-core's distributed optimizer (Adam) over the DDP chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=lr, use_distributed_optimizer=True, bf16=False, fp16=False,
                             weight_decay=0.0, clip_grad=0.0)
    with warnings.catch_warnings(), _CudaTypeNames():
        warnings.simplefilter("ignore")
        return get_megatron_optimizer(config, chunks)


def train_step(chunks: list[Any], opt: Any, batch: tuple[torch.Tensor, ...]) -> float:
    """One training step: megatron-core's schedule (forward and backward of one micro-batch
    per pipeline stage), ``finalize_model_grads`` (the DDP buckets' reduce-scatter), then
    ``optimizer.step()``. Returns the loss on the last stage (0.0 elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from _reshard_megatron import BATCH, SEQ

    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    opt.zero_grad()
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_sync_func = None
    config.no_sync_func = None

    def forward(data: Any, model: Any) -> Any:
        ids, positions, mask = next(data)
        out = model(ids, positions, mask)
        return out, lambda o: (o.float().pow(2).mean(), {"loss": o.float().pow(2).mean().detach()})

    micro = ps.get_pipeline_model_parallel_world_size()
    results = get_forward_backward_func()(
        forward_step_func=forward, data_iterator=iter([batch] * micro), model=chunks,
        num_microbatches=micro, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    opt.step()
    return float(results[0]["loss"]) if results else 0.0


def ddp_cpu_skip_reason() -> str | None:
    """Why megatron-core's DDP cannot train on this machine's CPU, or None where it can.

    0.16's gradient sync touches CUDA only when it overlaps on a communication stream
    (kept on the CPU by the shims above); newer releases (0.19) take
    ``torch.cuda.current_stream()`` at every gradient sync, which needs a GPU.
    """
    import inspect

    if torch.cuda.is_available():
        return None
    from megatron.core.distributed import param_and_grad_buffer

    source = inspect.getsource(param_and_grad_buffer)
    if "torch.cuda.current_stream()" in source:
        from importlib.metadata import version

        return (f"megatron-core {version('megatron-core')}'s DDP gradient sync takes torch.cuda.current_stream(), "
                "which needs a GPU; these run on megatron-core 0.16 (make test) or on a GPU machine")
    return None

