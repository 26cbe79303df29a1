"""Concept cells against planted ground truth over many seeds, the observed FDR, and the controls."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import record
from neuroprobe.analysis import (
    bootstrap_ci, concept_cells, decode_concepts, label_shuffle_control, rdm, rotation_control, untrained_control,
)
from neuroprobe.analysis.synthetic import make_stimuli, write_recording
from neuroprobe.errors import NeuroprobeError
from neuroprobe.planted import make_planted

SEEDS = range(24)
FDR = 0.05


def planted_recording(root, seed: int, init: str = "pretrained"):
    torch.set_num_threads(1)
    p = make_planted(root / f"battery{seed}{init}", seed=seed, init=init)
    rec = record(p.subject, p.battery, root / f"planted{seed}{init}.h5", montage="mlp", quiet=True)
    return p, rec


def discoveries(cells: pd.DataFrame) -> list[tuple[int, str]]:
    """Every (unit, concept) pair passing screening."""
    return [(int(r.unit), c) for r in cells.itertuples() for c in (r.concepts.split(";") if isinstance(r.concepts, str) and r.concepts else [])]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The criterion on the planted subject at every seed, at k = 5 and with the effect size off (k = 0)."""
    root = tmp_path_factory.mktemp("planted")
    rows, z = [], []
    for seed in SEEDS:
        p, rec = planted_recording(root, seed)
        truth = {(int(r.unit), r.concept): r.kind for r in p.truth.itertuples()}
        for k in (5.0, 0.0):
            cells = concept_cells(rec, k=k, fdr=FDR, n_perm=200 if k == 5.0 else 0, seed=seed)
            pairs = discoveries(cells)
            found = cells[cells["is_cell"]].set_index("unit")
            for (unit, concept), kind in truth.items():
                ok = unit in found.index and found.loc[unit, "concept"] == concept
                rows.append(dict(seed=seed, k=k, kind=kind, unit=unit, found=ok,
                                 invariant=bool(ok and found.loc[unit, "invariant"]),
                                 multimodal=bool(ok and found.loc[unit, "multimodal"]),
                                 lofo=bool(ok and found.loc[unit, "lofo_pass"])))
                if k == 5.0:
                    z.append(dict(seed=seed, kind=kind, z=float(cells.set_index("unit").loc[unit, "z"])))
            false = [pr for pr in pairs if pr not in truth]
            false_cells = [(int(r.unit), r.concept) for r in cells[cells["is_cell"]].itertuples()
                           if (int(r.unit), r.concept) not in truth]
            rows.append(dict(seed=seed, k=k, kind="_fdp", unit=-1, found=False,
                             fdp=len(false) / max(1, len(pairs)),
                             fdp_cells=len(false_cells) / max(1, int(cells["is_cell"].sum()))))
        rec.close()
    return pd.DataFrame(rows), pd.DataFrame(z)


def test_planted_cells_found_with_their_concept(sweep):
    table, _ = sweep
    t = table[(table["k"] == 5.0) & (table["kind"] != "_fdp")]
    recall = t.groupby("kind")["found"].mean()
    print("\nrecall at k=5 over", len(SEEDS), "seeds:", recall.to_dict())
    assert recall["invariant"] == 1.0
    assert recall["image-only"] == 1.0
    assert recall["weak"] >= 0.9


def test_invariance_flags_follow_the_planted_tuning(sweep):
    table, _ = sweep
    t = table[(table["k"] == 5.0) & table["found"]]
    inv, img = t[t["kind"] == "invariant"], t[t["kind"] == "image-only"]
    print("\ninvariant cells: invariant", inv["invariant"].mean(), "multimodal", inv["multimodal"].mean(),
          "lofo", inv["lofo"].mean(), "| image-only: invariant", img["invariant"].mean(), "multimodal", img["multimodal"].mean())
    assert inv["multimodal"].mean() >= 0.9 and inv["invariant"].mean() >= 0.8 and inv["lofo"].mean() >= 0.8
    assert img["multimodal"].mean() == 0.0 and img["invariant"].mean() == 0.0


def test_weak_cells_are_weaker_than_invariant_cells(sweep):
    _, z = sweep
    med = z.groupby("kind")["z"].median()
    print("\nmedian screening z:", med.to_dict())
    assert 5.0 < med["weak"] < med["invariant"] - 1.0


def test_observed_false_discovery_rate_is_within_the_stated_fdr(sweep):
    table, _ = sweep
    fdp = table[table["kind"] == "_fdp"].groupby("k")[["fdp", "fdp_cells"]].mean()
    print(f"\nobserved FDR over {len(SEEDS)} seeds (stated {FDR}):\n{fdp}")
    # the rank-sum + BH part alone (k = 0) is where false discoveries can happen at all
    assert fdp.loc[0.0, "fdp"] <= FDR
    assert fdp.loc[5.0, "fdp"] <= FDR
    assert fdp.loc[5.0, "fdp_cells"] <= FDR


def test_global_null_rarely_yields_any_discovery(tmp_path):
    """Under the global null, BH's FDR is the chance of any discovery: about FDR, not about 1."""
    st = make_stimuli(n_concepts=5, per_concept=12)
    any_found = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        path = write_recording(tmp_path / f"null{seed}.h5", st, {"s": rng.standard_normal((len(st), 60))})
        cells = concept_cells(path, k=0.0, fdr=FDR, n_perm=0)
        any_found.append(bool(cells["is_candidate"].any()))
    print("\nfraction of null recordings with any discovery:", np.mean(any_found))
    assert np.mean(any_found) <= 0.2


