"""Tier 4: ParallelState on a real 4-rank gloo world (one world shared by all tests)."""

from __future__ import annotations

from datetime import timedelta

import pytest

T = timedelta(seconds=20)


# ----------------------------------------------------------------- rank-side functions


def _sum_over(group, rank):
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=group)
    return int(x.item())


def rank_groups_match_layout(rank):
    import torch.distributed as dist

    from scoped_parallel import ParallelState

    s = ParallelState(name="m", tensor_model_parallel_size=2, timeout=T)
    try:
        out = {}
        for kind, ranks in s.layout.groups_of(rank).items():
            group = s.group(kind)
            assert tuple(dist.get_process_group_ranks(group)) == ranks, kind
            assert _sum_over(group, rank) == sum(ranks), kind
            out[kind] = ranks
        out["getters"] = (
            s.get_tensor_model_parallel_world_size(),
            s.get_tensor_model_parallel_rank(),
            s.get_data_parallel_world_size(),
            s.get_data_parallel_rank(),
            s.get_model_parallel_world_size(),
            s.get_tensor_model_parallel_src_rank(),
            s.get_data_parallel_group_ranks(),
            s.is_pipeline_first_stage(),
            s.is_pipeline_last_stage(),
        )
        return out
    finally:
        s.destroy()


def rank_subset_states_with_different_group_counts(rank):
    """actor on 0-1 and critic on 2-3 give ranks different numbers of groups; ref spans all."""
    from scoped_parallel import ParallelState

    actor = ParallelState(name="actor", tensor_model_parallel_size=2, world_size=2, rank_offset=0, timeout=T)
    critic = ParallelState(
        name="critic", pipeline_model_parallel_size=2, world_size=2, rank_offset=2, timeout=T
    )
    ref = ParallelState(name="ref", sequence_parallel_size=2, timeout=T)
    try:
        out = {
            "actor_member": actor.is_member,
            "critic_member": critic.is_member,
            "ref_sp": _sum_over(ref.get_sequence_parallel_group(), rank),
            "ref_sdp": _sum_over(ref.get_sequence_data_parallel_group(), rank),
            "ref_dp": ref.get_data_parallel_group_ranks(),
        }
        mine = actor if actor.is_member else critic
        out["own_dp"] = _sum_over(mine.get_data_parallel_group(), rank)
        out["own_mp"] = _sum_over(mine.get_model_parallel_group(), rank)
        other = critic if actor.is_member else actor
        try:
            other.get_tensor_model_parallel_group()
        except Exception as err:  # noqa: BLE001
            out["outsider"] = (type(err).__name__, str(err))
        return out
    finally:
        for s in (ref, critic, actor):
            s.destroy()


