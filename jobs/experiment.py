"""The whole experiment on Ray: `lacy.experiment.run` with its heavy stages distributed.

    python -m jobs.experiment --config configs/synthbio-quick.yaml    # `make run`: the synthetic benchmark
    python -m jobs.experiment --config configs/default.yaml           # embedded Wikipedia leads
    python -m jobs.experiment --config configs/tiny.yaml --experiment.rules '[plain, lacy]'  # minutes
    cluster/submit.sh experiment configs/gpu-334m.yaml                # ray job submit to a cluster

The sequence of stages, the evaluation plan, the scoring and the report are `lacy.experiment`'s; this
file only says where the heavy stages run: shards on Ray Data (`jobs.score`), every rule on Ray Train
+ DeepSpeed (`jobs.pretrain`), and the cascade behind Ray Serve (`services.cascade`), deployed under
an app name and route of its own and deleted afterwards — never `serve.shutdown()`, which would take
a user's deployed cascade with it. One MLflow parent run holds a nested run per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from jobs import pretrain, score
from lacy.core.config import LacyConfig, config_hash, parse_cli, to_dict
from lacy.core.console import setup_logging
from lacy.eval.generate import Generated, Request
from lacy.experiment import command_line
from lacy.experiment import run as run_experiment
from lacy.serve.request import CompletionRequest
from services.cascade import run as serve_run

log = logging.getLogger(__name__)


class ServeGenerator:
    """`lacy.eval.generate.Generator` as HTTP calls to the cascade app's /generate, each body built with
    the API's own request model (`lacy.serve.request.CompletionRequest`)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=600)

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
                         out["decision_points"], out["call_rate"])


class RayBackend:
    """Ray Data, Ray Train + DeepSpeed, Ray Serve."""

    def build_shards(self, cfg: LacyConfig, parent_run_id: str | None) -> Any:

        return score.run(cfg, parent_run_id=parent_run_id)

    def train(self, rcfg: LacyConfig, parent_run_id: str | None) -> Path:

        return pretrain.run(rcfg, parent_run_id=parent_run_id)

    @contextlib.contextmanager
    def generator(self, cfg: LacyConfig, models: dict[str, str]) -> Iterator[ServeGenerator]:
        """One Serve app with every small model (a request's `model` picks one) and both big sides."""
        from ray import serve


        scfg = copy.deepcopy(cfg)
        scfg.serve.small_path = next(iter(models.values()))
        scfg.serve.models = dict(models)
        scfg.big.retrieval = "retrieval" in cfg.experiment.big_models
        name = f"lacy-experiment-{config_hash(to_dict(cfg))[:8]}"
        log.info("deploying Serve app %s with %d small models", name, len(models))
        serve_run(scfg, name=name, route_prefix=f"/{name}")
        try:
            yield ServeGenerator(f"http://{cfg.serve.host}:{cfg.serve.port}/{name}")
        finally:
            serve.delete(name)


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
