"""PPO with an actor, a critic, a reference model and a rollout copy, each with its own parallel layout, in one job.

Run (4 CPU ranks over gloo; NCCL, one GPU per rank, when CUDA GPUs are present)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 examples/rl_ppo.py
        [--steps 20] [--verify]

The world size must be a multiple of 4 (the reference uses SP=4). On 2 shared CPU cores
the default run takes about 20-30 s and ``--verify`` adds under 10 s (cheap enough to be on
by default in a demo). DeepSpeed JIT-builds a small
communication extension the first time (about a minute), cached in ``$TORCH_EXTENSIONS_DIR``
(default: ``<tmp>/scoped_parallel_torch_ext``, shared with the test suite).

The models are tiny Llamas built from a ``LlamaConfig`` (nothing is downloaded), each
with a ``ParallelState`` built from its DeepSpeed config and its engine built inside that
state's scope:

=========  ========================  =====================================================
model      layout on 4 ranks         engine
=========  ========================  =====================================================
actor      Ulysses SP=2 x DP=2       ZeRO-2, AdamW, ``mpu`` = its state (returned by
                                     ``register_with_transformers``)
critic     DP=4                      ZeRO-1, AdamW; Llama backbone + scalar value head
reference  Ulysses SP=4              ZeRO-0, frozen, eval; the actor's initial weights
rollout    DP=4 (no SP)              ZeRO-0, frozen, eval; resharded from the actor before
                                     every rollout with ``scoped_parallel.reshard``
=========  ========================  =====================================================

One step, everything on synthetic tokens with fixed seeds:

1. rollout: ``reshard(actor, actor_state, rollout, rollout_state)`` copies the actor's
   current weights into the rollout copy (the plan is made once, printed at the start and
   cached; with the actor under ZeRO-2 every rank already holds all weights, so the plan is
   local copies only); the rollout copy samples a response to each random prompt (every
   rank its share of the batch), then the actor scores the whole sequences with SP on: the
   old log-probs of the response tokens.
2. the reference scores the same sequences (its log-probs, for the KL term) and the
   critic predicts a value per position.
3. reward = fraction of even token ids in the response, at the last token; advantages by
   GAE (gamma 1), whitened over the batch; returns = advantages + values.
4. updates: the actor's clipped PPO loss + KL to the reference, then the critic's value
   MSE. Each SP rank computes the loss of its sequence shard.

The parallel plumbing (``sp_size``, ``dp_rows``, ``sp_gather``, ``dp_gather``,
``dp_mean``, ...) is written once, in the legacy style, against DeepSpeed's process-wide
getters (``deepspeed.utils.groups``); run inside a model's scope, the scoped_parallel
adapters make those getters answer with that model's groups, so the same code is right for
all three models. The same code also runs unchanged on plain DeepSpeed with one model in
the process, which is what ``benchmarks/e2e.py`` times it against.

``--verify``: after the interleaved run, re-run the actor and the critic alone (fresh
engines, same seeds) on exactly the inputs each received, and check that rollouts, losses
and final parameters are bit-identical; exits non-zero if not. Alone, the actor samples
its rollouts itself: identical rollouts mean every reshard gave the copy the actor's weights
bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "scoped_parallel_torch_ext"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning

import deepspeed  # noqa: E402
import deepspeed.comm  # noqa: E402
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: E402
from deepspeed.utils import groups  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

from scoped_parallel import ParallelState, adapters, plan_reshard, reshard  # noqa: E402
from scoped_parallel import shared_groups  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 128, 64, 2, 4, 4
PROMPT_LEN = RESPONSE_LEN = 16
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
ROLLOUTS_PER_RANK = 2  # the batch of a step is this times the world size
CLIP, KL_COEF, GAE_LAMBDA = 0.2, 0.05, 0.95
DATA_SEED = 1234
TIMEOUT = timedelta(minutes=2)
# Position t of a per-position tensor scores token t + 1: these positions score the response.
RESPONSE_POSITIONS = slice(PROMPT_LEN - 1, SEQ_LEN - 1)
# DeepSpeed's ZeRO calls torch's deprecated all_gather_into_tensor: one warning per rank, noise here.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model: its Ulysses SP size (DP is the rest of the world), ZeRO stage, lr, seed."""

    name: str
    sp: int
    zero_stage: int
    lr: float | None  # None: frozen
    seed: int


