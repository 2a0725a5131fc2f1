"""Knowledge store: SQLite FTS5 passages, BM25 (what the retrieval big model and the strict evaluator read).

The big model of the cascade knows some facts and misses others; giving it the passages of the
request's topic (the person's own article) in its context is the cheap way to make its answers right.

    build_store("wiki2015", "runs/wiki2015.sqlite", passage_words=100)           # once, ~1-2 min
    store = SqlitePassageStore("runs/wiki2015.sqlite")
    store.search("Dmitri Mendeleev periodic table", k=3)                      # -> [Passage, ...]
    # the big model reads it: lacy.cascade.big.Retrieval

Passages: each document's text is cut into consecutive, non-overlapping windows of `passage_words`
whitespace-separated words (the passage text is the exact slice of the document, so `start_char`
points back into it). Non-overlapping keeps the index at one copy of the corpus; a fact cut by a window
border is still found because retrieval hands the model several passages. The title is a separate,
more heavily weighted FTS column of every passage, so name queries find the article's passages.

Queries are never FTS5 syntax: `match_terms` keeps the words of the query, quotes each one and joins
them with OR, so quotes, `*`, `NEAR`, brackets or column filters in user text are just words.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Words of a query: runs of letters/digits (underscore is a separator, like FTS5's unicode61).
_WORD = re.compile(r"[^\W_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
# The most frequent English words: OR-ing them in matches nearly every passage, which costs a scan of
# huge posting lists and adds nothing to BM25's ranking. Dropped unless a query has nothing else.
_STOPWORDS = frozenset(
    "a an and are as at be by for from has he her his in is it its of on or she that the their "
    "they this to was were which who with".split())
MAX_QUERY_TERMS = 32
"""Terms kept per query (the first ones): bounds latency for arbitrarily long queries."""
MIN_QUERY_TERMS = 4
"""Common words are dropped from a query only down to this many terms (names are never cut)."""
TITLE_WEIGHT, TEXT_WEIGHT = 2.0, 1.0
"""BM25 column weights: a query word in the title counts twice as much as one in the text."""
_INSERT_BATCH = 500


class KnowledgeError(ValueError):
    """A document or store is unusable; the message names the document or file."""


@dataclass(frozen=True)
class Passage:
    doc_id: str
    title: str
    text: str
    start_char: int
    """Offset of `text` in its document's text."""
    score: float
    """Relevance, higher is better (negated BM25); 0.0 where no query ranked it."""


class KnowledgeStore(Protocol):
    """What the cascade and the evaluator need from a passage store.

    `SqlitePassageStore` is the embedded default (one file, no server). On a cluster a server engine
    (OpenSearch, Postgres full-text search) can stand in by implementing these three methods.
    """

    def search(self, query: str, k: int, title: str | None = None) -> list[Passage]:
        """Top-`k` passages for free text, best first; `title` restricts to that article."""
        ...

    def passages_of(self, doc_id: str) -> list[Passage]:
        """All passages of one document in text order (empty if unknown)."""
        ...


def match_terms(query: str, max_terms: int = MAX_QUERY_TERMS) -> list[str]:
    """The query's distinct lower-cased words, stopwords dropped unless nothing else is left."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    content = [w for w in words if w not in _STOPWORDS]
    return (content or words)[:max_terms]


def _fts_or(terms: list[str]) -> str:
    # Every term is a quoted FTS5 string; `_WORD` never yields `"`, but escape it anyway (doubling)
    # so this stays safe if the word pattern changes.
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def split_passages(text: str, passage_words: int) -> list[tuple[int, str]]:
    """(start_char, passage text) windows of `passage_words` words, exact slices of `text`."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    windows = []
    for i in range(0, len(spans), passage_words):
        chunk = spans[i:i + passage_words]
        windows.append((chunk[0][0], text[chunk[0][0]:chunk[-1][1]]))
    return windows


def _check_doc(doc: object, position: int) -> tuple[str, str, str]:
    if not isinstance(doc, dict):
        raise KnowledgeError(f"document #{position}: expected a dict, got {type(doc).__name__}")
    doc_id, title, text = doc.get("id"), doc.get("title", ""), doc.get("text")
    if not isinstance(doc_id, str) or not doc_id:
        raise KnowledgeError(f"document #{position}: 'id' must be a non-empty string, got {doc_id!r}")
    if not isinstance(text, str):
        raise KnowledgeError(f"document #{position} (id {doc_id!r}): 'text' must be a string")
    if not isinstance(title, str):
        raise KnowledgeError(f"document #{position} (id {doc_id!r}): 'title' must be a string")
    return doc_id, title, text


@dataclass
class AddReport:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    passages: int = 0
    """Passages written by this call."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, title TEXT NOT NULL, text_sha1 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS docs_title ON docs (title COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS passage_rows (rowid INTEGER PRIMARY KEY, doc_id TEXT NOT NULL,
                                         start_char INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS passage_rows_doc ON passage_rows (doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5 (title, text,
                                                       tokenize = 'unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS passage_terms USING fts5vocab (passages, row);
"""


