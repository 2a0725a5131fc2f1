"""Batched big-model continuation equals one-at-a-time `continue_text`, and keeps per-session caches."""

import pytest

from lacy.cascade.hf_big import BigLM, continue_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lacy.model import load_big_model

    return load_big_model("smollm2")


def test_batched_equals_sequential_and_reuses_caches(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is", "Albert Einstein was born in the year", "Water boils at"]
    contexts = ["", "Einstein was born in Ulm in 1879.\n", ""]
    sequential = []
    for text, context in zip(texts, contexts, strict=True):
        lm = BigLM(model, tok)
        sequential.append((lm.continue_text(text, unit="word", max_tokens=8, context=context),
                           lm.continue_text(text + " and", unit="tokens", max_tokens=4, context=context)))
    lms = [BigLM(model, tok) for _ in texts]
    first = continue_batch(lms, texts, units=["word"] * 3, max_tokens=[8] * 3, contexts=contexts)
    processed = [lm.tokens_processed for lm in lms]
    second = continue_batch(lms, [t + " and" for t in texts], units=["tokens"] * 3, max_tokens=[4] * 3,
                            contexts=contexts)
    assert list(zip(first, second, strict=True)) == sequential
    assert "Paris" in first[0] and "1879" in first[1]
    # The second call re-encodes only " and" (1 token) and feeds the 4 new tokens per session.
    assert [lm.tokens_processed - p for lm, p in zip(lms, processed, strict=True)] == [5, 5, 5]


def test_mixed_units_and_early_stops(smollm2):
    model, tok = smollm2
    lms = [BigLM(model, tok) for _ in range(2)]
    out = continue_batch(lms, ["The capital of France is", "One, two, three,"], units=["word", "tokens"],
                         max_tokens=[8, 6])
    ref = [BigLM(model, tok).continue_text("The capital of France is", unit="word", max_tokens=8),
           BigLM(model, tok).continue_text("One, two, three,", unit="tokens", max_tokens=6)]
    assert out == ref


def test_rejects_bad_batches(smollm2):
    model, tok = smollm2
    lm = BigLM(model, tok)
    with pytest.raises(ValueError, match="twice"):
        continue_batch([lm, lm], ["a", "b"], units=["word"] * 2, max_tokens=[2, 2])
    with pytest.raises(ValueError, match="unit"):
        continue_batch([lm], ["a"], units=["sentence"], max_tokens=[2])


def test_slab_layer_behaves_as_a_dynamic_layer():
    import torch
    from transformers.cache_utils import DynamicLayer

    from lacy.cascade.batching import SlabLayer

    torch.manual_seed(0)
    first = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    slab, ref = SlabLayer(*(torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in first), length=4), DynamicLayer()
    ref.update(*first)
    for n in (1, 3, 6):  # the first fits the slab, then it doubles, then it grows to what is asked
        new = torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 5)
        assert all(torch.equal(a, b) for a, b in zip(slab.update(*new), ref.update(*new), strict=True))
    slab.crop(-2), ref.crop(-2)
    slab.batch_select_indices(torch.tensor([1])), ref.batch_select_indices(torch.tensor([1]))
    assert slab.get_seq_length() == ref.get_seq_length() == 12
    assert torch.equal(slab.keys, ref.keys) and torch.equal(slab.values, ref.values)
    with pytest.raises(ValueError, match="negative"):
        slab.crop(2)


def test_batched_decoding_writes_each_step_in_place(smollm2, monkeypatch):
    """A decode step writes its keys/values into the batch's slab: it never concatenates a layer's whole
    cache (DynamicLayer.update, a copy per layer and step: ≈10 % of a batched decode on a CPU)."""
    from transformers.cache_utils import DynamicLayer

    from lacy.cascade.batching import sync_many

    model, tok = smollm2
    texts = ["The capital of France is", "One, two, three,", "Water boils at"]
    lms = [BigLM(model, tok) for _ in texts]
    sync_many(lms, [lm.encode(text) for lm, text in zip(lms, texts, strict=True)])  # the prefill, before counting
    concatenations, update = [], DynamicLayer.update
    monkeypatch.setattr(DynamicLayer, "update", lambda self, *a, **k: concatenations.append(1) or update(self, *a, **k))
    stats = {}
    outs = continue_batch(lms, texts, units=["tokens"] * 3, max_tokens=[6] * 3, stats=stats)
    assert not concatenations  # was 2 x layers per step
    assert stats["decode_steps"] == 6 and stats["prefill_tokens"] == 0
    assert outs == [BigLM(model, tok).continue_text(t, unit="tokens", max_tokens=6) for t in texts]


def test_a_new_session_starts_from_its_contexts_kept_cache(smollm2):
    """A context read once (a person's passages) is not read again by the next session that brings it: that
    session reads only its text, and answers as a session that read everything."""
    from lacy.cascade.big import BigCall
    from lacy.cascade.hf_big import HFBig

    model, tok = smollm2
    context = "Einstein: Albert Einstein. Birth date: March 14, 1879. Birth city: Ulm.\n\n"
    texts = ["Albert Einstein was born in the city of", "Albert Einstein was born on March"]
    cold = [BigLM(model, tok).continue_text(t, unit="word", max_tokens=8, context=context) for t in texts]
    big = HFBig(model, tok, max_prefixes=2)
    first = big.continue_batch([BigCall("a", texts[0], context=context), BigCall("b", "Water boils at")])[0]
    assert not big.stats.get("prefix_hits") and list(big.prefixes) == [context]  # no context, nothing kept
    second = big.continue_batch([BigCall("c", texts[1], context=context)])[0]
    assert [first.text, second.text] == cold and "Ulm" in first.text
    context_tokens = len(big.prefixes[context][0])
    assert big.stats["prefix_hits"] == 1 and big.stats["prefix_tokens"] == context_tokens > 15
    assert second.processed == len(BigLM(model, tok).encode(context + texts[1])) - context_tokens + second.generated
    for i in range(3):  # the least recently used context goes past max_prefixes
        big.continue_batch([BigCall(f"d{i}", "Ulm is a city", context=f"Context {i}.\n\n")])
    assert list(big.prefixes) == ["Context 1.\n\n", "Context 2.\n\n"]
    assert not HFBig(model, tok).max_prefixes  # off unless asked for (`big.prefix_cache` in a config)


def test_a_pass_puts_only_its_last_position_through_the_output_head(smollm2):
    """Only the next-token distribution is ever read: a prefill pass of n tokens computes one row of logits
    per session, not n (the output head is a fifth of SmolLM2-135M's weights)."""
    import torch

    from lacy.cascade.batching import sync_many

    model, tok = smollm2
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        lms = [BigLM(model, tok) for _ in range(2)]
        texts = ["The capital of France is", "The capital of Spain is"]
        sync_many(lms, [lm.encode(t) for lm, t in zip(lms, texts, strict=True)])
        alone = BigLM(model, tok)
        alone.sync(alone.encode(texts[0]))
    finally:
        hook.remove()
    assert [s[:2] for s in shapes] == [(2, 1), (1, 1)]
    assert torch.allclose(lms[0].logits, alone.logits, atol=1e-4)
