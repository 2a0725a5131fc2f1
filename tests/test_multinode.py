"""Several Ray nodes on this machine, for real: each scenario of `tests/multinode.py` runs in a process
of its own (this session already holds a single-node Ray) and prints what is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode.py")


def run_scenario(name: str, work: Path, timeout: int = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(work)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=SCRIPT.parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_scoring_actors_on_two_nodes_write_the_one_process_shards(tmp_path):
    result = run_scenario("score", tmp_path)
    assert result["actor_nodes"] == 2 and result["worker_nodes"] == 2, result
    assert result["identical"] and result["units"] >= 3, result


@pytest.mark.slow
def test_two_training_workers_on_two_nodes_match_both_on_one(tmp_path):
    """DeepSpeed ZeRO-2 over gloo with a worker on each of two nodes: the same losses, step by step, as
    the same run with both workers on one node (global selection, same data order)."""
    result = run_scenario("train", tmp_path)
    assert result["spread_nodes"] == 2, result
    assert len(result["spread"]) == 6 and result["spread"] == pytest.approx(result["packed"], abs=1e-5), result
