"""The comparison protocol: every system's quality along the call budget, over training seeds and people.

A system is a rule's models (one per training seed) with a big side and a trigger; the evaluation
scores it at several target call rates on the same people. Per system this gives a curve of quality
against call rate, and the measures RouteLLM uses over it:
  - PGR(rate) = (quality - small alone) / (big alone - small alone): the share of the gap closed;
  - APGR: the mean PGR over the swept rates (trapezoids between the target rates);
  - CPT(50 %): the call rate at which the curve first closes half the gap (0 as the small model alone;
    interpolated between measured rates; None when it never does).
Intervals resample seeds and people together (a two-level bootstrap: seeds with replacement, then the
people, the same people for every system, so differences are paired). Each seed's models were
calibrated on their own calibration people, so the spread across seeds carries the thresholds' spread:
the stated equivalent of re-calibrating per resample.

    curves = system_curves(rows, metric="entity_supported")
    table = comparison_table(rows, cfg.experiment.headline_rate, bootstrap=1000, seed=0)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = {"entity_supported": "correct values per person", "entity_scores": "precision"}
"""Per-person lists a row carries, and what their mean is (abstainers: None in precision, 0 in values)."""


def rule_of(model: str) -> tuple[str, str, int]:
    """(rule, comparison, seed index) of a model name ("lacy-steps", "lacy-steps-seed2")."""
    m = re.fullmatch(r"(?P<rule>[^-]+)-(?P<comparison>[^-]+)(?:-seed(?P<seed>\d+))?", model)
    if m is None:
        raise ValueError(f"not a trained model's name: {model!r}")
    return m["rule"], m["comparison"], int(m["seed"]) if m["seed"] else -1


@dataclass
class System:
    """One system's rows: per target rate, one row per training seed (seed order), plus its models alone."""

    rule: str
    comparison: str
    big: str
    trigger: str
    unit: str | None = None
    points: dict[float, list[dict]] = field(default_factory=dict)
    alone: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.rule} + {self.big} / {self.trigger}" + (f" / {self.unit}" if self.unit else "")


def systems(rows: Sequence[dict]) -> tuple[dict[tuple, System], dict[str, dict]]:
    """The cascades of the rows grouped by system (seeds and rates together), and big alone by big side
    (its budget-matched row as "<big> (budget)")."""
    out: dict[tuple, System] = {}
    alone: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    big = {r["big"] + (" (budget)" if r.get("budget") else ""): r for r in rows
           if r["model"] is None and r["people"] == "train"}
    cascades = []
    for r in rows:
        if r["model"] is None or r["people"] != "train":
            continue
        rule, comparison, seed = rule_of(r["model"])
        if r["big"] == "none":
            alone.setdefault((rule, comparison), []).append((seed, r))
        else:
            cascades.append((rule, comparison, seed, r))
    for rule, comparison, _, r in sorted(cascades, key=lambda c: c[2]):
        key = (rule, comparison, r["big"], r["trigger"], r.get("unit"))
        system = out.setdefault(key, System(rule, comparison, r["big"], r["trigger"], r.get("unit")))
        system.points.setdefault(r["target_rate"], []).append(r)
    for (rule, comparison, *_), system in out.items():
        system.alone = [r for _, r in sorted(alone.get((rule, comparison), []), key=lambda a: a[0])]
    return out, big


def _values(rows: Sequence[dict], metric: str) -> np.ndarray:
    """[seeds, people] of a per-person metric; NaN where a person abstained (precision)."""
    return np.asarray([[np.nan if v is None else float(v) for v in r[metric]] for r in rows], dtype=np.float64)


class Bootstrap:
    """Two-level resamples shared by every estimate of a comparison: seeds, then people (the same people
    for every system, so differences between systems are paired)."""

    def __init__(self, seeds: int, people: int, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, seeds, size=(n, seeds))
        self.people = rng.integers(0, people, size=(n, people))

    def replicates(self, values: np.ndarray) -> np.ndarray:
        """The mean over seeds of the mean over people (NaN left out) in every resample: [n]. A system
        with fewer seeds than the comparison resamples its own (seed indices taken modulo its count)."""
        sampled = values[self.seeds[:, :, None] % values.shape[0], self.people[:, None, :]]  # [n, seeds, people]
        with warnings.catch_warnings():  # a resample where nobody answered is NaN, and says nothing more
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.nanmean(sampled, axis=2), axis=1)


