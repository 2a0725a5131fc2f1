"""The MLflow record of an evaluation, where runs are compared: each evaluated system a nested run with its
biographies as a table and as traces, each trained model a registered transformers model.

    log_evaluation(cfg, rows, results)        # under the experiment's run: one nested run per system
    log_models(cfg, trained, thresholds)       # every final model, registered, its thresholds in its metadata

A system's run holds its metrics (every number of its row: precision and its CI, correct values per person,
call rates, FactScore, leakage, the LLM judge's columns, and APGR / CPT(50 %) of its system from
comparison.json when the report wrote one), its identity as params (model, big side, trigger, rate, unit,
people, threshold), its biographies as an MLflow table (`generations.json`: the same file name in every
system's run, so the UI compares them side by side) and the first `mlflow.traces` biographies as
traces, each a root span (the person, prompt and output; calls, call rate, precision, correct values) whose
children are, in order, the small model's stretches and the big model's calls (`small model` and
`big model call` spans, each with the text before it and what it wrote; consecutive calls are one span, as
in the text's spans), so a user clicks a person and sees where the calls went. Span durations are
proportional to the characters each wrote (the cascade keeps no per-span timings). It reads what the
evaluation wrote (`results/generations/<system>.jsonl`), so a cached row logs the biographies it was scored
on.

MLflow is imported where it logs: a lent GPU box trains without it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lacy.core.config import LacyConfig
from lacy.eval.compare import rule_of
from lacy.model import load_small_model

log = logging.getLogger(__name__)

PARAMS = ("model", "big", "trigger", "target_rate", "unit", "people", "budget", "threshold", "entities")
"""Row fields that say which system a run is (params); every other number of the row is a metric."""
CONTEXT_CHARS = 300
"""Characters of the text before a span shown as its input."""


def system_metrics(row: dict, comparison: dict | None = None) -> dict[str, float]:
    """Every number of a row (its per-person lists and identity left out) and, from comparison.json, the
    APGR [CI] and CPT(50 %) of the cascade it is a point of."""
    metrics = {k: float(v) for k, v in row.items() if k not in PARAMS and isinstance(v, int | float)
               and not isinstance(v, bool)}
    if comparison and row.get("model") and row.get("big") not in (None, "none"):
        rule, comparison_name, _ = rule_of(row["model"])
        for system in comparison.get("systems", []):
            if (system["rule"], system["comparison"], system["big"], system["trigger"], system.get("unit")) == (
                    rule, comparison_name, row["big"], row["trigger"], row.get("unit")):
                if system.get("apgr"):
                    metrics.update(apgr=system["apgr"][0], apgr_lo=system["apgr"][1], apgr_hi=system["apgr"][2])
                if system.get("cpt50") is not None:
                    metrics["cpt50"] = system["cpt50"]
    return metrics


def read_generations(results: Path, system: str) -> list[dict]:
    """The biographies a system's row was scored on (FActScore lines with our spans), [] if none were kept."""
    path = results / "generations" / f"{system}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def generations_table(row: dict, generations: Sequence[dict]) -> dict[str, list]:
    """The MLflow table of a system's biographies: person, text, calls, what the big model wrote, scores."""
    precision = row.get("entity_scores") or [None] * len(generations)
    correct = row.get("entity_supported") or [None] * len(generations)
    return {"topic": [g["topic"] for g in generations], "output": [g["output"] for g in generations],
            "calls": [g.get("calls") for g in generations], "call_rate": [g.get("call_rate") for g in generations],
            "big_wrote": [" | ".join(s["text"] for s in g["spans"] if s["source"] == "big") for g in generations],
            "precision": list(precision), "correct": list(correct)}


