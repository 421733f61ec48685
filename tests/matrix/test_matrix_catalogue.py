"""The matrix catalogue (``tests/_matrix.py``) and its docs page agree, and every cell is decided."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from _matrix import CELLS, PROVEN, STATUSES, render_rst

ROOT = Path(__file__).resolve().parents[2]


def test_docs_page_is_the_rendered_catalogue():
    """docs/matrix.rst is exactly what tests/_matrix.py renders (regenerate it on a change)."""
    page = (ROOT / "docs" / "matrix.rst").read_text()
    assert page == render_rst(), "docs/matrix.rst is stale: python tests/_matrix.py > docs/matrix.rst"


@pytest.mark.parametrize("c", CELLS, ids=[c.name for c in CELLS])
def test_every_cell_ends_in_a_status_and_names_a_test_that_exists(c):
    """Each cell is proven, refused or vanilla-cannot-run, and its test function exists."""
    assert c.status in STATUSES, f"{c.name}: status {c.status!r}, expected one of {STATUSES}"
    path, _, function = c.test.partition("::")
    tree = ast.parse((ROOT / path).read_text())
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{c.name}: {c.test} does not exist"
    if c.status != PROVEN:
        assert all(c.expect), f"{c.name}: a {c.status!r} cell names the error type and message it expects"


def test_cell_names_are_unique():
    names = [c.name for c in CELLS]
    assert len(names) == len(set(names)), f"duplicate cells: {sorted(n for n in names if names.count(n) > 1)}"
