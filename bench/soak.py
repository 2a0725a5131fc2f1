"""Soak with failures: the cascade on Ray Serve under steady load for minutes while its replicas are killed.

    .venv/bin/python -m bench.soak                         # 5 min, 4 clients, a kill every 30 s
    .venv/bin/python -m bench.soak --minutes 10 --clients 8 --kill-every 20 --force

A Ray instance of its own (2 CPUs), Serve on 127.0.0.1 only, the cascade deployed with tiny untrained
models (the soak measures the service, not text): two SmallModel replicas, one BigModel replica.
`clients` threads send requests back to back (/v1/completions and /generate, every second one
`allow_undelegated`, every third one streamed), each with a client timeout; every `kill_every` seconds
the BigModel replica or one SmallModel replica (in turn) is killed as a crash would kill it, and Serve
starts a successor. Recorded: every request's status, latency and Retry-After; each replica process's
RSS every second (bench.limits.ProcessSampler). Checked: every request answered 200, or 503/429 with
Retry-After; none hung (over the client timeout) and none lost (sent = answered); RSS of every replica
bounded (its last minute's peak within 1.5x its first minute's). A stream already under way on a
SmallModel replica that is killed cannot be finished: it ends with OpenAI's error event
(`lacy.serve.app.FinishResponses` around Serve's proxy), counted apart (`streams_ended_by_error_event`).
Results: bench/results/soak.json (summary, kills, statuses per 10 s, RSS curves; load average at start
and end, marked `under_load` on a busy machine, as every bench here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(key, value)

import httpx  # noqa: E402

from bench.limits import ProcessSampler, load_guard, record  # noqa: E402

PROMPTS = ["The river", "A city", "Marie Curie was", "The capital of France is"]
ANSWERED = (200, 429, 503)
"""What a request may get: 200, or an overload / big-model-down refusal with Retry-After."""


def replica_group(app: str):
    """ProcessSampler's group of a process: its Serve replica of `app` by deployment, else None."""
    def group(title: str) -> str | None:
        head = title.split()[0] if title else ""
        prefix = f"ray::ServeReplica:{app}:"
        return head[len(prefix):].split(".")[0] if head.startswith(prefix) else None
    return group


def kill_replica(app: str, deployment: str) -> str | None:
    """Kill one replica of `app`'s `deployment` (no restart of that actor: Serve starts a successor)."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}"):
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                return actor["name"]
            except Exception:  # it died already
                continue
    return None


def client_loop(url: str, index: int, stop: threading.Event, deadline: float, timeout_s: float) -> list[dict]:
    """Requests back to back until `stop` or `deadline` (bounded): one record per request sent."""
    out, n = [], 0
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        while not stop.is_set() and time.monotonic() < deadline:
            n += 1
            lenient, streamed = n % 2 == 0, n % 3 == 0
            body = {"prompt": PROMPTS[(index + n) % len(PROMPTS)], "max_tokens": 6, "call_threshold": 0.3,
                    "allow_undelegated": lenient}
            path = "/v1/completions" if streamed or n % 4 == 1 else "/generate"
            if streamed:
                body["stream"] = True
            start = time.monotonic()
            entry = {"t": start, "path": path, "lenient": lenient, "streamed": streamed}
            try:
                r = http.post(path, json=body)
                text = r.text.rstrip()
                last = text.rsplit("data: ", 1)[-1]
                entry.update(status=r.status_code, retry_after=r.headers.get("retry-after"),
                             complete=not streamed or r.status_code != 200 or last == "[DONE]",
                             error_event=streamed and r.status_code == 200 and last.startswith('{"error"'))
                if r.status_code != 200 or entry["error_event"]:
                    entry["error"] = (last if entry["error_event"] else text)[:300]
            except httpx.HTTPError as err:  # a hang (client timeout) or a dropped connection
                entry.update(status=None, transport=type(err).__name__)
            entry["seconds"] = time.monotonic() - start
            out.append(entry)
    return out


def soak(url: str, app: str, seconds: float, clients: int, kill_every_s: float, timeout_s: float = 60.0) -> dict:
    """Load `url` (the app `app` on this Ray) for `seconds` while killing a replica every `kill_every_s`
    (BigModel, then SmallModel, in turn); the records, kills, RSS curves and the checks' figures."""
    stop, start, start_wall = threading.Event(), time.monotonic(), time.time()
    deadline = start + seconds
    kills: list[dict] = []
    with ProcessSampler(replica_group(app), every=1.0) as sampler, ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, url, i, stop, deadline, timeout_s) for i in range(clients)]
        turn = 0
        while time.monotonic() + kill_every_s < deadline:  # bounded: the soak's length
            time.sleep(kill_every_s)
            deployment = ("BigModel", "SmallModel")[turn % 2]
            kills.append({"t": time.monotonic() - start, "deployment": deployment,
                          "replica": kill_replica(app, deployment)})
            turn += 1
        time.sleep(max(0.0, deadline - time.monotonic()))  # the load goes on to the end after the last kill
        stop.set()
        requests = [r for f in futures for r in f.result(timeout=timeout_s + 30)]
    for r in requests:
        r["t"] -= start
    return {"requests": requests, "kills": kills, "rss": rss_curves(sampler, start_wall),
            "summary": summarize(requests, kills, seconds, timeout_s)}