def rank_torch_hashed_names_diverge(rank):
    """torch's use_local_synchronization names depend on how many groups a process holds."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    extra = dist.new_group([0], use_local_synchronization=True) if rank == 0 else None
    name = c10d._process_group_name([0, 1, 2, 3], use_hashed_name=True)
    if extra is not None:
        dist.destroy_process_group(extra)
    return name


def rank_agreement_leaves_no_store_keys(rank):
    import torch.distributed as dist

    from scoped_parallel import ParallelState

    store = dist.distributed_c10d._get_default_store()
    s = ParallelState(name="tidy", tensor_model_parallel_size=2, timeout=T)
    tag = s._tag
    s.destroy()
    dist.barrier()  # every rank has finished reading its peers' keys
    prefix = f"scoped_parallel/agree/{tag}/"
    keys = [f"fp/{r}" for r in range(4)] + ["decision", "agreed", "done"]
    return [store.check([prefix + k]) or store.check([prefix + k + "/n"]) for k in keys]


def rank_sharing(rank):
    from scoped_parallel import ParallelState, _groups

    a = ParallelState(name="a", tensor_model_parallel_size=2, timeout=T)
    b = ParallelState(name="b", tensor_model_parallel_size=2, timeout=T)
    c = ParallelState(name="c", tensor_model_parallel_size=2, timeout=T, share_groups=False)
    d = ParallelState(name="d", sequence_parallel_size=2, timeout=T)
    try:
        return {
            "a_b_same_tp": a.get_tensor_model_parallel_group() is b.get_tensor_model_parallel_group(),
            "a_c_same_tp": a.get_tensor_model_parallel_group() is c.get_tensor_model_parallel_group(),
            "tp_is_sp_of_d": a.get_tensor_model_parallel_group() is d.get_sequence_parallel_group(),
            "users": _groups.users(a.get_tensor_model_parallel_group()),
            "expected_users": sum(
                list(st.layout.groups_of(rank).values()).count(a.ranks("tp")) for st in (a, b, d)
            ),
            "c_tp_works": _sum_over(c.get_tensor_model_parallel_group(), rank),
            "live": _groups.live_groups(),
        }
    finally:
        a.destroy()
        tp_b = b.get_tensor_model_parallel_group()
        after_a = _groups.users(tp_b)
        for s in (b, c, d):
            s.destroy()
        assert after_a == 7, after_a  # b (6 kinds) and d (sp) still hold it


def rank_mismatched_layout(rank):
    from scoped_parallel import ParallelState, StateMismatchError, _groups

    tp = 1 if rank == 3 else 2
    try:
        ParallelState(name="bad", tensor_model_parallel_size=tp, timeout=timedelta(seconds=10))
    except StateMismatchError as err:
        return ("error", str(err), _groups.live_groups())
    return ("built", "", _groups.live_groups())


def rank_missing_peer(rank):
    import time

    from scoped_parallel import ParallelState, StateMismatchError, _groups

    first = ParallelState(name="first", tensor_model_parallel_size=2, timeout=T)
    try:
        if rank == 3:
            time.sleep(0.5)
            return ("skipped", 0.0, 0)
        start = time.monotonic()
        try:
            ParallelState(name="lonely", timeout=timedelta(seconds=2))
        except StateMismatchError as err:
            return (str(err), time.monotonic() - start, _groups.live_groups())
        return ("built", 0.0, 0)
    finally:
        first.destroy()  # the survivors can still tear down what they built before


def rank_different_order(rank):
    from scoped_parallel import ParallelState, StateMismatchError

    names = ["x", "y"] if rank < 2 else ["y", "x"]
    try:
        states = [ParallelState(name=n, timeout=timedelta(seconds=5)) for n in names]
    except StateMismatchError as err:
        return str(err)
    for s in states:
        s.destroy()
    return "built"


def rank_per_kind_backend_and_options(rank):
    import torch.distributed as dist

    from scoped_parallel import ParallelState

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=42)
    s = ParallelState(  # no state-wide timeout: it would override the options' own
        name="opt",
        tensor_model_parallel_size=2,
        backends={"dp": "gloo"},
        pg_options={"tp": opts},
        create_gloo_process_groups=True,
    )
    try:
        from scoped_parallel import _groups

        tp = s.get_tensor_model_parallel_group()
        entry = _groups._BY_GROUP[tp][1]
        gloo_dp = s.get_data_parallel_group_gloo()
        return {
            "tp_options_reached": entry.request.options is opts,
            "tp_timeout": tp._get_backend(__import__("torch").device("cpu")).options._timeout.total_seconds(),
            "dp_backend": dist.get_backend(s.get_data_parallel_group()),
            "gloo_dp_backend": dist.get_backend(gloo_dp),
            "gloo_dp_ranks": tuple(dist.get_process_group_ranks(gloo_dp)),
            "gloo_edp": tuple(dist.get_process_group_ranks(s.get_expert_data_parallel_group_gloo())),
        }
    finally:
        s.destroy()


def rank_scope_and_destroy(rank):
    import torch.distributed as dist

    from scoped_parallel import GroupNotAvailableError, ParallelState, current_state

    before = len(dist.distributed_c10d._world.pg_map)
    actor = ParallelState(name="actor", tensor_model_parallel_size=2, timeout=T)
    critic = ParallelState(name="critic", timeout=T)
    seen = []
    with actor.activate():
        seen.append(current_state().get_data_parallel_world_size())
        with critic.activate():
            seen.append(current_state().get_data_parallel_world_size())
        seen.append(current_state().get_data_parallel_world_size())
    actor.destroy()
    critic.destroy()
    actor.destroy()  # idempotent
    try:
        actor.get_tensor_model_parallel_group()
    except GroupNotAvailableError:
        seen.append("gone")
    try:
        with actor.activate():
            pass
    except Exception as err:  # noqa: BLE001
        seen.append(type(err).__name__)
    seen.append(len(dist.distributed_c10d._world.pg_map) - before)
    return seen


def rank_deepspeed_mpu_surface(rank):
    from scoped_parallel import ParallelState

    s = ParallelState(name="mpu", tensor_model_parallel_size=2, sequence_parallel_size=1, timeout=T)
    try:
        required = [
            "get_data_parallel_group", "get_data_parallel_world_size", "get_data_parallel_rank",
            "get_model_parallel_group", "get_model_parallel_world_size", "get_model_parallel_rank",
            "get_tensor_model_parallel_group", "get_tensor_model_parallel_world_size",
            "get_tensor_model_parallel_rank", "get_tensor_model_parallel_src_rank",
            "get_pipeline_model_parallel_group", "get_pipeline_model_parallel_world_size",
            "get_pipeline_model_parallel_rank", "get_data_parallel_group_ranks",
            "get_sequence_parallel_group", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
            "get_sequence_data_parallel_group", "get_sequence_data_parallel_world_size",
            "get_sequence_data_parallel_rank",
        ]
        missing = [n for n in required if not callable(getattr(s, n, None))]
        values = {n: getattr(s, n)() for n in required if "group" not in n or "ranks" in n}
        return missing, hasattr(s, "initialize_sequence_parallel"), values
    finally:
        s.destroy()


# ----------------------------------------------------------------- tests


def _layout_groups(tp):
    from scoped_parallel import ParallelLayout

    return ParallelLayout(4, tensor_model_parallel_size=tp).groups_of(0).values()



@pytest.mark.world
def test_groups_equal_layout_and_collectives_run_over_them(world):
    """Every group a rank holds has the layout's ranks, and an all-reduce over it sums them."""
    res = world.run(rank_groups_match_layout)
    assert res[0]["tp"] == (0, 1) and res[3]["dp"] == (1, 3)
    assert res[1]["getters"] == (2, 1, 2, 0, 2, 0, (1, 3), True, True)


