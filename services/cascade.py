"""Ray Serve: the cascade as two composed deployments behind HTTP.

`SmallModel` (the ingress: our checkpoint, decoding and the HTTP API) holds a `DeploymentHandle` to
`BigModel` (SmolLM2 or any local HF causal LM, optionally retrieval-augmented). Decoding is
`lacy.cascade.Cascade`; this file only wires it to HTTP and to the remote big model.

    serve run services.cascade:app config=configs/tiny.yaml                 # 127.0.0.1:8000
    serve run services.cascade:app config=configs/tiny.yaml overrides="--big.retrieval true"
    serve deploy services/serve_config.yaml                                  # on a running cluster
    python -m services.cascade --config configs/tiny.yaml                    # same, blocking

    curl -s 127.0.0.1:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "Marie Curie was born in", "max_tokens": 24, "call_rate": 0.22}'

API: POST /v1/completions (OpenAI shape, `stream` as server-sent events, plus call_threshold /
call_rate), POST /generate (text, spans with provenance, realised call rate, timings), GET /view (HTML
with delegated spans coloured), GET /healthz, GET /v1/models.
"""

from __future__ import annotations

import asyncio
import html
import json
import shlex
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from lacy.batched import FeedBatcher, continue_batch
from lacy.cascade import BigLM, BigModelError, Cascade, CascadeResult, SmallLM, Span
from lacy.config import LacyConfig, from_dict, load_config, to_dict
from lacy.model import load_big_model
from lacy.report import generation_block, page_html

DEFAULT_MODEL = "lacy"


class CompletionRequest(BaseModel):
    """One request; unknown fields are refused (422) so a typo never silently changes the policy."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str = DEFAULT_MODEL
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    stop: str | list[str] | None = None
    stream: bool = False
    call_threshold: float | None = Field(None, ge=0.0, le=1.0)
    call_rate: float | None = Field(None, ge=0.0, le=1.0)
    allow_calls: bool = True
    retrieval: bool | None = None
    topic: str | None = None
    allow_undelegated: bool = False
    # OpenAI fields accepted at the only values greedy decoding supports.
    n: int = Field(1, ge=1, le=1)
    top_p: float = Field(1.0, ge=1.0, le=1.0)
    logprobs: None = None
    echo: bool = False
    user: str | None = None

    @model_validator(mode="after")
    def _one_policy(self) -> CompletionRequest:
        if self.temperature != 0.0:
            raise ValueError("only greedy decoding is served: temperature must be 0")
        if self.call_threshold is not None and self.call_rate is not None:
            raise ValueError("give call_threshold or call_rate, not both")
        return self


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]


def _cut_at_stop(completion: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=-1)
    return (completion[:cut], True) if cut >= 0 else (completion, False)


def _set_threads(cfg: LacyConfig) -> None:
    if cfg.serve.torch_threads is not None:
        torch.set_num_threads(cfg.serve.torch_threads)


# ----------------------------------------------------------------------------------------------
# The big model


@serve.deployment(max_ongoing_requests=16)
class BigModel:
    """Continue texts for many request sessions, each with its own KV cache (LRU-bounded)."""

    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(LacyConfig, config)
        _set_threads(self.cfg)
        dtype = torch.bfloat16 if self.cfg.big.dtype == "bfloat16" else torch.float32
        self.model, self.tokenizer = load_big_model(self.cfg.big.path, dtype)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.store = None
        if self.cfg.big.retrieval:
            from lacy.knowledge import SqlitePassageStore

            self.store = SqlitePassageStore(self.cfg.knowledge.db_path,
                                            common_share=self.cfg.knowledge.common_share)
        self.sessions: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def _session(self, session: str, retrieval: bool) -> Any:
        with self.lock:
            key = f"{session}:{int(retrieval)}"
            if key not in self.sessions:
                lm: Any = BigLM(self.model, self.tokenizer)
                if retrieval:
                    if self.store is None:
                        raise ValueError("retrieval was asked for but this BigModel has no knowledge store "
                                         "(deploy with big.retrieval: true)")
                    from lacy.knowledge import RetrievalBigLM

                    k = self.cfg.knowledge
                    lm = RetrievalBigLM(lm, self.store, k.top_k, k.passage_chars, k.query)
                self.sessions[key] = lm
                while len(self.sessions) > self.cfg.serve.big_sessions:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(key)
            return self.sessions[key]

    async def continue_text(self, session: str, text: str, unit: str, max_tokens: int,
                            retrieval: bool = False, topic: str | None = None) -> dict:
        return await self._batched((session, text, unit, max_tokens, retrieval, topic))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, calls: list[tuple]) -> list[dict]:
        """Concurrent requests' calls decoded as one batch (each keeps its own KV cache)."""
        return await asyncio.to_thread(self._continue_many, calls)

    def _continue_many(self, calls: list[tuple]) -> list[dict]:
        sessions, bases, texts, contexts = [], [], [], []
        for session, text, _, _, retrieval, topic in calls:
            lm = self._session(session, retrieval)
            sessions.append(lm)
            # A retrieval session contributes its passages as context for the plain model underneath.
            base, context = (lm.big, lm.context_for(text, "", topic)) if retrieval else (lm, "")
            bases.append(base)
            texts.append(text)
            contexts.append(context)
        before = [(lm.tokens_processed, lm.tokens_generated) for lm in sessions]
        outs = continue_batch(bases, texts, units=[c[2] for c in calls], max_tokens=[c[3] for c in calls],
                              contexts=contexts)
        return [{"text": out, "processed": lm.tokens_processed - processed,
                 "generated": lm.tokens_generated - generated}
                for out, lm, (processed, generated) in zip(outs, sessions, before, strict=True)]

    def end_session(self, session: str) -> None:
        with self.lock:
            for key in [k for k in self.sessions if k.startswith(f"{session}:")]:
                del self.sessions[key]

    def info(self) -> dict:
        return {"path": self.cfg.big.path, "parameters": sum(p.numel() for p in self.model.parameters()),
                "retrieval_available": self.store is not None, "sessions": len(self.sessions)}


