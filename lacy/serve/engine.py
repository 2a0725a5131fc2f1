"""The served cascade of one replica, without Ray: what `services/cascade.py` deploys.

    engine = CascadeEngine(cfg, build_big(cfg))                      # in process (tests, benches)
    engine = CascadeEngine(cfg, HandleBig(handle, timeout_s))        # the BigModel deployment (services/)
    job = engine.parse(body, "completions")                          # APIError (4xx) before any work
    body = await engine.complete(job)                                # OpenAI text_completion
    response = await open_stream(engine.stream(job))                 # server-sent events, or the error

The request contract is `lacy.serve.request`'s. Tokens: `usage` counts tokens of the served small
model's tokenizer, the completion as the client gets it re-tokenised; `usage.delegated_tokens` are
those whose first character the big model wrote. `max_tokens` bounds that count (the cascade's step
budget, 4 x max_tokens + 16, is only a safety bound). A request's failure never fails another (the
big side isolates each call of a batch, the small side each step: lacy.cascade.batching).

Call-rate policy: one running quantile per (model, trigger, rate), shared by every request of a
replica (`Quantiles`, thread-safe, at most serve.max_call_rates of them). With serve.quantile_scope
"cluster" the Serve app holds them in one actor instead, so a target rate means the same with one
replica or four (services.cascade passes it in as `quantiles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lacy.cascade.batching import FeedBatcher
from lacy.cascade.big import BigModel, BigModelError, BigRequestError, BigSession, BigSlow, BigUnavailable
from lacy.cascade.engine import Cascade, CascadeResult, Span
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import Quantiles
from lacy.core import storage
from lacy.core.compute import compute_thread, device_for
from lacy.core.config import LacyConfig, to_dict
from lacy.model import count_parameters, load_small_model
from lacy.serve.request import DEFAULT_MODEL, APIError, Endpoint, Job, Served, encode, model_not_found, parse, read_body
from lacy.serve.view import view_page

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# One choice as the client sees it


class _Choice:
    """The completion cut at stop sequences and (for /v1/completions) at max_tokens, with the
    provenance of each character, and how much of it may be sent while decoding goes on."""

    def __init__(self, index: int, prompt: str, tokenizer: Any, stops: list[str], max_tokens: int | None) -> None:
        self.index, self.prompt, self.tokenizer = index, prompt, tokenizer
        self.stops, self.max_tokens = stops, max_tokens
        self.raw = ""
        self.text = ""
        self.runs: list[tuple[int, str]] = []
        """(end offset in raw, source) of each span."""
        self.finish: str | None = "length" if max_tokens == 0 else None
        self.sent = 0
        self.results: list[CascadeResult] = []
        self.undelegated: str | None = None
        self.logprobs: dict | None = None

    def count(self, text: str) -> int:
        return len(encode(self.tokenizer, text))

    def add(self, span: Span) -> bool:
        """Take the next span; True once the choice is complete (stop sequence or max_tokens)."""
        self.raw += span.text
        self.runs.append((len(self.raw), span.source))
        cut = min((i for i in (self.raw.find(s) for s in self.stops) if i >= 0), default=-1)
        self.text = self.raw if cut < 0 else self.raw[:cut]
        if cut >= 0:
            self.finish = "stop"
        if self.max_tokens is not None and self.count(self.text) >= self.max_tokens:
            self.text, self.finish = self._first_tokens(self.text), "length"
        return self.finish is not None

    def _first_tokens(self, text: str) -> str:
        """The longest prefix of `text` (never shorter than what was sent) of at most max_tokens tokens."""
        assert self.max_tokens is not None
        offsets = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > self.max_tokens:
            text = text[:max(offsets[self.max_tokens - 1][1], self.sent)]
        while self.count(text) > self.max_tokens and len(text) > self.sent:  # offsets trimmed oddly
            text = text[:-1]
        return text

    def take(self) -> list[tuple[str, str]]:
        """(text, source) pieces not sent yet that can no longer change: held back while the text
        ends in the beginning of a stop sequence, all of it once the choice is complete."""
        safe = len(self.text)
        if self.finish is None:
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        pieces = self.pieces(self.sent, safe)
        self.sent = max(self.sent, safe)
        return pieces

    def pieces(self, start: int = 0, end: int | None = None) -> list[tuple[str, str]]:
        end = len(self.text) if end is None else end
        out, begin = [], 0
        for stop, source in self.runs:
            lo, hi = max(begin, start), min(stop, end)
            if hi > lo:
                if out and out[-1][1] == source:
                    out[-1] = (out[-1][0] + self.text[lo:hi], source)
                else:
                    out.append((self.text[lo:hi], source))
            begin = stop
        return out

    def delegated_tokens(self) -> int:
        """Completion tokens whose first character the big model wrote."""
        offsets = self.tokenizer(self.text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)["offset_mapping"]
        big = [(s - len(t), s) for (s, src), t in zip(self.runs, self._run_texts(), strict=True) if src == "big"]
        return sum(any(lo <= a < hi for lo, hi in big) for a, _ in offsets)

    def _run_texts(self) -> list[str]:
        begin, out = 0, []
        for stop, _ in self.runs:
            out.append(self.raw[begin:stop])
            begin = stop
        return out

    def summary(self) -> dict:
        """lacy's extension of a choice: provenance, calls, tokens per model, timings."""
        rs = self.results
        calls, points = sum(r.calls for r in rs), sum(r.decision_points for r in rs)
        return {"spans": [{"text": t, "source": s} for t, s in self.pieces()], "calls": calls,
                "decision_points": points, "call_rate": calls / points if points else 0.0,
                "small_tokens": sum(r.small_tokens for r in rs), "big_tokens": sum(r.big_tokens for r in rs),
                "tokens_processed": {k: sum(r.tokens_processed[k] for r in rs) for k in ("small", "big")},
                "timings": {k: sum(r.timings[k] for r in rs) for k in ("small", "big")},
                "stop_reason": rs[-1].stop_reason if rs else "max_new_tokens",
                "delegated": self.undelegated is None, "undelegated_reason": self.undelegated}


