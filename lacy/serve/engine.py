"""The cascade as an OpenAI-compatible service, without Ray: what `services/cascade.py` deploys.

    engine = CascadeEngine(cfg, LocalBig(BigSessions(cfg)))       # in process (tests, benches)
    engine = CascadeEngine(cfg, HandleBig(handle, timeout_s))     # a remote BigSessions (services/)
    job = engine.parse(body, "completions")                         # APIError (4xx) before any work
    body = await engine.complete(job)                               # OpenAI text_completion
    response = await open_stream(engine.stream(job))                # server-sent events, or the error

POST /v1/completions, in OpenAI's terms:
- honoured: model, prompt (a string or a list of strings), max_tokens, temperature / top_p / seed (the
  small model samples; the big model stays greedy), n, stop (ends decoding and the big model's work),
  stream, stream_options.include_usage, echo, logprobs (0-5), user (accepted, unused);
- accepted at their neutral value only, else 400 naming the field: best_of (= n), suffix (empty),
  frequency_penalty / presence_penalty (0), logit_bias ({});
- lacy's: call_threshold (a probability) | call_log_odds (the same threshold as log-odds, beyond what a
  probability resolves: what calibration returns) | call_rate, call_trigger (p_call | confidence),
  allow_calls, retrieval, topic
  (the knowledge-store title for retrieval; ignored without it), allow_undelegated (big model down:
  the small model's answer, flagged, instead of 503);
- refused: other fields, values of the wrong JSON type (no coercion: "yes" is not a boolean, true is
  not a number), NaN / Infinity, unpaired surrogates, control characters other than tab / newline /
  carriage return, bodies over serve.max_request_bytes and prompts over serve.max_prompt_chars (413),
  prompts longer than the small model's context (400 context_length_exceeded).
Defaults that differ from OpenAI's: temperature 0 (greedy, the cascade's evaluation setting).

Tokens: `usage` counts tokens of the served small model's tokenizer, the completion as the client
gets it re-tokenised; `usage.delegated_tokens` are those whose first character the big model wrote.
`max_tokens` bounds that count (the cascade's step budget, 4 x max_tokens + 16, is only a safety
bound). POST /generate is lacy's own endpoint and keeps the library's meaning: `max_tokens` is
`Cascade.generate(max_new_tokens=)`, small-model steps, so it writes what the library writes.

Errors are `{"error": {"message", "type", "param", "code"}}` with 400 / 404 / 413 / 429 / 503 and
never an internal detail (traceback, path, id); what went wrong inside is logged. Validation runs
before any decoding and before a stream starts; a request's failure never fails another (the big
side isolates each call of a batch, the small side each step: lacy.cascade.batching).

Call-rate policy: one running quantile per (model, trigger, rate), shared by every request of a
replica (`Quantiles`, thread-safe, at most serve.max_call_rates of them). With serve.quantile_scope
"cluster" the Serve app holds them in one actor instead, so a target rate means the same with one
replica or four (services.cascade passes it in as `quantiles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lacy.cascade.batching import BigCall, BigSessions, FeedBatcher, device_for, raise_for_failure
from lacy.cascade.engine import (
    CALL_POLICIES,
    BigModelError,
    BigRequestError,
    BigUnavailable,
    Cascade,
    CascadeResult,
    Quantiles,
    SmallLM,
    Span,
    several_policies,
)
from lacy.core import storage
from lacy.core.compute import compute_thread
from lacy.core.config import LacyConfig, to_dict
from lacy.model import count_parameters, load_small_model
from lacy.report import generation_block, page_html

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lacy"
DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOPS, MAX_STOP_CHARS, MAX_TOPIC_CHARS = 4, 200, 200
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# ----------------------------------------------------------------------------------------------
# Errors

_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "service_unavailable_error"}


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, _safe(message), param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {} if self.retry_after_s is None else {"retry-after": str(math.ceil(self.retry_after_s))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _safe(text: str, limit: int = 1000) -> str:
    """Text any JSON encoder can write (unpaired surrogates escaped), bounded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def install_error_handlers(app: FastAPI) -> None:
    """Every error of `app` in OpenAI's shape; unexpected ones logged and answered without detail."""

    @app.exception_handler(APIError)
    async def _api(request: Request, err: APIError) -> Response:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
                        ).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> Response:
        return _invalid(err.errors(), skip=1).response()  # loc = ("query", name)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal error (logged on the server)").response()


