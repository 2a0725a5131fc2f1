"""Reference losses and judge labels: a real tiny Llama in a DIFFERENT tokenisation than ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lacy.labels.reference import JudgeLabeler, ReferenceScorer, align_losses, first_token_table

TEXT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889."


def _bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def _llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def byte_ref():
    """A reference whose tokens are single bytes: on ASCII text, reference token k is character k."""
    tok = _bpe(["x"], 256)
    return tok, _llama(len(tok))


@pytest.fixture(scope="module")
def word_ref(embedded_docs):
    """A reference with its own, larger BPE (1500 ids, other documents): its tokens often span ours."""
    tok = _bpe([d["text"] for d in embedded_docs[100:]], 1500)
    return tok, _llama(len(tok), seed=1)


def _our(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["offset_mapping"])


def _full_nll(model, ids: list[int]) -> np.ndarray:
    """Per-token NLL of `ids` from one explicit forward pass (token 0: NaN)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    nll = -logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return np.concatenate([[np.nan], nll.numpy()])


# ---------------------------------------------------------------------------------------------
# align_losses: hand-made offsets

def test_align_sums_reference_tokens_nested_in_ours():
    ours = [(0, 3), (3, 9), (9, 12)]
    ref = [(0, 2), (2, 3), (3, 5), (5, 9), (9, 10), (10, 12)]
    got = align_losses(np.array(ours), np.array(ref), np.array([np.nan, 0.5, 1.0, 2.0, 3.0, 4.0]))
    # Token 0 covers the context-less first reference token -> NaN; 1 + 2; 3 + 4.
    np.testing.assert_array_equal(got, np.array([np.nan, 3.0, 7.0], dtype=np.float32))
    assert got.dtype == np.float32


