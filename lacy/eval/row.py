"""One result row: how one system did on its people, built in one place from per-person scores.

Every scorer (claims against articles, `lacy.eval.claims`; values against records,
`lacy.eval.synthetic`) yields one `PersonScore` per biography; `build_row` turns them into a `Row`
with 95 % bootstrap CIs over people. The evaluation plan adds what it knows (which model, big side,
trigger, rate, threshold, leakage); `Row.to_dict` is what the report reads and the cache stores.

    row = build_row("lacy+retrieval@0.22/p_call", generations, scores, headline="strict", bootstrap=1000, seed=0)
    row.precision, row.precision_lo, row.precision_hi
    add_judge(row, judged, bootstrap=1000, seed=0)   # the LLM judge's FActScore, when on: *_judge columns

Cached rows carry `SCHEMA`: a hash of the row's fields and `ROW_MEANING`, so a row cached by code
whose rows had other fields (or meant something else) is never read as one of today's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROW_MEANING = 5
"""Bump when a row's fields keep their names but change meaning (3: fixed calibrated thresholds,
confidence trigger, informative precision, FactScore with abstentions, containment leakage; 4:
thresholds calibrated closed-loop per big side; 5: thresholds on log-odds scores)."""


@dataclass
class PersonScore:
    """One biography, scored."""

    precision: float | None
    """Supported / claims under the headline mode; None when the biography made no claim (abstained)."""
    claims: int
    """Claims (values stated) it made."""
    supported: int
    """Of those, supported (correct) under the headline mode."""
    factscore: float
    """precision x FActScore's length penalty; 0 for an abstention."""
    informative: float | None
    """Precision over the claims that another person's source does not support (None: no such claim)."""
    attributes: list[tuple[str, bool]] = field(default_factory=list)
    """(attribute, correct) for every attribute value the biography states (and the person has)."""
    lenient: float | None = None
    """Precision against the person's whole source (`precision` when the scorer has one mode)."""
    strict: float | None = None
    """Precision against the passages retrieved for each claim (None without a passage store)."""
    big_spans: int = 0
    """Big-model spans of the generation, and how many of them overlap a stated value (exact scorers)."""
    big_spans_on_values: int | None = None


