"""Pretrain the small model on the scoring job's shards: Ray Train + DeepSpeed, one code path CPU/GPU.

Local (starts or reuses a local Ray instance):
    python -m jobs.pretrain --config configs/tiny.yaml --labels.rule loss
CPU cluster (2 workers, gloo, ZeRO-2 with the optimizer state offloaded):
    RAY_ADDRESS=auto python -m jobs.pretrain --config configs/tiny.yaml \\
        --train.num_workers 2 --train.zero_stage 2 --train.offload_optimizer true
Job submission to a local cluster (`cluster/start_local.sh` = `ray start --head` from the venv + MLflow):
    cluster/submit.sh pretrain configs/tiny.yaml --labels.rule loss
  or by hand (verified: ≈85 s on 2 busy cores for 4 steps, start-up included):
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json \
        '{"excludes": [".venv", "runs", ".git"], "env_vars": {"LACY_RUN_ROOT": "'$PWD'"}}' \
        -- python -m jobs.pretrain --config configs/tiny.yaml --labels.rule loss
  (LACY_RUN_ROOT keeps relative output paths in this checkout, not in Ray's unpacked working dir).
GPU cluster: add `--train.use_gpu true` (nccl + bf16).

What each worker does: DeepSpeed engine over `lacy.model.build_model`, objective `lacy.labels.lacy_step`
(the job adds nothing to the method), a checkpoint every `train.checkpoint_every` steps with the
DeepSpeed state and the data position, reported to Ray Train so a killed worker group restarts from it
(`train.max_failures`). Re-running with the same `train.output_dir` resumes too, as does
`--train.resume_from <checkpoint dir>`. Rank 0 logs per-step metrics to the MLflow run the driver opened.

Data order, and why not `get_dataset_shard`: Ray Data's streaming split hands blocks to whichever worker
asks first, so which worker trains which sequence, and in what order, depends on timing; a restarted
run could not tell which sequences the lost steps had consumed. Here the order is a pure function of
the seed: every worker reads the same stream of global batches with `lacy.shards.read_batches` (epoch
e a permutation seeded by (seed, e)) and trains its rank's slice, so the data position is one number
per checkpoint (rows consumed) and resume skips exactly those rows; `train.audit_rows` logs every
trained sequence to prove it. Cost: each worker holds the training split's token ids in memory
(4 bytes/token, e.g. 0.4 GB for 100 M tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lacy.config import LacyConfig, TrainConfig, from_dict, parse_cli, save_config, to_dict
from lacy.paths import cache_dir

CHECKPOINT_TAG = "state"
"""DeepSpeed tag of the one engine state inside each Ray checkpoint."""
RUN_NAME = "pretrain"
"""Ray Train run name: its storage is <train.output_dir>/ray/pretrain (re-running there resumes)."""
FINAL_SUBDIR = "hf"
"""Subfolder of the last Ray checkpoint that holds the Hugging Face model and tokenizer."""


# ----------------------------------------------------------------------------------------------
# Environment, DeepSpeed config


def worker_env(train: TrainConfig) -> dict[str, str]:
    """Environment every training process needs before DeepSpeed is imported.

    Decided by the config, not by the driver's hardware: a CPU head node may drive GPU workers.
    """
    return {"TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions"),
            "DS_ACCELERATOR": "cuda" if train.use_gpu else "cpu"}


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config: global batch split evenly, no accumulation, ZeRO stage, bf16 on GPU."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # The client optimizer is torch's AdamW; with offload DeepSpeed would otherwise insist on its
        # compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": train.use_gpu},
        "steps_per_print": 1 << 30,
    }


# ----------------------------------------------------------------------------------------------
# Data: one deterministic global stream, sliced per rank


def row_hash(input_ids: torch.Tensor) -> str:
    """Content id of one sequence [L]: 16 hex digits of sha1 over its int32 token ids."""
    return hashlib.sha1(input_ids.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


def _reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum over workers (one small all-reduce): every rank gets the same totals, so stops agree.

    The tensor lives on the engine's device: nccl reduces only CUDA tensors.
    """
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------
# The worker


