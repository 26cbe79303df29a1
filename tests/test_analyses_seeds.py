"""The across-seeds and lesion experiments of the gallery: selectivity_importance, universality, forgetting_matrix.

Library parts on ground truth (the planted subject, planted universal units), then each
script run with ``--quick`` in a subprocess on the organism: files present, the
``results.csv`` columns, numbers in range, controls near zero.  Full runs are slow tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroprobe.errors import NeuroprobeError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["experiment", "subject", "condition", "site", "concept", "measure", "x", "value", "ci_low", "ci_high", "n",
           "note"]


# ------------------------------------------------------------------ library on ground truth


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from neuroprobe.planted import make_planted

    return make_planted(tmp_path_factory.mktemp("planted"), seed=0)


@pytest.fixture(scope="module")
def planted_study(planted):
    from neuroprobe.lesions.forgetting import LesionStudy

    return LesionStudy(planted.subject, planted.battery, None, sites="mlp", quiet=True, seed=3)


def test_class_selectivity_finds_planted_tuning(planted, planted_study):
    sel = planted_study.class_selectivity().set_index("unit")
    inv = planted.truth[planted.truth["kind"] == "invariant"]
    # every invariant cell prefers its planted concept and is far more selective than the untuned units
    assert (sel.loc[inv["unit"], "pref_concept"].to_numpy() == inv["concept"].to_numpy()).all()
    n_tuned = 3 * len(planted.battery.concepts)
    hidden = len(sel)
    untuned = sel.loc[n_tuned : hidden - hidden // 8 - 1]
    assert sel.loc[inv["unit"], "si_morcos"].min() > untuned["si_morcos"].median() + 0.2
    assert sel["si_morcos"].dropna().between(0, 1).all()
    dead = sel.loc[hidden - hidden // 8 :]
    assert dead["si_morcos"].isna().all() and not dead["active"].any()


def test_single_unit_changes_equal_one_lesion_each_and_hit_the_planted_concept(planted, planted_study):
    inv = planted.truth[planted.truth["kind"] == "invariant"]
    units = pd.DataFrame({"site": "hidden", "unit": inv["unit"].to_numpy()})
    ch = planted_study.single_unit_changes("zero", units=units)
    concepts = list(planted_study.concepts)
    for (_, row), concept in zip(ch.iterrows(), inv["concept"]):
        assert row[concepts].astype(float).idxmin() == concept  # its own concept lost most
        ref = planted_study.evaluate({"hidden": np.array([row["unit"]])}, "zero")
        np.testing.assert_allclose(row[concepts].to_numpy(float), ref.to_numpy(float), atol=1e-5)
    assert len(planted_study.single_unit_changes("zero")) == int(planted_study.active["hidden"].sum())
    with pytest.raises(NeuroprobeError, match="not among"):
        planted_study.single_unit_changes("zero", units=pd.DataFrame({"site": ["hidden"], "unit": [10_000]}))


def test_keep_only_top_units_keeps_the_concept_and_random_ones_do_not(planted, planted_study):
    c = planted_study.concepts[0]
    keep = planted_study.keep_only(c, [3], "hidden", "zero", draws=8)
    n = planted_study.n_units["hidden"]
    assert set(keep["order"]) == {"keep_top", "keep_random"} and (keep["n_units"] == n - 3).all()
    top = keep[keep["order"] == "keep_top"]["target_change"].iloc[0]
    rnd = keep[keep["order"] == "keep_random"]["target_change"]
    assert len(rnd) == 8 and top > rnd.max()  # the three planted cells carry the concept; random triples do not
    assert keep.equals(planted_study.keep_only(c, [3], "hidden", "zero", draws=8))  # seeded
    assert planted_study.keep_only(c, [n + 1], "hidden").empty  # more than the ranked units: skipped
    with pytest.raises(NeuroprobeError, match="not one of the study's sites"):
        planted_study.keep_only(c, [3], "logits")


def test_forgetting_null_matches_counts_and_the_planted_diagonal_beats_it(planted_study):
    k, draws = 3, 12
    null = planted_study.forgetting_null(k=k, draws=draws)
    concepts = list(planted_study.concepts)
    assert len(null) == len(concepts) * draws * len(concepts)
    assert null.equals(planted_study.forgetting_null(k=k, draws=draws))
    m = planted_study.forgetting_matrix(k=k)
    for c in concepts:
        own = null[(null["lesioned"] == c) & (null["tested"] == c)]["change"]
        assert m.loc[c, c] < own.min()  # the top-k lesion hurts its concept more than every random k-lesion


def test_universal_units_on_planted_matches_and_their_controls():
    from neuroprobe.analysis.universality import excess_correlation, universal_units

    rng = np.random.default_rng(0)
    n, units = 600, 100
    a = np.maximum(rng.standard_normal((n, units)), 0)
    perm = rng.permutation(units)
    b = a[:, perm] + 0.05 * rng.standard_normal((n, units))  # every unit of a has a twin in b
    b[:, 0] = 0.0  # a dead unit: never a match
    c = np.maximum(rng.standard_normal((n, units)), 0)  # an independent run
    same = excess_correlation([a, b])
    twin_of = np.argsort(perm)
    alive_a = same[(same["run"] == 0)]
    assert (alive_a.loc[alive_a["unit"] != perm[0], "excess"] > 0.5).all()
    assert alive_a.loc[alive_a["unit"] == perm[0], "excess"].iloc[0] < 0.5  # its twin died in b
    assert not same[(same["run"] == 1) & (same["unit"] == 0)]["alive"].iloc[0]
    assert np.isnan(same[(same["run"] == 1) & (same["unit"] == 0)]["excess"]).all()
    assert twin_of.shape == (units,)
    table = universal_units({"s": [a, b], "t": [a, c]})
    frac = table.groupby("site")["universal"].mean()
    assert frac["s"] > 0.9 and frac["t"] == 0.0
    rot = universal_units({"s": [a, b]}, rotate_query=True)
    assert rot["universal"].mean() == 0.0  # a rotated basis has no universal units
    with pytest.raises(NeuroprobeError):
        excess_correlation([a])


def test_seed_interval_is_the_t_interval():
    from neuroprobe.experiments.seeds import seed_interval

    mean, lo, hi = seed_interval([1.0, 2.0, 3.0, np.nan])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302652729911275 / np.sqrt(3), rel=1e-9)  # t(0.975, 2) * sd / sqrt(n)
    assert np.isnan(seed_interval([1.0])[1]) and np.isnan(seed_interval([])[0])


def test_replicates_of_one_subject_need_two_runs():
    from neuroprobe.experiments.seeds import replicates

    with pytest.raises(NeuroprobeError, match="at least 2 training runs"):
        replicates("minilm", 5, minimum=2)
    runs = replicates("minilm,minilm", 5, minimum=2)
    assert [r.seed for r in runs] == [0, 1] and all(r.weights is None for r in runs)
    with pytest.raises(NeuroprobeError, match="unknown subject"):
        replicates("nosuch,minilm", 5)


# ------------------------------------------------------------------ the scripts, --quick


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, str(ROOT / "analyses" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def seeds_cache(tmp_path_factory) -> Path:
    """One cache for the module: quick organisms are trained once and shared by both seed scripts."""
    return tmp_path_factory.mktemp("seeds-cache")


def check_outputs(out: Path, name: str) -> pd.DataFrame:
    from neuroprobe.output import read_csv

    assert (out / "results.md").is_file() and list(out.glob("*.png"))
    res = read_csv(out / "results.csv")
    assert list(res.columns) == COLUMNS
    assert (res["experiment"] == name).all() and res["value"].notna().any()
    md = (out / "results.md").read_text()
    assert "**Finding.**" in md and "**Control.**" in md and "**Published.**" in md and "--quick" in md
    return res


def test_selectivity_importance_quick(tmp_path, seeds_cache):
    out = tmp_path / "out"
    r = run_script("selectivity_importance", "--quick", "--quiet", "--out", str(out), "--cache", str(seeds_cache),
                   "--gallery", str(tmp_path / "gallery"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = check_outputs(out, "selectivity_importance")
    assert (tmp_path / "gallery" / "selectivity_importance.png").is_file()
    rho = res[res["measure"].str.startswith("spearman")]
    assert rho["value"].between(-1, 1).all()
    assert {"trained", "shuffle", "random class"} <= set(rho["condition"])
    # the shuffled null is centred on zero; two seeds, both trained briefly
    null = rho[(rho["condition"] == "shuffle") & (rho["measure"] == "spearman_overall") & rho["x"].isna()]
    assert len(null) == 3 and null["value"].abs().max() < 0.1
    assert (null["ci_low"] < 0).all() and (null["ci_high"] > 0).all()
    per_seed = rho[rho["measure"] == "spearman_overall_seed"]
    assert set(per_seed["x"].dropna().astype(int)) == {0, 1}
    units = pd.read_csv(out / "units.csv")
    assert set(units["site"]) == {"image.fc", "text.fc"} and units["si_morcos"].between(0, 1).all()
    assert (seeds_cache / "organisms" / "seed-1-steps-60" / "organism.safetensors").is_file()


def test_universality_quick(tmp_path, seeds_cache):
    out = tmp_path / "out"
    r = run_script("universality", "--quick", "--quiet", "--out", str(out), "--cache", str(seeds_cache), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = check_outputs(out, "universality")
    frac = res[res["measure"] == "fraction_universal"]
    assert frac["value"].between(0, 1).all()
    assert {"trained", "rotation", "untrained"} <= set(frac["condition"])
    rot = frac[(frac["condition"] == "rotation") & (frac["site"] == "all sites")]["value"].iloc[0]
    assert rot <= 0.02  # the rotated-basis control has (next to) no universal units
    base = res[res["measure"] == "mean_rotated_baseline"]["value"]
    assert base.between(-1, 1).all()
    units = pd.read_csv(out / "units.csv")
    assert {"site", "seed", "unit", "best_match", "baseline", "excess", "universal", "is_cell"} <= set(units.columns)
    # trained from the module's cache: no organism was trained again
    assert sorted(p.name for p in (seeds_cache / "organisms").iterdir() if not p.name.startswith(".")) == \
        ["seed-0-steps-60", "seed-1-steps-60"]


def test_forgetting_matrix_quick(tmp_path, seeds_cache):
    out = tmp_path / "out"
    r = run_script("forgetting_matrix", "--quick", "--quiet", "--out", str(out), "--cache", str(seeds_cache),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = check_outputs(out, "forgetting_matrix")
    hit = res[res["measure"] == "fraction_target_hit_hardest"].set_index("condition")["value"]
    assert hit.between(0, 1).all() and {"trained", "random", "untrained"} <= set(hit.index)
    mt = res[res["measure"] == "mean_target_change"].set_index("condition")["value"]
    # random lesions of 4 units barely move the readout; the committed organism's top-4 lesions do
    assert abs(mt["random"]) < 0.05 and mt["trained"] < mt["random"] - 0.05
    p = res[res["measure"] == "p_random_target"]["value"]
    assert p.between(0, 1).all()
    keep = pd.read_csv(out / "keep_only.csv")
    assert set(keep["order"]) == {"keep_top", "keep_random"} and set(keep["k"]) == {1, 4}
    matrix = pd.read_csv(out / "matrix.csv")
    assert {"lesioned", "tested", "change", "null_mean", "p_random", "condition"} <= set(matrix.columns)


def test_user_mistakes_end_in_one_line(tmp_path):
    r = run_script("universality", "--model", "minilm", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "at least 2 training runs" in r.stderr
    r = run_script("selectivity_importance", "--model", "nosuch", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "unknown subject" in r.stderr and "Traceback" not in r.stderr
    r = run_script("forgetting_matrix", "--keep-k", "0,x", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "--keep-k" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ full runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["selectivity_importance", "universality", "forgetting_matrix"])
def test_full_run(name, tmp_path):
    """The committed experiment: 5 organisms (trained into ./recordings/cache once), full sizes."""
    out = tmp_path / "out"
    r = run_script(name, "--quiet", "--out", str(out), "--cache", str(ROOT / "recordings" / "cache"), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(out / "results.csv")
    assert "--quick" not in (out / "results.md").read_text()
    if name == "selectivity_importance":
        per_seed = res[res["measure"] == "spearman_overall_seed"]
        assert per_seed["x"].nunique() == 5
    elif name == "universality":
        f = res[(res["measure"] == "fraction_universal") & (res["site"] == "all sites")].set_index("condition")["value"]
        assert f["rotation"] <= 0.01 and f["trained"] > f["rotation"]
    else:
        hit = res[res["measure"] == "fraction_target_hit_hardest"].set_index("condition")["value"]
        assert hit["trained"] > hit["random"]
