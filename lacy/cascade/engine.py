"""Cascade decoding: the small model writes, and where it would emit `<CALL>` the big model continues.

    small = SmallLM(model, tokenizer)                       # our GPT-2, trained with <CALL>
    big = BigLM(*load_big_model("smollm2"))                 # any HF causal LM, "continue this text"
    cascade = Cascade(small, big, cfg.cascade)
    result = cascade.generate("Marie Curie was born in", call_rate=0.22)
    result.text, result.spans, result.calls, result.tokens_processed

One step of `Cascade.generate`: the small model's next-token distribution gives the trigger's score and
the non-<CALL> token t* it would write (the argmax, or a sample at temperature > 0). Where a call may fire
(a decision point) and the score passes the threshold, the big model continues the text by one word (or
entity, or a few tokens) and the small model resumes from the new text; otherwise the small model emits
t*. Triggers: `p_call`, P(<CALL>) under the full softmax (a model trained with <CALL>); `confidence`,
1 - the largest probability of the real-token distribution (the softmax with <CALL> removed): BiLD-style
calling that needs no <CALL> training. Each is scored as log-odds (`SmallLM.call_score`): a probability
rounds to exactly 1.0 once a model is sure, and no threshold splits such ties, while log-odds keep
their order. Both models keep a KV cache and, when the text changes under them, re-encode only the
suffix after the longest common token prefix (so a generation with many calls costs each model a
number of forward tokens linear in the text length, not quadratic).

Threshold: fixed — as a probability (`call_threshold`, compared as its log-odds) or directly as
log-odds (`call_log_odds`, what calibration returns) — or held at a requested call rate by a running
quantile of the scores seen at decision points (`RunningQuantile`, shared across cascades through
`Quantiles`); `calibrate` maps a rate to a fixed log-odds threshold offline. A call fires when the
score is strictly above the threshold.

Word starts (cfg.word_start_only): a call replaces a whole word, so it may fire only where a new word
begins. We decide this from t*, the token the small model would write instead: the position is a word
start when t* starts with whitespace (byte-level BPE attaches the space to the next word), or when the
text so far is empty or ends with whitespace or an opening bracket/quote (where words start without a
space: "(born", "\\nParis").
"""

from __future__ import annotations

import bisect
import inspect
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lacy.core.config import TRIGGERS, CascadeConfig
from lacy.corpus.tokenizer import CALL_TOKEN

# Characters after which a word starts without a leading space ("(born", "“Paris”").
_OPENERS = frozenset("([{\"“‘«")


class BigModelError(RuntimeError):
    """The big model failed (raised, or returned something other than text) during a call."""


class BigUnavailable(BigModelError):
    """The big model does not answer (its replica is gone, or it timed out): a service answers 503."""


class BigRequestError(BigModelError):
    """The big model refused a call for a reason of the request's own (a service answers 400)."""


@dataclass
class Span:
    text: str
    source: Literal["prompt", "small", "big"]


@dataclass
class CascadeResult:
    text: str
    """Prompt plus generated text; equals the concatenation of `spans`."""
    spans: list[Span]
    """Provenance: consecutive pieces of `text` with who wrote them (same-source neighbours merged)."""
    calls: int
    """How many times the big model was asked to continue."""
    small_tokens: int
    """Tokens the small model wrote (calls excluded)."""
    big_tokens: int
    """Tokens the big model generated (0 if the big model does not count them)."""
    decision_points: int
    """Steps where a call was allowed (word starts, when cfg.word_start_only)."""
    call_rate: float
    """calls / decision_points (0.0 without decision points)."""
    call_scores: list[float]
    """The trigger's log-odds score (`SmallLM.call_score`) at every word-start step (recorded even with
    calls disabled; used by `calibrate`)."""
    tokens_processed: dict[str, int]
    """Forward-pass tokens per model ("small", "big") during this generation."""
    timings: dict[str, float]
    """Seconds spent in each model ("small", "big") during this generation."""
    stop_reason: Literal["eos", "max_new_tokens", "context", "stopped", "error"]
    """eos, the step budget, the context; "stopped": the consumer closed `generate_stream` early (a stop
    sequence, a client gone); "error": the big model failed (the result holds what was written)."""


