"""Knowledge store benchmark: build time, size on disk and query latency of the SQLite FTS5 store.

    .venv/bin/python -m bench.knowledge --corpus embedded wiki2015 --queries 300

For each corpus: build the store (or reuse it with --reuse), then time a few hundred queries of three
kinds, all with k=3: a person's name (`search(name)`), a sentence (the first sentence of a random
article) and the strict evaluator's call (`search("born year", k, title=name)`, in one article). The
baseline, in the same run on the same file, is what one does without a full-text index: a `LIKE '%name%'`
scan over every passage (on a handful of names: it is slow). Reported as the ratio of its p50 to FTS5's.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lacy.cascade.knowledge import SqlitePassageStore, build_store, first_sentence
from lacy.core.config import load_config
from lacy.core.paths import REPO_ROOT
from lacy.corpus.corpora import corpus_for


def timed(fn: Callable[[str], object], queries: list[str]) -> np.ndarray:
    """Milliseconds per query."""
    ms = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - start) * 1e3)
    return np.array(ms)


def run(corpus: str, db_dir: Path, passage_words: int, n_queries: int, n_scan: int, reuse: bool,
        seed: int) -> None:
    rng = random.Random(seed)
    db_path = db_dir / f"knowledge-{corpus}-{passage_words}.sqlite"
    source = corpus_for(load_config(None, ["--data.corpus", corpus]))
    docs = list(source.documents())
    if reuse and db_path.exists():
        store = SqlitePassageStore(db_path)
        print(f"[{corpus}] reusing {db_path}: {store.counts()} docs/passages")
    else:
        report = build_store(docs, db_path, passage_words)
        store = SqlitePassageStore(db_path)
        print(f"[{corpus}] build: {report.summary()}  ({report.docs / report.seconds:.0f} docs/s)")
    people = source.people(docs)
    names = [e.name for e in rng.sample(people, min(n_queries, len(people)))]
    sentences = [first_sentence(d["text"])[:300] for d in rng.sample(docs, min(n_queries, len(docs)))]
    titles = [e.title for e in rng.sample(people, min(n_queries, len(people)))]

    hits = sum(p.doc_id == e.doc_id for e in people[:200] for p in store.search(e.name, 1))
    print(f"[{corpus}] name -> own article at rank 1: {hits}/{min(200, len(people))}")
    rows = {
        "search(name, 3)": timed(lambda q: store.search(q, 3), names),
        "search(sentence, 3)": timed(lambda q: store.search(q, 3), sentences),
        "search('born year', 3, title)": timed(lambda q: store.search("born year", 3, title=q), titles),
    }
    scan_db = sqlite3.connect(db_path)
    scan = timed(lambda q: scan_db.execute(
        "SELECT rowid FROM passages WHERE text LIKE ? LIMIT 3", (f"%{q}%",)).fetchall(), names[:n_scan])
    rows[f"baseline: LIKE scan (name), {n_scan} queries"] = scan
    for name, ms in rows.items():
        print(f"[{corpus}] {name:45s} n={len(ms):4d}  p50 {np.percentile(ms, 50):8.2f} ms  "
              f"p99 {np.percentile(ms, 99):8.2f} ms")
    ratio = np.percentile(scan, 50) / np.percentile(rows["search(name, 3)"], 50)
    print(f"[{corpus}] LIKE scan p50 / FTS5 name search p50 = {ratio:.1f}x")
    store.close()
    scan_db.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["embedded", "wiki2015"])
    parser.add_argument("--db-dir", type=Path, default=REPO_ROOT / "runs" / "bench")
    parser.add_argument("--passage-words", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--scan-queries", type=int, default=10, help="names for the LIKE-scan baseline")
    parser.add_argument("--reuse", action="store_true", help="reuse a store built by an earlier run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for corpus in args.corpus:
        run(corpus, args.db_dir, args.passage_words, args.queries, args.scan_queries, args.reuse, args.seed)


if __name__ == "__main__":
    main()
