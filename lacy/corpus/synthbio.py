"""Stage 0 (synthetic): biographies of invented people whose facts are known exactly.

Each person gets six attributes drawn at random (birth date, birth city, university, field of study,
employer, employer city) and `synth.biographies` biographies, each written from fresh templates (at
least 20 per attribute), the full name in the first sentence and pronouns after, sentences optionally
permuted. Every document carries the exact character span of each value in its `facts` field (the
oracle, read by `lacy.labels.facts.oracle_spans`), so the fact flags of spaCy can be scored against the
truth, a model can be trained on the true spans, and every value a generation states can be checked
against the person's record — no claim extraction, no judge.

    path = ensure_corpus(SynthConfig(people=2000), Path("runs/x/corpus"))   # content-addressed JSONL
    people = people_entities(path)                                          # the evaluation's Entity list
    row = score_synthetic("lacy+retrieval", generations, records(path))     # exact precision per attribute

Deterministic: the same config gives byte-identical files (100k people in a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lacy.labels.facts import ORACLE_ATTRIBUTES

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Part of the corpus' content address: bump when the same config would write different text."""

# ----------------------------------------------------------------------------------------------
# Value vocabularies (our own lists; employer and university names are composed so that no value
# contains another attribute's value, which keeps matching a stated value unambiguous)

FIRST_NAMES = {
    "she": """Ada Agnes Alma Amelia Anna Astrid Beatrice Bella Bianca Camila Carla Cecilia Clara Dana Daria
        Delia Edith Elena Elisa Elsa Emma Erika Esther Eva Flora Frida Gemma Greta Hanna Helena Ida Ilse
        Ines Irene Iris Isla Jana Joanna Julia June Karin Kira Laila Lara Lena Lidia Lina Livia Lucia Luisa
        Lydia Maia Marta Maya Mila Mira Nadia Nina Nora Olga Paula Petra Rita Rosa Ruth Sara Selma Silvia
        Sofia Stella Tara Tessa Thea Uma Vera Viola Wanda Yara Zara Zoe""".split(),
    "he": """Aaron Adam Adrian Albert Alvaro Anders Andrei Anton Arthur Axel Basil Benno Boris Bruno Carl
        Caspar Cedric Conrad Damian Daniel David Dmitri Edgar Elias Emil Enzo Erik Felix Filip Gabriel
        Gideon Gustav Hector Henrik Hugo Igor Isaac Ivan Jakob Jonas Julian Kasper Lars Leon Leopold Linus
        Lorenzo Lucas Magnus Marco Marius Martin Mateo Nikolai Oscar Otto Pablo Pavel Pedro Quentin
        Rafael Roman Rudolf Samuel Sebastian Simon Stefan Teodor Tobias Tomas Victor Viktor Walter Xavier
        Yusuf Zoltan""".split(),
}
LAST_NAMES = """Abbott Achterberg Adler Alder Almeida Arden Arnesen Ashby Bachmann Baird Barlow Barros Becker
    Bellamy Bergstrom Blackwood Blom Bogdan Brandt Brennan Calloway Carmody Castellan Cavendish Chandler
    Cortez Crane Dahl Dalton Danvers Delacroix Demir Dietrich Dorsey Draper Duarte Eklund Elling Engel
    Esposito Fairbanks Falk Farrow Fenwick Ferrante Fischer Fonseca Forsberg Foster Galloway Garrick Gerber
    Gilmore Goodwin Graves Grimaldi Gunnarsson Haas Halloran Hartmann Hawthorne Hayward Hendricks Holm
    Horvath Huxley Ibsen Ingram Iversen Jansen Jovanovic Kaplan Keller Kessler Kincaid Kovacs Kowalski
    Krause Lachance Lambert Langley Larsen Lindqvist Lockhart Lorenz Lundgren Macready Marchetti Markovic
    Maxwell Mercer Moreau Morrow Nakamura Navarro Nielsen Norwood Novak Okafor Olsen Oyelaran Pacheco
    Pallister Pereira Petrov Pickering Quist Radcliffe Ramsay Reinholt Renner Rinaldi Rowntree Salgado
    Sandoval Schreiber Sefton Sherwood Sinclair Soderberg Sorensen Stanek Sterling Strand Sutherland
    Szabo Takahashi Tanaka Thorne Toivonen Traverso Underhill Valdez Vance Varga Vasquez Vogel Volkov
    Wainwright Waller Weber Wexford Whitlock Winslow Wolff Yamada Yilmaz Zeller Zielinski""".split()