# ----------------------------------------------------------------------------------------------
# KV-cached causal LM over a growing text


class CachedLM:
    """A causal LM plus the token ids whose keys/values sit in its cache.

    `sync(ids)` makes the cache hold exactly `ids`: it keeps the longest common prefix with what is
    cached, crops the rest (`DynamicCache.crop` takes a negative count in transformers 5) and feeds
    only the new suffix. `logits` is then the next-token distribution after `ids`, shape [V].
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.max_positions: int | None = (getattr(config, "n_positions", None)
                                          or getattr(config, "max_position_embeddings", None))
        # Every text is encoded after a start token, so an empty text still has a next-token
        # distribution; our tokenizer's bos is <|endoftext|>, the document separator of training.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("tokenizer has neither a bos nor an eos token to start texts with")
        self.start_id = int(start)
        self.tokens_processed = 0
        """Tokens fed through the model since construction (never reset: callers take differences)."""
        self.seconds = 0.0
        """Time spent in forward passes since construction."""
        self.feeder: Any = None
        """Something with `feed(lm, ids)` that runs this LM's forward passes, e.g. batched with other
        sessions' (`lacy.cascade.batching.FeedBatcher`); None: each pass runs alone."""
        self.reset()

    def reset(self) -> None:
        """Forget the cache (the counters keep counting)."""
        self.ids: list[int] = []
        self.cache: Any = None
        self.logits: torch.Tensor | None = None

    def encode(self, text: str) -> list[int]:
        """Start token + the text's ids; special-token strings in the text stay text."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [self.start_id, *ids]

    def room(self) -> int:
        """How many more tokens fit in the model's context (a large number if unbounded)."""
        return (self.max_positions or 1 << 30) - len(self.ids)

    def sync(self, ids: list[int]) -> None:
        """Cache exactly `ids` (start token included), feeding only what differs from the cache."""
        if new := self.prepare(ids):
            self._feed(new)

    def prepare(self, ids: list[int]) -> list[int]:
        """The first half of `sync`: crop the cache to its longest common prefix with `ids` and return
        the ids still to feed ([] when the cache holds `ids` already); `lacy.cascade.batching.sync_many` feeds
        many sessions' at once."""
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise ValueError(f"text is {len(ids)} tokens, more than the model's context of "
                             f"{self.max_positions}")
        common = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(ids) == len(self.ids) and self.logits is not None:
            return []
        # Re-feed at least the last token: its logits are the next-token distribution we need.
        keep = min(common, len(ids) - 1)
        if keep == 0:
            self.cache = None
        elif keep < len(self.ids):
            self.cache.crop(keep - len(self.ids))
        self.ids = self.ids[:keep]
        return ids[keep:]

    def append(self, token_id: int) -> None:
        self._feed([token_id])

    def _feed(self, new_ids: list[int]) -> None:
        if self.feeder is not None:
            self.feeder.feed(self, new_ids)
        else:
            self.forward(new_ids)

    @torch.inference_mode()
    def forward(self, new_ids: list[int]) -> None:
        """Feed `new_ids` after the cached ones, alone (what `_feed` does without a feeder)."""
        start = time.perf_counter()
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.model.device)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[0, -1].float()
        self.ids.extend(new_ids)
        self.tokens_processed += len(new_ids)
        self.seconds += time.perf_counter() - start

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class SmallLM(CachedLM):
    """Our small model: greedy stepping with a KV cache and P(<CALL>) at each step."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        call = tokenizer.convert_tokens_to_ids(CALL_TOKEN)
        if call is None or call == tokenizer.unk_token_id:
            raise ValueError(f"the small model's tokenizer has no {CALL_TOKEN} token")
        self.call_id = int(call)
        self.eos_id = tokenizer.eos_token_id

    def sync_text(self, text: str) -> None:
        """Make the model's state the full `text` (re-encoding only what changed)."""
        self.sync(self.encode(text))

    def call_score(self, trigger: str = "p_call") -> float:
        """The score a call trigger compares with its threshold, as log-odds log(p / (1 - p)) computed from
        the logits, so it never rounds to a tie where p rounds to 1: p = P(<CALL>) ("p_call":
        z_CALL - logsumexp of the other logits), or p = 1 - the largest probability of the real-token
        distribution, the softmax with <CALL> removed ("confidence": logsumexp of the other real logits
        - the largest)."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown call trigger {trigger!r}; choose from {TRIGGERS}")
        logits = self.next_logits(allow_call=trigger == "p_call").double()
        top = self.call_id if trigger == "p_call" else int(logits.argmax())
        rest = logits.clone()
        rest[top] = float("-inf")
        top_log_odds = float(logits[top] - torch.logsumexp(rest, dim=-1))  # log-odds of `top`'s probability
        return top_log_odds if trigger == "p_call" else -top_log_odds  # confidence: of 1 - p_max

    def next_logits(self, allow_call: bool = True) -> torch.Tensor:
        """Next-token logits [V]; with allow_call=False the <CALL> logit is -inf (small-alone, leakage)."""
        assert self.logits is not None, "sync a text first"
        if allow_call:
            return self.logits
        logits = self.logits.clone()
        logits[self.call_id] = float("-inf")
        return logits


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
        if unit not in ("word", "entity", "tokens"):
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


# ----------------------------------------------------------------------------------------------
# Threshold control


def log_odds(p: float) -> float:
    """log(p / (1 - p)): the score scale of every trigger; 0 -> -inf (always fires), 1 -> inf (never)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def probability(log_odds: float) -> float:
    """The inverse of `log_odds` (the logistic function), without overflow at any finite or infinite value."""
    return 0.5 * (1 + math.tanh(log_odds / 2))


