"""The HTTP routes of one replica's cascade, as a FastAPI app over a `CascadeEngine` (no Ray).

    api = build_api(engine)          # what a SmallModel replica serves (services.cascade), and what
                                     # tests and benches drive in process (httpx's ASGI transport)

The same app object answers over Serve and in process, so a test of this app is a test of the served
routes. Request bodies are parsed by `lacy.serve.request` (raw bytes: size limit, strict JSON); the
OpenAPI schema still describes them (`CompletionRequest`'s JSON schema), so a client, or a fuzzer,
can read the contract from /openapi.json.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lacy.serve.engine import CascadeEngine, open_stream
from lacy.serve.request import DEFAULT_MODEL, CompletionRequest, install_error_handlers, openapi_body

_ERROR = {"description": "OpenAI's error shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"}
_ERRORS: dict[int | str, dict[str, Any]] = {status: _ERROR for status in (400, 404, 413, 429, 503)}


def build_api(engine: CascadeEngine) -> FastAPI:
    """The routes of `engine`: POST /v1/completions, POST /generate, GET /healthz, /v1/models,
    /v1/models/{model}, /view; every error in OpenAI's shape."""
    api = FastAPI(title="lacy cascade", description="A small LM that delegates facts to a big LM with <CALL>.")
    install_error_handlers(api)
    body = {"requestBody": openapi_body(CompletionRequest)}

    @api.post("/v1/completions", openapi_extra=body, responses=_ERRORS)
    async def completions(request: Request) -> Any:
        job = await engine.parse_request(request, "completions")
        return await open_stream(engine.stream(job)) if job.req.stream else await engine.complete(job)

    @api.post("/generate", openapi_extra=body, responses=_ERRORS)
    async def generate(request: Request) -> dict:
        return await engine.generate(await engine.parse_request(request, "generate"))

    @api.get("/healthz", responses={503: {"description": "the big model does not answer"}})
    async def healthz() -> JSONResponse:
        if engine.big is not None:
            await asyncio.to_thread(engine.probe)  # whether the big model answers now
        status, out = engine.healthz()
        return JSONResponse(out, status_code=status)

    @api.get("/v1/models")
    def list_models() -> dict:
        return engine.list_models()

    @api.get("/v1/models/{model}", responses={404: _ERROR})
    def retrieve_model(model: str) -> dict:
        return engine.model_card(model)

    @api.get("/view", response_class=HTMLResponse, responses=_ERRORS)
    async def view(prompt: str = Query("", max_length=4000), max_tokens: int = 32,
                   call_rate: float | None = None, call_threshold: float | None = None,
                   topic: str | None = Query(None, max_length=200), model: str = DEFAULT_MODEL) -> str:
        return await engine.view({"prompt": prompt, "max_tokens": max_tokens, "call_rate": call_rate,
                                  "call_threshold": call_threshold, "topic": topic or None, "model": model})

    return api
