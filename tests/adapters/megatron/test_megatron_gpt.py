"""megatron-core's own GPTModel, unchanged, for three layouts in one process (4 gloo ranks).

The model code, the CPU shims and the training step (Megatron's own schedule, interleaved
1F1B for the pipeline model with two virtual stages per stage) are those of ``examples/megatron_two_models.py`` (its docstring lists the
shims: a no-op RNG-tracker fork with dropout 0, a CPU memory buffer, CPU tensors where
Megatron asks for CUDA ones, CPU initialization, no fusions, an explicit causal mask; the
same in every run). Also: the per-state RNG tracker and seeds, the
per-state setters and virtual pipeline values, and the memory buffer inside a scope.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core.parallel_state")

from _reshard_megatron import example as _example  # noqa: E402  (loads examples/megatron_two_models.py once)


def rank_gpt_runs(rank, steps):
    """Interleaved scoped run, then each model alone under vanilla Megatron and with explicit groups."""
    ex = _example()
    with ex.cpu_shims():
        scoped = ex.run_scoped(steps)
        report = {}
        for name in ex.MODELS:
            report[name] = {
                "vanilla": ex.compare(scoped[name], ex.run_vanilla(name, steps)),
                "explicit": ex.compare(scoped[name], ex.run_explicit(name, steps)),
                "losses": scoped[name]["losses"],
            }
    return report


@pytest.mark.world
@pytest.mark.slow
def test_gpt_models_interleaved_in_scopes_train_bitwise_like_vanilla_solo_and_explicit_groups(world):
    """GPTModel TP=2xDP=2, TP=4 and PP=2xVPP=2xDP=2 (Megatron's interleaved 1F1B schedule, tied embeddings), built and
    trained interleaved in scopes with no group passed, equal bit for bit vanilla Megatron solo and
    GPTModel(pg_collection=state.process_group_collection()) with the schedule given the same collection."""
    want = set(_example().MODELS)
    for rank, report in enumerate(world.run(rank_gpt_runs, 3, timeout=600)):
        assert set(report) == want, f"rank {rank}: models run {sorted(report)}, expected {sorted(want)}"
        for name, result in report.items():
            assert result["vanilla"] == [], f"rank {rank} {name}: scoped vs vanilla solo: expected no difference, got {result['vanilla']}"
            assert result["explicit"] == [], f"rank {rank} {name}: scoped vs explicit groups: expected no difference, got {result['explicit']}"
            assert len(set(result["losses"])) == 3, f"rank {rank} {name}: the loss should change every step, got {result['losses']}"


def rank_rng_trackers(rank, seed):
    """Each state's tracker and seeds, against vanilla Megatron's for the same TP size."""
    from datetime import timedelta

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from scoped_parallel import ParallelState, adapters

    def add(self, name, seed):  # CPU: record the seed instead of a CUDA generator state
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = seed

    saved_add = mrandom.CudaRNGStatesTracker.add
    mrandom.CudaRNGStatesTracker.add = add
    out = {"vanilla": {}}
    try:
        for tp in (2, 4):
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
            try:
                tensor_parallel.model_parallel_cuda_manual_seed(seed)
                out["vanilla"][tp] = dict(tensor_parallel.get_cuda_rng_tracker().get_states())
            finally:
                ps.destroy_model_parallel()
                # a fresh global tracker for the next run (older minors have no force_reset)
                mrandom._CUDA_RNG_STATE_TRACKER = None
                mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
        global_before = mrandom._CUDA_RNG_STATE_TRACKER
        states = {tp: ParallelState(name=f"tp{tp}", tensor_model_parallel_size=tp, timeout=timedelta(seconds=60)) for tp in (2, 4)}
        try:
            with adapters.installed(targets=("megatron",)):
                trackers = {}
                for tp, state in states.items():
                    with state.activate():
                        tensor_parallel.model_parallel_cuda_manual_seed(seed)
                        trackers[tp] = tensor_parallel.get_cuda_rng_tracker()
                for tp, state in states.items():
                    with state.activate():
                        out[tp] = {
                            "same tracker": tensor_parallel.get_cuda_rng_tracker() is trackers[tp],
                            "seeds": dict(trackers[tp].get_states()),
                        }
                out["distinct"] = trackers[2] is not trackers[4]
                out["global untouched"] = mrandom._CUDA_RNG_STATE_TRACKER is global_before
        finally:
            for state in states.values():
                state.destroy()
    finally:
        mrandom.CudaRNGStatesTracker.add = saved_add
    return out


@pytest.mark.world
def test_each_state_has_its_own_rng_tracker_seeded_from_its_own_tp_rank(world):
    """model_parallel_cuda_manual_seed in a scope seeds that state's tracker as vanilla Megatron would."""
    for rank, out in enumerate(world.run(rank_rng_trackers, 77, timeout=400)):
        assert out["distinct"], f"rank {rank}: the two states share one tracker"
        assert out["global untouched"], f"rank {rank}: Megatron's own tracker was replaced"
        for tp in (2, 4):
            assert out[tp]["same tracker"], f"rank {rank}: TP={tp} scope returned another tracker"
            assert out[tp]["seeds"] == out["vanilla"][tp], (
                f"rank {rank} TP={tp}: seeds expected (vanilla Megatron) {out['vanilla'][tp]}, got {out[tp]['seeds']}"
            )
        assert out[2]["seeds"]["model-parallel-rng"] == 77 + 2718 + rank % 2, f"rank {rank}: {out[2]}"
        assert out[4]["seeds"]["model-parallel-rng"] == 77 + 2718 + rank, f"rank {rank}: {out[4]}"


def rank_setters_and_buffer(rank):
    from datetime import timedelta

    from megatron.core import parallel_state as ps

    from scoped_parallel import ParallelState, adapters

    a = ParallelState(name="a", tensor_model_parallel_size=2, timeout=timedelta(seconds=60))
    b = ParallelState(name="b", tensor_model_parallel_size=4, timeout=timedelta(seconds=60))
    out = {}
    try:
        with adapters.installed(targets=("megatron",)):
            for state, (vpp, vrank, tp) in ((a, (2, 1, 7)), (b, (4, 3, None))):
                with state.activate():
                    ps.set_virtual_pipeline_model_parallel_world_size(vpp)
                    ps.set_virtual_pipeline_model_parallel_rank(vrank)
                    if tp is not None:
                        ps.set_tensor_model_parallel_world_size(tp)
            for name, state in (("a", a), ("b", b)):
                with state.activate():
                    out[name] = (
                        ps.get_virtual_pipeline_model_parallel_world_size(),
                        ps.get_virtual_pipeline_model_parallel_rank(),
                        ps.get_tensor_model_parallel_world_size(),
                        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=1),
                        ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=0),
                    )
                    out[name + " buffer"] = id(ps.get_global_memory_buffer())
            out["globals"] = (
                ps.get_virtual_pipeline_model_parallel_world_size(),
                ps.get_virtual_pipeline_model_parallel_rank(),
                ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE,
                ps._GLOBAL_MEMORY_BUFFER,
            )
    finally:
        a.destroy()
        b.destroy()
    return out