CALL_POLICIES = ("call_threshold", "call_log_odds", "call_rate")
"""Request fields that each set the call policy; a request gives one at most."""


def several_policies(given: Sequence[str]) -> str:
    """The error message for a request that gives more than one of CALL_POLICIES."""
    return f"give one of call_threshold, call_log_odds or call_rate, not several (got {' and '.join(given)})"


class RunningQuantile:
    """Holds a call rate: decides "fire" when a value is above the running (1 - rate) quantile.

    `observe(p)` adds p to the last `window` values and returns p > quantile(values, 1 - rate)
    (numpy's linear interpolation). For the first `warmup` values the quantile is too noisy, so
    `initial` is the threshold instead (0: log-odds of probability 0.5). rate 0 never fires, rate 1
    always fires. Not thread-safe on its own: cascades that share one go through `Quantiles`, which
    locks.
    """

    def __init__(self, rate: float, warmup: int = 16, initial: float = 0.0, window: int = 4096) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if warmup < 0 or window <= 0:
            raise ValueError(f"warmup must be >= 0 and window > 0, got {warmup}, {window}")
        self.rate, self.warmup, self.initial, self.window = rate, warmup, initial, window
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self.seen = 0

    def quantile(self, q: float) -> float:
        """The q-quantile of the values in the window, linearly interpolated (numpy's default)."""
        if not self._sorted:
            raise ValueError("no values observed yet")
        pos = q * (len(self._sorted) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(self._sorted) - 1)
        return self._sorted[lo] + (pos - lo) * (self._sorted[hi] - self._sorted[lo])

    def threshold(self) -> float:
        """The threshold the next decision uses (before its own value is added)."""
        if self.seen < self.warmup or not self._sorted:
            return self.initial
        return self.quantile(1.0 - self.rate)

    def observe(self, p: float) -> bool:
        self.seen += 1
        self._recent.append(p)
        bisect.insort(self._sorted, p)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        if self.rate <= 0.0:
            return False
        if self.rate >= 1.0:
            return True
        if self.seen <= self.warmup:
            return p > self.initial
        return p > self.quantile(1.0 - self.rate)


