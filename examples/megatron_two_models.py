"""Two megatron-core GPTModels with different tensor-parallel sizes, and a third with two
pipeline stages, in one process world.

    torchrun --standalone --nproc-per-node 4 examples/megatron_two_models.py --verify

Model "wide" runs TP=2 x DP=2, model "narrow" TP=4, model "deep" PP=2 x DP=2 with two
virtual pipeline stages per stage (4 layers, one per model chunk; word embeddings tied
between the first and the last stage); each is megatron-core's own ``GPTModel`` (local
layer spec; "deep" is one ``GPTModel`` per chunk, ``vp_stage=0, 1``) built inside its
state's scope with no group passed anywhere. Legacy Megatron-style code throughout: the
virtual pipeline size is set with ``parallel_state.set_virtual_pipeline_model_parallel_world_size``
inside the scope (it stays that state's), and the training step is Megatron's own
schedule from ``get_forward_backward_func()`` (the interleaved 1F1B schedule for "deep",
four micro-batches), then gradients summed over ``parallel_state.get_data_parallel_group()``
and, for the tied embeddings, over ``get_embedding_group()``. The three models are trained interleaved, one step each.
``--verify`` then trains each model alone under vanilla Megatron
(``initialize_model_parallel`` with its sizes, no adapter) and once more with explicit
groups (``GPTModel(..., pg_collection=state.process_group_collection())`` and the same
collection given to the schedule, outside any scope), and reports whether losses and
final parameters are bit-identical.

CPU shims (the same in every run, installed by :func:`cpu_shims`): Megatron's
model-parallel RNG tracker ``fork()`` switches the CUDA generator, so it is a no-op
here (dropout is 0, so no random numbers are drawn inside it); Megatron's
``GlobalMemoryBuffer`` allocates on the current CUDA device, so it allocates on the
CPU here; the schedule and the pipeline's send/receive buffers ask for CUDA tensors
(``device="cuda"``, ``torch.cuda.current_device()``) and the tied embedding moves to
CUDA with ``.cuda()`` before its all-reduce, so a torch function mode keeps those
tensors on the CPU. Weights are built on the CPU (``use_cpu_initialization=True``)
from a seeded torch generator, fusions are off, and the causal mask is passed
explicitly (Megatron's default mask is built on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: name -> (tensor parallel size, pipeline parallel size); 4 ranks, so "wide" and
#: "deep" have data parallel size 2
MODELS = {"wide": (2, 1), "narrow": (4, 1), "deep": (1, 2)}
#: name -> virtual pipeline stages per pipeline stage (model chunks per rank), where > 1
VIRTUAL = {"deep": 2}
VOCAB, SEQ, BATCH, MICROBATCHES, LR = 64, 8, 2, 4, 0.1


def _quiet_import() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

        import megatron.core.models.gpt  # noqa: F401
    return parallel_state


class _KeepOnCpu(TorchFunctionMode):
    """Tensors Megatron asks to create on (or move to) CUDA stay on the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_shims() -> Any:
    """Make Megatron's CUDA-only helpers run on the CPU for the block (see the module docstring)."""
    _quiet_import()
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.utils import GlobalMemoryBuffer

    def fork(self: Any, name: str = "model-parallel-rng") -> Any:
        return contextlib.nullcontext()

    def get_tensor(self: Any, tensor_shape: Any, dtype: Any, name: str, mem_alloc_context: Any = None) -> Any:
        numel = 1
        for n in tensor_shape:
            numel *= n
        key = (name, dtype)
        if key not in self.buffer or self.buffer[key].numel() < numel:
            self.buffer[key] = torch.empty(numel, dtype=dtype, requires_grad=False)
        return self.buffer[key][:numel].view(*tensor_shape)

    saved = CudaRNGStatesTracker.fork, GlobalMemoryBuffer.get_tensor, torch.cuda.current_device
    CudaRNGStatesTracker.fork = fork  # type: ignore[method-assign]
    GlobalMemoryBuffer.get_tensor = get_tensor  # type: ignore[method-assign]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        with _KeepOnCpu():
            yield
    finally:
        CudaRNGStatesTracker.fork, GlobalMemoryBuffer.get_tensor, torch.cuda.current_device = saved  # type: ignore[method-assign]


