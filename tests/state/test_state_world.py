"""Tier 4 (gloo world): ParallelState on a real 4-rank gloo world, one world shared by all tests.

Proves: every group a rank holds has the layout's ranks and all-reduces over them;
states on rank subsets coexist with a world-spanning one; why groups are named by the
library (torch's local-sync names diverge); agreement leaves no store keys; identical
rank sets share one refcounted group; mismatched layouts, a missing peer and a
different construction order raise instead of hanging; per-kind backends and options
reach group creation; scopes switch the getters and destroy() releases everything; a
state is a complete DeepSpeed mpu. Rank-side functions return values; the tests
compare them with what is expected and name the rank in every message.
"""

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
        out = {"groups": {}}
        for kind, ranks in s.layout.groups_of(rank).items():
            group = s.group(kind)
            out["groups"][kind] = {
                "layout": ranks,
                "torch": tuple(dist.get_process_group_ranks(group)),
                "sum": _sum_over(group, rank),
            }
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
        out["initialized"] = (mine.model_parallel_is_initialized(), other.model_parallel_is_initialized())
        try:
            mine.group("opt:dist-opt")  # a key of the group table, not a kind
        except Exception as err:  # noqa: BLE001
            out["table key"] = type(err).__name__
        return out
    finally:
        for s in (ref, critic, actor):
            s.destroy()


