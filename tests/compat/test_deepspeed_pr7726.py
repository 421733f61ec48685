"""DeepSpeed PR #7726's own test file, unmodified, in DeepSpeed's own harness, against our compat modules.

Needs a DeepSpeed checkout at the PR's head (``git fetch origin pull/7726/head &&
git checkout FETCH_HEAD`` in a DeepSpeed clone) named by the environment variable
``DEEPSPEED_PR7726``; skipped without it. pytest runs
``tests/unit/utils/test_parallel_state.py`` from that checkout's ``tests`` folder with
DeepSpeed's own ``conftest.py`` and ``DistributedTest`` (4 processes on 127.0.0.1 per
test, gloo, ``LOCAL_SIZE=4`` so that the CPU accelerator counts four devices), and with
``tests/compat/_deepspeed_pr_glue`` first on ``PYTHONPATH``: the PR's module names resolve to
``scoped_parallel.compat`` and the one hub model the file loads is built from its config.
The released DeepSpeed installed here runs the engines; only the PR's two new modules
are replaced.

Run twice: as is, and with :func:`scoped_parallel.adapters.install` called before the
first test body builds anything. Both must pass every test of the file. With
``SP_PR_MODULES=<checkout>`` instead, the glue loads the PR's own modules (the baseline).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GLUE = HERE / "_deepspeed_pr_glue"
TEST_FILE = Path("unit") / "utils" / "test_parallel_state.py"
#: the PR's test file at its head commit holds 16 tests (7 + 2 + 2 + 1 + 4 parametrised)
EXPECTED_TESTS = 16


def _checkout() -> Path:
    root = Path(os.environ.get("DEEPSPEED_PR7726") or "/nonexistent") / "tests"
    if not (root / TEST_FILE).is_file():
        pytest.skip("set DEEPSPEED_PR7726 to a DeepSpeed checkout at PR #7726's head to run its test file")
    return root


def run_pr_tests(tests: Path, adapters: bool, timeout: float = 2400) -> str:
    """pytest's output for the PR's file (DeepSpeed's harness starts and ends its own processes)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(GLUE), os.environ.get("PYTHONPATH", "")]),
        SP_PR_MODULES="scoped",
        SP_PR_ADAPTERS="1" if adapters else "0",
        LOCAL_SIZE="4",
        OMP_NUM_THREADS="1",
        DS_UNITTEST_TIMEOUT="600",
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", str(TEST_FILE)]
    done = subprocess.run(cmd, cwd=tests, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return done.stdout


def summary(output: str) -> dict[str, int]:
    """pytest's last summary line as {outcome: count}."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", lines[-1] if lines else "")}


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [False, True], ids=["as-is", "adapters-installed"])
def test_the_prs_own_test_file_passes_against_compat(adapters):
    """All 16 tests of the PR's file pass against scoped_parallel.compat, with and without the adapters."""
    output = run_pr_tests(_checkout(), adapters)
    got = summary(output)
    assert got == {"passed": EXPECTED_TESTS}, f"expected {EXPECTED_TESTS} passed, got {got}:\n{output[-6000:]}"
