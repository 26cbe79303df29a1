"""Analysis: every index against a direct scipy/numpy computation, unit by unit, on small arrays."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from neuroprobe.analysis import concept_cells, fdr_qvalues, population_sparseness, unit_indices
from neuroprobe.analysis.design import Design
from neuroprobe.analysis.indices import (
    class_means, d_prime, dead_units, group_medians, group_stats, kurtosis, lifetime_sparseness, midranks, morcos_si,
    nonneg, rank_sum, selectivity_index,
)
from neuroprobe.analysis.invariance import PermutationNull
from neuroprobe.analysis.synthetic import make_stimuli, write_recording
from neuroprobe.errors import NeuroprobeError


def relu_like(rng: np.random.Generator, G: int, n: int) -> np.ndarray:
    """Responses with heavy ties (rounded, many exact zeros) and a few continuous units."""
    x = np.maximum(np.round(rng.standard_normal((G, n)), 1), 0.0)
    x[: G // 3] = rng.standard_normal((G // 3, n))
    return x


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [5, 7, 3, 9])
    rng.shuffle(labels)
    x = relu_like(rng, 12, len(labels))
    x[5, labels == 2] += 3.0
    onehot = np.eye(4)[labels]
    return x, labels, onehot


def test_midranks_and_tie_term_match_scipy(small):
    x, _, _ = small
    ranks, tie = midranks(x)
    np.testing.assert_allclose(ranks, stats.rankdata(x, axis=1))
    for g in range(x.shape[0]):
        _, t = np.unique(x[g], return_counts=True)
        assert tie[g] == pytest.approx(float((t ** 3 - t).sum()))


def test_rank_sum_matches_mannwhitneyu(small):
    x, labels, onehot = small
    ranks, tie = midranks(x)
    U, p = rank_sum(ranks, tie, onehot)
    for g in range(x.shape[0]):
        for c in range(4):
            a, b = x[g, labels == c], x[g, labels != c]
            res = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic", use_continuity=True)
            assert U[g, c] == pytest.approx(res.statistic)
            if np.ptp(x[g]) > 0:
                assert p[g, c] == pytest.approx(res.pvalue, rel=1e-9, abs=1e-15)
            assert U[g, c] / (len(a) * len(b)) == pytest.approx(roc_auc_score(labels == c, x[g]))


def test_group_statistics_and_d_prime_match_numpy(small):
    x, labels, onehot = small
    st = group_stats(x, onehot)
    dp = d_prime(st)
    med = group_medians(x, [np.flatnonzero(labels == c) for c in range(4)])
    for g in range(x.shape[0]):
        for c in range(4):
            a, b = x[g, labels == c], x[g, labels != c]
            assert st.mean_c[g, c] == pytest.approx(a.mean())
            assert st.mean_b[g, c] == pytest.approx(b.mean())
            assert st.var_c[g, c] == pytest.approx(a.var(ddof=1), abs=1e-12)
            assert st.var_b[g, c] == pytest.approx(b.var(ddof=1), abs=1e-12)
            assert med[g, c] == np.median(a)
            expect = (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
            if np.isfinite(expect):
                assert dp[g, c] == pytest.approx(expect)


def test_d_prime_single_stimulus_uses_baseline_sd():
    x = np.array([[0.0, 1.0, 2.0, 3.0, 10.0]])
    onehot = np.eye(2)[[0, 0, 0, 0, 1]]
    dp = d_prime(group_stats(x, onehot))
    assert dp[0, 1] == pytest.approx((10.0 - 1.5) / np.std([0, 1, 2, 3], ddof=1))


@pytest.mark.parametrize("transform", ["shift", "clip"])
def test_selectivity_and_sparseness_match_direct_formulas(small, transform):
    x, labels, onehot = small
    r = nonneg(x, transform)
    means_pos = class_means(r, onehot)
    si, ms, ls, ku = selectivity_index(means_pos), morcos_si(means_pos), lifetime_sparseness(r), kurtosis(x)
    for g in range(x.shape[0]):
        rg = x[g] - x[g].min() if transform == "shift" else np.maximum(x[g], 0)
        mu = np.array([rg[labels == c].mean() for c in range(4)])
        top = mu.argmax()
        rest = np.delete(mu, top).mean()
        n = len(rg)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_allclose(si[g], (mu.max() - mu.mean()) / (mu.max() + mu.mean()), rtol=1e-12)
            np.testing.assert_allclose(ms[g], (mu[top] - rest) / (mu[top] + rest), rtol=1e-12)
            vg = (1 - (rg.sum() / n) ** 2 / ((rg ** 2).sum() / n)) / (1 - 1 / n)
            np.testing.assert_allclose(ls[g], vg, rtol=1e-12)
        np.testing.assert_allclose(ku[g], stats.kurtosis(x[g]), rtol=1e-10)


def test_dead_units_are_constant_or_nonfinite():
    x = np.array([[0.0, 0, 0], [1.0, 1, 1], [0.0, 1, 0], [np.nan, 1, 2]])
    assert dead_units(x).tolist() == [True, True, False, True]


@pytest.mark.parametrize("method", ["bh", "by"])
def test_fdr_matches_direct_step_up(method):
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=50), rng.uniform(0, 1e-3, size=10), [np.nan]])
    q = fdr_qvalues(p, method)
    ok = np.isfinite(p)
    ps = p[ok]
    m = len(ps)
    c = np.sum(1.0 / np.arange(1, m + 1)) if method == "by" else 1.0
    order = np.argsort(ps)
    raw = ps[order] * m * c / np.arange(1, m + 1)
    adj = np.minimum(1, np.minimum.accumulate(raw[::-1])[::-1])
    expect = np.empty(m)
    expect[order] = adj
    np.testing.assert_allclose(q[ok], expect)
    assert np.isnan(q[~ok]).all()


# ----------------------------------------------------------------- whole pipeline against a per-unit loop
@pytest.fixture
def recording(tmp_path):
    """Two sites: one with ties, dead units and planted tuning; one that did not fire for text stimuli."""
    rng = np.random.default_rng(7)
    st = make_stimuli(n_concepts=4, per_concept=16, forms=(("photo", "image"), ("drawing", "image"), ("text-name", "text")))
    n = len(st)
    codes = st["concept"].str[1:].astype(int).to_numpy()
    a = np.maximum(np.round(rng.standard_normal((n, 40)), 1), 0.0)
    a[:, 30:33] = 0.0            # never fire
    a[:, 33] = 1.5               # constant
    a[:, 0] += 4.0 * (codes == 1)  # a cell for c1
    a[:, 1] += 6.0 * (codes == 3) * (st["modality"] == "image").to_numpy()  # image-only for c3
    b = rng.standard_normal((n, 25)) + 5.0 * (codes == 2)[:, None] * (np.arange(25) == 4)
    b[(st["modality"] == "text").to_numpy()] = np.nan  # an image-tower site
    path = write_recording(tmp_path / "syn.h5", st, {"A": a, "B": b}, batch_size=5)
    stored = {"A": a.astype(np.float32).astype(np.float64), "B": b.astype(np.float32).astype(np.float64)}
    return path, st, stored


def reference_exact_p(v: np.ndarray, inside: np.ndarray) -> float:
    """Exact one-sided rank-sum p by the textbook count over all rank sums (a different algorithm
    from the pipeline's deficit program): counts[j, s] = subsets of j stimuli with doubled rank sum s."""
    r2 = np.rint(2 * stats.rankdata(v)).astype(int)
    m = int(inside.sum())
    counts = np.zeros((m + 1, int(r2.sum()) + 1))
    counts[0, 0] = 1.0
    for val in r2:
        counts[1:, val:] = counts[1:, val:] + counts[:-1, : counts.shape[1] - val]
    obs = int(r2[inside].sum())
    return float(counts[m, obs:].sum() / counts[m].sum())


def direct_table(x: np.ndarray, st: pd.DataFrame, k: float, exact: bool,
                 cutoff: float = 1e-2) -> tuple[list[dict], list[str]]:
    """The criterion statistics computed unit by unit with scipy (the slow reference); exact
    screening p where the asymptotic p is at most ``cutoff``, exact testing p everywhere."""
    valid = ~np.isnan(x).all(axis=1)
    x, st = x[valid], st[valid].reset_index(drop=True)
    concepts = list(dict.fromkeys(st["concept"]))
    rows = []
    for u in range(x.shape[1]):
        v = x[:, u]
        rec = dict(unit=u, dead=bool(np.ptp(v) == 0))
        for split in ("screening", "testing"):
            s = (st["split"] == split).to_numpy()
            for c in concepts:
                m = (st["concept"] == c).to_numpy()
                a, b = v[s & m], v[s & ~m]
                rec[(split, c, "median")] = np.median(a)
                sd = b.std(ddof=1)
                rec[(split, c, "thr")] = b[0] if np.ptp(b) == 0 else b.mean() + k * sd
                rec[(split, c, "mean")] = b[0] if np.ptp(b) == 0 else b.mean()
                p = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic").pvalue
                rec[(split, c, "p_asym")] = p
                if exact and not rec["dead"] and (split == "testing" or p <= cutoff):
                    p = reference_exact_p(v[s], m[s])
                rec[(split, c, "p")] = p
        rows.append(rec)
    return rows, concepts


@pytest.mark.parametrize("exact", [False, True])
def test_concept_cells_match_per_unit_scipy_loop(recording, exact):
    path, st, data = recording
    k, fdr = 3.0, 0.05
    cells = concept_cells(path, k=k, fdr=fdr, n_perm=200, family="pairs", exact=exact)
    # exact p wherever BH over all pairs could ever reach: at most fdr (and never below 0.01)
    cutoff = max(fdr, 1e-2)
    # the reference: every test of every live unit, BH over all of them, then confirmation
    refs, pvals, keys = {}, [], []
    for site, x in data.items():
        ref, concepts = direct_table(x, st, k, exact, cutoff)
        refs[site] = ref
        for r in ref:
            if r["dead"]:
                continue
            for c in concepts:
                pvals.append(r[("screening", c, "p")])
                keys.append((site, r["unit"], c))
    q = dict(zip(keys, stats.false_discovery_control(np.array(pvals), method="bh")))

    def val(key, split, name):
        return refs[key[0]][key[1]][(split, key[2], name)]

    responsive = {key for key, qq in q.items() if qq <= fdr and val(key, "screening", "median") > val(key, "screening", "mean")}
    n_resp = pd.Series([key[:2] for key in responsive]).value_counts().to_dict()
    passed = {key for key in responsive if n_resp[key[:2]] == 1
              and val(key, "screening", "median") > val(key, "screening", "thr")}
    assert cells.attrs["n_tests"] == len(pvals)
    got = {(r.site, r.unit, c) for r in cells.itertuples() for c in (r.concepts.split(";") if isinstance(r.concepts, str) and r.concepts else [])}
    assert got == responsive
    assert {(r.site, r.unit, r.concept) for r in cells[cells["is_candidate"]].itertuples()} == passed
    # confirmation: BH over the candidates' testing p-values, plus the testing effect size
    fam = sorted(passed)
    pt = np.array([val(key, "testing", "p") for key in fam])
    qt = stats.false_discovery_control(pt, method="bh") if len(pt) else []
    confirmed = {key for key, qq in zip(fam, qt) if qq <= fdr and val(key, "testing", "median") > val(key, "testing", "thr")}
    assert {(r.site, r.unit, r.concept) for r in cells[cells["is_cell"]].itertuples()} == confirmed
    # per-unit p and q of the unit's concept
    for r in cells[~cells["dead"]].itertuples():
        key = (r.site, r.unit, r.concept)
        assert r.p == pytest.approx(val(key, "screening", "p"), rel=1e-9, abs=1e-300)
        assert r.p_asymptotic == pytest.approx(val(key, "screening", "p_asym"), rel=1e-9, abs=1e-300)
        assert r.p_exact == (exact and r.p_asymptotic <= cutoff)
        assert r.q == pytest.approx(q[key], rel=1e-9)
        if r.is_candidate:
            assert r.p_test == pytest.approx(val(key, "testing", "p"), rel=1e-9, abs=1e-300)
    if exact:
        assert cells.attrs["n_exact"] > 0 and cells.attrs["n_over_budget"] == 0
    # planted: A0 -> c1, A1 -> c3 (image only, not multimodal); B4 -> c2 on an image-only site
    row = cells.set_index(["site", "unit"])
    assert row.loc[("A", 0), "is_cell"] and row.loc[("A", 0), "concept"] == "c1"
    assert row.loc[("A", 1), "is_cell"] and row.loc[("A", 1), "concept"] == "c3"
    assert not row.loc[("A", 1), "multimodal"]
    assert row.loc[("B", 4), "is_cell"] and row.loc[("B", 4), "concept"] == "c2"
    assert (row.loc["B", "n_stimuli"] == (st["modality"] == "image").sum()).all()
    assert row.loc[("A", 0), "multimodal"]
    # dead units: flagged, no statistics
    dead = cells[(cells["site"] == "A") & cells["unit"].isin([30, 31, 32, 33])]
    assert dead["dead"].all() and dead["p"].isna().all() and not dead["is_candidate"].any()


def test_indices_match_direct_per_unit(recording):
    path, st, data = recording
    tab = unit_indices(path)
    for site, x in data.items():
        valid = ~np.isnan(x).all(axis=1)
        xs, sv = x[valid], st[valid].reset_index(drop=True)
        concepts = list(dict.fromkeys(st["concept"]))
        scr, test = (sv["split"] == "screening").to_numpy(), (sv["split"] == "testing").to_numpy()
        t = tab[tab["site"] == site].set_index("unit")
        for u in range(x.shape[1]):
            v = xs[:, u]
            if np.ptp(v) == 0:
                assert t.loc[u, "dead"] and np.isnan(t.loc[u, "si"])
                continue
            r = v - v.min()
            mu = np.array([r[(sv["concept"] == c).to_numpy()].mean() if (sv["concept"] == c).any() else np.nan for c in concepts])
            mu = mu[np.isfinite(mu)]
            assert t.loc[u, "si"] == pytest.approx((mu.max() - mu.mean()) / (mu.max() + mu.mean()))
            assert t.loc[u, "kurtosis"] == pytest.approx(stats.kurtosis(v))
            scr_mean = {c: v[scr & (sv["concept"] == c).to_numpy()].mean() for c in concepts
                        if (scr & (sv["concept"] == c).to_numpy()).any()}
            pref = t.loc[u, "pref_concept"]
            assert scr_mean[pref] == pytest.approx(max(scr_mean.values()), abs=1e-9)  # ties within rounding
            m = (sv["concept"] == pref).to_numpy()
            assert t.loc[u, "auc"] == pytest.approx(roc_auc_score(m[test], v[test]))
            for c in concepts:
                cm = (sv["concept"] == c).to_numpy()
                if cm.any():
                    assert t.loc[u, f"mean:{c}"] == pytest.approx(v[cm].mean())


def test_population_sparseness_matches_direct(recording):
    path, st, data = recording
    pop = population_sparseness(path)
    for site, x in data.items():
        valid = ~np.isnan(x).all(axis=1)
        xs = x[valid]
        live = np.ptp(xs, axis=0) > 0
        r = xs[:, live] - xs[:, live].min(axis=0)
        n = r.shape[1]
        expect = (1 - (r.sum(1) / n) ** 2 / ((r ** 2).sum(1) / n)) / (1 - 1 / n)
        np.testing.assert_allclose(pop[pop["site"] == site]["population_sparseness"].to_numpy(), expect, rtol=1e-10)


def test_streaming_in_tiny_blocks_gives_the_same_table(recording):
    path, _, _ = recording
    whole = concept_cells(path, k=3.0, n_perm=100)
    tiny = concept_cells(path, k=3.0, n_perm=100, block_units=3, read_bytes=64 * 7 * 4)
    pd.testing.assert_frame_equal(whole, tiny)


def test_form_auc_and_label_shuffle_p_match_direct(recording):
    path, st, data = recording
    n_perm = 300
    cells = concept_cells(path, k=3.0, n_perm=n_perm, seed=5)
    x = data["A"]
    d = Design.build(st, np.ones(len(st), bool), list(dict.fromkeys(st["concept"])))
    null = PermutationNull(n_perm, seed=5)
    checked = 0
    for _, r in cells[(cells["site"] == "A") & cells["is_candidate"]].iterrows():
        c = d.concepts.index(r["concept"])
        for sub, form in zip(d.test_forms, d.forms):
            v = x[sub.idx, r["unit"]]
            lab = sub.labels == c
            auc = roc_auc_score(lab, v)
            assert r[f"auc_form:{form}"] == pytest.approx(auc)
            # the same permutations, done the slow way
            draws = null.draws(sub.name, sub.n, int(lab.sum()))
            u_obs = stats.mannwhitneyu(v[lab], v[~lab]).statistic
            u_null = []
            for idx in draws:
                m = np.zeros(sub.n, bool)
                m[idx] = True
                u_null.append(stats.mannwhitneyu(v[m], v[~m]).statistic)
            expect = (1 + np.sum(np.array(u_null) >= u_obs - 1e-9)) / (1 + n_perm)
            assert r[f"p_form:{form}"] == pytest.approx(expect)
            checked += 1
    assert checked >= 6


def test_bad_input_raises_one_clear_error(recording):
    path, _, _ = recording
    with pytest.raises(NeuroprobeError, match="FDR method"):
        concept_cells(path, method="holm")
    with pytest.raises(NeuroprobeError, match="no site"):
        concept_cells(path, sites=["nope"])
    with pytest.raises(NeuroprobeError, match="does not exist"):
        concept_cells(path.with_name("missing.h5"))
