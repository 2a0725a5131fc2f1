"""Stage 6: the evaluation plan — which systems are evaluated, on whom, generated how — as data.

A `System` is a small model (or none), a big side (or none), a call trigger and a target rate, on a
group of people; `evaluation_plan` lists them for an experiment. Thresholds are calibrated per model,
big side, trigger and rate, with calls on, on people the systems are never scored on, and fixed, so
every row is independent of request order and concurrency. A `Generator` writes the text (in process
here; over HTTP to Ray Serve in `jobs.experiment`); `evaluate` generates every system's biographies,
scores them (`lacy.eval.claims`) and caches each row under what determines it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from lacy.core.config import CALL_RULES, LacyConfig, to_dict
from lacy.core.stages import cached_json

log = logging.getLogger(__name__)

ROW_VERSION = 5
"""Bump when an evaluation row's meaning changes, so cached rows are recomputed (3: fixed calibrated
thresholds, confidence trigger, informative precision, FactScore with abstentions, containment leakage;
4: thresholds calibrated closed-loop per big side; 5: thresholds on log-odds scores, which do not tie
where probabilities round to 1)."""


# ----------------------------------------------------------------------------------------------
# Generating text


@dataclass
class Generated:
    """What the evaluator reads of one generation (a `CascadeResult` or an HTTP answer)."""

    text: str
    spans: list[tuple[str, str]]
    calls: int = 0
    decision_points: int = 0
    call_rate: float = 0.0


@dataclass(frozen=True)
class Request:
    """One generation: which small model (None: the big model alone), which big side (None: the small
    model alone), and the call policy (a fixed threshold on the trigger's log-odds score: the cascade's
    `call_log_odds`)."""

    prompt: str
    model: str | None
    big: str | None
    trigger: str = "p_call"
    threshold: float | None = None
    max_tokens: int = 32
    topic: str | None = None


class Generator(Protocol):
    def generate(self, request: Request) -> Generated: ...


class LocalGenerator:
    """Every request decoded in this process (small models loaded once, one big model), on the process's
    compute thread whichever thread asks (`lacy.core.compute`: concurrent requests are not batched here, and
    forwards spread over threads run slower)."""

    def __init__(self, cfg: LacyConfig, models: dict[str, str]) -> None:
        from lacy.core.compute import compute_thread
        from lacy.model import load_big_model, load_small_model

        self.cfg, self.compute = cfg, compute_thread()
        self.small = {name: self.compute.call(load_small_model, path) for name, path in models.items()}
        self.big_model, self.big_tokenizer = self.compute.call(load_big_model, cfg.big.path, cfg.big.dtype)
        self.store = None
        if Path(cfg.knowledge.db_path).exists():
            from lacy.cascade.knowledge import SqlitePassageStore

            self.store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)

    def _big(self, kind: str | None) -> Any:
        from lacy.cascade.engine import BigLM
        from lacy.cascade.knowledge import RetrievalBigLM

        if kind is None:
            return None
        lm = BigLM(self.big_model, self.big_tokenizer)
        return RetrievalBigLM.from_config(lm, self.store, self.cfg.knowledge) if kind == "retrieval" else lm

    def generate(self, request: Request) -> Generated:
        return self.compute.call(self._generate, request)

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]:
        """Big-alone requests (no small model) decoded `serve.big_batch` at a time, each chunk as one
        batch (`lacy.cascade.batching.continue_batch`, as a Serve BigModel replica decodes): the texts `generate`
        writes, up to batched rounding, in a fraction of the time one by one takes on a CPU."""
        from lacy.core.console import tracked

        if any(r.model is not None for r in requests):
            raise ValueError("generate_many decodes the big model alone: every request needs model None")
        size = self.cfg.serve.big_batch
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        return [out for chunk in tracked(chunks, "big alone", total=len(chunks), unit="batch")
                for out in self.compute.call(self._big_batch, chunk)]

    def _big_batch(self, requests: Sequence[Request]) -> list[Generated]:
        from lacy.cascade.batching import continue_batch
        from lacy.cascade.engine import BigLM
        from lacy.cascade.knowledge import RetrievalBigLM

        lms = [BigLM(self.big_model, self.big_tokenizer) for _ in requests]
        contexts = [RetrievalBigLM.from_config(lm, self.store, self.cfg.knowledge).context_for(r.prompt, "", r.topic)
                    if r.big == "retrieval" else "" for lm, r in zip(lms, requests, strict=True)]
        outs = continue_batch(lms, [r.prompt for r in requests], units=["tokens"] * len(requests),
                              max_tokens=[r.max_tokens for r in requests], contexts=contexts)
        return [Generated(r.prompt + out, [(r.prompt, "prompt"), (out, "big")])
                for r, out in zip(requests, outs, strict=True)]

    def _generate(self, request: Request) -> Generated:
        from lacy.cascade.engine import Cascade, SmallLM

        big = self._big(request.big)
        topic = request.topic if request.big == "retrieval" else None
        if request.model is None:
            out = big.continue_text(request.prompt, unit="tokens", max_tokens=request.max_tokens,
                                    **({"topic": topic} if topic else {}))
            return Generated(request.prompt + out, [(request.prompt, "prompt"), (out, "big")])
        model, tokenizer = self.small[request.model]
        cascade = Cascade(SmallLM(model, tokenizer), big, self.cfg.cascade)
        result = cascade.generate(request.prompt, call_log_odds=request.threshold, trigger=request.trigger,
                                  max_new_tokens=request.max_tokens, allow_calls=big is not None, topic=topic)
        return Generated(result.text, [(s.text, s.source) for s in result.spans], result.calls,
                         result.decision_points, result.call_rate)


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
# People, their prompts, and how a biography is scored


@dataclass
class Population:
    """Who the evaluation asks about: trained-on people, held-out people, and the disjoint calibration
    group whose prompts set the thresholds (never the evaluation people's)."""

    train: list[Any]
    heldout: list[Any]
    calibration: list[Any]
    articles: dict[str, dict]
    """doc id -> the document facts are checked against (`lacy.corpus.readers.knowledge_document`); for a
    synthetic corpus, person id -> the person's record (`lacy.corpus.synthbio.Person.record`)."""
    train_docs: list[dict]
    """Training-split documents (leakage probes)."""
    synthetic: bool = False
    """Scored exactly against records (lacy.corpus.synthbio) rather than by claims against articles."""


def population(cfg: LacyConfig) -> Population:
    from lacy.corpus.readers import corpus_source, doc_split, knowledge_document, load_entities, read_corpus

    source = corpus_source(cfg)
    synthetic = cfg.data.corpus == "synthbio"
    corpus = list(read_corpus(source, max_docs=cfg.data.max_docs, min_chars=cfg.data.min_chars))
    if synthetic:
        from lacy.corpus.synthbio import records

        articles = records(source)
    else:
        articles = {doc["id"]: knowledge_document(doc) for doc in corpus}
    # A person's split: their article's (a synthetic person's biographies all share one).
    split = {doc.get("person") or doc["id"]: doc_split(doc, cfg.data.val_fraction) for doc in corpus}
    people = [e for e in load_entities(source if synthetic else cfg.data.corpus) if e.doc_id in split]
    random.Random(cfg.seed).shuffle(people)
    trained = [e for e in people if split[e.doc_id] == "train"]
    ecfg = cfg.eval
    return Population(train=trained[:ecfg.entities],
                      calibration=trained[ecfg.entities:ecfg.entities + ecfg.calibration_entities],
                      heldout=[e for e in people if split[e.doc_id] == "val"][:ecfg.heldout_entities],
                      articles=articles, synthetic=synthetic,
                      train_docs=[d for d in corpus if doc_split(d, cfg.data.val_fraction) == "train"])


# ----------------------------------------------------------------------------------------------
# Stage: evaluation


def threshold_key(small: str, big: str, trigger: str, rate: float) -> str:
    return f"{small}+{big}/{trigger}/{rate}"


def calibrate_thresholds(cfg: LacyConfig, models: dict[str, str], people: list[Any],
                         generator: Generator) -> dict[str, dict]:
    """{threshold_key: {"threshold", "realised_rate", "rounds", "open_loop_rate"}} for every cascade of
    the plan, on the calibration people (never the evaluation people).

    Open loop first (`lacy.cascade.engine.calibrate`'s quantile of the small model's scores with calls off),
    then `eval.calibration_rounds` closed-loop rounds through `generator` with the big side on
    (`lacy.cascade.engine.closed_loop_threshold`): rules are compared at the call rate they realise, and a
    model whose calls beget calls would otherwise realise several times the target. Fixed thresholds
    make every row independent of request order and concurrency."""
    from dataclasses import asdict

    from lacy.cascade.engine import Cascade, SmallLM, closed_loop_threshold, decision_scores
    from lacy.core.compute import compute_thread
    from lacy.eval.claims import bio_prompt
    from lacy.model import load_small_model

    ecfg = cfg.eval
    prompts = [bio_prompt(e, ecfg.prompt_style) for e in people]
    if not prompts:
        raise ValueError("no calibration people: raise eval.calibration_entities or the corpus size")
    out, compute = {}, compute_thread()  # the thread LocalGenerator decodes on (lacy.core.compute)
    for name, path in models.items():
        cascade = Cascade(SmallLM(*compute.call(load_small_model, path)), None, cfg.cascade)
        for trigger in _triggers(cfg, name):
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
    from lacy.eval.claims import biographies

    def write(entity: Any, prompt: str) -> Generated:
        return generator.generate(Request(prompt, model, big, trigger, threshold, cfg.cascade.max_new_tokens,
                                          topic=entity.name))

    bios = biographies(write, people, cfg.eval.prompt_style, workers=cfg.experiment.eval_concurrency)
    return sum(b.calls or 0 for b in bios) / max(1, sum(b.decision_points or 0 for b in bios))


def _row_key(cfg: LacyConfig) -> dict:
    """What every cached evaluation result depends on besides its system."""
    return {"eval": to_dict(cfg.eval), "cascade": to_dict(cfg.cascade), "big": to_dict(cfg.big),
            "knowledge": to_dict(cfg.knowledge), "seed": cfg.seed, "row_version": ROW_VERSION}


def thresholds_stage(cfg: LacyConfig, models: dict[str, str], stage_keys: dict[str, str],
                     pop: Population, generator: Generator) -> dict[str, dict]:
    """`calibrate_thresholds`, cached in results/thresholds.json for these models."""
    path = Path(cfg.run_dir) / "results" / "thresholds.json"
    value = cached_json(path, {**_row_key(cfg), "models": stage_keys, "bigs": cfg.experiment.big_models},
                        lambda: calibrate_thresholds(cfg, models, pop.calibration, generator))
    return {k: v for k, v in value.items() if k != "key"}


def evaluate(cfg: LacyConfig, plan: list[System], models: dict[str, str], stage_keys: dict[str, str],
             thresholds: dict[str, dict], generator: Generator, big_generator: LocalGenerator,
             pop: Population) -> list[dict]:
    """Every system of the plan: its biographies, scored (lacy.eval.claims.score_biographies), plus leakage
    for each small model alone; rows cached under results/rows by what determines them. The big model
    alone writes in batches (`big_generator.generate_many`)."""
    from lacy.cascade.knowledge import SqlitePassageStore
    from lacy.eval import claims as lacy_eval
    from lacy.eval.claims import bio_prompt

    ecfg = cfg.eval
    results = Path(cfg.run_dir) / "results"
    store = SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)
    nlp = None if pop.synthetic else lacy_eval.load_nlp(cfg.facts.spacy_model)
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

            bios = lacy_eval.biographies(write, people, ecfg.prompt_style, workers=cfg.experiment.eval_concurrency)
            if pop.synthetic:
                from lacy.corpus.synthbio import score_synthetic

                row = score_synthetic(system.name, bios, pop.articles, gamma=ecfg.gamma, bootstrap=ecfg.bootstrap,
                                      seed=cfg.seed)
            else:
                row = lacy_eval.score_biographies(system.name, bios, pop.articles, store, k=cfg.knowledge.top_k,
                                                  gamma=ecfg.gamma, bootstrap=ecfg.bootstrap, seed=cfg.seed, nlp=nlp)
            if system.small is not None and system.big is None:
                row.update(_leakage_row(generator, system.small, probes, cfg.experiment.eval_concurrency))
            return row

        row = cached_json(results / "rows" / f"{system.name}.json", key, compute)
        rows.append({**row, "model": system.small, "big": system.big or "none", "trigger": system.trigger,
                     "target_rate": system.rate, "people": system.people, "threshold": threshold,
                     "calibration_rate": calibration.get("realised_rate")})
        log.info("eval %s: strict precision %s, call rate %s", system.name, row.get("precision_strict"),
                 row.get("call_rate"))
    return rows


