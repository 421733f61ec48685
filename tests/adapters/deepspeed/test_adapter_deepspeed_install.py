"""DeepSpeed adapter, install and uninstall, strict mode, and the per-state record (in this process).

Behaviours proved:

* install/uninstall (twice) patch every ``groups`` and ``parallel_state_sp`` function,
  the star re-exports, ``deepspeed.initialize`` and the groups module class, and put
  every object back by identity;
* an attribute missing upstream makes install raise an AdapterError naming it, and
  nothing stays patched;
* in strict mode a patched getter called outside any scope raises NoActiveStateError;
  outside strict mode it is DeepSpeed's own function;
* (fake 4-rank world) a reader's memoized answer follows ``groups.mpu`` writes, and
  DeepSpeed's WORLD teardown hook makes every state forget the mpu written in its scope;
* a state's record lives in its adapter storage and goes away with ``destroy()``.
"""

from __future__ import annotations

from typing import Any

import pytest

deepspeed = pytest.importorskip("deepspeed")

from scoped_parallel import adapters  # noqa: E402
from scoped_parallel.errors import AdapterError, NoActiveStateError  # noqa: E402


def _patched_namespaces() -> dict[str, Any]:
    import deepspeed.utils
    import deepspeed.utils.groups
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return {
        "groups": deepspeed.utils.groups,
        "utils": deepspeed.utils,
        "parallel_state_sp": parallel_state_sp,
        "deepspeed": deepspeed,
    }


def _snapshot() -> dict[str, Any]:
    spaces = _patched_namespaces()
    snap: dict[str, Any] = {name: dict(vars(module)) for name, module in spaces.items()}
    snap["type(groups)"] = type(spaces["groups"])
    return snap


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    diffs = []
    for name, namespace in before.items():
        if not isinstance(namespace, dict):
            if after[name] is not namespace:
                diffs.append(name)
            continue
        other = after[name]
        for key in set(namespace) | set(other):
            if key not in namespace or key not in other or namespace[key] is not other[key]:
                diffs.append(f"{name}.{key}")
    return sorted(diffs)


def test_install_uninstall_round_trip_restores_every_object_by_identity():
    """install/uninstall twice puts every patched object and the groups module class back by identity."""
    from scoped_parallel.adapters import deepspeed as adapter

    before = _snapshot()
    expected = {"type(groups)", "deepspeed.initialize", "utils.get_tensor_model_parallel_group"}
    import deepspeed.utils.groups as groups

    present = {n for n in adapter.GROUPS_FUNCTIONS if n not in adapter.OPTIONAL_GROUPS_FUNCTIONS or n in vars(groups)}
    expected |= {f"groups.{name}" for name in present}
    expected |= {f"parallel_state_sp.{name}" for name in adapter.SEQUENCE_PARALLEL_FUNCTIONS}
    for round_ in range(2):
        adapters.install(targets=("deepspeed",))
        try:
            patched = _differences(before, _snapshot())
        finally:
            adapters.uninstall(("deepspeed",))
        missing = sorted(expected - set(patched))
        assert not missing, f"round {round_}: not patched: {missing}"
        left = _differences(before, _snapshot())
        assert left == [], f"round {round_}: not restored by identity: {left}"
    assert not adapters.is_installed("deepspeed")


