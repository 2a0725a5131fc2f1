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
from functools import partial
from pathlib import Path
from typing import Any

from lacy.cascade.engine import Cascade
from lacy.cascade.knowledge import SqlitePassageStore
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import closed_loop_threshold, decision_scores
from lacy.core.compute import compute_thread
from lacy.core.config import CALL_RULES, LacyConfig, to_dict
from lacy.core.stages import cached_json
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

    Open loop first (`lacy.cascade.policy.calibrate`'s quantile of the small model's scores with calls
    off), then `eval.calibration_rounds` closed-loop rounds through `generator` with the big side on
    (`lacy.cascade.policy.closed_loop_threshold`): rules are compared at the call rate they realise,
    and a model whose calls beget calls would otherwise realise several times the target. Fixed
    thresholds make every row independent of request order and concurrency. `triggers`: per model (default:
    every trigger of experiment.triggers the model can use)."""
    ecfg = cfg.eval
    prompts = [bio_prompt(e, ecfg.prompt_style) for e in people]
    if not prompts:
        raise ValueError("no calibration people: raise eval.calibration_entities or the corpus size")
    out, compute = {}, compute_thread()  # the thread LocalGenerator decodes on (lacy.core.compute)
    for name, path in models.items():
        cascade = Cascade(SmallLM(*compute.call(load_small_model, path)), None, cfg.cascade)
        for trigger in (triggers or {}).get(name) or _triggers(cfg, name):
            scores = compute.call(decision_scores, cascade, prompts, trigger=trigger)
            for big in cfg.experiment.big_models:
                for rate in (r for r in ecfg.call_rates if r > 0):
                    realised = partial(_realised_rate, cfg, generator, people, name, big, trigger)
                    result = closed_loop_threshold(scores, rate, realised, ecfg.calibration_rounds,
                                                   ecfg.calibration_tolerance)
                    out[threshold_key(name, big, trigger, rate)] = asdict(result)
                    log.info("calibrated %s+%s/%s at %.2f: threshold %.4g, realised %s after %d rounds (open "
                             "loop %s)", name, big, trigger, rate, result.threshold, result.realised_rate,
                             result.rounds, result.open_loop_rate)
    return out


def _realised_rate(cfg: LacyConfig, generator: Generator, people: list[Any], model: str, big: str, trigger: str,
                   threshold: float) -> float:
    """All calls over all decision points of the people's biographies with calls on at `threshold`."""
    def write(entity: Any, prompt: str) -> Generated:
        return generator.generate(Request(prompt, model, big, trigger, threshold, cfg.cascade.max_new_tokens,
                                          topic=entity.name))

    bios = biographies(write, people, cfg.eval.prompt_style, workers=cfg.experiment.eval_concurrency)
    return sum(b.calls or 0 for b in bios) / max(1, sum(b.decision_points or 0 for b in bios))


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
    rows cached under results/rows by what determines them. The big model alone writes in batches
    (`big_generator.generate_many`)."""
    ecfg = cfg.eval
    results = Path(cfg.run_dir) / "results"
    store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
    nlp = None if pop.exact else load_nlp(cfg.facts.spacy_model)
    base_key = _row_key(cfg)
    probes = _leak_probes(cfg, pop, nlp, models)
    rows = []
    for system in plan:
        people = pop.train if system.people == "train" else pop.heldout
        calibration = thresholds.get(threshold_key(system.small, system.big, system.trigger, system.rate), {})
        threshold = calibration.get("threshold")
        key = {**base_key, "system": system.name, "model": stage_keys.get(system.small or ""),
               "threshold": threshold, "people": [e.doc_id for e in people]}

        def compute(system: System = system, people: list = people, threshold: float | None = threshold) -> dict:
            def request(entity: Any, prompt: str) -> Request:
                return Request(prompt, system.small, system.big, system.trigger or "p_call", threshold,
                               cfg.cascade.max_new_tokens, topic=entity.name)

            written: dict[str, Generated] = {}
            if system.small is None:  # the big model alone writes in batches, up front
                outs = big_generator.generate_many([request(e, bio_prompt(e, ecfg.prompt_style)) for e in people])
                written = dict(zip((e.doc_id for e in people), outs, strict=True))

            def write(entity: Any, prompt: str) -> Generated:
                return written[entity.doc_id] if written else generator.generate(request(entity, prompt))

            bios = biographies(write, people, ecfg.prompt_style, workers=cfg.experiment.eval_concurrency)
            if pop.exact:
                row = score_records(system.name, bios, pop.articles, gamma=ecfg.gamma, bootstrap=ecfg.bootstrap,
                                    seed=cfg.seed)
            else:
                row = score_claims(system.name, bios, pop.articles, store, k=cfg.knowledge.top_k, gamma=ecfg.gamma,
                                   bootstrap=ecfg.bootstrap, seed=cfg.seed, nlp=nlp)
            if system.small is not None and system.big is None:
                _add_leakage(row, generator, system.small, probes, cfg.experiment.eval_concurrency)
            return row.to_dict()

        row = Row.from_dict(cached_json(results / "rows" / f"{system.name}.json", key, compute))
        row.model, row.big, row.trigger = system.small, system.big or "none", system.trigger
        row.target_rate = system.rate
        row.people, row.threshold, row.calibration_rate = system.people, threshold, calibration.get("realised_rate")
        rows.append(row)
        log.info("eval %s: strict precision %s, call rate %s", system.name, row.precision_strict, row.call_rate)
    return rows


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


def _add_leakage(row: Row, generator: Generator, model: str, probes: list[Any], workers: int) -> None:
    report = leakage(lambda prefix: generator.generate(Request(prefix, model, None, max_tokens=8)).text, probes,
                     workers)
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
    for model in models:
        if not (triggers := _triggers(cfg, model)):
            continue  # e.g. plain when only p_call is evaluated: it never calls
        trigger = triggers[0]
        threshold = thresholds.get(threshold_key(model, big, trigger, xcfg.headline_rate), {}).get("threshold")
        blocks = []
        for entity in people[:xcfg.views]:
            out = generator.generate(Request(bio_prompt(entity, cfg.eval.prompt_style), model, big, trigger,
                                             threshold, cfg.cascade.max_new_tokens, topic=entity.name))
            blocks.append(generation_block(out.spans, f"{out.calls} calls, call rate {out.call_rate:.2f}"))
        (Path(cfg.run_dir) / "results" / f"view-{model}.html").write_text(page_html(
            f"{model}: cascade with the {big} big model, {trigger} trigger at {xcfg.headline_rate:.0%} calls",
            "".join(blocks)))


