"""Stage 7, the report: what a person reads of an experiment.

`method_summary` writes the run's results folder (table.md, rows.csv, plots) and returns the method
table; `write_report` puts a narrow headline table in front of it with the command, commit and machine
that produced it (results/report.md), and publishes that page with its plots under `docs/results/`
when asked, so the README links results instead of holding them.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lacy.core.config import LacyConfig
from lacy.core.provenance import git_describe, machine
from lacy.eval.compare import difference, find, measure, to_json
from lacy.eval.row import paired_bootstrap


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (missing cells shown as –)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(c, float("nan"))) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def precision_plot(rows: Sequence[dict], path: str | Path, *, x: str = "call_rate",
                   y: str = "precision", group: str = "rule", title: str = "") -> Path:
    """Factual precision against realised call rate, one line per group, with CI error bars
    (`{y}_lo`, `{y}_hi` when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name in dict.fromkeys(r[group] for r in rows):
        pts = sorted((r for r in rows if r[group] == name), key=lambda r: r[x])
        xs = [r[x] for r in pts]
        ys = [r[y] for r in pts]
        lo = [r[y] - r.get(f"{y}_lo", r[y]) for r in pts]
        hi = [r.get(f"{y}_hi", r[y]) - r[y] for r in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=str(name))
    ax.set_xlabel({"call_rate": "call rate (share of small-model decisions delegated)",
                   "people": "invented people in the corpus"}.get(x, x))
    ax.set_ylabel("factual precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The method table of an experiment


def gap_closed(cascade: float | None, small: float | None, big: float | None) -> float:
    """Share of the small-alone → big-alone precision gap the cascade closes (nan if undefined)."""
    if None in (cascade, small, big) or big == small:
        return float("nan")
    return (cascade - small) / (big - small)  # type: ignore[operator]


def _ci(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return "–" if lo is None else f"{_fmt(row.get(key))} [{_fmt(lo)}, {_fmt(hi)}]"


ATTRIBUTES = ("birth_year", "birth_place", "occupation", "birth_date", "birth_city", "university", "field",
              "employer", "employer_city")
"""Attribute columns the table shows when rows carry them (`<attr>_precision`)."""


def _table(rows: list[dict], trained: dict[str, dict], comparison: str, big: str, rate: float,
           big_row: dict) -> list[dict]:
    """One line per (model, trigger) of a comparison at the headline rate with big side `big`."""
    lines = []
    for model, rec in trained.items():
        if not model.endswith(f"-{comparison}"):
            continue
        alone = next((r for r in rows if r["model"] == model and r["big"] == "none"), {})
        for r in rows:
            if (r["model"], r["big"], r["target_rate"], r["people"]) != (model, big, rate, "train"):
                continue
            trigger = r["trigger"] + (f"/{r['unit']}" if r.get("unit") else "")
            line = {"rule": model.removesuffix(f"-{comparison}"), "trigger": trigger,
                    "val loss": rec.get("val_real_loss"), "train calls": rec.get("call_share"),
                    "supervised": rec.get("supervised_tokens"), "small alone": alone.get("precision"),
                    "cascade [CI]": _ci(r, "precision"), "informative": r.get("informative_precision"),
                    "FactScore": r.get("factscore"), "respond": r.get("respond_ratio"),
                    "claims/resp": r.get("claims_per_response"), "calib. rate": r.get("calibration_rate"),
                    "call rate": r.get("call_rate"),
                    "gap closed": gap_closed(r.get("precision"), alone.get("precision"), big_row.get("precision"))}
            if r.get("respond_ratio_judge") is not None:  # the LLM judge ran (llm_judge)
                line["LLM judge [CI]"] = _ci(r, "precision_judge")
            for attr in ATTRIBUTES:
                if f"{attr}_stated" in r:
                    line[attr.replace("_", " ")] = r.get(f"{attr}_precision")
            line["leakage [CI]"] = _ci(alone, "leakage")
            if "stored_bits" in rec:  # synthetic corpus: what the model holds, where its calls land
                line["stored bits"] = rec["stored_bits"]
                line["template loss"] = rec.get("template_loss")
                line["train calls on facts"] = rec.get("selected_oracle_share")
                line["cascade calls on facts"] = r.get("calls_on_facts")
            lines.append(line)
    return lines


def _paired(rows: list[dict], comparison: str, big: str, rate: float, bootstrap: int, seed: int) -> list[str]:
    """LaCy (P(<CALL>)) minus every other system at the headline rate: FactScore over all people
    (abstention scores 0, so nobody is dropped) and precision over the people both answered."""

    here = [r for r in rows if r["big"] == big and r["target_rate"] == rate and r["people"] == "train"
            and r["model"] and r["model"].endswith(f"-{comparison}")]
    lacy = next((r for r in here if r["model"] == f"lacy-{comparison}" and r["trigger"] == "p_call"), None)
    if lacy is None:
        return []
    out = []
    for other in here:
        if other is lacy:
            continue
        name = f"{other['model'].removesuffix(f'-{comparison}')}/{other['trigger']}"
        d, lo, hi = paired_bootstrap(lacy["entity_factscore"], other["entity_factscore"], n=bootstrap, seed=seed)
        n = len(lacy["entity_factscore"])
        text = (f"lacy/p_call − {name}: FactScore {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n}; "
                f"±0.05 needs ≈{people_for_halfwidth(lacy['entity_factscore'], other['entity_factscore'])} people)")
        pairs = [(x, y) for x, y in zip(lacy["entity_scores"], other["entity_scores"], strict=True)
                 if x is not None and y is not None]
        if pairs:
            d, lo, hi = paired_bootstrap(lacy["entity_scores"], other["entity_scores"], n=bootstrap, seed=seed)
            text += (f", precision {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={len(pairs)} both answered; ±0.05 needs "
                     f"≈{people_for_halfwidth(*zip(*pairs, strict=True))} people)")
        out.append(text)
    return out


def people_for_halfwidth(a: Sequence[float], b: Sequence[float], halfwidth: float = 0.05) -> int:
    """People a paired comparison needs for a 95 % CI of ±`halfwidth` at the spread of these
    per-person differences (normal approximation, 1.96 σ / √n): fewer than were given when the CI is
    already narrower; the people given when the differences do not spread (σ = 0)."""

    diffs = np.asarray(a, float) - np.asarray(b, float)
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    return math.ceil((1.96 * sd / halfwidth) ** 2) if sd > 0 else len(diffs)


def proxy_table(proxy: dict) -> list[str]:
    """Markdown lines: the spaCy fact flags against the oracle (lacy.corpus.synthbio.proxy_vs_oracle)."""
    recall = proxy["recall_by_attribute"]
    line = {"flagged share": proxy.get("flagged_share"), "true fact share": proxy.get("fact_share"),
            "precision": proxy["precision"], "recall": proxy["recall"],
            **{f"recall {a.replace('_', ' ')}": v for a, v in recall.items()}}
    words = ", ".join(f"{w.strip()!r} ({n})" for w, n in proxy["false_positive_tokens"])
    return ["## The spaCy proxy against the truth (token level, training shards)", "",
            markdown_table([line], list(line)), "", f"Most flagged tokens outside every fact: {words}", ""]


def method_summary(rows: Sequence[dict], trained: dict[str, dict], cfg: LacyConfig, results_dir: str | Path) -> str:
    """Write the experiment's results (table.md, rows.csv, one plot per comparison and big model) and
    return the Markdown: per comparison and big side, each rule and trigger at the headline call rate —
    its training (validation loss, realised training call share, supervised tokens), small-alone and
    cascade precision with 95 % bootstrap CIs over people, informative precision, FactScore with
    abstentions, respond ratio, claims per response, realised call rate on the calibration and on the
    evaluation people, gap closed, per-attribute
    precision, leakage with its CI — then paired differences of LaCy against every other line."""
    results_dir = Path(results_dir)
    rows = list(rows)
    xcfg, rate = cfg.experiment, cfg.experiment.headline_rate
    flat = [{k: v for k, v in r.items() if not k.startswith("entity_") and not isinstance(v, dict)} for r in rows]
    write_csv(flat, results_dir / "rows.csv")
    lines = [f"# Method table (headline call rate {rate:.0%}; precision over the people who made a claim, "
             "95 % bootstrap CI over people; fixed thresholds calibrated with calls on, on other people: "
             "calib. rate is their realised rate there, call rate on the evaluation people)", ""]
    for comparison in xcfg.comparisons:
        for big in xcfg.big_models:
            big_row = next((r for r in rows if r["model"] is None and r["big"] == big), {})
            table = _table(rows, trained, comparison, big, rate, big_row)
            lines += [f"## {comparison}-equalised, big model: {big} (big alone: {_ci(big_row, 'precision')}, "
                      f"FactScore {_fmt(big_row.get('factscore'))})", "",
                      markdown_table(table, list(table[0]) if table else ["rule"]), ""]
            if diffs := _paired(rows, comparison, big, rate, cfg.eval.bootstrap, cfg.seed):
                lines += ["Paired differences (95 % CI): " + "; ".join(diffs), ""]
            plot_rows = [{"rule": f"{r['model'].removesuffix(f'-{comparison}')}/{r['trigger']}",
                          "precision": r.get("precision") or 0.0,
                          "precision_lo": r.get("precision_lo") or r.get("precision") or 0.0,
                          "precision_hi": r.get("precision_hi") or r.get("precision") or 0.0,
                          "call_rate": r.get("call_rate") or 0.0}
                         for r in rows if r["model"] and r["model"].endswith(f"-{comparison}") and r["big"] == big
                         and r["people"] == "train"]
            if plot_rows:
                precision_plot(plot_rows, results_dir / f"precision_vs_call_rate-{comparison}-{big}.png",
                               title=f"{comparison}-equalised, {big} big model")
    if (results_dir / "proxy_vs_oracle.json").is_file():
        lines += proxy_table(json.loads((results_dir / "proxy_vs_oracle.json").read_text()))
    heldout = [r for r in rows if r["people"] == "heldout"]
    if heldout:
        lines += ["## Held-out people (articles in the validation split)", "",
                  markdown_table([{"system": r["system"], "precision [CI]": _ci(r, "precision"),
                                   "FactScore": r.get("factscore"), "call rate": r.get("call_rate")}
                                  for r in heldout], ["system", "precision [CI]", "FactScore", "call rate"]), ""]
    text = "\n".join(lines)
    (results_dir / "table.md").write_text(text)
    return text


def _q(estimate: tuple[float, float, float] | None) -> str:
    return "–" if estimate is None else f"{_fmt(estimate[0])} [{_fmt(estimate[1])}, {_fmt(estimate[2])}]"


def comparison_summary(rows: Sequence[dict], cfg: LacyConfig, results_dir: str | Path) -> str:
    """The comparison protocol's headline (`lacy.eval.compare`): per system at the headline call rate,
    correct values per person and precision with intervals over seeds and people, the realised call
    rate and the big model's share of the output, APGR and CPT(50 %) over the swept rates; the small and
    big models alone; LaCy's paired differences at every rate; the curves as a figure (curves.png) and
    the numbers as comparison.json."""
    results_dir, rate = Path(results_dir), cfg.experiment.headline_rate
    measured, bigs, _ = measure(rows, cfg.eval.bootstrap, cfg.seed)
    if not measured:
        return ""
    seeds = max(len(v) for m in measured for v in m.system.points.values())
    rates = sorted({r for m in measured for r in m.quality})
    lines = [{"system": f"big alone ({big})", "correct / person [CI]": _q(q)} for big, q in bigs.items()]
    for m in sorted(measured, key=lambda m: (m.system.comparison, m.system.big, m.system.rule, m.system.trigger)):
        lines.append({"system": m.system.name + ("" if len(cfg.experiment.comparisons) == 1 else
                                                 f" ({m.system.comparison})"),
                      "correct / person [CI]": _q(m.quality.get(rate)), "precision [CI]": _q(m.precision.get(rate)),
                      "call rate": m.call_rate.get(rate), "big share": m.big_share.get(rate),
                      "APGR [CI]": _q(m.apgr), "CPT(50 %)": "> max" if m.cpt is None else m.cpt})
    small = {}
    for m in measured:
        if m.system.alone and m.system.rule not in small:
            values = [x["entity_supported"] for x in m.system.alone]
            small[m.system.rule] = sum(sum(v) / len(v) for v in values) / len(values)
    lines += [{"system": f"{rule} alone", "correct / person [CI]": _fmt(v)} for rule, v in small.items()]
    columns = ["system", "correct / person [CI]", "precision [CI]", "call rate", "big share", "APGR [CI]", "CPT(50 %)"]
    text = [f"Quality at the headline call rate {rate:.0%} (correct values per person, abstainers 0), 95 % intervals "
            f"resampling {seeds} training seed(s) and {len(rows[0]['entity_supported'])} people; APGR and "
            f"CPT(50 %) over the swept rates {', '.join(f'{r:g}' for r in rates)}.", "",
            markdown_table(lines, columns), ""]
    pairs, paired = [], []
    for big in cfg.experiment.big_models:
        for unit in cfg.experiment.units or [None]:
            lacy = find(measured, "lacy", "p_call", big, unit)
            for rule, trigger in (("plain", "confidence"), ("loss", "p_call"), ("lacy", "confidence"),
                                  ("lacy", "combined")):
                other = find(measured, rule, trigger, big, unit)
                if lacy is None or other is None:
                    continue
                diffs = [(r, d) for r in rates if (d := difference(lacy, other, r))]
                versus = f"lacy/p_call − {other.system.rule}/{other.system.trigger}"
                pairs.append(f"- {versus} ({big}" + (f", {unit}" if unit else "") + "): "
                             + "; ".join(f"{r:g}: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" for r, d in diffs))
                paired += [{"pair": versus, "big": big, "unit": unit, "rate": r, "difference": d} for r, d in diffs]
    if pairs:
        text += ["Paired differences in correct values per person, by call rate (95 % interval over seeds and "
                 "people):", "", *pairs, ""]
    curves_plot(measured, bigs, results_dir / "curves.png")
    (results_dir / "comparison.json").write_text(json.dumps(
        {"rates": rates, "seeds": seeds, "big_alone": bigs, "small_alone": small,
         "systems": [to_json(m) for m in measured], "paired": paired}, indent=2))
    return "\n".join(text)


def curves_plot(measured: Sequence[Any], bigs: dict[str, tuple[float, float, float]], path: str | Path) -> Path:
    """Quality against the realised call rate, one line per system with its intervals, the big model
    alone as a horizontal line per big side, each rule's small model alone at rate 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for m in measured:
        rates = sorted(m.quality)
        xs = [m.call_rate[r] for r in rates]
        ys = [m.quality[r][0] for r in rates]
        err = [[y - m.quality[r][1] for y, r in zip(ys, rates, strict=True)],
               [m.quality[r][2] - y for y, r in zip(ys, rates, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m.system.name)
    for big, (q, _, _) in bigs.items():
        ax.axhline(q, linestyle="--", color="gray", linewidth=1)
        ax.text(0.99, q, f"big alone ({big})", ha="right", va="bottom", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_xlabel("realised call rate (share of decisions delegated)")
    ax.set_ylabel("correct values per person")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results_dir: str | Path, rows: Sequence[dict], cfg: LacyConfig, summary: str, command: str,
                 publish: str | Path | None = None, started: float | None = None) -> Path:
    """results/report.md: the headline table, then the method table (`summary`), under the command,
    commit, machine and duration that produced them; copied with the run's plots to
    `<publish>/<run name>.md` (and `<run name>-*.png`) when `publish` names a folder."""
    results_dir, name = Path(results_dir), Path(cfg.run_dir).name
    host = machine()
    took = "" if started is None else f", {(time.time() - started) / 60:.1f} min"
    head = [f"# {name}: results", "",
            f"Produced by `{command}` at commit `{git_describe()}` on {time.strftime('%Y-%m-%d')}, "
            f"{host['cpu']} ({host['cores']} cores, load {host['load']:.2f} at the end{took}). CPU models "
            "round differently: compare numbers taken on the same machine.", "",
            "## Headline", "", comparison_summary(rows, cfg, results_dir), ""]
    text = "\n".join(head) + "\n" + summary.replace("# Method table", "## Method table", 1) + "\n"
    path = results_dir / "report.md"
    path.write_text(text)
    if publish is not None:
        out = Path(publish)
        out.mkdir(parents=True, exist_ok=True)
        plots = sorted(results_dir.glob("*.png"))
        for plot in plots:
            shutil.copyfile(plot, out / f"{name}-{plot.name}")
        links = "".join(f"\n![{plot.stem}]({name}-{plot.name})\n" for plot in plots)
        (out / f"{name}.md").write_text(text + links)
    return path
