"""Which units to lesion: rank units for a concept.

Two sources, so lesions never wait for a particular analysis:

* a **cells table** (one row per unit, or per unit and concept), e.g. the output
  of :func:`neuroprobe.analysis.concept_cells` or its CSV: :func:`cells_ranking`
  keeps the rows of one concept and orders them by a score column (cells first
  when the table marks them);
* **responses** on the screening split (a recording, or responses read with
  electrodes): :func:`rank_responses` / :func:`rank_units` compute each unit's
  d′ for the concept against all other stimuli,

  .. math:: d' = \\frac{\\mu_c - \\mu_{\\bar c}}{\\sqrt{(\\sigma_c^2 + \\sigma_{\\bar c}^2)/2}}

  (sample variances; a unit with zero variance on both sides gets d′ = 0), and
  mark units that never vary over the split as inactive (dead units must not
  enter random controls: they flatter the comparison).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.recording.reader import Recording

#: candidate names of the concept column of a cells table, in order of preference
CONCEPT_COLUMNS = ("concept", "best_concept")
#: candidate names of the ranking-score column of a cells table, in order of preference
#: (:func:`neuroprobe.analysis.concept_cells` writes ``concept``, ``is_cell``, ``dead`` and the
#: screening-split ``d_prime_screen``, which ranks without touching the testing split)
SCORE_COLUMNS = ("d_prime_screen", "dprime_screen", "dprime", "d_prime", "z", "selectivity", "selectivity_index", "si",
                 "auc_screen", "auc", "score")
#: a unit whose response standard deviation over the split is at most this is inactive
ACTIVE_TOL = 1e-6


def dprime(responses: np.ndarray, is_concept: np.ndarray) -> np.ndarray:
    """d′ of every unit for one concept against all other stimuli.

    Parameters
    ----------
    responses
        ``[n_stimuli, n_units]``.
    is_concept
        Boolean ``[n_stimuli]``: stimuli of the concept.

    Returns
    -------
    numpy.ndarray
        ``[n_units]`` d′ (0 where both groups are constant and equal).
    """
    r = np.asarray(responses, dtype=np.float64)
    m = np.asarray(is_concept, dtype=bool)
    if m.sum() < 2 or (~m).sum() < 2:
        raise NeuroprobeError("d′ needs at least two stimuli of the concept and two of the others on the ranking split.")
    a, b = r[m], r[~m]
    num = np.nanmean(a, 0) - np.nanmean(b, 0)
    den = np.sqrt(0.5 * (np.nanvar(a, 0, ddof=1) + np.nanvar(b, 0, ddof=1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = num / den
    d[(den == 0) & (num == 0)] = 0.0
    d[(den == 0) & (num != 0)] = np.sign(num[(den == 0) & (num != 0)]) * 1e6
    return np.nan_to_num(d, nan=0.0)


def active_mask(responses: np.ndarray, tol: float = ACTIVE_TOL) -> np.ndarray:
    """Units whose response varies over the stimuli (standard deviation above ``tol``)."""
    r = np.asarray(responses, dtype=np.float64)
    return np.nan_to_num(np.nanstd(r, axis=0), nan=0.0) > tol


def rank_responses(
    responses: Mapping[str, np.ndarray],
    concepts: Sequence[str] | np.ndarray,
    concept: str,
) -> pd.DataFrame:
    """Rank every unit of ``responses`` by its d′ for ``concept``.

    Parameters
    ----------
    responses
        Site -> ``[n_stimuli, n_units]`` responses on the ranking (screening) split.
    concepts
        The concept of each stimulus (``n_stimuli``).
    concept
        The concept to rank for.

    Returns
    -------
    pandas.DataFrame
        Columns ``site, unit, concept, dprime, active``; active units first, then
        by d′ descending (ties: site order, unit index).
    """
    labels = np.asarray(concepts)
    is_c = labels == concept
    if not is_c.any():
        raise NeuroprobeError(f"concept {concept!r} has no stimuli on the ranking split.")
    parts = []
    for order, (site, r) in enumerate(responses.items()):
        d = dprime(r, is_c)
        parts.append(pd.DataFrame({"site": site, "unit": np.arange(len(d)), "concept": concept, "dprime": d,
                                   "active": active_mask(r), "_order": order}))
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(["active", "dprime", "_order", "unit"], ascending=[False, False, True, True], kind="mergesort")
    return df.drop(columns="_order").reset_index(drop=True)


def rank_units(recording: "Recording", concept: str, *, split: str = "screening", sites: Sequence[str] | None = None) -> pd.DataFrame:
    """Rank a recording's units for ``concept`` by d′ on one split (see :func:`rank_responses`).

    Parameters
    ----------
    recording
        An open recording.
    concept
        The concept to rank for.
    split
        The ranking split (``screening``: lesions are then evaluated on ``testing``).
    sites
        Sites to rank (default: every site of the recording).
    """
    stim = recording.stimuli
    rows = np.flatnonzero(stim["split"].to_numpy() == split)
    if rows.size == 0:
        raise NeuroprobeError(f"{recording.path} has no {split!r} stimuli to rank units on.")
    responses = {s: np.asarray(recording.responses(s)[()], dtype=np.float64)[rows] for s in (sites or recording.site_names)}
    return rank_responses(responses, stim["concept"].to_numpy()[rows], concept)


def resolve_columns(cells: pd.DataFrame, columns: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Find the site, unit, concept and score columns of a cells table.

    ``columns`` overrides any of the keys ``site``, ``unit``, ``concept``, ``score``;
    otherwise the first present of :data:`CONCEPT_COLUMNS` / :data:`SCORE_COLUMNS` is
    used (``score`` may be absent: the table's row order is then the ranking).
    """
    given = dict(columns or {})
    out: dict[str, str | None] = {"site": given.get("site", "site"), "unit": given.get("unit", "unit")}
    out["concept"] = given.get("concept") or next((c for c in CONCEPT_COLUMNS if c in cells.columns), None)
    out["score"] = given.get("score") or next((c for c in SCORE_COLUMNS if c in cells.columns), None)
    for key in ("site", "unit", "concept"):
        col = out[key]
        if col is None or col not in cells.columns:
            want = col or " or ".join(CONCEPT_COLUMNS)
            raise NeuroprobeError(
                f"the cells table has no {key} column ({want}); it has {', '.join(map(str, cells.columns))} — "
                f"name the column with --{key}-col."
            )
    if out["score"] is not None and out["score"] not in cells.columns:
        raise NeuroprobeError(f"the cells table has no score column {out['score']!r}; it has {', '.join(map(str, cells.columns))}.")
    return out


