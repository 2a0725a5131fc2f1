"""Cascade engine: scripted models of fixed logits (exact counts), real tiny GPT-2s, SmolLM2 (slow).

The scripted model is a real torch module behind the Hugging Face interface. It keeps the token ids
themselves as the keys of a real `DynamicCache` and computes its logits from the whole prefix read back
from that cache, so a wrong crop or a wrongly fed suffix changes what it predicts.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lacy.cascade.big import BigModelError, BigSession
from lacy.cascade.engine import Cascade, CascadeResult, Span, _choose, _word_start
from lacy.cascade.hf_big import BigLM, HFBig
from lacy.cascade.lm import SmallLM
from lacy.cascade.policy import Quantiles, RunningQuantile, calibrate, closed_loop_threshold, decision_scores, log_odds
from lacy.core.config import CascadeConfig, ConfigError
from lacy.corpus.tokenizer import CALL_TOKEN, EOS_TOKEN, PAD_TOKEN

# ----------------------------------------------------------------------------------------------
# A word-level tokenizer (one token per word with its leading space) and scripted models

WORDS = ("The capital of France is Paris . It has 2 million people Ada Lovelace ( born 1815 ) "
         "la di da was in").split()
SPLIT = Regex(r" ?[A-Za-z0-9]+| ?[^A-Za-z0-9\s]|\s")


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, CALL_TOKEN: 2}
    for word in WORDS:
        for form in (word, " " + word):
            vocab.setdefault(form, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(SPLIT, behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[CALL_TOKEN])


TOK = word_tokenizer()
CALL = TOK.convert_tokens_to_ids(CALL_TOKEN)


class ScriptedLM(torch.nn.Module):
    """Logits [V] = next_logits(prefix ids, start token included) at every position; batched like a
    Hugging Face model (a left-padded cache and an attention mask over it: `lacy.cascade.hf_big`)."""

    def __init__(self, next_logits: Callable[[list[int]], torch.Tensor], n_positions: int = 512) -> None:
        super().__init__()
        self.next_logits = next_logits
        self.config = SimpleNamespace(n_positions=n_positions)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        cache = past_key_values if past_key_values is not None else DynamicCache()
        new = input_ids.float()[:, None, :, None]  # the ids themselves are the cache: [B, 1, T, 1]
        keys, _ = cache.update(new, new, 0)
        steps, rows = input_ids.shape[1], []
        for row in range(input_ids.shape[0]):
            seq = keys[row].view(-1)
            if attention_mask is not None:
                seq = seq[attention_mask[row, -len(seq):].bool()]
            prefix = seq.long().tolist()
            first = len(prefix) - steps
            rows.append(torch.stack([self.next_logits(prefix[:max(1, first + i + 1)]) for i in range(steps)]))
        return SimpleNamespace(logits=torch.stack(rows), past_key_values=cache)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


STORY = "The capital of France is Paris. It has 2 million people."
STORY_LOGIT = 10.0


def story_model(story: str, call_logits: dict[int, float] | None = None) -> ScriptedLM:
    """Follows `story`: after its first k tokens it predicts token k (logit 10), with <CALL> at
    `call_logits.get(k, -10)`; off the story or at its end it predicts EOS."""
    story_ids, calls = ids(story), call_logits or {}

    def next_logits(prefix: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(TOK))
        text = prefix[1:]
        k = len(text)
        if k < len(story_ids) and text == story_ids[:k]:
            logits[story_ids[k]] = STORY_LOGIT
            logits[CALL] = calls.get(k, -10.0)
        else:
            logits[TOK.eos_token_id] = STORY_LOGIT
        return logits

    return ScriptedLM(next_logits)


def p_call_of(call_logit: float) -> float:
    """P(<CALL>) of a story_model position: story token at 10, <CALL> at c, the other V-2 ids at 0."""
    return math.exp(call_logit) / (math.exp(call_logit) + math.exp(STORY_LOGIT) + len(TOK) - 2)


def hf_session(model, tok=TOK) -> BigSession:
    """One request's view of a local HF big model (what Serve and the evaluation give a cascade)."""
    return BigSession(HFBig(model, tok))


def session_lm(session: BigSession) -> BigLM:
    """The HF backend's model state of that request."""
    return session.big.sessions[session.id]


