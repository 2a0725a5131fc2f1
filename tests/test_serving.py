"""The served cascade without Ray (`lacy.serve.engine`): request contract, answers, streaming, faults.

Tiny real models: a `tiny` GPT-2 as the small model and another (seed 1) as the big model, both over
the session's tiny tokenizer, in process (`HFBig`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from lacy.cascade.big import BigCall, BigModelError, BigReply, BigSession, BigUnavailable, build_big
from lacy.cascade.hf_big import HFBig
from lacy.cascade.policy import Quantiles
from lacy.core.config import ModelConfig, load_config
from lacy.model import build_model
from lacy.serve.engine import BigHealth, CascadeEngine
from lacy.serve.remote import HandleBig
from lacy.serve.request import APIError, decode_json


def save_tiny(path, tokenizer, seed: int):
    torch.manual_seed(seed)
    build_model(ModelConfig(preset="tiny", seq_len=128), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serving")
    return save_tiny(root / "small", tiny_tokenizer, 0), save_tiny(root / "big", tiny_tokenizer, 1), root


def make_cfg(dirs, *more: str):
    small, big, root = dirs
    return load_config(None, ["--run_dir", str(root), "--serve.small_path", str(small), "--big.path", str(big),
                              "--cascade.word_start_only", "false", "--serve.max_tokens_limit", "40", *more])


@pytest.fixture(scope="module")
def engine(dirs):
    cfg = make_cfg(dirs)
    eng = CascadeEngine(cfg, build_big(cfg))
    assert eng.probe()
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


async def collect(events) -> list[str]:
    return [e async for e in events]


def sse(events: list[str]) -> list:
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [e[6:-2] if e[6:-2] == "[DONE]" else json.loads(e[6:-2]) for e in events]


# ----------------------------------------------------------------------------------------------
# The request contract

BAD = [  # (body, status, param or None, words of the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b'{"prompt": "x", "call_threshold": NaN}', 400, None, "NaN is not JSON"),
    (b'{"prompt": "x", "call_rate": Infinity}', 400, None, "Infinity is not JSON"),
    (b'{"prompt": "x", "temperature": 1e999}', 400, None, "overflows"),
    (b'["x"]', 400, None, "JSON object"),
    (b'\xff\xfe', 400, None, "not valid JSON"),
    (b'{"prompt": "\\ud800 Ada"}', 400, "prompt", "unpaired UTF-16 surrogate"),
    (b'{"prompt": "Ada\\u0000 Lovelace"}', 400, "prompt", "U+0000"),
    (b'{"prompt": "Ada", "topic": "Ada\\u001b[31m"}', 400, "topic", "U+001B"),
    (b'{"prompt": "Ada", "stop": "\\ud83d"}', 400, "stop", "surrogate"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "exceeds the limit"),
    ({"prompt": "x", "allow_calls": 1}, 400, "allow_calls", "valid boolean"),
    ({"prompt": "x", "call_rate": "0.2"}, 400, "call_rate", "valid number"),
    ({"prompt": "x", "call_rate": 1.5}, 400, "call_rate", "less than or equal to 1"),
    ({"prompt": "x", "call_threshold": 0.2, "call_rate": 0.2}, 400, "call_rate", "not several"),
    ({"prompt": "x", "call_threshold": 0.2, "call_log_odds": 1.0}, 400, "call_log_odds",
     "not several (got call_threshold and call_log_odds)"),
    ({"prompt": "x", "call_log_odds": "3"}, 400, "call_log_odds", "valid number"),
    (b'{"prompt": "x", "call_log_odds": -Infinity}', 400, None, "Infinity is not JSON"),
    ({"prompt": "x", "call_trigger": "entropy"}, 400, "call_trigger", "'random' or 'combined'"),
    ({"prompt": "x", "stop": ""}, 400, "stop", "non-empty"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x", "n": 20}, 400, "n", "exceed the limit"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "!"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "x", "logit_bias": {"50256": -100}}, 400, "logit_bias", "not supported"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options",
     "valid boolean"),
    ({"prompt": "x", "stream": True, "logprobs": 1}, 400, "logprobs", "not supported with 'stream'"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "valid string"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"prompt": "x", "retrieval": True}, 400, "retrieval", "no knowledge store"),
    ({"prompt": "x", "topic": "y" * 201}, 400, "topic", "longer than 200"),
    ({"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ({"prompt": "x" * 5000}, 413, "prompt", "the limit is 4000"),
    ({"prompt": "word " * 700}, 400, "prompt", "maximum context length is 128"),
]


@pytest.mark.parametrize("body,status,param,needle", BAD)
def test_bad_requests_are_refused_before_any_work(engine, body, status, param, needle):
    with pytest.raises(APIError) as caught:
        engine.parse(body, "completions")
    err = caught.value
    assert (err.status, err.body()["error"]["param"]) == (status, param), err.body()
    assert needle in err.message, err.message
    text = json.dumps(err.body())  # serialisable, whatever the request held
    assert "\\ud800" not in text and "Traceback" not in text and "/" not in err.message.replace("/v1", "")


def test_a_body_over_the_limit_is_413_before_parsing():
    with pytest.raises(APIError) as caught:
        decode_json(b'{"prompt": "' + b"x" * 2000 + b'"}', max_bytes=1000)
    assert caught.value.status == 413 and caught.value.code == "request_too_large"


def test_clients_default_fields_are_accepted(engine):
    # LangChain's OpenAI LLM sends these by default; the openai client sends nulls for unset fields.
    langchain = {"model": "lacy", "prompt": ["Marie Curie was"], "temperature": 0.7, "top_p": 1, "n": 1,
                 "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "max_tokens": 256 // 8,
                 "seed": None, "logprobs": None, "best_of": 1, "stream": False, "suffix": None, "echo": False,
                 "stop": None, "user": "someone", "stream_options": None}
    job = engine.parse(langchain, "completions")
    assert job.prompts == ["Marie Curie was"] and job.n == 1 and job.req.temperature == 0.7
    assert engine.parse({"prompt": "x", "max_tokens": None}, "completions").max_tokens == 16  # OpenAI's default
    # Extension fields of lacy, and a FTS5-looking topic (plain words to the store: not an error).
    engine.parse({"prompt": "x", "call_trigger": "confidence", "topic": 'NEAR("a" b*) OR title:x'}, "completions")


# ----------------------------------------------------------------------------------------------
# Answers


def test_a_log_odds_threshold_reaches_the_cascade(engine):
    """call_log_odds is the threshold calibration returns (lacy.eval.plan sends it): compared with the
    trigger's log-odds score as the library compares it."""
    def calls(policy: dict) -> int:
        out = run(engine.generate(engine.parse({"prompt": "The river", "max_tokens": 6, **policy}, "generate")))
        return out["calls"]

    assert calls({"call_log_odds": -1e9}) == calls({"call_threshold": 0.0}) > 0  # every decision point calls
    assert calls({"call_log_odds": 1e9}) == calls({"call_threshold": 1.0}) == 0