class SqlitePassageStore:
    """Passages in one SQLite file: FTS5 table `passages` (title, text) for BM25, `passage_rows`
    (rowid -> doc_id, start_char) and `docs` (doc_id -> title, text hash) for updates by id.

    Open an existing store with `SqlitePassageStore(path)`; create one with `passage_words` given.
    Query words found in more than `common_share` of all passages are left out of a query that has
    rarer ones: their BM25 weight is small, and scoring their long posting lists is what makes
    sentence queries slow (on wiki2015, 0.5% instead of 2% made them 4x faster, same top hits).
    """

    def __init__(self, db_path: str | Path, passage_words: int | None = None,
                 common_share: float = 0.005) -> None:
        if not 0.0 < common_share <= 1.0:
            raise KnowledgeError(f"common_share must be in (0, 1], got {common_share}")
        self.common_share = common_share
        self._doc_freq: dict[str, int] = {}  # passages per term, cached until the next add()
        self._n_passages: int | None = None
        self.db_path = Path(db_path)
        exists = self.db_path.exists()
        if not exists and passage_words is None:
            raise KnowledgeError(f"{self.db_path}: no such store (give passage_words to create one)")
        if not exists:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # Shared by threads (Serve replicas): the sqlite3 module serialises calls on a connection.
        self._db = sqlite3.connect(self.db_path, check_same_thread=False)
        try:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'passage_words'").fetchone()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise KnowledgeError(f"{self.db_path}: not a passage store ({exc})") from exc
        if row is None:
            if passage_words is None or passage_words <= 0:
                raise KnowledgeError(f"{self.db_path}: passage_words must be positive, got {passage_words}")
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('passage_words', ?)", (str(passage_words),))
            row = (str(passage_words),)
        self.passage_words = int(row[0])
        if passage_words is not None and passage_words != self.passage_words:
            raise KnowledgeError(f"{self.db_path}: built with passage_words={self.passage_words}, "
                                 f"asked for {passage_words}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqlitePassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # Writing

    def add(self, docs: Iterable[dict]) -> AddReport:
        """Insert new documents and replace changed ones (same id, different title or text).

        Written in transactions of a few hundred documents. A malformed document raises
        `KnowledgeError` naming it, after everything before it has been committed.
        """
        report = AddReport()
        db = self._db
        self._doc_freq.clear()
        self._n_passages = None
        pending = 0
        try:
            for position, doc in enumerate(docs):
                doc_id, title, text = _check_doc(doc, position)
                digest = hashlib.sha1(f"{title}\0{text}".encode()).hexdigest()
                old = db.execute("SELECT text_sha1 FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
                if old is not None and old[0] == digest:
                    report.unchanged += 1
                    continue
                if old is not None:
                    self._delete(doc_id)
                    report.replaced += 1
                else:
                    report.added += 1
                db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (doc_id, title, digest))
                for start, chunk in split_passages(text, self.passage_words):
                    cur = db.execute("INSERT INTO passages (title, text) VALUES (?, ?)", (title, chunk))
                    db.execute("INSERT INTO passage_rows VALUES (?, ?, ?)", (cur.lastrowid, doc_id, start))
                    report.passages += 1
                pending += 1
                if pending >= _INSERT_BATCH:
                    db.commit()
                    pending = 0
        finally:
            db.commit()  # good documents before a bad one are kept
        return report

    def _delete(self, doc_id: str) -> None:
        rowids = [r[0] for r in self._db.execute(
            "SELECT rowid FROM passage_rows WHERE doc_id = ?", (doc_id,))]
        self._db.executemany("DELETE FROM passages WHERE rowid = ?", [(r,) for r in rowids])
        self._db.execute("DELETE FROM passage_rows WHERE doc_id = ?", (doc_id,))
        self._db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))

    def optimize(self) -> None:
        """Merge the FTS5 index segments (after a bulk build: smaller file, faster queries)."""
        with self._db:
            self._db.execute("INSERT INTO passages (passages) VALUES ('optimize')")

    # ------------------------------------------------------------------------------------------
    # Reading

    def counts(self) -> tuple[int, int]:
        """(documents, passages)."""
        docs = self._db.execute("SELECT count(*) FROM docs").fetchone()[0]
        passages = self._db.execute("SELECT count(*) FROM passage_rows").fetchone()[0]
        return docs, passages

    def doc_ids(self, title: str) -> list[str]:
        """Ids of the documents with this title (case-insensitive)."""
        return [r[0] for r in self._db.execute(
            "SELECT doc_id FROM docs WHERE title = ? COLLATE NOCASE ORDER BY doc_id", (title,))]

    def passages_of(self, doc_id: str) -> list[Passage]:
        rows = self._db.execute(
            "SELECT r.doc_id, p.title, p.text, r.start_char FROM passage_rows r "
            "JOIN passages p ON p.rowid = r.rowid WHERE r.doc_id = ? ORDER BY r.start_char", (doc_id,))
        return [Passage(d, t, x, s, 0.0) for d, t, x, s in rows]

    def search(self, query: str, k: int, title: str | None = None) -> list[Passage]:
        """Top-`k` passages by BM25 over title and text. With `title`, only passages of the articles
        with exactly that title (case-insensitive) are ranked. Never raises on the query's content."""
        if k <= 0:
            return []
        if title is None:
            terms = self._informative(match_terms(query))
            return self._ranked(_fts_or(terms), k, doc_ids=None) if terms else []
        return self._search_in(self.doc_ids(title), query, k)

    def _informative(self, terms: list[str]) -> list[str]:
        """`terms` less the most common ones (in more than `common_share` of passages), keeping at
        least `MIN_QUERY_TERMS`: short queries such as names are never cut."""
        if len(terms) <= MIN_QUERY_TERMS:
            return terms
        missing = [t for t in terms if t not in self._doc_freq]
        if missing:
            self._doc_freq.update({t: 0 for t in missing})
            self._doc_freq.update(self._db.execute(
                f"SELECT term, doc FROM passage_terms WHERE term IN ({','.join('?' * len(missing))})",
                missing))
        if self._n_passages is None:
            self._n_passages = self.counts()[1]
        limit = self.common_share * self._n_passages
        dropped: set[str] = set()
        for term in sorted(terms, key=self._doc_freq.__getitem__, reverse=True):  # most common first
            if len(terms) - len(dropped) <= MIN_QUERY_TERMS or self._doc_freq[term] <= limit:
                break
            dropped.add(term)
        kept = [t for t in terms if t not in dropped]
        # Keep everything unless a kept word is known to occur: a word missing from the vocabulary
        # may only be spelled differently there (diacritics folded by the tokenizer).
        return kept if any(self._doc_freq[t] > 0 for t in kept) else terms

    def _search_in(self, doc_ids: list[str], query: str, k: int) -> list[Passage]:
        terms = match_terms(query)
        if not doc_ids or not terms or k <= 0:
            return []
        return self._ranked(_fts_or(terms), k, doc_ids=doc_ids)

    def _ranked(self, match: str, k: int, doc_ids: list[str] | None) -> list[Passage]:
        select = "SELECT r.doc_id, p.title, p.text, r.start_char, bm25(passages, ?, ?) AS score "
        args: list = [TITLE_WEIGHT, TEXT_WEIGHT]
        if doc_ids is None:
            sql = select + "FROM passages p JOIN passage_rows r ON r.rowid = p.rowid WHERE passages MATCH ?"
            args.append(match)
        else:
            # Walk the article's few passages and test each by rowid (CROSS JOIN fixes that order),
            # instead of filtering every passage of the corpus that matches the query.
            marks = ",".join("?" * len(doc_ids))
            sql = select + (f"FROM passage_rows r CROSS JOIN passages p WHERE r.doc_id IN ({marks}) "
                            "AND p.rowid = r.rowid AND passages MATCH ?")
            args += [*doc_ids, match]
        sql += " ORDER BY score, r.doc_id, r.start_char LIMIT ?"
        rows = self._db.execute(sql, [*args, k]).fetchall()
        return [Passage(d, t, x, s, -score) for d, t, x, s, score in rows]


