"""The synthetic benchmark: a deterministic corpus with exact fact spans, exact scoring of stated values,
the spaCy proxy against the oracle, stored bits, the lacy_oracle rule, and the whole pipeline on it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lacy.core.config import ConfigError, LabelConfig, SynthConfig, load_config
from lacy.corpus import synthbio
from lacy.corpus.corpora import corpus_for
from lacy.corpus.synthbio import ORACLE_ATTRIBUTES
from lacy.eval import synthetic
from lacy.eval.generate import Generation
from lacy.labels.facts import oracle_spans


def test_same_seed_same_bytes_other_seed_other_people(tmp_path):
    a = synthbio.ensure_corpus(SynthConfig(people=50, seed=3), tmp_path / "a")
    b = synthbio.ensure_corpus(SynthConfig(people=50, seed=3), tmp_path / "b")
    c = synthbio.ensure_corpus(SynthConfig(people=50, seed=4), tmp_path / "c")
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "people.jsonl").read_bytes() == (b.parent / "people.jsonl").read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert len(a.read_text().splitlines()) == 50 * 3


def test_biographies_name_first_pronouns_after_and_exact_spans():
    cfg = SynthConfig(people=200, biographies=3)
    people = {p.id: p for p in synthbio.make_people(cfg)}
    assert len({p.name for p in people.values()}) == 200
    assert all(len(set(t)) >= 20 for t in synthbio.TEMPLATES.values())
    texts = {}
    for doc in synthbio.documents(cfg, list(people.values())):
        person = people[doc["person"]]
        assert doc["text"].startswith(person.name) and doc["text"].count(person.name) == 1
        spans = oracle_spans(doc)  # raises if a span does not hold its value
        assert sorted(code for *_, code in spans) == list(range(1, 7))
        texts.setdefault(person.id, set()).add(doc["text"])
    assert all(len(t) == 3 for t in texts.values())  # fresh templates each time


def test_a_wrong_value_is_caught_and_cities_are_told_apart():
    record = {"attributes": {"birth_date": "March 4, 1952", "birth_city": "Lyon",
                             "university": "the University of Oakridge", "field": "chemistry",
                             "employer": "Cobalt Labs", "employer_city": "Oslo"}}
    text = ("Anna Keller was born on March 4, 1952. She grew up in Lyon. She graduated from The University of "
            "Oakridge. She studied physics. She worked for Cobalt Labs. Her office was in Lyon.")
    checks = {s.attr: ok for s, ok in synthetic.check_biography(text, record)}
    assert checks == {"birth_date": True, "birth_city": True, "university": True, "field": False,
                      "employer": True, "employer_city": False}
    assert synthetic.check_biography("Anna Keller was a person.", record) == []


def _gen(entity_id: str, text: str, spans=None, calls=0, points=10):
    return Generation(SimpleNamespace(doc_id=entity_id, name="x"), text, calls / points, calls, points, spans)


def test_score_synthetic_exact_precision_abstention_and_where_calls_land():
    people = {"a": {"attributes": {"birth_date": "May 1, 1950", "birth_city": "Oslo", "university": "Oakridge College",
                                   "field": "law", "employer": "Zephyr Media", "employer_city": "Riga"}},
              "b": {"attributes": {"birth_date": "June 2, 1960", "birth_city": "Riga", "university": "Oakridge College",
                                   "field": "botany", "employer": "Lumen Foods", "employer_city": "Oslo"}}}
    gens = [_gen("a", "A was born on May 1, 1950. He studied law at Oakridge College. He worked for Lumen Foods.",
                 spans=[("A was born on ", "small"), ("May", "big"), (" 1, 1950. He studied ", "small"),
                        ("law", "big"), (" at Oakridge College. He worked for Lumen Foods.", "small")], calls=2),
            _gen("b", "B was a quiet person.")]
    row = synthetic.score_records("sys", gens, people, bootstrap=50).to_dict()
    assert row["precision"] == pytest.approx(3 / 4) and row["respond_ratio"] == 0.5
    assert row["entity_scores"] == [pytest.approx(0.75), None]
    assert (row["employer_correct"], row["employer_stated"]) == (0, 1)
    assert row["birth_city_stated"] == 0 and row["birth_city_precision"] is None
    assert row["calls_on_facts"] == 1.0  # both big spans wrote (part of) a stated value
    # "Oakridge College" and "Lumen Foods" are b's too: not informative; the 2 others are right.
    assert row["informative_precision"] == pytest.approx(1.0)
    assert row["factscore"] == pytest.approx(0.75 * math.exp(1 - 10 / 4) / 2)


def test_corpus_refuses_oracle_without_spans_and_lead_prompts_on_synthbio(tmp_path):
    with pytest.raises(ConfigError, match="data.corpus/facts.source"):
        corpus_for(load_config("configs/tiny.yaml", ["--experiment.rules", "[plain, lacy_oracle]"]))
    with pytest.raises(ConfigError, match="prompt_style"):
        corpus_for(load_config("configs/synthbio-tiny.yaml", ["--eval.prompt_style", "lead", "--run_dir",
                                                             str(tmp_path)]))


def test_lacy_oracle_selects_among_the_true_facts_only(tiny_model):
    from lacy.labels.method import lacy_step

    model = tiny_model
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 17))
    fact = torch.zeros(2, 17, dtype=torch.bool)
    fact[:, 1:9] = True  # the proxy's flags
    oracle = torch.zeros(2, 17, dtype=torch.int8)
    oracle[:, 10:14] = 3  # the truth, elsewhere
    batch = {"input_ids": ids, "fact": fact, "oracle": oracle}
    _, stats = lacy_step(model, batch, LabelConfig(rule="lacy_oracle", fact_share=0.5), call_id=0)
    assert float(stats["selected_oracle_share"]) == 1.0 and float(stats["selected_fact_share"]) == 0.0
    _, stats = lacy_step(model, batch, LabelConfig(rule="lacy", fact_share=0.5), call_id=0)
    assert float(stats["selected_oracle_share"]) == 0.0
    with pytest.raises(ValueError, match="oracle"):
        lacy_step(model, {"input_ids": ids, "fact": fact}, LabelConfig(rule="lacy_oracle"), call_id=0)


def test_shards_keep_the_oracle_split_by_person_and_proxy_scores(tmp_path):
    """Real spaCy over a generated corpus: the proxy's token-level precision/recall against the truth."""
    import pyarrow.parquet as pq

    from lacy.shards.scoring import build_shards

    cfg = load_config("configs/synthbio-tiny.yaml", ["--run_dir", str(tmp_path / "run"), "--synth.people", "40",
                                                    "--data.val_fraction", "0.3"])
    manifest, _ = build_shards(cfg)
    docs = pq.read_table(tmp_path / "run" / "shards" / "docs.parquet").to_pylist()
    split_of_person = {}
    for d in docs:
        person = d["id"].split("-")[0]
        assert split_of_person.setdefault(person, d["split"]) == d["split"]
    assert set(split_of_person.values()) == {"train", "val"}
    proxy = synthetic.proxy_vs_oracle(tmp_path / "run" / "shards")
    assert 0 < proxy["precision"] < 1 and 0 < proxy["recall"] <= 1
    assert set(proxy["recall_by_attribute"]) == set(ORACLE_ATTRIBUTES)
    assert proxy["recall_by_attribute"]["birth_date"] > 0.8  # spaCy knows dates
    assert proxy["false_positive_tokens"]


