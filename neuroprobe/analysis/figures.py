"""Figures (seaborn), one function each; every function returns its matplotlib Figure.

* :func:`plot_unit` — the Quiroga panel of one unit: its response to every stimulus,
  grouped by concept and coloured by form (dots), and one bar per stimulus with the
  criterion's threshold (baseline mean + k SD).
* :func:`plot_selectivity` — distributions of an index per site (layer).
* :func:`plot_cells_per_layer` — concept cells per site for the trained subject beside
  its controls (untrained subject, rotated basis).
* :func:`plot_invariance` — the cells' AUC for every form of their concept.
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
    df = df.sort_values(["concept", "form", "id"]).reset_index(drop=True)
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