class RemoteBig:
    """The cascade's big model as calls to the BigModel deployment, one KV-cache session per request."""

    def __init__(self, handle: DeploymentHandle | None, retrieval: bool, timeout_s: float,
                 waiting: Callable[[], Any]) -> None:
        self.handle, self.retrieval, self.timeout_s, self.waiting = handle, retrieval, timeout_s, waiting
        self.session = uuid.uuid4().hex
        self.tokens_processed = 0
        self.tokens_generated = 0

    def continue_text(self, text: str, *, unit: str = "word", max_tokens: int = 8,
                      topic: str | None = None) -> str:
        if self.handle is None:
            raise BigModelError("no big model is deployed (serve.big_enabled is false)")
        response = self.handle.continue_text.remote(self.session, text, unit, max_tokens,
                                                    self.retrieval, topic)
        with self.waiting():  # other requests' small-model steps need not wait for this one
            out = response.result(timeout_s=self.timeout_s)
        self.tokens_processed += out["processed"]
        self.tokens_generated += out["generated"]
        return out["text"]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.end_session.remote(self.session)


# ----------------------------------------------------------------------------------------------
# The small model and the HTTP API

api = FastAPI(title="lacy cascade", description="A small LM that delegates facts to a big LM with <CALL>.")


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class SmallModel:
    def __init__(self, big: DeploymentHandle | None, config: dict) -> None:
        self.cfg = from_dict(LacyConfig, config)
        _set_threads(self.cfg)
        self.big = big
        # Each request decodes in its own thread; their small-model steps meet in one batcher.
        self.pool = ThreadPoolExecutor(self.cfg.serve.concurrency, thread_name_prefix="cascade")
        self.batcher = FeedBatcher(self.cfg.serve.small_batch, self.cfg.serve.small_batch_wait_s)
        self.models: dict[str, tuple[Any, Any]] = {}
        paths = {DEFAULT_MODEL: self.cfg.serve.small_path, **self.cfg.serve.models}
        loaded: dict[str, tuple[Any, Any]] = {}
        for name, path in paths.items():
            if path not in loaded:  # a path served under two names is loaded once
                loaded[path] = load_big_model(path)  # any local HF dir, safetensors only
            self.models[name] = loaded[path]
        # Running quantiles of P(<CALL>) per (model, rate), shared by all requests so a requested
        # call rate holds across requests, not only within one.
        self.quantiles: dict[str, dict] = {name: {} for name in self.models}

    # -- decoding ------------------------------------------------------------------------------

    def _cascade(self, req: CompletionRequest) -> tuple[Cascade, RemoteBig]:
        if req.model not in self.models:
            raise HTTPException(404, f"unknown model {req.model!r}; served: {sorted(self.models)}")
        if len(req.prompt) > self.cfg.serve.max_prompt_chars:
            raise HTTPException(413, f"prompt is {len(req.prompt)} characters; the limit is "
                                     f"{self.cfg.serve.max_prompt_chars}")
        if req.max_tokens > self.cfg.serve.max_tokens_limit:
            raise HTTPException(422, f"max_tokens {req.max_tokens} exceeds the limit "
                                     f"{self.cfg.serve.max_tokens_limit}")
        model, tokenizer = self.models[req.model]
        retrieval = self.cfg.big.retrieval if req.retrieval is None else req.retrieval
        big = RemoteBig(self.big if self.cfg.serve.big_enabled else None, retrieval,
                        self.cfg.serve.big_timeout_s, self.batcher.paused)
        small = SmallLM(model, tokenizer)
        small.feeder = self.batcher
        cascade = Cascade(small, big, self.cfg.cascade, quantiles=self.quantiles[req.model])
        return cascade, big

    def _policy(self, req: CompletionRequest, allow_calls: bool) -> dict:
        return {"call_threshold": req.call_threshold, "call_rate": req.call_rate,
                "max_new_tokens": req.max_tokens, "allow_calls": allow_calls and req.allow_calls,
                "topic": req.topic}

    def _run(self, req: CompletionRequest) -> tuple[CascadeResult, str | None]:
        """The cascade's result, and why it is undelegated (None when the big model answered)."""
        cascade, big = self._cascade(req)
        try:
            with self.batcher.session():
                return cascade.generate(req.prompt, **self._policy(req, True)), None
        except BigModelError as err:
            if not req.allow_undelegated:
                raise HTTPException(503, f"big model unavailable: {err}") from err
            with self.batcher.session():
                return cascade.generate(req.prompt, **self._policy(req, False)), str(err)
        except ValueError as err:  # e.g. a prompt longer than the small model's context
            raise HTTPException(422, str(err)) from err
        finally:
            big.close()

    @staticmethod
    def _summary(result: CascadeResult, prompt: str, stops: list[str]) -> dict:
        completion, stopped = _cut_at_stop(result.text[len(prompt):], stops)
        spans, left = [], len(prompt) + len(completion)
        for span in result.spans:  # provenance of the returned text only
            piece = span.text[:left]
            left -= len(piece)
            if piece:
                spans.append({"text": piece, "source": span.source})
        finish = "stop" if stopped or result.stop_reason == "eos" else "length"
        return {"completion": completion, "spans": spans, "finish_reason": finish, "calls": result.calls,
                "call_rate": result.call_rate, "decision_points": result.decision_points,
                "small_tokens": result.small_tokens, "big_tokens": result.big_tokens,
                "tokens_processed": result.tokens_processed, "timings": result.timings,
                "stop_reason": result.stop_reason}

    async def _in_pool(self, req: CompletionRequest) -> tuple[CascadeResult, str | None]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, req)

    # -- endpoints -------------------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> dict:
        b = self.batcher  # how well concurrent requests' small-model steps share forward passes
        return {"status": "ok", "models": sorted(self.models), "big_enabled": self.cfg.serve.big_enabled,
                "small_passes": b.batches, "small_steps": b.steps, "decoding": b.active}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        big = await self.big.info.remote() if (self.big is not None and self.cfg.serve.big_enabled) else None
        data = []
        for name, (model, tokenizer) in self.models.items():
            data.append({"id": name, "object": "model", "owned_by": "lacy",
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "context": model.config.n_positions, "vocab_size": len(tokenizer),
                         "path": self.cfg.serve.small_path if name == DEFAULT_MODEL
                         else self.cfg.serve.models[name]})
        return {"object": "list", "data": data, "big_model": big,
                "cascade": to_dict(self.cfg.cascade)}

    @api.post("/generate")
    async def generate(self, req: CompletionRequest) -> dict:
        if req.stream:
            raise HTTPException(422, "/generate does not stream; use /v1/completions with stream: true")
        start = time.perf_counter()
        result, undelegated = await self._in_pool(req)
        out = self._summary(result, req.prompt, _stops(req.stop))
        out.update(text=req.prompt + out["completion"], model=req.model, delegated=undelegated is None,
                   undelegated_reason=undelegated)
        out["timings"] = {**out["timings"], "total": time.perf_counter() - start}
        return out

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        created = int(time.time())
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(self._sse(req, cid, created), media_type="text/event-stream")
        result, undelegated = await self._in_pool(req)
        out = self._summary(result, req.prompt, _stops(req.stop))
        tokenizer = self.models[req.model][1]
        prompt_tokens = len(tokenizer(req.prompt)["input_ids"])
        completion_tokens = result.small_tokens + result.big_tokens
        return {
            "id": cid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"text": (req.prompt if req.echo else "") + out["completion"], "index": 0,
                         "logprobs": None, "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "lacy": {k: out[k] for k in ("spans", "calls", "call_rate", "decision_points", "small_tokens",
                                         "big_tokens", "timings")}
                    | {"delegated": undelegated is None, "undelegated_reason": undelegated},
        }

    async def _sse(self, req: CompletionRequest, cid: str, created: int) -> Any:
        """Server-sent events: one chunk per span as the cascade writes it, then a summary and [DONE]."""
        cascade, big = self._cascade(req)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()

        def produce() -> None:
            try:
                with self.batcher.session():
                    for span in cascade.generate_stream(req.prompt, **self._policy(req, True)):
                        loop.call_soon_threadsafe(queue.put_nowait, span)
            except Exception as err:  # reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                big.close()
                loop.call_soon_threadsafe(queue.put_nowait, done)

        def chunk(text: str, source: str | None, finish: str | None, extra: dict | None = None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish,
                                 "source": source}]}
            if extra:
                body["lacy"] = extra
            return f"data: {json.dumps(body)}\n\n"

        self.pool.submit(produce)
        stops, written, stopped = _stops(req.stop), "", False
        while (item := await queue.get()) is not done:
            if isinstance(item, Exception):
                status = 503 if isinstance(item, BigModelError) else 422
                yield f"event: error\ndata: {json.dumps({'error': str(item), 'status': status})}\n\n"
                continue
            if not isinstance(item, Span) or item.source == "prompt" or stopped:
                continue
            piece, stopped = _cut_at_stop(written + item.text, stops)
            piece = piece[len(written):]
            written += piece
            if piece:
                yield chunk(piece, item.source, None)
        result = cascade.result
        if result is not None:
            finish = "stop" if stopped or result.stop_reason == "eos" else "length"
            yield chunk("", None, finish, {"calls": result.calls, "call_rate": result.call_rate,
                                           "timings": result.timings})
        yield "data: [DONE]\n\n"

    @api.get("/view", response_class=HTMLResponse)
    async def view(self, prompt: str = Query("", max_length=4000), max_tokens: int = 32,
                   call_rate: float | None = None, call_threshold: float | None = None,
                   topic: str | None = Query(None, max_length=200), model: str = DEFAULT_MODEL) -> str:
        """A page for a person: a prompt form, and the generation with delegated spans coloured."""
        attr = lambda v: html.escape("" if v is None else str(v), quote=True)  # noqa: E731
        form = (f"<form method='get'><input name='prompt' size='40' value='{attr(prompt)}'> "
                f"topic <input name='topic' size='16' value='{attr(topic)}'> "
                f"<input name='max_tokens' size='3' value='{attr(max_tokens)}'> call rate "
                f"<input name='call_rate' size='4' value='{attr(call_rate)}'> <button>generate</button></form>")
        if not prompt:
            return page_html("lacy cascade", form)
        try:
            req = CompletionRequest(prompt=prompt, max_tokens=max_tokens, call_rate=call_rate, topic=topic or None,
                                    call_threshold=call_threshold, model=model, allow_undelegated=True)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        result, undelegated = await self._in_pool(req)
        meta = (f"{result.calls} calls, realised call rate {result.call_rate:.2f}, "
                f"{result.small_tokens} small + {result.big_tokens} big tokens"
                + (f" — undelegated: {undelegated}" if undelegated else ""))
        return page_html("lacy cascade", form + generation_block(
            [(s.text, s.source) for s in result.spans], meta))


