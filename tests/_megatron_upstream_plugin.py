"""A pytest plugin that runs megatron-core's own parallel-state tests inside a scope.

Loaded (``-p _megatron_upstream_plugin``) by each of the 8 rank processes that
``tests/adapters/megatron/test_megatron_upstream.py`` starts on Megatron-LM's
``tests/unit_tests/test_parallel_state.py`` (a checkout named by ``MEGATRON_LM``;
nothing of it is copied here). Before the tests are collected it joins a gloo world on
127.0.0.1 and installs the megatron adapter; then it replaces three methods of
Megatron's test helper ``Utils``:

* ``initialize_distributed``: nothing to do (the gloo world exists);
* ``initialize_model_parallel(tp, pp, vpp, **options)``: builds a ``ParallelState`` with
  those sizes and options and enters its scope (``vpp`` is set in the scope with
  Megatron's own setters, as ``initialize_model_parallel`` sets its globals);
* ``destroy_model_parallel``: leaves the scope and destroys the state.

``torch.cuda.device_count()`` reports the world size (the tests size their worlds with
it). Tests that call ``parallel_state.initialize_model_parallel`` themselves, or read
its module globals, test Megatron's globals, not a scope.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

_OPTIONS = (
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "order",
    "num_distributed_optimizer_instances",
    "hierarchical_context_parallel_sizes",
    "hybrid_context_parallel",
    "create_all_gather_group",
)


class _Current:
    state = None
    activation = None


def _leave() -> None:
    if _Current.activation is not None:
        _Current.activation.__exit__(None, None, None)
    if _Current.state is not None:
        _Current.state.destroy()
    _Current.state = _Current.activation = None


def pytest_configure(config):  # noqa: D103  (pytest hook)
    from scoped_parallel import ParallelState, adapters

    world = int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
            rank=int(os.environ["RANK"]),
            world_size=world,
            timeout=timedelta(seconds=60),
        )
    torch.cuda.device_count = lambda: world  # the tests size their worlds with it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.parallel_state as ps
        from tests.unit_tests.test_utilities import Utils
    adapters.install(targets=("megatron",))

    def initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, **kwargs
    ):
        _leave()
        unknown = sorted(set(kwargs) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"no ParallelState option for {unknown}")
        state = ParallelState(
            name="upstream",
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            timeout=timedelta(seconds=120),  # 8 processes on 2 shared cores: a late rank is slow, not absent
            **kwargs,
        )
        _Current.state = state
        _Current.activation = state.activate()
        _Current.activation.__enter__()
        if virtual_pipeline_model_parallel_size is not None:
            ps.set_virtual_pipeline_model_parallel_rank(0)
            ps.set_virtual_pipeline_model_parallel_world_size(virtual_pipeline_model_parallel_size)
        Utils.inited = True

    def destroy_model_parallel():
        _leave()
        Utils.inited = False

    Utils.initialize_distributed = staticmethod(lambda: None)
    Utils.initialize_model_parallel = staticmethod(initialize_model_parallel)
    Utils.destroy_model_parallel = staticmethod(destroy_model_parallel)
    Utils.world_size, Utils.rank = world, int(os.environ["RANK"])


#: Tests that create NCCL groups themselves (megatron-core 0.18+): NCCL aborts the process on a
#: machine without GPUs, with or without a scope, so they are left out here.
NCCL_ONLY = ("test_expert_all_gather_group",)


def pytest_collection_modifyitems(config, items):  # noqa: D103  (pytest hook)
    kept = [item for item in items if item.name.split("[")[0] not in NCCL_ONLY]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_runtest_teardown(item):  # noqa: D103  (pytest hook): no scope survives a test
    _leave()
