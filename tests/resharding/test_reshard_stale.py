"""A reshard right after ``optimizer.step()`` carries that step's weights (no stale reads).

megatron-core's ``DistributedDataParallel`` with the distributed optimizer and
``overlap_param_gather=True``: ``optimizer.step()`` updates only this rank's shard of the
parameter buffer; the other data-parallel shards arrive with the all-gathers that the next
forward's pre-hooks finish. A reshard that read the parameters then would copy weights whose
other shards are one step old, with no error (NeMo-RL shipped that bug). The megatron
backend finishes those gathers first (``adapters/megatron_reshard/checks.finish_param_gathers``).

World case (4 gloo ranks, CPU shims of ``tests/_megatron_ddp.py``): a GPTModel in DDP
TP=2 x DP=2 (distributed Adam, small buckets: several bucket groups), two steps, reshard into
a bare TP=4 GPTModel right after ``optimizer.step()``. The truth is the source's weights
after megatron-core's own forced gather (``start_param_sync(force_sync=True)``), whole
(TP shards concatenated): the destination's whole weights equal them **bitwise** (a reshard
copies; TP 2 -> 4 only re-cuts), and its logits within 1e-6 (TP changes the order of the
row-parallel sums). The same run with the finish disabled (sabotage) leaves the
destination off by ~1e-2 (Adam's step, lr 1e-2). A third step whose gathers are dispatched
and still in flight when the reshard starts (what ``align_param_gather`` schedules do) is
waited for, and leaves no handle behind.

Pure-data cases: the detection on stand-in wrappers (pending, in flight, done; source and
destination), the fallback to ``start_param_sync(force_sync=True)`` for a wrapper without
the bucket-group names, and the ReshardError naming ``overlap_param_gather`` without either.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core.resharding")

TOLERANCE = 1e-6
SRC, DST = {"tp": 2}, {"tp": 4}


# ---------------------------------------------------------------------------- rank side

def _whole(chunks: list[Any], state: Any) -> dict[str, torch.Tensor]:
    """Every parameter of this rank's chunks, whole: TP shards gathered over the state's TP
    group and concatenated on their partition dimension (stride 1: no SwiGLU here)."""
    import torch.distributed as dist

    from megatron.core.utils import unwrap_model

    from scoped_parallel.adapters.megatron_reshard import canonical_tensors

    chunks = [unwrap_model(c) for c in chunks]
    group = state.group("tp")
    size = dist.get_world_size(group)
    out = {}
    for name, tensor in canonical_tensors(chunks):
        data = tensor.detach()
        if getattr(tensor, "tensor_model_parallel", False) and size > 1:
            parts = [torch.empty_like(data) for _ in range(size)]
            dist.all_gather(parts, data.contiguous(), group=group)
            data = torch.cat(parts, dim=int(tensor.partition_dim))
        out[name] = data.clone()
    return out


def _pending(ddp_chunks: list[Any]) -> dict[str, int]:
    groups = [bg for d in ddp_chunks for bg in d.bucket_groups + d.expert_parallel_bucket_groups]
    return {"bucket groups": len(groups), "not dispatched": sum(not bg.param_gather_dispatched for bg in groups),
            "in flight": sum(bg.param_gather_handle is not None for bg in groups)}


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return all(torch.equal(a[n], b[n]) for n in a), max(float((a[n] - b[n]).abs().max()) for n in a)


def rank_stale(rank: int, sabotage: bool) -> dict[str, Any]:
    """Train the DDP source two steps, reshard right after ``optimizer.step()``, compare with the
    truth; then a third step with its gathers dispatched (in flight) and a second reshard.
    ``sabotage``: the finish is a no-op (the reshard reads what the step left)."""
    import _megatron_ddp as md
    import _reshard_megatron as rm

    import scoped_parallel as sp
    from scoped_parallel import adapters
    from scoped_parallel.adapters.megatron_reshard import checks

    out: dict[str, Any] = {}
    states = [md.state("src", SRC), md.state("dst", DST)]
    kept = checks.finish_param_gathers
    try:
        with md.ddp_cpu_shims(), adapters.installed(targets=("megatron",)):
            src_state, dst_state = states
            with src_state.activate():
                src = md.wrap(rm.build(SRC, 1), bucket_size=4000)
                opt = md.optimizer(src)
                initial = _whole(src, src_state)
                for step in range(2):
                    md.train_step(src, opt, rm.tokens(100 + step))
            with dst_state.activate():
                dst = rm.build(DST, 2)
            out["pending after step"] = _pending(src)
            if sabotage:
                checks.finish_param_gathers = lambda model, role="source": 0
            sp.reshard(src, src_state, dst, dst_state)
            checks.finish_param_gathers = kept
            out["pending after reshard"] = _pending(src)
            resharded = _whole(dst, dst_state)
            with src_state.activate():
                for ddp in src:  # megatron-core's own forced gather: the truth
                    ddp.start_param_sync(force_sync=True)
                truth = _whole(src, src_state)
                src_logits = rm.logits(src)
            with dst_state.activate():
                dst_logits = rm.logits(dst)
            out["trained away from init"] = _diff(truth, initial)[1]
            out["weights bitwise"], out["weights max diff"] = _diff(resharded, truth)
            out["logits max diff"] = float((dst_logits - src_logits).abs().max())
            if not sabotage:
                # a step whose gathers were dispatched and are in flight when the reshard starts
                with src_state.activate():
                    md.train_step(src, opt, rm.tokens(102))
                    for ddp in src:
                        ddp.start_param_sync()  # asynchronous under overlap_param_gather
                out["dispatched before second reshard"] = _pending(src)
                sp.reshard(src, src_state, dst, dst_state)
                out["pending after second reshard"] = _pending(src)
                resharded = _whole(dst, dst_state)
                with src_state.activate():
                    for ddp in src:
                        ddp.start_param_sync(force_sync=True)
                    truth = _whole(src, src_state)
                out["second weights bitwise"], out["second weights max diff"] = _diff(resharded, truth)
    finally:
        checks.finish_param_gathers = kept
        for state in states:
            state.destroy()
    return out


def rank_stale_cases(rank: int) -> dict[str, Any]:
    return {"fixed": rank_stale(rank, False), "sabotage": rank_stale(rank, True)}


# ---------------------------------------------------------------------------- world tests

@pytest.fixture(scope="module")
def stale(world):
    from _megatron_ddp import ddp_cpu_skip_reason

    reason = ddp_cpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return world.run(rank_stale_cases, timeout=240)


@pytest.mark.world
@pytest.mark.slow
def test_reshard_right_after_step_carries_the_steps_weights(stale):
    """Right after optimizer.step() (every bucket group's gather not yet dispatched), the
    resharded TP=4 destination holds the trained weights bit for bit, and its logits match
    the source's within 1e-6; the reshard leaves the source's gathers done."""
    for rank, out in enumerate(stale):
        got = out["fixed"]
        pending = got["pending after step"]
        assert pending["bucket groups"] > 1 and pending["not dispatched"] == pending["bucket groups"], f"rank {rank}: {pending}"
        assert got["trained away from init"] > 1e-3, f"rank {rank}: training moved the weights by {got['trained away from init']}"
        assert got["weights bitwise"], f"rank {rank}: resharded weights differ from the trained ones by {got['weights max diff']}"
        assert got["logits max diff"] <= TOLERANCE, f"rank {rank}: logits differ by {got['logits max diff']}"
        assert got["pending after reshard"]["not dispatched"] == 0 and got["pending after reshard"]["in flight"] == 0, got["pending after reshard"]


@pytest.mark.world
@pytest.mark.slow
def test_without_the_finish_the_reshard_reads_the_previous_step(stale):
    """The comparison can fail: with finish_param_gathers disabled the same reshard copies
    shards one step old (other DP ranks' part of the step never arrived), with no error."""
    for rank, out in enumerate(stale):
        got = out["sabotage"]
        assert got["pending after step"]["not dispatched"] > 0, f"rank {rank}: {got['pending after step']}"
        assert not got["weights bitwise"] and got["weights max diff"] > 1e-3, f"rank {rank}: sabotaged reshard max diff {got['weights max diff']}"
        assert got["logits max diff"] > 1e-4, f"rank {rank}: sabotaged logits diff {got['logits max diff']}"


@pytest.mark.world
@pytest.mark.slow
def test_gathers_in_flight_are_waited_for(stale):
    """Gathers dispatched (asynchronously) before the reshard are waited for: the reshard carries
    the third step's weights and no handle is left."""
    for rank, out in enumerate(stale):
        got = out["fixed"]
        dispatched = got["dispatched before second reshard"]
        assert dispatched["not dispatched"] == 0, f"rank {rank}: {dispatched}"
        assert got["pending after second reshard"]["in flight"] == 0, f"rank {rank}: {got['pending after second reshard']}"
        assert got["second weights bitwise"], f"rank {rank}: differ by {got['second weights max diff']}"


# ---------------------------------------------------------------------------- pure data

class _BucketGroup:
    def __init__(self, dispatched: bool, in_flight: bool) -> None:
        self.param_gather_dispatched = dispatched
        self.param_gather_handle = object() if in_flight else None
        self.calls: list[bool] = []

    def finish_param_sync(self, skip_next_bucket_dispatch: bool = False) -> None:
        self.calls.append(skip_next_bucket_dispatch)
        self.param_gather_dispatched, self.param_gather_handle = True, None


def _ddp(hooked: bool = True, groups: Any = None, force: bool = True) -> Any:
    """A stand-in megatron-core DDP wrapper: its class, none of its setup. ``groups``:
    (dense, expert) bucket groups, or None for a version without those names; ``force``:
    False takes its ``start_param_sync`` away (a version without that either)."""
    from megatron.core.distributed import DistributedDataParallel

    class Wrapper(DistributedDataParallel):
        def __init__(self) -> None:  # no megatron-core setup
            torch.nn.Module.__init__(self)

    ddp = Wrapper()
    ddp.module = torch.nn.Linear(2, 2)
    ddp.ddp_config = SimpleNamespace(overlap_param_gather=hooked, use_distributed_optimizer=True)
    ddp.use_forward_hook = hooked
    if groups is not None:
        ddp.bucket_groups, ddp.expert_parallel_bucket_groups = groups
    ddp.forced = []
    ddp.start_param_sync = (lambda force_sync=False: ddp.forced.append(force_sync)) if force else None
    return ddp


def test_pending_gathers_are_finished_on_the_source_and_waited_for_on_the_destination():
    from scoped_parallel.adapters.megatron_reshard import finish_param_gathers

    def model() -> tuple[list[Any], list[_BucketGroup]]:
        groups = [_BucketGroup(False, False), _BucketGroup(True, True), _BucketGroup(True, False)]
        expert = [_BucketGroup(False, False)]
        return [_ddp(groups=(groups, expert))], groups + expert

    chunks, groups = model()
    assert finish_param_gathers(chunks, "source") == 3
    assert [g.calls for g in groups] == [[True], [True], [], [True]]  # next bucket's dispatch skipped: each finished itself
    chunks, groups = model()
    assert finish_param_gathers(chunks, "destination") == 1
    assert [g.calls for g in groups] == [[], [True], [], []]
    chunks, groups = model()  # without forward hooks (overlap_param_gather=False) nothing is pending
    chunks[0].use_forward_hook = False
    assert finish_param_gathers(chunks, "source") == 0 and all(not g.calls for g in groups)


def test_a_wrapper_without_the_bucket_group_names_falls_back_or_is_refused():
    from scoped_parallel.adapters.megatron_reshard import finish_param_gathers
    from scoped_parallel.errors import ReshardError

    forced = _ddp()
    assert finish_param_gathers([forced], "source") == 1 and forced.forced == [True]
    assert finish_param_gathers([forced], "destination") == 1 and forced.forced == [True, True]
    bare = _ddp(force=False)
    with pytest.raises(ReshardError, match="overlap_param_gather=True") as err:
        finish_param_gathers([bare], "source")
    assert "bucket_groups" in str(err.value) and "megatron-core" in str(err.value)
    assert finish_param_gathers([_ddp(hooked=False, force=False)], "source") == 0
    fsdp = torch.nn.Module()  # Megatron-FSDP has a ddp_config too, but no bucket groups and another class: not touched
    fsdp.ddp_config = SimpleNamespace(overlap_param_gather=True)
    assert finish_param_gathers([fsdp], "source") == 0
