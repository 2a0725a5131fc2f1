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

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lacy.cascade.engine import Cascade, generate_batch
from lacy.cascade.knowledge import SqlitePassageStore
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import ClosedLoop
from lacy.core.compute import compute_thread
from lacy.core.config import CALL_RULES, CALL_TRIGGERS, LacyConfig, config_hash, to_dict
from lacy.core.stages import cached_json, cached_value, write_json
from lacy.corpus.corpora import Corpus
from lacy.corpus.people import file_digest
from lacy.corpus.readers import doc_split
from lacy.eval.claims import load_nlp, score_claims
from lacy.eval.generate import (
    Generated,
    Generator,
    LocalGenerator,
    Request,
    bio_prompt,
    biographies,
    export_generations,
)
from lacy.eval.judge import LLMJudge
from lacy.eval.leakage import leakage, make_leak_probes
from lacy.eval.row import SCHEMA, Row, add_judge
from lacy.eval.synthetic import leak_probes, score_records
from lacy.model import load_small_model
from lacy.serve.view import generation_block, page_html

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The evaluation plan: data, not closures


@dataclass(frozen=True)
class System:
    """One evaluated system: a trained small model (None: big alone), a big side (None: small alone),
    a call trigger, target call rate and what one call writes (`unit`; None: cascade.big_unit), on a
    group of people ("train": trained-on, "heldout"). `budget`: the big model alone cut to the mean length
    of the cascades' output (a reference under the same output budget)."""

    small: str | None
    big: str | None
    trigger: str | None = None
    rate: float | None = None
    people: str = "train"
    unit: str | None = None
    budget: bool = False

    @property
    def name(self) -> str:
        where = "" if self.people == "train" else f" ({self.people})"
        if self.small is None:
            return f"big-{self.big}" + (" (budget)" if self.budget else "") + where
        if self.big is None:
            return f"{self.small} alone{where}"
        return f"{self.small}+{self.big}@{self.rate}/{self.trigger}" + (f"/{self.unit}" if self.unit else "") + where


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
                    for unit in xcfg.units or [None]:
                        plan.append(System(model, big, trigger, rate, unit=unit))
                    if ecfg.heldout_entities and rate == xcfg.headline_rate:
                        plan.append(System(model, big, trigger, rate, people="heldout"))
    # The big model alone under the cascades' output budget: evaluated last, from their lengths.
    return plan + [System(None, big, budget=True) for big in xcfg.big_models if models]


def _triggers(cfg: LacyConfig, model: str) -> list[str]:
    rule = model.split("-", 1)[0]
    return [t for t in cfg.experiment.triggers if t not in CALL_TRIGGERS or rule in CALL_RULES]


# ----------------------------------------------------------------------------------------------
# People


@dataclass
class Population:
    """Who the evaluation asks about: trained-on people, held-out people, and the disjoint calibration
    group whose prompts set the thresholds (never the evaluation people's)."""

    train: list[Any]
    heldout: list[Any]
    calibration: list[Any]
    """The first calibration group (the only one with one training seed)."""
    calibration_groups: list[list[Any]]
    """One disjoint group of calibration people per training seed (experiment.seeds)."""
    articles: dict[str, dict]
    """Person id -> what their facts are checked against (`Corpus.articles`: an article, or a record)."""
    train_docs: list[dict]
    """Training-split documents (leakage probes)."""
    exact: bool = False
    """Scored exactly against records (`lacy.eval.synthetic`) rather than by claims against articles."""


