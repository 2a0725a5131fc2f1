"""Around Serve's HTTP proxy (Ray's, not ours): a response that a replica's death left unfinished
still ends in OpenAI's shape.

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=lacy.serve.proxy:middlewares   # in the environment of
                                                                             # `ray start` / ray.init

Serve reads that variable when its proxy starts (services.runtime.RAY_ENV_DEFAULTS and cluster/env.sh
set it for the Ray we start); Ray 2.60 removed `http_options.middlewares`. Light on purpose: the proxy
process imports this module, and it imports no model code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

from lacy.serve.request import APIError

log = logging.getLogger(__name__)
Message = MutableMapping[str, Any]
RETRY_AFTER_S = 1.0
"""Retry-After of a request whose replica died (the proxy starts before any config is read: the
default of serve.retry_after_s)."""


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(FinishResponses, retry_after_s=RETRY_AFTER_S)]


class FinishResponses:
    """ASGI middleware for a proxy in front of replicas (Serve's HTTP proxy): a response its replica
    never finished, because the replica died, still ends in OpenAI's shape. Not started: 503 with
    Retry-After (Ray's proxy answered a bare 500); a stream under way: a final error event, then the
    end of the body (Ray's proxy left the body unfinished). Requests Serve could route to another
    replica never get here; finished responses pass untouched."""

    def __init__(self, app: Callable[..., Awaitable[None]], retry_after_s: float = RETRY_AFTER_S) -> None:
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "done": False, "events": False}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["events"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as err:  # the proxy gave up on the replica: answered below
            log.warning("%s %s: its replica did not finish (%s)", scope.get("method"), scope.get("path"),
                        type(err).__name__)
        if state["done"]:
            return
        error = APIError(503, "the replica answering this request stopped; it is being replaced, retry",
                         code="replica_unavailable", retry_after_s=self.retry_after_s)
        if not state["started"]:
            response = error.response()
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
        elif state["events"]:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(error.body())}\n\n".encode(),
                        "more_body": False})
        # A started body of another kind stays unfinished: the client sees it is short, never a complete one.
