"""Stage 4: training. One loop — step, stop rule, learning-rate schedule, metric windows, token counts —
run by the plain single-process path here and, with a DeepSpeed engine and data-parallel ranks, by the
Ray Train worker (`jobs.pretrain`). No Ray here.

    # shards first (python -m lacy.shards.scoring --config configs/tiny.yaml), then:
    python -m lacy.train --config configs/tiny.yaml                       # the config's rule (lacy)
    python -m lacy.train --config configs/tiny.yaml --labels.rule loss    # a baseline
    python -m lacy.train --config configs/tiny.yaml --train.max_supervised_tokens 50000  # equal tokens
    python -m lacy.train --config configs/tiny.yaml --train.use_gpu true  # cuda + bf16 autocast

Writes `<train.output_dir>/final` (safetensors model + tokenizer, a generation config that never
emits `<CALL>`, `training_summary.json` and a model card), `config.yaml` (the resolved config) and
`metrics.jsonl` (one line per log/eval step) there.

Schedule: linear warm-up over `warmup_steps`, then cosine to `min_lr_ratio`. Progress is counted in
steps (`max_steps`), or, when the run stops on a token budget (`max_supervised_tokens`), in supervised
tokens, so a token-equalised run reaches the floor exactly when it reaches its budget, as the
baseline reaches it at its last step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import GenerationConfig

from lacy.core import storage
from lacy.core.config import LacyConfig, TrainConfig, parse_cli, save_config
from lacy.core.console import setup_logging
from lacy.core.tracking import log_dataset, log_metrics, start_run
from lacy.corpus.tokenizer import call_id
from lacy.corpus.tokenizer import call_id as find_call_id
from lacy.labels.method import Gather, lacy_step, token_losses
from lacy.model import build_model
from lacy.shards.format import load_shard_tokenizer, read_batches, read_manifest

log = logging.getLogger(__name__)
LogFn = Callable[[int, dict], None]
SUMMARY = "training_summary.json"
"""Written into every final model folder, by every trainer."""


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95))


def lr_factor(step: int, train: TrainConfig, supervised_tokens: int = 0) -> float:
    """Share of train.lr for optimiser step `step` (0-based): linear warm-up, then cosine down to
    min_lr_ratio at max_steps, or at max_supervised_tokens when the run stops on a token budget."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.max_supervised_tokens is not None:
        progress = supervised_tokens / train.max_supervised_tokens
    else:
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, progress)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def default_device(use_gpu: bool) -> torch.device:
    """cuda when `train.use_gpu`; a clear error, naming the field, where there is none."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.use_gpu is true but torch sees no CUDA device here")
    return torch.device("cuda")


def autocast(device: torch.device) -> Any:
    # bf16 on GPU only: on these CPUs it gave no speed-up (PLATFORM.md), and fp32 keeps tests exact.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], call_id: int) -> dict[str, float]:
    """Validation metrics over all valid positions of `batches` (token-weighted):

    real_loss (NLL of the real token under the softmax without <CALL>, comparable across rules),
    perplexity = exp(real_loss), call_prob (mean P(<CALL>) under the full softmax), call_share (share
    of positions where <CALL> is the argmax, i.e. where greedy decoding would delegate), tokens.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id
    total = {"real": 0.0, "call_prob": 0.0, "call_argmax": 0.0, "tokens": 0}
    for batch in batches:
        ids = batch["input_ids"].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with autocast(device):
            logits = model(input_ids=inputs).logits.float()
        valid = targets != pad_id if pad_id is not None else torch.ones_like(targets, dtype=torch.bool)
        total["real"] += token_losses(logits, targets, call_id)[valid].sum().item()
        total["call_prob"] += torch.softmax(logits, -1)[..., call_id][valid].sum().item()
        total["call_argmax"] += (logits.argmax(-1) == call_id)[valid].sum().item()
        total["tokens"] += int(valid.sum())
    model.train(was_training)
    n = max(total["tokens"], 1)
    real = total["real"] / n
    return {"real_loss": real, "perplexity": math.exp(min(real, 50.0)), "call_prob": total["call_prob"] / n,
            "call_share": total["call_argmax"] / n, "tokens": total["tokens"]}


# ----------------------------------------------------------------------------------------------
# The loop


class Stepper(Protocol):
    """The optimiser side of a training step: plain torch here, a DeepSpeed engine in jobs.pretrain."""

    model: torch.nn.Module
    """What the forward pass runs through (a DeepSpeed engine is a module too)."""

    def update(self, loss: torch.Tensor, lr: float) -> torch.Tensor | float:
        """Backward, clip, one optimiser step at learning rate `lr`; returns the gradient norm."""
        ...


