"""DeepSpeed adapter, ``deepspeed.utils.groups`` and ``parallel_state_sp`` inside scopes.

Behaviours proved (4-rank gloo world):

* every re-pointed ``groups`` getter, and its ``deepspeed.utils`` star re-export,
  answers from the active state (TP=2 and SP=2 states);
* unchanged code calling ``groups``, ``parallel_state_sp`` and ``deepspeed.utils``
  gets each active state's groups as scopes alternate;
* ``groups.mpu``/``groups.mesh_device`` written inside a scope are seen by that state
  only (not by another state, not by the module outside scopes); ``del`` goes back to
  the state; the memoized readers follow an mpu write and its deletion;
* unpatched, a second ``initialize_sequence_parallel`` asserts; with the adapters each
  scope answers with its own SP groups, the call is idempotent, a size other than the
  state's raises a LayoutError naming both, and no module global changes.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("deepspeed")

import _adapter_deepspeed_support as support  # noqa: E402
from _adapter_deepspeed_support import WORLD_TIMEOUT, identify  # noqa: E402

from scoped_parallel.errors import LayoutError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

#: groups getter -> the state's answer: ("group", kind), ("size"|"rank_in"|"ranks", kind), ("src", kind) or a value
GETTERS: dict[str, Any] = {
    "_get_data_parallel_group": ("group", "dp"),
    "_get_data_parallel_world_size": ("size", "dp"),
    "_get_data_parallel_rank": ("rank_in", "dp"),
    "_get_data_parallel_group_ranks": ("ranks", "dp"),
    "_get_model_parallel_world_size": ("size", "tp-pp"),
    "_get_sequence_parallel_group": ("group", "sp"),
    "_get_sequence_parallel_world_size": ("size", "sp"),
    "_get_sequence_parallel_rank": ("rank_in", "sp"),
    "_get_sequence_data_parallel_group": ("group", "sp-dp"),
    "_get_sequence_data_parallel_world_size": ("size", "sp-dp"),
    "_get_sequence_data_parallel_rank": ("rank_in", "sp-dp"),
    "_get_broadcast_src_rank": ("src", "sp-dp"),
    "_get_expert_model_parallel_world_size": 1,
    "get_tensor_model_parallel_group": ("group", "tp"),
    "get_tensor_model_parallel_world_size": ("size", "tp"),
    "get_tensor_model_parallel_rank": ("rank_in", "tp"),
    "get_tensor_model_parallel_src_rank": ("src", "tp"),
    "get_model_parallel_group": ("group", "tp"),
    "get_model_parallel_world_size": ("size", "tp"),
    "get_model_parallel_rank": ("rank_in", "tp"),
    "get_data_parallel_group": ("group", "dp"),
    "get_data_parallel_world_size": ("size", "dp"),
    "get_data_parallel_rank": ("rank_in", "dp"),
}


def _expected(state: Any, how: Any) -> Any:
    if not isinstance(how, tuple):
        return how
    what, kind = how
    if what == "group":
        return f"state {kind}"
    if what == "src":
        return state.ranks(kind)[0]
    return getattr(state, what)(kind)


def _rank_groups_getters(rank: int) -> dict[str, dict[str, tuple[Any, Any]]]:
    import deepspeed.utils
    from deepspeed.utils import groups

    with support.isolated():
        states = {
            "tp2": support.state(name="tp2", tensor_model_parallel_size=2),
            "sp2": support.state(name="sp2", sequence_parallel_size=2),
        }
        answers: dict[str, dict[str, tuple[Any, Any]]] = {}
        try:
            with support.installed():
                for label, state in states.items():
                    with state.activate():
                        for name, how in GETTERS.items():
                            expected = _expected(state, how)
                            for module in (groups, deepspeed.utils):
                                if module is deepspeed.utils and name.startswith("_"):
                                    continue  # a star import skips private names
                                got = getattr(module, name)()
                                if isinstance(how, tuple) and how[0] == "group":
                                    got = identify(got, {expected: state.group(how[1])})
                                elif isinstance(got, range):
                                    got = tuple(got)
                                answers.setdefault(label, {})[f"{module.__name__}.{name}"] = (got, expected)
        finally:
            support.destroy(*states.values())
        return answers


@pytest.mark.world
def test_every_scoped_groups_getter_answers_from_the_active_state(world):
    """Each re-pointed groups getter and its deepspeed.utils re-export answers from the active state."""
    for rank, answers in enumerate(world.run(_rank_groups_getters, timeout=WORLD_TIMEOUT)):
        assert set(answers) == {"tp2", "sp2"}
        for label, by_getter in answers.items():
            wrong = {name: f"got {got!r}, expected {exp!r}" for name, (got, exp) in by_getter.items() if got != exp}
            assert not wrong, f"rank {rank}, state {label}: {wrong}"


def _legacy_reader() -> tuple[Any, Any, Any]:
    """Unchanged legacy code reading DeepSpeed's global getters."""
    import deepspeed.utils
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups

    return (
        groups._get_data_parallel_group(),
        parallel_state_sp.get_sequence_parallel_group(),
        deepspeed.utils.get_tensor_model_parallel_group(),
    )


