"""Reshard between two states' layouts, Hugging Face models under DeepSpeed (4 gloo ranks).

The actor is a tiny ``LlamaForCausalLM`` (from a config, nothing downloaded) under ZeRO-3
in state A (Ulysses SP=2 x DP=2: ZeRO-3 partitions every parameter over SP x DP, the 4
ranks), trained one step. It is resharded with one ``scoped_parallel.reshard`` call into:

* a rollout copy under ZeRO-0 in state B (SP=4): a whole replica per rank;
* a reference copy under ZeRO-3 in state C (TP=2 as DeepSpeed's mpu, so DP=2: ZeRO-3
  partitions over the rank pairs {0, 2} and {1, 3}, another split than the actor's);
* the same under ZeRO-3 with ``offload_param`` (device cpu): DeepSpeed's offload code path
  (on the CPU accelerator the host is the device, so nothing crosses a bus).

Both destinations start from other weights (another seed). After the reshard every
destination parameter equals the actor's (gathered with DeepSpeed's own
``GatheredParameters``) bit for bit, and so do the logits on the same tokens (the same
module code on the same weights: the same reduction order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import _adapter_deepspeed_support as support  # noqa: E402

WORLD_TIMEOUT = 600.0
VOCAB, SEQ = 64, 8


def _llama(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config)


def _config(stage: int, persist: bool = False, offload: bool = False) -> dict[str, Any]:
    """ZeRO ``stage``; with ``persist`` DeepSpeed's default persistence threshold (1e5 elements:
    every parameter of the tiny model stays whole after the first forward), else 0."""
    zero: dict[str, Any] = {"stage": stage}
    if not persist:
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return support.config(stage=stage, train_micro_batch_size_per_gpu=1, zero_optimization=zero)


def _engine(state: Any, seed: int, stage: int, train: bool, persist: bool = False, offload: bool = False) -> Any:
    ds = support._ds()
    module = _llama(seed)
    with state.activate():
        if train:
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
            engine, *_ = ds.initialize(model=module, optimizer=optimizer, config=_config(stage, persist), mpu=state)
        else:
            module.requires_grad_(False)
            engine, *_ = ds.initialize(model=module, config=_config(stage, persist, offload), mpu=state)
            engine.eval()
    return engine


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


def _full(engine: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every parameter whole, and the logits on the fixed tokens, computed with the whole weights."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        return [p.detach().clone() for p in params], engine.module(input_ids=_tokens()).logits.detach().clone()


def _swap(plan: Any) -> Any:
    """This rank's part with two of its receives into one destination tensor (equal sizes,
    different boxes) writing each other's box: what it receives and from whom is unchanged
    (no peer is affected, nothing waits), where it lands is swapped."""
    transfers = list(plan.transfers)
    mine = [i for i, t in enumerate(transfers) if t.dst_rank == plan.rank and "proj" in t.dst_name]
    for i in mine:
        for j in mine:
            a, b = transfers[i], transfers[j]
            if i < j and a.dst_name == b.dst_name and a.dst_box != b.dst_box and a.nbytes == b.nbytes:
                transfers[i] = dataclasses.replace(a, dst_box=b.dst_box)
                transfers[j] = dataclasses.replace(b, dst_box=a.dst_box)
                return dataclasses.replace(plan, transfers=tuple(transfers))
    raise AssertionError("no two transfers into one tensor to swap")


def _cast_cases(rank: int, actor: Any, a: Any, b: Any, fp32_sent: dict[int, int]) -> dict[str, Any]:
    """The ZeRO-3 fp32 actor into a plain bf16 Hugging Face module (a whole replica per rank
    in state B, the layout of the ZeRO-0 case whose fp32 bytes are ``fp32_sent``): refused
    without ``dtype=`` and with a cast target other than the destination's dtype (nothing
    moved), then with ``dtype=torch.bfloat16``."""
    import scoped_parallel as sp

    got: dict[str, Any] = {}
    src_params, _ = _full(actor)
    dst = _llama(3).to(torch.bfloat16).requires_grad_(False)
    before = [p.detach().clone() for p in dst.parameters()]
    for key, dtype in (("no dtype error", None), ("wrong target error", torch.float16)):
        try:
            sp.reshard(actor, a, dst, b, dtype=dtype)
            got[key] = None
        except sp.ReshardError as err:
            got[key] = str(err)
    got["refused untouched"] = all(map(torch.equal, before, dst.parameters()))
    plan = sp.plan_reshard(actor, a, dst, b, dtype=torch.bfloat16)
    done = sp.reshard(actor, a, dst, b, dtype=torch.bfloat16)
    got["cached"] = done.plan is plan
    by_name = sp.plan_reshard(actor, a, dst, b, dtype={n: torch.bfloat16 for n, _ in dst.named_parameters()})
    got["other cast cached apart, same transfers"] = by_name is not plan and by_name.transfers == plan.transfers
    got["problems"] = plan.problems()
    got["report"] = plan.report()
    got["sent"] = done.sent
    got["predicted"] = {d: n for (s, d), n in plan.bytes_between().items() if s == rank}
    got["fp32 sent"] = fp32_sent
    got["params"] = len(src_params) == len(list(dst.parameters())) and all(
        p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(dst.parameters(), src_params))
    got["started different"] = not all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(before, src_params))
    # fp16, asked by a function of the name (None: no cast; every parameter here is floating)
    half = _llama(4).half().requires_grad_(False)
    done = sp.reshard(actor, a, half, b, dtype=lambda name: torch.float16)
    got["fp16 sent"] = done.sent
    got["fp16 params"] = all(p.dtype == torch.float16 and torch.equal(p, q.to(torch.float16)) for p, q in zip(half.parameters(), src_params))
    return got


def _rank_reshards(rank: int) -> dict[str, Any]:
    import scoped_parallel as sp

    out: dict[str, Any] = {}
    with support.isolated():
        a = support.state(name="actor", sequence_parallel_size=2)
        b = support.state(name="rollout", sequence_parallel_size=4)
        c = support.state(name="reference", tensor_model_parallel_size=2)
        d = support.state(name="offloaded", tensor_model_parallel_size=2)
        engines: list[Any] = []
        try:
            with support.installed():
                actor = _engine(a, 1, stage=3, train=True)
                engines.append(actor)

                def train() -> None:
                    with a.activate():
                        loss = actor(input_ids=_tokens()).logits.float().pow(2).mean()
                        actor.backward(loss)
                        actor.step()

                train()
                src_params, src_logits = _full(actor)
                out["actor partition groups"] = sorted({support.ranks(p.ds_process_group) for p in actor.module.parameters()})
                for name, state, stage in (("ZeRO-3 SP=2xDP=2 -> ZeRO-0 SP=4", b, 0), ("ZeRO-3 SP=2xDP=2 -> ZeRO-3 DP=2", c, 3),
                                           ("ZeRO-3 SP=2xDP=2 -> ZeRO-3 DP=2, parameters offloaded", d, 3)):
                    offloaded = "offloaded" in name
                    dst = _engine(state, 2, stage=stage, train=False, persist=True, offload=offloaded)
                    engines.append(dst)
                    before_params, before = _full(dst)
                    plan = sp.plan_reshard(actor, a, dst, state)
                    done = sp.reshard(actor, a, dst, state)
                    params, logits = _full(dst)
                    out[name] = {
                        "backend": plan.backend,
                        "problems": plan.problems(),
                        "cached": done.plan is plan,
                        "sent": done.sent,
                        "predicted": {d: n for (s, d), n in plan.bytes_between().items() if s == rank},
                        "received": plan.bytes_received(rank),
                        "source bytes held": sum(p.nbytes for p in plan.sources if p.rank == rank),
                        "destination bytes": sum(p.nbytes for p in plan.targets if p.rank == rank),
                        "model bytes": sum(p.numel() * p.element_size() for p in src_params),
                        "started different": not torch.equal(before, src_logits),
                        "params equal": len(params) == len(src_params) and all(map(torch.equal, params, src_params)),
                        "logits equal": torch.equal(logits, src_logits),
                        "partition groups": sorted({support.ranks(p.ds_process_group) for p in dst.module.parameters()
                                                    if hasattr(p, "ds_process_group")}),
                    }
                    # the rollout's own forward, one more actor step, the next reshard: the engine's
                    # forward (whole ZeRO-3 parameters kept between forwards) sees the new weights
                    with state.activate(), torch.no_grad():
                        dst(input_ids=_tokens())
                    train()
                    src_params, src_logits = _full(actor)
                    sp.reshard(actor, a, dst, state)
                    with state.activate(), torch.no_grad():
                        out[name]["second reshard, engine forward equal"] = torch.equal(dst(input_ids=_tokens()).logits, src_logits)
                    if stage == 0:
                        # a destination tensor changes dtype after planning: the cached plan is not used,
                        # and the new plan is refused on every rank (a dtype change is not a reshard)
                        norm = dst.module.model.norm.weight
                        kept = norm.data
                        norm.data = kept.double()
                        try:
                            sp.reshard(actor, a, dst, state)
                            out["changed dtype error"] = None
                        except sp.ReshardError as err:
                            out["changed dtype error"] = str(err)
                        try:  # the old plan handed in explicitly: refused, nothing moved
                            sp.reshard(actor, a, dst, state, plan=plan)
                            out["stale given plan error"] = None
                        except sp.ReshardError as err:
                            out["stale given plan error"] = str(err)
                        norm.data = kept
                    if stage == 0:
                        out["bf16"] = _cast_cases(rank, actor, a, b, out[name]["sent"])
                    if stage == 3 and offloaded:
                        out[name]["offload config"] = str(dst.zero_offload_param())
                    if stage == 3 and not offloaded:
                        out[name]["staging"] = plan.staging.get(rank)
                        # sabotage 1: a swapped shard runs (the plan checks pass) and the weights come out wrong
                        sp.reshard(actor, a, dst, state, plan=_swap(plan) if rank == 0 else plan)
                        out["swapped shard params equal"] = all(map(torch.equal, _full(dst)[0], src_params))
                        # sabotage 2: the state the destination was not built in
                        kept = _full(dst)[0]
                        try:
                            sp.reshard(actor, a, dst, b)
                            out["wrong state error"] = None
                        except sp.ReshardError as err:
                            out["wrong state error"] = str(err)
                        out["wrong state untouched"] = all(map(torch.equal, _full(dst)[0], kept))
                        # the cache: one entry per pair of states, gone from both when one is destroyed
                        out["cache entries before destroy"] = len(a.adapter_record("reshard", lambda s: None).entries)
                        support.drop(dst)
                        engines.remove(dst)
                        c.destroy()
                        out["cache entries after destroy"] = len(a.adapter_record("reshard", lambda s: None).entries)
        finally:
            support.drop(*engines)
            support.destroy(a, b, c, d)
    return out


@pytest.fixture(scope="module")
def reshards(world):
    return world.run(_rank_reshards, timeout=WORLD_TIMEOUT)


pytestmark = [pytest.mark.world, pytest.mark.slow]
CASES = ("ZeRO-3 SP=2xDP=2 -> ZeRO-0 SP=4", "ZeRO-3 SP=2xDP=2 -> ZeRO-3 DP=2", "ZeRO-3 SP=2xDP=2 -> ZeRO-3 DP=2, parameters offloaded")


@pytest.mark.parametrize("case", CASES)
def test_resharded_destination_equals_the_actor_bit_for_bit(reshards, case):
    """Every destination parameter and the logits equal the trained actor's, bit for bit."""
    for rank, out in enumerate(reshards):
        got = out[case]
        assert got["backend"] == "flat", got["backend"]
        assert got["started different"], f"rank {rank} {case}: the destination started equal to the actor"
        assert got["params equal"], f"rank {rank} {case}: destination parameters differ from the actor's"
        assert got["logits equal"], f"rank {rank} {case}: destination logits differ from the actor's"


