"""MLflow where runs are compared: the one-process experiment (`python -m lacy.experiment`'s path) on the tiny
synthetic benchmark, read back through MlflowClient — the experiment's mark, inputs, system metrics, a run per
stage and per evaluated system with its metrics and generations table, traces of its first biographies whose
spans are the small model's stretches and the big model's calls, every model registered with its thresholds,
no trace lost to MLflow's export queue — and opened in the MLflow UI (an `mlflow server` started here) in a
real headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from llama_server import free_port

from lacy.core.config import load_config

pytestmark = pytest.mark.slow

EXPERIMENT = "lacy-record-test"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The experiment, tracked, into its own sqlite store; (cfg, results, tracking URI)."""
    from lacy.experiment import run

    root = tmp_path_factory.mktemp("record")
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # runs of seconds still get samples
    cfg = load_config("configs/synthbio-tiny.yaml", [
        "--run_dir", str(root / "run"), "--mlflow.tracking_uri", uri, "--mlflow.experiment", EXPERIMENT,
        "--experiment.rules", "[plain, lacy]", "--experiment.triggers", "[p_call, confidence]",
        "--train.max_steps", "6", "--eval.entities", "3", "--eval.calibration_entities", "3",
        "--eval.calibration_rounds", "1", "--eval.leakage_facts", "4", "--eval.bootstrap", "50",
        "--experiment.views", "1", "--cascade.max_new_tokens", "16", "--mlflow.traces", "2"])
    try:
        results = run(cfg, track=True)
    finally:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    return cfg, results, uri


@pytest.fixture(scope="module")
def client(recorded):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=recorded[2])


def _runs(client, experiment_id: str) -> dict[str, object]:
    return {r.info.run_name: r for r in client.search_runs([experiment_id], max_results=1000)}


def test_stages_inputs_and_system_metrics(recorded, client):
    cfg, results, _ = recorded
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _runs(client, experiment.experiment_id)
    parent = runs["experiment"]
    for name in ("score", "pretrain-plain", "pretrain-lacy"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id, name
    manifest = json.loads((Path(cfg.score.output_dir) / "manifest.json").read_text())
    inputs = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert inputs == {"corpus:synthbio": manifest["corpus_fingerprint"][:36], "shards": manifest["config_hash"]}
    assert {d.dataset.name for d in runs["pretrain-lacy"].inputs.dataset_inputs} == {"shards"}
    history = client.get_metric_history(runs["pretrain-lacy"].info.run_id, "real_loss")
    assert [m.step for m in history] == [4, 6] and runs["pretrain-lacy"].data.metrics["final_steps"] == 6
    assert runs["score"].data.metrics["train_docs"] == manifest["counts"]["train"]["docs"]
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics), sorted(parent.data.metrics)
    assert "results/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "results")}


def test_a_run_per_evaluated_system_with_its_metrics_table_and_traces(recorded, client):
    import mlflow

    cfg, results, uri = recorded
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = _runs(client, experiment.experiment_id)
    with (results / "rows.csv").open() as f:
        rows = {r["system"]: r for r in csv.DictReader(f)}
    comparison = json.loads((results / "comparison.json").read_text())
    assert set(rows) <= set(runs)
    for system, row in rows.items():
        run = runs[system]
        assert run.data.tags["mlflow.parentRunId"] == runs["experiment"].info.run_id
        assert run.data.params["model"] == (row["model"] or "None") and run.data.params["big"] == row["big"]
        for metric in ("precision", "precision_lo", "precision_hi", "supported_per_person", "respond_ratio"):
            if row[metric]:
                assert run.data.metrics[metric] == pytest.approx(float(row[metric])), (system, metric)
    cascade = "lacy-steps+retrieval@0.22/p_call"
    apgr = next(s["apgr"] for s in comparison["systems"] if s["rule"] == "lacy" and s["trigger"] == "p_call")
    assert runs[cascade].data.metrics["apgr"] == pytest.approx(apgr[0])
    assert runs[cascade].data.metrics["call_rate"] == pytest.approx(float(rows[cascade]["call_rate"]))

    # The generations as an MLflow table, the same artifact in every system's run.
    mlflow.set_tracking_uri(uri)
    table = mlflow.load_table("generations.json", run_ids=[runs[cascade].info.run_id])
    exported = [json.loads(x) for x in (results / "generations" / f"{cascade}.jsonl").read_text().splitlines()]
    assert list(table["topic"]) == [g["topic"] for g in exported] and len(table) == cfg.eval.entities
    assert list(table["output"]) == [g["output"] for g in exported]

    # The cascade's first mlflow.traces biographies as traces under its run: a root span, then its stretches
    # in order.
    traces = mlflow.search_traces(locations=[experiment.experiment_id], run_id=runs[cascade].info.run_id,
                                  return_type="list")
    traced = exported[:cfg.mlflow.traces]
    assert len(traces) == cfg.mlflow.traces < cfg.eval.entities
    by_person = {t.info.tags["lacy.person"]: t for t in traces}
    assert set(by_person) == {g["topic"] for g in traced}
    calls = 0
    for generation in traced:
        trace = by_person[generation["topic"]]
        root = next(s for s in trace.data.spans if s.parent_id is None)
        children = sorted((s for s in trace.data.spans if s.parent_id == root.span_id), key=lambda s: s.start_time_ns)
        assert root.inputs["topic"] == generation["topic"] and root.outputs["output"] == generation["output"]
        assert root.inputs["prompt"] + "".join(s.outputs["text"] for s in children) == generation["output"]
        assert [s.name for s in children] == ["big model call" if s["source"] == "big" else "small model"
                                             for s in generation["spans"] if s["source"] != "prompt"]
        calls += sum(s.name == "big model call" for s in children)
        assert trace.info.trace_metadata["mlflow.sourceRun"] == runs[cascade].info.run_id
    assert 0 < calls <= sum(g["calls"] for g in traced)  # consecutive calls are one span of the text


