"""Scoring speed and memory against this machine's limits, in one run.

    .venv/bin/python -m bench.score --docs 1000 --reference-docs 400 --huge-tokens 540000

On the first `--docs` documents of the embedded corpus (Wikipedia leads), one BLAS/OpenMP thread per
process (as Ray gives its 1-CPU workers), in order:

  spacy ceiling   bare `nlp.pipe` with only the components the fact rule reads: the tagging ceiling
  bare            `lacy.shards.scoring.encode_documents` (spaCy + BPE + alignment) in this process
  ray-1 / ray-2   `jobs.score` with 1 / 2 spaCy actors (Ray Data)
                  (the first four run `--repeats` times, interleaved; medians are reported)
  bare+ref        the bare loop with a reference model (a random 4-layer, 256-wide GPT-2)
  ray+ref         `jobs.score` with 1 spaCy actor + 1 model actor; the model actor's CPU use is sampled
  memory          `jobs.score` (1 spaCy actor) on 20 small documents + one of `--huge-tokens` tokens, at
                  two `facts.max_chars`: peak RSS of the actor, sampled every 0.2 s

Ray rates are steady-state: tokens of all units but the first over the time between the first and
the last unit written (start-up reported apart). Targets (issue 19): bare >= 0.9x the spaCy ceiling,
ray-1 >= 0.9x bare, ray-2 >= 1.8x bare, the model actor near 100 % of its core, actor RSS bounded by
`facts.max_chars` whatever the document size. Refuses to start above a load of 1.5 per core;
writes `bench/results/score.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from bench.limits import ProcessSampler, busiest, load_guard, process_group, record  # noqa: E402
from jobs import score  # noqa: E402
from lacy.core.config import load_config  # noqa: E402
from lacy.corpus.corpora import read_corpus  # noqa: E402
from lacy.corpus.tokenizer import train_tokenizer  # noqa: E402
from lacy.labels.facts import FactTagger  # noqa: E402
from lacy.shards.scoring import encode_documents  # noqa: E402

MIN_UNITS = 8


def actor_group(title: str) -> str | None:
    """The scoring actors by class, every other process as `bench.limits.process_group` names it."""
    if title.startswith("ray::"):
        return next((n for n in ("TagActor", "ModelActor") if n in title), process_group(title))
    return process_group(title)


def spacy_ceiling(texts: list[str], tokens: int, tagger: FactTagger, batch: int) -> dict:
    """Bare `nlp.pipe` over `texts`, `tokens` being our tokens of them."""
    start = time.perf_counter()
    for _ in tagger.nlp.pipe(texts, batch_size=batch):
        pass
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def bare(docs: list[dict], tok, tagger, reference=None) -> dict:
    """`encode_documents` in this process."""
    start = time.perf_counter()
    encoded = encode_documents(docs, tok, tagger, reference)
    seconds = time.perf_counter() - start
    tokens = sum(len(d.ids) for d in encoded)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def ray_job(work: Path, name: str, docs: list[dict], tok_dir: Path, batch: int, extra: list[str],
            steady: bool = True) -> dict:
    """`jobs.score` on `docs` (Ray already up; its actors start inside), one unit per actor batch;
    with `steady`, the rate between the first and the last unit written."""
    corpus = work / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = work / name
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "--run_dir", str(work), "--data.corpus", str(corpus), "--data.max_docs", "null",
        "--tokenizer.path", str(tok_dir), "--score.output_dir", str(out),
        "--score.docs_per_shard", str(batch), "--facts.batch_size", str(batch),
        "--mlflow.tracking_uri", f"sqlite:///{work}/mlflow.db", *extra])
    start = time.time()
    with ProcessSampler(actor_group) as sampler:
        manifest = score.run(cfg)
    units = sorted(((p.stat().st_mtime, json.loads(p.read_text())) for p in (out / "units").glob("*.json")),
                   key=lambda u: u[0])
    tokens = [sum(c["tokens"] for c in record["counts"].values()) for _, record in units]
    assert sum(tokens) == sum(c["tokens"] for c in manifest.counts.values())
    first, last = units[0][0], units[-1][0]
    result = {"tokens": sum(tokens), "end_to_end": sum(tokens) / (last - start), "startup_s": first - start,
              "peak_rss_mb": {n: sampler.peak_rss(n) / 2**20 for n in ("TagActor", "ModelActor")},
              "cpu_share": {n: sampler.cpu_share(n, first, last) for n in ("TagActor", "ModelActor")},
              "cores_busy": busiest(sampler, first, last)}
    # Fewer units than this arrive in bursts, and a rate between the first and the last means nothing.
    if not steady:
        return result
    if len(units) < MIN_UNITS:
        raise SystemExit(f"{name}: {len(units)} units; the steady rate needs at least {MIN_UNITS} "
                         "(more --docs / --reference-docs, or a smaller --batch)")
    result["tok_s"] = sum(tokens[1:]) / (last - first)
    return result


def model_actor_profile(events: list[dict], since: float) -> dict:
    """Where the model actor's core went, from `ray.timeline()`: its busy share between its first start
    and its last end, and its idle time split into waiting for the spaCy actor (the next tagged batch
    did not exist yet) and hand-over (it existed: Ray Data had not delivered it yet)."""
    def spans(actor: str) -> list[tuple[float, float]]:
        return sorted((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in events
                      if e.get("ph") == "X" and e["ts"] / 1e6 >= since
                      and e.get("cat") == f"task::MapWorker(MapBatches({actor})).submit")

    tagged, model = spans("TagActor"), spans("ModelActor")
    ready = sorted(end for _, end in tagged)
    busy = sum(end - start for start, end in model)
    waiting = handover = 0.0
    for i in range(len(model) - 1):
        gap_start, gap = model[i][1], model[i + 1][0] - model[i][1]
        starved = min(max(ready[i + 1] - gap_start, 0.0), gap) if i + 1 < len(ready) else 0.0
        waiting, handover = waiting + starved, handover + gap - starved
    window = model[-1][1] - model[0][0]
    return {"batches": len(model), "window_s": window, "busy_share": busy / window,
            "idle_waiting_for_spacy_s": waiting, "idle_handover_s": handover,
            "spacy_busy_share": sum(e - s for s, e in tagged) / window,
            "mean_model_batch_s": busy / len(model), "mean_spacy_batch_s": sum(e - s for s, e in tagged) / len(tagged)}


def huge_corpus(docs: list[dict], tok, tokens: int) -> list[dict]:
    """20 ordinary documents and one of about `tokens` tokens (the corpus' texts joined, repeated)."""
    joined = "\n".join(d["text"] for d in docs)
    per_char = len(tok(joined[:200_000], add_special_tokens=False)["input_ids"]) / min(len(joined), 200_000)
    chars = int(tokens / per_char)
    text = (joined + "\n") * (chars // (len(joined) + 1) + 1)
    return [*docs[:20], {"id": "huge", "title": "Huge", "text": text[:chars]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--reference-docs", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32,
                        help="documents per spaCy batch, per Ray Data batch and per unit (shard)")
    parser.add_argument("--huge-tokens", type=int, default=540_000, help="0: skip the memory runs")
    parser.add_argument("--max-chars", type=int, nargs="+", default=[100_000, 20_000],
                        help="facts.max_chars of the memory runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the ceiling, bare, ray-1, ray-2 (median)")
    parser.add_argument("--force", action="store_true", help="run (and record) on a busy machine")
    parser.add_argument("--reference-only", type=int, default=0, metavar="N",
                        help="only bare+ref and N runs of ray+ref, with the model actor's timeline profile "
                             "(writes bench/results/score-reference.json)")
    args = parser.parse_args()
    start_load = load_guard(args.force)

    import ray
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lacy.labels.reference import ReferenceScorer
    from lacy.model import load_big_model

    torch.set_num_threads(1)  # one core per worker, as in the actors
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    docs = list(read_corpus("embedded", max_docs=args.docs))
    tok = train_tokenizer([d["text"] for d in docs], vocab_size=4096, out_dir=work / "tok")
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--facts.batch_size", str(args.batch)])
    texts = [d["text"] for d in docs]
    n_tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(work / "ref")
    tok.save_pretrained(work / "ref")

    # A fresh spaCy for every in-process run, as every actor starts with one: spaCy caches each new
    # word it meets (its vocabulary grows), so a second pass over the same texts is ~12 % cheaper.
    def fresh() -> FactTagger:
        return FactTagger(cfg.facts)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 1024**2)
    if args.reference_only:
        reference_runs(args, work, docs, tok, fresh(), start_load)
        return
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {"spacy ceiling": [], "bare": [], "ray-1": [], "ray-2": []}
    for r in range(args.repeats):  # interleaved, so drift of the machine's load biases no variant
        runs["spacy ceiling"].append(spacy_ceiling(texts, n_tokens, fresh(), args.batch))
        runs["bare"].append(bare(docs, tok, fresh()))
        runs["ray-1"].append(ray_job(work, f"ray1-{r}", docs, work / "tok", args.batch, ["--score.spacy_actors", "1"]))
        runs["ray-2"].append(ray_job(work, f"ray2-{r}", docs, work / "tok", args.batch, ["--score.spacy_actors", "2"]))
        print(json.dumps({"repeat": r, **{n: round(v[-1]["tok_s"]) for n, v in runs.items()}}), flush=True)
    for name, values in runs.items():
        rates = [v["tok_s"] for v in values]
        results[name] = {**min(values, key=lambda v: abs(v["tok_s"] - statistics.median(rates))),
                         "tok_s": statistics.median(rates), "all_tok_s": [round(x) for x in rates]}
    ref_model, ref_tok = load_big_model(str(work / "ref"))
    results["bare+ref"] = bare(docs[:args.reference_docs], tok, fresh(), ReferenceScorer(ref_model, ref_tok))
    results["ray+ref"] = ray_job(work, "rayref", docs[:args.reference_docs], work / "tok", args.batch,
                                 ["--score.spacy_actors", "1", "--score.reference", str(work / "ref")])
    memory = {}
    if args.huge_tokens:
        huge = huge_corpus(docs, tok, args.huge_tokens)
        for max_chars in args.max_chars:
            start = time.perf_counter()
            run = ray_job(work, f"huge{max_chars}", huge, work / "tok", args.batch,
                          ["--score.spacy_actors", "1", "--facts.max_chars", str(max_chars)], steady=False)
            memory[max_chars] = {"tokens": run["tokens"], "seconds": time.perf_counter() - start,
                                 "tag_actor_peak_rss_mb": run["peak_rss_mb"]["TagActor"]}
            print(json.dumps({"memory": max_chars, **memory[max_chars]}), flush=True)
    ray.shutdown()

    bare_rate = results["bare"]["tok_s"]
    ratios = {"bare_vs_spacy_ceiling": results["bare"]["tok_s"] / results["spacy ceiling"]["tok_s"],
              "ray1_vs_bare": results["ray-1"]["tok_s"] / bare_rate,
              "ray2_vs_bare": results["ray-2"]["tok_s"] / bare_rate,
              "rayref_vs_bareref": results["ray+ref"]["tok_s"] / results["bare+ref"]["tok_s"],
              "model_actor_cpu_share": results["ray+ref"]["cpu_share"]["ModelActor"]}
    print(f"\n{args.docs} docs ({n_tokens} tokens), reference runs on {args.reference_docs}, batches and "
          f"units of {args.batch} docs")
    print(f"spacy ceiling, bare, ray-1, ray-2: median of {args.repeats} interleaved runs (all runs in brackets)")
    print("| run | cores | tokens/s | tokens/s/core | vs | ratio | end-to-end tokens/s | start-up s |")
    print("|---|---|---|---|---|---|---|---|")
    cores = {"ray-2": 2, "ray+ref": 2}
    base = {"bare": "spacy ceiling", "ray-1": "bare", "ray-2": "bare", "ray+ref": "bare+ref"}
    rate = {n: r["tok_s"] for n, r in results.items()}
    for name, r in results.items():
        vs = base.get(name)
        ratio = f"{r['tok_s'] / rate[vs]:.2f}x" if vs else "-"
        e2e = f"{r['end_to_end']:.0f}" if "end_to_end" in r else "-"
        startup = f"{r['startup_s']:.1f}" if "startup_s" in r else "-"
        n = cores.get(name, 1)
        spread = f" {r['all_tok_s']}" if "all_tok_s" in r else ""
        print(f"| {name} | {n} | {r['tok_s']:.0f}{spread} | {r['tok_s'] / n:.0f} | {vs or '-'} | {ratio} | {e2e} "
              f"| {startup} |")
    print(json.dumps({"summary": {k: round(v, 3) for k, v in ratios.items()}}), flush=True)
    record(REPO / "bench" / "results" / "score.json",
           {"args": vars(args), "tokens": n_tokens, "results": results, "memory": memory, **ratios},
           start_load, own_threads=2, force=args.force)


def reference_runs(args: argparse.Namespace, work: Path, docs: list[dict], tok, tagger, start_load: float) -> None:
    """bare+ref once, ray+ref `--reference-only` times, each with the model actor's timeline profile."""
    import ray

    from lacy.labels.reference import ReferenceScorer
    from lacy.model import load_big_model

    ref_model, ref_tok = load_big_model(str(work / "ref"))
    bare_ref = bare(docs[:args.reference_docs], tok, tagger, ReferenceScorer(ref_model, ref_tok))
    runs = []
    for r in range(args.reference_only):
        since = time.time()
        run = ray_job(work, f"rayref{r}", docs[:args.reference_docs], work / "tok", args.batch,
                      ["--score.spacy_actors", "1", "--score.reference", str(work / "ref")])
        run["profile"] = model_actor_profile(ray.timeline(), since)
        runs.append(run)
        print(json.dumps({"run": r, "tok_s": round(run["tok_s"]),
                          "vs_bare_ref": round(run["tok_s"] / bare_ref["tok_s"], 3),
                          "sampled_model_cpu": round(run["cpu_share"]["ModelActor"], 3),
                          **{k: round(v, 3) for k, v in run["profile"].items()}}), flush=True)
    ray.shutdown()
    record(REPO / "bench" / "results" / "score-reference.json",
           {"args": vars(args), "bare+ref": bare_ref, "ray+ref": runs}, start_load, own_threads=2, force=args.force)


if __name__ == "__main__":
    main()
