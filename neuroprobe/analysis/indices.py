"""Per-unit indices, vectorised over a block of units.

Every function takes responses as ``x[units, stimuli]`` (one row per unit) and
works on all units of the block at once; no Python loop over units.  These are the
numeric kernels under the scan (:mod:`neuroprobe.analysis.scan`); the public drivers
:func:`~neuroprobe.analysis.descriptive.unit_indices` and
:func:`~neuroprobe.analysis.descriptive.population_sparseness` stream a recording through them.

Signed activations
------------------
Selectivity indices and sparseness assume non-negative firing rates; network
activations are signed (GELU's negative lobe, the residual stream).  They are
computed on an explicit non-negative transform, recorded in the output column
``transform``:

``shift`` (default)
    ``r = x - min_stimuli(x)``: each unit's least response becomes zero.  Keeps the
    negative lobe's information, and every index becomes invariant to a unit's
    offset.  For post-ReLU units that ever reach zero it is the identity.
``clip``
    ``r = max(x, 0)``: what a rectifying readout would see.  Units that are
    negative for every stimulus become silent (and dead, if constant at zero).

d', AUC, kurtosis and the concept-cell criterion use the raw responses (they are
invariant to an offset anyway).

Definitions (``mu_c``: mean response to concept ``c``; ``r``: transformed responses)
-----------------------------------------------------------------------------------
* selectivity index ``(max_c mu_c - mean_c mu_c) / (max_c mu_c + mean_c mu_c)`` on ``r``;
* Morcos' SI ``(mu_max - mu_rest) / (mu_max + mu_rest)`` on ``r``, ``mu_rest`` the mean of the
  other concepts' means (Morcos et al. 2018);
* d' ``(mu_c - mu_b) / sqrt((var_c + var_b) / 2)`` (``b``: every other stimulus, ddof=1;
  with one stimulus of ``c``, ``var_c`` is unknown and ``sqrt(var_b)`` is the denominator);
* ROC AUC ``U / (n_c n_b)`` with the Mann–Whitney ``U`` from mid-ranks (ties count 1/2);
* lifetime sparseness (Vinje & Gallant 2000) ``(1 - (sum r / n)^2 / (sum r^2 / n)) / (1 - 1/n)``
  over stimuli; population sparseness is the same over the units of a site, per stimulus;
* kurtosis: excess kurtosis over stimuli (Fisher, biased moments, as ``scipy.stats.kurtosis``).

Dead units (constant over the stimuli, or non-finite) get NaN indices and are left
out of every statistic and every multiple-comparison family.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import ndtr

TRANSFORMS = ("shift", "clip")


# ---------------------------------------------------------------- transforms
def nonneg(x: np.ndarray, transform: str = "shift") -> np.ndarray:
    """The non-negative transform of responses ``x[units, stimuli]`` (see module docstring)."""
    if transform == "shift":
        return x - x.min(axis=1, keepdims=True)
    if transform == "clip":
        return np.maximum(x, 0.0)
    raise ValueError(f"transform must be one of {TRANSFORMS}, not {transform!r}")


def dead_units(x: np.ndarray) -> np.ndarray:
    """Units that are constant over the stimuli (never fire, or fire the same for all) or non-finite."""
    if x.shape[1] == 0:
        return np.ones(x.shape[0], dtype=bool)
    finite = np.isfinite(x).all(axis=1)
    with np.errstate(invalid="ignore"):
        constant = x.max(axis=1) == x.min(axis=1)
    return ~finite | constant


# ---------------------------------------------------------------- class statistics
@dataclass
class GroupStats:
    """Per unit and concept: the concept's stimuli ``c`` against every other stimulus ``b`` of a subset."""

    n_c: np.ndarray     # [C]
    n_b: np.ndarray     # [C]
    mean_c: np.ndarray  # [G, C]
    var_c: np.ndarray   # [G, C] (ddof=1; NaN when n_c < 2)
    mean_b: np.ndarray  # [G, C]
    var_b: np.ndarray   # [G, C] (ddof=1)


