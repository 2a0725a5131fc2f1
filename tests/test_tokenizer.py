"""Byte-level BPE: special ids, exact char offsets, and a reload that gives identical ids."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lacy.corpus.tokenizer import (
    CALL_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    call_id,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

# Leading spaces, double spaces, a tab, accents, an em dash, CJK (3 bytes) and an emoji (4 bytes, 1 char).
TRICKY = "  Zoë went to Paris in 1999 —\tcafé 北京, naïve 😀 end.\n"


def test_special_tokens_and_vocab_size(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 1024
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert call_id(tok) == tok.convert_tokens_to_ids(CALL_TOKEN) == 2
    # Specials are single ids even inside running text; nothing is added around a text.
    ids = tok("Born in <CALL> on<|endoftext|>")["input_ids"]
    assert ids.count(2) == 1 and ids.count(0) == 1
    assert tok("hello")["input_ids"] == tok.convert_tokens_to_ids(tok.tokenize("hello"))


def test_offsets_are_exact_char_offsets(tiny_tokenizer):
    enc = tiny_tokenizer(TRICKY, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(TRICKY)
    # Untrimmed offsets tile the text: each token starts where the previous ended, or (for the byte
    # pieces of one multi-byte character) repeats that character's span.
    for (a0, b0), (a1, b1) in itertools.pairwise(offsets):
        assert a1 == b0 or (a1, b1) == (a0, b0)
    pieces = [TRICKY[a:b] for k, (a, b) in enumerate(offsets) if k == 0 or (a, b) != tuple(offsets[k - 1])]
    assert "".join(pieces) == TRICKY
    # The leading space of " Paris" belongs to its token; decoding a word's tokens gives its span.
    start = TRICKY.index(" Paris")
    word_ids = [i for i, (a, _) in zip(enc["input_ids"], offsets, strict=True) if start <= a < start + 6]
    assert tiny_tokenizer.decode(word_ids) == " Paris"
    emoji = TRICKY.index("😀")
    assert [tuple(o) for o in offsets].count((emoji, emoji + 1)) >= 1
    assert tiny_tokenizer.decode(enc["input_ids"]) == TRICKY


def test_reload_gives_identical_ids_offsets_and_hash(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert len(reloaded) == len(tiny_tokenizer)
        a = tiny_tokenizer(TRICKY, return_offsets_mapping=True)
        b = reloaded(TRICKY, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
        assert reloaded.pad_token_id == 1 and reloaded.eos_token_id == 0 and call_id(reloaded) == 2
        assert tokenizer_hash(reloaded) == tokenizer_hash(tiny_tokenizer)


def test_train_saves_to_out_dir_and_is_deterministic(embedded_docs, tmp_path):
    texts = [d["text"] for d in embedded_docs[:50]]
    tok = train_tokenizer(texts, vocab_size=400, out_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert len(tok) == 400
    again = train_tokenizer(texts, vocab_size=400)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    other = train_tokenizer(texts[:25], vocab_size=400)
    assert tokenizer_hash(other) != tokenizer_hash(tok)
    # A BPE learns words of its corpus: the text is shorter in tokens than in bytes.
    assert len(tok(texts[0])["input_ids"]) < 0.6 * len(texts[0].encode())


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.add_special_tokens([EOS_TOKEN])
    without_call = PreTrainedTokenizerFast(tokenizer_object=bare, unk_token=EOS_TOKEN)
    with pytest.raises(ValueError, match="no <CALL> token"):
        call_id(without_call)
