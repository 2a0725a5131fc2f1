"""The Serve cascade over real HTTP on 127.0.0.1, with the official `openai` client and raw requests.

Three apps on the session's Ray, one Serve instance: `cascade` at / (a tiny small model, SmolLM2 as the
big model, a knowledge store), `nobig` at /nobig (no big model; one request at a time and a queue of
one, so overload is easy to cause) and `tiny` at /tiny (a tiny big model, two SmallModel replicas
sharing a cluster-wide call-rate quantile; its big replica is killed last)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lacy.core.config import ModelConfig, load_config
from lacy.model import build_model

pytestmark = pytest.mark.slow
UNDELEGATED_WAIT_S = 2.0
"""serve.undelegated_wait_s of the tiny app."""
FALLBACK_S = UNDELEGATED_WAIT_S + 2.0
"""The most an allow_undelegated request may take past the big replica's death: its wait for one call,
then the small model's rest of the answer (docs/serving.md)."""
HOSTILE = [  # raw bodies, each refused with a 4xx and a message
    (b"{not json", 400), (b'{"prompt": "x", "call_threshold": NaN}', 400),
    (b'{"prompt": "x", "call_rate": Infinity}', 400), (b'{"prompt": "\\ud800 Ada"}', 400),
    (b'{"prompt": "Ada\\u0007"}', 400), (b'{"prompt": "x", "max_tokens": -5}', 400),
    (b'{"prompt": "x", "max_tokens": 100000}', 400), (b'{"prompt": "x", "max_tokens": true}', 400),
    (b'{"prompt": "x", "stream": "yes"}', 400), (b'{"prompt": "x", "stop": ""}', 400),
    (b'{"prompt": "x", "temperature": "hot"}', 400), (b'{"prompt": "x", "model": "nope"}', 404),
    (json.dumps({"prompt": "x" * 1_000_000}).encode(), 413),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_port() -> int | None:
    """The port of a Serve instance already running on this Ray (its HTTP options are fixed)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config.port


def _save_tiny(path, tokenizer, seed: int):
    torch.manual_seed(seed)
    build_model(ModelConfig(preset="tiny", seq_len=128), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def urls(ray_session, tmp_path_factory, tiny_tokenizer, embedded_docs):
    from ray import serve

    from lacy.cascade.knowledge import build_store
    from services.cascade import delete, run

    root = tmp_path_factory.mktemp("serve_run")
    small, big = _save_tiny(root / "small", tiny_tokenizer, 0), _save_tiny(root / "big", tiny_tokenizer, 1)
    build_store(embedded_docs[:200], root / "knowledge.sqlite", passage_words=100)
    running = _serve_port()
    port = running or _free_port()
    common = ["--run_dir", str(root), "--serve.small_path", small, "--serve.port", str(port),
              "--cascade.word_start_only", "false", "--serve.max_tokens_limit", "40"]
    run(load_config(None, [*common, "--serve.small_cpus", "0.2", "--serve.big_cpus", "0.2", "--big.retrieval", "true"]))
    run(load_config(None, [*common, "--serve.big_enabled", "false", "--serve.small_cpus", "0.1",
                           "--serve.max_ongoing_requests", "1", "--serve.max_queued_requests", "1",
                           "--serve.overload_status", "429", "--serve.retry_after_s", "2"]),
        name="nobig", route_prefix="/nobig")
    run(load_config(None, [*common, "--big.path", big, "--serve.small_replicas", "2", "--serve.small_cpus", "0.1",
                           "--serve.big_cpus", "0.1", "--serve.quantile_scope", "cluster", "--serve.torch_threads", "2",
                           "--serve.health_interval_s", "1", "--serve.big_timeout_s", "10",
                           "--serve.undelegated_wait_s", str(UNDELEGATED_WAIT_S)]),
        name="tiny", route_prefix="/tiny")
    base = f"http://127.0.0.1:{port}"
    yield {"main": base, "nobig": f"{base}/nobig", "tiny": f"{base}/tiny"}
    for name in ("cascade", "nobig", "tiny"):
        delete(name)
    if running is None:  # the test started this Serve instance: leave the session's Ray as it was
        serve.shutdown()


def replicas(app: str, deployment: str) -> list[dict]:
    """The named actors of an app's deployment's replicas (what a test kills)."""
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}")]


def kill(actor: dict) -> bool:
    """Kill one replica's actor as a crash would (Serve starts a successor); False if it was gone."""
    import ray

    try:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        return True
    except Exception:  # it died already
        return False


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_healthy(url: str, limit_s: float = 90) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/healthz", timeout=30)
        if r.status_code == 200:
            return r.json()
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {limit_s} s: {r.text}")


# ----------------------------------------------------------------------------------------------
# The OpenAI contract


def test_openai_client_completions_json_and_stream(urls):
    c = client(urls["main"])
    out = c.completions.create(model="lacy", prompt="The capital of France is", max_tokens=6,
                               extra_body={"call_threshold": 0.0})
    (choice,) = out.choices
    assert out.object == "text_completion" and "Paris" in choice.text and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.model_extra["delegated_tokens"] == 6
    assert choice.model_extra["lacy"]["calls"] >= 1
    chunks = list(c.completions.create(model="lacy", prompt="The capital of France is", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"call_threshold": 0.0}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"
    echoed = c.completions.create(model="lacy", prompt="Paris is", max_tokens=3, echo=True, logprobs=1,
                                  extra_body={"allow_calls": False})
    assert echoed.choices[0].text.startswith("Paris is") and echoed.choices[0].logprobs.tokens


def test_models_list_and_retrieve(urls):
    c = client(urls["main"])
    assert [m.id for m in c.models.list()] == ["lacy"]
    model = c.models.retrieve("lacy")
    assert model.id == "lacy" and model.owned_by == "lacy" and model.model_extra["context"] == 128
    listing = httpx.get(f"{urls['main']}/v1/models", timeout=30).json()
    assert listing["big_model"]["parameters"] > 100_000_000  # SmolLM2-135M
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


@pytest.mark.parametrize("stream", [False, True])
def test_each_error_class_of_the_client(urls, stream):
    c = client(urls["main"])
    cases = [(openai.BadRequestError, {"prompt": "x", "max_tokens": 41}),
             (openai.BadRequestError, {"prompt": "x", "max_tokens": 3, "frequency_penalty": 0.5}),
             (openai.NotFoundError, {"prompt": "x", "model": "nope"})]
    for error, kwargs in cases:
        with pytest.raises(error) as caught:
            list(c.completions.create(**{"model": "lacy", **kwargs}, stream=stream)) if stream else \
                c.completions.create(**{"model": "lacy", **kwargs})
        assert caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as caught:
        c.completions.create(model="lacy", prompt="x" * 5000, stream=stream)
    assert caught.value.status_code == 413
    nobig = client(urls["nobig"])
    with pytest.raises(openai.InternalServerError) as caught:  # 503: every call needs the big model
        c_out = nobig.completions.create(model="lacy", prompt="x", max_tokens=3, stream=stream,
                                         extra_body={"call_threshold": 0.0})
        list(c_out) if stream else None
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "2"
    assert "no big model" in caught.value.body["message"]


def test_langchain_default_body(urls):
    body = {"model": "lacy", "prompt": ["Marie Curie was"], "temperature": 0.7, "top_p": 1, "frequency_penalty": 0,
            "presence_penalty": 0, "n": 1, "logit_bias": {}, "max_tokens": 32, "seed": None, "stream": False,
            "best_of": 1, "logprobs": None}
    r = httpx.post(f"{urls['tiny']}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_hostile_requests_get_4xx_and_the_app_stays_healthy(urls, stream):
    for body, status in HOSTILE:
        if stream and body.startswith(b"{") and body != b"{not json" and b'"stream"' not in body:
            body = body[:-1] + b', "stream": true}'
        r = httpx.post(f"{urls['main']}/v1/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:80], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text and "/tmp" not in r.text
    # FTS5 syntax in a topic is words to the store, not an error; an unknown route is OpenAI-shaped too.
    r = httpx.post(f"{urls['main']}/generate", timeout=120, json={
        "prompt": "Albert Einstein (", "max_tokens": 3, "call_threshold": 0.0, "retrieval": True,
        "topic": 'Einstein" OR NEAR(a* b) title:x'})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{urls['main']}/nothing", timeout=30).json()["error"]["code"] == "not_found"
    assert wait_healthy(urls["main"])["big_model"] == "ok"


def test_generate_answers_the_experiments_fields(urls):
    r = httpx.post(f"{urls['main']}/generate", timeout=120, json={
        "prompt": "The capital of France is", "model": "lacy", "max_tokens": 3, "allow_calls": True,
        "topic": "Paris", "retrieval": False, "call_trigger": "p_call", "call_threshold": 0.0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["calls"] == 3 and out["call_rate"] == 1.0 and out["decision_points"] == 3
    assert {s["source"] for s in out["spans"]} == {"prompt", "big"} and "Paris" in out["completion"]
    assert "".join(s["text"] for s in out["spans"]) == out["text"]
    r = httpx.post(f"{urls['main']}/generate", timeout=120, json={
        "prompt": "Marie Curie was", "max_tokens": 5, "allow_calls": False, "call_trigger": "confidence"})
    assert r.json()["calls"] == 0 and {s["source"] for s in r.json()["spans"]} <= {"prompt", "small"}


def test_bad_requests_in_a_batch_never_fail_the_others(urls):
    good = {"prompt": "The river", "max_tokens": 8, "call_threshold": 0.0}
    bad = {**good, "retrieval": True}  # the tiny app has no knowledge store
    with httpx.Client(timeout=120) as http:
        alone = http.post(f"{urls['tiny']}/generate", json=good).json()["text"]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda b: http.post(f"{urls['tiny']}/generate", json=b), [good, bad] * 12))
    assert [a.status_code for a in answers] == [200, 400] * 12
    assert {a.json()["text"] for a in answers[::2]} == {alone}
    assert all("no knowledge store" in a.json()["error"]["message"] for a in answers[1::2])


def test_torch_threads_apply_to_the_big_replica_too(urls):
    # The tiny app asks for 2; Ray's default for its fractional big_cpus is 1 (the big model ran on one
    # core while the bench compared it with two in process).
    big = httpx.get(f"{urls['tiny']}/v1/models", timeout=30).json()["big_model"]
    assert big["torch_threads"] == 2, big


def test_big_calls_that_arrive_during_a_batch_run_as_one_batch(urls):
    # @serve.batch formed a batch per 5 ms window even while the model was busy, so calls queued behind
    # it one by one; the replica's BatchQueue runs everything that arrived meanwhile as one batch.
    from ray import serve

    from lacy.cascade.big import BigCall

    big = serve.get_deployment_handle("BigModel", app_name="cascade")  # SmolLM2: a long call takes seconds
    before = big.health.remote().result(timeout_s=30)["stats"]
    start = time.monotonic()
    long = big.continue_call.remote(BigCall("batching-long", "One, two, three,", "tokens", 40, sent=time.time()))
    time.sleep(0.1)
    short = []
    for i in range(5):  # 20 ms apart: four times @serve.batch's wait
        short.append(big.continue_call.remote(BigCall(f"batching-{i}", "The river", "tokens", 1, sent=time.time())))
        time.sleep(0.02)
    sent_s = time.monotonic() - start
    out = long.result(timeout_s=60)
    long_s = time.monotonic() - start
    out = [out, *(r.result(timeout_s=60) for r in short)]
    after = big.health.remote().result(timeout_s=30)["stats"]
    assert all(o.error is None and o.text for o in out), out
    assert long_s > sent_s + 0.05, f"the long call ({long_s:.2f} s) must outlast the sends ({sent_s:.2f} s)"
    assert (after["calls"] - before["calls"], after["batches"] - before["batches"]) == (6, 2)


def test_cluster_quantile_holds_across_replicas(urls):
    import ray

    body = {"prompt": "A city", "max_tokens": 6, "call_rate": 0.3}
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: httpx.post(f"{urls['tiny']}/generate", json=body, timeout=120).json(),
                             range(8)))
    actor = ray.get_actor("quantiles-tiny", namespace="lacy")
    held = ray.get(actor.get.remote(0.3, ("lacy", "p_call")))
    assert held.seen == sum(o["decision_points"] for o in outs) > 8


def test_overload_answers_429_with_retry_after(urls):
    body = {"prompt": "The river", "max_tokens": 40, "allow_calls": False}
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{urls['nobig']}/generate", json=body, timeout=120),
                                range(10)))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429}, codes
    assert all(a.headers["retry-after"] == "2" for a in answers if a.status_code == 429)
    assert httpx.post(f"{urls['nobig']}/generate", json=body, timeout=120).status_code == 200


