"""The evaluation plan — which systems are evaluated, on whom, generated how — as data, and its run.

A `System` is a small model (or none), a big side (or none), a call trigger and a target rate, on a
group of people; `evaluation_plan` lists them for an experiment. Thresholds are calibrated per model,
big side, trigger and rate, with calls on, on people the systems are never scored on, and fixed, so
every row is independent of request order and concurrency. A `Generator` writes the text (in process,
`lacy.eval.generate`; over HTTP to Ray Serve in `jobs.experiment`); `evaluate` generates every system's
biographies, scores them (by claims against articles, or exactly against records for a corpus that
knows its facts) and caches each row under everything that determines it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lacy.cascade.engine import Cascade, generate_batch
from lacy.cascade.knowledge import SqlitePassageStore
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import ClosedLoop
from lacy.core.compute import compute_thread
from lacy.core.config import CALL_RULES, LacyConfig, to_dict
from lacy.core.stages import cached_json, cached_value
from lacy.corpus.corpora import Corpus
from lacy.corpus.readers import doc_split
from lacy.eval.claims import load_nlp, score_claims
from lacy.eval.generate import Generated, Generator, LocalGenerator, Request, bio_prompt, biographies
from lacy.eval.leakage import leakage, make_leak_probes
from lacy.eval.row import SCHEMA, Row
from lacy.eval.synthetic import leak_probes, score_records
from lacy.model import load_small_model
from lacy.serve.view import generation_block, page_html

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The evaluation plan: data, not closures


@dataclass(frozen=True)
class System:
    """One evaluated system: a trained small model (None: big alone), a big side (None: small alone),
    a call trigger and target call rate, on a group of people ("train": trained-on, "heldout")."""

    small: str | None
    big: str | None
    trigger: str | None = None
    rate: float | None = None
    people: str = "train"

    @property
    def name(self) -> str:
        if self.small is None:
            return f"big-{self.big}" + ("" if self.people == "train" else f" ({self.people})")
        if self.big is None:
            return f"{self.small} alone" + ("" if self.people == "train" else f" ({self.people})")
        name = f"{self.small}+{self.big}@{self.rate}/{self.trigger}"
        return name if self.people == "train" else f"{name} ({self.people})"


def evaluation_plan(cfg: LacyConfig, models: list[str]) -> list[System]:
    """Big alone per big side; per model: alone, and in the cascade with each big side at each call
    rate with each trigger it can use — P(<CALL>) only for models trained to emit it, the confidence
    trigger (inference-only calling) for every model; held-out people at the headline rate."""
    xcfg, ecfg = cfg.experiment, cfg.eval
    plan = [System(None, big) for big in xcfg.big_models]
    for model in models:
        plan.append(System(model, None))
        for big in xcfg.big_models:
            for rate in ecfg.call_rates:
                if rate == 0.0:
                    continue
                for trigger in _triggers(cfg, model):
                    plan.append(System(model, big, trigger, rate))
                    if ecfg.heldout_entities and rate == xcfg.headline_rate:
                        plan.append(System(model, big, trigger, rate, people="heldout"))
    return plan


def _triggers(cfg: LacyConfig, model: str) -> list[str]:
    rule = model.rsplit("-", 1)[0]
    return [t for t in cfg.experiment.triggers if t == "confidence" or rule in CALL_RULES]


# ----------------------------------------------------------------------------------------------
# People


@dataclass
class Population:
    """Who the evaluation asks about: trained-on people, held-out people, and the disjoint calibration
    group whose prompts set the thresholds (never the evaluation people's)."""

    train: list[Any]
    heldout: list[Any]
    calibration: list[Any]
    articles: dict[str, dict]
    """Person id -> what their facts are checked against (`Corpus.articles`: an article, or a record)."""
    train_docs: list[dict]
    """Training-split documents (leakage probes)."""
    exact: bool = False
    """Scored exactly against records (`lacy.eval.synthetic`) rather than by claims against articles."""


def population(cfg: LacyConfig, corpus: Corpus) -> Population:
    """The corpus' people split into evaluation, calibration and held-out groups (seeded; a person's
    split is their documents')."""
    docs = list(corpus.documents())
    split = {doc.get("person") or doc["id"]: doc_split(doc, cfg.data.val_fraction) for doc in docs}
    people = [e for e in corpus.people(docs) if e.doc_id in split]
    random.Random(cfg.seed).shuffle(people)
    trained = [e for e in people if split[e.doc_id] == "train"]
    ecfg = cfg.eval
    return Population(train=trained[:ecfg.entities],
                      calibration=trained[ecfg.entities:ecfg.entities + ecfg.calibration_entities],
                      heldout=[e for e in people if split[e.doc_id] == "val"][:ecfg.heldout_entities],
                      articles=corpus.articles(docs), exact=corpus.exact,
                      train_docs=[d for d in docs if doc_split(d, cfg.data.val_fraction) == "train"])


# ----------------------------------------------------------------------------------------------
# Thresholds


def threshold_key(small: str, big: str, trigger: str, rate: float) -> str:
    return f"{small}+{big}/{trigger}/{rate}"


def calibrate_thresholds(cfg: LacyConfig, models: dict[str, str], people: list[Any], generator: Generator,
                         triggers: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """{threshold_key: {"threshold", "realised_rate", "rounds", "open_loop_rate"}} for every cascade of
    the plan, on the calibration people (never the evaluation people).

    Open loop first (the quantile of each small model's trigger scores, decoded with calls off), then
    `eval.calibration_rounds` closed-loop rounds through `generator` with the big side on
    (`lacy.cascade.policy.ClosedLoop`): rules are compared at the call rate they realise, and a model
    whose calls beget calls would otherwise realise several times the target. Every search steps at
    once, so each round is one batch over every model, trigger, big side and rate. Fixed thresholds make
    every row independent of request order and concurrency. `triggers`: per model (default: every
    trigger of experiment.triggers the model can use)."""
    ecfg = cfg.eval
    prompts = [bio_prompt(e, ecfg.prompt_style) for e in people]
    if not prompts:
        raise ValueError("no calibration people: raise eval.calibration_entities or the corpus size")
    searches: dict[tuple[str, str, str, float], ClosedLoop] = {}
    for name, trigger, scores in _open_loop_scores(cfg, models, prompts, triggers):
        for big in cfg.experiment.big_models:
            for rate in (r for r in ecfg.call_rates if r > 0):
                searches[name, big, trigger, rate] = ClosedLoop(scores, rate, ecfg.calibration_rounds,
                                                                ecfg.calibration_tolerance)
    while pending := [key for key, search in searches.items() if search.threshold is not None]:
        requests = [Request(prompt, name, big, trigger, searches[name, big, trigger, rate].threshold,
                            cfg.cascade.max_new_tokens, topic=e.name)
                    for name, big, trigger, rate in pending for e, prompt in zip(people, prompts, strict=True)]
        outs = generator.generate_many(requests)
        for k, key in enumerate(pending):
            mine = outs[k * len(people):(k + 1) * len(people)]
            searches[key].observe(sum(o.calls for o in mine) / max(1, sum(o.decision_points for o in mine)))
    out = {}
    for (name, big, trigger, rate), search in searches.items():
        result = search.result()
        out[threshold_key(name, big, trigger, rate)] = asdict(result)
        log.info("calibrated %s+%s/%s at %.2f: threshold %.4g, realised %s after %d rounds (open loop %s)", name,
                 big, trigger, rate, result.threshold, result.realised_rate, result.rounds, result.open_loop_rate)
    return out


def _open_loop_scores(cfg: LacyConfig, models: dict[str, str], prompts: list[str],
                      triggers: dict[str, list[str]] | None) -> list[tuple[str, str, Any]]:
    """(model, trigger, every decision point's score with calls off) for each model and its triggers,
    each model's prompts decoded as one batch in this process (the small models alone)."""
    compute, out = compute_thread(), []
    for name, path in models.items():
        model, tokenizer = compute.call(load_small_model, path)
        for trigger in (triggers or {}).get(name) or _triggers(cfg, name):
            decodings = [Cascade(SmallLM(model, tokenizer), None, cfg.cascade).start(p, allow_calls=False,
                                                                                     trigger=trigger)
                         for p in prompts]
            results = compute.call(generate_batch, decodings)
            scores = np.asarray([x for r in results for x in r.call_scores], dtype=np.float64)
            if not scores.size:
                raise ValueError(f"{name}: no decision points while decoding the calibration prompts")
            out.append((name, trigger, scores))
    return out


def _row_key(cfg: LacyConfig) -> dict:
    """What every cached evaluation result depends on besides its system."""
    return {"eval": to_dict(cfg.eval), "cascade": to_dict(cfg.cascade), "big": to_dict(cfg.big),
            "knowledge": to_dict(cfg.knowledge), "seed": cfg.seed, "row_schema": SCHEMA}


def thresholds_stage(cfg: LacyConfig, models: dict[str, str], stage_keys: dict[str, str],
                     pop: Population, generator: Generator) -> dict[str, dict]:
    """`calibrate_thresholds`, cached in results/thresholds.json under everything that changes them: the
    models, big sides, triggers, rates (eval, in the row key) and the calibration people."""
    path = Path(cfg.run_dir) / "results" / "thresholds.json"
    key = {**_row_key(cfg), "models": stage_keys, "bigs": cfg.experiment.big_models,
           "triggers": cfg.experiment.triggers, "people": [e.doc_id for e in pop.calibration]}
    value = cached_json(path, key, lambda: calibrate_thresholds(cfg, models, pop.calibration, generator))
    return {k: v for k, v in value.items() if k != "key"}


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(cfg: LacyConfig, plan: list[System], models: dict[str, str], stage_keys: dict[str, str],
             thresholds: dict[str, dict], generator: Generator, big_generator: LocalGenerator,
             pop: Population) -> list[Row]:
    """Every system of the plan: its biographies, scored, plus leakage for each small model alone;
    rows cached under results/rows by what determines them. The biographies of every row not cached
    yet are written in one `generate_many` (the big model alone by `big_generator`, in this process)."""
    ecfg = cfg.eval
    results = Path(cfg.run_dir) / "results"
    store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
    nlp = None if pop.exact else load_nlp(cfg.facts.spacy_model)
    base_key = _row_key(cfg)
    probes = _leak_probes(cfg, pop, nlp, models)
    todo: dict[System, dict] = {}
    for system in plan:
        people = pop.train if system.people == "train" else pop.heldout
        calibration = thresholds.get(threshold_key(system.small, system.big, system.trigger, system.rate), {})
        key = {**base_key, "system": system.name, "model": stage_keys.get(system.small or ""),
               "threshold": calibration.get("threshold"), "people": [e.doc_id for e in people]}
        todo[system] = {"people": people, "calibration": calibration, "key": key,
                        "path": results / "rows" / f"{system.name}.json"}
    missing = [s for s, job in todo.items() if cached_value(job["path"], job["key"]) is None]
    written = _write(cfg, missing, todo, probes, generator, big_generator)
    rows = []
    for system, job in todo.items():
        def compute(system: System = system, job: dict = job) -> dict:
            bios = biographies(job["people"], written[system, "bios"], ecfg.prompt_style)
            if pop.exact:
                row = score_records(system.name, bios, pop.articles, gamma=ecfg.gamma, bootstrap=ecfg.bootstrap,
                                    seed=cfg.seed)
            else:
                row = score_claims(system.name, bios, pop.articles, store, k=cfg.knowledge.top_k, gamma=ecfg.gamma,
                                   bootstrap=ecfg.bootstrap, seed=cfg.seed, nlp=nlp)
            if (system, "leaks") in written:
                _add_leakage(row, probes, written[system, "leaks"])
            return row.to_dict()

        row = Row.from_dict(cached_json(job["path"], job["key"], compute))
        row.model, row.big, row.trigger = system.small, system.big or "none", system.trigger
        row.target_rate, row.people = system.rate, system.people
        row.threshold, row.calibration_rate = job["key"]["threshold"], job["calibration"].get("realised_rate")
        rows.append(row)
        log.info("eval %s: precision %s, call rate %s", system.name, row.precision, row.call_rate)
    return rows


def _write(cfg: LacyConfig, systems: list[System], todo: dict[System, dict], probes: list[Any],
           generator: Generator, big_generator: LocalGenerator) -> dict[tuple[System, str], list[Generated]]:
    """The texts of `systems` as one batch: each system's biographies and, for a small model alone, its
    continuations of the leakage probes; {(system, "bios" | "leaks"): outputs}."""
    requests: list[Request] = []
    spans: dict[tuple[System, str], tuple[int, int]] = {}
    alone: list[Request] = []
    for system in systems:
        job = todo[system]
        asks = [Request(bio_prompt(e, cfg.eval.prompt_style), system.small, system.big, system.trigger or "p_call",
                        job["key"]["threshold"], cfg.cascade.max_new_tokens, topic=e.name) for e in job["people"]]
        if system.small is None:  # the big model alone: in this process, in its own batches
            spans[system, "bios"] = (-len(alone) - 1, len(asks))
            alone += asks
            continue
        spans[system, "bios"] = (len(requests), len(asks))
        requests += asks
        if system.big is None:  # leakage: the small model alone continues each probe, <CALL> disabled
            spans[system, "leaks"] = (len(requests), len(probes))
            requests += [Request(p.prefix, system.small, None, max_tokens=8) for p in probes]
    outs = generator.generate_many(requests) if requests else []
    big_outs = big_generator.generate_many(alone) if alone else []
    return {key: (big_outs[-start - 1:-start - 1 + n] if start < 0 else outs[start:start + n])
            for key, (start, n) in spans.items()}


def _leak_probes(cfg: LacyConfig, pop: Population, nlp: Any, models: dict[str, str]) -> list[Any]:
    """`eval.leakage_facts` probes from training documents, their prefixes cut to fit the small context."""
    if not models:
        return []
    tokenizer = load_small_model(next(iter(models.values())))[1]
    if pop.exact:
        probes = leak_probes(pop.train_docs, cfg.eval.leakage_facts, seed=cfg.seed)
    else:
        probes = make_leak_probes(pop.train_docs, nlp, cfg.eval.leakage_facts, seed=cfg.seed)
    return [_fit_probe(p, tokenizer, cfg.model.seq_len - 16) for p in probes]


def _add_leakage(row: Row, probes: list[Any], outs: list[Generated]) -> None:
    report = leakage(probes, [out.text for out in outs])
    row.leakage, (row.leakage_lo, row.leakage_hi) = report.rate, report.ci
    row.leak_probes = report.probes
    row.leakage_by_type = {k: v[0] / v[1] for k, v in report.by_label.items()}


def _fit_probe(probe: Any, tokenizer: Any, max_tokens: int) -> Any:
    """The probe with its prefix cut (at a word border) to its last `max_tokens` tokens."""
    offsets = tokenizer(probe.prefix, add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return probe
    tail = probe.prefix[offsets[-max_tokens][0]:]
    return replace(probe, prefix=tail[tail.find(" ") + 1:] if " " in tail else tail)


def write_views(cfg: LacyConfig, generator: Generator, models: list[str], people: list[Any],
                thresholds: dict[str, dict]) -> None:
    """One HTML page per model: biographies at the headline call rate, delegated spans coloured."""
    xcfg = cfg.experiment
    big = "retrieval" if "retrieval" in xcfg.big_models else xcfg.big_models[0]
    pages = []
    for model in models:
        if not (triggers := _triggers(cfg, model)):
            continue  # e.g. plain when only p_call is evaluated: it never calls
        threshold = thresholds.get(threshold_key(model, big, triggers[0], xcfg.headline_rate), {}).get("threshold")
        pages.append((model, triggers[0], [Request(bio_prompt(e, cfg.eval.prompt_style), model, big, triggers[0],
                                                   threshold, cfg.cascade.max_new_tokens, topic=e.name)
                                           for e in people[:xcfg.views]]))
    outs = iter(generator.generate_many([r for *_, requests in pages for r in requests]))
    for model, trigger, requests in pages:
        blocks = [generation_block(out.spans, f"{out.calls} calls, call rate {out.call_rate:.2f}")
                  for out in (next(outs) for _ in requests)]
        (Path(cfg.run_dir) / "results" / f"view-{model}.html").write_text(page_html(
            f"{model}: cascade with the {big} big model, {trigger} trigger at {xcfg.headline_rate:.0%} calls",
            "".join(blocks)))
