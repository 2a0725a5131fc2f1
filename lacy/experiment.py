"""The whole experiment as a sequence of stage calls, in one process or distributed by a backend:

    corpus -> shards (facts, labels' inputs) -> knowledge store -> every rule x comparison trained
    -> call thresholds calibrated -> every system of the evaluation plan generated and scored
    -> the method table

    python -m lacy.experiment --config configs/tiny.yaml                  # all of it, one process
    python -m lacy.experiment --config configs/wiki2015-gpu.yaml --until train --reuse_shards \\
        --save_dtype bfloat16 --max_shard_mb 15    # a lent GPU box: train on shards made elsewhere
    python -m jobs.experiment --config configs/synthbio-quick.yaml        # the same on Ray (`make run`)

A `Backend` says how the three heavy stages run: `LocalBackend` here (lacy.shards.scoring, lacy.train, the
cascade in process); `jobs.experiment.RayBackend` on Ray Data, Ray Train + DeepSpeed and Ray Serve.
Everything else — which models are trained with which budgets, which systems are evaluated on whom,
how rows are scored and reported — is this file's and the same for both. Stages are
content-addressed (`lacy.core.stages`): a re-run skips whatever exists for the same config, whichever
backend or machine made it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from lacy.cascade.knowledge import build_store
from lacy.core import storage
from lacy.core.config import LacyConfig, config_hash, parse_cli, save_config, to_dict
from lacy.core.console import setup_logging
from lacy.core.stages import cached_json, stage_done, stage_finish
from lacy.core.tracking import log_artifacts, log_metrics, start_run, tracking_uri, ui_url
from lacy.corpus.corpora import Corpus, corpus_for
from lacy.corpus.people import file_digest
from lacy.corpus.tokenizer import call_id
from lacy.eval.generate import Generator, LocalGenerator
from lacy.eval.plan import Population, evaluate, evaluation_plan, population, thresholds_stage, write_views
from lacy.eval.synthetic import proxy_vs_oracle, stored_bits
from lacy.model import load_small_model
from lacy.record import log_evaluation, log_models
from lacy.report import method_summary, write_report
from lacy.shards.format import read_batches, read_manifest
from lacy.shards.scoring import build_shards, log_inputs
from lacy.train import SUMMARY, tracked_training, train_from_shards
from lacy.train import evaluate as validate

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# Backends: how the heavy stages run


class Backend(Protocol):
    """Where the stages run. Each method is the whole stage for its inputs."""

    def build_shards(self, cfg: LacyConfig, parent_run_id: str | None) -> Any: ...

    def train(self, rcfg: LacyConfig, parent_run_id: str | None) -> Path: ...

    def generator(self, cfg: LacyConfig, models: dict[str, str]) -> contextlib.AbstractContextManager[Generator]:
        ...


class LocalBackend:
    """Every stage in this process: no Ray, DeepSpeed or Serve (MLflow only if `track`).

    `reuse_shards`: take the finished shards at score.output_dir as they are (their manifest), without
    the corpus or spaCy — a lent GPU box that got the shards from elsewhere."""

    def __init__(self, save_dtype: Any = None, max_shard_mb: float | None = None, reuse_shards: bool = False) -> None:
        self.save_dtype, self.max_shard_mb, self.reuse_shards = save_dtype, max_shard_mb, reuse_shards

    def build_shards(self, cfg: LacyConfig, parent_run_id: str | None) -> Any:
        """The shards; under a parent run, logged as its nested run "score" (metrics, inputs)."""
        if self.reuse_shards:
            return read_manifest(cfg.score.output_dir)
        if parent_run_id is None:
            return build_shards(cfg)[0]
        with start_run(cfg, "score", nested=True):
            manifest, metrics = build_shards(cfg)
            log_metrics(metrics)
            log_inputs(cfg, manifest)
        return manifest

    def train(self, rcfg: LacyConfig, parent_run_id: str | None) -> Path:
        """One rule; under a parent run, logged as its nested run "pretrain-<rule>"."""
        options = {"save_dtype": self.save_dtype, "max_shard_mb": self.max_shard_mb, "trainer": "lacy.experiment"}
        if parent_run_id is None:
            train_from_shards(rcfg, **options)
        else:
            with start_run(rcfg, f"pretrain-{rcfg.labels.rule}", nested=True):
                tracked_training(rcfg, **options)
        return Path(rcfg.train.output_dir) / "final"

    @contextlib.contextmanager
    def generator(self, cfg: LacyConfig, models: dict[str, str]) -> Iterator[Generator]:
        yield LocalGenerator(cfg, models)


# ----------------------------------------------------------------------------------------------
# Stage: knowledge store


def knowledge_stage(cfg: LacyConfig, corpus: Corpus) -> Path:
    """The passage store the big model reads (`Corpus.knowledge_documents`: each document with its
    description; for a synthetic corpus, one record per person)."""
    db = Path(cfg.knowledge.db_path)
    key = config_hash({"corpus": corpus.name, "data": to_dict(cfg.data), "synth": to_dict(cfg.synth),
                       "knowledge_file": file_digest(cfg.eval.knowledge_file),
                       "passage_words": cfg.knowledge.passage_words, "version": 3})
    if stage_done(db.parent / "knowledge", key) is None:
        report = build_store(corpus.knowledge_documents(corpus.documents()), db, cfg.knowledge.passage_words)
        log.info("knowledge store: %s", report.summary())
        stage_finish(db.parent / "knowledge", key, report=report.summary())
        storage.push(cfg, db, db.parent / "knowledge")  # before Serve's replicas look for it
    return db


# ----------------------------------------------------------------------------------------------
# Stage: training every rule x comparison


def model_name(cfg: LacyConfig, rule: str, comparison: str, seed: int | None = None) -> str:
    """One trained model's name: rule-comparison, and -seedN when trained with another seed than the
    config's `train.seed` (so a run that adds seeds keeps its first models)."""
    seed = cfg.train.seed if seed is None else seed
    return f"{rule}-{comparison}" + ("" if seed == cfg.train.seed else f"-seed{seed}")