def test_a_client_that_disconnects_cancels_its_decoding(urls):
    before = wait_healthy(urls["main"])["cancelled"]
    with httpx.stream("POST", f"{urls['main']}/v1/completions", timeout=120, json={
            "prompt": "The", "max_tokens": 40, "call_threshold": 0.0, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{urls['main']}/healthz", timeout=30).json()
        if health["cancelled"] > before and health["decoding"] == 0:
            break
        time.sleep(0.2)
    assert health["cancelled"] == before + 1 and health["decoding"] == 0


def test_html_view_in_a_real_browser(urls, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    url = f"{urls['main']}/view?prompt=The+capital+of+France+is&max_tokens=3&call_threshold=0.0"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=60000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    assert 'data-source="big"' in dom, dom[:2000]
    assert "background:#ffd54f" in dom


def test_delete_removes_only_its_app(urls):
    from services.cascade import delete

    delete("nobig")
    assert httpx.post(f"{urls['nobig']}/generate", json={"prompt": "x"}, timeout=30).status_code == 404
    assert httpx.get(f"{urls['main']}/healthz", timeout=30).status_code == 200


# ----------------------------------------------------------------------------------------------
# What a local run listens on, and the README's examples against it

LOOPBACK = ("127.", "::ffff:127.", "::1")
RAY_HARD_CODED = "ray::ServeReplica"
"""Ray 2.60 starts each Serve replica's internal gRPC server on [::] (all interfaces) and offers no
option to bind it elsewhere: README's security section says so, with the mitigation."""


def test_a_local_run_listens_on_loopback_only_but_where_ray_hard_codes_it(urls):
    """Every TCP port this session's Ray (GCS, raylet, dashboard agent, workers, Serve's controller,
    proxy and replicas) and this process listen on: loopback, except the replicas' gRPC servers."""
    import os

    import psutil

    ours = [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(recursive=True)]
    listening: dict[str, set[str]] = {}
    for proc in ours:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            title = " ".join(proc.cmdline())
            name = title.split()[0].rsplit("/", 1)[-1] if not title.startswith("ray::") else title.split()[0]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.setdefault(name, set()).add(f"{conn.laddr.ip}:{conn.laddr.port}")
    print("\n".join(f"{name}: {sorted(addrs)}" for name, addrs in sorted(listening.items())))
    exposed = {name: sorted(a for a in addrs if not a.startswith(LOOPBACK)) for name, addrs in listening.items()}
    exposed = {name: addrs for name, addrs in exposed.items() if addrs}
    assert exposed and all(name.startswith(RAY_HARD_CODED) for name in exposed), exposed
    assert all(a.startswith(("::", "0.0.0.0")) for addrs in exposed.values() for a in addrs), exposed
    serve_port = int(urls["main"].rsplit(":", 1)[1])
    assert any(a == f"127.0.0.1:{serve_port}" for addrs in listening.values() for a in addrs)  # the HTTP proxy


def readme_blocks(path: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a Markdown file."""
    text = (Path(__file__).parent.parent / path).read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


NOT_RUN = {  # commands of README.md's bash blocks that start long jobs or servers: not run by the tests
    "make ": "make run / make test: the whole benchmark or suite", "serve ": "starts a blocking server on a trained "
    "model (the same app is what `urls` deploys)", "python -m ": "a stage of the pipeline (minutes to hours)",
    "source ": "sets the environment the tests already have",
    "GGUF=": "finds the llama.cpp example's model file (tests/test_openai_big.py serves it with llama.cpp)",
    "mlflow ui ": "starts the MLflow UI (tests/test_mlflow_record.py opens it in a browser)",
}


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("doc", ["README.md", "docs/serving.md"])
def test_every_code_example_of_the_docs_runs(urls, doc, tmp_path, tiny_tokenizer, embedded_docs, capsys):
    """Python blocks run as written (the served address rewritten to the test's); bash blocks' curl
    commands run; other commands are long jobs, named in NOT_RUN; no example goes unchecked."""
    ran = 0
    for lang, block in readme_blocks(doc):
        if lang == "python":
            code = block.replace("http://127.0.0.1:8000", urls["main"])
            if "tag_corpus" in code:  # the three lines over a corpus file and a tokenizer of the run
                (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in embedded_docs[:3]))
                tiny_tokenizer.save_pretrained(tmp_path / "runs" / "tiny" / "tokenizer")
                code = code.replace('"corpus.jsonl"', repr(str(tmp_path / "corpus.jsonl"))).replace(
                    '"runs/tiny/tokenizer"', repr(str(tmp_path / "runs/tiny/tokenizer")))
            exec(compile(code, f"{doc} example", "exec"), {})
            assert capsys.readouterr().out.strip(), f"{doc}: a Python example printed nothing"
            ran += 1
        elif lang == "bash":
            for command in shell_commands(block):
                if command.startswith("curl "):
                    command = command.replace("127.0.0.1:8000", urls["main"].removeprefix("http://"))
                    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
                    answer = json.loads(out.stdout) if out.returncode == 0 else {}
                    text = answer["choices"][0]["text"] if "choices" in answer else answer.get("text")
                    assert text, (command, out.stdout[:300])
                    ran += 1
                else:
                    assert command.startswith(tuple(NOT_RUN)), f"{doc}: an example nobody runs: {command}"
    assert ran >= 2, f"{doc}: {ran} examples ran"


# ----------------------------------------------------------------------------------------------
# Replicas killed



def test_allow_undelegated_answers_small_only_within_seconds_of_a_kill(urls):
    """The big replica dies while requests that take a small-only answer wait on its calls. Serve holds
    their calls for a successor rather than failing them, so each request's wait ends at
    serve.undelegated_wait_s (or at once, when a failed call or probe has marked the big model down) and
    it finishes small-only: they waited for the successor, up to big_timeout_s, before."""
    wait_healthy(urls["tiny"])
    body = {"prompt": "The river", "max_tokens": 6, "call_threshold": 0.0, "allow_undelegated": True}
    seen: list[tuple[float, float, int, bool | None]] = []
    stop, deadline = threading.Event(), time.monotonic() + 120

    def load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set() and time.monotonic() < deadline:  # bounded: the test's end, or time
                start = time.monotonic()
                r = http.post(f"{urls['tiny']}/generate", json=body)
                seen.append((start, time.monotonic(), r.status_code, r.json().get("delegated")))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(load) for _ in range(3)]
        time.sleep(3.0)
        (big,) = replicas("tiny", "BigModel")
        killed_at = time.monotonic()
        assert kill(big)
        time.sleep(6.0)
        stop.set()
        for future in futures:
            future.result(timeout=90)
    after = [(max(start, killed_at), end, code, delegated) for start, end, code, delegated in seen if end > killed_at]
    waits = [end - start for start, end, _, _ in after]
    print(f"{len(after)} requests after the kill; longest {max(waits):.2f} s; "
          f"undelegated {sum(d is False for *_, d in after)}")
    assert {code for _, _, code, _ in after} == {200} and False in {d for *_, d in after}
    assert max(waits) < FALLBACK_S, sorted(waits)[-5:]
    deadline = time.monotonic() + 120  # leave the app as it was: a successor answering
    while httpx.get(f"{urls['tiny']}/healthz", timeout=30).json()["big_model"] != "ok":
        assert time.monotonic() < deadline, "no big replica came back"
        time.sleep(0.5)


def test_a_short_soak_with_replicas_killed_answers_every_request(urls):
    """bench/soak.py's soak, short: steady load on the tiny app (two SmallModel replicas) while the
    BigModel replica, then a SmallModel replica, then the BigModel again are killed."""
    from bench.soak import soak

    wait_healthy(urls["tiny"])
    out = soak(urls["tiny"], "tiny", seconds=45, clients=3, kill_every_s=12, timeout_s=60)
    s = out["summary"]
    print({k: s[k] for k in ("requests", "statuses", "kills_by_deployment", "latency_s", "hung",
                             "streams_ended_by_error_event", "streams_cut_by_small_kill", "examples_not_as_promised")})
    assert s["kills"] == 3 and s["kills_by_deployment"] == {"BigModel": 2, "SmallModel": 1}, out["kills"]
    assert s["hung"] == 0 and s["not_answered_as_promised"] == 0, s["examples_not_as_promised"]
    assert s["streams_cut_by_small_kill"] == 0  # a stream under way on the killed replica ends with an error event
    assert s["streams_ended_by_error_event"] <= 3, [r["error"] for r in out["requests"] if r.get("error_event")]
    assert s["statuses"].get("200", 0) > s["requests"] // 2 and out["rss"], s
    deadline = time.monotonic() + 120  # leave the app as it was: every successor up
    while httpx.get(f"{urls['tiny']}/healthz", timeout=30).json()["big_model"] != "ok" or len(
            replicas("tiny", "SmallModel")) != 2 or len(replicas("tiny", "BigModel")) != 1:
        assert time.monotonic() < deadline, "the killed replicas did not come back"
        time.sleep(0.5)


def test_big_model_killed_under_load_then_back(urls):
    assert len(replicas("tiny", "BigModel")) == 1, replicas("tiny", "BigModel")
    body = {"prompt": "The river", "max_tokens": 6, "call_threshold": 0.0}
    stop, deadline = threading.Event(), time.monotonic() + 150

    def load(allow_undelegated: bool) -> list[tuple[int, bool | None]]:
        seen = []
        with httpx.Client(timeout=60) as http:
            while not stop.is_set() and time.monotonic() < deadline:  # bounded: the outage is over, or time
                r = http.post(f"{urls['tiny']}/generate", json={**body, "allow_undelegated": allow_undelegated})
                seen.append((r.status_code, r.json().get("delegated")))
                time.sleep(0.05)  # leave the two cores to the replica Serve is starting
        return seen

    def big_ok() -> bool:
        return httpx.get(f"{urls['tiny']}/healthz", timeout=30).json().get("big_model") == "ok"

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, flag) for flag in (False, False, True, True)]
        time.sleep(1.0)
        # One kill can be masked: a successor up within the health probe's timeout and the retried call's
        # big_timeout_s leaves no request to see an outage. Killing each successor for 12 s (longer than
        # both) makes the outage certain.
        killed, outage_end = 0, time.monotonic() + 12
        while time.monotonic() < outage_end:
            killed += sum(kill(actor) for actor in replicas("tiny", "BigModel"))
            time.sleep(0.2)
        back = time.monotonic() + 120  # Serve starts a new replica
        while time.monotonic() < back and not big_ok():
            time.sleep(0.5)
        time.sleep(1.0)
        stop.set()
        strict = futures[0].result(timeout=90) + futures[1].result(timeout=90)
        lenient = futures[2].result(timeout=90) + futures[3].result(timeout=90)
    assert killed >= 1 and big_ok()
    # A strict request gets 503 or, when its retried call reaches a successor within big_timeout_s,
    # a delegated answer; never an undelegated one. A lenient one is always answered, small-only in the outage.
    assert {code for code, _ in strict} <= {200, 503} and all(flag for code, flag in strict if code == 200)
    assert {code for code, _ in lenient} == {200} and False in {flag for _, flag in lenient}
    r = httpx.post(f"{urls['tiny']}/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["delegated"] and r.json()["calls"] == 6
