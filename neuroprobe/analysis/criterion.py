"""The concept-cell criterion (after Quiroga et al. 2005): test, null, FDR family, confirmation.

For every live unit and every concept ``c``, on the **screening** split:

1. **effect**: the median response to ``c``'s stimuli exceeds the baseline (every other
   screening stimulus) mean by ``k`` baseline SDs (``k = 5``).  A baseline that is exactly
   constant (SD 0, e.g. a silent ReLU unit) has no SD scale: the criterion is then the strict
   inequality *median > the baseline's value*, on exact values, so a median tied with the
   baseline never passes (``z`` is ``+inf`` only for a median strictly above it, 0 for a tie).
2. **evidence**: the one-sided Mann–Whitney rank-sum test of ``c``'s stimuli against the
   baseline ("``c``'s responses are larger").  Null distribution: the **exact conditional
   permutation distribution** of the concept's mid-rank sum given the unit's tie pattern
   (every relabelling of the split's stimuli equally likely), computed by the deficit
   program of :mod:`neuroprobe.analysis.exact` for every pair whose normal-approximation p
   is at or below :func:`exact_cutoff` (the largest threshold step 3 can apply to it, and
   never below 0.01; column ``p_exact``); elsewhere, and with ``exact=False``, the normal
   approximation with tie and continuity correction (``p_asymptotic``).
3. **multiple comparisons** (``family``):

   ``"units"`` (default; hierarchical, Benjamini & Bogomolov 2014)
       each unit's concept p-values are combined by Bonferroni, ``p_u = C_u min_c p_uc``
       (valid under any dependence between a unit's concepts); Benjamini–Hochberg (or
       Benjamini–Yekutieli with ``method="by"``) at level ``fdr`` over the units of the
       recording (every site) selects ``R`` of ``M`` units; within a selected unit a concept
       is significant when ``C_u p_uc <= fdr R / M``.  Guarantee: the expected proportion of
       selected units with no responsive concept is <= ``fdr`` (BH: independent or positively
       dependent units; BY: any dependence), and the expected average, over selected units,
       of the within-unit error is <= ``fdr`` (Bonferroni within, at the selection-adjusted level).
   ``"pairs"``
       BH (or BY) at level ``fdr`` over all unit x concept tests of the recording.
       Guarantee: FDR over (unit, concept) claims under BH's dependence assumptions.

   For a lone discovery both need ``p <= fdr / (units x concepts)``; no pair is ever
   significant above :func:`largest_threshold` (``fdr / C`` for ``units``, ``fdr`` for ``pairs``).

A unit's **responsive concepts** (``concepts``, ``n_concepts``) are the concepts significant
in step 3 with the median above the baseline mean, whatever ``k`` is.  A unit is a
**candidate** (``is_candidate``) when exactly one concept is responsive and it also passes
the effect size; a unit driven by two concepts is labelled by ``n_concepts > 1`` and is never
a cell of one of them.  Each candidate is then tested again on the **testing** split (no
double dipping): the same effect size, and the exact rank-sum test corrected by BH (or BY)
over the family of candidates.  A unit is a **concept cell** (``is_cell``) when its concept
is confirmed.  Invariance and multimodality (see :mod:`neuroprobe.analysis.invariance`) are
properties of cells: ``invariant``, ``lofo_pass`` and ``multimodal`` are only ever true for cells.

:func:`design_check` states, before any test, the smallest p-value each stage a cell must pass
allows a perfectly selective unit (``1 / C(n, m)`` exact, or its normal approximation with
``exact=False``) against the threshold that stage needs — screening: the first discovery among
units x concepts; testing: confirming a lone candidate — and names the stage that fails;
:func:`power` answers "how many stimuli per concept for N units?".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import warnings

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from neuroprobe.analysis.exact import smallest_p
from neuroprobe.analysis.indices import perfect_p_asymptotic
from neuroprobe.analysis.parallel import run_scan
from neuroprobe.analysis.scan import ScanResult, as_recording
from neuroprobe.analysis.thresholds import FAMILIES, exact_cutoff, largest_threshold  # noqa: F401 (re-exported)
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


def significant(p: np.ndarray, fdr: float, method: str = "bh", family: str = "units") -> tuple[np.ndarray, np.ndarray]:
    """Which unit x concept tests are significant under the FDR ``family`` (see the module docstring).

    Parameters
    ----------
    p
        ``[units, concepts]`` one-sided p-values (NaN: no test, e.g. a dead unit).
    fdr, method
        Level and procedure (``bh`` or ``by``).
    family
        ``units`` (Bonferroni over a unit's concepts, BH over units, concepts within selected
        units at the selection-adjusted level) or ``pairs`` (BH over every test).

    Returns
    -------
    sig, q
        ``[units, concepts]`` significance, and the adjusted p-values: each pair's q-value
        (``pairs``), or each unit's q-value repeated over its concepts (``units``).
    """
    if family not in FAMILIES:
        raise NeuroprobeError(f"FDR family {family!r} is not one of {', '.join(FAMILIES)}.")
    p = np.asarray(p, dtype=np.float64)
    if family == "pairs":
        q = fdr_qvalues(p, method)
        return q <= fdr, q
    ok = np.isfinite(p)
    n_tests = ok.sum(axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_unit = np.where(n_tests > 0, np.minimum(1.0, n_tests * np.nanmin(np.where(ok, p, np.inf), axis=1)
                                                  if p.shape[1] else 1.0), np.nan)
    q_unit = fdr_qvalues(p_unit, method)
    selected = q_unit <= fdr
    R, M = int(selected.sum()), int(np.isfinite(p_unit).sum())
    level = fdr * R / M if M else 0.0
    if method == "by" and M:
        level /= float(np.sum(1.0 / np.arange(1, M + 1)))
    sig = selected[:, None] & ok & (n_tests[:, None] * np.where(ok, p, 2.0) <= level)
    return sig, np.broadcast_to(q_unit[:, None], p.shape).copy()


def concept_cells(
    rec: Recording | str | Path,
    k: float = 5.0,
    fdr: float = 0.05,
    *,
    method: str = "bh",
    family: str = "units",
    exact: bool = True,
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
    client: Any = None,
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
    family
        ``units`` (hierarchical: Bonferroni over a unit's concepts, FDR over units, then the
        concept within each selected unit) or ``pairs`` (FDR over every unit x concept test);
        see the module docstring for what each guarantees.
    exact
        Exact rank-sum p-values under the permutation null where they can matter (default), or
        the normal approximation everywhere (``False``).
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
        Scan on a local Dask cluster of this many single-threaded worker processes (0: one per
        core; needs ``dask[distributed]``); 1: in this process, without Dask.  Same table.
    client
        A ``distributed.Client`` (or a Dask scheduler's address) to scan on instead of ``jobs``;
        every worker must see the recording at the same path.  Same table.

    Returns
    -------
    DataFrame
        One row per unit.  Identity: ``site, unit, kind, n_stimuli, dead, transform``.
        Indices (all stimuli): ``mean:<concept>``, ``si, si_morcos, lifetime_sparseness,
        kurtosis``; ``pref_concept`` (largest screening mean) with ``d_prime, auc`` on the
        testing split.  Criterion: ``concept`` (the unit's concept), ``z`` (its screening
        effect in SDs), ``median, baseline_mean, baseline_sd, p`` (exact where ``p_exact``),
        ``p_asymptotic, q`` (the unit's q-value for ``family="units"``, the pair's for
        ``pairs``), ``d_prime_screen, auc_screen``, ``n_concepts`` and ``concepts`` (the
        responsive concepts: significant, median above the baseline mean), ``is_candidate``; ``z_test, p_test, q_test, d_prime_test, auc_test``,
        ``n_confirmed``, ``is_cell``.  Invariance (testing split): ``auc_form:<f>,
        p_form:<f>, n_forms, auc_form_min, p_form_max, invariant``; leave-one-form-out
        ``lofo_auc:<f>, lofo_p:<f>, lofo_auc_min, lofo_p_max, lofo_pass``; with two or more
        modalities ``auc_modality:<m>, p_modality:<m>, z_modality:<m>``; ``multimodal``.
        Settings, the sites left out because an unfinished recording holds none of their stimuli yet
        (``skipped_sites``, only then), the design check (:func:`design_check`), the counts of exact p-values and the
        cut-off below which they were computed (``exact_cutoff``, the largest over sites, and
        ``exact_cutoff_min``; see :func:`exact_cutoff`) are in ``DataFrame.attrs``.

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
    if family not in FAMILIES:
        raise NeuroprobeError(f"FDR family {family!r} is not one of {', '.join(FAMILIES)}.")
    recording = as_recording(rec)
    res = run_scan(recording, sites=sites, transform=transform, criterion=True, k=k, alpha=alpha, n_perm=n_perm,
                   seed=seed, labels=labels, quiet=quiet, read_bytes=read_bytes, block_units=block_units, exact=exact,
                   fdr=fdr, family=family, jobs=jobs, client=client)
    df = apply_criterion(res, fdr=fdr, method=method, alpha=alpha, family=family)
    pairs = res.pairs
    p_scr = pairs.get("p_scr", np.zeros((0, 0)))
    n_units = int(np.isfinite(p_scr).any(axis=1).sum()) if p_scr.size else 0
    df.attrs.update(
        recording=str(recording.path), subject=str(recording.attrs.get("subject")),
        init=str(recording.attrs.get("init")), battery=str(recording.attrs.get("battery")),
        k=k, fdr=fdr, method=method, family=family, exact=exact, alpha=alpha, n_perm=n_perm, transform=transform,
        seed=seed, n_tests=int(np.isfinite(p_scr).sum()), n_units_tested=n_units,
        n_exact=int(pairs["exact_scr"].sum()) if "exact_scr" in pairs else 0,
        n_over_budget=int(pairs["over_scr"].sum()) if "over_scr" in pairs else 0,
        n_exact_test=int(pairs["exact_test"].sum()) if "exact_test" in pairs else 0,
        concepts=list(res.concepts), forms=list(res.forms), modalities=list(res.modalities),
        passes=res.passes,
        design=design_check(res.screening, n_units, len(res.concepts), fdr=fdr, method=method,
                            testing=res.testing, exact=exact),
    )
    if res.skipped:  # an unfinished recording: sites none of whose stimuli it holds yet
        df.attrs["skipped_sites"] = list(res.skipped)
    if exact and res.cutoffs:
        df.attrs.update(exact_cutoff=max(res.cutoffs.values()), exact_cutoff_min=min(res.cutoffs.values()))
    return df


def _harmonic(m: int) -> float:
    return float(np.sum(1.0 / np.arange(1, m + 1))) if m > 0 else 1.0


def first_threshold(n_units: int, n_concepts: int, fdr: float = 0.05, method: str = "bh") -> float:
    """The p-value a first (lone) discovery needs: ``fdr / (units x concepts)`` (BY: also / H_M).

    The same for both families: BH's first step over ``M = units x concepts`` pairs, or
    Bonferroni over ``C`` concepts then BH's first step over the units.
    """
    M = max(1, int(n_units) * int(n_concepts))
    return fdr / M / (_harmonic(M) if method == "by" else 1.0)


def smallest_attainable_p(n: int, m: int, exact: bool = True) -> float:
    """A perfectly selective unit's p-value (``m`` concept stimuli above ``n - m`` others).

    ``exact``: ``1 / C(n, m)``, the smallest exact rank-sum p-value of any unit.  Otherwise its
    normal approximation for untied responses (what ``exact=False`` uses; see
    :func:`~neuroprobe.analysis.indices.perfect_p_asymptotic`).
    """
    return smallest_p(n, m) if exact else perfect_p_asymptotic(n, m)


def _stimuli_needed(threshold: float, n_concepts: int, exact: bool) -> int:
    """The fewest stimuli per concept in one split for a perfect unit's p to reach ``threshold``."""
    m = 1
    while smallest_attainable_p(n_concepts * m, m, exact) > threshold:
        m += 1
    return m


