"""The synthetic corpus: biographies of invented people whose facts are known exactly.

Each person gets six attributes drawn at random (birth date, birth city, university, field of study,
employer, employer city) and `synth.biographies` biographies, each written from fresh templates (at
least 20 per attribute), the full name in the first sentence and pronouns after, sentences optionally
permuted. Every document carries the exact character span of each value in its `facts` field (the
oracle, read by `lacy.labels.facts.oracle_spans`), so the fact flags of spaCy can be scored against the
truth, a model can be trained on the true spans, and every value a generation states can be checked
against the person's record — no claim extraction, no judge.

    path = ensure_corpus(SynthConfig(people=2000), Path("runs/x/corpus"))   # content-addressed JSONL
    people = people_entities(path)                                          # the evaluation's Entity list
    # every value a generation states, checked against the person's record: lacy.eval.synthetic

Deterministic: the same config gives byte-identical files (100k people in a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lacy.corpus.people import Entity

log = logging.getLogger(__name__)

ORACLE_ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "employer_city")
"""The attributes every invented person has, in the order of their oracle codes (code = index + 1)."""
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
# Filler: sentences whose words are uncertain but harmless — common nouns drawn afresh for every biography,
# never a checked value, never a named entity or number (so spaCy flags none of them as a fact). A
# confidence trigger finds them as unsure as a fact; delegating them writes nothing the record can check.
FILLER_TEMPLATES = (
    "{S} liked {thing} and {thing}.", "{S} often thought about {thing}.", "{P} favourite food was {food}.",
    "{S} enjoyed {hobby} with a {pet}.", "{S} kept a {pet} and a {pet}.", "{S} once lost a {object} near the {place}.",
    "{S} talked about {thing} with friends.", "{S} preferred {food} to {food}.", "{P} weekends were for {hobby}.",
    "{S} bought a {object} at the {place}.", "{S} disliked {thing} but liked {thing}.",
    "{S} took up {hobby} at the {place}.",
)
FILLER_WORDS = {
    "thing": """rain music gardens clocks maps letters boats bridges puzzles stories kites lamps mirrors shadows
        candles feathers storms rivers trains ladders windows bells ribbons pebbles""".split(),
    "food": """soup bread apples cheese pears rice noodles porridge plums carrots honey olives dumplings lentils
        pancakes figs""".split(),
    "hobby": """painting hiking chess knitting sailing birdwatching cycling baking pottery fishing dancing rowing
        juggling origami""".split(),
    "pet": "cat dog parrot rabbit tortoise goldfish hamster canary ferret".split(),
    "object": "umbrella notebook glove scarf compass kettle hat teapot key pencil".split(),
    "place": "market harbour library station bakery garden park museum".split(),
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


def biography(person: Person, rng: random.Random, permute: bool, filler: int = 0) -> tuple[str, list[dict]]:
    """One biography and its oracle spans: one sentence per attribute from a random template, the
    full name in the first sentence and pronouns after; `filler` filler sentences between them (never
    first), their words drawn afresh."""
    order: list[str | None] = list(ORACLE_ATTRIBUTES)
    if permute:
        rng.shuffle(order)
    for _ in range(filler):  # None: a filler sentence
        order.insert(rng.randrange(1, len(order) + 1), None)
    subj, poss, poss_mid, obj, subj_mid = PRONOUNS[person.pronoun]
    text, facts = "", []
    for i, attr in enumerate(order):
        named = i == 0
        slots = {"S": person.name if named else subj, "P": f"{person.name}'s" if named else poss,
                 "S_": person.name if named else subj_mid, "P_": poss_mid, "O": obj}
        if attr is None:
            template = _fill(rng.choice(FILLER_TEMPLATES), slots)
            sentence = re.sub(r"\{(\w+)\}", lambda m: rng.choice(FILLER_WORDS[m.group(1)]), template)
            text = text + " " + sentence
            continue
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
            text, facts = biography(person, rng, cfg.permute, cfg.filler)
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


def people_entities(corpus: str | Path) -> list[Entity]:
    """The people of a generated corpus as evaluation entities (doc_id = person id = record id)."""
    return [Entity(name=r["title"], title=r["title"], doc_id=r["id"], description="",
                   birth_year=int(r["attributes"]["birth_date"][-4:]), birth_place=r["attributes"]["birth_city"],
                   occupation=r["attributes"]["field"])
            for r in records(corpus).values()]
