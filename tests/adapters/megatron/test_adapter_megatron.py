"""Megatron adapter: megatron.core.parallel_state getters answer from the active state."""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest

pytest.importorskip("megatron.core.parallel_state")

T = timedelta(seconds=30)


def _ps():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

        import megatron.core.tensor_parallel.cross_entropy  # noqa: F401  (holds from-imported copies)
    return parallel_state


def legacy_megatron_step(rank):
    """Unchanged Megatron-style code: module-level getters, no state in sight."""
    import torch
    import torch.distributed as dist

    ps = _ps()
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    y = torch.tensor([float(rank)])
    dist.all_reduce(y, group=ps.get_data_parallel_group())
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
        int(x.item()),
        int(y.item()),
        ps.is_pipeline_last_stage(),
    )


def rank_legacy_code_follows_scope(rank):
    from scoped_parallel import ParallelState, adapters
    from scoped_parallel.errors import NoActiveStateError

    ps = _ps()
    cross_entropy = __import__("sys").modules["megatron.core.tensor_parallel.cross_entropy"]
    actor = ParallelState(name="actor", tensor_model_parallel_size=2, timeout=T)
    critic = ParallelState(name="critic", timeout=T)
    out = {}
    try:
        with adapters.installed(targets=("megatron",)):
            with actor.activate():
                out["actor"] = legacy_megatron_step(rank)
                out["alias"] = cross_entropy.get_tensor_model_parallel_group() is actor.get_tensor_model_parallel_group()
                with critic.activate():
                    out["critic"] = legacy_megatron_step(rank)
                out["actor_again"] = legacy_megatron_step(rank)
                try:
                    ps.get_global_symmetric_memory_buffer()
                except Exception as err:  # noqa: BLE001
                    out["unsupported"] = type(err).__name__
                if not hasattr(ps, "get_global_symmetric_memory_buffer"):  # megatron-core < 0.16
                    out["unsupported"] = "GroupNotAvailableError (nothing to refuse here)"
            try:
                ps.get_tensor_model_parallel_group()
            except AssertionError as err:  # Megatron's own "not initialized"
                out["outside"] = "megatron: " + str(err)[:40]
        with adapters.installed(strict=True, targets=("megatron",)):
            try:
                ps.get_data_parallel_world_size()
            except NoActiveStateError as err:
                out["strict"] = str(err)
        return out
    finally:
        actor.destroy()
        critic.destroy()


@pytest.mark.world
def test_legacy_megatron_code_uses_each_active_state(world):
    """Unchanged code calling megatron.core.parallel_state getters runs on each active state's groups."""
    res = world.run(rank_legacy_code_follows_scope)
    r1 = res[1]
    assert r1["actor"] == (2, 2, 0 + 1, 1 + 3, True)
    assert r1["critic"] == (1, 4, 1, 6, True)
    assert r1["actor_again"] == r1["actor"]
    assert r1["alias"] is True
    assert r1["unsupported"].startswith("GroupNotAvailableError"), r1["unsupported"]
    assert r1["outside"].startswith("megatron:")
    assert "strict" in r1["strict"] and "activate()" in r1["strict"]


def test_install_uninstall_restores_every_getter_by_identity():
    """install/uninstall/install round-trips restore the original function objects."""
    from scoped_parallel import adapters
    from scoped_parallel.adapters.megatron import GETTERS

    ps = _ps()
    import sys

    cross_entropy = sys.modules["megatron.core.tensor_parallel.cross_entropy"]
    from scoped_parallel.adapters.megatron import UNSUPPORTED

    before = {n: vars(ps)[n] for n in GETTERS + UNSUPPORTED if n in vars(ps)}  # older minors lack a few
    alias_before = cross_entropy.get_tensor_model_parallel_group
    for _ in range(2):
        adapters.install(targets=("megatron",))
        adapters.install(targets=("megatron",))  # idempotent
        assert all(vars(ps)[n] is not before[n] for n in before)
        assert cross_entropy.get_tensor_model_parallel_group is ps.get_tensor_model_parallel_group
        adapters.uninstall()
        assert all(vars(ps)[n] is before[n] for n in before)
        assert cross_entropy.get_tensor_model_parallel_group is alias_before
    assert not adapters.is_installed()


def test_missing_upstream_getter_fails_loudly(monkeypatch):
    """A getter renamed upstream makes install() fail naming it, and leaves nothing patched."""
    from scoped_parallel import adapters
    from scoped_parallel.errors import AdapterError

    ps = _ps()
    original = ps.get_context_parallel_rank
    monkeypatch.delattr(ps, "get_expert_tensor_parallel_rank")
    with pytest.raises(AdapterError, match="get_expert_tensor_parallel_rank"):
        adapters.install(targets=("megatron",))
    assert not adapters.is_installed("megatron")
    assert ps.get_context_parallel_rank is original


