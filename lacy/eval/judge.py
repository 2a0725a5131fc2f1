"""FActScore with an LLM judge behind any OpenAI-compatible completions server (the `llm_judge` section).

    judge = LLMJudge.from_config(cfg)                # None when llm_judge.base_url is unset
    scores = judge.score(generations, store, k=3)    # per biography: (precision or None, atomic facts)

As in FActScore (Min et al., 2023): the LLM breaks each sentence of a biography into atomic facts (a
few-shot prompt of "- fact" lines), then answers True or False for each fact given the top-k passages of
the person's article retrieved for it (the passage store's `search(topic + fact, k, title=topic)`). A biography's
precision is its supported facts over its facts; one without facts abstained. Completions are greedy and
cached in SQLite by a hash of the request, so a rerun asks the server nothing twice; the server is reached
through the big model's own backend (`lacy.cascade.openai_big.OpenAIBig`: retries, errors naming the
llm_judge fields). The evaluation adds the results to each row as its *_judge columns (`lacy.eval.row.add_judge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lacy.core.config import LacyConfig
from lacy.eval.claims import PassageSearch
from lacy.eval.generate import Generation

log = logging.getLogger(__name__)

FACTS_DEMOS = (
    ("He made his acting debut in the film The Moon is the Sun's Dream (1992), and continued to appear in small "
     "and supporting roles throughout the 1990s.",
     ["He made his acting debut in the film.", "He made his acting debut in The Moon is the Sun's Dream.",
      "The Moon is the Sun's Dream is a film.", "The Moon is the Sun's Dream was released in 1992.",
      "After his acting debut, he appeared in small and supporting roles.",
      "After his acting debut, he appeared in small and supporting roles throughout the 1990s."]),
    ("He is also a successful producer and engineer, having worked with a wide variety of artists, including "
     "Willie Nelson, Tim McGraw, and Taylor Swift.",
     ["He is successful.", "He is a producer.", "He is a engineer.", "He has worked with a wide variety of artists.",
      "Willie Nelson is an artist.", "He has worked with Willie Nelson.", "Tim McGraw is an artist.",
      "He has worked with Tim McGraw.", "Taylor Swift is an artist.", "He has worked with Taylor Swift."]),
)
"""FActScore's atomic-fact demonstrations (two of its own; it retrieves more by BM25 from a larger set)."""
BREAKDOWN = "Please breakdown the following sentence into independent facts: "
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def facts_prompt(sentence: str) -> str:
    """FActScore's atomic-fact prompt: the demonstrations, then the sentence."""
    demos = "".join(f"{BREAKDOWN}{s}\n" + "".join(f"- {f}\n" for f in facts) + "\n" for s, facts in FACTS_DEMOS)
    return f"{demos}{BREAKDOWN}{sentence}\n"


def verify_prompt(fact: str, topic: str, passages: Sequence[Any]) -> str:
    """FActScore's verification prompt: the passages (best last), then "Input: <fact> True or False?"."""
    context = "".join(f"Title: {p.title}\nText: {p.text}\n\n" for p in reversed(passages))
    return (f"Answer the question about {topic} based on the given context.\n\n{context.strip()}\n\n"
            f"Input: {fact.strip()} True or False?\nOutput:")


def parse_facts(completion: str) -> list[str]:
    """Atomic facts from a completion: its leading "- fact" lines, up to the first other line, each once
    (small judges repeat their list until the token limit)."""
    facts: list[str] = []
    for line in completion.strip().splitlines():
        if not line.startswith("- "):
            break
        if (fact := line[2:].strip()) and fact not in facts:
            facts.append(fact)
    return facts


def parse_verdict(completion: str) -> bool:
    """FActScore's reading of a True/False answer: the one that occurs (the later one if both); with
    neither, supported unless it says not / cannot / unknown / information."""
    answer = completion.lower()
    if "true" in answer or "false" in answer:
        if "true" in answer and "false" in answer:
            return answer.index("true") > answer.index("false")
        return "true" in answer
    return all(word not in answer for word in ("not", "cannot", "unknown", "information"))


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s.strip()]


class LLMJudge:
    """Atomic facts and verdicts from `complete(prompt, max_tokens, stop) -> text`, every completion cached
    in the SQLite file `cache_path` under a hash of (`model_id`, prompt, max_tokens, stop); `asked` counts
    the completions the server was asked for (cache misses)."""

    def __init__(self, complete: Callable[[str, int, list[str] | None], str], cache_path: str | Path,
                 model_id: str, concurrency: int = 4, facts_max_tokens: int = 128) -> None:
        self._complete, self.model_id, self.concurrency = complete, model_id, concurrency
        self.facts_max_tokens = facts_max_tokens
        self.asked = 0
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache = sqlite3.connect(str(cache_path), check_same_thread=False)
        with self._cache:
            self._cache.execute("CREATE TABLE IF NOT EXISTS completions "
                                "(key TEXT PRIMARY KEY, request TEXT, text TEXT)")

    @classmethod
    def from_config(cls, cfg: LacyConfig) -> LLMJudge | None:
        """The judge of `cfg.llm_judge` (None when its base_url is unset); its server is asked for its model
        list at once, so a wrong URL or key fails here, naming the field."""
        jcfg = cfg.llm_judge
        if jcfg.base_url is None:
            return None
        from lacy.cascade.openai_big import OpenAIBig  # httpx, here as for every big backend: a GPU box lacks it

        server = OpenAIBig.connect(jcfg.big_config(), "llm_judge")
        return cls(server.complete, jcfg.cache_path or Path(cfg.run_dir) / "llm_judge.sqlite",
                   f"{jcfg.base_url}|{server.model()}", jcfg.concurrency, jcfg.facts_max_tokens)

    def complete(self, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
        request = json.dumps([self.model_id, prompt, max_tokens, stop])
        key = hashlib.sha256(request.encode()).hexdigest()
        with self._lock:
            row = self._cache.execute("SELECT text FROM completions WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        text = self._complete(prompt, max_tokens, stop)
        with self._lock, self._cache:
            self.asked += 1
            self._cache.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?)", (key, request, text))
        return text

    def atomic_facts(self, sentence: str) -> list[str]:
        return parse_facts(self.complete(facts_prompt(sentence), self.facts_max_tokens, ["\n\n"]))

    def verify(self, fact: str, topic: str, passages: Sequence[Any]) -> bool:
        return parse_verdict(self.complete(verify_prompt(fact, topic, passages), 8, ["\n"]))

    def judge(self, generation: Generation, store: PassageSearch, k: int) -> tuple[float | None, int]:
        """(supported facts / facts, or None without any; the number of facts) of one biography."""
        topic = generation.entity.title
        facts = [f for s in sentences(generation.text) for f in self.atomic_facts(s)]
        # FActScore's query is the topic and the fact: every passage of the article matches its title.
        verdicts = [self.verify(f, topic, store.search(f"{topic} {f}", k, title=topic)) for f in facts]
        return (sum(verdicts) / len(verdicts) if verdicts else None), len(facts)

    def score(self, generations: Sequence[Generation], store: PassageSearch, k: int) -> list[tuple[float | None, int]]:
        """`judge` of every biography, `concurrency` at a time, in order."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda g: self.judge(g, store, k), generations))
