"""Exact p-values of the one-sided Mann–Whitney (rank-sum) test under ties.

The null distribution
---------------------
A unit's responses to the ``n`` stimuli of a split are fixed; under the null the
concept labels are exchangeable, so the ``m`` stimuli of a concept are a uniformly
random ``m``-subset of the ``n`` stimuli (the *conditional* permutation null given
the unit's tie pattern; Lehmann 1975, ch. 1).  The test statistic is the concept's
sum of mid-ranks, and the exact p-value is

    p = #{m-subsets S : sum_{i in S} r_i >= observed} / C(n, m),

identical to enumerating every relabelling of the stimuli.  It is never below the
smallest attainable value ``1 / C(n, m)`` and, unlike the normal approximation, it
never under-states the evidence of heavily tied (mostly silent) units.

The algorithm: a deficit dynamic program over doubled mid-ranks
--------------------------------------------------------------
Doubled mid-ranks ``v`` are integers (divided by their greatest common divisor).
Sort them in decreasing order, ``v_1 >= ... >= v_n``, and walk the positions
``i = 1..n`` deciding, with the sequential hypergeometric probabilities
``(m - j) / (n - i + 1)``, whether position ``i`` is the ``(j+1)``-th chosen one.
Choosing it costs the *deficit* ``v_{j+1} - v_i >= 0``; the total deficit of a
subset is ``sum_{l<=m} v_l - sum_{i in S} v_i``, so

    p = P(total deficit <= d_obs),   d_obs = sum_{l<=m} v_l - observed.

Deficits only grow, so the program keeps the states ``(j, d)`` with
``d <= d_obs`` only, and it stops at the first position where even the ``m``-th
choice would exceed ``d_obs``.  Its cost is ``window x (m + 1) x (d_obs + 1)``
with ``window`` the positions within ``d_obs`` of the ``m``-th largest value:
tiny exactly where it matters (a p-value near the floor, where ``d_obs`` is
small — a perfectly selective unit has ``d_obs = 0``), large only in the bulk of
the distribution, where no multiple-comparison threshold can reach.  The program
carries probabilities (all <= 1), so there is no overflow of ``C(n, m)``; the
relative rounding error is a few ``n`` ulps.  Pairs of units and concepts of the
same concept size are processed together, vectorised over pairs.  The budget is
charged that full cost; the program itself updates only the states that can still
end within ``d_obs`` (:func:`_first_sources`), shifts whole rows of states by
slicing instead of gathering element by element, and gives rows of much smaller
deficits programs of their own (:func:`_parts`), none of which changes a p-value's
bits (:func:`_program` says why).

Which pairs get it (see :func:`exact_p` and :func:`neuroprobe.analysis.thresholds.exact_cutoff`)
--------------------------------------------------------------------------------------------------
Every pair whose asymptotic p is at or below the *cut-off*, and whose program costs at
most ``budget`` state updates.  The cut-off is derived from the largest threshold any
multiple-comparison family can apply to a pair (``fdr`` over every test with
``family="pairs"``; ``fdr / C`` with ``family="units"``, ``C`` the unit's concepts):
a pair whose asymptotic p is at or under it could be declared significant, so it must
get its exact p, which may be far larger (a mostly silent unit: asymptotic 0.015,
exact 0.035, with two concepts).  The cut-off never goes below :data:`EXACT_MARGIN`.
A pair above the cut-off keeps its asymptotic p, which is then above every threshold;
the approximation can also *understate* the evidence (heavily tied units), so such a
pair may be a missed discovery, never a false one.  Pairs over the budget (hundreds of
stimuli per concept in thousands, far from the support's edge) keep the asymptotic p
and are counted.
"""
from __future__ import annotations

import math

import numpy as np

#: The least cut-off: asymptotic p-values at or below it always get the exact p-value.  Not
#: needed for correctness (that needs the cut-off to reach the largest threshold that can
#: apply: :func:`neuroprobe.analysis.thresholds.exact_cutoff`); it keeps every p-value of the
#: earlier releases, which computed exact p at or below 0.01 only, unchanged.
EXACT_MARGIN = 1e-2
#: Most state updates (window x (m + 1) x (d_obs + 1)) spent on one pair.
EXACT_BUDGET = 20_000_000
#: Float64 working memory of one vectorised batch of pairs.
_BATCH_BYTES = 32 << 20


