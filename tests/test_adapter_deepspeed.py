"""Tests of the DeepSpeed adapter (``scoped_parallel.adapters.deepspeed``).

Rank-side functions (``_rank_*``) run on the shared 4-rank gloo world; each one
builds its states, installs the adapters for its own duration and destroys
everything before returning plain data that the test asserts on. The issue's
reproductions run each scenario twice on the same ranks: first without the
adapters (the buggy outcome is asserted, then DeepSpeed's module globals are put
back), then with them.

Collectives are *observed*, never mocked: ``_observe_collectives`` wraps
``torch.distributed``'s functions with a logger that records the ranks of the
group each call used and then calls the real function.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import inspect
import logging
import sys
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn

deepspeed = pytest.importorskip("deepspeed")

from scoped_parallel import adapters  # noqa: E402
from scoped_parallel.errors import AdapterError, LayoutError, NoActiveStateError  # noqa: E402

WORLD_TIMEOUT = 300.0

# ====================================================================== rank-side helpers

_GLOBAL_MODULES = (
    "deepspeed.utils.groups",
    "deepspeed.runtime.sequence_parallel.parallel_state_sp",
    "deepspeed.module_inject.layers",
    "deepspeed.runtime.tensor_parallel.init_utils",
)


def _ds() -> Any:
    import deepspeed as ds

    for name in _GLOBAL_MODULES + ("deepspeed.moe.layer",):
        importlib.import_module(name)
    ds.utils.logger.setLevel(logging.WARNING)
    ds.init_distributed(dist_backend="gloo")
    return ds


def _globals_snapshot() -> dict[str, dict[str, tuple[Any, Any]]]:
    """Every global of DeepSpeed's parallel-state modules, with a copy of each dict's items."""
    snap = {}
    for name in _GLOBAL_MODULES:
        namespace = vars(sys.modules[name])
        snap[name] = {k: (v, dict(v) if type(v) is dict else None) for k, v in namespace.items()}
    return snap


def _globals_changed(snap: dict[str, dict[str, tuple[Any, Any]]]) -> list[str]:
    changed = []
    for name, saved in snap.items():
        namespace = vars(sys.modules[name])
        for key in set(namespace) | set(saved):
            if key not in namespace or key not in saved:
                changed.append(f"{name}.{key}")
                continue
            value, items = saved[key]
            if namespace[key] is not value or (items is not None and items != value):
                changed.append(f"{name}.{key}")
    return sorted(changed)


def _restore_globals(snap: dict[str, dict[str, tuple[Any, Any]]]) -> None:
    for name, saved in snap.items():
        namespace = vars(sys.modules[name])
        for key in [k for k in namespace if k not in saved]:
            del namespace[key]
        for key, (value, items) in saved.items():
            if items is not None:
                value.clear()
                value.update(items)
            namespace[key] = value


@contextlib.contextmanager
def _unpatched_run() -> Iterator[None]:
    """Run DeepSpeed without adapters, then put its module globals back as they were."""
    assert not adapters.is_installed("deepspeed")
    snap = _globals_snapshot()
    try:
        yield
    finally:
        _restore_globals(snap)
        gc.collect()


def _isolated(fn: Any) -> Any:
    """Give a rank function DeepSpeed's module globals as it found them, even when it fails.

    The world is shared by every test; without this a failing test would leave, e.g.,
    ``groups.mpu`` set for the next one.
    """

    @functools.wraps(fn)
    def run(rank: int, *args: Any, **kwargs: Any) -> Any:
        _ds()
        snap = _globals_snapshot()
        try:
            return fn(rank, *args, **kwargs)
        finally:
            if adapters.is_installed("deepspeed"):
                adapters.uninstall(("deepspeed",))
            _restore_globals(snap)
            gc.collect()

    return run


def _ranks(group: Any) -> Any:
    import torch.distributed as dist

    if group is None:
        return "WORLD"
    return tuple(dist.get_process_group_ranks(group))


_OBSERVED = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
)


def _numel(bound: inspect.BoundArguments) -> int:
    for key in ("tensor", "output", "output_tensor", "input"):
        value = bound.arguments.get(key)
        if isinstance(value, torch.Tensor):
            return value.numel()
    return -1


def _logger(name: str, original: Any, log: list[tuple[str, int, Any]]) -> Any:
    signature = inspect.signature(original)

    def logged(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        log.append((name, _numel(bound), _ranks(bound.arguments.get("group"))))
        return original(*args, **kwargs)

    return logged


@contextlib.contextmanager
def _observe_collectives() -> Iterator[list[tuple[str, int, Any]]]:
    """Log (collective, numel, group ranks) of every torch.distributed collective in the block."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    log: list[tuple[str, int, Any]] = []
    replaced = []
    for name in _OBSERVED:
        original = getattr(distributed_c10d, name, None)
        if original is None:
            continue
        wrapper = _logger(name, original, log)
        for module in (dist, distributed_c10d):
            if getattr(module, name, None) is original:
                replaced.append((module, name, original))
                setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for module, name, original in reversed(replaced):
            setattr(module, name, original)


def _state(**kwargs: Any) -> Any:
    from scoped_parallel import ParallelState

    return ParallelState(**kwargs)


