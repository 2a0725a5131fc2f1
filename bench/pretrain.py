"""Training speed against this machine's limits, in one run: MFU of the plain loop, the Ray job's ratio.

Same shards (embedded documents, spaCy fact flags), model preset, batch, context and thread count for
every variant; each one's tokens/s is the median of its logging windows after the first (which holds
start-up: Ray Train, DeepSpeed, the first steps). In order:

  ceiling        a bare loop over the model's GEMMs (`bench.limits.matmul_ceiling`): FLOP/s
  torch          a bare PyTorch loop: GPT-2 forward, `F.cross_entropy`, backward, AdamW (the ceiling of
                 every trainer: no objective, no stats, no schedule)
  lacy.train     the library's loop with `--rule` (`lacy.train.train`), the path of every training run
  ray_deepspeed  `jobs.pretrain` (Ray Train + DeepSpeed ZeRO-1, 1 worker of `--threads` CPUs)
  torch (again)  the bare loop once more: how far the machine drifted meanwhile

MFU = tokens/s x `train_flops_per_token` / the GEMM ceiling. Targets (issue 19): lacy.train MFU >= 50 %,
ray_deepspeed >= 0.9x lacy.train. The shapes of the embedded default (configs/default.yaml):

    .venv/bin/python -m bench.pretrain --preset small --seq-len 128 --batch 16 --vocab 4096 --threads 2

Refuses to start above a load of 1.5 per core (`--force` takes figures marked as under load); writes
`bench/results/pretrain-zero<stage>.json`.
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
import torch.nn.functional as F  # noqa: E402

from bench.limits import (  # noqa: E402
    ProcessSampler,
    busiest,
    load_guard,
    matmul_ceiling,
    process_group,
    record,
    train_flops_per_token,
)
from lacy.core.config import PRESETS, LacyConfig, load_config  # noqa: E402


def build_shards(out: Path, docs: int, seq_len: int, vocab: int) -> Path:
    """Embedded documents -> tokenizer + spaCy fact flags -> shards, by the library's stage."""
    from lacy.shards.scoring import build_shards as build

    build(load_config(None, [f"run_dir={out.parent}", f"score.output_dir={out}", "data.corpus=embedded",
                             f"data.max_docs={docs}", "data.val_fraction=0.0", f"tokenizer.vocab_size={vocab}",
                             f"model.seq_len={seq_len}"]))
    return out


def steady(rates: list[float]) -> float:
    """Median tokens/s of the logging windows after the first (which holds start-up)."""
    return statistics.median(rates[1:])


def _model_and_batches(cfg: LacyConfig):
    from lacy.model import build_model
    from lacy.shards.format import load_shard_tokenizer, read_batches

    tok = load_shard_tokenizer(cfg.score.output_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tok)
    batches = read_batches(cfg.score.output_dir, "train", cfg.train.batch_size, seed=cfg.train.seed, loop=True)
    return model, batches, tok


def bare_torch(cfg: LacyConfig, threads: int) -> list[float]:
    """tokens/s per window of `log_every` steps of forward + cross-entropy + backward + AdamW."""
    from lacy.train import build_optimizer

    torch.set_num_threads(threads)
    model, batches, _ = _model_and_batches(cfg)
    optimizer = build_optimizer(model, cfg.train)
    rates, tokens, start = [], 0, time.perf_counter()
    for step in range(1, cfg.train.max_steps + 1):
        ids = next(batches)["input_ids"]
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        if step % cfg.train.log_every == 0:
            float(loss)
            now = time.perf_counter()
            rates.append(tokens / (now - start))
            tokens, start = 0, now
    return rates


def plain_loop(cfg: LacyConfig, threads: int) -> list[float]:
    from lacy.corpus.tokenizer import call_id
    from lacy.train import train

    torch.set_num_threads(threads)
    model, batches, tok = _model_and_batches(cfg)
    rates: list[float] = []
    train(cfg, model, batches, None, call_id(tok), log=lambda step, row: rates.append(row["tokens_per_s"]))
    return rates