class Quantiles:
    """The running quantiles of every cascade given this object, one per (scope, rate); thread-safe.

    Scope: what a target rate is held over. A cascade observes under its trigger, so P(<CALL>) and
    confidence scores never mix; callers add more (Serve: the model name). The number of quantiles is
    bounded (`max_keys`, least recently used dropped, whose warm-up then starts again), so clients that
    send many distinct rates cannot grow memory.
    """

    def __init__(self, max_keys: int = 64, warmup: int = 16, initial: float = 0.0, window: int = 4096) -> None:
        if max_keys <= 0:
            raise ValueError(f"max_keys must be positive, got {max_keys}")
        self.max_keys, self.warmup, self.initial, self.window = max_keys, warmup, initial, window
        self._lock = threading.Lock()
        self._by_key: OrderedDict[tuple, RunningQuantile] = OrderedDict()

    def observe(self, rate: float, value: float, scope: Hashable = ()) -> bool:
        """`RunningQuantile.observe(value)` of the quantile for (scope, rate): fire or not."""
        key = (scope, rate)
        with self._lock:
            rq = self._by_key.get(key)
            if rq is None:
                rq = self._by_key[key] = RunningQuantile(rate, self.warmup, self.initial, self.window)
                while len(self._by_key) > self.max_keys:
                    self._by_key.popitem(last=False)
            self._by_key.move_to_end(key)
            return rq.observe(value)

    def get(self, rate: float, scope: Hashable = ()) -> RunningQuantile | None:
        """The quantile of (scope, rate), if held (for inspection; do not observe through it)."""
        with self._lock:
            return self._by_key.get((scope, rate))

    def __len__(self) -> int:
        return len(self._by_key)


# ----------------------------------------------------------------------------------------------
# The cascade


@dataclass
class _Run:
    """Mutable state of one generation."""

    text: str
    spans: list[Span] = field(default_factory=list)
    calls: int = 0
    small_tokens: int = 0
    decision_points: int = 0
    call_scores: list[float] = field(default_factory=list)
    stop_reason: Literal["eos", "max_new_tokens", "context", "stopped", "error"] = "stopped"


