"""The big model as a local Hugging Face causal LM: greedy continuation with a KV cache per session.

`BigLM` is one session's model state ("continue this text", its cache kept across the calls of one
request); `continue_batch` decodes many sessions' calls as one batch; `HFBig` is the `BigModel`
backend that holds the sessions (least recently used dropped) and isolates each call of a batch from
the others' failures.

`continue_batch` in detail: every session is first brought up to date on its text (only the new suffix
is encoded, exactly as `BigLM.continue_text` does), then all sessions decode together: their caches
are left-padded to one length and stacked [B, heads, L, d] in a slab with room for every step (which
writes its column in place, `lacy.cascade.batching.SlabLayer`), each step feeds one token per session with
an attention mask over the padding and explicit positions (so rotary/learned position embeddings see
each session's true positions), and at the end every session takes back exactly its own slice of the
cache. Results equal `continue_text`'s up to batched rounding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from lacy.cascade.batching import stack_caches, sync_many, take_row
from lacy.cascade.big import BigCall, BigReply, BigRequestError
from lacy.cascade.lm import CachedLM, common_prefix
from lacy.core.compute import compute_thread, device_for
from lacy.core.config import UNITS, LacyConfig
from lacy.model import count_parameters, load_big_model

log = logging.getLogger(__name__)


class BigLM(CachedLM):
    """The big model as "continue this text": greedy, KV cache kept across calls of one session.

    One instance serves one request session (`reset()` between unrelated sessions is optional: the
    longest-common-prefix reuse is correct for any text, it only saves less). Not thread-safe.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.tokens_generated = 0
        """Tokens written by continue_text since construction."""

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8,
                      context: str = "") -> str:
        """Greedy continuation of `context + text` (concatenated verbatim), at most `max_tokens` tokens.

        unit="word": stop once the continuation holds a word and the next token would start a new
        word (leading whitespace) or is punctuation. "entity": like word, but further words continue
        the span while every word so far and the next one start with a capital or a digit ("Barack
        Obama", "4 August 1961"). "tokens": exactly `max_tokens` tokens. Always stops at EOS.
        """
        if unit not in UNITS:
            raise ValueError(f"unit must be word, entity or tokens, got {unit!r}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.sync(self.encode(context + text))
        generated: list[int] = []
        out = ""
        while len(generated) < max_tokens and self.room() > 0:
            token = int(torch.argmax(self.logits))
            if token == self.tokenizer.eos_token_id:
                break
            extended = self.decode(generated + [token])
            if unit != "tokens" and _ends_unit(out, extended[len(out):], unit):
                break
            generated.append(token)
            out = extended
            self.tokens_generated += 1
            if len(generated) < max_tokens:  # the last token's logits are never needed
                self.append(token)
        return out


def _is_word(text: str) -> bool:
    return any(c.isalnum() for c in text)


def _ends_unit(out: str, piece: str, unit: str) -> bool:
    """Whether the next token (text `piece`) would end the word/entity collected so far (`out`)."""
    if not _is_word(out) or not piece:
        return False
    first = piece[0]
    if first.isspace():
        if unit == "word":
            return True
        # entity: go on only while every word so far and the next one are capitalised or numeric.
        word = piece.strip()
        capital = lambda w: w[:1].isupper() or w[:1].isdigit()
        return not (word and capital(word) and all(capital(w) for w in out.split()))
    return not first.isalnum()


def _decide(lm: BigLM, out: str, generated: list[int], unit: str, max_tokens: int) -> tuple[int | None, str]:
    """The session's next token and its text so far, or None when its continuation is complete."""
    if len(generated) >= max_tokens or lm.room() <= 0:
        return None, out
    token = int(torch.argmax(lm.logits))
    if token == lm.tokenizer.eos_token_id:
        return None, out
    extended = lm.decode(generated + [token])
    if unit != "tokens" and _ends_unit(out, extended[len(out):], unit):
        return None, out
    return token, extended


@torch.inference_mode()
def continue_batch(lms: Sequence[BigLM], texts: Sequence[str], *, units: Sequence[str],
                   max_tokens: Sequence[int], contexts: Sequence[str] | None = None,
                   stats: dict[str, float] | None = None) -> list[str]:
    """`[lm.continue_text(text, unit=u, max_tokens=m, context=c) ...]`, decoded as one batch.

    All sessions must share one model (they are sessions of one deployment replica). `stats`, when
    given, accumulates the seconds of bringing the sessions up to date ("prefill_s", tokens fed:
    "prefill_tokens") and of the batched decoding ("decode_s", "decode_steps")."""
    n = len(lms)
    if not n:
        return []
    if len({id(lm.model) for lm in lms}) != 1:
        raise ValueError("continue_batch: all sessions must share one model")
    if len({id(lm) for lm in lms}) != n:
        raise ValueError("continue_batch: a session appears twice in one batch")
    for unit, m in zip(units, max_tokens, strict=True):
        if unit not in ("word", "entity", "tokens") or m <= 0:
            raise ValueError(f"bad unit/max_tokens: {unit!r}, {m}")
    contexts = contexts or [""] * n
    start, fed_before = time.perf_counter(), sum(lm.tokens_processed for lm in lms)
    sync_many(lms, [lm.encode(context + text) for lm, text, context in zip(lms, texts, contexts, strict=True)])
    if stats is not None:
        stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - start
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + sum(lm.tokens_processed for lm in lms) - fed_before
    start = time.perf_counter()
    outs, generated, tokens = [""] * n, [[] for _ in range(n)], [None] * n
    for i, lm in enumerate(lms):
        tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])
    rows = [i for i in range(n) if tokens[i] is not None]  # the sessions decoding, in batch order
    if rows:
        _decode(lms, rows, tokens, outs, generated, units, max_tokens, stats)
    if stats is not None:
        stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - start
        stats["decode_tokens"] = stats.get("decode_tokens", 0) + sum(len(g) for g in generated)
    return outs