# The actor is ZeRO-2, not ZeRO-3: with SP > 1 and a ParallelState as mpu, DeepSpeed 0.19.8's ZeRO-3
# partitions parameters over mpu.get_data_parallel_group() (DP, without the SP ranks) but reduces
# gradients over SP x DP (runtime/zero/parameter_offload.py:267), which gives wrong gradients.
SPECS = {
    "actor": Spec("actor", sp=2, zero_stage=2, lr=1e-2, seed=1),
    "critic": Spec("critic", sp=1, zero_stage=1, lr=1e-2, seed=2),
    "reference": Spec("reference", sp=4, zero_stage=0, lr=None, seed=1),  # the actor's initial weights
}
# The rollout copy: the actor's weights in another layout (DP=4, no SP, ZeRO-0, eval), resharded
# from the actor with scoped_parallel.reshard before every rollout and used to generate. Its own
# initial weights (seed 3) are never used: a reshard that missed an element would change the rollouts.
ROLLOUT = Spec("rollout", sp=1, zero_stage=0, lr=None, seed=3)
ALL_SPECS = {**SPECS, "rollout": ROLLOUT}


@dataclasses.dataclass
class Model:
    """An engine and the state whose scope it runs in (None: plain DeepSpeed, one model)."""

    spec: Spec
    state: ParallelState | None
    engine: Any

    def scope(self) -> Any:
        return self.state.activate() if self.state is not None else contextlib.nullcontext()


@dataclasses.dataclass
class Batch:
    """One step's rollouts and their scores, for the whole batch (identical on every rank)."""

    step: int
    tokens: torch.Tensor  # [batch, SEQ_LEN] prompt + response ids
    old_logp: torch.Tensor  # [batch, SEQ_LEN] per position (see RESPONSE_POSITIONS)
    ref_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    reward: float


@dataclasses.dataclass
class StepStats:
    reward: float
    actor_loss: float
    critic_loss: float
    kl: float
    seconds: float
    model_seconds: dict[str, float]  # time spent in each model's calls (scope enter/exit included)


# ---------------------------------------------------------------------- legacy-style parallel helpers
# Written once against DeepSpeed's global getters; the active scope decides whose groups they see.
# Data parallelism is derived from the sequence-data-parallel group (SP ranks adjacent in it, as
# DeepSpeed and scoped_parallel place them) because plain DeepSpeed's SP mode answers
# _get_data_parallel_group() with WORLD and _get_data_parallel_world_size() with None.


def sp_size() -> int:
    return groups._get_sequence_parallel_world_size()


def sp_rank() -> int:
    return groups._get_sequence_parallel_rank()


def dp_size() -> int:
    return groups._get_sequence_data_parallel_world_size() // sp_size()


def dp_rank() -> int:
    return groups._get_sequence_data_parallel_rank() // sp_size()


def dp_rows(n: int) -> slice:
    """This rank's rows of an ``n``-row batch (SP ranks share rows)."""
    per = n // dp_size()
    return slice(dp_rank() * per, (dp_rank() + 1) * per)


def seq_shard() -> slice:
    """This rank's positions of the sequence (the whole sequence without SP)."""
    per = SEQ_LEN // sp_size()
    return slice(sp_rank() * per, (sp_rank() + 1) * per)


