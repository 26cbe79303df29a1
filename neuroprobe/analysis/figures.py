"""Figures (seaborn), one function each; every function returns its matplotlib Figure.

* :func:`plot_unit` — the Quiroga panel of one unit: its response to every stimulus,
  grouped by concept and coloured by form (dots), and one bar per stimulus with the
  criterion's threshold (baseline mean + k SD).
* :func:`plot_selectivity` — distributions of an index per site (layer).
* :func:`plot_cells_per_layer` — concept cells per site for the trained subject beside
  its controls (untrained subject, rotated basis).
* :func:`plot_invariance` — the cells' AUC for every form of their concept.
* :func:`plot_unit_raster` — Quiroga's Fig. 1 for one unit: a row per form, a column per
  concept, one bar per stimulus (forms the site never sees are marked as such).
* :func:`plot_by_site` — measures per site (layer) with the controls beside the effect, one
  panel per measure, sized for a paper's column.

Figures meant for a paper's column use :func:`column_style` (8-pt text) and
:data:`CONDITION_COLORS` (one colour per condition across every figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from neuroprobe.analysis.scan import as_recording, battery_concepts
from neuroprobe.errors import NeuroprobeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from neuroprobe.recording.reader import Recording


def _plt():
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="ticks", context="paper")
    return plt, sns


def _legend_outside(ax, sns, title: str | None = None) -> None:
    """Move the axes' legend (if any) to the right of the axes, where it cannot cover the data."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title=title, frameon=False,
                        fontsize=7, title_fontsize=7)


#: Colour of each condition of an experiment (the effect and its controls), the same in every figure.
CONDITION_COLORS = {"trained": "#0173b2", "untrained": "#7f7f7f", "rotation": "#de8f05", "shuffle": "#029e73"}
#: How each condition is named in a figure.
CONDITION_LABELS = {"trained": "trained", "untrained": "untrained twin", "rotation": "rotated basis",
                    "shuffle": "label shuffle"}
#: A paper's column, in inches.
COLUMN_WIDTH = 3.5


def column_style() -> tuple:
    """Seaborn's paper style with every text at 8 pt (legible at a column's width); returns ``(plt, sns)``."""
    plt, sns = _plt()
    plt.rcParams.update({"font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 8,
                         "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8,
                         "figure.titlesize": 8, "axes.linewidth": 0.6, "lines.linewidth": 1.0})
    return plt, sns


def unit_frame(rec: "Recording | str | Path", site: str, unit: int, *, split: str | None = None) -> pd.DataFrame:
    """One unit's response to every stimulus it saw, ordered by concept, form and id.

    Returns
    -------
    DataFrame
        The stimuli table plus ``response``; ``concept`` and ``form`` are ordered categoricals
        (battery order).  Stimuli the site never saw (another modality's) are left out.
    """
    rec = as_recording(rec)
    stim = rec.stimuli.reset_index(drop=True)
    ds = rec.responses(site)
    if not 0 <= unit < ds.shape[1]:
        raise NeuroprobeError(f"site {site} has {ds.shape[1]} units; unit {unit} does not exist.")
    df = stim.assign(response=np.asarray(ds[:, unit], dtype=np.float64))
    df = df[np.isfinite(df["response"])]
    if split is not None:
        df = df[df["split"] == split]
    concepts = [c for c in battery_concepts(stim) if c in set(df["concept"])]
    forms = list(dict.fromkeys(df["form"]))
    df = df.assign(concept=pd.Categorical(df["concept"], concepts), form=pd.Categorical(df["form"], forms))
    return df.sort_values(["concept", "form", "id"]).reset_index(drop=True)


