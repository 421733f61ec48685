"""Tier 2: the prepared GPU script is importable and steps aside on a machine without CUDA.

Its checks themselves run on a GPU machine only (docs/gpu-checks.md); this keeps the script
from rotting unnoticed between GPU runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_checks" / "run.py"


def test_gpu_script_skips_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: run the script itself (docs/gpu-checks.md)")
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", "bound", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "no CUDA device" in result.stdout, result.stdout
    assert not out.exists(), "wrote results without a GPU"
