"""The adapters' ledger: every change to another library is recorded and undone by identity.

Behaviours proved here, on throw-away modules (no adapter target needed):

* an attribute patch returns the original and undo puts that very object back;
  a name that does not exist is refused with an AdapterError naming it, and
  nothing is recorded;
* ``patch_everywhere`` also patches copies of the original in the other modules of
  the same package (not outside it), checks every name before patching any, and
  undo restores the copies, including copies made after the patch;
* ``setitem`` patches a mapping item: undo restores the previous value, or removes
  the key when there was none (the MISSING sentinel);
* on undo, an attribute or item that someone replaced after us is restored anyway
  and an AdapterError names every such target;
* ``swapped`` binds module globals for a block only (bypassing module-class
  properties), reports the values they had at the end, and refuses a missing name;
* the module class swap is undone; undo by owner leaves other owners alone;
* ``adapters.uninstall()`` finishes undoing every adapter before it raises for a
  conflict in one of them.
"""

from __future__ import annotations

import copy
import pickle
import sys
import types
from typing import Iterator

import pytest

from scoped_parallel.adapters._ledger import MISSING, Ledger, _Missing
from scoped_parallel.errors import AdapterError


def original_getter() -> str:
    return "original"


def replacement_getter() -> str:
    return "replacement"


@pytest.fixture
def package(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, types.ModuleType]]:
    """``fakepkg`` (defining ``getter``), ``fakepkg.reexport`` holding a copy, and ``other``
    (outside the package) holding another copy; all registered in ``sys.modules``."""
    modules = {
        "fakepkg": types.ModuleType("fakepkg"),
        "fakepkg.reexport": types.ModuleType("fakepkg.reexport"),
        "other": types.ModuleType("other"),
    }
    modules["fakepkg"].getter = original_getter
    modules["fakepkg"].alias = original_getter  # an in-module alias
    modules["fakepkg"].value = 1
    modules["fakepkg.reexport"].getter_copy = original_getter
    modules["other"].getter = original_getter
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield modules


# ---------------------------------------------------------------------- attributes


