"""The "Experiments" section of a concept page: the experiments of ``analyses/`` that concern the concept.

Each experiment script writes its outputs into ``DIR/<experiment>/`` (default ``figures/analyses/``):
``results.csv`` (one measured number per row, with ``subject`` and ``concept`` columns), ``results.md``
(the question and the finding) and its figures (see :mod:`neuroprobe.experiments.report`).  An
experiment concerns a concept of the atlas when its ``results.csv`` has a row of that concept for the
atlas's subject; nothing else is guessed.

What a concept page links is copied into the atlas (``experiments/<experiment>/``): the experiment's
``results.md``, the concept's rows of ``results.csv`` and the concept's own figures (a PNG whose name
has the concept as a ``_``-separated part, as ``cell_seven.png``), else the experiment's main figure
(the first one ``results.md`` lists).  So every link leads to a file the atlas holds: it opens from
disk, moves as one folder, and ``--serve`` serves it.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import pandas as pd

from neuroprobe.atlas import tables as T
from neuroprobe.atlas.html import table
from neuroprobe.errors import NeuroprobeError, option
from neuroprobe.output import read_csv, write_csv

#: Where the experiment scripts write by default (``--out figures/analyses/<experiment>/``), from the working directory.
DEFAULT_FOLDER = Path("figures") / "analyses"
#: Single numbers of a concept shown on its page per experiment (the rest are in the copied table).
SHOW_NUMBERS = 12


@dataclass
class Experiment:
    """One experiment's outputs, as far as concept pages need them."""

    name: str
    folder: Path
    question: str
    figures: list[str]                  # PNG names, the main figure first
    rows: pd.DataFrame                  # the atlas subject's rows that name a concept
    copied: set[str] = field(default_factory=set)

    def concept_rows(self, concept: str) -> pd.DataFrame:
        return self.rows[self.rows["concept"].astype(str) == concept]


def default_folder() -> Path | None:
    """``figures/analyses`` under the working directory, else under the checkout neuroprobe runs from; ``None`` if neither exists."""
    repo = Path(__file__).resolve().parents[2]
    for folder in (Path.cwd() / DEFAULT_FOLDER, repo / DEFAULT_FOLDER):
        if folder.is_dir():
            return folder
    return None


def _question(md: Path) -> str:
    """The one-sentence question of ``results.md`` (its ``**Question.**`` paragraph), or ``""``."""
    if not md.is_file():
        return ""
    m = re.search(r"^\*\*Question\.\*\*\s*(.+)$", md.read_text(encoding="utf-8", errors="replace"), re.M)
    return m.group(1).strip() if m else ""


def _figures(folder: Path) -> list[str]:
    """The experiment's PNGs, in the order ``results.md`` lists them (its main figure first), then any others."""
    md = folder / "results.md"
    listed = re.findall(r"\[[^\]]*\]\(([^)/]+\.png)\)", md.read_text(encoding="utf-8", errors="replace")) if md.is_file() else []
    present = {p.name for p in folder.glob("*.png")}
    ordered = [f for f in dict.fromkeys(listed) if f in present]
    return ordered + sorted(present - set(ordered))


def load_experiments(folder: str | Path, subject: str) -> list[Experiment]:
    """The experiments under ``folder`` whose ``results.csv`` has rows of ``subject`` that name a concept.

    Parameters
    ----------
    folder
        Where the experiment scripts wrote their outputs (one subfolder per experiment).
    subject
        The atlas's subject (rows of other subjects are left out; rows without a subject are kept).

    Raises
    ------
    NeuroprobeError
        If ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NeuroprobeError(f"{folder} is not a folder ({option('experiments', str(folder))} takes where the analyses/ "
                              f"scripts wrote their outputs, e.g. figures/analyses).")
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        csv = sub / "results.csv"
        if not csv.is_file():
            continue
        try:
            rows = read_csv(csv, dtype={"concept": str, "subject": str, "condition": str, "measure": str})
        except (OSError, ValueError, pd.errors.ParserError):
            continue  # not a results table: nothing to link
        if "concept" not in rows or "measure" not in rows or "value" not in rows:
            continue
        rows = rows[rows["concept"].notna()]
        if "subject" in rows:
            rows = rows[rows["subject"].isna() | (rows["subject"].astype(str) == str(subject))]
        if len(rows):
            found.append(Experiment(sub.name, sub, _question(sub / "results.md"), _figures(sub), rows))
    return found


def _own_figures(exp: Experiment, concept: str) -> list[str]:
    """Figures named for ``concept`` (a ``_``-separated part of the name), else the main figure."""
    key = re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_")
    own = [f for f in exp.figures if key and f"_{key}_" in "_" + re.sub(r"[^a-z0-9]+", "_", Path(f).stem.lower()) + "_"]
    return own or exp.figures[:1]


def _copy(exp: Experiment, name: str, out: Path) -> str:
    """Copy ``name`` of the experiment's folder into the atlas once; its path relative to the atlas root."""
    rel = f"experiments/{T.slug(exp.name)}/{name}"
    if rel not in exp.copied:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exp.folder / name, out / rel)
        exp.copied.add(rel)
    return rel


def section(experiments: list[Experiment], concept: str, out: Path, depth: int = 1) -> str:
    """The concept page's "Experiments" section (``""`` when no experiment concerns ``concept``); copies what it links.

    Parameters
    ----------
    experiments
        From :func:`load_experiments`.
    concept
        The page's concept.
    out
        The atlas folder (files are copied under ``experiments/``).
    depth
        How many folders below the atlas root the page lives.
    """
    up = "../" * depth
    parts = []
    for exp in experiments:
        rows = exp.concept_rows(concept)
        if rows.empty:
            continue
        slug = T.slug(exp.name)
        head = escape(exp.name)
        if (exp.folder / "results.md").is_file():
            head = f"<a href='{up}{escape(_copy(exp, 'results.md', out))}'>{head}</a>"
        table_rel = f"experiments/{slug}/{T.slug(concept)}.csv"
        (out / table_rel).parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / table_rel)
        parts.append(f"<h3>{head}</h3>" + (f"<p class='note'>{escape(exp.question)}</p>" if exp.question else ""))
        single = rows.groupby(["measure", "condition"], sort=False, dropna=False).filter(lambda g: len(g) == 1)
        shown = [[escape(str(r["measure"])), escape("" if pd.isna(r["condition"]) else str(r["condition"])), r["value"]]
                 for r in single.head(SHOW_NUMBERS).to_dict("records")]
        if shown:
            parts.append(table(["measure", "condition", "value"], shown, left=2))
        parts.append(f"<p>{len(rows):,} numbers about {escape(concept)} "
                     f"({', '.join(escape(str(m)) for m in dict.fromkeys(rows['measure']))}): "
                     f"<a href='{up}{escape(table_rel)}'>{escape(Path(table_rel).name)}</a></p>")
        figs = [_copy(exp, f, out) for f in _own_figures(exp, concept)]
        if figs:
            parts.append("<p>" + " ".join(f"<a href='{up}{escape(f)}'><img src='{up}{escape(f)}' alt='{escape(Path(f).name)}' "
                                          "style='max-width:420px' loading='lazy'></a>" for f in figs) + "</p>")
    if not parts:
        return ""
    return ("<h2>Experiments</h2><p class='note'>the experiments of <code>analyses/</code> whose results name this "
            "concept (their question, this concept's single numbers, every number of it as a table, its figures).</p>"
            + "".join(parts))