def power(n_units: int, n_concepts: int, *, fdr: float = 0.05, method: str = "bh",
          screening_fraction: float = 0.5, exact: bool = True) -> int:
    """Stimuli per concept a battery needs so that one perfectly selective unit can be found.

    A perfectly selective unit (every one of its concept's screening stimuli above every other
    screening stimulus) has the exact rank-sum p-value ``1 / C(n, m)``, the smallest any unit
    can have, with ``m`` screening stimuli per concept and ``n = n_concepts x m``.  It can be
    the first discovery among ``n_units`` units only when that p-value is at most
    :func:`first_threshold`, and it is confirmed only when its testing split's p-value can
    reach ``fdr`` (a lone candidate); both splits must be large enough.

    Parameters
    ----------
    n_units
        Live units tested (every site of the recording).
    n_concepts
        Concepts of the battery.
    fdr, method
        FDR level and procedure (``bh`` or ``by``).
    screening_fraction
        Fraction of each concept's stimuli in the screening split (the rest confirm).
    exact
        Exact p-values (default), or the normal approximation (``exact=False``), whose
        perfect unit needs more stimuli.

    Returns
    -------
    int
        The smallest number of stimuli per concept (both splits together).

    Examples
    --------
    >>> power(10_000, 8)   # 6 screening + 6 testing stimuli per concept
    12
    """
    if n_units < 1 or n_concepts < 2:
        raise NeuroprobeError("power needs at least one unit and two concepts.")
    if not 0 < screening_fraction < 1:
        raise NeuroprobeError(f"screening_fraction must be between 0 and 1, not {screening_fraction}.")
    m_scr = _stimuli_needed(first_threshold(n_units, n_concepts, fdr, method), n_concepts, exact)
    m_test = _stimuli_needed(fdr, n_concepts, exact)
    return int(max(np.ceil(m_scr / screening_fraction - 1e-9), np.ceil(m_test / (1 - screening_fraction) - 1e-9)))


