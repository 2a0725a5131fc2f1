"""The people a corpus is about: who evaluation prompts ask about, with the facts checked exactly.

    pantheon_people(article_ids)       # wiki2015: Pantheon's birth year, birth place, occupation
    described_people(docs)             # embedded leads: facts parsed from each lead's description
    # synthetic people: lacy.corpus.synthbio.people_entities
    listed_people("prompt_entities.txt")   # a user's list (FActScore's): names only, facts in their articles
    knowledge_file("knowledge.jsonl")      # their articles, {title, text} per line
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# A user's people and their articles (FActScore's formats)


class PeopleFileError(ValueError):
    """A people or knowledge file that cannot be read as one; the message names the file, line and field."""


def listed_people(path: str | Path) -> list[Entity]:
    """The people of a user's list, in its order, each once: one name per line (FActScore's
    prompt_entities.txt; blank lines skipped) or, for a .jsonl file, a JSON object with `topic` per line.
    Their facts are known only from their articles (no attributes)."""
    path = Path(path)
    if not path.is_file():
        raise PeopleFileError(f"eval.people_file: no such file {path}")
    names: list[str] = []
    for no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        name = line.strip()
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PeopleFileError(f"eval.people_file: {path}:{no} is not JSON ({err})") from None
            name = record.get("topic") if isinstance(record, dict) else None
            if not isinstance(name, str) or not name.strip():
                raise PeopleFileError(f"eval.people_file: {path}:{no} has no `topic` string")
            name = name.strip()
        if name not in names:
            names.append(name)
    if not names:
        raise PeopleFileError(f"eval.people_file: {path} names nobody")
    return [Entity(name=n, title=n, doc_id=n, description="", birth_year=None, birth_place=None, occupation=None)
            for n in names]


def knowledge_file(path: str | Path) -> list[dict]:
    """The articles of a JSONL file of {title, text} (FActScore's knowledge source as documents) as
    documents {id: "knowledge:<title>", title, text}; documents sharing a title are one article."""
    path = Path(path)
    if not path.is_file():
        raise PeopleFileError(f"eval.knowledge_file: no such file {path}")
    texts: dict[str, list[str]] = {}
    with path.open(encoding="utf-8-sig") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PeopleFileError(f"eval.knowledge_file: {path}:{no} is not JSON ({err})") from None
            title, text = (record.get("title"), record.get("text")) if isinstance(record, dict) else (None, None)
            if not (isinstance(title, str) and title.strip() and isinstance(text, str) and text.strip()):
                raise PeopleFileError(f"eval.knowledge_file: {path}:{no} needs a non-empty `title` and `text`")
            texts.setdefault(title.strip(), []).append(text.strip())
    return [{"id": f"knowledge:{title}", "title": title, "text": "\n\n".join(parts)} for title, parts in texts.items()]


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for no file): what a cached result read from it depends on."""
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()
