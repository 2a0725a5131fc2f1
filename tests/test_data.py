"""Corpus readers on real files with bad records, the embedded and wiki2015 corpora, split, entities."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lacy.core.config import load_config
from lacy.corpus.corpora import CorpusError, corpus_for, read_corpus
from lacy.corpus.people import parse_birth_year, parse_occupation
from lacy.corpus.readers import ReadReport, corpus_files, split_of

# Line numbers are 1-based; line 6 is blank (skipped, neither good nor bad).
MIXED_LINES = [
    json.dumps({"id": "a", "title": "A", "text": "First good.", "is_bio": True}),   # 1 good
    '{"id": "b", "text": "broken',                                                 # 2 malformed
    json.dumps(["not", "an", "object"]),                                            # 3 not an object
    json.dumps({"id": "c", "title": "C"}),                                          # 4 missing text
    json.dumps({"id": "d", "text": "   "}),                                         # 5 empty text
    "",                                                                             # 6 blank
    json.dumps({"id": "e", "text": 42}),                                            # 7 non-string text
    json.dumps({"title": "F", "text": "No id here."}),                              # 8 missing id
    json.dumps({"id": 7, "text": "Numeric id, no title. Zoë 北京."}),                # 9 good
]
EXPECTED_BAD = [(2, "malformed JSON"), (3, "not a JSON object"), (4, "missing text"), (5, "empty text"),
                (7, "text is int"), (8, "missing id")]


def write_jsonl(path, lines):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def check_mixed(docs, report, path):
    assert [d["id"] for d in docs] == ["a", "7"]
    assert docs[0] == {"id": "a", "title": "A", "text": "First good.", "is_bio": True}
    assert docs[1]["title"] == "" and docs[1]["text"] == "Numeric id, no title. Zoë 北京."
    rep = report.files[str(path)]
    assert (rep.good, rep.bad) == (2, 6)
    assert [n for n, _ in rep.reasons] == [n for n, _ in EXPECTED_BAD]
    for (_, reason), (_, expected) in zip(rep.reasons, EXPECTED_BAD, strict=True):
        assert reason.startswith(expected), reason


@pytest.mark.parametrize("name", ["mixed.jsonl", "mixed.jsonl.gz"])
def test_jsonl_bad_lines_are_reported_and_good_neighbours_kept(tmp_path, name):
    path = write_jsonl(tmp_path / name, MIXED_LINES)
    report = ReadReport()
    docs = list(read_corpus(str(path), report=report))
    check_mixed(docs, report, path)
    assert (report.total_good, report.total_bad) == (2, 6)
    summary = report.summary()
    assert "2 good, 6 bad records in 1 file(s)" in summary and "line 2: malformed JSON" in summary
    assert "... and 1 more" in summary
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["files"][str(path)]["reasons"][0][0] == 2 and as_dict["total_bad"] == 6


def test_min_chars_rejects_short_texts(tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", MIXED_LINES)
    report = ReadReport()
    assert [d["id"] for d in read_corpus(str(path), report=report, min_chars=12)] == ["7"]
    assert report.files[str(path)].reasons[0] == (1, "text shorter than 12 characters")


def test_truncated_gzip_keeps_the_lines_before(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": f"document {i} " * 50}) for i in range(2000)]
    full = write_jsonl(tmp_path / "full.jsonl.gz", lines).read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    report = ReadReport()
    docs = list(read_corpus(str(path), report=report))
    rep = report.files[str(path)]
    assert 0 < len(docs) < 2000 and [d["id"] for d in docs] == [f"d{i}" for i in range(len(docs))]
    assert rep.bad == 1 and rep.reasons[0][0] == len(docs) + 1
    assert rep.reasons[0][1].startswith("unreadable from here on: EOFError")


def test_invalid_utf8_line_is_one_bad_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"id": "x", "text": "ok"}\n'
                     b'{"id": "y", "text": "\xff\xfe"}\n'
                     b'{"id": "z", "text": "ok"}\n')
    report = ReadReport()
    assert [d["id"] for d in read_corpus(str(path), report=report)] == ["x", "z"]
    assert report.files[str(path)].reasons[0][0] == 2


def test_parquet_by_batches_with_bad_rows(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": [f"p{i}" for i in range(2500)],
                      "title": [f"T{i}" for i in range(2500)],
                      "text": [None if i in (5, 2001) else f"text {i}" for i in range(2500)],
                      "split_hint": ["x"] * 2500})
    pq.write_table(table, path, row_group_size=700)
    report = ReadReport()
    docs = list(read_corpus(str(path), report=report))
    assert len(docs) == 2498 and docs[0] == {"id": "p0", "title": "T0", "text": "text 0", "split_hint": "x"}
    assert report.files[str(path)].reasons == [(6, "missing text"), (2002, "missing text")]


def test_directory_and_glob_read_sorted_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl.gz", [json.dumps({"id": "b1", "text": "B"})])
    write_jsonl(tmp_path / "a.jsonl", [json.dumps({"id": f"a{i}", "text": "A"}) for i in (1, 2)])
    pq.write_table(pa.table({"id": ["c1"], "text": ["C"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [d["id"] for d in read_corpus(str(tmp_path))] == ["a1", "a2", "b1", "c1"]
    assert [d["id"] for d in read_corpus(str(tmp_path / "*.jsonl*"))] == ["a1", "a2", "b1"]
    report = ReadReport()
    assert [d["id"] for d in read_corpus(str(tmp_path), report=report, max_docs=3)] == ["a1", "a2", "b1"]
    assert report.total_good == 3 and str(tmp_path / "c.parquet") not in report.files
    assert [p.name for p in corpus_files(tmp_path)] == ["a.jsonl", "b.jsonl.gz", "c.parquet"]


def test_reading_streams_line_by_line(tmp_path):
    """The first document arrives while the writer still holds back the rest (a FIFO never ends early)."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    release = threading.Event()

    def writer():
        with open(fifo, "w") as f:
            f.write(json.dumps({"id": "first", "text": "one"}) + "\n")
            f.flush()
            release.wait(10)
            f.write(json.dumps({"id": "second", "text": "two"}) + "\n")

    thread = threading.Thread(target=writer, daemon=True)  # never keeps pytest alive if reading fails
    thread.start()
    docs = read_corpus(str(fifo))
    try:
        assert next(docs)["id"] == "first"
        assert not release.is_set()
    finally:
        release.set()
    assert [d["id"] for d in docs] == ["second"]
    thread.join()


