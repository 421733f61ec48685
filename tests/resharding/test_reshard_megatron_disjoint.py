"""Resharding of megatron-core models between states on other, partial and overlapping rank sets
of one world (4 gloo ranks), each rank planning only its own part.

Each case builds megatron-core's own GPTModel only on the ranks of its state (the others
never build it and pass None), reshards with one ``scoped_parallel.reshard`` call made only by
the ranks of either state, and compares the destination's whole weights with the source's
by canonical name, bit for bit (a reshard copies; with ``dtype=torch.bfloat16`` the
destination must hold exactly the source's ``.to(torch.bfloat16)``). Whole weights are
gathered over the world by the test itself, from megatron-core's own partition attributes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from _reshard_megatron import rank_disjoint_reshards  # noqa: E402

pytestmark = [pytest.mark.world, pytest.mark.slow]

CASES = {
    # name: (source layout, destination layout, model options[, dtype]); "ranks": (first rank, count)
    "TP=2 on 0-1 -> TP=2 on 2-3": ({"tp": 2, "ranks": (0, 2)}, {"tp": 2, "ranks": (2, 2)}, {}),
    "TP=2 on 0-1 -> TP=1 x DP=2 on 2-3": ({"tp": 2, "ranks": (0, 2)}, {"ranks": (2, 2)}, {}),
    "TP=2 on 0-1 -> TP=1 on rank 2 alone": ({"tp": 2, "ranks": (0, 2)}, {"ranks": (2, 1)}, {}),
    "PP=2 on 0-1 -> TP=2 on 2-3": ({"pp": 2, "ranks": (0, 2)}, {"tp": 2, "ranks": (2, 2)}, {}),
    "tied embeddings PP=2 on 0-1 -> PP=1 on 2-3": ({"pp": 2, "ranks": (0, 2)}, {"ranks": (2, 2)}, {"tied": True}),
    "TP=2 x PP=2 on 0-3 -> TP=2 on 2-3": ({"tp": 2, "pp": 2}, {"tp": 2, "ranks": (2, 2)}, {}),
    "MoE EP=2 on 0-1 -> EP=1 on 2-3": ({"ep": 2, "ranks": (0, 2)}, {"ranks": (2, 2)}, {"experts": 4}),
    "TP=2 on 0-1 -> bf16 TP=2 on 1-2 (dtype=torch.bfloat16)": ({"tp": 2, "ranks": (0, 2)}, {"tp": 2, "ranks": (1, 2)}, {}, torch.bfloat16),
    "TP=2 on 0-1 -> TP=1 x DP=2 on 0-1 (all-gathers)": ({"tp": 2, "ranks": (0, 2)}, {"ranks": (0, 2)}, {}),
    "TP=2 on 0-1 -> two copies in one call: TP=1 on rank 2, TP=1 on rank 3": (
        {"tp": 2, "ranks": (0, 2)}, [{"ranks": (2, 1)}, {"ranks": (3, 1)}], {}),
    "sabotage: 2-layer destination on 2-3": ({"tp": 2, "ranks": (0, 2)}, {"tp": 2, "ranks": (2, 2)}, {"other architecture": True}),
}


def _ranks(layout: dict | list) -> set[int]:
    if isinstance(layout, list):  # several destination copies
        return set().union(*(_ranks(one) for one in layout))
    first, count = layout.get("ranks", (0, 4))
    return set(range(first, first + count))


@pytest.fixture(scope="module")
def reshards(world):
    return world.run(rank_disjoint_reshards, CASES, timeout=600.0)


@pytest.mark.parametrize("case", [name for name in CASES if not name.startswith("sabotage")])
def test_the_destination_holds_the_sources_weights_bit_for_bit(reshards, case):
    src, dst = CASES[case][:2]
    for rank, out in enumerate(reshards):
        got = out[case]
        # the ranks of the reshards this rank takes part in (several copies: the source's and each copy's it joins)
        copies = [c for c in (dst if isinstance(dst, list) else [dst]) if rank in _ranks(src) | _ranks(c)]
        participants = tuple(sorted(_ranks(src).union(*(_ranks(c) for c in copies)))) if copies else ()
        participants = participants or tuple(sorted(_ranks(src) | _ranks(dst)))
        assert got["called"] == (rank in participants), f"rank {rank} {case}: called={got['called']}, participants {participants}"
        assert got["equal"], f"rank {rank} {case}: the destination's {got['names']} weights differ from the source's"
        if not got["called"]:
            continue
        assert got["error"] is None, f"rank {rank} {case}: {got['error']}"
        assert got["participants"] == participants, f"rank {rank} {case}: participants {got['participants']}, expected {participants}"
        assert got["problems"] == [], f"rank {rank} {case}: {got['problems']}"
        assert got["sent"] == got["predicted"], f"rank {rank} {case}: sent {got['sent']}, plan said {got['predicted']}"
        assert not set(got["sent"]) - set(participants), f"rank {rank} {case}: sent to {got['sent']} outside {participants}"


def test_several_copies_in_one_call_run_one_reshard_per_copy_on_their_ranks(reshards):
    """Ranks 0-1 (the source) take part in both copies' reshards, ranks 2 and 3 in their own only."""
    want = {0: 2, 1: 2, 2: 1, 3: 1}
    for rank, out in enumerate(reshards):
        got = out["TP=2 on 0-1 -> two copies in one call: TP=1 on rank 2, TP=1 on rank 3"]
        assert got["calls"] == want[rank], f"rank {rank}: took part in {got['calls']} reshards, expected {want[rank]}"