def _invalid(errors: Sequence[Any], skip: int = 0) -> APIError:
    """The first pydantic error as a 400 naming the field (never echoing the value)."""
    first = errors[0]
    loc = [str(p) for p in first["loc"][skip:]]
    param = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    path = ".".join(p for p in loc if not p.startswith(("str", "list[", "int", "float")))
    return APIError(400, f"Invalid value for '{path or param}': {first['msg']}", param=param)


# ----------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions and /generate. Strict JSON types; null means "the default"."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    prompt: str | list[str]
    model: str = DEFAULT_MODEL
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    call_threshold: float | None = Field(None, ge=0.0, le=1.0)
    call_log_odds: float | None = None
    call_rate: float | None = Field(None, ge=0.0, le=1.0)
    call_trigger: Literal["p_call", "confidence"] | None = None
    allow_calls: bool = True
    retrieval: bool | None = None
    topic: str | None = None
    allow_undelegated: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a double")
    return value


def decode_json(body: bytes, max_bytes: int) -> dict:
    """The request body as a JSON object: 413 over `max_bytes`, 400 for anything that is not strict JSON."""
    if len(body) > max_bytes:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {max_bytes}", code="request_too_large")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes` (never read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is {declared} bytes; the limit is {max_bytes}", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise APIError(413, f"request body is over the limit of {max_bytes} bytes", code="request_too_large")
    return bytes(body)


def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' contains an unpaired UTF-16 surrogate", param=param) from None
    if (bad := _CONTROL.search(value)) is not None:
        raise APIError(400, f"'{param}' contains the control character U+{ord(bad.group()):04X}; only tab, "
                            "newline and carriage return are allowed", param=param)


@dataclass
class Job:
    """A validated request: everything decoding needs, decided before any work."""

    req: CompletionRequest
    endpoint: Literal["completions", "generate"]
    prompts: list[str]
    n: int
    max_tokens: int | None
    """Completion tokens the client may get (None: /generate, where max_tokens is `steps`)."""
    steps: int
    stops: list[str]
    retrieval: bool
    trigger: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


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
        return len(_encode(self.tokenizer, text))

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


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ----------------------------------------------------------------------------------------------
# The big model side


class BigSession(Protocol):
    """The cascade's `big` for one request: `continue_text` plus token counters; `close()` at the end."""

    tokens_processed: int
    tokens_generated: int

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8,
                      topic: str | None = None) -> str: ...

    def close(self) -> None: ...


class BigBackend(Protocol):
    """Where big-model calls go: `session` for a request (its cancel event ends waiting), `ping` for health."""

    def session(self, retrieval: bool, cancel: threading.Event) -> BigSession: ...

    def ping(self, timeout_s: float) -> dict: ...


class LocalBig:
    """A `BigBackend` in this process (tests, benches): every call goes straight to `BigSessions`."""

    def __init__(self, sessions: BigSessions) -> None:
        self.sessions = sessions

    def session(self, retrieval: bool, cancel: threading.Event) -> BigSession:
        return _LocalSession(self.sessions, retrieval)

    def ping(self, timeout_s: float) -> dict:
        return self.sessions.info()


