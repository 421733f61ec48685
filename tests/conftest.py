"""Shared fixtures: the library's own leak guard on every test, and one reusable 4-rank gloo world."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import pytest

from _world import World  # the helpers are importable: pyproject's pytest `pythonpath = ["tests"]`

pytest_plugins = ["scoped_parallel.testing"]

# One JIT extension cache per virtual environment: its build commands hold the venv's
# paths, so a cache shared by two venvs (or checkouts) is rebuilt at every switch.
_VENV_KEY = hashlib.sha1(sys.prefix.encode(), usedforsecurity=False).hexdigest()[:10]
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), f"scoped_parallel_torch_ext_{_VENV_KEY}")
)


@pytest.fixture(autouse=True)
def _guard_every_test(scoped_parallel_guard):
    """Every test runs under the project's own leak guard (scoped_parallel.testing).

    Equivalent to ``scoped_parallel_guard = true`` in the pytest ini options; both at
    once are harmless (pytest sets the fixture up once per test).
    """


def _prebuild_deepspeed_extension() -> None:
    """Build DeepSpeed's shared-memory comm extension once, in one process, before any rank starts.

    DeepSpeed's first ``init_distributed`` JIT-builds it (about a minute, cached per venv
    afterwards); four ranks doing it at once wait on one file lock, which on a fresh or busy
    machine spent the first world call's deadline. A subprocess, so this test process never
    imports DeepSpeed; without DeepSpeed (or if the build fails) the ranks proceed as before.
    """
    import subprocess

    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    try:
        subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=900, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        pass


@pytest.fixture(scope="session")
def _deepspeed_extension_built() -> None:
    _prebuild_deepspeed_extension()


@pytest.fixture(scope="module")
def world(_deepspeed_extension_built):
    """One 4-rank gloo world shared by the tests of one file (started at the first call).

    Per file, not per session: vanilla Megatron and DeepSpeed runs leave gloo groups alive
    (their sockets and threads), and after some 2,000 tests in one world, group creation in a
    later file failed now and then ("Gloo connectFullMesh failed ... Connection closed by
    peer", 1-5 tests per fresh-clone run, in files that pass alone every time); fresh
    processes per file bound what one file can leave to the next, for a few seconds of start-up each.
    """
    w = World(4, env={"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "OMP_NUM_THREADS": "1"})
    yield w
    w.close()


def pytest_collection_modifyitems(config, items):
    """A test that uses the shared world must say so (``-m "not world"`` is the quick tier)."""
    unmarked = [item.nodeid for item in items if "world" in getattr(item, "fixturenames", ()) and item.get_closest_marker("world") is None]
    if unmarked:
        raise pytest.UsageError(f"tests use the `world` fixture without the `world` mark: {unmarked}")
