"""Evaluation throughput: one cascade row as batch inference against the Serve path, and against a bound.

    .venv/bin/python -m bench.eval --config configs/synthbio-quick.yaml            # after `make run`
    .venv/bin/python -m bench.eval --config configs/synthbio-quick.yaml --people 40 --out /tmp/eval.json

On the models and thresholds a finished run left in its run_dir (`make run` for synthbio-quick), the
headline row — the LaCy model, the retrieval big side, P(<CALL>) at the calibrated 22 % threshold, one
biography per evaluation person — is written four ways in one run, on the same people:
  1. Serve: HTTP requests to the cascade's Serve app, experiment.eval_concurrency at a time (the path the
     evaluation took before; small steps batched across the concurrent requests, big calls across them);
  2. batch, in process: `LocalGenerator.generate_many` (every person's small steps one forward pass,
     every pending big call one batch); then the same row again on the same generator, as every row after
     the first of an evaluation runs: the big model starts each person from the context it kept
     (`big.prefix_cache`) and must write the same texts;
  3. batch on Ray Data: `jobs.experiment.BatchGenerator` (model actors, `map_batches`; actor start-up
     included);
  4. the bound: the big model's batched throughput for the tokens the batch path made it process
     (prefill and decode, measured here in full batches of the same size on the same machine) plus the
     small model's batched steps (one pass per step of max_new_tokens, at the same batch size).
Reported: people per minute of each, the ratios batch / Serve (aim >= 5) and bound time / batch time
(aim >= 0.6), for the first row and for a further row, and how many biographies the batch path writes
exactly as the Serve path does. A run refuses a busy machine and records its figures only when the machine
was idle (`bench.limits`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

from bench.limits import load_guard, record  # noqa: E402
from jobs.experiment import BatchGenerator, ServeGenerator  # noqa: E402
from lacy.cascade.batching import feed_many, sync_many  # noqa: E402
from lacy.cascade.hf_big import BigLM, HFBig, continue_batch  # noqa: E402
from lacy.cascade.lm import SmallLM  # noqa: E402
from lacy.core.compute import compute_thread  # noqa: E402
from lacy.core.config import load_config  # noqa: E402
from lacy.core.paths import REPO_ROOT  # noqa: E402
from lacy.corpus.corpora import corpus_for  # noqa: E402
from lacy.eval.generate import LocalGenerator, Request, bio_prompt  # noqa: E402
from lacy.eval.plan import population, threshold_key  # noqa: E402
from lacy.model import load_small_model  # noqa: E402
from services.cascade import delete  # noqa: E402
from services.cascade import run as serve_run  # noqa: E402
from services.runtime import init_ray  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


@torch.inference_mode()
def big_throughput(big: HFBig, batch: int, context: int, steps: int = 8) -> tuple[float, float]:
    """(prefill s per token, decode s per token) of the big model in full batches of `batch` sessions:
    a prefill of `context` tokens each, then `steps` batched decode steps."""
    text = " ".join(["word"] * context)
    warm = [BigLM(big.model, big.tokenizer) for _ in range(2)]
    big.compute.call(lambda: continue_batch(warm, [text] * 2, units=["tokens"] * 2, max_tokens=[2] * 2))
    lms = [BigLM(big.model, big.tokenizer) for _ in range(batch)]
    start = time.perf_counter()
    big.compute.call(sync_many, lms, [lm.encode(text) for lm in lms])
    prefill = (time.perf_counter() - start) / sum(len(lm.ids) for lm in lms)
    stats: dict = {}
    big.compute.call(lambda: continue_batch(lms, [text] * batch, units=["tokens"] * batch,
                                            max_tokens=[steps] * batch, stats=stats))
    return prefill, stats["decode_s"] / max(1, stats["decode_tokens"])


@torch.inference_mode()
def small_step_seconds(model_dir: str, batch: int, context: int) -> float:
    """Seconds of one batched small-model step (one token for each of `batch` sessions with `context`
    cached tokens)."""
    model, tokenizer = load_small_model(model_dir)
    lms = [SmallLM(model, tokenizer) for _ in range(batch)]
    ids = [tokenizer.bos_token_id or 0] * context
    feed_many(lms, [ids] * batch)
    start, steps = time.perf_counter(), 8
    for _ in range(steps):
        feed_many(lms, [[ids[-1]]] * batch)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthbio-quick.yaml")
    parser.add_argument("--model", default="lacy-steps", help="the trained model of the row")
    parser.add_argument("--people", type=int, default=None, help="people of the row (default: eval.entities)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "eval.json")
    parser.add_argument("--force", action="store_true", help="run on a busy machine (figures marked under load)")
    args, overrides = parser.parse_known_args(argv)
    start_load = load_guard(args.force)
    cfg = load_config(args.config, overrides)
    model_dir = Path(cfg.run_dir) / "train" / args.model / "final"
    thresholds = Path(cfg.run_dir) / "results" / "thresholds.json"
    if not model_dir.is_dir() or not thresholds.is_file():
        raise SystemExit(f"{model_dir} or {thresholds} is missing: run the experiment first (make run)")
    rate = cfg.experiment.headline_rate
    threshold = json.loads(thresholds.read_text())[threshold_key(args.model, "retrieval", "p_call", rate)]["threshold"]
    people = population(cfg, corpus_for(cfg)).train[:args.people or cfg.eval.entities]
    requests = [Request(bio_prompt(e, cfg.eval.prompt_style), args.model, "retrieval", "p_call", threshold,
                        cfg.cascade.max_new_tokens, topic=e.name) for e in people]
    models = {args.model: str(model_dir)}
    # Every core, as Serve's replicas and Ray Data's actors together have (serve.torch_threads is per replica).
    compute_thread().set_threads(os.cpu_count() or 1)
    print(f"# {len(people)} people, {args.model} + retrieval at threshold {threshold:.3f}, "
          f"torch threads {compute_thread().call(torch.get_num_threads)}", flush=True)

    local = LocalGenerator(cfg, models)
    batch, batch_s = timed(local.generate_many, requests)
    big = local.big.inner if hasattr(local.big, "inner") else local.big
    stats = dict(big.stats)
    print(f"batch in process: {batch_s:.1f} s", flush=True)
    again, again_s = timed(local.generate_many, requests)
    again_stats = {k: v - stats.get(k, 0) for k, v in big.stats.items()}
    print(f"batch in process, a further row: {again_s:.1f} s", flush=True)

    init_ray()
    ray_out, ray_s = timed(BatchGenerator(cfg, models).generate_many, requests)
    print(f"batch on Ray Data: {ray_s:.1f} s", flush=True)

    scfg = load_config(args.config, [*overrides, "--serve.small_path", str(model_dir), "--big.retrieval", "true"])
    scfg.serve.models = models
    serve_run(scfg, name="bench-eval", route_prefix="/bench-eval")
    try:
        generator = ServeGenerator(f"http://{cfg.serve.host}:{cfg.serve.port}/bench-eval",
                                   cfg.experiment.eval_concurrency)
        generator.generate_many(requests[:2])  # warm-up: both replicas loaded and answering
        served, serve_s = timed(generator.generate_many, requests)
    finally:
        delete("bench-eval")
    print(f"Serve: {serve_s:.1f} s", flush=True)

    size = min(len(requests), cfg.eval.batch_people)
    prefill_tok, decode_tok = big_throughput(big, size, context=64)
    small_step = small_step_seconds(str(model_dir), size, context=32)
    chunks = -(-len(requests) // size)
    bound = lambda s: (s.get("prefill_tokens", 0) * prefill_tok + s.get("decode_tokens", 0) * decode_tok  # noqa: E731
                       + chunks * cfg.cascade.max_new_tokens * small_step)
    bound_s, again_bound_s = bound(stats), bound(again_stats)
    per_min = lambda seconds: 60 * len(requests) / seconds  # noqa: E731
    same = lambda outs: sum(a.text == b.text and a.spans == b.spans for a, b in zip(outs, batch, strict=True))  # noqa: E731
    result = {
        "command": "python -m bench.eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "people": len(requests), "model": args.model, "threshold": threshold,
        "torch_threads": compute_thread().call(torch.get_num_threads), "big_fill": cfg.eval.big_fill,
        "seconds": {"serve": serve_s, "batch_in_process": batch_s, "batch_ray_data": ray_s, "bound": bound_s,
                    "batch_further_row": again_s, "bound_further_row": again_bound_s},
        "people_per_min": {"serve": per_min(serve_s), "batch_in_process": per_min(batch_s),
                           "batch_ray_data": per_min(ray_s), "bound": per_min(bound_s),
                           "batch_further_row": per_min(again_s), "bound_further_row": per_min(again_bound_s)},
        "batch_over_serve": serve_s / batch_s, "ray_data_over_serve": serve_s / ray_s,
        "further_row_over_serve": serve_s / again_s,
        "batch_of_bound": bound_s / batch_s, "further_row_of_bound": again_bound_s / again_s,
        "identical_to_serve": same(served), "identical_ray_data": same(ray_out), "identical_further_row": same(again),
        "further_row_prefix": {k: again_stats.get(k) for k in ("prefix_hits", "prefix_tokens", "prefill_tokens",
                                                               "prefill_s", "decode_s")},
        "big_model": {"prefill_tokens": stats.get("prefill_tokens"), "decode_tokens": stats.get("decode_tokens"),
                      "prefill_s": stats.get("prefill_s"), "decode_s": stats.get("decode_s"),
                      "batches": stats.get("batches"), "calls": stats.get("calls"),
                      "decode_steps": stats.get("decode_steps"),
                      "prefill_s_per_token_full_batch": prefill_tok, "decode_s_per_token_full_batch": decode_tok},
        "small_step_s_full_batch": small_step,
    }
    print(json.dumps({k: result[k] for k in ("people_per_min", "batch_over_serve", "batch_of_bound",
                                              "further_row_over_serve", "further_row_of_bound", "identical_to_serve",
                                              "identical_ray_data", "identical_further_row")}, indent=2), flush=True)
    return record(args.out, result, start_load, force=args.force)


if __name__ == "__main__":
    main()
