"""Inline SVG charts for the atlas: drawn as text, so pages need no image files and no plotting per unit.

* :func:`quiroga_panel` — one unit's response to every stimulus, grouped by concept
  and coloured by form (the bars of Quiroga et al. 2005), with the criterion's threshold;
* :func:`bars` — grouped horizontal bars (cells per site beside the controls, per-form AUCs);
* :func:`forgetting_curve` — readout change against lesion size, beside random lesions.
"""
from __future__ import annotations

from html import escape
from typing import Mapping, Sequence

import numpy as np

#: seaborn's "colorblind" palette (the figures module uses it too).
PALETTE = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")


def colours(names: Sequence[str]) -> dict[str, str]:
    """A stable colour per name (in order of first appearance)."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def _f(x: float) -> str:
    return f"{x:.1f}"


def _gridlines(lo: float, hi: float, y, x0: float, x1: float) -> list[str]:
    """Horizontal grid lines with their value labels at the ticks of ``[lo, hi]`` (``y`` maps value to pixels)."""
    return [f'<line x1="{x0}" x2="{x1}" y1="{_f(y(t))}" y2="{_f(y(t))}" stroke="#eef0f3"/>'
            f'<text x="{x0 - 4}" y="{_f(y(t) + 4)}" font-size="10" text-anchor="end">{_num(t)}</text>'
            for t in _ticks(lo, hi)]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return [lo] if np.isfinite(lo) else []
    step = 10 ** np.floor(np.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n + 1:
            step *= m
            break
    start = np.ceil(lo / step) * step
    # whole multiples of the step: floating-point residue would print 0 as -3.47e-18
    return [float(np.round(v / step) * step) + 0.0 for v in np.arange(start, hi + step * 1e-9, step)]


def _num(v: float) -> str:
    return f"{v:.3g}"


def quiroga_panel(
    response: np.ndarray,
    concept: Sequence[str],
    form: Sequence[str],
    concepts: Sequence[str],
    *,
    threshold: float | None = None,
    highlight: str | None = None,
    width: int = 960,
    height: int = 260,
    limits: tuple[float, float] | None = None,
) -> str:
    """Bars of one unit's response to every stimulus, grouped by concept (battery order) then form.

    Parameters
    ----------
    response
        ``[n_stimuli]`` responses (NaN: the site did not see the stimulus; left out).
    concept, form
        Each stimulus's concept and form.
    concepts
        Concept order (the battery's).
    threshold
        A horizontal dashed line (the criterion's baseline mean + k SD).
    highlight
        A concept whose group gets a shaded background (the unit's concept).
    limits
        The value axis's range (default: from the responses); panels drawn side by side share it.
    """
    response = np.asarray(response, dtype=np.float64)
    concept = np.asarray(concept, dtype=object)
    form = np.asarray(form, dtype=object)
    ok = np.isfinite(response)
    forms = list(dict.fromkeys(form[ok]))
    col = colours(forms)
    # stimuli sorted by (concept in battery order, form in order of appearance, file order), vectorised
    c_rank = {c: i for i, c in enumerate(concepts)}
    f_rank = {f: i for i, f in enumerate(forms)}
    idx_ok = np.flatnonzero(ok & np.isin(concept, list(c_rank)))
    cr = np.array([c_rank[c] for c in concept[idx_ok]], dtype=np.int64)
    fr = np.array([f_rank[f] for f in form[idx_ok]], dtype=np.int64)
    sorted_idx = idx_ok[np.lexsort((idx_ok, fr, cr))]
    cr_sorted = np.array([c_rank[c] for c in concept[sorted_idx]], dtype=np.int64)
    bounds = np.flatnonzero(np.r_[True, cr_sorted[1:] != cr_sorted[:-1]]) if len(sorted_idx) else np.array([], int)
    ends = list(bounds[1:]) + [len(sorted_idx)]
    order: list[tuple[str, np.ndarray]] = [(concepts[cr_sorted[a]], sorted_idx[a:b]) for a, b in zip(bounds, ends)]
    labels = {f: escape(str(f)) for f in forms}
    n = sum(len(i) for _, i in order)
    left, right, top, bottom = 48, 10, 26, 70
    gap = 6.0
    inner = width - left - right - gap * max(len(order) - 1, 0)
    bw = inner / max(n, 1)
    vals = response[ok]
    lo = min(0.0, float(vals.min())) if vals.size else 0.0
    hi = max(0.0, float(vals.max())) if vals.size else 1.0
    if threshold is not None and np.isfinite(threshold):
        hi = max(hi, float(threshold))
        lo = min(lo, float(threshold))
    if limits is not None:
        lo, hi = min(lo, float(limits[0])), max(hi, float(limits[1]))
    if hi == lo:
        hi = lo + 1.0
    ph = height - top - bottom

    def y(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    out = [f'<svg class="quiroga" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="responses to every stimulus, grouped by concept">']
    out.extend(_gridlines(lo, hi, y, left, width - right))
    x = float(left)
    for c, idx in order:
        w = bw * len(idx)
        if c == highlight:
            out.append(f'<rect x="{_f(x - 2)}" y="{top}" width="{_f(w + 4)}" height="{ph}" fill="#fff4d6"/>')
        cname = escape(str(c))
        wbar = f"{max(bw, 0.6):.2f}"
        for i in idx:
            v = response[i]
            y0, y1 = sorted((y(0.0), y(v)))
            f_ = form[i]
            out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{wbar}" height="{max(y1 - y0, 0.5):.2f}" '
                       f'fill="{col[f_]}"><title>{cname} / {labels[f_]}: {v:.3g}</title></rect>')
            x += bw
        cx = x - w / 2
        out.append(f'<text x="{_f(cx)}" y="{height - bottom + 12}" font-size="11" text-anchor="end" '
                   f'transform="rotate(-40 {_f(cx)} {height - bottom + 12})">{escape(str(c))}</text>')
        x += gap
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(y(0))}" y2="{_f(y(0))}" stroke="#888" stroke-width="0.8"/>')
    if threshold is not None and np.isfinite(threshold):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{_f(y(threshold))}" y2="{_f(y(threshold))}" '
                   f'stroke="#111" stroke-dasharray="5 3" stroke-width="1"/>'
                   f'<text x="{width - right}" y="{_f(y(threshold) - 4)}" font-size="10" text-anchor="end">threshold</text>')
    out.append(f'<text x="12" y="{top + ph / 2}" font-size="11" transform="rotate(-90 12 {top + ph / 2})" '
               f'text-anchor="middle">response</text>')
    lx = left
    for f_ in forms:
        out.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{col[f_]}"/>'
                   f'<text x="{lx + 13}" y="15" font-size="11">{escape(str(f_))}</text>')
        lx += 22 + 6.5 * len(str(f_))
    out.append("</svg>")
    return "".join(out)


def bars(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    width: int = 520,
    row: int = 18,
    label_width: int = 190,
    reference: float | None = None,
    xmax: float | None = None,
    fmt: str = "{:g}",
) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (legend on top)."""
    names = list(series)
    col = dict(zip(names, PALETTE))
    vals = np.array([[float(v) if v is not None else np.nan for v in series[s]] for s in names], dtype=np.float64)
    finite = vals[np.isfinite(vals)]
    hi = xmax if xmax is not None else (float(finite.max()) if finite.size else 1.0)
    hi = hi if hi > 0 else 1.0
    bh = max(4.0, (row - 4) / max(len(names), 1))
    top = 22
    height = top + row * len(labels) + 6
    plot = width - label_width - 50

    def x(v: float) -> float:
        return label_width + plot * max(v, 0.0) / hi

    out = [f'<svg class="bars" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    lx = label_width
    for s in names:
        out.append(f'<rect x="{lx}" y="5" width="10" height="10" fill="{col[s]}"/><text x="{lx + 13}" y="14" font-size="11">{escape(s)}</text>')
        lx += 24 + 6.5 * len(s)
    for i, lab in enumerate(labels):
        y0 = top + i * row
        out.append(f'<text x="{label_width - 6}" y="{_f(y0 + row / 2 + 4)}" font-size="11" text-anchor="end">{escape(str(lab))}</text>')
        for j, s in enumerate(names):
            v = vals[j, i]
            if not np.isfinite(v) or v == 0:  # nothing to draw (the tooltip-free gap reads as zero)
                continue
            yy = y0 + 2 + j * bh
            out.append(f'<rect x="{label_width}" y="{_f(yy)}" width="{_f(x(v) - label_width)}" height="{_f(bh - 1)}" fill="{col[s]}">'
                       f'<title>{escape(str(lab))} — {escape(s)}: {fmt.format(v)}</title></rect>'
                       f'<text x="{_f(x(v) + 3)}" y="{_f(yy + bh - 2)}" font-size="10">{fmt.format(v)}</text>')
    if reference is not None:
        out.append(f'<line x1="{_f(x(reference))}" x2="{_f(x(reference))}" y1="{top - 2}" y2="{height - 4}" stroke="#111" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "".join(out)


def forgetting_curve(curves: Mapping[str, Mapping[str, Sequence[float]]], *, readout: str | None = None,
                     width: int = 560, height: int = 300) -> str:
    """Readout change against lesion size ``k`` (log-spaced axis).

    Every series is marked at every ``k`` (a line through one point draws nothing): the
    target as dots, the other concepts as open squares, the random lesions as their mean
    with a ± SD whisker, joined by a band when there are several ``k``. Each drawn mark
    carries ``data-series`` and each legend entry ``data-legend`` (``target``, ``other``,
    ``random``).

    Parameters
    ----------
    curves
        Per lesion mode: ``{"k": [...], "target": [...], "other": [...], "random": [...], "random_sd": [...]}``
        (``random`` and ``random_sd`` may be missing or NaN).
    readout
        The readout's name, for the y label.
    """
    left, right, top, bottom = 66, 14, 46, 36
    ks = sorted({float(k) for c in curves.values() for k in c["k"]})
    allv = [float(v) for c in curves.values() for key in ("target", "other", "random") for v in c.get(key, []) if np.isfinite(v)]
    for c in curves.values():
        for m, s in zip(c.get("random", []), c.get("random_sd", [])):
            if np.isfinite(m) and np.isfinite(s):
                allv += [m - s, m + s]
    lo, hi = (min(allv + [0.0]), max(allv + [0.0])) if allv else (-1.0, 0.0)
    if hi == lo:
        hi = lo + 1.0
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    lk = np.log2(ks) if ks else np.array([0.0])
    kmin, kmax = float(lk.min()), float(lk.max())
    if kmax == kmin:
        kmin, kmax = kmin - 1, kmax + 1
    pw, ph = width - left - right, height - top - bottom

    def X(k: float) -> float:
        return left + pw * (np.log2(k) - kmin) / (kmax - kmin)

    def Y(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    ylabel = f"change in {readout} readout" if readout else "readout change"
    out = [f'<svg class="forgetting" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="forgetting curve">']
    out.extend(_gridlines(lo, hi, Y, left, width - right))
    for k in ks:
        out.append(f'<text x="{_f(X(k))}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{k:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">units lesioned (k)</text>'
               f'<text class="ylabel" x="12" y="{top + ph / 2}" font-size="11" transform="rotate(-90 12 {top + ph / 2})" '
               f'text-anchor="middle">{escape(ylabel)}</text>'
               f'<line x1="{left}" x2="{width - right}" y1="{_f(Y(0))}" y2="{_f(Y(0))}" stroke="#888"/>')
    drawn: set[str] = set()
    lx = left
    for i, (mode, c) in enumerate(curves.items()):
        colr = PALETTE[i % len(PALETTE)]
        k = [float(v) for v in c["k"]]
        rnd, sd = list(c.get("random", [])), list(c.get("random_sd", []))
        band = [(kk, m, s) for kk, m, s in zip(k, rnd, sd) if np.isfinite(m) and np.isfinite(s)]
        if len(band) >= 2:
            pts = [f"{_f(X(kk))},{_f(Y(m + s))}" for kk, m, s in band] + [f"{_f(X(kk))},{_f(Y(m - s))}" for kk, m, s in reversed(band)]
            out.append(f'<polygon data-series="random" points="{" ".join(pts)}" fill="{colr}" fill-opacity="0.12" stroke="none"/>')
        for kk, m, s in band:  # the ± SD whisker at every k (a band over one k has no width)
            x = _f(X(kk))
            out.append(f'<line data-series="random" x1="{x}" x2="{x}" y1="{_f(Y(m + s))}" y2="{_f(Y(m - s))}" '
                       f'stroke="{colr}" stroke-opacity="0.6" stroke-width="1.2"/>'
                       f'<line data-series="random" x1="{_f(X(kk) - 4)}" x2="{_f(X(kk) + 4)}" y1="{_f(Y(m + s))}" '
                       f'y2="{_f(Y(m + s))}" stroke="{colr}" stroke-opacity="0.6"/>'
                       f'<line data-series="random" x1="{_f(X(kk) - 4)}" x2="{_f(X(kk) + 4)}" y1="{_f(Y(m - s))}" '
                       f'y2="{_f(Y(m - s))}" stroke="{colr}" stroke-opacity="0.6"/>')
        for key, dash in (("target", ""), ("other", "2 3"), ("random", "6 3")):
            v = [(kk, float(vv)) for kk, vv in zip(k, c.get(key, [])) if np.isfinite(vv)]
            if not v:
                continue
            drawn.add(key)
            if len(v) >= 2:
                pts = " ".join(f"{_f(X(kk))},{_f(Y(vv))}" for kk, vv in v)
                out.append(f'<polyline data-series="{key}" points="{pts}" fill="none" stroke="{colr}" '
                           f'stroke-width="{2 if key == "target" else 1.2}"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
            for kk, vv in v:
                tip = f"<title>{escape(str(mode))}, k={kk:g}, {_SERIES[key]}: {_num(vv)}</title>"
                if key == "target":
                    out.append(f'<circle data-series="target" cx="{_f(X(kk))}" cy="{_f(Y(vv))}" r="3.5" fill="{colr}">{tip}</circle>')
                elif key == "other":
                    out.append(f'<rect data-series="other" x="{_f(X(kk) - 3)}" y="{_f(Y(vv) - 3)}" width="6" height="6" '
                               f'fill="#fff" stroke="{colr}" stroke-width="1.4">{tip}</rect>')
                else:
                    out.append(f'<line data-series="random" x1="{_f(X(kk) - 5)}" x2="{_f(X(kk) + 5)}" y1="{_f(Y(vv))}" '
                               f'y2="{_f(Y(vv))}" stroke="{colr}" stroke-width="2">{tip}</line>')
        out.append(f'<line x1="{lx}" x2="{lx + 16}" y1="12" y2="12" stroke="{colr}" stroke-width="2"/>'
                   f'<text x="{lx + 20}" y="16" font-size="11">{escape(str(mode))}</text>')
        lx += 40 + 7 * len(str(mode))
    # the legend: one glyph per series that is drawn, as it is drawn
    lx, ly = float(left), 32
    for key in ("target", "other", "random"):
        if key not in drawn:
            continue
        text = _SERIES[key]
        out.append(f'<g data-legend="{key}">{_glyph(key, lx + 8, ly)}'
                   f'<text x="{_f(lx + 18)}" y="{ly + 4}" font-size="10">{escape(text)}</text></g>')
        lx += 30 + 5.6 * len(text)
    out.append("</svg>")
    return "".join(out)


def _glyph(key: str, x: float, y: float, colour: str = "#555") -> str:
    """A forgetting-curve series' legend glyph centred at ``(x, y)``, drawn as its marks are."""
    if key == "target":
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="3.5" fill="{colour}"/>'
    if key == "other":
        return f'<rect x="{_f(x - 3)}" y="{_f(y - 3)}" width="6" height="6" fill="#fff" stroke="{colour}" stroke-width="1.4"/>'
    return (f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(y - 6)}" y2="{_f(y + 6)}" stroke="{colour}"/>'
            f'<line x1="{_f(x - 5)}" x2="{_f(x + 5)}" y1="{_f(y)}" y2="{_f(y)}" stroke="{colour}" stroke-width="2"/>')


#: legend text of the forgetting curve's series.
_SERIES = {"target": "target concept", "other": "other concepts (mean)", "random": "random lesions (mean ± SD)"}