def megatron_executor_runs() -> bool:
    """Whether megatron-core's own ``execute_reshard_plan`` can run here: from 0.17 on it calls
    ``torch.cuda.synchronize()``, so it needs a GPU whatever the copy service."""
    from megatron.core import package_info

    version = tuple(int(x) for x in package_info.__version__.split(".")[:2])
    return version < (0, 17) or torch.cuda.is_available()


def cpu_copy_service() -> Any:
    """A megatron-core ``CopyService`` on torch's batched point-to-point calls (CPU, gloo), counting bytes."""
    from megatron.core.resharding.copy_services.base import CopyService

    class Service(CopyService):
        def __init__(self) -> None:
            self.sends: list[Any] = []
            self.recvs: list[Any] = []
            self.sent: dict[int, int] = {}

        def submit_send(self, tensor: Any, dest_rank: int, task_id: Any = None) -> None:
            self.sends.append((task_id, tensor, dest_rank))

        def submit_recv(self, tensor: Any, src_rank: int, task_id: Any = None) -> None:
            self.recvs.append((task_id, tensor, src_rank))

        def submit_send_with_id(self, task_id: Any, tensor: Any, dest_rank: int) -> None:
            self.submit_send(tensor, dest_rank, task_id)

        def submit_recv_with_id(self, task_id: Any, tensor: Any, src_rank: int) -> None:
            self.submit_recv(tensor, src_rank, task_id)

        def run(self) -> None:
            me = dist.get_rank()
            local = {task: tensor for task, tensor, peer in self.sends if peer == me}
            ops = []
            for task, tensor, peer in self.recvs:
                if peer == me:
                    tensor.copy_(local[task])
                else:
                    ops.append(dist.P2POp(dist.irecv, tensor, peer))
            for _, tensor, peer in self.sends:
                if peer != me:
                    ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer))
                    self.sent[peer] = self.sent.get(peer, 0) + tensor.numel() * tensor.element_size()
            if ops:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            self.sends.clear()
            self.recvs.clear()

    return Service()


def build_gpt(tp: int, pp: int = 1, vpp: int = 1, pg_collection: Any = None) -> list[Any]:
    """A tiny GPTModel (local spec, 2 layers per virtual stage over ``pp`` stages) as this
    rank's model chunks (one per virtual stage), weights from a fixed seed; groups from the
    scope (or Megatron's globals) unless ``pg_collection`` is given."""
    ps = _quiet_import()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2 * vpp,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        pipeline_dtype=torch.float32,
        batch_p2p_sync=False,  # batched send/receive without torch.cuda.synchronize()
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # The unfused cross entropy of megatron-core 0.16 takes the TP group from
        # parallel_state even when the model has a pg_collection; the "native" one takes
        # pg_collection.tp. Same choice in every run.
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="native",
    )
    torch.manual_seed(1234)
    chunks = []
    for chunk in range(vpp):
        vp_stage = chunk if vpp > 1 else None
        if pg_collection is None:
            first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            kwargs = {}
        else:
            stage, stages = dist.get_rank(pg_collection.pp), dist.get_world_size(pg_collection.pp)
            first, last = stage == 0 and chunk == 0, stage == stages - 1 and chunk == vpp - 1
            kwargs = {explicit_keyword(): pg_collection}
        if vp_stage is not None:
            kwargs["vp_stage"] = vp_stage
        chunks.append(GPTModel(
            config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=first,
            post_process=last,
            **kwargs,
        ))
    return chunks


def explicit_keyword() -> str | None:
    """GPTModel's keyword for explicit groups (``pg_collection``), or None where a model
    given explicit groups still reads parallel_state's globals: megatron-core 0.15's
    ``RowParallelLinear`` falls back to the global TP group, 0.14 takes
    ``model_comm_pgs`` only for part of the model, 0.13 takes no groups."""
    import inspect

    _quiet_import()
    from megatron.core import package_info
    from megatron.core.models.gpt import GPTModel

    if tuple(int(x) for x in package_info.__version__.split(".")[:2]) < (0, 16):
        return None
    params = inspect.signature(GPTModel.__init__).parameters
    return "pg_collection" if "pg_collection" in params else None


