"""The whole experiment on Ray: `lacy.experiment.run` with its heavy stages distributed.

    python -m jobs.experiment --config configs/synthbio-quick.yaml    # `make run`: the synthetic benchmark
    python -m jobs.experiment --config configs/default.yaml           # embedded Wikipedia leads
    python -m jobs.experiment --config configs/tiny.yaml --experiment.rules '[plain, lacy]'  # minutes
    cluster/submit.sh experiment configs/gpu-334m.yaml                # ray job submit to a cluster

The sequence of stages, the evaluation plan, the scoring and the report are `lacy.experiment`'s; this
file only says where the heavy stages run: shards on Ray Data (`jobs.score`), every rule on Ray Train
+ DeepSpeed (`jobs.pretrain`), and the evaluation's texts as batch inference on Ray Data (model actors
decoding every person of a row together: `BatchGenerator`) — or, with `--experiment.evaluator serve`,
through the cascade behind Ray Serve (`services.cascade`), deployed under an app name and route of its
own and deleted afterwards (never `serve.shutdown()`, which would take a user's deployed cascade with
it). One MLflow parent run holds a nested run per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray

from jobs import pretrain, score
from lacy.cascade.big import build_big
from lacy.core import storage
from lacy.core.compute import compute_thread
from lacy.core.config import LacyConfig, config_hash, from_dict, parse_cli, to_dict
from lacy.core.console import setup_logging, tracked
from lacy.eval.generate import Generated, Generator, LocalGenerator, Request
from lacy.experiment import command_line
from lacy.experiment import run as run_experiment
from lacy.serve.request import CompletionRequest
from services.cascade import delete
from services.cascade import run as serve_run
from services.runtime import init_ray

log = logging.getLogger(__name__)


class CascadeActor:
    """A Ray Data model actor: every model of the experiment (`lacy.eval.generate.LocalGenerator`), one
    batch of requests in, their texts out (JSON, so Arrow carries them whatever their shape)."""

    def __init__(self, config: dict, models: dict[str, str]) -> None:
        cfg = from_dict(LacyConfig, config)
        storage.pull(cfg, *models.values())  # an actor on another node than the run's driver
        compute_thread().set_threads(max(1, round(cfg.eval.actor_cpus)))  # a fraction still computes on one
        self.generator = LocalGenerator(cfg, models, build_big(cfg, retrieval=True))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        requests = [Request(**json.loads(r)) for r in batch["request"]]
        outs = self.generator.generate_many(requests)
        return {"index": list(batch["index"]), "generated": [json.dumps(asdict(out)) for out in outs]}


class BatchGenerator:
    """`lacy.eval.generate.Generator` on Ray Data, as Ray's batch-inference guides do: the requests are a
    dataset, `map_batches` hands them to `eval.actors` model actors in batches (an equal share each, at
    most `eval.batch_people`), each decoding its batch together (`CascadeActor`)."""

    def __init__(self, cfg: LacyConfig, models: dict[str, str]) -> None:
        self.cfg, self.models = cfg, models

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]:
        if not requests:
            return []
        e = self.cfg.eval
        items = [{"index": i, "request": json.dumps(asdict(r))} for i, r in enumerate(requests)]
        share = min(e.batch_people, -(-len(items) // e.actors))  # every actor gets work; a batch fits memory
        actors = min(e.actors, -(-len(items) // share))
        written = ray.data.from_items(items, override_num_blocks=-(-len(items) // share)).map_batches(
            CascadeActor, fn_constructor_kwargs={"config": to_dict(self.cfg), "models": self.models},
            batch_size=share, num_cpus=e.actor_cpus, num_gpus=e.actor_gpus,
            # One block per actor at a time: else the first actor up queues every block and the rest idle.
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)).take_all()
        by_index = {int(row["index"]): json.loads(row["generated"]) for row in written}
        return [Generated(**{**out, "spans": [tuple(s) for s in out["spans"]]})
                for out in (by_index[i] for i in range(len(requests)))]


class ServeGenerator:
    """`lacy.eval.generate.Generator` as HTTP calls to the cascade app's /generate (the online product:
    `eval_concurrency` requests at a time), each body built with the API's own request model
    (`lacy.serve.request.CompletionRequest`)."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=600)
        self.concurrency = concurrency

    def generate_many(self, requests: Sequence[Request]) -> list[Generated]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tracked(pool.map(self.generate, requests), "requests", total=len(requests), unit="request"))

    def generate(self, request: Request) -> Generated:
        calls = request.big is not None
        body = CompletionRequest(
            prompt=request.prompt, model=request.model, max_tokens=request.max_tokens, allow_calls=calls,
            topic=request.topic, retrieval=request.big == "retrieval" if calls else None,
            call_trigger=request.trigger if calls else None, call_log_odds=request.threshold if calls else None)
        r = self.http.post("/generate", json=body.body())
        if r.status_code != 200:
            raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
        out = r.json()
        return Generated(out["text"], [(s["text"], s["source"]) for s in out["spans"]], out["calls"],
                         out["decision_points"], out["call_rate"], out["small_tokens"], out["big_tokens"])


class RayBackend:
    """Ray Data, Ray Train + DeepSpeed; the evaluation on Ray Data's model actors (experiment.evaluator
    batch) or through the cascade's Serve app (serve)."""

    def build_shards(self, cfg: LacyConfig, parent_run_id: str | None) -> Any:
        return score.run(cfg, parent_run_id=parent_run_id)

    def train(self, rcfg: LacyConfig, parent_run_id: str | None) -> Path:
        return pretrain.run(rcfg, parent_run_id=parent_run_id)

    @contextlib.contextmanager
    def generator(self, cfg: LacyConfig, models: dict[str, str]) -> Iterator[Generator]:
        if cfg.experiment.evaluator == "batch":
            init_ray()
            yield BatchGenerator(cfg, models)
            return
        # One Serve app with every small model (a request's `model` picks one) and both big sides.
        scfg = copy.deepcopy(cfg)
        scfg.serve.small_path = next(iter(models.values()))
        scfg.serve.models = dict(models)
        scfg.big.retrieval = "retrieval" in cfg.experiment.big_models
        name = f"lacy-experiment-{config_hash(to_dict(cfg))[:8]}"
        log.info("deploying Serve app %s with %d small models", name, len(models))
        serve_run(scfg, name=name, route_prefix=f"/{name}")
        try:
            yield ServeGenerator(f"http://{cfg.serve.host}:{cfg.serve.port}/{name}", cfg.experiment.eval_concurrency)
        finally:
            delete(name)


def run(cfg: LacyConfig, publish: str | None = None, command: str = "jobs.experiment.run") -> Path:
    return run_experiment(cfg, RayBackend(), track=True, publish=publish, command=command)


def main(argv: list[str] | None = None) -> Path:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--publish", help="also write the report with its plots to this folder (docs/results)")
    known, rest = extra.parse_known_args(argv)
    setup_logging()
    return run(parse_cli(rest, __doc__ or ""), known.publish, command_line("jobs.experiment", argv))


if __name__ == "__main__":
    main()
