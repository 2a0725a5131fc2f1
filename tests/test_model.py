"""GPT-2 presets (shapes, hand-counted parameters, save/reload) and the SmolLM2 big model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from lacy.core.config import ModelConfig
from lacy.corpus.tokenizer import call_id
from lacy.model import (
    PRESETS,
    SMOLLM2_CACHE,
    _convert_smollm2,
    build_model,
    count_parameters,
    describe_presets,
    gpt2_config,
    load_big_model,
    preset_parameters,
)


def gpt2_parameters(vocab: int, positions: int, width: int, layers: int) -> int:
    """By hand: token + position embeddings (the head is tied), per block two LayerNorms (4d), qkv
    (3d² + 3d), attention out (d² + d), MLP (4d² + 4d and 4d² + d) = 12d² + 13d, and a final LayerNorm."""
    return vocab * width + positions * width + layers * (12 * width**2 + 13 * width) + 2 * width


def test_tiny_model_fixture(tiny_model, tiny_tokenizer):
    assert isinstance(tiny_model, GPT2LMHeadModel) and not tiny_model.training
    cfg = tiny_model.config
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_layer, cfg.n_embd, cfg.n_head) == (1024, 64, 2, 64, 2)
    # GPT2Config would keep 50256 for these: outside a 1024-id vocabulary.
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 0, 1)
    assert count_parameters(tiny_model) == gpt2_parameters(1024, 64, 64, 2) == 169_728
    ids = torch.tensor([tiny_tokenizer("Paris is the capital of France.")["input_ids"]])
    with torch.no_grad():
        logits = tiny_model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()
    assert call_id(tiny_tokenizer) < logits.shape[-1]


def test_small_preset_trains_a_step(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="small", seq_len=32, dropout=0.1), tiny_tokenizer)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.1
    assert count_parameters(model) == gpt2_parameters(1024, 32, 256, 4)
    ids = torch.randint(3, 1024, (2, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_small_model_uses_the_fused_tanh_gelu_with_gpt2s_values(tiny_tokenizer):
    """gelu_pytorch_tanh (one kernel) instead of transformers' Python gelu_new (a chain of elementwise
    ops; steps 1.12-1.17x faster, bench.activation): the same function, the same model up to rounding."""
    model = build_model(ModelConfig(preset="small", seq_len=32), tiny_tokenizer)
    assert model.config.activation_function == "gelu_pytorch_tanh"
    reference = GPT2LMHeadModel(model.config.__class__.from_dict({**model.config.to_dict(),
                                                                  "activation_function": "gelu_new"}))
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, len(tiny_tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("preset", ["334m", "1.3b"])
def test_paper_presets_build_and_forward(preset, tiny_tokenizer):
    width, layers = PRESETS[preset]["n_embd"], PRESETS[preset]["n_layer"]
    with torch.device("meta"):  # the whole model, without allocating it
        model = build_model(ModelConfig(preset=preset, seq_len=128), tiny_tokenizer)
    assert count_parameters(model) == gpt2_parameters(1024, 128, width, layers)
    # Meta tensors cannot build attention masks, so the forward runs for real on one block of the
    # preset's width and heads (every block is the same).
    one_block = gpt2_config(preset, 1024, 128, bos_id=0, eos_id=0, pad_id=1)
    one_block.n_layer = 1
    torch.manual_seed(0)
    with torch.no_grad():
        logits = GPT2LMHeadModel(one_block)(torch.randint(3, 1024, (1, 16))).logits
    assert logits.shape == (1, 16, 1024) and torch.isfinite(logits).all()


def test_preset_parameter_counts_match_the_paper_sizes():
    counts = preset_parameters(vocab_size=32768, seq_len=1024)
    for preset, spec in PRESETS.items():
        assert counts[preset] == gpt2_parameters(32768, 1024, spec["n_embd"], spec["n_layer"])
    assert 330e6 < counts["334m"] < 340e6 and 1.25e9 < counts["1.3b"] < 1.35e9
    assert 1e6 < preset_parameters(vocab_size=8192, seq_len=256)["small"] < 10e6
    table = describe_presets(32768, 1024)
    assert "1.3b" in table and "336.9 M" in table


def test_tiny_model_saves_and_reloads_identically(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Alvar Aalto was a Finnish architect born in 1898."
    ids, ids_reloaded = tiny_tokenizer(text, return_tensors="pt"), tok(text, return_tensors="pt")
    assert torch.equal(ids["input_ids"], ids_reloaded["input_ids"])
    with torch.no_grad():
        assert torch.equal(tiny_model(**ids).logits, model(**ids_reloaded).logits)
    # The same directory is a valid local big model (safetensors).
    big, big_tok = load_big_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(big(**ids).logits, tiny_model(**ids).logits)
    assert load_big_model(str(tmp_path), dtype="bfloat16")[0].dtype == torch.bfloat16
    assert big_tok.convert_tokens_to_ids("<CALL>") == call_id(tiny_tokenizer)


def test_big_model_path_errors(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'smollm2' nor a local model directory"):
        load_big_model(str(tmp_path / "missing"))
    tiny_model.config.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unsupported big-model dtype 'int8'"):
        load_big_model("smollm2", dtype="int8")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(refusing pickled pytorch_model.bin\)"):
        load_big_model(str(tmp_path))


def test_smollm2_completes_a_famous_fact():
    # The first call on a machine converts the GGUF into the user cache (≈20 s); later ones read it.
    model, tok = load_big_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert 134e6 < count_parameters(model) < 135e6 and not model.training
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    completion = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_smollm2_conversion_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("LACY_CACHE", str(tmp_path))
    model, _ = load_big_model("smollm2")
    target = tmp_path / SMOLLM2_CACHE
    files = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    # A process that loses the race finds the target already there: it keeps it and cleans up.
    _convert_smollm2(target)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2_CACHE]  # no temp dirs left behind
    assert count_parameters(model) == count_parameters(load_big_model("smollm2")[0])
