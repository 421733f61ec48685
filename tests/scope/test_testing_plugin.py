"""scoped_parallel.testing as a pytest plugin for the library's users.

Proves, in pytester subprocesses: the guard fails a test that leaks an active scope
or live process groups (as a teardown error naming the leak), a leaked scope is
forgotten so the next test passes, groups held by a module-scoped fixture are
allowed, the ini option guards every test while without it the guard is opt-in, and
``fake_world(N, r)`` builds rank r's view of an N-rank world.
"""

from __future__ import annotations

pytest_plugins = ["pytester"]

# A module-scoped fixture holding a state (and so its process groups) across tests,
# as a user's suite may; the guard must not blame the tests for those groups.
HELD_STATE = """
import pytest

from scoped_parallel import ParallelState, current_state_or_none
from scoped_parallel.testing import fake_world


@pytest.fixture(scope="module")
def held():
    with fake_world(8, 0):
        state = ParallelState(name="held", tensor_model_parallel_size=2)
        yield state
        state.destroy()
"""


def _run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)


def test_ini_option_guards_every_test_against_leaked_scopes_and_groups(pytester):
    """With ``scoped_parallel_guard = true`` a leaking test errors, a clean one and the next one pass."""
    pytester.makeconftest('pytest_plugins = ["scoped_parallel.testing"]')
    pytester.makeini("[pytest]\nscoped_parallel_guard = true\n")
    pytester.makepyfile(
        HELD_STATE
        + """

def test_clean_uses_the_held_groups(held):
    with held.activate():
        assert current_state_or_none() is held


def test_leaks_a_scope(held):
    held.activate().__enter__()


def test_after_a_scope_leak_starts_clean(held):
    assert current_state_or_none() is None


def test_leaks_groups(held):
    ParallelState(name="never_destroyed", tensor_model_parallel_size=4)


def test_after_a_group_leak_is_not_blamed_for_it(held):
    state = ParallelState(name="tidy", tensor_model_parallel_size=4)
    state.destroy()
"""
    )
    result = _run(pytester)
    # a leak is a teardown error: the test's call itself passed (5 passed calls, 2 errors)
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_scope*",
            "E * AssertionError: scopes are still active after the test: (ParallelState('held'*",
            "*ERROR at teardown of test_leaks_groups*",
            "E * AssertionError: the test left * more scoped_parallel process group(s) alive than it found (* before, * after)*",
        ]
    )
    result.stdout.fnmatch_lines_random(
        [
            "PASSED *::test_clean_uses_the_held_groups",
            "PASSED *::test_after_a_scope_leak_starts_clean",
            "PASSED *::test_after_a_group_leak_is_not_blamed_for_it",
        ]
    )
    result.stdout.no_fnmatch_line("ERROR *::test_after_*")
    result.stdout.no_fnmatch_line("ERROR *::test_clean_*")


def test_fixture_guards_only_the_tests_that_request_it(pytester):
    """Without the ini option, only tests requesting the fixture are guarded; a scope leaked before one fails its setup."""
    pytester.makeconftest('pytest_plugins = ["scoped_parallel.testing"]')
    pytester.makepyfile(
        HELD_STATE
        + """

def test_unguarded_leak_passes(held):
    held.activate().__enter__()


def test_guarded_after_an_unguarded_leak(held, scoped_parallel_guard):
    pass


def test_guarded_and_clean(held, scoped_parallel_guard):
    with held.activate():
        pass
"""
    )
    result = _run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_guarded_after_an_unguarded_leak*",
            "E * AssertionError: scopes were already active when the test started*",
        ]
    )
    result.stdout.fnmatch_lines_random(["PASSED *::test_unguarded_leak_passes", "PASSED *::test_guarded_and_clean"])
    result.stdout.no_fnmatch_line("ERROR *::test_guarded_and_clean")


def test_fake_world_builds_a_state_as_rank_r_of_n(pytester):
    """fake_world(N, r) lets one process build rank r's groups of an N-rank world."""
    pytester.makepyfile(
        """
        from scoped_parallel import ParallelState
        from scoped_parallel.testing import fake_world

        def test_rank_view():
            with fake_world(4096, 4095):
                s = ParallelState(tensor_model_parallel_size=8)
                assert s.get_tensor_model_parallel_rank() == 7
                assert s.get_data_parallel_world_size() == 512
                s.destroy()
        """
    )
    result = _run(pytester)
    result.assert_outcomes(passed=1)