def batch(step: int, dp_rank: int) -> tuple[torch.Tensor, ...]:
    """Synthetic tokens for one data-parallel rank and step (the same in every run)."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True = masked
    return tokens[:, :-1], positions, mask, tokens[:, 1:]


def _forward_step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
    """Megatron's forward-step contract: the stage's output and, for the last stage, its loss."""
    tokens, positions, mask, labels = next(data)
    output = model(tokens, positions, mask, labels=labels)

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.float().mean()
        # a copy: Megatron's schedule divides the returned loss by the micro-batch count in place
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def train_step(chunks: list[Any], step: int, pg_collection: Any = None) -> float:
    """One SGD step through Megatron's schedule; returns the loss averaged over micro-batches
    and data parallel ranks (on every rank).

    Legacy code: the schedule, the data parallel and embedding groups come from
    parallel_state, unless ``pg_collection`` is given (the explicit-groups run), which the
    schedule and the gradient sums then use instead.
    """
    ps = _quiet_import()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if pg_collection is None:
        dp, pp = ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()
        embedding = ps.get_embedding_group() if ps.is_rank_in_embedding_group() else None
        schedule = get_forward_backward_func()
        explicit = {}
    else:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        dp, pp = pg_collection.dp, pg_collection.pp
        embedding = getattr(pg_collection, "embd", None)  # None off the embedding stages
        vpp = len(chunks) if len(chunks) > 1 else None
        schedule = get_forward_backward_func(pp_size=dist.get_world_size(pp), vp_size=vpp)
        communicator = P2PCommunicator(pp_group=pp, config=chunks[0].config)
        explicit = {"pg_collection": pg_collection, "p2p_communicator": communicator}
    dp_rank, dp_size = dist.get_rank(dp), dist.get_world_size(dp)
    micro = [batch(MICROBATCHES * step + m, dp_rank) for m in range(MICROBATCHES)]
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    results = schedule(
        forward_step_func=_forward_step,
        data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
        model=chunks,
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        **explicit,
    )
    with torch.no_grad():
        if embedding is not None and dist.get_world_size(pp) > 1:
            # the first chunk's word embedding and the last chunk's output layer are one weight
            for chunk in chunks:
                if chunk.pre_process or chunk.post_process:
                    dist.all_reduce(chunk.shared_embedding_or_output_weight().grad, group=embedding)
        for param in (p for chunk in chunks for p in chunk.parameters()):
            if param.grad is not None:
                dist.all_reduce(param.grad, group=dp)
                param.sub_(LR * param.grad / dp_size)
    # the last stage holds the losses; the pipeline group's sum hands them to every stage
    reported = torch.stack([r["loss"] for r in results]).mean() if results else torch.zeros(())
    dist.all_reduce(reported, group=dp)
    dist.all_reduce(reported, group=pp)
    return float(reported / dp_size)


def snapshot(chunks: list[Any]) -> dict[str, torch.Tensor]:
    """This rank's parameter shards, detached copies, named by chunk."""
    return {f"{i}.{name}": p.detach().clone() for i, chunk in enumerate(chunks) for name, p in chunk.named_parameters()}


