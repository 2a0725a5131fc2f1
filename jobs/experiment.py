"""The whole experiment in one command: corpus -> tokenizer + scoring -> pretraining of every rule ->
knowledge store -> cascade evaluation through Ray Serve against both big models at several call rates
-> fact leakage -> the method table and plot.

    python -m jobs.experiment --config configs/default.yaml           # `make run`: embedded default
    python -m jobs.experiment --config configs/wiki2015-cpu.yaml      # the fuller CPU run
    cluster/submit.sh experiment configs/gpu-334m.yaml                # ray job submit to a cluster
    python -m jobs.experiment --config configs/tiny.yaml --experiment.rules '[plain, lacy]'

Every stage is an MLflow run nested under one parent run; the table (Markdown + CSV), the plot, the
delegated-token HTML views and the resolved config are the parent's artifacts. Stages are
content-addressed: re-running skips every stage whose outputs exist for the same config, so a crash
loses only the stage in flight. Outputs land in `<run_dir>/` (`results/` holds the table).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lacy.config import LacyConfig, config_hash, parse_cli, save_config, to_dict

# ----------------------------------------------------------------------------------------------
# Content-addressed stages


def stage_done(directory: Path, key: str) -> dict | None:
    """The record of a finished stage with this key, else None."""
    path = directory / "stage.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return record
    return None


def stage_finish(directory: Path, key: str, **record: Any) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    record = {"key": key, **record}
    tmp = directory / "stage.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, directory / "stage.json")
    return record


ROW_VERSION = 2
"""Bump when an evaluation row's meaning changes, so cached rows are recomputed (2: pooled call rate)."""


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Stages


def score_stage(cfg: LacyConfig, parent_run_id: str) -> Any:
    from jobs import score

    return score.run(cfg, parent_run_id=parent_run_id)  # resumable by itself, unit by unit


def knowledge_stage(cfg: LacyConfig) -> Path:
    from lacy.knowledge import build_store

    db = Path(cfg.knowledge.db_path)
    key = config_hash({"data": to_dict(cfg.data), "passage_words": cfg.knowledge.passage_words})
    if stage_done(db.parent / "knowledge", key) is None:
        if db.exists():
            db.unlink()
        report = build_store(cfg.data.corpus, db, cfg.knowledge.passage_words, max_docs=cfg.data.max_docs)
        stage_finish(db.parent / "knowledge", key, report=report.summary())
    return db


def rule_config(cfg: LacyConfig, rule: str, comparison: str, token_budget: int | None) -> LacyConfig:
    """The config one training run uses: the rule, its own output folder, and its stopping rule."""
    rcfg = copy.deepcopy(cfg)
    rcfg.labels.rule = rule
    rcfg.train.output_dir = str(Path(cfg.run_dir) / "train" / f"{rule}-{comparison}")
    if comparison == "tokens" and rule != "plain":
        rcfg.train.max_supervised_tokens = token_budget
        # Delegating rules supervise fewer real tokens per step, so they need more steps.
        rcfg.train.max_steps = cfg.train.max_steps * 2
    return rcfg


def train_key(rcfg: LacyConfig, manifest_hash: str) -> str:
    """What makes one training run the same: model, training and labelling config, and the shards."""
    return config_hash({"model": to_dict(rcfg.model), "train": {**to_dict(rcfg.train), "output_dir": ""},
                        "labels": to_dict(rcfg.labels), "shards": manifest_hash})


def train_stage(cfg: LacyConfig, rule: str, comparison: str, token_budget: int | None,
                manifest_hash: str, fit: Callable[[LacyConfig], Path]) -> dict:
    """Pretrain one rule with `fit(rule config) -> final model dir` (skipped when done for the same
    config, by whichever trainer: `jobs.pretrain_single` writes the same records)."""
    rcfg = rule_config(cfg, rule, comparison, token_budget)
    out = Path(rcfg.train.output_dir)
    key = train_key(rcfg, manifest_hash)
    if (record := stage_done(out, key)) is not None:
        _log(f"train {rule}/{comparison}: done before ({record.get('trainer', 'jobs.pretrain')}), reusing it")
        return {**record, "final": str(out / "final")}  # the record may come from another machine
    _log(f"train {rule}/{comparison}: starting")
    final = fit(rcfg)
    summary = json.loads((Path(final) / "training_summary.json").read_text())
    return stage_finish(out, key, final=str(final), rule=rule, comparison=comparison, **summary)


