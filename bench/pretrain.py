"""Tokens/s of the Ray Train + DeepSpeed job (jobs.pretrain) against the plain loop (lacy.train).

Same model preset, data, rule, batch and thread count, in the same run; start-up is excluded (the
first logging window of each, which holds Ray/DeepSpeed start-up and the first steps, is dropped).
The plain loop runs before and after the job and the baseline is their mean, so load that changes
during the run (a shared machine) biases neither side:

    .venv/bin/python -m bench.pretrain --docs 150 --steps 60 --threads 1

Prints one JSON line per measurement and a summary with the ratio job / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                     "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from lacy.config import LacyConfig, load_config  # noqa: E402


def build_shards(out: Path, docs: int, seq_len: int) -> Path:
    """Embedded documents -> tokenizer + spaCy fact flags -> shards, by the library's stage."""
    from lacy.scoring import build_shards as build

    build(load_config(None, [f"run_dir={out.parent}", f"score.output_dir={out}", "data.corpus=embedded",
                             f"data.max_docs={docs}", "data.val_fraction=0.0", "tokenizer.vocab_size=1024",
                             f"model.seq_len={seq_len}"]))
    return out


def steady(rates: list[float]) -> float:
    """Median tokens/s of the logging windows after the first (which holds start-up)."""
    return statistics.median(rates[1:])


def plain_loop(cfg: LacyConfig, threads: int) -> list[float]:
    from lacy.model import build_model
    from lacy.shards import read_batches, read_manifest
    from lacy.tokenizer import call_id, load_tokenizer
    from lacy.train import train

    torch.set_num_threads(threads)
    tok = load_tokenizer(read_manifest(cfg.score.output_dir).tokenizer_path)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tok)
    batches = read_batches(cfg.score.output_dir, "train", cfg.train.batch_size, seed=cfg.train.seed,
                           loop=True)
    rates: list[float] = []
    train(cfg, model, batches, None, call_id(tok), log=lambda step, row: rates.append(row["tokens_per_s"]))
    return rates


def ray_job(cfg: LacyConfig) -> tuple[list[float], float]:
    from mlflow.tracking import MlflowClient

    from jobs.pretrain import run
    from lacy.tracking import tracking_uri

    start = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - start
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    latest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0]
    history = sorted(client.get_metric_history(latest.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    return [m.value for m in history], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the one worker")
    parser.add_argument("--zero-stage", type=int, default=1)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    shards = build_shards(work / "shards", args.docs, args.seq_len)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    results = {}
    for name in ("plain_before", "ray_deepspeed", "plain_after"):
        cfg = load_config(None, [f"run_dir={work / name}", f"score.output_dir={shards}",
                                 f"model.preset={args.preset}", f"model.seq_len={args.seq_len}",
                                 f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                                 "train.warmup_steps=5", "train.log_every=10",
                                 f"train.checkpoint_every={args.steps}", "train.eval_every=100000",
                                 f"train.cpus_per_worker={args.threads}",
                                 f"train.zero_stage={args.zero_stage}",
                                 f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"])
        if name.startswith("plain"):
            start = time.perf_counter()
            rates = plain_loop(cfg, args.threads)
            wall = time.perf_counter() - start
        else:
            rates, wall = ray_job(cfg)
        results[name] = {"tokens_per_s": steady(rates), "windows": [round(r) for r in rates], "wall_s": wall}
        print(json.dumps({"run": name, **results[name]}), flush=True)
    plain = (results["plain_before"]["tokens_per_s"] + results["plain_after"]["tokens_per_s"]) / 2
    ratio = results["ray_deepspeed"]["tokens_per_s"] / plain
    print(json.dumps({"summary": "job/plain tokens/s", "ratio": round(ratio, 3), **vars(args)}))
    ray.shutdown()


if __name__ == "__main__":
    main()