def _leak_probes(cfg: LacyConfig, pop: Population, nlp: Any, models: dict[str, str]) -> list[Any]:
    """`eval.leakage_facts` probes from training documents, their prefixes cut to fit the small context."""
    from lacy.eval.claims import make_leak_probes
    from lacy.model import load_small_model

    if not models:
        return []
    tokenizer = load_small_model(next(iter(models.values())))[1]
    if pop.synthetic:
        from lacy.corpus.synthbio import leak_probes

        probes = leak_probes(pop.train_docs, cfg.eval.leakage_facts, seed=cfg.seed)
    else:
        probes = make_leak_probes(pop.train_docs, nlp, cfg.eval.leakage_facts, seed=cfg.seed)
    return [_fit_probe(p, tokenizer, cfg.model.seq_len - 16) for p in probes]


def _leakage_row(generator: Generator, model: str, probes: list[Any], workers: int) -> dict:
    from lacy.eval.claims import leakage

    report = leakage(lambda prefix: generator.generate(Request(prefix, model, None, max_tokens=8)).text, probes,
                     workers)
    return {"leakage": report.rate, "leakage_lo": report.ci[0], "leakage_hi": report.ci[1],
            "leak_probes": report.probes, "leakage_by_type": {k: v[0] / v[1] for k, v in report.by_label.items()}}


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
    from lacy.eval.claims import bio_prompt
    from lacy.report import generation_block, page_html

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