@pytest.mark.parametrize("case", CASES)
def test_plan_predicts_the_bytes_sent_and_covers_every_element(reshards, case):
    for rank, out in enumerate(reshards):
        got = out[case]
        assert got["problems"] == [], f"rank {rank} {case}: {got['problems']}"
        assert got["sent"] == got["predicted"], f"rank {rank} {case}: sent {got['sent']}, plan said {got['predicted']}"
        assert got["cached"], f"rank {rank} {case}: reshard planned again after plan_reshard"


def test_a_bf16_destination_of_an_fp32_zero3_actor_gets_the_cast_weights_and_half_the_bytes(reshards):
    """``dtype=torch.bfloat16``: the plain bf16 module's parameters equal the actor's
    ``.to(torch.bfloat16)`` bit for bit (a cast is deterministic, wherever it runs); the
    senders convert, so each rank sends what the plan predicts, exactly half the bytes of the
    fp32 replica of the same layout (the ZeRO-0 case, state B); the report names the casts;
    a mapping naming every parameter is another cache entry with the same transfers. The
    same into an fp16 module, the cast asked by a function of the name: fp16 values, the
    same bytes as bf16."""
    for rank, out in enumerate(reshards):
        got = out["bf16"]
        assert got["problems"] == [], f"rank {rank}: {got['problems']}"
        assert got["started different"], f"rank {rank}: the destination started equal to the cast actor"
        assert got["params"], f"rank {rank}: destination parameters differ from the actor's .to(bfloat16)"
        assert got["sent"] == got["predicted"], f"rank {rank}: sent {got['sent']}, plan said {got['predicted']}"
        assert got["sent"] and {d: 2 * n for d, n in got["sent"].items()} == got["fp32 sent"], (
            f"rank {rank}: bf16 sent {got['sent']}, fp32 sent {got['fp32 sent']} (expected half)")
        assert got["cached"] and got["other cast cached apart, same transfers"], f"rank {rank}: {got}"
        assert "casts on the sending side" in got["report"] and "torch.bfloat16" in got["report"], got["report"]
        assert got["fp16 params"] and got["fp16 sent"] == got["sent"], f"rank {rank}: fp16 by a function: {got['fp16 sent']}, {got['fp16 params']}"