def seeds(cfg: LacyConfig) -> list[int]:
    """The training seeds of the experiment: experiment.seeds, else the config's train.seed."""
    return cfg.experiment.seeds or [cfg.train.seed]


def rule_config(cfg: LacyConfig, rule: str, comparison: str, token_budget: int | None,
                seed: int | None = None) -> LacyConfig:
    """The config one training run uses: the rule, its seed, its own output folder, its stopping rule.

    Token comparison: a delegating rule stops at `plain`'s supervised tokens, its schedule counted in
    supervised tokens (lacy.train.lr_factor), so it ends at the learning-rate floor as `plain` does;
    max_steps only bounds the run (twice plain's, never reached at a call share under 50 %)."""
    rcfg = copy.deepcopy(cfg)
    rcfg.labels.rule = rule
    rcfg.train.seed = cfg.train.seed if seed is None else seed
    rcfg.train.output_dir = str(Path(cfg.run_dir) / "train" / model_name(cfg, rule, comparison, seed))
    if comparison == "tokens" and rule != "plain":
        rcfg.train.max_supervised_tokens = token_budget
        rcfg.train.max_steps = cfg.train.max_steps * 2
    return rcfg


def train_key(rcfg: LacyConfig, manifest_hash: str) -> str:
    """What makes one training run the same: model, training and labelling config, and the shards."""
    return config_hash({"model": to_dict(rcfg.model), "train": {**to_dict(rcfg.train), "output_dir": ""},
                        "labels": to_dict(rcfg.labels), "shards": manifest_hash, "trainer_version": 2})


def train_stage(cfg: LacyConfig, rule: str, comparison: str, token_budget: int | None, manifest_hash: str,
                fit: Callable[[LacyConfig], Path], seed: int | None = None) -> dict:
    """Pretrain one rule with `fit(rule config) -> final model dir`, unless a record says it is done
    for the same config (by whichever trainer, on whichever machine). The record carries the training
    summary (steps, tokens, supervised tokens, call share, whether the budget was reached)."""
    rcfg = rule_config(cfg, rule, comparison, token_budget, seed)
    out = Path(rcfg.train.output_dir)
    key = train_key(rcfg, manifest_hash)
    name = model_name(cfg, rule, comparison, seed)
    if (record := stage_done(out, key)) is not None:
        log.info("train %s: done before (%s), reusing it", name, record.get("trainer"))
        return {**record, "final": str(out / "final"), "seed": rcfg.train.seed}  # maybe from another machine
    log.info("train %s: starting", name)
    final = fit(rcfg)
    summary = json.loads((Path(final) / SUMMARY).read_text())
    if not summary.get("budget_reached", True):
        raise RuntimeError(f"{rule}/{comparison} stopped at train.max_steps={rcfg.train.max_steps} with "
                           f"{summary['supervised_tokens']} of {token_budget} supervised tokens")
    record = stage_finish(out, key, final=str(final), comparison=comparison, seed=rcfg.train.seed, **summary)
    storage.push(cfg, out)
    return record