CITIES = """Aberdeen Adelaide Alicante Amsterdam Antwerp Athens Auckland Bergen Bilbao Bologna Bordeaux
    Bremen Brisbane Bristol Brno Bruges Budapest Cadiz Calgary Cardiff Cologne Cork Dresden Dublin Dundee
    Durban Edinburgh Eindhoven Florence Gdansk Geneva Genoa Ghent Glasgow Granada Graz Hamburg Hanover
    Helsinki Innsbruck Kiev Krakow Leeds Leipzig Lille Lisbon Ljubljana Lyon Madrid Malmo Manchester
    Marseille Melbourne Milan Montreal Munich Nantes Naples Oslo Ottawa Oxford Palermo Porto Prague
    Quebec Reykjavik Riga Rotterdam Salzburg Seville Stockholm Strasbourg Stuttgart Sydney Tallinn
    Tampere Toledo Toronto Toulouse Trieste Turin Uppsala Utrecht Valencia Vancouver Venice Verona Vienna
    Vilnius Warsaw Winnipeg Wroclaw Zagreb Zurich""".split()
UNIVERSITY_STEMS = """Ashcombe Belmoor Brightwater Carrowmore Dunmore Eastbrook Elmhurst Fairhaven Glenrock
    Greystone Hallowell Highmoor Kingsbridge Larkspur Lindenfield Marrowgate Northgate Oakridge Pinecrest
    Ravenscroft Redcliffe Riverton Silverlake Stonebridge Thornbury Westhollow Whitmore Willowdale""".split()
UNIVERSITY_FORMS = ("{} University", "the University of {}", "{} Institute of Technology", "{} College")
FIELDS = """mathematics physics chemistry biology astronomy geology economics sociology psychology
    linguistics philosophy history archaeology anthropology architecture medicine pharmacology nursing
    statistics engineering robotics oceanography meteorology ecology genetics neuroscience botany zoology
    musicology literature theology law journalism agronomy cartography demography epidemiology forestry
    metallurgy optics""".split()
EMPLOYER_STEMS = """Arcwell Bluepeak Brightline Cobalt Corvane Deltaform Everline Foxglove Granite Halcyon
    Ironleaf Juniper Keystone Lumen Meridian Northwind Orchard Pinnacle Quarry Redwood Sablewood Sunmark
    Tidewater Vantage Westfield Zephyr""".split()
EMPLOYER_SUFFIXES = ("Systems", "Foods", "Labs", "Motors", "Pharmaceuticals", "Logistics", "Energy", "Media")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
YEARS = range(1920, 2000)


def value_space(attr: str) -> list[str]:
    """Every value an attribute can take (the vocabulary a stated value is matched against)."""
    if attr == "birth_date":
        return [f"{m} {d}, {y}" for y in YEARS for m in MONTHS for d in range(1, 29)]
    if attr in ("birth_city", "employer_city"):
        return list(CITIES)
    if attr == "university":
        return [form.format(stem) for stem in UNIVERSITY_STEMS for form in UNIVERSITY_FORMS]
    if attr == "field":
        return list(FIELDS)
    if attr == "employer":
        return [f"{stem} {suffix}" for stem in EMPLOYER_STEMS for suffix in EMPLOYER_SUFFIXES]
    raise ValueError(f"unknown synthetic attribute {attr!r}; choose from {ORACLE_ATTRIBUTES}")


