"""Rank side of the megatron-core cells of the matrix (``tests/_matrix.py``).

``rank_cells(rank, names, sabotage)`` runs each named cell on this rank and returns plain data:

* the vanilla run: megatron-core without the adapters, the model alone, its groups made
  by ``parallel_state.initialize_model_parallel`` with the cell's sizes (and destroyed by
  ``destroy_model_parallel`` after);
* the scoped run: the Megatron adapter installed, the cell's state and a partner state of
  another layout, one GPTModel each built, wrapped and given its optimizer in its scope,
  stepped in turn;
* both runs: a tiny megatron-core ``GPTModel`` (local spec, CPU initialization from one
  seed), megatron-core's own ``DistributedDataParallel`` and optimizer (``"ddp"``: plain
  DDP with Adam, gradients all-reduced with ``overlap_grad_reduce``; ``"distributed"``:
  the distributed optimizer with ``overlap_grad_reduce`` and ``overlap_param_gather``),
  Megatron's own schedule from ``get_forward_backward_func()`` (2 micro-batches, labels:
  Megatron's vocab-parallel cross entropy, which asks ``parallel_state`` for the TP group
  at every step), ``finalize_model_grads`` and ``optimizer.step()``; the sync functions
  set as Megatron's ``pretrain`` sets them (``no_sync_func``, ``grad_sync_func``,
  ``param_sync_func``).
* per step the loss (last stage; 0.0 elsewhere) and the gradient norm ``optimizer.step()``
  returns, the final parameters of this rank's chunks (after a forced parameter gather),
  the groups ``parallel_state``'s getters answer (vanilla: Megatron's globals; scoped:
  the state, through the adapter) and those the DDP wrapper took when it was built.

CPU shims: ``tests/_megatron_ddp.py`` (those of ``examples/megatron_two_models.py``, and
CUDA type names while the optimizer is built and while it steps: its gradient clipping
asserts ``grad.type() == 'torch.cuda.FloatTensor'``), the same in both runs. With
``sequence_parallel`` the spec's norms are :class:`SequenceParallelNorm` (the local spec's
torch norm refuses sequence parallelism; a cell records that). For a cell of
status ``vanilla cannot run here`` only the vanilla run is made and its error recorded.
``sabotage`` (the errors the library exists to prevent; each must make the comparison
fail): ``"step"`` steps the cell's model in its *partner's* scope, ``"build"`` wraps it in
DDP and builds its optimizer in the partner's scope (the model itself in its own).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

import _megatron_ddp as md
import _megatron_gpt as gpt
from _world import new_groups_destroyed
from _matrix import PROVEN, VANILLA_FAILS, Cell, cell, compare_runs

STEPS = 3
SEED, PARTNER_SEED = 1, 2
VOCAB, SEQ, BATCH, MICRO = 64, 8, 2, 2
LR = 1e-2
SABOTAGES = ("", "step", "build")

_TOKENS = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel_size": "cp",
    "expert_model_parallel_size": "ep",
    "virtual_pipeline_model_parallel_size": "vpp",
}


def _sizes(layout: dict[str, int]) -> dict[str, int]:
    """The layout by token (tp, pp, cp, ep, vpp), 1 where absent."""
    out = {token: 1 for token in _TOKENS.values()}
    out.update({_TOKENS[k]: v for k, v in layout.items()})
    return out


def _state_keywords(layout: dict[str, int]) -> dict[str, int]:
    """ParallelState keywords (the virtual pipeline size is set in the scope, as Megatron's setter)."""
    return {k: v for k, v in layout.items() if k != "virtual_pipeline_model_parallel_size"}


# ------------------------------------------------------------------------------ the model

def _build(sizes: dict[str, int], seed: int, settings: dict[str, Any]) -> list[Any]:
    """This rank's chunks of a tiny GPTModel; groups from the active scope (or Megatron's globals)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    experts = settings.get("experts", 0)
    moe: dict[str, Any] = {}
    if experts:
        gpt.moe_shim()
        moe = dict(num_moe_experts=experts, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                   moe_grouped_gemm=False, moe_aux_loss_coeff=0.0, expert_model_parallel_size=sizes["ep"])
    vpp = sizes["vpp"]
    config = gpt.cpu_config(
        num_layers=max(2, sizes["pp"] * vpp), tensor_model_parallel_size=sizes["tp"],
        pipeline_model_parallel_size=sizes["pp"], context_parallel_size=sizes["cp"],
        sequence_parallel=bool(settings.get("sequence_parallel")),
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None, **moe,
    )
    spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False)
    if settings.get("sequence_parallel") and not settings.get("torch norm"):
        assert sizes["pp"] == 1, "the sequence-parallel block spec below is for one stage"
        spec = _sequence_parallel_block(spec, config.num_layers)
    return gpt.gpt_chunks(config, spec, VOCAB, SEQ, seed)


class SequenceParallelNorm:
    """A torch LayerNorm whose weights are marked ``sequence_parallel`` (as megatron-core's
    Apex and Transformer Engine norms mark them), so that ``finalize_model_grads`` sums
    their gradients over the TP group. The local spec's ``WrappedTorchNorm`` refuses
    ``sequence_parallel=True``; there is no Apex or Transformer Engine here."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> Any:
        norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _sequence_parallel_block(layer: Any, num_layers: int) -> Any:
    """The local layer spec with its norms (and the block's final norm) a SequenceParallelNorm."""
    import copy

    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = copy.deepcopy(layer)
    layer.submodules.input_layernorm = SequenceParallelNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelNorm)


