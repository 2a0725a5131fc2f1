"""Scoring-job throughput: tokens/s per core of fact tagging, bare loop vs the Ray job, in one run.

    .venv/bin/python bench/score.py [--docs 600] [--reference-docs 200]

Measures, on the first `--docs` documents of the embedded corpus:
  1. bare      `lacy.shards.encode_documents` in this process (spaCy loaded beforehand): the baseline
  2. ray-1     `jobs.score` with 1 spaCy actor
  3. ray-2     `jobs.score` with 2 spaCy actors
  4. bare+ref / ray+ref: the same with a reference model (a random 4-layer GPT-2, 256 wide)
For the Ray runs, tokens/s is the marginal rate: the job runs on N/2 and on N documents and the
difference in tokens is divided by the difference in seconds, which cancels Ray Data and actor
start-up (reported separately); "end-to-end" includes it. Ratios are against the bare loop of the
same run. Prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs import score  # noqa: E402
from lacy.config import load_config  # noqa: E402
from lacy.data import read_corpus  # noqa: E402
from lacy.facts import FactTagger  # noqa: E402
from lacy.shards import encode_documents  # noqa: E402
from lacy.tokenizer import train_tokenizer  # noqa: E402


def bare(docs: list[dict], tok, tagger, reference=None) -> dict:
    start = time.perf_counter()
    encoded = encode_documents(docs, tok, tagger, reference)
    seconds = time.perf_counter() - start
    tokens = sum(len(d.ids) for d in encoded)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def ray_job(work: Path, name: str, docs: list[dict], tok_dir: Path, docs_per_shard: int,
            extra: list[str]) -> dict:
    """End-to-end seconds of `jobs.score` on `docs` (Ray already up; actors start inside)."""
    corpus = work / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "--run_dir", str(work), "--data.corpus", str(corpus), "--data.max_docs", "null",
        "--tokenizer.path", str(tok_dir), "--score.output_dir", str(work / name),
        "--score.docs_per_shard", str(docs_per_shard), "--mlflow.tracking_uri", f"sqlite:///{work}/mlflow.db",
        *extra])
    start = time.perf_counter()
    manifest = score.run(cfg)
    seconds = time.perf_counter() - start
    return {"tokens": sum(c["tokens"] for c in manifest.counts.values()), "seconds": seconds}


def marginal(work: Path, name: str, docs: list[dict], tok_dir: Path, docs_per_shard: int,
             extra: list[str]) -> dict:
    """Rate of the Ray job with start-up cancelled: (tokens(2N) - tokens(N)) / (time(2N) - time(N))."""
    half = ray_job(work, f"{name}-half", docs[:len(docs) // 2], tok_dir, docs_per_shard, extra)
    full = ray_job(work, f"{name}-full", docs, tok_dir, docs_per_shard, extra)
    rate = (full["tokens"] - half["tokens"]) / (full["seconds"] - half["seconds"])
    return {"tokens": full["tokens"], "tok_s": rate, "end_to_end": full["tokens"] / full["seconds"],
            "startup_s": half["seconds"] - half["tokens"] / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--reference-docs", type=int, default=200)
    parser.add_argument("--docs-per-shard", type=int, default=50)
    args = parser.parse_args()

    import ray
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lacy.model import load_big_model
    from lacy.reference import ReferenceScorer

    torch.set_num_threads(1)  # one core per worker, as in the actors
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    docs = list(read_corpus("embedded", max_docs=args.docs))
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=4096, out_dir=work / "tok")
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    tagger = FactTagger(cfg.facts)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(work / "ref")
    tok.save_pretrained(work / "ref")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 1024**2)
    results = {"bare": bare(docs, tok, tagger)}
    results["ray-1"] = marginal(work, "ray1", docs, work / "tok", args.docs_per_shard,
                                ["--score.spacy_actors", "1"])
    results["ray-2"] = marginal(work, "ray2", docs, work / "tok", args.docs_per_shard,
                                ["--score.spacy_actors", "2"])
    ref_model, ref_tok = load_big_model(str(work / "ref"))
    results["bare+ref"] = bare(docs[:args.reference_docs], tok, tagger, ReferenceScorer(ref_model, ref_tok))
    results["ray+ref"] = marginal(work, "rayref", docs[:args.reference_docs], work / "tok",
                                  args.docs_per_shard // 2,
                                  ["--score.spacy_actors", "1", "--score.reference", str(work / "ref")])
    ray.shutdown()

    cores = {"bare": 1, "ray-1": 1, "ray-2": 2, "bare+ref": 1, "ray+ref": 2}
    base = {"bare": "bare", "ray-1": "bare", "ray-2": "bare", "bare+ref": "bare+ref", "ray+ref": "bare+ref"}
    print(f"\n{args.docs} docs ({results['bare']['tokens']} tokens), reference runs on {args.reference_docs}")
    print("| run | cores | tokens/s | tokens/s/core | vs bare (same run) | end-to-end tokens/s "
          "| start-up s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["tok_s"] / results[base[name]]["tok_s"]
        e2e = f"{r['end_to_end']:.0f}" if "end_to_end" in r else "-"
        startup = f"{r['startup_s']:.1f}" if "startup_s" in r else "-"
        print(f"| {name} | {cores[name]} | {r['tok_s']:.0f} | {r['tok_s'] / cores[name]:.0f} | "
              f"{ratio:.2f}x | {e2e} | {startup} |")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