def _most_units(p_floor: float, n_units: int, n_concepts: int, fdr: float, method: str) -> int:
    """About how many units a screening floor allows (0: not even one)."""
    fewer = int(fdr / (n_concepts * p_floor) / (_harmonic(n_units * n_concepts) if method == "by" else 1.0))
    if fewer < 1 and p_floor <= first_threshold(1, n_concepts, fdr, method):
        # BY's estimate above takes the harmonic number of all the units: search the largest count
        lo, hi = 1, 2
        while p_floor <= first_threshold(hi, n_concepts, fdr, method):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if p_floor <= first_threshold(mid, n_concepts, fdr, method) else (lo, mid)
        fewer = lo
    return fewer


def _floors(split: dict[str, tuple[int, list[int]]], exact: bool,
            used: dict[str, list[bool]] | None = None) -> tuple[float, float, int, int, int] | None:
    """``(worst floor, best floor, fewest stimuli, fewest and most per concept)`` of one split.

    Concepts are those with stimuli in the split, or, with ``used``, those marked there (a used
    concept with no stimuli in the split has floor 1: it cannot pass).
    """
    rows = []
    for site, (n, counts) in split.items():
        wanted = [c > 0 for c in counts] if used is None else used.get(site, [False] * len(counts))
        rows += [(smallest_attainable_p(n, c, exact) if c > 0 else 1.0, n, c) for c, w in zip(counts, wanted) if w]
    if used is not None:  # sites screened but missing from the split
        rows += [(1.0, 0, 0) for site in used if site not in split and any(used[site])]
    if not rows:
        return None
    fl = [r[0] for r in rows]
    per = [r[2] for r in rows]
    return max(fl), min(fl), min(r[1] for r in rows), min(per), max(per)


