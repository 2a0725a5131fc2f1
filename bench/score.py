"""Scoring-job throughput: tokens/s per core of fact tagging, bare loop vs the Ray job, in one run.

    .venv/bin/python -m bench.score [--docs 400] [--reference-docs 100]

Measures, on the first `--docs` documents of the embedded corpus:
  1. bare      `lacy.scoring.encode_documents` in this process (spaCy loaded beforehand): the baseline
  2. ray-1     `jobs.score` with 1 spaCy actor
  3. ray-2     `jobs.score` with 2 spaCy actors
  4. bare (again): the baseline once more, to show how much the machine's load drifted meanwhile
  5. bare+ref / ray+ref: the same with a reference model (a random 4-layer GPT-2, 256 wide); the Ray
     job runs 1 spaCy actor and 1 model actor (2 cores)
For the Ray runs, tokens/s is the steady rate between the first and the last unit written (see
`ray_job`), without Ray Data and actor start-up (reported separately); "end-to-end" includes it.
Ratios are against the bare loop of the same run. Prints a Markdown table for bench/README.md.
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
                   "TOKENIZERS_PARALLELISM": "false",
                   # one BLAS/OpenMP thread, as Ray gives its workers: a fair single-core baseline
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs import score  # noqa: E402
from lacy.config import load_config  # noqa: E402
from lacy.data import read_corpus  # noqa: E402
from lacy.facts import FactTagger  # noqa: E402
from lacy.scoring import encode_documents  # noqa: E402
from lacy.tokenizer import train_tokenizer  # noqa: E402


def bare(docs: list[dict], tok, tagger, reference=None) -> dict:
    start = time.perf_counter()
    encoded = encode_documents(docs, tok, tagger, reference)
    seconds = time.perf_counter() - start
    tokens = sum(len(d.ids) for d in encoded)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def ray_job(work: Path, name: str, docs: list[dict], tok_dir: Path, batch: int, extra: list[str]) -> dict:
    """`jobs.score` on `docs` (Ray already up; its actors start inside), one unit per actor batch.

    Steady rate: tokens of every unit but the first over the time between the first and the last unit
    record written (their mtimes), which leaves out Ray Data and actor start-up.
    """
    corpus = work / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = work / name
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "--run_dir", str(work), "--data.corpus", str(corpus), "--data.max_docs", "null",
        "--tokenizer.path", str(tok_dir), "--score.output_dir", str(out),
        "--score.docs_per_shard", str(batch), "--facts.batch_size", str(batch),
        "--mlflow.tracking_uri", f"sqlite:///{work}/mlflow.db", *extra])
    start = time.time()
    manifest = score.run(cfg)
    units = sorted(((p.stat().st_mtime, json.loads(p.read_text())) for p in (out / "units").glob("*.json")),
                   key=lambda u: u[0])
    tokens = [sum(c["tokens"] for c in record["counts"].values()) for _, record in units]
    assert sum(tokens) == sum(c["tokens"] for c in manifest.counts.values())
    return {"tokens": sum(tokens), "tok_s": sum(tokens[1:]) / (units[-1][0] - units[0][0]),
            "end_to_end": sum(tokens) / (units[-1][0] - start), "startup_s": units[0][0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--reference-docs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16,
                        help="documents per spaCy batch, per Ray Data batch and per unit (shard)")
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
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--facts.batch_size", str(args.batch)])
    tagger = FactTagger(cfg.facts)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(work / "ref")
    tok.save_pretrained(work / "ref")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 1024**2)
    results = {"bare": bare(docs, tok, tagger)}
    results["ray-1"] = ray_job(work, "ray1", docs, work / "tok", args.batch, ["--score.spacy_actors", "1"])
    results["ray-2"] = ray_job(work, "ray2", docs, work / "tok", args.batch, ["--score.spacy_actors", "2"])
    results["bare (again)"] = bare(docs, tok, tagger)  # drift of the machine's load during the run
    ref_model, ref_tok = load_big_model(str(work / "ref"))
    results["bare+ref"] = bare(docs[:args.reference_docs], tok, tagger, ReferenceScorer(ref_model, ref_tok))
    results["ray+ref"] = ray_job(work, "rayref", docs[:args.reference_docs], work / "tok", args.batch,
                                 ["--score.spacy_actors", "1", "--score.reference", str(work / "ref")])
    ray.shutdown()

    cores = {"bare": 1, "ray-1": 1, "ray-2": 2, "bare (again)": 1, "bare+ref": 1, "ray+ref": 2}
    base = {"bare": "bare", "ray-1": "bare", "ray-2": "bare", "bare (again)": "bare", "bare+ref": "bare+ref",
            "ray+ref": "bare+ref"}
    print(f"\n{args.docs} docs ({results['bare']['tokens']} tokens), reference runs on {args.reference_docs}, "
          f"batches and units of {args.batch} docs")
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