class FailingBig:
    """A big model that breaks: raises, or returns something that is not text."""

    tokens_processed = tokens_generated = 0

    def __init__(self, returns: object = None) -> None:
        self.returns = returns

    def continue_text(self, text: str, **kwargs) -> str:
        if self.returns is None:
            raise RuntimeError("backend down")
        return self.returns  # type: ignore[return-value]


def cascade_of(small_model, big_model, **cfg) -> Cascade:
    big = None if big_model is None else hf_session(big_model)
    return Cascade(SmallLM(small_model, TOK), big, CascadeConfig(**cfg))


# ----------------------------------------------------------------------------------------------
# RunningQuantile


def test_running_quantile_matches_numpy_and_holds_rate():
    rng = np.random.default_rng(0)
    values = rng.random(3000)
    rq = RunningQuantile(0.2, warmup=10, initial=0.5, window=10_000)
    fired = [rq.observe(float(v)) for v in values]
    for q in (0.0, 0.25, 0.8, 1.0):
        assert rq.quantile(q) == pytest.approx(np.quantile(values, q))
    # Warm-up decides against the initial threshold 0.5, then the running 0.8-quantile takes over.
    assert fired[:10] == [bool(v > 0.5) for v in values[:10]]
    assert np.mean(fired[100:]) == pytest.approx(0.2, abs=0.03)


def test_running_quantile_window_and_extremes():
    rq = RunningQuantile(0.5, warmup=0, window=5)
    for v in [9.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0]:
        rq.observe(v)
    assert rq.quantile(0.5) == 3.0  # median of the last five (1..5): 9 and 8 left the window
    assert rq.threshold() == 3.0
    never, always = RunningQuantile(0.0, warmup=0), RunningQuantile(1.0, warmup=0)
    assert not any(never.observe(v) for v in (0.1, 0.9, 1.0))
    assert all(always.observe(v) for v in (0.0, 0.1, 0.9))
    with pytest.raises(ValueError, match="rate"):
        RunningQuantile(1.5)


# ----------------------------------------------------------------------------------------------
# Engine on scripted models


def test_calls_fire_at_threshold_with_exact_provenance_and_linear_kv_counts():
    # Story tokens: The | capital of France is (prompt, 5) | Paris . It has 2 million people .
    # <CALL> is likely before " Paris" (k=5) and " 2" (k=9).
    small = story_model(STORY, {5: 12.0, 9: 12.0})
    cascade = cascade_of(small, story_model(STORY), call_threshold=0.5, max_new_tokens=20)
    result = cascade.generate("The capital of France is")
    assert result.text == STORY
    assert [(s.text, s.source) for s in result.spans] == [
        ("The capital of France is", "prompt"), (" Paris", "big"), (". It has", "small"),
        (" 2", "big"), (" million people.", "small")]
    assert "".join(s.text for s in result.spans) == result.text
    assert result.calls == 2 and result.big_tokens == 2 and result.small_tokens == 6
    # Word starts: Paris, It, has, 2, million, people ("." and the final EOS are not).
    assert result.decision_points == 6 and result.call_rate == pytest.approx(2 / 6)
    assert result.stop_reason == "eos"
    # Every token of the final text goes through each model at most once (+1 start token):
    # small: 6 (start + prompt) + 1 (" Paris" after the call) + 3 (". It has") + 1 (" 2") + 3 = 14.
    # big: 6 (start + prompt) + 1 (" Paris", fed to see that "." ends the word) + 3 (". It has")
    #      + 1 (" 2") = 11; it never re-reads the prompt.
    assert result.tokens_processed == {"small": 14, "big": 11}
    assert set(result.timings) == {"small", "big"} and all(t >= 0 for t in result.timings.values())


def test_many_calls_cost_linear_tokens_not_quadratic():
    words = " ".join(["Paris", "la", "di", "da"] * 6)
    story = "The capital " + words
    n_prompt, n_words = 2, 24
    small = story_model(story, {k: 12.0 for k in range(n_prompt, n_prompt + n_words)})
    cascade = cascade_of(small, story_model(story), call_threshold=0.5, max_new_tokens=100,
                         no_repeat_ngram=0)
    result = cascade.generate("The capital")
    assert result.text == story and result.calls == n_words and result.small_tokens == 0
    # Re-encoding the text at each call would cost sum(prompt+k) = 348 tokens per model.
    total = 1 + n_prompt + n_words
    assert result.tokens_processed == {"small": total, "big": total}