def rss_curves(sampler: ProcessSampler, start_wall: float) -> dict:
    """Per replica process ("SmallModel pid 123"): [(seconds since start, RSS MiB)], one point a second."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for when, pid, group, rss, _ in sampler.samples:
        curves.setdefault(f"{group} pid {pid}", []).append((round(when - start_wall, 1), round(rss / 2**20, 1)))
    return curves


def rss_bounded(curve: list[tuple[float, float]], window_s: float = 60.0, ratio: float = 1.5) -> bool:
    """Whether a process's peak RSS in its last `window_s` is within `ratio` x its first window's peak
    (a process that lived under two windows is bounded by its short life)."""
    first_t, last_t = curve[0][0], curve[-1][0]
    if last_t - first_t < 2 * window_s:
        return True
    early = max(rss for t, rss in curve if t <= first_t + window_s)
    late = max(rss for t, rss in curve if t >= last_t - window_s)
    return late <= ratio * early


def cut_by_kill(r: dict, kills: list[dict]) -> bool:
    """A stream that its SmallModel replica's death cut: Ray's proxy ends the chunked body unfinished
    (the client sees an incomplete message, never a silent truncation); one that had not started is
    routed to a live replica by Serve instead."""
    broken = r["status"] is None or not (r.get("complete", True) or r.get("error_event"))
    return r["streamed"] and broken and any(k["deployment"] == "SmallModel" and k["replica"]
                                            and r["t"] <= k["t"] <= r["t"] + r["seconds"] for k in kills)


def timeline(requests: list[dict], every_s: float = 10.0) -> list[dict]:
    """Per `every_s` window (by start time): the requests' statuses and their longest latency."""
    windows: dict[int, list[dict]] = {}
    for r in requests:
        windows.setdefault(int(r["t"] // every_s), []).append(r)
    return [{"t": w * every_s, "statuses": dict(Counter(str(r["status"]) for r in rs)),
             "max_s": round(max(r["seconds"] for r in rs), 3)} for w, rs in sorted(windows.items())]


def summarize(requests: list[dict], kills: list[dict], seconds: float, timeout_s: float) -> dict:
    statuses = Counter(str(r["status"]) for r in requests)
    latencies = sorted(r["seconds"] for r in requests)
    refused = [r for r in requests if r["status"] in (429, 503)]
    cut = [r for r in requests if cut_by_kill(r, kills)]
    ended = [r for r in requests if r.get("error_event")]  # a stream whose replica died: OpenAI's error event
    bad = [r for r in requests if r not in cut and r not in ended and (
        r["status"] not in ANSWERED or (r["status"] != 200 and not r.get("retry_after")) or not r.get("complete"))]
    return {"seconds": seconds, "requests": len(requests), "statuses": dict(statuses), "kills": len(kills),
            "kills_by_deployment": dict(Counter(k["deployment"] for k in kills if k["replica"])),
            "refused_with_retry_after": sum(bool(r.get("retry_after")) for r in refused),
            "undelegated_allowed": sum(r["lenient"] for r in requests),
            "streamed": sum(r["streamed"] for r in requests),
            "latency_s": {"p50": statistics.median(latencies) if latencies else None,
                          "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
                          "max": latencies[-1] if latencies else None},
            "hung": sum("Timeout" in r.get("transport", "") for r in requests), "client_timeout_s": timeout_s,
            "streams_ended_by_error_event": len(ended), "streams_cut_by_small_kill": len(cut),
            "not_answered_as_promised": len(bad), "examples_not_as_promised": bad[:5]}


def _tiny_model(path: Path, tokenizer, seed: int) -> str:
    import torch

    from lacy.core.config import ModelConfig
    from lacy.model import build_model

    torch.manual_seed(seed)
    build_model(ModelConfig(preset="tiny", seq_len=128), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--force", action="store_true", help="measure on a busy machine (marked under_load)")
    args = parser.parse_args(argv)
    load = load_guard(args.force)

    import ray
    from ray import serve

    from lacy.core.config import load_config
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.tokenizer import train_tokenizer
    from services.cascade import delete, run
    from services.runtime import RAY_ENV_DEFAULTS

    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="lacy-soak-"))
    tokenizer = train_tokenizer([d["text"] for d in read_corpus("embedded", max_docs=300)], 1024, root / "tok")
    small, big = _tiny_model(root / "small", tokenizer, 0), _tiny_model(root / "big", tokenizer, 1)
    cfg = load_config(None, ["--run_dir", str(root), "--serve.small_path", small, "--big.path", big,
                             "--serve.port", str(args.port), "--serve.small_replicas", "2",
                             "--serve.small_cpus", "0.2", "--serve.big_cpus", "0.2", "--serve.health_interval_s", "1",
                             "--serve.big_timeout_s", "20", "--cascade.word_start_only", "false"])
    try:
        run(cfg, name="soak", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        result = soak(url, "soak", 60 * args.minutes, args.clients, args.kill_every)
        healthy = httpx.get(f"{url}/healthz", timeout=60).status_code
        deadline = time.monotonic() + 120
        while healthy != 200 and time.monotonic() < deadline:  # the last successor may still be starting
            time.sleep(1.0)
            healthy = httpx.get(f"{url}/healthz", timeout=60).status_code
        result["summary"]["healthy_after"] = healthy == 200
    finally:
        delete("soak")
        serve.shutdown()
        ray.shutdown()
    s = result["summary"]
    s["rss_bounded"] = {name: rss_bounded(curve) for name, curve in result["rss"].items()}
    s["rss_mib"] = {name: {"first": curve[0][1], "max": max(r for _, r in curve), "last": curve[-1][1],
                           "seconds": curve[-1][0] - curve[0][0]} for name, curve in result["rss"].items()}
    print(f"{s['requests']} requests in {s['seconds']:.0f} s, {s['kills']} kills {s['kills_by_deployment']}: "
          f"{s['statuses']}; latency p50 {s['latency_s']['p50']:.2f} s p99 {s['latency_s']['p99']:.2f} s "
          f"max {s['latency_s']['max']:.2f} s; hung {s['hung']}; not as promised {s['not_answered_as_promised']}")
    for name, rss in s["rss_mib"].items():
        print(f"  {name}: RSS {rss['first']:.0f} -> max {rss['max']:.0f} -> {rss['last']:.0f} MiB over "
              f"{rss['seconds']:.0f} s (bounded: {s['rss_bounded'][name]})")
    # The soak loads both cores itself (replicas and clients): the end load less ~2 busy threads.
    compact = {"summary": s, "kills": result["kills"], "timeline": timeline(result["requests"]), "rss": result["rss"]}
    record(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, **compact}, load, own_threads=2,
           force=args.force)
    return result


if __name__ == "__main__":
    main()