def cells_ranking(cells: pd.DataFrame, concept: str, *, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The rows of a cells table for one concept, best first.

    Rows flagged ``dead`` (or ``active == False``) are dropped; rows flagged
    ``is_cell`` come before the others; then the score column, descending; then
    the table's order.

    Returns
    -------
    pandas.DataFrame
        Columns ``site, unit, score, is_cell`` (``score`` NaN when the table has none).
    """
    cols = resolve_columns(cells, columns)
    df = cells[cells[cols["concept"]].astype(str) == str(concept)].copy()
    if "dead" in df.columns:
        df = df[~df["dead"].astype(bool)]
    if "active" in df.columns:
        df = df[df["active"].astype(bool)]
    out = pd.DataFrame({
        "site": df[cols["site"]].astype(str).to_numpy(),
        "unit": df[cols["unit"]].astype(np.int64).to_numpy(),
        "score": df[cols["score"]].astype(float).to_numpy() if cols["score"] else np.nan,
        "is_cell": df["is_cell"].astype(bool).to_numpy() if "is_cell" in df.columns else True,
        "_row": np.arange(len(df)),
    })
    keys, asc = ["is_cell"], [False]
    if cols["score"]:
        keys.append("score")
        asc.append(False)
    out = out.sort_values(keys + ["_row"], ascending=asc + [True], kind="mergesort", na_position="last")
    out = out.drop_duplicates(["site", "unit"])
    return out.drop(columns="_row").reset_index(drop=True)