def train_all(cfg: LacyConfig, train_one: Callable[[str, str, int | None, int], dict]) -> dict[str, dict]:
    """`train_one(rule, comparison, token budget, seed)` for every seed x rule x comparison, keyed by
    `model_name`. Per seed, `plain` trains first: its real-token-supervised tokens are the budget of the
    token comparison."""
    xcfg, trained = cfg.experiment, {}
    for seed in seeds(cfg):
        budget = None
        for comparison in xcfg.comparisons:
            for rule in sorted(xcfg.rules, key=lambda r: r != "plain"):
                name = model_name(cfg, rule, comparison, seed)
                if comparison == "tokens" and rule == "plain" and "steps" in xcfg.comparisons:
                    trained[name] = trained[model_name(cfg, rule, "steps", seed)]
                    continue
                trained[name] = record = train_one(rule, comparison, budget, seed)
                if rule == "plain" and "supervised_tokens" in record:
                    budget = int(record["supervised_tokens"])
    return trained


def validation_loss(cfg: LacyConfig, model_dir: str) -> dict:
    """Real-token validation metrics of a trained model on the held-out shards."""
    if not read_manifest(cfg.score.output_dir).shards.get("val"):
        return {}
    model, tokenizer = load_small_model(model_dir)
    with torch.no_grad():
        return validate(model, read_batches(cfg.score.output_dir, "val", cfg.train.batch_size), call_id(tokenizer))


def _stored_bits(record: dict, pop: Population) -> dict:
    """`lacy.eval.synthetic.stored_bits` of a trained model over every trained-on person, cached beside it."""
    docs = pop.train_docs
    path = Path(record["final"]).parent / "stored_bits.json"
    value = cached_json(path, {"model": record["key"], "people": len(docs), "version": 1},
                        lambda: stored_bits(record["final"], docs))
    return {k: v for k, v in value.items() if k != "key"}


def _proxy_stage(cfg: LacyConfig, results: Path) -> None:
    """results/proxy_vs_oracle.json: the shards' fact flags scored against the oracle."""
    proxy = proxy_vs_oracle(cfg.score.output_dir)
    (results / "proxy_vs_oracle.json").write_text(json.dumps(proxy, indent=2))
    log.info("spaCy proxy vs oracle: precision %.3f, recall %.3f", proxy["precision"] or 0, proxy["recall"] or 0)


# ----------------------------------------------------------------------------------------------
# The pipeline


def run(cfg: LacyConfig, backend: Backend | None = None, *, until: str = "report", track: bool = False,
        rules: list[str] | None = None, publish: str | Path | None = None, command: str = "lacy.experiment.run"
        ) -> Path:
    """Run the experiment up to stage `until` ("shards", "train", "report"); returns `<run_dir>/results`.

    `rules` trains only those (their token budget's `plain` must be done already); `track` logs one
    MLflow parent run (the corpus and shards as inputs, the results as artifacts, every trained model
    registered with its thresholds) with a nested run per stage (the Ray backend's jobs log theirs under
    it) and per evaluated system, its biographies as a table and as traces (`lacy.record`). A run
    that is to be evaluated first checks that its corpus has people to evaluate and calibrate on, so a
    config whose evaluation cannot run fails before anything trains. The report (results/report.md) names
    `command`; `publish` copies it with its plots to that folder (`docs/results` for the README)."""
    started = time.time()
    backend = backend or LocalBackend()
    corpus = corpus_for(cfg)
    results = Path(cfg.run_dir) / "results"
    storage.pull(cfg)  # a store-backed run: whatever another machine finished is reused
    results.mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    pop = population(cfg, corpus) if until == "report" else None
    with _tracking(cfg, track) as parent, _pushed_at_exit(cfg):
        log.info("stages 1-3, corpus -> facts -> shards")
        manifest = backend.build_shards(cfg, parent)
        log_inputs(cfg, manifest)  # the experiment's inputs too, where runs are compared
        if until == "shards":
            return results
        log.info("stage 4, train: %s x %s", cfg.experiment.rules, cfg.experiment.comparisons)
        trained = train_all(cfg, _trainer(cfg, backend, manifest.config_hash, parent, rules))
        if pop is None:
            return results
        log.info("stage 5, cascade: the big model's knowledge store")
        knowledge_stage(cfg, corpus)
        for record in trained.values():
            record.update({f"val_{k}": v for k, v in validation_loss(cfg, record["final"]).items()})
            if pop.exact:
                record.update(_stored_bits(record, pop))
        if pop.exact:
            _proxy_stage(cfg, results)
        models = {name: rec["final"] for name, rec in trained.items()}
        keys = {name: rec["key"] for name, rec in trained.items()}
        log.info("stage 6, eval: %d systems on %d people", len(evaluation_plan(cfg, list(models))), len(pop.train))
        seed_index = {name: seeds(cfg).index(rec.get("seed", cfg.train.seed)) for name, rec in trained.items()}
        with backend.generator(cfg, models) as generator:
            thresholds = thresholds_stage(cfg, models, keys, pop, generator, seed_index)
            # Big alone involves no small model: in process for every backend.
            rows = evaluate(cfg, evaluation_plan(cfg, list(models)), models, keys, thresholds, generator,
                            LocalGenerator(cfg, {}), pop)
            write_views(cfg, generator, list(models), pop.train, thresholds)
        log.info("stage 7, report")
        table = [row.to_dict() for row in rows]
        summary = method_summary(table, trained, cfg, results)
        write_report(results, table, cfg, summary, command, publish, started)
        if parent is not None:
            _log_results(results)
            log_evaluation(cfg, table, results)
            if cfg.mlflow.models:
                log_models(cfg, trained, thresholds)
    print(summary)  # noqa: T201 - the experiment's product, for the person who ran it
    return results