def design_check(screening: dict[str, tuple[int, list[int]]], n_units: int, n_concepts: int, *,
                 fdr: float = 0.05, method: str = "bh", testing: dict[str, tuple[int, list[int]]] | None = None,
                 exact: bool = True) -> dict[str, object]:
    """Can a lone perfectly selective unit pass every stage a concept cell must pass?

    The stages, each with the smallest p-value the battery allows a perfectly selective unit
    (:func:`smallest_attainable_p`: exact ``1 / C(n, m)``, or its normal approximation when
    ``exact=False``, the p-values then actually used):

    * ``screening``: the first discovery among ``n_units x n_concepts`` tests needs
      :func:`first_threshold`; fewer units or more screening stimuli help.
    * ``testing`` (confirmation): a lone candidate is confirmed when its testing p is at most
      ``fdr`` (BH or BY over one candidate); only more testing stimuli help.  A concept with
      screening but no testing stimuli can never be confirmed.

    The effect size never stops a perfectly selective unit (its concept can lie any distance
    above the rest), so the p-values decide.

    Parameters
    ----------
    screening, testing
        Site -> (stimuli of the split, stimuli per concept), as
        :func:`~neuroprobe.analysis.scan.scan` reports; without ``testing`` only screening is checked.
    n_units, n_concepts
        Live units tested and concepts.
    fdr, method
        FDR level and procedure.
    exact
        Whether the p-values are exact (default) or the normal approximation.

    Returns
    -------
    dict
        ``n_screening, per_concept`` (the smallest over sites), ``p_floor`` (for the concept with
        the fewest screening stimuli; the best *every* concept can reach), ``p_floor_best`` (for
        the concept with the most), ``threshold`` (what the first discovery needs),
        ``ok_screening``; with ``testing`` also ``n_testing, per_concept_test, p_floor_test,
        threshold_test, ok_testing``; ``ok`` (every stage), ``failing`` (the stages that fail, in
        order), ``null`` (``exact`` or ``asymptotic``), ``needed_per_concept`` (stimuli per
        concept in both splits that would make it possible, from :func:`power`),
        ``needed_screening`` and ``needed_testing`` (per split), and ``message`` (one line per
        stage, then one per failing stage saying what would fix it).
    """
    none = dict(ok=True, failing=[], message="design: no screening stimuli")
    scr = _floors(screening, exact) if screening and n_concepts >= 1 else None
    if scr is None:
        return none
    p_floor, p_best, n, m_lo, m_hi = scr
    thr = first_threshold(max(1, n_units), n_concepts, fdr, method)
    ok_scr = p_floor <= thr
    per = f"{m_lo}" if m_lo == m_hi else f"{m_lo}-{m_hi}"
    how = ("exact rank-sum, a perfectly selective unit" if exact else
           "normal approximation as with --asymptotic, a perfectly selective unit with untied responses")
    lines = [f"design: {n} screening stimuli, {per} per concept: the smallest attainable p is {p_floor:.2g} "
             f"({how}); the first discovery needs p <= {thr:.2g} "
             f"({method.upper()} {fdr:g} over {n_units} units x {n_concepts} concepts)"]
    out: dict[str, object] = dict(n_screening=n, per_concept=m_lo, p_floor=p_floor, p_floor_best=p_best,
                                  threshold=thr, ok_screening=ok_scr, null="exact" if exact else "asymptotic")
    failing = [] if ok_scr else ["screening"]
    used = {site: [c > 0 for c in counts] for site, (_, counts) in screening.items()}
    test = _floors(testing, exact, used) if testing is not None else None
    if test is not None:
        p_test, _, n_test, t_lo, t_hi = test
        ok_test = p_test <= fdr
        out.update(n_testing=n_test, per_concept_test=t_lo, p_floor_test=p_test, threshold_test=float(fdr),
                   ok_testing=ok_test)
        lines.append(f"design: {n_test} testing stimuli, {t_lo if t_lo == t_hi else f'{t_lo}-{t_hi}'} per concept: "
                     f"the smallest attainable p is {p_test:.3g}; confirming a lone candidate needs p <= {fdr:g} "
                     f"({method.upper()} {fdr:g} over the candidates)")
        if not ok_test:
            failing.append("testing")
    out.update(ok=not failing, failing=failing)
    if n_concepts >= 2:
        out["needed_per_concept"] = power(max(1, n_units), n_concepts, fdr=fdr, method=method, exact=exact)
        out["needed_screening"] = _stimuli_needed(thr, n_concepts, exact)
        out["needed_testing"] = _stimuli_needed(fdr, n_concepts, exact)
    if n_concepts < 2:
        lines.append("design: a concept can only be tested against others: the battery needs at least two concepts")
    elif "screening" in failing:
        fewer = _most_units(p_floor, n_units, n_concepts, fdr, method)
        units = (f"or test fewer units (--sites; at most about {fewer}) or fewer concepts" if fewer >= 1 else
                 f"no number of units helps (even a single unit needs p <= "
                 f"{first_threshold(1, n_concepts, fdr, method):.2g}): only more stimuli per concept do")
        lines.append(f"design: a perfectly selective unit could NOT pass the screening stage: give each concept at "
                     f"least {out.get('needed_per_concept')} stimuli (both splits), {out.get('needed_screening')} of "
                     f"them screening{'; ' if fewer < 1 else ', '}{units}" + _exact_hint(exact, screening, None, thr))
    if "testing" in failing and n_concepts >= 2:
        lines.append(f"design: a perfectly selective unit could NOT pass the testing stage (confirmation on the "
                     f"testing split): give each concept at least {out.get('needed_testing')} testing stimuli; "
                     f"the number of units does not matter there" + _exact_hint(exact, testing, used, fdr))
    out["message"] = "\n".join(lines)
    return out