def _decode(lms: Sequence[BigLM], rows: list[int], tokens: list[int | None], outs: list[str],
            generated: list[list[int]], units: Sequence[str], max_tokens: Sequence[int],
            stats: dict[str, float] | None) -> None:
    """The batched decoding of `continue_batch`: caches left-padded to one length and stacked
    [B, heads, L, d]; each step feeds one token per session, with an attention mask over the padding and
    explicit positions (so rotary/learned position embeddings see each session's true positions). A
    session that stops takes back its own slice of the cache at once, and the batch shrinks to the
    sessions still decoding, so no step computes a finished one."""
    model, device = lms[0].model, lms[0].model.device
    lengths = {i: len(lms[i].ids) for i in rows}
    width = max(lengths.values())
    steps = max(max_tokens[i] for i in rows)  # each step writes one column in place
    cache = stack_caches([lms[i].cache for i in rows], [lengths[i] for i in rows], width + steps)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for r, i in enumerate(rows):
        mask[r, width - lengths[i]:] = 1
    positions = torch.tensor([lengths[i] for i in rows], device=device)
    while rows:
        if stats is not None:
            stats["decode_steps"] = stats.get("decode_steps", 0) + 1
        step = torch.tensor([[tokens[i]] for i in rows], device=device)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], dim=1)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions[:, None],
                    past_key_values=cache, use_cache=True)
        cache, positions = out.past_key_values, positions + 1
        keep = []
        for r, i in enumerate(rows):
            lm = lms[i]
            generated[i].append(tokens[i])
            lm.tokens_generated += 1
            lm.tokens_processed += 1
            lm.logits = out.logits[r, -1].float()
            tokens[i], outs[i] = _decide(lm, outs[i], generated[i], units[i], max_tokens[i])
            if tokens[i] is not None:
                keep.append(r)
                continue
            # Stopped: its valid cache is the unpadded prefix plus every column appended since.
            lo = mask.shape[1] - lengths[i] - len(generated[i])
            lm.cache = take_row(cache, r, lo)
            lm.ids = lm.ids + generated[i]
        if keep and len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask.index_select(0, index), positions.index_select(0, index)
        rows = [rows[r] for r in keep]


