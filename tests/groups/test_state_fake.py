"""Tier 3 (fake backend): group construction at scale, layout and creation counts only.

Proves: a rank creates one group per distinct rank set it belongs to, up to 8,192
ranks; share_groups=False creates one group per kind; the creation count does not
grow with the world size; identical layouts share groups and destroy() frees them;
Megatron creates every group on every rank while a state creates only its own; a
state from a torn-down world never shares its dead groups into a new world.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from scoped_parallel import ParallelLayout, ParallelState
from scoped_parallel.groups import create as _groups
from scoped_parallel.layout import DENSE_KINDS, EXPERT_KINDS
from scoped_parallel.testing import fake_world

MEGATRON_BIG = dict(
    tensor_model_parallel_size=8,
    pipeline_model_parallel_size=8,
    context_parallel_size=2,
    expert_model_parallel_size=8,
)


def _optional(state):
    """Megatron's optional groups the state holds on this rank, by slot."""
    return {slot: state.groups.optional(slot) for slot in state.groups.optional_slots("")}


def _cases():
    yield 8, 5, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    yield 64, 17, dict(tensor_model_parallel_size=4, context_parallel_size=2, expert_model_parallel_size=2)
    yield 512, 300, dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=4, sequence_parallel_size=1)
    yield 1024, 1023, dict(pipeline_model_parallel_size=8, sequence_parallel_size=4, tensor_model_parallel_size=2)
    for rank in (0, 4093, 8191):
        yield 8192, rank, MEGATRON_BIG
        yield 8192, rank, dict(MEGATRON_BIG, expert_tensor_parallel_size=1)


@pytest.mark.parametrize("world_size,rank,sizes", list(_cases()))
def test_rank_creates_only_its_own_distinct_groups(world_size, rank, sizes):
    """A rank creates one group per distinct rank set it belongs to, whatever the world size."""
    with fake_world(world_size, rank):
        before = _groups.creation_count()
        state = ParallelState(**sizes)
        try:
            mine = ParallelLayout(world_size, **sizes).groups_of(rank)
            # plus Megatron's optional groups a state always has (the distributed-optimizer
            # instance group: every rank of the state, a new group only when no kind spans it)
            distinct = set(mine.values()) | {e.ranks for e in _optional(state).values()}
            # a rank set of the whole world is the default group itself: never created again
            world = tuple(range(world_size))
            expected = len(distinct - {world})
            assert _groups.creation_count() - before == expected, (
                f"expected one creation per distinct rank set but the world's ({expected}), "
                f"got {_groups.creation_count() - before}"
            )
            for kind, ranks in mine.items():
                group = state.group(kind)
                assert group.size() == len(ranks) and group.rank() == ranks.index(rank)
        finally:
            state.destroy()


def test_share_groups_false_creates_one_group_per_kind():
    """Without sharing, every kind gets its own group (Megatron's behaviour)."""
    with fake_world(8192, 77):
        before = _groups.creation_count()
        state = ParallelState(share_groups=False, **MEGATRON_BIG)
        try:
            held = state.kinds()
            kind_groups = {id(state.group(k)) for k in held}
            own = {id(e.group) for e in _optional(state).values()} - kind_groups
            expected = len(held) + len(own)  # kinds + Megatron's optional groups of their own
            assert _groups.creation_count() - before == expected, (expected, _groups.creation_count() - before)
            assert set(DENSE_KINDS + EXPERT_KINDS) <= set(held)
        finally:
            state.destroy()


def test_creation_count_does_not_grow_with_world_size():
    """The same per-rank layout costs the same number of group creations at 64 and 8192 ranks."""
    counts = []
    for world_size in (64, 1024, 8192):
        with fake_world(world_size, 3):
            before = _groups.creation_count()
            s = ParallelState(tensor_model_parallel_size=8, pipeline_model_parallel_size=2)
            counts.append(_groups.creation_count() - before)
            s.destroy()
    assert len(set(counts)) == 1, counts


def test_two_states_share_identical_groups_and_destroy_releases_all():
    """An actor and a reference with the same layout share every group; destroy frees them."""
    with fake_world(1024, 10):
        before = _groups.creation_count()
        actor = ParallelState(name="actor", tensor_model_parallel_size=4)
        ref = ParallelState(name="ref", tensor_model_parallel_size=4)
        distinct = set(actor.layout.groups_of(10).values()) - {tuple(range(1024))}  # the world's is the default group
        created = _groups.creation_count() - before
        assert created == len(distinct), f"{created} groups created for two identical states, expected {len(distinct)}"
        assert actor.get_data_parallel_group() is ref.get_data_parallel_group()
        actor.destroy()
        assert _groups.live_groups() > 0
        ref.destroy()
        assert _groups.live_groups() == 0


def test_megatron_creates_every_group_on_every_rank():
    """Megatron's initialize_model_parallel calls new_group for all groups; we create only our own."""
    ps = pytest.importorskip("megatron.core.parallel_state")
    import torch.distributed as dist

    calls = []
    original = dist.new_group

    def counting_new_group(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sizes = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2)
    with fake_world(64, 5):
        dist.new_group = counting_new_group
        try:
            ps.initialize_model_parallel(**sizes, create_gloo_process_groups=False)
        finally:
            dist.new_group = original
            ps.destroy_model_parallel()
        before = _groups.creation_count()
        state = ParallelState(share_groups=False, **sizes)
        ours = _groups.creation_count() - before
        kinds = state.kinds()
        optional = _optional(state)
        kind_groups = {id(state.group(k)) for k in kinds}
        own_optional = len({id(e.group) for e in optional.values()} - kind_groups)  # not equal to a kind
        state.destroy()
    assert ours == len(kinds) + own_optional, (ours, kinds, sorted(optional))
    assert len(calls) > 5 * ours, (len(calls), ours)


