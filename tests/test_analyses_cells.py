"""The concept-cell experiments of ``analyses/`` (issue 20): quiroga, halle_berry, electrode_array, rotation.

Each script runs with ``--quick`` as a real subprocess on the organism (committed weights)
and its untrained twin, all four sharing one recording cache (the recordings are made once);
the outputs are checked: files, ``results.csv`` columns, numbers in range, controls near
zero, and ground truth where there is one (a rotation by the fraction 0 is the identity, so
it must find exactly the cells of the unrotated recording).  The library pieces they added
(fractional rotations, responsive units) are tested directly.  Full runs are ``slow``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["experiment", "subject", "condition", "site", "concept", "measure", "x", "value", "ci_low", "ci_high",
           "n", "note"]


def run_script(name: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "analyses" / f"{name}.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One recording cache for every quick run of this module."""
    return tmp_path_factory.mktemp("analyses-cache")


def quick(name: str, cache: Path, tmp_path: Path, *extra: str) -> tuple[Path, pd.DataFrame]:
    out = tmp_path / name
    res = run_script(name, "--quick", "--quiet", "--out", str(out), "--cache", str(cache), *extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for f in ("results.csv", "results.md"):
        assert (out / f).is_file(), f
    assert list(out.glob("*.png")), "no figure"
    from neuroprobe.output import read_csv

    df = read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS
    assert (df["experiment"] == name).all() and (df["subject"] == "organism").all()
    md = (out / "results.md").read_text()
    for head in ("**Question.**", "**Finding.**", "**Control.**", "**Published.**", "--quick"):
        assert head in md, head
    return out, df


def pick(df: pd.DataFrame, measure: str, **where) -> pd.DataFrame:
    sel = df["measure"] == measure
    for k, v in where.items():
        sel &= df[k] == v
    return df[sel]


# --------------------------------------------------------------------- the scripts, --quick
def test_quiroga_quick(cache, tmp_path):
    out, df = quick("quiroga", cache, tmp_path)
    assert {p.name for p in out.glob("*.png")} >= {"quiroga_fractions.png", "quiroga_sparseness.png"}
    assert set(df["condition"]) == {"trained", "untrained", "rotation", "shuffle"}
    pct = df[df["measure"].str.endswith("_pct")]["value"]
    assert pct.between(0, 100).all()
    sp = df[df["measure"].isin(["population_sparseness", "lifetime_sparseness"])]["value"].dropna()
    assert len(sp) and sp.between(0, 1).all()
    # the organism's concept cells live in its two 128-unit heads; the controls find none
    cells = pick(df, "cells", condition="trained").set_index("site")["value"]
    assert cells["image.fc"] > 0 and cells["text.fc"] > 0
    for cond in ("untrained", "rotation", "shuffle"):
        assert pick(df, "cells", condition=cond)["value"].sum() <= 1, cond
        assert pick(df, "responsive", condition=cond)["value"].sum() <= 2, cond
    # every cell is responsive and every invariant unit a cell
    t = df[(df["condition"] == "trained") & (df["site"] != "all")].pivot_table(index="site", columns="measure",
                                                                                values="value")
    assert (t["responsive"] >= t["cells"]).all() and (t["cells"] >= t["invariant"]).all()
    total = pick(df, "cells_pct", condition="trained", site="all")["value"].iloc[0]
    assert total == pytest.approx(100 * cells.sum() / pick(df, "units", condition="trained")["value"].sum())


def test_halle_berry_quick(cache, tmp_path):
    out, df = quick("halle_berry", cache, tmp_path)
    assert (out / "halle_berry_cell.png").is_file() and (out / "invariance_counts.png").is_file()
    counts = df[df["site"] == "all"].pivot_table(index="measure", columns="condition", values="value")
    assert counts.loc["cells", "trained"] > 0
    assert counts.loc["image_forms", "trained"] > 0  # handwriting and the rendered name, both images
    assert counts.loc["image_forms", "trained"] <= counts.loc["cells", "trained"]
    # no cell across modalities: only joint.embed's 64 units see both, and none is a cell
    assert (counts.loc["modalities"] == 0).all()
    both = pick(df, "units_seeing_both_modalities")
    assert both["value"].iloc[0] == 64 and both["site"].iloc[0] == "joint.embed"
    assert pick(df, "cells_among_them")["value"].iloc[0] == 0
    for cond in ("untrained", "rotation"):
        assert counts.loc["cells", cond] <= 1
    # one raster per concept with a cell, each bar a row of results.csv
    drawn = pick(df, "auc_form_min")
    assert len(drawn) >= 5 and drawn["value"].between(0, 1).all()
    assert {f"cell_{c}.png" for c in drawn["concept"]} <= {p.name for p in out.glob("cell_*.png")}
    bars = pick(df, "response", condition="trained")
    assert len(bars) >= 300 and bars["note"].str.contains("form ").all()
    assert "0 cells" in (out / "results.md").read_text()


def test_electrode_array_quick(cache, tmp_path):
    out, df = quick("electrode_array", cache, tmp_path, "--units", "3", "--stimulus", "seven-text-name-t3")
    assert {p.name for p in out.glob("*.png")} == {"electrode_array.png", "token_raster.png",
                                                   "variance_explained.png"}
    tiles = pick(df, "tile_z")
    assert set(tiles["condition"]) == {"trained", "untrained"}
    assert tiles.groupby(["condition", "site"])["x"].nunique().max() == 3  # 3 electrodes per site
    assert tiles["note"].str.contains("concept cell").any()
    # "a sketch of seven": 17 bytes, 96 units per MLP site, both conditions
    tok = pick(df, "token_z")
    assert sorted(tok["x"].astype(int).unique()) == list(range(17))
    assert tok.groupby(["condition", "site"]).size().eq(96 * 17).all()
    eta = df[df["measure"].str.startswith("eta2_")]
    assert eta["value"].dropna().between(0, 1).all()
    e = eta.pivot_table(index=["measure", "site"], columns="condition", values="value")
    # the cell sites follow the concept far more than the untrained twin's do
    for site in ("image.fc", "text.fc"):
        assert e.loc[("eta2_concept", site), "trained"] > 3 * e.loc[("eta2_concept", site), "untrained"]


def test_rotation_quick(cache, tmp_path):
    out, df = quick("rotation", cache, tmp_path)
    curve = pick(df, "cells", condition="trained", site="all").assign(t=lambda d: d["x"].astype(float))
    at = curve.groupby("t")["value"].mean()
    assert list(at.index) == [0.0, 0.5, 1.0]
    # ground truth: the fraction 0 is the identity, so it finds exactly the unrotated recording's cells
    from neuroprobe.analysis.criterion import concept_cells
    from neuroprobe.recording.reader import open_recording

    paths = []
    for path in sorted(cache.glob("organism_digits_*.h5")):
        with open_recording(path) as rec:
            if rec.attrs.get("montage") == "all" and not rec.attrs.get("tokens"):
                paths.append(path)
    assert len(paths) == 1
    with open_recording(paths[0]) as rec:
        plain = concept_cells(rec, sites=["image.fc", "text.fc"], exact=False, n_perm=0)
    assert at[0.0] == int(plain["is_cell"].sum()) > 10
    assert pick(df, "unique_concepts", condition="trained", site="all", x=0.0)["value"].iloc[0] == \
        plain.loc[plain["is_cell"], "concept"].nunique()
    assert at[1.0] <= 2 < at[0.0]  # a full rotation leaves (almost) none
    angles = pick(df, "angle_deg", condition="trained").assign(t=lambda d: d["x"].astype(float))
    a = angles.groupby("t")["value"].mean()
    assert a[0.0] == 0 and 30 < a[0.5] < 70 and 80 < a[1.0] < 100
    for cond in ("untrained", "shuffle"):
        assert pick(df, "cells", condition=cond)["value"].max() <= 1


def test_scripts_end_in_one_line(tmp_path):
    res = run_script("rotation", "--fractions", "0,2", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "--fractions" in res.stderr and "Traceback" not in res.stderr
    res = run_script("quiroga", "--model", "no-such-subject", "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "unknown subject" in res.stderr


# --------------------------------------------------------------------- the library pieces
def test_fractional_rotation_is_the_geodesic():
    from neuroprobe.analysis.controls import fractional_rotation, random_rotation, rotation_angle

    rng = np.random.default_rng(3)
    q = random_rotation(24, rng, special=True)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_array_equal(fractional_rotation(q, 0.0), np.eye(24))
    np.testing.assert_allclose(fractional_rotation(q, 1.0), q)
    half = fractional_rotation(q, 0.5)
    np.testing.assert_allclose(half @ half.T, np.eye(24), atol=1e-12)
    np.testing.assert_allclose(half @ half, q, atol=1e-10)  # two half-way steps make the whole rotation
    third = fractional_rotation(q, 1 / 3)
    np.testing.assert_allclose(third @ third @ third, q, atol=1e-10)
    angles = [rotation_angle(fractional_rotation(q, t)) for t in (0, 0.1, 0.3, 0.6)]
    assert angles[0] == 0 and all(a < b for a, b in zip(angles, angles[1:]))
    # the same draw as the plain Haar rotation, made proper
    plain = random_rotation(24, np.random.default_rng(3))
    flip = np.ones(24)
    if np.linalg.det(plain) < 0:
        flip[-1] = -1
    np.testing.assert_allclose(plain * flip, q)
    from neuroprobe.errors import NeuroprobeError

    with pytest.raises(NeuroprobeError, match="between 0 and 1"):
        fractional_rotation(q, 1.5)


def test_rotate_recording_fraction(tmp_path):
    import h5py

    from neuroprobe.analysis.controls import fractional_rotation, random_rotation, rotate_recording
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    stim = make_stimuli(4, 12)
    x = np.random.default_rng(0).gamma(1.0, size=(len(stim), 10)).astype(np.float32)
    rec = write_recording(tmp_path / "rec.h5", stim, {"s": x})
    scr = (stim["split"] == "screening").to_numpy()
    x64 = x.astype(np.float64)
    z = (x64 - x64[scr].mean(0)) / x64[scr].std(0, ddof=1)

    def read(path):
        with h5py.File(path) as f:
            return f["sites/s/responses"][()].astype(np.float64), float(f["sites/s"].attrs["rotation_angle"])

    y0, a0 = read(rotate_recording(rec, tmp_path / "r0.h5", seed=5, fraction=0.0))
    np.testing.assert_allclose(y0, z, atol=1e-5)  # the unit axes, standardised
    assert a0 == 0.0
    q = random_rotation(10, np.random.default_rng(5), special=True)
    for t in (0.4, 1.0):
        y, a = read(rotate_recording(rec, tmp_path / f"r{t}.h5", seed=5, fraction=t))
        np.testing.assert_allclose(y, z @ fractional_rotation(q, t), atol=1e-4)
        assert a > 0
    # without a fraction: the plain Haar draw, as before
    y, _ = read(rotate_recording(rec, tmp_path / "plain.h5", seed=5))
    np.testing.assert_allclose(y, z @ random_rotation(10, np.random.default_rng(5)), atol=1e-4)


def test_responsive_units_contain_candidates():
    from neuroprobe.analysis.criterion import responsive_units

    cells = pd.DataFrame({
        "dead": [False, False, False, False, True],
        "concept": ["a", "a", "b", "a", None],
        "concepts": ["a", "a;b", "a", "", ""],
        "median": [10.0, 10.0, 10.0, 10.0, np.nan],
        "baseline_mean": [1.0, 1.0, 1.0, 1.0, np.nan],
        "baseline_sd": [1.0, 1.0, 1.0, 1.0, np.nan],
        "is_candidate": [True, False, False, False, False],
    })
    cells.attrs["k"] = 5.0
    # one concept; two concepts (responsive, no candidate); its concept not significant; none; dead
    assert responsive_units(cells).tolist() == [True, True, False, False, False]
    assert responsive_units(cells, k=10.0).tolist() == [False] * 5  # median 10 is not above 1 + 10 SD


# --------------------------------------------------------------------- full runs
@pytest.mark.slow
@pytest.mark.parametrize("name", ["quiroga", "halle_berry", "electrode_array", "rotation"])
def test_full_run(name, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "analyses-full"
    root.mkdir(exist_ok=True)
    out = root / name
    res = run_script(name, "--quiet", "--out", str(out), "--cache", str(root / "cache"), cwd=root, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS and len(df)
    assert "--quick" not in (out / "results.md").read_text()
    if name == "rotation":
        cells = df[(df["measure"] == "cells") & (df["condition"] == "trained") & (df["site"] == "all")]
        at = cells.assign(t=cells["x"].astype(float)).groupby("t")["value"].mean()
        assert at.iloc[0] > 10 and at.iloc[-1] <= 2
