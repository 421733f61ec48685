"""Reshard between states on other, partial and overlapping rank sets of one world (4 gloo ranks).

The actor is a tiny ``LlamaForCausalLM`` under DeepSpeed ZeRO-2 on ranks 0-1 only (a state
of 2 ranks; every rank holds whole weights), trained one step; ranks 2-3 never build it.
(A ZeRO-3 engine cannot live on part of the world: DeepSpeed 0.19.8's stage-3 optimizer
calls a barrier over the whole world while it builds its partitions. The ZeRO-3 case below
is an actor on all 4 ranks into a rollout on 2 of them.) Rollout copies are plain Hugging
Face modules (a whole replica per rank):

* on ranks 2-3 (disjoint from the actor);
* on rank 2 alone (rank 3 belongs to neither state and never calls: nothing it would have
  to join exists);
* on ranks 1-2 (overlapping the actor on rank 1), in bf16 with ``dtype=torch.bfloat16``;
* from a ZeRO-3 actor partitioned over all 4 ranks, on ranks 2-3 only (each rollout rank
  gets every partition, ranks 0-1 only send).

Every rollout parameter must equal the actor's (gathered with DeepSpeed's
``GatheredParameters`` and broadcast) bit for bit. A rollout of another architecture is
refused on every participant, nothing moved, no rank left waiting.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import _adapter_deepspeed_support as support  # noqa: E402
from _reshard_deepspeed import actor_weights, llama, trained_actor  # noqa: E402

pytestmark = [pytest.mark.world, pytest.mark.slow]
def rank_disjoint_reshards(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    import scoped_parallel as sp

    out: dict[str, Any] = {}
    with support.isolated():
        actor_state = support.state(name="actor", world_size=2, rank_offset=0)
        wide_state = support.state(name="zero3-actor")
        apart = support.state(name="rollout-apart", world_size=2, rank_offset=2)
        alone = support.state(name="rollout-alone", world_size=1, rank_offset=2)
        overlap = support.state(name="rollout-overlap", world_size=2, rank_offset=1)
        actor = wide = None
        try:
            with support.installed():
                actor = trained_actor(actor_state, 2) if rank < 2 else None
                expected = actor_weights(actor, 0)

                def check(name: str, state: Any, dtype: Any = None, src: Any = actor, src_state: Any = actor_state,
                          want: Any = expected) -> None:
                    rollout = llama(2) if state.is_member else None
                    if rollout is not None and dtype is not None:
                        rollout = rollout.to(dtype)
                    if src_state.is_member or state.is_member:
                        plan = sp.plan_reshard(src, src_state, rollout, state, dtype=dtype)
                        done = sp.reshard(src, src_state, rollout, state, dtype=dtype)
                        out[name] = {"problems": plan.problems(), "sent": done.sent, "gathers": len(plan.gathers),
                                     "predicted": {d: n for (s, d), n in plan.bytes_between().items() if s == rank},
                                     "participants": plan.participants, "called": True}
                    else:
                        out[name] = {"called": False}
                    if rollout is not None:
                        cast = [w.to(dtype) if dtype is not None else w for w in want]
                        got = list(rollout.parameters())
                        out[name]["equal"] = len(got) == len(cast) and all(map(torch.equal, got, cast))
                    dist.barrier()  # the next case starts together (the test's own sync, not the reshard's)

                check("apart", apart)
                check("alone", alone)
                check("overlap bf16", overlap, torch.bfloat16)
                src = actor
                wide = trained_actor(wide_state, 3)
                check("zero3 into ranks 2-3", apart, src=wide, src_state=wide_state, want=actor_weights(wide, 0))
                # another architecture on the rollout ranks: refused on every participant
                if rank < 2 or apart.is_member:
                    try:
                        sp.reshard(src, actor_state, llama(2, hidden=16) if apart.is_member else None, apart)
                        out["other architecture"] = None
                    except sp.ReshardError as err:
                        out["other architecture"] = str(err)
                # a rank in neither state: refused there, before any collective
                if rank == 3:
                    try:
                        sp.reshard(None, actor_state, None, overlap)
                        out["outsider"] = None
                    except sp.ReshardError as err:
                        out["outsider"] = str(err)
                dist.barrier()
        finally:
            support.drop(actor, wide)
            support.destroy(actor_state, wide_state, apart, alone, overlap)
    return out


@pytest.fixture(scope="module")
def reshards(world):
    return world.run(rank_disjoint_reshards, timeout=600.0)


CASES = [("apart", (0, 1), (2, 3)), ("alone", (0, 1), (2,)), ("overlap bf16", (0, 1), (1, 2)),
         ("zero3 into ranks 2-3", (0, 1, 2, 3), (2, 3))]


@pytest.mark.parametrize("case, actor, members", CASES)
def test_a_rollout_on_other_ranks_gets_the_actor_bit_for_bit(reshards, case, actor, members):
    for rank, out in enumerate(reshards):
        got = out[case]
        participants = tuple(sorted({*actor, *members}))
        assert got["called"] == (rank in participants), f"rank {rank} {case}: called={got['called']}"
        if not got["called"]:
            continue
        assert got["participants"] == participants, f"rank {rank} {case}: participants {got['participants']}, expected {participants}"
        assert got["problems"] == [], f"rank {rank} {case}: {got['problems']}"
        assert got["sent"] == got["predicted"], f"rank {rank} {case}: sent {got['sent']}, plan said {got['predicted']}"
        if rank in members:
            assert got["equal"], f"rank {rank} {case}: the rollout's parameters differ from the actor's"


def test_a_rank_in_neither_state_sends_nothing(reshards):
    """Rank 3 is in no state of the "alone" case; no rank sends to it there."""
    for rank, out in enumerate(reshards):
        if out["alone"]["called"]:
            assert 3 not in out["alone"]["sent"], f"rank {rank} sent to rank 3: {out['alone']['sent']}"


def test_another_architecture_is_refused_on_every_participant(reshards):
    for rank, out in enumerate(reshards):
        error = out["other architecture"]
        assert error is not None and "nothing was moved" in error and "model.embed_tokens.weight" in error, f"rank {rank}: {error}"


def test_a_rank_in_neither_state_is_refused_alone(reshards):
    error = reshards[3]["outsider"]
    assert error is not None and "neither state" in error, error
