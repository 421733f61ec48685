"""The `python -m scoped_parallel layout` command."""

from __future__ import annotations

import json
import subprocess
import sys

from scoped_parallel._cli import main


def test_rank_view_shows_coordinates_and_groups(capsys):
    """--rank prints that rank's coordinates and each of its groups."""
    assert main(["layout", "--world-size", "16", "--tp", "2", "--pp", "2", "--rank", "5"]) == 0
    out = capsys.readouterr().out
    assert "rank 5: tp=1" in out and "(4, 5)" in out and "(1, 5, 9, 13)" not in out


def test_json_lists_every_group_of_each_kind(capsys):
    """--json gives all groups per kind, machine-readable."""
    assert main(["layout", "--world-size", "8", "--sp", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"]["sp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert doc["groups"]["sp-dp"] == [list(range(8))]


def test_bad_layout_exits_2_with_message(capsys):
    """A non-divisible layout exits with status 2 and explains the arithmetic."""
    assert main(["layout", "--world-size", "6", "--tp", "4"]) == 2
    assert "6" in capsys.readouterr().err


def test_module_entry_point_runs_without_torch():
    """`python -m scoped_parallel layout` works and never imports torch."""
    code = (
        "import sys, runpy; sys.argv=['x','layout','--world-size','8','--tp','2'];"
        "\ntry: runpy.run_module('scoped_parallel', run_name='__main__')\nexcept SystemExit: pass"
        "\nassert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tp" in out