def test_word_start_only_rule():
    assert _word_start("", "The") and _word_start("Ada (", "born") and _word_start("x\n", "Paris")
    assert _word_start("Paris", " is") and not _word_start("Paris", ".") and not _word_start("Par", "is")
    story = "Ada Lovelace (born 1815)."
    # Tokens after the prompt "Ada Lovelace": " (" (k=2), "born", " 1815", ")", "." (k=6).
    # <CALL> is likely at k=3..6; " (" and " 1815" start with a space, "born" follows the opener
    # "(", while ")" and "." continue a word, so no call may fire there.
    calls = {k: 12.0 for k in range(3, 7)}
    on = cascade_of(story_model(story, calls), story_model(story), call_threshold=0.5).generate(
        "Ada Lovelace")
    assert [(s.text, s.source) for s in on.spans] == [
        ("Ada Lovelace", "prompt"), (" (", "small"), ("born 1815", "big"), (").", "small")]
    assert on.calls == 2 and on.decision_points == 3
    off = cascade_of(story_model(story, calls), story_model(story), call_threshold=0.5,
                     word_start_only=False, big_unit="tokens", big_max_tokens=1).generate("Ada Lovelace")
    # Every step is a decision point now, the final one that writes EOS included.
    assert off.calls == 4 and off.decision_points == 6 and off.small_tokens == 1 and off.text == story


def test_threshold_and_rate_policies():
    logits = {5: 3.0, 7: 6.0, 8: 10.0, 9: 12.0}  # at " Paris", " It", " has", " 2"
    probs = {k: p_call_of(c) for k, c in logits.items()}
    assert probs[5] < probs[7] < 0.3 < probs[8] < probs[9]
    cascade = cascade_of(story_model(STORY, logits), story_model(STORY), call_threshold=None,
                         call_rate=None)
    result = cascade.generate("The capital of France is", call_threshold=0.3)
    assert result.calls == 2  # " has" and " 2"
    assert [s.source for s in result.spans] == ["prompt", "small", "big", "small"]
    # Scores are log-odds of P(<CALL>).
    assert result.call_scores[:4] == pytest.approx([log_odds(probs[k]) for k in (5, 7, 8, 9)], rel=1e-5)
    assert cascade.generate("The capital of France is", call_threshold=1.0).calls == 0
    assert cascade.generate("The capital of France is", call_rate=1.0).calls == 6
    # Cascades given one Quantiles (Serve: one per request) share the running quantile of their trigger.
    shared = Quantiles()
    for _ in range(2):
        Cascade(SmallLM(story_model(STORY, logits), TOK), hf_session(story_model(STORY)), CascadeConfig(),
                quantiles=shared).generate("The capital of France is", call_rate=0.5)
    assert len(shared) == 1 and shared.get(0.5, ("p_call",)).seen == 2 * 6  # six decision points per run
    with pytest.raises(ValueError, match="not several"):
        cascade.generate("The", call_threshold=0.5, call_rate=0.2)
    with pytest.raises(ValueError, match="not several"):
        cascade.generate("The", call_threshold=0.5, call_log_odds=0.0)
    with pytest.raises(ValueError, match="no call policy"):
        cascade.generate("The")


def test_calls_disabled_never_calls_and_masks_call():
    small = story_model(STORY, {k: 30.0 for k in range(13)})  # <CALL> is the argmax everywhere
    cascade = Cascade(SmallLM(small, TOK), FailingBig(), CascadeConfig(call_threshold=0.0))
    result = cascade.generate("The capital of France is", allow_calls=False)
    assert result.calls == 0 and result.decision_points == 0 and result.text == STORY
    assert len(result.call_scores) == 6 and min(result.call_scores) > log_odds(0.99)  # still recorded
    assert cascade.small.next_logits(allow_call=False)[CALL] == float("-inf")
    with pytest.raises(BigModelError, match="backend down"):
        cascade.generate("The capital of France is")
    with pytest.raises(BigModelError, match="expected str"):
        Cascade(SmallLM(small, TOK), FailingBig(returns=3), CascadeConfig(call_threshold=0.0)).generate(
            "The capital of France is")


