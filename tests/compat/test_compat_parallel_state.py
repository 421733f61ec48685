"""Tier 1 (pure, no distributed): ``scoped_parallel.compat.parallel_state``, the PR's ``deepspeed.utils.parallel_state``.

The rank lists of ``RankGenerator`` are checked against megatron-core's own
``RankGenerator`` (the PR's is Megatron's plus an ``sp`` axis) for every order of the
tokens and every size split of small worlds; the PR-shape names are the wrapper module's.
"""

from __future__ import annotations

import itertools

import pytest

from scoped_parallel.compat import parallel_state as cps
from scoped_parallel.compat import parallel_state_wrappers as ps
from scoped_parallel.errors import LayoutError


def _splits(world: int, parts: int):
    """Every way to write ``world`` as a product of ``parts`` positive factors (in order)."""
    if parts == 1:
        yield (world,)
        return
    for first in range(1, world + 1):
        if world % first == 0:
            for rest in _splits(world // first, parts - 1):
                yield (first, *rest)


def _megatron_generator():
    return pytest.importorskip("megatron.core.parallel_state").RankGenerator


@pytest.mark.parametrize("world_size", [4, 8, pytest.param(12, marks=pytest.mark.slow)])
def test_rank_lists_equal_megatron_cores_rank_generator(world_size):
    """Every token order and size split: every kind's groups equal megatron-core's, rank_offset included."""
    megatron = _megatron_generator()
    checked = 0
    for tp, ep, dp, pp, cp in _splits(world_size, 5):
        if ep > 1 and cp > 1:
            continue
        for order in itertools.permutations(["tp", "cp", "ep", "dp", "pp"]):
            order_s = "-".join(order)
            ours = cps.RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, sp=1, order=order_s, rank_offset=3)
            theirs = megatron(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order_s, rank_offset=3)
            for r in range(1, 4):
                for kind in itertools.combinations(order, r):
                    token = "-".join(kind)
                    assert ours.get_ranks(token) == theirs.get_ranks(token), (
                        f"tp={tp} ep={ep} dp={dp} pp={pp} cp={cp} order={order_s} token={token}: "
                        f"ours {ours.get_ranks(token)}, megatron {theirs.get_ranks(token)}"
                    )
                    checked += 1
    assert checked > 1000, checked


def test_masked_groups_worked_example():
    """tp-dp-pp on 8 ranks, dp masked: the docstring's example."""
    got = cps.generate_masked_orthogonal_rank_groups(8, [2, 2, 2], [False, True, False])
    assert got == [[0, 2], [1, 3], [4, 6], [5, 7]], got


def test_sp_axis_is_one_more_orthogonal_axis():
    """sp=2 with dp=2 (order sp-dp): SP groups are consecutive ranks, DP groups stride 2."""
    gen = cps.RankGenerator(tp=1, ep=1, dp=2, pp=1, cp=1, sp=2, order="sp-dp")
    assert (gen.get_ranks("sp"), gen.get_ranks("dp"), gen.get_ranks("sp-dp")) == (
        [[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 1, 2, 3]]
    )


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(tp=2, ep=2, dp=1, pp=1, cp=2, sp=1, order="tp-cp-ep-dp-pp"), "ep=2 and cp=2"),
        (dict(tp=2, ep=1, dp=2, pp=1, cp=1, sp=1, order="tp-pp"), "['dp']"),
        (dict(tp=0, ep=1, dp=2, pp=1, cp=1, sp=1, order="tp-dp"), "tp=0"),
        (dict(tp=2, ep=1, dp=2, pp=1, cp=1, sp=1, order="tp-xp-dp"), "'xp'"),
        (dict(tp=2, ep=1, dp=2, pp=1, cp=1, sp=1, order="tp-dp-tp"), "at most once"),
    ],
)
def test_bad_generator_arguments_name_the_value(kwargs, needle):
    """Bad sizes or orders: LayoutError naming the value, nothing built."""
    with pytest.raises(LayoutError) as info:
        cps.RankGenerator(**kwargs)
    assert needle in str(info.value), str(info.value)


def test_bad_masked_group_arguments_name_the_value():
    """A world that is not the product of the sizes, or a mask of another length."""
    with pytest.raises(LayoutError, match=r"world_size 6 is not the product"):
        cps.generate_masked_orthogonal_rank_groups(6, [2, 2], [True, False])
    with pytest.raises(LayoutError, match=r"one entry per size"):
        cps.generate_masked_orthogonal_rank_groups(4, [2, 2], [True])


def test_pr_shape_names_are_the_wrapper_modules():
    """ParallelState is the wrappers' class; get_parallel_state() is the default instance."""
    assert cps.ParallelState is ps.ParallelState is ps.ParallelStateInstance
    assert cps.get_parallel_state() is ps.get_parallel_state_instance(None)
    fresh = cps.ParallelState()
    assert (fresh.name, fresh.is_initialized()) == (None, False)


def test_refusals_are_the_prs_exception_types_before_any_group():
    """CP > 1, hierarchical CP: NotImplementedError (and LayoutError), raised before torch.distributed is touched."""
    instance = ps.ParallelState()
    for kwargs, needle in (
        (dict(context_parallel_size=2), "does not support context_parallel_size=2"),
        (dict(hierarchical_context_parallel_sizes=[2, 2]), "does not support hierarchical_context_parallel_sizes"),
        (dict(num_distributed_optimizer_instances=2), "does not support num_distributed_optimizer_instances=2"),
    ):
        with pytest.raises(NotImplementedError, match=needle) as info:
            instance.initialize_model_parallel(**kwargs)
        assert isinstance(info.value, LayoutError), type(info.value).__mro__
        assert not instance.is_initialized()
    with pytest.raises(AssertionError, match="not initialized") as info:
        instance.get_tensor_model_parallel_world_size()
    assert isinstance(info.value, ps.ParallelStateNotInitializedError), type(info.value)