class PlainStepper:
    """AdamW with global-norm clipping on one process."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig) -> None:
        self.model, self.clip = model, train.grad_clip
        self.optimizer = build_optimizer(model, train)

    def update(self, loss: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return grad_norm


@dataclass
class Position:
    """How far a run is: what a checkpoint stores and a resumed run continues from."""

    step: int = 0
    rows: int = 0
    """Sequences of the global batch stream consumed (all ranks together)."""
    supervised_tokens: int = 0
    """Real-token-supervised tokens so far (all ranks together)."""


@dataclass
class Ranks:
    """Data parallelism as the loop sees it: this rank's rows of each global batch, and collectives.

    `reduce(values)` sums a list of floats over ranks; `gather(t)` concatenates a [b, ...] tensor of
    every rank along dim 0 (rank order) and returns it with this rank's first row in the result, so
    the labelling rule selects over the global batch (lacy.labels.method.lacy_step)."""

    rank: int = 0
    world: int = 1
    reduce: Callable[[list[float]], list[float]] | None = None
    gather: Gather | None = None

    def local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        per = batch["input_ids"].shape[0] // self.world
        return {k: v[self.rank * per:(self.rank + 1) * per] for k, v in batch.items()}


_COUNTS = ("supervised_tokens", "valid_tokens")
"""Stats that are counts (summed over ranks); the others are per-token shares (valid-token-weighted)."""


def finished(position: Position, train: TrainConfig) -> bool:
    cap = train.max_supervised_tokens
    return position.step >= train.max_steps or (cap is not None and position.supervised_tokens >= cap)


def train_loop(cfg: LacyConfig, stepper: Stepper, batches: Iterator[dict], call_id: int, *,
               position: Position | None = None, ranks: Ranks | None = None, log_fn: LogFn | None = None,
               val_batches: Callable[[], Iterable[dict]] | None = None,
               after_step: Callable[[Position, bool], None] | None = None) -> dict:
    """Train with `cfg.labels.rule` until train.max_steps optimiser steps or (when set)
    train.max_supervised_tokens supervised tokens, from `position` on; returns a summary.

    `batches` yields global batches in the lacy.labels.method contract (each rank slices its rows). Every
    log_every steps and at the end `log_fn(step, row)` gets the window's means (loss, real_loss,
    call_share, masked_share, grad_norm, ...) with tokens/s, lr and the token counts; every eval_every
    steps and at the end, on rank 0, the validation metrics of `val_batches()` (keys `val_*`).
    `after_step(position, done)` runs after every step (checkpoints, fault injection).
    """
    tc = cfg.train
    model = stepper.model
    core = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model (and has a `config` of its own)
    device = next(model.parameters()).device
    eos_id, pad_id = core.config.eos_token_id, core.config.pad_token_id
    position = position or Position()
    ranks = ranks or Ranks()
    history: list[dict] = []

    def emit(step: int, row: dict) -> None:
        history.append({"step": step, **row})
        if log_fn is not None:
            log_fn(step, row)

    start = time.perf_counter()
    steps_before, tokens = position.step, 0
    window: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    run_sums: dict[str, float] = {"valid": 0.0}  # this run's valid-token-weighted sums of every share
    model.train()
    while not finished(position, tc):
        try:
            batch = next(batches)
        except StopIteration:
            break  # the data ran out before the budget: the summary says how far it got
        lr = tc.lr * lr_factor(position.step, tc, position.supervised_tokens)
        with autocast(device):
            loss, stats = lacy_step(model, ranks.local(batch), cfg.labels, call_id, eos_id=eos_id,
                                    pad_id=pad_id, gather=ranks.gather)
        grad_norm = stepper.update(loss, lr)
        # One host sync per step: the stop rule needs the global supervised-token count.
        keys = sorted(stats)
        valid = stats["valid_tokens"].float()
        local = torch.stack([stats[k].float() if k in _COUNTS else stats[k].float() * valid for k in keys])
        values = local.tolist()
        totals = dict(zip(keys, ranks.reduce(values) if ranks.reduce else values, strict=True))
        n_valid = max(totals["valid_tokens"], 1.0)
        for key in keys:
            if key not in _COUNTS:
                run_sums[key] = run_sums.get(key, 0.0) + totals[key]
        run_sums["valid"] += totals["valid_tokens"]

        position.step += 1
        position.rows += batch["input_ids"].shape[0]
        position.supervised_tokens += int(totals["supervised_tokens"])
        n_tokens = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        tokens += n_tokens
        window_tokens += n_tokens
        for key in keys:
            if key not in _COUNTS:
                window[key] = window.get(key, 0.0) + totals[key] / n_valid
        window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
        window["steps"] = window.get("steps", 0.0) + 1

        done = finished(position, tc)
        if position.step % tc.log_every == 0 or done:
            now = time.perf_counter()
            n = window.pop("steps")
            row = {k: v / n for k, v in window.items()}
            row.update(tokens_per_s=window_tokens / max(now - window_start, 1e-9), lr=lr,
                       supervised_tokens=position.supervised_tokens, tokens=position.rows * (
                           batch["input_ids"].shape[1] - 1))
            emit(position.step, row)
            window, window_tokens, window_start = {}, 0, now
        if val_batches is not None and ranks.rank == 0 and (position.step % tc.eval_every == 0 or done):
            metrics = evaluate(core, val_batches(), call_id)
            emit(position.step, {f"val_{k}": v for k, v in metrics.items()})
        if after_step is not None:
            after_step(position, done)

    elapsed = time.perf_counter() - start
    last_val = next((r for r in reversed(history) if "val_real_loss" in r), {})
    last_train = next((r for r in reversed(history) if "real_loss" in r), {})
    cap = tc.max_supervised_tokens
    return {"steps": position.step, "rows": position.rows,
            "tokens": position.rows * (cfg.model.seq_len), "supervised_tokens": position.supervised_tokens,
            "budget_reached": cap is None or position.supervised_tokens >= cap,
            # Means over the whole run (valid-token weighted): call_share, masked_share, fact_share, ...
            **{k: v / max(run_sums["valid"], 1.0) for k, v in run_sums.items() if k != "valid"},
            # Where the schedule stands when training stops: the floor for a run that went the distance.
            "final_lr_factor": lr_factor(position.step, tc, position.supervised_tokens),
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / max(elapsed, 1e-9) if position.step > steps_before else 0.0,
            "train": last_train, "val": last_val, "history": history}


def train(cfg: LacyConfig, model: torch.nn.Module, train_batches: Iterator[dict],
          val_batches: Callable[[], Iterable[dict]] | None, call_id: int, log: LogFn | None = None) -> dict:
    """`train_loop` with a plain AdamW stepper on one process (the tests' and benches' entry)."""
    return train_loop(cfg, PlainStepper(model, cfg.train), train_batches, call_id, log_fn=log,
                      val_batches=val_batches)


# ----------------------------------------------------------------------------------------------
# Saving a trained model


def save_final(model: Any, tokenizer: Any, out: Path, cfg: LacyConfig, summary: dict, *,
               trainer: str, save_dtype: torch.dtype | None = None, max_shard_mb: float | None = None) -> Path:
    """The final model folder every trainer writes: safetensors + tokenizer, a generation config
    that keeps plain `generate()` from ever emitting `<CALL>` (`bad_words_ids`), the training
    summary and a model card. Returns the folder."""


    out.mkdir(parents=True, exist_ok=True)
    if save_dtype is not None:
        model = model.to(save_dtype)
    shard_size = {} if max_shard_mb is None else {"max_shard_size": int(max_shard_mb * 1e6)}
    model.save_pretrained(out, safe_serialization=True, **shard_size)
    tokenizer.save_pretrained(out)
    cid = call_id(tokenizer)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, bad_words_ids=[[cid]], do_sample=False,
                     max_new_tokens=64).save_pretrained(out)
    record = {k: v for k, v in summary.items() if k not in ("history", "train", "val")}
    record.update(trainer=trainer, rule=cfg.labels.rule, val=summary.get("val", {}))
    (out / SUMMARY).write_text(json.dumps(record, indent=2))
    (out / "README.md").write_text(model_card(cfg, record, cid))
    return out


def model_card(cfg: LacyConfig, summary: dict, call: int) -> str:
    """What a person who finds the folder needs: what it is, how it was trained, how to serve it."""
    val = summary.get("val", {}).get("val_real_loss")
    start = (f"`{cfg.model.init_from}`" if cfg.model.init_from else f"preset `{cfg.model.preset}`")
    what = (f"The causal LM of `{cfg.model.init_from}` (context {cfg.model.seq_len} in training), further trained"
            if cfg.model.init_from else f"A GPT-2 ({cfg.model.preset} preset, context {cfg.model.seq_len}) pretrained")
    return f"""# lacy small model: rule `{cfg.labels.rule}`, {start}

