"""The megatron-core cells of the engine x dimension matrix (``tests/_matrix.py``), 4 gloo ranks.

Each test runs its cells in one world call (well under a minute here) and checks each
cell by its status: a proven cell's GPTModel, in megatron-core's DistributedDataParallel
with its optimizer (plain DDP with Adam, or the distributed optimizer), trained through
Megatron's own schedule interleaved with a partner GPTModel in a state of another layout,
equals the same model trained alone by vanilla Megatron (``initialize_model_parallel``
with the same sizes, no adapter) bit for bit: losses, the gradient norms
``optimizer.step()`` returns, every final parameter; every parameter moved, and the
groups ``parallel_state`` answers in the state's scope are those of vanilla Megatron's
globals. For a cell vanilla megatron-core cannot run here, its error is recorded.
``test_sabotage_is_caught`` shows the comparison fails when the model steps in its
partner's scope, or is wrapped in DDP with its optimizer in its partner's scope.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("megatron.core.distributed")

from _matrix import MEG_TESTS, cells_of, check_cell  # noqa: E402
from _matrix_megatron import rank_cells  # noqa: E402

from _megatron_ddp import ddp_cpu_skip_reason  # noqa: E402

_SKIP = ddp_cpu_skip_reason()
pytestmark = [pytest.mark.world, pytest.mark.slow, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]
TIMEOUT = 600


def _results(world: Any, test: str) -> dict[str, Any]:
    names = cells_of(f"{MEG_TESTS}::{test}")
    return {"names": names, "ranks": world.run(rank_cells, names, timeout=TIMEOUT)}


@pytest.fixture(scope="module")
def tensor(world):
    return _results(world, "test_tensor_cells")


@pytest.fixture(scope="module")
def pipeline(world):
    return _results(world, "test_pipeline_cells")


@pytest.fixture(scope="module")
def expert_and_context(world):
    return _results(world, "test_expert_and_context_cells")


@pytest.mark.parametrize("name", cells_of(f"{MEG_TESTS}::test_tensor_cells"))
def test_tensor_cells(tensor, name):
    """TP=2 x DP=2, with and without sequence parallelism: bitwise equal to vanilla Megatron alone."""
    check_cell(name, tensor["ranks"])


@pytest.mark.parametrize("name", cells_of(f"{MEG_TESTS}::test_pipeline_cells"))
def test_pipeline_cells(pipeline, name):
    """PP=2 (1F1B) and PP=2 x VPP=2 (interleaved 1F1B), tied embeddings: bitwise equal to vanilla Megatron alone."""
    check_cell(name, pipeline["ranks"])


@pytest.mark.parametrize("name", cells_of(f"{MEG_TESTS}::test_expert_and_context_cells"))
def test_expert_and_context_cells(expert_and_context, name):
    """EP=2 MoE proven bitwise; CP=2: vanilla megatron-core's own error recorded."""
    check_cell(name, expert_and_context["ranks"])


SABOTAGED = [
    "megatron-core: GPTModel TP=2 (DP=2), DDP + Adam",
    "megatron-core: GPTModel TP=2 (DP=2), distributed optimizer",
]


@pytest.mark.parametrize("sabotage", ["step", "build"])
def test_sabotage_is_caught(world, sabotage):
    """The same comparison fails when the TP=2 model steps in its partner's (DP=4) scope, or gets
    its DDP wrapper and optimizer there: a pipeline-free cell, so the wrong scope cannot hang the world."""
    per_rank = world.run(rank_cells, SABOTAGED, sabotage, timeout=TIMEOUT)
    for name in SABOTAGED:
        found = [out[name]["problems"] for out in per_rank]
        assert all(found), f"{name}: sabotage {sabotage!r} went unnoticed on some rank: {found}"
