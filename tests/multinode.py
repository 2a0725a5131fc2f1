"""Multi-node scenarios on this machine: a real Ray cluster of a head and worker nodes
(`ray.cluster_utils.Cluster`, each node its own raylet with its own CPUs and a custom resource), driven
in a process of its own (a test process already holds the session's single-node Ray).

    python tests/multinode.py SCENARIO WORKDIR        # prints one JSON line: what the test checks

Scenarios: score (actors on both workers, shards equal to one process), score-node-lost (a worker
node removed mid-scoring: the job finishes, same bytes), train (two workers on two nodes vs both on
one: same losses), train-node-lost (a worker's node removed mid-training: restart from the last
checkpoint on the nodes left, every sequence exactly once). `tests/test_multinode.py` runs each one
in a subprocess and checks its JSON.
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

from lacy.config import load_config  # noqa: E402


def cluster(workers: int, cpus: int = 1, resources: dict | None = None,
            first: dict | None = None) -> tuple[Cluster, list]:
    """A head with no CPUs of its own (nothing lands there unless told) and `workers` worker nodes, each
    with `cpus` CPUs and `resources`; `first` adds to the first worker's (e.g. {"CPU": 2, "solo": 2})."""
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 2**20, "include_dashboard": False})
    nodes = []
    for i in range(workers):
        res = {**(resources or {}), **({k: v for k, v in (first or {}).items() if k != "CPU"} if i == 0 else {})}
        n_cpus = (first or {}).get("CPU", cpus) if i == 0 else cpus
        nodes.append(c.add_node(num_cpus=n_cpus, object_store_memory=150 * 2**20, resources=res))
    c.wait_for_nodes()
    return c, nodes


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
    from lacy.scoring import build_shards

    size = ["--data.max_docs", "400"] if lose_node else []
    single = config(work / "single", *size)
    reference, _ = build_shards(single)  # one process, before any cluster exists
    c, nodes = cluster(3 if lose_node else 2, resources={"pool": 1})
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
            c.remove_node(next(n for n in nodes if n.unique_id in busy), allow_graceful=False)
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
    from lacy.scoring import build_shards

    base = config(work / "run")
    build_shards(base)
    common = ["--train.num_workers", "2", "--train.batch_size", "8", "--train.zero_stage", "2",
              "--train.cpus_per_worker", "1", "--train.log_every", "1", "--train.warmup_steps", "2"]
    c, nodes = cluster(3, resources={"slot": 1}, first={"CPU": 2, "solo": 2})

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
            c.remove_node(next(n for n in nodes if n.unique_id in busy), allow_graceful=False)

        threading.Thread(target=remove, daemon=True).start()
        final, losses = fit("lost", "--train.max_steps", "60", "--train.checkpoint_every", "10",
                            "--train.worker_resources", "{slot: 1}", "--train.audit_rows", "true")
        from lacy.shards import read_batches

        audit = [dict(zip(("pid", "step", "row", "hash"), line.split("\t"), strict=True))
                 for path in sorted((out / "rows").glob("rank*.tsv")) for line in path.read_text().splitlines()]
        audit = [{**r, "step": int(r["step"]), "row": int(r["row"])} for r in audit]
        last = {}
        for r in audit:
            last[(r["step"], r["row"])] = r
        rows = sorted(r["row"] for r in last.values())
        expected = next(read_batches(base.score.output_dir, "train", 60 * 8, seed=0, loop=True))
        from jobs.pretrain import row_hash

        hashes = [r["hash"] for r in sorted(last.values(), key=lambda r: r["row"])]
        out_json = {"final": (Path(final) / "model.safetensors").is_file(), "attempts": len({r["pid"] for r in audit}),
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


SCENARIOS = {"score": lambda w: score(w), "score-node-lost": lambda w: score(w, lose_node=True),
             "train": lambda w: train(w), "train-node-lost": lambda w: train(w, lose_node=True)}


if __name__ == "__main__":
    name, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(SCENARIOS[name](work)), flush=True)