def test_more_traces_than_mlflow_queues_are_all_kept(recorded, client, tmp_path):
    """MLflow exports traces through a bounded queue and discards what overflows it: log_evaluation waits for
    it to drain (here a queue of 100, in a process of its own: the queue is made once per process; without
    the waits about a fifth of the 60 traces are lost)."""
    import mlflow

    cfg, results, uri = recorded
    line = (results / "generations" / "lacy-steps+retrieval@0.22/p_call.jsonl").read_text().splitlines()[0]
    many = tmp_path / "results"
    (many / "generations").mkdir(parents=True)
    (many / "generations" / "many.jsonl").write_text(f"{line}\n" * 60)
    code = """import sys
from pathlib import Path
from lacy.core.config import load_config
from lacy.core.tracking import start_run
from lacy.record import log_evaluation
cfg = load_config(sys.argv[1], ["--mlflow.traces", "null", "--mlflow.experiment", sys.argv[2]])
with start_run(cfg, "many"):
    log_evaluation(cfg, [{"system": "many", "entities": 60}], Path(sys.argv[3]))
"""
    done = subprocess.run([sys.executable, "-c", code, str(Path(cfg.run_dir) / "config.yaml"), f"{EXPERIMENT}-many",
                           str(many)], env={**os.environ, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "100"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = client.get_experiment_by_name(f"{EXPERIMENT}-many")
    [run] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "many"
             and "mlflow.parentRunId" in r.data.tags]
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id,
                                    return_type="list", include_spans=False, max_results=1000)) == 60


def test_every_model_registered_with_its_thresholds(recorded, client):
    import mlflow
    import torch
    from safetensors.torch import load_file

    cfg, results, uri = recorded
    thresholds = json.loads((results / "thresholds.json").read_text())
    mlflow.set_tracking_uri(uri)
    for name in ("plain-steps", "lacy-steps"):
        [version] = client.search_model_versions(f"name = '{EXPERIMENT}.{name}'")
        info = mlflow.models.get_model_info(f"models:/{EXPERIMENT}.{name}/{version.version}")
        assert "transformers" in info.flavors
        mine = {k: v for k, v in thresholds.items() if k.startswith(f"{name}+")}
        assert mine and info.metadata["lacy_thresholds"] == mine, name
        assert info.metadata["lacy_rule"] == name.split("-")[0]
        components = mlflow.transformers.load_model(f"models:/{EXPERIMENT}.{name}/{version.version}",
                                                     return_type="components")
        final = load_file(Path(cfg.run_dir) / "train" / name / "final" / "model.safetensors")
        loaded = components["model"].state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in final.items() if k in loaded)
        assert "<CALL>" in components["tokenizer"].get_vocab()


@pytest.fixture(scope="module")
def ui(recorded, tmp_path_factory):
    """`mlflow server` on the experiment's store, 127.0.0.1 only; its URL."""
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    port, logs = free_port(), tmp_path_factory.mktemp("mlflow-server")
    with open(logs / "server.log", "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", recorded[2],
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not answer in 120 s; see {logs / 'server.log'}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _page(url: str, path: Path) -> str:
    """The page as a real browser renders it: a screenshot at `path`, and its DOM."""
    chromium = shutil.which("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1600,1000", "--virtual-time-budget=60000", f"--user-data-dir={path.parent / 'profile'}"]
    subprocess.run([chromium, *flags, f"--screenshot={path}", url], capture_output=True, timeout=180, check=True)
    assert path.stat().st_size > 20_000
    return subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def test_the_mlflow_ui_opens_on_the_runs_compares_them_and_shows_a_trace(recorded, client, ui, tmp_path):
    from lacy.core.tracking import ui_url

    cfg, results, _ = recorded
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = _runs(client, experiment.experiment_id)
    # The link the experiment logs opens the runs table (not the GenAI overview).
    page = _page(ui_url(ui, experiment.experiment_id), tmp_path / "runs.png")
    assert "experiment" in page and "matching runs" in page and "Traces</span>" not in page.split("Runs")[0]
    # The evaluated systems side by side: their params, and the metrics table's first rows (it is a
    # 300-pixel scrolled grid, alphabetical; every metric's value is checked through the client above).
    systems = ["lacy-steps+retrieval@0.22/p_call", "plain-steps+retrieval@0.22/confidence", "big-retrieval"]
    ids = json.dumps([runs[s].info.run_id for s in systems])
    page = _page(f"{ui}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}",
                 tmp_path / "compare.png")
    for needle in (*systems, "target_rate", "apgr", "call_rate", "generations.json"):
        assert needle in page, needle
    # One biography's trace: where the calls went.
    import mlflow

    mlflow.set_tracking_uri(recorded[2])
    trace = next(t for t in mlflow.search_traces(locations=[experiment.experiment_id],
                                                 run_id=runs[systems[0]].info.run_id, return_type="list")
                 if any(s.name == "big model call" for s in t.data.spans))
    page = _page(f"{ui}/#/experiments/{experiment.experiment_id}/traces?selectedEvaluationId={trace.info.trace_id}"
                 "&workflowType=machine_learning", tmp_path / "trace.png")
    assert f"biography: {trace.info.tags['lacy.person']}" in page and "small model" in page
    assert "big model call" in page