def run_scoped(steps: int) -> dict[str, Any]:
    """The models in one process world, interleaved, each in its own scope, no group passed."""
    from scoped_parallel import ParallelState, adapters

    ps = _quiet_import()

    states = {
        name: ParallelState(name=name, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        for name, (tp, pp) in MODELS.items()
    }
    out: dict[str, Any] = {name: {"losses": []} for name in MODELS}
    try:
        with adapters.installed(targets=("megatron",)):
            models = {}
            for name, (tp, pp) in MODELS.items():
                with states[name].activate():
                    if name in VIRTUAL:  # as initialize_model_parallel(virtual_pipeline_model_parallel_size=...)
                        ps.set_virtual_pipeline_model_parallel_world_size(VIRTUAL[name])
                    models[name] = build_gpt(tp, pp, VIRTUAL.get(name, 1))
            for step in range(steps):
                for name, model in models.items():
                    with states[name].activate():
                        out[name]["losses"].append(train_step(model, step))
            for name, model in models.items():
                out[name]["params"] = snapshot(model)
    finally:
        for state in states.values():
            state.destroy()
    return out


def run_vanilla(name: str, steps: int) -> dict[str, Any]:
    """One model alone under vanilla Megatron's globals (no adapter, no state)."""
    ps = _quiet_import()
    tp, pp = MODELS[name]
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=VIRTUAL.get(name), create_gloo_process_groups=False,
    )
    try:
        model = build_gpt(tp, pp, VIRTUAL.get(name, 1))
        losses = [train_step(model, step) for step in range(steps)]
        return {"losses": losses, "params": snapshot(model)}
    finally:
        ps.destroy_model_parallel()


def run_explicit(name: str, steps: int) -> dict[str, Any] | None:
    """One model with ``pg_collection=state.process_group_collection()``, outside any scope
    (None where this megatron-core's GPTModel takes no explicit groups).

    Megatron's attention still takes its scratch buffer from parallel_state's global
    ``get_global_memory_buffer()`` even with explicit groups, so that buffer (scratch
    space, no parallel state) is created for this run.
    """
    from scoped_parallel import ParallelState

    ps = _quiet_import()
    if explicit_keyword() is None:
        return None
    tp, pp = MODELS[name]
    state = ParallelState(name=name, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    created_buffer = False
    try:
        collection = state.process_group_collection()
        if getattr(ps, "_GLOBAL_MEMORY_BUFFER", None) is None:
            ps._set_global_memory_buffer()
            created_buffer = True
        model = build_gpt(tp, pp, VIRTUAL.get(name, 1), pg_collection=collection)
        losses = [train_step(model, step, pg_collection=collection) for step in range(steps)]
        return {"losses": losses, "params": snapshot(model)}
    finally:
        if created_buffer:
            ps.destroy_global_memory_buffer()
        state.destroy()


def compare(a: dict[str, Any], b: dict[str, Any] | None) -> list[str]:
    """Differences between two runs of one model (empty: bit-identical; None: not run)."""
    if b is None:
        return []
    problems = []
    if a["losses"] != b["losses"]:
        problems.append(f"losses {a['losses']} != {b['losses']}")
    for key in a["params"].keys() | b["params"].keys():
        x, y = a["params"].get(key), b["params"].get(key)
        if x is None or y is None or not torch.equal(x, y):
            problems.append(f"parameter {key} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Train both models interleaved; with ``--verify`` compare with the solo and explicit runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    try:
        with cpu_shims():
            scoped = run_scoped(args.steps)
        for name, (tp, pp) in MODELS.items():
            if rank == 0:
                dp = dist.get_world_size() // (tp * pp)
                virtual = f" VPP={VIRTUAL[name]}" if name in VIRTUAL else ""
                print(f"{name:7} TP={tp} PP={pp}{virtual} DP={dp} losses {scoped[name]['losses']}")
        if not args.verify:
            return 0
        failed = 0
        for name in MODELS:
            with cpu_shims():
                others = (("solo vanilla Megatron", run_vanilla(name, args.steps)),
                          ("explicit pg_collection", run_explicit(name, args.steps)))
            for label, other in others:
                problems = compare(scoped[name], other)
                flag = torch.tensor([len(problems)])
                dist.all_reduce(flag)
                failed += int(flag.item() > 0)
                if rank == 0:
                    verdict = "losses identical; final parameters identical" if not flag.item() else "DIFFERENT"
                    if other is None:
                        verdict = "not run (this megatron-core's GPTModel still reads global groups when given explicit ones)"
                    print(f"{name:7} vs {label}: {verdict}")
                if problems:
                    print(f"rank {rank} {name} vs {label}: {problems[:3]}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