def test_a_dtype_change_without_dtype_or_to_another_dtype_is_refused_and_moves_nothing(reshards):
    """fp32 into bf16 without ``dtype=``: refused on every rank, naming a tensor, both dtypes
    and the fix; ``dtype=torch.float16`` into a bf16 destination: refused (the cast target
    must be the destination's dtype). The destination is untouched by both."""
    for rank, out in enumerate(reshards):
        got = out["bf16"]
        error = got["no dtype error"]
        assert error is not None and "'lm_head.weight'" in error and "torch.float32" in error and "torch.bfloat16" in error \
            and "dtype=torch.bfloat16" in error, f"rank {rank}: {error}"
        wrong = got["wrong target error"]
        assert wrong is not None and "casts to torch.float16" in wrong and "must be the destination's dtype" in wrong, f"rank {rank}: {wrong}"
        assert got["refused untouched"], f"rank {rank}: the destination changed although the reshard was refused"


def test_layouts_are_the_ones_described(reshards):
    """The actor is partitioned over the 4 ranks, the ZeRO-3 destination over rank pairs."""
    for rank, out in enumerate(reshards):
        assert out["actor partition groups"] == [(0, 1, 2, 3)], out["actor partition groups"]
        pair = (0, 2) if rank % 2 == 0 else (1, 3)
        assert out[CASES[1]]["partition groups"] == [pair], f"rank {rank}: {out[CASES[1]]['partition groups']}, expected [{pair}]"
        offloaded = out[CASES[2]]
        assert offloaded["partition groups"] == [pair], f"rank {rank}: {offloaded['partition groups']}, expected [{pair}]"
        assert "device='cpu'" in offloaded["offload config"], f"rank {rank}: offload_param not in effect: {offloaded['offload config']}"