def doubled_ranks(ranks: np.ndarray) -> np.ndarray:
    """Mid-ranks times two, as exact integers (mid-ranks are multiples of 1/2)."""
    return np.rint(2.0 * np.asarray(ranks, dtype=np.float64)).astype(np.int64)


def smallest_p(n: int, m: int) -> float:
    """The smallest exact rank-sum p-value of ``m`` stimuli among ``n``: ``1 / C(n, m)``."""
    if m <= 0 or m >= n:
        return 1.0
    return float(math.exp(-(math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1))))


def _prepare(v: np.ndarray, obs2: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (decreasing), gcd-reduced doubled ranks, the observed deficit, and the window length."""
    vs = -np.sort(-v, axis=1)
    top = vs[:, :m].sum(axis=1)
    d_obs = top - obs2
    g = np.gcd.reduce(vs - vs[:, -1:], axis=1)
    g = np.gcd(g, np.maximum(d_obs, 0))
    g = np.where(g > 0, g, 1)
    vs = (vs - vs[:, -1:]) // g[:, None]  # differences are multiples of g, so deficits stay exact
    d_obs = d_obs // g
    # positions whose value is within d_obs of the m-th largest: later ones cannot be chosen
    window = (vs >= (vs[:, m - 1] - d_obs)[:, None]).sum(axis=1)
    return vs, d_obs, window


def program_cost(v: np.ndarray, obs2: np.ndarray, m: int) -> np.ndarray:
    """State updates the deficit program needs for each row (see the module docstring)."""
    _, d_obs, window = _prepare(v, obs2, m)
    return window.astype(np.float64) * (m + 1) * (np.maximum(d_obs, 0) + 1)


def rank_sum_exact(v: np.ndarray, obs2: np.ndarray, m: int) -> np.ndarray:
    """Exact upper-tail p-values ``P(R2 >= obs2)`` for rows of doubled mid-ranks.

    Parameters
    ----------
    v
        ``[B, n]`` doubled mid-ranks (integers) of ``B`` units over a split's stimuli.
    obs2
        ``[B]`` observed doubled rank sum of the concept's stimuli.
    m
        Number of the concept's stimuli (the same for every row).

    Returns
    -------
    ndarray
        ``[B]`` exact p-values under the conditional permutation null.
    """
    v = np.asarray(v, dtype=np.int64)
    obs2 = np.asarray(obs2, dtype=np.int64)
    B, n = v.shape
    if B == 0 or m <= 0 or m >= n:
        return np.ones(B)
    return _batched(*_prepare(v, obs2, m), m, n)


def _batched(vs: np.ndarray, d_obs: np.ndarray, window: np.ndarray, m: int, n: int) -> np.ndarray:
    """:func:`rank_sum_exact` of rows already through :func:`_prepare` (one concept's pairs)."""
    return _run(vs, d_obs, window, m, n, _sum_lengths(d_obs, m))


def _batches(d_obs: np.ndarray, m: int) -> list[np.ndarray]:
    """Rows (with ``d_obs >= 0``) in batches of similar deficits and bounded memory (the program
    holds ~3 arrays ``[rows, m + 1, d_obs + 1]``): sorted by deficit, cut greedily at ``_BATCH_BYTES``."""
    ok = np.flatnonzero(d_obs >= 0)
    order = ok[np.argsort(d_obs[ok], kind="stable")]
    out, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * (m + 1) * 3 * 8 * (int(d_obs[order[j]]) + 1) <= _BATCH_BYTES:
            j += 1
        out.append(order[i:j])
        i = j
    return out


def _sum_lengths(d_obs: np.ndarray, m: int) -> np.ndarray:
    """For each row of one concept's pairs, the length of the sum its p-value is read from.

    The p-value sums the program's probabilities of deficits ``0..d_obs`` in a row of zeros
    beyond, and numpy's pairwise sum groups its terms by that row's length, so the last bits
    depend on it.  The length is that of the row's batch when the pairs of one concept are
    batched by :func:`_batches`: the batch's largest deficit + 1 (what every release computed).
    """
    length = np.zeros(len(d_obs), dtype=np.int64)
    for rows in _batches(d_obs, m):
        length[rows] = int(d_obs[rows].max()) + 1
    return length


def _run(vs: np.ndarray, d_obs: np.ndarray, window: np.ndarray, m: int, n: int, length: np.ndarray) -> np.ndarray:
    """Exact p-values of any rows with the same ``m`` and ``n`` (pairs of several concepts at once).

    A row's p-value depends only on its own values, deficit and sum length (:func:`_program`), so
    rows of every concept of a size share programs: batches by memory (:func:`_batches`), each cut
    by deficit (:func:`_parts`).
    """
    out = np.ones(len(vs))
    out[d_obs < 0] = 0.0  # cannot happen for a real observation; kept for safety
    for rows in _batches(d_obs, m):
        for part in _parts(d_obs[rows], m):
            sub = rows[part]
            out[sub] = _program(vs[sub], d_obs[sub], int(window[sub].max()), m, n, length[sub])
    return out


#: State updates per position a split of a batch must save to pay for its own numpy calls.
_SPLIT_SAVING = 5_000


def _parts(d: np.ndarray, m: int, lo: int = 0, hi: int | None = None) -> list[slice]:
    """Runs of a batch's rows (sorted by deficit) that get a program each, sized to their own deficits.

    A batch's program spans deficits up to its largest; rows with much smaller deficits waste
    most of it.  The run is cut where that saves the most state updates per position,
    ``rows before the cut x (largest deficit - the deficit before the cut)`` times the states,
    as long as the saving pays for another pass of numpy calls; then each side likewise.  The
    p-values do not depend on the cut: a row's states up to its own deficit are the same in any
    program, and :func:`_program` sums them over the row's own length (:func:`_sum_lengths`).
    """
    hi = len(d) if hi is None else hi
    if hi - lo < 2:
        return [slice(lo, hi)]
    top = int(d[hi - 1]) + 1
    before = np.arange(1, hi - lo)                      # rows before a cut at lo + k
    saving = before * (top - (d[lo : hi - 1].astype(np.int64) + 1))
    k = int(np.argmax(saving))
    if saving[k] * (m + 1) < _SPLIT_SAVING:
        return [slice(lo, hi)]
    cut = lo + k + 1
    return _parts(d, m, lo, cut) + _parts(d, m, cut, hi)


def _first_sources(vs: np.ndarray, d_obs: np.ndarray, window: int, m: int, n: int) -> np.ndarray:
    """For each position ``i < window``, the lowest state ``j`` whose update at ``i`` can matter.

    State ``(t, d)`` after walking ``i'`` positions can still end in ``(m, <= d_obs)`` only if
    ``d + mindef(i', t) <= d_obs``, where ``mindef(i', t)`` is the least deficit the ``m - t``
    choices left can add: choose the next positions ``i', i' + 1, ...`` in a row (any later
    position has a smaller value, so a larger deficit, choice by choice):

        mindef(i', t) = sum_{l < m - t} (v[t + l] - v[i' + l])   (no such positions: infinite).

    ``mindef`` falls as ``t`` rises, so the states that matter after position ``i`` are
    ``t >= t_min`` with ``t_min`` the least ``t`` with ``mindef(i + 1, t) <= d_obs`` in some row
    of the batch; they are fed by the states ``j >= t_min - 1`` (a move) and ``j >= t_min``
    (staying), so the update at ``i`` may start at ``j = max(t_min - 1, 0)``.  Returns ``m`` where
    no state matters (the update is then skipped).
    """
    B = len(vs)
    S = np.zeros((B, n + 1), dtype=np.int64)
    np.cumsum(vs, axis=1, out=S[:, 1:])
    after = np.arange(1, window + 1)[:, None]                 # i' = i + 1
    t = np.arange(m + 1)[None, :]
    end = after + (m - t)                                     # one past the last position the choices use
    fits = end <= n
    end = np.minimum(end, n)
    lowest = np.full((window, m + 1), False)
    step = max(1, (1 << 22) // max(1, window * (m + 1)))     # rows per chunk: ~4M integers at once
    for a in range(0, B, step):
        Sa, d = S[a : a + step], d_obs[a : a + step]
        least = (Sa[:, m : m + 1] - Sa[:, : m + 1])[:, None, :] - (Sa[:, end] - Sa[:, after])  # [b, i, t]
        lowest |= (fits[None] & (least <= d[:, None, None])).any(axis=0)
    first = np.where(lowest.any(axis=1), lowest.argmax(axis=1), m + 1)
    return np.maximum(first - 1, 0)


def _program(vs: np.ndarray, d_obs: np.ndarray, window: int, m: int, n: int,
             length: np.ndarray | None = None) -> np.ndarray:
    """The deficit program for one batch (rows share ``m`` and ``n``).

    ``P[b, j, d]``: probability that ``j`` of the positions walked so far are chosen, with total
    deficit ``d``.  At position ``i`` every state ``(j, d)`` moves to ``(j + 1, d + inc[b, j])``
    with probability ``pick[j]`` and stays with ``skip[j] = 1 - pick[j]``:

        P'[j + 1, d] = P[j + 1, d] * skip[j + 1] + P[j, d - inc[j]] * pick[j]

    (the second term 0 where ``d < inc[j]``), two products and a sum per state, in this order:
    every p-value depends on that order only, never on how the states are stored or which
    other states are updated.  Each row of ``P`` has ``D`` zeros in front of its deficits
    0..D-1, so the shifted source ``P[j, d - inc]`` of a whole row is one slice (a strided window
    view, copied by one fancy index over ``[rows, states]``), with no per-element gather, clip or
    mask.  Only the states that can still reach ``(m, <= d_obs)`` are updated
    (:func:`_first_sources`), and the states ``j <= i`` (the others are not reached yet: zero);
    a state that can reach the end is only ever fed by states that can, so the ones left stale
    are never read into the answer.  ``P[m] * skip[m]`` is not formed: ``skip[m] = 1`` exactly.

    The answer sums ``P[m, d]`` over ``d <= d_obs`` in a row of zeros beyond, of each row's
    ``length`` (default ``D``, the largest deficit + 1; see :func:`_sum_lengths`), as numpy's
    pairwise sum does it for that length: the p-value of a row depends on its own values,
    deficit and length, never on the other rows of the program.
    """
    B = len(vs)
    D = int(d_obs.max()) + 1
    P = np.zeros((B, m + 1, 2 * D))
    P[:, 0, D] = 1.0
    body = P[:, :, D:]                                      # deficits 0..D-1; P[:, :, :D] stays 0
    shifted = np.lib.stride_tricks.sliding_window_view(P, D, axis=2)  # [B, m + 1, D + 1, D]: P[b, j, s:s + D]
    j = np.arange(m)
    each = np.arange(B)[:, None]
    # the (j+1)-th largest value is the reference of the (j+1)-th choice: choosing position i costs
    # inc = ref - v_i, read from the window starting at D - inc (0 for inc >= D: all zeros)
    start_at = D - vs[:, :m]
    first = _first_sources(vs, d_obs, window, m, n)
    for i in range(window):
        lo, hi = int(first[i]), min(i, m - 1)               # source states that matter
        if lo > hi:
            continue
        left = n - i
        pick = (m - j[lo : hi + 1]) / left                  # P(position i is chosen | j chosen so far)
        at = start_at[:, lo : hi + 1] + vs[:, i : i + 1]    # D - inc, [B, J]
        np.maximum(at, 0, out=at)
        np.minimum(at, D, out=at)
        moved = shifted[each, j[None, lo : hi + 1], at]     # [B, J, D] = P[b, j, d - inc]
        moved *= pick[None, :, None]
        body[:, lo : hi + 1, :] *= (1.0 - pick)[None, :, None]
        body[:, lo + 1 : hi + 2, :] += moved
    length = np.full(B, D) if length is None else np.asarray(length)
    out = np.empty(B)
    for size in np.unique(length):
        rows = np.flatnonzero(length == size)
        mass = np.zeros((len(rows), int(size)))
        upto = min(D, int(size))                            # beyond a row's own deficit: zeros either way
        mass[:, :upto] = body[rows, m, :upto]
        grid = np.arange(int(size))
        out[rows] = np.where(grid[None, :] <= d_obs[rows, None], mass, 0.0).sum(axis=1)
    return out


def exact_p(
    ranks: np.ndarray,
    onehot: np.ndarray,
    U: np.ndarray,
    p_asym: np.ndarray,
    *,
    want: np.ndarray | None = None,
    margin: float = EXACT_MARGIN,
    budget: float = EXACT_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace asymptotic rank-sum p-values by exact ones where they can matter.

    Parameters
    ----------
    ranks
        ``[G, n]`` mid-ranks of the split (from :func:`~neuroprobe.analysis.indices.midranks`).
    onehot
        ``[n, C]`` concept one-hot of the split.
    U
        ``[G, C]`` Mann–Whitney U of each concept's stimuli.
    p_asym
        ``[G, C]`` asymptotic one-sided p-values.
    want
        ``[G, C]`` pairs to consider (default: every finite pair); of those, the ones with
        ``p_asym <= margin`` and a program cost within ``budget`` are computed exactly.
    margin
        The cut-off on the asymptotic p (:func:`neuroprobe.analysis.thresholds.exact_cutoff`
        gives the one the concept-cell criterion needs; ``1.0``: every pair considered).
    budget
        See the module docstring.

    Returns
    -------
    p, exact, over
        ``[G, C]`` p-values (exact where ``exact``), the mask of exact ones, and the mask of
        pairs within the margin left asymptotic because their program exceeded the budget.
    """
    p = np.array(p_asym, dtype=np.float64, copy=True)
    exact = np.zeros(p.shape, dtype=bool)
    over = np.zeros(p.shape, dtype=bool)
    G, n = ranks.shape
    if G == 0 or n == 0:
        return p, exact, over
    n_c = onehot.sum(0).astype(np.int64)
    sel = np.isfinite(p) & (p <= margin)
    if want is not None:
        sel &= want
    if not sel.any():
        return p, exact, over
    some = np.flatnonzero(sel.any(axis=1))             # doubled ranks of these units only
    at = np.zeros(G, dtype=np.intp)
    at[some] = np.arange(len(some))
    v = doubled_ranks(ranks[some])
    todo: dict[int, list[tuple]] = {}                   # concept size -> the pairs of each concept of that size
    for c in np.flatnonzero(sel.any(axis=0)):
        m = int(n_c[c])
        if m <= 0 or m >= n:
            continue
        rows = np.flatnonzero(sel[:, c])
        # observed doubled rank sum: 2 (U + m (m + 1) / 2), an integer
        obs2 = np.rint(2.0 * U[rows, c] + m * (m + 1)).astype(np.int64)
        vs, d_obs, window = _prepare(v[at[rows]], obs2, m)  # row by row: the same for any set of rows
        cost = window.astype(np.float64) * (m + 1) * (np.maximum(d_obs, 0) + 1)  # as program_cost
        fits = cost <= budget
        over[rows[~fits], c] = True
        if fits.any():
            d = d_obs[fits]
            todo.setdefault(m, []).append((rows[fits], c, vs[fits], d, window[fits], _sum_lengths(d, m)))
    for m, parts in todo.items():  # the concepts of one size share programs
        got = _run(np.concatenate([t[2] for t in parts]), np.concatenate([t[3] for t in parts]),
                   np.concatenate([t[4] for t in parts]), m, n, np.concatenate([t[5] for t in parts]))
        at_part = np.cumsum([0] + [len(t[0]) for t in parts])
        for (rows, c, *_), lo, hi in zip(parts, at_part[:-1], at_part[1:]):
            # a probability: the program's sums of many terms can round a few ulps past 1 (an all-tied unit)
            p[rows, c] = np.minimum(got[lo:hi], 1.0)
            exact[rows, c] = True
    return p, exact, over
