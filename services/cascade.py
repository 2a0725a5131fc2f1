"""Ray Serve: the cascade of `lacy.serve.engine` behind HTTP, as two composed deployments.

`SmallModel` (the ingress: `lacy.serve.engine.CascadeEngine` and its routes, `lacy.serve.app.build_api`)
holds a `DeploymentHandle` to `BigModel` (`lacy.cascade.big.build_big`: the configured backend, reading
the knowledge store when big.retrieval is on, its calls batched by `lacy.serve.remote.BatchQueue`). A big
model that is a server of its own (`big.backend` in BIG_SERVERS, e.g. `openai`: any OpenAI-compatible
completions endpoint) has no BigModel deployment: each SmallModel replica builds the backend itself and
calls the server directly. This file is the Ray wiring only.

    serve run services.cascade:app config=configs/tiny.yaml                # serve.host:serve.port
    serve run services.cascade:app config=configs/tiny.yaml overrides="--serve.port 8001 --big.retrieval true"
    serve deploy services/serve_config.yaml                                 # host/port: its http_options
    python -m services.cascade --config configs/tiny.yaml                   # same, blocking

`serve run IMPORT_PATH` calls `app` before it connects to Ray, so `app` connects (RAY_ADDRESS, else a
local instance) and starts Serve on serve.host/serve.port itself; `serve run`'s own --address and
--runtime-env flags are then not applied. Serve's HTTP options are per cluster and fixed when Serve
starts: an already running Serve keeps its own, and `serve deploy` takes them from the YAML.
"""

import contextlib
import os
import shlex
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lacy.cascade.big import BigCall, BigReply, build_big
from lacy.cascade.policy import Quantiles
from lacy.core.compute import compute_thread
from lacy.core.config import BIG_SERVERS, LacyConfig, from_dict, load_config, parse_cli, to_dict
from lacy.serve.app import build_api
from lacy.serve.engine import BigHealth, CascadeEngine
from lacy.serve.remote import BatchQueue, HandleBig
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


@serve.deployment
@serve.ingress()
class SmallModel:
    def __init__(self, big: DeploymentHandle | None, config: dict) -> None:
        cfg = from_dict(LacyConfig, config)
        health = BigHealth()  # a failed call marks the big model down at once, not only the next probe
        if big is not None:
            remote = HandleBig(big, cfg.serve.big_timeout_s, overloaded=(BackPressureError,),
                               on_unavailable=health.down)
        elif cfg.serve.big_enabled and cfg.big.backend in BIG_SERVERS:
            remote = build_big(cfg)  # the model's own server, called from here: no BigModel replica between
        else:
            remote = None
        quantiles = (ClusterQuantiles(serve.get_replica_context().app_name, cfg.serve.max_call_rates)
                     if cfg.serve.quantile_scope == "cluster" else None)
        self.engine = CascadeEngine(cfg, remote, quantiles, health)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's routes (`lacy.serve.app`): the same app that tests drive in process."""
        return build_api(self.engine)


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