def test_zero3_source_is_never_gathered_and_zero3_destination_gets_only_its_partition(reshards):
    """Each rank sends from its quarter of the actor and receives at most its half of the
    ZeRO-3 destination (less what it holds already); no staging buffer."""
    for rank, out in enumerate(reshards):
        got = out[CASES[1]]
        model = got["model bytes"]
        assert got["source bytes held"] <= model // 4 + 4096, f"rank {rank}: holds {got['source bytes held']} of {model} source bytes"
        assert got["destination bytes"] <= model // 2 + 4096, f"rank {rank}: fills {got['destination bytes']} of {model} bytes"
        assert 0 < got["received"] < got["destination bytes"], f"rank {rank}: received {got['received']}"
        assert got["staging"] == 0, f"rank {rank}: staging {got['staging']}"
        full = out[CASES[0]]
        assert full["received"] == model - full["source bytes held"], f"rank {rank}: a whole replica receives all it does not hold"


def test_a_swapped_shard_gives_other_weights(reshards):
    """The equality check can fail: rank 0's part of the plan with two of its receives
    swapped runs and the weights differ (on the ranks of the replica rank 0 belongs to: the
    reference is two ZeRO-3 replicas, over ranks {0, 2} and {1, 3})."""
    seen = [out["swapped shard params equal"] for out in reshards]
    assert seen.count(False) == 2, f"per rank, destination equal to the actor after the swap: {seen} (expected one replica's two ranks False)"