def _rank_legacy_code(rank: int) -> list[tuple[Any, ...]]:
    with support.isolated():
        first = support.state(name="tp2", tensor_model_parallel_size=2)
        second = support.state(name="sp2", sequence_parallel_size=2)
        answers = []
        try:
            with support.installed():
                for state in (first, second, first, second):
                    with state.activate():
                        dp, sp, tp = _legacy_reader()
                    answers.append(
                        (
                            identify(dp, {f"{state.name} dp": state.group("dp")}),
                            identify(sp, {f"{state.name} sp": state.group("sp")}),
                            identify(tp, {f"{state.name} tp": state.group("tp")}),
                        )
                    )
        finally:
            support.destroy(first, second)
        return answers


@pytest.mark.world
def test_legacy_getters_answer_each_active_state_in_turn(world):
    """Unchanged code calling groups, parallel_state_sp and deepspeed.utils gets each active state's groups."""
    expected = [tuple(f"{name} {kind}" for kind in ("dp", "sp", "tp")) for name in ("tp2", "sp2", "tp2", "sp2")]
    for rank, answers in enumerate(world.run(_rank_legacy_code, timeout=WORLD_TIMEOUT)):
        assert answers == expected, f"rank {rank}: legacy reads {answers}, expected {expected}"


class _Marker:
    """A picklable stand-in for an mpu or mesh written to groups: its name is what comes back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _rank_module_attributes(rank: int) -> dict[str, Any]:
    from deepspeed.utils import groups

    with support.isolated():
        first = support.state(name="first", tensor_model_parallel_size=2)
        second = support.state(name="second")
        written, mesh = _Marker("written mpu"), _Marker("written mesh")
        known = {"first": first, "second": second, "written mpu": written, "written mesh": mesh, "None": None}
        out: dict[str, Any] = {}

        def read() -> tuple[Any, Any]:
            return identify(groups.mpu, known), identify(groups.mesh_device, known)

        try:
            with support.installed():
                before = (vars(groups)["mpu"], vars(groups)["mesh_device"])
                with first.activate():
                    out["first, default"] = read()
                    groups.mpu = written
                    groups.mesh_device = mesh
                    out["first, after write"] = read()
                with second.activate():
                    out["second"] = read()
                with first.activate():
                    out["first, again"] = read()
                    del groups.mpu
                    del groups.mesh_device
                    out["first, after del"] = read()
                    out["dp size, state mpu"] = groups._get_data_parallel_world_size()

                    class OtherMpu:
                        def get_data_parallel_world_size(self) -> int:
                            return 99

                    groups.mpu = OtherMpu()  # the memoized reader must follow the write
                    out["dp size, written mpu"] = groups._get_data_parallel_world_size()
                    del groups.mpu
                    out["dp size, after del"] = groups._get_data_parallel_world_size()
                out["module dict untouched"] = (vars(groups)["mpu"], vars(groups)["mesh_device"]) == before
                out["outside, groups.mpu is the module's"] = groups.mpu is before[0]
        finally:
            support.destroy(first, second)
        return out


@pytest.mark.world
def test_groups_mpu_and_mesh_writes_inside_a_scope_stay_with_that_state(world):
    """groups.mpu / mesh_device written inside a scope are seen only by that state, not by the module."""
    expected = {
        "first, default": ("first", "None"),
        "first, after write": ("written mpu", "written mesh"),
        "second": ("second", "None"),
        "first, again": ("written mpu", "written mesh"),
        "first, after del": ("first", "None"),
        "dp size, state mpu": 2,
        "dp size, written mpu": 99,
        "dp size, after del": 2,
        "module dict untouched": True,
        "outside, groups.mpu is the module's": True,
    }
    for rank, out in enumerate(world.run(_rank_module_attributes, timeout=WORLD_TIMEOUT)):
        wrong = {k: f"got {out.get(k)!r}, expected {v!r}" for k, v in expected.items() if out.get(k) != v}
        assert not wrong, f"rank {rank}: {wrong}"


def _rank_sequence_parallel(rank: int) -> dict[str, Any]:
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as sp

    with support.isolated():
        out: dict[str, Any] = {}
        with support.unpatched_run():
            sp.initialize_sequence_parallel(2)
            try:
                sp.initialize_sequence_parallel(4)
                out["unpatched"] = "re-initialized"
            except AssertionError as err:
                out["unpatched"] = f"AssertionError: {err}"
        sp2 = support.state(name="sp2", sequence_parallel_size=2)
        sp4 = support.state(name="sp4", sequence_parallel_size=4)
        try:
            with support.installed():
                snap = support.globals_snapshot()
                out["per scope"] = []
                for state, size in ((sp2, 2), (sp4, 4), (sp2, 2)):
                    with state.activate():
                        sp.initialize_sequence_parallel(size)
                        sp.initialize_sequence_parallel(size)  # idempotent
                        sp_group = {f"{state.name} sp": state.group("sp")}
                        got = (
                            identify(sp.get_sequence_parallel_group(), sp_group),
                            identify(sp.get_model_parallel_group(), sp_group),
                            identify(sp.get_sequence_data_parallel_group(), {f"{state.name} sp-dp": state.group("sp-dp")}),
                            sp.get_sequence_parallel_world_size(),
                            sp.get_model_parallel_world_size(),
                            sp.get_sequence_parallel_rank() == state.rank_in("sp"),
                            sp.get_model_parallel_rank() == state.rank_in("sp"),
                            sp.get_sequence_data_parallel_world_size(),
                        )
                        out["per scope"].append(got)
                with sp2.activate():
                    try:
                        sp.initialize_sequence_parallel(4)
                        out["mismatch"] = "no error"
                    except LayoutError as err:
                        out["mismatch"] = str(err)
                out["globals changed"] = support.globals_changed(snap)
        finally:
            support.destroy(sp2, sp4)
        return out


@pytest.mark.world
def test_parallel_state_sp_is_per_state_and_idempotent(world):
    """A second initialize_sequence_parallel asserts unpatched; with adapters each scope gets its own SP groups."""

    def row(name: str, size: int) -> tuple[Any, ...]:
        return (f"{name} sp", f"{name} sp", f"{name} sp-dp", size, size, True, True, 4)

    expected = [row("sp2", 2), row("sp4", 4), row("sp2", 2)]
    for rank, out in enumerate(world.run(_rank_sequence_parallel, timeout=WORLD_TIMEOUT)):
        unpatched = out["unpatched"]
        assert unpatched.startswith("AssertionError") and "already initialized" in unpatched, (
            f"rank {rank}: unpatched second initialize gave {unpatched!r}, expected DeepSpeed's assert"
        )
        assert out["per scope"] == expected, f"rank {rank}: per-scope answers {out['per scope']}, expected {expected}"
        mismatch = out["mismatch"]
        assert "initialize_sequence_parallel(4)" in mismatch and "size is 2" in mismatch, (
            f"rank {rank}: size 4 in the SP=2 scope gave {mismatch!r}, expected a LayoutError naming 4 and 2"
        )
        assert out["globals changed"] == [], f"rank {rank}: DeepSpeed globals changed: {out['globals changed']}"