class _LocalSession:
    def __init__(self, sessions: BigSessions, retrieval: bool) -> None:
        self.sessions, self.retrieval, self.id = sessions, retrieval, uuid.uuid4().hex
        self.tokens_processed = self.tokens_generated = 0

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8,
                      topic: str | None = None) -> str:
        out = raise_for_failure(self.sessions.continue_many(
            [BigCall(self.id, text, unit, max_tokens, self.retrieval, topic)])[0])
        self.tokens_processed += out["processed"]
        self.tokens_generated += out["generated"]
        return out["text"]

    def close(self) -> None:
        self.sessions.end_session(self.id)


class HandleBig:
    """A `BigBackend` over a handle to remote `BigSessions` (services.cascade: the BigModel deployment's
    DeploymentHandle): `handle.continue_text.remote(call)`, `.end_session.remote(id)`, `.info.remote()`,
    each answering something with `result(timeout_s=)` and `cancel()`. A call waits at most `timeout_s`,
    in short polls, so a client that leaves cancels it at once. Exceptions in `overloaded` mean busy
    (503, the model is not marked down); any other means its replica did not answer (BigUnavailable)."""

    def __init__(self, handle: Any, timeout_s: float, overloaded: tuple[type[BaseException], ...] = (),
                 poll_s: float = 0.2) -> None:
        self.handle, self.timeout_s, self.overloaded, self.poll_s = handle, timeout_s, overloaded, poll_s
        self.waiting: Callable[[], Any] = contextlib.nullcontext
        """Entered while a call waits (the engine sets its batcher's `paused`)."""

    def session(self, retrieval: bool, cancel: threading.Event) -> BigSession:
        return _HandleSession(self, retrieval, cancel)

    def ping(self, timeout_s: float) -> dict:
        return self.handle.info.remote().result(timeout_s=timeout_s)


class _HandleSession:
    def __init__(self, big: HandleBig, retrieval: bool, cancel: threading.Event) -> None:
        self.big, self.retrieval, self.cancel, self.id = big, retrieval, cancel, uuid.uuid4().hex
        self.tokens_processed = self.tokens_generated = 0

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8, topic: str | None = None) -> str:
        call = BigCall(self.id, text, unit, max_tokens, self.retrieval, topic, sent=time.time())
        response = self.big.handle.continue_text.remote(call)
        deadline = time.monotonic() + self.big.timeout_s
        retried = False
        with self.big.waiting():  # other requests' small-model steps need not wait for this call
            while True:  # bounded: the deadline, or the client leaving
                if self.cancel.is_set() or time.monotonic() > deadline:
                    response.cancel()
                    if self.cancel.is_set():
                        raise BigModelError("cancelled: the client left")
                    raise BigUnavailable(f"no answer within serve.big_timeout_s ({self.big.timeout_s:g} s)")
                try:
                    out = raise_for_failure(response.result(timeout_s=self.big.poll_s))
                    break
                except TimeoutError:
                    continue
                except BigModelError:
                    raise
                except self.big.overloaded:
                    raise BigModelError("the big model is overloaded") from None
                except Exception as err:
                    if not retried:
                        # A replica that just died may still be in the handle's routing table for a
                        # moment after its successor answers health probes; the call carries the whole
                        # text, so sending it once more (routed afresh) is safe.
                        log.warning("big-model call failed (%r); retrying once", err)
                        retried, response = True, self.big.handle.continue_text.remote(call)
                        continue
                    log.warning("big-model call failed again: %r", err)
                    raise BigUnavailable("its replica did not answer") from None
        self.tokens_processed += out["processed"]
        self.tokens_generated += out["generated"]
        return out["text"]

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a replica that is gone has forgotten the session anyway
            self.big.handle.end_session.remote(self.id)