class Cascade:
    """Small model + big model. `big` may be None when calls are never made (calibration, small-alone).

    Per-request policy: call_threshold / call_log_odds / call_rate / trigger / max_new_tokens /
    allow_calls override the config; temperature / top_p / seed sample the small model's tokens (the
    big model stays greedy).
    Running quantiles live in `quantiles` (a `Quantiles`, or anything with its `observe`): pass one to
    many cascades (e.g. per-request ones in Serve) to share their warm-up and hold a rate across them.
    """

    def __init__(self, small: SmallLM, big: Any, cfg: CascadeConfig, quantiles: Any = None) -> None:
        self.small, self.big, self.cfg = small, big, cfg
        self.quantiles = Quantiles() if quantiles is None else quantiles
        self.result: CascadeResult | None = None
        """The result of the last generation (how `generate_stream` hands it over); set however the
        stream ended: exhausted, closed early (stop_reason "stopped") or by a big-model error ("error")."""

    def generate(self, prompt: str, **policy: Any) -> CascadeResult:
        """`generate_stream` to the end; the same keywords."""
        for _ in self.generate_stream(prompt, **policy):
            pass
        assert self.result is not None
        return self.result

    def generate_stream(self, prompt: str, *, call_threshold: float | None = None,
                        call_log_odds: float | None = None, call_rate: float | None = None,
                        trigger: str | None = None,
                        max_new_tokens: int | None = None, allow_calls: bool = True,
                        topic: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None) -> Iterator[Span]:
        """Yield spans as they are written: the prompt, then one per small token or big call.

        `self.result` holds the CascadeResult once the iterator ends. A `<CALL>` is one of the
        `max_new_tokens` small-model steps (its big-model words are not counted), which also bounds the
        work of a small model that calls at every step. Closing the iterator early (a consumer that has
        what it needs) stops decoding and calling at once.
        """
        trigger = self.cfg.trigger if trigger is None else trigger
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown call trigger {trigger!r}; choose from {TRIGGERS}")
        decide = self._decider(call_threshold, call_log_odds, call_rate, trigger) if allow_calls else None
        if decide is not None and self.big is None:
            raise ValueError("calls are allowed but the cascade has no big model")
        if decide is not None and topic is not None and not _takes_topic(self.big):
            raise ValueError(f"a topic was given but {type(self.big).__name__}.continue_text takes none "
                             "(wrap the big model in lacy.cascade.knowledge.RetrievalBigLM)")
        steps = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {steps}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
        self.result = None
        small, big = self.small, self.big
        before = (small.tokens_processed, small.seconds, *_big_counters(big))
        run = _Run(text=prompt)
        big_seconds = 0.0

        def flush(pending: list[int]) -> Span:
            # Small tokens whose decoded text is complete (or final) become one span of the text.
            run.text += (piece := small.decode(pending))
            run.spans.append(Span(piece, "small"))
            pending.clear()
            return run.spans[-1]

        small.sync_text(prompt)  # a prompt too long for the small model raises here, before any output
        prompt_len = len(small.ids)
        pending: list[int] = []  # small tokens since the last emitted span (incomplete UTF-8 waits)
        try:
            if prompt:
                run.spans.append(Span(prompt, "prompt"))
                yield run.spans[-1]
            run.stop_reason = "max_new_tokens"
            for _ in range(steps):
                if small.room() <= 0:
                    run.stop_reason = "context"
                    break
                logits = small.next_logits(allow_call=False)
                _block_repeats(logits, small.ids[prompt_len:], self.cfg.no_repeat_ngram)
                token = _choose(logits, temperature, top_p, generator)
                at_word_start = not self.cfg.word_start_only or _word_start(run.text, small.decode([token]))
                if at_word_start:
                    run.call_scores.append(small.call_score(trigger))
                if decide is not None and at_word_start:
                    run.decision_points += 1
                    if decide(run.call_scores[-1]):
                        if pending:
                            yield flush(pending)
                        run.calls += 1
                        start = time.perf_counter()
                        run.stop_reason = "error"
                        words = self._call_big(run.text, topic)
                        run.stop_reason = "max_new_tokens"
                        big_seconds += time.perf_counter() - start
                        if words:
                            run.text += words
                            run.spans.append(Span(words, "big"))
                            yield run.spans[-1]
                            ids = small.encode(run.text)
                            if small.max_positions is not None and len(ids) > small.max_positions:
                                # The big model's words filled the small model's context.
                                run.stop_reason = "context"
                                break
                            small.sync(ids)
                            continue
                        # The big model had nothing to add (EOS): the small model writes this step.
                if token == small.eos_id:
                    run.stop_reason = "eos"
                    break
                small.append(token)
                run.small_tokens += 1
                pending.append(token)
                if not small.decode(pending).endswith("\ufffd"):
                    yield flush(pending)
            if pending:
                yield flush(pending)
        except GeneratorExit:
            run.stop_reason = "stopped"
            raise
        finally:
            after = (small.tokens_processed, small.seconds, *_big_counters(big))
            self.result = CascadeResult(
                text=run.text, spans=_merge(run.spans), calls=run.calls, small_tokens=run.small_tokens,
                big_tokens=after[3] - before[3], decision_points=run.decision_points,
                call_rate=run.calls / run.decision_points if run.decision_points else 0.0,
                call_scores=run.call_scores,
                tokens_processed={"small": after[0] - before[0], "big": after[2] - before[2]},
                timings={"small": after[1] - before[1], "big": big_seconds},
                stop_reason=run.stop_reason)

    def _decider(self, call_threshold: float | None, call_log_odds: float | None, call_rate: float | None,
                 trigger: str):
        """score -> fire? from the request's policy, else the config's (a threshold wins over a rate)."""
        given = [name for name, v in zip(CALL_POLICIES, (call_threshold, call_log_odds, call_rate), strict=True)
                 if v is not None]
        if len(given) > 1:
            raise ValueError(several_policies(given))
        if not given:
            call_threshold, call_log_odds = self.cfg.call_threshold, self.cfg.call_log_odds
            call_rate = None if call_threshold is not None or call_log_odds is not None else self.cfg.call_rate
        if call_threshold is not None:
            if not 0.0 <= call_threshold <= 1.0:
                raise ValueError(f"call_threshold must be in [0, 1], got {call_threshold}")
            call_log_odds = log_odds(call_threshold)
        if call_log_odds is not None:
            if math.isnan(call_log_odds):
                raise ValueError("call_log_odds must be a number, got NaN")
            return lambda score: score > call_log_odds
        if call_rate is None:
            raise ValueError("no call policy: set call_threshold, call_log_odds or call_rate (or allow_calls=False)")
        if not 0.0 <= call_rate <= 1.0:
            raise ValueError(f"call_rate must be in [0, 1], got {call_rate}")
        return lambda p: self.quantiles.observe(call_rate, p, scope=(trigger,))

    def _call_big(self, text: str, topic: str | None) -> str:
        kwargs: dict[str, Any] = {"unit": self.cfg.big_unit, "max_tokens": self.cfg.big_max_tokens}
        if topic is not None:
            kwargs["topic"] = topic  # understood by lacy.cascade.knowledge.RetrievalBigLM
        try:
            words = self.big.continue_text(text, **kwargs)
        except BigModelError:
            raise
        except Exception as err:
            raise BigModelError(f"big model failed to continue a text of {len(text)} chars: {err}") from err
        if not isinstance(words, str):
            raise BigModelError(f"big model returned {type(words).__name__}, expected str")
        return words