def _exact_hint(exact: bool, split: dict[str, tuple[int, list[int]]] | None, used: dict[str, list[bool]] | None,
                threshold: float) -> str:
    """With the normal approximation, say when exact p-values alone would pass the stage."""
    floors = None if exact or split is None else _floors(split, True, used)
    if floors is None or floors[0] > threshold:
        return ""
    return f"; or use exact p-values (drop --asymptotic: their floor here is {floors[0]:.2g})"


def apply_criterion(res: ScanResult, *, fdr: float, method: str, alpha: float, family: str = "units") -> pd.DataFrame:
    """Turn a criterion scan into the final table (FDR family, responsive concepts, confirmation, flags)."""
    df = res.table.copy()
    if df.empty:
        return df
    concepts = np.array(res.concepts, dtype=object)
    best = np.array([res.concepts.index(c) if isinstance(c, str) else 0 for c in df["concept"]], dtype=np.intp)
    rows = np.arange(len(df))
    p_scr, eff_scr = res.pairs["p_scr"], res.pairs["effect_scr"]
    sig, q_scr = significant(p_scr, fdr, method, family)
    with np.errstate(invalid="ignore"):
        responsive = sig & (res.pairs["z_scr"] > 0)
    n_resp = responsive.sum(1)
    df["q"] = q_scr[rows, best]
    df["n_concepts"] = n_resp
    names = np.full(len(df), "", dtype=object)
    for u in np.flatnonzero(n_resp):
        names[u] = ";".join(concepts[responsive[u]])
    df["concepts"] = names
    # one responsive concept, which also passes the effect size (it is then the unit's concept)
    passed = responsive & eff_scr & (n_resp == 1)[:, None]
    df["is_candidate"] = passed[rows, best]
    # confirmation on the testing split: the family is every candidate
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
             "lofo_pass", "z", "p", "p_exact", "p_asymptotic", "q", "z_test", "p_test", "q_test", "n_concepts", "concepts", "n_confirmed",
             "si", "si_morcos", "d_prime", "auc", "d_prime_screen", "auc_screen", "d_prime_test", "auc_test",
             "lifetime_sparseness", "kurtosis", "pref_concept", "median", "baseline_mean", "baseline_sd",
             "n_stimuli", "transform", "n_forms", "auc_form_min", "p_form_max", "lofo_auc_min", "lofo_p_max",
             "n_modalities", "p_modality_max", "effect_all_modalities"]
    head = [c for c in first if c in df.columns]
    rest = [c for c in df.columns if c not in head]
    rest = sorted([c for c in rest if not c.startswith("mean:")], key=lambda c: (c.split(":")[0], c)) + \
        [c for c in rest if c.startswith("mean:")]
    return df[head + rest]