@pytest.mark.world
def test_subset_states_and_a_world_spanning_state_coexist(world):
    """States on ranks 0-1, 2-3 and 0-3 build without hangs and a non-member gets a clear error."""
    res = world.run(rank_subset_states_with_different_group_counts, timeout=90)
    assert [r["actor_member"] for r in res] == [True, True, False, False]
    assert [r["ref_sp"] for r in res] == [1, 1, 5, 5]
    assert [r["ref_sdp"] for r in res] == [6] * 4
    assert [r["own_dp"] for r in res] == [0, 1, 2, 3]  # both have data parallel size 1
    assert [r["own_mp"] for r in res] == [1, 1, 5, 5]  # actor tp (0,1), critic pp (2,3)
    kind, msg = res[0]["outsider"]
    assert kind == "RankNotInLayoutError" and "rank 0" in msg and "2..3" in msg


@pytest.mark.world
def test_torch_hashed_group_names_depend_on_group_count(world):
    """Why we name groups ourselves: torch's local-sync names differ between ranks holding different group counts."""
    names = world.run(rank_torch_hashed_names_diverge)
    assert names[0] != names[1] and names[1] == names[2] == names[3]


@pytest.mark.world
def test_successful_agreement_leaves_no_keys_in_the_store(world):
    """The last reader of each agreement key deletes it, so the store does not grow per state."""
    for leftovers in world.run(rank_agreement_leaves_no_store_keys):
        assert len(leftovers) > 4 and not any(leftovers), leftovers


@pytest.mark.world
def test_identical_rank_sets_share_one_group(world):
    """States asking for the same ranks share one refcounted group unless share_groups=False."""
    res = world.run(rank_sharing)
    for r in res:
        assert r["a_b_same_tp"] and not r["a_c_same_tp"] and r["tp_is_sp_of_d"]
        assert r["users"] == r["expected_users"] == 13  # a, b: tp, tp-pp, tp-cp, etp...; d: sp
    assert [r["c_tp_works"] for r in res] == [1, 1, 5, 5]


@pytest.mark.world
def test_different_layouts_raise_instead_of_hanging(world):
    """A rank that builds another layout makes its peers and itself fail, with no group left."""
    res = world.run(rank_mismatched_layout, timeout=60)
    assert all(kind == "error" for kind, _, _ in res), res
    assert all(live == 0 for _, _, live in res)
    assert "tp=2" in res[0][1] or "tp=1" in res[0][1]


@pytest.mark.world
def test_missing_peer_fails_within_timeout_naming_it(world):
    """A rank that never constructs the state is named in the others' error within the timeout."""
    res = world.run(rank_missing_peer, timeout=60)
    for msg, elapsed, live in res[:3]:
        assert "ranks [3]" in msg and "'lonely'" in msg
        assert 1.5 < elapsed < 10
        assert live == len(set(_layout_groups(2)))  # only the first state's groups, none of lonely's


@pytest.mark.world
def test_states_built_in_different_order_raise(world):
    """Ranks building states in a different order get an error naming both states."""
    res = world.run(rank_different_order, timeout=60)
    assert all("'x'" in m and "'y'" in m for m in res), res


@pytest.mark.world
def test_per_kind_backend_and_options_reach_group_creation(world):
    """pg_options, backends and gloo twins reach the groups that are created."""
    res = world.run(rank_per_kind_backend_and_options)
    for r in res:
        assert r["tp_options_reached"] and r["tp_timeout"] == 42.0
        assert r["dp_backend"] == "gloo" and r["gloo_dp_backend"] == "gloo"
    assert res[0]["gloo_dp_ranks"] == (0, 2)


@pytest.mark.world
def test_scope_switches_and_destroy_releases_everything(world):
    """Getters follow the scope; destroy() frees every group and blocks later use."""
    res = world.run(rank_scope_and_destroy)
    assert res[0] == [2, 4, 2, "gone", "ScopedParallelError", 0]


@pytest.mark.world
def test_state_is_a_complete_deepspeed_mpu(world):
    """A state has every method DeepSpeed calls on an mpu and no SP-only marker."""
    res = world.run(rank_deepspeed_mpu_surface)
    missing, marker, values = res[1]
    assert missing == [] and marker is False
    assert values["get_model_parallel_world_size"] == 2
    assert values["get_data_parallel_group_ranks"] == (1, 3)
