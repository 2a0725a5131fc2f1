"""Calibrate the cascade: the fixed P(<CALL>) threshold that gives a target call rate.

Decodes held-out prompts with the small model alone (no big model needed) and takes the (1 - rate)
quantile of P(<CALL>)'s log-odds at the decision points (`lacy.cascade.engine.calibrate`): log-odds, because a
sure model's probabilities round to exactly 1 and tie. Prompts: one per line of
`--prompts FILE`, else the first `--prompt-words` words of `--n` validation documents of `data.corpus`.

    python -m jobs.calibrate --config configs/tiny.yaml --small runs/tiny/train/final --rate 0.22
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.calibrate --config configs/small.yaml --small runs/small/train/final --rate 0.22

Prints and writes JSON {log_odds, threshold, rate, prompts, small, config_hash} to `--out`
(default `<run_dir>/calibration.json`), with the resolved config beside it: deploy with
`cascade.call_log_odds` (or send `call_log_odds`); `threshold` is the same as a probability, which
rounds to 1.0 past log-odds ≈ 37.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from lacy.cascade.engine import Cascade, SmallLM, calibrate, probability
from lacy.core.config import config_hash, parse_cli, save_config
from lacy.corpus.readers import read_corpus, split_of
from lacy.corpus.tokenizer import load_tokenizer

OPTIONS = """
Calibration options:
  --small PATH         small-model directory (safetensors + tokenizer) [required]
  --rate R             target call rate (default cascade.call_rate)
  --prompts FILE       prompts, one per line (default: starts of validation documents)
  --n N                validation documents used as prompts (default 50)
  --prompt-words W     words of each document used as its prompt (default 8)
  --out FILE           where the JSON goes (default <run_dir>/calibration.json)
"""


def _arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--small")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--prompts")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--out")
    return parser.parse_known_args(argv)


def validation_prompts(corpus: str, val_fraction: float, n: int, words: int) -> list[str]:
    """The first `words` words of the first `n` validation documents of the corpus."""
    prompts = []
    for doc in read_corpus(corpus):
        if split_of(doc["id"], val_fraction) == "val" and len(doc["text"].split()) > words:
            prompts.append(" ".join(doc["text"].split()[:words]))
            if len(prompts) == n:
                break
    return prompts


def main(argv: list[str] | None = None) -> dict:
    args, rest = _arguments(argv)
    cfg = parse_cli(rest, description=__doc__ + OPTIONS)
    if not args.small:
        raise SystemExit("--small PATH is required (the small model's directory)")
    rate = cfg.cascade.call_rate if args.rate is None else args.rate
    if rate is None or not 0.0 <= rate <= 1.0:
        raise SystemExit(f"--rate must be in [0, 1], got {rate}")
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        prompts = validation_prompts(cfg.data.corpus, cfg.data.val_fraction, args.n, args.prompt_words)
    if not prompts:
        raise SystemExit("no prompts to calibrate on (empty --prompts file or no validation documents)")

    model = AutoModelForCausalLM.from_pretrained(args.small, use_safetensors=True)
    cascade = Cascade(SmallLM(model, load_tokenizer(args.small)), None, cfg.cascade)
    bound = calibrate(cascade, prompts, rate)

    out = Path(args.out) if args.out else Path(cfg.run_dir) / "calibration.json"
    result = {"log_odds": bound, "threshold": probability(bound), "rate": rate, "prompts": len(prompts),
              "small": str(Path(args.small).resolve()), "config_hash": config_hash(cfg)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    save_config(cfg, out.with_name(out.stem + ".config.yaml"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