def rank_torch_hashed_names_diverge(rank):
    """torch's use_local_synchronization names are salted with a per-process count.

    torch 2.13 salts with the number of live groups (``len(_world.pg_names)``); torch 2.14
    salts with ``_world.group_count``, which counts the group creations this process took
    part in. Either count differs between ranks once one rank creates a group the others
    do not join.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    extra = dist.new_group([0], use_local_synchronization=True) if rank == 0 else None
    salted_with_creations = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14)
    count = c10d._world.group_count if salted_with_creations else len(c10d._world.pg_names)
    name = c10d._process_group_name([0, 1, 2, 3], use_hashed_name=True)
    if extra is not None:
        dist.destroy_process_group(extra)
    return name, count


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
    left = [k for k in keys if store.check([prefix + k]) or store.check([prefix + k + "/n"])]
    return keys, left


def rank_sharing(rank):
    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups

    a = ParallelState(name="a", tensor_model_parallel_size=2, timeout=T)
    b = ParallelState(name="b", tensor_model_parallel_size=2, timeout=T)
    c = ParallelState(name="c", tensor_model_parallel_size=2, timeout=T, share_groups=False)
    d = ParallelState(name="d", sequence_parallel_size=2, timeout=T)
    tp_ranks = a.ranks("tp")

    def kinds_on_tp_ranks(*states):
        """How many of the states' kinds have exactly a's tp ranks on this rank."""
        return sum(list(st.layout.groups_of(rank).values()).count(tp_ranks) for st in states)

    try:
        seen: list = []
        out = {
            "tp_object": {  # the distinct group objects, numbered by first appearance (a's is 0)
                label: _index_of(group, seen)
                for label, group in (
                    ("a tp", a.get_tensor_model_parallel_group()),
                    ("b tp", b.get_tensor_model_parallel_group()),
                    ("c tp", c.get_tensor_model_parallel_group()),
                    ("d sp", d.get_sequence_parallel_group()),
                )
            },
            "users": _groups.users(a.get_tensor_model_parallel_group()),
            "expected_users": kinds_on_tp_ranks(a, b, d),
            "c_tp_sum": _sum_over(c.get_tensor_model_parallel_group(), rank),
        }
        a.destroy()
        out["users_after_a"] = _groups.users(b.get_tensor_model_parallel_group())
        out["expected_users_after_a"] = kinds_on_tp_ranks(b, d)
        return out
    finally:
        for s in (a, b, c, d):
            s.destroy()  # idempotent for a


def _index_of(obj, seen):
    """The position of ``obj`` (by identity) in ``seen``, appending it if new."""
    for i, known in enumerate(seen):
        if known is obj:
            return i
    seen.append(obj)
    return len(seen) - 1


def rank_mismatched_layout(rank):
    from scoped_parallel import ParallelState, StateMismatchError
    from scoped_parallel.groups import create as _groups

    tp = 1 if rank == 3 else 2
    try:
        ParallelState(name="bad", tensor_model_parallel_size=tp, timeout=timedelta(seconds=10))
    except StateMismatchError as err:
        return ("error", str(err), _groups.live_groups())
    return ("built", "", _groups.live_groups())


def rank_missing_peer(rank):
    import time

    from scoped_parallel import ParallelState, StateMismatchError
    from scoped_parallel.groups import create as _groups

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
        from scoped_parallel.groups import create as _groups

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
    actor.set_override("vpp_size", 2)  # Megatron's setter, as the adapter writes it
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
    seen.append(actor.override("vpp_size"))  # the overrides went with the state
    try:
        actor.set_override("vpp_size", 2)
    except GroupNotAvailableError:
        seen.append("setter refused")
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
    for r, out in enumerate(res):
        for kind, g in out["groups"].items():
            assert g["torch"] == g["layout"], f"rank {r} {kind}: torch's group has ranks {g['torch']}, layout {g['layout']}"
            want = sum(g["layout"])
            assert g["sum"] == want, f"rank {r} {kind}: all-reduce of the ranks gave {g['sum']}, expected {want}"
    tp0, dp3 = res[0]["groups"]["tp"]["layout"], res[3]["groups"]["dp"]["layout"]
    assert tp0 == (0, 1), f"rank 0: tp ranks {tp0}, expected (0, 1)"
    assert dp3 == (1, 3), f"rank 3: dp ranks {dp3}, expected (1, 3)"
    # tp size, tp rank, dp size, dp rank, mp size, tp src rank, dp ranks, first stage, last stage
    want_getters = (2, 1, 2, 0, 2, 0, (1, 3), True, True)
    assert res[1]["getters"] == want_getters, f"rank 1: getters returned {res[1]['getters']}, expected {want_getters}"


@pytest.mark.world
def test_subset_states_and_a_world_spanning_state_coexist(world):
    """States on ranks 0-1, 2-3 and 0-3 build without hangs and a non-member gets a clear error."""
    res = world.run(rank_subset_states_with_different_group_counts, timeout=90)

    def by_rank(key):
        return [r[key] for r in res]

    assert by_rank("actor_member") == [True, True, False, False], f"actor membership by rank: {by_rank('actor_member')}"
    assert by_rank("critic_member") == [False, False, True, True], f"critic membership by rank: {by_rank('critic_member')}"
    # the sums of the member ranks: ref sp groups (0,1) and (2,3); sdp spans all four
    assert by_rank("ref_sp") == [1, 1, 5, 5], f"ref sp all-reduce sums by rank: {by_rank('ref_sp')}"
    assert by_rank("ref_sdp") == [6] * 4, f"ref sdp all-reduce sums by rank: {by_rank('ref_sdp')}"
    # both subset states have data parallel size 1: each rank's dp group is itself
    assert by_rank("own_dp") == [0, 1, 2, 3], f"own dp all-reduce sums by rank: {by_rank('own_dp')}"
    # actor's model parallel group is tp (0,1), critic's is pp (2,3)
    assert by_rank("own_mp") == [1, 1, 5, 5], f"own mp all-reduce sums by rank: {by_rank('own_mp')}"
    kind, msg = res[0]["outsider"]
    assert kind == "RankNotInLayoutError", f"rank 0 asking the critic for a group raised {kind}: {msg}"
    assert "rank 0" in msg and "2..3" in msg, f"the error should name rank 0 and the critic's ranks 2..3: {msg}"
    # Megatron's model_parallel_is_initialized(): true for its own state, false (no error) for the other
    assert by_rank("initialized") == [(True, False)] * 4, f"(own, other) model_parallel_is_initialized: {by_rank('initialized')}"
    assert by_rank("table key") == ["LayoutError"] * 4, f"state.group('opt:dist-opt') should be refused as no kind: {by_rank('table key')}"


@pytest.mark.world
def test_torch_hashed_group_names_depend_on_group_count(world):
    """Why we name groups ourselves: torch's local-sync names differ between ranks whose counts differ."""
    # The shared world's history decides each rank's count (member-only states with pipeline
    # stages leave different counts on torch 2.13); rank 0 creates one group the others do not.
    results = world.run(rank_torch_hashed_names_diverge)
    for a, (name_a, count_a) in enumerate(results):
        for b, (name_b, count_b) in enumerate(results):
            assert (name_a == name_b) == (count_a == count_b), (
                f"ranks {a} and {b} have salt counts {count_a} and {count_b}, yet their names are "
                f"{'equal' if name_a == name_b else 'different'}: {name_a!r}, {name_b!r}"
            )
    names = [name for name, _ in results]
    assert names[0] not in names[1:], f"rank 0 created an extra group, yet another rank computes its name: {names}"