def _trainer(cfg: LacyConfig, backend: Backend, manifest_hash: str, parent: str | None,
             rules: list[str] | None) -> Callable[[str, str, int | None, int], dict]:
    wanted = set(cfg.experiment.rules if rules is None else rules)
    if unknown := wanted - set(cfg.experiment.rules):
        raise ValueError(f"--rules {sorted(unknown)} are not among experiment.rules {cfg.experiment.rules}")

    def train_one(rule: str, comparison: str, budget: int | None, seed: int) -> dict:
        if rule in wanted:
            return train_stage(cfg, rule, comparison, budget, manifest_hash, lambda r: backend.train(r, parent), seed)
        rcfg = rule_config(cfg, rule, comparison, budget, seed)
        record = stage_done(rcfg.train.output_dir, train_key(rcfg, manifest_hash))
        if record is None and rule == "plain" and "tokens" in cfg.experiment.comparisons:
            raise ValueError("token equalisation needs plain's supervised tokens: train plain first (--rules)")
        return record or {}

    return train_one


@contextlib.contextmanager
def _pushed_at_exit(cfg: LacyConfig) -> Iterator[None]:
    """Push the whole mirror when the run ends, also when it fails: nothing finished is lost."""
    try:
        yield
    finally:
        storage.push(cfg)


@contextlib.contextmanager
def _tracking(cfg: LacyConfig, track: bool) -> Iterator[str | None]:
    if not track:
        yield None
        return
    with start_run(cfg, "experiment") as parent:
        if parent is None:  # MLflow is not installed here
            yield None
            return
        yield parent.info.run_id
        log.info("MLflow: this experiment's runs at %s", ui_url(tracking_uri(cfg), parent.info.experiment_id))


def _log_results(results: Path) -> None:
    log_artifacts(str(results), artifact_path="results")


def main(argv: list[str] | None = None) -> Path:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--until", choices=["shards", "train", "report"], default="report")
    extra.add_argument("--rules", help="comma-separated subset of experiment.rules to train")
    extra.add_argument("--save_dtype", choices=["float32", "bfloat16"])
    extra.add_argument("--max_shard_mb", type=float, help="largest safetensors file of a saved model")
    extra.add_argument("--reuse_shards", action="store_true", help="train on the shards as they are")
    extra.add_argument("--publish", help="also write the report with its plots to this folder (docs/results)")
    known, rest = extra.parse_known_args(argv)
    setup_logging()
    cfg = parse_cli(rest, __doc__ or "")
    backend = LocalBackend(getattr(torch, known.save_dtype) if known.save_dtype else None, known.max_shard_mb,
                           known.reuse_shards)
    return run(cfg, backend, until=known.until, rules=known.rules.split(",") if known.rules else None,
               publish=known.publish, command=command_line("lacy.experiment", argv), track=True)


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m <module> <arguments>` as the user typed it (for the report)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