# ----------------------------------------------------------------- controls
@pytest.fixture(scope="module")
def planted0(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted0")
    p, rec = planted_recording(root, 0)
    _, rnd = planted_recording(root, 0, init="random")
    return p, rec, rnd


def test_rotation_control_destroys_axis_aligned_cells(planted0):
    p, rec, _ = planted0
    trained = concept_cells(rec, n_perm=0)
    rotated = rotation_control(rec, rotation_seed=1, n_perm=0)
    assert rotated.attrs["control"] == "rotation"
    assert len(rotated) == len(trained)
    assert int(trained["is_cell"].sum()) == len(p.truth)
    # units are z-scored on the screening split before rotating: an axis-aligned code leaves nothing
    assert rotated.attrs["rotation_standardize"] is True
    assert int(rotated["is_cell"].sum()) == 0


def test_rotation_is_orthogonal(planted0, tmp_path):
    from neuroprobe.analysis.controls import rotate_recording

    _, rec, _ = planted0
    out = rotate_recording(rec, tmp_path / "rot.h5", seed=3)
    import h5py

    with h5py.File(out) as f:
        y = f["sites/hidden/responses"][()].astype(np.float64)
    x = rec.responses("hidden")[()].astype(np.float64)
    scr = (rec.stimuli["split"] == "screening").to_numpy()
    sd = x[scr].std(0, ddof=1)
    xc = np.where(sd > 0, (x - x[scr].mean(0)) / np.where(sd > 0, sd, 1.0), 0.0)  # z-scored on screening
    # a rotation keeps every stimulus-by-stimulus inner product
    np.testing.assert_allclose(y @ y.T, xc @ xc.T, rtol=1e-4, atol=1e-3 * np.abs(xc @ xc.T).max())
    raw = rotate_recording(rec, tmp_path / "raw.h5", seed=3, standardize=False)
    with h5py.File(raw) as f:
        y = f["sites/hidden/responses"][()].astype(np.float64)
    xc = x - x.mean(0)
    np.testing.assert_allclose(y @ y.T, xc @ xc.T, rtol=1e-4, atol=1e-3)


def test_untrained_subject_has_far_fewer_cells(planted0):
    _, rec, rnd = planted0
    cells = untrained_control(rec, rnd, n_perm=0)
    trained = concept_cells(rec, n_perm=0)
    assert cells.attrs["control"] == "untrained"
    # random projections of concept-structured inputs are tuned too (that is why the control
    # exists), but far less often than the planted cells
    assert int(cells["is_cell"].sum()) < int(trained["is_cell"].sum()) / 3
    with pytest.raises(NeuroprobeError, match="not an untrained recording"):
        untrained_control(rnd, rec)
    with pytest.raises(NeuroprobeError, match="cannot rebuild"):
        untrained_control(rec)  # the planted subject is not in the registry


def test_label_shuffle_finds_nothing(planted0):
    _, rec, _ = planted0
    shuffles = label_shuffle_control(rec, n_shuffles=5, seed=0)
    assert len(shuffles) == 5
    assert shuffles["cells"].sum() == 0


def test_bootstrap_intervals_bracket_the_estimates(planted0):
    p, rec, _ = planted0
    cells = concept_cells(rec, n_perm=0)
    ci = bootstrap_ci(rec, cells, n_boot=200, seed=0)
    assert set(ci["unit"]) == set(p.truth["unit"])
    ok = ci.dropna(subset=["lo", "hi"])
    assert len(ok) >= 0.9 * len(ci)
    assert (ok["lo"] <= ok["estimate"] + 1e-9).mean() > 0.9 and (ok["estimate"] <= ok["hi"] + 1e-9).mean() > 0.9
    auc = ok[(ok["index"] == "auc") & ok["unit"].isin(p.truth[p.truth["kind"] != "image-only"]["unit"])]
    assert (auc["lo"] > 0.9).all()  # cells tuned in every form separate their concept in every resample
    again = bootstrap_ci(rec, cells, n_boot=200, seed=0)
    pd.testing.assert_frame_equal(ci, again)


def test_population_decoding_and_rdm(planted0):
    p, rec, rnd = planted0
    cells = concept_cells(rec, n_perm=0)
    dec = decode_concepts(rec, n_units=(2, 64), n_draws=2, cells=cells)
    chance = dec["chance"].iloc[0]
    assert dec[dec["selection"] == "cells"]["accuracy"].iloc[0] > 0.9
    assert dec[dec["selection"] == "all"]["accuracy"].iloc[0] > 0.9 > chance * 3
    r = rdm(rec, "hidden", level="concept")
    x = rec.responses("hidden")[()].astype(np.float64)
    st = rec.stimuli
    means = np.stack([x[(st["concept"] == c).to_numpy()].mean(0) for c in r.index])
    np.testing.assert_allclose(r.to_numpy(), 1 - np.corrcoef(means), atol=1e-9)
    rs = rdm(rec, "hidden", level="stimulus", split="testing")
    xs = x[(st["split"] == "testing").to_numpy()]
    live = xs.std(0) >= 0  # every unit, as the RDM uses them
    np.testing.assert_allclose(rs.to_numpy(), 1 - np.corrcoef(xs[:, live]), atol=1e-9)
