"""Two megatron-core GPTModels with different tensor-parallel sizes in one process world.

    torchrun --standalone --nproc-per-node 4 examples/megatron_two_models.py --verify

Model "wide" runs TP=2 x DP=2, model "narrow" TP=4; each is megatron-core's own
``GPTModel`` (local layer spec, 2 layers) built inside its state's scope with no group
passed anywhere, and the training step is legacy Megatron-style code: it asks
``megatron.core.parallel_state`` for the data-parallel group and rank. The two models
are trained interleaved, one step each. ``--verify`` then trains each model alone
under vanilla Megatron (``initialize_model_parallel`` with its sizes, no adapter) and
a third time with explicit groups (``GPTModel(..., pg_collection=
state.process_group_collection())``, outside any scope), and reports whether losses
and final parameters are bit-identical.

CPU shims (the same in every run, installed once per process by :func:`cpu_shims`):
Megatron's model-parallel RNG tracker ``fork()`` switches the CUDA generator, so it is
a no-op here (dropout is 0, so no random numbers are drawn inside it); Megatron's
``GlobalMemoryBuffer`` allocates on the current CUDA device, so it allocates on the
CPU here. Weights are built on the CPU (``use_cpu_initialization=True``) from a
seeded torch generator, fusions are off, and the causal mask is passed explicitly
(Megatron's default mask is built on CUDA).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: name -> tensor parallel size (4 ranks: "wide" has data parallel size 2)
MODELS = {"wide": 2, "narrow": 4}
VOCAB, SEQ, BATCH, LR = 64, 8, 2, 0.1


def _quiet_import() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

        import megatron.core.models.gpt  # noqa: F401
    return parallel_state


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

    saved = CudaRNGStatesTracker.fork, GlobalMemoryBuffer.get_tensor
    CudaRNGStatesTracker.fork = fork  # type: ignore[method-assign]
    GlobalMemoryBuffer.get_tensor = get_tensor  # type: ignore[method-assign]
    try:
        yield
    finally:
        CudaRNGStatesTracker.fork, GlobalMemoryBuffer.get_tensor = saved  # type: ignore[method-assign]


def build_gpt(tp: int, pg_collection: Any = None) -> Any:
    """A tiny GPTModel (local spec, 2 layers), weights from a fixed seed; groups from the scope
    (or Megatron's globals) unless ``pg_collection`` is given."""
    _quiet_import()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
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
    kwargs = {} if pg_collection is None else {explicit_keyword(): pg_collection}
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        **kwargs,
    )


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


def train_step(model: Any, step: int, dp_group: Any = None) -> float:
    """One SGD step; legacy code: data parallel group and rank come from parallel_state
    unless ``dp_group`` is given (the explicit-groups run)."""
    ps = _quiet_import()
    group = ps.get_data_parallel_group() if dp_group is None else dp_group
    dp_rank, dp_size = dist.get_rank(group), dist.get_world_size(group)
    tokens, positions, mask, labels = batch(step, dp_rank)
    losses = model(tokens, positions, mask, labels=labels)
    loss = losses.float().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
                param.sub_(LR * param.grad / dp_size)
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=group)
    return float(reported / dp_size)


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    """This rank's parameter shards, detached copies."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_scoped(steps: int) -> dict[str, Any]:
    """Both models in one process world, interleaved, each in its own scope, no group passed."""
    from scoped_parallel import ParallelState, adapters

    states = {name: ParallelState(name=name, tensor_model_parallel_size=tp) for name, tp in MODELS.items()}
    out: dict[str, Any] = {name: {"losses": []} for name in MODELS}
    try:
        with adapters.installed(targets=("megatron",)):
            models = {}
            for name, tp in MODELS.items():
                with states[name].activate():
                    models[name] = build_gpt(tp)
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
    ps.initialize_model_parallel(tensor_model_parallel_size=MODELS[name], create_gloo_process_groups=False)
    try:
        model = build_gpt(MODELS[name])
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
    state = ParallelState(name=name, tensor_model_parallel_size=MODELS[name])
    created_buffer = False
    try:
        collection = state.process_group_collection()
        if getattr(ps, "_GLOBAL_MEMORY_BUFFER", None) is None:
            ps._set_global_memory_buffer()
            created_buffer = True
        model = build_gpt(MODELS[name], pg_collection=collection)
        dp_group = getattr(collection, "dp", None) or state.get_data_parallel_group()
        losses = [train_step(model, step, dp_group=dp_group) for step in range(steps)]
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
        for name, tp in MODELS.items():
            if rank == 0:
                print(f"{name:7} TP={tp} DP={dist.get_world_size() // tp} losses {scoped[name]['losses']}")
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