def test_no_repeat_ngram_blocks_generated_repeats_but_copies_prompt():
    prefs = {" la": 5.0, " di": 4.0, " da": 3.0}

    def fixed(prefix: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(TOK))
        for word, value in prefs.items():
            logits[ids(word)[0]] = value
        return logits

    def run(n: int) -> str:
        cascade = cascade_of(ScriptedLM(fixed), None, no_repeat_ngram=n, max_new_tokens=6)
        return cascade.generate("la la", allow_calls=False).text

    # n=2: the prompt's bigram (la, la) is not blocked; generated bigrams never repeat.
    assert run(2) == "la la" + " la la di la da la"
    assert run(0) == "la la" + " la" * 6


def test_generate_stream_yields_spans_then_result():
    cascade = cascade_of(story_model(STORY, {5: 12.0}), story_model(STORY), call_threshold=0.5)
    spans = list(cascade.generate_stream("The capital of France is"))
    assert [s.source for s in spans[:3]] == ["prompt", "big", "small"]
    assert all(s.source == "small" for s in spans[2:]) and len(spans) == 9  # one span per small token
    assert isinstance(cascade.result, CascadeResult)
    assert "".join(s.text for s in spans) == cascade.result.text == STORY


def test_big_units_and_max_tokens():
    text = "Ada Lovelace was born in Paris France 1815 la di da"
    big = BigLM(story_model(text), TOK)
    assert big.continue_text("Ada", unit="word") == " Lovelace"
    assert big.continue_text("Ada Lovelace was born in", unit="entity") == " Paris France 1815"
    assert big.continue_text("Ada Lovelace was born in", unit="entity", max_tokens=2) == " Paris France"
    assert big.continue_text("Ada", unit="tokens", max_tokens=3) == " Lovelace was born"
    assert big.continue_text("was born in", unit="word", context="Ada Lovelace ") == " Paris"
    assert big.continue_text(text, unit="word") == ""  # EOS at once
    before = big.tokens_processed
    # A prefix of the cached text: crop, re-feed " in" for its logits, feed " Paris" to see that
    # " France" starts a new word -- two tokens, not the whole text again.
    assert big.continue_text("Ada Lovelace was born in", unit="word") == " Paris"
    assert big.tokens_processed - before == 2
    with pytest.raises(ValueError, match="unit"):
        big.continue_text("Ada", unit="sentence")


def test_context_overflow_is_a_clear_error_or_a_clean_stop():
    small = ScriptedLM(story_model(STORY).next_logits, n_positions=8)
    cascade = cascade_of(small, None, max_new_tokens=50)
    with pytest.raises(ValueError, match="context of 8"):
        cascade.generate(STORY, allow_calls=False)
    result = cascade.generate("The capital of France is", allow_calls=False)
    # Start + 5 prompt tokens leave room for two more in a context of 8.
    assert result.stop_reason == "context" and result.text == "The capital of France is Paris."
    # Big-model words that overflow the small model's context end the generation, text kept.
    cascade = Cascade(SmallLM(ScriptedLM(story_model(STORY, {5: 12.0}).next_logits, n_positions=8), TOK),
                      hf_session(story_model(STORY)),
                      CascadeConfig(call_threshold=0.5, big_unit="tokens", big_max_tokens=3))
    result = cascade.generate("The capital of France is")
    assert result.stop_reason == "context" and result.text == "The capital of France is Paris. It"
    assert result.spans[-1] == Span(" Paris. It", "big")


def test_a_sure_model_calibrates_on_log_odds_where_its_probabilities_tie_at_one():
    """At every decision point P(<CALL>) rounds to exactly 1.0 (logits 30..55 against the story token at
    10), as a long-trained model's does: a probability threshold cannot split those ties (a quantile
    threshold of 1.0 never fires), the log-odds keep their order and the target rate holds."""
    logits = {5: 30.0, 7: 35.0, 8: 40.0, 9: 45.0, 10: 50.0, 11: 55.0}  # Paris, It, has, 2, million, people
    cascade = cascade_of(story_model(STORY, logits), story_model(STORY), call_threshold=None, call_rate=None)
    prompt = "The capital of France is"
    cascade.small.sync_text(prompt + " Paris. It")
    assert float(torch.softmax(cascade.small.logits, dim=-1)[CALL]) == 1.0  # the tie the old scores had
    scores = cascade.generate(prompt, allow_calls=False).call_scores
    assert len(set(scores)) == 6 and scores == sorted(scores)  # distinct, in the logits' order
    threshold = calibrate(cascade, [prompt], 0.5)
    result = cascade.generate(prompt, call_log_odds=threshold)
    assert result.calls == 3 and result.decision_points == 6  # " 2", " million", " people"
    assert [s.text for s in result.spans if s.source == "big"] == [" 2 million people"]

    def realised(bound: float) -> float:
        out = cascade.generate(prompt, call_log_odds=bound)
        return out.calls / out.decision_points

    closed = closed_loop_threshold(np.asarray(scores), 1 / 3, realised, rounds=4, tolerance=0.01)
    assert closed.realised_rate == pytest.approx(1 / 3) and 35 < closed.threshold < 40  # log-odds, past float32
    # A probability threshold means what it meant: compared as its log-odds.
    assert cascade.generate(prompt, call_threshold=0.5).calls == 6
    assert cascade.generate(prompt, call_threshold=1.0).calls == 0


