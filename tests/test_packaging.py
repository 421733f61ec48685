"""Packaging (builds and installs in subprocesses, no torch.distributed).

Proves: `adapters/` installs as scoped_parallel.adapters, never as a top-level package,
both in an editable install and in a built wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, scoped_parallel.adapters as a, scoped_parallel as s;"
    "print(a.__name__, s.__file__);"
    "print(importlib.util.find_spec('adapters'))"
)


def test_editable_install_maps_adapters_under_scoped_parallel(tmp_path):
    """The editable install imports scoped_parallel.adapters from adapters/ and no top-level adapters."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0].startswith("scoped_parallel.adapters "), f"adapters imported as {out[0]!r}"
    assert out[1] == "None", f"a top-level 'adapters' package is importable: {out[1]}"


@pytest.mark.slow
def test_built_wheel_has_no_top_level_adapters(tmp_path):
    """A built wheel holds scoped_parallel/adapters/ and py.typed, and nothing named adapters/ at the top."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("scoped_parallel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every module of the source tree, under its installed name (adapters/ -> scoped_parallel/adapters/).
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "scoped_parallel").rglob("*.py")]
    sources += ["scoped_parallel/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "adapters").rglob("*.py")]
    for needed in sorted(sources) + ["scoped_parallel/py.typed"]:
        assert needed in names, f"the wheel lacks {needed}: {sorted(names)}"
    top_level = [n for n in names if n.startswith("adapters/")]
    assert top_level == [], f"the wheel has a top-level adapters/ package: {top_level}"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -I: no site-packages (so not the editable finder), no cwd; only the unpacked wheel.
    code = f"import sys; sys.path.insert(0, {str(target)!r}); " + PROBE
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split("\n")
    assert out[0].startswith("scoped_parallel.adapters "), f"adapters imported as {out[0]!r}"
    assert str(target) in out[0], f"scoped_parallel imported from outside the installed wheel: {out[0]!r}"
    assert out[1] == "None", f"a top-level 'adapters' package is importable: {out[1]}"


def test_the_torch_range_in_errors_is_the_claimed_one():
    """torch_compat.TESTED_TORCH (named in its errors) is pyproject's torch range: >=oldest, <newest + 1 minor."""
    import re
    import tomllib

    from scoped_parallel.groups.torch_compat import TESTED_TORCH

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("torch")]
    low, high = re.fullmatch(r"torch>=(\d+\.\d+),<(\d+\.\d+)", spec).groups()
    major, minor = high.split(".")
    newest = f"{major}.{int(minor) - 1}"
    assert TESTED_TORCH == (low, newest), f"pyproject says {spec!r}, torch_compat says {TESTED_TORCH}"
