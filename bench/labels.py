"""Cost of the LaCy objective per training step, as a ratio against plain cross-entropy in the same run.

One optimiser step (forward, loss, backward, AdamW) on random tokens with random fact flags,
reference losses and judge sets; the baseline is `F.cross_entropy` on the same model and batch.
Variants are interleaved round by round and the median step time of each is reported:

    .venv/bin/python -m bench.labels --preset small --vocab 4097 --seq-len 128 --batch 16 --threads 2  # default.yaml

Prints one JSON line per variant: median seconds per step and the ratio to cross-entropy. Refuses to
start above a load of 1.5 per core (`--force` to measure anyway, marked as under load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.limits import load_guard, record
from lacy.core.config import LabelConfig
from lacy.labels.method import lacy_step
from lacy.model import gpt2_config

CALL_ID, EOS_ID, PAD_ID = 2, 0, 1


def make_batch(batch: int, seq_len: int, vocab: int, top_k: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq_len + 1), generator=g)
    ids[:, ::97] = EOS_ID  # a few document boundaries
    return {"input_ids": ids, "fact": torch.rand(batch, seq_len + 1, generator=g) < 0.25,
            "ref_loss": torch.rand(batch, seq_len + 1, generator=g) * 8,
            "judge_accept": torch.randint(3, vocab, (batch, seq_len + 1, top_k), generator=g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    start_load = load_guard(args.force)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(args.preset, args.vocab, args.seq_len, pad_id=PAD_ID))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch, args.seq_len, args.vocab)

    def cross_entropy() -> None:
        ids = batch["input_ids"]
        logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    def rule_step(rule: str):
        def run() -> None:
            loss, stats = lacy_step(model, batch, LabelConfig(rule=rule), CALL_ID, eos_id=EOS_ID, pad_id=PAD_ID)
            loss.backward()
            int(stats["supervised_tokens"])  # the train loop reads this every step
        return run

    variants = {"cross_entropy": cross_entropy, **{r: rule_step(r) for r in ("plain", "loss", "lacy", "rho",
                                                                           "judge", "ignore")}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        optimizer.zero_grad(set_to_none=True)
        fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                fn()
                optimizer.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["cross_entropy"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "s_per_step": round(median, 4), "ratio_vs_ce": round(median / base, 3)})
        print(json.dumps(rows[-1]), flush=True)
    record(Path("bench/results/labels.json"), {"args": vars(args), "variants": rows}, start_load, args.threads,
           args.force)


if __name__ == "__main__":
    main()