@pytest.mark.world
def test_successful_agreement_leaves_no_keys_in_the_store(world):
    """The last reader of each agreement key deletes it, so the store does not grow per state."""
    for r, (checked, left) in enumerate(world.run(rank_agreement_leaves_no_store_keys)):
        assert len(checked) == 4 + 3, f"rank {r}: checked {checked}, expected 4 fingerprints and 3 protocol keys"
        assert left == [], f"rank {r}: agreement keys still in the store: {left}"


@pytest.mark.world
def test_identical_rank_sets_share_one_group(world):
    """States asking for the same ranks share one refcounted group unless share_groups=False."""
    res = world.run(rank_sharing)
    # a and b share, d's sp has the same ranks and shares too; c (share_groups=False) has its own
    want_objects = {"a tp": 0, "b tp": 0, "c tp": 1, "d sp": 0}
    # on this layout 6 kinds of a and of b have the tp ranks (tp, tp-pp, tp-cp, etp, ...), and d's sp
    kinds_per_state, sp_of_d = 6, 1
    for r, out in enumerate(res):
        assert out["tp_object"] == want_objects, (
            f"rank {r}: group objects (numbered by first appearance) {out['tp_object']}, expected {want_objects}"
        )
        want = 2 * kinds_per_state + sp_of_d
        assert out["expected_users"] == want, f"rank {r}: {out['expected_users']} kinds on the tp ranks, expected {want}"
        assert out["users"] == want, f"rank {r}: the shared tp group has {out['users']} users, expected {want}"
        want = kinds_per_state + sp_of_d  # b and d still hold it after a.destroy()
        assert out["expected_users_after_a"] == want, f"rank {r}: {out['expected_users_after_a']} kinds, expected {want}"
        assert out["users_after_a"] == want, f"rank {r}: {out['users_after_a']} users after a.destroy(), expected {want}"
    sums = [out["c_tp_sum"] for out in res]
    assert sums == [1, 1, 5, 5], f"all-reduce over c's own tp groups (0,1) and (2,3) by rank: {sums}, expected [1, 1, 5, 5]"


@pytest.mark.world
def test_different_layouts_raise_instead_of_hanging(world):
    """A rank that builds another layout makes its peers and itself fail, with no group left."""
    res = world.run(rank_mismatched_layout, timeout=60)
    for r, (kind, msg, live) in enumerate(res):
        assert kind == "error", f"rank {r}: the state was {kind} instead of raising StateMismatchError"
        assert live == 0, f"rank {r}: {live} process groups alive after the failed construction, expected 0"
    assert "tp=2" in res[0][1] or "tp=1" in res[0][1], f"rank 0's error should name a tp size: {res[0][1]}"


@pytest.mark.world
def test_missing_peer_fails_within_timeout_naming_it(world):
    """A rank that never constructs the state is named in the others' error within the timeout."""
    res = world.run(rank_missing_peer, timeout=60)
    first_state_groups = len(set(_layout_groups(2)))  # only the first state's groups, none of lonely's
    for r, (msg, elapsed, live) in enumerate(res[:3]):
        assert "ranks [3]" in msg and "'lonely'" in msg, f"rank {r}: error should name ranks [3] and 'lonely': {msg}"
        assert 1.5 < elapsed < 10, f"rank {r}: raised after {elapsed:.1f} s, expected about the 2 s timeout"
        assert live == first_state_groups, f"rank {r}: {live} live groups, expected {first_state_groups}"


@pytest.mark.world
def test_states_built_in_different_order_raise(world):
    """Ranks building states in a different order get an error naming both states."""
    res = world.run(rank_different_order, timeout=60)
    for r, msg in enumerate(res):
        assert "'x'" in msg and "'y'" in msg, f"rank {r}: expected an error naming 'x' and 'y', got {msg!r}"


@pytest.mark.world
def test_per_kind_backend_and_options_reach_group_creation(world):
    """pg_options, backends and gloo twins reach the groups that are created."""
    res = world.run(rank_per_kind_backend_and_options)
    for r, out in enumerate(res):
        assert out["tp_options_reached"], f"rank {r}: the tp group was created without the pg_options object"
        assert out["tp_timeout"] == 42.0, f"rank {r}: tp group timeout {out['tp_timeout']} s, expected 42 s"
        for key in ("dp_backend", "gloo_dp_backend"):
            assert out[key] == "gloo", f"rank {r}: {key} is {out[key]!r}, expected 'gloo'"
    assert res[0]["gloo_dp_ranks"] == (0, 2), f"rank 0: gloo dp ranks {res[0]['gloo_dp_ranks']}, expected (0, 2)"


