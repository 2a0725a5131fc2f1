"""The experiment end to end on the tiny preset: on Ray (Ray Data, Ray Train, Serve) and in one process,
which give the same shards and, for the same models, the same evaluation table; MLflow; re-runs reuse."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import socket

import pytest

from lacy.core.config import load_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_RUN = ["--data.max_docs", "150", "--train.max_steps", "6", "--experiment.rules", "[plain, lacy]",
            "--eval.entities", "4", "--eval.call_rates", "[0.22]", "--eval.calibration_entities", "3",
            "--eval.calibration_rounds", "2", "--eval.leakage_facts", "6", "--eval.bootstrap", "100",
            "--experiment.views", "2", "--experiment.eval_concurrency", "1"]
"""The tiny experiment every test here evaluates (run_dir, port and MLflow added per run)."""


def _rows(results) -> dict[str, dict]:
    """Evaluation rows by system, without what may differ between runs (timings)."""
    out = {}
    for path in sorted((results / "rows").rglob("*.json")):  # a cascade's name has a "/": rows/<small>+<big>@<rate>/
        row = json.loads(path.read_text())
        out[row["system"]] = {k: v for k, v in row.items() if k != "key"}
    return out


@pytest.fixture(scope="module")
def ray_run(ray_session, mlflow_uri, tmp_path_factory):
    from jobs.experiment import run

    root = tmp_path_factory.mktemp("experiment")
    run_dir = root / "run"
    cfg = load_config("configs/tiny.yaml", [
        *TINY_RUN, "--run_dir", str(run_dir), "--serve.port", str(_free_port()),
        "--mlflow.tracking_uri", mlflow_uri, "--mlflow.experiment", "test-experiment"])
    return cfg, run(cfg, publish=str(root / "docs"), command="python -m jobs.experiment --config configs/tiny.yaml")


def test_ray_experiment_table_views_and_mlflow(ray_run, mlflow_uri):
    import mlflow

    cfg, results = ray_run
    table = (results / "table.md").read_text()
    for needle in ("steps-equalised, big model: plain", "steps-equalised, big model: retrieval",
                   "| plain | confidence |", "| lacy | p_call |", "| lacy | confidence |", "leakage [CI]"):
        assert needle in table
    with (results / "rows.csv").open() as f:
        systems = {r["system"] for r in csv.DictReader(f)}
    assert {"big-plain", "big-retrieval", "plain-steps alone", "lacy-steps alone",
            "lacy-steps+retrieval@0.22/p_call", "plain-steps+plain@0.22/confidence"} <= systems
    assert "plain-steps+plain@0.22/p_call" not in systems  # plain never learned <CALL>: no P(CALL) rows
    thresholds = json.loads((results / "thresholds.json").read_text())
    cascades = {f"{m}+{b}/{t}/0.22" for m, t in (("lacy-steps", "p_call"), ("lacy-steps", "confidence"),
                                                 ("plain-steps", "confidence")) for b in ("plain", "retrieval")}
    assert cascades == set(thresholds) - {"key"}
    for calibration in (thresholds[k] for k in cascades):  # measured with calls on, on Ray Data's actors
        assert 1 <= calibration["rounds"] <= 2 and 0 <= calibration["realised_rate"] <= 1, calibration
    assert (results / "precision_vs_call_rate-steps-retrieval.png").stat().st_size > 1000
    assert 'data-source="prompt"' in (results / "view-lacy-steps.html").read_text()
    # The report: the narrow headline, then the method table, under its command, commit and machine;
    # published beside its plots for the README to link.
    report = (results / "report.md").read_text()
    assert "`python -m jobs.experiment --config configs/tiny.yaml` at commit" in report and "cores, load" in report
    headline = report.split("## Headline")[1].split("## Method table")[0]
    for needle in ("| big alone (retrieval) |", "| lacy alone |", "| lacy + retrieval / p_call |",
                   "| plain + plain / confidence |", "correct / person [CI]"):
        assert needle in headline
    assert table.split("\n", 2)[2] in report  # the method table, whole
    docs = results.parent.parent / "docs"
    assert (docs / "run.md").read_text().startswith(report)
    assert "![precision_vs_call_rate-steps-retrieval](run-precision_vs_call_rate-steps-retrieval.png)" in (
        docs / "run.md").read_text() and (docs / "run-precision_vs_call_rate-steps-retrieval.png").is_file()
    final = cfg.run_dir + "/train/lacy-steps/final"
    assert json.loads(open(final + "/training_summary.json").read())["trainer"] == "jobs.pretrain"

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "experiment"]
    assert len(parents) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"score", "pretrain-plain", "pretrain-lacy"} <= children


def test_rerun_reuses_every_stage(ray_run, caplog):
    from jobs.experiment import run

    cfg, results = ray_run
    table = (results / "table.md").read_text()
    with caplog.at_level(logging.INFO, logger="lacy"):
        again = run(cfg)
    assert "train plain-steps: done before" in caplog.text and "train lacy-steps: done before" in caplog.text
    assert (again / "table.md").read_text() == table


def test_one_process_pipeline_gives_the_same_shards_and_table(ray_run, tmp_path):
    """The same stages in one process (lacy.experiment with LocalBackend) over a copy of the Ray run:
    shards are byte-identical when built afresh, and the same models give the same evaluation rows."""
    from lacy.experiment import LocalBackend, run
    from lacy.shards.scoring import build_shards

    cfg, results = ray_run
    local = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "run"), *TINY_RUN])
    # Shards afresh, in one process, with the Ray run's tokenizer: byte for byte the same files.
    fresh = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "fresh"), "--data.max_docs", "150",
                                              "--tokenizer.path", f"{cfg.run_dir}/tokenizer"])
    manifest, _ = build_shards(fresh)
    ray_shards = f"{cfg.run_dir}/shards"
    for rel in [*manifest.shards["train"], *manifest.shards["val"], "docs.parquet"]:
        assert (tmp_path / "fresh" / "shards" / rel).read_bytes() == open(f"{ray_shards}/{rel}", "rb").read(), rel

    # Everything but the results, then the one-process evaluation of the Ray-trained models.
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("results", "mlflow.db"))
    local_results = run(local, LocalBackend())
    ours, theirs = _rows(local_results), _rows(results)
    assert set(ours) == set(theirs)
    for system, row in theirs.items():
        assert ours[system] == row, system
    assert (local_results / "table.md").read_text() == (results / "table.md").read_text()



def test_an_evaluation_stopped_midway_keeps_the_rows_it_finished(ray_run, tmp_path, monkeypatch):
    """Rows are written and cached group by group (whole small models): a run stopped while writing its
    second group keeps the first group's rows, and the rerun writes only the rest — the same table as an
    evaluation that never stopped."""
    from lacy.eval import plan
    from lacy.experiment import LocalBackend, run

    cfg, results = ray_run
    local = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "run"), *TINY_RUN])
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("rows", "generations", "mlflow.db"))
    monkeypatch.setattr(plan, "GROUP_BATCHES", 0)  # every small model a group of its own
    write, groups = plan._write, []

    def stopped_at_the_second_group(cfg, systems, *args):
        groups.append({s.name: s.small for s in systems})
        if len(groups) == 2:
            raise RuntimeError("stopped")
        return write(cfg, systems, *args)

    monkeypatch.setattr(plan, "_write", stopped_at_the_second_group)
    with pytest.raises(RuntimeError, match="stopped"):
        run(local, LocalBackend())
    rows = tmp_path / "run" / "results" / "rows"
    kept = {str(path.relative_to(rows)): path.stat().st_mtime_ns for path in rows.rglob("*.json")}
    assert sorted(kept) == sorted(f"{name}.json" for name in groups[0])
    assert len(set(groups[0].values())) == 1 and len(kept) < len(_rows(results))
    monkeypatch.setattr(plan, "_write", write)
    again = run(local, LocalBackend())
    assert {name: (rows / name).stat().st_mtime_ns for name in kept} == kept
    assert _rows(again) == _rows(results)


def test_the_serve_evaluator_writes_the_batch_evaluations_table(ray_run, mlflow_uri, tmp_path):
    """`--experiment.evaluator serve` (HTTP requests to the cascade's Serve app, the online product) over a
    copy of the run without its results: the thresholds and rows the batch path wrote on Ray Data."""
    from jobs.experiment import run

    cfg, results = ray_run
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("results", "mlflow.db"))
    served = run(load_config("configs/tiny.yaml", [
        *TINY_RUN, "--run_dir", str(tmp_path / "run"), "--experiment.evaluator", "serve", "--serve.port",
        str(_free_port()), "--mlflow.tracking_uri", mlflow_uri, "--mlflow.experiment", "test-serve-evaluator"]))
    calibrated = [{k: v for k, v in json.loads((r / "thresholds.json").read_text()).items() if k != "key"}
                  for r in (served, results)]
    assert calibrated[0] == calibrated[1]
    assert _rows(served) == _rows(results)