def plot_unit(
    rec: "Recording | str | Path",
    site: str,
    unit: int,
    *,
    cells: pd.DataFrame | None = None,
    k: float = 5.0,
    split: str | None = None,
) -> "Figure":
    """The Quiroga raster-and-bars panel of one unit.

    Parameters
    ----------
    rec
        The recording.
    site, unit
        The unit.
    cells
        Its cells table (for the unit's concept, threshold and verdict in the title).
    k
        Threshold in baseline SDs drawn on the bars (as in the criterion).
    split
        Only this split's stimuli (default: every stimulus).
    """
    plt, sns = _plt()
    rec = as_recording(rec)
    df = unit_frame(rec, site, unit, split=split)
    concepts = list(df["concept"].cat.categories)
    forms = list(df["form"].cat.categories)
    row = None
    if cells is not None:
        hit = cells[(cells["site"] == site) & (cells["unit"] == unit)]
        row = hit.iloc[0] if len(hit) else None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(concepts) + 3), 6), sharex=False,
                                   gridspec_kw=dict(height_ratios=[1, 1.3]))
    palette = dict(zip(forms, sns.color_palette("colorblind", len(forms))))
    sns.stripplot(data=df, x="concept", y="response", hue="form", palette=palette, dodge=True, size=3, jitter=0.15,
                  ax=ax1, order=concepts, hue_order=forms)
    ax1.set_xlabel("")
    ax1.tick_params(axis="x", labelrotation=90, labelsize=7)
    # legends sit outside the axes, to the right, so they never cover the responses they explain
    ax1.legend(title="form", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
               borderaxespad=0, frameon=False)
    ax1.set_title("response to each stimulus, by concept and form", fontsize=8, loc="left")
    x = np.arange(len(df))
    ax2.bar(x, df["response"], color=[palette[f] for f in df["form"]], width=1.0, linewidth=0)
    bounds = np.flatnonzero(np.r_[True, df["concept"].to_numpy()[1:] != df["concept"].to_numpy()[:-1]])
    for b in bounds[1:]:
        ax2.axvline(b - 0.5, color="0.8", lw=0.5)
    centres = [(a + b - 1) / 2 for a, b in zip(bounds, list(bounds[1:]) + [len(df)])]
    ax2.set_xticks(centres, [str(df["concept"].iloc[b]) for b in bounds], rotation=90, fontsize=7)
    ax2.set_xlim(-0.5, len(df) - 0.5)
    ax2.set_ylabel("response")
    ax2.set_title("one bar per stimulus", fontsize=8, loc="left")
    attrs = getattr(rec, "attrs", {}) or {}
    who = " x ".join(str(attrs[a]) for a in ("subject", "battery") if attrs.get(a))
    title = f"{site}, unit {unit}" + (f" ({who}, {len(df)} stimuli)" if who else f" ({len(df)} stimuli)")
    if row is not None and isinstance(row.get("concept"), str):
        thr = row["baseline_mean"] + k * row["baseline_sd"]
        if np.isfinite(thr):
            ax2.axhline(thr, color="k", ls="--", lw=0.8, label=f"screening baseline\n+ {k:g} SD")
            ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
        verdict = "concept cell" if row["is_cell"] else ("candidate" if row["is_candidate"] else "not a cell")
        extra = [f"z = {row['z']:.1f}"]
        for flag in ("invariant", "multimodal"):
            if flag in row.index and bool(row[flag]):
                extra.append(flag)
        title += f"\nprefers '{row['concept']}': {verdict} ({', '.join(extra)})"
    fig.suptitle(title, fontsize=9)
    sns.despine(fig)
    fig.tight_layout()
    return fig


def plot_selectivity(cells: pd.DataFrame, index: str = "si", *, hue: str | None = "is_cell") -> "Figure":
    """Distribution of a per-unit ``index`` (``si``, ``si_morcos``, ``d_prime``, ``auc``, ``z``, ...) per site."""
    plt, sns = _plt()
    if index not in cells.columns:
        raise NeuroprobeError(f"the cells table has no column {index!r}.")
    live = cells[~cells["dead"]].copy()
    live[index] = live[index].replace([np.inf, -np.inf], np.nan)
    order = list(dict.fromkeys(cells["site"]))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(order) + 2), 4))
    use_hue = hue if hue in live.columns and live[hue].nunique() > 1 else None
    sns.violinplot(data=live, x="site", y=index, hue=use_hue, order=order, cut=0, inner="quartile", ax=ax,
                   density_norm="width", linewidth=0.6, split=use_hue is not None)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set_xlabel("site")
    ax.set_title(f"{index} per site ({len(live)} live units)", fontsize=9)
    _legend_outside(ax, sns, title=use_hue)
    sns.despine(fig)
    fig.tight_layout()
    return fig


def plot_cells_per_layer(cells: pd.DataFrame, untrained: pd.DataFrame | None = None,
                         rotation: pd.DataFrame | None = None, *, column: str = "is_cell") -> "Figure":
    """Concept cells per site: trained subject beside its untrained twin and its rotated basis."""
    plt, sns = _plt()
    parts = [("trained", cells), ("untrained", untrained), ("rotated basis", rotation)]
    order = list(dict.fromkeys(cells["site"]))
    rows = []
    for name, t in parts:
        if t is None:
            continue
        counts = t.groupby("site", sort=False)[column].sum()
        rows += [dict(site=s, condition=name, count=int(counts.get(s, 0))) for s in order]
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(order) + 2), 4))
    sns.barplot(data=df, x="site", y="count", hue="condition", order=order, ax=ax,
                palette=sns.color_palette("colorblind", df["condition"].nunique()))
    # every bar carries its count, so a control's zero reads "0" instead of an invisible bar
    for container in ax.containers:
        ax.bar_label(container, fmt="%d", fontsize=6, padding=1)
    ax.margins(y=0.12)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole numbers only
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    what = "concept cells" if column == "is_cell" else column
    ax.set_ylabel(what)
    totals = df.groupby("condition", sort=False)["count"].sum()
    ax.set_title(f"{what} per site: " + ", ".join(f"{name} {int(n)}" for name, n in totals.items()), fontsize=9)
    _legend_outside(ax, sns)
    sns.despine(fig)
    fig.tight_layout()
    return fig


