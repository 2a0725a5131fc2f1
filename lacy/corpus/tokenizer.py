"""Byte-level BPE with the three special tokens the method needs, in Hugging Face format.

`<CALL>` is an ordinary vocabulary id to the model; `<|endoftext|>` (id 0) separates packed documents
and doubles as bos/unk; `<pad>` pads batches. Offsets (`return_offsets_mapping=True`) are character
offsets into the original text, untrimmed, so the tokens of a text tile it without gaps (leading
spaces belong to the token that starts with them). Facts and reference losses are aligned by them.

    tok = train_tokenizer(texts, vocab_size=8192, out_dir="runs/tok")
    tok = load_tokenizer("runs/tok")      # same ids, same offsets
    tok = extend_tokenizer("path/to/hf-model", out_dir="runs/tok")   # an existing model's, <CALL> added
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CALL_TOKEN = "<CALL>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, CALL_TOKEN]  # in id order: EOS is 0


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` ids (specials and the 256 byte symbols included).

    Saved with `save_pretrained(out_dir)` when given, so `AutoTokenizer.from_pretrained(out_dir)` works.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least "
                         f"{len(SPECIAL_TOKENS) + 256} (256 byte symbols + {len(SPECIAL_TOKENS)} specials)")
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word is tokenised as written, and offsets stay exact.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = _wrap(bpe)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def _wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    # Built from the tokenizer object, never from vocab/merges files: transformers 5 silently builds a
    # one-token vocabulary that way (PLATFORM.md).
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[CALL_TOKEN])


def extend_tokenizer(source: str | Path, out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of an existing model (`source`: its directory) with `<CALL>` added, and `<pad>`
    when it has no pad token or pads with its eos (packed rows mask pad targets: the document separator
    must stay a target). Its own ids are unchanged; the new tokens get the next ids. Saved to `out_dir`
    when given."""
    source = Path(source)
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model.init_from: {source} has no tokenizer.json (a fast tokenizer is needed: "
                                "its offsets align the fact flags)")
    tok = AutoTokenizer.from_pretrained(str(source))
    if tok.eos_token_id is None:
        raise ValueError(f"model.init_from: the tokenizer of {source} has no eos token to separate documents")
    if CALL_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [CALL_TOKEN]})
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    call_id(tok)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by `train_tokenizer` (or any HF fast tokenizer directory) that has `<CALL>`."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: not a saved tokenizer directory")
    tok = AutoTokenizer.from_pretrained(str(path))
    call_id(tok)  # fail early on a tokenizer without <CALL>
    return tok


def call_id(tok: PreTrainedTokenizerFast) -> int:
    """The vocabulary id of `<CALL>`; ValueError if the tokenizer has none."""
    ids = tok.convert_tokens_to_ids([CALL_TOKEN])
    if not ids or ids[0] is None or ids[0] == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {CALL_TOKEN} token")
    return int(ids[0])


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """16 hex digits of sha256 over the serialised tokenizer (vocab, merges, specials, pipeline)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]