{what} with the LaCy labelling rule
`{cfg.labels.rule}`: where the rule delegates, it learned to emit `<CALL>` (id {call}) so that a bigger
model writes the next word. Trained by `{summary.get('trainer')}` for {summary.get('steps')} steps,
{summary.get('tokens')} training tokens, {summary.get('supervised_tokens')} of them supervised with their
real token; validation real-token loss {val if val is None else f'{val:.4f}'} nats.

- `model.generate()` never emits `<CALL>`: generation_config.json bans it (`bad_words_ids`). To let the
  model delegate, run it in the cascade: `serve run services.cascade:app config=<config>
  overrides="--serve.small_path <this folder>"`, or `lacy.cascade.engine.Cascade` in Python.
- P(`<CALL>`) of the next token is the model's delegation signal; `lacy.cascade.engine.calibrate` maps a target
  call rate to a threshold.
- Training config: `config.yaml` beside this folder; summary: `{SUMMARY}`.
"""


def train_from_shards(cfg: LacyConfig, save_dtype: torch.dtype | None = None,
                      max_shard_mb: float | None = None, trainer: str = "lacy.train",
                      on_metrics: LogFn | None = None) -> dict:
    """Train from the shards at cfg.score.output_dir on one process; write `<train.output_dir>/final`
    (`save_final`, optionally in `save_dtype` and files of at most `max_shard_mb`), config.yaml and
    metrics.jsonl (each row also to `on_metrics(step, row)`, e.g. an MLflow run). Returns the summary."""

    shards = Path(cfg.score.output_dir)
    storage.pull(cfg, shards, Path(cfg.run_dir) / "tokenizer")
    manifest = read_manifest(shards)
    if manifest.seq_len != cfg.model.seq_len:
        raise ValueError(f"model.seq_len {cfg.model.seq_len} differs from the shards' seq_len "
                         f"{manifest.seq_len} ({shards}); set --model.seq_len {manifest.seq_len}")
    tokenizer = load_shard_tokenizer(shards, also=[cfg.tokenizer.path])
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    torch.manual_seed(cfg.train.seed)
    device = default_device(cfg.train.use_gpu)
    model = build_model(cfg.model, tokenizer).to(device)
    batches = read_batches(shards, "train", cfg.train.batch_size, seed=cfg.train.seed, loop=True)
    val = lambda: read_batches(shards, "val", cfg.train.batch_size, seed=0)
    has_val = bool(manifest.shards.get("val"))

    with open(out / "metrics.jsonl", "w") as metrics:
        def log_row(step: int, row: dict) -> None:
            metrics.write(json.dumps({"step": step, **row}) + "\n")
            metrics.flush()
            if on_metrics is not None:
                on_metrics(step, row)
            log.info("[%s] step %6d %s", cfg.labels.rule, step, " ".join(f"{k}={v:.4g}" for k, v in row.items()))

        summary = train_loop(cfg, PlainStepper(model, cfg.train), batches, find_call_id(tokenizer),
                             log_fn=log_row, val_batches=val if has_val else None)
    summary["device"] = str(device)
    save_final(model, tokenizer, out / "final", cfg, summary, trainer=trainer, save_dtype=save_dtype,
               max_shard_mb=max_shard_mb)
    storage.push(cfg, out)
    summary.pop("history")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """One rule in this process, logged as MLflow run "pretrain-<rule>" (every metrics row, the shards as
    input, the final summary)."""
    setup_logging()
    cfg = parse_cli(argv, description=__doc__ or "", stage="train")
    with start_run(cfg, f"pretrain-{cfg.labels.rule}"):
        summary = tracked_training(cfg)
    return summary


def tracked_training(cfg: LacyConfig, **kwargs: Any) -> dict:
    """`train_from_shards` logging to the active MLflow run: each metrics row at its step, the shards as
    the training input, the summary's numbers as final_* metrics."""
    manifest = read_manifest(cfg.score.output_dir)
    log_dataset("shards", str(Path(cfg.score.output_dir).resolve()), manifest.config_hash, "training")
    summary = train_from_shards(cfg, on_metrics=lambda step, row: log_metrics(row, step=step), **kwargs)
    log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return summary


if __name__ == "__main__":
    main()

