"""Cascade decoding: the small model writes, and where it would emit `<CALL>` the big model continues.

    small = SmallLM(model, tokenizer)                       # our GPT-2, trained with <CALL>
    big = BigSession(build_big(cfg))                        # any big-model backend, one request's view
    cascade = Cascade(small, big, cfg.cascade)
    result = cascade.generate("Marie Curie was born in", call_rate=0.22)
    result.text, result.spans, result.calls, result.tokens_processed

One step of `Cascade.generate`: the small model's next-token distribution gives the trigger's score and
the non-<CALL> token t* it would write (the argmax, or a sample at temperature > 0). Where a call may
fire (a decision point) and the score passes the threshold, the big model continues the text by one word
(or entity, or a few tokens) and the small model resumes from the new text; otherwise the small model
emits t*. Triggers: `p_call`, P(<CALL>) under the full softmax (a model trained with <CALL>);
`confidence`, 1 - the largest probability of the real-token distribution (the softmax with <CALL>
removed): BiLD-style calling that needs no <CALL> training; `combined`, the two as one chance (delegate,
or write a token the model is unsure of); `random`, a uniform score per decision (seeded by the prompt):
the floor. Each is scored as log-odds (`SmallLM.call_score`): a probability rounds to exactly 1.0 once a
model is sure, and no threshold splits such ties, while log-odds keep their order. Both models keep a KV
cache (`lacy.cascade.lm`).

Thresholds and call rates: `lacy.cascade.policy`.

Word starts (cfg.word_start_only): a call replaces a whole word, so it may fire only where a new word
begins. We decide this from t*, the token the small model would write instead: the position is a word
start when t* starts with whitespace (byte-level BPE attaches the space to the next word), or when the
text so far is empty or ends with whitespace or an opening bracket/quote (where words start without a
space: "(born", "\\nParis").
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lacy.cascade.batching import feed_many
from lacy.cascade.big import BigModelError, BigSession
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import CALL_POLICIES, Quantiles, log_odds, several_policies
from lacy.core.config import TRIGGERS, CascadeConfig

# Characters after which a word starts without a leading space ("(born", "“Paris”").
_OPENERS = frozenset("([{\"“‘«")


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


@dataclass(frozen=True)
class Feed:
    """The decoding needs the small model to read these ids after its cache (prepared by `prepare`)."""

    ids: list[int]


@dataclass(frozen=True)
class Call:
    """The decoding needs the big model to continue `text` (its words are sent back)."""

    text: str
    topic: str | None


class Decoding:
    """One generation under way: the cascade's decoding as a coroutine (`steps`) that yields what it
    needs next — a `Span` it wrote, a `Feed` for the small model, a `Call` for the big model (answered by
    sending the big model's words back) — so that one request (`Cascade.generate_stream`) or many at once
    (`generate_batch`: every small step of a batch one forward pass, every pending call one big-model
    batch) run the same decisions."""

    def __init__(self, cascade: Cascade, prompt: str, decide: Any, steps: int, trigger: str, topic: str | None,
                 temperature: float, top_p: float, generator: torch.Generator | None) -> None:
        self.cascade, self.prompt, self.decide, self.steps = cascade, prompt, decide, steps
        self.trigger, self.topic, self.temperature, self.top_p = trigger, topic, temperature, top_p
        self.generator = generator
        self.coin = random.Random(f"random trigger/{prompt}")
        """The random trigger's scores: uniform, the same for the same prompt whatever runs beside it."""
        self.run = _Run(text=prompt)
        self.big_seconds = 0.0
        small, big = cascade.small, cascade.big
        self.before = (small.tokens_processed, small.seconds, *_big_counters(big))

    def steps_of(self) -> Iterator[Span | Feed | Call]:
        """The decoding itself (see `Cascade.generate_stream` for its rules)."""
        cfg, small, run = self.cascade.cfg, self.cascade.small, self.run

        def flush(pending: list[int]) -> Span:
            # Small tokens whose decoded text is complete (or final) become one span of the text.
            run.text += (piece := small.decode(pending))
            run.spans.append(Span(piece, "small"))
            pending.clear()
            return run.spans[-1]

        if new := small.prepare(small.encode(self.prompt)):  # a prompt too long raises here, before any output
            yield Feed(new)
        prompt_len = len(small.ids)
        pending: list[int] = []  # small tokens since the last emitted span (incomplete UTF-8 waits)
        if self.prompt:
            run.spans.append(Span(self.prompt, "prompt"))
            yield run.spans[-1]
        run.stop_reason = "max_new_tokens"
        for _ in range(self.steps):
            if small.room() <= 0:
                run.stop_reason = "context"
                break
            logits = small.next_logits(allow_call=False)
            _block_repeats(logits, small.ids[prompt_len:], cfg.no_repeat_ngram)
            token = _choose(logits, self.temperature, self.top_p, self.generator)
            at_word_start = not cfg.word_start_only or _word_start(run.text, small.decode([token]))
            if at_word_start:
                run.call_scores.append(log_odds(self.coin.random()) if self.trigger == "random"
                                       else small.call_score(self.trigger))
            if self.decide is not None and at_word_start:
                run.decision_points += 1
                if self.decide(run.call_scores[-1]):
                    if pending:
                        yield flush(pending)
                    run.calls += 1
                    run.stop_reason = "error"
                    words = yield Call(run.text, self.topic)
                    run.stop_reason = "max_new_tokens"
                    if words:
                        run.text += words
                        run.spans.append(Span(words, "big"))
                        yield run.spans[-1]
                        ids = small.encode(run.text)
                        if small.max_positions is not None and len(ids) > small.max_positions:
                            # The big model's words filled the small model's context.
                            run.stop_reason = "context"
                            break
                        if new := small.prepare(ids):
                            yield Feed(new)
                        continue
                    # The big model had nothing to add (EOS): the small model writes this step.
            if token == small.eos_id:
                run.stop_reason = "eos"
                break
            yield Feed([token])
            run.small_tokens += 1
            pending.append(token)
            if not small.decode(pending).endswith("\ufffd"):
                yield flush(pending)
        if pending:
            yield flush(pending)

    def result(self) -> CascadeResult:
        run, small = self.run, self.cascade.small
        after = (small.tokens_processed, small.seconds, *_big_counters(self.cascade.big))
        before = self.before
        return CascadeResult(
            text=run.text, spans=_merge(run.spans), calls=run.calls, small_tokens=run.small_tokens,
            big_tokens=after[3] - before[3], decision_points=run.decision_points,
            call_rate=run.calls / run.decision_points if run.decision_points else 0.0, call_scores=run.call_scores,
            tokens_processed={"small": after[0] - before[0], "big": after[2] - before[2]},
            timings={"small": after[1] - before[1], "big": self.big_seconds}, stop_reason=run.stop_reason)


class Cascade:
    """Small model + big model. `big` may be None when calls are never made (calibration, small-alone).

    Per-request policy: call_threshold / call_log_odds / call_rate / trigger / max_new_tokens /
    allow_calls override the config; temperature / top_p / seed sample the small model's tokens (the
    big model stays greedy).
    Running quantiles live in `quantiles` (a `Quantiles`, or anything with its `observe`): pass one to
    many cascades (e.g. per-request ones in Serve) to share their warm-up and hold a rate across them.
    """

    def __init__(self, small: SmallLM, big: BigSession | None, cfg: CascadeConfig, quantiles: Any = None) -> None:
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

    def start(self, prompt: str, *, call_threshold: float | None = None, call_log_odds: float | None = None,
              call_rate: float | None = None, trigger: str | None = None, max_new_tokens: int | None = None,
              allow_calls: bool = True, topic: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = None) -> Decoding:
        """A generation of `prompt` under the request's policy, checked, not yet decoded (`Decoding`)."""
        trigger = self.cfg.trigger if trigger is None else trigger
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown call trigger {trigger!r}; choose from {TRIGGERS}")
        decide = self._decider(call_threshold, call_log_odds, call_rate, trigger) if allow_calls else None
        if decide is not None and self.big is None:
            raise ValueError("calls are allowed but the cascade has no big model")
        steps = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {steps}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return Decoding(self, prompt, decide, steps, trigger, topic, temperature, top_p, generator)

    def generate_stream(self, prompt: str, **policy: Any) -> Iterator[Span]:
        """Yield spans as they are written: the prompt, then one per small token or big call.

        `self.result` holds the CascadeResult once the iterator ends. A `<CALL>` is one of the
        `max_new_tokens` small-model steps (its big-model words are not counted), which also bounds the
        work of a small model that calls at every step. Closing the iterator early (a consumer that has
        what it needs) stops decoding and calling at once. The policy keywords are `start`'s.
        """
        decoding = self.start(prompt, **policy)
        self.result = None
        steps = decoding.steps_of()
        try:
            need = next(steps)
            while True:
                if isinstance(need, Span):
                    yield need
                    need = steps.send(None)
                elif isinstance(need, Feed):
                    self.small.feed(need.ids)
                    need = steps.send(None)
                else:
                    start = time.perf_counter()
                    try:
                        words = self._call_big(need.text, need.topic)
                    except BigModelError as err:
                        decoding.big_seconds += time.perf_counter() - start
                        need = steps.throw(err)
                        continue
                    decoding.big_seconds += time.perf_counter() - start
                    need = steps.send(words)
        except StopIteration:
            pass
        except GeneratorExit:
            decoding.run.stop_reason = "stopped"
            raise
        finally:
            steps.close()
            self.result = decoding.result()

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
        assert self.big is not None
        try:
            words = self.big.continue_text(text, unit=self.cfg.big_unit, max_tokens=self.cfg.big_max_tokens,
                                           topic=topic)
        except BigModelError:
            raise
        except Exception as err:
            raise BigModelError(f"big model failed to continue a text of {len(text)} chars: {err}") from err
        if not isinstance(words, str):
            raise BigModelError(f"big model returned {type(words).__name__}, expected str")
        return words


def _big_counters(big: BigSession | None) -> tuple[int, int]:
    """(tokens_processed, tokens_generated) of the big session so far (zeros without one)."""
    return (0, 0) if big is None else (big.tokens_processed, big.tokens_generated)


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
    if not bool(torch.isfinite(probs).all()):  # so small a temperature that logits / it overflow: greedy
        return int(torch.argmax(logits))
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


def generate_batch(decodings: Sequence[Decoding], big_fill: float = 0.0) -> list[CascadeResult]:
    """Many generations decoded together: every round, the small-model reads of all sessions that need
    one run as one forward pass (`lacy.cascade.batching.feed_many`; one per small model) and every pending
    big-model call as one `continue_batch` (one per big model), each session keeping its KV caches. The
    decisions are `Decoding`'s, so each text is what `Cascade.generate` writes alone, up to the float
    rounding of batched passes. A big-model failure raises (with the results so far in nobody's hands:
    an evaluation must not go on without its big side).

    `big_fill` holds pending calls back until that share of the live sessions waits on the big model (or
    no small step is left to run): a big-model pass costs about the same for a few calls as for many, so
    fuller batches cost fewer passes, while the held sessions' texts stay exactly what they would be."""
    live = {i: d.steps_of() for i, d in enumerate(decodings)}
    needs: dict[int, Any] = {}
    for i, steps in list(live.items()):
        _advance(live, needs, i, steps, None)
    while needs:
        feeds = [i for i, need in needs.items() if isinstance(need, Feed)]
        if feeds:
            feed_many([decodings[i].cascade.small for i in feeds], [needs[i].ids for i in feeds])
            for i in feeds:
                _advance(live, needs, i, live[i], None)
        calls = [i for i, need in needs.items() if isinstance(need, Call)]
        if len(calls) < len(needs) and len(calls) < big_fill * len(needs):
            continue  # the calls wait for a fuller big-model batch while small steps run
        by_big: dict[int, list[int]] = {}
        for i in calls:
            by_big.setdefault(id(decodings[i].cascade.big.big), []).append(i)
        for members in by_big.values():
            sessions = [decodings[i].cascade.big for i in members]
            batch = [s.call(needs[i].text, decodings[i].cascade.cfg.big_unit, decodings[i].cascade.cfg.big_max_tokens,
                            needs[i].topic) for s, i in zip(sessions, members, strict=True)]
            start = time.perf_counter()
            replies = sessions[0].big.continue_batch(batch)
            seconds = time.perf_counter() - start
            for session, i, reply in zip(sessions, members, replies, strict=True):
                decodings[i].big_seconds += seconds
                _advance(live, needs, i, live[i], session.take(reply))
    return [d.result() for d in decodings]


def _advance(live: dict[int, Any], needs: dict[int, Any], i: int, steps: Any, value: str | None) -> None:
    """Run one decoding on to its next need of a model (spans it records itself), or to its end."""
    try:
        need = steps.send(value) if value is not None or i in needs else next(steps)
        while isinstance(need, Span):
            need = steps.send(None)
        needs[i] = need
    except StopIteration:
        needs.pop(i, None)
        del live[i]
