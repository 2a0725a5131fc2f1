"""The Serve cascade over real HTTP on 127.0.0.1: a tiny small model, SmolLM2 as the big model."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lacy.config import ModelConfig, load_config
from lacy.model import build_model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", seq_len=64), tiny_tokenizer)
    path = tmp_path_factory.mktemp("small")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_url(ray_session, small_dir, tmp_path_factory):
    from ray import serve

    from services.cascade import run

    port = _free_port()
    cfg = load_config(None, [
        "--run_dir", str(tmp_path_factory.mktemp("serve_run")), "--serve.small_path", str(small_dir),
        "--serve.port", str(port), "--serve.small_cpus", "0.2", "--serve.big_cpus", "0.2",
        "--cascade.word_start_only", "false", "--serve.max_tokens_limit", "40"])
    run(cfg)
    # The same small model without a big model: every call is the 503 path.
    nobig = load_config(None, ["--run_dir", cfg.run_dir, "--serve.small_path", str(small_dir),
                               "--serve.big_enabled", "false", "--serve.small_cpus", "0.1",
                               "--cascade.word_start_only", "false"])
    from services.cascade import build_app

    serve.run(build_app(nobig), name="nobig", route_prefix="/nobig")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_healthz_and_models(base_url):
    r = httpx.get(f"{base_url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(f"{base_url}/v1/models", timeout=60).json()
    assert models["data"][0]["id"] == "lacy"
    assert models["big_model"]["parameters"] > 100_000_000  # SmolLM2-135M


def test_generate_delegates_every_step_at_threshold_zero(base_url):
    # P(<CALL>) > 0 everywhere, so a threshold of 0 sends every decision to the big model.
    r = httpx.post(f"{base_url}/generate", json={"prompt": "The capital of France is", "max_tokens": 3,
                                                 "call_threshold": 0.0}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["calls"] == 3 and out["call_rate"] == 1.0
    assert {s["source"] for s in out["spans"]} == {"prompt", "big"}
    assert "".join(s["text"] for s in out["spans"]) == out["text"]
    assert "Paris" in out["completion"]
    assert out["tokens_processed"]["big"] > 0 and out["timings"]["total"] > 0


def test_generate_without_calls_is_small_only(base_url):
    r = httpx.post(f"{base_url}/generate", json={"prompt": "Marie Curie was", "max_tokens": 5,
                                                 "allow_calls": False}, timeout=60)
    out = r.json()
    assert r.status_code == 200 and out["calls"] == 0
    assert {s["source"] for s in out["spans"]} <= {"prompt", "small"}


def test_concurrent_requests_share_small_model_passes(base_url):
    prompts = ["Marie Curie was", "The river", "Albert Einstein", "In 1905 the", "She was born", "A city"]

    def body(prompt: str) -> dict:
        return {"prompt": prompt, "max_tokens": 12, "call_threshold": 0.999}  # a few calls at most

    with httpx.Client(base_url=base_url, timeout=120) as http:
        alone = [http.post("/generate", json=body(p)).json()["text"] for p in prompts]
        before = http.get("/healthz").json()
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: httpx.post(f"{base_url}/generate", json=body(p),
                                                          timeout=120).json()["text"], prompts))
        after = http.get("/healthz").json()
    assert together == alone
    passes, steps = after["small_passes"] - before["small_passes"], after["small_steps"] - before["small_steps"]
    assert steps >= len(prompts) * 12 and passes < steps, (passes, steps)
    assert after["decoding"] == 0


def test_openai_completions_shape(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "lacy", "prompt": "Paris is",
                                                       "max_tokens": 4, "temperature": 0,
                                                       "call_rate": 0.5}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 1
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] >= 1
    assert 0.0 <= body["lacy"]["call_rate"] <= 1.0


def test_stream_through_the_composition(base_url):
    events = []
    with httpx.stream("POST", f"{base_url}/v1/completions",
                      json={"prompt": "The capital of France is", "max_tokens": 2, "call_threshold": 0.0,
                            "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    sources = [c["choices"][0]["source"] for c in chunks if c["choices"][0]["text"]]
    assert sources and set(sources) == {"big"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["lacy"]["calls"] == 2


@pytest.mark.parametrize("body,status,needle", [
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": "x", "max_tokens": 41}, 422, "exceeds the limit"),
    ({"prompt": "x" * 5000}, 413, "limit"),
    ({"prompt": "x", "frobnicate": 1}, 422, "frobnicate"),
    ({"prompt": "x", "call_rate": 1.5}, 422, "call_rate"),
    ({"prompt": "x", "call_threshold": 0.2, "call_rate": 0.2}, 422, "not both"),
    ({"prompt": "x", "temperature": 0.7}, 422, "temperature"),
    ({"prompt": "x", "model": "nope"}, 404, "unknown model"),
])
def test_bad_requests_get_4xx_with_a_message(base_url, body, status, needle):
    r = httpx.post(f"{base_url}/generate", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_invalid_json_is_422(base_url):
    r = httpx.post(f"{base_url}/generate", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 422


def test_big_model_unavailable_is_503_or_flagged(base_url):
    body = {"prompt": "Paris is", "max_tokens": 3, "call_threshold": 0.0}
    r = httpx.post(f"{base_url}/nobig/generate", json=body, timeout=60)
    assert r.status_code == 503 and "big model unavailable" in r.text
    r = httpx.post(f"{base_url}/nobig/generate", json={**body, "allow_undelegated": True}, timeout=60)
    out = r.json()
    assert r.status_code == 200 and out["delegated"] is False and out["calls"] == 0
    assert "no big model" in out["undelegated_reason"]


def test_html_view_in_a_real_browser(base_url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    url = f"{base_url}/view?prompt=The+capital+of+France+is&max_tokens=3&call_threshold=0.0"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=60000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    assert 'data-source="big"' in dom, dom[:2000]
    assert "background:#ffd54f" in dom
    shot = tmp_path / "view.png"
    subprocess.run([chromium, *flags, "--window-size=900,500", f"--screenshot={shot}", url],
                   capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 1000
