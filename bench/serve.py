"""Serve cascade benchmark: in-process cascade vs the Ray Serve path, concurrency with a profile, a load run.

    .venv/bin/python -m bench.serve [--small runs/default/train/lacy-steps/final] [--requests 1000]
    .venv/bin/python -m bench.serve --quick          # a sanity run: 2 prompts, 20 requests, nothing written
    .venv/bin/python -m bench.serve --quick --serve.small_batch_wait_s 0.01   # any config override
    .venv/bin/python -m bench.serve --threads 1 --out bench/results/serve-threads1.json
    .venv/bin/python -m bench.serve --threads 1 --in-process-threads 2 --out /tmp/serve.json  # in process on both cores

Measured in one run, on 127.0.0.1 only, bounded in count and time, the plain big model (SmolLM2, fp32):
  1. seconds per generated token, in-process `Cascade` vs POST /generate (sequential, same prompts, same
     fixed threshold calibrated to a 22 % call rate): ratio Serve / in-process (aim <= 1.2);
  2. generated tokens/s at 8 concurrent streams vs 1 (aim >= 2.5x on the 2-core CPU box), with the
     profile of each phase: small-model steps per batched pass, big-model calls per batch, the big
     model's prefill vs decode seconds, and the time steps and calls waited for their batch;
  3. `--requests` requests at concurrency 16: errors (aim 0), latency p50/p99.
"Generated tokens" are both models' own tokens (CascadeResult.small_tokens + big_tokens), the same
count in process and through Serve. A run refuses to start on a busy machine (`bench.limits.load_guard`)
and writes its figures only if the machine was idle at the start and, less the bench's own threads,
at the end (`bench.limits.record`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

from bench.limits import load_guard, record  # noqa: E402

PROMPTS = ["Marie Curie (", "Albert Einstein was born in", "The Eiffel Tower is located in", "Isaac Newton (",
           "Johann Sebastian Bach was a", "The capital of Japan is", "Leonardo da Vinci (",
           "Charles Darwin was born in"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_small_model(path: Path) -> Path:
    """A `small`-preset model over a tokenizer trained on the embedded corpus (untrained weights:
    the benchmark measures serving, not quality)."""
    import torch

    from lacy.core.config import ModelConfig
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.model import build_model

    tok = train_tokenizer([d["text"] for d in read_corpus("embedded", max_docs=2000)], 4096, path)
    torch.manual_seed(0)
    build_model(ModelConfig(preset="small", seq_len=128), tok).save_pretrained(path)
    return path


def _tokens(out: dict) -> int:
    return out["small_tokens"] + out["big_tokens"]


def _profile(http, before: dict | None = None) -> dict:
    """Cumulative counters of the small side (/healthz) and the big side (/v1/models), or their change."""
    small = http.get("/healthz").json()  # probes the big model, which refreshes its info below
    big = http.get("/v1/models").json()["big_model"]["stats"]
    now = {"small_passes": small["small_passes"], "small_steps": small["small_steps"],
           "small_forward_s": small["small_forward_s"], "small_wait_s": small["small_wait_s"],
           **{f"big_{k}": v for k, v in big.items()}}
    return now if before is None else {k: now[k] - before.get(k, 0) for k in now}


def _summary(delta: dict, seconds: float) -> dict:
    per = lambda a, b: delta.get(a, 0) / max(1, delta.get(b, 0))  # noqa: E731
    return {"small_steps_per_pass": per("small_steps", "small_passes"),
            "small_forward_share": delta["small_forward_s"] / seconds,
            "small_wait_ms_per_step": 1000 * per("small_wait_s", "small_steps"),
            "big_calls_per_batch": per("big_calls", "big_batches"),
            "big_prefill_share": delta.get("big_prefill_s", 0) / seconds,
            "big_decode_share": delta.get("big_decode_s", 0) / seconds,
            "big_prefill_tokens_per_batch": per("big_prefill_tokens", "big_batches"),
            "big_decode_steps_per_batch": per("big_decode_steps", "big_batches"),
            "big_wait_ms_per_call": 1000 * per("big_wait_s", "big_calls"),
            "big_arrival_ms_per_call": 1000 * per("big_arrival_s", "big_calls")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", help="small model directory (default: an untrained `small` model)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--load-max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per replica")
    parser.add_argument("--in-process-threads", type=int, default=None,
                        help="torch threads of the in-process cascade (default: --threads, like for like)")
    parser.add_argument("--quick", action="store_true", help="2 prompts per stream, 20 load requests, no file")
    parser.add_argument("--force", action="store_true", help="run and write on a busy machine (marked under_load)")
    parser.add_argument("--out", default="bench/results/serve.json", help="where the figures are written")
    args, overrides = parser.parse_known_args()
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    requests = 20 if args.quick else args.requests
    start_load = load_guard(args.force)

    import httpx
    import ray
    import torch

    from lacy.cascade.engine import Cascade
    from lacy.cascade.hf_big import BigLM
    from lacy.cascade.lm import SmallLM
    from lacy.cascade.policy import calibrate
    from lacy.core.config import load_config
    from lacy.model import load_big_model, load_small_model
    from services.cascade import delete, run

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    small_dir = Path(args.small) if args.small else _tiny_small_model(work / "small")
    cfg = load_config(None, ["--run_dir", str(work), "--serve.small_path", str(small_dir),
                             "--serve.port", str(_free_port()), "--cascade.max_new_tokens", str(args.max_tokens),
                             # Small and big replicas compute in turn for a request, as in-process.
                             "--serve.torch_threads", str(args.threads), *overrides])
    torch.set_num_threads(args.in_process_threads or args.threads)  # each model as many threads as a replica
    small_model, small_tok = load_small_model(small_dir)
    big_model, big_tok = load_big_model(cfg.big.path)

    # 1a. In-process: a fresh cascade per prompt (as Serve makes one per request), fixed threshold.
    probe = Cascade(SmallLM(small_model, small_tok), BigLM(big_model, big_tok), cfg.cascade)
    threshold = calibrate(probe, PROMPTS, 0.22)
    probe.generate(PROMPTS[0], call_log_odds=threshold)  # warm-up, as Serve gets one below
    start, tokens, calls = time.perf_counter(), 0, 0
    for prompt in prompts:
        r = Cascade(SmallLM(small_model, small_tok), BigLM(big_model, big_tok), cfg.cascade).generate(
            prompt, call_log_odds=threshold)
        tokens += r.small_tokens + r.big_tokens
        calls += r.calls
    in_process = (time.perf_counter() - start) / tokens
    del big_model  # the Serve replica loads its own

    # 1b. The same through Serve.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run(cfg, name="bench-serve", route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{cfg.serve.port}", timeout=600)
    body = lambda p, m=args.max_tokens: {"prompt": p, "max_tokens": m, "call_log_odds": threshold}  # noqa: E731
    http.post("/generate", json=body(PROMPTS[0])).raise_for_status()  # warm-up
    start, serve_tokens = time.perf_counter(), 0
    for prompt in prompts:
        serve_tokens += _tokens(http.post("/generate", json=body(prompt)).json())
    via_serve = (time.perf_counter() - start) / serve_tokens

    # 2. Throughput and profile at 1 vs 8 concurrent streams (each stream sends the prompts in turn).
    def stream(_: int) -> int:
        with httpx.Client(base_url=http.base_url, timeout=600) as c:
            return sum(_tokens(c.post("/generate", json=body(p)).json()) for p in prompts)

    throughput, profile = {}, {}
    for streams in (1, 8):
        before = _profile(http)
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(stream, range(streams)))
        seconds = time.perf_counter() - start
        throughput[streams] = total / seconds
        profile[streams] = _summary(_profile(http, before), seconds)

    # 3. Load: short requests at concurrency 16, bounded by a deadline.
    deadline = time.monotonic() + 1200

    def one(i: int) -> tuple[int, float]:
        if time.monotonic() > deadline:
            return -1, 0.0
        t = time.perf_counter()
        try:
            r = http.post("/generate", json=body(PROMPTS[i % len(PROMPTS)], args.load_max_tokens))
            return r.status_code, time.perf_counter() - t
        except httpx.HTTPError:
            return 0, time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(requests)))
    load_seconds = time.perf_counter() - start
    done = [(s, t) for s, t in results if s != -1]
    latencies = sorted(t for _, t in done)
    delete("bench-serve")
    ray.shutdown()

    out = {
        "small_model": str(small_dir), "overrides": " ".join(overrides), "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "threshold": threshold, "in_process_calls": calls,
        "s_per_token_in_process": in_process, "s_per_token_serve": via_serve,
        "serve_over_in_process": via_serve / in_process,
        "tokens_per_s_1_stream": throughput[1], "tokens_per_s_8_streams": throughput[8],
        "throughput_8_over_1": throughput[8] / throughput[1],
        **{f"{k}_{n}_streams": v for n, p in profile.items() for k, v in p.items()},
        "torch_threads_per_replica": args.threads, "in_process_torch_threads": torch.get_num_threads(),
        "load_requests": len(done), "load_errors": sum(s != 200 for s, _ in done),
        "load_seconds": load_seconds, "load_p50_s": statistics.median(latencies),
        "load_p99_s": latencies[int(0.99 * (len(latencies) - 1))],
    }
    print("| measure | value |\n|---|---|")
    for key, value in out.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.quick:
        print("\nNOT written (--quick)")
        return
    # At the end Serve's replicas and Ray's daemons are still winding down: about two busy threads.
    record(Path(args.out), out, start_load, own_threads=2, force=args.force)


if __name__ == "__main__":
    main()