def _big_counters(big: Any) -> tuple[int, int]:
    """(tokens_processed, tokens_generated) of a big model that counts them, else zeros."""
    return getattr(big, "tokens_processed", 0), getattr(big, "tokens_generated", 0)


def _takes_topic(big: Any) -> bool:
    return "topic" in inspect.signature(big.continue_text).parameters


def _word_start(text: str, next_piece: str) -> bool:
    return not text or text[-1].isspace() or text[-1] in _OPENERS or next_piece[:1].isspace()


def _block_repeats(logits: torch.Tensor, generated: list[int], n: int) -> None:
    """Set to -inf every token that would complete an n-gram already present in `generated`.

    Only the generated ids are searched, so copying from the prompt (or a retrieved context) stays
    allowed. In place on logits [V].
    """
    if n <= 0 or len(generated) < n:
        return
    tail = generated[len(generated) - n + 1:] if n > 1 else []
    for i in range(len(generated) - n + 1):
        if generated[i:i + n - 1] == tail:
            logits[generated[i + n - 1]] = float("-inf")


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from logits [V]: the argmax at temperature 0, else a sample from the softmax at
    that temperature cut to its top-p nucleus (on the CPU, so a seed gives the same tokens anywhere)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # keeps at least the top one
        probs = probs.clone()
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in spans:
        if merged and merged[-1].source == span.source:
            merged[-1] = Span(merged[-1].text + span.text, span.source)
        else:
            merged.append(Span(span.text, span.source))
    return merged


# ----------------------------------------------------------------------------------------------
# Calibration


def decision_scores(cascade: Cascade, prompts: list[str], *, max_new_tokens: int | None = None,
                    trigger: str | None = None) -> np.ndarray:
    """`trigger`'s score (None: the cascade's config) at every decision point of each prompt decoded
    with calls disabled: the open-loop distribution `calibrate` takes its quantiles from."""
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    scores: list[float] = []
    for prompt in prompts:
        scores += cascade.generate(prompt, allow_calls=False, max_new_tokens=max_new_tokens,
                                   trigger=trigger).call_scores
    if not scores:
        raise ValueError("no decision points while decoding the prompts; nothing to calibrate on")
    return np.asarray(scores, dtype=np.float64)