def population(cfg: LacyConfig, corpus: Corpus) -> Population:
    """The corpus' people split into evaluation, calibration and held-out groups (seeded; a person's
    split is their documents'); a user's list (`Corpus.listed`) in its order, none held out."""
    docs = list(corpus.documents())
    split = {doc.get("person") or doc["id"]: doc_split(doc, cfg.data.val_fraction) for doc in docs}
    if corpus.listed:
        people = corpus.people(docs)
        split = {e.doc_id: "train" for e in people}
    else:
        people = [e for e in corpus.people(docs) if e.doc_id in split]
        random.Random(cfg.seed).shuffle(people)
    trained = [e for e in people if split[e.doc_id] == "train"]
    ecfg, groups = cfg.eval, len(cfg.experiment.seeds) or 1
    need = ecfg.entities + groups * ecfg.calibration_entities
    if len(trained) < need:
        whom = "people in eval.people_file" if corpus.listed else "trained-on people"
        raise ValueError(f"{len(trained)} {whom}, but eval.entities ({ecfg.entities}) + "
                         f"{groups} seed(s) x eval.calibration_entities ({ecfg.calibration_entities}) need {need}")
    calibration = [trained[ecfg.entities + k * ecfg.calibration_entities:][:ecfg.calibration_entities]
                   for k in range(groups)]
    return Population(train=trained[:ecfg.entities], calibration=calibration[0], calibration_groups=calibration,
                      heldout=[e for e in people if split[e.doc_id] == "val"][:ecfg.heldout_entities],
                      articles=corpus.articles(docs), exact=corpus.exact,
                      train_docs=[d for d in docs if doc_split(d, cfg.data.val_fraction) == "train"])


# ----------------------------------------------------------------------------------------------
# Thresholds


def threshold_key(small: str, big: str, trigger: str, rate: float, unit: str | None = None) -> str:
    return f"{small}+{big}/{trigger}/{rate}" + (f"/{unit}" if unit else "")


def calibrate_thresholds(cfg: LacyConfig, models: dict[str, str], people: list[Any] | dict[str, list[Any]],
                         generator: Generator, triggers: dict[str, list[str]] | None = None,
                         observed: dict[str, list[float]] | None = None,
                         on_round: Callable[[dict[str, list[float]]], None] | None = None) -> dict[str, dict]:
    """{threshold_key: {"threshold", "realised_rate", "rounds", "open_loop_rate"}} for every cascade of
    the plan, on the calibration people (never the evaluation people).

    Open loop first (the quantile of each small model's trigger scores, decoded with calls off), then
    `eval.calibration_rounds` closed-loop rounds through `generator` with the big side on
    (`lacy.cascade.policy.ClosedLoop`): rules are compared at the call rate they realise, and a model
    whose calls beget calls would otherwise realise several times the target. Every search steps at
    once, so each round is one batch over every model, trigger, big side and rate. Fixed thresholds make
    every row independent of request order and concurrency. `people`: one group, or a group per model
    (each training seed's own); `triggers`: per model (default: every trigger of experiment.triggers the
    model can use). `observed`: {threshold_key: rates measured before} to resume from (a search is
    deterministic given its open-loop scores and the rates it observed, so replaying them reaches the
    same next threshold); `on_round` gets every search's measured rates after each round."""
    ecfg = cfg.eval
    group = people if isinstance(people, dict) else dict.fromkeys(models, people)
    if not all(group.get(name) for name in models):
        raise ValueError("no calibration people: raise eval.calibration_entities or the corpus size")
    searches: dict[tuple[str, str, str, float, str | None], ClosedLoop] = {}
    for name, trigger, scores in _open_loop_scores(cfg, models, group, triggers):
        for big in cfg.experiment.big_models:
            for rate in (r for r in ecfg.call_rates if r > 0):
                for unit in cfg.experiment.units or [None]:
                    searches[name, big, trigger, rate, unit] = ClosedLoop(scores, rate, ecfg.calibration_rounds,
                                                                          ecfg.calibration_tolerance)
    rates = {key: list((observed or {}).get(threshold_key(*key), [])) for key in searches}
    for key, measured in rates.items():
        for rate in measured:
            searches[key].observe(rate)
    if resumed := sum(map(len, rates.values())):
        log.info("calibration resumed: %d measurements of an earlier run replayed", resumed)
    rounds = max(map(len, rates.values()), default=0)
    while pending := [key for key, search in searches.items() if search.threshold is not None]:
        rounds += 1
        log.info("calibration round %d: %d of %d thresholds still moving, %d biographies", rounds, len(pending),
                 len(searches), sum(len(group[key[0]]) for key in pending))
        requests, spans = [], []
        for key in pending:
            name, big, trigger, _, unit = key
            spans.append((len(requests), len(group[name])))
            requests += [Request(bio_prompt(e, ecfg.prompt_style), name, big, trigger, searches[key].threshold,
                                 cfg.cascade.max_new_tokens, topic=e.name, unit=unit) for e in group[name]]
        outs = generator.generate_many(requests)
        for key, (start, n) in zip(pending, spans, strict=True):
            mine = outs[start:start + n]
            rates[key].append(sum(o.calls for o in mine) / max(1, sum(o.decision_points for o in mine)))
            searches[key].observe(rates[key][-1])
        if on_round is not None:
            on_round({threshold_key(*key): measured for key, measured in rates.items()})
    out = {}
    for (name, big, trigger, rate, unit), search in searches.items():
        result = search.result()
        out[threshold_key(name, big, trigger, rate, unit)] = asdict(result)
        log.info("calibrated %s+%s/%s at %.2f: threshold %.4g, realised %s after %d rounds (open loop %s)", name,
                 big, trigger, rate, result.threshold, result.realised_rate, result.rounds, result.open_loop_rate)
    return out


