"""scoped_parallel.testing as a pytest plugin for the library's users."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_guard_fails_a_test_that_leaks_a_scope(pytester):
    """The scoped_parallel_guard fixture turns a leaked scope into a test error."""
    pytester.makeconftest('pytest_plugins = ["scoped_parallel.testing"]')
    pytester.makepyfile(
        """
        from scoped_parallel._scope import Activation

        class S:
            name = "leaky"

        def test_leaks(scoped_parallel_guard):
            Activation(S()).__enter__()

        def test_clean(scoped_parallel_guard):
            with Activation(S()):
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*scopes are still active*"])


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
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