def estimate(values: np.ndarray, boot: Bootstrap) -> tuple[float, float, float, np.ndarray]:
    """(mean, lo, hi, replicates) of a [seeds, people] metric: the mean over seeds of the mean over people."""
    reps = boot.replicates(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = float(np.nanmean(np.nanmean(values, axis=1)))
        lo, hi = np.nanquantile(reps, [0.025, 0.975])
    return point, float(lo), float(hi), reps


def pgr_curve(rates: Sequence[float], quality: Sequence[float], small: float, big: float) -> list[float]:
    """PGR at each rate: the share of the small-alone to big-alone gap the quality closes."""
    gap = big - small
    return [float("nan") if gap == 0 else (q - small) / gap for q in quality] if rates else []


def apgr(rates: Sequence[float], pgr: Sequence[float]) -> float:
    """The mean PGR over the swept rates (trapezoids; one rate: its PGR)."""
    if len(rates) == 1:
        return float(pgr[0])
    return float(np.trapezoid(pgr, rates) / (rates[-1] - rates[0]))


def cpt(rates: Sequence[float], pgr: Sequence[float], level: float = 0.5) -> float | None:
    """The call rate at which PGR first reaches `level`, interpolated from (0, 0) through the measured
    rates; None if it never does within them."""
    xs, ys = [0.0, *rates], [0.0, *pgr]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if y1 >= level:
            return x1 if y1 == y0 else x0 + (level - y0) * (x1 - x0) / (y1 - y0)
    return None


@dataclass
class Measured:
    """One system's measures: per rate the quality (mean, lo, hi) and realised call rates; APGR, CPT."""

    system: System
    quality: dict[float, tuple[float, float, float]]
    precision: dict[float, tuple[float, float, float]]
    call_rate: dict[float, float]
    big_share: dict[float, float]
    apgr: tuple[float, float, float]
    cpt: float | None
    replicates: dict[float, np.ndarray]


def measure(rows: Sequence[dict], bootstrap: int, seed: int, metric: str = "entity_supported"
            ) -> tuple[list[Measured], dict[str, tuple[float, float, float]], Bootstrap | None]:
    """Every cascade system's curve and measures, and the big model alone per big side, all on the
    same resamples (so `difference` pairs them)."""
    groups, bigs = systems(rows)
    if not groups:
        return [], {}, None
    first = next(iter(groups.values()))
    n_seeds = max(len(rs) for g in groups.values() for rs in g.points.values())
    n_people = len(next(iter(first.points.values()))[0][metric])
    boot = Bootstrap(n_seeds, n_people, bootstrap, seed)
    big_quality = {}
    big_reps = {}
    for big, row in bigs.items():
        *big_quality[big], big_reps[big] = estimate(_values([row], metric), boot)
    out = []
    for system in groups.values():
        rates = sorted(system.points)
        small = estimate(_values(system.alone, metric), boot) if system.alone else (0.0, 0.0, 0.0, np.zeros(bootstrap))
        quality, precision, reps = {}, {}, {}
        for rate in rates:
            *quality[rate], reps[rate] = estimate(_values(system.points[rate], metric), boot)
            precision[rate] = tuple(estimate(_values(system.points[rate], "entity_scores"), boot)[:3])
        big_point, big_rep = big_quality.get(system.big, (0.0,))[0], big_reps.get(system.big, np.zeros(bootstrap))
        point = apgr(rates, pgr_curve(rates, [quality[r][0] for r in rates], small[0], big_point))
        rep_apgr = [apgr(rates, pgr_curve(rates, [reps[r][b] for r in rates], small[3][b], big_rep[b]))
                    for b in range(bootstrap)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanquantile(rep_apgr, [0.025, 0.975])
        out.append(Measured(
            system, {r: tuple(q) for r, q in quality.items()}, precision,
            {r: float(np.mean([x["call_rate"] or 0.0 for x in system.points[r]])) for r in rates},
            {r: float(np.mean([x.get("big_share") or 0.0 for x in system.points[r]])) for r in rates},
            (point, float(lo), float(hi)), cpt(rates, pgr_curve(rates, [quality[r][0] for r in rates], small[0],
                                                                 big_point)), reps))
    return out, {b: tuple(q) for b, q in big_quality.items()}, boot


def difference(a: Measured, b: Measured, rate: float) -> tuple[float, float, float] | None:
    """a - b in quality at `rate` with its paired bootstrap interval (None if either was not measured)."""
    if rate not in a.replicates or rate not in b.replicates:
        return None
    diffs = a.replicates[rate] - b.replicates[rate]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(diffs, [0.025, 0.975])
    return a.quality[rate][0] - b.quality[rate][0], float(lo), float(hi)


def find(measured: Sequence[Measured], rule: str, trigger: str, big: str | None = None,
         unit: str | None = None) -> Measured | None:
    return next((m for m in measured if m.system.rule == rule and m.system.trigger == trigger
                 and (big is None or m.system.big == big) and m.system.unit == unit), None)


def to_json(m: Measured) -> dict[str, Any]:
    """A system's measures as plain data (for the report's JSON)."""
    return {"system": m.system.name, "rule": m.system.rule, "trigger": m.system.trigger, "big": m.system.big,
            "unit": m.system.unit,
            "comparison": m.system.comparison, "seeds": max(len(v) for v in m.system.points.values()),
            "quality": {str(r): q for r, q in m.quality.items()},
            "precision": {str(r): q for r, q in m.precision.items()},
            "call_rate": {str(r): v for r, v in m.call_rate.items()},
            "big_share": {str(r): v for r, v in m.big_share.items()}, "apgr": m.apgr, "cpt50": m.cpt}
