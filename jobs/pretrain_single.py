"""Pretrain every rule of an experiment with the plain single-process loop: no Ray, DeepSpeed or MLflow.

For a machine that has torch, transformers, tokenizers, pyarrow and pyyaml but not the cluster stack,
such as a lent GPU box: it trains from shards made elsewhere (`jobs.score`) and writes each model
where `jobs.experiment` looks for it, with the same stage record, so the experiment run afterwards
on the full stack reuses these models and goes straight to evaluation.

    python -m jobs.score            --config configs/wiki2015-gpu.yaml      # here: shards + tokenizer
    python -m jobs.pretrain_single  --config configs/wiki2015-gpu.yaml      # there (cuda + bf16 autocast)
    python -m jobs.experiment       --config configs/wiki2015-gpu.yaml      # here: reuses, evaluates

Rules, comparisons (steps, tokens) and their order are the experiment's (`plain` first: it sets the
token budget). `--save_dtype bfloat16 --max_shard_mb 15` store each model in files small enough to
carry back; `--rules` trains a subset (e.g. one machine per rule). README "On a lent GPU machine"
gives the whole round trip.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from jobs.experiment import rule_config, stage_done, train_all, train_key, train_stage
from lacy.config import LacyConfig, parse_cli

TRAINER = "jobs.pretrain_single"


def fit(rcfg: LacyConfig, save_dtype: torch.dtype | None = None, max_shard_mb: float | None = None) -> Path:
    """Train one rule config with `lacy.train.train_from_shards`; its `final` folder gets the
    training_summary.json that jobs.pretrain writes (step, rows, tokens, supervised_tokens)."""
    from lacy.train import train_from_shards

    summary = train_from_shards(rcfg, save_dtype, max_shard_mb)
    final = Path(rcfg.train.output_dir) / "final"
    rows = summary["steps"] * rcfg.train.batch_size
    (final / "training_summary.json").write_text(json.dumps({
        "step": summary["steps"], "rows": rows, "tokens": rows * rcfg.model.seq_len,
        "supervised_tokens": summary["supervised_tokens"], "trainer": TRAINER,
        "tokens_per_s": summary["tokens_per_s"], "device": summary["device"]}, indent=2))
    return final


def run(cfg: LacyConfig, rules: list[str] | None = None, save_dtype: torch.dtype | None = None,
        max_shard_mb: float | None = None) -> dict[str, dict]:
    """Every rule x comparison of `cfg.experiment`, or only `rules` (the others must have been trained
    already where a token budget needs them), each skipped when its stage record says it is done."""
    from lacy.shards import read_manifest

    manifest_hash = read_manifest(cfg.score.output_dir).config_hash
    wanted = set(cfg.experiment.rules if rules is None else rules)
    if unknown := wanted - set(cfg.experiment.rules):
        raise ValueError(f"--rules {sorted(unknown)} are not among experiment.rules {cfg.experiment.rules}")

    def train_one(rule: str, comparison: str, budget: int | None) -> dict:
        if rule in wanted:
            return train_stage(cfg, rule, comparison, budget, manifest_hash,
                               lambda rcfg: fit(rcfg, save_dtype, max_shard_mb))
        rcfg = rule_config(cfg, rule, comparison, budget)
        record = stage_done(Path(rcfg.train.output_dir), train_key(rcfg, manifest_hash))
        if record is None and rule == "plain" and "tokens" in cfg.experiment.comparisons:
            raise ValueError("token equalisation needs plain's supervised tokens: train plain first (--rules)")
        return record or {}

    return {name: record for name, record in train_all(cfg, train_one).items() if name.split("-")[0] in wanted}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rules", help="comma-separated subset of experiment.rules")
    extra.add_argument("--save_dtype", choices=["float32", "bfloat16"])
    extra.add_argument("--max_shard_mb", type=float, help="largest safetensors file of a saved model")
    known, rest = extra.parse_known_args(argv)
    cfg = parse_cli(rest, __doc__ or "")
    return run(cfg, rules=known.rules.split(",") if known.rules else None,
               save_dtype=getattr(torch, known.save_dtype) if known.save_dtype else None,
               max_shard_mb=known.max_shard_mb)


if __name__ == "__main__":
    main()