@pytest.mark.world
def test_scope_switches_and_destroy_releases_everything(world):
    """Getters follow the scope; destroy() frees every group and blocks later use."""
    res = world.run(rank_scope_and_destroy)
    # dp size in actor, in critic nested, in actor again; then the getter after destroy(),
    # activating a destroyed state, its override after destroy() and Megatron's setter on it,
    # and torch's group count growth
    want = [2, 4, 2, "gone", "ScopedParallelError", None, "setter refused", 0]
    for r, seen in enumerate(res):
        assert seen == want, f"rank {r}: saw {seen}, expected {want}"


@pytest.mark.world
def test_state_is_a_complete_deepspeed_mpu(world):
    """A state has every method DeepSpeed calls on an mpu and no SP-only marker."""
    res = world.run(rank_deepspeed_mpu_surface)
    missing, marker, values = res[1]
    assert missing == [], f"mpu methods missing from the state: {missing}"
    assert marker is False, "the state has initialize_sequence_parallel, which marks an SP-only mpu for DeepSpeed"
    got = values["get_model_parallel_world_size"]
    assert got == 2, f"rank 1: model parallel world size {got}, expected 2"
    got = values["get_data_parallel_group_ranks"]
    assert got == (1, 3), f"rank 1: data parallel ranks {got}, expected (1, 3)"


def rank_world_sized_group_is_the_default_group(rank):
    import torch
    import torch.distributed as dist

    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups

    live = _groups.live_groups()
    a = ParallelState(name="wide")  # no timeout of its own: dp spans the world with the default settings
    b = ParallelState(name="also-wide", sequence_parallel_size=2)  # sp-dp spans the world too
    try:
        world = dist.distributed_c10d._get_default_group()
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x, group=a.get_data_parallel_group())
        y = torch.tensor([float(rank + 1)])
        dist.all_reduce(y, group=b.get_sequence_data_parallel_group())
        out = {
            "a dp is the default group": a.get_data_parallel_group() is world,
            "b sp-dp is the default group": b.get_sequence_data_parallel_group() is world,
            "sums": (x.item(), y.item()),
            # one user per kind whose group it is (an optional group equal to a kind holds none)
            "users of the default group": _groups.users(world)
            - sum(1 for s in (a, b) for k in s.kinds() if s.group(k) is world),
        }
    finally:
        dist.barrier()
        a.destroy()
        b.destroy()
    z = torch.tensor([1.0])
    dist.all_reduce(z)  # the default group outlives both states
    out["after destroy"] = (z.item(), _groups.users(dist.distributed_c10d._get_default_group()), _groups.live_groups() - live)
    return out


@pytest.mark.world
def test_a_world_sized_group_is_the_default_group_itself(world):
    """A state's group over the whole world with default settings is the default group: shared, never destroyed."""
    expected = {
        "a dp is the default group": True,
        "b sp-dp is the default group": True,
        "sums": (10.0, 10.0),
        "users of the default group": 0,
        "after destroy": (4.0, 0, 0),
    }
    for rank, got in enumerate(world.run(rank_world_sized_group_is_the_default_group)):
        assert got == expected, f"rank {rank}: expected {expected}, got {got}"


def rank_default_group_spelled_two_ways(rank):
    import torch.distributed as dist

    from scoped_parallel import ParallelState
    from scoped_parallel.groups import create as _groups

    world = dist.distributed_c10d._get_default_group()

    def holders(*states):
        return sum(1 for s in states for k in s.kinds() if s.group(k) is world)

    counts = []
    a = ParallelState(name="gloo-spelled-out", backend="gloo")
    b = ParallelState(name="backend-left-out")
    counts.append(_groups.users(world) - holders(a, b))
    a.destroy()
    counts.append(_groups.users(world) - holders(b))
    b.destroy()
    counts.append(_groups.users(world))
    c = ParallelState(name="after-both")  # a key left behind by a or b would hand c a stale count
    counts.append(_groups.users(world) - holders(c))
    c.destroy()
    return counts, len(_groups._SHARED)


@pytest.mark.world
def test_the_default_group_has_one_count_however_its_backend_is_spelled(world):
    """Requests for the default group with the backend named or left out share one count, released exactly."""
    expected = ([0, 0, 0, 0], 0)
    for rank, got in enumerate(world.run(rank_default_group_spelled_two_ways)):
        assert got == expected, f"rank {rank}: (users minus holders after a+b, -a, -b, +c; entries left) expected {expected}, got {got}"
