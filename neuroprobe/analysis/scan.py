"""One streaming pass over a recording: every per-unit statistic, block by block.

:func:`scan` reads each site once (see :mod:`neuroprobe.analysis.stream`), and for
each block of units computes, vectorised over the block:

* the descriptive indices (:mod:`neuroprobe.analysis.indices`);
* with ``criterion=True``, the screening and testing statistics of every
  unit x concept pair (median, baseline mean and SD, rank-sum p) and the invariance
  statistics of each unit's concept (:mod:`neuroprobe.analysis.invariance`).

Multiple-comparison corrections need every p-value of the recording, so they are
applied afterwards by :func:`neuroprobe.analysis.criterion.concept_cells` on the
``[units, concepts]`` arrays kept here (memory: O(units x concepts), never
O(units x stimuli)).

Layers (each imports only the ones before it): the numeric kernels (``design``, ``stream``,
``exact``, ``indices``, ``invariance``, ``thresholds``), this scan (one process), the pool
(:mod:`neuroprobe.analysis.parallel`: sites in worker processes, and ``run_scan``, the one entry
that picks one process or the pool), then the analyses (``criterion``, ``descriptive``,
``controls``...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from neuroprobe.analysis.design import Design, Subset
from neuroprobe.analysis.exact import EXACT_BUDGET, EXACT_MARGIN, exact_p
from neuroprobe.analysis.indices import (
    TRANSFORMS, auc_from_u, class_means, constant_baselines, d_prime, dead_units, group_order_stats, group_stats,
    kurtosis, lifetime_sparseness, midranks, morcos_si, nonneg, rank_sum, selectivity_index, sparseness_from_sums,
)
from neuroprobe.analysis.invariance import PermutationNull, invariance_block
from neuroprobe.analysis.stream import DEFAULT_READ_BYTES, UnitStream
from neuroprobe.analysis.thresholds import exact_cutoff
from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording.reader import Recording, open_recording


@dataclass
class ScanResult:
    """What :func:`scan` returns."""

    table: pd.DataFrame                 # one row per unit
    population: pd.DataFrame            # one row per site x stimulus
    concepts: list[str]
    forms: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    pairs: dict[str, np.ndarray] = field(default_factory=dict)  # [units, concepts] arrays (criterion)
    passes: int = 0                     # super-block reads
    screening: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # site -> (n, per-concept counts)
    testing: dict[str, tuple[int, list[int]]] = field(default_factory=dict)    # site -> (n, per-concept counts)
    cutoffs: dict[str, float] = field(default_factory=dict)  # site -> exact-p cut-off used on screening pairs
    skipped: list[str] = field(default_factory=list)  # sites with no recorded stimulus (an unfinished recording)


def as_recording(rec: Recording | str | Path) -> Recording:
    """A :class:`Recording` from a recording or a path."""
    return rec if isinstance(rec, Recording) else open_recording(rec)


def site_order(rec: Recording) -> list[str]:
    """Sites in recording (montage) order, falling back to the file's order."""
    names = rec.site_names
    listed = rec.attrs.get("sites_list")
    if isinstance(listed, list):
        ordered = [s for s in listed if s in names]
        return ordered + [s for s in names if s not in ordered]
    return names


def battery_concepts(stimuli: pd.DataFrame) -> list[str]:
    """Concepts in battery order (first appearance)."""
    return list(dict.fromkeys(stimuli["concept"].astype(str)))


def checked_request(rec: Recording | str | Path, sites: Sequence[str] | None,
                    transform: str = "shift") -> tuple[Recording, list[str]]:
    """The recording and the sites a scan will read, or the user's mistake in one sentence.

    Parameters
    ----------
    rec
        Recording or path.
    sites
        Sites asked for (``None``: every site, montage order).
    transform
        The non-negative transform asked for.
    """
    if transform not in TRANSFORMS:
        raise NeuroprobeError(f"transform {transform!r} is not one of {', '.join(TRANSFORMS)}.")
    rec = as_recording(rec)
    if "concept" not in rec.stimuli:
        raise NeuroprobeError(f"{rec.path} has no concept column in its stimuli table; record a battery with concepts.")
    names = site_order(rec) if sites is None else list(sites)
    for s in names:
        if s not in rec.site_names:
            raise NeuroprobeError(f"{rec.path} has no site {s!r}; it has {', '.join(rec.site_names[:8])}.")
    return rec, names