# ----------------------------------------------------------------------------------------------
# Templates: {S} subject (full name or pronoun), {P} possessive, {V} the value. ≥ 20 per attribute.

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {V}.", "{S} came into the world on {V}.", "{P} birthday is {V}.",
        "{S} was born on the morning of {V}.", "{P} life began on {V}.", "{S} entered the world on {V}.",
        "{S} celebrated {P_} birth date, {V}, every year.", "{P} date of birth is {V}.",
        "{S} was born, according to the records, on {V}.", "The records show that {S_} was born on {V}.",
        "{S} arrived on {V}.", "{P} parents welcomed {O} on {V}.", "{S} first saw daylight on {V}.",
        "{S} was delivered on {V}.", "{P} birth was registered on {V}.", "{S} has the birth date {V}.",
        "{S} was born in the early hours of {V}.", "{S} was born late on {V}.",
        "Born on {V}, {S_} grew up quickly.", "{S} gives {V} as {P_} date of birth.",
    ),
    "birth_city": (
        "{S} was born in {V}.", "{S} grew up in {V}.", "{P} hometown is {V}.", "{S} spent {P_} childhood in {V}.",
        "{S} comes from {V}.", "{P} birthplace is {V}.", "{S} was raised in the city of {V}.",
        "{P} family lived in {V}.", "{S} was a child of {V}.", "{S} spent {P_} early years in {V}.",
        "{S} went to school in {V}.", "{P} first home was in {V}.", "{S} is a native of {V}.",
        "{S} was born and raised in {V}.", "{S} often spoke of {P_} youth in {V}.", "{P} roots are in {V}.",
        "{S} lived in {V} as a child.", "{S} calls {V} {P_} hometown.", "{P} place of birth is {V}.",
        "{S} was brought up in {V}.",
    ),
    "university": (
        "{S} studied at {V}.", "{S} graduated from {V}.", "{S} attended {V}.", "{S} enrolled at {V}.",
        "{S} earned a degree at {V}.", "{P} alma mater is {V}.", "{S} spent four years at {V}.",
        "{S} was a student at {V}.", "{S} received {P_} diploma from {V}.", "{S} completed {P_} studies at {V}.",
        "{S} went on to {V}.", "{S} was admitted to {V}.", "{P} university was {V}.",
        "{S} took {P_} degree at {V}.", "{S} trained at {V}.", "{S} was educated at {V}.",
        "{S} finished {P_} education at {V}.", "{S} chose to study at {V}.", "{S} holds a degree from {V}.",
        "{S} did {P_} studies at {V}.",
    ),
    "field": (
        "{S} studied {V}.", "{S} majored in {V}.", "{P} field is {V}.", "{S} specialised in {V}.",
        "{S} earned a degree in {V}.", "{S} focused on {V}.", "{P} subject was {V}.",
        "{S} took courses in {V}.", "{S} wrote a thesis in {V}.", "{S} was trained in {V}.",
        "{S} devoted {P_} studies to {V}.", "{P} academic field is {V}.", "{S} chose {V} as {P_} subject.",
        "{S} read {V}.", "{S} graduated in {V}.", "{S} developed a passion for {V}.",
        "{P} degree is in {V}.", "{S} concentrated on {V}.", "{S} has a background in {V}.",
        "{S} did research in {V}.",
    ),
    "employer": (
        "{S} worked for {V}.", "{S} was employed by {V}.", "{S} joined {V}.", "{P} employer was {V}.",
        "{S} took a job at {V}.", "{S} spent {P_} career at {V}.", "{S} was hired by {V}.",
        "{S} worked at {V}.", "{P} job was at {V}.", "{S} held a position at {V}.",
        "{S} accepted an offer from {V}.", "{S} started working at {V}.", "{S} was on the staff of {V}.",
        "{S} built {P_} career at {V}.", "{P} workplace was {V}.", "{S} signed a contract with {V}.",
        "{S} earned {P_} living at {V}.", "{S} was an employee of {V}.", "{S} went to work for {V}.",
        "{S} stayed with {V} for many years.",
    ),
    "employer_city": (
        "{S} worked in {V}.", "{S} moved to {V} for work.", "{P} office was in {V}.",
        "{S} relocated to {V}.", "{S} commuted to {V}.", "{P} job was based in {V}.",
        "{S} settled in {V} for {P_} career.", "{S} took up work in {V}.", "{P} workplace was in {V}.",
        "{S} was posted to {V}.", "{S} found work in {V}.", "{S} was stationed in {V}.",
        "{P} career took {O} to {V}.", "{S} made a living in {V}.", "{S} spent {P_} working life in {V}.",
        "{S} worked out of {V}.", "{S} was based in {V}.", "{P} company sent {O} to {V}.",
        "{S} practised in {V}.", "{S} earned {P_} salary in {V}.",
    ),
}
PRONOUNS = {"she": ("She", "Her", "her", "her", "she"), "he": ("He", "His", "his", "him", "he")}
"""subject, possessive, possessive mid-sentence, object, subject mid-sentence."""