def _config(stage: int = 0, clip: float = 0.0, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if clip:
        config["gradient_clipping"] = clip
    config.update(extra)
    return config


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


_N_PARAMS = 8 * 16 + 16 + 16 + 1


def _engine(model: nn.Module, config: dict[str, Any], mpu: Any = None) -> Any:
    ds = _ds()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = ds.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def _batch(rank: int, step: int, seed: int, shape: tuple[int, ...] = (2, 8)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return torch.randn(*shape, generator=generator)


def _step(engine: Any, x: torch.Tensor) -> torch.Tensor:
    out = engine(x)
    if isinstance(out, tuple):
        out, aux = out
        loss = out.float().pow(2).mean() + 0.01 * aux
    else:
        loss = out.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.detach().clone()


def _full_params(engine: Any) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _drop(*engines: Any) -> None:
    for engine in engines:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    gc.collect()


def _destroy(*states: Any) -> None:
    for state in states:
        if state is not None:
            state.destroy()


def _installed(strict: bool = False) -> Any:
    return adapters.installed(strict=strict, targets=("deepspeed",))


# ====================================================================== rank functions


@_isolated
def _rank_issue1_critic_without_mpu(rank: int) -> dict[str, Any]:
    actor = _state(name="actor", tensor_model_parallel_size=2)
    critic = _state(name="critic")
    out: dict[str, Any] = {}
    try:
        with _unpatched_run():
            engine_a = _engine(_model(1), _config(), mpu=actor)
            try:
                _engine(_model(2), _config())
                out["unpatched"] = "initialized"
            except Exception as err:  # the bug: the critic inherits the actor's mpu
                out["unpatched"] = f"{type(err).__name__}: {err}"
            _drop(engine_a)
        with _installed():
            with actor.activate():
                engine_a = _engine(_model(1), _config(), mpu=actor)
            with critic.activate():
                engine_c = _engine(_model(2), _config())
            out["critic_dp"] = _ranks(engine_c.data_parallel_group)
            out["critic_dp_is_state_group"] = engine_c.data_parallel_group is critic.group("dp")
            out["critic_sdp_is_state_group"] = engine_c.seq_data_parallel_group is critic.group("sp-dp")
            out["critic_dp_world_size"] = engine_c.dp_world_size
            out["actor_sdp"] = _ranks(engine_a.seq_data_parallel_group)
            out["actor_sdp_is_state_group"] = engine_a.seq_data_parallel_group is actor.group("sp-dp")
            _drop(engine_a, engine_c)
    finally:
        _destroy(actor, critic)
    return out


@_isolated
def _rank_issue2_step_uses_own_group(rank: int) -> dict[str, Any]:
    actor = _state(name="actor", tensor_model_parallel_size=2)
    critic = _state(name="critic")
    config = _config(stage=0, clip=1.0)
    out: dict[str, Any] = {"actor_sdp": actor.ranks("sp-dp"), "actor_tp": actor.ranks("tp")}
    try:
        with _unpatched_run():
            engine_a = _engine(_model(1), config, mpu=actor)
            engine_b = _engine(_model(2), config, mpu=critic)
            with _observe_collectives() as log:
                _step(engine_a, _batch(rank, 0, 1))
            out["unpatched"] = [(n, k, r) for n, k, r in log if n == "all_reduce"]
            _drop(engine_a, engine_b)
        with _installed():
            with actor.activate():
                engine_a = _engine(_model(1), config, mpu=actor)
            with critic.activate():
                engine_b = _engine(_model(2), config, mpu=critic)
            with actor.activate(), _observe_collectives() as log:
                _step(engine_a, _batch(rank, 0, 1))
            out["patched"] = [(n, k, r) for n, k, r in log if n == "all_reduce"]
            actor.bind(engine_a)  # a bound engine steps in its scope without `with`
            try:
                with _observe_collectives() as log:
                    _step(engine_a, _batch(rank, 1, 1))
            finally:
                actor.unbind(engine_a)
            out["bound"] = [(n, k, r) for n, k, r in log if n == "all_reduce"]
            _drop(engine_a, engine_b)
    finally:
        _destroy(actor, critic)
    return out


@_isolated
def _rank_issue3_sequence_parallel(rank: int) -> dict[str, Any]:
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as sp

    out: dict[str, Any] = {}
    with _unpatched_run():
        sp.initialize_sequence_parallel(2)
        try:
            sp.initialize_sequence_parallel(4)
            out["unpatched"] = "re-initialized"
        except AssertionError as err:
            out["unpatched"] = f"AssertionError: {err}"
    sp2 = _state(name="sp2", sequence_parallel_size=2)
    sp4 = _state(name="sp4", sequence_parallel_size=4)
    try:
        with _installed():
            snap = _globals_snapshot()
            seen = []
            for state, size in ((sp2, 2), (sp4, 4), (sp2, 2)):
                with state.activate():
                    sp.initialize_sequence_parallel(size)
                    sp.initialize_sequence_parallel(size)  # idempotent
                    seen.append(
                        sp.get_sequence_parallel_group() is state.group("sp")
                        and sp.get_model_parallel_group() is state.group("sp")
                        and sp.get_sequence_data_parallel_group() is state.group("sp-dp")
                        and sp.get_sequence_parallel_world_size() == size
                        and sp.get_model_parallel_world_size() == size
                        and sp.get_sequence_parallel_rank() == state.rank_in("sp")
                        and sp.get_model_parallel_rank() == state.rank_in("sp")
                        and sp.get_sequence_data_parallel_world_size() == 4
                    )
            out["per_state"] = seen
            with sp2.activate():
                try:
                    sp.initialize_sequence_parallel(4)
                    out["mismatch"] = "no error"
                except LayoutError as err:
                    out["mismatch"] = str(err)
            out["globals_changed"] = _globals_changed(snap)
    finally:
        _destroy(sp2, sp4)
    return out


class _TPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


def _autotp_config(tp: int) -> dict[str, Any]:
    specs = [
        {"patterns": [".*up_proj.*"], "partition_type": "column"},
        {"patterns": [".*down_proj.*"], "partition_type": "row"},
    ]
    partition = {"use_default_specs": False, "layer_specs": specs}
    return _config(tensor_parallel={"autotp_size": tp, "partition_config": partition})


def _autotp_engine(tp: int) -> Any:
    torch.manual_seed(0)
    return _engine(_TPNet(), _autotp_config(tp))


@_isolated
def _rank_issue4_autotp(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    first = _state(name="first", tensor_model_parallel_size=2)
    second = _state(name="second", tensor_model_parallel_size=4)
    out: dict[str, Any] = {"first_tp": first.ranks("tp"), "second_tp": second.ranks("tp")}
    try:
        with _unpatched_run():
            engine_1 = _autotp_engine(2)
            engine_2 = _autotp_engine(4)
            out["unpatched_second_tp"] = _ranks(engine_2.module.up_proj.mp_group)
            out["unpatched_second_rows"] = engine_2.module.up_proj.weight.shape[0]
            _drop(engine_1, engine_2)
        with _installed():
            with first.activate():
                engine_1 = _autotp_engine(2)
                loss_1 = _step(engine_1, _batch(rank // 2, 0, 3))
            with second.activate():
                engine_2 = _autotp_engine(4)
                loss_2 = _step(engine_2, _batch(0, 0, 3))
                out["public_getters_second"] = (
                    groups.get_tensor_model_parallel_group() is second.group("tp")
                    and groups.get_data_parallel_group() is second.group("dp")
                    and groups.get_tensor_model_parallel_world_size() == 4
                    and groups.get_tensor_model_parallel_src_rank() == 0
                )
            out["first_tp_group_is_state"] = engine_1.module.up_proj.mp_group is first.group("tp")
            out["second_tp_group_is_state"] = engine_2.module.up_proj.mp_group is second.group("tp")
            out["first_rows"] = engine_1.module.up_proj.weight.shape[0]
            out["second_rows"] = engine_2.module.up_proj.weight.shape[0]
            out["losses_finite"] = bool(torch.isfinite(loss_1) and torch.isfinite(loss_2))
            _drop(engine_1, engine_2)
    finally:
        _destroy(first, second)
    return out


@_isolated
def _rank_autotp_size_mismatch(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    state = _state(name="tp2", tensor_model_parallel_size=2)
    out: dict[str, Any] = {}
    try:
        with _installed(), state.activate():
            out["matching"] = groups._init_tp_mesh_device(tensor_model_parallel_size=2) == (
                state.group("dp"),
                state.group("tp"),
            )
            try:
                groups._init_tp_mesh_device(tensor_model_parallel_size=4)
                out["mismatch"] = "no error"
            except LayoutError as err:
                out["mismatch"] = str(err)
    finally:
        _destroy(state)
    return out


class _MoENet(nn.Module):
    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = nn.Linear(8, 8)
        self.moe = MoE(
            hidden_size=8, expert=nn.Linear(8, 8), num_experts=4, ep_size=ep_size, k=1, min_capacity=8
        )
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, aux, _ = self.moe(self.inp(x))
        return self.out(hidden), aux


def _moe_engine(mpu: Any) -> Any:
    torch.manual_seed(0)
    return _engine(_MoENet(ep_size=2), _config(), mpu=mpu)


@_isolated
def _rank_issue4_moe(rank: int) -> dict[str, Any]:
    first = _state(name="first", expert_model_parallel_size=2)
    second = _state(name="second", expert_model_parallel_size=2, order="tp-cp-dp-ep-pp")
    out: dict[str, Any] = {"first_ep": first.ranks("ep"), "second_ep": second.ranks("ep")}
    try:
        with _unpatched_run():
            engine_1 = _moe_engine(first)
            engine_2 = _moe_engine(second)
            out["unpatched_second_ep"] = _ranks(engine_2.expert_parallel_group["ep_size_2"])
            shared = engine_2.expert_parallel_group["ep_size_2"] is engine_1.expert_parallel_group["ep_size_2"]
            out["unpatched_shared"] = shared
            _drop(engine_1, engine_2)
        with _installed():
            snap = _globals_snapshot()
            with first.activate():
                engine_1 = _moe_engine(first)
            with second.activate():
                engine_2 = _moe_engine(second)
            logs = {}
            for name, state, engine in (("first", first, engine_1), ("second", second, engine_2)):
                with state.activate(), _observe_collectives() as log:
                    _step(engine, _batch(rank, 0, 4, shape=(2, 4, 8)))
                logs[name] = sorted({r for n, _, r in log if n.startswith("all_to_all")})
            out["all_to_all_groups"] = logs
            out["first_is_state"] = (
                engine_1.expert_parallel_group["ep_size_2"] is first.group("ep")
                and engine_1.expert_data_parallel_group["ep_size_2"] is first.group("edp")
                and engine_1.module.moe.deepspeed_moe.ep_group is first.group("ep")
            )
            out["second_is_state"] = (
                engine_2.expert_parallel_group["ep_size_2"] is second.group("ep")
                and engine_2.expert_data_parallel_group["ep_size_2"] is second.group("edp")
                and engine_2.module.moe.deepspeed_moe.ep_group is second.group("ep")
            )
            out["dicts_distinct"] = engine_1.expert_parallel_group is not engine_2.expert_parallel_group
            out["globals_changed"] = _globals_changed(snap)
            _drop(engine_1, engine_2)
    finally:
        _destroy(first, second)
    return out


@_isolated
def _rank_expert_creator_fallback(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    state = _state(name="ep2", expert_model_parallel_size=2)
    out: dict[str, Any] = {}
    try:
        with _installed():
            snap = _globals_snapshot()
            with state.activate():
                groups._create_expert_and_data_parallel(4)  # not the state's ep size: DeepSpeed builds it
                out["ep4"] = tuple(groups._get_expert_parallel_group_ranks("ep_size_4"))
                out["ep4_size"] = groups._get_expert_parallel_world_size("ep_size_4")
                out["max_name"] = groups._get_max_expert_size_name()
                out["in_dict"] = sorted(groups._get_expert_parallel_group_dict())
            out["globals_changed"] = _globals_changed(snap)
            out["outside_dict"] = sorted(groups._get_expert_parallel_group_dict())
            with state.activate():
                ep4 = groups._get_expert_parallel_group("ep_size_4")
            deepspeed.comm.destroy_process_group(ep4)  # DeepSpeed's teardown hook must forget it too
            with state.activate():
                out["after_destroy"] = (
                    sorted(groups._get_expert_parallel_group_dict()),
                    sorted(groups._get_expert_data_parallel_group_dict()),
                )
    finally:
        _destroy(state)
    return out


@_isolated
def _rank_interleaved_training(rank: int, stages: tuple[int, ...], steps: int) -> dict[str, Any]:
    actor = _state(name="actor", tensor_model_parallel_size=2)
    critic = _state(name="critic")
    specs = (("actor", actor, 1, actor), ("critic", critic, 2, None))
    allowed = {
        "actor": sorted({actor.ranks("tp"), actor.ranks("dp"), actor.ranks("sp-dp"), actor.ranks("tp-pp")}),
        "critic": sorted({critic.ranks("dp"), critic.ranks("sp-dp"), critic.ranks("tp-pp")}),
    }
    out: dict[str, Any] = {"allowed": allowed, "stages": {}}
    try:
        with _installed():
            snap = _globals_snapshot()
            for stage in stages:
                config = _config(stage=stage, clip=1.0)
                alone: dict[str, Any] = {}
                for name, state, seed, mpu in specs:
                    with state.activate():
                        engine = _engine(_model(seed), config, mpu=mpu)
                        losses = [_step(engine, _batch(rank, i, seed)) for i in range(steps)]
                        alone[name] = (losses, _full_params(engine))
                    _drop(engine)
                engines = {}
                for name, state, seed, mpu in specs:
                    with state.activate():
                        engines[name] = _engine(_model(seed), config, mpu=mpu)
                losses_together: dict[str, list[torch.Tensor]] = {"actor": [], "critic": []}
                seen: dict[str, set[Any]] = {"actor": set(), "critic": set()}
                for i in range(steps):
                    for name, state, seed, _ in specs:
                        with state.activate(), _observe_collectives() as log:
                            losses_together[name].append(_step(engines[name], _batch(rank, i, seed)))
                        seen[name].update((collective, r) for collective, _, r in log)
                result = {}
                for name, state, _, _ in specs:
                    with state.activate():
                        params = _full_params(engines[name])
                    result[name] = {
                        "losses_equal": all(map(torch.equal, alone[name][0], losses_together[name])),
                        "params_equal": all(map(torch.equal, alone[name][1], params)),
                        "params_moved": not all(map(torch.equal, _full_params_of_seed(name), params)),
                        "collectives": sorted(seen[name], key=repr),
                    }
                _drop(*engines.values())
                out["stages"][stage] = result
            out["globals_changed"] = _globals_changed(snap)
    finally:
        _destroy(actor, critic)
    return out


@_isolated
def _rank_zero3_partitions_over_sp_dp(rank: int) -> dict[str, Any]:
    ref = _state(name="ref", sequence_parallel_size=2)
    out: dict[str, Any] = {}
    try:
        with _installed(), ref.activate():
            engine = _engine(_model(3), _config(stage=3), mpu=ref)
            groups_used = {_ranks(p.ds_process_group) for p in engine.module.parameters()}
            out["partition_groups"] = sorted(groups_used)
            out["sp_dp"] = ref.ranks("sp-dp")
            out["reduce_group"] = _ranks(engine.seq_data_parallel_group)
            _drop(engine)
    finally:
        _destroy(ref)
    return out


def _full_params_of_seed(name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _model(1 if name == "actor" else 2).parameters()]


def _legacy_reader() -> tuple[Any, Any, Any]:
    """Unchanged legacy code reading DeepSpeed's global getters."""
    import deepspeed.utils
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups

    return (
        groups._get_data_parallel_group(),
        parallel_state_sp.get_sequence_parallel_group(),
        deepspeed.utils.get_tensor_model_parallel_group(),
    )


@_isolated
def _rank_legacy_code(rank: int) -> list[bool]:
    first = _state(name="tp2", tensor_model_parallel_size=2)
    second = _state(name="sp2", sequence_parallel_size=2)
    answers = []
    try:
        with _installed():
            for state in (first, second, first, second):
                with state.activate():
                    dp, sp, tp = _legacy_reader()
                answers.append(
                    dp is state.group("dp") and sp is state.group("sp") and tp is state.group("tp")
                )
    finally:
        _destroy(first, second)
    return answers


def _getter_expectations(state: Any) -> dict[str, tuple[Any, Any]]:
    """groups getter name -> (expected answer inside ``state``'s scope, how to compare)."""
    same, equal = "is", "=="
    return {
        "_get_data_parallel_group": (state.group("dp"), same),
        "_get_data_parallel_world_size": (state.size("dp"), equal),
        "_get_data_parallel_rank": (state.rank_in("dp"), equal),
        "_get_data_parallel_group_ranks": (state.ranks("dp"), equal),
        "_get_model_parallel_world_size": (state.size("tp-pp"), equal),
        "_get_sequence_parallel_group": (state.group("sp"), same),
        "_get_sequence_parallel_world_size": (state.size("sp"), equal),
        "_get_sequence_parallel_rank": (state.rank_in("sp"), equal),
        "_get_sequence_data_parallel_group": (state.group("sp-dp"), same),
        "_get_sequence_data_parallel_world_size": (state.size("sp-dp"), equal),
        "_get_sequence_data_parallel_rank": (state.rank_in("sp-dp"), equal),
        "_get_broadcast_src_rank": (state.ranks("sp-dp")[0], equal),
        "_get_expert_model_parallel_world_size": (1, equal),
        "get_tensor_model_parallel_group": (state.group("tp"), same),
        "get_tensor_model_parallel_world_size": (state.size("tp"), equal),
        "get_tensor_model_parallel_rank": (state.rank_in("tp"), equal),
        "get_tensor_model_parallel_src_rank": (state.ranks("tp")[0], equal),
        "get_model_parallel_group": (state.group("tp"), same),
        "get_model_parallel_world_size": (state.size("tp"), equal),
        "get_model_parallel_rank": (state.rank_in("tp"), equal),
        "get_data_parallel_group": (state.group("dp"), same),
        "get_data_parallel_world_size": (state.size("dp"), equal),
        "get_data_parallel_rank": (state.rank_in("dp"), equal),
    }


@_isolated
def _rank_groups_getters(rank: int) -> dict[str, list[str]]:
    import deepspeed.utils
    from deepspeed.utils import groups

    states = {
        "tp2": _state(name="tp2", tensor_model_parallel_size=2),
        "sp2": _state(name="sp2", sequence_parallel_size=2),
    }
    wrong: dict[str, list[str]] = {}
    try:
        with _installed():
            for label, state in states.items():
                with state.activate():
                    for name, (expected, how) in _getter_expectations(state).items():
                        for module in (groups, deepspeed.utils):
                            if module is deepspeed.utils and name.startswith("_"):
                                continue  # a star import skips private names
                            got = getattr(module, name)()
                            if isinstance(got, range):
                                got = tuple(got)
                            ok = got is expected if how == "is" else got == expected
                            if not ok:
                                wrong.setdefault(label, []).append(f"{module.__name__}.{name}")
    finally:
        _destroy(*states.values())
    return wrong


@_isolated
def _rank_module_attributes(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    first = _state(name="first", tensor_model_parallel_size=2)
    second = _state(name="second")
    written, mesh = object(), object()
    out: dict[str, Any] = {}
    try:
        with _installed():
            before = (vars(groups)["mpu"], vars(groups)["mesh_device"])
            with first.activate():
                out["default_mpu_is_state"] = groups.mpu is first and groups.mesh_device is None
                groups.mpu = written
                groups.mesh_device = mesh
                out["written_read_back"] = groups.mpu is written and groups.mesh_device is mesh
            with second.activate():
                out["other_state_unaffected"] = groups.mpu is second and groups.mesh_device is None
            with first.activate():
                out["kept_per_state"] = groups.mpu is written and groups.mesh_device is mesh
                del groups.mpu
                del groups.mesh_device
                out["deleted_back_to_state"] = groups.mpu is first and groups.mesh_device is None
                # answers are cached per state; a write of groups.mpu must invalidate them
                out["cached_before"] = groups._get_data_parallel_world_size() == 2

                class OtherMpu:
                    def get_data_parallel_world_size(self) -> int:
                        return 99

                groups.mpu = OtherMpu()
                out["cache_follows_mpu_write"] = groups._get_data_parallel_world_size() == 99
                del groups.mpu
                out["cache_follows_mpu_delete"] = groups._get_data_parallel_world_size() == 2
            out["module_dict_untouched"] = (vars(groups)["mpu"], vars(groups)["mesh_device"]) == before
            out["outside_reads_module_dict"] = groups.mpu is before[0]
    finally:
        _destroy(first, second)
    return out


@_isolated
def _rank_initialize_outside_scope(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    actor = _state(name="actor", tensor_model_parallel_size=2)
    out: dict[str, Any] = {}
    try:
        with _installed():
            before = vars(groups)["mpu"]
            engine = _engine(_model(1), _config(), mpu=actor)  # no scope: the wrapper enters actor's
            out["module_mpu_untouched"] = vars(groups)["mpu"] is before
            out["engine_groups_are_actor"] = (
                engine.data_parallel_group is actor.group("dp")
                and engine.seq_data_parallel_group is actor.group("sp-dp")
                and engine.mp_world_size == 2
            )
            with actor.activate():
                out["mpu_recorded_for_actor"] = groups.mpu is actor
            _drop(engine)
    finally:
        _destroy(actor)
    return out


@_isolated
def _rank_initialize_with_another_states_mpu(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    from scoped_parallel.errors import AdapterError

    actor = _state(name="actor", tensor_model_parallel_size=2)
    critic = _state(name="critic")
    out: dict[str, Any] = {}
    try:
        with _installed(), critic.activate():
            engine = _engine(_model(1), _config(), mpu=actor)  # inside critic's scope, actor's mpu
            out["engine_groups_are_actor"] = engine.data_parallel_group is actor.group("dp")
            out["critic_scope_keeps_critic_dp"] = groups._get_data_parallel_group() is critic.group("dp")
            with actor.activate():
                out["actor_scope_has_actor_mpu"] = groups.mpu is actor
            try:
                groups.mpu = actor
            except AdapterError as err:
                out["foreign_mpu_write_refused"] = "'actor'" in str(err) and "'critic'" in str(err)
            _drop(engine)
    finally:
        _destroy(actor, critic)
    return out


@_isolated
def _rank_initialize_in_scope_without_mpu(rank: int) -> dict[str, Any]:
    actor = _state(name="actor", tensor_model_parallel_size=2)
    out: dict[str, Any] = {}
    try:
        with _installed(), actor.activate():
            engine = _engine(_model(1), _config())  # no mpu: the scope's state becomes the mpu
            out["engine_mpu_is_state"] = engine.mpu is actor
            out["mp_world_size"] = engine.mp_world_size
            out["config_world_size"] = engine._config.world_size
            out["dp_is_state"] = engine.data_parallel_group is actor.group("dp")
            _drop(engine)
    finally:
        _destroy(actor)
    return out


@_isolated
def _rank_outside_scope_unchanged(rank: int, steps: int) -> dict[str, Any]:

    def train() -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
        engine = _engine(_model(5), _config(stage=0, clip=1.0))
        with _observe_collectives() as log:
            losses = [_step(engine, _batch(rank, i, 5)) for i in range(steps)]
        params = _full_params(engine)
        _drop(engine)
        return losses, params, [(n, k, r) for n, k, r in log]

    with _unpatched_run():
        plain = train()
    with _unpatched_run(), _installed():
        patched = train()
    return {
        "losses_equal": all(map(torch.equal, plain[0], patched[0])),
        "params_equal": all(map(torch.equal, plain[1], patched[1])),
        "collectives_equal": plain[2] == patched[2],
        "collectives": len(plain[2]),
    }


# ====================================================================== tests on the world

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.world
def test_issue1_critic_initialized_after_actor_captures_its_own_dp_group(world):
    """A critic engine built after a TP=2 actor crashes unpatched and gets the critic's DP group with adapters."""
    for rank, out in enumerate(world.run(_rank_issue1_critic_without_mpu, timeout=WORLD_TIMEOUT)):
        assert out["unpatched"].startswith("AttributeError") and "get_model_parallel_rank" in out["unpatched"]
        assert out["critic_dp"] == (0, 1, 2, 3) and out["critic_dp_world_size"] == 4
        assert out["critic_dp_is_state_group"] and out["critic_sdp_is_state_group"]
        assert out["actor_sdp"] == ((0, 2) if rank % 2 == 0 else (1, 3)) and out["actor_sdp_is_state_group"]


@pytest.mark.world
def test_issue2_step_of_first_engine_reduces_over_its_own_group(world):
    """Stepping engine A after B all-reduces A's gradients over B's group unpatched, over A's with adapters."""
    for out in world.run(_rank_issue2_step_uses_own_group, timeout=WORLD_TIMEOUT):
        grads_unpatched = {r for _, n, r in out["unpatched"] if n == _N_PARAMS}
        grads_patched = {r for _, n, r in out["patched"] if n == _N_PARAMS}
        grads_bound = {r for _, n, r in out["bound"] if n == _N_PARAMS}
        assert grads_unpatched == {(0, 1, 2, 3)}  # the critic's group
        assert grads_patched == grads_bound == {tuple(out["actor_sdp"])}
        clip_patched = {r for _, n, r in out["patched"] if n == 1}
        assert clip_patched == {tuple(out["actor_sdp"]), tuple(out["actor_tp"])}
        assert (0, 1, 2, 3) in {r for _, n, r in out["unpatched"] if n == 1}


@pytest.mark.world
def test_issue3_parallel_state_sp_is_per_state_and_idempotent(world):
    """A second initialize_sequence_parallel asserts unpatched; with adapters each scope gets its own SP groups."""
    for out in world.run(_rank_issue3_sequence_parallel, timeout=WORLD_TIMEOUT):
        assert out["unpatched"].startswith("AssertionError") and "already initialized" in out["unpatched"]
        assert out["per_state"] == [True, True, True]
        assert "initialize_sequence_parallel(4)" in out["mismatch"] and "size is 2" in out["mismatch"]
        assert out["globals_changed"] == []


@pytest.mark.world
def test_issue4_second_autotp_model_uses_its_own_tp_group(world):
    """A second AutoTP model reuses the first model's TP group unpatched and gets its state's with adapters."""
    for out in world.run(_rank_issue4_autotp, timeout=WORLD_TIMEOUT):
        assert out["unpatched_second_tp"] == out["first_tp"] and out["unpatched_second_rows"] == 8
        assert out["first_tp_group_is_state"] and out["second_tp_group_is_state"]
        assert (out["first_rows"], out["second_rows"]) == (8, 4)
        assert out["public_getters_second"] and out["losses_finite"]


@pytest.mark.world
def test_autotp_size_other_than_the_states_raises_layout_error(world):
    """Inside a TP=2 scope, _init_tp_mesh_device(4) raises a LayoutError naming both sizes."""
    for out in world.run(_rank_autotp_size_mismatch, timeout=WORLD_TIMEOUT):
        assert out["matching"]
        assert "tensor parallel size 4" in out["mismatch"] and "size is 2" in out["mismatch"]


@pytest.mark.world
def test_issue4_second_moe_model_uses_its_own_expert_groups(world):
    """A second MoE model with the same ep_size reuses the first's expert groups unpatched, its state's patched."""
    for out in world.run(_rank_issue4_moe, timeout=WORLD_TIMEOUT):
        assert out["first_ep"] != out["second_ep"]
        assert out["unpatched_shared"] and out["unpatched_second_ep"] == out["first_ep"]
        assert out["first_is_state"] and out["second_is_state"] and out["dicts_distinct"]
        assert out["all_to_all_groups"] == {"first": [out["first_ep"]], "second": [out["second_ep"]]}
        assert out["globals_changed"] == []


@pytest.mark.world
def test_expert_groups_of_another_size_are_built_by_deepspeed_per_state(world):
    """Another ep size runs DeepSpeed's creator into the state's own dicts, which forget destroyed groups."""
    for out in world.run(_rank_expert_creator_fallback, timeout=WORLD_TIMEOUT):
        assert out["ep4"] == (0, 1, 2, 3) and out["ep4_size"] == 4
        assert out["max_name"] == "ep_size_4" and out["in_dict"] == ["ep_size_4"]
        assert out["outside_dict"] == [] and out["globals_changed"] == []
        assert out["after_destroy"] == ([], ["ep_size_4"])


@pytest.mark.world
@pytest.mark.slow
def test_interleaved_training_is_bit_identical_to_training_alone(world):
    """Actor (TP=2 x DP=2) and critic (DP=4) stepped alternately match each trained alone, for ZeRO 0-3."""
    out = world.run(_rank_interleaved_training, (0, 1, 2, 3), 3, timeout=WORLD_TIMEOUT)
    for rank, result in enumerate(out):
        assert result["globals_changed"] == []
        allowed = {name: set(map(tuple, groups)) for name, groups in result["allowed"].items()}
        for stage, models in result["stages"].items():
            for name, facts in models.items():
                where = f"rank {rank}, ZeRO-{stage}, {name}"
                assert facts["losses_equal"], where
                assert facts["params_equal"] and facts["params_moved"], where
                collectives = facts["collectives"]
                groups = {r for c, r in collectives if not _zero3_world_check(stage, c, r)}
                assert groups and groups <= allowed[name], (where, facts["collectives"])


def _zero3_world_check(stage: int, collective: str, ranks: Any) -> bool:
    # ZeRO-3's trace-order consistency check broadcasts over WORLD on every model
    # (runtime/zero/partitioned_param_coordinator.py:260 -> runtime/zero/utils.py:89,108).
    return stage == 3 and collective == "broadcast" and ranks == "WORLD"


@pytest.mark.world
def test_legacy_getters_answer_each_active_state_in_turn(world):
    """Unchanged code calling groups, parallel_state_sp and deepspeed.utils gets each active state's groups."""
    for answers in world.run(_rank_legacy_code, timeout=WORLD_TIMEOUT):
        assert answers == [True, True, True, True]


@pytest.mark.world
def test_every_scoped_groups_getter_answers_from_the_active_state(world):
    """Each re-pointed groups getter and its deepspeed.utils re-export answers from the active state."""
    for wrong in world.run(_rank_groups_getters, timeout=WORLD_TIMEOUT):
        assert wrong == {}


@pytest.mark.world
def test_groups_mpu_and_mesh_writes_inside_a_scope_stay_with_that_state(world):
    """groups.mpu / mesh_device written inside a scope are seen only by that state, not by the module."""
    for out in world.run(_rank_module_attributes, timeout=WORLD_TIMEOUT):
        assert all(out.values()), out


@pytest.mark.world
def test_initialize_outside_any_scope_with_a_state_mpu_runs_in_its_scope(world):
    """deepspeed.initialize(mpu=state) outside a scope records groups.mpu for that state, not the module."""
    for out in world.run(_rank_initialize_outside_scope, timeout=WORLD_TIMEOUT):
        assert all(out.values()), out


@pytest.mark.world
def test_zero3_partitions_parameters_over_the_group_that_reduces_their_gradients(world):
    """With an SP=2 state as mpu, ZeRO-3 partitions over SP x DP, the group its gradients are reduced over."""
    for out in world.run(_rank_zero3_partitions_over_sp_dp, timeout=WORLD_TIMEOUT):
        assert out["partition_groups"] == [out["sp_dp"]] == [out["reduce_group"]], out


@pytest.mark.world
def test_initialize_with_another_states_mpu_runs_in_that_state(world):
    """deepspeed.initialize(mpu=actor) inside critic's scope builds an actor engine and leaves critic intact."""
    for out in world.run(_rank_initialize_with_another_states_mpu, timeout=WORLD_TIMEOUT):
        assert out == {
            "engine_groups_are_actor": True,
            "critic_scope_keeps_critic_dp": True,
            "actor_scope_has_actor_mpu": True,
            "foreign_mpu_write_refused": True,
        }, out


@pytest.mark.world
def test_initialize_inside_a_scope_without_mpu_uses_the_state_as_mpu(world):
    """deepspeed.initialize() without mpu inside a TP=2 scope builds an engine whose mpu is the state."""
    for out in world.run(_rank_initialize_in_scope_without_mpu, timeout=WORLD_TIMEOUT):
        expected = {"engine_mpu_is_state": True, "mp_world_size": 2, "config_world_size": 2, "dp_is_state": True}
        assert out == expected


@pytest.mark.world
def test_outside_any_scope_deepspeed_trains_as_unpatched(world):
    """With adapters installed but no scope, an engine trains bit-identically with the same collectives."""
    for out in world.run(_rank_outside_scope_unchanged, 3, timeout=WORLD_TIMEOUT):
        assert out["losses_equal"] and out["params_equal"] and out["collectives_equal"], out
        assert out["collectives"] > 0


# ====================================================================== tests in this process


def _patched_namespaces() -> dict[str, Any]:
    import deepspeed.utils
    import deepspeed.utils.groups
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return {
        "groups": deepspeed.utils.groups,
        "utils": deepspeed.utils,
        "parallel_state_sp": parallel_state_sp,
        "deepspeed": deepspeed,
    }


def _snapshot() -> dict[str, Any]:
    spaces = _patched_namespaces()
    snap: dict[str, Any] = {name: dict(vars(module)) for name, module in spaces.items()}
    snap["type(groups)"] = type(spaces["groups"])
    return snap


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    diffs = []
    for name, namespace in before.items():
        if not isinstance(namespace, dict):
            if after[name] is not namespace:
                diffs.append(name)
            continue
        other = after[name]
        for key in set(namespace) | set(other):
            if key not in namespace or key not in other or namespace[key] is not other[key]:
                diffs.append(f"{name}.{key}")
    return sorted(diffs)


def test_install_uninstall_round_trip_restores_every_object_by_identity():
    """install/uninstall twice puts every patched object and the groups module class back by identity."""
    from scoped_parallel.adapters import deepspeed as adapter

    before = _snapshot()
    for _ in range(2):
        adapters.install(targets=("deepspeed",))
        try:
            patched = _differences(before, _snapshot())
        finally:
            adapters.uninstall(("deepspeed",))
        assert "type(groups)" in patched and "deepspeed.initialize" in patched
        assert {f"groups.{name}" for name in adapter.GROUPS_FUNCTIONS} <= set(patched)
        assert {f"parallel_state_sp.{name}" for name in adapter.SEQUENCE_PARALLEL_FUNCTIONS} <= set(patched)
        assert "utils.get_tensor_model_parallel_group" in patched  # the star re-export
        assert _differences(before, _snapshot()) == []
    assert not adapters.is_installed("deepspeed")


def test_missing_target_attribute_fails_with_adapter_error_and_rolls_back(monkeypatch):
    """An attribute missing upstream makes install raise an AdapterError naming it and patch nothing."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    monkeypatch.delattr(parallel_state_sp, "get_model_parallel_rank")
    before = _snapshot()
    with pytest.raises(AdapterError, match=r"parallel_state_sp\.get_model_parallel_rank"):
        adapters.install(targets=("deepspeed",))
    assert not adapters.is_installed("deepspeed")
    assert _differences(before, _snapshot()) == []


def test_strict_mode_raises_no_active_state_error_outside_a_scope():
    """In strict mode a patched getter called outside any scope raises NoActiveStateError."""
    import deepspeed.utils
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups

    with adapters.installed(strict=True, targets=("deepspeed",)):
        for getter in (
            groups._get_data_parallel_group,
            groups._get_sequence_data_parallel_group,
            parallel_state_sp.get_sequence_parallel_group,
            deepspeed.utils.get_tensor_model_parallel_group,
        ):
            with pytest.raises(NoActiveStateError):
                getter()


def test_non_strict_getter_outside_a_scope_calls_the_original():
    """Outside any scope (not strict) a patched getter answers exactly as DeepSpeed's own function."""
    from deepspeed.utils import groups

    with adapters.installed(targets=("deepspeed",)):
        assert groups._get_model_parallel_world_size() == 1  # groups.mpu is None here
        with pytest.raises(AssertionError, match="intra_layer_model parallel group is not initialized"):
            groups.get_tensor_model_parallel_group()
        assert groups.mpu is None and type(groups).__name__ == "ScopedDeepSpeedGroupsModule"