def _pick(a: np.ndarray, col: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, col[:, None], axis=1)[:, 0]


def _z(med: np.ndarray, mean_b: np.ndarray, sd_b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (med - mean_b) / sd_b
    return np.where(np.isnan(z) & (med == mean_b), 0.0, z)


def concept_tests(x: np.ndarray, sub: Subset, k: float, medians: bool = True, exact: bool = False,
                  margin: float = EXACT_MARGIN, budget: float = EXACT_BUDGET) -> dict[str, np.ndarray]:
    """Criterion statistics of every unit x concept on one subset (screening or testing).

    Returns ``[G, C]`` arrays: ``median``, ``mean_b``, ``sd_b`` (baseline = the subset's other
    stimuli; a constant baseline has exactly SD 0 and mean its value), ``z = (median - mean_b) /
    sd_b``, ``effect = median > mean_b + k sd_b`` (with SD 0: median strictly above the
    baseline value, so a tie never passes), ``U``, ``p`` (one-sided rank-sum; exact under the
    permutation null where ``exact`` says so, see :func:`~neuroprobe.analysis.exact.exact_p`),
    ``auc``, ``d_prime``, ``p_asym``, ``exact``, ``over``, and ``_ranks`` (to make more p-values
    exact later).  ``medians=False`` skips the medians (and the effect size) when only d' and
    AUC are wanted.
    """
    xs = x[:, sub.idx]
    x64 = xs.astype(np.float64)
    med, gmin, gmax = group_order_stats(xs, sub.groups)  # one sort per row gives medians and extremes
    st = constant_baselines(x64, sub.groups, group_stats(x64, sub.onehot), extremes=(gmin, gmax))
    if not medians:
        med = np.full(st.mean_c.shape, np.nan)
    sd_b = np.sqrt(st.var_b)
    ranks, tie = midranks(xs)
    U, p_asym = rank_sum(ranks, tie, sub.onehot)
    if exact:
        p, ex, over = exact_p(ranks, sub.onehot, U, p_asym, margin=margin, budget=budget)
    else:
        p, ex, over = p_asym, np.zeros(U.shape, bool), np.zeros(U.shape, bool)
    return dict(median=med, mean_b=st.mean_b, sd_b=sd_b, z=_z(med, st.mean_b, sd_b),
                effect=med > st.mean_b + k * sd_b, U=U, p=p, p_asym=p_asym, exact=ex, over=over,
                auc=auc_from_u(U, st.n_c, st.n_b), d_prime=d_prime(st), _ranks=ranks, _onehot=sub.onehot)


def best_concept(z: np.ndarray, p: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """Each unit's concept: the smallest screening p among concepts passing the effect size
    (ties: larger z), else the largest z.  Because q-values are monotone in p, the unit is a
    candidate exactly when this concept survives the FDR."""
    zf = np.where(np.isfinite(z) | (z == np.inf), z, -np.inf)
    zf = np.nan_to_num(zf, nan=-np.inf)
    pe = np.where(effect & np.isfinite(p), p, np.inf)
    pmin = pe.min(axis=1, keepdims=True)
    tied = (pe == pmin) & np.isfinite(pe)
    by_p = np.argmax(np.where(tied, zf, -np.inf), axis=1)
    by_z = np.argmax(zf, axis=1)
    return np.where(np.isfinite(pmin[:, 0]), by_p, by_z)


def scan(
    rec: Recording | str | Path,
    *,
    sites: Sequence[str] | None = None,
    transform: str = "shift",
    criterion: bool = True,
    k: float = 5.0,
    alpha: float = 0.05,
    n_perm: int = 1000,
    seed: int = 0,
    labels: np.ndarray | None = None,
    quiet: bool = True,
    read_bytes: int | None = None,
    block_units: int | None = None,
    exact: bool = True,
    fdr: float = 0.05,
    family: str = "units",
    margin: float | None = None,
    budget: float = EXACT_BUDGET,
) -> ScanResult:
    """Stream every unit of ``sites`` through the statistics in this process (see module docstring).

    :func:`neuroprobe.analysis.parallel.run_scan` takes the same options and ``jobs``.

    Parameters
    ----------
    rec
        Recording or path.
    sites
        Sites (default all, montage order).
    transform
        ``shift`` or ``clip`` (non-negative transform for SI and sparseness).
    criterion
        Also compute the concept-cell statistics and invariance.
    k
        Effect size in baseline SDs.
    alpha
        Level of the invariance permutation tests (used by the caller; stored).
    n_perm
        Label-shuffle permutations for invariance p-values (0: skip).
    seed
        Seed of the permutations.
    labels
        Concept per stimulus overriding the recording's (label-shuffle control).
    quiet
        No progress bar.
    read_bytes, block_units
        Memory knobs.
    exact
        Exact rank-sum p-values (conditional permutation null) where they can matter: screening
        pairs with an asymptotic p at or below the cut-off, and testing pairs that can be
        confirmed (their screening pair passes the effect size with p <= ``fdr``); see
        :mod:`neuroprobe.analysis.exact`.  ``False``: the normal approximation everywhere.
    fdr, family
        The FDR level and family the caller will use: they decide the cut-off and which testing
        pairs need exact p-values.
    margin
        The cut-off on screening pairs' asymptotic p; ``None`` (default): per site,
        :func:`neuroprobe.analysis.thresholds.exact_cutoff` of ``fdr``, the site's concept tests
        per unit and ``family`` (reported in ``ScanResult.cutoffs``).
    budget
        See :func:`neuroprobe.analysis.exact.exact_p`.
    """
    rec, names = checked_request(rec, sites, transform)
    stimuli = rec.stimuli.reset_index(drop=True)
    concepts = battery_concepts(stimuli) if labels is None else list(dict.fromkeys(map(str, labels)))
    kinds = dict(zip(rec.sites["site"], rec.sites["kind"]))
    n_units_total = int(sum(int(rec.responses(s).shape[1]) for s in names))
    bar = tqdm(total=n_units_total, unit="unit", desc="cells" if criterion else "indices", disable=quiet,
               dynamic_ncols=True)
    null = PermutationNull(n_perm, seed)
    tables, pops = [], []
    pair_parts: dict[str, list[np.ndarray]] = {}
    forms_all: list[str] = []
    mods_all: list[str] = []
    passes = 0
    screening: dict[str, tuple[int, list[int]]] = {}
    testing: dict[str, tuple[int, list[int]]] = {}
    cutoffs: dict[str, float] = {}
    skipped: list[str] = []
    try:
        for site in names:
            ds = rec.responses(site)
            stream = UnitStream(ds, read_bytes=read_bytes or DEFAULT_READ_BYTES, block_units=block_units)
            design: Design | None = None
            cols: dict[str, list[np.ndarray]] = {}
            s1 = s2 = None
            n_live = 0
            for lo, hi, x in stream:
                if design is None and not stream.valid.any():  # no stimulus of this site recorded yet
                    skipped.append(site)
                    bar.update(stream.n_units)
                    break
                if design is None:
                    design = Design.build(stimuli, stream.valid, concepts, labels)
                    forms_all += [f for f in design.forms if f not in forms_all]
                    mods_all += [m for m in design.modalities if m not in mods_all]
                    s1 = np.zeros(x.shape[1])
                    s2 = np.zeros(x.shape[1])
                    cut = margin if margin is not None else exact_cutoff(fdr, tests_per_unit(design.screening), family)
                blk = _block(x, design, transform=transform, criterion=criterion, k=k, null=null, exact=exact, fdr=fdr,
                             margin=cut, budget=budget)
                live = ~blk["dead"]
                r = blk.pop("_r")
                if not live.all():
                    r = r[live]
                s1 += r.sum(0)
                s2 += np.square(r, out=r).sum(0)                # r is not used again: squared in place
                n_live += int(live.sum())
                blk["unit"] = np.arange(lo, hi)
                for name, v in blk.items():
                    cols.setdefault(name, []).append(v)
                bar.update(hi - lo)
            passes += stream.passes
            if design is None:  # a site with no units, or none of its stimuli recorded yet
                continue
            screening[site] = (design.screening.n, [int(c) for c in design.screening.counts])
            testing[site] = (design.testing.n, [int(c) for c in design.testing.counts])
            if criterion and exact:
                cutoffs[site] = float(cut)
            arr = {name: np.concatenate(v) for name, v in cols.items()}
            tables.append(_site_table(site, kinds.get(site, ""), design, arr, transform, criterion))
            for name in ("p_scr", "effect_scr", "z_scr", "p_test", "effect_test", "z_test", "exact_scr", "over_scr",
                         "exact_test", "over_test"):
                if name in arr:
                    pair_parts.setdefault(name, []).append(arr[name])
            pop = design.stimuli[[c for c in ("index", "id", "concept", "form", "modality", "split") if c in design.stimuli]].copy()
            pop.insert(0, "site", site)
            pop["n_units"] = n_live
            pop["population_sparseness"] = sparseness_from_sums(s1, s2, n_live) if n_live else np.nan
            pops.append(pop)
    finally:
        bar.close()
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    population = pd.concat(pops, ignore_index=True) if pops else pd.DataFrame()
    pairs = {name: np.concatenate(v) for name, v in pair_parts.items()}
    return ScanResult(table, population, concepts, forms_all, mods_all, pairs, passes, screening, testing, cutoffs,
                      skipped)


def tests_per_unit(sub: Subset) -> int:
    """Concept tests a live unit gets on a subset: concepts with stimuli both in and outside them."""
    return int(((sub.counts > 0) & (sub.counts < sub.n)).sum())


def _block(x: np.ndarray, design: Design, *, transform: str, criterion: bool, k: float,
           null: PermutationNull, exact: bool = True, fdr: float = 0.05, margin: float = EXACT_MARGIN,
           budget: float = EXACT_BUDGET) -> dict[str, np.ndarray]:
    """Every statistic of one block ``x[units, stimuli]``."""
    G = x.shape[0]
    dead = dead_units(x)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.float32(0.0))
    del finite
    x64 = x.astype(np.float64)
    least = x64.min(axis=1, keepdims=True)
    r = x64 - least if transform == "shift" else nonneg(x64, transform)  # nonneg's shift, its minimum once
    out: dict[str, np.ndarray] = {"dead": dead, "_r": r}
    out["means"] = class_means(x64, design.all.onehot)
    if transform == "shift":  # the transform is a per-unit offset: shift the class means, no second product
        means_pos = out["means"] - least
    else:
        means_pos = class_means(r, design.all.onehot)
    out["si"] = selectivity_index(means_pos)
    out["si_morcos"] = morcos_si(means_pos)
    out["lifetime_sparseness"] = lifetime_sparseness(r)
    out["kurtosis"] = kurtosis(x64)
    del x64
    scr_means = class_means(x[:, design.screening.idx], design.screening.onehot)
    if design.screening.n:
        pref = np.argmax(np.nan_to_num(scr_means, nan=-np.inf), axis=1)
    else:
        pref = np.zeros(G, dtype=np.intp)
    out["pref"] = pref
    test = concept_tests(x, design.testing, k, medians=criterion) if design.testing.n else None
    out["d_prime"] = _pick(test["d_prime"], pref) if test else np.full(G, np.nan)
    out["auc"] = _pick(test["auc"], pref) if test else np.full(G, np.nan)
    if criterion:
        scr = concept_tests(x, design.screening, k, exact=exact, margin=margin, budget=budget)
        if test is None:
            test = {key: (np.full_like(v, np.nan if v.dtype.kind == "f" else False) if key[0] != "_" else v)
                    for key, v in scr.items()}
        elif exact:
            # confirmation: exact p for every pair that can become a candidate (its screening
            # pair passes the effect size with p <= fdr); the family there is small, so no margin
            want = scr["effect"] & (scr["p"] <= fdr) & ~dead[:, None]
            test["p"], test["exact"], test["over"] = exact_p(test["_ranks"], test["_onehot"], test["U"], test["p_asym"],
                                                             want=want, margin=1.0, budget=budget)
        best = best_concept(scr["z"], scr["p"], scr["effect"])
        for split, t in (("scr", scr), ("test", test)):
            p = np.where(dead[:, None], np.nan, t["p"])
            out[f"p_{split}"] = p
            out[f"effect_{split}"] = t["effect"] & ~dead[:, None]
            out[f"z_{split}"] = t["z"].astype(np.float32)
            out[f"exact_{split}"] = t["exact"] & ~dead[:, None]
            out[f"over_{split}"] = t["over"] & ~dead[:, None]
            for name in ("median", "mean_b", "sd_b", "auc", "d_prime", "p_asym"):
                out[f"{name}_{split}_best"] = _pick(t[name], best)
        out["best"] = best
        sel = _pick(out["effect_scr"], best)
        inv = invariance_block(x, design, best, sel, null, k)
        out.update(inv)
    return out


def _site_table(site: str, kind: str, design: Design, a: dict[str, np.ndarray], transform: str,
                criterion: bool) -> pd.DataFrame:
    """Per-unit columns of one site (before FDR)."""
    concepts = np.array(design.concepts, dtype=object)
    dead = a["dead"]
    n = len(dead)

    def live(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        v[dead] = np.nan
        return v

    df: dict[str, object] = {"site": site, "unit": a["unit"], "kind": kind, "n_stimuli": design.all.n,
                             "dead": dead, "transform": transform}
    for c, name in enumerate(design.concepts):
        df[f"mean:{name}"] = a["means"][:, c]
    df["pref_concept"] = np.where(dead, None, concepts[a["pref"]])
    for name in ("si", "si_morcos", "lifetime_sparseness", "kurtosis", "d_prime", "auc"):
        df[name] = live(a[name])
    if not criterion:
        return pd.DataFrame(df)
    df["concept"] = np.where(dead, None, concepts[a["best"]])
    df["z"] = live(_pick(a["z_scr"].astype(np.float64), a["best"]))
    df["median"] = live(a["median_scr_best"])
    df["baseline_mean"] = live(a["mean_b_scr_best"])
    df["baseline_sd"] = live(a["sd_b_scr_best"])
    df["p"] = live(_pick(a["p_scr"], a["best"]))
    df["p_asymptotic"] = live(a["p_asym_scr_best"])
    df["p_exact"] = _pick(a["exact_scr"], a["best"]) & ~dead
    df["d_prime_screen"] = live(a["d_prime_scr_best"])
    df["auc_screen"] = live(a["auc_scr_best"])
    df["z_test"] = live(_pick(a["z_test"].astype(np.float64), a["best"]))
    df["p_test"] = live(_pick(a["p_test"], a["best"]))
    df["d_prime_test"] = live(a["d_prime_test_best"])
    df["auc_test"] = live(a["auc_test_best"])
    for j, f in enumerate(design.forms):
        df[f"auc_form:{f}"] = live(a["auc_form"][:, j])
        df[f"p_form:{f}"] = a["p_form"][:, j]
    for j, f in enumerate(design.forms):
        df[f"lofo_auc:{f}"] = a["lofo_auc"][:, j]
        df[f"lofo_p:{f}"] = a["lofo_p"][:, j]
    if len(design.modalities) >= 2:
        for j, m in enumerate(design.modalities):
            df[f"auc_modality:{m}"] = live(a["auc_mod"][:, j])
            df[f"p_modality:{m}"] = a["p_mod"][:, j]
            df[f"z_modality:{m}"] = a["z_mod"][:, j]
    # invariance summaries over the forms / modalities where the unit's concept has testing stimuli
    best = a["best"]
    fcounts = np.stack([sub.counts[best] for sub in design.test_forms], axis=1) if design.forms else np.zeros((n, 0))
    present = fcounts > 0
    df["n_forms"] = present.sum(1)
    df["auc_form_min"] = _reduce(a["auc_form"], present, np.min)
    df["p_form_max"] = _reduce(a["p_form"], present, np.max)
    df["lofo_auc_min"] = _reduce(a["lofo_auc"], present, np.min)
    df["lofo_p_max"] = _reduce(np.where(a["lofo_same"], a["lofo_p"], 1.0), present, np.max)
    if len(design.modalities) >= 2:
        mcounts = np.stack([sub.counts[best] for sub in design.test_modalities], axis=1)
        mpresent = mcounts > 0
        df["n_modalities"] = mpresent.sum(1)
        df["p_modality_max"] = _reduce(a["p_mod"], mpresent, np.max)
        df["effect_all_modalities"] = (a["effect_mod"] | ~mpresent).all(1) & (mpresent.sum(1) >= 2)
    else:
        df["n_modalities"] = np.where(dead, 0, len(design.modalities))
        df["p_modality_max"] = np.nan
        df["effect_all_modalities"] = False
    return pd.DataFrame(df)


def _reduce(v: np.ndarray, present: np.ndarray, fn) -> np.ndarray:
    """``fn`` over the present columns of each row; NaN when none is present or a present value is NaN."""
    if v.shape[1] == 0:
        return np.full(v.shape[0], np.nan)
    fill = np.inf if fn is np.min else -np.inf
    out = fn(np.where(present, v, fill), axis=1).astype(np.float64)
    bad = ~present.any(1) | (present & np.isnan(v)).any(1)
    out[bad] = np.nan
    return out