class HFBig:
    """The `BigModel` backend of a local Hugging Face causal LM (`big.path`: smollm2 or a directory).

    `continue_batch` decodes the calls of concurrent sessions as one batch; a call that fails (its own
    session, the batch) fails alone: the others are redone one by one and answer. A new session whose call
    brings a context seen before (the same person's passages, in another row or calibration round) starts
    from that context's kept keys/values (the last `max_prefixes` contexts) and reads only what follows it.
    Loads and decodes on the process's compute thread (`lacy.core.compute`)."""

    def __init__(self, model: Any, tokenizer: Any, max_sessions: int = 64, max_prefixes: int = 0) -> None:
        self.model, self.tokenizer, self.max_sessions = model, tokenizer, max_sessions
        self.max_prefixes = max_prefixes
        self.prefixes: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()
        """context -> (its token ids as a session reads them, their cache), least recently used first."""
        self.compute = compute_thread()
        self.torch_threads = self.compute.call(torch.get_num_threads)  # its compute thread's, for health
        self.sessions: OrderedDict[str, BigLM] = OrderedDict()
        self.lock = threading.Lock()  # end_session (any thread) against the batch on the compute thread
        self.stats: dict[str, float] = {"batches": 0, "calls": 0, "wait_s": 0.0, "arrival_s": 0.0}
        """Batches and calls so far, seconds the calls waited from `sent` to their batch's start (of
        which arrival_s: from `sent` to reaching the replica, see `arrived`), and
        continue_batch's prefill_s / prefill_tokens / decode_s / decode_steps / decode_tokens (the benches
        profile these); prefix_hits / prefix_tokens: sessions started from a kept context, tokens not read."""

    @classmethod
    def from_config(cls, cfg: LacyConfig, device: str | None = None) -> HFBig:
        """`big.path` in `big.dtype` on `device` (default: cuda when serve.big_gpus reserves a GPU), keeping
        the sessions of a Serve replica's requests or of a batch evaluation's people, whichever is more."""
        compute = compute_thread()
        model, tokenizer = compute.call(load_big_model, cfg.big.path, cfg.big.dtype)
        compute.call(model.to, device or device_for(cfg.serve.big_gpus, "big"))
        return cls(model, tokenizer, max(cfg.serve.big_sessions, cfg.eval.batch_people), cfg.big.prefix_cache)

    def _session(self, session: str) -> BigLM:
        if session not in self.sessions:
            self.sessions[session] = BigLM(self.model, self.tokenizer)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(session)
        return self.sessions[session]

    def arrived(self, call: BigCall) -> None:
        """Count the time `call` took to reach this replica (the rest of its wait is the batch queue)."""
        if call.sent:
            self.stats["arrival_s"] += time.time() - call.sent

    def continue_batch(self, calls: Sequence[BigCall], cancel: threading.Event | None = None) -> list[BigReply]:
        return self.compute.call(self._continue_batch, calls)

    def _continue_batch(self, calls: Sequence[BigCall]) -> list[BigReply]:
        with self.lock:
            now = time.time()
            self.stats["batches"] += 1
            self.stats["calls"] += len(calls)
            self.stats["wait_s"] += sum(now - c.sent for c in calls if c.sent)
            replies: list[BigReply | None] = [None] * len(calls)
            ready: list[tuple[int, BigLM]] = []
            unseen: list[tuple[BigLM, str]] = []  # new sessions whose context is not kept yet
            for i, call in enumerate(calls):
                try:
                    call.check()
                    if call.retrieval:
                        raise BigRequestError("retrieval was asked for but this deployment has no knowledge store")
                    lm = self._session(call.session)
                    if any(lm is other for _, other in ready):
                        raise BigRequestError("one session called twice at once")
                    if not lm.ids and call.context and not self._start_from_prefix(lm, call.context):
                        unseen.append((lm, call.context))
                    ready.append((i, lm))
                except Exception as err:
                    replies[i] = _failed(err)
            before = [(lm.tokens_processed, lm.tokens_generated) for _, lm in ready]
            try:
                outs: list[str | BaseException] = list(continue_batch(
                    [lm for _, lm in ready], [calls[i].text for i, _ in ready],
                    units=[calls[i].unit for i, _ in ready], max_tokens=[calls[i].max_tokens for i, _ in ready],
                    contexts=[calls[i].context for i, _ in ready], stats=self.stats))
                for lm, context in unseen:
                    self._keep_prefix(lm, context)
            except Exception:
                log.exception("a batch of %d big-model calls failed; running them one by one", len(ready))
                outs = []
                for i, lm in ready:
                    lm.reset()  # the failed batch may have left logits that do not match the cache
                    try:
                        outs.append(lm.continue_text(calls[i].text, unit=calls[i].unit, max_tokens=calls[i].max_tokens,
                                                     context=calls[i].context))
                    except Exception as err:
                        outs.append(err)
            for (i, lm), out, (processed, generated) in zip(ready, outs, before, strict=True):
                replies[i] = _failed(out) if isinstance(out, BaseException) else BigReply(
                    out, lm.tokens_processed - processed, lm.tokens_generated - generated)
            return replies  # type: ignore[return-value]  # every call has its reply or its failure

    def _start_from_prefix(self, lm: BigLM, context: str) -> bool:
        """Give a new session the kept cache of its context, if there is one (a copy: sessions write theirs)."""
        if (kept := self.prefixes.get(context)) is None:
            return False
        self.prefixes.move_to_end(context)
        ids, cache = kept
        lm.ids, lm.cache, lm.logits = list(ids), take_row(cache, 0, 0), None
        self.stats["prefix_hits"] = self.stats.get("prefix_hits", 0) + 1
        self.stats["prefix_tokens"] = self.stats.get("prefix_tokens", 0) + len(ids)
        return True

    def _keep_prefix(self, lm: BigLM, context: str) -> None:
        """Keep the cache of the context a session has just read: its ids up to where they and the context's
        own encoding diverge (the last token of a context may merge with the text after it)."""
        if not self.max_prefixes or lm.cache is None:
            return
        n = common_prefix(lm.encode(context), lm.ids)
        if n < 2:  # the start token alone saves nothing
            return
        self.prefixes[context] = (lm.ids[:n], take_row(lm.cache, 0, 0, n))
        while len(self.prefixes) > self.max_prefixes:
            self.prefixes.popitem(last=False)

    def end_session(self, session: str) -> None:
        with self.lock:
            self.sessions.pop(session, None)

    def health(self, timeout_s: float = 0.0) -> dict:
        return {"parameters": count_parameters(self.model), "retrieval_available": False,
                "sessions": len(self.sessions), "device": str(self.model.device),
                "torch_threads": self.torch_threads, "stats": dict(self.stats)}


def _failed(err: BaseException) -> BigReply:
    if not isinstance(err, BigRequestError):
        log.error("big-model call failed: %r", err)
    return BigReply.failure(err)
