"""lacy.eval (claims, rows, leakage) on hand-made biographies with real spaCy and a real SQLite passage store."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from people import ADA, ADA_ARTICLE, ARTICLES, BOB, BOB_ARTICLE  # noqa: F401

from lacy.cascade.knowledge import SqlitePassageStore
from lacy.corpus.people import Entity
from lacy.eval.claims import (
    attribute_checks,
    extract_claims,
    factscore,
    is_supported,
    length_penalty_factor,
    load_nlp,
    normalize,
    score_claims,
    stated_birth_place,
    stated_birth_year,
)
from lacy.eval.generate import Generation, bio_prompt, biographies
from lacy.eval.leakage import LeakProbe, leakage, leaks, make_leak_probes, wilson_interval
from lacy.eval.row import bootstrap_ci, paired_bootstrap


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


@pytest.fixture()
def store(tmp_path):
    with SqlitePassageStore(tmp_path / "kb.sqlite", passage_words=12) as s:
        s.add(ARTICLES.values())
        yield s


# ----------------------------------------------------------------------------------------------
# Claims, normalisation, support


def test_bio_prompt_styles():
    assert bio_prompt(ADA) == "Ada Lovelace ("
    assert bio_prompt(ADA, "instruct") == "Tell me a bio of Ada Lovelace.\n"
    with pytest.raises(ValueError, match="unknown style 'chat'"):
        bio_prompt(ADA, "chat")


def test_extract_claims_excludes_the_person_and_duplicates(nlp):
    text = ("Ada Lovelace (born 1920) was a British chemist born in Leeds. Lovelace returned to Leeds "
            "today and won the Nobel Prize in 1960.")
    claims = extract_claims(text, nlp, exclude_name="Ada Lovelace")
    assert [c.text for c in claims] == ["1920", "British", "Leeds", "the Nobel Prize", "1960"]
    leeds = claims[2]
    assert text[leeds.start:leeds.end] == "Leeds"
    assert leeds.sentence == "Ada Lovelace (born 1920) was a British chemist born in Leeds."
    # Without the exclusion the person's name is a claim too.
    assert "Ada Lovelace" in [c.text for c in extract_claims(text, nlp)]


def test_normalize_rules():
    assert normalize("  Zürich,  CAFÉ! ") == "zurich cafe"
    assert normalize("1,234,567 people") == "1234567 people"
    assert normalize("July 4th, 1776") == normalize("4 July 1776") == "4 july 1776"
    assert normalize("3.5 km.") == "3.5 km"
    assert normalize("Finland's capital") == "finland capital"


@pytest.mark.parametrize("claim, source, expected", [
    ("1776", "He was born 4 July 1776 in Boston.", True),     # a year inside a date
    ("July 4, 1776", "born 4 July 1776", True),               # date order
    ("4 July 1776", "born 5 July 1776", False),
    ("1,234", "it had 1234 members", True),                   # thousands separator
    ("the Nobel Prize", "she won a Nobel Prize.", True),      # leading article
    ("Zürich", "moved to ZURICH", True),                      # case and diacritics
    ("Paris", "a Parisian salon", False),                     # whole words only
    ("177", "born 1776", False),
    ("", "anything", False),
])
def test_is_supported(claim, source, expected):
    assert is_supported(claim, source) is expected


# ----------------------------------------------------------------------------------------------
# FactScore-style precision


def test_factscore_lenient_exact_precision_and_respond_ratio(nlp):
    # Claims: 1920 ✓, British ✓, Leeds ✓, the Nobel Prize ✗, 1960 ✗, 3 ✗  -> 3/6.
    ada = Generation(ADA, "Ada Lovelace (born 1920) was a British chemist born in Leeds. She won the "
                          "Nobel Prize in 1960 and had 3 children.")
    # Claims: 6 February 1945 ✓, Jamaican ✓, Kingston ✗ -> 2/3.
    bob = Generation(BOB, "Bob Marley (6 February 1945) was a Jamaican singer born in Kingston.")
    abstains = Generation(ADA, "Ada Lovelace ( I do not know much about her.")
    report = factscore([ada, bob, abstains], ARTICLES, strict=False, nlp=nlp)
    assert report.mode == "lenient (whole article)"
    assert [e.supported for e in report.entities[:2]] == [[True, True, True, False, False, False],
                                                          [True, True, False]]
    assert report.entities[0].precision == pytest.approx(3 / 6)
    assert report.entities[1].precision == pytest.approx(2 / 3)
    assert report.entities[2].precision is None
    assert report.mean_precision == pytest.approx((3 / 6 + 2 / 3) / 2)
    assert report.respond_ratio == pytest.approx(2 / 3)
    assert report.claims_per_response == pytest.approx(4.5)
    # Both state year, place and occupation; Bob's place (Kingston) is wrong.
    assert report.attributes == {"birth_year": (2, 2), "birth_place": (1, 2), "occupation": (2, 2)}


def test_strict_and_lenient_differ_on_a_year_found_elsewhere(nlp, store):
    # 1950 is in the article (the move to Paris) but not in the passage about the birth.
    gen = Generation(ADA, "Ada Lovelace (born 1950) was a British chemist.")
    lenient = factscore([gen], ARTICLES, strict=False, nlp=nlp)
    strict = factscore([gen], store, strict=True, k=1, nlp=nlp)
    assert [c.text for c in strict.entities[0].claims] == ["1950", "British"]
    assert lenient.mean_precision == pytest.approx(1.0)
    assert strict.mean_precision == pytest.approx(0.5)
    assert strict.mode == "strict (top-1 passages)"
    # With every passage retrieved, strict agrees with lenient.
    assert factscore([gen], store, strict=True, k=3, nlp=nlp).mean_precision == pytest.approx(1.0)


def test_length_penalty(nlp):
    assert length_penalty_factor(5, gamma=10) == pytest.approx(math.exp(-1))
    assert length_penalty_factor(10, gamma=10) == 1.0
    assert length_penalty_factor(20, gamma=10) == 1.0
    with pytest.raises(ValueError):
        length_penalty_factor(0)
    gen = Generation(BOB, "Bob Marley (6 February 1945) was a Jamaican singer born in Kingston.")
    report = factscore([gen], ARTICLES, strict=False, length_penalty=True, gamma=6, nlp=nlp)
    assert report.entities[0].precision == pytest.approx(2 / 3)
    assert report.mean_precision == pytest.approx(2 / 3 * math.exp(1 - 6 / 3))


def test_missing_article_is_named(nlp):
    stranger = Entity("Nobody Known", "Nobody Known", "999", "", None, None, None)
    with pytest.raises(KeyError, match="Nobody Known"):
        factscore([Generation(stranger, "Nobody Known (born 1900) lived in Paris.")], ARTICLES,
                  strict=False, nlp=nlp)
    with pytest.raises(KeyError, match="Nobody Known"):   # even without a claim to check
        factscore([Generation(stranger, "Nobody Known ( no idea.")], ARTICLES, strict=False, nlp=nlp)


def test_attribute_checks():
    assert stated_birth_year("Aristotle (384–322 BC) was a Greek philosopher.") == -384
    assert stated_birth_year("Ada Lovelace was a chemist. She was born in 1931 in Leeds.") == 1931
    assert stated_birth_year("Ada Lovelace was a chemist. She died in 1990.") is None
    assert stated_birth_year("Pope Benedict III (Latin: Benedictus; died 17 April 858) was Pope.") is None
    assert stated_birth_year("Vasco da Gama (c. 1460s – 23 December 1524) was an explorer.") is None
    assert stated_birth_year("Arcadius (Greek: Ἀρκάδιος; 377/378 – 1 May 408) was an emperor.") == 377
    assert stated_birth_year("Chopin (22 February or 1 March 1810 – 17 October 1849) was a composer.") == 1810
    assert stated_birth_place("Avogadro (9 August 1776, Turin, Piedmont – 9 July 1856) was a scientist.") \
        == "Turin"
    assert stated_birth_place("X (born 1950 in New York City) is an actor.") == "New York City"
    assert stated_birth_place("X was a poet born in 1900 in Leeds, Yorkshire. He wrote.") \
        == "Leeds, Yorkshire"
    assert stated_birth_place("X (1900 – 1950) was a poet.") is None
    politician = Entity("X", "X", "1", "", None, None, "politician")
    assert attribute_checks("X (1900 – 1950) was the Prime Minister of Y.", politician) == {
        "occupation": True}
    assert attribute_checks("X (1900 – 1950) was a count.", politician) == {"occupation": False}
    assert attribute_checks("Ada Lovelace (born 1921) was an English chemistry teacher born in Leeds, "
                            "Yorkshire.", ADA) == {"birth_year": False, "birth_place": True,
                                                   "occupation": True}
    assert attribute_checks("Ada Lovelace (1920 – 1990) was a famous actress.", ADA) == {
        "birth_year": True, "occupation": False}
    # Nothing stated, or nothing known about the entity: nothing counted.
    assert attribute_checks("Ada Lovelace liked tea.", ADA) == {}
    unknown = Entity("Ada Lovelace", "Ada Lovelace", "42", "", None, None, None)
    assert attribute_checks("Ada Lovelace (born 1920) was a chemist born in Leeds.", unknown) == {}


@pytest.mark.slow
def test_real_wikipedia_leads_separate_true_from_swapped_bios(nlp):
    """On real wiki2015 people, a person's own lead is fully supported and states mostly correct
    attributes; the next person's lead under this person's name is mostly unsupported."""
    from lacy.core.paths import wiki2015_dir
    from lacy.corpus.corpora import read_corpus

    people_file = wiki2015_dir() / "people.jsonl"
    if not people_file.is_file():
        pytest.skip("../shared/data/wiki2015 is not here")
    rows = {}
    with open(people_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            row = json.loads(line)
            rows[str(row["en_curid"])] = row
    articles = {}
    for doc in read_corpus(str(wiki2015_dir() / "articles-00000-of-00006.jsonl.gz")):
        if doc["id"] in rows:
            articles[doc["id"]] = doc
        if len(articles) == 30:
            break
    people = [Entity(rows[i]["name"], rows[i]["title"], i, "", int(rows[i]["birthyear"]), None,
                     rows[i]["occupation"].lower()) for i in articles]

    def lead(person):
        return ". ".join(articles[person.doc_id]["text"].split(". ")[:2]) + "."

    own = factscore([Generation(p, lead(p)) for p in people], articles, strict=False, nlp=nlp)
    swapped = factscore([Generation(p, lead(q).replace(q.name, p.name))
                         for p, q in zip(people, people[1:] + people[:1], strict=True)],
                        articles, strict=False, nlp=nlp)
    unsupported = [(e.name, c.text) for e in own.entities for c, ok in zip(e.claims, e.supported, strict=True)
                   if not ok]
    assert own.mean_precision == pytest.approx(1.0), unsupported
    assert swapped.mean_precision < 0.3
    for attr in ("birth_year", "occupation"):
        (right, stated), (wrong, stated_swapped) = own.attributes[attr], swapped.attributes[attr]
        assert stated >= 10 and right / stated > 0.7
        assert wrong / stated_swapped < 0.2


# ----------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_ci_contains_mean_and_shrinks_with_more_people():
    rng = np.random.default_rng(1)
    few, many = rng.uniform(0, 1, 20), rng.uniform(0, 1, 2000)
    mean, lo, hi = bootstrap_ci(few, n=1000, seed=0)
    assert mean == pytest.approx(float(few.mean()))
    assert lo < mean < hi
    m2, lo2, hi2 = bootstrap_ci(many, n=1000, seed=0)
    assert lo2 < m2 < hi2
    assert hi2 - lo2 < (hi - lo) / 5          # width ~ 1/sqrt(people): 10x more -> ~1/10
    assert bootstrap_ci(few, n=1000, seed=0) == (mean, lo, hi)   # seeded
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0.1, float("nan")])


def test_paired_bootstrap():
    a = [0.9, 0.5, None, 0.7]
    b = [0.8, 0.4, 0.3, None]
    assert paired_bootstrap(a, b) == pytest.approx((0.1, 0.1, 0.1))   # pairs 0 and 1 only
    diff, lo, hi = paired_bootstrap([0.9, 0.2, 0.6, 0.4], [0.1, 0.3, 0.2, 0.3], n=2000)
    assert diff == pytest.approx(0.3) and lo <= diff <= hi
    with pytest.raises(ValueError, match="same people"):
        paired_bootstrap([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="no person"):
        paired_bootstrap([None], [0.1])


def test_people_for_halfwidth_says_when_fewer_people_would_do():
    """The sizing hint scales with the spread of the per-person differences: 200 people whose
    differences spread by 0.31 need ≈148 for ±0.05 (the old hint never went below the people given,
    so it read "needs ≈200" for a CI already narrower than asked)."""
    from lacy.report import people_for_halfwidth

    rng = np.random.default_rng(0)
    diffs = rng.normal(0.2, 0.31, 200)
    needed = people_for_halfwidth(list(diffs), [0.0] * 200)
    assert needed == math.ceil((1.96 * float(np.std(diffs, ddof=1)) / 0.05) ** 2) and 120 < needed < 180
    assert people_for_halfwidth([0.3] * 5, [0.1] * 5) == 5  # no spread: the people given


def test_view_spans_escape_every_attribute():
    """A span's title is escaped like its text and source: a source with a quote used to end the
    title attribute early (title="we"ird"), and the big span's title carried a raw "<CALL>"."""
    from html.parser import HTMLParser

    from lacy.serve.view import spans_html

    attrs: list[dict] = []

    class Spans(HTMLParser):
        def handle_starttag(self, tag: str, found: list) -> None:
            attrs.append(dict(found))

    markup = spans_html([("Ada (", "prompt"), ("1815", "big"), ("x", 'we"ird')])
    Spans().feed(markup)
    assert [a["data-source"] for a in attrs] == ["prompt", "big", 'we"ird']
    assert attrs[2]["title"] == 'we"ird'
    assert "<CALL>" not in markup and attrs[1]["title"] == "written by the big model (<CALL>)"


# ----------------------------------------------------------------------------------------------
# Whole systems


def evaluate_system(name, generate_fn, entities, articles, store, *, prompt_style="lead", **kwargs) -> dict:
    """The row of the biographies `generate_fn(prompt)` writes for `entities`, as the report reads it."""
    gens = biographies(entities, [generate_fn(bio_prompt(e, prompt_style)) for e in entities], prompt_style)
    return score_claims(name, gens, articles, store, **kwargs).to_dict()


def test_claims_row(nlp, store):
    bios = {"Ada Lovelace (": "born 1950) was a British chemist born in Leeds.",
            "Bob Marley (": "6 February 1945) was a Jamaican singer born in Kingston."}
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        return SimpleNamespace(text=prompt + bios[prompt], call_rate=0.25 if "Ada" in prompt else 0.15)

    row = evaluate_system("toy", generate, [ADA, BOB], ARTICLES, store, k=1, bootstrap=200, nlp=nlp)
    assert prompts == ["Ada Lovelace (", "Bob Marley ("]
    assert row["system"] == "toy" and row["entities"] == 2
    assert row["call_rate"] == pytest.approx(0.2)
    # Ada: 1950 ✓(lenient) / ✗(strict, top-1), British ✓, Leeds ✓. Bob: 6 February 1945 ✓, Jamaican ✓,
    # Kingston ✗ (strict: Bob's only passage holds the whole article).
    assert row["entity_scores_lenient"] == pytest.approx([1.0, 2 / 3])
    assert row["entity_scores_strict"] == pytest.approx([2 / 3, 2 / 3])
    assert row["precision_lenient"] == pytest.approx(5 / 6)
    assert row["precision_lenient_lo"] <= row["precision_lenient"] <= row["precision_lenient_hi"]
    assert row["precision_strict"] == pytest.approx(2 / 3)
    assert row["respond_ratio_lenient"] == row["respond_ratio_strict"] == 1.0
    assert row["claims_per_response"] == 3.0
    assert (row["birth_year_correct"], row["birth_year_stated"]) == (1, 2)
    assert (row["birth_place_correct"], row["birth_place_stated"]) == (1, 2)
    # Plain strings without the prompt work too, and no store means no strict columns.
    row = evaluate_system("plain", lambda p: bios[p], [ADA], ARTICLES, None, bootstrap=50, nlp=nlp)
    assert row["precision_lenient"] == pytest.approx(1.0) and row["precision_strict"] is None
    assert row["call_rate"] is None
    # With calls and decision points the rate is pooled: 1 call in 2 decisions and 1 in 18 is 2/20,
    # though the per-person rates average 0.28.
    counts = {"Ada Lovelace (": (1, 2), "Bob Marley (": (1, 18)}
    row = evaluate_system("pooled", lambda p: SimpleNamespace(
        text=bios[p], call_rate=counts[p][0] / counts[p][1], calls=counts[p][0], decision_points=counts[p][1]),
        [ADA, BOB], ARTICLES, None, bootstrap=50, nlp=nlp)
    assert row["call_rate"] == pytest.approx(0.1) and row["call_rate_mean"] == pytest.approx((0.5 + 1 / 18) / 2)
    # An instruction is not part of the biography: the life parenthesis is still the first sentence's.
    row = evaluate_system("instruct", lambda p: p + "Ada Lovelace (born 1920) was a chemist.", [ADA],
                          ARTICLES, None, bootstrap=50, prompt_style="instruct", nlp=nlp)
    assert (row["birth_year_correct"], row["birth_year_stated"]) == (1, 1)
    assert row["entity_scores_lenient"] == [1.0]


# ----------------------------------------------------------------------------------------------
# Leakage


def test_leakage_on_hand_made_probes():
    probes = [LeakProbe("The capital of France is", "Paris", label="GPE"),
              LeakProbe("The city had a population of", "1,234", label="CARDINAL"),
              LeakProbe("She was born in", "Leeds", label="GPE"),
              LeakProbe("He painted", "the Mona Lisa", label="WORK_OF_ART")]
    answers = {"The capital of France is": " Paris, on the Seine.",
               "The city had a population of": "The city had a population of 1234 in 1900.",  # prompt echoed
               "She was born in": " Leedsville.",                                             # not the word
               "He painted": " a portrait of the Mona Lisa."}           # contained, not at the start
    report = leakage(probes, [answers[p.prefix] for p in probes])
    assert report.hits == [True, True, False, True]
    assert (report.probes, report.leaked, report.rate) == (4, 3, 0.75)
    assert report.continuations[1] == " 1234 in 1900."
    assert report.by_label == {"CARDINAL": (1, 1), "GPE": (1, 2), "WORK_OF_ART": (1, 1)}
    lo, hi = report.ci
    assert lo < 0.75 < hi and (lo, hi) == pytest.approx(wilson_interval(3, 4))
    assert wilson_interval(0, 300)[1] == pytest.approx(0.0126, abs=1e-3)  # hundreds of probes: a tight CI
    assert leaks(" The Mona Lisa!", "the Mona Lisa")
    with pytest.raises(ValueError):
        leakage([], [])


def test_make_leak_probes(nlp):
    docs = [{"id": "a", "text": "Short text 1990."},   # its only fact is before min_prefix_chars
            {"id": "b", "text": ADA_ARTICLE},
            {"id": "c", "text": BOB_ARTICLE + " His band sold more than 75 million records worldwide."}]
    probes = make_leak_probes(docs, nlp, n=5, seed=3, min_prefix_chars=20)
    assert sorted(p.doc_id for p in probes) == ["b", "c"]
    for p in probes:
        text = next(d["text"] for d in docs if d["id"] == p.doc_id)
        start = len(p.prefix)
        assert text.startswith(p.prefix) and text[start:].lstrip().startswith(p.gold)
        assert len(p.prefix) >= 20
    assert make_leak_probes(docs, nlp, n=5, seed=3, min_prefix_chars=20) == probes   # seeded
    assert len(make_leak_probes(docs, nlp, n=1, seed=3, min_prefix_chars=20)) == 1
    # A perfect memoriser of the documents leaks every probe; one that answers <CALL>-free noise none.
    texts = {d["id"]: d["text"] for d in docs}
    perfect = {p.prefix: texts[p.doc_id][len(p.prefix):] for p in probes}
    assert leakage(probes, [perfect[p.prefix] for p in probes]).rate == 1.0
    assert leakage(probes, [" the"] * len(probes)).rate == 0.0
    # Long prefixes are cut at a word boundary to the last max_prefix_chars characters.
    cut = make_leak_probes(docs[1:2], nlp, n=1, seed=0, min_prefix_chars=60, max_prefix_chars=30)[0]
    assert len(cut.prefix) <= 30 and ADA_ARTICLE.find(cut.prefix) > 0
    assert ADA_ARTICLE[ADA_ARTICLE.find(cut.prefix) - 1] == " "


def test_eval_config_validation():
    from lacy.core.config import ConfigError, EvalConfig, load_config

    assert load_config(None, ["--eval.gamma", "5", "--eval.prompt_style", "instruct"]).eval.gamma == 5.0
    for bad in ({"prompt_style": "chat"}, {"gamma": 0.0}, {"bootstrap": 0}, {"leakage_facts": 0}):
        with pytest.raises(ConfigError, match=f"eval.{next(iter(bad))}"):
            EvalConfig(**bad)


def test_date_ranges_score_year_by_year(nlp):
    """"(1809 – 1865)" is two claims whether spaCy makes it one DATE or two, and each year is supported
    by an article that writes the full dates."""
    article = {"9": {"id": "9", "title": "Abraham Lincoln",
                     "text": "Abraham Lincoln (February 12, 1809 – April 15, 1865) was an American lawyer."}}
    lincoln = Entity("Abraham Lincoln", "Abraham Lincoln", "9", "", 1809, None, None)
    for text in ("Abraham Lincoln (1809 – 1865) was a lawyer.", "Abraham Lincoln (1809-1865) was a lawyer.",
                 "Abraham Lincoln (February 12, 1809 – April 15, 1865) was a lawyer."):
        report = factscore([Generation(lincoln, text)], article, strict=False, nlp=nlp)
        (entity,) = report.entities
        assert len(entity.claims) == 2 and all(entity.supported), (text, [c.text for c in entity.claims])


def test_informative_precision_and_abstentions(nlp):
    """Generic claims ("British") that another person's article supports too are not informative;
    abstainers count 0 in FactScore and supported-per-person, so every person stays in paired tests."""
    gens = [Generation(ADA, "Ada Lovelace (born 1920) was a British chemist."),   # 1920 ✓ British ✓
            Generation(BOB, "Bob Marley ( I do not know.")]                           # abstains
    articles = {**ARTICLES, "7": {"id": "7", "title": "Bob Marley",
                                  "text": BOB_ARTICLE + " He toured British cities."}}
    row = score_claims("toy", gens, articles, None, bootstrap=50, nlp=nlp, gamma=10).to_dict()
    assert row["precision"] == pytest.approx(1.0) and row["respond_ratio"] == pytest.approx(0.5)
    assert row["claims_per_response"] == 2.0 and row["supported_per_person"] == pytest.approx(1.0)
    # Ada's "British" is in Bob's article: only 1920 is informative (and supported).
    assert row["informative_precision"] == pytest.approx(1.0) and row["informative_responses"] == 1
    assert row["entity_scores"] == [1.0, None]
    assert row["entity_factscore"] == pytest.approx([math.exp(1 - 10 / 2), 0.0])
    assert row["factscore"] == pytest.approx(math.exp(1 - 10 / 2) / 2)
    assert row["birth_year_precision"] == 1.0


def test_correct_birth_years_are_credited_for_real_embedded_people(nlp):
    """The embedded leads leave life years out of their text; the knowledge source must hold them (the
    description), or the prompt "NAME (" could never be answered right."""
    from lacy.core.config import load_config
    from lacy.corpus.corpora import corpus_for, knowledge_document

    corpus = corpus_for(load_config(None, ["--data.corpus", "embedded"]))
    docs = {d["id"]: d for d in corpus.documents()}
    people = [e for e in corpus.people(list(docs.values())) if e.birth_year and e.birth_year > 0][:20]
    gens = [Generation(e, f"{e.name} ({e.birth_year}") for e in people]
    articles = {e.doc_id: knowledge_document(docs[e.doc_id]) for e in people}
    raw = {e.doc_id: docs[e.doc_id] for e in people}
    credited = score_claims("gold", gens, articles, None, bootstrap=50, nlp=nlp)
    before = score_claims("gold", gens, raw, None, bootstrap=50, nlp=nlp)
    assert credited.precision_lenient == pytest.approx(1.0) and credited.respond_ratio == 1.0
    assert before.precision_lenient < 0.3  # what the text alone credits


def test_every_scorer_yields_the_one_row(nlp):
    """Claims against articles and values against records fill the same typed row, and a row survives
    its cache (to_dict / from_dict) whole."""
    from dataclasses import fields

    from lacy.eval.row import Row
    from lacy.eval.synthetic import score_records

    wiki = score_claims("wiki", [Generation(ADA, "Ada Lovelace (born 1920) was a British chemist."),
                                 Generation(BOB, "Bob Marley ( I do not know.")], ARTICLES, None, bootstrap=50, nlp=nlp)
    record = {"attributes": {"birth_date": "May 1, 1950", "birth_city": "Oslo", "university": "Oakridge College",
                             "field": "law", "employer": "Zephyr Media", "employer_city": "Riga"}}
    person = SimpleNamespace(doc_id="p", name="P", title="P")
    synth = score_records("synth", [Generation(person, "P was born on May 1, 1950. P studied law.")], {"p": record},
                          bootstrap=50)
    assert isinstance(wiki, Row) and isinstance(synth, Row)
    shared = ("precision", "precision_lo", "precision_hi", "precision_lenient", "respond_ratio", "claims_per_response",
              "supported_per_person", "factscore", "informative_responses", "entity_scores", "entity_factscore")
    for row in (wiki, synth):
        assert all(getattr(row, name) is not None for name in shared), row.system
        assert Row.from_dict(row.to_dict()) == row
    assert set(wiki.attributes) == {"birth_year", "birth_place", "occupation"}
    assert synth.attributes["birth_date"] == (1, 1) and synth.attributes["university"] == (0, 0)
    assert {f.name for f in fields(Row)} >= set(shared)
