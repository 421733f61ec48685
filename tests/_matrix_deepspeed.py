"""Rank side of the DeepSpeed cells of the matrix (``tests/_matrix.py``).

``rank_cells(rank, names)`` runs each named cell on this rank and returns plain data:

* the vanilla run: DeepSpeed without the adapters, the model alone, with a hand-written
  mpu (:class:`HandMpu`, Megatron's rank order: the inner dimension contiguous) whose
  groups are ``dist.new_group`` calls of its own, as a user of vanilla DeepSpeed writes;
* the scoped run: the adapters installed, the cell's state and a partner state of another
  layout, one engine each built in its scope, stepped in turn;
* per step the loss and the global gradient norm, and the full parameters at the end.

A cell whose status is ``refused`` is built in its scope only and must raise before any
group exists; for ``vanilla cannot run here`` the vanilla error is recorded.
``sabotage=True`` steps the cell's engine in its *partner's* scope (a wrong scope is the
error the library exists to prevent), which must make the comparison fail.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

import _adapter_deepspeed_support as support
from _world import new_groups_destroyed
from _matrix import PROVEN, REFUSED, VANILLA_FAILS, Cell, cell, compare_runs

STEPS = 3
SEED, PARTNER_SEED = 1, 2


class HandMpu:
    """A hand-written mpu for vanilla DeepSpeed: ``tp`` consecutive ranks form the TP
    group, ranks ``tp`` apart the data parallel group (Megatron's order)."""

    def __init__(self, tp: int) -> None:
        self.tp, self.sp = tp, 1
        inner = tp
        world, rank = dist.get_world_size(), dist.get_rank()
        self._made: list[Any] = []
        self.inner_group = self.dp_group = None
        for start in range(0, world, inner):
            members = list(range(start, start + inner))
            group = self._new(members)
            if rank in members:
                self.inner_group, self.inner_ranks = group, members
        for offset in range(inner):
            members = list(range(offset, world, inner))
            group = self._new(members)
            if rank in members:
                self.dp_group, self.dp_ranks = group, members

    def _new(self, members: list[int]) -> Any:
        group = dist.new_group(members)
        self._made.append(group)
        return group

    def destroy(self) -> None:
        for group in self._made:
            dist.destroy_process_group(group)

    # the getters DeepSpeed reads
    def get_model_parallel_group(self) -> Any:
        return self.inner_group if self.tp > 1 else self._single()

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_rank(self) -> int:
        return self.inner_ranks.index(dist.get_rank()) if self.tp > 1 else 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.inner_ranks[0] if self.tp > 1 else dist.get_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return len(self.dp_ranks)

    def get_data_parallel_rank(self) -> int:
        return self.dp_ranks.index(dist.get_rank())

    def _single(self) -> Any:
        if not hasattr(self, "_self_group"):
            # every rank creates every single-rank group (vanilla new_group is collective)
            for r in range(dist.get_world_size()):
                group = self._new([r])
                if r == dist.get_rank():
                    self._self_group = group
        return self._self_group


class SequenceMpu:
    """Vanilla DeepSpeed's own sequence parallelism: ``parallel_state_sp`` as the mpu.

    Not a hand-written Megatron-style mpu with sequence getters: vanilla ZeRO-3 would then
    partition parameters over the mpu's DP group (SP peers excluded) while it reduces their
    gradients over SP x DP, a DeepSpeed inconsistency that trains wrongly (the adapter's
    ``zero`` module exists for it). DeepSpeed's own module answers WORLD there.
    """

    def __init__(self, sp: int) -> None:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(sp)
        self.module, self.sp, self.tp = parallel_state_sp, sp, 1
        self.inner_ranks = list(dist.get_process_group_ranks(parallel_state_sp.get_sequence_parallel_group()))
        self.dp_ranks = list(range(dist.get_rank() % sp, dist.get_world_size(), sp))

    def destroy(self) -> None:
        for group in {self.module.get_sequence_parallel_group(), self.module.get_sequence_data_parallel_group()}:
            dist.destroy_process_group(group)


def _hand_mpu(c: Cell) -> HandMpu | SequenceMpu | None:
    tp = c.layout.get("tensor_model_parallel_size", 1)
    sp = c.layout.get("sequence_parallel_size", 1)
    if sp > 1:
        return SequenceMpu(sp)
    return HandMpu(tp=tp) if tp > 1 else None


def _mpu_argument(mpu: HandMpu | SequenceMpu | None) -> Any:
    return mpu.module if isinstance(mpu, SequenceMpu) else mpu


class MoENet(nn.Module):
    """A projection, then DeepSpeed's own MoE layer (4 experts, top-1), ``ep_size`` from the cell."""

    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(8, 8)
        self.moe = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=4, ep_size=ep_size, k=1, min_capacity=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, aux, _ = self.moe(self.inp(x))
        return hidden.sum(-1, keepdim=True), aux


def _model(c: Cell, seed: int) -> nn.Module:
    kind = c.settings.get("kind", "mlp")
    torch.manual_seed(seed)
    if kind == "moe":
        return MoENet(c.settings["ep"])
    if kind == "autotp":
        return support.TPNet()
    return support.model(seed)


def _config(c: Cell, stage: int | None = None) -> dict[str, Any]:
    settings = c.settings
    stage = settings.get("stage", 0) if stage is None else stage
    zero = {"stage": stage, **settings.get("zero", {})}
    extra = dict(settings.get("config", {}))
    if settings.get("sp", 1) > 1:
        extra["sequence_parallel_size"] = settings["sp"]
    if settings.get("kind") == "autotp":
        extra["tensor_parallel"] = {"autotp_size": settings["autotp"], "partition_config": support.AUTOTP_PARTITION}
    return support.config(stage=stage, clip=1.0, zero_optimization=zero, **extra)


def _partner_config(c: Cell) -> dict[str, Any]:
    """The partner: a plain model at the cell's ZeRO stage (at most 2 next to MoE) and precision."""
    stage = c.settings.get("stage", 0)
    extra = {k: v for k, v in c.settings.get("config", {}).items() if k == "bf16"}
    return support.config(stage=stage, clip=1.0, **extra)


def _data_rank(c: Cell, rank: int) -> int:
    """TP peers see the same batch (they hold one model); every other rank its own."""
    return rank // c.layout.get("tensor_model_parallel_size", 1)


def _train(engine: Any, c: Cell, rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {"losses": [], "norms": []}
    for i in range(STEPS):
        loss, norm = _one_step(engine, c, rank, i)
        out["losses"].append(loss)
        out["norms"].append(norm)
    return out


def _batch(c: Cell, data_rank: int, i: int, seed: int) -> torch.Tensor:
    # 8 tokens for MoE: the gate wants more tokens than its min_capacity
    x = support.batch(data_rank, i, seed, (8, 8) if c.settings.get("kind") == "moe" else (2, 8))
    return x.to(torch.bfloat16) if c.settings.get("config", {}).get("bf16", {}).get("enabled") else x


def _one_step(engine: Any, c: Cell, rank: int, i: int) -> tuple[float, float | None]:
    """One step: the loss, and the gradient norm (the engine's global one; where the engine
    keeps none, ZeRO-0, the norm of this rank's gradients after backward's all-reduce)."""
    # The global torch RNG is one stream for every model of the process (DeepSpeed's MoE
    # gate draws from it for random token selection): seeded per step, so that the
    # partner's draws between two steps do not decide which tokens an expert drops.
    torch.manual_seed(10_000 + i)
    out = engine(_batch(c, _data_rank(c, rank), i, SEED))
    aux = 0.0
    if isinstance(out, tuple):
        out, aux = out
    loss = out.float().pow(2).mean() + 0.01 * aux
    engine.backward(loss)
    grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
    local = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else None
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(loss.detach()), local if norm is None else float(norm)


def _params(engine: Any) -> list[torch.Tensor]:
    return [p.float() for p in support.full_params(engine)]


@contextlib.contextmanager
def _counting_new_groups() -> Iterator[list[int]]:
    """Count torch.distributed.new_group calls in the block (the real function runs)."""
    original = dist.new_group
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    dist.new_group = counted
    try:
        yield count
    finally:
        dist.new_group = original


def _engine(c: Cell, seed: int, mpu: Any) -> Any:
    """The cell's engine; MoE parameters in DeepSpeed's own expert parameter groups (ZeRO 1/2 need them)."""
    net = _model(c, seed)
    if c.settings.get("kind") != "moe":
        return support.engine(net, _config(c), mpu=mpu)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "all"})
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    built, *_ = support._ds().initialize(model=net, optimizer=optimizer, config=_config(c), mpu=mpu)
    return built


