"""Reshard between two states' layouts, megatron-core models (4 gloo ranks).

Each case builds megatron-core's own GPTModel twice in one process world, in the scopes of
two states with different layouts and different initial weights (no group passed
anywhere), reshards the second from the first with one ``scoped_parallel.reshard`` call,
and compares the destination's full logits (Megatron's forward-only schedule, vocab
shards gathered) with the source's on the same tokens.

Bitwise only where both sides do the same arithmetic on the same shapes: TP and EP
unchanged (PP, VPP, tied embeddings and DP move whole layers or replicas; every matrix
multiply keeps its shape). Within 1e-6 absolute (logits of magnitude ~1; the destination
before the reshard is off by ~0.5) where the layout changes a shape: a TP change makes the
row-parallel layers sum partial products in another order, and an EP change changes how
many tokens each expert's matrix multiply sees, whose last bit then depends on the CPU's
BLAS kernels (seen: 2.98e-8 on an AVX-512 EPYC for EP=4 -> EP=2, 0 on another machine).

The cast case (fp32 source, bf16 ``Float16Module`` destination, ``dtype=torch.bfloat16``)
is judged on the weights: every destination tensor equals the gathered source's
``.to(torch.bfloat16)`` bit for bit (a cast is deterministic, wherever it runs). Its logits
are within 2e-2 of the fp32 source's (seen: 2.3e-3), because the destination computes in
bf16 (8 significant bits: one rounding is ~4e-3 relative at logits of magnitude ~1, and
a layer rounds many times); the destination before the reshard is off by ~0.6.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core.resharding")

from _reshard_megatron import megatron_executor_runs, rank_reshards  # noqa: E402

from scoped_parallel.adapters.megatron_reshard.names import megatron_version  # noqa: E402

CASES = {
    # name: (source layout, destination layout, model options[, sabotage])
    "TP=2 x PP=2 -> TP=4": ({"tp": 2, "pp": 2}, {"tp": 4}, {}),
    "TP=2 x DP=2 -> TP=1 x DP=4": ({"tp": 2}, {"tp": 1}, {}),
    "PP=2 x VPP=2 -> PP=1": ({"pp": 2, "vpp": 2}, {}, {}),
    "PP=2 tied embeddings -> PP=1": ({"pp": 2}, {}, {"tied": True}),
    "PP=1 tied embeddings -> PP=2": ({}, {"pp": 2}, {"tied": True}),
    "SwiGLU TP=2 -> TP=4": ({"tp": 2}, {"tp": 4}, {"swiglu": True}),
    "SwiGLU TP=4 -> TP=1": ({"tp": 4}, {"tp": 1}, {"swiglu": True}),
    "MoE EP=4 -> EP=2": ({"ep": 4}, {"ep": 2}, {"experts": 4}),
    "Float16Module (bf16) TP=2 x PP=2 -> TP=2 x DP=2": ({"tp": 2, "pp": 2}, {"tp": 2}, {"bf16": True}),
    "MoE with biases EP=4 -> EP=2": ({"ep": 4}, {"ep": 2}, {"experts": 4, "expert_bias": True}),
    "MoE with biases TP=2 x EP=2 (expert TP=1) -> TP=1 x EP=4": ({"tp": 2, "ep": 2, "etp": 1}, {"ep": 4}, {"experts": 4, "expert_bias": True}),
    "MoE TP=2 x EP=1 (expert TP=1) -> EP=2": ({"tp": 2, "ep": 1, "etp": 1}, {"ep": 2}, {"experts": 4}),
    "MoE EP=2 -> TP=2 x EP=1 (expert TP=1)": ({"ep": 2}, {"tp": 2, "ep": 1, "etp": 1}, {"experts": 4}),
    "megatron-core's planner and executor (service=): TP=2 x PP=2 -> TP=4": ({"tp": 2, "pp": 2}, {"tp": 4}, {"backend": "megatron-core"}, "service"),
    "megatron-core's planner: MoE with biases EP=4 -> EP=2": ({"ep": 4}, {"ep": 2}, {"experts": 4, "expert_bias": True, "backend": "megatron-core"}),
    "megatron-core's planner: SwiGLU TP=2 x PP=2 -> TP=4": ({"tp": 2, "pp": 2}, {"tp": 4}, {"swiglu": True, "backend": "megatron-core"}),
    "fp32 TP=2 x PP=2 -> bf16 TP=4 (dtype=torch.bfloat16)": ({"tp": 2, "pp": 2}, {"tp": 4}, {"dst_bf16": True}, "cast-bf16"),
    "sabotage: swapped shard": ({"tp": 2}, {"tp": 1}, {}, "swap-shard"),
    "sabotage: wrong destination state": ({"tp": 2}, {"tp": 4}, {}, "wrong-state"),
    "sabotage: 2-layer destination of a 4-layer source": ({"tp": 2}, {"tp": 2}, {}, "other-architecture"),
    "sabotage: SwiGLU planned with the model's own stride": ({"tp": 2}, {"tp": 4}, {"swiglu": True}, "raw-stride"),
    "sabotage: fp32 into bf16 without dtype=": ({"tp": 2}, {"tp": 4}, {"dst_bf16": True}, "uncast"),
}
#: cases whose two sides multiply matrices of the same shapes (TP and EP unchanged): bitwise
SAME_SHAPES = {"PP=2 x VPP=2 -> PP=1", "PP=2 tied embeddings -> PP=1", "PP=1 tied embeddings -> PP=2",
               "Float16Module (bf16) TP=2 x PP=2 -> TP=2 x DP=2"}
TOLERANCE = 1e-6
#: cases whose destination computes in bf16 from fp32 source weights (module doc)
CAST = "fp32 TP=2 x PP=2 -> bf16 TP=4 (dtype=torch.bfloat16)"
BF16_TOLERANCE = 2e-2
SERVICE = "megatron-core's planner and executor (service=): TP=2 x PP=2 -> TP=4"
RUN = {name: case for name, case in CASES.items() if name != SERVICE or megatron_executor_runs()}
RESHARDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        name not in RUN, reason=f"megatron-core {'.'.join(map(str, megatron_version()))}'s executor needs CUDA (torch.cuda.synchronize)"))
    for name in CASES if not name.startswith("sabotage")
]


@pytest.fixture(scope="module")
def reshards(world):
    return world.run(rank_reshards, RUN, timeout=900)


pytestmark = [pytest.mark.world, pytest.mark.slow]


@pytest.mark.parametrize("case", RESHARDS)
def test_resharded_destination_computes_the_source_logits(reshards, case):
    """After one reshard call the destination's logits equal the source's: bitwise where TP and
    EP are unchanged, within 1e-6 where either changes a matrix multiply's shape (module doc)."""
    for rank, out in enumerate(reshards):
        got = out[case]
        assert got["before diff"] > 0.1, f"rank {rank} {case}: the destination started too close to the source ({got['before diff']})"
        if case in SAME_SHAPES:
            assert got["bitwise"], f"rank {rank} {case}: expected bitwise equal logits, max |diff| {got['max diff']}"
        elif case == CAST:
            assert got["max diff"] <= BF16_TOLERANCE, f"rank {rank} {case}: max |logit diff| {got['max diff']}, expected <= {BF16_TOLERANCE}"
        else:
            assert got["max diff"] <= TOLERANCE, f"rank {rank} {case}: max |logit diff| {got['max diff']}, expected <= {TOLERANCE}"