class BigHealth:
    """Whether the big model answers, as last seen by a call or a probe (thread-safe).

    A new one counts as up: the replica's watcher probes at once and the first failed call marks it
    down at once, so optimism costs at most one failed call, where "not probed yet" answered 503 to
    requests that would have been served (Serve deploys the BigModel before the app answers).
    Going down sets every event registered with `abandon_when_down` (the big-model waits of requests
    that take a small-only answer end at once) and `wake` (the watcher probes again now)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.info: dict | None = None
        self.since = time.monotonic()
        self.wake = threading.Event()
        self._abandon: set[threading.Event] = set()

    def up(self, info: dict) -> None:
        with self._lock:
            if self.reason is not None:
                log.info("big model answers again")
            self.reason, self.info, self.since = None, info, time.monotonic()

    def down(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                log.warning("big model unavailable: %s", reason)
                self.since = time.monotonic()
                self.wake.set()
            self.reason = reason
            waits = list(self._abandon)
        for event in waits:
            event.set()

    @contextlib.contextmanager
    def abandon_when_down(self, event: threading.Event) -> Iterator[None]:
        """Set `event` when the big model goes down (at once if it is down) while the block runs."""
        with self._lock:
            self._abandon.add(event)
            if self.reason is not None:
                event.set()
        try:
            yield
        finally:
            with self._lock:
                self._abandon.discard(event)


class Cancel(threading.Event):
    """A request's cancellation (its client left): setting it also sets the events `link`ed to it."""

    def __init__(self) -> None:
        super().__init__()
        self._linked: list[threading.Event] = []
        self._link_lock = threading.Lock()

    def link(self, event: threading.Event) -> None:
        with self._link_lock:
            self._linked.append(event)
            if self.is_set():
                event.set()

    def set(self) -> None:
        with self._link_lock:
            super().set()
            linked = list(self._linked)
        for event in linked:
            event.set()