def test_max_tokens_counts_what_the_client_gets(engine):
    # Every step calls the big model (threshold 0), whose words are several tokens long: the completion
    # is cut at exactly max_tokens tokens of the small tokenizer, and usage says so.
    body = {"prompt": "The river", "max_tokens": 7, "call_threshold": 0.0}
    out = run(engine.complete(engine.parse(body, "completions")))
    (choice,) = out["choices"]
    tok = engine.models["lacy"][1]
    n = len(tok(choice["text"], add_special_tokens=False)["input_ids"])
    assert n == 7 and out["usage"]["completion_tokens"] == 7 and choice["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len(tok("The river", add_special_tokens=False)["input_ids"])
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 7
    assert 0 < out["usage"]["delegated_tokens"] <= 7
    lacy = choice["lacy"]
    assert "".join(s["text"] for s in lacy["spans"]) == choice["text"] and lacy["calls"] >= 1
    # /generate keeps the library's meaning: max_tokens small-model steps, one call each here.
    gen = run(engine.generate(engine.parse(body, "generate")))
    assert gen["calls"] == 7 and gen["text"].startswith("The river") and gen["spans"][0]["source"] == "prompt"


class CountingBig:
    """A `BigModel` that counts the calls it passes on."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def continue_batch(self, calls, cancel=None):
        self.calls += len(calls)
        return self.inner.continue_batch(calls, cancel)

    def end_session(self, session):
        self.inner.end_session(session)

    def health(self, timeout_s):
        return self.inner.health(timeout_s)


def test_a_stop_sequence_ends_decoding_and_the_big_models_work(dirs):
    cfg = make_cfg(dirs)
    big = CountingBig(build_big(cfg))
    eng = CascadeEngine(cfg, big)
    try:
        free = run(eng.generate(eng.parse({"prompt": "The river", "max_tokens": 6, "call_threshold": 0.0},
                                          "generate")))
        first = free["spans"][1]["text"]  # the big model's first words
        assert big.calls == 6
        big.calls = 0
        stop = first.strip()[:3] or first
        out = run(eng.complete(eng.parse({"prompt": "The river", "max_tokens": 30, "call_threshold": 0.0,
                                          "stop": [stop]}, "completions")))
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop" and stop not in choice["text"]
        assert big.calls == 1, "calls went on after the stop sequence appeared"
    finally:
        eng.close()


def test_stream_equals_the_json_answer_with_usage_and_held_back_stops(engine):
    body = {"prompt": "The river", "max_tokens": 12, "call_threshold": 0.5}
    whole = run(engine.complete(engine.parse(body, "completions")))
    text = whole["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    events = sse(run(collect(engine.stream(engine.parse(
        {**body, "stream": True, "stream_options": {"include_usage": True}, "stop": stop, "echo": True},
        "completions")))))
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    chunks = events[:-2]
    assert all(c["usage"] is None for c in chunks) and chunks[0]["choices"][0]["text"] == "The river"
    streamed = "".join(c["choices"][0]["text"] for c in chunks[1:])
    assert streamed == text[:text.find(stop)] and stop not in streamed  # never a piece of the stop sent
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "lacy" in chunks[-1]["choices"][0]


def test_n_sampling_seed_echo_and_list_prompts(engine):
    body = {"prompt": ["The river", "A city"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 7,
            "allow_calls": False, "echo": True}
    a = run(engine.complete(engine.parse(body, "completions")))
    b = run(engine.complete(engine.parse(body, "completions")))
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3] and texts == [c["text"] for c in b["choices"]]
    assert texts[0].startswith("The river") and texts[2].startswith("A city") and texts[0] != texts[1]
    greedy = run(engine.complete(engine.parse({**body, "temperature": 0}, "completions")))
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]


def test_logprobs_of_each_token_with_p_call(engine):
    body = {"prompt": "The river", "max_tokens": 5, "allow_calls": False, "logprobs": 2}
    choice = run(engine.complete(engine.parse(body, "completions")))["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 5
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(0 <= p <= 1 for p in lp["call_probs"])
    assert all(len(top) == 2 for top in lp["top_logprobs"]) and lp["sources"] == ["small"] * 5
    assert lp["text_offset"][0] == 0
    # Greedy: a written token is the most likely real token (until no_repeat_ngram=4 blocks a repeat).
    assert all(v == pytest.approx(max(top.values()), abs=1e-5) for v, top in zip(
        lp["token_logprobs"][:3], lp["top_logprobs"][:3], strict=True))
    echo = run(engine.complete(engine.parse({**body, "echo": True, "max_tokens": 0, "logprobs": 0},
                                            "completions")))["choices"][0]
    assert echo["text"] == "The river" and echo["finish_reason"] == "length"
    assert "".join(echo["logprobs"]["tokens"]) == "The river" and echo["logprobs"]["top_logprobs"][0] is None


def test_quantiles_are_shared_per_model_and_trigger_and_bounded(dirs):
    cfg = make_cfg(dirs, "--serve.max_call_rates", "3")
    shared = Quantiles(max_keys=3)  # what the cluster scope shares between replicas
    one, two = CascadeEngine(cfg, None, shared), CascadeEngine(cfg, None, shared)
    try:
        for eng in (one, two):
            run(eng.complete(eng.parse({"prompt": "The river", "max_tokens": 4, "call_rate": 0.3,
                                        "allow_undelegated": True}, "completions")))
        # No big model: the engine answers small-only at once, without consulting the policy.
        assert len(shared) == 0
        for rate in (0.1, 0.2, 0.3, 0.4, 0.5):
            one.quantiles.observe(rate, 0.5, ("lacy", "p_call"))
        assert len(shared) == 3 and len(one.quantiles) == 3
    finally:
        one.close()
        two.close()


# ----------------------------------------------------------------------------------------------
# Faults


def test_a_bad_call_in_a_big_batch_fails_alone(dirs):
    big = build_big(make_cfg(dirs))  # no knowledge store
    assert isinstance(big, HFBig)
    long_text = "word " * 400  # past the big model's context of 128: its own sync fails
    calls = [BigCall("a", "The river", "word", 4), BigCall("b", "x", "word", 4, retrieval=True),
             BigCall("c", long_text, "word", 4), BigCall("d", "A city", "tokens", 3)]
    out = big.continue_batch(calls)
    assert out[0].error is None and out[3].error is None and out[3].generated == 3
    assert (out[1].error, out[1].status) == ("retrieval was asked for but this deployment has no knowledge store", 400)
    assert out[2].status == 500 and "Traceback" not in out[2].error
    alone = build_big(make_cfg(dirs)).continue_batch([calls[0], calls[3]])
    assert [o.text for o in alone] == [out[0].text, out[3].text]


class DownBig:
    """A big model whose replica is gone: calls and probes fail until `up`."""

    def __init__(self, inner) -> None:
        self.inner, self.up, self.calls = inner, False, 0

    def continue_batch(self, calls, cancel=None):
        self.calls += len(calls)
        if not self.up:
            time.sleep(0.2)  # as a dead replica's call would, before it fails
            return [BigReply.failure(BigUnavailable("its replica did not answer")) for _ in calls]
        return self.inner.continue_batch(calls, cancel)

    def end_session(self, session):
        self.inner.end_session(session)

    def health(self, timeout_s):
        if not self.up:
            raise ConnectionError("replica gone")
        return self.inner.health(timeout_s)


def test_big_model_down_503_or_flagged_at_once_then_recovery(dirs):
    cfg = make_cfg(dirs, "--serve.health_interval_s", "0.2")
    big = DownBig(build_big(cfg))
    big.up = True
    eng = CascadeEngine(cfg, big)
    body = {"prompt": "The river", "max_tokens": 4, "call_threshold": 0.0}
    try:
        deadline = time.monotonic() + 10
        while eng.big_state() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run(eng.complete(eng.parse(body, "completions")))["choices"][0]["lacy"]["delegated"]
        big.up = False
        with pytest.raises(APIError) as caught:  # the call fails: 503 with Retry-After
            run(eng.complete(eng.parse(body, "completions")))
        assert caught.value.status == 503 and caught.value.retry_after_s == 1.0
        assert eng.healthz()[0] == 503 and eng.healthz()[1]["big_model"] == "down"
        calls = big.calls
        start = time.perf_counter()
        out = run(eng.complete(eng.parse({**body, "allow_undelegated": True}, "completions")))
        lacy = out["choices"][0]["lacy"]
        assert not lacy["delegated"] and lacy["calls"] == 0 and big.calls == calls  # no call, no wait
        assert time.perf_counter() - start < 2.0
        with pytest.raises(APIError, match="unavailable"):
            run(collect(eng.stream(eng.parse({**body, "stream": True}, "completions"))))
        big.up = True
        deadline = time.monotonic() + 10
        while eng.big_state() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.healthz()[0] == 200
        assert run(eng.complete(eng.parse(body, "completions")))["choices"][0]["lacy"]["delegated"]
    finally:
        eng.close()


class SlowProbeBig(CountingBig):
    """A big model that answers calls at once but its first health probe only after `probe_s`."""

    def __init__(self, inner, probe_s: float) -> None:
        super().__init__(inner)
        self.probe_s = probe_s

    def health(self, timeout_s):
        time.sleep(self.probe_s)
        self.probe_s = 0.0
        return self.inner.health(timeout_s)


def test_a_new_engine_serves_before_its_first_probe_answers(dirs):
    # It answered 503 "not probed yet" until the watcher's first probe came back.
    cfg = make_cfg(dirs)
    big = SlowProbeBig(build_big(cfg), probe_s=3.0)
    eng = CascadeEngine(cfg, big)
    try:
        out = run(eng.complete(eng.parse({"prompt": "The river", "max_tokens": 3, "call_threshold": 0.0},
                                         "completions")))
        assert out["choices"][0]["lacy"]["delegated"] and big.calls > 0 and big.probe_s == 3.0
    finally:
        eng.close()


def test_a_failed_call_ends_the_waits_of_requests_that_take_a_small_only_answer(dirs):
    """The big replica dies under load: its other calls may wait for a successor (Serve queues them) up
    to big_timeout_s. The first failed call marks the big model down, and every request that allows an
    undelegated answer stops waiting at once (one poll) and finishes small-only; strict ones wait on."""
    cfg = make_cfg(dirs, "--serve.big_timeout_s", "30")
    hung = FakeResponse(BigReply(" never", 1, 1), after_s=60)  # queued behind a replica that will not come
    health = BigHealth()
    big = HandleBig(FakeHandle(hung), cfg.serve.big_timeout_s, poll_s=0.05, on_unavailable=health.down)
    eng = CascadeEngine(cfg, big, health=health)
    body = {"prompt": "The river", "max_tokens": 4, "call_threshold": 0.0}
    try:
        async def both() -> list:
            lenient = asyncio.ensure_future(eng.complete(eng.parse({**body, "allow_undelegated": True},
                                                                   "completions")))
            strict = asyncio.ensure_future(eng.complete(eng.parse(body, "completions")))
            await asyncio.sleep(0.5)  # both wait on their first call
            start = time.perf_counter()
            health.down("a call failed (ActorDiedError)")  # what another request's failed call reports
            out = await lenient
            waited = time.perf_counter() - start
            assert not strict.done()  # a strict request still waits for the big model
            strict.cancel()
            return [out, waited]

        out, waited = run(both())
        lacy = out["choices"][0]["lacy"]
        assert not lacy["delegated"] and lacy["undelegated_reason"] == "a call failed (ActorDiedError)"
        assert waited < 1.0, f"the small-only answer took {waited:.2f} s after the big model went down"
        assert out["choices"][0]["finish_reason"] == "length"
    finally:
        eng.close()


def test_a_request_that_takes_a_small_only_answer_waits_at_most_undelegated_wait_s(dirs):
    """Serve holds a call whose replica died for the successor instead of failing it, so no call fails
    and no probe has timed out yet: the request's own bound (serve.undelegated_wait_s) ends the wait,
    without marking the big model down (it may only be busy)."""
    cfg = make_cfg(dirs, "--serve.undelegated_wait_s", "0.5", "--serve.big_timeout_s", "30")
    hung = FakeResponse(BigReply(" never", 1, 1), after_s=60)
    health = BigHealth()
    eng = CascadeEngine(cfg, HandleBig(FakeHandle(hung), 30, poll_s=0.05, on_unavailable=health.down), health=health)
    try:
        start = time.perf_counter()
        out = run(eng.complete(eng.parse({"prompt": "The river", "max_tokens": 4, "call_threshold": 0.0,
                                          "allow_undelegated": True}, "completions")))
        waited = time.perf_counter() - start
        lacy = out["choices"][0]["lacy"]
        assert not lacy["delegated"] and "undelegated_wait_s (0.5 s)" in lacy["undelegated_reason"]
        assert waited < 1.5 and hung.cancelled and out["choices"][0]["finish_reason"] == "length"
        assert health.reason is None  # slow is not down
    finally:
        eng.close()


def test_allow_undelegated_keeps_what_the_stream_sent_and_goes_on_small_only(dirs):
    cfg = make_cfg(dirs)
    big = DownBig(build_big(cfg))
    eng = CascadeEngine(cfg, big)
    eng.health.up({})
    try:
        # The first call fails mid-stream: the small model goes on from the text written so far.
        events = sse(run(collect(eng.stream(eng.parse(
            {"prompt": "The river", "max_tokens": 6, "call_threshold": 0.0, "stream": True,
             "allow_undelegated": True}, "completions")))))
        last = events[-2]["choices"][0]
        assert last["finish_reason"] == "length" and not last["lacy"]["delegated"]
        reason = last["lacy"]["undelegated_reason"]  # the failed call's, or the failed probe's that ended its wait
        assert "did not answer" in reason or "health probe" in reason, reason
        assert {c["choices"][0].get("source") for c in events[:-2] if c["choices"][0]["text"]} == {"small"}
    finally:
        eng.close()


def test_a_client_that_leaves_cancels_decoding_and_big_calls(dirs):
    cfg = make_cfg(dirs, "--serve.max_tokens_limit", "500", "--model.seq_len", "128")
    big = CountingBig(build_big(cfg))
    eng = CascadeEngine(cfg, big)
    assert eng.probe()  # not waiting for the watcher's first probe
    try:
        async def leave_after_first() -> None:
            events = eng.stream(eng.parse({"prompt": "The", "max_tokens": 100, "call_threshold": 0.0,
                                           "stream": True}, "completions"))
            await events.__anext__()
            await events.aclose()  # what a disconnect does to the response's generator

        run(leave_after_first())
        deadline = time.monotonic() + 10
        while eng.batcher.active and time.monotonic() < deadline:
            time.sleep(0.02)
        calls = big.calls
        time.sleep(0.3)
        assert eng.batcher.active == 0 and big.calls == calls < 20 and eng.cancelled == 1
    finally:
        eng.close()


def test_concurrent_requests_with_bad_ones_all_answer(engine):
    good = {"prompt": "The river", "max_tokens": 5, "call_threshold": 0.5}
    bad = [{"prompt": "x", "retrieval": True}, {"prompt": "x", "max_tokens": True}, b"{oops"]
    alone = run(engine.complete(engine.parse(good, "completions")))["choices"][0]["text"]

    async def mixed() -> list:
        async def one(body):
            try:
                return await engine.complete(engine.parse(body, "completions"))
            except APIError as err:
                return err.status
        return await asyncio.gather(*(one(b) for b in [good, *bad] * 4))

    results = run(mixed())
    assert [r for r in results if isinstance(r, int)] == [400] * 12
    assert [r["choices"][0]["text"] for r in results if isinstance(r, dict)] == [alone] * 4


def test_every_forward_of_concurrent_requests_runs_on_the_one_compute_thread(engine):
    # libgomp waits passively once a second OS thread has its own OpenMP pool, and a forward then runs
    # ~1.5x slower (lacy.core.compute): the decoding threads must hand every pass to one thread.
    small = engine.models["lacy"][0]
    big = engine.big.model
    threads: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident())) for m in (small, big)]
    body = {"prompt": "The river", "max_tokens": 8, "call_threshold": 0.0, "logprobs": 1}  # every point calls

    async def many() -> list:
        return await asyncio.gather(*(engine.complete(engine.parse(body, "completions")) for _ in range(6)))

    try:
        outs = run(many())
    finally:
        for hook in hooks:
            hook.remove()
    assert all(o["usage"]["delegated_tokens"] > 0 for o in outs)  # both models ran for every request
    assert len(threads) == 1, f"{len(threads)} threads ran forwards"
    assert threads == {engine.compute.ident}


def test_engine_threads_are_bounded(engine):
    assert engine.pool._max_workers == engine.cfg.serve.concurrency
    assert len([t for t in threading.enumerate() if t.name == "big-health"]) >= 1


class FakeResponse:
    def __init__(self, answer=None, error: BaseException | None = None, after_s: float = 0.0) -> None:
        self.answer, self.error, self.ready_at, self.cancelled = answer, error, time.monotonic() + after_s, False

    def result(self, timeout_s: float):
        if time.monotonic() < self.ready_at:
            time.sleep(min(timeout_s, self.ready_at - time.monotonic()))
            if time.monotonic() < self.ready_at:
                raise TimeoutError
        if self.error is not None:
            raise self.error
        return self.answer

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """What HandleBig needs of a DeploymentHandle: method.remote(...) -> response."""

    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.continue_call = self.end_session = self.health = self

    def remote(self, *args):
        return self.response


class Overloaded(Exception):
    pass


def test_handle_big_waits_bounded_and_classifies_failures():
    ok = FakeResponse(BigReply(" Paris", 3, 1))
    session = BigSession(HandleBig(FakeHandle(ok), timeout_s=5))
    assert session.continue_text("x") == " Paris" and session.tokens_generated == 1
    slow = FakeResponse(ok.answer, after_s=60)
    start = time.monotonic()
    with pytest.raises(BigUnavailable, match="no answer within"):
        BigSession(HandleBig(FakeHandle(slow), timeout_s=0.5, poll_s=0.1)).continue_text("x")
    assert slow.cancelled and time.monotonic() - start < 2
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    slow = FakeResponse(ok.answer, after_s=60)
    with pytest.raises(BigModelError, match="stopped waiting"):
        BigSession(HandleBig(FakeHandle(slow), timeout_s=30, poll_s=0.1), cancel=cancel).continue_text("x")
    assert slow.cancelled
    with pytest.raises(BigModelError, match="overloaded") as caught:
        BigSession(HandleBig(FakeHandle(FakeResponse(error=Overloaded())), 5, overloaded=(Overloaded,))).continue_text(
            "x")
    assert not isinstance(caught.value, BigUnavailable)  # busy is not down
    with pytest.raises(BigUnavailable, match="did not answer"):
        BigSession(HandleBig(FakeHandle(FakeResponse(error=RuntimeError("ActorDiedError /tmp/x pid 7"))), 5)
                   ).continue_text("x")
    with pytest.raises(BigModelError, match="no knowledge store"):
        BigSession(HandleBig(FakeHandle(FakeResponse(BigReply(error="no knowledge store", status=400))), 5)
                   ).continue_text("x")


def test_handle_big_sends_a_call_once_more_when_its_replica_died():
    """Just after a big-model replica dies, the handle may still route one call to it while its
    successor already answers health probes: the call (which carries the whole text) goes once more."""
    class Handle(FakeHandle):
        def __init__(self, responses: list[FakeResponse]) -> None:
            super().__init__(responses[0])
            self.responses, self.sent = responses, 0

        def remote(self, *args):
            self.sent += 1
            return self.responses[min(self.sent, len(self.responses)) - 1]

    died = FakeResponse(error=RuntimeError("ActorDiedError: the replica's actor died"))
    handle = Handle([died, FakeResponse(BigReply(" Paris", 3, 1))])
    heard: list[str] = []
    assert BigSession(HandleBig(handle, 5, on_unavailable=heard.append)).continue_text("x") == " Paris"
    assert handle.sent == 2
    assert heard == ["a call failed (RuntimeError)"]  # the engine marks the big model down before the retry
    twice = Handle([died, died, FakeResponse(BigReply(" never", 1, 1))])
    with pytest.raises(BigUnavailable, match="did not answer"):
        BigSession(HandleBig(twice, 5)).continue_text("x")
    assert twice.sent == 2  # once more, not until it works


def test_load_small_model_wants_safetensors_and_call(tmp_path, dirs, tiny_model):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lacy.corpus.tokenizer import CALL_TOKEN
    from lacy.model import load_small_model

    model, tok = load_small_model(dirs[0])
    assert CALL_TOKEN in tok.get_vocab() and not model.training
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_small_model(tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_small_model(tmp_path / "pickled")
    tiny_model.save_pretrained(tmp_path / "nocall")  # with a tokenizer that has no <CALL>
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                      unk_token="<unk>").save_pretrained(tmp_path / "nocall")
    with pytest.raises(ValueError, match="no <CALL> token"):
        load_small_model(tmp_path / "nocall")


@pytest.mark.gpu
def test_small_and_big_models_on_the_gpu_answer_as_on_the_cpu(dirs):
    body = {"prompt": "The river", "max_tokens": 8, "call_threshold": 0.5}
    answers = {}
    for gpus in ("0", "1"):
        cfg = make_cfg(dirs, "--serve.small_gpus", gpus, "--serve.big_gpus", gpus)
        big = build_big(cfg)
        eng = CascadeEngine(cfg, big)
        try:
            assert eng.device == ("cuda" if gpus == "1" else "cpu")
            assert next(eng.models["lacy"][0].parameters()).device.type == eng.device
            assert big.model.device.type == eng.device
            answers[gpus] = run(eng.generate(eng.parse(body, "generate")))["text"]
        finally:
            eng.close()
    assert answers["0"] == answers["1"]


# ----------------------------------------------------------------------------------------------
# The HTTP routes in process (lacy.serve.app: the app a Serve replica serves)

NESTED = {  # bodies the parser cannot take, each far under serve.max_request_bytes
    "arrays 100,000 deep": b'{"prompt": "x", "topic": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "objects 50,000 deep": b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    "unclosed 200,000 deep": b"[" * 200_000,
    "an integer of 5,000 digits": b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
}


@pytest.fixture(scope="module")
def http(engine):
    from fastapi.testclient import TestClient

    from lacy.serve.app import build_api

    with TestClient(build_api(engine), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
@pytest.mark.parametrize("case", sorted(NESTED))
def test_unparseable_json_is_400_with_one_log_line_and_no_traceback(http, caplog, route, case):
    caplog.set_level("INFO")
    r = http.post(route, content=NESTED[case], headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_json"
    assert "Traceback" not in r.text and "sys." not in error["message"]
    ours = [rec for rec in caplog.records if rec.name.startswith("lacy.")]
    assert [rec.getMessage() for rec in ours] == ["answered 400 invalid_json (param None)"]
    assert not any(rec.exc_info for rec in caplog.records), "a client's bad input logged a traceback"


def test_bodies_over_the_limits_are_413_over_http(engine, http, caplog):
    caplog.set_level("INFO")
    limit = engine.cfg.serve.max_request_bytes
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * limit + b'"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = iter([b'{"prompt": "', *[b"x" * 65536] * (limit // 65536 + 1), b'"}'])  # no content-length
    r = http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    r = http.post("/generate", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
    assert [rec.getMessage() for rec in caplog.records if rec.name.startswith("lacy.")] == [
        "answered 413 request_too_large (param None)", "answered 413 request_too_large (param None)",
        "answered 413 request_too_large (param 'prompt')"]
    assert http.get("/healthz").status_code == 200


def asgi_exchange(app) -> list[dict]:
    """The messages an ASGI app sends for one POST, as a server would take them."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    run(app({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send))
    return sent


def test_responses_a_dead_replica_left_unfinished_end_in_openai_shape():
    """Serve's proxy, when the replica of a request dies, sends nothing (a bare 500 follows) or leaves a
    started stream unfinished: FinishResponses (around the proxy) answers 503 + Retry-After or ends the
    stream with an error event; what was finished passes untouched."""
    from lacy.serve.proxy import FinishResponses

    async def died_before(scope, receive, send):
        raise RuntimeError("ActorDiedError")

    async def died_streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    async def finished(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    start, body = asgi_exchange(FinishResponses(died_before, retry_after_s=2))
    assert start["status"] == 503 and (b"retry-after", b"2") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "replica_unavailable" and not body["more_body"]
    *_, end = asgi_exchange(FinishResponses(died_streaming))
    assert end["body"].startswith(b'data: {"error": ') and not end["more_body"]
    error = json.loads(end["body"][6:])["error"]
    assert error["type"] == "service_unavailable_error" and "retry" in error["message"]
    assert asgi_exchange(FinishResponses(finished))[-1]["body"] == b"data: [DONE]\n\n"
    assert len(asgi_exchange(FinishResponses(finished))) == 2
