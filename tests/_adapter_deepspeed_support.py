"""What the DeepSpeed adapter's world tests share (imported by ``test_adapter_deepspeed_*.py``).

Rank-side helpers: each rank function builds its states inside ``with isolated():``,
installs the adapters for its own duration and destroys everything before returning
plain data (group ranks, sizes, names of the objects it found) that the test asserts
on. ``unpatched_run()`` runs DeepSpeed without the adapters and then puts its module
globals back, so a scenario can show the unpatched outcome first on the same ranks.

Collectives are *observed*, never mocked: ``observe_collectives`` wraps
``torch.distributed``'s functions with a logger that records the ranks of the group
each call used and then calls the real function.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import logging
import sys
from typing import Any, Iterator

import torch
import torch.nn as nn

from scoped_parallel import adapters

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


def globals_snapshot() -> dict[str, dict[str, tuple[Any, Any]]]:
    """Every global of DeepSpeed's parallel-state modules, with a copy of each dict's items."""
    snap = {}
    for name in _GLOBAL_MODULES:
        namespace = vars(sys.modules[name])
        snap[name] = {k: (v, dict(v) if type(v) is dict else None) for k, v in namespace.items()}
    return snap


def globals_changed(snap: dict[str, dict[str, tuple[Any, Any]]]) -> list[str]:
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


def restore_globals(snap: dict[str, dict[str, tuple[Any, Any]]]) -> None:
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
def unpatched_run() -> Iterator[None]:
    """Run DeepSpeed without adapters, then put its module globals back as they were."""
    assert not adapters.is_installed("deepspeed")
    snap = globals_snapshot()
    try:
        yield
    finally:
        restore_globals(snap)
        gc.collect()


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Give a rank function DeepSpeed's module globals as it found them, even when it fails.

    The world is shared by every test; without this a failing test would leave, e.g.,
    ``groups.mpu`` set for the next one. (A context manager, not a decorator: the world
    finds a rank function by the file its code object comes from.)
    """
    _ds()
    snap = globals_snapshot()
    try:
        yield
    finally:
        if adapters.is_installed("deepspeed"):
            adapters.uninstall(("deepspeed",))
        restore_globals(snap)
        gc.collect()


def ranks(group: Any) -> Any:
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
        log.append((name, _numel(bound), ranks(bound.arguments.get("group"))))
        return original(*args, **kwargs)

    return logged


@contextlib.contextmanager
def observe_collectives() -> Iterator[list[tuple[str, int, Any]]]:
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


def state(**kwargs: Any) -> Any:
    from scoped_parallel import ParallelState

    return ParallelState(**kwargs)


def config(stage: int = 0, clip: float = 0.0, **extra: Any) -> dict[str, Any]:
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


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


N_PARAMS = 8 * 16 + 16 + 16 + 1


class TPNet(nn.Module):
    """Two projections AutoTP shards by name: ``up_proj`` by column, ``down_proj`` by row."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


AUTOTP_PARTITION = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [".*up_proj.*"], "partition_type": "column"},
        {"patterns": [".*down_proj.*"], "partition_type": "row"},
    ],
}


def engine(net: nn.Module, ds_config: dict[str, Any], mpu: Any = None) -> Any:
    ds = _ds()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    built, *_ = ds.initialize(model=net, optimizer=optimizer, config=ds_config, mpu=mpu)
    return built


def batch(rank: int, step: int, seed: int, shape: tuple[int, ...] = (2, 8)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return torch.randn(*shape, generator=generator)


def step(engine: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: F811  (a parameter, not the function)
    out = engine(x)
    if isinstance(out, tuple):
        out, aux = out
        loss = out.float().pow(2).mean() + 0.01 * aux
    else:
        loss = out.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.detach().clone()


def full_params(engine: Any) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def drop(*engines: Any) -> None:
    for engine in engines:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    gc.collect()


def destroy(*states: Any) -> None:
    for state in states:
        if state is not None:
            state.destroy()


def installed(strict: bool = False) -> Any:
    return adapters.installed(strict=strict, targets=("deepspeed",))


def identify(obj: Any, known: dict[str, Any]) -> Any:
    """The name of the entry of ``known`` that ``obj`` is (by identity), else a description.

    Process groups cannot leave a rank, so rank functions return this instead of the
    object: ``"critic dp"`` when it is that state's group, ``("other group", ranks)``
    for another group, ``repr`` otherwise. Groups are shared between kinds with the
    same ranks (with SP = 1, dp and sp-dp are one object), so give one kind per call.
    """
    for name, candidate in known.items():
        if obj is candidate:
            return name
    import torch.distributed as dist

    if isinstance(obj, dist.ProcessGroup):
        return ("other group", ranks(obj))
    return repr(obj)[:120]


def state_groups(label: str, state: Any, kinds: tuple[str, ...]) -> dict[str, Any]:
    """``{"<label> <kind>": state.group(kind)}`` for ``identify``."""
    return {f"{label} {kind}": state.group(kind) for kind in kinds}