# ----------------------------------------------------------------------------------------------
# People and their biographies


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    pronoun: str
    attributes: dict[str, str]

    def record(self) -> dict:
        """The person as a knowledge-store document: the record the big side reads and answers come
        from ("documents or a database")."""
        a = self.attributes
        text = (f"{self.name}. Birth date: {a['birth_date']}. Birth city: {a['birth_city']}. "
                f"University: {a['university']}. Field of study: {a['field']}. Employer: {a['employer']}. "
                f"Employer city: {a['employer_city']}.")
        return {"id": self.id, "title": self.name, "text": text, "attributes": dict(a)}


def make_people(cfg: Any) -> list[Person]:
    """`cfg.people` invented people (unique names; a middle initial when first x last names run short)."""
    rng = random.Random(cfg.seed)
    spaces = {attr: value_space(attr) for attr in ORACLE_ATTRIBUTES}
    pool = sum(len(v) for v in FIRST_NAMES.values()) * len(LAST_NAMES)
    initials = cfg.people > pool // 2
    seen: set[str] = set()
    people = []
    while len(people) < cfg.people:
        pronoun = rng.choice(("she", "he"))
        first, last = rng.choice(FIRST_NAMES[pronoun]), rng.choice(LAST_NAMES)
        name = f"{first} {chr(65 + rng.randrange(26))}. {last}" if initials else f"{first} {last}"
        if name in seen:
            continue
        seen.add(name)
        attributes = {attr: rng.choice(spaces[attr]) for attr in ORACLE_ATTRIBUTES}
        people.append(Person(f"p{len(people):06d}", name, pronoun, attributes))
    return people


def biography(person: Person, rng: random.Random, permute: bool) -> tuple[str, list[dict]]:
    """One biography and its oracle spans: one sentence per attribute from a random template, the
    full name in the first sentence and pronouns after."""
    order = list(ORACLE_ATTRIBUTES)
    if permute:
        rng.shuffle(order)
    subj, poss, poss_mid, obj, subj_mid = PRONOUNS[person.pronoun]
    text, facts = "", []
    for i, attr in enumerate(order):
        named = i == 0
        slots = {"S": person.name if named else subj, "P": f"{person.name}'s" if named else poss,
                 "S_": person.name if named else subj_mid, "P_": poss_mid, "O": obj}
        template = rng.choice(TEMPLATES[attr])
        if named and not template.startswith(("{S}", "{P}")):  # the name opens every biography
            template = TEMPLATES[attr][0]
        head, tail = template.split("{V}")
        prefix = ("" if not text else text + " ") + _fill(head, slots)
        value = person.attributes[attr]
        facts.append({"attr": attr, "value": value, "start": len(prefix), "end": len(prefix) + len(value)})
        text = prefix + value + _fill(tail, slots)
    return text, facts


def _fill(part: str, slots: dict[str, str]) -> str:
    return re.sub(r"\{(S_|P_|S|P|O)\}", lambda m: slots[m.group(1)], part)


def documents(cfg: Any, people: Sequence[Person] | None = None) -> Iterator[dict]:
    """Every biography as a corpus document {id, title, text, person, facts}."""
    rng = random.Random(f"{cfg.seed}/biographies")
    for person in make_people(cfg) if people is None else people:
        for k in range(cfg.biographies):
            text, facts = biography(person, rng, cfg.permute)
            yield {"id": f"{person.id}-{k}", "title": person.name, "text": text, "person": person.id,
                   "facts": facts}


def corpus_key(cfg: Any) -> str:
    return hashlib.sha1(json.dumps({**asdict(cfg), "version": GENERATOR_VERSION}, sort_keys=True)
                        .encode()).hexdigest()[:12]