def train_all(cfg: LacyConfig, train_one: Callable[[str, str, int | None], dict]) -> dict[str, dict]:
    """`train_one(rule, comparison, token budget)` for every rule x comparison, keyed "rule-comparison".
    `plain` trains first: its real-token-supervised tokens are the budget of the token comparison."""
    xcfg, trained, budget = cfg.experiment, {}, None
    for comparison in xcfg.comparisons:
        for rule in sorted(xcfg.rules, key=lambda r: r != "plain"):
            if comparison == "tokens" and rule == "plain" and "steps" in xcfg.comparisons:
                trained[f"{rule}-tokens"] = trained[f"{rule}-steps"]
                continue
            trained[f"{rule}-{comparison}"] = record = train_one(rule, comparison, budget)
            if rule == "plain" and "supervised_tokens" in record:
                budget = int(record["supervised_tokens"])
    return trained


def validation_loss(cfg: LacyConfig, model_dir: str) -> dict:
    """Real-token validation loss of a trained model on the held-out shards (single process)."""
    import torch

    from lacy.model import load_big_model
    from lacy.shards import read_batches
    from lacy.tokenizer import call_id
    from lacy.train import evaluate

    model, tokenizer = load_big_model(model_dir)
    batches = read_batches(cfg.score.output_dir, "val", batch_size=cfg.train.batch_size, seed=0)
    with torch.no_grad():
        return evaluate(model, batches, call_id(tokenizer))


# ----------------------------------------------------------------------------------------------
# Evaluation through Ray Serve


