"""Multi-node scenarios on this machine: a real Ray cluster of a head and worker nodes
(`ray.cluster_utils.Cluster`, each node its own raylet with its own CPUs and a custom resource), driven
in a process of its own (a test process already holds the session's single-node Ray).

    python tests/multinode.py SCENARIO WORKDIR        # prints one JSON line: what the test checks

Scenarios: score (actors on both workers, shards equal to one process), score-node-lost (a worker
node removed mid-scoring: the job finishes, same bytes), train (two workers on two nodes vs both on
one: same losses), train-node-lost (a worker's node removed mid-training: restart from the last
checkpoint on the nodes left, every sequence exactly once), serve (the small and the big model on
different nodes, one request delegated across them), serve-node-lost (the big model's node removed
under load: 503s or flagged small-only answers, then the replica rescheduled on the node left).
`tests/test_multinode.py` runs each one in a subprocess and checks its JSON.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lacy.core.config import load_config  # noqa: E402


def cluster(nodes: list[dict]) -> tuple[Cluster, list]:
    """A head with no CPUs of its own (nothing lands there unless told) and one worker node per entry of
    `nodes`, each with the CPUs (key "CPU") and custom resources given there."""
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 2**20, "include_dashboard": False})
    added = [c.add_node(num_cpus=res.get("CPU", 1), object_store_memory=150 * 2**20,
                        resources={k: v for k, v in res.items() if k != "CPU"}) for res in nodes]
    c.wait_for_nodes()
    return c, added


def config(work: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        "--run_dir", str(work), "--data.max_docs", "120", "--score.docs_per_shard", "30",
        "--mlflow.tracking_uri", f"sqlite:///{work / 'mlflow.db'}", *extra])


def actor_nodes(class_part: str, alive_only: bool = False) -> list[str]:
    """Node ids of the actors whose class name contains `class_part` (from the GCS actor table: the
    state API would need the dashboard)."""
    from ray._private.state import actors

    return [a["Address"]["NodeID"] for a in actors().values()
            if class_part in a.get("ActorClassName", "") and (not alive_only or a["State"] == "ALIVE")]


def files(root: Path, manifest) -> dict[str, bytes]:
    rels = [*manifest.shards["train"], *manifest.shards["val"], "docs.parquet"]
    return {rel: (root / rel).read_bytes() for rel in rels}


# ----------------------------------------------------------------------------------------------
# Scoring


def score(work: Path, lose_node: bool = False) -> dict:
    from jobs import score as score_job
    from lacy.shards.scoring import build_shards

    size = ["--data.max_docs", "400"] if lose_node else []
    single = config(work / "single", *size)
    reference, _ = build_shards(single)  # one process, before any cluster exists
    c, nodes = cluster([{"CPU": 1, "pool": 1}] * (3 if lose_node else 2))
    cfg = config(work / "multi", "--tokenizer.path", str(work / "single" / "tokenizer"), *size,
                 "--score.spacy_actors", "2", "--score.spacy_actor_cpus", "0.5",
                 "--score.actor_resources", "{pool: 0.6}", "--facts.batch_size", "8")
    removed: list[float] = []
    if lose_node:  # a node of the pool goes away once the first unit is written
        def remove() -> None:
            first = Path(cfg.score.output_dir) / "units" / "part-00000.json"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not first.exists():
                time.sleep(0.05)
            busy = set(actor_nodes("TagActor", alive_only=True))
            c.remove_node(next(n for n in nodes if n.node_id in busy), allow_graceful=False)
            removed.append(time.monotonic())
        threading.Thread(target=remove, daemon=True).start()
    manifest = score_job.run(cfg)
    finished = time.monotonic()
    placed = sorted(set(actor_nodes("TagActor")))
    same = files(Path(cfg.score.output_dir), manifest) == files(Path(single.score.output_dir), reference)
    ray.shutdown()
    c.shutdown()
    return {"actor_nodes": len(placed), "worker_nodes": len(nodes), "identical": same,
            "units": len(manifest.shards["train"]), "removed_mid_run": bool(removed) and removed[0] < finished}


# ----------------------------------------------------------------------------------------------
# Training


def train(work: Path, lose_node: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    from jobs import pretrain
    from lacy.shards.scoring import build_shards

    base = config(work / "run")
    build_shards(base)
    common = ["--train.num_workers", "2", "--train.batch_size", "8", "--train.zero_stage", "2",
              "--train.cpus_per_worker", "1", "--train.log_every", "1", "--train.warmup_steps", "2"]
    c, nodes = cluster([{"CPU": 2, "slot": 1, "solo": 2}, {"CPU": 1, "slot": 1}, {"CPU": 1, "slot": 1}])

    def fit(name: str, *extra: str):
        cfg = config(work / "run", "--train.output_dir", str(work / name), "--mlflow.experiment", name, *common,
                     *extra)
        final = pretrain.run(cfg)
        client = MlflowClient(cfg.mlflow.tracking_uri)
        exp = client.get_experiment_by_name(name)
        run = client.search_runs([exp.experiment_id])[0]
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        return final, [m.value for m in history]

    if lose_node:
        out = work / "lost"

        def remove() -> None:  # once the first checkpoint is registered, a worker's node goes away
            snapshot = out / "ray" / pretrain.RUN_NAME / "checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + 300
            while not snapshot.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            busy = set(actor_nodes("RayTrainWorker", alive_only=True))
            c.remove_node(next(n for n in nodes if n.node_id in busy), allow_graceful=False)

        threading.Thread(target=remove, daemon=True).start()
        final, losses = fit("lost", "--train.max_steps", "60", "--train.checkpoint_every", "10",
                            "--train.worker_resources", "{slot: 1}", "--train.audit_rows", "true")
        from lacy.shards.format import read_batches

        audit = [{"rank": path.stem, **dict(zip(("pid", "step", "row", "hash"), line.split("\t"), strict=True))}
                 for path in sorted((out / "rows").glob("rank*.tsv")) for line in path.read_text().splitlines()]
        audit = [{**r, "step": int(r["step"]), "row": int(r["row"])} for r in audit]
        last = {}
        for r in audit:
            last[(r["step"], r["row"])] = r
        rows = sorted(r["row"] for r in last.values())
        expected = next(read_batches(base.score.output_dir, "train", 60 * 8, seed=0, loop=True))
        from jobs.pretrain import row_hash

        hashes = [r["hash"] for r in sorted(last.values(), key=lambda r: r["row"])]
        pids = {rank: {r["pid"] for r in audit if r["rank"] == rank} for rank in {r["rank"] for r in audit}}
        out_json = {"final": (Path(final) / "model.safetensors").is_file(),
                    "attempts": max(len(p) for p in pids.values()),  # worker processes one rank ran in
                    "rows_once": rows == list(range(60 * 8)),
                    "same_rows": hashes == [row_hash(x) for x in expected["input_ids"]],
                    "alive_nodes": sum(n["Alive"] for n in ray.nodes())}
    else:
        _, spread = fit("spread", "--train.max_steps", "6", "--train.worker_resources", "{slot: 1}")
        spread_nodes = len(set(actor_nodes("RayTrainWorker")))
        # The same run with both workers on one node: a resource only the first node has.
        _, packed = fit("packed", "--train.max_steps", "6", "--train.worker_resources", "{solo: 1}")
        out_json = {"spread_nodes": spread_nodes, "spread": spread, "packed": packed}
    ray.shutdown()
    c.shutdown()
    return out_json


# ----------------------------------------------------------------------------------------------
# Serving


def serve_cascade(work: Path, lose_node: bool = False) -> dict:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import torch
    from ray import serve

    from lacy.core.config import ModelConfig
    from lacy.corpus.corpora import read_corpus
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.model import build_model
    from services.cascade import run

    tokenizer = train_tokenizer([d["text"] for d in read_corpus("embedded", max_docs=200)], vocab_size=1024,
                                out_dir=work / "tokenizer")
    for name, seed in (("small", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tokenizer).save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    # The small model's node, the big model's node and, when one is lost, a spare the big model can move to.
    c, nodes = cluster([{"CPU": 1, "small_node": 1}, *[{"CPU": 1, "big_node": 1}] * (2 if lose_node else 1)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # One HTTP proxy, on the head: the nodes share this machine's loopback, so one per node would collide.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    cfg = load_config(None, [
        "--run_dir", str(work), "--serve.small_path", str(work / "small"), "--big.path", str(work / "big"),
        "--serve.port", str(port), "--cascade.word_start_only", "false", "--serve.small_cpus", "0.5",
        "--serve.big_cpus", "0.5", "--serve.small_resources", "{small_node: 1}",
        "--serve.big_resources", "{big_node: 1}", "--serve.health_interval_s", "1", "--serve.big_timeout_s", "10"])
    run(cfg)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "The river", "max_tokens": 6, "call_threshold": 0.0}  # every step calls the big model

    def big_node() -> str:
        alive = actor_nodes("BigModel", alive_only=True)
        return alive[0] if len(alive) == 1 else ""

    def healthy(limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            r = httpx.get(f"{url}/healthz", timeout=30)
            if r.status_code == 200 and r.json().get("big_model") == "ok":
                return True
            time.sleep(0.5)
        return False

    ready = healthy(120)
    first = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    out = {"ready": ready, "small_on": [n.node_id for n in nodes].index(actor_nodes("SmallModel")[0]),
           "big_on": [n.node_id for n in nodes].index(big_node()), "delegated": first.get("delegated"),
           "calls": first.get("calls")}
    if lose_node:
        deadline = time.monotonic() + 45

        def load(allow_undelegated: bool) -> list[list]:
            seen = []
            with httpx.Client(timeout=60) as http:
                while time.monotonic() < deadline and len(seen) < 40:  # bounded in time and count
                    r = http.post(f"{url}/generate", json={**body, "allow_undelegated": allow_undelegated})
                    seen.append([r.status_code, r.json().get("delegated")])
            return seen

        lost = big_node()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, flag) for flag in (False, False, True, True)]
            time.sleep(1.0)
            c.remove_node(next(n for n in nodes if n.node_id == lost), allow_graceful=False)
            strict = futures[0].result(timeout=120) + futures[1].result(timeout=120)
            lenient = futures[2].result(timeout=120) + futures[3].result(timeout=120)
        recovered = healthy(180)  # Serve starts a new BigModel replica on the node left that can hold it
        after = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        out.update({"strict_codes": sorted({code for code, _ in strict}),
                    "strict_200s_delegated": all(flag for code, flag in strict if code == 200),
                    "lenient_codes": sorted({code for code, _ in lenient}),
                    "lenient_undelegated": any(flag is False for _, flag in lenient), "recovered": recovered,
                    "big_moved": big_node() not in ("", lost), "after_delegated": after.get("delegated"),
                    "after_calls": after.get("calls")})
    serve.shutdown()
    ray.shutdown()
    c.shutdown()
    return out


SCENARIOS = {"score": lambda w: score(w), "score-node-lost": lambda w: score(w, lose_node=True),
             "train": lambda w: train(w), "train-node-lost": lambda w: train(w, lose_node=True),
             "serve": lambda w: serve_cascade(w), "serve-node-lost": lambda w: serve_cascade(w, lose_node=True)}


if __name__ == "__main__":
    name, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(SCENARIOS[name](work)), flush=True)