# ----------------------------------------------------------------------------------------------
# Application builder


def build_app(cfg: LacyConfig) -> Any:
    """The composed application: SmallModel (ingress) -> BigModel, shares and replicas from cfg.serve."""
    s, config = cfg.serve, to_dict(cfg)
    big = None
    if s.big_enabled:
        big = BigModel.options(num_replicas=s.big_replicas, max_ongoing_requests=s.concurrency, ray_actor_options={
            "num_cpus": s.big_cpus, "num_gpus": s.big_gpus}).bind(config)
    return SmallModel.options(num_replicas=s.small_replicas, max_ongoing_requests=s.concurrency, ray_actor_options={
        "num_cpus": s.small_cpus, "num_gpus": s.small_gpus}).bind(big, config)


def app(args: dict) -> Any:
    """`serve run services.cascade:app config=FILE overrides="--a.b v ..."` (and `serve deploy`)."""
    overrides = args.get("overrides", [])
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    return build_app(load_config(args.get("config"), list(overrides)))


def run(cfg: LacyConfig, blocking: bool = False, name: str = "cascade", route_prefix: str = "/") -> Any:
    """Start Serve on cfg.serve.host:port (127.0.0.1 unless told otherwise) and deploy the app."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)


def main(argv: list[str] | None = None) -> Iterator[None] | None:
    from lacy.config import parse_cli

    cfg = parse_cli(argv, __doc__ or "")
    run(cfg, blocking=True)
    return None


if __name__ == "__main__":
    main()