@dataclass
class Row:
    """One system's result over its people (CIs: 95 % percentile bootstrap over people)."""

    system: str
    entities: int
    call_rate: float | None = None
    """All calls over all decision points (None: no cascade)."""
    call_rate_mean: float | None = None
    """The mean of the per-biography rates (short biographies that call at every step pull it up)."""
    big_share: float | None = None
    """Share of the output tokens the big model wrote (its tokens over both models' own tokens)."""
    precision: float | None = None
    precision_lo: float | None = None
    precision_hi: float | None = None
    precision_lenient: float | None = None
    precision_lenient_lo: float | None = None
    precision_lenient_hi: float | None = None
    precision_strict: float | None = None
    precision_strict_lo: float | None = None
    precision_strict_hi: float | None = None
    respond_ratio: float = 0.0
    """Share of people who made at least one claim (precision is over them)."""
    respond_ratio_lenient: float = 0.0
    respond_ratio_strict: float | None = None
    claims_per_response: float = 0.0
    supported_per_person: float | None = None
    """Supported claims per person, abstainers counting 0."""
    supported_per_person_lo: float | None = None
    supported_per_person_hi: float | None = None
    factscore: float | None = None
    """Precision x FActScore's length penalty, abstainers 0, over all people."""
    factscore_lo: float | None = None
    factscore_hi: float | None = None
    informative_precision: float | None = None
    """Precision over the claims another random person's source does not support ("American" is
    supported almost anywhere)."""
    informative_precision_lo: float | None = None
    informative_precision_hi: float | None = None
    informative_responses: int = 0
    attributes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """attribute -> (correct, stated) over all people."""
    calls_on_facts: float | None = None
    """Share of big-model spans that overlap a stated value (exact scorers; None elsewhere)."""
    output_chars: float = 0.0
    """Mean characters written after the prompt."""
    entity_scores: list[float | None] = field(default_factory=list)
    """Per-person headline precision (None: abstained), in people order, for paired bootstraps."""
    entity_scores_lenient: list[float | None] = field(default_factory=list)
    entity_scores_strict: list[float | None] | None = None
    entity_factscore: list[float] = field(default_factory=list)
    entity_supported: list[float] = field(default_factory=list)
    """Per-person correct (supported) values, abstainers 0: the headline quality, for paired bootstraps."""
    precision_judge: float | None = None
    """FActScore with the LLM judge (llm_judge): supported atomic facts over atomic facts, mean over the
    people with any (None: no judge)."""
    precision_judge_lo: float | None = None
    precision_judge_hi: float | None = None
    respond_ratio_judge: float | None = None
    """Share of people whose biography has an atomic fact by the judge."""
    facts_per_response_judge: float | None = None
    """The judge's atomic facts per biography that has any."""
    entity_scores_judge: list[float | None] | None = None
    """Per-person judge precision (None: no atomic fact), in people order."""
    # What the evaluation plan adds:
    leakage: float | None = None
    """Share of leakage probes (training facts) the small model alone reproduces (small-alone rows)."""
    leakage_lo: float | None = None
    leakage_hi: float | None = None
    leak_probes: int | None = None
    leakage_by_type: dict[str, float] | None = None
    model: str | None = None
    big: str = "none"
    trigger: str | None = None
    target_rate: float | None = None
    unit: str | None = None
    budget: bool = False
    """The big model alone cut to the cascades' output length."""
    people: str = "train"
    threshold: float | None = None
    calibration_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat: every field, and `<attr>_correct`, `<attr>_stated`, `<attr>_precision` per attribute."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "attributes"}
        for attr, (correct, stated) in self.attributes.items():
            out[f"{attr}_correct"], out[f"{attr}_stated"] = correct, stated
            out[f"{attr}_precision"] = correct / stated if stated else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """The row `to_dict` wrote (attribute columns folded back)."""
        names = {f.name for f in dataclasses.fields(cls)}
        attributes = {key.removesuffix("_stated"): (data[key.removesuffix("_stated") + "_correct"], data[key])
                      for key in data if key.endswith("_stated")}
        return cls(**{k: v for k, v in data.items() if k in names}, attributes=attributes)


SCHEMA = hashlib.sha256(repr([(f.name, str(f.type)) for f in dataclasses.fields(Row)] + [ROW_MEANING])
                        .encode()).hexdigest()[:12]
