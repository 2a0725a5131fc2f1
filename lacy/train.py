"""The plain single-process training loop: the baseline the Ray Train job is measured against, the
loop the tests run, and the GPU path (cuda + bf16 autocast when a GPU is present). No Ray here.

    # shards first (python -m jobs.score --config configs/tiny.yaml), then:
    python -m lacy.train --config configs/tiny.yaml                       # the config's rule (lacy)
    python -m lacy.train --config configs/tiny.yaml --labels.rule loss    # a baseline
    python -m lacy.train --config configs/tiny.yaml --train.max_supervised_tokens 50000  # equal tokens

Writes `<train.output_dir>/final` (safetensors model + tokenizer), `config.yaml` (the resolved config)
and `metrics.jsonl` (one line per log/eval step) there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from lacy.config import LacyConfig, TrainConfig, parse_cli, save_config
from lacy.labels import lacy_step, token_losses

LogFn = Callable[[int, dict], None]


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95))


def lr_factor(step: int, train: TrainConfig) -> float:
    """Share of train.lr at `step`: linear warm-up, then cosine down to min_lr_ratio at max_steps."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, train))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _special_ids(model: torch.nn.Module) -> tuple[int | None, int | None]:
    """(eos_id, pad_id) from the model config (lacy.model.build_model sets both)."""
    return model.config.eos_token_id, model.config.pad_token_id


def _autocast(device: torch.device):
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
    eos_id, pad_id = _special_ids(model)
    total = {"real": 0.0, "call_prob": 0.0, "call_argmax": 0.0, "tokens": 0}
    for batch in batches:
        ids = batch["input_ids"].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with _autocast(device):
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


def train(cfg: LacyConfig, model: torch.nn.Module, train_batches: Iterator[dict],
          val_batches: Callable[[], Iterator[dict]] | None, call_id: int, log: LogFn | None = None) -> dict:
    """Train `model` in place with `cfg.labels.rule` until train.max_steps optimiser steps, or (when
    set) train.max_supervised_tokens real-token-supervised tokens; returns a summary.

    `train_batches` yields batches of the `lacy.labels` contract; `val_batches()` a fresh validation
    pass (evaluated every eval_every steps and at the end). `log(step, row)` gets the training window
    (tokens/s, lr, loss, real_loss, call_share, masked_share, supervised_tokens) every log_every
    steps and at the end, and validation rows (keys prefixed `val_`).
    """
    tc = cfg.train
    device = next(model.parameters()).device
    eos_id, pad_id = _special_ids(model)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    history: list[dict] = []

    def emit(step: int, row: dict) -> None:
        history.append({"step": step, **row})
        if log is not None:
            log(step, row)

    step, supervised, tokens, start = 0, 0, 0, time.perf_counter()
    window: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    model.train()
    while step < tc.max_steps and (tc.max_supervised_tokens is None or supervised < tc.max_supervised_tokens):
        try:
            batch = next(train_batches)
        except StopIteration:
            break  # the data ran out before the budget: the summary says how far it got
        with _autocast(device):
            loss, stats = lacy_step(model, batch, cfg.labels, call_id, eos_id=eos_id, pad_id=pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1

        n_tokens = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        supervised += int(stats["supervised_tokens"])  # one device sync per step: needed to stop
        tokens += n_tokens
        window_tokens += n_tokens
        for key, value in stats.items():  # running sums, token-weighted where shares are per token
            window[key] = window.get(key, 0.0) + float(value)
        window["steps"] = window.get("steps", 0.0) + 1
        window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)

        done = step >= tc.max_steps or (tc.max_supervised_tokens is not None
                                        and supervised >= tc.max_supervised_tokens)
        if step % tc.log_every == 0 or done:
            now = time.perf_counter()
            n = window.pop("steps")
            row = {k: v / n for k, v in window.items() if k not in ("supervised_tokens", "valid_tokens")}
            row.update(tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                       lr=scheduler.get_last_lr()[0], supervised_tokens=supervised, tokens=tokens)
            emit(step, row)
            window, window_tokens, window_start = {}, 0, now
        if val_batches is not None and (step % tc.eval_every == 0 or done):
            emit(step, {f"val_{k}": v for k, v in evaluate(model, val_batches(), call_id).items()})

    elapsed = time.perf_counter() - start
    last_val = next((r for r in reversed(history) if "val_real_loss" in r), {})
    last_train = next((r for r in reversed(history) if "real_loss" in r), {})
    return {"steps": step, "tokens": tokens, "supervised_tokens": supervised, "elapsed_s": elapsed,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "train": last_train, "val": last_val,
            "history": history}


def train_from_shards(cfg: LacyConfig, save_dtype: torch.dtype | None = None,
                      max_shard_mb: float | None = None) -> dict:
    """Train from the scoring job's shards at cfg.score.output_dir; write `<train.output_dir>/final`
    (safetensors model + tokenizer; in `save_dtype` and files of at most `max_shard_mb` when given),
    config.yaml, metrics.jsonl and summary.json there. Returns the summary."""
    from lacy.model import build_model
    from lacy.shards import load_shard_tokenizer, read_batches, read_manifest
    from lacy.tokenizer import call_id as find_call_id

    shards = Path(cfg.score.output_dir)
    manifest = read_manifest(shards)
    if manifest.seq_len != cfg.model.seq_len:
        raise ValueError(f"model.seq_len {cfg.model.seq_len} differs from the shards' seq_len "
                         f"{manifest.seq_len} ({shards}); set --model.seq_len {manifest.seq_len}")
    tokenizer = load_shard_tokenizer(shards, also=[cfg.tokenizer.path])
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    torch.manual_seed(cfg.train.seed)
    device = default_device()
    model = build_model(cfg.model, tokenizer).to(device)
    batches = read_batches(shards, "train", cfg.train.batch_size, seed=cfg.train.seed, loop=True)
    val = lambda: read_batches(shards, "val", cfg.train.batch_size, seed=0)
    has_val = bool(manifest.shards.get("val"))

    with open(out / "metrics.jsonl", "w") as metrics:
        def log(step: int, row: dict) -> None:
            metrics.write(json.dumps({"step": step, **row}) + "\n")
            metrics.flush()
            print(f"[{cfg.labels.rule}] step {step:6d} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()),
                  flush=True)

        summary = train(cfg, model, batches, val if has_val else None, find_call_id(tokenizer), log)
    if save_dtype is not None:
        model = model.to(save_dtype)
    shard_size = {} if max_shard_mb is None else {"max_shard_size": int(max_shard_mb * 1e6)}
    model.save_pretrained(out / "final", safe_serialization=True, **shard_size)
    tokenizer.save_pretrained(out / "final")
    summary.pop("history")
    summary["device"] = str(device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    return train_from_shards(parse_cli(argv, description=__doc__ or ""))


if __name__ == "__main__":
    main()