def test_a_wrong_destination_state_raises_on_every_rank_and_moves_nothing(reshards):
    for rank, out in enumerate(reshards):
        error = out["wrong state error"]
        assert error is not None and "no group of ParallelState 'rollout'" in error, f"rank {rank}: {error}"
        assert out["wrong state untouched"], f"rank {rank}: the destination changed although the reshard was refused"


def test_the_plan_cache_leaves_both_states_when_one_is_destroyed(reshards):
    for rank, out in enumerate(reshards):
        assert (out["cache entries before destroy"], out["cache entries after destroy"]) == (2, 1), (
            f"rank {rank}: actor cache entries before/after destroying the reference state: "
            f"{out['cache entries before destroy']}, {out['cache entries after destroy']} (expected 2, 1)"
        )


@pytest.mark.parametrize("case", CASES)
def test_a_second_reshard_after_a_destination_forward_reaches_the_engines_forward(reshards, case):
    """With DeepSpeed's default persistence threshold the ZeRO-3 destination keeps its
    (small) parameters whole after its first forward; the next reshard updates those whole
    copies too: the engine's own forward equals the actor's logits bit for bit."""
    for rank, out in enumerate(reshards):
        assert out[case]["second reshard, engine forward equal"], f"rank {rank} {case}: the engine's forward after the second reshard differs"


def test_a_tensor_that_changed_after_planning_is_not_resharded_with_the_stale_plan(reshards):
    """A destination tensor upcast after the plan was made: every rank sees the cached plan
    no longer matches, plans again, and the new plan is refused (dtype) on every rank."""
    for rank, out in enumerate(reshards):
        error = out["changed dtype error"]
        assert error is not None and "'model.norm.weight'" in error and "converts dtypes only when asked" in error, f"rank {rank}: {error}"
        stale = out["stale given plan error"]
        assert stale is not None and "does not match the models as they are now" in stale, f"rank {rank}: {stale}"


# ---------------------------------------------------------------- no stale reads (ZeRO-3 in flight / whole)

