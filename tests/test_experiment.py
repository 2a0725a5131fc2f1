"""The experiment job end to end on the tiny preset: scoring, Ray Train, Serve evaluation, table, MLflow."""

from __future__ import annotations

import csv
import socket

import pytest

from lacy.config import load_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_experiment_runs_and_reruns_from_cache(ray_session, mlflow_uri, tmp_path, capsys):
    import mlflow

    from jobs.experiment import run

    cfg = load_config("configs/tiny.yaml", [
        "--run_dir", str(tmp_path / "run"), "--data.max_docs", "150", "--train.max_steps", "6",
        "--experiment.rules", "[plain, lacy]", "--eval.entities", "4", "--eval.call_rates", "[0.22]",
        "--eval.leakage_facts", "6", "--eval.bootstrap", "100", "--experiment.views", "2",
        "--serve.port", str(_free_port()), "--mlflow.tracking_uri", mlflow_uri,
        "--mlflow.experiment", "test-experiment"])
    results = run(cfg)

    table = (results / "table.md").read_text()
    for needle in ("steps-equalised, big model: plain", "steps-equalised, big model: retrieval",
                   "| plain |", "| lacy |"):
        assert needle in table
    with (results / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    systems = {r["system"] for r in rows}
    assert {"big-plain", "big-retrieval", "plain-steps alone", "lacy-steps alone",
            "lacy-steps+retrieval@0.22", "plain-steps+plain@0.22"} <= systems
    assert all(r["entities"] == "4" for r in rows)
    assert (results / "precision_vs_call_rate-steps-retrieval.png").stat().st_size > 1000
    view = (results / "view-lacy-steps.html").read_text()
    assert 'data-source="prompt"' in view and "call rate" in view
    for rule in ("plain", "lacy"):
        final = tmp_path / "run" / "train" / f"{rule}-steps" / "final"
        assert (final / "model.safetensors").is_file() and (final / "training_summary.json").is_file()

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "experiment"]
    assert len(parents) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"score", "pretrain-plain", "pretrain-lacy", "eval-big-alone", "eval-plain-steps"} <= children

    # A re-run reuses every stage: no training, same table.
    capsys.readouterr()
    again = run(cfg)
    out = capsys.readouterr().out
    assert "train plain/steps: done before" in out and "train lacy/steps: done before" in out
    assert (again / "table.md").read_text() == table