def responsive_units(cells: pd.DataFrame, k: float | None = None) -> pd.Series:
    """Quiroga's *responsive* units: a significant response to at least one concept.

    A live unit whose concept (``concept``, the criterion's choice) is one of its responsive
    concepts (significant in the FDR family, median above the baseline mean) and passes the
    effect size (median above the baseline mean by ``k`` SD; ``k`` from the table's settings
    unless given).  Unlike a candidate, it may answer to several concepts; every candidate is
    responsive.

    Returns
    -------
    Series
        Boolean, aligned with ``cells``.
    """
    k = float(cells.attrs.get("k", 5.0) if k is None else k)
    if cells.empty:
        return pd.Series(False, index=cells.index)
    listed = [isinstance(c, str) and isinstance(cs, str) and c in cs.split(";")
              for c, cs in zip(cells["concept"], cells["concepts"])]
    effect = cells["median"] > cells["baseline_mean"] + k * cells["baseline_sd"]
    return (~cells["dead"].astype(bool)) & pd.Series(listed, index=cells.index) & effect.fillna(False).astype(bool)


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
    """Write a cells table as CSV or Parquet (by the file's suffix), atomically, with its provenance sidecar.

    CSV text cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab,
    carriage return first) are written with a leading ``'``; :func:`load_cells` removes it.
    """
    from neuroprobe.output import atomic_path, staged_outputs, write_csv, write_text

    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".pq", ".csv", ".tsv"):
        raise NeuroprobeError(f"cannot write {out}: use a .csv or .parquet file name.")
    with staged_outputs():  # the table and its sidecar appear together, complete, or not at all
        if out.suffix.lower() in (".parquet", ".pq"):
            frame = cells.copy()
            frame.attrs = {k: v for k, v in cells.attrs.items() if isinstance(v, (str, int, float, bool, list))}
            with atomic_path(out) as tmp:
                frame.to_parquet(tmp, index=False)
        else:  # text cells escaped against spreadsheet formulas; load_cells gives them back
            write_csv(cells, out)
        # where the table came from (recording, subject, init, battery): `neuroprobe lesion --cells` reads it
        meta = {k: cells.attrs[k] for k in ("recording", "subject", "init", "battery") if k in cells.attrs}
        if meta:
            import json

            write_text(Path(str(out) + ".json"), json.dumps(meta, indent=1))
    return out


def load_cells(path: str | Path) -> pd.DataFrame:
    """Read a cells table written by :func:`save_cells` (or ``neuroprobe cells --out``)."""
    path = Path(path)
    if not path.exists():
        raise NeuroprobeError(f"{path} does not exist; write it with `neuroprobe cells REC.h5 --out {path.name}`.")
    if path.is_dir() or path.suffix.lower() not in (".parquet", ".pq", ".csv", ".tsv"):
        raise NeuroprobeError(f"{path} is not a cells table; give the .csv or .parquet written by `neuroprobe cells --out`.")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            from neuroprobe.output import read_csv

            table = read_csv(path)
    except Exception as err:  # noqa: BLE001 - any parser error is a bad file
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NeuroprobeError(f"{path} cannot be read as a cells table ({text}).") from None
    missing = [c for c in ("site", "unit", "concept", "is_cell", "z") if c not in table.columns]
    if missing:
        raise NeuroprobeError(f"{path} is not a cells table: it lacks the column(s) {', '.join(missing)}.")
    return table
