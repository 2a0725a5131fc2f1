"""The plain training loop: schedule, evaluation, every rule on real packed batches, token equalisation,
and `python -m lacy.train` end to end from hand-written shards."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lacy.core.config import FactsConfig, LacyConfig, ModelConfig, load_config
from lacy.corpus.tokenizer import EOS_TOKEN, call_id
from lacy.labels.facts import FactTagger
from lacy.labels.method import token_losses
from lacy.labels.reference import JudgeLabeler, ReferenceScorer
from lacy.model import build_model
from lacy.shards.format import pack_documents
from lacy.shards.scoring import encode_documents
from lacy.train import build_optimizer, evaluate, lr_factor, main, train

SEQ_LEN = 64


@pytest.fixture(scope="module")
def packed(embedded_docs, tiny_tokenizer) -> dict[str, list[dict]]:
    """Packed rows of the embedded corpus with real fact flags, reference losses and judge labels.

    Reference and judge: a small random GPT-2 over our own tokenizer (its offsets line up with ours,
    so the test stays fast); tests/test_reference.py covers foreign tokenisations."""
    torch.manual_seed(1)
    ref_model = build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).eval()
    reference = ReferenceScorer(ref_model, tiny_tokenizer)
    judge = JudgeLabeler(ref_model, tiny_tokenizer, tiny_tokenizer, top_k=4, margin=1.0)
    docs = encode_documents(embedded_docs[:100], tiny_tokenizer, FactTagger(FactsConfig()), reference, judge,
                            val_fraction=0.2)
    eos = tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return {split: list(pack_documents([d for d in docs if d.split == split], SEQ_LEN, eos))
            for split in ("train", "val")}


def _batches(rows: list[dict], batch_size: int, seed: int = 0) -> Iterator[dict]:
    """Endless shuffled batches in the lacy.labels.method contract."""
    rng = np.random.default_rng(seed)
    while True:
        pick = rng.choice(len(rows), batch_size, replace=False)
        out = {"input_ids": torch.from_numpy(np.stack([rows[i]["input_ids"] for i in pick]).astype(np.int64)),
               "fact": torch.from_numpy(np.stack([rows[i]["fact"] for i in pick]))}
        if "ref_loss" in rows[0]:
            out["ref_loss"] = torch.from_numpy(np.stack([rows[i]["ref_loss"] for i in pick]))
        if "judge_accept" in rows[0]:
            accept = np.stack([rows[i]["judge_accept"].reshape(SEQ_LEN + 1, -1) for i in pick])
            out["judge_accept"] = torch.from_numpy(accept.astype(np.int64))
        yield out


def _cfg(**overrides) -> LacyConfig:
    flat = [f"--{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    # score.reference/judge name how the in-memory batches were scored (rho and judge need them).
    return load_config(None, ["--model.preset=tiny", f"--model.seq_len={SEQ_LEN}", "--train.batch_size=8",
                              "--train.warmup_steps=3", "--train.lr=3e-3", "--train.log_every=5",
                              "--train.eval_every=1000", "--score.reference=random-tiny-gpt2",
                              "--score.judge=random-tiny-gpt2", *flat])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = _cfg(train__max_steps=13, train__warmup_steps=3, train__min_lr_ratio=0.1).train
    assert [lr_factor(s, tc) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(3, tc) == pytest.approx(1.0)
    assert lr_factor(8, tc) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_factor(13, tc) == pytest.approx(0.1)
    assert lr_factor(50, tc) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(tiny_model):
    groups = build_optimizer(tiny_model, _cfg().train).param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])


def test_evaluate_matches_explicit_computation(tiny_model, tiny_tokenizer, packed):
    batches = _batches(packed["val"], 2)
    fixed = [next(batches), next(batches)]
    got = evaluate(tiny_model, fixed, call_id(tiny_tokenizer))
    cid = call_id(tiny_tokenizer)
    losses, call_prob = [], []
    with torch.no_grad():
        for batch in fixed:
            logits = tiny_model(input_ids=batch["input_ids"][:, :-1]).logits
            losses.append(token_losses(logits, batch["input_ids"][:, 1:], cid).flatten())
            call_prob.append(torch.softmax(logits, -1)[..., cid].flatten())
    assert got["tokens"] == 2 * 2 * SEQ_LEN
    assert got["real_loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["real_loss"]))
    assert got["call_prob"] == pytest.approx(torch.cat(call_prob).mean().item(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["plain", "loss", "lacy", "rho", "judge", "ignore", "ignore_facts"])
def test_every_rule_trains_and_holds_its_budget(rule, tiny_tokenizer, packed):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", seq_len=SEQ_LEN), tiny_tokenizer)
    cfg = _cfg(labels__rule=rule, train__max_steps=30)
    val_fixed = [b for b, _ in zip(_batches(packed["val"], 8, seed=5), range(2), strict=False)]
    val = lambda: iter(val_fixed)  # noqa: E731
    before = evaluate(model, val(), call_id(tiny_tokenizer))["real_loss"]
    rows: list[tuple[int, dict]] = []
    summary = train(cfg, model, _batches(packed["train"], 8), val, call_id(tiny_tokenizer),
                    log=lambda step, row: rows.append((step, row)))
    assert summary["steps"] == 30
    assert [s for s, r in rows if "real_loss" in r] == [5, 10, 15, 20, 25, 30]
    assert summary["val"]["val_real_loss"] < before - 0.5  # it learns (from ≈ ln 1024 = 6.9)
    train_rows = [r for _, r in rows if "real_loss" in r]
    assert train_rows[-1]["real_loss"] < train_rows[0]["real_loss"]
    call = np.mean([r["call_share"] for r in train_rows])
    masked = np.mean([r["masked_share"] for r in train_rows])
    facts = np.mean([r["fact_share"] for r in train_rows])
    # Budgets count selectable positions (not after EOS): a few tenths of a percent below nominal.
    # One budget (labels.match_lacy): every budgeted rule delegates what lacy does, 0.6 of the facts.
    lacy = 0.6 * facts
    expected = {"plain": (0, 0), "loss": (lacy, 0), "rho": (lacy, 0), "lacy": (lacy, 0),
                "ignore": (0, lacy), "ignore_facts": (0, lacy)}
    if rule == "judge":
        assert 0 < call <= lacy + 0.01 and masked == 0
    else:
        assert call == pytest.approx(expected[rule][0], abs=0.01)
        assert masked == pytest.approx(expected[rule][1], abs=0.01)
    if rule in ("lacy", "ignore_facts"):
        assert np.mean([r["selected_fact_share"] for r in train_rows]) == 1.0
    per_step = 8 * SEQ_LEN * (1 - call - masked)
    assert summary["supervised_tokens"] == pytest.approx(30 * per_step, rel=0.02)


def test_token_equalisation_stops_on_supervised_tokens(tiny_tokenizer, packed):
    cap = 3000
    steps = {}
    for rule in ("plain", "loss"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="tiny", seq_len=SEQ_LEN), tiny_tokenizer)
        cfg = _cfg(labels__rule=rule, train__max_steps=100, train__max_supervised_tokens=cap,
                   train__log_every=1)
        summary = train(cfg, model, _batches(packed["train"], 8), None, call_id(tiny_tokenizer))
        supervised = [r["supervised_tokens"] for r in summary["history"]]
        assert supervised[-1] >= cap > supervised[-2]  # stops on the first step that reaches the cap
        steps[rule] = summary["steps"]
    assert steps["plain"] == math.ceil(cap / (8 * SEQ_LEN))  # every token is supervised: 6 steps
    assert steps["loss"] > steps["plain"]  # ~15% of tokens taught <CALL> instead: more steps


def test_token_budget_schedule_ends_at_the_floor_like_the_step_schedule(tiny_tokenizer, packed):
    """Token equalisation: a delegating rule trained to plain's supervised tokens ends at the same
    final learning-rate factor as plain (the floor), and says it reached its budget."""
    summaries = {}
    for rule, extra in (("plain", {}), ("loss", {"train__max_supervised_tokens": 12 * 8 * SEQ_LEN,
                                                   "train__max_steps": 24})):
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="tiny", seq_len=SEQ_LEN), tiny_tokenizer)
        cfg = _cfg(**{"labels__rule": rule, "train__max_steps": 12, "train__min_lr_ratio": 0.1, **extra})
        summaries[rule] = train(cfg, model, _batches(packed["train"], 8), None, call_id(tiny_tokenizer))
    plain, loss = summaries["plain"], summaries["loss"]
    assert plain["final_lr_factor"] == pytest.approx(0.1)
    assert loss["final_lr_factor"] == pytest.approx(0.1, abs=0.01) and loss["budget_reached"]
    assert loss["steps"] > plain["steps"] and loss["supervised_tokens"] >= plain["supervised_tokens"]
    assert loss["call_share"] == pytest.approx(0.6 * loss["fact_share"], abs=0.01) and plain["call_share"] == 0
    # A cap that max_steps cuts short is reported, not hidden.
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", seq_len=SEQ_LEN), tiny_tokenizer)
    cut = train(_cfg(labels__rule="loss", train__max_steps=5, train__max_supervised_tokens=10**6), model,
                _batches(packed["train"], 8), None, call_id(tiny_tokenizer))
    assert cut["steps"] == 5 and not cut["budget_reached"]


def test_main_trains_from_shards_and_saves_the_model(tmp_path, scored_run):
    out = tmp_path / "train"
    summary = main(["--config", "configs/tiny.yaml", *scored_run, "--train.output_dir", str(out),
                    "--train.max_steps", "6", "--train.log_every", "3", "--train.eval_every", "6",
                    "--labels.rule", "rho"])
    assert summary["steps"] == 6
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["labels"]["rule"] == "rho" and saved["train"]["max_steps"] == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6, 6] and "val_real_loss" in lines[-1]
    assert lines[0]["call_share"] > 0.1  # rho read its reference losses from the shards
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert any(final.glob("*.safetensors")) and (final / "tokenizer.json").is_file()
    record = json.loads((final / "training_summary.json").read_text())
    assert record["steps"] == 6 and record["rule"] == "rho" and record["trainer"] == "lacy.train"
    assert "rule `rho`" in (final / "README.md").read_text()
    # A plain generate() of the saved model never writes <CALL>: the generation config bans it.
    tok = AutoTokenizer.from_pretrained(final)
    cid = call_id(tok)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)).index_fill(0, torch.tensor([cid]), 50.0))
        out_ids = model.generate(**tok("Paris is", return_tensors="pt"), max_new_tokens=5)
    assert cid not in out_ids[0].tolist()


def test_main_refuses_mismatched_seq_len(tmp_path, scored_run):
    with pytest.raises(ValueError, match="seq_len"):
        main(["--config", "configs/tiny.yaml", *scored_run, "--train.output_dir", str(tmp_path / "o"),
              "--model.seq_len", "128"])


def test_use_gpu_without_cuda_names_the_field(tmp_path, scored_run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="train.use_gpu"):
        main(["--config", "configs/tiny.yaml", *scored_run, "--train.output_dir", str(tmp_path / "o"),
              "--train.use_gpu", "true"])