@pytest.mark.parametrize("case", RESHARDS)
def test_plan_predicts_the_bytes_each_rank_sends(reshards, case):
    """The report's bytes per rank pair are the bytes the executor sent, rank by rank."""
    for rank, out in enumerate(reshards):
        got = out[case]
        assert got["sent"] == got["predicted sent"], f"rank {rank} {case}: sent {got['sent']}, plan said {got['predicted sent']}"
        assert got.get("reshard sent", {}) == {}, f"rank {rank} {case}: with service=, ReshardResult.sent should be {{}}, got {got['reshard sent']}"


@pytest.mark.parametrize("case", RESHARDS)
def test_plan_covers_every_destination_element_once_and_is_cached(reshards, case):
    """The plan passes its coverage check, says so in its report (naming the planner: each
    rank's own part unless the case asks for megatron-core's), and the second plan_reshard is
    the cached plan."""
    for rank, out in enumerate(reshards):
        got = out[case]
        assert got["problems"] == [], f"rank {rank} {case}: {got['problems']}"
        assert "every destination element written exactly once" in got["report"], got["report"]
        planner = "planner: megatron-core megatron.core.resharding" if CASES[case][2].get("backend") == "megatron-core" \
            else "planner: scoped_parallel.resharding.tiled.plan_tiled_local"
        assert planner in got["report"], f"rank {rank} {case}: expected {planner!r} in the report:\n{got['report']}"
        assert got["cached"], f"rank {rank} {case}: plan_reshard planned again for the same pair"


def test_megatron_cores_planner_reads_expert_biases_from_ranks_that_hold_them(reshards):
    """On the ``"megatron-core"`` backend: megatron-core's replicated fallback reads an expert's linear_fc2.bias (not TP-sharded)
    from its dense DP group, i.e. from ranks without that expert when EP changes; the plan
    reroutes those reads to holders and says so. Each expert's bias is its own random vector
    (``build``), so the case's logits test fails if a bias is missed or taken from another expert."""
    for rank, out in enumerate(reshards):
        got = out["megatron-core's planner: MoE with biases EP=4 -> EP=2"]
        assert "whole-tensor reads of expert tensors rerouted" in got["report"] and "linear_fc2.bias" in got["report"], f"rank {rank}: no rerouted reads in the report:\n{got['report']}"


