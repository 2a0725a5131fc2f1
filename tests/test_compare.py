"""The comparison protocol's statistics (lacy.eval.compare) on hand-made rows: curves, APGR, CPT(50 %),
intervals over seeds and people, paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from lacy.eval.compare import Bootstrap, apgr, cpt, difference, estimate, find, measure, pgr_curve, rule_of


def row(model, big, trigger, rate, supported, scores=None, call_rate=None):
    return {"model": model, "big": big, "trigger": trigger, "target_rate": rate, "people": "train",
            "entity_supported": supported, "entity_scores": scores or [s / 4 for s in supported],
            "call_rate": rate if call_rate is None else call_rate, "big_share": (rate or 0) / 2}


def rows_of(values_by_seed: dict[str, list[list[float]]], rates=(0.2, 0.4)):
    """Two rules' cascades (one line of per-person values per seed and rate), each model alone, big alone."""
    rows = [row(None, "retrieval", None, None, [4.0] * 4)]
    for rule, per_seed in values_by_seed.items():
        for s, alone in enumerate(per_seed):
            name = f"{rule}-steps" + ("" if s == 0 else f"-seed{s}")
            rows.append(row(name, "none", None, None, alone))
            for k, rate in enumerate(rates):
                rows.append(row(name, "retrieval", "p_call" if rule == "lacy" else "confidence", rate,
                                [v + k + 1 for v in alone]))
    return rows


def test_names_of_models_with_seeds():
    assert rule_of("lacy-steps") == ("lacy", "steps", -1)
    assert rule_of("lacy_oracle-tokens-seed2") == ("lacy_oracle", "tokens", 2)
    with pytest.raises(ValueError, match="not a trained model"):
        rule_of("lacy")


def test_apgr_and_cpt_of_a_known_curve():
    rates = [0.1, 0.2, 0.4]
    pgr = pgr_curve(rates, [1.0, 2.0, 3.0], small=0.0, big=4.0)
    assert pgr == [0.25, 0.5, 0.75]
    assert apgr(rates, pgr) == pytest.approx((0.375 * 0.1 + 0.625 * 0.2) / 0.3)
    assert cpt(rates, pgr) == pytest.approx(0.2)                  # reached exactly at 0.2
    assert cpt(rates, [0.25, 0.45, 0.65]) == pytest.approx(0.2 + 0.05 / 0.2 * 0.2)  # interpolated
    assert cpt(rates, [0.1, 0.2, 0.3]) is None                      # never within the swept rates
    assert apgr([0.22], [0.4]) == 0.4


def test_measures_over_seeds_and_people_with_paired_differences():
    alone = [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]   # two seeds, four people
    rows = rows_of({"lacy": alone, "plain": alone})
    measured, bigs, _ = measure(rows, bootstrap=400, seed=0)
    lacy, plain = find(measured, "lacy", "p_call"), find(measured, "plain", "confidence")
    assert bigs["retrieval"][0] == 4.0
    assert lacy.quality[0.2][0] == pytest.approx(1.5) and lacy.quality[0.4][0] == pytest.approx(2.5)
    lo, hi = lacy.quality[0.2][1:]
    assert lo <= 1.5 <= hi and hi - lo > 0  # people and seeds differ: an interval, not a point
    # small alone 0.5, big 4: PGR 1/3.5 and 2/3.5; APGR their mean (two rates: one trapezoid)
    assert lacy.apgr[0] == pytest.approx((1 / 3.5 + 2 / 3.5) / 2)
    assert lacy.cpt == pytest.approx(0.35)  # half the gap (quality 2.25): between 0.2 (1.5) and 0.4 (2.5)
    # The same values under another system: a paired difference of exactly zero in every resample.
    assert difference(lacy, plain, 0.2) == (0.0, 0.0, 0.0)
    assert difference(lacy, plain, 0.9) is None
    assert lacy.call_rate[0.2] == 0.2 and lacy.big_share[0.4] == pytest.approx(0.2)


def test_the_bootstrap_resamples_seeds_as_well_as_people():
    # People agree within a seed, seeds disagree: with seeds resampled the interval spans them.
    values = np.asarray([[1.0] * 50, [3.0] * 50])
    point, lo, hi, _ = estimate(values, Bootstrap(2, 50, 1000, seed=0))
    assert point == 2.0 and lo == 1.0 and hi == 3.0
    point, lo, hi, _ = estimate(values[:1], Bootstrap(1, 50, 1000, seed=0))
    assert (point, lo, hi) == (1.0, 1.0, 1.0)
    # Abstainers (NaN precision) are left out of the mean, not counted as zero.
    point, *_ = estimate(np.asarray([[1.0, np.nan, 0.0, np.nan]]), Bootstrap(1, 4, 10, seed=0))
    assert point == 0.5


def test_the_report_and_the_dial_carry_lacys_paired_differences_at_every_rate(tmp_path):
    """comparison.json holds LaCy's paired differences (what the dial reads); a dial point's lines give
    every system's correct values per person at every rate and the differences as a table."""
    import json

    from lacy.core.config import load_config
    from lacy.report import comparison_summary
    from lacy.sweep import dial_point

    alone = [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    cfg = load_config("configs/synthbio-quick.yaml", ["--eval.call_rates", "[0.2, 0.4]", "--experiment.headline_rate",
                                                      "0.2", "--eval.bootstrap", "200"])
    text = comparison_summary(rows_of({"lacy": alone, "plain": alone}), cfg, tmp_path)
    assert "lacy/p_call − plain/confidence (retrieval): 0.2: +0.000" in text
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [(p["pair"], p["rate"], p["difference"]) for p in comparison["paired"]] == [
        ("lacy/p_call − plain/confidence", r, [0.0, 0.0, 0.0]) for r in (0.2, 0.4)]
    lines, paired = dial_point(6, comparison, 0.2)
    lacy = next(line for line in lines if line["system"].startswith("lacy"))
    assert lacy["filler"] == 6 and lacy["quality"] == pytest.approx(1.5)
    assert lacy["correct @0.4"].startswith("2.500 [")
    assert any(line["system"] == "big alone (retrieval)" for line in lines)
    assert [p["difference [CI]"] for p in paired] == ["+0.000 [+0.000, +0.000]"] * 2
