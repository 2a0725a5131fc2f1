"""Golden numbers (torchtitan-style): the tiny run's loss curve and call share per rule, committed as
text, so a refactor cannot silently change the method. After an intended change of the method,
regenerate with `LACY_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py` and say why in
the commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lacy.core.config import load_config

GOLDEN = Path(__file__).parent / "golden" / "tiny_train.json"
RULES = ("plain", "loss", "lacy", "ignore_facts")


def _curves(scored_run, tmp_path) -> dict[str, list[list[float]]]:
    from lacy.corpus.tokenizer import call_id
    from lacy.model import build_model
    from lacy.shards.format import load_shard_tokenizer, read_batches
    from lacy.train import train

    curves = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    try:
        for rule in RULES:
            cfg = load_config("configs/tiny.yaml", [*scored_run, "--labels.rule", rule, "--train.max_steps", "8",
                                                    "--train.log_every", "1", "--train.warmup_steps", "2"])
            tokenizer = load_shard_tokenizer(cfg.score.output_dir)
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg.model, tokenizer)
            batches = read_batches(cfg.score.output_dir, "train", cfg.train.batch_size, seed=0, loop=True)
            summary = train(cfg, model, batches, None, call_id(tokenizer))
            curves[rule] = [[h["loss"], h["call_share"], h["masked_share"]] for h in summary["history"]]
    finally:
        torch.set_num_threads(threads)
    return curves


def test_tiny_run_matches_the_golden_curves(scored_run, tmp_path):
    curves = _curves(scored_run, tmp_path)
    if os.environ.get("LACY_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(curves)
    for rule, steps in golden.items():
        assert len(curves[rule]) == len(steps), rule
        for step, (want, got) in enumerate(zip(steps, curves[rule], strict=True), start=1):
            assert got == pytest.approx(want, abs=2e-4), f"{rule} step {step}"
