"""What a person reads: the coloured view of delegated spans, the method table and its plot."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lacy.config import ExperimentConfig

SPAN_STYLE = {
    "prompt": "color:#555",
    "small": "color:#111",
    "big": "background:#ffd54f;color:#000;border-radius:3px;padding:0 2px",
}


def spans_html(spans: Iterable[tuple[str, str]]) -> str:
    """Inline HTML for (text, source) spans; delegated (big-model) spans are marked `data-source="big"`."""
    parts = []
    for text, source in spans:
        title = {"big": "written by the big model (<CALL>)", "small": "written by the small model",
                 "prompt": "prompt"}.get(source, source)
        parts.append(f'<span class="span-{html.escape(source)}" data-source="{html.escape(source)}" '
                     f'title="{title}" style="{SPAN_STYLE.get(source, "")}">{html.escape(text)}</span>')
    return "".join(parts)


def page_html(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:820px;margin:2em auto;line-height:1.6}"
        ".gen{white-space:pre-wrap;border:1px solid #ddd;padding:1em;border-radius:6px;margin:.5em 0}"
        ".legend span{margin-right:1em}.meta{color:#666;font-size:.9em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>"
        "<div class='legend'><span style='" + SPAN_STYLE["small"] + "'>small model</span>"
        "<span style='" + SPAN_STYLE["big"] + "'>big model (delegated by &lt;CALL&gt;)</span>"
        "<span style='" + SPAN_STYLE["prompt"] + "'>prompt</span></div>"
        f"{body}</body></html>"
    )


def generation_block(spans: Iterable[tuple[str, str]], meta: str = "") -> str:
    meta_html = f"<div class='meta'>{html.escape(meta)}</div>" if meta else ""
    return f"<div class='gen'>{spans_html(spans)}</div>{meta_html}"


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
    ax.set_xlabel("call rate (share of small-model decisions delegated)")
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


def _nearest(rows: Sequence[dict], model: str, big: str, rate: float) -> dict | None:
    candidates = [r for r in rows if r["rule"] == model and r["big"] == big]
    return min(candidates, key=lambda r: abs(r["target_rate"] - rate), default=None)


def method_summary(rows: Sequence[dict], trained: dict[str, dict], xcfg: ExperimentConfig,
                   results_dir: str | Path, *, bootstrap: int = 1000, seed: int = 0) -> str:
    """Write the experiment's results (table.md, rows.csv, one plot per big model) and return the
    Markdown: per comparison and big model, each rule's training, small-alone and cascade precision at
    the headline call rate (95 % bootstrap CIs over people), gap closed, leakage, and the paired
    difference of LaCy against every other rule."""
    from lacy.eval import paired_bootstrap

    results_dir = Path(results_dir)
    rate = xcfg.headline_rate
    flat = [{k: v for k, v in r.items() if not k.startswith("entity_scores")} for r in rows]
    write_csv(flat, results_dir / "rows.csv")
    lines = [f"# Method table (headline call rate {rate:.0%}; precision = strict FactScore-style, "
             "95 % bootstrap CI over people)", ""]
    for comparison in xcfg.comparisons:
        for big in xcfg.big_models:
            big_row = next((r for r in rows if r["rule"] == f"big alone ({big})"), {})
            table = []
            for model, rec in trained.items():
                if not model.endswith(f"-{comparison}"):
                    continue
                alone = _nearest(rows, model, "none", 0.0) or {}
                casc = _nearest(rows, model, big, rate) or {}
                p = casc.get("precision_strict")
                table.append({
                    "rule": model.removesuffix(f"-{comparison}"),
                    "val loss": rec.get("val_real_loss"),
                    "train tokens": rec.get("tokens", "–"), "supervised": rec.get("supervised_tokens", "–"),
                    "small alone": alone.get("precision_strict"),
                    "cascade": p,
                    "CI": f"[{_fmt(casc.get('precision_strict_lo'))}, {_fmt(casc.get('precision_strict_hi'))}]",
                    "call rate": casc.get("call_rate"),
                    "gap closed": gap_closed(p, alone.get("precision_strict"),
                                             big_row.get("precision_strict")),
                    "lenient": casc.get("precision_lenient"),
                    "leakage": alone.get("leakage"),
                })
            lines += [f"## {comparison}-equalised, big model: {big} "
                      f"(big alone: {_fmt(big_row.get('precision_strict'))})", "",
                      markdown_table(table, list(table[0]) if table else ["rule"]), ""]
            lacy_row = _nearest(rows, f"lacy-{comparison}", big, rate)
            diffs = []
            for model in trained:
                other = _nearest(rows, model, big, rate)
                if lacy_row is None or other is None or model == f"lacy-{comparison}" \
                        or not model.endswith(f"-{comparison}"):
                    continue
                try:
                    d, lo, hi = paired_bootstrap(lacy_row["entity_scores_strict"],
                                                 other["entity_scores_strict"], n=bootstrap, seed=seed)
                except ValueError:
                    continue
                name = model.removesuffix(f"-{comparison}")
                both = sum(x is not None and y is not None for x, y in
                           zip(lacy_row["entity_scores_strict"], other["entity_scores_strict"], strict=True))
                diffs.append(f"lacy − {name}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={both})")
            if diffs:
                lines += ["Paired differences in cascade precision (LaCy minus rule, 95 % CI, over the n people "
                          "both answered): "
                          + "; ".join(diffs), ""]
            plot_rows = [{**r, "rule": r["rule"].removesuffix(f"-{comparison}"),
                          "precision": r.get("precision_strict") or 0.0,
                          "precision_lo": r.get("precision_strict_lo") or r.get("precision_strict") or 0.0,
                          "precision_hi": r.get("precision_strict_hi") or r.get("precision_strict") or 0.0,
                          "call_rate": r.get("call_rate") or 0.0}
                         for r in rows if r["rule"].endswith(f"-{comparison}") and r["big"] in (big, "none")]
            if plot_rows:
                precision_plot(plot_rows, results_dir / f"precision_vs_call_rate-{comparison}-{big}.png",
                               title=f"{comparison}-equalised, {big} big model")
    text = "\n".join(lines)
    (results_dir / "table.md").write_text(text)
    return text
