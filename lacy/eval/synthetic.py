"""Exact evaluation on the synthetic corpus: every value a text states, checked against the record.

    stated_values("She was born on March 3, 1952 in Oslo.")   # [Stated(birth_date ...), Stated(birth_city ...)]
    row = score_records("lacy+retrieval", generations, records(path))   # one lacy.eval.row.Row

Also what only a corpus with exact facts can show: leakage probes at the true value spans, the bits
of values a trained model stores (`stored_bits`), and spaCy's fact flags scored against the oracle
(`proxy_vs_oracle`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lacy.corpus.synthbio import (
    CITIES,
    EMPLOYER_STEMS,
    EMPLOYER_SUFFIXES,
    FIELDS,
    MONTHS,
    ORACLE_ATTRIBUTES,
    UNIVERSITY_FORMS,
    UNIVERSITY_STEMS,
    value_space,
)
from lacy.corpus.tokenizer import call_id
from lacy.eval.claims import length_penalty_factor
from lacy.eval.leakage import LeakProbe
from lacy.eval.row import PersonScore, Row, build_row
from lacy.labels.facts import oracle_codes, oracle_spans
from lacy.labels.method import token_losses
from lacy.model import load_small_model
from lacy.shards.format import load_shard_tokenizer, read_batches, read_manifest


@dataclass(frozen=True)
class Stated:
    """A value a text states: its attribute, its text and where, and its canonical form (what it is
    compared as: a date's (year, month, day) with None for a part not stated; an institution's (stem,
    form) with form None when only the stem is named)."""

    attr: str
    value: str
    start: int
    end: int
    canonical: tuple


MONTH_NUMBER = {name.lower(): i for i, m in enumerate(MONTHS, start=1) for name in (m, m[:3])}
"""Month names and their three-letter abbreviations -> the month's number."""
_MONTH = r"(?P<{g}>" + "|".join(sorted(MONTH_NUMBER, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<{g}>[12][0-9]|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?P<{g}>1[0-9]{{3}}|20[0-9]{{2}})"
_DATES = [  # every common way of writing a date, the most complete first
    rf"{_MONTH.format(g='m1')}\s+{_DAY.format(g='d1')},?\s+{_YEAR.format(g='y1')}",             # March 3, 1952
    rf"(?:the\s+)?{_DAY.format(g='d2')}\s+(?:of\s+)?{_MONTH.format(g='m2')},?\s+{_YEAR.format(g='y2')}",  # 3 March 1952
    rf"{_YEAR.format(g='y3')}-(?P<m3>0[1-9]|1[0-2])-(?P<d3>0[1-9]|[12][0-9]|3[01])",               # 1952-03-03
    rf"{_MONTH.format(g='m4')},?\s+(?:of\s+)?{_YEAR.format(g='y4')}",                              # March 1952
    rf"(?<=\bborn\s)(?:in\s+|on\s+)?{_YEAR.format(g='y5')}",                                     # born in 1952
]
_DATE = re.compile(r"\b(?:" + "|".join(f"(?:{d})" for d in _DATES) + r")\b", re.IGNORECASE)


def _institutions() -> tuple[re.Pattern, dict[str, tuple[str, str, str | None]]]:
    """Universities and employers named whole ("Oakridge College", "Cobalt Labs") or by their stem
    alone ("Oakridge", "Cobalt"): text (lower case) -> (attribute, stem, form or None)."""
    names: dict[str, tuple[str, str, str | None]] = {}
    for stem in UNIVERSITY_STEMS:
        for form in UNIVERSITY_FORMS:
            names[form.format(stem).lower().removeprefix("the ")] = ("university", stem, form)
        names[stem.lower()] = ("university", stem, None)
    for stem in EMPLOYER_STEMS:
        for suffix in EMPLOYER_SUFFIXES:
            names[f"{stem} {suffix}".lower()] = ("employer", stem, suffix)
        names[stem.lower()] = ("employer", stem, None)
    words = sorted(names, key=len, reverse=True)  # longest first: "Oakridge College" before "Oakridge"
    return re.compile(rf"\b(?:{'|'.join(map(re.escape, words))})\b", re.IGNORECASE), names


_INSTITUTIONS = _institutions()
_OTHERS = re.compile(rf"\b(?:{'|'.join(map(re.escape, sorted(set(CITIES) | set(FIELDS), key=len, reverse=True)))})\b",
                     re.IGNORECASE)
_CITY_CONTEXT = re.compile(r"\b(work|worked|working|job|office|career|company|posted|stationed|based|relocated|"
                           r"commuted|salary|practised|living|moved|settled|workplace)\b[^.]*$", re.IGNORECASE)
_FIELDS = {f.lower() for f in FIELDS}


def _date(m: re.Match) -> tuple[int | None, int | None, int | None]:
    """(year, month, day) of a date match, None for what it does not state."""
    g = {k: v for k, v in m.groupdict().items() if v}
    year = next((int(g[k]) for k in ("y1", "y2", "y3", "y4", "y5") if k in g), None)
    month = next((MONTH_NUMBER[g[k].lower()] for k in ("m1", "m2", "m4") if k in g), None)
    month = int(g["m3"]) if "m3" in g else month
    day = next((int(g[k]) for k in ("d1", "d2", "d3") if k in g), None)
    return year, month, day


def stated_values(text: str) -> list[Stated]:
    """Every attribute value a text states, in any common format, in order, non-overlapping: dates
    whole or in part in any order and style ("March 3, 1952", "3 March 1952", "1952-03-03", "March
    1952", "born in 1952"), universities and employers whole or by their stem alone ("Oakridge"), cities
    (the employer city when their sentence talks about work before them, else the birth city) and
    fields anywhere."""
    found: list[Stated] = []
    for m in _DATE.finditer(text):
        found.append(Stated("birth_date", m.group(), m.start(), m.end(), _date(m)))
    pattern, names = _INSTITUTIONS
    for m in pattern.finditer(text):
        attr, stem, form = names[m.group().lower().removeprefix("the ")]
        found.append(Stated(attr, m.group(), m.start(), m.end(), (stem, form)))
    for m in _OTHERS.finditer(text):
        word = m.group()
        if word.lower() in _FIELDS:
            found.append(Stated("field", word, m.start(), m.end(), (word.lower(),)))
            continue
        sentence = text[text.rfind(".", 0, m.start()) + 1:m.start()]
        attr = "employer_city" if _CITY_CONTEXT.search(sentence) else "birth_city"
        found.append(Stated(attr, word, m.start(), m.end(), (word.lower(),)))
    out, end = [], -1
    for s in sorted(found, key=lambda s: (s.start, -s.end)):  # the first and longest of overlapping matches
        if s.start >= end:
            out.append(s)
            end = s.end
    return out


def record_value(attr: str, value: str) -> tuple:
    """A record's value in the canonical form a stated one is compared with."""
    if attr == "birth_date":
        m = _DATE.fullmatch(value)
        assert m is not None, value
        return _date(m)
    if attr in ("university", "employer"):
        return _INSTITUTIONS[1][value.lower().removeprefix("the ")][1:]
    return (value.lower(),)


def _correct(stated: Stated, truth: tuple) -> bool:
    """Every part the text states matches the record (a stem alone: the record's stem)."""
    return all(part is None or part == true for part, true in zip(stated.canonical, truth, strict=True))


def check_biography(text: str, record: Mapping[str, Any]) -> list[tuple[Stated, bool]]:
    """Each distinct (attribute, value) the text states, and whether it is the person's."""
    truth = record["attributes"]
    seen, out = set(), []
    for s in stated_values(text):
        if (s.attr, s.canonical) not in seen:
            seen.add((s.attr, s.canonical))
            out.append((s, _correct(s, record_value(s.attr, truth[s.attr]))))
    return out


def _on_facts(text: str, spans: Sequence[Any] | None, stated: Sequence[Stated]) -> tuple[int, int]:
    """(big-written spans overlapping a stated value, big-written spans) of one cascade generation.
    The spans are the end of `text` (the prompt in front may or may not be one of them)."""
    if not spans:
        return 0, 0
    spans = [(s[0], s[1]) if isinstance(s, (tuple, list)) else (s.text, s.source) for s in spans]
    pos, hits, calls = len(text) - sum(len(t) for t, _ in spans), 0, 0
    for text, source in spans:
        if source == "big":
            calls += 1
            hits += any(s.start < pos + len(text) and pos < s.end for s in stated)
        pos += len(text)
    return hits, calls


def record_scores(generations: Sequence[Any], people: Mapping[str, Mapping[str, Any]], *, gamma: float = 10,
                  seed: int = 0) -> list[PersonScore]:
    """Each biography's values checked against its person's record: precision over the values stated,
    FActScore (gamma-penalised, abstainers 0), informative precision (values another random person's
    record does not share), per-attribute correctness, and how many big-model spans state a value."""
    n = len(generations)
    shift = 1 + random.Random(seed).randrange(n - 1) if n > 1 else 0
    scores = []
    for i, gen in enumerate(generations):
        checks = check_biography(gen.text, people[gen.entity.doc_id])
        other = people[generations[(i + shift) % n].entity.doc_id]["attributes"] if shift else {}
        correct = sum(ok for _, ok in checks)
        precision = correct / len(checks) if checks else None
        kept = [ok for s, ok in checks if not (other and _correct(s, record_value(s.attr, other[s.attr])))]
        on_values, spans = _on_facts(gen.text, getattr(gen, "spans", None), [s for s, _ in checks])
        scores.append(PersonScore(
            precision=precision, claims=len(checks), supported=correct,
            factscore=0.0 if precision is None else precision * length_penalty_factor(len(checks), gamma),
            informative=sum(kept) / len(kept) if kept else None,
            attributes=[(s.attr, ok) for s, ok in checks], lenient=precision, strict=precision,
            big_spans=spans, big_spans_on_values=on_values))
    return scores


def score_records(name: str, generations: Sequence[Any], people: Mapping[str, Mapping[str, Any]], *,
                  gamma: float = 10, bootstrap: int = 1000, seed: int = 0) -> Row:
    """The row of a system's synthetic biographies (`record_scores`, `lacy.eval.row.build_row`)."""
    return build_row(name, generations, record_scores(generations, people, gamma=gamma, seed=seed),
                     attributes=ORACLE_ATTRIBUTES, strict=True, bootstrap=bootstrap, seed=seed)


def leak_probes(docs: Sequence[dict], n: int, seed: int = 0) -> list[LeakProbe]:
    """Up to `n` leakage probes from training biographies: the text up to a random attribute value that
    is not the first sentence's (so the context names the person), the value as gold, the attribute
    as label."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    probes = []
    for i in order[:n]:
        doc = docs[i]
        fact = rng.choice(doc["facts"][1:])
        probes.append(LeakProbe(doc["text"][:fact["start"]].rstrip(), fact["value"], doc["id"], fact["attr"]))
    return probes


# ----------------------------------------------------------------------------------------------
# Knowledge stored in a small model, and the spaCy proxy against the truth


def stored_bits(model_dir: str | Path, docs: Sequence[dict], max_people: int | None = None) -> dict[str, Any]:
    """Bits of attribute values the model holds: per value, log2 |value space| minus the model's
    cross-entropy (bits, real-token softmax without <CALL>) on the value's tokens in the person's first
    training biography, floored at 0; summed over people. Also bits per parameter, per attribute, and
    the mean loss (nats) on the tokens that are no value (the template): a model that delegates facts
    should store fewer bits without losing the template."""
    model, tokenizer = load_small_model(str(model_dir))
    cid = call_id(tokenizer)
    firsts = [d for d in docs if d["id"].endswith("-0")][:max_people]
    space_bits = {attr: math.log2(len(value_space(attr))) for attr in ORACLE_ATTRIBUTES}
    bits = dict.fromkeys(ORACLE_ATTRIBUTES, 0.0)
    template_loss, template_tokens = 0.0, 0
    limit = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    with torch.no_grad():
        for doc in firsts:
            enc = tokenizer(doc["text"], add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            ids, offsets = enc["input_ids"][:limit], np.asarray(enc["offset_mapping"][:limit])
            codes = oracle_codes(offsets, oracle_spans(doc))
            x = torch.tensor([ids])
            nll = token_losses(model(input_ids=x[:, :-1]).logits, x[:, 1:], cid)[0].numpy()
            target_codes = codes[1:]
            for code, attr in enumerate(ORACLE_ATTRIBUTES, start=1):
                mine = target_codes == code
                if mine.any():
                    bits[attr] += max(0.0, space_bits[attr] - float(nll[mine].sum()) / math.log(2))
            template = target_codes == 0
            template_loss += float(nll[template].sum())
            template_tokens += int(template.sum())
    params = sum(p.numel() for p in model.parameters())
    total = sum(bits.values())
    return {"stored_bits": total, "bits_per_param": total / params, "bits_people": len(firsts),
            "template_loss": template_loss / max(1, template_tokens),
            **{f"stored_bits_{attr}": b for attr, b in bits.items()}}


def proxy_vs_oracle(shards_dir: str | Path, split: str = "train", top: int = 8) -> dict[str, Any]:
    """Token-level precision and recall of the shards' fact flags against their oracle codes: overall
    and per attribute (recall), plus the tokens most often flagged outside every attribute value."""
    tokens = read_manifest(shards_dir).counts[split]["tokens"]
    tokenizer = load_shard_tokenizer(shards_dir)
    flagged = hit = facts = 0
    per_attr = {attr: [0, 0] for attr in ORACLE_ATTRIBUTES}
    false_pos: Counter[int] = Counter()
    for batch in read_batches(shards_dir, split, 64):
        if "oracle" not in batch:
            raise ValueError(f"{shards_dir}: the shards have no oracle column (a corpus with `facts` spans)")
        fact, oracle, ids = batch["fact"].numpy(), batch["oracle"].numpy(), batch["input_ids"].numpy()
        flagged += int(fact.sum())
        hit += int((fact & (oracle > 0)).sum())
        facts += int((oracle > 0).sum())
        for code, attr in enumerate(ORACLE_ATTRIBUTES, start=1):
            mine = oracle == code
            per_attr[attr][0] += int((fact & mine).sum())
            per_attr[attr][1] += int(mine.sum())
        false_pos.update(ids[fact & (oracle == 0)].tolist())
    return {"precision": hit / flagged if flagged else None, "recall": hit / facts if facts else None,
            "flagged_share": flagged / tokens if tokens else None, "fact_share": facts / tokens if tokens else None,
            "recall_by_attribute": {a: (h / n if n else None) for a, (h, n) in per_attr.items()},
            "false_positive_tokens": [(tokenizer.decode([t]), c) for t, c in false_pos.most_common(top)]}
