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

The same pass can be cut into pieces computed elsewhere: :func:`scan_units` computes some
consecutive blocks of a site (given the site's valid stimuli), and :class:`SiteScan` /
:class:`Gathered` join pieces in order exactly as :func:`scan` joins its own blocks.

Layers (each imports only the ones before it): the numeric kernels (``design``, ``stream``,
``exact``, ``indices``, ``invariance``, ``thresholds``), this scan (one process, no Dask), the
cluster layer (:mod:`neuroprobe.analysis.parallel`: pieces of sites on Dask workers, and
``run_scan``, the one entry that picks one process or Dask), then the analyses (``criterion``,
``descriptive``, ``controls``...).
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
    settings = Settings(transform=transform, criterion=criterion, k=k, n_perm=n_perm, seed=seed, exact=exact,
                        fdr=fdr, family=family, margin=margin, budget=budget)
    stimuli, concepts = rec.stimuli.reset_index(drop=True), scan_concepts(rec, labels)
    kinds = dict(zip(rec.sites["site"], rec.sites["kind"]))
    n_units_total = int(sum(int(rec.responses(s).shape[1]) for s in names))
    bar = tqdm(total=n_units_total, unit="unit", desc="cells" if criterion else "indices", disable=quiet,
               dynamic_ncols=True)
    null = PermutationNull(n_perm, seed)
    gathered = Gathered(concepts)
    try:
        for site in names:
            stream = UnitStream(rec.responses(site), read_bytes=read_bytes or DEFAULT_READ_BYTES,
                                block_units=block_units)
            acc: SiteScan | None = None
            for lo, hi, x in stream:
                if acc is None and not stream.valid.any():  # none of this site's stimuli recorded yet
                    gathered.skipped.append(site)
                    bar.update(stream.n_units)
                    break
                if acc is None:
                    acc = SiteScan(site, kinds.get(site, ""), Design.build(stimuli, stream.valid, concepts, labels),
                                   settings)
                acc.add(block_part(x, lo, hi, acc.design, settings, null, acc.cut))
                bar.update(hi - lo)
            gathered.passes += stream.passes
            if acc is not None:  # a site with no units gives no rows
                gathered.add(acc)
    finally:
        bar.close()
    return gathered.result()


def scan_concepts(rec: Recording, labels: np.ndarray | None = None) -> list[str]:
    """The concepts of a scan: the battery's (first appearance), or those of ``labels``."""
    return battery_concepts(rec.stimuli) if labels is None else list(dict.fromkeys(map(str, labels)))


@dataclass(frozen=True)
class Settings:
    """The statistics' options of :func:`scan` (what every block of units is computed with)."""

    transform: str = "shift"
    criterion: bool = True
    k: float = 5.0
    n_perm: int = 1000
    seed: int = 0
    exact: bool = True
    fdr: float = 0.05
    family: str = "units"
    margin: float | None = None
    budget: float = EXACT_BUDGET

    def cutoff(self, design: Design) -> float:
        """The exact-p cut-off on a site's screening pairs (``margin``, or derived from the design)."""
        if self.margin is not None:
            return self.margin
        return exact_cutoff(self.fdr, tests_per_unit(design.screening), self.family)


@dataclass
class Part:
    """The statistics of consecutive blocks of one site's units (what a block, or a run of blocks, gives).

    Attributes
    ----------
    cols
        Per-unit arrays (``[units]`` or ``[units, concepts]``), the blocks concatenated in order.
    sums
        Per block, in order: the sum over the block's live units of the transformed responses, and of
        their squares (``[n_valid]`` each; the site's population sparseness adds them in this order).
    n_live
        Live units.
    """

    cols: dict[str, np.ndarray]
    sums: list[tuple[np.ndarray, np.ndarray]]
    n_live: int

    @classmethod
    def join(cls, parts: Sequence["Part"]) -> "Part":
        """Consecutive parts as one (arrays concatenated, sums kept per block)."""
        names = list(parts[0].cols) if parts else []
        return cls({n: np.concatenate([p.cols[n] for p in parts]) for n in names},
                   [s for p in parts for s in p.sums], sum(p.n_live for p in parts))


def block_part(x: np.ndarray, lo: int, hi: int, design: Design, settings: Settings, null: PermutationNull,
               cut: float) -> Part:
    """Every statistic of the block ``x`` (units ``lo:hi`` of a site, ``[units, valid stimuli]``)."""
    s = settings
    blk = _block(x, design, transform=s.transform, criterion=s.criterion, k=s.k, null=null, exact=s.exact, fdr=s.fdr,
                 margin=cut, budget=s.budget)
    live = ~blk["dead"]
    r = blk.pop("_r")
    if not live.all():
        r = r[live]
    total = r.sum(0)
    squares = np.square(r, out=r).sum(0)                # r is not used again: squared in place
    blk["unit"] = np.arange(lo, hi)
    return Part(blk, [(total, squares)], int(live.sum()))


def scan_units(rec: Recording, site: str, valid: np.ndarray, lo: int, hi: int, settings: Settings, *,
               null: PermutationNull, labels: np.ndarray | None = None, read_bytes: int | None = None,
               block_units: int | None = None) -> Part:
    """The blocks of units ``lo:hi`` of ``site``, read with one read of at most ``read_bytes`` (the piece of
    a scan that a worker does; ``lo`` must start one of the blocks :func:`scan` would make, and ``hi`` end one).

    Parameters
    ----------
    rec
        The recording.
    site
        The site.
    valid
        The site's valid stimuli (:meth:`~neuroprobe.analysis.stream.UnitStream.first_valid`).
    lo, hi
        The units.
    settings, null, labels
        As :func:`scan` has them.
    read_bytes, block_units
        The memory knobs (the same as the whole scan's, so that the blocks are the same).
    """
    stimuli = rec.stimuli.reset_index(drop=True)
    design = Design.build(stimuli, valid, scan_concepts(rec, labels), labels)
    cut = settings.cutoff(design)
    stream = UnitStream(rec.responses(site), read_bytes=read_bytes or DEFAULT_READ_BYTES, block_units=block_units,
                        valid=valid, start=lo, stop=hi)
    return Part.join([block_part(x, a, b, design, settings, null, cut) for a, b, x in stream])


class SiteScan:
    """One site's blocks gathered in unit order: its rows of the table, pair arrays and population rows.

    Parameters
    ----------
    site, kind
        The site and its unit kind.
    design
        The site's design (from its valid stimuli).
    settings
        The statistics' options.
    """

    def __init__(self, site: str, kind: str, design: Design, settings: Settings) -> None:
        self.site, self.kind, self.design, self.settings = site, kind, design, settings
        self.cut = settings.cutoff(design)
        self.cols: dict[str, list[np.ndarray]] = {}
        self.s1 = np.zeros(design.all.n)
        self.s2 = np.zeros(design.all.n)
        self.n_live = 0

    def add(self, part: Part) -> None:
        """The next blocks of the site (in unit order)."""
        for total, squares in part.sums:  # block by block, in order: the sums of one pass, bit for bit
            self.s1 += total
            self.s2 += squares
        self.n_live += part.n_live
        for name, v in part.cols.items():
            self.cols.setdefault(name, []).append(v)


class Gathered:
    """The sites of a scan gathered in order into a :class:`ScanResult`."""

    def __init__(self, concepts: list[str]) -> None:
        self.concepts = concepts
        self.tables: list[pd.DataFrame] = []
        self.pops: list[pd.DataFrame] = []
        self.pairs: dict[str, list[np.ndarray]] = {}
        self.forms: list[str] = []
        self.modalities: list[str] = []
        self.passes = 0
        self.screening: dict[str, tuple[int, list[int]]] = {}
        self.testing: dict[str, tuple[int, list[int]]] = {}
        self.cutoffs: dict[str, float] = {}
        self.skipped: list[str] = []

    def add(self, acc: SiteScan) -> None:
        """A site's gathered blocks (sites in scan order)."""
        site, design, s = acc.site, acc.design, acc.settings
        self.forms += [f for f in design.forms if f not in self.forms]
        self.modalities += [m for m in design.modalities if m not in self.modalities]
        self.screening[site] = (design.screening.n, [int(c) for c in design.screening.counts])
        self.testing[site] = (design.testing.n, [int(c) for c in design.testing.counts])
        if s.criterion and s.exact:
            self.cutoffs[site] = float(acc.cut)
        arr = {name: np.concatenate(v) for name, v in acc.cols.items()}
        self.tables.append(_site_table(site, acc.kind, design, arr, s.transform, s.criterion))
        for name in ("p_scr", "effect_scr", "z_scr", "p_test", "effect_test", "z_test", "exact_scr", "over_scr",
                     "exact_test", "over_test"):
            if name in arr:
                self.pairs.setdefault(name, []).append(arr[name])
        pop = design.stimuli[[c for c in ("index", "id", "concept", "form", "modality", "split") if c in design.stimuli]].copy()
        pop.insert(0, "site", site)
        pop["n_units"] = acc.n_live
        pop["population_sparseness"] = sparseness_from_sums(acc.s1, acc.s2, acc.n_live) if acc.n_live else np.nan
        self.pops.append(pop)

    def result(self) -> ScanResult:
        table = pd.concat(self.tables, ignore_index=True) if self.tables else pd.DataFrame()
        population = pd.concat(self.pops, ignore_index=True) if self.pops else pd.DataFrame()
        pairs = {name: np.concatenate(v) for name, v in self.pairs.items()}
        return ScanResult(table, population, self.concepts, self.forms, self.modalities, pairs, self.passes,
                          self.screening, self.testing, self.cutoffs, list(self.skipped))


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
