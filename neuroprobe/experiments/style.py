"""One figure style for the experiment scripts: legible at a paper's column width.

A column is about 3.5 inches wide; text drawn at 8 pt or more stays readable there.
:func:`paper_style` sets seaborn's ``paper`` context with those sizes for the figures
made inside it, and :data:`COLUMN` / :data:`PAGE` are the widths to size them by.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

#: a journal column's width (inches)
COLUMN = 3.5
#: a two-column figure's width (inches)
PAGE = 7.0
#: the smallest font size (points) used in figures
FONT = 8

#: colours of an effect and its controls (the same in every script's figures)
CONDITION_COLOURS = {
    "trained": "#c0392b",
    "untrained": "#2c7fb8",
    "rotation": "#7b3294",
    "shuffle": "#8c8c8c",
    "random": "#8c8c8c",
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Figures made inside use seaborn's ``paper`` context with every font at least :data:`FONT` pt."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rc = {"font.size": FONT, "axes.labelsize": FONT, "axes.titlesize": FONT + 1, "xtick.labelsize": FONT,
          "ytick.labelsize": FONT, "legend.fontsize": FONT, "legend.title_fontsize": FONT, "figure.dpi": 100,
          "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(), sns.axes_style("ticks"), sns.plotting_context("paper", rc=rc):
        plt.rcParams.update(rc)
        yield
