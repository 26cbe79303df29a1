"""The faster single-core concept cells give the very same tables (issue 23, item 4).

The reference tables in ``tests/data/cells_reference/`` were computed by the code before the
speed-up (``tests/data/make_cells_reference.py``); here the current code runs the same calls on the
same recordings and every column must be equal, exactly (NaNs equal, signs of zeros equal), as must
the table's attributes (exact p-value counts, cut-offs, the design check).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from importgraph import find_cycle, package_imports

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "cells_reference"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_cells_reference", DATA / "make_cells_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Recording name -> path, each built once (by the same code that built the reference's)."""
    root = tmp_path_factory.mktemp("cells-reference")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = maker.RECORDINGS[name](root / f"{name}.h5")
        return built[name]

    return get


def assert_same_table(new: pd.DataFrame, ref: pd.DataFrame) -> None:
    """Every column equal, exactly: values, NaN positions, dtypes, column order, and the sign of zeros."""
    pd.testing.assert_frame_equal(new, ref, check_exact=True)
    for col in ref.columns:
        if ref[col].dtype.kind == "f":
            a, b = new[col].to_numpy(), ref[col].to_numpy()
            assert np.array_equal(np.signbit(a) & ~np.isnan(a), np.signbit(b) & ~np.isnan(b)), col


@pytest.mark.parametrize("case", list(maker.CASES))
def test_table_equals_the_reference(case, recordings):
    entry = MANIFEST[case]
    assert (entry["recording"], entry["call"]) == maker.CASES[case][:2]
    path = recordings(entry["recording"])
    digest = maker.digest(path)
    if digest != entry["digest"]:
        assert entry["recording"] in maker.MACHINE_DEPENDENT, "the synthetic recording changed"
        pytest.skip(f"the {entry['recording']} recording differs on this machine (torch kernels) from the "
                    f"one the reference was computed on; its table cannot be compared bit for bit")
    table = maker.run(case, path)
    ref = pd.read_parquet(REFERENCE / f"{case}.parquet")
    assert_same_table(maker.normalise(table), ref)
    assert maker.attrs_of(table) == entry["attrs"]


# ---------------------------------------------------------------- the faster kernels against plain numpy / scipy
def awkward_rows(seed: int) -> np.ndarray:
    """float32 rows with ties, signed zeros, infinities, a constant row and NaN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, 40)).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2
    x[2] = np.maximum(x[2], 0)
    x[3] = np.where(x[3] > 0, x[3], -0.0)
    x[4, ::3] = 0.0
    x[4, 1::3] = -0.0
    x[5, :5] = [np.inf, -np.inf, np.inf, 0.0, -0.0]
    x[6] = 1.5
    x[7, 3] = np.nan
    x[8, 1] = -np.nan
    return x


def test_midranks_equal_scipy_on_awkward_rows():
    from scipy.stats import rankdata

    from neuroprobe.analysis.indices import midranks

    for seed in range(5):
        x = awkward_rows(seed)
        for rows in (x[:7], x):  # without NaN (the integer-key sort) and with NaN (argsort)
            ranks, tie = midranks(rows)
            for g in range(len(rows)):
                if np.isnan(rows[g]).any():
                    continue
                assert np.array_equal(ranks[g], rankdata(rows[g]))
                _, t = np.unique(rows[g], return_counts=True)
                assert tie[g] == float((t.astype(float) ** 3 - t).sum())


def test_group_order_stats_equal_numpy():
    from neuroprobe.analysis.indices import group_order_stats

    rng = np.random.default_rng(3)
    for seed in range(5):
        x = awkward_rows(seed)
        labels = rng.integers(0, 5, x.shape[1])
        groups = [np.flatnonzero(labels == c) for c in range(6)]  # concept 5 has no stimuli
        with np.errstate(invalid="ignore"):
            med, lo, hi = group_order_stats(x, groups)
        x64 = x.astype(np.float64)
        for c, idx in enumerate(groups):
            if not len(idx):
                assert np.isnan(med[:, c]).all() and (lo[:, c] == np.inf).all() and (hi[:, c] == -np.inf).all()
                continue
            with np.errstate(invalid="ignore"):
                want = np.median(x64[:, idx], axis=1)
            assert np.array_equal(med[:, c], want, equal_nan=True)
            assert np.array_equal(np.signbit(med[:, c]), np.signbit(want))
            assert np.array_equal(lo[:, c], x64[:, idx].min(axis=1), equal_nan=True)
            assert np.array_equal(hi[:, c], x64[:, idx].max(axis=1), equal_nan=True)


def test_permutation_draws_are_the_argsorts_first():
    from neuroprobe.analysis.invariance import smallest_first

    rng = np.random.default_rng(0)
    for n, a in ((10, 1), (10, 8), (10, 9), (200, 20), (5, 3)):
        r = rng.random((300, n))
        assert np.array_equal(smallest_first(r, a), np.argsort(r, axis=1)[:, :a])
        tied = np.round(r * 15) / 15  # many ties: those rows are argsorted in full
        assert np.array_equal(smallest_first(tied, a), np.argsort(tied, axis=1)[:, :a])


def test_exact_program_equals_enumeration():
    """The deficit program with its pruning and splits against every subset, on tied ranks."""
    from itertools import combinations

    from neuroprobe.analysis.exact import doubled_ranks, rank_sum_exact
    from neuroprobe.analysis.indices import midranks

    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((30, 12)) * 1.5).astype(np.float32)  # heavy ties
    ranks, _ = midranks(x)
    v = doubled_ranks(ranks)
    m = 4
    obs2 = np.array([int(np.sort(row)[::-1][: m + g % 5].sum() - 2 * (g % 3)) for g, row in enumerate(v)])
    obs2 = np.minimum(obs2, np.sort(v, axis=1)[:, ::-1][:, :m].sum(1))
    sums = np.array([[row[list(s)].sum() for s in combinations(range(12), m)] for row in v])
    want = (sums >= obs2[:, None]).mean(axis=1)
    np.testing.assert_allclose(rank_sum_exact(v, obs2, m), want, rtol=1e-12)


# ---------------------------------------------------------------- the analysis import graph (issue 23, item 5)
#: The layers, lowest first: a module may import only from its own layer's predecessors and lower layers.
LAYERS = [
    ("design", "stream", "exact"),
    ("thresholds", "indices"),
    ("invariance",),
    ("scan",),
    ("parallel",),
    ("criterion", "descriptive"),
]


def analysis_imports() -> dict[str, set[str]]:
    """Module -> the ``neuroprobe.analysis`` modules it imports (see ``tests/importgraph.py``)."""
    return package_imports("neuroprobe.analysis")


def test_analysis_import_graph_has_no_cycle():
    graph = analysis_imports()
    assert {"indices", "scan", "invariance", "parallel"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_kernels_below_the_scan_below_the_pool():
    graph = analysis_imports()
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    for module, deps in graph.items():
        if module not in rank:
            continue
        above = sorted(d for d in deps if d in rank and rank[d] >= rank[module])
        assert not above, f"{module} imports {above}, which are not below it"
    assert "scan" in graph["parallel"] and "parallel" not in graph["scan"]


def test_public_names_stay():
    import neuroprobe.analysis as analysis
    from neuroprobe.analysis import criterion

    for name in analysis.__all__:
        assert callable(getattr(analysis, name)), name
    for name in ("exact_cutoff", "largest_threshold", "FAMILIES", "concept_cells", "significant"):
        assert hasattr(criterion, name), name
