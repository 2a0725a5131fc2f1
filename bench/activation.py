"""GPT-2's tanh GELU as transformers' Python `gelu_new` against the fused `gelu_pytorch_tanh` (what
`lacy.model` uses): same weights, same batch, one training step each, interleaved round by round.

    .venv/bin/python -m bench.activation --rounds 8      # configs/default.yaml shapes: small, 16 x 128, 2 threads

Prints the largest logit difference and the median seconds per step of each; refuses a busy machine;
writes `bench/results/activation.json`.
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
from lacy.model import gpt2_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=4097)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    start_load = load_guard(args.force)
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    models = {}
    for act in ("gelu_new", "gelu_pytorch_tanh"):
        torch.manual_seed(0)
        cfg = gpt2_config(args.preset, args.vocab, args.seq_len)
        cfg.activation_function = act
        model = GPT2LMHeadModel(cfg)
        models[act] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    with torch.no_grad():
        a, b = (m(input_ids=ids[:, :-1]).logits for m, _ in models.values())
    times: dict[str, list[float]] = {act: [] for act in models}
    for _ in range(args.rounds):
        for act, (model, optimizer) in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                logits = model(input_ids=ids[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times[act].append((time.perf_counter() - start) / args.steps)
    median = {act: statistics.median(t) for act, t in times.items()}
    result = {"max_logit_diff": (a - b).abs().max().item(), "s_per_step": {k: round(v, 4) for k, v in median.items()},
              "speedup": round(median["gelu_new"] / median["gelu_pytorch_tanh"], 3),
              "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()}, "args": vars(args)}
    print(json.dumps(result), flush=True)
    record(Path("bench/results/activation.json"), result, start_load, args.threads, args.force)

if __name__ == "__main__":
    main()