"""Part of every cached row's key: the row's fields and meaning."""


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap of the mean over `n` resamples of the values (people)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"bootstrap_ci needs finite values, got {arr.size} values")
    means = arr[np.random.default_rng(seed).integers(0, arr.size, size=(n, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(arr.mean()), float(lo), float(hi)


def paired_bootstrap(a: Sequence[float | None], b: Sequence[float | None], n: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean of a - b, lo, hi) over the people both systems answered (None = abstained), resampling
    people jointly so that per-person difficulty cancels."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs the same people: {len(a)} vs {len(b)} values")
    diffs = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not diffs:
        raise ValueError("paired_bootstrap: no person answered by both systems")
    return bootstrap_ci(diffs, n=n, seed=seed, alpha=alpha)


def mean_ci(values: Sequence[float], bootstrap: int, seed: int) -> tuple[float | None, float | None, float | None]:
    """`bootstrap_ci` of the values, or Nones when there are none."""
    return bootstrap_ci(values, n=bootstrap, seed=seed) if values else (None, None, None)


def call_rates(generations: Sequence[Any]) -> dict[str, float | None]:
    """`call_rate`: all calls over all decision points (what a running quantile holds), when every
    generation says both, else the mean of the per-generation rates; `call_rate_mean`: that mean;
    `big_share`: the big model's share of the tokens written, when every generation counts them."""
    rates = [g.call_rate for g in generations if g.call_rate is not None]
    mean = float(np.mean(rates)) if rates else None
    if generations and all(g.calls is not None and g.decision_points is not None for g in generations):
        decisions = sum(g.decision_points for g in generations)
        pooled = sum(g.calls for g in generations) / decisions if decisions else 0.0
        rates = {"call_rate": pooled, "call_rate_mean": mean}
    else:
        rates = {"call_rate": mean, "call_rate_mean": mean}
    if generations and all(getattr(g, "big_tokens", None) is not None for g in generations):
        written = sum(g.big_tokens + (g.small_tokens or 0) for g in generations)
        rates["big_share"] = sum(g.big_tokens for g in generations) / written if written else 0.0
    return rates


def build_row(system: str, generations: Sequence[Any], scores: Sequence[PersonScore], *, attributes: Sequence[str],
              strict: bool, bootstrap: int, seed: int) -> Row:
    """The row of a system from its generations (call rates) and their scores (everything else):
    `attributes` are those the scorer checks (each gets its counts, stated or not), `strict` whether
    the scores have a strict mode."""
    n = len(scores)
    row = Row(system, n, **call_rates(generations))
    for mode in ("lenient", "strict") if strict else ("lenient",):
        values = [getattr(s, mode) for s in scores]
        answered = [v for v in values if v is not None]
        mean, lo, hi = mean_ci(answered, bootstrap, seed)
        setattr(row, f"precision_{mode}", mean)
        setattr(row, f"precision_{mode}_lo", lo)
        setattr(row, f"precision_{mode}_hi", hi)
        setattr(row, f"respond_ratio_{mode}", len(answered) / n if n else 0.0)
        setattr(row, f"entity_scores_{mode}", values)
    answered = [s for s in scores if s.precision is not None]
    row.precision, row.precision_lo, row.precision_hi = mean_ci([s.precision for s in answered], bootstrap, seed)
    row.entity_scores = [s.precision for s in scores]
    row.respond_ratio = len(answered) / n if n else 0.0
    row.claims_per_response = float(np.mean([s.claims for s in answered])) if answered else 0.0
    informative = [s.informative for s in scores if s.informative is not None]
    for name, values in (("supported_per_person", [float(s.supported) for s in scores]),
                         ("factscore", [s.factscore for s in scores]), ("informative_precision", informative)):
        mean, lo, hi = mean_ci(values, bootstrap, seed)
        setattr(row, name, mean)
        setattr(row, f"{name}_lo", lo)
        setattr(row, f"{name}_hi", hi)
    row.informative_responses = len(informative)
    row.entity_factscore = [s.factscore for s in scores]
    row.entity_supported = [float(s.supported) for s in scores]
    counts = {attr: [0, 0] for attr in attributes}
    for s in scores:
        for attr, ok in s.attributes:
            counts[attr][0] += ok
            counts[attr][1] += 1
    row.attributes = {attr: (c, k) for attr, (c, k) in counts.items()}
    if any(s.big_spans_on_values is not None for s in scores):
        spans = sum(s.big_spans for s in scores)
        row.calls_on_facts = sum(s.big_spans_on_values or 0 for s in scores) / spans if spans else None
    return row


def add_judge(row: Row, judged: Sequence[tuple[float | None, int]], *, bootstrap: int, seed: int) -> Row:
    """The LLM judge's columns of a row from its per-person (precision or None, atomic facts), in people
    order (`lacy.eval.judge.LLMJudge.score`)."""
    if len(judged) != row.entities:
        raise ValueError(f"add_judge: {len(judged)} judged biographies for a row of {row.entities} people")
    answered = [(p, n) for p, n in judged if p is not None]
    row.precision_judge, row.precision_judge_lo, row.precision_judge_hi = mean_ci([p for p, _ in answered],
                                                                                  bootstrap, seed)
    row.respond_ratio_judge = len(answered) / len(judged) if judged else 0.0
    row.facts_per_response_judge = float(np.mean([n for _, n in answered])) if answered else 0.0
    row.entity_scores_judge = [p for p, _ in judged]
    return row