def test_state_from_a_destroyed_world_never_shares_into_a_new_one():
    """After the world is torn down without destroy(), a new state gets fresh groups, not dead ones."""
    with fake_world(8, 1):
        old = ParallelState(tensor_model_parallel_size=2)
        old_dp = old.get_data_parallel_group()
    assert _groups.live_groups() == 0  # torch dropped them with the world; so do we
    with fake_world(8, 1):
        new = ParallelState(tensor_model_parallel_size=2)
        try:
            assert new.get_data_parallel_group() is not old_dp
        finally:
            new.destroy()
    old.destroy()  # harmless afterwards


@pytest.mark.parametrize("rank", [0, 40_000, 65_535])
def test_no_world_sized_group_is_built_at_65536_ranks(rank):
    """tp8 pp8 cp2 ep8 at 65,536 ranks: the state's world-sized groups are the default group itself."""
    sizes = dict(MEGATRON_BIG, tensor_model_parallel_size=8)
    with fake_world(65_536, rank):
        before = _groups.creation_count()
        state = ParallelState(**sizes)
        try:
            world = tuple(range(65_536))
            worldwide = sorted(k for k, e in state._table.entries.items() if e.ranks == world)
            created = _groups.creation_count() - before
            default = dist.distributed_c10d._get_default_group()
            not_default = [k for k in worldwide if state._table[k].group is not default]
            assert worldwide and not_default == [], (
                f"world-sized entries {worldwide}; not the default group: {not_default}"
            )
            distinct = {e.ranks for e in state._table.entries.values()} - {world}
            assert created == len(distinct), f"{created} groups created, expected {len(distinct)} (no world-sized one)"
        finally:
            state.destroy()
        assert dist.distributed_c10d._get_default_group() is default, "destroy() must leave the default group alone"


def test_share_groups_false_builds_its_own_world_sized_group():
    """Without sharing (Megatron's behaviour) a world-sized kind gets its own communicator."""
    with fake_world(8, 3):
        state = ParallelState(share_groups=False)  # dp = the whole world
        try:
            assert state.group("dp") is not dist.distributed_c10d._get_default_group()
        finally:
            state.destroy()


def _best_of_interleaved(world_size: int, rank: int, sizes: dict[str, int], rounds: int) -> tuple[float, float, int]:
    """Fastest of ``rounds`` constructions of a state and of torch building the same groups.

    torch's side: ``dist.new_group(ranks, use_local_synchronization=True)`` (every member
    calls it, nobody else) for each rank set the state creates, handed the ranks
    ready-made; the state must also work its groups out from the layout. Run side by
    side, round by round, so that machine noise hits both alike.
    """
    ours = theirs = float("inf")
    created: list[tuple[int, ...]] = []
    for _ in range(rounds):
        with fake_world(world_size, rank):
            before = _groups.creation_count()
            start = time.perf_counter()
            state = ParallelState(**sizes)
            ours = min(ours, time.perf_counter() - start)
            world = tuple(range(world_size))
            created = sorted({e.ranks for e in state._table.entries.values()} - {world})
            assert _groups.creation_count() - before == len(created)
            state.destroy()
        with fake_world(world_size, rank):
            start = time.perf_counter()
            built = [dist.new_group(list(ranks), use_local_synchronization=True) for ranks in created]
            theirs = min(theirs, time.perf_counter() - start)
            for group in built:
                dist.destroy_process_group(group)
    return ours, theirs, len(created)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [65_536, 1_048_576])
def test_construction_costs_at_most_twice_torchs_own_constructor(world_size):
    """One rank's state construction (layout math included) costs <= 2x torch creating the same groups.

    Before, every request compared its ranks with a freshly built tuple of the whole
    world (7x torch's time at 65,536 ranks); now the per-request work is O(the group).
    """
    rank = world_size // 2 + 3
    ours, theirs, groups = _best_of_interleaved(world_size, rank, dict(MEGATRON_BIG), rounds=5)
    assert ours <= 2 * theirs, (
        f"{world_size} ranks, {groups} groups: construction {ours * 1e3:.2f} ms, torch's new_group for "
        f"the same groups {theirs * 1e3:.2f} ms (ratio {ours / theirs:.2f}, expected <= 2)"
    )


def test_default_group_check_of_a_small_group_builds_no_world_sized_tuple():
    """Whether a request is the default group is decided by its length for every smaller group."""
    from scoped_parallel.layout.grid import rank_span

    with fake_world(1 << 20, 5):
        rank_span.cache_clear()
        request = _groups.GroupRequest(ranks=(4, 5))
        assert _groups._is_the_default_group(request) is False
        assert rank_span.cache_info().misses == 0, "a 2-rank request built the world's rank tuple"
        whole = _groups.GroupRequest(ranks=tuple(range(1 << 20)))
        assert _groups._is_the_default_group(whole) is True


def test_destroy_after_compat_handle_in_scope():
    """destroy() calls adapter records' hooks through their type: compat's handle, which raises
    its own error for any attribute once its state is destroyed, no longer breaks destroy()."""
    from scoped_parallel.compat import parallel_state_wrappers as wrappers

    with fake_world(4, 1):
        state = ParallelState(tensor_model_parallel_size=2)
        with state.activate():
            handle = wrappers.get_current_parallel_state()
        assert handle is not None
        state.destroy()
        assert state.destroyed
        assert _groups.live_groups() == 0, f"{_groups.live_groups()} groups left alive after destroy()"
