"""The GPU paths the project claims, checked on a machine with CUDA and without Ray, spaCy or MLflow.

    python3 -m bench.gpu_check                 # ≈3–6 min on one GPU; writes $OUT/gpu_check.json if $OUT is set
    python3 -m bench.gpu_check --quick         # smaller shapes, under a minute
    .venv/bin/python -m bench.gpu_check --dry-run   # here, on the CPU: the same code paths, tiny shapes

Prints one line per check with PASS/FAIL and its throughput:
  1. bf16 training steps of every labelling rule with `lacy.train.train_loop` on CUDA (autocast), the
     `small` preset, then the `334m` preset for throughput and MFU against the device's dense bf16 peak
     (model FLOPs = 6 x parameters + 12 x layers x width x context per trained token);
  2. the cascade (`lacy.cascade.engine.Cascade`) with the small and the big model both on the GPU (SmolLM2 from
     the converted cache when it is there, else a random Llama of SmolLM2's shape), one request and the
     evaluation's batch path (`generate_batch`, 16 people; texts equal to one-by-one on 4);
  3. reference-loss scoring (`lacy.labels.reference.ReferenceScorer`) on the GPU.
Batches are synthetic (token ids of generated text, random fact flags, reference losses and judge
sets): the point is that the code paths run on the device and how fast, not what is learned.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from pathlib import Path

import torch

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "V100": 125e12}
"""Dense bf16 tensor-core peak FLOP/s by device name (vendor figures, no sparsity)."""
RULES = ("plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts")
DEVICE = "cuda"
"""Where every check runs ("cpu" with --dry-run, to test this script without a GPU)."""


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_flops() -> float | None:
    if DEVICE != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def tokenizer_and_texts(n: int = 400):
    from lacy.corpus.tokenizer import train_tokenizer

    cities = ["Paris", "Lagos", "Osaka", "Quito", "Perth", "Bergen", "Tunis", "Cusco"]
    texts = [f"Person {i} was born on {1 + i % 28} March {1900 + i % 97} in {cities[i % 8]}. "
             f"They studied field {i % 31} at university {i % 53} and worked for company {i % 71}."
             for i in range(n)]
    return train_tokenizer(texts, vocab_size=2048), texts


def batches(tokenizer, texts, batch: int, seq_len: int, k: int = 4):
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    rows = ids[: len(ids) // (seq_len + 1) * (seq_len + 1)].view(-1, seq_len + 1)
    g = torch.Generator().manual_seed(0)
    while True:
        pick = torch.randint(0, len(rows), (batch,), generator=g)
        x = rows[pick]
        yield {"input_ids": x, "fact": torch.rand(x.shape, generator=g) < 0.25,
               "ref_loss": torch.rand(x.shape, generator=g) * 4,
               "judge_accept": torch.randint(3, len(tokenizer), (*x.shape, k), generator=g)}


def train_check(rule: str, preset: str, steps: int, batch: int, seq_len: int, tok, texts) -> dict:
    from lacy.core.config import load_config
    from lacy.corpus.tokenizer import call_id
    from lacy.model import build_model, count_parameters
    from lacy.train import PlainStepper, train_loop

    cfg = load_config(None, [f"--labels.rule={rule}", f"--model.preset={preset}", f"--model.seq_len={seq_len}",
                             f"--train.batch_size={batch}", f"--train.max_steps={steps}", "--train.warmup_steps=2",
                             f"--train.log_every={max(1, steps // 2)}",
                             f"--train.use_gpu={str(DEVICE == 'cuda').lower()}",
                             "--score.reference=synthetic", "--score.judge=synthetic"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok).to(DEVICE)
    stream = batches(tok, texts, batch, seq_len)
    next(stream)
    sync()
    summary = train_loop(cfg, PlainStepper(model, cfg.train), stream, call_id(tok))
    sync()
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    n = count_parameters(model)
    flops_per_token = 6 * n + 12 * model.config.n_layer * model.config.n_embd * seq_len
    # Steady state: the second logging window (the first holds CUDA warm-up and kernel selection).
    rate = summary["history"][-1]["tokens_per_s"]
    peak = peak_flops()
    ok = all(math.isfinite(x) for x in losses) and (rule in ("plain", "ignore", "ignore_facts")
                                                    or summary["call_share"] > 0)
    return {"check": f"train {rule} ({preset})", "pass": ok, "tokens_per_s": rate, "parameters": n,
            "mfu": rate * flops_per_token / peak if peak else None, "loss_first_last": [losses[0], losses[-1]]}


def cascade_check(tok, small_preset: str = "small") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lacy.cascade.big import BigSession
    from lacy.cascade.engine import Cascade, generate_batch
    from lacy.cascade.hf_big import HFBig
    from lacy.cascade.lm import SmallLM
    from lacy.core.config import CascadeConfig, ModelConfig
    from lacy.core.paths import cache_dir
    from lacy.model import build_model, load_big_model

    small = build_model(ModelConfig(preset=small_preset, seq_len=256), tok).to(DEVICE).eval()
    if (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file():
        big, big_tok, kind = *load_big_model("smollm2", "bfloat16"), "SmolLM2-135M"
    else:  # SmolLM2's shape, random weights: the GPU path, not the knowledge
        big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                           max_position_embeddings=2048)).to(torch.bfloat16)
        big_tok, kind = tok, "random Llama (SmolLM2 shape)"
    big = big.to(DEVICE).eval()
    backend, ccfg = HFBig(big, big_tok), CascadeConfig(max_new_tokens=48)

    def cascade() -> Cascade:  # one request's: its own big-model session, as the evaluation builds them
        return Cascade(SmallLM(small, tok), BigSession(backend), ccfg)

    cascade().generate("Person 3 was born on", call_threshold=0.0)  # warm-up
    sync()
    start = time.perf_counter()
    result = cascade().generate("Person 7 was born on", call_threshold=0.0)
    sync()
    seconds = time.perf_counter() - start
    on_gpu = next(small.parameters()).device.type == DEVICE and next(big.parameters()).device.type == DEVICE
    tokens = result.small_tokens + result.big_tokens
    # The evaluation's batch path (generate_batch): people decoded together, every pending big call one batch.
    prompts = [f"Person {i} was born on" for i in range(16)]
    alone = [cascade().generate(p, call_threshold=0.0).text for p in prompts[:4]]
    sync()
    start = time.perf_counter()
    batch = generate_batch([cascade().start(p, call_threshold=0.0) for p in prompts])
    sync()
    batch_s = time.perf_counter() - start
    # bf16 batches round differently from one-by-one passes: report how far the texts agree (the fp32 CPU
    # path is tested equal in tests/test_plan.py), do not require it.
    agree = [len(os.path.commonprefix([a, b.text])) / max(1, len(a)) for a, b in zip(alone, batch, strict=False)]
    return {"check": f"cascade on GPU (big: {kind})",
            "pass": on_gpu and result.calls > 0 and tokens > 0 and all(r.calls for r in batch),
            "tokens_per_s": tokens / seconds, "calls": result.calls, "text": result.text[:120],
            "batch_people_per_s": len(prompts) / batch_s, "batch_same_as_alone": f"{sum(a == 1 for a in agree)}/4",
            "batch_shared_prefix": sum(agree) / len(agree)}


def reference_check(tok, texts) -> dict:
    from lacy.core.config import ModelConfig
    from lacy.labels.reference import ReferenceScorer
    from lacy.model import build_model

    model = build_model(ModelConfig(preset="small", seq_len=512), tok)
    scorer = ReferenceScorer(model, tok, device=DEVICE, batch_size=32)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [torch.tensor(o).numpy() for o in enc["offset_mapping"]]
    scorer.token_losses_batch(texts[:8], offsets[:8])
    sync()
    start = time.perf_counter()
    losses = scorer.token_losses_batch(texts, offsets)
    sync()
    n = sum(len(x) for x in losses)
    finite = sum(int(torch.isfinite(torch.from_numpy(x)).sum()) for x in losses) / n
    on_device = next(scorer.model.parameters()).device.type == DEVICE
    return {"check": "reference losses on GPU", "pass": on_device and finite > 0.9,
            "tokens_per_s": n / (time.perf_counter() - start), "finite_share": finite}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only, under a minute")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (tests this script)")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (--dry-run runs the same paths on the CPU)")
        return 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, bf16 peak {peak_flops() or 'unknown'} FLOP/s", flush=True)
    tok, texts = tokenizer_and_texts(100 if args.dry_run else 400)
    shape = (4, 2, 32) if args.dry_run else (20, 32, 256)
    checks = [lambda rule=rule: train_check(rule, "small", *shape, tok, texts) for rule in RULES]
    if not (args.quick or args.dry_run):
        checks += [lambda rule=rule: train_check(rule, "334m", 30, 16, 1024, tok, texts) for rule in ("plain", "lacy")]
    checks += [lambda: cascade_check(tok), lambda: reference_check(tok, texts)]
    results = []
    for check in checks:
        try:
            result = check()
        except Exception as err:  # a failing path is a result, and the others still run
            result = {"check": getattr(check, "__name__", "check"), "pass": False,
                      "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        results.append(result)
        summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "trace"}
        print(("PASS " if result["pass"] else "FAIL ") + json.dumps(summary), flush=True)
    if out := os.environ.get("OUT"):
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
