"""The big model, one interface: continue a batch of texts, each cut at a unit, with token counts.

    big = build_big(cfg)                                  # from cfg.big: backend, path, retrieval store
    replies = big.continue_batch([BigCall("req-1", "Marie Curie was born in", unit="word")])
    replies[0].result().text                              # " Warsaw" (raises the call's BigModelError)
    session = BigSession(big, retrieval=True)             # what a Cascade calls, for one request
    session.continue_text("Anna Keller was born on", topic="Anna Keller")

A `BigCall` belongs to a session (one request: its KV cache, its retrieved context) and may ask for
retrieval, in which case `topic` names what to read about; the backend answers every call of a batch
with a `BigReply`, one call's failure never failing the others. Backends: `lacy.cascade.hf_big.HFBig`
(a local Hugging Face causal LM, batched with KV caches kept per session), wrapped by
`lacy.cascade.retrieval.Retrieval` when a knowledge store exists; `lacy.serve.remote.HandleBig` is the
same interface over a Ray Serve deployment. A new backend is one file with a class that has
`from_config(cfg, device)` and these three methods, named in `lacy.core.config.BIG_BACKENDS`.

Retrieval (`Retrieval`, any backend): the context of a retrieval call is the top `knowledge.top_k`
passages for its topic, retrieved once per topic of a session and kept, so consecutive calls of one
request share a context prefix and a backend's KV cache stays valid. Query policy:
  - "topic": the topic is a title or name given by the caller. The passages are the lead (first
    passage) of the article with that title, then its best BM25 passages for the topic words, topped
    up from the whole store. The lead comes first because Wikipedia leads hold the defining facts
    (dates, places), while BM25 for a name inside the person's own article only prefers passages that
    repeat the surname. No topic, no retrieval.
  - "first_sentence": without a caller topic, the first sentence of the text being continued; a text
    that does not extend the session's previous one starts a new topic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lacy.cascade.knowledge import KnowledgeError, KnowledgeStore, Passage, SqlitePassageStore, first_sentence
from lacy.core import storage
from lacy.core.config import BIG_BACKENDS, UNITS, KnowledgeConfig, LacyConfig


class BigModelError(RuntimeError):
    """The big model failed (raised, or returned something other than text) during a call."""


class BigUnavailable(BigModelError):
    """The big model does not answer (its replica is gone, or it timed out): a service answers 503."""


class BigRequestError(BigModelError):
    """The big model refused a call for a reason of the request's own (a service answers 400)."""


class BigSlow(BigModelError):
    """No answer within the wait the call's caller allowed (`BigCall.wait_s`): the model may be up but
    busy, so it is not marked down; the caller goes on without it (a small-only answer)."""


@dataclass(frozen=True)
class BigCall:
    """One continuation asked of the big model."""

    session: str
    """The request it belongs to: a backend may keep its KV cache and retrieved context between calls."""
    text: str
    """The text so far (prompt and everything written), to be continued."""
    unit: str = "word"
    """Where the reply ends: one word, one entity (capitalised or numeric words), or `max_tokens` tokens."""
    max_tokens: int = 8
    """Most tokens of the reply."""
    retrieval: bool = False
    """Put the knowledge store's passages for `topic` before the text (`lacy.cascade.retrieval`)."""
    topic: str | None = None
    """What retrieval reads about (a title or a name); ignored without retrieval."""
    context: str = ""
    """Text placed verbatim before `text` (what retrieval fills in)."""
    sent: float = 0.0
    """time.time() when the caller sent it (0: unknown): a backend's waiting-time statistics."""
    wait_s: float | None = None
    """The most its caller waits for the reply (None: the backend's own timeout). A backend that waits
    on a remote model (`lacy.serve.remote.HandleBig`) answers `BigSlow` after that long."""

    def check(self) -> None:
        """BigRequestError unless the unit and token budget are ones a backend can honour."""
        if self.unit not in UNITS or self.max_tokens <= 0:
            raise BigRequestError(f"bad unit/max_tokens {self.unit!r}/{self.max_tokens}; units: {UNITS}")