def ray_job(cfg: LacyConfig) -> tuple[list[float], dict[str, float]]:
    """Tokens/s windows of `jobs.pretrain`, and the cores each process group kept busy over the
    windows after the first (the worker's own share, and what everything else took meanwhile)."""
    from mlflow.tracking import MlflowClient

    from jobs.pretrain import run
    from lacy.core.tracking import tracking_uri

    with ProcessSampler(process_group, every=0.5) as sampler:
        run(cfg)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    latest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0]
    history = sorted(client.get_metric_history(latest.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    return [m.value for m in history], busiest(sampler, history[0].timestamp / 1000, history[-1].timestamp / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="as configs/default.yaml trains each rule")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer.vocab_size of the shards")
    parser.add_argument("--rule", default="lacy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the one worker")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process variants")
    parser.add_argument("--force", action="store_true", help="run (and record) on a busy machine")
    args = parser.parse_args()
    start_load = load_guard(args.force)

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    shards = build_shards(work / "shards", args.docs, args.seq_len, args.vocab)

    def config(name: str) -> LacyConfig:
        return load_config(None, [f"run_dir={work / name}", f"score.output_dir={shards}",
                                  f"model.preset={args.preset}", f"model.seq_len={args.seq_len}",
                                  f"labels.rule={args.rule}", f"train.batch_size={args.batch}",
                                  f"train.max_steps={args.steps}", "train.warmup_steps=5",
                                  f"train.log_every={args.log_every}", f"train.checkpoint_every={args.steps}",
                                  "train.eval_every=100000", "train.num_workers=1",
                                  f"train.cpus_per_worker={args.threads}", f"train.zero_stage={args.zero_stage}",
                                  f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"])

    from lacy.shards.format import load_shard_tokenizer

    vocab = len(load_shard_tokenizer(shards))  # with the specials, as the LM head sees it
    p = PRESETS[args.preset]
    flops_per_token = train_flops_per_token(p["n_layer"], p["n_embd"], vocab, args.seq_len)
    ceiling = matmul_ceiling(p["n_layer"], p["n_embd"], p["n_head"], vocab, args.batch, args.seq_len,
                             args.threads)
    print(json.dumps({"run": "ceiling", **ceiling}), flush=True)

    variants = [("torch", bare_torch), ("lacy.train", plain_loop)]
    if not args.skip_ray:
        variants.append(("ray_deepspeed", None))
    variants.append(("torch (again)", bare_torch))
    if not args.skip_ray:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict] = {}
    for name, fn in variants:
        cfg = config(name.split()[0])
        start = time.perf_counter()
        cores = None
        if fn is None:
            rates, cores = ray_job(cfg)
        else:
            rates = fn(cfg, args.threads)
        rate = steady(rates)
        results[name] = {"tokens_per_s": rate, "mfu": rate * flops_per_token / ceiling["model_gemm_flops"],
                         "windows": [round(r) for r in rates], "wall_s": time.perf_counter() - start,
                         **({"cores_busy": cores} if cores else {})}
        print(json.dumps({"run": name, **results[name]}), flush=True)
    if not args.skip_ray:
        ray.shutdown()

    torch_rate = statistics.mean(results[n]["tokens_per_s"] for n in ("torch", "torch (again)"))
    summary = {"flops_per_token": flops_per_token, "ceiling": ceiling,
               "lacy_train_mfu": results["lacy.train"]["mfu"],
               "lacy_train_vs_torch": results["lacy.train"]["tokens_per_s"] / torch_rate}
    if not args.skip_ray:
        summary["ray_vs_lacy_train"] = results["ray_deepspeed"]["tokens_per_s"] / results["lacy.train"]["tokens_per_s"]
        summary["ray_vs_torch"] = results["ray_deepspeed"]["tokens_per_s"] / torch_rate
    print(json.dumps({"summary": {k: round(v, 3) for k, v in summary.items() if isinstance(v, float)}}), flush=True)
    record(Path(f"bench/results/pretrain-zero{args.zero_stage}.json"),
           {"args": vars(args), "results": results, **summary}, start_load, args.threads, args.force)


if __name__ == "__main__":
    main()