def test_a_cast_reshard_writes_the_sources_bf16_values_and_sends_half_the_bytes(reshards):
    """``dtype=torch.bfloat16`` into a bf16 TP=4 destination: every destination tensor is the
    gathered fp32 source's ``.to(torch.bfloat16)``, bit for bit; the senders convert, so each
    rank sends what the plan predicts (the test above) and exactly half of what the fp32 reshard
    of the same layouts sends (case "TP=2 x PP=2 -> TP=4"); the report names the casts."""
    for rank, out in enumerate(reshards):
        got = out[CAST]
        assert got["weights are the source's .to(bfloat16)"], f"rank {rank}: destination weights are not the source's bf16 values"
        fp32 = out["TP=2 x PP=2 -> TP=4"]["sent"]
        assert {d: 2 * n for d, n in got["sent"].items()} == fp32, f"rank {rank}: bf16 sent {got['sent']}, fp32 sent {fp32}"
        assert "casts on the sending side" in got["report"] and "to torch.bfloat16" in got["report"], got["report"]


def test_a_dtype_change_without_dtype_is_refused_on_every_rank_and_moves_nothing(reshards):
    """fp32 source into a bf16 destination without ``dtype=``: ReshardError on every rank,
    naming the tensors, both dtypes and the fix; the destination is untouched."""
    for rank, out in enumerate(reshards):
        got = out["sabotage: fp32 into bf16 without dtype="]
        error = got["error"]
        assert error is not None and "'decoder.final_layernorm.bias'" in error and "source dtype torch.float32 but destination torch.bfloat16" in error \
            and "pass dtype=torch.bfloat16" in error, f"rank {rank}: {error}"
        assert got["dst untouched"], f"rank {rank}: the destination changed although the reshard was refused"


def test_a_swapped_shard_changes_the_logits(reshards):
    """The comparison can fail: a plan whose two sources into one tensor are swapped passes
    the plan checks and runs, and the destination's logits then differ from the source's."""
    for rank, out in enumerate(reshards):
        got = out["sabotage: swapped shard"]
        assert got["problems"] == [], f"rank {rank}: {got['problems']}"
        assert got["max diff"] > 1e-3, f"rank {rank}: swapped shards gave logits within {got['max diff']} of the source"


def test_a_wrong_destination_state_raises_on_every_rank_and_moves_nothing(reshards):
    """Passing a state the destination was not built in raises ReshardError on every rank
    (naming the group and the tensors), before any transfer: the destination is untouched."""
    for rank, out in enumerate(reshards):
        got = out["sabotage: wrong destination state"]
        assert got["error"] is not None, f"rank {rank}: no error for a wrong destination state"
        assert "pass the state the model was built in" in got["error"] and "word_embeddings" in got["error"], got["error"]
        assert got["dst untouched"], f"rank {rank}: the destination changed although the reshard was refused"


def test_swiglu_needs_partition_stride_two(reshards):
    """The gated fc1 holds [gate, up] per TP rank: planned with partition stride 1 (what
    megatron-core < 0.19 leaves on the parameter) the resharded logits are wrong; the view's
    stride 2 makes them right (case "SwiGLU TP=2 -> TP=4"). From 0.19 on, megatron-core sets 2 itself."""
    for rank, out in enumerate(reshards):
        got = out["sabotage: SwiGLU planned with the model's own stride"]
        if got["model's own fc1 stride"] == 2:
            assert got["max diff"] <= TOLERANCE, f"rank {rank}: megatron-core's own stride 2 gave max |diff| {got['max diff']}"
        else:
            assert got["max diff"] > 1e-3, f"rank {rank}: stride 1 should scramble gate and up, max |diff| {got['max diff']}"


def test_another_architecture_raises_naming_the_tensors_and_moves_nothing(reshards):
    """A 2-layer destination of a 4-layer source (every destination tensor has a source, but
    not the other way round) is refused on every rank, naming the unmatched layers."""
    for rank, out in enumerate(reshards):
        got = out["sabotage: 2-layer destination of a 4-layer source"]
        assert got["error"] is not None and "decoder.layers.2" in got["error"] and "another architecture" in got["error"], f"rank {rank}: {got['error']}"
        assert got["dst untouched"], f"rank {rank}: the destination changed although the reshard was refused"