@pytest.mark.world
def test_setters_and_virtual_pipeline_values_are_per_state_and_the_buffer_is_shared(world):
    """set_* overrides and virtual pipeline values in a scope belong to that state; globals stay unset."""
    for rank, out in enumerate(world.run(rank_setters_and_buffer, timeout=400)):
        assert out["a"] == (2, 1, 7, True, True), f"rank {rank}: state a expected (2, 1, 7, True, True), got {out['a']}"
        assert out["b"] == (4, 3, 4, False, True), f"rank {rank}: state b expected (4, 3, 4, False, True), got {out['b']}"
        assert out["globals"] == (None, None, None, None), f"rank {rank}: Megatron's globals changed: {out['globals']}"
        assert out["a buffer"] == out["b buffer"], f"rank {rank}: expected one shared memory buffer"


def rank_rng_set_up_once(rank, steps):
    """Megatron's tracker configured once outside any scope; models built and trained in scopes."""
    import contextlib
    import inspect
    from datetime import timedelta

    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from scoped_parallel import ParallelState, adapters

    ex = _example()
    if not {"inference_rng_tracker", "force_reset"} <= set(inspect.signature(mrandom.initialize_rng_tracker).parameters):
        return "skip: this megatron-core has no inference tracker or force_reset"

    def checked_fork(self, name="model-parallel-rng"):  # CPU: Megatron's check, no CUDA generator switch
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        return contextlib.nullcontext()

    def recording_add(self, name, seed):  # CPU: record the seed instead of a CUDA generator state
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = seed

    out = {}
    with ex.cpu_shims():
        saved = mrandom.CudaRNGStatesTracker.fork, mrandom.CudaRNGStatesTracker.add
        mrandom.CudaRNGStatesTracker.fork, mrandom.CudaRNGStatesTracker.add = checked_fork, recording_add
        try:
            # 1. configured once (an inference tracker, as an RL rollout sets up), then models in scopes
            mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
            configured = mrandom._CUDA_RNG_STATE_TRACKER
            try:
                scoped = ex.run_scoped(steps)
            except Exception as err:  # noqa: BLE001 - the failure is the claim
                out["scoped"] = f"{type(err).__name__}: {err}"
            else:
                out["scoped"] = {name: ex.compare(scoped[name], ex.run_vanilla(name, steps)) for name in ex.MODELS}
            out["configured tracker kept"] = mrandom._CUDA_RNG_STATE_TRACKER is configured
            # 2. configured once (default tracker); two states seeded differently in their scopes
            mrandom.initialize_rng_tracker(force_reset=True)
            process_wide = mrandom._CUDA_RNG_STATE_TRACKER
            states = {s: ParallelState(name=f"seed{s}", tensor_model_parallel_size=2, timeout=timedelta(seconds=60)) for s in (1, 2)}
            try:
                with adapters.installed(targets=("megatron",)):
                    trackers = {}
                    for seed, state in states.items():
                        with state.activate():
                            before = tensor_parallel.get_cuda_rng_tracker()
                            tensor_parallel.model_parallel_cuda_manual_seed(seed)
                            trackers[seed] = tensor_parallel.get_cuda_rng_tracker()
                            out[f"seed {seed}: unseeded scope used the process-wide tracker"] = before is process_wide
                    out["seeded trackers"] = {
                        "distinct": trackers[1] is not trackers[2],
                        "own": all(t is not process_wide for t in trackers.values()),
                        "class": {type(t).__name__ for t in trackers.values()} == {type(process_wide).__name__},
                        "model-parallel seeds": [trackers[s].get_states()["model-parallel-rng"] for s in (1, 2)],
                    }
                    out["process-wide tracker unseeded"] = process_wide.get_states() == {}
            finally:
                for state in states.values():
                    state.destroy()
        finally:
            mrandom.CudaRNGStatesTracker.fork, mrandom.CudaRNGStatesTracker.add = saved
            mrandom.initialize_rng_tracker(force_reset=True)
    return out


@pytest.mark.world
@pytest.mark.slow
def test_rng_tracker_set_up_once_outside_scopes_keeps_working_in_them(world):
    """Megatron's tracker configured once at start-up: GPTModels built in scopes fork it like vanilla Megatron
    (bitwise equal to it solo); states seeded in their scopes get their own trackers of the configured class."""
    for rank, out in enumerate(world.run(rank_rng_set_up_once, 2, timeout=600)):
        if out == "skip: this megatron-core has no inference tracker or force_reset":
            pytest.skip(out)
        tp_rank = rank % 2
        expected = {
            "scoped": {name: [] for name in _example().MODELS},
            "configured tracker kept": True,
            "seed 1: unseeded scope used the process-wide tracker": True,
            "seed 2: unseeded scope used the process-wide tracker": True,
            "seeded trackers": {
                "distinct": True, "own": True, "class": True,
                "model-parallel seeds": [1 + 2718 + tp_rank, 2 + 2718 + tp_rank],
            },
            "process-wide tracker unseeded": True,
        }
        assert out == expected, f"rank {rank}: expected {expected}, got {out}"
