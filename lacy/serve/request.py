"""The API's request model: every rule a request must meet, and how a broken one is answered.

    job = parse(body, served)      # APIError (OpenAI's error shape, 4xx) before any work, else a Job

POST /v1/completions, in OpenAI's terms:
- honoured: model, prompt (a string or a list of strings), max_tokens, temperature / top_p / seed (the
  small model samples; the big model stays greedy), n, stop (ends decoding and the big model's work),
  stream, stream_options.include_usage, echo, logprobs (0-5), user (accepted, unused);
- accepted at their neutral value only, else 400 naming the field: best_of (= n), suffix (empty),
  frequency_penalty / presence_penalty (0), logit_bias ({});
- lacy's: call_threshold (a probability) | call_log_odds (the same threshold as log-odds, beyond what a
  probability resolves: what calibration returns) | call_rate, call_trigger (p_call | confidence),
  allow_calls, retrieval, topic (the knowledge-store title for retrieval; ignored without it),
  allow_undelegated (big model down: the small model's answer, flagged, instead of 503);
- refused: other fields, values of the wrong JSON type (no coercion: "yes" is not a boolean, true is
  not a number), NaN / Infinity, unpaired surrogates, control characters other than tab / newline /
  carriage return, bodies over serve.max_request_bytes and prompts over serve.max_prompt_chars (413),
  prompts longer than the small model's context (400 context_length_exceeded), JSON nested deeper than
  the parser recurses (400).
Defaults that differ from OpenAI's: temperature 0 (greedy, the cascade's evaluation setting).
POST /generate is lacy's own endpoint and keeps the library's meaning: `max_tokens` is
`Cascade.generate(max_new_tokens=)`, small-model steps, so it writes what the library writes.

Errors are `{"error": {"message", "type", "param", "code"}}` with 400 / 404 / 413 / 429 / 503 and never
an internal detail (traceback, path, id). A client builds its body with the same model
(`CompletionRequest(...).body()`), so what it sends is what the server accepts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lacy.cascade.policy import CALL_POLICIES, several_policies
from lacy.core.config import TRIGGERS, CascadeConfig, ServeConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lacy"
DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOPS, MAX_STOP_CHARS, MAX_TOPIC_CHARS = 4, 200, 200
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
Endpoint = Literal["completions", "generate"]

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
        """The HTTP answer, logged as one line naming the class of error: never a traceback (a client's
        bad input is not a server fault, and a traceback per request would let anyone flood the log),
        never the client's text beyond 40 characters of a field name."""
        log.info("answered %d %s (param %r)", self.status, self.code or self.body()["error"]["type"],
                 self.param if self.param is None else self.param[:40])
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
        return invalid(err.errors(), skip=1).response()  # loc = ("query", name)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal error (logged on the server)").response()


def invalid(errors: Sequence[Any], skip: int = 0) -> APIError:
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


@dataclass(frozen=True)
class Served:
    """What a request is validated against: the endpoint, the deployment's limits and defaults, and
    the small models it serves (name -> (tokenizer, context in tokens or None))."""

    endpoint: Endpoint
    serve: ServeConfig
    cascade: CascadeConfig
    retrieval: bool
    """Whether the deployment reads a knowledge store (`big.retrieval`): the default of a request."""
    models: Mapping[str, tuple[Any, int | None]]


