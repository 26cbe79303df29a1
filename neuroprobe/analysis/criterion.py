"""The concept-cell criterion (after Quiroga et al. 2005), FDR and confirmation.

For every live unit and every concept ``c``, on the **screening** split:

1. effect: the median response to ``c``'s stimuli exceeds the baseline (every other
   screening stimulus) mean by ``k`` baseline SDs (``k = 5``);
2. evidence: a one-sided rank-sum (Mann–Whitney) test of ``c``'s stimuli against the
   baseline survives Benjamini–Hochberg (or Benjamini–Yekutieli) FDR at ``fdr`` over
   **all** unit x concept tests of the recording (every site, every concept).

A pair passing both is a *candidate*.  Each candidate pair is then tested again on
the **testing** split (no double dipping): the same effect size, and the rank-sum
test corrected by the same FDR procedure over the family of candidate pairs.  A
unit is a **concept cell** (``is_cell``) when its concept — the candidate concept
with the smallest screening p (else the concept with the largest effect) — is
confirmed.  Invariance and multimodality (see :mod:`neuroprobe.analysis.invariance`)
are properties of cells: ``invariant``, ``lofo_pass`` and ``multimodal`` are only
ever true for cells.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from neuroprobe.analysis.scan import ScanResult, as_recording, scan
from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording.reader import Recording

METHODS = ("bh", "by")


def fdr_qvalues(p: np.ndarray, method: str = "bh") -> np.ndarray:
    """BH / BY adjusted p-values (q-values) of the finite entries of ``p``; NaN elsewhere."""
    if method not in METHODS:
        raise NeuroprobeError(f"FDR method {method!r} is not one of {', '.join(METHODS)}.")
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method=method)
    return q


def concept_cells(
    rec: Recording | str | Path,
    k: float = 5.0,
    fdr: float = 0.05,
    *,
    method: str = "bh",
    alpha: float = 0.05,
    n_perm: int = 1000,
    transform: str = "shift",
    sites: Sequence[str] | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
    quiet: bool = True,
    read_bytes: int | None = None,
    block_units: int | None = None,
    jobs: int = 1,
) -> pd.DataFrame:
    """Find concept cells: one row per unit of every site, with every index and the verdict.

    Parameters
    ----------
    rec
        A recording or its path.
    k
        Effect size: the concept's median above the baseline mean by ``k`` baseline SDs.
    fdr
        False-discovery rate of the rank-sum tests (screening and confirmation).
    method
        ``bh`` (Benjamini–Hochberg) or ``by`` (Benjamini–Yekutieli, any dependence).
    alpha
        Level of the per-form / per-modality / leave-one-form-out label-shuffle tests.
    n_perm
        Label-shuffle permutations for those tests (0 skips them: no unit is then invariant).
    transform
        Non-negative transform for selectivity and sparseness (``shift`` or ``clip``;
        see :mod:`neuroprobe.analysis.indices`).
    sites
        Sites to analyse (default: all).
    seed
        Seed of the permutations.
    labels
        Concept per stimulus overriding the recording's (used by the label-shuffle control).
    quiet
        No progress bar.
    read_bytes, block_units
        Memory knobs of the stream.
    jobs
        Sites scanned in this many processes (0: one per core); same table as ``jobs=1``.

    Returns
    -------
    DataFrame
        One row per unit.  Identity: ``site, unit, kind, n_stimuli, dead, transform``.
        Indices (all stimuli): ``mean:<concept>``, ``si, si_morcos, lifetime_sparseness,
        kurtosis``; ``pref_concept`` (largest screening mean) with ``d_prime, auc`` on the
        testing split.  Criterion: ``concept`` (the unit's concept), ``z`` (its screening
        effect in SDs), ``median, baseline_mean, baseline_sd, p, q, d_prime_screen,
        auc_screen``, ``n_concepts`` and ``concepts`` (every concept passing screening),
        ``is_candidate``; ``z_test, p_test, q_test, d_prime_test, auc_test``,
        ``n_confirmed``, ``is_cell``.  Invariance (testing split): ``auc_form:<f>,
        p_form:<f>, n_forms, auc_form_min, p_form_max, invariant``; leave-one-form-out
        ``lofo_auc:<f>, lofo_p:<f>, lofo_auc_min, lofo_p_max, lofo_pass``; with two or more
        modalities ``auc_modality:<m>, p_modality:<m>, z_modality:<m>``; ``multimodal``.
        Settings are in ``DataFrame.attrs``.

    Examples
    --------
    >>> cells = concept_cells("recordings/minilm_kinship_mlp.h5")   # doctest: +SKIP
    >>> cells[cells.is_cell].groupby("site").size()                 # doctest: +SKIP
    """
    if method not in METHODS:
        raise NeuroprobeError(f"FDR method {method!r} is not one of {', '.join(METHODS)}.")
    if not 0 < fdr < 1:
        raise NeuroprobeError(f"the FDR must be between 0 and 1, not {fdr}.")
    if k < 0:
        raise NeuroprobeError(f"k must be non-negative, not {k}.")
    recording = as_recording(rec)
    res = scan(recording, sites=sites, transform=transform, criterion=True, k=k, alpha=alpha, n_perm=n_perm,
               seed=seed, labels=labels, quiet=quiet, read_bytes=read_bytes, block_units=block_units, jobs=jobs)
    df = apply_criterion(res, fdr=fdr, method=method, alpha=alpha)
    df.attrs.update(
        recording=str(recording.path), subject=str(recording.attrs.get("subject")),
        init=str(recording.attrs.get("init")), battery=str(recording.attrs.get("battery")),
        k=k, fdr=fdr, method=method, alpha=alpha, n_perm=n_perm, transform=transform, seed=seed,
        n_tests=int(np.isfinite(res.pairs.get("p_scr", np.zeros((0, 0)))).sum()) if res.pairs else 0,
        concepts=list(res.concepts), forms=list(res.forms), modalities=list(res.modalities),
        passes=res.passes,
    )
    return df


def apply_criterion(res: ScanResult, *, fdr: float, method: str, alpha: float) -> pd.DataFrame:
    """Turn a criterion scan into the final table (FDR over all pairs, confirmation, flags)."""
    df = res.table.copy()
    if df.empty:
        return df
    concepts = np.array(res.concepts, dtype=object)
    best = np.array([res.concepts.index(c) if isinstance(c, str) else 0 for c in df["concept"]], dtype=np.intp)
    rows = np.arange(len(df))
    p_scr, eff_scr = res.pairs["p_scr"], res.pairs["effect_scr"]
    q_scr = fdr_qvalues(p_scr, method)
    passed = eff_scr & (q_scr <= fdr)
    df["q"] = q_scr[rows, best]
    df["n_concepts"] = passed.sum(1)
    df["concepts"] = [";".join(concepts[np.flatnonzero(r)]) for r in passed]
    df["is_candidate"] = passed[rows, best]
    # confirmation on the testing split: the family is every candidate pair
    p_test = np.where(passed, res.pairs["p_test"], np.nan)
    q_test = fdr_qvalues(p_test, method)
    confirmed = passed & res.pairs["effect_test"] & (q_test <= fdr)
    df["q_test"] = q_test[rows, best]
    df["n_confirmed"] = confirmed.sum(1)
    df["is_cell"] = confirmed[rows, best]
    cell = df["is_cell"].to_numpy()
    df["invariant"] = cell & (df["n_forms"].to_numpy() >= 2) & (df["p_form_max"].to_numpy() <= alpha)
    df["lofo_pass"] = cell & (df["n_forms"].to_numpy() >= 2) & (df["lofo_p_max"].to_numpy() <= alpha)
    df["multimodal"] = (cell & (df["n_modalities"].to_numpy() >= 2) & (df["p_modality_max"].to_numpy() <= alpha)
                        & df["effect_all_modalities"].to_numpy())
    df.loc[df["dead"], ["is_candidate", "is_cell"]] = False
    return _order_columns(df)


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = ["site", "unit", "kind", "dead", "concept", "is_candidate", "is_cell", "invariant", "multimodal",
             "lofo_pass", "z", "p", "q", "z_test", "p_test", "q_test", "n_concepts", "concepts", "n_confirmed",
             "si", "si_morcos", "d_prime", "auc", "d_prime_screen", "auc_screen", "d_prime_test", "auc_test",
             "lifetime_sparseness", "kurtosis", "pref_concept", "median", "baseline_mean", "baseline_sd",
             "n_stimuli", "transform", "n_forms", "auc_form_min", "p_form_max", "lofo_auc_min", "lofo_p_max",
             "n_modalities", "p_modality_max", "effect_all_modalities"]
    head = [c for c in first if c in df.columns]
    rest = [c for c in df.columns if c not in head]
    rest = sorted([c for c in rest if not c.startswith("mean:")], key=lambda c: (c.split(":")[0], c)) + \
        [c for c in rest if c.startswith("mean:")]
    return df[head + rest]


def summarize(cells: pd.DataFrame, by: str = "site") -> pd.DataFrame:
    """Counts per ``site`` (or ``concept``): units, dead, candidates, cells, invariant, multimodal."""
    if by == "site":
        order = list(dict.fromkeys(cells["site"]))
        g = cells.groupby("site", sort=False)
        out = pd.DataFrame({
            "units": g.size(), "dead": g["dead"].sum(), "candidates": g["is_candidate"].sum(),
            "cells": g["is_cell"].sum(), "invariant": g["invariant"].sum(), "multimodal": g["multimodal"].sum(),
        }).reindex(order)
    elif by == "concept":
        live = cells[cells["is_candidate"]]
        g = live.groupby("concept")
        concepts = cells.attrs.get("concepts") or sorted(live["concept"].dropna().unique())
        out = pd.DataFrame({"candidates": g.size(), "cells": g["is_cell"].sum(),
                            "invariant": g["invariant"].sum(), "multimodal": g["multimodal"].sum()})
        out = out.reindex(concepts).fillna(0).astype(int)
    else:
        raise NeuroprobeError(f"summarize by 'site' or 'concept', not {by!r}.")
    return out.astype(int)


def save_cells(cells: pd.DataFrame, out: str | Path) -> Path:
    """Write a cells table as CSV or Parquet (by the file's suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".parquet", ".pq"):
        frame = cells.copy()
        frame.attrs = {k: v for k, v in cells.attrs.items() if isinstance(v, (str, int, float, bool, list))}
        frame.to_parquet(out, index=False)
    elif out.suffix.lower() in (".csv", ".tsv"):
        cells.to_csv(out, index=False, sep="\t" if out.suffix.lower() == ".tsv" else ",")
    else:
        raise NeuroprobeError(f"cannot write {out}: use a .csv or .parquet file name.")
    return out


def load_cells(path: str | Path) -> pd.DataFrame:
    """Read a cells table written by :func:`save_cells` (or ``neuroprobe cells --out``)."""
    path = Path(path)
    if not path.exists():
        raise NeuroprobeError(f"{path} does not exist; write it with `neuroprobe cells REC.h5 --out {path.name}`.")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
