"""The FActScore protocol with an LLM judge behind an OpenAI-compatible completions endpoint.

    judge = OpenAIJudge("http://127.0.0.1:8080/v1", "smollm2", "runs/judge.sqlite")
    report = judge_factscore(judge, generations, store, k=5)      # a lacy.eval.claims.FactReport

As in FActScore, the LLM lists the atomic facts of each sentence of a generation (one few-shot
demonstration, "- fact" lines), then answers True/False for each fact against the top-k passages of
the person's article retrieved for it. Completions are greedy, and every call is cached on disk by a
hash of the request, so a rerun makes no HTTP call. Scoring (precision, length penalty, structured
attributes) is `lacy.eval.claims`'s, shared with the spaCy-claim modes.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lacy.eval.claims import Claim, FactReport, Generation, PassageSearch, report_from_claims

_FACTS_DEMO = (
    "Please breakdown the following sentence into independent facts: He made his acting debut in the "
    "film The Moon is the Sun's Dream (1992), and continued to appear in small and supporting roles "
    "throughout the 1990s.\n- He made his acting debut in the film.\n- He made his acting debut in The "
    "Moon is the Sun's Dream.\n- The Moon is the Sun's Dream is a film.\n- The Moon is the Sun's Dream "
    "was released in 1992.\n- After his acting debut, he appeared in small and supporting roles.\n"
    "- After his acting debut, he appeared in small and supporting roles throughout the 1990s.\n\n")


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something unusable; the message names the URL."""


def parse_facts(completion: str) -> list[str]:
    """Atomic facts from a completion: its leading "- fact" lines, up to the first other line, each
    once (small judges repeat their list until the token limit)."""
    facts: list[str] = []
    for line in completion.strip().splitlines():
        if not line.startswith("- "):
            break
        fact = line[2:].strip()
        if fact and fact not in facts:
            facts.append(fact)
    return facts


def parse_verdict(completion: str) -> bool:
    """FActScore's reading of a True/False answer: the one that occurs (the later one if both);
    with neither, supported unless it says not / cannot / unknown / information."""
    answer = completion.lower()
    if "true" in answer or "false" in answer:
        if "true" in answer and "false" in answer:
            return answer.index("true") > answer.index("false")
        return "true" in answer
    return all(word not in answer for word in ("not", "cannot", "unknown", "information"))


class OpenAIJudge:
    """Greedy completions from `base_url` (".../v1" or the server root), every call cached in the
    SQLite file `cache_path` keyed by sha256 of the request; `http_calls` counts real requests."""

    def __init__(self, base_url: str, model: str, cache_path: str | Path, timeout: float = 120.0,
                 api_key: str | None = None) -> None:
        root = base_url.rstrip("/")
        self.url = root + ("/completions" if root.endswith("/v1") else "/v1/completions")
        self.model, self.timeout, self.api_key = model, timeout, api_key
        self.http_calls = 0
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        self._cache = sqlite3.connect(cache_path, check_same_thread=False)
        with self._cache:
            self._cache.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, request TEXT, "
                                "completion TEXT)")

    def complete(self, prompt: str, max_tokens: int = 128, stop: list[str] | None = None) -> str:
        request = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                   "stop": stop}
        body = json.dumps(request, sort_keys=True)
        key = hashlib.sha256(body.encode()).hexdigest()
        row = self._cache.execute("SELECT completion FROM calls WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise JudgeError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc
        except TimeoutError as exc:
            raise JudgeError(f"no answer from {self.url} within {self.timeout} s") from exc
        except (urllib.error.URLError, ConnectionError) as exc:
            raise JudgeError(f"cannot reach {self.url}: {exc}") from exc
        self.http_calls += 1
        try:
            completion = json.loads(raw)["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"{self.url} answered no completion text: {raw[:300]!r}") from exc
        if not isinstance(completion, str):
            raise JudgeError(f"{self.url} answered a non-string completion: {completion!r}")
        with self._cache:
            self._cache.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?)", (key, body, completion))
        return completion

    def atomic_facts(self, sentence: str) -> list[str]:
        prompt = f"{_FACTS_DEMO}Please breakdown the following sentence into independent facts: {sentence}\n"
        return parse_facts(self.complete(prompt, max_tokens=128, stop=["\n\n"]))

    def verify(self, fact: str, topic: str, passages: Sequence[Any]) -> bool:
        """FActScore's prompt: the passages (best last), then "Input: <fact> True or False?"."""
        context = "".join(f"Title: {p.title}\nText: {p.text}\n\n" for p in reversed(passages))
        definition = f"Answer the question about {topic} based on the given context.\n\n{context.strip()}"
        prompt = f"{definition.strip()}\n\nInput: {fact.strip()} True or False?\nOutput:"
        return parse_verdict(self.complete(prompt, max_tokens=8))


def judge_factscore(judge: OpenAIJudge, generations: Sequence[Generation], store: PassageSearch, *,
                    k: int = 5, length_penalty: bool = False, gamma: float = 10) -> FactReport:
    """FActScore with an LLM: atomic facts per sentence, each verified against the top-k passages of
    the person's article retrieved for the fact."""
    claims = []
    for gen in generations:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", gen.text.strip()) if s]
        claims.append([Claim(fact, "ATOMIC", -1, -1, s) for s in sentences for fact in judge.atomic_facts(s)])

    def verified(gen: Generation, claim: Claim) -> bool:
        passages = store.search(claim.text, k, title=gen.entity.title)
        return judge.verify(claim.text, gen.entity.title, passages)

    return report_from_claims(f"llm-judge (top-{k} passages)", generations, claims, verified, length_penalty, gamma)