def plot_invariance(cells: pd.DataFrame) -> "Figure":
    """AUC of each confirmed cell for every form of its concept (testing split); 0.5 = chance."""
    plt, sns = _plt()
    cols = [c for c in cells.columns if c.startswith("auc_form:")]
    if not cols:
        raise NeuroprobeError("the cells table has no per-form AUC columns (auc_form:<form>).")
    sel = cells[cells["is_cell"]]
    long = sel[["site", "unit", "concept", "invariant"] + cols].melt(
        id_vars=["site", "unit", "concept", "invariant"], value_vars=cols, var_name="form", value_name="auc"
    ).dropna(subset=["auc"])
    long["form"] = long["form"].str.removeprefix("auc_form:")
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(cols) + 2), 4))
    if len(long):
        sns.boxplot(data=long, x="form", y="auc", color="0.9", ax=ax, fliersize=0, linewidth=0.6)
        sns.stripplot(data=long, x="form", y="auc", hue="invariant", ax=ax, size=3, jitter=0.2,
                      palette={True: "tab:blue", False: "tab:orange"})
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"invariance across forms ({sel.shape[0]} cells)", fontsize=9)
    _legend_outside(ax, sns, title="invariant")
    sns.despine(fig)
    fig.tight_layout()
    return fig


def plot_unit_raster(
    rec: "Recording | str | Path",
    site: str,
    unit: int,
    *,
    cells: pd.DataFrame | None = None,
    k: float = 5.0,
    ax=None,
    title: str | None = None,
    width: float = COLUMN_WIDTH,
):
    """Quiroga et al. 2005's Fig. 1 for one unit: its response to every stimulus, by form and concept.

    One row per form of the battery (top to bottom in battery order), one column per concept;
    inside a cell, one bar per stimulus of that form and concept, its height the response
    scaled between the unit's smallest and largest response (0 to 1 of the row).  The
    unit's concept column is shaded; the dashed line in every row is the criterion's
    threshold (screening baseline mean + ``k`` SD) when ``cells`` gives it.  Rows of forms the
    site never sees (another tower's modality) are hatched and say so: a unit cannot answer
    to what never reaches it.

    Parameters
    ----------
    rec, site, unit
        The recording and the unit.
    cells
        The recording's cells table (the unit's concept, threshold and verdict).
    k
        Threshold in baseline SDs.
    ax
        Draw into this axes (default: a new figure ``width`` inches wide).
    title
        Title (default: site, unit and the verdict).
    width
        Figure width in inches when ``ax`` is not given.

    Returns
    -------
    Figure
    """
    from matplotlib.patches import Rectangle

    plt, sns = column_style()
    rec = as_recording(rec)
    stim = rec.stimuli.reset_index(drop=True)
    forms = list(dict.fromkeys(stim["form"].astype(str)))
    concepts = battery_concepts(stim)
    df = unit_frame(rec, site, unit)
    row = None
    if cells is not None:
        hit = cells[(cells["site"] == site) & (cells["unit"] == unit)]
        row = hit.iloc[0] if len(hit) else None
    if ax is None:
        fig, ax = plt.subplots(figsize=(width, 0.6 + 0.24 * len(forms)))
    else:
        fig = ax.figure
    r = df["response"].to_numpy()
    lo, hi = (float(r.min()), float(r.max())) if len(r) else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    pref = row["concept"] if row is not None and isinstance(row.get("concept"), str) else None
    color = CONDITION_COLORS["trained"] if str(getattr(rec, "attrs", {}).get("init", "")) != "random" else \
        CONDITION_COLORS["untrained"]
    band = 0.8
    if pref in concepts:
        c = concepts.index(pref)
        ax.add_patch(Rectangle((c, 0), 1, len(forms), color="#fde9c9", zorder=0, lw=0))
    seen = set(df["form"].astype(str))
    groups = {key: g for key, g in df.groupby([df["form"].astype(str), df["concept"].astype(str)], sort=False)}
    for i, f in enumerate(forms):
        y0 = len(forms) - 1 - i + (1 - band) / 2
        if f not in seen:
            ax.add_patch(Rectangle((0, y0), len(concepts), band, facecolor="none", edgecolor="0.75", hatch="////",
                                   lw=0, zorder=1))
            ax.text(len(concepts) / 2, y0 + band / 2, "not seen by this site", ha="center", va="center", fontsize=8,
                    color="0.35", zorder=2, bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
            continue
        for j, c in enumerate(concepts):
            g = groups.get((f, c))
            if g is None or not len(g):
                continue
            n = len(g)
            xs = j + 0.05 + (np.arange(n) + 0.5) * 0.9 / n
            h = (g["response"].to_numpy() - lo) / span * band
            ax.bar(xs, h, width=0.9 / n, bottom=y0, color=color, lw=0, zorder=2)
        if row is not None and np.isfinite(row.get("baseline_mean", np.nan)):
            thr = (row["baseline_mean"] + k * row["baseline_sd"] - lo) / span * band
            if 0 <= thr <= band:
                ax.plot([0, len(concepts)], [y0 + thr] * 2, ls="--", lw=0.5, color="k", zorder=3)
    for j in range(1, len(concepts)):
        ax.axvline(j, color="0.85", lw=0.4, zorder=1)
    ax.set_xlim(0, len(concepts))
    ax.set_ylim(0, len(forms))
    ax.set_yticks([len(forms) - 1 - i + 0.5 for i in range(len(forms))], forms)
    ax.set_xticks(np.arange(len(concepts)) + 0.5, concepts, rotation=90)
    ax.tick_params(length=0)
    ax.set_xlabel("concept (one bar per stimulus; bar height:\nresponse from the unit's minimum to its maximum)")
    if title is None:
        title = f"{site}, unit {unit}"
        if row is not None and isinstance(row.get("concept"), str):
            verdict = "concept cell" if row["is_cell"] else ("candidate" if row["is_candidate"] else "not a cell")
            title += f": {verdict} for '{row['concept']}' (z = {row['z']:.1f})"
    ax.set_title(title, loc="left")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    return fig


def plot_by_site(
    frame: pd.DataFrame,
    measures: dict[str, str],
    *,
    conditions: list[str] | None = None,
    width: float = COLUMN_WIDTH,
    title: str | None = None,
):
    """Measures per site (layer), the effect and its controls as dots side by side.

    Parameters
    ----------
    frame
        Long format: ``condition, site, measure, value``.
    measures
        ``measure -> axis label`` (with its unit), one panel each, left to right.
    conditions
        Conditions drawn, in this order (default: those present, in
        :data:`CONDITION_COLORS` order).
    width
        Figure width in inches.
    title
        Figure title.

    Returns
    -------
    Figure
    """
    import textwrap

    from matplotlib.ticker import MaxNLocator

    plt, sns = column_style()
    sites = list(dict.fromkeys(frame["site"]))
    present = list(dict.fromkeys(frame["condition"]))
    conditions = conditions or [c for c in CONDITION_COLORS if c in present] + \
        [c for c in present if c not in CONDITION_COLORS]
    markers = dict(zip(conditions, ["o", "s", "D", "^", "v", "P"]))
    fig, axes = plt.subplots(1, len(measures), figsize=(width, 1.0 + 0.2 * len(sites)), sharey=True,
                             squeeze=False)
    offsets = np.linspace(-0.27, 0.27, len(conditions)) if len(conditions) > 1 else np.zeros(1)
    for ax, (measure, label) in zip(axes[0], measures.items()):
        sub = frame[frame["measure"] == measure]
        for off, cond in zip(offsets, conditions):
            g = sub[sub["condition"] == cond].set_index("site")["value"].reindex(sites)
            y = len(sites) - 1 - np.arange(len(sites)) + off
            ok = g.notna().to_numpy()
            ax.scatter(g.to_numpy()[ok], y[ok], s=9, marker=markers[cond], lw=0.4,
                       color=CONDITION_COLORS.get(cond, "k"), label=CONDITION_LABELS.get(cond, cond), zorder=3)
        for i in range(len(sites)):
            ax.axhline(i, color="0.92", lw=0.4, zorder=0)
        ax.set_xlabel(textwrap.fill(label, 12))
        ax.margins(x=0.12)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=2, steps=[1, 2, 5, 10]))
        sns.despine(ax=ax)
    axes[0, 0].set_yticks(len(sites) - 1 - np.arange(len(sites)), sites)
    axes[0, 0].set_ylim(-0.6, len(sites) - 0.4)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.tight_layout()
    top = max(ax.get_position().y1 for ax in axes[0])
    leg = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, top + 0.01), ncol=min(4, len(labels)),
                     frameon=False, handletextpad=0.2, columnspacing=0.8)
    if title:
        fig.canvas.draw()
        box = leg.get_window_extent().transformed(fig.transFigure.inverted())
        fig.suptitle(title, y=box.y1 + 0.005, va="bottom")
    return fig