def test_align_splits_crossing_reference_tokens_by_characters():
    ours = [(0, 3), (3, 9), (9, 12)]
    ref = [(0, 2), (2, 6), (6, 12)]  # losses: -, 4 over 4 chars, 6 over 6 chars (1 per char each)
    got = align_losses(np.array(ours), np.array(ref), np.array([np.nan, 4.0, 6.0]))
    np.testing.assert_allclose(got, np.array([np.nan, 3 + 3, 3], dtype=np.float32))
    # A reference token spanning ours leaves each a share; a piece inside the first token is NaN.
    got = align_losses(np.array(ours), np.array([(0, 6), (6, 12)]), np.array([np.nan, 6.0]))
    np.testing.assert_allclose(got, np.array([np.nan, np.nan, 3.0], dtype=np.float32))
    # Characters no reference token covers (a tokeniser that trims spaces) carry no loss; a token
    # made only of them has no value.
    got = align_losses(np.array([(0, 3), (3, 4), (4, 8)]), np.array([(0, 3), (4, 8)]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(got, np.array([1.0, np.nan, 2.0], dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# ReferenceScorer

def test_byte_reference_losses_are_sums_of_character_losses(byte_ref, tiny_tokenizer):
    tok, model = byte_ref
    scorer = ReferenceScorer(model, tok)
    _, offsets = _our(tiny_tokenizer, TEXT)
    got = scorer.token_losses(TEXT, offsets)
    char_nll = _full_nll(model, tok(TEXT, add_special_tokens=False)["input_ids"])
    assert len(char_nll) == len(TEXT)
    # Our token [s, e) completes characters s..e-1 (reference token c ends at char c + 1).
    expected = np.array([char_nll[s:e].sum() for s, e in offsets], dtype=np.float32)
    assert np.isnan(got[0]) and np.isnan(expected[0])
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-5)


def test_alignment_conserves_reference_loss(word_ref, tiny_tokenizer):
    tok, model = word_ref
    scorer = ReferenceScorer(model, tok)
    _, offsets = _our(tiny_tokenizer, TEXT)
    enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ref_nll = _full_nll(model, enc["input_ids"])
    got = scorer.token_losses(TEXT, offsets)
    ref_off = np.asarray(enc["offset_mapping"])
    # NaN exactly on our tokens overlapping the context-less first reference token.
    first_end = ref_off[0, 1]
    np.testing.assert_array_equal(np.isnan(got), offsets[:, 0] < first_end)
    # Conservation: every reference loss lands on our tokens, except the characters of NaN tokens.
    nan_chars = {c for (s, e), v in zip(offsets, got, strict=True) if np.isnan(v) for c in range(s, e)}
    lost = sum(loss * len(nan_chars & set(range(s, e))) / (e - s)
               for (s, e), loss in zip(ref_off[1:], ref_nll[1:], strict=True))
    assert np.nansum(got) == pytest.approx(np.nansum(ref_nll) - lost, rel=1e-5)
    # The tokenisations really differ: some reference tokens cross our boundaries.
    assert not set(map(tuple, ref_off[:, 1:])) >= set(map(tuple, offsets[:, 1:]))


def test_sliding_windows_cover_long_texts_without_truncation(word_ref, tiny_tokenizer):
    tok, model = word_ref
    text = " ".join([TEXT] * 6)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    scorer = ReferenceScorer(model, tok, max_length=24, stride=8)
    windows = scorer.windows(len(ids))
    kept = [p for _, end, first in windows for p in range(first, end)]
    assert kept == list(range(len(ids)))  # every output exactly once
    assert all(first - start >= 24 - 8 for start, _, first in windows[1:])  # with 16 tokens of context
    ref = np.full(len(ids), np.nan)
    for start, end, first in windows:
        # Output j (kept here for j in [first, end)) predicts token j + 1; causal, so the window's
        # outputs are the same on ids[start:end + 1], whose last token is only a target.
        window_nll = _full_nll(model, ids[start:end + 1])
        ref[first + 1:end + 1] = window_nll[first + 1 - start:]
    _, offsets = _our(tiny_tokenizer, text)
    got = scorer.token_losses(text, offsets)
    enc_off = np.asarray(tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    np.testing.assert_allclose(got, align_losses(offsets, enc_off, ref), rtol=1e-5)
    assert np.isfinite(got[-10:]).any()  # the end of the text is scored


def test_batched_scoring_equals_one_by_one(word_ref, tiny_tokenizer):
    tok, model = word_ref
    scorer = ReferenceScorer(model, tok, max_length=32, stride=16, batch_size=4)
    texts = [TEXT, "Short one.", TEXT[::-1] + " " + TEXT]
    offsets = [_our(tiny_tokenizer, t)[1] for t in texts]
    batched = scorer.token_losses_batch(texts, offsets)
    for text, off, got in zip(texts, offsets, batched, strict=True):
        np.testing.assert_allclose(got, scorer.token_losses(text, off), rtol=1e-4, atol=1e-5)


def test_offsets_from_another_text_are_refused(word_ref):
    tok, model = word_ref
    with pytest.raises(ValueError, match="do not belong"):
        ReferenceScorer(model, tok).token_losses("short", np.array([(0, 3), (3, 40)]))


# ---------------------------------------------------------------------------------------------
# JudgeLabeler

def test_first_token_table(word_ref, tiny_tokenizer):
    tok, _ = word_ref
    table = first_token_table(tiny_tokenizer, tok)
    assert table.shape == (len(tiny_tokenizer),)
    the = tiny_tokenizer.convert_tokens_to_ids("Ġthe")
    assert table[the] == tok(" the", add_special_tokens=False)["input_ids"][0]
    for special in tiny_tokenizer.all_special_ids:
        assert table[special] == -1


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_accept_sets_match_the_judge_on_each_prefix(word_ref, tiny_tokenizer, margin):
    tok, model = word_ref
    top_k = 6
    judge = JudgeLabeler(model, tok, tiny_tokenizer, top_k=top_k, margin=margin)
    ids, offsets = _our(tiny_tokenizer, TEXT)
    got = judge.accept_sets(TEXT, offsets)
    assert got.shape == (len(ids), top_k) and got.dtype == np.int32
    np.testing.assert_array_equal(got, judge.accept_sets(TEXT, offsets, ids=ids))
    table = torch.from_numpy(first_token_table(tiny_tokenizer, tok))
    judge_enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    judge_ends = {e for _, e in judge_enc["offset_mapping"]}
    known = 0
    for i, (start, _) in enumerate(offsets):
        if start == 0 or start not in judge_ends:
            assert (got[i] == -1).all()  # no judge prefix ends where our token starts
            continue
        # Independent path: the judge on just the prefix, its last next-token distribution.
        prefix = tok(TEXT[:start], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1)
        scores = torch.where(table >= 0, logp[table.clamp(min=0)], -torch.inf)
        threshold = scores[ids[i]].item() - margin
        accepted = [int(v) for v in got[i] if v >= 0]
        assert all(scores[v].item() >= threshold - 1e-4 for v in accepted)
        n_above = int((scores >= threshold + 1e-4).sum())
        assert len(accepted) >= min(top_k, n_above)
        if accepted:
            assert scores[accepted[0]].item() == pytest.approx(scores.max().item(), abs=1e-4)
        known += 1
    assert known > len(ids) // 3


@pytest.mark.slow
def test_smollm2_as_reference_and_judge(tiny_tokenizer):
    from lacy.model import load_big_model

    model, tok = load_big_model("smollm2")
    _, offsets = _our(tiny_tokenizer, TEXT)
    losses = ReferenceScorer(model, tok).token_losses(TEXT, offsets)
    assert np.isfinite(losses[1:]).all()
    # A real LM finds this sentence far likelier than uniform over its 49,152 tokens (10.8 nats).
    assert np.nanmean(losses) < 6.0
    sets = JudgeLabeler(model, tok, tiny_tokenizer, top_k=8, margin=2.0).accept_sets(TEXT, offsets)
    assert ((sets >= 0).any(axis=1)).mean() > 0.5
