"""Ray Serve: the cascade of `lacy.serve.engine` behind HTTP, as two composed deployments.

`SmallModel` (the ingress: `lacy.serve.engine.CascadeEngine` and its routes) holds a `DeploymentHandle` to
`BigModel` (`lacy.cascade.big.build_big`: the configured backend, reading the knowledge store when
big.retrieval is on, its calls batched by `lacy.serve.remote.BatchQueue`). A big model that is a server
of its own (`big.backend` in BIG_SERVERS, e.g. `openai`: any OpenAI-compatible completions endpoint) has
no BigModel deployment: each SmallModel replica builds the backend itself and calls the server directly.
This file is the Ray wiring and the routes only.

    serve run services.cascade:app config=configs/tiny.yaml                # serve.host:serve.port
    serve run services.cascade:app config=configs/tiny.yaml overrides="--serve.port 8001 --big.retrieval true"
    serve deploy services/serve_config.yaml                                 # host/port: its http_options
    python -m services.cascade --config configs/tiny.yaml                   # same, blocking

`serve run IMPORT_PATH` calls `app` before it connects to Ray, so `app` connects (RAY_ADDRESS, else a
local instance) and starts Serve on serve.host/serve.port itself; `serve run`'s own --address and
--runtime-env flags are then not applied. Serve's HTTP options are per cluster and fixed when Serve
starts: an already running Serve keeps its own, and `serve deploy` takes them from the YAML.
"""

# No `from __future__ import annotations`: FastAPI must see the routes' `Request` annotations as types.
import asyncio
import contextlib
import os
import shlex
from typing import Any

import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lacy.cascade.big import BigCall, BigReply, build_big
from lacy.cascade.policy import Quantiles
from lacy.core.compute import compute_thread
from lacy.core.config import BIG_SERVERS, LacyConfig, from_dict, load_config, parse_cli, to_dict
from lacy.serve.engine import CascadeEngine, open_stream
from lacy.serve.remote import BatchQueue, HandleBig
from lacy.serve.request import DEFAULT_MODEL, install_error_handlers
from services.runtime import RAY_ENV_DEFAULTS, init_ray

NAMESPACE = "lacy"  # of the cluster-wide quantile actors


@serve.deployment
class BigModel:
    def __init__(self, config: dict) -> None:
        cfg = from_dict(LacyConfig, config)
        compute = compute_thread()
        compute.set_threads(cfg.serve.torch_threads)  # else Ray's: 1 thread for a fractional big_cpus
        self.big = build_big(cfg)
        # Not @serve.batch: it forms the next batch while one runs (see BatchQueue).
        self.queue = BatchQueue(self.big.continue_batch, cfg.serve.big_batch, cfg.serve.big_batch_wait_s,
                                executor=compute.executor)

    async def continue_call(self, call: BigCall) -> BigReply:
        if arrived := getattr(self.big, "arrived", None):
            arrived(call)
        return await self.queue.submit(call)

    def end_session(self, session: str) -> None:
        self.big.end_session(session)

    def health(self) -> dict:
        return self.big.health(0.0)


# The running call-rate quantiles of one app, shared by all its SmallModel replicas (quantile_scope cluster).
QuantileActor = ray.remote(num_cpus=0)(Quantiles)


class ClusterQuantiles:
    """`Quantiles.observe` of the app's actor: one round trip per decision point."""

    def __init__(self, app_name: str, max_keys: int) -> None:
        self.actor = QuantileActor.options(name=f"quantiles-{app_name}", namespace=NAMESPACE, lifetime="detached",
                                           get_if_exists=True).remote(max_keys=max_keys)

    def observe(self, rate: float, value: float, scope: tuple = ()) -> bool:
        return ray.get(self.actor.observe.remote(rate, value, scope))


api = FastAPI(title="lacy cascade", description="A small LM that delegates facts to a big LM with <CALL>.")
install_error_handlers(api)