def test_stored_bits_of_an_untrained_model_are_about_zero(tiny_model, tiny_tokenizer, tmp_path):
    from lacy.core.config import LacyConfig
    from lacy.train import save_final

    save_final(tiny_model, tiny_tokenizer, tmp_path / "m", LacyConfig(run_dir=str(tmp_path)), {"steps": 0},
               trainer="test")
    docs = list(synthbio.documents(SynthConfig(people=10, biographies=1)))
    bits = synthetic.stored_bits(tmp_path / "m", docs)
    assert bits["bits_people"] == 10
    assert bits["stored_bits"] == pytest.approx(sum(bits[f"stored_bits_{a}"] for a in ORACLE_ATTRIBUTES))
    assert bits["stored_bits"] < 0.05 * 10 * sum(math.log2(len(synthbio.value_space(a))) for a in ORACLE_ATTRIBUTES)
    assert bits["template_loss"] > 3  # random: about log(vocab)


@pytest.mark.slow
def test_synthetic_pipeline_table_with_stored_bits_and_proxy(tmp_path):
    """corpus -> shards -> three rules -> records store -> exact evaluation -> table, in one process,
    as one point of the capacity sweep (lacy.sweep), whose lines are the comparison protocol's: a line per
    model and trigger, correct values per person (the old sweep kept one cascade row a model, whichever
    trigger came first, and its precision only)."""
    from lacy.sweep import sweep

    cfg = load_config("configs/synthbio-tiny.yaml", ["--run_dir", str(tmp_path / "run"),
                                                     "--experiment.triggers", "[p_call, confidence]"])
    lines = sweep(cfg, [60], publish=tmp_path / "docs", command="python -m lacy.sweep --people 60")
    results = tmp_path / "run" / "people-60" / "results"
    assert {(line["model"], line["trigger"]) for line in lines} == {
        ("plain-steps", "confidence"), ("lacy-steps", "p_call"), ("lacy-steps", "confidence"),
        ("lacy_oracle-steps", "p_call"), ("lacy_oracle-steps", "confidence")}
    assert all(line["stored_bits"] is not None and line["template_loss"] > 0 for line in lines)
    rows = {r["system"]: r for r in (json.loads(p.read_text()) for p in (results / "rows").rglob("*.json"))}
    for line in lines:
        row = rows[f"{line['model']}+retrieval@0.22/{line['trigger']}"]
        assert line["correct"] == pytest.approx(row["supported_per_person"]) and line["call_rate"] > 0
        assert line["correct_lo"] <= line["correct"] <= line["correct_hi"]
        assert line["alone_correct"] == pytest.approx(rows[f"{line['model']} alone"]["supported_per_person"])
    assert (tmp_path / "run" / "sweep.png").stat().st_size > 0
    assert "| people |" in (tmp_path / "run" / "sweep.md").read_text()
    page = (tmp_path / "docs" / "run.md").read_text()  # the published page: command, table, plot
    assert "`python -m lacy.sweep --people 60`" in page and "| people | model | trigger |" in page
    assert "![the capacity sweep](run.png)" in page and (tmp_path / "docs" / "run.png").stat().st_size > 0
    table = (results / "table.md").read_text()
    for needle in ("| lacy_oracle | p_call |", "stored bits", "cascade calls on facts",
                   "The spaCy proxy against the truth", "birth date"):
        assert needle in table, needle
    big = rows["big-retrieval"]
    assert big["birth_date_stated"] > 0  # the big side reads the records and states values
    assert "calls_on_facts" in rows["lacy-steps+retrieval@0.22/p_call"]
    assert json.loads((results / "proxy_vs_oracle.json").read_text())["recall"] > 0