def test_calibrate_returns_quantile_for_target_rate():
    logits = {5: 3.0, 7: 6.0, 8: 9.0, 9: 12.0}
    cascade = cascade_of(story_model(STORY, logits), None)
    probs = sorted(cascade.generate("The capital of France is", allow_calls=False).call_scores)
    threshold = calibrate(cascade, ["The capital of France is"], 0.5)
    assert threshold == pytest.approx(float(np.quantile(probs, 0.5)))
    assert sum(p > threshold for p in probs) == 3  # half of the six decision points
    with pytest.raises(ValueError, match="target_rate"):
        calibrate(cascade, ["The"], 1.5)


def test_closed_loop_calibration_holds_the_rate_that_calls_begetting_calls_overshoot():
    """A small model that writes "la di da ..." and grows more unsure after a " Paris", which only the
    big model writes: with calls off its scores set a threshold for 20 %, with calls on
    that threshold calls far more often; closed-loop rounds find one that realises the target."""
    cycle, paris = ids(" la di da"), ids(" Paris")[0]

    def next_logits(prefix: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(TOK))
        k = len(prefix) - 1
        logits[cycle[k % 3]] = STORY_LOGIT
        # Unsure at positions spread over 30 levels, and very unsure right after one " Paris": each call
        # begets one more (a chain of two, as a model confused by the big model's words).
        logits[CALL] = -4.0 + (k * 7 % 30) * 0.3 + 12.0 * (prefix[-1] == paris and prefix[-2] != paris)
        return logits

    big_logits = torch.zeros(len(TOK))
    big_logits[paris] = STORY_LOGIT
    cascade = cascade_of(ScriptedLM(next_logits), ScriptedLM(lambda prefix: big_logits), max_new_tokens=40,
                         big_unit="tokens", big_max_tokens=1)
    prompts = ["The", "It has"]

    def realised(threshold: float) -> float:
        outs = [cascade.generate(p, call_log_odds=threshold) for p in prompts]
        return sum(o.calls for o in outs) / sum(o.decision_points for o in outs)

    scores = decision_scores(cascade, prompts)
    assert calibrate(cascade, prompts, 0.2) == pytest.approx(float(np.quantile(scores, 0.8)))
    open_loop = closed_loop_threshold(scores, 0.2, realised, rounds=0)
    assert open_loop.realised_rate is None and open_loop.threshold == pytest.approx(float(np.quantile(scores, 0.8)))
    assert realised(open_loop.threshold) > 0.4  # the open-loop threshold more than doubles the rate
    closed = closed_loop_threshold(scores, 0.2, realised, rounds=8, tolerance=0.03)
    assert closed.open_loop_rate == pytest.approx(realised(open_loop.threshold))
    assert abs(closed.realised_rate - 0.2) <= 0.03 and 1 < closed.rounds <= 8
    assert realised(closed.threshold) == closed.realised_rate  # what it reports is what the threshold does
    with pytest.raises(ValueError, match="target_rate"):
        closed_loop_threshold(scores, 0.0, realised, rounds=1)