@serve.deployment
@serve.ingress(api)
class SmallModel:
    def __init__(self, big: DeploymentHandle | None, config: dict) -> None:
        cfg = from_dict(LacyConfig, config)
        if big is not None:
            remote = HandleBig(big, cfg.serve.big_timeout_s, overloaded=(BackPressureError,))
        elif cfg.serve.big_enabled and cfg.big.backend in BIG_SERVERS:
            remote = build_big(cfg)  # the model's own server, called from here: no BigModel replica between
        else:
            remote = None
        quantiles = (ClusterQuantiles(serve.get_replica_context().app_name, cfg.serve.max_call_rates)
                     if cfg.serve.quantile_scope == "cluster" else None)
        self.engine = CascadeEngine(cfg, remote, quantiles)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        job = await self.engine.parse_request(request, "completions")
        return await open_stream(self.engine.stream(job)) if job.req.stream else await self.engine.complete(job)

    @api.post("/generate")
    async def generate(self, request: Request) -> dict:
        return await self.engine.generate(await self.engine.parse_request(request, "generate"))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        if self.engine.big is not None:
            await asyncio.to_thread(self.engine.probe)  # whether the big model answers now
        status, body = self.engine.healthz()
        return JSONResponse(body, status_code=status)

    @api.get("/v1/models")
    def list_models(self) -> dict:
        return self.engine.list_models()

    @api.get("/v1/models/{model}")
    def retrieve_model(self, model: str) -> dict:
        return self.engine.model_card(model)

    @api.get("/view", response_class=HTMLResponse)
    async def view(self, prompt: str = Query("", max_length=4000), max_tokens: int = 32,
                   call_rate: float | None = None, call_threshold: float | None = None,
                   topic: str | None = Query(None, max_length=200), model: str = DEFAULT_MODEL) -> str:
        return await self.engine.view({"prompt": prompt, "max_tokens": max_tokens, "call_rate": call_rate,
                                       "call_threshold": call_threshold, "topic": topic or None, "model": model})


def build_app(cfg: LacyConfig) -> Any:
    """SmallModel (ingress) -> BigModel; replicas, resources, limits and backpressure from cfg.serve. A big
    model with a server of its own (BIG_SERVERS) gets no BigModel deployment: the SmallModel replicas call it."""
    s, config = cfg.serve, to_dict(cfg)
    pressure = BackpressureConfig(status_code=s.overload_status, retry_after_s=s.retry_after_s)
    big = None
    if s.big_enabled and cfg.big.backend not in BIG_SERVERS:
        big = BigModel.options(num_replicas=s.big_replicas, max_ongoing_requests=s.big_max_ongoing_requests,
                               ray_actor_options={"num_cpus": s.big_cpus, "num_gpus": s.big_gpus,
                                                  "resources": s.big_resources}).bind(config)
    return SmallModel.options(
        num_replicas=s.small_replicas, max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests, backpressure_config=pressure,
        ray_actor_options={"num_cpus": s.small_cpus, "num_gpus": s.small_gpus,
                           "resources": s.small_resources}).bind(big, config)


def app(args: dict) -> Any:
    """`serve run services.cascade:app config=FILE overrides="--a.b v ..."` (and `serve deploy`)."""
    overrides = args.get("overrides", [])
    cfg = load_config(args.get("config"), shlex.split(overrides) if isinstance(overrides, str) else list(overrides))
    if not ray.is_initialized():  # `serve run IMPORT_PATH`: Serve is not started yet, so it can take our address
        for name, value in RAY_ENV_DEFAULTS.items():  # for a Ray this call starts
            os.environ.setdefault(name, value)
        ray.init(address=os.environ.get("RAY_ADDRESS"), namespace="serve")
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    return build_app(cfg)


def run(cfg: LacyConfig, blocking: bool = False, name: str = "cascade", route_prefix: str = "/") -> Any:
    """Start Serve on cfg.serve.host:port (unless it runs already) and deploy the app as `name` at
    `route_prefix`; returns its handle. Remove it with `delete(name)`."""
    init_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)


def delete(name: str) -> None:
    """Delete app `name` and its quantile actor, nothing else (never `serve.shutdown()`: other apps stay)."""
    serve.delete(name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(f"quantiles-{name}", namespace=NAMESPACE))


def main(argv: list[str] | None = None) -> None:
    run(parse_cli(argv, __doc__ or "", stage="serve"), blocking=True)


if __name__ == "__main__":
    main()
