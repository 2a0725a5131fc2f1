"""FActScore's LLM judge (`lacy.eval.judge`) against a real llama.cpp server serving SmolLM2 (tests/llama_server.py):
its prompts, its reading of the answers, its cache, the errors naming the llm_judge fields, its row columns."""

from __future__ import annotations

import pytest
from llama_server import free_port
from people import ADA, ARTICLES, BOB

from lacy.cascade.knowledge import SqlitePassageStore
from lacy.core.config import ConfigError, load_config
from lacy.eval.generate import Generation
from lacy.eval.judge import BREAKDOWN, LLMJudge, facts_prompt, parse_facts, parse_verdict, sentences
from lacy.eval.row import Row, add_judge

KEY_ENV = "LACY_TEST_JUDGE_KEY"


def test_parse_facts_verdicts_and_sentences():
    assert parse_facts(" - Ada was a chemist.\n- Ada was British.\n\nPlease breakdown") == [
        "Ada was a chemist.", "Ada was British."]
    assert parse_facts("I cannot do that.\n- a fact") == []
    assert parse_facts("- A.\n- B.\n- A.\n- B.\n- A") == ["A.", "B.", "A"]  # a small judge repeating itself
    assert parse_verdict(" True") and not parse_verdict(" False.")
    assert parse_verdict("False... no, True")  # the later answer wins
    assert not parse_verdict("I cannot say") and parse_verdict("It is correct")
    assert sentences("Ada (born 1920) was a chemist. She moved!  Then? ") == [
        "Ada (born 1920) was a chemist.", "She moved!", "Then?"]
    prompt = facts_prompt("Ada was a chemist.")
    assert prompt.count(BREAKDOWN) == 3 and prompt.endswith(f"{BREAKDOWN}Ada was a chemist.\n")


def test_judge_columns_of_a_row():
    row = Row("s", 3)
    add_judge(row, [(1.0, 2), (None, 0), (0.5, 4)], bootstrap=200, seed=0)
    assert row.precision_judge == 0.75 and row.respond_ratio_judge == pytest.approx(2 / 3)
    assert row.facts_per_response_judge == 3.0 and row.entity_scores_judge == [1.0, None, 0.5]
    assert row.precision_judge_lo <= 0.75 <= row.precision_judge_hi
    assert Row.from_dict(row.to_dict()).precision_judge == 0.75
    with pytest.raises(ValueError, match="2 judged biographies for a row of 3 people"):
        add_judge(Row("s", 3), [(1.0, 1)] * 2, bootstrap=10, seed=0)


def _cfg(tmp_path, url: str, *more: str):
    return load_config(None, ["--run_dir", str(tmp_path / "run"), "--llm_judge.base_url", url,
                              "--llm_judge.extra_body", "{repeat_penalty: 1.0}", "--llm_judge.facts_max_tokens", "40",
                              "--llm_judge.retries", "0", *more])


@pytest.mark.slow
def test_the_judge_on_a_real_server_asks_facts_then_verdicts_and_caches_them(llama_server, tmp_path):
    store = SqlitePassageStore(tmp_path / "kb.sqlite", passage_words=12)
    store.add(ARTICLES.values())
    judge = LLMJudge.from_config(_cfg(tmp_path, llama_server.url))
    asked: list[tuple[str, int, list[str] | None]] = []
    complete = judge._complete
    judge._complete = lambda prompt, n, stop: asked.append((prompt, n, stop)) or complete(prompt, n, stop)
    text = "Ada Lovelace (born 1920) was a British chemist."
    [(precision, facts)] = judge.score([Generation(ADA, text)], store, k=2)
    # One list of atomic facts for the one sentence, then one True/False per fact, each with its passages.
    assert asked[0] == (facts_prompt(text), 40, ["\n\n"]) and facts >= 1
    verifies = asked[1:]
    assert len(verifies) == facts == judge.asked - 1
    for prompt, n, stop in verifies:
        assert prompt.startswith("Answer the question about Ada Lovelace based on the given context.\n\nTitle: "
                                 "Ada Lovelace\nText: ") and prompt.endswith("True or False?\nOutput:")
        assert (n, stop) == (8, ["\n"])
    assert 0.0 <= precision <= 1.0
    # The same question again, by a new judge on the same cache: nothing asked, the same answer.
    again = LLMJudge.from_config(_cfg(tmp_path, llama_server.url))
    assert again.score([Generation(ADA, text)], store, k=2) == [(precision, facts)] and again.asked == 0
    # A biography without a sentence has no fact: it abstains.
    assert judge.score([Generation(BOB, "")], store, k=2) == [(None, 0)]


def test_a_wrong_url_or_key_is_refused_naming_the_llm_judge_field(llama_server, tmp_path, monkeypatch):
    root = llama_server.url.removesuffix("/v1")
    with pytest.raises(ConfigError, match=r"llm_judge\.base_url/llm_judge\.model: /models answered 404"):
        LLMJudge.from_config(_cfg(tmp_path, root))
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"llm_judge\.api_key_env: the environment variable {KEY_ENV} is not set"):
        LLMJudge.from_config(_cfg(tmp_path, llama_server.url, "--llm_judge.api_key_env", KEY_ENV))
    with pytest.raises(ConfigError, match="llm_judge.api_key_env: must be the NAME"):
        _cfg(tmp_path, llama_server.url, "--llm_judge.api_key_env", "sk-123")
    assert LLMJudge.from_config(load_config(None, ["--run_dir", str(tmp_path)])) is None  # off by default
    # A server that is not there: the evaluation cannot judge, and says which server.
    gone = LLMJudge.from_config(_cfg(tmp_path, f"http://127.0.0.1:{free_port()}/v1", "--llm_judge.model", "x"))
    with pytest.raises(Exception, match="the server of llm_judge did not answer"):
        gone.complete("x", 1)
