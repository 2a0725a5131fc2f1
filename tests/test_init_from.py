"""A small model started from an existing Hugging Face causal LM (`model.init_from`): its tokenizer with
`<CALL>` makes the shards, its embedding grows by mean rows, every rule trains it (the plain loop and the Ray
Train job), the cascade and the served engine decode it, and its checkpoint reloads with AutoModelForCausalLM.
The models are tiny random Llama- and GPT-2-shaped ones made here, saved with tokenizers of their own kind
(a sentencepiece-like Metaspace BPE without a pad token; a byte-level BPE whose one special is everything),
and SmolLM2-135M for a few real steps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lacy.core.config import RULES, ConfigError, ModelConfig, load_config
from lacy.corpus.tokenizer import CALL_TOKEN, PAD_TOKEN, call_id, extend_tokenizer
from lacy.model import build_model, load_small_model, pretrained_dir
from lacy.shards.scoring import build_shards
from lacy.train import train_from_shards


def make_pretrained(folder: Path, kind: str, texts: list[str]) -> Path:
    """A random causal LM of `kind` ("llama": untied head, Metaspace BPE with <s> </s> <unk> and no pad;
    "gpt2": tied head, byte-level BPE with <|endoftext|> as bos/eos/unk, its embedding padded past the
    tokenizer as real models often are) saved with its tokenizer, as a user's model would be."""
    if kind == "llama":
        specials, bos, eos, unk = ["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>"
        bpe = Tokenizer(models.BPE(unk_token=unk))
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet: list[str] = []
    else:
        specials, bos, eos, unk = ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                       initial_alphabet=alphabet, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token=unk)
    torch.manual_seed(1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) + 6, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained(embedded_docs, tmp_path_factory) -> dict[str, Path]:
    texts = [d["text"] for d in embedded_docs[:200]]
    root = tmp_path_factory.mktemp("pretrained")
    return {kind: make_pretrained(root / kind, kind, texts) for kind in ("llama", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_call_joins_the_tokenizer_and_its_rows_start_at_the_mean(pretrained, kind, tmp_path):
    base_tok = AutoTokenizer.from_pretrained(pretrained[kind])
    base = AutoModelForCausalLM.from_pretrained(pretrained[kind])
    tok = extend_tokenizer(pretrained[kind], tmp_path / "tok")
    # Its own ids unchanged; <CALL> and <pad> (neither model has a pad of its own) after them.
    assert {t: i for t, i in tok.get_vocab().items() if t in base_tok.get_vocab()} == base_tok.get_vocab()
    added = sorted(set(tok.get_vocab().values()) - set(base_tok.get_vocab().values()))
    assert [tok.convert_ids_to_tokens(i) for i in added] == [CALL_TOKEN, PAD_TOKEN]
    assert call_id(tok) == len(base_tok) and tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").get_vocab() == tok.get_vocab()

    model = build_model(ModelConfig(seq_len=64, init_from=str(pretrained[kind])), tok)
    emb, old = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    known = len(base_tok)
    assert emb.shape[0] == max(len(tok), old.shape[0])
    assert torch.equal(emb[:known], old[:known])  # what it learned is kept
    for i in added:
        assert torch.allclose(emb[i], old[:known].mean(0), atol=1e-6)
    head = model.get_output_embeddings().weight
    if kind == "gpt2":  # the tied head is the embedding
        assert head.data_ptr() == emb.data_ptr()
    else:  # an untied head grows its own mean row
        assert head.data_ptr() != emb.data_ptr()
        old_head = base.get_output_embeddings().weight
        assert torch.allclose(head[added[0]], old_head[:known].mean(0), atol=1e-6)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_bad_sources_are_refused_naming_the_field(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from/tokenizer.path"):
        load_config("configs/tiny.yaml", ["--model.init_from", str(pretrained["gpt2"]), "--tokenizer.path", "x"])
    with pytest.raises(FileNotFoundError, match="model.init_from 'nowhere' is neither 'smollm2' nor"):
        pretrained_dir("nowhere", "model.init_from")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model.init_from: .* no .safetensors weights .refusing pickled"):
        pretrained_dir(str(tmp_path / "pickled"), "model.init_from")
    with pytest.raises(ValueError, match="model.seq_len 512 is longer than the context"):
        build_model(ModelConfig(seq_len=512, init_from=str(pretrained["gpt2"])),
                    extend_tokenizer(pretrained["gpt2"]))
    with pytest.raises(ValueError, match="not the tokenizer of .* with tokens added"):
        build_model(ModelConfig(seq_len=64, init_from=str(pretrained["gpt2"])), extend_tokenizer(pretrained["llama"]))


def _run(tmp_path: Path, init_from: Path, *more: str):
    return load_config("configs/synthbio-tiny.yaml", [
        "--run_dir", str(tmp_path / "run"), "--model.init_from", str(init_from), "--synth.people", "24",
        "--train.max_steps", "2", "--train.warmup_steps", "1", "--train.eval_every", "2", "--train.batch_size", "4",
        *more])


def test_every_rule_trains_a_llama_it_is_served_and_reloads(pretrained, tmp_path):
    """The shards in the Llama's own tokenizer (no BPE trained), reference losses and judge sets from the
    GPT-2 (another tokenizer); each rule a few plain-loop steps; the checkpoint reloads with
    AutoModelForCausalLM; the cascade with a big model calls it, and the served engine answers with it."""
    from lacy.cascade.big import build_big
    from lacy.cascade.lm import SmallLM
    from lacy.eval.generate import LocalGenerator, Request
    from lacy.serve.engine import CascadeEngine

    cfg = _run(tmp_path, pretrained["llama"], "--score.reference", str(pretrained["gpt2"]),
               "--score.judge", str(pretrained["gpt2"]), "--labels.judge_top_k", "4")
    manifest, _ = build_shards(cfg)
    shard_tok = AutoTokenizer.from_pretrained(manifest.tokenizer_path)
    assert len(shard_tok) == len(AutoTokenizer.from_pretrained(pretrained["llama"])) + 2
    assert json.loads((Path(cfg.run_dir) / "tokenizer" / "lacy_tokenizer.json").read_text())["init_from"] == str(
        pretrained["llama"])
    assert manifest.counts["train"]["fact_tokens"] > 0
    finals = {}
    for rule in RULES:
        rcfg = _run(tmp_path, pretrained["llama"], "--score.reference", str(pretrained["gpt2"]),
                    "--score.judge", str(pretrained["gpt2"]), "--labels.judge_top_k", "4",
                    "--labels.rule", rule, "--train.output_dir", str(tmp_path / rule))
        summary = train_from_shards(rcfg)
        assert summary["steps"] == 2 and summary["val"]["val_real_loss"] > 0, rule
        finals[rule] = tmp_path / rule / "final"
    card = finals["lacy"].joinpath("README.md").read_text()
    assert card.startswith(f"# lacy small model: rule `lacy`, `{pretrained['llama']}`")

    model = AutoModelForCausalLM.from_pretrained(finals["lacy"])
    assert isinstance(model, LlamaForCausalLM) and model.config.pad_token_id == shard_tok.pad_token_id
    small, tok = load_small_model(finals["lacy"])
    assert call_id(tok) == call_id(shard_tok)
    # Its Metaspace decoder drops a lone piece's leading space; the cascade's pieces keep theirs.
    lm = SmallLM(small, tok)
    ids = tok("Anna Keller", add_special_tokens=False)["input_ids"]
    keller = ids[[tok.convert_ids_to_tokens(i).startswith("▁K") for i in ids].index(True):]
    assert tok.decode(keller) == "Keller" and lm.decode(keller) == " Keller"
    assert lm.start_id == tok.eos_token_id != tok.bos_token_id  # a text starts as a document did in training

    big_cfg = load_config(None, ["--run_dir", str(tmp_path / "run"), "--big.path", str(pretrained["gpt2"]),
                                 "--serve.small_path", str(finals["lacy"]), "--cascade.max_new_tokens", "12"])
    gen = LocalGenerator(big_cfg, {"llama": str(finals["lacy"])})
    outs = gen.generate_many([Request("Anna Keller", "llama", "plain", "confidence", -20.0, 12),
                              Request("Anna Keller", "llama", None, max_tokens=12)])
    assert outs[0].calls > 0 and any(source == "big" for _, source in outs[0].spans)
    assert outs[1].calls == 0 and outs[1].small_tokens > 0
    engine = CascadeEngine(big_cfg, build_big(big_cfg))
    try:
        answer = asyncio.run(engine.generate(engine.parse(
            {"prompt": "Anna Keller", "max_tokens": 6, "call_threshold": 0.0}, "generate")))
    finally:
        engine.close()
    assert answer["calls"] > 0 and any(s["source"] == "big" for s in answer["spans"])


@pytest.mark.slow
def test_the_ray_train_job_trains_a_gpt2_started_from_it(pretrained, tmp_path, ray_session, mlflow_uri):
    from jobs import pretrain

    cfg = _run(tmp_path, pretrained["gpt2"], "--labels.rule", "lacy", "--mlflow.tracking_uri", mlflow_uri,
               "--train.checkpoint_every", "1")
    build_shards(cfg)
    final = pretrain.run(cfg)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(final)) + 4  # padded
    assert json.loads((Path(final) / "training_summary.json").read_text())["trainer"] == "jobs.pretrain"


@pytest.mark.slow
def test_a_few_real_steps_of_smollm2(tmp_path, embedded_docs):
    """SmolLM2-135M-Instruct from its cache: its first loss is a pretrained model's (far below the
    ln(49k) ≈ 10.8 nats of a random one), a few steps train it, and it reloads."""
    folder = pretrained_dir("smollm2", "model.init_from")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in embedded_docs[:24]))
    cfg = load_config("configs/tiny.yaml", [
        "--run_dir", str(tmp_path / "run"), "--data.corpus", str(corpus), "--data.max_docs", "null",
        "--model.init_from", "smollm2", "--model.seq_len", "64", "--train.batch_size", "2", "--train.max_steps", "3",
        "--train.warmup_steps", "1", "--train.lr", "1e-5", "--train.log_every", "1", "--train.eval_every", "3"])
    build_shards(cfg)
    summary = train_from_shards(cfg)
    rows = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "real_loss" in r)
    assert first["real_loss"] < 6.0, first
    assert summary["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(Path(cfg.train.output_dir) / "final")
    assert isinstance(model, LlamaForCausalLM)
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(folder)) + 2
