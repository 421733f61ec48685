"""Test helpers for users of scoped_parallel (and for its own tests).

* :func:`fake_world` — act as rank ``r`` of an ``N``-rank world in one process,
  with torch's ``fake`` backend: group construction can be checked at 8,192+
  ranks without processes. Collectives do nothing there; it proves layouts and
  creation counts, never training behaviour.
* :func:`assert_clean` — raise if any scope is active or any scoped_parallel
  process group is alive (for the end of a program or a ``tearDown``).
* the ``scoped_parallel_guard`` pytest fixture — fail a test that leaks:

  1. no scope may be active when the test starts or ends (a leaked scope is
     reported once and then forgotten, so the next test starts clean);
  2. the test may not leave more live scoped_parallel process groups than it
     found (groups held by module- or session-scoped fixtures are allowed).

Load the plugin from a ``conftest.py`` with ``pytest_plugins = ["scoped_parallel.testing"]``;
then request ``scoped_parallel_guard`` in a test, or guard every test with the ini option
``scoped_parallel_guard = true`` (``[tool.pytest.ini_options]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["assert_clean", "fake_world", "live_process_groups", "scoped_parallel_guard"]

# The ini option that applies ``scoped_parallel_guard`` to every test of a suite.
_GUARD_INI = "scoped_parallel_guard"


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """Initialize torch.distributed with the ``fake`` backend as ``rank`` of ``world_size``.

    The default group is destroyed on exit. Raises if torch.distributed is
    already initialized (a real world must not be replaced under a test).
    """
    import torch.distributed as dist

    from scoped_parallel.groups.torch_compat import fake_store

    if dist.is_initialized():
        raise RuntimeError("fake_world(): torch.distributed is already initialized in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"fake_world(): rank {rank} is outside 0..{world_size - 1}")
    dist.init_process_group("fake", store=fake_store(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def live_process_groups() -> int:
    """Process groups created by scoped_parallel that are still alive in this process."""
    from scoped_parallel.groups import create as _groups

    return _groups.live_groups()


def assert_clean() -> None:
    """Raise AssertionError if a scope is active or any scoped_parallel group is alive.

    This is the absolute check, for the end of a program or a ``unittest`` ``tearDown``.
    The ``scoped_parallel_guard`` fixture is more lenient about groups: it allows the
    ones that existed before the test (see the module docstring).
    """
    _check_no_scope("are still active")
    live = live_process_groups()
    if live:
        raise AssertionError(f"{live} scoped_parallel process group(s) are still alive; call state.destroy()")


def _check_no_scope(when: str) -> None:
    """Raise AssertionError naming the active scopes, if any, after forgetting them.

    Forgetting them means a leak is reported once: whatever runs next starts clean.
    """
    from scoped_parallel.scope import _forget_all_scopes, active_states

    states = active_states()
    if states:
        _forget_all_scopes()
        raise AssertionError(f"scopes {when}: {states!r}; leave every `with state.activate():` block")


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """The guard's rules around one test (see the module docstring)."""
    _check_no_scope("were already active when the test started (left by a fixture or an unguarded test)")
    before = live_process_groups()
    yield
    _check_no_scope("are still active after the test")
    after = live_process_groups()
    if after > before:
        raise AssertionError(
            f"the test left {after - before} more scoped_parallel process group(s) alive than it found "
            f"({before} before, {after} after); call state.destroy() on the states it builds"
        )


try:  # the pytest parts are only defined when pytest is importable
    import pytest

    def pytest_addoption(parser: Any) -> None:
        """Register the ``scoped_parallel_guard`` ini option (pytest hook)."""
        parser.addini(
            _GUARD_INI,
            type="bool",
            default=False,
            help="apply the scoped_parallel_guard fixture to every test (scoped_parallel.testing)",
        )

    @pytest.fixture
    def scoped_parallel_guard() -> Iterator[None]:
        """Fail the test if it leaks an active scope or live process groups.

        No scope may be active at the start or the end of the test (a leaked scope is
        reported once, then forgotten so later tests start clean), and the test may not
        leave more live scoped_parallel process groups than it found.
        """
        with _guarded():
            yield

    @pytest.fixture(autouse=True)
    def _scoped_parallel_guard_every_test(request: Any) -> None:
        """Apply ``scoped_parallel_guard`` to every test when the ini option is true."""
        if request.config.getini(_GUARD_INI):
            request.getfixturevalue("scoped_parallel_guard")

except ImportError:  # pragma: no cover
    pass
