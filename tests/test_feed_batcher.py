"""Small-model steps of many sessions as one forward pass: same logits and caches as separate passes,
and concurrent cascades through a FeedBatcher write exactly what they write alone."""

import threading

import pytest
import torch

from lacy.cascade.batching import FeedBatcher, feed_many
from lacy.cascade.engine import Cascade
from lacy.cascade.lm import SmallLM
from lacy.core.config import CascadeConfig


def _lm(model, tok, text: str | None = None) -> SmallLM:
    lm = SmallLM(model, tok)
    if text is not None:
        lm.sync_text(text)
    return lm


def test_feed_many_equals_separate_passes(tiny_model, tiny_tokenizer):
    texts = ["Marie Curie was", "The river", "", "Paris is the capital of France and"]
    suffixes = [" a Polish physicist", " flows", " Albert", " the"]
    alone, batched = [], []
    for text in texts:
        alone.append(_lm(tiny_model, tiny_tokenizer, text))
        batched.append(_lm(tiny_model, tiny_tokenizer, text))
    new = [tiny_tokenizer(s, add_special_tokens=False)["input_ids"] for s in suffixes]
    assert len({len(n) for n in new}) > 1, "suffixes of different lengths exercise the re-fed tokens"
    for lm, ids in zip(alone, new, strict=True):
        lm.forward(ids)
    feed_many(batched, new)
    for a, b in zip(alone, batched, strict=True):
        assert a.ids == b.ids
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        # The next step from the batched cache matches too: the cache holds exactly the session.
        assert b.cache.get_seq_length() == len(b.ids)
        a.forward([5])
        b.forward([5])
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)


def test_feed_many_runs_a_too_short_session_alone(tiny_model, tiny_tokenizer):
    fresh = SmallLM(tiny_model, tiny_tokenizer)  # nothing cached yet
    long_ids = tiny_tokenizer(" one two three four five", add_special_tokens=False)["input_ids"]
    other = _lm(tiny_model, tiny_tokenizer, "Some text")
    feed_many([fresh, other], [[fresh.start_id], long_ids])
    ref = _lm(tiny_model, tiny_tokenizer, "")
    torch.testing.assert_close(fresh.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert other.ids[-len(long_ids):] == long_ids
    with pytest.raises(ValueError, match="2 sessions but 1"):
        feed_many([fresh, other], [[1]])


def test_concurrent_cascades_through_the_batcher_equal_alone(tiny_model, tiny_tokenizer):
    cfg = CascadeConfig(max_new_tokens=12, call_rate=None, call_threshold=None)
    prompts = ["Marie Curie (", "The capital of", "Albert Einstein was born in", "In 1905,", "She", "A river"]
    alone = [Cascade(SmallLM(tiny_model, tiny_tokenizer), None, cfg).generate(p, allow_calls=False).text
             for p in prompts]
    batcher = FeedBatcher(max_batch=4, max_wait_s=0.05)
    out: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))

    def decode(i: int) -> None:
        small = SmallLM(tiny_model, tiny_tokenizer)
        small.feeder = batcher
        barrier.wait()
        with batcher.session():
            out[i] = Cascade(small, None, cfg).generate(prompts[i], allow_calls=False).text

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [out.get(i) for i in range(len(prompts))] == alone
    assert batcher.steps > batcher.batches, "no two steps ever shared a pass"
    assert batcher.steps / batcher.batches <= 4
    assert batcher.active == 0


def test_a_failing_session_does_not_fail_its_batch(tiny_model, tiny_tokenizer):
    batcher = FeedBatcher(max_batch=8, max_wait_s=0.5)
    good, bad = _lm(tiny_model, tiny_tokenizer, "Hello"), _lm(tiny_model, tiny_tokenizer, "World")
    errors: dict[str, BaseException] = {}

    def step(name: str, lm: SmallLM, ids: list[int]) -> None:
        try:
            batcher.feed(lm, ids)
        except Exception as err:  # recorded for the assertions below
            errors[name] = err

    vocab = tiny_model.config.vocab_size
    threads = [threading.Thread(target=step, args=("good", good, [7])),
               threading.Thread(target=step, args=("bad", bad, [vocab + 100]))]  # an id past the vocabulary
    with batcher.session(), batcher.session():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert "good" not in errors and good.ids[-1] == 7
    assert isinstance(errors.get("bad"), IndexError)
