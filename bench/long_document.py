"""One huge document in the scoring job: wall seconds, and the CPU seconds of each spaCy actor.

    .venv/bin/python -m bench.long_document [--mb 2.4] [--docs 200] [--force]

`jobs.score` (Ray Data, 2 spaCy actors at 0.5 CPU, as the default config) on `--docs` embedded
Wikipedia leads plus one document of `--mb` MB (leads joined until that size). Before lacy split long
documents, the huge one ran on one actor while the other idled (issue 32: 133 s of tagging, 168 s for
the job); now its pieces (facts.max_chars each) spread over both. Writes bench/results/long_document.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

from bench.limits import ProcessSampler, load_guard, record  # noqa: E402


def tag_actor(title: str) -> str | None:
    return "TagActor" if title.startswith("ray::") and "TagActor" in title else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=2.4)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/long_document.json"))
    parser.add_argument("--force", action="store_true", help="measure on a busy machine (marked under_load)")
    args = parser.parse_args(argv)
    load = load_guard(args.force)

    import ray

    from jobs import score
    from lacy.core.config import load_config
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="lacy-longdoc-"))
    docs = list(read_corpus("embedded", max_docs=2000))
    huge, i = [], 0
    while sum(len(t) + 2 for t in huge) < args.mb * 1e6:
        huge.append(docs[i % len(docs)]["text"])
        i += 1
    corpus = [*docs[:args.docs // 2], {"id": "huge", "title": "Huge", "text": "\n\n".join(huge)},
              *docs[args.docs // 2:args.docs]]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    train_tokenizer([d["text"] for d in docs[:300]], 2048, root / "tokenizer")
    cfg = load_config(None, ["--run_dir", str(root), "--data.corpus", str(root / "corpus.jsonl"),
                             "--data.max_docs", "null", "--tokenizer.path", str(root / "tokenizer"),
                             "--mlflow.tracking_uri", f"sqlite:///{root}/mlflow.db"])
    ray.init(num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        with ProcessSampler(tag_actor, every=0.5) as sampler:
            start = time.perf_counter()
            manifest = score.run(cfg)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    cpu: dict[int, list[float]] = {}
    for _, pid, _, _, cpu_s in sampler.samples:
        cpu.setdefault(pid, []).append(cpu_s)
    actors = sorted((round(c[-1] - c[0], 1) for c in cpu.values()), reverse=True)
    tokens = sum(c["tokens"] for c in manifest.counts.values())
    result = {"mb": round(len(corpus[args.docs // 2]["text"]) / 1e6, 2), "docs": len(corpus),
              "seconds": round(seconds, 1), "actor_cpu_s": actors, "tokens": tokens,
              "rejects": manifest.rejects["total"],
              "spacy_actors": cfg.score.spacy_actors, "max_chars": cfg.facts.max_chars}
    print(f"{result['mb']} MB document + {args.docs} leads: {seconds:.1f} s; spaCy actors' CPU seconds {actors}; "
          f"{tokens} tokens, {result['rejects']} rejects")
    record(args.out, result, load, own_threads=2, force=args.force)
    return result


if __name__ == "__main__":
    main()