def calibrate(cascade: Cascade, prompts: list[str], target_rate: float, *,
              max_new_tokens: int | None = None, trigger: str | None = None) -> float:
    """The fixed log-odds threshold (`call_log_odds`) on `trigger`'s score (None: the cascade's config)
    whose call rate on `prompts` is `target_rate` with calls disabled (open loop).

    Returns the (1 - rate) quantile of `decision_scores`: a share `target_rate` of them lies strictly
    above it (up to ties). Calls change what the small model reads next, so the realised rate with
    calls on can differ a lot (a model that calls where it is confused calls again after the big
    model's words); `closed_loop_threshold` corrects for that.
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {target_rate}")
    scores = decision_scores(cascade, prompts, max_new_tokens=max_new_tokens, trigger=trigger)
    return float(np.quantile(scores, 1.0 - target_rate))


@dataclass
class Calibration:
    threshold: float
    """On the trigger's log-odds score (a cascade's `call_log_odds`)."""
    realised_rate: float | None
    """Call rate with calls on at `threshold` (None: open loop only, never measured)."""
    rounds: int = 0
    """Closed-loop rounds run (each one decodes the calibration prompts with calls on)."""
    open_loop_rate: float | None = None
    """Realised rate at the open-loop threshold (the first round's), when measured."""


def closed_loop_threshold(scores: np.ndarray, target_rate: float, realised: Callable[[float], float],
                          rounds: int, tolerance: float = 0.02, step: float = 1.0) -> Calibration:
    """The log-odds threshold whose call rate *with calls on* (`realised(threshold)`) is closest to
    `target_rate`.

    Starts at the open-loop threshold (`calibrate`'s quantile of `scores`) and, until the target is
    bracketed, moves to the open-loop quantile at the level scaled by target / realised rate, or (when
    that cannot move it: after a call the scores can leave the open-loop range altogether) by a step of
    `step` log-odds, doubling; then interpolation of logit(rate) between the bracket's ends (the
    midpoint when that lands near an end). Stops after `rounds` measurements or within `tolerance`;
    returns the best measured threshold. rounds = 0 is the open-loop threshold, unmeasured.
    """
    if not 0.0 < target_rate <= 1.0:
        raise ValueError(f"target_rate must be in (0, 1], got {target_rate}")
    start = float(np.quantile(scores, 1.0 - target_rate))
    if rounds <= 0:
        return Calibration(start, None, 0)
    eps = 1e-6
    logit = lambda rate: log_odds(min(max(rate, eps), 1 - eps))  # noqa: E731 - finite at rates 0 and 1
    threshold, best, first, measured = start, None, None, 0
    above: tuple[float, float] | None = None  # (x, rate) of the highest threshold still calling too often
    below: tuple[float, float] | None = None  # (x, rate) of the lowest threshold calling too rarely
    while measured < rounds:
        rate, measured, x = realised(threshold), measured + 1, threshold  # x: the threshold to move
        first = rate if first is None else first
        if best is None or abs(rate - target_rate) < abs(best.realised_rate - target_rate):
            best = Calibration(threshold, rate)
        if abs(rate - target_rate) <= tolerance:
            break
        if rate > target_rate:
            above = (x, rate) if above is None or x > above[0] else above
        else:
            below = (x, rate) if below is None or x < below[0] else below
        if above is None or below is None:
            # Unbracketed: the open-loop quantile at a proportionally scaled level, when that moves the
            # threshold the right way; else a fixed step, doubling.
            level = float(np.mean(scores > threshold)) * target_rate / max(rate, eps)
            guess = float(np.quantile(scores, 1.0 - min(level, 1.0)))
            if (guess > x) == (rate > target_rate) and guess != x:
                x = guess
            else:
                x, step = x + (step if rate > target_rate else -step), 2 * step
        else:
            (x1, r1), (x2, r2) = above, below
            y1, y2 = logit(r1), logit(r2)
            x = x1 + (logit(target_rate) - y1) * (x2 - x1) / (y2 - y1) if y2 != y1 else (x1 + x2) / 2
            if not min(x1, x2) + 0.1 * abs(x2 - x1) < x < max(x1, x2) - 0.1 * abs(x2 - x1):
                x = (x1 + x2) / 2
        threshold = x
    best.rounds, best.open_loop_rate = measured, first
    return best