# ----------------------------------------------------------------------------------------------
# The engine


class _Scoped:
    """A model's view of shared quantiles: its observations are kept apart from other models'."""

    def __init__(self, quantiles: Any, model: str) -> None:
        self.quantiles, self.model = quantiles, model

    def observe(self, rate: float, value: float, scope: tuple = ()) -> bool:
        return self.quantiles.observe(rate, value, (self.model, *scope))


class CascadeEngine:
    """The served cascade of one replica: small models, the batcher of their steps, the decoding
    threads, the call-rate quantiles and the big model's health. `big` None: no big model deployed."""

    def __init__(self, cfg: LacyConfig, big: BigModel | None, quantiles: Any = None,
                 health: BigHealth | None = None) -> None:
        self.cfg, self.big, s = cfg, big, cfg.serve
        self.compute = compute_thread()  # every load and forward here runs on the process's one thread
        self.compute.set_threads(s.torch_threads)
        self.device = device_for(s.small_gpus, "small")
        paths = {DEFAULT_MODEL: s.small_path, **s.models}
        storage.pull(cfg, *paths.values())  # a replica on another node than the run's driver
        loaded: dict[str, tuple[Any, Any]] = {}
        self.models: dict[str, tuple[Any, Any]] = {}
        for name, path in paths.items():
            if path not in loaded:  # a path served under two names is loaded once
                model, tokenizer = self.compute.call(load_small_model, path)
                loaded[path] = (self.compute.call(model.to, self.device), tokenizer)
            self.models[name] = loaded[path]
        self.quantiles = quantiles if quantiles is not None else Quantiles(max_keys=s.max_call_rates)
        # Each choice decodes in its own thread; their small-model steps meet in one batcher.
        self.pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="cascade")
        self.batcher = FeedBatcher(s.small_batch, s.small_batch_wait_s, run_on=self.compute.call)
        self.health = health or BigHealth()
        """Shared with the big model's client when it reports failures itself (`HandleBig.on_unavailable`)."""
        self.cancelled = 0
        """Choices whose client left before they were done (decoding and big calls stopped)."""
        self.started = int(time.time())
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if big is not None and s.big_enabled:
            threading.Thread(target=self._watch, name="big-health", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.health.wake.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- health --------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Ask the big model for its info now; True when it answered."""
        assert self.big is not None
        try:
            self.health.up(self.big.health(self.cfg.serve.health_timeout_s))
            return True
        except Exception as err:
            self.health.down(f"no answer to a health probe ({type(err).__name__})")
            return False

    def _watch(self) -> None:
        # Probe often while down, so requests flow again soon after the replica is back, and at once
        # when a call finds it down (a successor may answer already).
        while not self._closed.is_set():
            interval = self.cfg.serve.health_interval_s
            self.health.wake.wait(interval if self.probe() else min(1.0, interval))
            self.health.wake.clear()

    def big_state(self) -> str | None:
        """None when the big model can be called, else why not."""
        if self.big is None or not self.cfg.serve.big_enabled:
            return "no big model is deployed (serve.big_enabled is false)"
        return self.health.reason

    def healthz(self) -> tuple[int, dict]:
        reason = self.big_state() if self.big is not None and self.cfg.serve.big_enabled else None
        b = self.batcher
        body = {"status": "ok" if reason is None else "degraded",
                "big_model": "disabled" if self.big is None or not self.cfg.serve.big_enabled
                else ("ok" if reason is None else "down"),
                "reason": reason, "models": sorted(self.models), "small_passes": b.batches,
                "small_steps": b.steps, "small_forward_s": b.forward_s, "small_wait_s": b.wait_s,
                "decoding": b.active, "cancelled": self.cancelled,
                "call_rate_states": len(self.quantiles) if isinstance(self.quantiles, Quantiles) else None}
        return (200 if reason is None else 503), body

    # -- models ----------------------------------------------------------------------------------

    def model_card(self, name: str) -> dict:
        if name not in self.models:
            raise model_not_found(name, self.models)
        model, tokenizer = self.models[name]
        return {"id": name, "object": "model", "created": self.started, "owned_by": "lacy",
                "parameters": count_parameters(model), "context": SmallLM(model, tokenizer).max_positions,
                "vocab_size": len(tokenizer), "device": self.device}

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card(n) for n in self.models],
                "big_model": None if self.big_state() else self.health.info, "cascade": to_dict(self.cfg.cascade)}

    # -- validation ------------------------------------------------------------------------------

    async def parse_request(self, request: Request, endpoint: Endpoint) -> Job:
        """`parse` of an HTTP request's body (read no further than serve.max_request_bytes)."""
        return self.parse(await read_body(request, self.cfg.serve.max_request_bytes), endpoint)

    def parse(self, body: bytes | dict, endpoint: Endpoint) -> Job:
        """The request validated against this deployment (`lacy.serve.request.parse`)."""
        models = {name: (tokenizer, SmallLM(model, tokenizer).max_positions) for name, (model, tokenizer)
                  in self.models.items()}
        return parse(body, Served(endpoint, self.cfg.serve, self.cfg.cascade, self.cfg.big.retrieval, models))

    # -- decoding --------------------------------------------------------------------------------

    def _choices(self, job: Job) -> list[_Choice]:
        tokenizer = self.models[job.req.model][1]
        return [_Choice(i * job.n + j, prompt, tokenizer, job.stops, job.max_tokens)
                for i, prompt in enumerate(job.prompts) for j in range(job.n)]

    def _decode(self, job: Job, choice: _Choice, cancel: Cancel,
                emit: Callable[[list[tuple[str, str]]], None] | None = None) -> None:
        """Decode one choice (in a pool thread) until it is complete, its budget ends or `cancel`."""
        req = job.req
        model, tokenizer = self.models[req.model]
        allow = req.allow_calls and not choice.finish
        big = None
        if allow and (down := self.big_state()) is not None:
            if not req.allow_undelegated:
                raise APIError(503, f"the big model is unavailable: {down}", code="big_model_unavailable",
                               retry_after_s=self.cfg.serve.retry_after_s)
            allow, choice.undelegated = False, down  # answer at once, without waiting for a timeout
        waits = contextlib.ExitStack()
        if allow:
            assert self.big is not None
            # A strict request waits for the big model until its client leaves; one that takes a
            # small-only answer stops waiting as soon as the big model is known down (at once).
            wait_ends: threading.Event = cancel
            if req.allow_undelegated:
                wait_ends = threading.Event()
                cancel.link(wait_ends)
                waits.enter_context(self.health.abandon_when_down(wait_ends))
            big = BigSession(self.big, retrieval=job.retrieval, cancel=wait_ends, waiting=self.batcher.paused,
                             wait_s=self.cfg.serve.undelegated_wait_s if req.allow_undelegated else None)
        policy = {"call_threshold": req.call_threshold, "call_log_odds": req.call_log_odds,
                  "call_rate": req.call_rate, "trigger": job.trigger,
                  "topic": req.topic if job.retrieval else None, "temperature": req.temperature or 0.0,
                  "top_p": 1.0 if req.top_p is None else req.top_p,
                  "seed": None if req.seed is None else req.seed + choice.index}
        small = SmallLM(model, tokenizer)
        small.feeder = self.batcher
        cascade = Cascade(small, big, self.cfg.cascade, quantiles=_Scoped(self.quantiles, req.model))
        prompt, steps = choice.prompt, 0 if choice.finish else job.steps
        try:
            with waits, self.batcher.session():
                while True:
                    stream = cascade.generate_stream(prompt, allow_calls=allow, max_new_tokens=steps, **policy)
                    try:
                        for span in stream:
                            if cancel.is_set():
                                break
                            if span.source != "prompt":
                                done = choice.add(span)
                                if emit is not None:
                                    emit(choice.take())
                                if done:
                                    break
                        stream.close()  # ends decoding and the big model's work at a stop
                        break
                    except BigModelError as err:
                        if cancel.is_set():
                            break
                        # Abandoned because the big model went down: that is the reason, no fault of this call.
                        abandoned = big is not None and big.cancel is not cancel and big.cancel.is_set()
                        reason = self.big_state() if abandoned else None
                        if reason is None:
                            reason = self._big_failed(err)
                        if not req.allow_undelegated:
                            raise APIError(503, f"the big model is unavailable: {reason}", code="big_model_unavailable",
                                           retry_after_s=self.cfg.serve.retry_after_s) from None
                        # Keep what was written (the client may have it already); go on small-only.
                        choice.undelegated, allow = reason, False
                        prompt = choice.prompt + choice.raw
                        steps = max(0, steps - cascade.result.small_tokens - cascade.result.calls)
                    finally:
                        if cascade.result is not None:
                            choice.results.append(cascade.result)
                            cascade.result = None
        finally:
            if big is not None:
                big.close()
        if cancel.is_set() and not choice.finish:
            with self._lock:
                self.cancelled += 1
            return
        if choice.finish is None:
            choice.text = choice.raw
            stop = choice.results[-1].stop_reason if choice.results else "max_new_tokens"
            choice.finish = "stop" if stop == "eos" else "length"
        if req.logprobs is not None:
            choice.logprobs = self.compute.call(self._logprobs, job, choice)

    def _big_failed(self, err: BigModelError) -> str:
        if isinstance(err, BigRequestError):
            raise APIError(400, str(err), param="retrieval") from None
        if isinstance(err, BigSlow):  # this request's wait ended; the model may only be busy
            return str(err)
        if isinstance(err, BigUnavailable):
            self.health.down(str(err))
            return str(err)
        log.error("big model failed: %r", err)
        return "the big model failed on this request"

    @torch.inference_mode()
    def _logprobs(self, job: Job, choice: _Choice) -> dict:
        """OpenAI's logprobs of the completion (and the prompt with echo), scored by the small model in
        one pass over start + prompt + completion tokens: each token's log-probability under the
        real-token distribution (the softmax with <CALL> removed), the top alternatives, and (lacy's)
        P(<CALL>) before it and who wrote it. Tokens past the model's context are left out."""
        model, tokenizer = self.models[job.req.model]
        small = SmallLM(model, tokenizer)
        prompt_ids = encode(tokenizer, choice.prompt)
        ids = [small.start_id, *prompt_ids, *encode(tokenizer, choice.text)][:small.max_positions or None]
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
        p_call = torch.softmax(logits, dim=-1)[:, small.call_id]
        logits[:, small.call_id] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                                "call_probs": [], "sources": []}
        runs = choice.runs
        first = 1 if job.req.echo else 1 + len(prompt_ids)
        shift = 0 if job.req.echo else len(choice.prompt)
        offsets = [o for part, where in ((choice.prompt, 0), (choice.text, len(choice.prompt)))
                   for o in ((a + where, b + where) for a, b in tokenizer(
                       part, add_special_tokens=False, split_special_tokens=True,
                       return_offsets_mapping=True)["offset_mapping"])]
        for pos in range(first, len(ids)):
            token, (start, _) = ids[pos], offsets[pos - 1]
            out["tokens"].append(tokenizer.decode([token]))
            out["token_logprobs"].append(float(logp[pos - 1, token]))
            top = torch.topk(logp[pos - 1], job.req.logprobs) if job.req.logprobs else None
            out["top_logprobs"].append(None if top is None else {
                tokenizer.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices, strict=True)})
            out["text_offset"].append(start - shift)
            out["call_probs"].append(float(p_call[pos - 1]))
            where = start - len(choice.prompt)
            out["sources"].append("prompt" if where < 0 else next((src for end, src in runs if where < end), "small"))
        return out

    # -- answers ---------------------------------------------------------------------------------

    async def _run(self, job: Job) -> list[_Choice]:
        choices, cancel = self._choices(job), Cancel()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode, job, c, cancel) for c in choices))
        except BaseException:  # the client left (CancelledError) or a choice failed: stop the others
            cancel.set()
            raise
        return choices

    def _usage(self, job: Job, choices: list[_Choice]) -> dict:
        tokenizer = self.models[job.req.model][1]
        prompt = sum(len(encode(tokenizer, p)) for p in job.prompts)
        completion = sum(c.count(c.text) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "delegated_tokens": sum(c.delegated_tokens() for c in choices)}

    async def complete(self, job: Job) -> dict:
        """POST /v1/completions without stream: OpenAI's text_completion (+ "lacy" per choice)."""
        choices = await self._run(job)
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.req.model,
                "system_fingerprint": None,
                "choices": [{"text": (c.prompt if job.req.echo else "") + c.text, "index": c.index,
                             "logprobs": c.logprobs, "finish_reason": c.finish, "lacy": c.summary()}
                            for c in choices],
                "usage": self._usage(job, choices)}

    async def generate(self, job: Job) -> dict:
        """POST /generate: text, provenance, realised call rate, tokens per model, timings."""
        start = time.perf_counter()
        (choice,) = await self._run(job)
        out = choice.summary()
        out["spans"] = ([{"text": choice.prompt, "source": "prompt"}] if choice.prompt else []) + out["spans"]
        out.update(text=choice.prompt + choice.text, completion=choice.text, finish_reason=choice.finish,
                   model=job.req.model, timings={**out["timings"], "total": time.perf_counter() - start})
        return out

    async def stream(self, job: Job) -> AsyncIterator[str]:
        """POST /v1/completions with stream: server-sent events, chunks as the cascade writes (one per
        source), a finishing chunk per choice, usage when asked, [DONE]. An error before the first event
        is raised (the caller answers it with its status); a later one is an error event."""
        choices, cancel = self._choices(job), Cancel()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        usage = {} if job.req.stream_options and job.req.stream_options.include_usage else None

        def produce(c: _Choice) -> None:
            put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
            try:
                self._decode(job, c, cancel, emit=lambda pieces: put((c, pieces)) if pieces else None)
                put((c, None))
            except Exception as err:
                put(err if isinstance(err, APIError) else APIError(500, "internal error (logged on the server)"))
                if not isinstance(err, APIError):
                    log.exception("streaming choice failed")

        def chunk(c: _Choice, text: str, finish: str | None, **extra: Any) -> str:
            body = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.req.model,
                    "choices": [{"text": text, "index": c.index, "logprobs": None, "finish_reason": finish, **extra}]}
            if usage is not None:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        for c in choices:
            self.pool.submit(produce, c)
        started, live, echoed = False, len(choices), set()
        try:
            while live:
                item = await queue.get()
                if isinstance(item, APIError):
                    if not started:
                        raise item
                    yield f"data: {json.dumps(item.body())}\n\n"
                    return
                c, pieces = item
                if job.req.echo and c.index not in echoed:
                    echoed.add(c.index)
                    yield chunk(c, c.prompt, None, source="prompt")
                started = True
                for text, source in pieces or []:
                    yield chunk(c, text, None, source=source)
                if pieces is None:
                    live -= 1
                    for text, source in c.take():
                        yield chunk(c, text, None, source=source)
                    yield chunk(c, "", c.finish, lacy=c.summary())
            if usage is not None:
                body = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.req.model,
                        "choices": [], "usage": self._usage(job, choices)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client left (or all is done): stop decoding and big calls at once

    async def view(self, params: dict) -> str:
        """GET /view (`lacy.serve.view.view_page`)."""
        return await view_page(self, params)


async def open_stream(events: AsyncIterator[str]) -> Response:
    """A StreamingResponse of `events`, or the JSON error (with its status) if the first one fails:
    a client learns of a bad model, a 413 or a down big model before any 200 goes out."""
    try:
        first = await events.__anext__()
    except APIError as err:
        return err.response()

    async def rest() -> AsyncIterator[str]:
        yield first
        async for event in events:
            yield event

    return StreamingResponse(rest(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

