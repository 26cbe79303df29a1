"""Universal units: units of one network whose best match in another training run responds alike.

After Gurnee et al. (2024, "Universal neurons in GPT2 language models"): for every unit of
run ``a`` and another run ``b`` of the same architecture, the **best-match correlation** is
the largest Pearson correlation (over the same stimuli) between the unit's responses and
those of any unit of ``b`` at the same site.  Its **baseline** is the same maximum after
a Haar-random rotation of ``b``'s (z-scored) basis: a rotation keeps everything ``b``
represents and destroys only its alignment with the unit axes, so a large best match that
survives the rotation is no evidence that the *units* agree.  The **excess correlation** is
best match minus baseline, averaged over the other runs; Gurnee et al. call a unit universal
when it exceeds 0.5.

Units that are constant over the stimuli (dead) have no correlation: they are left out as
queries and as candidates.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError

#: Gurnee et al.'s (2024) threshold on the excess correlation
UNIVERSAL_EXCESS = 0.5


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``x[stimuli, units]`` z-scored (population SD); returns ``(z, alive)``, dead columns zero."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    alive = np.isfinite(sd) & (sd > 1e-12 * np.maximum(1.0, np.abs(mu)))
    z = np.zeros_like(x)
    z[:, alive] = (x[:, alive] - mu[alive]) / sd[alive]
    return z, alive


def rotate(z: np.ndarray, alive: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Haar-random rotation of the live columns of ``z``, re-standardized (dead columns dropped)."""
    from neuroprobe.analysis.controls import random_rotation

    live = z[:, alive]
    if live.shape[1] == 0:
        return live, np.zeros(0, dtype=bool)
    return standardize(live @ random_rotation(live.shape[1], rng))


def best_match(za: np.ndarray, alive_a: np.ndarray, zb: np.ndarray, alive_b: np.ndarray) -> np.ndarray:
    """Per unit of ``a``: its largest Pearson correlation with a live unit of ``b`` (NaN for dead units of ``a``)."""
    out = np.full(za.shape[1], np.nan)
    if not alive_b.any():
        return out
    corr = za[:, alive_a].T @ zb[:, alive_b] / za.shape[0]
    out[alive_a] = corr.max(axis=1)
    return out


def excess_correlation(
    responses: Sequence[np.ndarray],
    *,
    seed: int = 0,
    rotate_query: bool = False,
) -> pd.DataFrame:
    """Best-match correlation, rotated baseline and excess of every unit of every run at one site.

    Parameters
    ----------
    responses
        One ``[stimuli, units]`` array per run (the same stimuli in the same order; at least two).
    seed
        Seeds the random rotations (one per ordered pair of runs).
    rotate_query
        Also rotate the querying run's basis first: the control in which no unit is
        universal (its excess should be near 0).

    Returns
    -------
    pandas.DataFrame
        One row per run and unit: ``run, unit, alive, best_match, baseline, excess`` (means
        over the other runs; NaN for dead units).
    """
    if len(responses) < 2:
        raise NeuroprobeError("universality compares at least two training runs.")
    n = {np.asarray(r).shape[0] for r in responses}
    if len(n) != 1:
        raise NeuroprobeError(f"the runs' responses cover different numbers of stimuli ({sorted(n)}).")
    zs = [standardize(r) for r in responses]
    rows = []
    for a, (za, alive_a) in enumerate(zs):
        if rotate_query:
            rng = np.random.default_rng([seed, 2, a, 0])
            za_r, alive_r = rotate(za, alive_a, rng)
            za, alive_a = np.zeros_like(za), alive_a.copy()
            za[:, alive_a] = za_r
            alive_a[alive_a] = alive_r
        match, base = [], []
        for b, (zb, alive_b) in enumerate(zs):
            if b == a:
                continue
            rng = np.random.default_rng([seed, 1, a, b])
            zb_rot, alive_rot = rotate(zb, alive_b, rng)
            match.append(best_match(za, alive_a, zb, alive_b))
            base.append(best_match(za, alive_a, zb_rot, alive_rot))
        m, bl = np.mean(match, axis=0), np.mean(base, axis=0)
        rows.append(pd.DataFrame({"run": a, "unit": np.arange(za.shape[1]), "alive": alive_a, "best_match": m,
                                  "baseline": bl, "excess": m - bl}))
    return pd.concat(rows, ignore_index=True)


def universal_units(
    responses: Mapping[str, Sequence[np.ndarray]],
    *,
    threshold: float = UNIVERSAL_EXCESS,
    seed: int = 0,
    rotate_query: bool = False,
) -> pd.DataFrame:
    """:func:`excess_correlation` for several sites, with ``universal`` = excess above ``threshold``.

    Parameters
    ----------
    responses
        Site -> one ``[stimuli, units]`` array per run.
    threshold
        Excess correlation above which a unit is universal (Gurnee et al.: 0.5).
    seed, rotate_query
        See :func:`excess_correlation`.

    Returns
    -------
    pandas.DataFrame
        ``site, run, unit, alive, best_match, baseline, excess, universal``.
    """
    parts = []
    for k, (site, runs) in enumerate(responses.items()):
        df = excess_correlation(runs, seed=seed + 1000 * k, rotate_query=rotate_query)
        df.insert(0, "site", site)
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    out["universal"] = out["alive"] & (out["excess"] > threshold)
    return out