class _Window:
    """Sums between two metric logs: tokens/s, real-token loss and call share weighted by valid tokens."""

    def __init__(self) -> None:
        self.start, self.tokens, self.real, self.call, self.valid = time.perf_counter(), 0, 0.0, 0.0, 0.0

    def metrics(self) -> dict[str, float]:
        valid = max(self.valid, 1.0)
        return {"real_loss": self.real / valid, "call_share": self.call / valid,
                "tokens_per_s": self.tokens / (time.perf_counter() - self.start)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, resume, train until max_steps or max_supervised_tokens, report."""
    os.environ.update(config["env"])
    import deepspeed
    import ray.train

    from lacy.labels import lacy_step
    from lacy.model import build_model
    from lacy.shards import read_batches
    from lacy.tokenizer import EOS_TOKEN, PAD_TOKEN, call_id, load_tokenizer
    from lacy.train import build_optimizer, build_scheduler

    cfg: LacyConfig = from_dict(LacyConfig, config["cfg"])
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")
    torch.manual_seed(train.seed)

    tokenizer = load_tokenizer(config["tokenizer_dir"])
    ids = {"call_id": call_id(tokenizer), "eos_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
           "pad_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN)}
    model = build_model(cfg.model, tokenizer)
    optimizer = build_optimizer(model, train)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, train),
        config=deepspeed_config(train, world))

    # `rows`: sequences of the global stream consumed so far, by all workers together.
    position = {"step": 0, "rows": 0, "supervised_tokens": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
        position = dict(client_state["position"])

    per_worker = train.batch_size // world
    lo, hi = rank * per_worker, (rank + 1) * per_worker
    stream = read_batches(config["shards_dir"], "train", train.batch_size, seed=train.seed,
                          start_row=position["rows"], loop=True)
    audit = _open_audit(train.output_dir, rank) if train.audit_rows else None
    mlflow_client = _mlflow_client(config) if rank == 0 else None
    window = _Window()

    engine.train()
    while not _finished(position, train):
        batch = next(stream)
        local = {k: v[lo:hi] for k, v in batch.items()}
        if audit is not None:
            audit.writelines(f"{os.getpid()}\t{position['step']}\t{position['rows'] + i}\t"
                             f"{row_hash(batch['input_ids'][i])}\n" for i in range(lo, hi))
            audit.flush()
        loss, stats = lacy_step(engine, local, cfg.labels, **ids)
        engine.backward(loss)
        engine.step()

        valid = float(stats["valid_tokens"])
        supervised, real, call, valid = _reduce([float(stats["supervised_tokens"]),
                                                 float(stats["real_loss"]) * valid,
                                                 float(stats["call_share"]) * valid, valid],
                                                engine.device)
        position["step"] += 1
        position["rows"] += train.batch_size
        position["supervised_tokens"] += int(supervised)
        window.tokens += batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        window.real, window.call, window.valid = window.real + real, window.call + call, window.valid + valid

        step, done = position["step"], _finished(position, train)
        if mlflow_client is not None and (step % train.log_every == 0 or done):
            metrics = {**window.metrics(), "supervised_tokens": position["supervised_tokens"],
                       "lr": scheduler.get_last_lr()[0]}
            _log_metrics(mlflow_client, config["mlflow_run_id"], metrics, step)
            window = _Window()
        if step % train.checkpoint_every == 0 or done:
            _save_and_report(engine, position, tokenizer if done and rank == 0 else None)
        if train.fault_at_step == step and checkpoint is None and rank == world - 1:
            _crash_once_a_checkpoint_is_registered(Path(train.output_dir) / "ray" / RUN_NAME)


def _finished(position: dict[str, int], train: TrainConfig) -> bool:
    cap = train.max_supervised_tokens
    return position["step"] >= train.max_steps or (cap is not None and position["supervised_tokens"] >= cap)


def _crash_once_a_checkpoint_is_registered(run_storage: Path, timeout_s: float = 300.0) -> None:
    """Fault injection: SIGKILL this worker (a crash as Ray sees one: no cleanup, no report).

    Ray Train takes a reported checkpoint into account only once its controller has collected every
    rank's report, which it writes to the run's checkpoint_manager_snapshot.json; a worker that dies
    before that makes the restart begin from scratch. Waiting for the snapshot makes the test of
    "resume from the last checkpoint" deterministic.
    """
    deadline = time.monotonic() + timeout_s
    while not (run_storage / "checkpoint_manager_snapshot.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _save_and_report(engine: Any, position: dict[str, int], tokenizer: Any = None) -> None:
    """Every rank: DeepSpeed state (+ rank 0's HF model when `tokenizer` is given) -> one Ray checkpoint.

    Ray merges the ranks' directories into one checkpoint; DeepSpeed names its per-rank files apart.
    """
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="lacy-ckpt-"))
    try:
        engine.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, client_state={"position": dict(position)})
        if tokenizer is not None:
            engine.module.save_pretrained(tmp / FINAL_SUBDIR)
            tokenizer.save_pretrained(tmp / FINAL_SUBDIR)
        ray.train.report(dict(position), checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_audit(output_dir: str, rank: int) -> Any:
    path = Path(output_dir) / "rows" / f"rank{rank}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a")


def _mlflow_client(config: dict[str, Any]) -> Any:
    if config.get("mlflow_run_id") is None:
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config["mlflow_uri"])


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# ----------------------------------------------------------------------------------------------
# The driver


def connect_ray() -> None:
    """`RAY_ADDRESS` set: join that cluster; an initialised instance (tests): reuse it; else start one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        ray.init()


def run(cfg: LacyConfig, parent_run_id: str | None = None) -> Path:
    """Train with Ray Train + DeepSpeed; returns `<train.output_dir>/final` (HF model + tokenizer, and
    `training_summary.json`: steps, sequences, tokens and real-token-supervised tokens trained on).
    `parent_run_id` nests the MLflow run under a parent (the experiment)."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lacy.shards import read_manifest
    from lacy.tracking import start_run, tracking_uri

    train = cfg.train
    output_dir = Path(train.output_dir)
    save_config(cfg, output_dir / "config.yaml")
    manifest = read_manifest(cfg.score.output_dir)
    if manifest.seq_len != cfg.model.seq_len:
        raise ValueError(f"model.seq_len={cfg.model.seq_len} but the shards in {cfg.score.output_dir} "
                         f"were packed for seq_len={manifest.seq_len}")
    resume_from = _checkpoint(train.resume_from)
    connect_ray()
    env = worker_env(train)
    os.environ.update(env)
    with start_run(cfg, run_name=f"pretrain-{cfg.labels.rule}", nested=mlflow.active_run() is not None,
                   parent_run_id=parent_run_id) as mlflow_run:
        loop_config = {"cfg": to_dict(cfg), "env": env, "shards_dir": cfg.score.output_dir,
                       "tokenizer_dir": manifest.tokenizer_path, "mlflow_uri": tracking_uri(cfg),
                       "mlflow_run_id": mlflow_run.info.run_id}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker}),
            run_config=RunConfig(name=RUN_NAME, storage_path=str(output_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            resume_from_checkpoint=resume_from,
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training reported no checkpoint (see {output_dir / 'ray'})")
        final = output_dir / "final"
        with result.checkpoint.as_directory() as ckpt_dir:
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(Path(ckpt_dir) / FINAL_SUBDIR, final)
        summary = {k: int(v) for k, v in result.metrics.items() if k in ("step", "rows", "supervised_tokens")}
        summary["tokens"] = summary["rows"] * cfg.model.seq_len
        (final / "training_summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in result.metrics.items()})
        mlflow.log_artifacts(str(final), artifact_path="final")
    return final


def _checkpoint(path: str | None) -> Any:
    if path is None:
        return None
    from ray.train import Checkpoint

    if not (Path(path) / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"train.resume_from: {path} is not a checkpoint of this job "
                                f"(no {CHECKPOINT_TAG}/ inside)")
    return Checkpoint.from_directory(path)


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_cli(argv, description=__doc__ or "")
    final = run(cfg)
    print(f"final model: {final}")
    return final


if __name__ == "__main__":
    main()