def test_quantiles_are_bounded_and_thread_safe():
    bank = Quantiles(max_keys=3, warmup=0, window=8)
    for rate in (0.1, 0.2, 0.3, 0.4, 0.5):
        bank.observe(rate, 0.5)
    assert len(bank) == 3 and bank.get(0.1) is None and bank.get(0.5) is not None  # LRU: oldest gone
    assert bank.get(0.5, ("confidence",)) is None  # another scope is another quantile
    # Many threads on one quantile: its window and sorted copy stay consistent (unlocked, they drift).
    rng = np.random.default_rng(0)
    values = rng.random((8, 4000)).tolist()

    def hammer(row: list[float]) -> None:
        for v in row:
            bank.observe(0.5, v)

    threads = [threading.Thread(target=hammer, args=(row,)) for row in values]
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(0.005)
    rq = bank.get(0.5)
    assert rq.seen == 1 + 8 * 4000
    assert len(rq._recent) == len(rq._sorted) == 8 and rq._sorted == sorted(rq._recent)


def unsure_model(story: str, unsure: dict[int, float]) -> ScriptedLM:
    """Like story_model, but at positions k in `unsure` the story token's logit is unsure[k] (flat:
    the model is not confident); <CALL> is never likely."""
    story_ids = ids(story)

    def next_logits(prefix: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(TOK))
        k = len(prefix) - 1
        if k < len(story_ids) and prefix[1:] == story_ids[:k]:
            logits[story_ids[k]] = unsure.get(k, STORY_LOGIT)
            logits[CALL] = -10.0
        else:
            logits[TOK.eos_token_id] = STORY_LOGIT
        return logits

    return ScriptedLM(next_logits)


def test_confidence_trigger_calls_where_the_model_is_unsure():
    # Unsure before " Paris" (k=5) and " 2" (k=9); P(<CALL>) is tiny everywhere.
    small = unsure_model(STORY, {5: 3.0, 9: 3.0})
    cascade = cascade_of(small, story_model(STORY), call_threshold=0.5, max_new_tokens=20)
    assert cascade.generate("The capital of France is").calls == 0  # p_call, the default trigger
    result = cascade.generate("The capital of France is", trigger="confidence")
    assert [(s.text, s.source) for s in result.spans] == [
        ("The capital of France is", "prompt"), (" Paris", "big"), (". It has", "small"),
        (" 2", "big"), (" million people.", "small")]
    # The recorded scores are the log-odds of 1 - max real-token probability (softmax without <CALL>:
    # V - 1 ids, the top one at `top`, the others at 0).
    real = len(TOK) - 1

    def unsure_score(top: float) -> float:
        return log_odds(1 - math.exp(top) / (math.exp(top) + real - 1))

    assert result.call_scores[0] == pytest.approx(unsure_score(3.0), rel=1e-6)
    assert result.call_scores[1] == pytest.approx(unsure_score(STORY_LOGIT), rel=1e-6)
    # The trigger from the config, and calibrate on the same scores.
    cfg_cascade = cascade_of(small, story_model(STORY), call_threshold=0.5, trigger="confidence")
    assert cfg_cascade.generate("The capital of France is").calls == 2
    probs = cascade.generate("The capital of France is", allow_calls=False, trigger="confidence").call_scores
    threshold = calibrate(cascade, ["The capital of France is"], 2 / 6, trigger="confidence")
    assert threshold == pytest.approx(float(np.quantile(probs, 1 - 2 / 6)))
    assert sum(p > threshold for p in probs) == 2
    # Running quantiles are kept per trigger: confidence scores never move the p_call quantile.
    cascade.generate("The capital of France is", call_rate=0.3, trigger="confidence")
    assert cascade.quantiles.get(0.3, ("confidence",)).seen == 6 and cascade.quantiles.get(0.3) is None
    with pytest.raises(ValueError, match="unknown call trigger"):
        cascade.generate("The", trigger="entropy", call_threshold=0.5)
    with pytest.raises(ConfigError, match="cascade.trigger"):
        CascadeConfig(trigger="entropy")


def test_a_configured_log_odds_threshold_is_the_deployment_policy():
    logits = {5: 3.0, 7: 6.0, 8: 10.0, 9: 12.0}  # at " Paris", " It", " has", " 2"
    bound = log_odds(0.3)  # the same threshold as call_threshold 0.3: " has" and " 2" call
    cascade = cascade_of(story_model(STORY, logits), story_model(STORY), call_log_odds=bound)
    assert cascade.generate("The capital of France is").calls == 2
    with pytest.raises(ConfigError, match="not both"):
        CascadeConfig(call_threshold=0.3, call_log_odds=bound)
    with pytest.raises(ConfigError, match="cascade.call_log_odds"):
        CascadeConfig(call_log_odds=float("nan"))


