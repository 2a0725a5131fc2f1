"""Serve cascade benchmark: in-process cascade vs the Ray Serve path, concurrency, and a load run.

    .venv/bin/python -m bench.serve [--small runs/default/train/lacy-steps/final] [--requests 1000]

Measured in one run, on 127.0.0.1 only, bounded in count and time:
  1. seconds per generated token, in-process `Cascade` vs POST /generate (sequential, same prompts,
     same fixed threshold calibrated to a 22 % call rate): ratio Serve / in-process (aim <= 1.2);
  2. throughput (generated tokens/s) at 8 concurrent streams vs 1 (aim >= 4x);
  3. `--requests` requests at concurrency 16: errors (aim 0), latency p50/p99.
Results print as Markdown and are written to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
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

    from lacy.config import ModelConfig
    from lacy.data import read_corpus
    from lacy.model import build_model
    from lacy.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in read_corpus("embedded", max_docs=2000)], 4096, path)
    torch.manual_seed(0)
    build_model(ModelConfig(preset="small", seq_len=128), tok).save_pretrained(path)
    return path


def _tokens(out: dict) -> int:
    return out["small_tokens"] + out["big_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", help="small model directory (default: an untrained `small` model)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--load-max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads per replica (in-process uses torch's default)")
    args = parser.parse_args()

    import httpx
    import ray
    import torch
    from ray import serve

    from lacy.cascade import BigLM, Cascade, SmallLM, calibrate
    from lacy.config import load_config
    from lacy.model import load_big_model
    from services.cascade import run

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    small_dir = Path(args.small) if args.small else _tiny_small_model(work / "small")
    cfg = load_config(None, ["--run_dir", str(work), "--serve.small_path", str(small_dir),
                             "--serve.port", str(_free_port()), "--cascade.max_new_tokens", str(args.max_tokens),
                             # Small and big replicas compute in turn for a request, as in-process.
                             "--serve.torch_threads", str(args.threads)])
    small_model, small_tok = load_big_model(str(small_dir))
    big_model, big_tok = load_big_model(cfg.big.path)

    # 1a. In-process: a fresh cascade per prompt (as Serve makes one per request), fixed threshold.
    probe = Cascade(SmallLM(small_model, small_tok), BigLM(big_model, big_tok), cfg.cascade)
    threshold = calibrate(probe, PROMPTS, 0.22)
    start, tokens, calls = time.perf_counter(), 0, 0
    for prompt in PROMPTS:
        r = Cascade(SmallLM(small_model, small_tok), BigLM(big_model, big_tok), cfg.cascade).generate(
            prompt, call_threshold=threshold)
        tokens += r.small_tokens + r.big_tokens
        calls += r.calls
    in_process = (time.perf_counter() - start) / tokens

    # 1b. The same through Serve.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run(cfg)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    http = httpx.Client(base_url=url, timeout=600)
    body = lambda p, m=args.max_tokens: {"prompt": p, "max_tokens": m, "call_threshold": threshold}  # noqa: E731
    http.post("/generate", json=body(PROMPTS[0])).raise_for_status()  # warm-up
    start, serve_tokens = time.perf_counter(), 0
    for prompt in PROMPTS:
        serve_tokens += _tokens(http.post("/generate", json=body(prompt)).json())
    via_serve = (time.perf_counter() - start) / serve_tokens

    # 2. Throughput at 1 vs 8 concurrent streams (each stream sends the 8 prompts in turn).
    def stream(n_prompts: int) -> int:
        with httpx.Client(base_url=url, timeout=600) as c:
            return sum(_tokens(c.post("/generate", json=body(p)).json()) for p in PROMPTS[:n_prompts])

    throughput, batch_size = {}, {}
    for streams in (1, 8):
        before = http.get("/healthz").json()
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(stream, [len(PROMPTS)] * streams))
        throughput[streams] = total / (time.perf_counter() - start)
        after = http.get("/healthz").json()
        batch_size[streams] = (after["small_steps"] - before["small_steps"]) / max(
            1, after["small_passes"] - before["small_passes"])

    # 3. Load: N short requests at concurrency 16, bounded by a deadline.
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
        results = list(pool.map(one, range(args.requests)))
    load_seconds = time.perf_counter() - start
    done = [(s, t) for s, t in results if s != -1]
    latencies = sorted(t for _, t in done)
    serve.shutdown()
    ray.shutdown()

    out = {
        "small_model": str(small_dir), "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
        "threshold": threshold, "in_process_calls": calls,
        "s_per_token_in_process": in_process, "s_per_token_serve": via_serve,
        "serve_over_in_process": via_serve / in_process,
        "tokens_per_s_1_stream": throughput[1], "tokens_per_s_8_streams": throughput[8],
        "throughput_8_over_1": throughput[8] / throughput[1],
        "small_batch_1_stream": batch_size[1], "small_batch_8_streams": batch_size[8],
        "torch_threads_per_replica": args.threads, "in_process_torch_threads": torch.get_num_threads(),
        "load_requests": len(done), "load_errors": sum(s != 200 for s, _ in done),
        "load_seconds": load_seconds, "load_p50_s": statistics.median(latencies),
        "load_p99_s": latencies[int(0.99 * (len(latencies) - 1))],
    }
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/serve.json").write_text(json.dumps(out, indent=2))
    print("| measure | value |\n|---|---|")
    for key, value in out.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