def test_a_small_sweep_point_splits_the_people_it_has():
    """40 people leave ≈36 trained-on: 60 evaluation + 30 calibration people do not fit, so the point
    keeps their proportion inside what it has (the old sweep failed there with no calibration people)."""
    from lacy.sweep import _fit_groups

    cfg = load_config("configs/synthbio-sweep.yaml", [])
    cfg.synth.people = 40
    _fit_groups(cfg)
    assert (cfg.eval.entities, cfg.eval.calibration_entities) == (22, 12)
    cfg = load_config("configs/synthbio-sweep.yaml", [])
    _fit_groups(cfg)  # 1,000 people: untouched
    assert (cfg.eval.entities, cfg.eval.calibration_entities) == (60, 30)
    cfg.synth.people = 4
    with pytest.raises(ValueError, match="4 people has ≈3 trained-on people"):
        _fit_groups(cfg)


RECORD = {"attributes": {"birth_date": "March 4, 1952", "birth_city": "Lyon",
                         "university": "the University of Oakridge", "field": "chemistry", "employer": "Cobalt Labs",
                         "employer_city": "Oslo"}}


@pytest.mark.parametrize("text, attr, correct", [
    # Dates in any order or style, whole or in part: stated, and correct only when every part is the record's.
    ("She was born on March 4, 1952.", "birth_date", True),
    ("She was born on 4 March 1952.", "birth_date", True),
    ("She was born on the 4th of March, 1952.", "birth_date", True),
    ("She was born on March 4 1952.", "birth_date", True),
    ("She was born on Mar. 4, 1952.", "birth_date", True),
    ("Her birth date is 1952-03-04.", "birth_date", True),
    ("She was born in March 1952.", "birth_date", True),
    ("She was born in 1952.", "birth_date", True),
    ("She was born on 5 March 1952.", "birth_date", False),
    ("She was born in April 1952.", "birth_date", False),
    ("She was born in 1953.", "birth_date", False),
    # Universities and employers whole or by their stem alone; another form of the stem is another value.
    ("She studied at the University of Oakridge.", "university", True),
    ("She studied at Oakridge.", "university", True),
    ("She studied at Oakridge College.", "university", False),
    ("She studied at Belmoor.", "university", False),
    ("She worked for Cobalt Labs.", "employer", True),
    ("She worked for Cobalt.", "employer", True),
    ("She worked for Cobalt Foods.", "employer", False),
    # A field anywhere, a city as birth or work place by its sentence.
    ("Chemistry was her passion.", "field", True),
    ("Later she turned to physics.", "field", False),
    ("She grew up in Lyon.", "birth_city", True),
    ("Her office was in Lyon.", "employer_city", False),
])
def test_a_value_in_any_common_format_is_stated_and_checked(text, attr, correct):
    from lacy.eval.synthetic import check_biography

    checks = [(s.attr, ok) for s, ok in check_biography(text, RECORD)]
    assert checks == [(attr, correct)], checks


