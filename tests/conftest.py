"""Shared fixtures: the library's own leak guard on every test, and one reusable 4-rank gloo world."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _world import World  # noqa: E402

pytest_plugins = ["scoped_parallel.testing"]

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "scoped_parallel_torch_ext"))


@pytest.fixture(autouse=True)
def _guard_every_test(scoped_parallel_guard):
    """Every test runs under the project's own leak guard (scoped_parallel.testing).

    Equivalent to ``scoped_parallel_guard = true`` in the pytest ini options; both at
    once are harmless (pytest sets the fixture up once per test).
    """


@pytest.fixture(scope="session")
def world():
    """One 4-rank gloo world shared by every test that asks for it."""
    w = World(4, env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "OMP_NUM_THREADS": "1"})
    yield w
    w.close()
