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


@pytest.mark.slow
def test_scoring_survives_a_lost_node_with_the_same_bytes(tmp_path):
    """A worker node of the actor pool removed (not gracefully) once the first unit is written: the job
    finishes on the nodes left and writes byte-identical shards to the one-process run."""
    result = run_scenario("score-node-lost", tmp_path)
    assert result["removed_mid_run"] and result["worker_nodes"] == 3, result
    assert result["identical"] and result["units"] >= 3, result


@pytest.mark.slow
def test_training_survives_a_lost_node_using_every_sequence_once(tmp_path):
    """A training worker's node removed after the first checkpoint: Ray Train restarts the worker group
    from that checkpoint on the nodes left, finishes, and (by the rows each rank audited, the last attempt
    counting) every one of the 480 training rows is used exactly once, in the one-process order."""
    result = run_scenario("train-node-lost", tmp_path)
    assert result["final"] and result["attempts"] >= 2 and result["alive_nodes"] == 3, result
    assert result["rows_once"] and result["same_rows"], result


@pytest.mark.slow
def test_serve_across_nodes_and_the_big_models_node_lost_under_load(tmp_path):
    """SmallModel and BigModel replicas on different nodes (custom resources), one request delegated
    across them; then the BigModel's node removed under load: plain requests 503 (or, retried onto the
successor in time, delegated 200s), flagged
    small-only answers for `allow_undelegated`, nothing hangs, and once Serve has rescheduled the replica
    on the spare node the cascade delegates again."""
    result = run_scenario("serve-node-lost", tmp_path)
    assert result["ready"] and result["small_on"] == 0 and result["big_on"] in (1, 2), result
    assert result["delegated"] and result["calls"] == 6, result
    assert set(result["strict_codes"]) <= {200, 503} and result["strict_200s_delegated"], result
    assert result["lenient_codes"] == [200] and result["lenient_undelegated"], result
    assert result["recovered"] and result["big_moved"], result
    assert result["after_delegated"] and result["after_calls"] == 6, result
