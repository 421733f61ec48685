"""Tier 5 (torchrun, 2 simulated nodes x 2 processes on 127.0.0.1), slow.

Two ``torchrun --nnodes 2 --node-rank {0,1}`` launchers share one static rendezvous,
so ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` differ from the global rank and world size as
on a real cluster. Proves: ZeRO++ hpZ and all-to-all groups follow the node layout per
state (local groups inside a node, global groups across nodes), and hpZ training matches
training alone bitwise. The node layout is read by the ZeRO++ adapter only
(``LOCAL_WORLD_SIZE``), so the main job, which uses no ZeRO++, is proven on one node
(``tests/examples/test_examples.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _two_nodes(script: Path, *args: str, timeout: int = 500) -> list[subprocess.CompletedProcess[str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(script), *args,
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


@pytest.mark.slow
def test_zeropp_groups_follow_the_node_layout_of_each_state():
    """2 nodes x 2: hpZ stays inside a node, all-to-all groups split local/global per state."""
    pytest.importorskip("deepspeed")
    runs = _two_nodes(ROOT / "tests" / "_multinode_zeropp.py")
    results = {}
    for node, run in enumerate(runs):
        assert run.returncode == 0, f"node {node}: exit {run.returncode}:\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
        for line in run.stdout.splitlines():
            if line.startswith("RESULT "):
                facts = json.loads(line[len("RESULT "):])
                results[facts["rank"]] = facts
    assert sorted(results) == [0, 1, 2, 3], f"results from ranks {sorted(results)}"
    for rank, facts in results.items():
        node, local = divmod(rank, 2)
        assert facts["local world size"] == 2, facts
        critic = {"hpz": [[2 * node, 2 * node + 1]], "a2a": {f"global_{local}": [local, local + 2], f"local_{node}": [2 * node, 2 * node + 1]}}
        actor = {"hpz": [[local, local + 2]], "a2a": {f"global_{local}": [local, local + 2], f"local_{node}": [rank]}}
        for name, expected in (("critic", critic), ("actor", actor)):
            got = {k: facts[name][k] for k in ("hpz", "a2a")}
            assert got == expected, f"rank {rank}, {name}: expected {expected}, got {got}"
            assert facts[name]["bit identical"], f"rank {rank}, {name}: interleaved hpZ training differs from alone"