def test_a_text_that_names_no_value_states_none():
    from lacy.eval.synthetic import check_biography

    assert check_biography("She was a kind person who liked the sea in May.", RECORD) == []


def test_filler_sentences_add_harmless_uncertainty_and_keep_the_facts_exact(tmp_path):
    """synth.filler: sentences of common nouns drawn afresh per biography, never a checked value and
    never flagged as a fact by spaCy; the oracle's spans still hold their values; filler 0 writes the
    corpus it always wrote."""
    from lacy.corpus.synthbio import FILLER_WORDS
    from lacy.labels.facts import load_spacy

    plain = synthbio.ensure_corpus(SynthConfig(people=20, seed=5), tmp_path / "a").read_text()
    assert synthbio.ensure_corpus(SynthConfig(people=20, seed=5, filler=0), tmp_path / "b").read_text() == plain
    cfg = SynthConfig(people=20, biographies=2, seed=5, filler=3)
    docs = list(synthbio.documents(cfg))
    words = {w for ws in FILLER_WORDS.values() for w in ws}
    nlp = load_spacy("en_core_web_sm")
    for doc in docs:
        spans = oracle_spans(doc)  # raises if a span does not hold its value
        assert len(spans) == len(ORACLE_ATTRIBUTES) and doc["text"].startswith(doc["title"])
        assert len(doc["text"].split(". ")) >= 6 + 3  # six attribute sentences, three filler ones
        filled = [t for t in nlp(doc["text"]) if t.text in words]
        assert filled and not any(t.ent_type_ or t.pos_ in ("PROPN", "NUM") for t in filled)
        record = {"attributes": {f["attr"]: f["value"] for f in doc["facts"]}}
        assert len(synthetic.check_biography(doc["text"], record)) == len(ORACLE_ATTRIBUTES)  # filler states none
    assert len({d["text"] for d in docs}) == len(docs)