class ServeClient:
    """generate functions for the evaluator, as HTTP calls to the cascade app."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        import httpx

        self.http = httpx.Client(base_url=base_url, timeout=600)
        self.max_tokens = max_tokens

    def generate(self, prompt: str, **policy: Any) -> SimpleNamespace:
        body = {"prompt": prompt, "max_tokens": self.max_tokens} | policy
        r = self.http.post("/generate", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
        out = r.json()
        return SimpleNamespace(text=out["text"], call_rate=out["call_rate"], spans=out["spans"],
                               calls=out["calls"], decision_points=out["decision_points"])


def _parallel(fn: Any, items: list, workers: int) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def evaluate_models(cfg: LacyConfig, models: dict[str, str], parent_run_id: str) -> list[dict]:
    """Small alone, big alone and the cascade at each call rate, for every trained model; leakage."""
    import mlflow
    from ray import serve

    from lacy import eval as lacy_eval
    from lacy.cascade import BigLM
    from lacy.data import load_entities, read_corpus, split_of
    from lacy.knowledge import RetrievalBigLM, SqlitePassageStore
    from lacy.model import load_big_model
    from lacy.shards import read_manifest
    from lacy.tokenizer import load_tokenizer
    from lacy.tracking import start_run
    from services.cascade import run as serve_run

    results_dir = Path(cfg.run_dir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    ecfg, xcfg = cfg.eval, cfg.experiment
    # The documents the models were trained on: evaluation people must have their article among them.
    corpus = list(read_corpus(cfg.data.corpus, max_docs=cfg.data.max_docs, min_chars=cfg.data.min_chars))
    articles = {doc["id"]: doc for doc in corpus}
    entities = [e for e in load_entities(cfg.data.corpus) if e.doc_id in articles][:ecfg.entities]
    store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
    nlp = lacy_eval.load_nlp(cfg.facts.spacy_model)
    evaluate = lambda name, fn: lacy_eval.evaluate_system(  # noqa: E731
        name, fn, entities, articles, store, k=cfg.knowledge.top_k, length_penalty=ecfg.length_penalty,
        gamma=ecfg.gamma, bootstrap=ecfg.bootstrap, seed=cfg.seed, prompt_style=ecfg.prompt_style, nlp=nlp)
    rows: list[dict] = []

    def cached(name: str, key_payload: dict, compute: Any) -> dict:
        path = results_dir / "rows" / f"{name}.json"
        key = config_hash(key_payload)
        if path.is_file() and (row := json.loads(path.read_text())).get("key") == key:
            return row
        row = {**compute(), "key": key}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
        return row

    eval_key = {"eval": to_dict(ecfg), "cascade": to_dict(cfg.cascade), "big": to_dict(cfg.big),
                "knowledge": to_dict(cfg.knowledge), "seed": cfg.seed, "row_version": ROW_VERSION}

    # Big alone, plain and with retrieval, in process (no small model involved).
    with start_run(cfg, "eval-big-alone", nested=True, parent_run_id=parent_run_id):
        big_model, big_tok = load_big_model(cfg.big.path)
        for kind in xcfg.big_models:
            def big_alone(prompt: str, kind: str = kind) -> str:
                lm: Any = BigLM(big_model, big_tok)
                kwargs: dict = {"unit": "tokens", "max_tokens": cfg.cascade.max_new_tokens}
                if kind == "retrieval":
                    lm = RetrievalBigLM(lm, store, cfg.knowledge.top_k, cfg.knowledge.passage_chars,
                                        cfg.knowledge.query)
                    kwargs["topic"] = _topic(prompt)
                return prompt + lm.continue_text(prompt, **kwargs)

            row = cached(f"big-{kind}", eval_key, lambda kind=kind, fn=big_alone: evaluate(f"big-{kind}", fn))
            rows.append({**row, "rule": f"big alone ({kind})", "big": kind, "target_rate": 1.0})
            mlflow.log_metric(f"precision_strict_{kind}", row.get("precision_strict") or 0.0)

    # One Serve app with every small model; requests pick the model, the big model and the policy.
    scfg = copy.deepcopy(cfg)
    scfg.serve.small_path = next(iter(models.values()))
    scfg.serve.models = dict(models)
    scfg.big.retrieval = "retrieval" in xcfg.big_models
    _log(f"deploying the Serve cascade with {len(models)} small models")
    serve_run(scfg)
    client = ServeClient(f"http://{cfg.serve.host}:{cfg.serve.port}", cfg.cascade.max_new_tokens)
    docs = [d for d in corpus if split_of(d["id"], cfg.data.val_fraction) == "train"]
    tokenizer = load_tokenizer(read_manifest(cfg.score.output_dir).tokenizer_path)
    probes = [_fit_probe(p, tokenizer, cfg.model.seq_len - 16)
              for p in lacy_eval.make_leak_probes(docs, nlp, ecfg.leakage_facts, seed=cfg.seed)]
    prompts = [lacy_eval.bio_prompt(e, ecfg.prompt_style) for e in entities]
    try:
        for name, path in models.items():
            with start_run(cfg, f"eval-{name}", nested=True, parent_run_id=parent_run_id):
                mkey = {**eval_key, "model": path, "stage": json.loads(
                    (Path(path).parent / "stage.json").read_text())["key"]}

                def small_alone(prompt: str, name: str = name) -> SimpleNamespace:
                    return client.generate(prompt, model=name, allow_calls=False)

                def leak(prefix: str, name: str = name) -> str:
                    return client.generate(prefix, model=name, max_tokens=8, allow_calls=False).text

                def compute_small(name: str = name, small_alone: Any = small_alone, leak: Any = leak) -> dict:
                    row = evaluate(f"{name} alone", _prefetched(small_alone, prompts, xcfg.eval_concurrency))
                    leak_fn = _prefetched(leak, [p.prefix for p in probes], xcfg.eval_concurrency)
                    report = lacy_eval.leakage(leak_fn, probes)
                    return {**row, "leakage": report.rate, "leak_probes": report.probes}

                row = cached(f"{name}-alone", mkey, compute_small)
                rows.append({**row, "rule": name, "big": "none", "target_rate": 0.0})
                mlflow.log_metrics({"leakage": row["leakage"],
                                    "precision_strict_alone": row.get("precision_strict") or 0.0})
                for kind in xcfg.big_models:
                    for rate in ecfg.call_rates:
                        if rate == 0.0:
                            continue

                        def cascade_gen(prompt: str, name: str = name, kind: str = kind,
                                        rate: float = rate) -> SimpleNamespace:
                            return client.generate(prompt, model=name, call_rate=rate,
                                                   retrieval=kind == "retrieval", topic=_topic(prompt))

                        def compute(kind: str = kind, rate: float = rate, fn: Any = cascade_gen,
                                    name: str = name) -> dict:
                            return evaluate(f"{name}+{kind}@{rate}",
                                            _prefetched(fn, prompts, xcfg.eval_concurrency))

                        row = cached(f"{name}-{kind}-{rate}", mkey, compute)
                        rows.append({**row, "rule": name, "big": kind, "target_rate": rate})
                        mlflow.log_metric(f"precision_strict_{kind}_{rate}",
                                          row.get("precision_strict") or 0.0)
                        _log(f"eval {name} + {kind} @ {rate}: precision {row.get('precision_strict')}, "
                             f"call rate {row.get('call_rate')}")
        _write_views(cfg, client, models, entities, results_dir)
    finally:
        serve.shutdown()
    return rows


def _fit_probe(probe: Any, tokenizer: Any, max_tokens: int) -> Any:
    """The probe with its prefix cut (at a word border) to the last `max_tokens` tokens, so it fits the
    small model's context with room to answer."""
    offsets = tokenizer(probe.prefix, add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return probe
    tail = probe.prefix[offsets[-max_tokens][0]:]
    return dataclasses.replace(probe, prefix=tail[tail.find(" ") + 1:] if " " in tail else tail)


def _topic(prompt: str) -> str:
    """The person a biography prompt is about ("NAME (" or "Tell me a bio of NAME.")."""
    return prompt.removeprefix("Tell me a bio of ").strip().removesuffix("(").removesuffix(".").strip()


def _prefetched(fn: Any, prompts: list[str], workers: int) -> Any:
    """`fn`, answered from `workers` concurrent calls made up front: the evaluator asks one prompt at a
    time, while the Serve app answers several requests at once."""
    answers = dict(zip(prompts, _parallel(fn, list(dict.fromkeys(prompts)), workers), strict=False))
    return lambda prompt: answers[prompt] if prompt in answers else fn(prompt)


def _write_views(cfg: LacyConfig, client: ServeClient, models: dict[str, str], entities: list,
                 results_dir: Path) -> None:
    """One HTML page per model: biographies at the headline call rate, delegated spans coloured."""
    from lacy.eval import bio_prompt
    from lacy.report import generation_block, page_html

    xcfg = cfg.experiment
    kind = "retrieval" if "retrieval" in xcfg.big_models else xcfg.big_models[0]
    for name in models:
        blocks = []
        for entity in entities[:xcfg.views]:
            prompt = bio_prompt(entity, cfg.eval.prompt_style)
            out = client.generate(prompt, model=name, call_rate=xcfg.headline_rate,
                                  retrieval=kind == "retrieval", topic=entity.name)
            blocks.append(generation_block([(s["text"], s["source"]) for s in out.spans],
                                           f"{out.calls} calls, call rate {out.call_rate:.2f}"))
        path = results_dir / f"view-{name}.html"
        path.write_text(page_html(f"{name}: cascade with the {kind} big model at "
                                  f"{xcfg.headline_rate:.0%} calls", "".join(blocks)))


# ----------------------------------------------------------------------------------------------
# The whole pipeline


def run(cfg: LacyConfig) -> Path:
    import mlflow

    from jobs import pretrain
    from lacy.report import method_summary
    from lacy.tracking import start_run

    results_dir = Path(cfg.run_dir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    xcfg = cfg.experiment
    with start_run(cfg, "experiment") as parent:
        parent_id = parent.info.run_id
        _log("stage 1/4: tokenizer + scoring (Ray Data)")
        manifest = score_stage(cfg, parent_id)
        manifest_hash = manifest.config_hash
        _log("stage 2/4: knowledge store")
        knowledge_stage(cfg)
        _log(f"stage 3/4: pretraining {xcfg.rules} x {xcfg.comparisons} (Ray Train + DeepSpeed)")

        def train_one(rule: str, comparison: str, budget: int | None) -> dict:
            record = train_stage(cfg, rule, comparison, budget, manifest_hash,
                                 lambda rcfg: pretrain.run(rcfg, parent_run_id=parent_id))
            val = validation_loss(cfg, record["final"])
            return {**record, **{f"val_{k}": v for k, v in val.items()}}

        trained = train_all(cfg, train_one)
        _log("stage 4/4: evaluation through Ray Serve")
        models = {name: rec["final"] for name, rec in trained.items()}
        rows = evaluate_models(cfg, models, parent_id)
        summary = method_summary(rows, trained, xcfg, results_dir, bootstrap=cfg.eval.bootstrap,
                                 seed=cfg.seed)
        mlflow.log_artifacts(str(results_dir), artifact_path="results")
        mlflow.log_artifact(str(Path(cfg.run_dir) / "config.yaml"))
    print(summary)
    return results_dir


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_cli(argv, __doc__ or "")
    return run(cfg)


if __name__ == "__main__":
    main()