def test_patch_returns_the_original_and_undo_restores_it_by_identity(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    got = ledger.patch("owner", pkg, "getter", replacement_getter)
    assert got is original_getter, f"patch returned {got!r}, expected the original function"
    assert pkg.getter is replacement_getter
    assert ledger.owners() == ("owner",)
    ledger.undo("owner")
    assert pkg.getter is original_getter, f"after undo fakepkg.getter is {pkg.getter!r}"
    assert ledger.owners() == ()


def test_patch_of_a_missing_attribute_is_refused_naming_it(package):
    ledger = Ledger()
    with pytest.raises(AdapterError, match=r"owner: cannot patch fakepkg\.renamed_getter") as info:
        ledger.patch("owner", package["fakepkg"], "renamed_getter", replacement_getter)
    assert "'owner'" in str(info.value), f"the message should name the adapter: {info.value}"
    assert ledger.records() == [], "a refused patch must not be recorded"
    assert not hasattr(package["fakepkg"], "renamed_getter"), "a refused patch must not set anything"


def test_patch_everywhere_patches_copies_inside_the_package_only(package):
    ledger = Ledger()
    pkg, reexport, other = package["fakepkg"], package["fakepkg.reexport"], package["other"]
    alias_replacement = lambda: "alias"  # noqa: E731
    originals = ledger.patch_everywhere(
        "owner", pkg, {"getter": replacement_getter, "alias": alias_replacement}, package="fakepkg"
    )
    assert originals == {"getter": original_getter, "alias": original_getter}
    assert pkg.getter is replacement_getter and pkg.alias is alias_replacement, "each name gets its own"
    assert reexport.getter_copy is replacement_getter, "a copy in the package gets the first name's"
    assert other.getter is original_getter, "a module outside the package must stay untouched"
    ledger.undo()
    state = (pkg.getter, pkg.alias, reexport.getter_copy)
    assert state == (original_getter,) * 3, f"after undo: {state}"


def test_patch_everywhere_checks_every_name_before_patching_any(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    with pytest.raises(AdapterError, match=r"fakepkg\.gone"):
        ledger.patch_everywhere("owner", pkg, {"getter": replacement_getter, "gone": None}, package="fakepkg")
    assert pkg.getter is original_getter and package["fakepkg.reexport"].getter_copy is original_getter
    assert ledger.records() == []


def test_undo_restores_copies_made_after_the_patch(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    ledger.patch("owner", pkg, "getter", replacement_getter)
    late = package["other"]
    late.late_copy = pkg.getter  # `from fakepkg import getter` while patched
    ledger.undo()
    assert late.late_copy is original_getter, f"the late copy is {late.late_copy!r} after undo"


def test_attribute_replaced_by_someone_else_is_restored_and_reported(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    ledger.patch("owner", pkg, "getter", replacement_getter)
    ledger.patch("owner", pkg, "value", 2)
    pkg.getter = lambda: "someone else's"
    with pytest.raises(AdapterError, match=r"fakepkg\.getter") as info:
        ledger.undo("owner")
    assert "fakepkg.value" not in str(info.value), f"only the replaced target is named: {info.value}"
    assert pkg.getter is original_getter and pkg.value == 1, "every original is restored anyway"
    assert ledger.records() == []


def test_undo_of_one_owner_leaves_the_others_patched(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    ledger.patch("first", pkg, "getter", replacement_getter)
    ledger.patch("second", pkg, "value", 2)
    ledger.undo("first")
    assert (pkg.getter, pkg.value) == (original_getter, 2)
    assert ledger.owners() == ("second",)
    ledger.undo()
    assert pkg.value == 1


# ---------------------------------------------------------------------- mapping items


def test_setitem_patch_and_undo_restore_the_previous_value():
    ledger, registry = Ledger(), {"sdpa": original_getter}
    previous = ledger.setitem("owner", registry, "sdpa", replacement_getter, label="REGISTRY")
    assert previous is original_getter
    assert registry["sdpa"] is replacement_getter
    ledger.undo()
    assert registry == {"sdpa": original_getter}, f"registry after undo: {registry}"


def test_setitem_of_a_new_key_returns_missing_and_undo_removes_the_key():
    ledger, registry = Ledger(), {"other": 1}
    previous = ledger.setitem("owner", registry, "sdpa", replacement_getter)
    assert previous is MISSING, f"setitem of a new key returned {previous!r}, expected MISSING"
    ledger.undo()
    assert registry == {"other": 1}, f"registry after undo: {registry} (the new key must be gone)"


def test_setitem_replaced_by_someone_else_is_restored_and_reported_with_its_label():
    ledger, registry = Ledger(), {"sdpa": original_getter}
    ledger.setitem("owner", registry, "sdpa", replacement_getter, label="ALL_ATTENTION_FUNCTIONS")
    registry["sdpa"] = lambda: "someone else's"
    with pytest.raises(AdapterError, match=r"ALL_ATTENTION_FUNCTIONS\['sdpa'\]"):
        ledger.undo()
    assert registry["sdpa"] is original_getter


def test_setitem_whose_entry_was_deleted_is_reported_and_restored():
    ledger, registry = Ledger(), {}
    ledger.setitem("owner", registry, "sdpa", replacement_getter, label="REGISTRY")
    del registry["sdpa"]
    with pytest.raises(AdapterError, match=r"REGISTRY\['sdpa'\]"):
        ledger.undo()
    assert registry == {}


def test_missing_is_one_falsy_sentinel():
    assert MISSING is _Missing() and not MISSING and repr(MISSING) == "MISSING"
    assert copy.copy(MISSING) is MISSING and copy.deepcopy(MISSING) is MISSING
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING


# ---------------------------------------------------------------------- temporary swaps and classes


def test_swapped_binds_globals_for_the_block_and_reports_their_final_values(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    with ledger.swapped("owner", pkg, {"value": 10}) as after:
        assert pkg.value == 10
        pkg.value = 11  # code in the block rebinds the global
        assert after == {}, "the final values are only known when the block ends"
    assert pkg.value == 1, f"after the block fakepkg.value is {pkg.value}, expected 1"
    assert after == {"value": 11}, f"reported final values {after}, expected {{'value': 11}}"
    assert ledger.records() == [], "a temporary swap is not kept in the ledger"


def test_swapped_restores_when_the_block_raises(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    with pytest.raises(RuntimeError), ledger.swapped("owner", pkg, {"value": 10}):
        raise RuntimeError("creator failed")
    assert pkg.value == 1


def test_swapped_refuses_a_missing_name_before_changing_anything(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    with pytest.raises(AdapterError, match=r"fakepkg\.expert_groups"):
        with ledger.swapped("owner", pkg, {"value": 10, "expert_groups": {}}):
            pytest.fail("the block must not run")
    assert pkg.value == 1


def test_module_class_swap_is_undone_and_swapped_bypasses_its_properties(package):
    ledger, pkg = Ledger(), package["fakepkg"]
    original_class = type(pkg)

    class Scoped(types.ModuleType):
        @property
        def value(self) -> str:  # shadows the module global, as the DeepSpeed adapter's mpu
            return "property"

    ledger.swap_module_class("owner", pkg, Scoped)
    assert pkg.value == "property"
    with ledger.swapped("owner", pkg, {"value": 10}):
        assert vars(pkg)["value"] == 10, "swapped writes the module __dict__, not the property"
    ledger.undo()
    assert type(pkg) is original_class and pkg.value == 1


# ---------------------------------------------------------------------- adapters.uninstall


def test_uninstall_undoes_every_adapter_before_raising_a_conflict():
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core.parallel_state")
    import warnings

    from scoped_parallel import adapters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed.utils.groups as groups
        from megatron.core import parallel_state as ps

    megatron_before = ps.get_data_parallel_group
    deepspeed_before = vars(groups)["_get_data_parallel_group"]
    adapters.install(targets=("deepspeed", "megatron"))
    ps.get_data_parallel_group = lambda *a, **k: "someone else's"
    with pytest.raises(AdapterError, match=r"parallel_state\.get_data_parallel_group"):
        adapters.uninstall()
    assert not adapters.is_installed(), "every adapter must be undone despite the conflict"
    assert ps.get_data_parallel_group is megatron_before
    assert vars(groups)["_get_data_parallel_group"] is deepspeed_before
    assert not adapters.is_strict()