def _open_loop_scores(cfg: LacyConfig, models: dict[str, str], people: dict[str, list[Any]],
                      triggers: dict[str, list[str]] | None) -> list[tuple[str, str, Any]]:
    """(model, trigger, every decision point's score with calls off) for each model and its triggers,
    each model's prompts decoded as one batch in this process (the small models alone)."""
    compute, out = compute_thread(), []
    for name, path in models.items():
        prompts = [bio_prompt(e, cfg.eval.prompt_style) for e in people[name]]
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
    """What every cached evaluation result depends on besides its system. Nothing under run_dir: a run
    folder copied or pulled to another path keeps its results (the store's content follows the corpus)."""
    knowledge = {k: v for k, v in to_dict(cfg.knowledge).items() if k != "db_path"}
    # big_fill only schedules the big model's batches and prefix_cache only spares it reading a context again:
    # neither changes a text, so no result depends on them
    evaluation = {k: v for k, v in to_dict(cfg.eval).items() if k != "big_fill"}
    big = {k: v for k, v in to_dict(cfg.big).items() if k != "prefix_cache"}
    key = {"eval": evaluation, "cascade": to_dict(cfg.cascade), "big": big,
           "knowledge": knowledge, "seed": cfg.seed, "row_schema": SCHEMA}
    if cfg.eval.knowledge_file is not None:  # the articles' content (only when set: older keys stay valid)
        key["knowledge_file"] = file_digest(cfg.eval.knowledge_file)
    return key


def thresholds_stage(cfg: LacyConfig, models: dict[str, str], stage_keys: dict[str, str], pop: Population,
                     generator: Generator, seed_index: dict[str, int] | None = None) -> dict[str, dict]:
    """`calibrate_thresholds`, each model on the calibration group of its training seed (`seed_index`:
    model -> group; default the first), cached in results/thresholds.json per model under everything that
    changes its thresholds: the model, big sides, triggers, rates (eval, in the row key) and its
    calibration people. A run that adds seeds or rules calibrates only the models it adds; one stopped
    during calibration resumes after its last finished round (results/thresholds.rounds.json, the rates
    each search measured, under the same keys)."""
    path = Path(cfg.run_dir) / "results" / "thresholds.json"
    journal = path.with_name("thresholds.rounds.json")
    people = {name: pop.calibration_groups[(seed_index or {}).get(name, 0)] for name in models}
    question = {**_row_key(cfg), "bigs": cfg.experiment.big_models, "triggers": cfg.experiment.triggers}
    keys = {name: config_hash({**question, "model": stage_keys[name], "people": [e.doc_id for e in people[name]]})
            for name in models}
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored_keys = stored.get("key") if isinstance(stored.get("key"), dict) else {}  # a str: the old whole-run key
    kept = {name for name in models if stored_keys.get(name) == keys[name]}
    out = {k: v for k, v in stored.items() if k != "key" and k.partition("+")[0] in kept}
    if missing := {name: model_dir for name, model_dir in models.items() if name not in kept}:
        if kept:
            log.info("thresholds of %s calibrated before, reusing them", ", ".join(sorted(kept)))
        began = json.loads(journal.read_text()) if journal.is_file() else {}
        mine = {name for name in missing if began.get("key", {}).get(name) == keys[name]}
        observed = {k: v for k, v in began.get("rates", {}).items() if k.partition("+")[0] in mine}

        def on_round(rates: dict[str, list[float]]) -> None:
            write_json(journal, {"key": keys, "rates": rates})

        out |= calibrate_thresholds(cfg, missing, {name: people[name] for name in missing}, generator,
                                    observed=observed, on_round=on_round)
        write_json(path, {**out, "key": keys})
        journal.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(cfg: LacyConfig, plan: list[System], models: dict[str, str], stage_keys: dict[str, str],
             thresholds: dict[str, dict], generator: Generator, big_generator: LocalGenerator,
             pop: Population) -> list[Row]:
    """Every system of the plan: its biographies, scored, plus leakage for each small model alone;
    rows cached under results/rows by what determines them. The biographies of every row not cached
    yet are written in one `generate_many` (the big model alone by `big_generator`, in this process);
    then the big model alone under the cascades' output budget: its texts cut to the mean length the
    cascades wrote at the headline rate."""
    scoring = _Scoring(cfg, pop, models)
    rows = scoring.rows([s for s in plan if not s.budget], thresholds, stage_keys, generator, big_generator)
    cascades = [r for r in rows if r.model and r.big != "none" and r.people == "train"
                and r.target_rate == cfg.experiment.headline_rate]
    budget = round(sum(r.output_chars for r in cascades) / len(cascades)) if cascades else None
    return rows + scoring.rows([s for s in plan if s.budget], thresholds, stage_keys, generator, big_generator,
                               budget)


