"""Pretraining on Ray Train + DeepSpeed: `lacy.train.train_loop` in every worker, one code path CPU/GPU.

    python -m jobs.pretrain --config configs/tiny.yaml --labels.rule loss          # local Ray
    RAY_ADDRESS=auto python -m jobs.pretrain --config configs/tiny.yaml \\
        --train.num_workers 2 --train.zero_stage 2 --train.offload_optimizer true  # 2 workers, gloo
    cluster/submit.sh pretrain configs/tiny.yaml --labels.rule loss                 # ray job submit
    ... --train.use_gpu true                                                         # GPU: nccl + bf16

The loop (step, stop rule, schedule, metric windows, token counts, validation) is the library's; a
worker adds what distribution needs: the DeepSpeed engine as the optimiser side, its rank's rows of
each global batch and the collectives that make selection and the stop rule global
(`lacy.train.Ranks`), a checkpoint every `train.checkpoint_every` steps with the DeepSpeed state and
the data position, reported to Ray Train so a killed worker group restarts from it
(`train.max_failures`); re-running with the same `train.output_dir` (or `--train.resume_from DIR`)
resumes too. Rank 0 logs to the MLflow run the driver opened.

Data order, and why not `get_dataset_shard`: Ray Data's streaming split hands blocks to whichever worker
asks first, so which worker trains which sequence depends on timing and a restarted run could not
tell what the lost steps consumed. Here every worker reads the same seeded stream of global batches
(`lacy.shards.format.read_batches`) and trains its rank's slice, so the data position is one number (rows
consumed) and resume skips exactly those; `train.audit_rows` logs every trained sequence to prove it.
Cost: each worker holds the training split's token ids in memory (4 bytes/token).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lacy.core import storage
from lacy.core.config import LacyConfig, TrainConfig, from_dict, parse_cli, save_config, to_dict
from lacy.core.console import setup_logging
from lacy.core.paths import cache_dir
from lacy.core.tracking import log_dataset, start_run, tracking_uri
from lacy.corpus.tokenizer import call_id, load_tokenizer
from lacy.model import build_model
from lacy.shards.format import read_batches, read_manifest
from lacy.train import Position, Ranks, build_optimizer, save_final, train_loop
from services.runtime import init_ray

CHECKPOINT_TAG = "state"
"""DeepSpeed tag of the one engine state inside each Ray checkpoint."""
RUN_NAME = "pretrain"
"""Ray Train run name: its storage is <train.output_dir>/ray/pretrain (re-running there resumes)."""


def worker_env(train: TrainConfig) -> dict[str, str]:
    """Environment every worker needs before DeepSpeed is imported (from the config: a CPU head node may
    drive GPU workers)."""
    return {"TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions"),
            "DS_ACCELERATOR": "cuda" if train.use_gpu else "cpu"}


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config: global batch split evenly, no accumulation, ZeRO stage, bf16 on GPU."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_batch_size": train.batch_size, "train_micro_batch_size_per_gpu": train.batch_size // world_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": train.grad_clip, "zero_optimization": zero,
            # torch's AdamW as client optimizer; with offload DeepSpeed would insist on its compiled CPU Adam.
            "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": train.use_gpu}, "steps_per_print": 1 << 30}


def row_hash(input_ids: torch.Tensor) -> str:
    """Content id of one sequence [L]: 16 hex digits of sha1 over its int32 token ids."""
    return hashlib.sha1(input_ids.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


class DeepSpeedStepper:
    """`lacy.train.Stepper` over a DeepSpeed engine (which clips, steps and zeroes by itself)."""

    def __init__(self, engine: Any) -> None:
        self.model = engine

    def update(self, loss: torch.Tensor, lr: float) -> float:
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr
        self.model.backward(loss)
        self.model.step()
        return self.model.get_global_grad_norm() or 0.0


def _collectives(device: torch.device) -> tuple[Any, Any]:
    """(reduce, gather) over the process group; tensors live on the engine's device (nccl: CUDA only)."""

    def reduce(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        parts = [torch.empty_like(t, dtype=torch.float32) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.float())  # bool masks travel as floats: not every backend has bool
        return torch.cat(parts).to(t.dtype), dist.get_rank() * t.shape[0]

    return reduce, gather


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, `lacy.train.train_loop`, checkpoints."""
    os.environ.update(config["env"])
    import deepspeed
    import ray.train


    cfg: LacyConfig = from_dict(LacyConfig, config["cfg"])
    train = cfg.train
    storage.pull(cfg, config["shards_dir"], config["tokenizer_dir"])  # this node's mirror may be empty
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    model = build_model(cfg.model, tokenizer)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, train),
                                      config=deepspeed_config(train, world))
    position, checkpoint = Position(), ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
        position = Position(**client_state["position"])
    reduce, gather = _collectives(engine.device) if world > 1 else (None, None)
    ranks = Ranks(rank, world, reduce, gather)
    stream = read_batches(config["shards_dir"], "train", train.batch_size, seed=train.seed,
                          start_row=position.rows, loop=True)
    audit = _audit(train.output_dir, rank, stream, ranks, position) if train.audit_rows else stream
    rows = Path(train.output_dir) / "rows"
    val = (lambda: read_batches(config["shards_dir"], "val", train.batch_size, seed=0)) if config["has_val"] else None
    mlflow_client = _mlflow_client(config) if rank == 0 else None

    def log_row(step: int, row: dict) -> None:
        if mlflow_client is not None:
            _log_metrics(mlflow_client, config["mlflow_run_id"], row, step)

    def after_step(pos: Position, done: bool) -> None:
        if pos.step % train.checkpoint_every == 0 and not done:
            _save_and_report(engine, pos)
            storage.push(cfg, rows)  # the audit so far, with the checkpoint it belongs to
        if train.fault_at_step == pos.step and checkpoint is None and rank == world - 1:
            _crash_once_a_checkpoint_is_registered(Path(train.output_dir) / "ray" / RUN_NAME)

    summary = train_loop(cfg, DeepSpeedStepper(engine), audit, call_id(tokenizer), position=position,
                         ranks=ranks, log_fn=log_row, val_batches=val, after_step=after_step)
    summary["device"] = str(engine.device)
    _save_and_report(engine, position, final=(tokenizer, cfg, summary) if rank == 0 else None)
    storage.push(cfg, rows)


def _audit(output_dir: str, rank: int, stream: Any, ranks: Any, position: Any) -> Any:
    """`stream`, appending this rank's rows of every batch (pid, step, global row, content hash) to
    <output_dir>/rows/rank<r>.tsv before they are trained."""
    path = Path(output_dir) / "rows" / f"rank{rank}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for batch in stream:
            per = batch["input_ids"].shape[0] // ranks.world
            f.writelines(f"{os.getpid()}\t{position.step}\t{position.rows + i}\t{row_hash(batch['input_ids'][i])}\n"
                         for i in range(rank * per, (rank + 1) * per))
            f.flush()
            yield batch


def _crash_once_a_checkpoint_is_registered(run_storage: Path, timeout_s: float = 300.0) -> None:
    """Fault injection: SIGKILL this worker once Ray Train has registered the last checkpoint (its
    snapshot file exists), so "resume from the last checkpoint" is tested deterministically."""
    deadline = time.monotonic() + timeout_s
    while not (run_storage / "checkpoint_manager_snapshot.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _save_and_report(engine: Any, position: Any, final: tuple | None = None) -> None:
    """Every rank: DeepSpeed state (+ rank 0's final model folder when `final` = (tokenizer, cfg,
    summary)) -> one Ray checkpoint (Ray merges the ranks' directories; DeepSpeed names its files apart)."""
    import ray.train


    tmp = Path(tempfile.mkdtemp(prefix="lacy-ckpt-"))
    try:
        engine.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, client_state={"position": asdict(position)})
        if final is not None:
            tokenizer, cfg, summary = final
            save_final(engine.module, tokenizer, tmp / "final", cfg, summary, trainer="jobs.pretrain")
        ray.train.report(asdict(position), checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mlflow_client(config: dict[str, Any]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config["mlflow_uri"]) if config.get("mlflow_run_id") else None


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def run(cfg: LacyConfig, parent_run_id: str | None = None) -> Path:
    """Train with Ray Train + DeepSpeed; returns `<train.output_dir>/final` (`lacy.train.save_final`'s
    folder). `parent_run_id` nests the MLflow run "pretrain-<rule>" under a parent (the experiment)."""
    import mlflow
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer


    train, output_dir = cfg.train, Path(cfg.train.output_dir)
    save_config(cfg, output_dir / "config.yaml")
    storage.pull(cfg, Path(cfg.score.output_dir) / "manifest.json")  # the shards: each worker pulls them
    manifest = read_manifest(cfg.score.output_dir)
    if manifest.seq_len != cfg.model.seq_len:
        raise ValueError(f"model.seq_len={cfg.model.seq_len} but the shards in {cfg.score.output_dir} "
                         f"were packed for seq_len={manifest.seq_len}")
    if train.resume_from is not None and not (Path(train.resume_from) / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"train.resume_from: {train.resume_from} is not a checkpoint of this job "
                                f"(no {CHECKPOINT_TAG}/ inside)")
    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if train.use_gpu and gpus < train.num_workers:
        raise ValueError(f"train.use_gpu: {train.num_workers} GPU workers wanted, the Ray cluster has {gpus:g} GPUs")
    env = worker_env(train)
    os.environ.update(env)
    storage_path, storage_fs = storage.ray_storage(cfg, output_dir / "ray")  # checkpoints: in the store if any
    with start_run(cfg, run_name=f"pretrain-{cfg.labels.rule}", nested=mlflow.active_run() is not None,
                   parent_run_id=parent_run_id) as mlflow_run:
        log_dataset("shards", str(Path(cfg.score.output_dir).resolve()), manifest.config_hash, "training")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "env": env, "shards_dir": cfg.score.output_dir,
                               "tokenizer_dir": manifest.tokenizer_path, "has_val": bool(manifest.shards.get("val")),
                               "mlflow_uri": tracking_uri(cfg), "mlflow_run_id": mlflow_run.info.run_id},
            torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker,
                                                               **train.worker_resources}),
            run_config=RunConfig(name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            resume_from_checkpoint=Checkpoint.from_directory(train.resume_from) if train.resume_from else None)
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training reported no checkpoint (see {storage_path})")
        final = output_dir / "final"
        with result.checkpoint.as_directory() as ckpt_dir:
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(Path(ckpt_dir) / "final", final)
        storage.push(cfg, output_dir)
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in result.metrics.items()})
        mlflow.log_artifacts(str(final), artifact_path="final")
    return final


def main(argv: list[str] | None = None) -> Path:

    setup_logging()
    return run(parse_cli(argv, description=__doc__ or "", stage="train"))


if __name__ == "__main__":
    main()
