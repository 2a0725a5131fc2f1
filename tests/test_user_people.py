"""A user's people and outputs others read: a list of names (FActScore's prompt_entities.txt, or JSONL with
`topic`) with a knowledge file (JSONL {title, text}) makes any corpus, a corpus of files too, evaluable;
every evaluated biography is exported as FActScore's input ({topic, output}, plus our spans); the LLM judge
adds its columns. End to end: the one-process experiment on a corpus of files, the big side and the judge
both a real llama.cpp server (tests/llama_server.py)."""

from __future__ import annotations

import csv
import json

import pytest

from lacy.core.config import ConfigError, load_config
from lacy.corpus.corpora import CorpusError, Listed, corpus_for
from lacy.corpus.people import PeopleFileError, knowledge_file, listed_people
from lacy.eval.plan import population


def _people_docs(embedded_docs: list[dict], n: int) -> list[dict]:
    return [d for d in embedded_docs if d.get("topic") == "People"][:n]


def _files(tmp_path, embedded_docs, people: int = 6, corpus_docs: int = 120):
    """A corpus of files (no people of its own), a list of people in it, and their articles."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({k: d[k] for k in ("id", "title", "text")}) + "\n"
                              for d in embedded_docs[:corpus_docs]))
    chosen = _people_docs(embedded_docs, people)
    names = tmp_path / "prompt_entities.txt"
    names.write_text("".join(d["title"] + "\n" for d in chosen))
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text("".join(json.dumps({"title": d["title"], "text": d["text"]}) + "\n" for d in chosen)
                         + json.dumps({"title": "Somebody Else", "text": "Somebody Else was a painter."}) + "\n")
    return corpus, names, knowledge, [d["title"] for d in chosen]


def test_people_files_in_both_formats_and_their_errors(tmp_path):
    (tmp_path / "names.txt").write_text("\ufeffAda Lovelace\n\n  Bob Marley  \nAda Lovelace\n")
    assert [e.name for e in listed_people(tmp_path / "names.txt")] == ["Ada Lovelace", "Bob Marley"]
    (tmp_path / "names.jsonl").write_text('{"topic": "Ada Lovelace", "output": "x"}\n{"topic": "Bob Marley"}\n')
    people = listed_people(tmp_path / "names.jsonl")
    assert [(e.name, e.title, e.doc_id) for e in people][1] == ("Bob Marley", "Bob Marley", "Bob Marley")
    (tmp_path / "bad.jsonl").write_text('{"topic": "A"}\n{"name": "B"}\n')
    with pytest.raises(PeopleFileError, match=r"eval.people_file: .*bad.jsonl:2 has no `topic` string"):
        listed_people(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PeopleFileError, match="names nobody"):
        listed_people(tmp_path / "empty.txt")
    (tmp_path / "k.jsonl").write_text('{"title": "A", "text": "one"}\n\n{"title": "A", "text": "two"}\n')
    assert knowledge_file(tmp_path / "k.jsonl") == [{"id": "knowledge:A", "title": "A", "text": "one\n\ntwo"}]
    (tmp_path / "k.jsonl").write_text('{"title": "A", "text": ""}\n')
    with pytest.raises(PeopleFileError, match=r"eval.knowledge_file: .*k.jsonl:1 needs a non-empty `title` and `text`"):
        knowledge_file(tmp_path / "k.jsonl")
    with pytest.raises(ConfigError, match="eval.knowledge_file: holds the articles of eval.people_file"):
        load_config(None, ["--eval.knowledge_file", "k.jsonl"])
    with pytest.raises(ConfigError, match="eval.heldout_entities"):
        load_config(None, ["--eval.people_file", "p.txt", "--eval.heldout_entities", "2"])


def test_a_corpus_of_files_is_evaluated_on_a_list_with_its_articles(tmp_path, embedded_docs):
    corpus, names, knowledge, titles = _files(tmp_path, embedded_docs)
    over = ["--run_dir", str(tmp_path / "run"), "--data.corpus", str(corpus), "--data.max_docs", "null",
            "--eval.entities", "2", "--eval.calibration_entities", "3"]
    # Neither a list nor a corpus with people: refused before anything trains (lacy.experiment.run calls this first).
    with pytest.raises(CorpusError, match="names no people to evaluate.*eval.people_file"):
        population(load_config("configs/tiny.yaml", over), corpus_for(load_config("configs/tiny.yaml", over)))
    cfg = load_config("configs/tiny.yaml", [*over, "--eval.people_file", str(names),
                                            "--eval.knowledge_file", str(knowledge)])
    listed = corpus_for(cfg)
    assert isinstance(listed, Listed) and not listed.exact
    pop = population(cfg, listed)
    # The list's order: the first eval.entities evaluated, the next calibrate; articles from the knowledge file.
    assert [e.name for e in pop.train] == titles[:2] and [e.name for e in pop.calibration] == titles[2:5]
    assert pop.articles[titles[0]]["text"] == next(d["text"] for d in embedded_docs if d["title"] == titles[0])
    assert pop.heldout == [] and len(pop.train_docs) > 80  # leakage probes still come from the training split
    assert {d["title"] for d in listed.knowledge_documents([])} == {*titles, "Somebody Else"}
    # Without a knowledge file the articles are the corpus's documents of the same title.
    own = load_config("configs/tiny.yaml", [*over, "--eval.people_file", str(names)])
    assert population(own, corpus_for(own)).articles[titles[0]]["id"] == next(
        d["id"] for d in embedded_docs if d["title"] == titles[0])
    too_few = load_config("configs/tiny.yaml", [*over, "--eval.people_file", str(names), "--eval.entities", "9"])
    with pytest.raises(ValueError, match="6 people in eval.people_file, but eval.entities .9."):
        population(too_few, corpus_for(too_few))
    # A person without an article is named, before anything trains.
    names.write_text(names.read_text() + "Nobody Known\n")
    with pytest.raises(CorpusError, match="1 of 7 people have no document titled with their name in "
                                          "eval.knowledge_file .*: Nobody Known"):
        population(cfg, corpus_for(cfg))


@pytest.mark.slow
def test_the_experiment_on_a_list_exports_factscore_jsonl_and_judges_with_an_llm(llama_server, tmp_path, embedded_docs):
    """lacy.experiment on a corpus of files, its people a list with a knowledge file, its big side and its
    LLM judge llama.cpp's server: every evaluated biography in FActScore's format, the judge's columns."""
    from lacy.cascade.knowledge import SqlitePassageStore
    from lacy.experiment import run

    corpus, names, knowledge, titles = _files(tmp_path, embedded_docs, people=3)
    server_opts = ["--big.backend", "openai", "--big.base_url", llama_server.url,
                   "--big.extra_body", "{repeat_penalty: 1.0}"]
    cfg = load_config("configs/tiny.yaml", [
        "--run_dir", str(tmp_path / "run"), "--data.corpus", str(corpus), "--data.max_docs", "null",
        "--eval.people_file", str(names), "--eval.knowledge_file", str(knowledge),
        "--train.max_steps", "4", "--experiment.rules", "[plain]", "--experiment.big_models", "[plain]",
        "--experiment.triggers", "[confidence]", "--eval.entities", "1", "--eval.calibration_entities", "2",
        "--eval.calibration_rounds", "1", "--eval.call_rates", "[0.22]", "--eval.leakage_facts", "4",
        "--eval.bootstrap", "50", "--experiment.views", "1", "--cascade.max_new_tokens", "8",
        "--experiment.headline_rate", "0.22", *server_opts, "--llm_judge.base_url", llama_server.url,
        "--llm_judge.extra_body", "{repeat_penalty: 1.0}", "--llm_judge.facts_max_tokens", "40",
        "--knowledge.top_k", "1"])
    results = run(cfg)

    with (results / "rows.csv").open() as f:
        rows = {r["system"]: r for r in csv.DictReader(f)}
    assert {"big-plain", "plain-steps alone", "plain-steps+plain@0.22/confidence", "big-plain (budget)"} <= set(rows)
    for system, row in rows.items():
        assert row["entities"] == "1" and row["respond_ratio_judge"] != "", system
        assert row["facts_per_response_judge"] != "" and row["precision_lenient"] != "", system
    assert "LLM judge [CI]" in (results / "table.md").read_text()
    # The big model's store holds the knowledge file's articles (the corpus's documents are not in it).
    store = SqlitePassageStore(cfg.knowledge.db_path)
    assert store.counts()[0] == len(titles) + 1 and store.doc_ids(titles[0])
    # Every evaluated biography, as FActScore reads its input, with the spans each model wrote.
    folder = results / "generations"
    exported = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*.jsonl")}
    assert {f"{s}.jsonl" for s in rows} == set(exported)
    for system in rows:
        [line] = [json.loads(x) for x in exported[f"{system}.jsonl"].read_text().splitlines()]
        assert line["topic"] == titles[0] and line["output"].startswith(f"{titles[0]} (")  # the lead prompt
        assert line["system"] == system and "".join(s["text"] for s in line["spans"]) == line["output"]
    cascade = json.loads(exported["plain-steps+plain@0.22/confidence.jsonl"].read_text())
    assert {s["source"] for s in cascade["spans"]} <= {"prompt", "small", "big"} and cascade["calls"] is not None
    assert json.loads(exported["big-plain.jsonl"].read_text())["spans"][1]["source"] == "big"