class _Scoring:
    """What scoring every row shares: the people, the passage store, spaCy, the leakage probes."""

    def __init__(self, cfg: LacyConfig, pop: Population, models: dict[str, str]) -> None:
        self.cfg, self.pop = cfg, pop
        self.store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
        self.nlp = None if pop.exact else load_nlp(cfg.facts.spacy_model)
        self.probes = _leak_probes(cfg, pop, self.nlp, models)
        self.results = Path(cfg.run_dir) / "results"
        self.judge = LLMJudge.from_config(cfg)

    def rows(self, systems: list[System], thresholds: dict[str, dict], stage_keys: dict[str, str],
             generator: Generator, big_generator: LocalGenerator, budget: int | None = None) -> list[Row]:
        cfg, ecfg, todo = self.cfg, self.cfg.eval, {}
        for system in systems:
            people = self.pop.train if system.people == "train" else self.pop.heldout
            calibration = thresholds.get(threshold_key(system.small, system.big, system.trigger, system.rate,
                                                       system.unit), {})
            key = {**_row_key(cfg), "system": system.name, "model": stage_keys.get(system.small or ""),
                   "threshold": calibration.get("threshold"), "people": [e.doc_id for e in people],
                   "budget": budget if system.budget else None}
            if self.judge is not None:  # the judge's columns: only rows with a judge are keyed by it
                key["llm_judge"] = [self.judge.model_id, self.judge.facts_max_tokens]
            todo[system] = {"people": people, "calibration": calibration, "key": key,
                            "path": self.results / "rows" / f"{system.name}.json"}
        missing = [s for s, job in todo.items() if cached_value(job["path"], job["key"]) is None]
        groups, stored = _groups(missing, todo, GROUP_BATCHES * ecfg.batch_people), {}
        for n, group in enumerate(groups, 1):
            if len(groups) > 1:
                log.info("eval group %d of %d: %d systems, %d biographies", n, len(groups), len(group),
                         sum(len(todo[s]["people"]) for s in group))
            written = _write(cfg, group, todo, self.probes, generator, big_generator)
            for system in group:
                job = todo[system]
                stored[system] = cached_json(job["path"], job["key"],
                                             lambda s=system, j=job, w=written: self._score(s, j, w, budget))
        rows = []
        for system, job in todo.items():
            row = Row.from_dict(stored.get(system) or cached_value(job["path"], job["key"]))
            row.model, row.big, row.trigger = system.small, system.big or "none", system.trigger
            row.target_rate, row.people, row.unit = system.rate, system.people, system.unit
            row.threshold, row.calibration_rate = job["key"]["threshold"], job["calibration"].get("realised_rate")
            row.budget = system.budget
            rows.append(row)
            log.info("eval %s: precision %s, call rate %s", system.name, row.precision, row.call_rate)
        return rows

    def _score(self, system: System, job: dict, written: dict[tuple[System, str], list[Generated]],
               budget: int | None) -> dict:
        """One system's row from its texts: scored, its generations exported, leakage for a small model alone."""
        cfg, ecfg = self.cfg, self.cfg.eval
        outs = written[system, "bios"]
        if system.budget and budget is not None:
            outs = [_cut(out, bio_prompt(e, ecfg.prompt_style), budget) for e, out in zip(job["people"], outs,
                                                                                           strict=True)]
        bios = biographies(job["people"], outs, ecfg.prompt_style)
        if self.pop.exact:
            row = score_records(system.name, bios, self.pop.articles, gamma=ecfg.gamma,
                                bootstrap=ecfg.bootstrap, seed=cfg.seed)
        else:
            row = score_claims(system.name, bios, self.pop.articles, self.store, k=cfg.knowledge.top_k,
                               gamma=ecfg.gamma, bootstrap=ecfg.bootstrap, seed=cfg.seed, nlp=self.nlp)
        if self.judge is not None:
            add_judge(row, self.judge.score(bios, self.store, cfg.knowledge.top_k), bootstrap=ecfg.bootstrap,
                      seed=cfg.seed)
        export_generations(self.results / "generations" / f"{system.name}.jsonl", system.name, bios)
        prompts = [bio_prompt(e, ecfg.prompt_style) for e in job["people"]]
        row.output_chars = sum(len(g.text) - len(p) for g, p in zip(bios, prompts, strict=True)) / len(bios)
        if (system, "leaks") in written:
            _add_leakage(row, self.probes, written[system, "leaks"])
        return row.to_dict()