def test_missing_or_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_corpus(str(tmp_path / "nope.jsonl"))  # raised on the call, before any iteration
    with pytest.raises(FileNotFoundError, match="matches no"):
        list(read_corpus(str(tmp_path / "*.jsonl")))
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        list(read_corpus(str(tmp_path)))
    (tmp_path / "data.csv").write_text("id,text\n")
    with pytest.raises(ValueError, match="unsupported corpus file .*data.csv"):
        list(read_corpus(str(tmp_path / "data.csv")))
    write_jsonl(tmp_path / "a.jsonl", MIXED_LINES)
    files = corpus_for(load_config(None, ["--data.corpus", str(tmp_path / "a.jsonl")]))
    with pytest.raises(CorpusError, match="names no people to evaluate"):
        files.people(list(files.documents()))


def people_of(name: str) -> list:
    corpus = corpus_for(load_config(None, ["--data.corpus", name]))
    return corpus.people(list(corpus.documents()))


def test_embedded_corpus(embedded_docs):
    assert len(embedded_docs) == 300
    ids = [d["id"] for d in embedded_docs]
    assert len(set(ids)) == 300 and ids == ["ovos:" + d["title"] for d in embedded_docs]
    music = next(d for d in read_corpus("embedded") if d["title"] == "20th-century classical music")
    assert music["text"].startswith("20th-century classical music is Western art music")
    assert music["description"] == "Art movement" and music["topic"] == "Arts"
    report = ReadReport()
    assert sum(1 for _ in read_corpus("embedded", report=report)) == 10033 == report.total_good
    # The file is grouped by topic; the hashed order makes a prefix a mix of topics, people included.
    topics = {d["topic"] for d in embedded_docs}
    assert "People" in topics and len(topics) >= 5
    assert [d["id"] for d in read_corpus("embedded", max_docs=300)] == ids  # stable