def test_the_whole_table_is_gathered_on_demand_and_checks_every_rank(reshards):
    """``whole_plan`` joins every rank's part: one table, the same on every participant, its
    coverage check passing over every rank, its bytes the sum of what the ranks sent."""
    case = "TP=2 x PP=2 on 0-3 -> TP=2 on 2-3"
    sent = sum(sum(out[case]["sent"].values()) for out in reshards)
    for rank, out in enumerate(reshards):
        whole = out[case]["whole"]
        assert whole["problems"] == [], f"rank {rank}: {whole['problems']}"
        assert whole["ranks"] == (0, 1, 2, 3), f"rank {rank}: the whole table covers ranks {whole['ranks']}"
        assert whole["bytes"] == sent, f"rank {rank}: the table moves {whole['bytes']} bytes, the ranks sent {sent}"
        assert whole["report"] == reshards[0][case]["whole"]["report"], f"rank {rank}: another table than rank 0's"


def test_replicas_on_other_ranks_are_relayed(reshards):
    """TP=2 on ranks 0-1 into TP=1 replicas on 2-3: each column-parallel tensor reaches the
    replicas as one half each from its holder, then an all-gather between ranks 2 and 3."""
    for rank in (2, 3):
        got = reshards[rank]["TP=2 on 0-1 -> TP=1 x DP=2 on 2-3"]
        assert got["gathers"] > 0, f"rank {rank}: no relay all-gather in the plan"


def test_column_parallel_tensors_into_replicas_on_their_own_ranks_are_all_gathered(reshards):
    for rank in (0, 1):
        got = reshards[rank]["TP=2 on 0-1 -> TP=1 x DP=2 on 0-1 (all-gathers)"]
        assert got["gathers"] > 0, f"rank {rank}: no all-gather in the plan"


def test_another_architecture_is_refused_on_every_participant_and_moves_nothing(reshards):
    for rank, out in enumerate(reshards):
        got = out["sabotage: 2-layer destination on 2-3"]
        if not got["called"]:
            assert rank not in (0, 1, 2, 3), f"rank {rank} did not call"
            continue
        error = got["error"]
        assert error is not None and "decoder.layers.2" in error and "another architecture" in error and "nothing was moved" in error, \
            f"rank {rank}: {error}"
        if rank in (2, 3):
            assert got["untouched"], f"rank {rank}: the destination changed although the reshard was refused"