class BigHealth:
    """Whether the big model answers, as last seen by a call or a probe (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = "not probed yet"
        self.info: dict | None = None
        self.since = time.monotonic()

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
            self.reason = reason


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

    def __init__(self, cfg: LacyConfig, big: BigBackend | None, quantiles: Any = None) -> None:
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
        self.health = BigHealth()
        self.cancelled = 0
        """Choices whose client left before they were done (decoding and big calls stopped)."""
        self.started = int(time.time())
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if big is not None and s.big_enabled:
            threading.Thread(target=self._watch, name="big-health", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- health --------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Ask the big model for its info now; True when it answered."""
        assert self.big is not None
        try:
            self.health.up(self.big.ping(self.cfg.serve.health_timeout_s))
            return True
        except Exception as err:
            self.health.down(f"no answer to a health probe ({type(err).__name__})")
            return False

    def _watch(self) -> None:
        # Probe often while down, so requests flow again soon after the replica is back.
        while not self._closed.is_set():
            up = self.probe()
            self._closed.wait(self.cfg.serve.health_interval_s if up else min(1.0, self.cfg.serve.health_interval_s))

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
            raise APIError(404, f"The model '{name}' does not exist; served: {sorted(self.models)}",
                           param="model", code="model_not_found")
        model, tokenizer = self.models[name]
        return {"id": name, "object": "model", "created": self.started, "owned_by": "lacy",
                "parameters": count_parameters(model), "context": SmallLM(model, tokenizer).max_positions,
                "vocab_size": len(tokenizer), "device": self.device}

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card(n) for n in self.models],
                "big_model": None if self.big_state() else self.health.info, "cascade": to_dict(self.cfg.cascade)}

    # -- validation ------------------------------------------------------------------------------

    async def parse_request(self, request: Request, endpoint: Literal["completions", "generate"]) -> Job:
        """`parse` of an HTTP request's body (read no further than serve.max_request_bytes)."""
        return self.parse(await read_body(request, self.cfg.serve.max_request_bytes), endpoint)

    def parse(self, body: bytes | dict, endpoint: Literal["completions", "generate"]) -> Job:
        """Validate a request completely (APIError otherwise), before any decoding or streaming."""
        s = self.cfg.serve
        data = body if isinstance(body, dict) else decode_json(body, s.max_request_bytes)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as err:
            raise _invalid(err.errors()) from None
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        n = req.n or 1
        if endpoint == "generate":
            for name, bad in (("stream", bool(req.stream)), ("prompt", len(prompts) != 1 or not isinstance(
                    req.prompt, str)), ("n", n != 1), ("logprobs", req.logprobs is not None)):
                if bad:
                    raise APIError(400, f"/generate takes one prompt string and one choice, without stream or "
                                        f"logprobs ('{name}'); use /v1/completions", param=name)
        neutral = {"best_of": req.best_of in (None, n), "suffix": not req.suffix,
                   "frequency_penalty": not req.frequency_penalty, "presence_penalty": not req.presence_penalty,
                   "logit_bias": not req.logit_bias}
        for name, ok in neutral.items():
            if not ok:
                raise APIError(400, f"'{name}' is not supported by the cascade; send it at its neutral value or "
                                    "leave it out", param=name)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if req.stream and req.logprobs is not None:
            raise APIError(400, "'logprobs' is not supported with 'stream'", param="logprobs")
        policies = [n for n in CALL_POLICIES if getattr(req, n) is not None]
        if len(policies) > 1:
            raise APIError(400, several_policies(policies), param=policies[-1])
        if not prompts:
            raise APIError(400, "'prompt' must not be an empty list", param="prompt")
        if len(prompts) * n > s.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={n} choices exceed the limit of {s.max_choices}",
                           param="n")
        for i, prompt in enumerate(prompts):
            if len(prompt) > s.max_prompt_chars:
                raise APIError(413, f"prompt is {len(prompt)} characters; the limit is {s.max_prompt_chars}",
                               param="prompt", code="request_too_large")
            _check_text(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        if len(stops) > MAX_STOPS or any(not 0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise APIError(400, f"'stop' takes at most {MAX_STOPS} non-empty sequences of at most "
                                f"{MAX_STOP_CHARS} characters", param="stop")
        for stop in stops:
            _check_text(stop, "stop")
        for name in ("model", "topic", "user"):
            if (value := getattr(req, name)) is not None:
                if len(value) > MAX_TOPIC_CHARS:
                    raise APIError(400, f"'{name}' is longer than {MAX_TOPIC_CHARS} characters", param=name)
                _check_text(value, name)
        if req.model not in self.models:
            self.model_card(req.model)  # 404 naming the served models
        model, tokenizer = self.models[req.model]
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens > s.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit {s.max_tokens_limit}", param="max_tokens")
        context = SmallLM(model, tokenizer).max_positions
        for prompt in prompts:
            if context is not None and (length := 1 + len(_encode(tokenizer, prompt))) > context:
                raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                    f"{length}", param="prompt", code="context_length_exceeded")
        retrieval = self.cfg.big.retrieval if req.retrieval is None else req.retrieval
        if retrieval and not self.cfg.big.retrieval:
            raise APIError(400, "retrieval was asked for but this deployment has no knowledge store "
                                "(deploy with big.retrieval: true)", param="retrieval")
        c = self.cfg.cascade
        if req.allow_calls and not policies and c.call_threshold is None and c.call_log_odds is None \
                and c.call_rate is None:
            raise APIError(400, "no call policy: send call_threshold, call_log_odds or call_rate (or "
                                "allow_calls: false)", param="call_rate")
        if endpoint == "generate":
            return Job(req, endpoint, prompts, 1, None, max_tokens, stops, retrieval,
                       req.call_trigger or self.cfg.cascade.trigger)
        return Job(req, endpoint, prompts, n, max_tokens, 4 * max_tokens + 16, stops, retrieval,
                   req.call_trigger or self.cfg.cascade.trigger)

    # -- decoding --------------------------------------------------------------------------------

    def _choices(self, job: Job) -> list[_Choice]:
        tokenizer = self.models[job.req.model][1]
        return [_Choice(i * job.n + j, prompt, tokenizer, job.stops, job.max_tokens)
                for i, prompt in enumerate(job.prompts) for j in range(job.n)]

    def _decode(self, job: Job, choice: _Choice, cancel: threading.Event,
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
        if allow:
            assert self.big is not None
            big = self.big.session(job.retrieval, cancel)
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
            with self.batcher.session():
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
        prompt_ids = _encode(tokenizer, choice.prompt)
        ids = [small.start_id, *prompt_ids, *_encode(tokenizer, choice.text)][:small.max_positions or None]
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
        choices, cancel = self._choices(job), threading.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode, job, c, cancel) for c in choices))
        except BaseException:  # the client left (CancelledError) or a choice failed: stop the others
            cancel.set()
            raise
        return choices

    def _usage(self, job: Job, choices: list[_Choice]) -> dict:
        tokenizer = self.models[job.req.model][1]
        prompt = sum(len(_encode(tokenizer, p)) for p in job.prompts)
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
        choices, cancel = self._choices(job), threading.Event()
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
        """GET /view: a prompt form, and the generation with delegated spans coloured."""
        form = ("<form method='get'>" + " ".join(
            f"{label} <input name='{name}' size='{size}' value='{_attr(params.get(name))}'>"
            for name, label, size in (("prompt", "", 40), ("topic", "topic", 16), ("max_tokens", "tokens", 3),
                                      ("call_rate", "call rate", 4))) + " <button>generate</button></form>")
        if not params.get("prompt"):
            return page_html("lacy cascade", form)
        body = {k: v for k, v in params.items() if v is not None}
        out = await self.generate(self.parse({**body, "allow_undelegated": True}, "generate"))
        meta = (f"{out['calls']} calls, realised call rate {out['call_rate']:.2f}, {out['small_tokens']} small + "
                f"{out['big_tokens']} big tokens"
                + (f" — undelegated: {out['undelegated_reason']}" if out["undelegated_reason"] else ""))
        spans = [(s["text"], s["source"]) for s in out["spans"]]
        return page_html("lacy cascade", form + generation_block(spans, meta))


def _attr(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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