def _wrap(chunks: list[Any], variant: str) -> list[Any]:
    """megatron-core's DDP around each chunk, as Megatron's ``get_model`` does (bucketing
    off for chunks after the first), then the sync functions as Megatron's ``pretrain`` sets them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    distributed = variant == "distributed"
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=True, use_distributed_optimizer=distributed, overlap_param_gather=distributed,
    )
    wrapped = [DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    config = wrapped[0].config

    def one_or_list(fns: list[Any]) -> Any:
        return fns[0] if len(fns) == 1 else fns

    config.no_sync_func = one_or_list([m.no_sync for m in wrapped])
    config.grad_sync_func = one_or_list([m.start_grad_sync for m in wrapped])
    config.param_sync_func = one_or_list([m.start_param_sync for m in wrapped]) if distributed else None
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _optimizer(chunks: list[Any], variant: str) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=LR, use_distributed_optimizer=variant == "distributed",
                             bf16=False, fp16=False, weight_decay=0.0, clip_grad=1.0)
    with warnings.catch_warnings(), md._CudaTypeNames():
        warnings.simplefilter("ignore")
        return get_megatron_optimizer(config, chunks)


def _batch(seed: int, step: int, micro: int, dp_rank: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(((seed * 1000 + step) * 100 + micro) * 100 + dp_rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return tokens[:, :-1], positions, mask, tokens[:, 1:]


def _forward(data: Any, model: Any) -> Any:
    tokens, positions, mask, labels = next(data)
    output = model(tokens, positions, mask, labels=labels)

    def loss_func(per_token: torch.Tensor) -> Any:
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _step(chunks: list[Any], opt: Any, seed: int, step: int) -> tuple[float, float | None]:
    """One training step in the active scope (or Megatron's globals): (loss, grad norm)."""
    ps = gpt.parallel_state()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.manual_seed(10_000 + step)  # one process-wide generator: seeded alike in every run
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    opt.zero_grad()
    dp_rank = ps.get_data_parallel_rank()
    micro = [_batch(seed, step, m, dp_rank) for m in range(MICRO)]
    results = get_forward_backward_func()(
        forward_step_func=_forward,
        data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
        model=chunks, num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    with md._CudaTypeNames():  # clip_grad_by_total_norm_fp32 asserts 'torch.cuda.FloatTensor' grads
        _, norm, _ = opt.step()
    loss = float(torch.stack([r["loss"] for r in results]).mean()) if results else 0.0
    return loss, None if norm is None else float(norm)


def _params(chunks: list[Any]) -> list[torch.Tensor]:
    """This rank's parameters, after megatron-core's own forced gather (distributed optimizer)."""
    for chunk in chunks:
        if chunk.ddp_config.use_distributed_optimizer:
            chunk.start_param_sync(force_sync=True)
    return [p.detach().clone() for chunk in chunks for p in chunk.module.parameters()]


def _groups() -> dict[str, tuple[int, ...]]:
    """What parallel_state's getters answer (Megatron's globals, or the active state)."""
    ps = gpt.parallel_state()

    def ranks(group: Any) -> tuple[int, ...]:
        return tuple(dist.get_process_group_ranks(group))

    out = {
        "tp": ranks(ps.get_tensor_model_parallel_group()),
        "pp": ranks(ps.get_pipeline_model_parallel_group()),
        "dp": ranks(ps.get_data_parallel_group()),
        "dp-cp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        "cp": ranks(ps.get_context_parallel_group()),
        "mp": ranks(ps.get_model_parallel_group()),
        "ep": ranks(ps.get_expert_model_parallel_group()),
        "edp": ranks(ps.get_expert_data_parallel_group()),
        "dp gloo": ranks(ps.get_data_parallel_group_gloo(with_context_parallel=True)),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }
    if ps.is_rank_in_embedding_group():
        out["embd"] = ranks(ps.get_embedding_group())
    return out


def _ddp_groups(chunks: list[Any]) -> dict[str, tuple[int, ...]]:
    """The groups megatron-core's DDP wrapper took when it was built (it keeps them)."""
    ddp = chunks[0]
    names = ("dp_cp_group", "intra_dp_cp_group", "expt_dp_group", "tp_group", "pp_group", "ep_group")
    return {f"ddp {n}": tuple(dist.get_process_group_ranks(getattr(ddp, n))) for n in names}


def _train(chunks: list[Any], opt: Any) -> dict[str, Any]:
    run: dict[str, Any] = {"losses": [], "norms": []}
    for i in range(STEPS):
        loss, norm = _step(chunks, opt, SEED, i)
        run["losses"].append(loss)
        run["norms"].append(norm)
    return run


# ------------------------------------------------------------------------------ the runs

def _vanilla(c: Cell) -> dict[str, Any]:
    """The cell's model alone under vanilla Megatron (no adapter): initialize_model_parallel's groups."""
    with new_groups_destroyed():
        return _vanilla_run(c)


def _vanilla_run(c: Cell) -> dict[str, Any]:
    ps = gpt.parallel_state()
    sizes = _sizes(dict(c.layout))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes["tp"], pipeline_model_parallel_size=sizes["pp"],
        virtual_pipeline_model_parallel_size=sizes["vpp"] if sizes["vpp"] > 1 else None,
        context_parallel_size=sizes["cp"], expert_model_parallel_size=sizes["ep"],
        create_gloo_process_groups=True,
    )
    try:
        groups = _groups()
        chunks = _wrap(_build(sizes, SEED, dict(c.settings)), c.settings["optimizer"])
        groups.update(_ddp_groups(chunks))
        initial = _params(chunks)
        opt = _optimizer(chunks, c.settings["optimizer"])
        run = _train(chunks, opt)
        run["params"], run["initial"], run["groups"] = _params(chunks), initial, groups
        return run
    finally:
        ps.destroy_model_parallel()


def _vanilla_error(c: Cell) -> dict[str, Any]:
    try:
        _vanilla(c)
    except Exception as err:  # noqa: BLE001 - the vanilla error is the cell's record
        return {"error": (type(err).__name__, str(err)[:400])}
    return {"error": None}


def _scoped(c: Cell, sabotage: str) -> dict[str, Any]:
    from scoped_parallel import ParallelState, adapters

    ps = gpt.parallel_state()
    mine = ParallelState(name="cell", create_gloo_process_groups=True, **_state_keywords(dict(c.layout)))
    states = [mine]
    try:
        partner = ParallelState(name="partner", create_gloo_process_groups=True, **_state_keywords(dict(c.partner)))
        states.append(partner)
        variant = c.settings["optimizer"]
        with adapters.installed(targets=("megatron",)):
            models = {}
            for state, layout, seed, settings in ((mine, c.layout, SEED, dict(c.settings)),
                                                  (partner, c.partner, PARTNER_SEED, {})):
                sizes = _sizes(dict(layout))
                with state.activate():
                    if sizes["vpp"] > 1:  # as initialize_model_parallel(virtual_pipeline_model_parallel_size=...)
                        ps.set_virtual_pipeline_model_parallel_world_size(sizes["vpp"])
                    chunks = _build(sizes, seed, settings)
                with (partner if sabotage == "build" else state).activate():
                    chunks = _wrap(chunks, variant)
                    models[state.name] = (chunks, _optimizer(chunks, variant))
            chunks, opt = models["cell"]
            other, other_opt = models["partner"]
            with mine.activate():
                groups = {**_groups(), **_ddp_groups(chunks)}
            run: dict[str, Any] = {"losses": [], "norms": []}
            for i in range(STEPS):
                with (partner if sabotage == "step" else mine).activate():
                    loss, norm = _step(chunks, opt, SEED, i)
                run["losses"].append(loss)
                run["norms"].append(norm)
                with partner.activate():
                    _step(other, other_opt, PARTNER_SEED, i)
            with mine.activate():
                run["params"] = _params(chunks)
            with partner.activate():
                _params(other)
            run["groups"] = groups
            return run
    finally:
        for state in states:
            state.destroy()


def rank_cells(rank: int, names: list[str], sabotage: str = "") -> dict[str, Any]:
    """Run the named cells on this rank (see the module doc); plain data per cell."""
    assert sabotage in SABOTAGES, f"sabotage {sabotage!r}, expected one of {SABOTAGES}"
    out: dict[str, Any] = {}
    with md.ddp_cpu_shims(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's notes on Apex, TE and CUDA settings
        for name in names:
            c = cell(name)
            if c.status == VANILLA_FAILS:
                out[name] = _vanilla_error(c)
                continue
            assert c.status == PROVEN, f"{name}: no megatron-core cell is {c.status!r}"
            vanilla = _vanilla(c)
            scoped = _scoped(c, sabotage)
            out[name] = {
                "problems": compare_runs(scoped, vanilla),
                "moved": sum(not torch.equal(a, b) for a, b in zip(vanilla["params"], vanilla["initial"])),
                "parameters": len(vanilla["params"]),
                "losses": vanilla["losses"],
                "norms": vanilla["norms"],
                # the vanilla baseline must be the same layout as the state's
                "state groups": scoped["groups"],
                "vanilla groups": vanilla["groups"],
            }
    return out
