"""What a person sees of a generation: delegated spans coloured, as HTML (GET /view, the report's pages).

    spans_html([("Anna Keller was born on", "prompt"), (" May 3, 1952", "big")])
    page_html("title", generation_block(spans, "2 calls"))
    await view_page(engine, {"prompt": "Anna Keller", "call_rate": 0.22})   # GET /view
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

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
                     f'title="{html.escape(title)}" style="{SPAN_STYLE.get(source, "")}">{html.escape(text)}</span>')
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


def view_form(params: dict) -> str:
    """The /view form, its fields filled from `params` (escaped)."""
    def field(name: str, label: str, size: int) -> str:
        value = html.escape("" if params.get(name) is None else str(params.get(name)), quote=True)
        return f"{label} <input name='{name}' size='{size}' value='{value}'>"

    fields = (("prompt", "", 40), ("topic", "topic", 16), ("max_tokens", "tokens", 3), ("call_rate", "call rate", 4))
    return "<form method='get'>" + " ".join(field(*f) for f in fields) + " <button>generate</button></form>"


async def view_page(engine: Any, params: dict) -> str:
    """GET /view: a prompt form, and the generation with delegated spans coloured (a
    `lacy.serve.engine.CascadeEngine` writes it, small-only when its big model is down)."""
    form = view_form(params)
    if not params.get("prompt"):
        return page_html("lacy cascade", form)
    body = {k: v for k, v in params.items() if v is not None}
    out = await engine.generate(engine.parse({**body, "allow_undelegated": True}, "generate"))
    meta = (f"{out['calls']} calls, realised call rate {out['call_rate']:.2f}, {out['small_tokens']} small + "
            f"{out['big_tokens']} big tokens"
            + (f" — undelegated: {out['undelegated_reason']}" if out["undelegated_reason"] else ""))
    spans = [(s["text"], s["source"]) for s in out["spans"]]
    return page_html("lacy cascade", form + generation_block(spans, meta))