def ensure_corpus(cfg: Any, directory: Path) -> Path:
    """The corpus of `cfg` as `<directory>/synthbio-<key>/corpus.jsonl` (+ people.jsonl, the records),
    written on first use; the same config always gives the same bytes."""
    out = Path(directory) / f"synthbio-{corpus_key(cfg)}"
    corpus = out / "corpus.jsonl"
    if corpus.is_file() and (out / "people.jsonl").is_file():
        return corpus
    out.mkdir(parents=True, exist_ok=True)
    people = make_people(cfg)
    for name, rows in (("people.jsonl", (p.record() | {"pronoun": p.pronoun} for p in people)),
                       ("corpus.jsonl", documents(cfg, people))):
        tmp = out / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        tmp.replace(out / name)
    log.info("synthbio: %d people x %d biographies -> %s", len(people), cfg.biographies, corpus)
    return corpus


def records(corpus: str | Path) -> dict[str, dict]:
    """person id -> record (lacy.corpus.synthbio.Person.record) of a generated corpus."""
    path = Path(corpus).parent / "people.jsonl"
    with open(path, encoding="utf-8") as f:
        return {row["id"]: row for row in map(json.loads, f) if row}


def people_entities(corpus: str | Path) -> list[Any]:
    """The people of a generated corpus as evaluation entities (doc_id = person id = record id)."""
    from lacy.corpus.readers import Entity

    return [Entity(name=r["title"], title=r["title"], doc_id=r["id"], description="",
                   birth_year=int(r["attributes"]["birth_date"][-4:]), birth_place=r["attributes"]["birth_city"],
                   occupation=r["attributes"]["field"])
            for r in records(corpus).values()]


# ----------------------------------------------------------------------------------------------
# Exact evaluation: every value a generation states, checked against the person's record


@dataclass(frozen=True)
class Stated:
    attr: str
    value: str
    start: int
    end: int


def _matcher() -> tuple[re.Pattern, dict[str, list[str]]]:
    by_value: dict[str, list[str]] = {}
    for attr in ORACLE_ATTRIBUTES:
        if attr != "birth_date":
            for v in value_space(attr):
                by_value.setdefault(v.lower().removeprefix("the "), []).append(attr)
    words = sorted(by_value, key=len, reverse=True)  # longest first: "Oakridge College" before "Oakridge"
    months = "|".join(MONTHS)
    date = rf"(?:{months}) (?:[1-9]|[12][0-9]|3[01]), (?:1[0-9]{{3}}|20[0-9]{{2}})"
    pattern = re.compile(rf"(?P<date>{date})|\b(?P<value>{'|'.join(map(re.escape, words))})\b", re.IGNORECASE)
    return pattern, by_value


_MATCHER: tuple[re.Pattern, dict[str, list[str]]] | None = None
_CITY_CONTEXT = re.compile(r"\b(work|worked|working|job|office|career|company|posted|stationed|based|relocated|"
                           r"commuted|salary|practised|living|moved|settled|workplace)\b[^.]*$", re.IGNORECASE)


def stated_values(text: str) -> list[Stated]:
    """Attribute values a text states, in order, non-overlapping. A city is the employer city when its
    sentence talks about work before it, else the birth city (the templates keep the two apart)."""
    global _MATCHER
    if _MATCHER is None:
        _MATCHER = _matcher()
    pattern, by_value = _MATCHER
    out = []
    for m in pattern.finditer(text):
        if m.group("date"):
            out.append(Stated("birth_date", m.group("date"), m.start(), m.end()))
            continue
        attrs = by_value[m.group("value").lower()]
        if attrs == ["birth_city", "employer_city"]:
            sentence = text[text.rfind(".", 0, m.start()) + 1:m.start()]
            attrs = ["employer_city" if _CITY_CONTEXT.search(sentence) else "birth_city"]
        out.append(Stated(attrs[0], m.group("value"), m.start(), m.end()))
    return out


def _canonical(attr: str, value: str) -> str:
    return value.lower().removeprefix("the ")


def check_biography(text: str, record: Mapping[str, Any]) -> list[tuple[Stated, bool]]:
    """Each distinct (attribute, value) the text states, and whether it is the person's."""
    truth = record["attributes"]
    seen, out = set(), []
    for s in stated_values(text):
        key = (s.attr, _canonical(s.attr, s.value))
        if key not in seen:
            seen.add(key)
            out.append((s, key[1] == _canonical(s.attr, truth[s.attr])))
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


