"""The tables an atlas is built from, read defensively (by column name; missing columns are left out).

* cells tables (``neuroprobe cells --out``) of the subject and of its controls;
* the lesion summary (``forgetting.csv`` of ``neuroprobe lesion``), whose ``units``
  column (``site:u1,u2;site2:u3``) says which units each top-``k`` lesion silenced;
* the units that get a page: every cell, and the top units of every concept.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError

#: columns of the index's cell table: (column in the cells table, label, kind, tooltip).
CELL_COLUMNS = (
    ("si", "selectivity", "num", "selectivity index (SI) of the unit's concept"),
    ("d_prime", "d\u2032", "num", "d-prime of the unit's concept against the other stimuli"),
    ("z", "z", "num", "screening effect: (median - baseline mean) / baseline SD"),
    ("q", "q", "num", "screening q-value (FDR over every unit x concept test)"),
    ("q_test", "q (testing)", "num", "confirmation q-value on the testing split"),
    ("invariant", "invariant", "bool", "AUC above the label-shuffle null in every form"),
    ("auc_form_min", "min form AUC", "num", "smallest per-form AUC of the concept"),
    ("multimodal", "multimodal", "bool", "answers to the concept in every modality"),
    ("n_concepts", "n concepts", "int", "concepts the unit passes screening for"),
)


def slug(text: str) -> str:
    """A file-name-safe form of a site or concept name (unique: a hash is added when characters are replaced)."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(text))
    if s != str(text) or not s or s.startswith("."):
        s = f"{s.strip('.') or 'x'}-{hashlib.sha1(str(text).encode()).hexdigest()[:6]}"
    return s


#: the script that tells pages whether they are served live: ``ATLAS_LIVE = false`` on disk, ``true`` from ``--serve``.
LIVE_JS = "data/live.js"


def unit_href(site: str, unit: int) -> str:
    """Path of a unit page, relative to the atlas root."""
    return f"units/{slug(site)}/{int(unit)}.html"


def concept_href(concept: str) -> str:
    """Path of a concept page, relative to the atlas root."""
    return f"concepts/{slug(concept)}.html"


def read_table(path: str | Path | None, what: str) -> pd.DataFrame | None:
    """Read a CSV / TSV / Parquet table, or ``None``; a missing file is a user error."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise NeuroprobeError(f"{what} table {path} does not exist.")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    from neuroprobe.output import read_csv

    return read_csv(path)


def check_cells(cells: pd.DataFrame, sites: Iterable[str], what: str = "cells") -> pd.DataFrame:
    """Check a cells table has ``site`` and ``unit`` and fits the recording; add missing verdict columns."""
    missing = {"site", "unit"} - set(cells.columns)
    if missing:
        raise NeuroprobeError(f"the {what} table has no {' or '.join(sorted(missing))} column; "
                              "give a table written by `neuroprobe cells --out`.")
    known = set(sites)
    other = sorted(set(cells["site"].astype(str)) - known)
    if other and what == "cells":
        raise NeuroprobeError(f"the {what} table names site {other[0]!r}, which the recording does not have; "
                              "was it made from another recording?")
    cells = cells.copy()
    cells["site"] = cells["site"].astype(str)
    cells["unit"] = cells["unit"].astype(np.int64)
    for col in ("is_cell", "is_candidate", "dead", "invariant", "multimodal"):
        if col in cells:
            cells[col] = cells[col].fillna(False).astype(bool)
        else:
            cells[col] = False
    if "concept" not in cells:
        cells["concept"] = None
    return cells


def verdict(cells: pd.DataFrame) -> pd.Series:
    """``cell``, ``candidate`` or ``unit`` per row."""
    return pd.Series(np.where(cells["is_cell"], "cell", np.where(cells["is_candidate"], "candidate", "unit")),
                     index=cells.index)


def per_site_counts(cells: pd.DataFrame | None, sites: list[str]) -> dict[str, np.ndarray]:
    """``candidates`` and ``cells`` per site (zeros when the table is absent or lacks the site)."""
    if cells is None:
        return {}
    g = cells.groupby("site")
    return {"candidates": g["is_candidate"].sum().reindex(sites).fillna(0).astype(int).to_numpy(),
            "cells": g["is_cell"].sum().reindex(sites).fillna(0).astype(int).to_numpy(),
            "dead": g["dead"].sum().reindex(sites).fillna(0).astype(int).to_numpy()}


def score_column(cells: pd.DataFrame) -> str | None:
    """The column that orders units within a concept (strongest first)."""
    for col in ("z", "d_prime", "auc", "si"):
        if col in cells:
            return col
    return None


def top_units(scored: pd.DataFrame, col: str, top: int, per_site: int = 0) -> pd.DataFrame:
    """The ``top`` highest-``col`` units of every concept, plus the best ``per_site`` of every concept at every site."""
    s = scored.assign(_s=pd.to_numeric(scored[col], errors="coerce")).dropna(subset=["_s"])
    s = s.sort_values("_s", ascending=False, kind="mergesort")
    parts = [s.groupby("concept", sort=False).head(top)] if top > 0 else []
    if per_site > 0:
        parts.append(s.groupby(["concept", "site"], sort=False).head(per_site))
    if not parts:
        return s.iloc[:0][["site", "unit", "concept"]]
    out = pd.concat(parts).drop_duplicates(["site", "unit"])
    return out.sort_values("_s", ascending=False, kind="mergesort")[["site", "unit", "concept"]].reset_index(drop=True)


def top_units_from_cells(cells: pd.DataFrame, top: int, per_site: int = 0) -> pd.DataFrame:
    """The ``top`` strongest live units of every concept (by ``z``, else ``d_prime``...), and the best per site."""
    col = score_column(cells)
    live = cells[~cells["dead"] & cells["concept"].notna()]
    if col is None or live.empty:
        return live.iloc[:0][["site", "unit", "concept"]]
    return top_units(live, col, top, per_site)


def parse_units(text: object) -> list[tuple[str, int]]:
    """``site:u1,u2;site2:u3`` -> ``[(site, u1), (site, u2), (site2, u3)]`` (the lesion tables' ``units``)."""
    if not isinstance(text, str) or not text.strip():
        return []
    out = []
    for part in text.split(";"):
        site, sep, units = part.rpartition(":")
        if not sep:
            continue
        out += [(site, int(u)) for u in units.split(",") if u.strip().lstrip("-").isdigit()]
    return out


def lesion_index(lesions: pd.DataFrame | None) -> dict[tuple[str, int], list[int]]:
    """(site, unit) -> rows of the lesion table whose lesion silenced that unit."""
    out: dict[tuple[str, int], list[int]] = {}
    if lesions is None or "units" not in lesions:
        return out
    for i, text in enumerate(lesions["units"]):
        for key in parse_units(text):
            out.setdefault(key, []).append(i)
    return out


def check_lesions(lesions: pd.DataFrame) -> pd.DataFrame:
    """A lesion summary needs ``concept``, ``k`` and ``target_change``."""
    missing = {"concept", "k", "target_change"} - set(lesions.columns)
    if missing:
        raise NeuroprobeError(f"the lesion table has no {', '.join(sorted(missing))} column; give the forgetting.csv "
                              "written by `neuroprobe lesion`.")
    return lesions.reset_index(drop=True)


def control_sibling(cells_path: Path, tag: str) -> Path | None:
    """``cells.csv`` -> ``cells.<tag>.csv`` when it exists (where `neuroprobe cells` writes its controls)."""
    p = cells_path.with_name(f"{cells_path.stem}.{tag}{cells_path.suffix}")
    return p if p.exists() else None
