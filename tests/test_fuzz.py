"""Generated hostile requests: every operation of the API's own OpenAPI schema (/openapi.json of
`lacy.serve.app`, the app a Serve replica serves), fuzzed by schemathesis with valid and invalid data,
against the real engine with tiny models in process (real HTTP semantics over the ASGI transport).

Each case must get no 5xx; every error must be OpenAI's shape (429/503 with Retry-After); a stream must
be server-sent events ending in [DONE] or an error event. Afterwards the service is healthy and answers
a fixed request as before. Size: LACY_FUZZ_EXAMPLES cases per test (default 30: ≈330 cases, 15–60 s);
`LACY_FUZZ_EXAMPLES=300 pytest tests/test_fuzz.py -s` runs ≈3,300 and prints what they got.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from lacy.cascade.big import build_big
from lacy.core.config import ModelConfig, load_config
from lacy.model import build_model
from lacy.serve.app import build_api
from lacy.serve.engine import CascadeEngine

EXAMPLES = int(os.environ.get("LACY_FUZZ_EXAMPLES", "30"))
VALID, INVALID = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [(method, path, mode) for method, path in (("POST", "/v1/completions"), ("POST", "/generate"), ("GET", "/view"))
         for mode in (VALID, INVALID)] + [("GET", "/v1/models/{model}", VALID), ("GET", "/v1/models", VALID),
                                          ("GET", "/healthz", VALID)]
"""Every operation with valid data; with invalid data those whose parameters can be invalid (any
string is a valid model name)."""
ERROR_KEYS = {"message", "type", "param", "code"}
SEEN: Counter = Counter()
"""What the cases got, by (operation, status, streamed): the coverage checked at the end."""
GOOD = {"prompt": "The river", "max_tokens": 6, "call_threshold": 0.5}

# Bodies every rule accepts (schema-valid bodies mostly break a rule the schema cannot say, such as a
# non-neutral penalty), so decoding, streaming and lacy's fields are fuzzed too: each must get 200.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=30)
POLICY = st.one_of(st.just({}), st.fixed_dictionaries({"call_threshold": st.floats(0, 1)}),
                   st.fixed_dictionaries({"call_rate": st.floats(0, 1)}),
                   st.fixed_dictionaries({"call_log_odds": st.floats(-1e6, 1e6)}))
OPTIONAL = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
            "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)),
            "echo": st.booleans(), "call_trigger": st.sampled_from(["p_call", "confidence"]),
            "allow_calls": st.booleans(), "allow_undelegated": st.booleans(), "topic": TEXT, "user": TEXT,
            "best_of": st.none(), "frequency_penalty": st.just(0), "logit_bias": st.just({})}


@st.composite
def accepted(draw, endpoint: str) -> dict:
    body = {"prompt": draw(TEXT), "max_tokens": draw(st.integers(0, 8)),
            **draw(st.fixed_dictionaries({}, optional=OPTIONAL)), **draw(POLICY)}
    if endpoint == "completions":
        body["prompt"] = draw(st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2)))
        body["n"] = draw(st.integers(1, 2))
        if draw(st.booleans()):
            body.update(stream=True, stream_options=draw(st.fixed_dictionaries({}, optional={
                "include_usage": st.booleans()})))
        else:
            body["logprobs"] = draw(st.one_of(st.none(), st.integers(0, 5)))
    return body


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    for name, seed in (("small", 0), ("big", 1)):
        torch.manual_seed(seed)
        build_model(ModelConfig(preset="tiny", seq_len=128), tiny_tokenizer).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    # Small limits keep each accepted case cheap; a default policy lets bodies without one decode.
    cfg = load_config(None, ["--run_dir", str(root), "--serve.small_path", str(root / "small"),
                             "--big.path", str(root / "big"), "--cascade.word_start_only", "false",
                             "--cascade.call_threshold", "0.5", "--serve.max_tokens_limit", "8",
                             "--serve.max_choices", "4", "--serve.max_prompt_chars", "400"])
    eng = CascadeEngine(cfg, build_big(cfg))
    assert eng.probe()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def schema(engine):
    return schemathesis.openapi.from_asgi("/openapi.json", build_api(engine))


@pytest.fixture(scope="module")
def baseline(schema) -> str:
    case = schema["/generate"]["POST"].Case(body=GOOD, media_type="application/json")
    response = case.call()
    assert response.status_code == 200, response.text
    return response.json()["text"]


def check_answer(method: str, path: str, response, streamed: bool) -> None:
    """No 5xx; errors in OpenAI's shape; streams as server-sent events; what each route answers."""
    status, text = response.status_code, response.text
    SEEN[(f"{method} {path}", status, streamed)] += 1
    assert status < 500, f"{method} {path} -> {status}: {text[:500]}"
    assert "Traceback" not in text
    if status != 200:
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"], error
        if status in (429, 503):
            assert int(response.headers["retry-after"][0]) >= 0
        return
    if path == "/view":
        assert response.headers["content-type"][0].startswith("text/html")
    elif streamed:
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        assert events, text[:300]
        if events[-1] != "[DONE]":  # an error after the stream started: OpenAI-shaped, never a server fault
            error = json.loads(events[-1])["error"]
            assert set(error) == ERROR_KEYS and error["type"] != "server_error", error
        for event in events[:-1]:
            assert "choices" in json.loads(event)
    elif path in ("/v1/completions", "/generate"):
        out = response.json()
        assert ("choices" in out) if path == "/v1/completions" else ("text" in out and "spans" in out)


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_generated_requests_get_no_5xx_and_openai_errors(schema, baseline, method, path, mode):
    strategy = schema[path][method].as_strategy(generation_mode=mode)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data) -> None:
        case = data.draw(strategy)
        streamed = isinstance(case.body, dict) and case.body.get("stream") is True
        check_answer(method, path, case.call(), streamed)

    run()


@pytest.mark.parametrize("endpoint", ["completions", "generate"])
def test_generated_requests_that_every_rule_accepts_are_answered(schema, baseline, endpoint):
    path = "/v1/completions" if endpoint == "completions" else "/generate"

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=accepted(endpoint))
    def run(body: dict) -> None:
        response = schema[path]["POST"].Case(body=body, media_type="application/json").call()
        assert response.status_code == 200, (body, response.text[:300])
        try:
            check_answer("POST", path, response, body.get("stream") is True)
        except (AssertionError, KeyError, ValueError) as err:
            raise AssertionError(f"{body!r} -> {response.text[-600:]!r}") from err

    run()


def test_streamed_and_whole_answers_were_both_fuzzed_and_the_service_is_healthy(schema, engine, baseline):
    completions = {(status, streamed) for (op, status, streamed) in SEEN if op == "POST /v1/completions"}
    if not completions:
        pytest.skip("run with the fuzz cases above")
    assert (200, True) in completions and (200, False) in completions, completions
    assert {status for (_, status, _) in SEEN} >= {200, 400}, SEEN
    by_status: Counter = Counter()
    for (op, status, _), n in SEEN.items():
        by_status[f"{op} {status}"] += n
    print(f"{sum(SEEN.values())} cases:", dict(sorted(by_status.items())))
    health = schema["/healthz"]["GET"].Case().call()
    assert health.status_code == 200 and health.json()["decoding"] == 0
    again = schema["/generate"]["POST"].Case(body=GOOD, media_type="application/json").call()
    assert again.status_code == 200 and again.json()["text"] == baseline
