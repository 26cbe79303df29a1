"""HTML building blocks of the atlas: the page frame, key-value lists, tables and stimulus cards."""
from __future__ import annotations

import json
import math
from html import escape
from typing import Any, Iterable, Sequence

import numpy as np


def num(v: Any, digits: int = 3) -> str:
    """A number as the atlas prints it (blank for missing)."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return escape(str(v))
    if math.isinf(x):
        return "\u221e" if x > 0 else "\u2212\u221e"
    if not math.isfinite(x):
        return ""
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    a = abs(x)
    if a < 1e-3 or a >= 1e5:
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if a < 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def page(title: str, body: str, depth: int, *, scripts: Sequence[str] = (), crumbs: Sequence[tuple[str, str]] = ()) -> str:
    """A whole page: ``depth`` is how many folders below the atlas root it lives (for relative links)."""
    up = "../" * depth
    nav = "".join(f' <span>›</span> <a href="{up}{escape(h)}">{escape(t)}</a>' for t, h in crumbs)
    tags = "".join(f'<script src="{up}{escape(s)}"></script>' for s in scripts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
        f"<link rel=\"stylesheet\" href=\"{up}static/atlas.css\">{tags}"
        f"<script src=\"{up}static/atlas.js\"></script></head><body>"
        f"<header class=\"top\"><a class=\"brand\" href=\"{up}index.html\">neuroprobe atlas</a>{nav}</header>"
        f"<main>{body}</main></body></html>\n"
    )


def kv(items: Iterable[tuple[str, Any]]) -> str:
    """A definition list of label -> value (values already HTML or plain numbers/strings)."""
    rows = []
    for k, v in items:
        if v is None or (isinstance(v, str) and v == ""):
            continue
        rows.append(f"<dt>{escape(k)}</dt><dd>{v if isinstance(v, str) else num(v)}</dd>")
    return f'<dl class="kv">{"".join(rows)}</dl>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1, cls: str = "data") -> str:
    """A static table; cells are HTML strings or numbers; the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for r in rows:
        tds = "".join(f'<td class="{"l" if i < left else ""}">{v if isinstance(v, str) else num(v)}</td>' for i, v in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def pill(text: str, kind: str = "") -> str:
    return f'<span class="pill {escape(kind)}">{escape(text)}</span>'


def shade(value: float, scale: float) -> str:
    """Background colour of a token: orange for positive activation, blue for negative, alpha by size."""
    if not math.isfinite(value) or scale <= 0:
        return "transparent"
    a = max(-1.0, min(1.0, value / scale))
    return f"rgba(230,120,0,{a:.3f})" if a >= 0 else f"rgba(1,115,178,{-a:.3f})"


def token_html(segments: list[tuple[str, list[int]]], values: np.ndarray, scale: float) -> str:
    """Text with each token's background shaded by the unit's activation at that token."""
    out = []
    for text, rows in segments:
        v = float(values[rows[0]]) if len(rows) == 1 else float(np.nanmean(values[rows])) if rows else float("nan")
        shown = escape(text).replace(" ", "&nbsp;").replace("\n", "↵") or "&#8203;"
        out.append(f'<span class="tok" data-act="{v:.4g}" style="background:{shade(v, scale)}" title="{v:.4g}">{shown}</span>')
    return "".join(out)


def stim_card(row: dict, response: float, *, thumb: str | None, text_html: str | None, depth: int) -> str:
    """One stimulus as a card: thumbnail and/or (shaded) text, its concept, form and the unit's response."""
    up = "../" * depth
    parts = [f'<div class="stim" data-stimulus="{escape(str(row.get("id", "")))}">']
    modality = str(row.get("modality", ""))
    if modality in ("image", "pair"):
        if thumb:
            parts.append(f'<img src="{up}{escape(thumb)}" alt="{escape(str(row.get("id", "")))}" loading="lazy">')
        else:
            parts.append('<div class="note">(image not available)</div>')
    if text_html is not None:
        parts.append(f'<div class="txt">{text_html}</div>')
    elif modality in ("text", "pair") and str(row.get("text", "") or "") not in ("", "nan"):
        parts.append(f'<div class="txt">{escape(str(row.get("text")))}</div>')
    parts.append(f'<div class="resp">response {num(response)}</div>'
                 f'<div class="meta">{escape(str(row.get("concept", "")))} · {escape(str(row.get("form", "")))} · '
                 f'{escape(str(row.get("split", "")))}<br>{escape(str(row.get("id", "")))}</div></div>')
    return "".join(parts)


def js_data(name: str, value: Any) -> str:
    """A script that sets ``window.<name>`` (data beside the page: works from ``file://``)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/")
    return f"window.{name} = {text};\n"
