"""Invariance of a unit's concept tuning across forms and modalities.

All on the **testing** split (held out from the screening that picked the unit's
concept), for the unit's concept ``c``:

* **per form** ``f``: ROC AUC of ``c``'s stimuli of form ``f`` against the other
  concepts' stimuli of the same form, and its p-value against a label-shuffled null
  (the concept labels permuted within the form's stimuli, ``n_perm`` times; the
  same permutations for every unit, so the null is exact for each unit's own ties);
* **per modality** ``m``: the same AUC and null, plus the criterion's effect size
  (median of ``c``'s stimuli of modality ``m`` above the same-modality baseline mean
  by ``k`` SD) — a **multimodal** cell passes both for every modality;
* **leave-one-form-out**: for each form ``f``, the concept is chosen again on the
  screening stimuli of every other form (largest mean), then tested on the testing
  stimuli of form ``f`` (found on photos, still firing for drawings and names).

p-values are ``(1 + #{U_null >= U}) / (1 + n_perm)``.  They are computed for units
whose concept passed the screening effect size (the only ones that can become
cells); AUCs are computed for every live unit.
"""
from __future__ import annotations

import zlib

import numpy as np

from neuroprobe.analysis.design import Design, Subset
from neuroprobe.analysis.indices import auc_from_u, constant_baselines, group_medians, group_stats, midranks

_MAX_GATHER = 4_000_000  # elements of the [units, perms, group] gather kept at once


