"""What a person reads: the coloured view of delegated spans, the method table and its plot."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

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