def log_trace(mlflow: Any, experiment_id: str, system: str, generation: dict, scores: dict[str, Any]) -> int:
    """One biography as an MLflow trace under the active run: the root span, then each span of the text;
    returns how many spans it has."""
    from mlflow.entities import SpanType

    spans = generation["spans"]
    prompt = "".join(s["text"] for s in spans if s["source"] == "prompt")
    clock = time.time_ns()
    root = mlflow.start_span_no_context(
        f"biography: {generation['topic']}", span_type=SpanType.CHAIN, experiment_id=experiment_id,
        inputs={"topic": generation["topic"], "prompt": prompt}, start_time_ns=clock,
        attributes={"system": system, "calls": generation.get("calls"), "call_rate": generation.get("call_rate"),
                    **scores},
        tags={"lacy.system": system, "lacy.person": generation["topic"]})
    text, count = "", 1
    for span in spans:
        if span["source"] == "prompt":
            text += span["text"]
            continue
        big = span["source"] == "big"
        child = mlflow.start_span_no_context(
            "big model call" if big else "small model", span_type=SpanType.LLM, parent_span=root,
            inputs={"text before": text[-CONTEXT_CHARS:]}, start_time_ns=clock, attributes={"source": span["source"]})
        clock += max(1, len(span["text"])) * 1_000_000
        child.end(outputs={"text": span["text"]}, end_time_ns=clock)
        text += span["text"]
        count += 1
    root.end(outputs={"output": generation["output"]}, end_time_ns=clock + 1)
    return count


def log_evaluation(cfg: LacyConfig, rows: Sequence[dict], results: Path) -> dict[str, str]:
    """One nested run per evaluated system under the active run (see the module's docstring); returns
    {system: run id}."""
    import mlflow
    from mlflow.environment_variables import MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE

    # MLflow exports a trace as a task per span and one for the trace, through a bounded queue that discards
    # what overflows it: wait for it to drain whenever half of it may be taken.
    room = MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE.get() // 2
    comparison_path = results / "comparison.json"
    comparison = json.loads(comparison_path.read_text()) if comparison_path.is_file() else None
    experiment_id = mlflow.active_run().info.experiment_id
    runs, traced, queued = {}, 0, 0
    for row in rows:
        generations = read_generations(results, row["system"])
        with mlflow.start_run(run_name=row["system"], nested=True, log_system_metrics=False) as run:
            mlflow.set_tags({"lacy.run": "evaluated system", "lacy.system": row["system"]})
            mlflow.log_params({k: str(row.get(k)) for k in PARAMS})
            mlflow.log_metrics(system_metrics(row, comparison))
            runs[row["system"]] = run.info.run_id
            if not generations:
                log.warning("%s: no generations file (a row cached before they were kept): no table, no traces",
                            row["system"])
                continue
            table = generations_table(row, generations)
            mlflow.log_table(table, artifact_file="generations.json")
            for i, generation in enumerate(generations[:cfg.mlflow.traces]):
                queued += 1 + log_trace(mlflow, experiment_id, row["system"], generation,
                                        {"precision": table["precision"][i], "correct": table["correct"][i]})
                traced += 1
                if queued >= room:
                    mlflow.flush_trace_async_logging()
                    queued = 0
    mlflow.flush_trace_async_logging()
    log.info("MLflow: %d evaluated systems logged, %d biographies as traces", len(runs), traced)
    return runs


def log_models(cfg: LacyConfig, trained: dict[str, dict], thresholds: dict[str, dict]) -> dict[str, str]:
    """Every trained model (its final folder) with MLflow's transformers flavour under the active run,
    registered as `<mlflow.experiment>.<model name>`, its metadata the thresholds calibrated for it (keyed as
    the experiment keys them: model+big/trigger/rate), its rule, comparison, seed and validation loss;
    returns {model: registered version}."""
    import mlflow

    versions = {}
    for name, record in trained.items():
        model, tokenizer = load_small_model(record["final"])
        metadata = {"lacy_thresholds": {k: v for k, v in thresholds.items() if k.startswith(f"{name}+")},
                    "lacy_rule": rule_of(name)[0], "lacy_comparison": record.get("comparison"),
                    "lacy_seed": record.get("seed"), "lacy_val_real_loss": record.get("val_real_loss"),
                    "lacy_stage_key": record.get("key")}
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name=name, task="text-generation", metadata=metadata,
            registered_model_name=f"{cfg.mlflow.experiment}.{name}",
            # Pinned here: inferring requirements would load the model again in a subprocess.
            pip_requirements=[f"{p}=={version(p)}" for p in ("torch", "transformers", "tokenizers")])
        versions[name] = str(info.registered_model_version)
        log.info("MLflow: model %s registered as %s.%s version %s", name, cfg.mlflow.experiment, name,
                 versions[name])
    return versions
