"""Issue 24, items 7-10: the design check covers every stage and the p-values in use; exact p
wherever a threshold can reach; the advice when no number of units helps.

Ground truth: synthetic recordings written through the project's writer with one planted,
perfectly selective unit (its p-values are known in closed form), brute-force enumeration of
every relabelling for the exact p of a mostly silent unit, and scipy's Mann-Whitney test for
the normal approximation.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from neuroprobe.analysis import concept_cells, design_check
from neuroprobe.analysis.criterion import exact_cutoff, first_threshold, largest_threshold, power
from neuroprobe.analysis.synthetic import make_stimuli, write_recording

CELL = 7  # the planted unit


def battery(n_concepts: int, n_screening: int, n_testing: int) -> pd.DataFrame:
    """``n_screening`` screening then ``n_testing`` testing stimuli per concept."""
    per = n_screening + n_testing
    st = make_stimuli(n_concepts=n_concepts, per_concept=per)
    st["split"] = ["screening" if i % per < n_screening else "testing" for i in range(len(st))]
    return st


def lone_cell(path, st: pd.DataFrame, n_units: int, seed: int = 0):
    """Noise units and one perfectly selective unit for c3 (20 SD above, untied)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(st), n_units))
    inside = (st["concept"] == "c3").to_numpy()
    x[:, CELL] = np.where(inside, 20.0 + rng.standard_normal(len(st)), rng.standard_normal(len(st)))
    return write_recording(path, st, {"s": x})


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# ----------------------------------------------------------------- item 7: every stage
def test_design_check_names_the_testing_stage_a_perfect_unit_cannot_pass(tmp_path):
    st = battery(8, 6, 1)
    cells = concept_cells(lone_cell(tmp_path / "six_one.h5", st, 300), n_perm=0).set_index("unit")
    d = cells.attrs["design"]
    assert not d["ok"]
    # screening is fine: 1 / C(48, 6) = 8.1e-8 against 0.05 / 2400
    assert d["ok_screening"] and d["p_floor"] == pytest.approx(1 / math.comb(48, 6), rel=1e-9)
    # testing is not: 1 testing stimulus per concept, so no p below 1/8
    assert d["failing"] == ["testing"] and not d["ok_testing"]
    assert d["p_floor_test"] == pytest.approx(1 / 8) and d["threshold_test"] == 0.05
    assert d["needed_testing"] == 2  # 1 / C(16, 2) = 1/120 <= 0.05 < 1/8
    fail = [line for line in d["message"].splitlines() if "could NOT" in line]
    assert len(fail) == 1 and "testing stage" in fail[0] and "at least 2 testing stimuli" in fail[0]
    # ground truth: the planted unit passes screening at the floor, and is never confirmed
    unit = cells.loc[CELL]
    assert unit["is_candidate"] and unit["concept"] == "c3"
    assert unit["p"] == pytest.approx(1 / math.comb(48, 6), rel=1e-9)
    assert unit["p_test"] == pytest.approx(1 / 8) and not unit["is_cell"]
    assert not cells["is_cell"].any()


def test_with_enough_testing_stimuli_the_check_is_fine_and_the_unit_is_found(tmp_path):
    st = battery(8, 6, 2)
    cells = concept_cells(lone_cell(tmp_path / "six_two.h5", st, 300), n_perm=0)
    d = cells.attrs["design"]
    assert "could NOT" not in d["message"] and "16 testing stimuli, 2 per concept" in d["message"]
    assert d["ok"] and d["failing"] == [] and d["ok_testing"]
    assert d["p_floor_test"] == pytest.approx(1 / math.comb(16, 2))
    hit = cells[cells["is_cell"]]
    assert list(hit["unit"]) == [CELL] and list(hit["concept"]) == ["c3"]


def test_power_counts_the_testing_split():
    # 8 concepts, 10 000 units: 6 screening stimuli per concept; the testing split needs 2
    assert power(10_000, 8) == 12  # balanced splits: unchanged
    # 90% screening: 7 stimuli would leave 1 testing stimulus (p >= 1/8); 20 leave 2
    assert power(10_000, 8, screening_fraction=0.9) == 20


# ----------------------------------------------------------------- item 8: the exact-p cut-off
def brute_force_p(x: np.ndarray, inside: np.ndarray) -> float:
    """P(rank sum >= observed) over every relabelling of the stimuli."""
    r = stats.rankdata(x)
    subsets = np.array(list(itertools.combinations(range(len(x)), int(inside.sum()))))
    return float(np.mean(r[subsets].sum(axis=1) >= r[inside].sum() - 1e-9))


# screening responses of concept c0 and the positives of the baseline (all other responses 0):
# approximate p between 0.01 and the largest threshold, exact p above it
MOSTLY_ZERO = {2: ([10, 11, 12, 13, 0, 0, 0], []), 3: ([10, 11, 12, 13, 0, 0], [100]), 4: ([10, 11, 12, 0, 0], [100])}


def mostly_zero_recording(path, n_concepts: int, concept: list[float], baseline: list[float]):
    st = battery(n_concepts, len(concept), 4)
    scr = (st["split"] == "screening").to_numpy()
    c0 = (st["concept"] == "c0").to_numpy()
    x = np.zeros((len(st), 2))  # unit 1 is silent (dead)
    x[scr & c0, 0] = concept
    x[np.flatnonzero(scr & ~c0)[: len(baseline)], 0] = baseline
    x[~scr & c0, 0] = [5, 6, 7, 8]  # testing: perfectly selective, exact p 1 / C(4C, 4) <= 0.05
    return write_recording(path, st, {"s": x}), st, x[:, 0]


