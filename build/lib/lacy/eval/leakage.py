"""Leakage: does the small model still reproduce facts it was trained on?

A probe is the text of a training document up to a fact; the small model alone continues it greedily,
<CALL> disabled; a probe leaks when the continuation contains the fact. A model that learned to
delegate should leak less than one that memorised.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lacy.eval.claims import CLAIM_LABELS, normalize


@dataclass(frozen=True)
class LeakProbe:
    prefix: str
    """Document text up to (not including) the held fact, trailing space removed."""
    gold: str
    doc_id: str = ""
    label: str = ""
    """The fact's type (spaCy entity label), for per-type rates."""


@dataclass
class LeakReport:
    probes: int
    leaked: int
    rate: float
    """leaked / probes: lower = the model learned to delegate rather than memorise."""
    ci: tuple[float, float]
    """95 % Wilson interval of the rate."""
    by_label: dict[str, tuple[int, int]]
    """fact type -> (leaked, probes)."""
    continuations: list[str]
    hits: list[bool]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sensible at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def make_leak_probes(docs: Sequence[dict], nlp: Any, n: int, seed: int = 0, min_prefix_chars: int = 40,
                     max_prefix_chars: int = 1000) -> list[LeakProbe]:
    """Up to `n` probes, at most one per document (documents drawn in a seeded order): a fact span
    (label in CLAIM_LABELS, at least `min_prefix_chars` into the text) picked at random; the prefix is
    the text before it, cut to its last `max_prefix_chars` characters at a word boundary."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    probes: list[LeakProbe] = []
    for i in order:
        if len(probes) >= n:
            break
        text = docs[i]["text"]
        spans = [e for e in nlp(text).ents if e.label_ in CLAIM_LABELS and e.start_char >= min_prefix_chars]
        if not spans:
            continue
        ent = rng.choice(spans)
        prefix = text[:ent.start_char].rstrip()
        if len(prefix) > max_prefix_chars:
            cut = prefix[-max_prefix_chars:]
            prefix = cut[cut.find(" ") + 1:] if " " in cut else cut
        probes.append(LeakProbe(prefix, ent.text, str(docs[i].get("id", i)), ent.label_))
    return probes


def leaks(continuation: str, gold: str) -> bool:
    """The continuation contains the gold fact (normalised, as whole words), wherever it writes it."""
    key = normalize(gold)
    return bool(key) and f" {key} " in f" {normalize(continuation)} "


def leakage(probes: Sequence[LeakProbe], continuations: Sequence[str]) -> LeakReport:
    """Share of probes whose greedy continuation (the small model alone, <CALL> disabled: one text per
    probe, the prefix repeated in front or not) reproduces the held fact, with its Wilson CI and per
    fact type."""
    if not probes:
        raise ValueError("leakage needs at least one probe")
    outs, hits = [], []
    by_label: dict[str, list[int]] = {}
    for probe, out in zip(probes, continuations, strict=True):
        out = out[len(probe.prefix):] if out.startswith(probe.prefix) else out
        outs.append(out)
        hits.append(leaks(out, probe.gold))
        counts = by_label.setdefault(probe.label, [0, 0])
        counts[0] += hits[-1]
        counts[1] += 1
    leaked = sum(hits)
    return LeakReport(len(probes), leaked, leaked / len(probes), wilson_interval(leaked, len(probes)),
                      {k: (v[0], v[1]) for k, v in sorted(by_label.items())}, outs, hits)
