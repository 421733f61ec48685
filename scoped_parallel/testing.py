"""Test helpers for users of scoped_parallel (and for its own tests).

* :func:`fake_world` — act as rank ``r`` of an ``N``-rank world in one process,
  with torch's ``fake`` backend: group construction can be checked at 8,192+
  ranks without processes. Collectives do nothing there; it proves layouts and
  creation counts, never training behaviour.
* :func:`assert_clean` and the ``scoped_parallel_guard`` pytest fixture — fail a
  test that leaves an active scope or a live process group behind.

Enable the fixture in a ``conftest.py`` with ``pytest_plugins = ["scoped_parallel.testing"]``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["assert_clean", "fake_world", "live_process_groups", "scoped_parallel_guard"]


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """Initialize torch.distributed with the ``fake`` backend as ``rank`` of ``world_size``.

    The default group is destroyed on exit. Raises if torch.distributed is
    already initialized (a real world must not be replaced under a test).
    """
    import torch.distributed as dist

    # FakeStore lives in torch's private testing package; this is the one place we touch it.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_world(): torch.distributed is already initialized in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"fake_world(): rank {rank} is outside 0..{world_size - 1}")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def live_process_groups() -> int:
    """Process groups created by scoped_parallel that are still alive in this process."""
    from scoped_parallel import _groups

    return _groups.live_groups()


def assert_clean() -> None:
    """Raise AssertionError if a scope is active or a scoped_parallel group is alive."""
    from scoped_parallel._scope import active_states

    states = active_states()
    if states:
        raise AssertionError(f"scopes are still active: {states!r}")
    live = live_process_groups()
    if live:
        raise AssertionError(f"{live} scoped_parallel process group(s) are still alive; call state.destroy()")


try:  # the fixture is only defined when pytest is importable
    import pytest

    @pytest.fixture
    def scoped_parallel_guard() -> Iterator[None]:
        """Fail the test if it leaves an active scope or a live process group behind.

        A leaked scope is reported once and then forgotten, so later tests start clean.
        """
        assert_clean()
        yield
        try:
            assert_clean()
        except AssertionError:
            from scoped_parallel._scope import _forget_all_scopes

            _forget_all_scopes()
            raise

except ImportError:  # pragma: no cover
    pass