def _all_gather(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def sp_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the SP ranks' sequence shards (dim 1)."""
    if sp_size() == 1:
        return x
    return torch.cat(_all_gather(x, groups._get_sequence_parallel_group()), dim=1)


def sdp_gather(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Concatenate (dim 0) every ``stride``-th piece gathered over the SP x DP group."""
    return torch.cat(_all_gather(x, groups._get_sequence_data_parallel_group())[::stride], dim=0)


def dp_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the DP ranks' rows (dim 0) of a tensor that all SP ranks hold alike."""
    return sdp_gather(x, stride=sp_size())


def dp_mean(x: torch.Tensor) -> torch.Tensor:
    """Sum over SP x DP, divided by DP: how DeepSpeed (ZeRO 0-2) averages gradients with SP.

    A loss computed per SP shard is summed over the shards and averaged over data parallel
    replicas, exactly as DeepSpeed treats its gradients (so reported losses match them).
    """
    x = x.clone()
    dist.all_reduce(x, group=groups._get_sequence_data_parallel_group())
    return x / dp_size()


# ---------------------------------------------------------------------- models and engines


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


class ValueModel(nn.Module):
    """The critic: a Llama backbone and a scalar value per position."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.backbone = LlamaModel(config)
        self.value_head = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def ds_config(spec: Spec) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": ROLLOUTS_PER_RANK * spec.sp,  # the step's batch / DP
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": spec.zero_stage},
        "zero_force_ds_cpu_optimizer": False,
        "sequence_parallel_size": spec.sp,  # read by ParallelState.from_config
        "steps_per_print": 10**9,
    }


def build_model(spec: Spec, state: ParallelState | None) -> Model:
    """Build one model's engine inside ``state``'s scope (plain DeepSpeed when ``state`` is None).

    The same calls as for a single model with DeepSpeed alone: inside a scope,
    register_with_transformers returns the state (else DeepSpeed's parallel_state_sp) and
    deepspeed.initialize without an mpu takes the state as its mpu (else WORLD).
    """
    torch.manual_seed(spec.seed)
    module = (ValueModel(llama_config()) if spec.name == "critic" else LlamaForCausalLM(llama_config())).to(device())
    config = ds_config(spec)
    model = Model(spec, state, None)
    with model.scope():
        mpu = None
        if spec.sp > 1:
            mpu = UlyssesSPAttentionHF.register_with_transformers(
                module,
                core_attn_implementation="sdpa",
                sequence_parallel_size=spec.sp,
                micro_batch_size=config["train_micro_batch_size_per_gpu"],
                seq_length_is_variable=True,
                disable_in_eval=spec.lr is not None,  # the actor samples without SP in eval mode
            )
        if spec.lr is None:
            module.requires_grad_(False)
            model.engine, *_ = deepspeed.initialize(model=module, config=config, mpu=mpu)
            model.engine.eval()
        else:
            optimizer = torch.optim.AdamW(module.parameters(), lr=spec.lr)
            model.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, mpu=mpu)
    if state is not None:
        state.bind(model.engine)  # engine calls (forward, backward, step) run in its scope
    return model


def free(models: dict[str, Model]) -> None:
    for model in models.values():
        model.engine.destroy()
    models.clear()
    gc.collect()


def parameters(model: Model) -> list[torch.Tensor]:
    """Copies of the model's parameters (whole on every rank below ZeRO-3)."""
    return [p.detach().clone() for p in model.engine.module.parameters()]


# ---------------------------------------------------------------------- the models' work


def rollout_inputs(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts and the uniform draws that pick each response token (same on every rank)."""
    gen = torch.Generator().manual_seed(DATA_SEED + step)
    prompts = torch.randint(VOCAB, (batch, PROMPT_LEN), generator=gen)
    return prompts.to(device()), torch.rand(batch, RESPONSE_LEN, generator=gen).to(device())


def forward_shard(engine: Any, tokens: torch.Tensor) -> Any:
    """Run this rank's sequence shard of ``tokens`` (rows already chosen) through the model."""
    shard = seq_shard()
    positions = torch.arange(shard.start, shard.stop, device=tokens.device).expand(len(tokens), -1)
    return engine(input_ids=tokens[:, shard], position_ids=positions)


def token_logprobs(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of the next token at each position of this rank's shard: [rows, shard]."""
    logits = forward_shard(engine, tokens).logits.float()
    targets = tokens.roll(-1, dims=1)[:, seq_shard()]  # the last position wraps; it is never used
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sample(engine: Any, prompts: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Extend ``prompts`` by RESPONSE_LEN tokens, each drawn by inverse CDF from ``uniforms``."""
    tokens = prompts
    for i in range(RESPONSE_LEN):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(len(tokens), -1)
        logits = engine(input_ids=tokens, position_ids=positions, use_cache=False).logits[:, -1].float()
        cdf = logits.softmax(-1).cumsum(-1)
        draw = (cdf < uniforms[:, i : i + 1]).sum(-1, keepdim=True).clamp_(max=VOCAB - 1)
        tokens = torch.cat([tokens, draw], dim=1)
    return tokens


def generate(engine: Any, step: int, batch: int) -> torch.Tensor:
    """Sample responses, each rank of the model its share of the batch; the whole batch back."""
    prompts, uniforms = rollout_inputs(step, batch)
    per = batch // groups._get_sequence_data_parallel_world_size()
    first = groups._get_sequence_data_parallel_rank() * per
    mine = slice(first, first + per)
    training = engine.training
    engine.eval()
    with torch.no_grad():
        tokens = sdp_gather(sample(engine, prompts[mine], uniforms[mine]))
    engine.train(training)
    return tokens


def rollout(engine: Any, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Actor alone (``--verify``, and ``benchmarks/e2e.py``): sample responses itself, then old log-probs."""
    tokens = generate(engine, step, batch)
    return tokens, sequence_logprobs(engine, tokens)


def copy_actor_into(engine: Any, actor: Model, state: ParallelState) -> None:
    """The rollout copy takes the actor's current weights (one call; the plan is cached)."""
    reshard(actor.engine, actor.state, engine, state)


def sequence_logprobs(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position log-probs of the whole batch: this rank's rows and shard, then gathered."""
    with torch.no_grad():
        return dp_gather(sp_gather(token_logprobs(engine, tokens[dp_rows(len(tokens))])))


def critic_values(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position values of the whole batch."""
    with torch.no_grad():
        return dp_gather(sp_gather(forward_shard(engine, tokens[dp_rows(len(tokens))])))


def _shard_mask(like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(SEQ_LEN, dtype=like.dtype, device=like.device)
    mask[RESPONSE_POSITIONS] = 1
    return mask[seq_shard()]


def actor_update(engine: Any, batch: Batch) -> tuple[float, float]:
    """Clipped PPO loss + KL to the reference on this rank's rows and shard; one optimizer step.

    Each SP rank's loss covers its shard, divided by the response tokens of all its rows:
    the shards' losses add up to the rows' mean, and DeepSpeed sums gradients over SP x DP
    and divides by DP, which gives the gradient of the mean over the whole batch.
    """
    rows, shard = dp_rows(len(batch.tokens)), seq_shard()
    logp = token_logprobs(engine, batch.tokens[rows])
    old, ref, adv = (x[rows, shard] for x in (batch.old_logp, batch.ref_logp, batch.advantages))
    mask, count = _shard_mask(logp), logp.shape[0] * RESPONSE_LEN
    ratio = (logp - old).exp()
    policy = -torch.min(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
    kl = (ref - logp).exp() - (ref - logp) - 1  # k3 estimator of KL(actor || reference)
    loss = ((policy + KL_COEF * kl) * mask).sum() / count
    engine.backward(loss)
    engine.step()
    reported = dp_mean(torch.stack([loss.detach(), (kl.detach() * mask).sum() / count]))
    return reported[0].item(), reported[1].item()


def critic_update(engine: Any, batch: Batch) -> float:
    """Value MSE against the returns on this rank's rows; one optimizer step."""
    rows, shard = dp_rows(len(batch.tokens)), seq_shard()
    values = forward_shard(engine, batch.tokens[rows])
    mask, count = _shard_mask(values), values.shape[0] * RESPONSE_LEN
    loss = 0.5 * ((values - batch.returns[rows, shard]).pow(2) * mask).sum() / count
    engine.backward(loss)
    engine.step()
    return dp_mean(loss.detach()).item()


# ---------------------------------------------------------------------- the PPO loop


def score(step: int, tokens: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, values: torch.Tensor) -> Batch:
    """Rewards, GAE advantages (whitened) and returns for the whole batch; no communication."""
    reward = (tokens[:, PROMPT_LEN:] % 2 == 0).float().mean(dim=1)
    v = values[:, RESPONSE_POSITIONS]
    adv = torch.zeros_like(v)
    running = torch.zeros_like(reward)
    for t in reversed(range(RESPONSE_LEN)):
        if t == RESPONSE_LEN - 1:
            delta = reward - v[:, t]  # the episode ends here: the reward, no next value
        else:
            delta = v[:, t + 1] - v[:, t]
        running = delta + GAE_LAMBDA * running
        adv[:, t] = running
    advantages, returns = torch.zeros_like(values), torch.zeros_like(values)
    advantages[:, RESPONSE_POSITIONS] = (adv - adv.mean()) / (adv.std() + 1e-8)
    returns[:, RESPONSE_POSITIONS] = adv + v
    return Batch(step, tokens, old, ref, values, advantages, returns, reward.mean().item())


def timed(model: Model, seconds: dict[str, float], fn: Any, *args: Any) -> Any:
    """``fn(engine, *args)`` in the model's scope, its wall time added to ``seconds[name]``."""
    start = time.perf_counter()
    with model.scope():
        out = fn(model.engine, *args)
    seconds[model.spec.name] = seconds.get(model.spec.name, 0.0) + time.perf_counter() - start
    return out


def ppo_step(models: dict[str, Model], step: int, batch: int) -> tuple[Batch, StepStats]:
    actor, critic, reference, copy = models["actor"], models["critic"], models["reference"], models["rollout"]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    timed(copy, seconds, copy_actor_into, actor, copy.state)
    tokens = timed(copy, seconds, generate, step, batch)
    old = timed(actor, seconds, sequence_logprobs, tokens)
    ref = timed(reference, seconds, sequence_logprobs, tokens)
    values = timed(critic, seconds, critic_values, tokens)
    data = score(step, tokens, old, ref, values)
    actor_loss, kl = timed(actor, seconds, actor_update, data)
    critic_loss = timed(critic, seconds, critic_update, data)
    stats = StepStats(data.reward, actor_loss, critic_loss, kl, time.perf_counter() - start, seconds)
    return data, stats


def interleaved_run(
    states: dict[str, ParallelState], steps: int, batch: int, show: bool
) -> tuple[list[Batch], list[StepStats], dict[str, list[torch.Tensor]]]:
    """Build the three engines in their scopes, train ``steps`` PPO steps, free the engines.

    Returns every step's batch and stats, and the trained models' final parameters.
    """
    models = {name: build_model(spec, states[name]) for name, spec in ALL_SPECS.items()}
    plan = plan_reshard(models["actor"].engine, states["actor"], models["rollout"].engine, states["rollout"])
    if show:
        print("actor -> rollout copy, resharded before every rollout; the plan (computed once, cached):\n"
              + "\n".join("  " + line for line in plan.report().splitlines()), flush=True)
    batches, stats = [], []
    for step in range(steps):
        data, st = ppo_step(models, step, batch)
        batches.append(data)
        stats.append(st)
        if show:
            progress(step + 1, steps, st)
    final = {name: parameters(models[name]) for name in ("actor", "critic")}
    free(models)
    return batches, stats, final


# ---------------------------------------------------------------------- alone: --verify


def replay(model: Model, batches: list[Batch]) -> dict[str, Any]:
    """Run one model's share of every step on the inputs it got in the interleaved run."""
    name, losses, same, seconds = model.spec.name, [], True, []
    for data in batches:
        spent: dict[str, float] = {}
        if name == "actor":
            outputs = timed(model, spent, rollout, data.step, len(data.tokens))
            expected = (data.tokens, data.old_logp)
        elif name == "critic":
            outputs, expected = (timed(model, spent, critic_values, data.tokens),), (data.values,)
        else:
            outputs, expected = (timed(model, spent, sequence_logprobs, data.tokens),), (data.ref_logp,)
        # Bitwise, also for the actor's tokens, which the interleaved run sampled from the
        # rollout copy (DP=4, ZeRO-0) and the replay samples from the actor alone (SP=2 x
        # DP=2): generate() splits rows over SP x DP (4 in both), the actor skips sequence
        # parallelism in eval (disable_in_eval=True) and both hold whole weights, so every
        # matrix multiply has the same shape. A rollout layout with TP or another row split
        # would need a tolerance here.
        same = same and all(map(torch.equal, outputs, expected))
        if name == "actor":
            losses.append(timed(model, spent, actor_update, data)[0])
        elif name == "critic":
            losses.append(timed(model, spent, critic_update, data))
        seconds.append(spent[name])
    return {"losses": losses, "outputs_identical": same, "params": parameters(model), "seconds": seconds}


def losses_of(stats: list[StepStats], name: str) -> list[float]:
    """The losses a model reported in the interleaved run (none for the frozen reference)."""
    return [s.actor_loss if name == "actor" else s.critic_loss for s in stats] if SPECS[name].lr else []


def world_all(flag: bool) -> bool:
    t = torch.tensor([0.0 if flag else 1.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def _world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _verdict(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, str]:
    same = world_all(len(a) == len(b) and all(map(torch.equal, a, b)))
    if same:
        return True, "identical"
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)), default=float("inf"))
    return False, f"DIFFERENT (max abs diff {_world_max(diff):.3g})"


def verify(states: dict[str, ParallelState], batches: list[Batch], stats: list[StepStats],
           final: dict[str, list[torch.Tensor]], show: bool) -> bool:
    """Each trainable model alone, fresh engine, same seeds and inputs: bit-identical to interleaved?"""
    ok = True
    lines = ["verify: each trainable model re-run alone (fresh engine, same seeds, its recorded inputs)"]
    for name in ("actor", "critic"):
        model = build_model(SPECS[name], states[name])
        alone = replay(model, batches)
        free({name: model})
        interleaved, replayed = ([torch.tensor(x) for x in run] for run in (losses_of(stats, name), alone["losses"]))
        loss_ok, loss_text = _verdict(interleaved, replayed)
        param_ok, param_text = _verdict(final[name], alone["params"])
        out_ok = world_all(alone["outputs_identical"])
        ok = ok and loss_ok and param_ok and out_ok
        scored = "rollouts + log-probs" if name == "actor" else "values"
        lines.append(f"  {name:<7} losses {loss_text}; final parameters {param_text}; "
                     f"{scored} {'identical' if out_ok else 'DIFFERENT'}")
    if show:
        print("\n".join(lines), flush=True)
    return ok


def steady(seconds: list[float]) -> list[float]:
    """Seconds of the steps after the first (warm-up) one, or of the only step."""
    return seconds[1:] or seconds


# ---------------------------------------------------------------------- output (rank 0)


def layout_summary(states: dict[str, ParallelState], backend: str) -> str:
    """Each state's layout and groups, and which of rank 0's groups the states share."""
    lines = [f"{len(states)} models on {dist.get_world_size()} ranks ({backend}), one ParallelState each:"]
    for name, state in states.items():
        shown = [k for k in ("sp", "dp", "sp-dp") if len(state.layout.groups(k)[0]) > 1]
        text = "  ".join(f"{k} {' '.join(map(str, state.layout.groups(k)))}" for k in shown)
        lines.append(f"  {name:<9} {state.layout!r:<42} ZeRO-{ALL_SPECS[name].zero_stage}  {text}")
    lines.append("rank 0's groups shared between states (same ranks: one process group, share_groups=True):")
    for ranks, users in shared_groups({name: state.layout for name, state in states.items()}, 0).items():
        objects = {id(states[name].group(kind)) for name, kind in (user.split(".", 1) for user in users)}
        lines.append(f"  {ranks}: {', '.join(users)} -> {len(objects)} ProcessGroup object(s)")
    return "\n".join(lines)


def progress(done: int, total: int, st: StepStats) -> None:
    width = 24
    bar = "#" * (width * done // total) + "." * (width - width * done // total)
    sys.stdout.write(
        f"\rstep {done:>3}/{total} [{bar}] reward {st.reward:.3f}  actor {st.actor_loss:+.4f}  "
        f"critic {st.critic_loss:.4f}  kl {st.kl:.5f}  {st.seconds:.2f}s"
    )
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


def summary_table(stats: list[StepStats]) -> str:
    lines = ["step  reward  actor loss  critic loss        kl   s/step   (actor / critic / reference / rollout s)"]
    for i, s in enumerate(stats, 1):
        per = " / ".join(f"{s.model_seconds[name]:.2f}" for name in ALL_SPECS)
        lines.append(f"{i:>4}  {s.reward:6.3f}  {s.actor_loss:+10.4f}  {s.critic_loss:11.4f}  "
                     f"{s.kl:8.5f}  {s.seconds:7.2f}   ({per})")
    first, last = stats[0], stats[-1]
    lines.append(f"reward {first.reward:.3f} -> {last.reward:.3f}; actor loss {first.actor_loss:+.4f} -> "
                 f"{last.actor_loss:+.4f}; critic loss {first.critic_loss:.4f} -> {last.critic_loss:.4f}; "
                 f"{statistics.median(steady([s.seconds for s in stats])):.2f} s/step (median, after the first)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="PPO steps (default 20)")
    parser.add_argument("--verify", action="store_true", help="check each model alone is bit-identical")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) % 4:
        parser.error("launch with torchrun and a multiple of 4 ranks (the reference uses SP=4), "
                     "e.g. torchrun --standalone --nproc-per-node 4 examples/rl_ppo.py")
    return args


def init_distributed() -> str:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)  # no device_id: groups are built per member
    deepspeed.comm.init_distributed(dist_backend=backend)
    return backend


def build_states() -> dict[str, ParallelState]:
    """One ParallelState per model the PPO step runs (actor, critic, reference, rollout), each
    from its DeepSpeed config."""
    return {name: ParallelState.from_config(ds_config(spec), name=name, timeout=TIMEOUT) for name, spec in ALL_SPECS.items()}


def main() -> int:
    args = parse_args()
    adapters.install()
    backend = init_distributed()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    world, show = dist.get_world_size(), dist.get_rank() == 0
    states = build_states()
    if show:
        print(layout_summary(states, backend), flush=True)
    batches, stats, final = interleaved_run(states, args.steps, ROLLOUTS_PER_RANK * world, show)
    if show:
        print(summary_table(stats), flush=True)
    ok = verify(states, batches, stats, final, show) if args.verify else True
    for state in states.values():
        state.destroy()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