def group_stats(x: np.ndarray, onehot: np.ndarray) -> GroupStats:
    """Means and variances of each concept's stimuli and of the rest, for every unit (two matrix products)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    n_c = onehot.sum(0)
    n_b = n - n_c
    m = x.mean(axis=1, keepdims=True) if n else np.zeros((x.shape[0], 1))
    y = x - m
    y2 = y * y
    s_c, q_c = y @ onehot, y2 @ onehot
    s, q = y.sum(1, keepdims=True), y2.sum(1, keepdims=True)
    del y, y2
    s_b, q_b = s - s_c, q - q_c
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = s_c / n_c + m
        mean_b = s_b / n_b + m
        var_c = np.where(n_c > 1, (q_c - s_c * s_c / n_c) / (n_c - 1), np.nan)
        var_b = np.where(n_b > 1, (q_b - s_b * s_b / n_b) / (n_b - 1), np.nan)
    # sums of squares lose ~n ulps to cancellation: a group that is constant (e.g. a silent
    # ReLU baseline) must get variance 0, not 1e-17, so that its z-score is infinite, not 1e8
    tol = 64 * n * np.finfo(np.float64).eps * (q / max(n, 1) + m * m)
    var_c = np.where(var_c <= tol, 0.0, var_c)
    var_b = np.where(var_b <= tol, 0.0, var_b)
    return GroupStats(n_c, n_b, mean_c, var_c, mean_b, var_b)


def constant_baselines(x: np.ndarray, groups: Sequence[np.ndarray], st: GroupStats,
                       extremes: tuple[np.ndarray, np.ndarray] | None = None) -> GroupStats:
    """``st`` with the baseline of every (unit, concept) whose baseline is exactly constant made exact.

    A baseline (every stimulus of the subset outside the concept) whose responses are all equal
    has variance exactly 0 and mean exactly that value; sums of squares would leave it a few
    ulps off (a mean of -1e-17 for a silent unit, so that a median of 0 would sit "infinitely
    many SDs" above it).  Constancy is decided on the exact values (min == max), not on a
    tolerance.  Non-constant baselines are left as they are.  ``extremes``: each group's least
    and largest response (``[G, C]``, as :func:`group_order_stats` gives them), if known.
    """
    G, C = st.mean_b.shape
    if G == 0 or C == 0:
        return st
    if extremes is not None:
        gmin, gmax = extremes
    else:
        gmin = np.full((G, C), np.inf)
        gmax = np.full((G, C), -np.inf)
        for c, idx in enumerate(groups):
            if len(idx):
                xc = x[:, idx]
                gmin[:, c] = xc.min(axis=1)
                gmax[:, c] = xc.max(axis=1)
    bmin, bmax = _excluding(gmin, np.minimum, np.inf), _excluding(gmax, np.maximum, -np.inf)
    const = (bmin == bmax) & np.isfinite(bmin)
    mean_b = np.where(const, bmin, st.mean_b)
    var_b = np.where(const, 0.0, np.where(st.var_b > 0, st.var_b, np.nan))
    # a non-constant baseline whose variance rounded to 0: recompute it directly (rare)
    redo = ~const & ~(var_b > 0) & np.isfinite(bmin)
    if redo.any():
        for g, c in zip(*np.nonzero(redo)):
            rest = np.concatenate([groups[j] for j in range(C) if j != c and len(groups[j])])
            var_b[g, c] = np.var(np.asarray(x[g, rest], dtype=np.float64), ddof=1)
    var_b = np.where(np.isnan(var_b), st.var_b, var_b)
    return GroupStats(st.n_c, st.n_b, st.mean_c, st.var_c, mean_b, var_b)


def _excluding(a: np.ndarray, op, fill: float) -> np.ndarray:
    """``out[:, c] = op`` over every column of ``a`` but ``c`` (prefix/suffix scans)."""
    G, C = a.shape
    pad = np.full((G, 1), fill)
    pre = op.accumulate(np.concatenate([pad, a[:, :-1]], axis=1), axis=1)
    suf = op.accumulate(np.concatenate([pad, a[:, :0:-1]], axis=1), axis=1)[:, ::-1]
    return op(pre, suf)


def class_means(x: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """``[G, C]`` mean response of each unit to each concept (NaN for concepts without stimuli)."""
    n_c = onehot.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(x, dtype=np.float64) @ onehot) / n_c


def group_medians(x: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """``[G, C]`` median response of each unit to each group of stimuli (a loop over groups, not units)."""
    out = np.full((x.shape[0], len(groups)), np.nan)
    sizes = np.array([len(g) for g in groups])
    # groups of equal size are stacked and reduced in one call: [G, n_groups, size]
    for size in np.unique(sizes[sizes > 0]):
        cs = np.flatnonzero(sizes == size)
        cols = np.concatenate([groups[c] for c in cs])
        out[:, cs] = np.median(x[:, cols].reshape(x.shape[0], len(cs), int(size)), axis=2)
    return out


def group_order_stats(x: np.ndarray, groups: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, least and largest response of each unit to each group: three ``[G, C]`` float64 arrays.

    The same numbers as :func:`group_medians` and ``min`` / ``max`` of ``x`` as float64 (NaN,
    ``+inf``, ``-inf`` for an empty group).  For float32 rows without NaN or -0.0 (the
    responses) one sort per row does it: the 64-bit keys ``group << 32 | order key of the value``
    (:func:`_float32_keys`) put each group's values in order at fixed positions, the least first,
    the middle one(s) at its centre; the median is the middle value, or the mean ``(a + b) / 2``
    of the two middle ones in float64, as ``np.median`` computes it.  Other rows go through
    ``np.median``, ``min`` and ``max`` (with -0.0 next to 0.0, which one a partition returns is
    its own business).
    """
    G, n = x.shape
    C = len(groups)
    med = np.full((G, C), np.nan)
    gmin = np.full((G, C), np.inf)
    gmax = np.full((G, C), -np.inf)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    if G == 0 or C == 0 or not sizes.any():
        return med, gmin, gmax
    keys = _float32_keys(x) if x.dtype == np.float32 else None
    slow = np.ones(G, dtype=bool) if keys is None else (x.view(np.int32) == np.int32(-(2**31))).any(axis=1)
    fast = np.flatnonzero(~slow)
    if len(fast):
        label = np.full(n, C, dtype=np.uint64)          # columns in no group sort last
        for c, idx in enumerate(groups):
            label[idx] = c
        words = keys[fast].astype(np.uint64)
        words |= label << np.uint64(32)
        words.sort(axis=1)
        start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        has = np.flatnonzero(sizes > 0)
        s, z = start[has], sizes[has]
        value = _float32_values(words[:, np.concatenate([s, s + z - 1, s + (z - 1) // 2, s + z // 2])].astype(np.uint32))
        k = len(has)
        least, most, a, b = value[:, :k], value[:, k : 2 * k], value[:, 2 * k : 3 * k], value[:, 3 * k :]
        ok = ~(np.isnan(least).any(axis=1) | np.isnan(most).any(axis=1))  # a NaN sorts first or last in its group
        slow[fast[~ok]] = True
        done = np.ix_(fast[ok], has)
        gmin[done], gmax[done] = least[ok], most[ok]
        med[done] = np.where(z % 2 == 1, a[ok], (a[ok] + b[ok]) / 2.0)
    rows = np.flatnonzero(slow)
    if len(rows):
        x64 = np.asarray(x[rows], dtype=np.float64)
        med[rows] = group_medians(x64, groups)
        for c, idx in enumerate(groups):
            if len(idx):
                gmin[rows, c] = x64[:, idx].min(axis=1)
                gmax[rows, c] = x64[:, idx].max(axis=1)
    return med, gmin, gmax


def d_prime(st: GroupStats) -> np.ndarray:
    """``[G, C]`` d' of each concept against the rest of the subset (see module docstring)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(st.n_c > 1, (st.var_c + st.var_b) / 2.0, st.var_b)
        return (st.mean_c - st.mean_b) / np.sqrt(pooled)


# ---------------------------------------------------------------- selectivity and sparseness
def selectivity_index(means_pos: np.ndarray) -> np.ndarray:
    """``(max - mean) / (max + mean)`` over the concept means (of the non-negative transform)."""
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        mx, mean = np.nanmax(means_pos, axis=1), np.nanmean(means_pos, axis=1)
        return (mx - mean) / (mx + mean)


def morcos_si(means_pos: np.ndarray) -> np.ndarray:
    """Morcos et al. (2018) ``(mu_max - mu_rest) / (mu_max + mu_rest)``, ``mu_rest`` = mean of the other concept means."""
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        present = np.isfinite(means_pos)
        k = present.sum(1)
        mx = np.nanmax(means_pos, axis=1)
        rest = (np.nansum(means_pos, axis=1) - mx) / (k - 1)
        out = (mx - rest) / (mx + rest)
    return np.where(k > 1, out, np.nan)


def lifetime_sparseness(r: np.ndarray) -> np.ndarray:
    """Vinje–Gallant sparseness of each row of non-negative ``r`` (over its columns)."""
    n = r.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        a = r.mean(axis=1) ** 2 / (r * r).mean(axis=1)
        return (1.0 - a) / (1.0 - 1.0 / n)


def sparseness_from_sums(s1: np.ndarray, s2: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Vinje–Gallant sparseness from ``sum r``, ``sum r^2`` and the count (streaming form)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (s1 / n) ** 2 / (s2 / n)
        return (1.0 - a) / (1.0 - 1.0 / n)


def kurtosis(x: np.ndarray) -> np.ndarray:
    """Excess kurtosis of each row (Fisher, biased), like ``scipy.stats.kurtosis(x, axis=1)``."""
    x = np.asarray(x, dtype=np.float64)
    y = x - x.mean(axis=1, keepdims=True)
    np.multiply(y, y, out=y)                            # y^2, in place
    m2 = y.mean(axis=1)
    np.multiply(y, y, out=y)                            # y^4 as (y^2)^2
    m4 = y.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return m4 / (m2 * m2) - 3.0


# ---------------------------------------------------------------- ranks and the rank-sum test
def midranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ranks of each row (1-based, ties averaged) and each row's tie term ``sum(t^3 - t)``.

    Equals ``scipy.stats.rankdata(x, axis=1)``; the tie term is what the Mann–Whitney
    variance needs.  Mid-ranks are unique (half-integers, exact in float64) and the tie term is a
    sum of integers, so any correct sort gives the same arrays: float32 rows (the responses) are
    sorted as 64-bit integer keys (:func:`_sorted_float32`, several times faster than an
    argsort), anything else (or a row with NaN) by ``np.argsort``.  In sorted order an element's
    mid-rank is its position + 1 unless it is in a run of equal values: only those runs (found
    from the elements equal to their predecessor) get their mean position.
    """
    G, n = x.shape
    ranks = np.empty((G, n))
    if n == 0 or G == 0:
        return ranks, np.zeros(G)
    keyed = _sorted_float32(x)
    if keyed is not None:
        vals, flat = keyed
    else:
        order = np.argsort(x, axis=1)
        vals = np.take_along_axis(x, order, axis=1)
        flat = order + (np.arange(G) * n)[:, None]
    out = ranks.reshape(-1)
    out[flat] = np.arange(1.0, n + 1.0)                 # position in sorted order + 1 ...
    tie = np.zeros(G)
    dup = np.flatnonzero(vals[:, 1:] == vals[:, :-1])   # ... but for runs of ties: elements equal to the one before
    if len(dup):
        dup += dup // (n - 1) + 1                       # flat positions in sorted [G, n] (never first in a row)
        cut = np.flatnonzero(np.diff(dup) != 1) + 1     # runs: consecutive duplicates
        start = dup[np.concatenate([[0], cut])] - 1     # each run's first element
        end = dup[np.concatenate([cut - 1, [len(dup) - 1]])]
        size = end - start + 1
        mid = (start % n) + (size + 1) / 2.0            # (first + last) / 2 + 1, positions 0-based
        where = flat.reshape(-1)
        out[where[start]] = mid
        out[where[dup]] = np.repeat(mid, size - 1)
        t = size.astype(np.float64)
        tie = np.bincount(start // n, weights=t * t * t - t, minlength=G)
    return ranks, tie


#: Keys of a float32 sort: the least and the largest key of a non-NaN value (-inf and +inf).
_KEY_LEAST, _KEY_MOST = 0x007FFFFF, 0xFF800000


def _float32_keys(x: np.ndarray) -> np.ndarray:
    """``uint32`` keys that sort as the float32 values do (-0.0 as +0.0, which it equals).

    A float32's bits with the sign bit set for a positive number and every bit flipped for a
    negative one sort as unsigned integers exactly as the floats do; a NaN's key falls outside
    ``[_KEY_LEAST, _KEY_MOST]`` (the keys of -inf and +inf).
    """
    bits = (x + np.float32(0.0)).view(np.int32)        # -0.0 + 0.0 = +0.0
    flip = bits >> 31                                   # -1 for a negative number, else 0
    flip |= np.int32(-(2**31))
    flip ^= bits
    return flip.view(np.uint32)


def _float32_values(keys: np.ndarray) -> np.ndarray:
    """The float32 values of :func:`_float32_keys` keys, as float64."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = keys ^ np.where(keys >> np.uint32(31) == 1, np.uint32(2**31), np.uint32(2**32 - 1))
    return bits.view(np.float32).astype(np.float64)


def _sorted_float32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each float32 row sorted, as ``(order keys, flat indices)``, or ``None`` (not float32, NaN, too large).

    The key of each value (:func:`_float32_keys`) goes in the high half of a 64-bit word and the
    element's flat index in the low half, so one integer sort of each row (vectorised, no index
    array to carry) gives the sorted order and, in the low halves, where each element came from.
    """
    G, n = x.shape
    if x.dtype != np.float32 or G * n >= 2**32:
        return None
    words = np.empty((G, n), dtype=np.uint64)
    halves = words.view(np.uint32).reshape(G, n, 2)
    lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves[..., hi] = _float32_keys(x)
    halves[..., lo] = np.arange(G * n, dtype=np.uint32).reshape(G, n)
    words.sort(axis=1)
    key = halves[..., hi]
    if (key[:, 0] < _KEY_LEAST).any() or (key[:, -1] > _KEY_MOST).any():  # a NaN sorts outside -inf..+inf
        return None
    return key, halves[..., lo].astype(np.intp)


def rank_sum(ranks: np.ndarray, tie: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Mann–Whitney test of each concept's stimuli against the rest, for every unit.

    Parameters
    ----------
    ranks, tie
        From :func:`midranks` over the subset's stimuli.
    onehot
        ``[n, C]`` concept one-hot of the subset.

    Returns
    -------
    U, p
        ``[G, C]`` U statistic of the concept's stimuli, and the p-value of "the concept's
        responses are greater" by the normal approximation with tie and continuity
        correction (``scipy.stats.mannwhitneyu(..., alternative="greater", method="asymptotic")``).
        NaN where the concept or the rest has no stimuli.
    """
    n = ranks.shape[1]
    n_c = onehot.sum(0)
    n_b = n - n_c
    U = ranks @ onehot - n_c * (n_c + 1) / 2.0
    mu = n_c * n_b / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(n_c * n_b / 12.0 * ((n + 1) - tie[:, None] / (n * (n - 1.0))))
        z = (U - mu - 0.5) / s
    p = ndtr(-z)
    p = np.where(s > 0, p, 1.0)  # every response tied: no evidence
    ok = (n_c > 0) & (n_b > 0)
    return np.where(ok, U, np.nan), np.where(ok, np.clip(p, 0.0, 1.0), np.nan)


def perfect_p_asymptotic(n: int, m: int) -> float:
    """The normal-approximation p of a perfectly selective unit with untied responses.

    ``m`` stimuli of a concept above the ``n - m`` others, every response distinct: the p-value
    :func:`rank_sum` gives it (tie and continuity correction), what ``exact=False`` (``--asymptotic``)
    uses where the exact floor is ``1 / C(n, m)``.  Ties below or inside the concept make the
    approximation smaller still (a binary unit), overstating the evidence.
    """
    if m <= 0 or m >= n:
        return 1.0
    ranks = np.arange(1.0, n + 1.0)[None, :]
    onehot = np.zeros((n, 1))
    onehot[n - m :, 0] = 1.0
    return float(rank_sum(ranks, np.zeros(1), onehot)[1][0, 0])


def auc_from_u(U: np.ndarray, n_c: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """ROC AUC ``U / (n_c n_b)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return U / (n_c * n_b)


class _quiet_nan:
    """Silence numpy's 'All-NaN slice' / 'Mean of empty slice' warnings for dead rows."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)