def test_tp_splits_that_do_not_tile_are_refused_before_planning():
    """Both sides' TP tiles must cut the dimension alike: it must divide into lcm(splits x
    strides) tiles; the check names the tensor and the sizes (no world needed: pure data)."""
    from scoped_parallel.adapters.megatron_reshard.checks import match as _match
    from scoped_parallel.resharding.staged import Held, TensorRow

    def held(ways: int, stride: int) -> dict[str, Held]:
        return {"w": Held(TensorRow("w", (6, 4), "torch.float32", 4, "tp", 0, stride, ways, -1), (), 0)}

    src = held(1, 2)  # split 1 way, stride 2 (SwiGLU)
    assert _match(src, held(3, 2)) == []  # 3 ways x stride 2: 6 | lcm(2, 6) = 6: fine
    problems = _match(src, held(2, 2))  # 2 ways x stride 2 = 4 tiles of 6 rows: no
    assert len(problems) == 1 and "'w'" in problems[0] and "6" in problems[0] and "4 tiles" in problems[0], problems


def test_a_transfer_between_two_tensors_of_other_global_names_is_named():
    """Grouped-GEMM experts share view names across ranks ("...weight0" is expert 0 on one
    rank, expert 2 on another): the pairing check compares global names (pure data)."""
    from scoped_parallel.adapters.megatron_reshard.core import misnamed_transfers as _misnamed
    from scoped_parallel.resharding import Transfer

    t = Transfer(0, 1, "fc2.weight0", "fc2.weight0", ((0, 4),), ((0, 4),), 4)
    got = _misnamed([t], {(0, "fc2.weight0"): "fc2.weight2"}, {(1, "fc2.weight0"): "fc2.weight0"})
    assert got == ["transfer into 'fc2.weight0' on rank 1 reads 'fc2.weight2' on rank 0"], got
    assert _misnamed([t], {(0, "fc2.weight0"): "fc2.weight0"}, {(1, "fc2.weight0"): "fc2.weight0"}) == []


def test_expert_reads_from_a_non_holder_go_to_a_holder_by_global_name():
    """A whole-tensor read of an expert tensor from a rank without it is given a holder of
    the same global name (the destination rank itself where it holds it); other reads and
    non-expert tensors are left as they are (pure data)."""
    from scoped_parallel.adapters.megatron_reshard.core import reroute_replicated as _reroute_replicated
    from scoped_parallel.resharding import Transfer

    name = "layers.0.mlp.experts.local_experts.1.linear_fc2.bias"
    src_global = {(1, name): name, (3, name): name, (0, "layers.0.norm.weight"): "layers.0.norm.weight"}
    dst_global = {(0, name): name, (1, name): name, (2, "layers.0.norm.weight"): "layers.0.norm.weight"}
    shapes = {key: (8,) for key in src_global}
    transfers = [
        Transfer(0, 0, name, name, (), ((0, 8),), 4),  # rank 0 does not hold expert 1: rerouted
        Transfer(2, 1, name, name, (), ((0, 8),), 4),  # rank 2 neither; rank 1 holds it: local copy
        Transfer(0, 2, "layers.0.norm.weight", "layers.0.norm.weight", ((0, 8),), ((0, 8),), 4),  # not an expert
    ]
    moved = _reroute_replicated(transfers, {0, 1, 2}, src_global, dst_global, shapes)
    assert moved == [name, name], moved
    assert [(t.src_rank, t.dst_rank, t.src_box) for t in transfers] == [(1, 0, ((0, 8),)), (1, 1, ((0, 8),)), (0, 2, ((0, 8),))], transfers


def test_expert_tensors_are_recognised_by_name_as_well_as_by_megatrons_marker():
    """megatron-core marks expert tensors ``allreduce=False`` only under EP > 1; with EP=1
    they say True like a dense tensor, so the name decides too (every expert class keeps its
    tensors under the MoE layer's ``experts`` module); shared experts and the router are dense
    (pure data)."""
    import torch

    from scoped_parallel.adapters.megatron_reshard import is_expert

    dense_marker = torch.nn.Parameter(torch.empty(2), requires_grad=False)
    dense_marker.allreduce = True  # what megatron-core 0.16-0.19 sets on an EP=1 expert
    for name in ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",  # SequentialMLP
                 "decoder.layers.1.mlp.experts.weight1",  # GroupedMLP
                 "decoder.layers.1.mlp.experts.linear_fc2.weight5"):  # TEGroupedMLP
        assert is_expert(name, dense_marker), name
    for name in ("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", "decoder.layers.0.mlp.router.weight",
                 "decoder.layers.0.mlp.router.expert_bias", "decoder.layers.0.mlp.linear_fc1.weight"):
        assert not is_expert(name, dense_marker), name
    ep_marker = torch.nn.Parameter(torch.empty(2), requires_grad=False)
    ep_marker.allreduce = False
    assert is_expert("some.renamed.tensor", ep_marker)
