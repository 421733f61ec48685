"""The DeepSpeed cells of the engine x dimension matrix (``tests/_matrix.py``), 4 gloo ranks.

Each test runs its cells in one world call (kept to a few minutes) and checks each cell
by its status: a proven cell's model, trained interleaved with a partner of another
layout, equals the same model trained alone by vanilla DeepSpeed with a hand-written mpu,
bit for bit (losses, gradient norms, every final parameter), and the vanilla run's groups
are the state's; a refused cell raises the named typed error on every rank before any
group is created; for a cell vanilla DeepSpeed cannot run here, the vanilla error is
recorded. ``test_sabotage_is_caught`` shows the comparison fails when a model steps in
its partner's scope.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("deepspeed")

from _matrix import DS_TESTS, cells_of, check_cell  # noqa: E402
from _matrix_deepspeed import rank_cells  # noqa: E402

pytestmark = [pytest.mark.world, pytest.mark.slow]
TIMEOUT = 900


def _results(world: Any, test: str) -> dict[str, Any]:
    names = cells_of(f"{DS_TESTS}::{test}")
    return {"names": names, "ranks": world.run(rank_cells, names, timeout=TIMEOUT)}


@pytest.fixture(scope="module")
def zero(world):
    return _results(world, "test_zero_cells")


@pytest.fixture(scope="module")
def precision_and_zeropp(world):
    return _results(world, "test_precision_and_zeropp_cells")


@pytest.fixture(scope="module")
def sequence_and_refused(world):
    return _results(world, "test_sequence_and_refused_cells")


@pytest.mark.parametrize("name", cells_of(f"{DS_TESTS}::test_zero_cells"))
def test_zero_cells(zero, name):
    """ZeRO 0-3 with DP=4 and with TP=2 (the state as mpu): bitwise equal to vanilla alone."""
    check_cell(name, zero["ranks"])


@pytest.mark.parametrize("name", cells_of(f"{DS_TESTS}::test_precision_and_zeropp_cells"))
def test_precision_and_zeropp_cells(precision_and_zeropp, name):
    """bf16 engines and ZeRO++: proven, or vanilla's own error recorded."""
    check_cell(name, precision_and_zeropp["ranks"])


@pytest.mark.parametrize("name", cells_of(f"{DS_TESTS}::test_sequence_and_refused_cells"))
def test_sequence_and_refused_cells(sequence_and_refused, name):
    """The engine's Ulysses SP x DP groups, and context parallelism refused before any group."""
    check_cell(name, sequence_and_refused["ranks"])


SABOTAGED = "DeepSpeed: ZeRO-0, TP=2 (state as mpu)"


def test_sabotage_is_caught(world):
    """The same comparison fails when the cell's model steps in its partner's scope (DP=4 groups)."""
    per_rank = world.run(rank_cells, [SABOTAGED], True, timeout=TIMEOUT)
    found = [out[SABOTAGED]["problems"] for out in per_rank]
    assert all(found), f"stepping in the partner's scope went unnoticed on some rank: {found}"


@pytest.fixture(scope="module")
def autotp_and_moe(world):
    return _results(world, "test_autotp_and_moe_cells")


@pytest.mark.parametrize("name", cells_of(f"{DS_TESTS}::test_autotp_and_moe_cells"))
def test_autotp_and_moe_cells(autotp_and_moe, name):
    """AutoTP and DeepSpeed MoE: the engine's layers hold DeepSpeed's own groups, training bitwise as vanilla."""
    check_cell(name, autotp_and_moe["ranks"])