def test_sampling_is_seeded_and_top_p_narrows_to_greedy():
    prefs = {" la": 1.0, " di": 0.9, " da": 0.8}

    def flat(prefix: list[int]) -> torch.Tensor:
        logits = torch.full((len(TOK),), -30.0)
        for word, value in prefs.items():
            logits[ids(word)[0]] = value
        return logits

    def run(**kw) -> str:
        return cascade_of(ScriptedLM(flat), None, no_repeat_ngram=0, max_new_tokens=12).generate(
            "la", allow_calls=False, **kw).text

    assert run() == "la" + " la" * 12  # temperature 0: greedy
    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    samples = {run(temperature=1.0, seed=s) for s in range(4)}
    assert len(samples) > 1 and all(set(t.split()) <= {"la", "di", "da"} for t in samples)
    assert run(temperature=1.0, top_p=0.2, seed=5) == run()  # the nucleus holds " la" alone
    with pytest.raises(ValueError, match="top_p"):
        run(temperature=1.0, top_p=0.0)


class CountingBig(BigSession):
    calls = 0

    def continue_text(self, text: str, **kwargs) -> str:
        self.calls += 1
        return super().continue_text(text, **kwargs)


def test_closing_the_stream_stops_decoding_and_calls_and_keeps_a_result():
    small = story_model(STORY, {k: 12.0 for k in range(5, 13)})  # would call at every word start
    big = CountingBig(HFBig(story_model(STORY), TOK))
    cascade = Cascade(SmallLM(small, TOK), big, CascadeConfig(call_threshold=0.5))
    stream = cascade.generate_stream("The capital of France is")
    assert next(stream).source == "prompt" and next(stream) == Span(" Paris", "big")
    stream.close()  # e.g. the client's stop sequence was " Paris"
    assert big.calls == 1
    assert cascade.result.stop_reason == "stopped" and cascade.result.calls == 1
    assert cascade.result.text == "The capital of France is Paris"
    # A big model that fails mid-generation leaves the text written so far.
    failing = Cascade(SmallLM(story_model(STORY, {9: 12.0}), TOK), FailingBig(), CascadeConfig(call_threshold=0.5))
    with pytest.raises(BigModelError):
        failing.generate("The capital of France is")
    assert failing.result.stop_reason == "error" and failing.result.text == "The capital of France is Paris. It has"


# ----------------------------------------------------------------------------------------------
# Real tiny GPT-2 models: KV reuse must give the same logits as a fresh full forward


def tiny_gpt2(seed: int, vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def full_forward_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0, -1].float()


def test_cache_crop_matches_full_forward_on_real_gpt2():
    model = tiny_gpt2(0, len(TOK))
    lm = SmallLM(model, TOK)
    lm.sync_text("The capital of France is Paris. It has")
    assert lm.tokens_processed == 10
    lm.sync_text("The capital of France was in Paris")  # diverges after "France": crop to 5, feed 3
    assert lm.tokens_processed == 13
    assert torch.allclose(lm.logits, full_forward_logits(model, lm.ids), atol=1e-5)
    lm.sync_text("The capital")  # a prefix: crop and re-feed its last token only
    assert lm.tokens_processed == 14
    assert torch.allclose(lm.logits, full_forward_logits(model, lm.ids), atol=1e-5)


def test_cascade_with_real_gpt2s_and_bpe_tokenizer():
    from lacy.core.config import ModelConfig
    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.model import build_model

    texts = ["Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903.",
             "Alan Turing was born in London in 1912 (Maida Vale). He worked at Bletchley Park."] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    small_model, big_model = build_model(ModelConfig(preset="tiny", seq_len=96), tok), None
    torch.manual_seed(1)
    big_model = build_model(ModelConfig(preset="tiny", seq_len=96), tok)
    small, session = SmallLM(small_model, tok), hf_session(big_model, tok)
    cascade = Cascade(small, session, CascadeConfig(call_threshold=0.0, max_new_tokens=24, big_max_tokens=3))
    result = cascade.generate("Marie Curie was born in")
    assert "".join(s.text for s in result.spans) == result.text
    assert result.text.startswith("Marie Curie was born in")
    assert result.calls == result.decision_points > 0  # threshold 0: every word start calls
    assert {s.source for s in result.spans} >= {"prompt", "big"}
    # The caches are the texts' tokens, and the cached logits are those of a fresh forward pass.
    assert small.decode(small.ids[1:]) == result.text
    assert torch.allclose(small.logits, full_forward_logits(small_model, small.ids), atol=1e-4)
    big = session_lm(session)
    assert torch.allclose(big.logits, full_forward_logits(big_model, big.ids), atol=1e-4)
    # Linear: each model processes the final text's tokens plus a few re-fed ones per call (where
    # re-tokenising changed the tail, e.g. after the untrained model's invalid UTF-8 bytes); re-encoding
    # the text at every call would cost several times the text.
    n_final = len(small.encode(result.text))
    assert result.calls >= 3
    assert result.tokens_processed["small"] <= n_final + 4 * result.calls
    assert result.tokens_processed["big"] <= n_final + 4 * result.calls