def smallest_first(r: np.ndarray, a: int) -> np.ndarray:
    """``np.argsort(r, axis=1)[:, :a]`` without sorting whole rows.

    A partition finds each row's ``a + 1`` smallest values and only they are sorted.  Where they
    are all distinct (random draws of 53 bits almost always are) the first ``a`` are exactly the
    argsort's; a row with a tie among them is argsorted in full, so even then it is the argsort's.
    """
    n = r.shape[1]
    if a + 1 >= n:
        return np.argsort(r, axis=1)[:, :a]
    part = np.argpartition(r, a, axis=1)[:, : a + 1]
    vals = np.take_along_axis(r, part, axis=1)
    order = np.argsort(vals, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    tied = (vals[:, 1:] == vals[:, :-1]).any(axis=1)
    if tied.any():
        idx[tied] = np.argsort(r[tied], axis=1)[:, : a + 1]
    return idx[:, :a]


class PermutationNull:
    """Label-shuffled null of the rank-sum ``U`` of a group of ``a`` stimuli within a subset.

    Parameters
    ----------
    n_perm
        Permutations.
    seed
        Base seed; the permutations of a subset depend only on (seed, subset name, sizes),
        so every block of units of a site sees the same null.
    """

    def __init__(self, n_perm: int = 1000, seed: int = 0) -> None:
        self.n_perm = int(n_perm)
        self.seed = int(seed)
        self._cache: dict[tuple[str, int, int], np.ndarray] = {}

    def draws(self, name: str, n: int, a: int) -> np.ndarray:
        """``[n_perm, a]`` random groups of ``a`` positions out of ``n`` (without replacement)."""
        key = (name, n, a)
        if key not in self._cache:
            ss = np.random.SeedSequence([self.seed, zlib.crc32(name.encode()), n, a])
            rng = np.random.default_rng(ss)
            self._cache[key] = smallest_first(rng.random((self.n_perm, n)), a).astype(np.intp)
        return self._cache[key]

    def pvalues(self, name: str, ranks: np.ndarray, U: np.ndarray, a: np.ndarray) -> np.ndarray:
        """p-value of each unit's observed ``U`` (row ``i`` of ``ranks``: mid-ranks within the subset).

        Parameters
        ----------
        name
            Subset name (keys the permutations).
        ranks
            ``[g, n]`` mid-ranks of the selected units within the subset.
        U
            ``[g]`` observed U of each unit's group.
        a
            ``[g]`` size of each unit's group.
        """
        g, n = ranks.shape
        out = np.full(g, np.nan)
        if self.n_perm <= 0:
            return out
        for size in np.unique(a):
            size = int(size)
            if size < 1 or size >= n:
                continue
            rows = np.flatnonzero((a == size) & np.isfinite(U))
            idx = self.draws(name, n, size)
            step = max(1, _MAX_GATHER // (self.n_perm * size))
            for lo in range(0, len(rows), step):
                r = rows[lo : lo + step]
                null = ranks[r][:, idx].sum(axis=2) - size * (size + 1) / 2.0  # [g', P]
                exceed = (null >= U[r, None] - 1e-9).sum(axis=1)
                out[r] = (1.0 + exceed) / (1.0 + self.n_perm)
        return out


def _pick(a: np.ndarray, col: np.ndarray) -> np.ndarray:
    """``a[i, col[i]]``."""
    return np.take_along_axis(a, col[:, None], axis=1)[:, 0]


def subset_auc(x: np.ndarray, sub: Subset, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AUC of each unit's concept within a subset.

    Returns
    -------
    auc, U, a, ranks
        ``[G]`` AUC and U of the unit's concept against the subset's other stimuli, ``[G]``
        size of that concept's group, and the ``[G, n]`` mid-ranks within the subset.
    """
    ranks, _ = midranks(x[:, sub.idx])
    U_all = ranks @ sub.onehot - sub.counts * (sub.counts + 1) / 2.0
    a = sub.counts[concept]
    U = np.where(a > 0, _pick(U_all, concept), np.nan)
    return auc_from_u(U, a, sub.n - a), U, a.astype(int), ranks


def invariance_block(x: np.ndarray, design: Design, concept: np.ndarray, sel: np.ndarray, null: PermutationNull,
                     k: float) -> dict[str, np.ndarray]:
    """Invariance statistics of a block of units for their concept (see module docstring).

    Parameters
    ----------
    x
        ``[G, n]`` responses of the block (the site's valid stimuli).
    design
        The site's design.
    concept
        ``[G]`` concept code of each unit.
    sel
        ``[G]`` units that get permutation p-values and leave-one-form-out.
    null
        The permutation null.
    k
        Effect-size threshold (SD) for the per-modality criterion.

    Returns
    -------
    dict
        ``auc_form, p_form, lofo_auc, lofo_p, lofo_same`` ``[G, F]``;
        ``auc_mod, p_mod, z_mod, effect_mod`` ``[G, M]`` (NaN where not computed).
    """
    G = x.shape[0]
    F, M = len(design.forms), len(design.modalities)
    out = {name: np.full((G, F), np.nan) for name in ("auc_form", "p_form", "lofo_auc", "lofo_p")}
    out["lofo_same"] = np.zeros((G, F), dtype=bool)
    for name in ("auc_mod", "p_mod", "z_mod"):
        out[name] = np.full((G, M), np.nan)
    out["effect_mod"] = np.zeros((G, M), dtype=bool)
    rows = np.flatnonzero(sel)
    for j, sub in enumerate(design.test_forms):
        auc, U, a, ranks = subset_auc(x, sub, concept)
        out["auc_form"][:, j] = auc
        if len(rows):
            out["p_form"][rows, j] = null.pvalues(sub.name, ranks[rows], U[rows], a[rows])
            # leave-one-form-out: choose the concept without form j, test it on form j
            other = design.screen_without_form[j]
            if other.n:
                xs = x[rows][:, other.idx].astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    means = (xs @ other.onehot) / other.counts
                means = np.where(other.counts > 0, means, -np.inf)
                chosen = np.argmax(means, axis=1)
                U_all = ranks[rows] @ sub.onehot - sub.counts * (sub.counts + 1) / 2.0
                a2 = sub.counts[chosen].astype(int)
                U2 = np.where(a2 > 0, _pick(U_all, chosen), np.nan)
                out["lofo_auc"][rows, j] = auc_from_u(U2, a2, sub.n - a2)
                out["lofo_p"][rows, j] = null.pvalues(sub.name, ranks[rows], U2, a2)
                out["lofo_same"][rows, j] = chosen == concept[rows]
    if M >= 2:
        for j, sub in enumerate(design.test_modalities):
            auc, U, a, ranks = subset_auc(x, sub, concept)
            out["auc_mod"][:, j] = auc
            if len(rows):
                out["p_mod"][rows, j] = null.pvalues(sub.name, ranks[rows], U[rows], a[rows])
                xs = x[rows][:, sub.idx].astype(np.float64)
                st = constant_baselines(xs, sub.groups, group_stats(xs, sub.onehot))
                med = group_medians(xs, sub.groups)
                c = concept[rows]
                mb, sb, md = _pick(st.mean_b, c), np.sqrt(_pick(st.var_b, c)), _pick(med, c)
                with np.errstate(invalid="ignore", divide="ignore"):
                    z = (md - mb) / sb
                out["z_mod"][rows, j] = np.where(np.isnan(z) & (md == mb), 0.0, z)
                out["effect_mod"][rows, j] = md > mb + k * sb
    return out