GROUP_BATCHES = 8
"""Rows are written and cached in groups of whole small models of at least this many `eval.batch_people`
batches: enough to fill every batch, and a long protocol stopped midway keeps every group it finished."""


def _groups(systems: list[System], todo: dict[System, dict], at_least: int) -> list[list[System]]:
    """`systems` in plan order (a model's systems are together; seed by seed; the big model alone last), cut
    at a model's end once a group holds `at_least` biographies: a run stopped midway has whole seeds first."""
    order = [s for s in systems if s.small is not None] + [s for s in systems if s.small is None]
    groups, group, size = [], [], 0
    for i, system in enumerate(order):
        group.append(system)
        size += len(todo[system]["people"])
        last = i + 1 == len(order)
        if last or (size >= at_least and order[i + 1].small != system.small):
            groups.append(group)
            group, size = [], 0
    return groups


def _cut(out: Generated, prompt: str, chars: int) -> Generated:
    """A big-alone text cut to `chars` characters after its prompt, at a word border."""
    text = out.text[len(prompt):] if out.text.startswith(prompt) else out.text
    if len(text) > chars:
        text = text[:chars].rsplit(" ", 1)[0] if " " in text[:chars] else text[:chars]
    return replace(out, text=prompt + text, spans=[(prompt, "prompt"), (text, "big")])


def _write(cfg: LacyConfig, systems: list[System], todo: dict[System, dict], probes: list[Any],
           generator: Generator, big_generator: LocalGenerator) -> dict[tuple[System, str], list[Generated]]:
    """The texts of `systems` as one batch: each system's biographies and, for a small model alone, its
    continuations of the leakage probes; {(system, "bios" | "leaks"): outputs}. The budget-matched big
    model alone writes twice the cascades' step budget, to be cut to their length."""
    requests: list[Request] = []
    spans: dict[tuple[System, str], tuple[int, int]] = {}
    alone: list[Request] = []
    for system in systems:
        job = todo[system]
        steps = cfg.cascade.max_new_tokens * (2 if system.budget else 1)
        asks = [Request(bio_prompt(e, cfg.eval.prompt_style), system.small, system.big, system.trigger or "p_call",
                        job["key"]["threshold"], steps, topic=e.name, unit=system.unit) for e in job["people"]]
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