# ----------------------------------------------------------------------------------------------
# SmolLM2 as the big model


@pytest.mark.slow
def test_smollm2_big_model_fills_in_calls():
    from lacy.model import load_big_model

    model, tokenizer = load_big_model("smollm2")
    assert BigLM(model, tokenizer).continue_text("The capital of France is", unit="word") == " Paris"
    # The scripted small model calls before " Paris" and " 2"; SmolLM2 answers in its own tokens.
    session = hf_session(model, tokenizer)
    cascade = Cascade(SmallLM(story_model(STORY, {5: 12.0, 9: 12.0}), TOK), session,
                      CascadeConfig(call_threshold=0.5))
    result = cascade.generate("The capital of France is")
    assert result.spans[:2] == [Span("The capital of France is", "prompt"), Span(" Paris", "big")]
    assert result.calls == 2 and "".join(s.text for s in result.spans) == result.text
    # Its cache holds the text it saw; the logits equal a fresh forward pass over it.
    big = session_lm(session)
    assert torch.allclose(big.logits, full_forward_logits(model, big.ids), atol=1e-3)


def test_combined_trigger_is_the_chance_to_delegate_or_to_err():
    """combined = P(<CALL>) + (1 - P(<CALL>)) (1 - p_max), as log-odds: a step where the model delegates
    or is unsure scores high; it is computed from the logits, not from rounded probabilities."""
    logits = {5: 3.0, 9: 12.0}  # P(<CALL>) high before " 2", moderate before " Paris"
    small = SmallLM(story_model(STORY, logits), TOK)
    small.sync_text("The capital of France is")
    full = torch.softmax(small.logits.double(), dim=-1)
    p_call = float(full[CALL])
    real = torch.softmax(small.next_logits(allow_call=False).double(), dim=-1)
    expected = p_call + (1 - p_call) * (1 - float(real.max()))
    assert small.call_score("combined") == pytest.approx(log_odds(expected), rel=1e-9)
    assert small.call_score("combined") > max(small.call_score("p_call"), small.call_score("confidence"))
    with pytest.raises(ValueError, match="not 'random'"):
        small.call_score("random")


def test_random_trigger_calls_at_the_target_rate_the_same_way_for_the_same_prompt():
    cascade = cascade_of(story_model(STORY), story_model(STORY), max_new_tokens=12)
    words = STORY.split()
    prompts = [" ".join(words[:k]) for k in range(1, len(words))]
    scores = [s for p in prompts for s in cascade.generate(p, allow_calls=False, trigger="random").call_scores]
    assert all(math.isfinite(s) for s in scores) and len(set(scores)) == len(scores) > 20
    threshold = calibrate(cascade, prompts, 0.3, trigger="random")
    calls = [cascade.generate(p, trigger="random", call_log_odds=threshold) for p in prompts[:5]]
    again = [cascade.generate(p, trigger="random", call_log_odds=threshold) for p in prompts[:5]]
    assert [c.spans for c in calls] == [c.spans for c in again]  # seeded by the prompt
    fired = sum(s > threshold for s in scores) / len(scores)
    assert abs(fired - 0.3) < 0.05 and sum(c.calls for c in calls) > 0


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_tiny_temperature_samples_the_argmax_not_nan(temperature):
    # Found by tests/test_fuzz.py: logits / 1e-300 overflowed, inf - inf gave nan, torch.multinomial raised (500).
    logits = torch.tensor([1.0, 3.0, float("-inf"), 2.0])
    for top_p in (1.0, 0.5):
        assert _choose(logits, temperature, top_p, torch.Generator().manual_seed(0)) == 1