def test_state_getters_have_megatrons_signatures():
    """Every re-pointed getter takes Megatron's parameters in Megatron's order (positional calls stay right)."""
    import inspect

    from scoped_parallel import ParallelState
    from scoped_parallel.adapters.megatron import GETTERS

    ps = _ps()
    for name in GETTERS:
        if not hasattr(ps, name):  # a getter this (older) megatron-core does not have
            continue
        theirs = list(inspect.signature(getattr(ps, name)).parameters)
        ours = list(inspect.signature(getattr(ParallelState, name)).parameters)[1:]
        # the adapter passes Megatron's positional arguments on by Megatron's names
        assert set(theirs) <= set(ours), f"{name}: Megatron {theirs}, state {ours}"


def test_each_getter_row_exists_exactly_in_its_megatron_minors():
    """A row's since/until says which minors have the name; the installed one must agree, both ways."""
    from importlib.metadata import version

    from scoped_parallel.getters.table import family

    ps = _ps()
    installed = tuple(int(x) for x in version("megatron-core").split(".")[:2])

    def minor(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split("."))

    wrong = {}
    for name, row in family("megatron").items():
        expected = (not row.since or minor(row.since) <= installed) and (not row.until or installed <= minor(row.until))
        if (name in vars(ps)) != expected:
            wrong[name] = f"since={row.since!r} until={row.until!r}: expected {'present' if expected else 'absent'}"
    assert wrong == {}, f"megatron-core {installed}: {wrong}"


@pytest.mark.world
def test_positional_arguments_keep_megatrons_meaning(world):
    """get_tensor_and_data_parallel_group(True) is check_initialized=True (0.16) or
    with_context_parallel=True (0.14): the scoped answer follows the installed Megatron."""
    for rank, (vanilla, scoped) in enumerate(world.run(rank_positional_call)):
        assert vanilla == scoped, f"rank {rank}: vanilla Megatron {vanilla}, scoped {scoped}"


def rank_positional_call(rank):
    import torch.distributed as dist

    from scoped_parallel import ParallelState, adapters

    ps = _ps()
    ps.initialize_model_parallel(context_parallel_size=2, create_gloo_process_groups=False)
    try:
        vanilla = dist.get_process_group_ranks(ps.get_tensor_and_data_parallel_group(True))
    finally:
        ps.destroy_model_parallel()
    state = ParallelState(name="positional", context_parallel_size=2, timeout=T)
    try:
        with adapters.installed(targets=("megatron",)), state.activate():
            scoped = dist.get_process_group_ranks(ps.get_tensor_and_data_parallel_group(True))
    finally:
        state.destroy()
    return vanilla, scoped


def test_uninstall_restores_copies_made_while_installed():
    """A `from parallel_state import getter` done while installed is restored by uninstall()."""
    import sys
    import types

    from scoped_parallel import adapters

    ps = _ps()
    original = ps.get_tensor_model_parallel_group
    late = types.ModuleType("late_importer")
    sys.modules["late_importer"] = late
    try:
        with adapters.installed(targets=("megatron",)):
            exec("from megatron.core.parallel_state import get_tensor_model_parallel_group", late.__dict__)
            assert late.get_tensor_model_parallel_group is not original
        assert late.get_tensor_model_parallel_group is original
    finally:
        del sys.modules["late_importer"]


def test_patched_getters_have_megatrons_exact_signatures_without_following_wrapped():
    """Each patched getter's own code takes Megatron's parameters, kinds and default objects (no *args)."""
    import inspect

    from scoped_parallel import adapters
    from scoped_parallel.adapters.megatron import GETTERS, UNSUPPORTED, VERSIONED_GETTERS

    ps = _ps()
    absent = [n for n in GETTERS + UNSUPPORTED if n not in vars(ps)]
    assert set(absent) <= VERSIONED_GETTERS, f"getters missing from this megatron-core: {absent}"
    before = {n: vars(ps)[n] for n in GETTERS + UNSUPPORTED if n not in absent}
    with adapters.installed(targets=("megatron",)):
        for name, original in before.items():
            patched = vars(ps)[name]
            assert patched is not original
            ours = inspect.signature(patched, follow_wrapped=False)
            assert ours == inspect.signature(original), name
            assert [p.kind for p in ours.parameters.values()] == [
                p.kind for p in inspect.signature(original).parameters.values()
            ], name
            assert patched.__defaults__ is original.__defaults__, name
            code = patched.__code__
            assert code.co_argcount == original.__code__.co_argcount, name
            assert not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS), name


def test_outside_any_scope_a_patched_getter_behaves_like_megatrons():
    """Outside every scope a patched getter answers, and fails, exactly as Megatron's own function."""
    import traceback

    from scoped_parallel import adapters

    ps = _ps()
    original = ps.get_tensor_model_parallel_group
    with adapters.installed(targets=("megatron",)):
        patched = ps.get_tensor_model_parallel_group
        assert patched(False) is original(False) is None
        assert patched(check_initialized=False) is None
        with pytest.raises(AssertionError, match="tensor model parallel group is not initialized") as info:
            patched()
        # the failing line is Megatron's own, in Megatron's file
        assert traceback.extract_tb(info.tb)[-1].filename == original.__code__.co_filename, traceback.format_tb(info.tb)[-1]
        ps._MPU_TENSOR_MODEL_PARALLEL_RANK = 3
        try:
            assert ps.get_tensor_model_parallel_rank() == 3
        finally:
            ps._MPU_TENSOR_MODEL_PARALLEL_RANK = None