def test_wiki2015_streams_its_shards():
    report = ReadReport()
    docs = list(read_corpus("wiki2015", report=report, max_docs=20))
    assert len(docs) == 20 and len(report.files) == 1
    assert next(iter(report.files)).endswith("articles-00000-of-00006.jsonl.gz")
    assert all(d["id"].isdigit() and d["title"] and len(d["text"]) >= 200 for d in docs)
    assert all(isinstance(d["is_bio"], bool) for d in docs)


def test_split_is_a_stable_hash():
    def expected(doc_id, fraction):
        h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big")
        return "val" if h / 2**64 < fraction else "train"

    ids = [f"doc-{i}" for i in range(4000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [expected(i, 0.1) for i in ids]
    assert 300 < splits.count("val") < 500  # ≈ 400 expected, binomial sd ≈ 19
    assert {split_of(i, 0.0) for i in ids} == {"train"}
    # Monotone in the fraction: a val document stays val when the fraction grows.
    assert all(split_of(i, 0.2) == "val" for i, s in zip(ids, splits, strict=True) if s == "val")


def test_description_parsing():
    assert parse_birth_year("American actor (1918–2003)") == 1918
    assert parse_birth_year("American basketball player (born 1984)") == 1984
    assert parse_birth_year("Belarusian journalist (Born: 1948)") == 1948
    assert parse_birth_year("Dutch humanist (c. 1466–1536)") == 1466
    assert parse_birth_year("Greek philosopher (384–322 BC)") == -384
    assert parse_birth_year("Japanese Zen buddhist teacher (1200-1253)") == 1200
    assert parse_birth_year("Sultan of Egypt and Syria from 1260 to 1277") is None
    assert parse_birth_year("Prime Minister of Japan (2006–2007; 2012–2020)") is None
    assert parse_occupation("French philosopher and writer (1913–1960)") == "philosopher and writer"
    assert parse_occupation("Romanian-French playwright (1909–1994)") == "playwright"
    office = "Prime Minister of Pakistan"
    assert parse_occupation(f"{office} (1988–1990; 1993–1996)") == office
    assert parse_occupation("Shah of Iran from 1587 to 1629") == "Shah of Iran from 1587 to 1629"
    assert parse_occupation("") is None


def test_embedded_entities():
    people = people_of("embedded")
    assert len(people) == 1828
    aalto = next(e for e in people if e.title == "Alvar Aalto")
    assert (aalto.doc_id, aalto.birth_year, aalto.occupation, aalto.birth_place) == (
        "ovos:Alvar Aalto", 1898, "architect and designer", None)
    assert aalto.description == "Finnish architect and designer (1898–1976)"
    assert sum(e.birth_year is not None for e in people) > 1200


@pytest.mark.slow
def test_wiki2015_entities_match_articles():
    people = people_of("wiki2015")
    assert len(people) == 2480
    lincoln = next(e for e in people if e.name == "Abraham Lincoln")
    assert (lincoln.doc_id, lincoln.birth_year, lincoln.birth_place, lincoln.occupation) == (
        "307", 1809, "Hodgenville, United States", "politician")
    aristotle = next(e for e in people if e.name == "Aristotle")
    assert aristotle.birth_year == -384 and "born 384 BC" in aristotle.description
    article_ids = {d["id"] for d in read_corpus("wiki2015")}
    assert all(e.doc_id in article_ids for e in people)
