"""The engine x dimension matrix: every cell, what it ends in, and the test that shows it.

A cell is one engine (DeepSpeed or megatron-core) with one parallel dimension (a ZeRO
stage, TP, a pipeline, experts, ...) in a state of that layout, trained interleaved with
a partner model in a state of another layout. Every cell ends in exactly one of:

``proven``
    losses, gradient norms and final parameters of the model trained interleaved in its
    scope equal, bit for bit, those of the same model trained alone by the vanilla
    engine (adapters not installed, the user's own groups) in the same layout: both runs
    do the same arithmetic on the same shapes, so bitwise is the right claim on any CPU.
``refused``
    the library raises a typed error naming the value and the fix before any group is
    created or any collective runs.
``vanilla cannot run here``
    the vanilla engine itself fails for this cell on this machine (the error is
    recorded in ``expect``); nothing of ours is claimed.

``docs/matrix.rst`` is rendered from :data:`CELLS` (``tests/matrix/test_matrix_catalogue.py``
keeps the two equal) and every cell names the test that shows its status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

PROVEN = "proven"
REFUSED = "refused"
VANILLA_FAILS = "vanilla cannot run here"
STATUSES = (PROVEN, REFUSED, VANILLA_FAILS)


@dataclass(frozen=True)
class Cell:
    """One engine x dimension cell (see the module doc)."""

    engine: str
    dimension: str
    #: the cell model's state sizes (ParallelState keywords), 4 ranks
    layout: Mapping[str, int]
    #: the partner model's state sizes (another layout)
    partner: Mapping[str, int]
    status: str
    #: the test (file::name) whose world run shows the status
    test: str
    #: the engine's settings for this cell (runner-specific: ZeRO stage, model kind, config)
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: REFUSED: the error type and a fragment of its message; VANILLA_FAILS: the same for the vanilla error
    expect: tuple[str, str] = ("", "")
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.engine}: {self.dimension}"


def _sizes(layout: Mapping[str, int]) -> str:
    short = {
        "tensor_model_parallel_size": "TP",
        "pipeline_model_parallel_size": "PP",
        "expert_model_parallel_size": "EP",
        "expert_tensor_parallel_size": "ETP",
        "sequence_parallel_size": "SP",
        "context_parallel_size": "CP",
        "virtual_pipeline_model_parallel_size": "VPP",
    }
    parts = [f"{short.get(k, k)}={v}" for k, v in layout.items()]
    return " x ".join(parts) if parts else "DP=4"


DS = "DeepSpeed"
MEG = "megatron-core"
DS_TESTS = "tests/matrix/test_matrix_deepspeed.py"
EXPERTS_TESTS = "tests/adapters/deepspeed/test_adapter_deepspeed_experts.py"
PIPELINE_TESTS = "tests/adapters/deepspeed/test_adapter_deepspeed_pipeline.py"
MEG_TESTS = "tests/matrix/test_matrix_megatron.py"
TP2: dict[str, int] = {"tensor_model_parallel_size": 2}
DP4: dict[str, int] = {}


def _deepspeed_cells() -> list[Cell]:
    cells = []
    for stage in (0, 1, 2, 3):
        cells.append(Cell(DS, f"ZeRO-{stage}, DP=4", DP4, TP2, PROVEN, f"{DS_TESTS}::test_zero_cells",
                          {"kind": "mlp", "stage": stage}))
        cells.append(Cell(DS, f"ZeRO-{stage}, TP=2 (state as mpu)", TP2, DP4, PROVEN, f"{DS_TESTS}::test_zero_cells",
                          {"kind": "mlp", "stage": stage}))
    cells += [
        Cell(DS, "ZeRO-1, bf16", TP2, DP4, PROVEN, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 1, "config": {"bf16": {"enabled": True}}}),
        Cell(DS, "ZeRO-2, bf16", DP4, TP2, PROVEN, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 2, "config": {"bf16": {"enabled": True}}}),
        Cell(DS, "ZeRO-3, bf16", TP2, DP4, PROVEN, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 3, "config": {"bf16": {"enabled": True}}}),
        Cell(DS, "ZeRO++ hpZ=2, ZeRO-3", DP4, TP2, PROVEN, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 3, "zero": {"zero_hpz_partition_size": 2}}),
        Cell(DS, "ZeRO++ qgZ, ZeRO-3", DP4, TP2, VANILLA_FAILS, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 3, "zero": {"zero_quantized_gradients": True}},
             expect=("ValueError", "not been implemented on CPU"), note="the quantized gradient reduction has no CPU kernel; the groups are "
             "proven per state in tests/adapters/deepspeed/test_adapter_deepspeed_zeropp.py"),
        Cell(DS, "ZeRO++ qwZ, ZeRO-3", DP4, TP2, VANILLA_FAILS, f"{DS_TESTS}::test_precision_and_zeropp_cells",
             {"kind": "mlp", "stage": 3, "zero": {"zero_quantized_weights": True}},
             expect=("ValueError", "not been implemented on CPU"), note="the weight quantizer has no CPU kernel"),
        Cell(DS, "Ulysses SP=2 (engine sequence_parallel_size), ZeRO-1", {"sequence_parallel_size": 2}, TP2, PROVEN,
             f"{DS_TESTS}::test_sequence_and_refused_cells", {"kind": "mlp", "stage": 1, "sp": 2},
             note="the engine's SP x DP groups; the attention itself: tests/adapters/test_adapter_ulysses.py"),
        Cell(DS, "Ulysses SP=2 (engine sequence_parallel_size), ZeRO-3", {"sequence_parallel_size": 2}, TP2, PROVEN,
             f"{DS_TESTS}::test_sequence_and_refused_cells", {"kind": "mlp", "stage": 3, "sp": 2}),
        Cell(DS, "AutoTP autotp_size=2, ZeRO-1", TP2, DP4, PROVEN, f"{DS_TESTS}::test_autotp_and_moe_cells",
             {"kind": "autotp", "autotp": 2, "stage": 1}),
        Cell(DS, "AutoTP autotp_size=2, ZeRO-0", TP2, DP4, PROVEN, f"{DS_TESTS}::test_autotp_and_moe_cells",
             {"kind": "autotp", "autotp": 2, "stage": 0}),
        *[Cell(DS, f"MoE EP=2 (expert TP=1), ZeRO-{stage}", {"expert_model_parallel_size": 2}, TP2, PROVEN,
               f"{DS_TESTS}::test_autotp_and_moe_cells", {"kind": "moe", "ep": 2, "stage": stage}) for stage in (0, 1, 2)],
        *[Cell(DS, f"MoE EP=2 in a TP=2 x EP=2 state (expert TP 2), ZeRO-{stage}",
               {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}, {"expert_model_parallel_size": 4},
               PROVEN, f"{EXPERTS_TESTS}::test_tp2_ep2_state_trains_bitwise_like_vanilla_deepspeed",
               note="DeepSpeed's EP (0,1),(2,3) and EDP (0,2),(1,3), not the state's expert layout")
          for stage in (0, 1, 2)],
        Cell(DS, "MoE EP=2, ZeRO-3", {"expert_model_parallel_size": 2}, TP2, VANILLA_FAILS,
             f"{DS_TESTS}::test_autotp_and_moe_cells", {"kind": "moe", "ep": 2, "stage": 3},
             expect=("AssertionError", "not supported with ZeRO Stage 3"), note="DeepSpeed refuses MoE with ZeRO-3"),
        *[Cell(DS, f"PipelineModule PP=2, ZeRO-{stage}", {"pipeline_model_parallel_size": 2},
               {"pipeline_model_parallel_size": 4}, PROVEN,
               f"{PIPELINE_TESTS}::test_pp2_and_pp4_engines_trained_interleaved_match_each_alone",
               note="partner: a PP=4 PipelineModule; each engine's own p2p grid") for stage in (0, 1)],
        *[Cell(DS, f"PipelineModule PP=4, ZeRO-{stage}", {"pipeline_model_parallel_size": 4},
               {"pipeline_model_parallel_size": 2}, PROVEN,
               f"{PIPELINE_TESTS}::test_pp2_and_pp4_engines_trained_interleaved_match_each_alone") for stage in (0, 1)],
        Cell(DS, "PipelineModule PP=2 next to a DP model", {"pipeline_model_parallel_size": 2}, DP4, PROVEN,
             f"{PIPELINE_TESTS}::test_pp2_engine_next_to_a_data_parallel_engine_matches_each_alone"),
        Cell(DS, "context parallel CP=2", {"context_parallel_size": 2}, DP4, REFUSED,
             f"{DS_TESTS}::test_sequence_and_refused_cells", {"kind": "mlp", "stage": 1},
             expect=("UnsupportedSetupError", "context_parallel_size=2"),
             note="DeepSpeed has no CP: its all-reduce would leave the CP peers out"),
    ]
    return cells


PP2: dict[str, int] = {"pipeline_model_parallel_size": 2}
#: megatron-core's two training set-ups every proven cell runs (``tests/_matrix_megatron.py``)
MEG_VARIANTS: dict[str, str] = {
    "ddp": "DDP + Adam",
    "distributed": "distributed optimizer",
}
SP_NORM_NOTE = ("the layer spec's norms are torch LayerNorms whose weights are marked sequence_parallel, "
                "as megatron-core's Apex and Transformer Engine norms mark them (the local spec's torch norm "
                "refuses sequence parallelism: the cell \"local spec's torch norm\")")


def _megatron_cells() -> list[Cell]:
    groups = {
        "test_tensor_cells": [
            ("TP=2 (DP=2)", TP2, DP4, {}),
            ("TP=2, sequence_parallel=True", TP2, PP2, {"sequence_parallel": True}),
        ],
        "test_pipeline_cells": [
            ("PP=2 (1F1B)", PP2, TP2, {}),
            ("PP=2 x VPP=2 (interleaved 1F1B)", {**PP2, "virtual_pipeline_model_parallel_size": 2}, TP2, {}),
        ],
        "test_expert_and_context_cells": [
            ("EP=2 MoE (4 experts, SequentialMLP)", {"expert_model_parallel_size": 2}, TP2, {"experts": 4}),
        ],
    }
    cells = []
    for test, dims in groups.items():
        for dimension, layout, partner, settings in dims:
            for variant, label in MEG_VARIANTS.items():
                note = SP_NORM_NOTE if settings.get("sequence_parallel") else ""
                cells.append(Cell(MEG, f"GPTModel {dimension}, {label}", layout, partner, PROVEN,
                                  f"{MEG_TESTS}::{test}", {**settings, "optimizer": variant}, note=note))
    cells += [
        Cell(MEG, "GPTModel TP=2, sequence_parallel=True, local spec's torch norm", TP2, PP2, VANILLA_FAILS,
             f"{MEG_TESTS}::test_tensor_cells", {"sequence_parallel": True, "torch norm": True, "optimizer": "ddp"},
             expect=("AssertionError", "sequence parallel not supported by torch LayerNorm"),
             note="without Apex or Transformer Engine the local spec's norm refuses sequence parallelism"),
        Cell(MEG, "GPTModel CP=2", {"context_parallel_size": 2}, TP2, VANILLA_FAILS,
             f"{MEG_TESTS}::test_expert_and_context_cells", {"optimizer": "distributed"},
             expect=("AssertionError", "Context parallelism is only supported by TEDotProductAttention"),
             note="megatron-core's local attention has no context parallelism (Transformer Engine's has; "
             "it needs CUDA); the state's CP groups are proven against megatron-core's in "
             "tests/getters/test_megatron_oracle.py"),
    ]
    return cells


CELLS: tuple[Cell, ...] = tuple(_deepspeed_cells() + _megatron_cells())


def cell(name: str) -> Cell:
    for c in CELLS:
        if c.name == name:
            return c
    raise KeyError(f"no matrix cell {name!r}; cells: {[c.name for c in CELLS]}")


def cells_of(test: str) -> list[str]:
    """Names of the cells whose status the test ``test`` (``file::name``) shows."""
    return [c.name for c in CELLS if c.test == test]


def compare_runs(scoped: Mapping[str, Any], vanilla: Mapping[str, Any]) -> list[str]:
    """What differs between a scoped run and the vanilla run (empty: bitwise equal): losses,
    gradient norms, and every final parameter (``torch.equal``)."""
    import torch

    problems = []
    if scoped["losses"] != vanilla["losses"]:
        problems.append(f"losses scoped {scoped['losses']} vs vanilla {vanilla['losses']}")
    if scoped["norms"] != vanilla["norms"]:
        problems.append(f"grad norms scoped {scoped['norms']} vs vanilla {vanilla['norms']}")
    a, b = scoped["params"], vanilla["params"]
    if [x.shape for x in a] != [y.shape for y in b]:
        problems.append(f"parameter shapes differ: scoped {[tuple(x.shape) for x in a]} vs vanilla {[tuple(y.shape) for y in b]}")
        return problems
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b) if not torch.equal(x, y)]
    if diffs:
        problems.append(f"{len(diffs)} of {len(a)} parameters differ, max |diff| {max(diffs):.3g}")
    return problems


def check_cell(name: str, per_rank: list[Mapping[str, Any]]) -> None:
    """Assert one cell's outcome on every rank against its status (see the module doc).

    A runner reports per cell: for ``proven``, ``problems`` (:func:`compare_runs`),
    ``moved``/``parameters`` (how many parameters changed in training, of how many),
    ``norms`` and the ``state groups``/``vanilla groups`` it compared; otherwise ``error``
    (type name, message) and, for ``refused``, ``groups made`` before the error.
    """
    c = cell(name)
    for rank, out in enumerate(per_rank):
        got = out[name]
        where = f"rank {rank}, {name}"
        if c.status == PROVEN:
            assert got["problems"] == [], f"{where}: interleaved in a scope vs vanilla alone: {got['problems']}"
            assert got["moved"] == got["parameters"], (
                f"{where}: expected all {got['parameters']} parameters to change in training, {got['moved']} did"
            )
            assert None not in got["norms"], f"{where}: the engine reported no gradient norm: {got['norms']}"
            assert got["state groups"] == got["vanilla groups"], (
                f"{where}: the vanilla baseline has another layout: state {got['state groups']}, "
                f"vanilla {got['vanilla groups']}"
            )
            continue
        kind, fragment = c.expect
        assert got["error"] is not None, (
            f"{where}: expected {kind} containing {fragment!r}, nothing was raised"
            + ("; vanilla ran, so the cell's status must change" if c.status == VANILLA_FAILS else "")
        )
        assert got["error"][0] == kind and fragment in got["error"][1], (
            f"{where}: expected {kind} containing {fragment!r}, got {got['error']}"
        )
        if c.status == REFUSED:
            assert got["groups made"] == 0, f"{where}: {got['groups made']} groups were created before the refusal"
    if c.status != PROVEN:  # every rank alike (messages may name the rank's own groups)
        kinds = {out[name]["error"][0] for out in per_rank}
        assert len(kinds) == 1, f"{name}: ranks raised different error types: {sorted(kinds)}"


def render_rst() -> str:
    """The docs page ``docs/matrix.rst`` (kept equal to this by a test)."""
    lines = [
        ".. This page is generated from tests/_matrix.py (CELLS); tests/matrix/test_matrix_catalogue.py",
        "   fails when the two differ. Regenerate: python tests/_matrix.py > docs/matrix.rst",
        "",
        "Engine x dimension matrix",
        "=========================",
        "",
        "Every cell is one engine with one parallel dimension, in a ``ParallelState`` of that",
        "layout on 4 ranks, trained interleaved (one step each, in turn, three steps) with a",
        "partner model in a state of another layout. A cell ends in one of:",
        "",
        "* **proven**: losses, gradient norms and final parameters equal, bit for bit, the same",
        "  model trained alone by the vanilla engine (adapters not installed, hand-written",
        "  groups) in the same layout. Both runs do the same arithmetic on the same shapes, so",
        "  bitwise holds on any CPU.",
        "* **refused**: a typed error naming the value and the fix, before any group is created.",
        "* **vanilla cannot run here**: the vanilla engine itself fails on this machine (CPU,",
        "  gloo); its error is recorded by the test and nothing of ours is claimed.",
        "",
        "A sabotage switch (the model stepped in its partner's scope) makes the comparisons",
        "fail, so they can (``test_sabotage_is_caught``).",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 12 30 14 14 14 36",
        "",
        "   * - engine",
        "     - dimension",
        "     - layout",
        "     - partner",
        "     - status",
        "     - test, notes",
    ]
    for c in CELLS:
        note = f"``{c.test.split('::')[-1]}``" + (f"; {c.note}" if c.note else "")
        if c.status == REFUSED:
            note += f"; raises ``{c.expect[0]}``"
        elif c.status == VANILLA_FAILS:
            note += f"; vanilla raises ``{c.expect[0]}: ...{c.expect[1]}...``"
        lines += [
            f"   * - {c.engine}",
            f"     - {c.dimension}",
            f"     - {_sizes(c.layout)}",
            f"     - {_sizes(c.partner)}",
            f"     - {c.status}",
            f"     - {note}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_rst(), end="")