# ----------------------------------------------------------------------------------------------
# Building


@dataclass
class BuildReport:
    docs: int
    passages: int
    seconds: float
    bytes: int
    """Size of the database file."""

    def summary(self) -> str:
        return (f"{self.docs} docs, {self.passages} passages, {self.seconds:.1f} s, "
                f"{self.bytes / 2**20:.1f} MiB")


def build_store(docs: Iterable[dict], db_path: str | Path, passage_words: int) -> BuildReport:
    """Build a fresh store of `docs` ({id, title, text}: a corpus' `knowledge_documents`).

    Written to a temporary file beside `db_path` and renamed over it only when complete, so a failed
    build never damages an existing store. Open it afterwards with `SqlitePassageStore(db_path)`.
    """
    if passage_words <= 0:
        raise KnowledgeError(f"passage_words must be positive, got {passage_words}")
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=db_path.name + ".", suffix=".building", dir=db_path.parent)
    os.close(fd)
    os.unlink(tmp)  # sqlite creates it; mkstemp only reserved a unique name
    try:
        with SqlitePassageStore(tmp, passage_words) as store:
            store._db.execute("PRAGMA synchronous = OFF")  # a crash loses only the temp file
            store.add(docs)
            store.optimize()
            n_docs, n_passages = store.counts()
        os.replace(tmp, db_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BuildReport(n_docs, n_passages, time.perf_counter() - start, db_path.stat().st_size)


def first_sentence(text: str) -> str:
    """Text up to the first sentence end (., ! or ? followed by whitespace), else all of it."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