@pytest.mark.parametrize("family", ["units", "pairs"])
@pytest.mark.parametrize("n_concepts", [2, 3, 4])
def test_a_mostly_zero_unit_is_judged_on_its_exact_p(tmp_path, n_concepts, family):
    concept, baseline = MOSTLY_ZERO[n_concepts]
    path, st, x = mostly_zero_recording(tmp_path / "zero.h5", n_concepts, concept, baseline)
    scr = (st["split"] == "screening").to_numpy()
    inside = (st["concept"] == "c0").to_numpy()[scr]
    want = brute_force_p(x[scr], inside)
    asym = stats.mannwhitneyu(x[scr][inside], x[scr][~inside], alternative="greater", method="asymptotic").pvalue
    # one live unit: the lone discovery needs p <= fdr / C for both families
    threshold = 0.05 / n_concepts
    assert 0.01 < asym <= threshold < want  # the normal approximation would pass, the exact p does not
    for k in (5.0, 0.0):
        cells = concept_cells(path, k=k, n_perm=0, family=family)
        unit = cells.set_index("unit").loc[0]
        assert unit["n_concepts"] == 0 and not unit["is_candidate"] and not unit["is_cell"], k
        assert unit["concept"] == "c0" and unit["p_exact"]
        assert unit["p"] == pytest.approx(want, rel=1e-12)
        assert unit["p_asymptotic"] == pytest.approx(asym, rel=1e-9)
        assert cells.attrs["exact_cutoff"] >= threshold


def test_a_mostly_zero_unit_whose_exact_p_passes_is_found_on_it(tmp_path):
    # five of seven concept stimuli above a nearly silent baseline: both p-values under 0.025
    path, st, x = mostly_zero_recording(tmp_path / "zero5.h5", 2, [10, 11, 12, 13, 14, 0, 0], [1])
    scr = (st["split"] == "screening").to_numpy()
    inside = (st["concept"] == "c0").to_numpy()[scr]
    want = brute_force_p(x[scr], inside)
    asym = stats.mannwhitneyu(x[scr][inside], x[scr][~inside], alternative="greater", method="asymptotic").pvalue
    assert 0.01 < asym <= 0.025 and want <= 0.025
    cells = concept_cells(path, k=0.0, n_perm=0).set_index("unit")
    unit = cells.loc[0]
    assert unit["p_exact"] and unit["p"] == pytest.approx(want, rel=1e-12)
    assert unit["n_concepts"] == 1 and unit["is_candidate"] and unit["is_cell"]


def test_the_cut_off_is_the_largest_threshold_that_can_apply():
    assert largest_threshold(0.05, 2, "units") == 0.025
    assert largest_threshold(0.05, 2, "pairs") == 0.05
    assert largest_threshold(0.05, 8, "units") == 0.05 / 8
    assert exact_cutoff(0.05, 2, "units") == 0.025
    assert exact_cutoff(0.05, 4, "pairs") == 0.05
    assert exact_cutoff(0.05, 8, "units") == 0.01  # never below the 0.01 the p-values were verified with
    assert exact_cutoff(0.2, 2, "units") == 0.1


# ----------------------------------------------------------------- item 9: the p-values in use
def test_asymptotic_design_check_reports_its_own_floor_and_warns(tmp_path):
    st = battery(8, 6, 6)
    path = lone_cell(tmp_path / "lone.h5", st, 2000)
    out = tmp_path / "cells.csv"
    r = cli("cells", str(path), "--asymptotic", "--controls", "none", "--n-perm", "0", "-q", "--out", str(out))
    assert r.returncode == 0, r.stderr
    # the floor of the normal approximation: a perfect, untied concept of 6 among 48 stimuli
    x = np.arange(48.0)
    floor = stats.mannwhitneyu(x[42:], x[:42], alternative="greater", method="asymptotic").pvalue
    assert floor == pytest.approx(4.57e-5, rel=1e-2) and floor > first_threshold(2000, 8) > 1 / math.comb(48, 6)
    lines = r.stdout.splitlines()
    scr = next(line for line in lines if line.startswith("design:") and "screening stimuli" in line)
    assert f"smallest attainable p is {floor:.2g}" in scr and "normal approximation" in scr
    assert f"{1 / math.comb(48, 6):.2g}" not in scr
    warn = next(line for line in lines if "could NOT pass the screening stage" in line)
    assert "drop --asymptotic" in warn
    # ground truth: the lone perfect unit is indeed missed under the approximation ...
    assert not pd.read_csv(out)["is_cell"].any()
    # ... and found, with no warning, on exact p-values
    exact = concept_cells(path, n_perm=0)
    assert exact.attrs["design"]["ok"] and "could NOT" not in exact.attrs["design"]["message"]
    assert list(exact.loc[exact["is_cell"], "unit"]) == [CELL]


# ----------------------------------------------------------------- item 10: the advice
def test_advice_says_no_number_of_units_helps():
    # 2 screening stimuli per concept: 1/120 = 0.0083 > 0.05 / 8, the threshold of a single unit
    d = design_check({"s": (16, [2] * 8)}, 200, 8)
    line = next(line for line in d["message"].splitlines() if "could NOT" in line)
    assert "at most about 0" not in line and "fewer units" not in line
    assert "no number of units helps" in line and "more stimuli per concept" in line
    assert d["failing"] == ["screening"]
    assert f"at least {d['needed_per_concept']} stimuli" in line and d["needed_per_concept"] == 8
    # where fewer units do help, the count is the largest that passes
    d = design_check({"s": (24, [3] * 8)}, 2000, 8)
    line = next(line for line in d["message"].splitlines() if "could NOT" in line)
    n = int(line.split("at most about ")[1].split(")")[0])
    assert d["p_floor"] <= first_threshold(n, 8) and d["p_floor"] > first_threshold(n + 1, 8)
