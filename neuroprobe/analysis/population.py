"""The population view: decoding the concept from a site, and representational geometry.

* :func:`decode_concepts` — cross-validated (stratified k-fold) multinomial logistic
  regression of the concept from a site's units, for growing numbers of units drawn
  at random (and, given a cells table, from the concept cells only): how many units
  does the site need?
* :func:`rdm` — the representational dissimilarity matrix (1 − Pearson correlation of
  response patterns across units) between stimuli or concepts, accumulated over
  unit blocks (memory O(stimuli²), never the whole site).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from neuroprobe.analysis.scan import as_recording, battery_concepts, site_order
from neuroprobe.analysis.stream import UnitStream
from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording.reader import Recording


def _site_matrix(rec: Recording, site: str, units: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``[valid stimuli, units]`` float64 responses of ``units`` (or all) and the valid-row mask."""
    ds = rec.responses(site)
    x = np.asarray(ds[()] if units is None else ds[:, np.sort(units)], dtype=np.float64)
    valid = ~np.isnan(x).all(axis=1)
    x = x[valid]
    return np.nan_to_num(x), valid


def decode_concepts(
    rec: Recording | str | Path,
    *,
    sites: Sequence[str] | None = None,
    n_units: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    n_draws: int = 5,
    cv: int = 5,
    cells: pd.DataFrame | None = None,
    max_units: int = 4096,
    seed: int = 0,
    C: float = 1.0,
) -> pd.DataFrame:
    """Cross-validated decoding accuracy of the concept from each site.

    Parameters
    ----------
    rec
        The recording.
    sites
        Sites (default: all).
    n_units
        Unit counts to try (capped at the site's live units); each is drawn ``n_draws`` times.
    n_draws
        Random draws of units per count.
    cv
        Folds (stratified by concept; lowered to the smallest concept's count if needed).
    cells
        A cells table; adds a ``selection == "cells"`` row per site with every confirmed cell.
    max_units
        A site wider than this is subsampled to ``max_units`` random units before decoding.
    seed
        Seed of the unit draws and folds.
    C
        Inverse L2 regularisation strength of the logistic regression.

    Returns
    -------
    DataFrame
        ``site, selection (random|cells|all), n_units, draw, accuracy, chance``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rec = as_recording(rec)
    stimuli = rec.stimuli.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    rows = []
    for site in (site_order(rec) if sites is None else list(sites)):
        n_total = int(rec.responses(site).shape[1])
        pool = np.arange(n_total) if n_total <= max_units else np.sort(rng.choice(n_total, max_units, replace=False))
        x, valid = _site_matrix(rec, site, None if n_total <= max_units else pool)
        y = stimuli["concept"].astype(str).to_numpy()[valid]
        live = x.std(axis=0) > 0
        x, pool = x[:, live], pool[live]
        counts = pd.Series(y).value_counts()
        folds = int(min(cv, counts.min()))
        if folds < 2 or len(counts) < 2:
            raise NeuroprobeError(f"site {site}: every concept needs at least 2 stimuli to cross-validate decoding.")
        chance = float(counts.max() / counts.sum())
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

        def score(cols: np.ndarray) -> float:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(cross_val_score(model, x[:, cols], y, cv=splitter).mean())

        for n in sorted({min(int(v), x.shape[1]) for v in n_units if v > 0}):
            for d in range(n_draws if n < x.shape[1] else 1):
                cols = rng.choice(x.shape[1], n, replace=False)
                rows.append(dict(site=site, selection="random" if n < x.shape[1] else "all", n_units=n, draw=d,
                                 accuracy=score(cols), chance=chance))
        if cells is not None:
            mine = cells[(cells["site"] == site) & cells["is_cell"]]["unit"].to_numpy()
            cols = np.flatnonzero(np.isin(pool, mine))
            if len(cols):
                rows.append(dict(site=site, selection="cells", n_units=len(cols), draw=0, accuracy=score(cols),
                                 chance=chance))
    return pd.DataFrame(rows)


def rdm(
    rec: Recording | str | Path,
    site: str,
    *,
    level: str = "concept",
    split: str | None = None,
    block_units: int | None = None,
) -> pd.DataFrame:
    """Representational dissimilarity matrix of one site: ``1 - corr`` of response patterns.

    Parameters
    ----------
    rec
        The recording.
    site
        The site.
    level
        ``concept`` (patterns = class-mean responses) or ``stimulus``.
    split
        Only stimuli of this split (default: all).
    block_units
        Units per streamed block.

    Returns
    -------
    DataFrame
        Square, indexed by concept (or stimulus id) on both axes.
    """
    if level not in ("concept", "stimulus"):
        raise NeuroprobeError(f"RDM level must be 'concept' or 'stimulus', not {level!r}.")
    rec = as_recording(rec)
    stimuli = rec.stimuli.reset_index(drop=True)
    stream = UnitStream(rec.responses(site), block_units=block_units)
    gram = s1 = None
    labels = None
    n_units = 0
    for _, _, x in stream:  # x: [units, valid stimuli]
        if gram is None:
            st = stimuli[stream.valid].reset_index(drop=True)
            keep = np.ones(len(st), bool) if split is None else (st["split"] == split).to_numpy()
            st = st[keep]
            if level == "concept":
                concepts = [c for c in battery_concepts(stimuli) if c in set(st["concept"])]
                onehot = (st["concept"].to_numpy()[:, None] == np.array(concepts)[None, :]).astype(np.float64)
                avg = onehot / onehot.sum(0)
                labels = concepts
            else:
                avg = np.eye(len(st))
                labels = st["id"].tolist()
            gram = np.zeros((len(labels), len(labels)))
            s1 = np.zeros(len(labels))
        p = np.nan_to_num(x[:, keep].astype(np.float64)) @ avg  # [units, patterns]
        gram += p.T @ p
        s1 += p.sum(0)
        n_units += x.shape[0]
    if gram is None or n_units < 2:
        raise NeuroprobeError(f"site {site} has fewer than 2 units; an RDM needs more.")
    mean = s1 / n_units
    cov = gram / n_units - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    return pd.DataFrame(1.0 - corr, index=labels, columns=labels)
