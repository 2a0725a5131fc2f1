"""The people a corpus is about: who evaluation prompts ask about, with the facts checked exactly.

    pantheon_people(article_ids)       # wiki2015: Pantheon's birth year, birth place, occupation
    described_people(docs)             # embedded leads: facts parsed from each lead's description
    # synthetic people: lacy.corpus.synthbio.people_entities
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lacy.core.paths import wiki2015_dir


@dataclass
class Entity:
    name: str
    title: str
    doc_id: str
    """Id of the person's own article in the corpus (the knowledge source for verification)."""
    description: str
    birth_year: int | None
    """Negative for BC."""
    birth_place: str | None
    occupation: str | None


# "(1918–2003)", "(c. 1200 – 1253)", "(born 1950)", "(384–322 BC)". Office spans ("from 1260 to 1277",
# "(1988–1990; 1993–1996)") are not life years and are deliberately left unmatched.
_LIFE_YEARS = re.compile(r"\((?:c\.\s*)?(\d{1,4})\s*(BC|BCE|AD|CE)?\s*[–—-]"
                         r"\s*(?:c\.\s*)?\d{1,4}\s*(BC|BCE|AD|CE)?\)"
                         r"|\([Bb]orn:?\s+(?:c\.\s*)?(\d{1,4})\)")
_FUNCTION_WORDS = {"of", "the", "and", "from", "in", "to", "for", "at", "on"}
_PARENS = re.compile(r"\s*\([^()]*\)")


def parse_birth_year(description: str) -> int | None:
    """Birth year from a Wikidata-style description: "American actor (1918–2003)" → 1918."""
    m = _LIFE_YEARS.search(description)
    if not m:
        return None
    if m.group(4):
        return int(m.group(4))
    year = int(m.group(1))
    # "(384–322 BC)": the era after the death year covers both years.
    if m.group(2) in ("BC", "BCE") or (m.group(2) is None and m.group(3) in ("BC", "BCE")):
        year = -year
    return year


def parse_occupation(description: str) -> str | None:
    """Occupation from a description: "French philosopher and writer (1913–1960)" → "philosopher and
    writer". A leading nationality ("French", "Romanian-French") is dropped when a lower-case word
    follows it; titles like "Prime Minister of Pakistan" or "Shah of Iran" are kept whole."""
    text = _PARENS.sub("", description).strip()
    words = text.split()
    if (len(words) >= 2 and words[0][:1].isupper() and words[1][:1].islower()
            and words[1] not in _FUNCTION_WORDS):
        words = words[1:]
    occupation = " ".join(words).strip(" ,;")
    return occupation or None


def pantheon_people(article_ids: set[str]) -> list[Entity]:
    """wiki2015's people (Pantheon 1.0 rows, people.jsonl) whose article is among `article_ids`."""
    path = wiki2015_dir() / "people.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (set $LACY_SHARED?)")
    entities = []
    # Pantheon rows carry a few mis-encoded bytes: replace them rather than reject the row.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                entity = _pantheon_entity(json.loads(line))
                if entity.doc_id in article_ids:
                    entities.append(entity)
    return entities


def described_people(docs: Iterable[dict]) -> list[Entity]:
    """The documents of topic "People" as people, their facts parsed from Wikidata-style descriptions
    ("American actor (1918–2003)"): the embedded leads."""
    return [Entity(name=doc["title"], title=doc["title"], doc_id=doc["id"], description=doc.get("description") or "",
                   birth_year=parse_birth_year(doc.get("description") or ""), birth_place=None,
                   occupation=parse_occupation(doc.get("description") or ""))
            for doc in docs if doc.get("topic") == "People"]


def _pantheon_entity(row: dict) -> Entity:
    """An Entity from a Pantheon 1.0 row: "POLITICIAN", "UNITED STATES", "1809" → readable fields."""
    def clean(key: str) -> str:
        value = str(row.get(key) or "").strip()
        return value.title() if value.isupper() and len(value) > 3 else value  # "UNITED STATES", not "USA"

    year = clean("birthyear")
    birth_year = int(year) if re.fullmatch(r"-?\d+", year) else None
    birth_place = ", ".join(p for p in (clean("birthcity"), clean("countryName")) if p) or None
    occupation = clean("occupation").lower() or None
    born = "" if not year else f"born {-birth_year} BC" if birth_year and birth_year < 0 else f"born {year}"
    details = ", ".join(x for x in (born, birth_place or "") if x)
    description = (occupation or "person") + (f" ({details})" if details else "")
    name = clean("name") or clean("title")
    return Entity(name=name, title=clean("title") or name, doc_id=str(row.get("en_curid", "")),
                  description=description, birth_year=birth_year, birth_place=birth_place,
                  occupation=occupation)