def _vanilla(c: Cell, rank: int) -> dict[str, Any]:
    with new_groups_destroyed(), support.unpatched_run():
        mpu = _hand_mpu(c)
        engine = None
        try:
            engine = _engine(c, SEED, _mpu_argument(mpu))
            run = _train(engine, c, rank)
            run["params"] = _params(engine)
            run["groups"] = _engine_groups(engine, c) or _hand_groups(mpu)
            return run
        finally:
            support.drop(engine)
            if mpu is not None:
                mpu.destroy()


def _engine_groups(engine: Any, c: Cell) -> dict[str, Any] | None:
    """For MoE and AutoTP, the groups the engine's layers hold (what DeepSpeed built or was given)."""
    from deepspeed.utils import groups

    kind = c.settings.get("kind", "mlp")
    if kind == "moe":
        moe = engine.module.moe.deepspeed_moe
        name = f"ep_size_{c.settings['ep']}"
        return {"ep": support.ranks(moe.ep_group), "edp": support.ranks(groups._get_expert_data_parallel_group(name))}
    if kind == "autotp":
        return {"tp": support.ranks(engine.module.up_proj.mp_group), "dp": support.ranks(groups._get_data_parallel_group())}
    return None


def _hand_groups(mpu: HandMpu | SequenceMpu | None) -> dict[str, tuple[int, ...]]:
    """The vanilla run's groups by the state's kind names (DP only: the world)."""
    world = tuple(range(dist.get_world_size()))
    if mpu is None:
        return {"tp": (dist.get_rank(),), "sp": (dist.get_rank(),), "dp": world}
    inner, single = tuple(mpu.inner_ranks), (dist.get_rank(),)
    return {"tp": inner if mpu.tp > 1 else single, "sp": inner if mpu.sp > 1 else single, "dp": tuple(mpu.dp_ranks)}