def _rank_stale_zero3(rank: int) -> dict[str, Any]:
    """The trained actor resharded into a ZeRO-3 destination (DP=2, nothing persistent) whose
    parameters are not simply partitioned when the reshard starts:

    * "in flight": an all-gather of every destination parameter dispatched and registered in
      the module's ``ds_inflight_param_registry``, as the prefetcher leaves it (status INFLIGHT);
    * "whole": inside ``deepspeed.zero.GatheredParameters`` (status AVAILABLE, no ``ds_persist``).

    Each case runs with the reshard as it is and with ``zero_reshard._status`` answering
    NOT_AVAILABLE (sabotage: nothing counts as in flight or whole, as before the fix)."""
    import deepspeed

    import scoped_parallel as sp
    from scoped_parallel.adapters import zero_reshard

    out: dict[str, Any] = {}
    kept = zero_reshard._status
    with support.isolated():
        a = support.state(name="actor", sequence_parallel_size=2)
        c = support.state(name="reference", tensor_model_parallel_size=2)
        engines: list[Any] = []
        try:
            with support.installed():
                actor = _engine(a, 1, stage=3, train=True)
                engines.append(actor)
                with a.activate():
                    actor.backward(actor(input_ids=_tokens()).logits.float().pow(2).mean())
                    actor.step()
                src_params, src_logits = _full(actor)
                for sabotage in (False, True):
                    key = " (sabotage)" if sabotage else ""
                    # in flight
                    dst = _engine(c, 2, stage=3, train=False)
                    engines.append(dst)
                    params = list(dst.module.parameters())
                    with c.activate():
                        handle = params[0].all_gather_coalesced(params)
                    registry = dst.module.ds_inflight_param_registry
                    for p in params:
                        registry[p] = handle
                    before = sorted({p.ds_status.name for p in params})
                    if sabotage:
                        zero_reshard._status = lambda param: "NOT_AVAILABLE"
                    sp.reshard(actor, a, dst, c)
                    zero_reshard._status = kept
                    after = sorted({p.ds_status.name for p in params})
                    handle.wait()  # what the coordinator does when the module runs (a no-op once waited)
                    whole = [p.data.detach().clone() for p in params]
                    with c.activate(), torch.no_grad():
                        logits = dst(input_ids=_tokens()).logits
                    out["in flight" + key] = {
                        "status before": before, "status after": after,
                        "whole params equal": all(map(torch.equal, whole, src_params)),
                        "engine forward equal": torch.equal(logits, src_logits),
                        "resharded partitions equal": all(map(torch.equal, _full(dst)[0], src_params)),
                    }
                    support.drop(dst)
                    engines.remove(dst)
                    # whole, inside GatheredParameters
                    dst = _engine(c, 2, stage=3, train=False)
                    engines.append(dst)
                    params = list(dst.module.parameters())
                    with deepspeed.zero.GatheredParameters(params):
                        before = sorted({p.ds_status.name for p in params})
                        if sabotage:
                            zero_reshard._status = lambda param: "NOT_AVAILABLE"
                        sp.reshard(actor, a, dst, c)
                        zero_reshard._status = kept
                        inside = [p.data.detach().clone() for p in params]
                    out["whole" + key] = {
                        "status before": before,
                        "whole params equal": all(map(torch.equal, inside, src_params)),
                        "resharded partitions equal": all(map(torch.equal, _full(dst)[0], src_params)),
                    }
                    support.drop(dst)
                    engines.remove(dst)
        finally:
            zero_reshard._status = kept
            support.drop(*engines)
            support.destroy(a, c)
    return out


@pytest.fixture(scope="module")
def stale_reshards(world):
    return world.run(_rank_stale_zero3, timeout=WORLD_TIMEOUT)


def test_a_destination_gather_in_flight_is_waited_for_and_lands_the_resharded_weights(stale_reshards):
    """A prefetch in flight when the reshard starts would land the old weights afterwards (the
    gather read the partitions before the reshard wrote them): the reshard waits for it, then
    gathers the resharded partitions into the whole parameters; nothing is left in flight."""
    for rank, out in enumerate(stale_reshards):
        got = out["in flight"]
        assert got["status before"] == ["INFLIGHT"], f"rank {rank}: {got['status before']}"
        assert got["status after"] == ["AVAILABLE"], f"rank {rank}: {got['status after']}"
        assert got["whole params equal"] and got["resharded partitions equal"], f"rank {rank}: {got}"
        assert got["engine forward equal"], f"rank {rank}: the engine's forward after the reshard differs"


def test_a_whole_destination_parameter_ends_with_the_resharded_weights(stale_reshards):
    """Inside GatheredParameters (AVAILABLE, not persistent) the whole parameters are
    refreshed from the resharded partitions, not left at the old weights."""
    for rank, out in enumerate(stale_reshards):
        got = out["whole"]
        assert got["status before"] == ["AVAILABLE"], f"rank {rank}: {got['status before']}"
        assert got["whole params equal"] and got["resharded partitions equal"], f"rank {rank}: {got}"


def test_without_waiting_and_refreshing_the_whole_parameters_are_stale(stale_reshards):
    """The checks can fail: with nothing counted as in flight or whole (sabotage) the
    partitions are resharded but the whole parameters hold the old weights in both cases.
    (The engine's own next forward is right even then: its start drains the registry and
    gathers again; what reads the whole parameters before it gets the old weights.)"""
    for rank, out in enumerate(stale_reshards):
        for case in ("in flight (sabotage)", "whole (sabotage)"):
            got = out[case]
            assert got["resharded partitions equal"], f"rank {rank} {case}: {got}"
            assert not got["whole params equal"], f"rank {rank} {case}: the whole parameters were refreshed anyway"
