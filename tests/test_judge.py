"""lacy.judge: the FActScore LLM-judge protocol against a real local OpenAI-compatible completions
server running a real (tiny) transformers model, with a real SQLite passage store."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from people import ADA, ADA_ARTICLE, ARTICLES, BOB_ARTICLE

from lacy.cascade.knowledge import SqlitePassageStore
from lacy.eval.claims import Generation
from lacy.judge import JudgeError, OpenAIJudge, judge_factscore, parse_facts, parse_verdict


@pytest.fixture()
def store(tmp_path):
    with SqlitePassageStore(tmp_path / "kb.sqlite", passage_words=12) as s:
        s.add(ARTICLES.values())
        yield s


# ----------------------------------------------------------------------------------------------
# LLM judge through a real local OpenAI-compatible completions server


def test_parse_facts_and_verdict():
    assert parse_facts(" - Ada was a chemist.\n- Ada was British.\n\nPlease breakdown") == [
        "Ada was a chemist.", "Ada was British."]
    assert parse_facts("I cannot do that.\n- a fact") == []
    assert parse_facts("- A.\n- B.\n- A.\n- B.\n- A") == ["A.", "B.", "A"]
    assert parse_verdict(" True") and not parse_verdict(" False.")
    assert parse_verdict("False... no, True")          # the later answer wins
    assert not parse_verdict("I cannot say")
    assert parse_verdict("It is correct")


class CompletionServer:
    """/v1/completions served by a real HF causal LM, greedy; records every request and answer."""

    def __init__(self, model, tokenizer, max_positions: int) -> None:
        self.requests: list[tuple[dict, str]] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                if self.path != "/v1/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if req["model"] == "broken":
                    return self._send(500, {"error": "model broken"})
                with lock:
                    text = server.generate(req["prompt"], req["max_tokens"], req.get("stop") or [])
                    server.requests.append((req, text))
                self._send(200, {"object": "text_completion", "model": req["model"],
                                 "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})

        self.model, self.tokenizer, self.max_positions = model, tokenizer, max_positions
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def generate(self, prompt: str, max_tokens: int, stop: list[str]) -> str:
        ids = self.tokenizer(prompt)["input_ids"][-(self.max_positions - max_tokens):]
        batch = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(batch, attention_mask=torch.ones_like(batch),
                                      max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or 0,
                                      stop_strings=stop or None, tokenizer=self.tokenizer)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        return text

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tiny_server():
    from transformers import GPT2LMHeadModel

    from lacy.corpus.tokenizer import train_tokenizer
    from lacy.model import gpt2_config

    tok = train_tokenizer([ADA_ARTICLE, BOB_ARTICLE] * 5, vocab_size=320)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config("tiny", len(tok), 1024, eos_id=tok.eos_token_id,
                                        bos_id=tok.eos_token_id, pad_id=tok.pad_token_id)).eval()
    server = CompletionServer(model, tok, 1024)
    yield server
    server.close()


def test_openai_judge_plumbing_and_cache(tiny_server, tmp_path, store):
    judge = OpenAIJudge(tiny_server.url + "/v1", "tiny-gpt2", tmp_path / "judge.sqlite")
    text = judge.complete("Ada Lovelace was", max_tokens=5)
    (req, answer), = tiny_server.requests[-1:]
    assert req == {"model": "tiny-gpt2", "prompt": "Ada Lovelace was", "max_tokens": 5, "temperature": 0.0,
                   "stop": None}
    assert text == answer and judge.http_calls == 1
    assert text == tiny_server.generate("Ada Lovelace was", 5, [])      # what the model writes, greedy

    passages = store.search("Ada Lovelace born 1920", 2, title="Ada Lovelace")
    verdict = judge.verify("Ada Lovelace was born in 1920.", "Ada Lovelace", passages)
    req, answer = tiny_server.requests[-1]
    assert req["prompt"].startswith("Answer the question about Ada Lovelace based on the given context.")
    assert req["prompt"].endswith("Input: Ada Lovelace was born in 1920. True or False?\nOutput:")
    assert f"Title: Ada Lovelace\nText: {passages[0].text}" in req["prompt"]
    assert verdict == parse_verdict(answer)

    gens = [Generation(ADA, "Ada Lovelace (born 1920) was a chemist. She moved to Paris.")]
    before = len(tiny_server.requests)
    report = judge_factscore(judge, gens, store, k=2)
    sent = [r for r, _ in tiny_server.requests[before:]]
    assert sent[0]["prompt"].endswith("independent facts: Ada Lovelace (born 1920) was a chemist.\n")
    assert sent[0]["stop"] == ["\n\n"]
    n_facts = len(report.entities[0].claims)
    assert len(sent) == 2 + n_facts == judge.http_calls - 2
    assert report.mode == "llm-judge (top-2 passages)"

    # A fresh judge on the same cache repeats everything without one HTTP call.
    again = OpenAIJudge(tiny_server.url, "tiny-gpt2", tmp_path / "judge.sqlite")
    count = len(tiny_server.requests)
    assert again.complete("Ada Lovelace was", max_tokens=5) == text
    report2 = judge_factscore(again, gens, store, k=2)
    assert again.http_calls == 0 and len(tiny_server.requests) == count
    assert report2.entities[0].claims == report.entities[0].claims
    assert report2.entities[0].supported == report.entities[0].supported


@pytest.mark.slow
def test_openai_judge_with_smollm2(tmp_path, store):
    """The same protocol against SmolLM2-135M-Instruct (the project's big model) behind the server."""
    from lacy.model import load_big_model

    model, tok = load_big_model("smollm2")
    server = CompletionServer(model, tok, max_positions=8192)
    try:
        judge = OpenAIJudge(server.url + "/v1", "smollm2", tmp_path / "judge.sqlite", timeout=300)
        facts = judge.atomic_facts("Ada Lovelace (born 1920) was a British chemist.")
        req, answer = server.requests[-1]
        assert facts and facts == parse_facts(answer)      # a real instruct model follows the "- " format
        assert "\n\n" not in answer                        # stop sequence honoured by the server
        fact = facts[0]
        verdict = judge.verify(fact, "Ada Lovelace", store.search(fact, 2, title="Ada Lovelace"))
        assert verdict == parse_verdict(server.requests[-1][1])
        again = OpenAIJudge(server.url, "smollm2", tmp_path / "judge.sqlite")
        assert again.atomic_facts("Ada Lovelace (born 1920) was a British chemist.") == facts
        assert again.http_calls == 0 and len(server.requests) == 2
    finally:
        server.close()


def test_openai_judge_errors(tiny_server, tmp_path):
    judge = OpenAIJudge(tiny_server.url, "broken", tmp_path / "judge.sqlite")
    with pytest.raises(JudgeError, match="HTTP 500.*model broken"):
        judge.complete("hello")
    # The failure was not cached.
    assert judge._cache.execute("SELECT count(*) FROM calls").fetchone()[0] == 0
    wrong_path = OpenAIJudge(tiny_server.url + "/api", "tiny-gpt2", tmp_path / "judge.sqlite")
    with pytest.raises(JudgeError, match="HTTP 404"):
        wrong_path.complete("hello")
    # A socket that accepts connections and never answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(JudgeError, match="no answer from .* within 0.5 s"):
            OpenAIJudge(url, "m", tmp_path / "other.sqlite", timeout=0.5).complete("hi")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_port
    closed.server_close()
    with pytest.raises(JudgeError, match=f"cannot reach http://127.0.0.1:{port}/v1/completions"):
        OpenAIJudge(f"http://127.0.0.1:{port}", "m", tmp_path / "other.sqlite", timeout=5).complete("hi")