@dataclass
class BigReply:
    """The big model's answer to one call: its text and token counts, or why there is none."""

    text: str = ""
    processed: int = 0
    """Tokens the big model read for this call (the new part of its context and text)."""
    generated: int = 0
    """Tokens it wrote."""
    error: str | None = None
    """What went wrong (never an internal detail); None when `text` is the answer."""
    status: int = 200
    """200; 400 (the call's own fault), 500 (the model failed), 503 (the model does not answer), 504
    (no answer within the caller's `wait_s`)."""

    @classmethod
    def failure(cls, err: BaseException) -> BigReply:
        """A failed call's reply: a BigModelError keeps its message (ours, written for clients), anything
        else (an internal detail) becomes a generic one."""
        if isinstance(err, BigRequestError):
            return cls(error=str(err), status=400)
        if isinstance(err, BigUnavailable):
            return cls(error=str(err), status=503)
        if isinstance(err, BigSlow):
            return cls(error=str(err), status=504)
        return cls(error=str(err) if isinstance(err, BigModelError) else "the big model failed on this call",
                   status=500)

    def result(self) -> BigReply:
        """This reply, or its failure raised as the BigModelError the cascade reports."""
        if self.error is not None:
            raise {400: BigRequestError, 503: BigUnavailable, 504: BigSlow}.get(self.status, BigModelError)(self.error)
        return self


class BigModel(Protocol):
    """What every big-model backend does."""

    def continue_batch(self, calls: Sequence[BigCall], cancel: threading.Event | None = None) -> list[BigReply]:
        """One reply per call, in order; greedy. `cancel`, once set, abandons waiting (a client left)."""
        ...

    def end_session(self, session: str) -> None:
        """Forget what is kept for `session` (its request is done)."""
        ...

    def health(self, timeout_s: float) -> dict:
        """What the backend is (parameters, device, ...), or an exception when it does not answer."""
        ...


class BigSession:
    """One request's view of a big model: what a `lacy.cascade.engine.Cascade` calls, one call at a time.

    `waiting` is entered while a call runs (a server's small-model batcher pauses this request meanwhile);
    `wait_s` bounds how long each call is waited for (`BigCall.wait_s`)."""

    def __init__(self, big: BigModel, *, retrieval: bool = False, cancel: threading.Event | None = None,
                 waiting: Callable[[], Any] = contextlib.nullcontext, session: str | None = None,
                 wait_s: float | None = None) -> None:
        self.big, self.retrieval, self.cancel, self.waiting = big, retrieval, cancel, waiting
        self.wait_s = wait_s
        self.id = session or uuid.uuid4().hex
        self.tokens_processed = 0
        self.tokens_generated = 0

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8, topic: str | None = None) -> str:
        """The big model's continuation of `text` (BigModelError when it has none)."""
        with self.waiting():
            (reply,) = self.big.continue_batch([self.call(text, unit, max_tokens, topic)], self.cancel)
        return self.take(reply)

    def call(self, text: str, unit: str = "word", max_tokens: int = 8, topic: str | None = None) -> BigCall:
        """This session's call to continue `text` (to send with other sessions' in one batch)."""
        return BigCall(self.id, text, unit, max_tokens, self.retrieval, topic, wait_s=self.wait_s)

    def take(self, reply: BigReply) -> str:
        """The words of a reply to one of this session's calls, its tokens counted (BigModelError if none)."""
        reply.result()
        self.tokens_processed += reply.processed
        self.tokens_generated += reply.generated
        return reply.text

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a backend that is gone has forgotten the session anyway
            self.big.end_session(self.id)


# ----------------------------------------------------------------------------------------------
# Retrieval: any backend reading the knowledge store


def format_passages(passages: list[Passage], passage_chars: int | None = None) -> str:
    """Passages as context: "Title: text" blocks separated by blank lines, ending in a blank line.
    `passage_chars` cuts each passage at the last word border before that many characters."""
    blocks = []
    for p in passages:
        text = p.text
        if passage_chars is not None and len(text) > passage_chars:
            cut = text[:passage_chars]
            text = cut.rsplit(None, 1)[0] if " " in cut.strip() else cut
        blocks.append(f"{p.title}: {text}")
    return "".join(b + "\n\n" for b in blocks)