class CompletionRequest(BaseModel):
    """POST /v1/completions and /generate. Strict JSON types; null means "the default". Validated with
    a `Served` as context (`parse`), it checks everything; without one, only what needs no deployment."""

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
    call_trigger: Literal[TRIGGERS] | None = None  # type: ignore[valid-type]
    allow_calls: bool = True
    retrieval: bool | None = None
    topic: str | None = None
    allow_undelegated: bool = False


    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> CompletionRequest:
        served: Served | None = (info.context or {}).get("served")
        prompts, stops, n = self.prompts(), self.stops(), self.n or 1
        if served is not None and served.endpoint == "generate":
            for name, bad in (("stream", bool(self.stream)), ("prompt", not isinstance(self.prompt, str)),
                              ("n", n != 1), ("logprobs", self.logprobs is not None)):
                if bad:
                    raise APIError(400, f"/generate takes one prompt string and one choice, without stream or "
                                        f"logprobs ('{name}'); use /v1/completions", param=name)
        neutral = {"best_of": self.best_of in (None, n), "suffix": not self.suffix,
                   "frequency_penalty": not self.frequency_penalty, "presence_penalty": not self.presence_penalty,
                   "logit_bias": not self.logit_bias}
        for name, ok in neutral.items():
            if not ok:
                raise APIError(400, f"'{name}' is not supported by the cascade; send it at its neutral value or "
                                    "leave it out", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if self.stream and self.logprobs is not None:
            raise APIError(400, "'logprobs' is not supported with 'stream'", param="logprobs")
        if len(policies := self.policies()) > 1:
            raise APIError(400, several_policies(policies), param=policies[-1])
        if not prompts:
            raise APIError(400, "'prompt' must not be an empty list", param="prompt")
        if served is not None and len(prompts) * n > served.serve.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={n} choices exceed the limit of "
                                f"{served.serve.max_choices}", param="n")
        for i, prompt in enumerate(prompts):
            if served is not None and len(prompt) > served.serve.max_prompt_chars:
                raise APIError(413, f"prompt is {len(prompt)} characters; the limit is {served.serve.max_prompt_chars}",
                               param="prompt", code="request_too_large")
            _check_text(prompt, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        if len(stops) > MAX_STOPS or any(not 0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise APIError(400, f"'stop' takes at most {MAX_STOPS} non-empty sequences of at most "
                                f"{MAX_STOP_CHARS} characters", param="stop")
        for stop in stops:
            _check_text(stop, "stop")
        for name in ("model", "topic", "user"):
            if (value := getattr(self, name)) is not None:
                if len(value) > MAX_TOPIC_CHARS:
                    raise APIError(400, f"'{name}' is longer than {MAX_TOPIC_CHARS} characters", param=name)
                _check_text(value, name)
        if served is not None:
            self._deployment_rules(served)
        return self

    def _deployment_rules(self, served: Served) -> None:
        """What depends on the deployment: its limits, models, knowledge store and default policy."""
        s, prompts = served.serve, self.prompts()
        if self.model not in served.models:
            raise model_not_found(self.model, served.models)
        if (max_tokens := DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens) > s.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit {s.max_tokens_limit}", param="max_tokens")
        tokenizer, context = served.models[self.model]
        for prompt in prompts:
            if context is not None and (length := 1 + len(encode(tokenizer, prompt))) > context:
                raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                    f"{length}", param="prompt", code="context_length_exceeded")
        if self.retrieval and not served.retrieval:
            raise APIError(400, "retrieval was asked for but this deployment has no knowledge store "
                                "(deploy with big.retrieval: true)", param="retrieval")
        c = served.cascade
        if self.allow_calls and not self.policies() and c.call_threshold is None and c.call_log_odds is None \
                and c.call_rate is None:
            raise APIError(400, "no call policy: send call_threshold, call_log_odds or call_rate (or "
                                "allow_calls: false)", param="call_rate")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def policies(self) -> list[str]:
        """The call-policy fields this request sets."""
        return [name for name in CALL_POLICIES if getattr(self, name) is not None]

    def body(self) -> dict:
        """The JSON body a client sends: the fields set, nulls left out."""
        return self.model_dump(exclude_none=True, exclude_unset=True)


def openapi_body(model: type[BaseModel]) -> dict:
    """An OpenAPI requestBody of `model`'s JSON schema, its `$defs` written inline (FastAPI does not
    resolve them in `openapi_extra`): the contract of a route that parses its body itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"required": True, "content": {"application/json": {"schema": inline(schema)}}}


def model_not_found(name: str, models: Mapping[str, Any]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; served: {sorted(models)}", param="model",
                    code="model_not_found")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as the API counts them (special-token strings stay text)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclass
class Job:
    """A validated request: everything decoding needs, decided before any work."""

    req: CompletionRequest
    endpoint: Endpoint
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


def parse(body: bytes | dict, served: Served) -> Job:
    """Validate a request completely (APIError otherwise), before any decoding or streaming."""
    data = body if isinstance(body, dict) else decode_json(body, served.serve.max_request_bytes)
    try:
        req = CompletionRequest.model_validate(data, context={"served": served})
    except ValidationError as err:
        raise invalid(err.errors()) from None
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    retrieval = served.retrieval if req.retrieval is None else req.retrieval
    trigger = req.call_trigger or served.cascade.trigger
    if served.endpoint == "generate":
        return Job(req, "generate", req.prompts(), 1, None, max_tokens, req.stops(), retrieval, trigger)
    # A completion's max_tokens counts tokens the client gets; 4 x that + 16 small steps bound the work.
    return Job(req, "completions", req.prompts(), req.n or 1, max_tokens, 4 * max_tokens + 16, req.stops(),
               retrieval, trigger)


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
        why = "an integer has too many digits" if "integer string conversion" in str(err) else str(err)
        raise APIError(400, f"the request body is not valid JSON ({why})", code="invalid_json") from None
    except RecursionError:  # nesting deeper than the parser recurses: still the client's input
        raise APIError(400, "the request body is not valid JSON (nested too deeply)", code="invalid_json") from None
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