def _vanilla_error(c: Cell, rank: int) -> dict[str, Any]:
    try:
        _vanilla(c, rank)
    except Exception as err:  # noqa: BLE001 - the vanilla error is the cell's record
        return {"error": (type(err).__name__, str(err)[:400])}
    return {"error": None}


def _scoped(c: Cell, rank: int, sabotage: bool) -> dict[str, Any]:
    from scoped_parallel.groups import create

    mine = support.state(name="cell", **c.layout)
    partner = support.state(name="partner", **c.partner)
    engines: list[Any] = []
    try:
        with support.installed():
            if c.status == REFUSED:
                before = create.creation_count()
                with _counting_new_groups() as made, mine.activate():
                    try:
                        engines.append(_engine(c, SEED, mine))
                        return {"error": None}
                    except Exception as err:  # noqa: BLE001 - the refusal is the cell's record
                        return {
                            "error": (type(err).__name__, str(err)[:600]),
                            "groups made": made[0] + create.creation_count() - before,
                        }
            with mine.activate():
                engine = _engine(c, SEED, mine)
            engines.append(engine)
            with partner.activate():
                other = support.engine(support.model(PARTNER_SEED), _partner_config(c), mpu=partner)
            engines.append(other)
            run: dict[str, Any] = {"losses": [], "norms": []}
            for i in range(STEPS):
                with (partner if sabotage else mine).activate():
                    loss, norm = _one_step(engine, c, rank, i)
                run["losses"].append(loss)
                run["norms"].append(norm)
                with partner.activate():
                    data_rank = rank // partner.get_tensor_model_parallel_world_size()
                    x = _batch(c, data_rank, i, PARTNER_SEED)
                    support.step(other, x[:2])
            with mine.activate():
                run["params"] = _params(engine)
                run["state groups"] = _engine_groups(engine, c) or {k: mine.ranks(k) for k in ("tp", "sp", "dp")}
            return run
    finally:
        support.drop(*engines)
        support.destroy(mine, partner)


def rank_cells(rank: int, names: list[str], sabotage: bool = False) -> dict[str, Any]:
    """Run the named cells on this rank (see the module doc); plain data per cell."""
    out: dict[str, Any] = {}
    with support.isolated():
        for name in names:
            c = cell(name)
            if c.status == VANILLA_FAILS:
                out[name] = _vanilla_error(c, rank)
            elif c.status == REFUSED:
                out[name] = _scoped(c, rank, sabotage=False)
            else:
                assert c.status == PROVEN
                vanilla = _vanilla(c, rank)
                scoped = _scoped(c, rank, sabotage)
                out[name] = {
                    "problems": compare_runs(scoped, vanilla),
                    "moved": sum(not torch.equal(a, b) for a, b in zip(vanilla["params"], _initial(c))),
                    "parameters": len(vanilla["params"]),
                    "norms": vanilla["norms"],
                    "losses": vanilla["losses"],
                    # the vanilla baseline must be the same layout as the state's
                    "state groups": scoped["state groups"],
                    "vanilla groups": vanilla["groups"],
                }
    return out


def _initial(c: Cell) -> list[torch.Tensor]:
    return [p.detach().float() for p in _model(c, SEED).parameters()]
