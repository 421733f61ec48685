"""Tier 1 (pure layout math): the `python -m scoped_parallel layout` command.

Proves: the rank view shows coordinates and groups; JSON lists every group of each
kind; several states show coordinates and shared groups, and the diff marks identical
and different kinds; the SVG holds every rank of every group; bad input exits 2; the
module entry point runs without importing torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

from scoped_parallel.layout.cli import main


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


def test_several_states_show_coordinates_and_shared_groups(capsys):
    """--state twice with --rank shows the rank in each state and the physically shared groups."""
    argv = ["layout", "--world-size", "4", "--state", "actor:tp=2", "--state", "ref:sp=2,dp=2", "--rank", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "actor: ParallelLayout(world_size=4, tp=2, dp=2)" in out
    assert "(0, 1): actor.tp" in out and "ref.sp" in out.split("(0, 1): actor.tp")[1].split("\n")[0]


def test_diff_marks_identical_and_different_kinds(capsys):
    """--diff says which kinds two layouts share and shows both sides where they differ."""
    argv = ["layout", "--world-size", "4", "--state", "a:tp=2", "--state", "b:sp=2", "--diff"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "= dp " in out and "! tp " in out and "b: (0, 1) (2, 3)" in out


def test_svg_contains_every_rank_of_every_group(tmp_path, capsys):
    """The SVG has one cell per rank per shown kind, tagged with its state, kind and group."""
    import re

    path = tmp_path / "l.svg"
    argv = ["layout", "--world-size", "8", "--state", "actor:tp=2,pp=2", "--state", "ref:sp=4", "--svg", str(path)]
    assert main(argv) == 0
    text = path.read_text()
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    cells = re.findall(r'data-state="(\w+)" data-kind="([\w-]+)" data-rank="(\d+)" data-group="(\d+)"', text)
    actor_tp = {int(r): int(g) for s, k, r, g in cells if s == "actor" and k == "tp"}
    assert actor_tp == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}
    ref_sp = {int(r): int(g) for s, k, r, g in cells if s == "ref" and k == "sp"}
    assert ref_sp == {r: r // 4 for r in range(8)}
    assert {(s, k) for s, k, _, _ in cells} == {("actor", "tp"), ("actor", "pp"), ("actor", "dp"), ("ref", "dp"), ("ref", "sp")}


def test_bad_state_spec_exits_2(capsys):
    """A malformed or contradictory --state exits 2 naming the problem."""
    assert main(["layout", "--world-size", "4", "--state", "actor:tq=2"]) == 2
    assert "bad item 'tq=2'" in capsys.readouterr().err
    assert main(["layout", "--world-size", "4", "--state", "actor:tp=2,dp=4"]) == 2
    assert "dp=4" in capsys.readouterr().err