class Reader:
    """What one session has retrieved: the passages of its current topic, as context."""

    def __init__(self, store: KnowledgeStore, top_k: int, passage_chars: int | None = None,
                 query: str = "topic") -> None:
        if top_k <= 0:
            raise KnowledgeError(f"top_k must be positive, got {top_k}")
        if passage_chars is not None and passage_chars <= 0:
            raise KnowledgeError(f"passage_chars must be positive or None, got {passage_chars}")
        if query not in ("topic", "first_sentence"):
            raise KnowledgeError(f"query policy must be 'topic' or 'first_sentence', got {query!r}")
        self.store, self.top_k, self.passage_chars, self.query = store, top_k, passage_chars, query
        self.topic: str | None = None
        self.passages: list[Passage] = []
        self.retrievals = 0
        """How many times the store was queried (one per topic change)."""
        self._context = ""
        self._last_text: str | None = None
        self._caller_topic = False

    def set_topic(self, topic: str | None) -> None:
        """Retrieve for `topic` (a title, name or sentence) unless it is already the current one."""
        self._caller_topic = topic is not None
        if topic == self.topic:
            return
        self.topic = topic
        self.passages = self._retrieve(topic) if topic else []
        self._context = format_passages(self.passages, self.passage_chars)

    def _retrieve(self, topic: str) -> list[Passage]:
        self.retrievals += 1
        candidates: list[Passage] = []
        if self.query == "topic":
            in_article = self.store.search(topic, self.top_k, title=topic)
            if in_article:
                candidates = self.store.passages_of(in_article[0].doc_id)[:1] + in_article
        candidates += self.store.search(topic, self.top_k)
        passages, seen = [], set()
        for p in candidates:
            if (p.doc_id, p.start_char) not in seen:
                seen.add((p.doc_id, p.start_char))
                passages.append(p)
        return passages[:self.top_k]

    def context_for(self, text: str, topic: str | None = None) -> str:
        """The context of a call that continues `text` (retrieving first if the topic changed)."""
        if topic is not None:
            self.set_topic(topic)
        elif self.query == "first_sentence" and not self._caller_topic:
            same_request = self._last_text is not None and text.startswith(self._last_text)
            if not same_request:
                self.set_topic(first_sentence(text) or None)
                self._caller_topic = False
        self._last_text = text
        return self._context


class Retrieval:
    """A `BigModel` whose retrieval calls get the knowledge store's passages as context, answered by
    `inner` (any backend); calls without retrieval pass through unchanged."""

    def __init__(self, inner: BigModel, store: KnowledgeStore, cfg: KnowledgeConfig, max_sessions: int = 4096) -> None:
        Reader(store, cfg.top_k, cfg.passage_chars, cfg.query)  # the settings are checked here, once
        self.inner, self.store, self.cfg, self.max_sessions = inner, store, cfg, max_sessions
        self.readers: OrderedDict[str, Reader] = OrderedDict()
        self._lock = threading.Lock()  # sessions of concurrent requests come from several threads

    def reader(self, session: str) -> Reader:
        """The session's reader (created on first use; the least recently used dropped past max_sessions)."""
        with self._lock:
            if session not in self.readers:
                self.readers[session] = Reader(self.store, self.cfg.top_k, self.cfg.passage_chars, self.cfg.query)
                while len(self.readers) > self.max_sessions:
                    self.readers.popitem(last=False)
            self.readers.move_to_end(session)
            return self.readers[session]

    def continue_batch(self, calls: Sequence[BigCall], cancel: threading.Event | None = None) -> list[BigReply]:
        ready: list[BigCall] = []
        failed: dict[int, BigReply] = {}
        for i, call in enumerate(calls):
            if not call.retrieval:
                ready.append(call)
                continue
            try:
                context = self.reader(call.session).context_for(call.text, call.topic) + call.context
            except Exception as err:  # a store that fails fails this call alone
                failed[i] = BigReply.failure(err)
                continue
            ready.append(dataclasses.replace(call, retrieval=False, context=context))
        replies = iter(self.inner.continue_batch(ready, cancel))
        return [failed[i] if i in failed else next(replies) for i in range(len(calls))]

    def end_session(self, session: str) -> None:
        with self._lock:
            self.readers.pop(session, None)
        self.inner.end_session(session)

    def health(self, timeout_s: float) -> dict:
        return {**self.inner.health(timeout_s), "retrieval_available": True}


# ----------------------------------------------------------------------------------------------
# Built from config, in one place


def knowledge_store(cfg: LacyConfig) -> SqlitePassageStore | None:
    """The run's passage store, when it has been built (pulled from the run's object store first)."""
    storage.pull(cfg, cfg.knowledge.db_path)  # a process on another node than the run's driver
    if not Path(cfg.knowledge.db_path).exists():
        return None
    return SqlitePassageStore(cfg.knowledge.db_path, common_share=cfg.knowledge.common_share)


def build_big(cfg: LacyConfig, *, device: str | None = None, retrieval: bool | None = None) -> BigModel:
    """The big model of `cfg.big`: its backend, read through the knowledge store when retrieval is on
    (`retrieval`, default `cfg.big.retrieval`; a retrieval call to a big model without a store is refused)."""
    module, name = BIG_BACKENDS[cfg.big.backend].split(":")
    big: BigModel = getattr(importlib.import_module(module), name).from_config(cfg, device)
    if (cfg.big.retrieval if retrieval is None else retrieval) and (store := knowledge_store(cfg)) is not None:
        return Retrieval(big, store, cfg.knowledge)
    return big
