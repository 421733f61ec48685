"""Shared fixtures: the leak guard and one reusable 4-rank gloo world."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _world import World  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "scoped_parallel_torch_ext"))


@pytest.fixture(autouse=True)
def _no_leaked_scope_or_group():
    """Fail a test that leaves an active scope or a live process group behind."""
    from scoped_parallel import _scope

    assert _scope.current_state_or_none() is None, "a scope was active before the test"
    before = _live_groups()
    yield
    leaked_scope = _scope.active_states()
    leaked_groups = _live_groups() - before
    if leaked_scope:
        _scope._forget_all_scopes()  # report once; later tests start clean
    assert not leaked_scope, f"the test left scopes active: {leaked_scope}"
    assert leaked_groups == 0, f"the test left {leaked_groups} process group(s) alive"


def _live_groups() -> int:
    if "scoped_parallel._groups" not in sys.modules:
        return 0
    return sys.modules["scoped_parallel._groups"].live_groups()


@pytest.fixture(scope="session")
def world():
    """One 4-rank gloo world shared by every test that asks for it."""
    w = World(4, env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "OMP_NUM_THREADS": "1"})
    yield w
    w.close()
