"""Figures of lesion studies (seaborn): dose-response with the random-lesion band, forgetting matrix."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

ORDER_STYLE = {
    "top": ("top-k (most selective)", "#c0392b"),
    "bottom": ("bottom-k (least selective)", "#2c7fb8"),
    "keep_top": ("keep only top-k", "#7b3294"),
    "keep_random": ("keep only random-k", "#a6a6a6"),
}


def _plt():
    import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves

    return plt


def readout_label(readout: str | None) -> str:
    """The y label of a readout change: names the readout when it is known."""
    name = f"{readout!s} readout" if readout else "readout"
    return f"change in {name}\n(lesioned − intact)"


def _readout_of(table: pd.DataFrame) -> str | None:
    """The readout a lesion table was scored with (its ``readout`` column), when it says."""
    if "readout" not in table.columns:
        return None
    names = [str(r) for r in dict.fromkeys(table["readout"].dropna())]
    return ", ".join(names) or None


def plot_dose_response(dose: pd.DataFrame, *, band: tuple[float, float] = (2.5, 97.5), keep: bool = False,
                       readout: str | None = None):
    """Target readout change over ``k`` per lesion order, with the random-lesion band.

    Every legend entry is drawn at every ``k``: with one ``k`` the random lesions'
    percentile band is a bar at that ``k`` (a band over one point has no width), and
    every series carries markers.

    Parameters
    ----------
    dose
        Output of :func:`neuroprobe.lesions.dose_response` for one concept
        (several modes become side-by-side panels).
    band
        Percentiles of the random lesions' target change drawn as the band.
    keep
        Also draw the keep-only-``k`` complements (they are usually on another scale).
    readout
        The readout's name for the y label (default: the table's ``readout`` column).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import seaborn as sns

    plt = _plt()
    readout = readout or _readout_of(dose)
    modes = list(dict.fromkeys(dose["mode"]))
    concept = ", ".join(dict.fromkeys(dose["concept"].astype(str)))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes) + 1.6, 3.6), squeeze=False, sharey=False)
    for ax, mode in zip(axes[0], modes):
        d = dose[dose["mode"] == mode]
        rnd = d[d["order"] == "random"]
        if len(rnd):
            q = rnd.groupby("k")["target_change"].agg(
                lo=lambda v: np.percentile(v, band[0]), hi=lambda v: np.percentile(v, band[1]), med="median")
            label = f"random-k {band[0]:g}–{band[1]:g}%"
            if len(q) > 1:
                ax.fill_between(q.index, q["lo"], q["hi"], color="0.75", alpha=0.6, lw=0, label=label)
            else:  # one k: the band is a bar at that k
                ax.vlines(q.index, q["lo"], q["hi"], colors="0.75", lw=9, alpha=0.8, label=label)
            ax.plot(q.index, q["med"], color="0.45", lw=1, ls=":", marker="_", ms=12, mew=1.5, label="random-k median")
        det = d[d["order"].isin([o for o in ORDER_STYLE if keep or not o.startswith("keep")])]
        det = det.groupby(["order", "k"], as_index=False)[["target_change", "other_change"]].mean()
        for order, (label, colour) in ORDER_STYLE.items():
            sub = det[det["order"] == order]
            if sub.empty:
                continue
            sns.lineplot(data=sub, x="k", y="target_change", ax=ax, color=colour, marker="o", markeredgecolor=colour,
                         label=label)
            if order == "top":  # an "x" has no face: its edge must carry the colour (seaborn's default edge is white)
                sns.lineplot(data=sub, x="k", y="other_change", ax=ax, color=colour, ls="--", marker="x",
                             markeredgecolor=colour, markeredgewidth=1.5, label="top-k: other concepts (mean)")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log", base=2)
        ks = sorted(d["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        if len(ks) == 1:
            ax.set_xlim(ks[0] / 1.6, ks[0] * 1.6)
        ax.set_xlabel("units lesioned (k)")
        ax.set_ylabel(readout_label(readout))
        ax.set_title(f"{concept}: {mode} ablation")
        ax.get_legend().remove() if ax.get_legend() else None
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_size_inches()[0], 1))
    return fig


def plot_forgetting_matrix(matrices: pd.DataFrame | Sequence[tuple[str, pd.DataFrame]], *, annotate: bool | None = None):
    """Heatmap(s) of the lesioned-concept × tested-concept readout change.

    Parameters
    ----------
    matrices
        One matrix from :func:`neuroprobe.lesions.forgetting_matrix`, or
        ``(title, matrix)`` pairs drawn side by side (e.g. one per mode).
    annotate
        Write the values in the cells (default: when the matrix is at most 12×12).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import seaborn as sns

    plt = _plt()
    items = [("", matrices)] if isinstance(matrices, pd.DataFrame) else list(matrices)
    n = max(len(items[0][1].columns), 1)
    size = min(0.35 * n + 2.5, 11)
    fig, axes = plt.subplots(1, len(items), figsize=(size * len(items), size * 0.85), squeeze=False)
    for ax, (title, m) in zip(axes[0], items):
        lim = float(np.nanmax(np.abs(m.to_numpy()))) if np.isfinite(m.to_numpy()).any() else 1.0
        ann = annotate if annotate is not None else max(m.shape) <= 12
        sns.heatmap(m, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=ann, fmt=".2g", square=True,
                    cbar_kws={"label": "readout change", "shrink": 0.7}, annot_kws={"fontsize": 7})
        ax.set_xlabel("tested concept")
        ax.set_ylabel("lesioned concept (top-k units)")
        ax.set_title(title)
    fig.tight_layout()
    return fig