def score_synthetic(name: str, generations: Sequence[Any], people: Mapping[str, Mapping[str, Any]], *,
                    gamma: float = 10, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One method-table row for a system's synthetic biographies, in the Wikipedia row's keys
    (lacy.eval.claims.score_biographies): precision (+ CI) over the people who stated a value, respond ratio,
    values per response, supported per person, FactScore (gamma-penalised, abstainers 0),
    informative precision (values another random person's record does not share), per-attribute
    precision / correct / stated, call rates; plus `calls_on_facts`: the share of big-model spans
    that state an attribute value (where the calls land at inference)."""
    from lacy.eval.claims import _ci, call_rates, length_penalty_factor

    row: dict[str, Any] = {"system": name, "entities": len(generations), **call_rates(generations)}
    scores, factscores, supported, informative = [], [], [], []
    attributes = {attr: [0, 0] for attr in ORACLE_ATTRIBUTES}
    n = len(generations)
    shift = 1 + random.Random(seed).randrange(n - 1) if n > 1 else 0
    landed = [0, 0]
    for i, gen in enumerate(generations):
        record = people[gen.entity.doc_id]
        checks = check_biography(gen.text, record)
        other = people[generations[(i + shift) % n].entity.doc_id]["attributes"] if shift else {}
        for stated, ok in checks:
            attributes[stated.attr][0] += ok
            attributes[stated.attr][1] += 1
        precision = sum(ok for _, ok in checks) / len(checks) if checks else None
        scores.append(precision)
        factscores.append(0.0 if precision is None else precision * length_penalty_factor(len(checks), gamma))
        supported.append(float(sum(ok for _, ok in checks)))
        kept = [ok for s, ok in checks if _canonical(s.attr, s.value) != _canonical(s.attr, other.get(s.attr, ""))]
        if kept:
            informative.append(sum(kept) / len(kept))
        hits, calls = _on_facts(gen.text, getattr(gen, "spans", None), [s for s, _ in checks])
        landed[0] += hits
        landed[1] += calls
    answered = [s for s in scores if s is not None]
    mean, lo, hi = _ci(answered, bootstrap, seed)
    for label in ("", "_strict", "_lenient"):
        row.update({f"precision{label}": mean, f"precision{label}_lo": lo, f"precision{label}_hi": hi})
    row["entity_scores"] = scores
    row["respond_ratio"] = len(answered) / n if n else 0.0
    row["claims_per_response"] = (sum(a[1] for a in attributes.values()) / len(answered)) if answered else 0.0
    for key, values in (("supported_per_person", supported), ("factscore", factscores),
                        ("informative_precision", informative)):
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = _ci(values, bootstrap, seed)
    row["informative_responses"] = len(informative)
    row["entity_factscore"] = factscores
    for attr, (correct, stated) in attributes.items():
        row[f"{attr}_correct"], row[f"{attr}_stated"] = correct, stated
        row[f"{attr}_precision"] = correct / stated if stated else None
    row["calls_on_facts"] = landed[0] / landed[1] if landed[1] else None
    return row


def leak_probes(docs: Sequence[dict], n: int, seed: int = 0) -> list[Any]:
    """Up to `n` leakage probes from training biographies: the text up to a random attribute value that
    is not the first sentence's (so the context names the person), the value as gold, the attribute
    as label."""
    from lacy.eval.claims import LeakProbe

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
    import numpy as np
    import torch

    from lacy.corpus.tokenizer import call_id
    from lacy.labels.facts import oracle_codes, oracle_spans
    from lacy.labels.method import token_losses
    from lacy.model import load_small_model

    model, tokenizer = load_small_model(str(model_dir))
    cid = call_id(tokenizer)
    firsts = [d for d in docs if d["id"].endswith("-0")][:max_people]
    space_bits = {attr: math.log2(len(value_space(attr))) for attr in ORACLE_ATTRIBUTES}
    bits = dict.fromkeys(ORACLE_ATTRIBUTES, 0.0)
    template_loss, template_tokens = 0.0, 0
    limit = model.config.n_positions
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
    from collections import Counter

    from lacy.shards.format import load_shard_tokenizer, read_batches, read_manifest

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