def test_missing_target_attribute_fails_with_adapter_error_and_rolls_back(monkeypatch):
    """An attribute missing upstream makes install raise an AdapterError naming it and patch nothing."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    monkeypatch.delattr(parallel_state_sp, "get_model_parallel_rank")
    before = _snapshot()
    with pytest.raises(AdapterError, match=r"parallel_state_sp\.get_model_parallel_rank"):
        adapters.install(targets=("deepspeed",))
    assert not adapters.is_installed("deepspeed")
    left = _differences(before, _snapshot())
    assert left == [], f"left patched after the failed install: {left}"


def test_strict_mode_raises_no_active_state_error_outside_a_scope():
    """In strict mode a patched getter called outside any scope raises NoActiveStateError."""
    import deepspeed.utils
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups

    with adapters.installed(strict=True, targets=("deepspeed",)):
        for getter in (
            groups._get_data_parallel_group,  # a memoized reader
            groups._get_sequence_data_parallel_group,
            groups._get_expert_parallel_group_dict,  # a plain one
            parallel_state_sp.get_sequence_parallel_group,
            deepspeed.utils.get_tensor_model_parallel_group,
        ):
            with pytest.raises(NoActiveStateError, match=getter.__name__):
                getter()


def test_non_strict_getter_outside_a_scope_calls_the_original():
    """Outside any scope (not strict) a patched getter answers exactly as DeepSpeed's own function."""
    from deepspeed.utils import groups

    with adapters.installed(targets=("deepspeed",)):
        assert groups._get_model_parallel_world_size() == 1  # groups.mpu is None here
        with pytest.raises(AssertionError, match="intra_layer_model parallel group is not initialized"):
            groups.get_tensor_model_parallel_group()
        assert groups.mpu is None, f"groups.mpu outside any scope is {groups.mpu!r}, expected the module's None"
        assert type(groups).__name__ == "ScopedDeepSpeedGroupsModule"


class _Mpu:
    """An mpu that only knows its data parallel size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


@pytest.fixture
def fake_states():
    """Two states (TP=2 and DP=4) of a fake 4-rank world, as rank 1, with the DeepSpeed adapter."""
    from scoped_parallel import ParallelState
    from scoped_parallel.testing import fake_world

    with fake_world(4, 1), adapters.installed(targets=("deepspeed",)):
        states = (ParallelState(name="tp2", tensor_model_parallel_size=2), ParallelState(name="dp4"))
        try:
            yield states
        finally:
            for state in states:
                state.destroy()


def test_memoized_reader_follows_mpu_writes_and_world_teardown(fake_states):
    """A written groups.mpu changes the memoized answer; WORLD teardown forgets every state's written mpu."""
    from deepspeed.utils import groups

    tp2, dp4 = fake_states
    sizes = {}
    for state, mpu in ((tp2, _Mpu(11)), (dp4, _Mpu(22))):
        with state.activate():
            sizes[f"{state.name} before"] = groups._get_data_parallel_world_size()
            groups.mpu = mpu
            sizes[f"{state.name} written"] = groups._get_data_parallel_world_size()
    groups._release_process_group_references()  # what deepspeed.comm does on WORLD teardown
    for state in (tp2, dp4):
        with state.activate():
            sizes[f"{state.name} after teardown"] = groups._get_data_parallel_world_size()
            assert groups.mpu is state, f"groups.mpu in {state.name}'s scope after teardown is {groups.mpu!r}"
    expected = {
        "tp2 before": 2, "tp2 written": 11, "tp2 after teardown": 2,
        "dp4 before": 4, "dp4 written": 22, "dp4 after teardown": 4,
    }  # fmt: skip
    assert sizes == expected, f"_get_data_parallel_world_size() answers {sizes}, expected {expected}"


def test_the_record_lives_in_the_state_and_goes_with_destroy(fake_states):
    """A state's DeepSpeed record is kept in its adapter storage; destroy() drops it."""
    from deepspeed.utils import groups

    tp2, _ = fake_states
    with tp2.activate():
        groups.set_tensor_model_parallel_world_size(7)
        assert groups.get_tensor_model_parallel_world_size() == 7
    assert tp2.override("tp_size") == 7, f"the setter writes the state's override: {tp2.override('tp_size')!r}"
    from scoped_parallel.adapters.deepspeed._records import record_of

    record = record_of(tp2)
    assert tp2.store.records.get("deepspeed") is record, f"record in the state's storage: {tp2.store.records!r}"
    tp2.destroy()
    assert "deepspeed" not in tp2.store.records, "destroy() must drop the adapter's record"
