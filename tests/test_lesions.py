"""Lesions: exactness, definitions on recorded values, planted ground truth, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import Battery, load_subject, open_recording, record
from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.lesions import (
    LesionStudy,
    cells_ranking,
    dose_response,
    forgetting,
    forgetting_matrix,
    lesion,
    rank_units,
    summarize,
)
from neuroprobe.lesions.lesion import resolve_sites
from neuroprobe.planted import make_planted

CONCEPTS = ["mother", "dog", "red"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted(tmp_path_factory.mktemp("planted"), seed=0)


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return load_subject("minilm", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def tiny_kinship(tmp_path_factory) -> Path:
    """A battery folder with three kinship concepts (every form, both splits)."""
    import json

    full = Battery.load("kinship")
    root = tmp_path_factory.mktemp("tiny")
    full.table[full.table["concept"].isin(CONCEPTS)].to_csv(root / "stimuli.csv", index=False)
    (root / "battery.json").write_text(json.dumps({"name": "tiny", "concepts": {c: full.concepts[c] for c in CONCEPTS}}))
    return root


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def read(subject, battery, rows, sites):
    """Canonical [B, T, U] tensors of ``sites`` for ``rows`` (electrodes reading)."""
    batch = subject.encode(rows, battery)
    with torch.inference_mode(), Electrodes(subject.model, resolve_sites(subject, sites)) as el:
        out = subject.forward(batch)
    return {k: v.clone() for k, v in el.data.items()}, out, batch


# ------------------------------------------------------------- exactness


@pytest.mark.parametrize("which", ["planted", "minilm"])
def test_model_bit_identical_after_lesion(which, planted, minilm, tiny_kinship):
    subject = planted.subject if which == "planted" else minilm
    battery = planted.battery if which == "planted" else Battery.load(tiny_kinship)
    site = "hidden" if which == "planted" else "encoder.layer.2.mlp"
    rows = battery.table.iloc[:6]
    params = {k: v.detach().clone() for k, v in subject.model.state_dict().items()}
    _, before, batch = read(subject, battery, rows, [site])
    before = before if isinstance(before, torch.Tensor) else before.last_hidden_state
    ref = {site: np.random.default_rng(0).standard_normal((5, 1536 if which == "minilm" else 64))}
    for mode, kw in [("zero", {}), ("mean", {"reference": ref}), ("resample", {"reference": ref}), ("scale", {"factor": 3.0})]:
        with lesion(subject, {site: [0, 3, 5]}, mode, **kw):
            with torch.inference_mode():
                lesioned = subject.forward(batch)
        lesioned = lesioned if isinstance(lesioned, torch.Tensor) else lesioned.last_hidden_state
        assert not torch.equal(lesioned, before), mode  # the lesion did something inside the block
        assert no_hooks(subject.model)
    # an error inside the block removes the hooks too
    with pytest.raises(RuntimeError):
        with lesion(subject, {site: [1]}):
            raise RuntimeError("boom")
    assert no_hooks(subject.model)
    for k, v in subject.model.state_dict().items():
        assert torch.equal(v, params[k]), k
    with torch.inference_mode():
        after = subject.forward(batch)
    after = after if isinstance(after, torch.Tensor) else after.last_hidden_state
    assert torch.equal(after, before)


# ------------------------------------------------- definitions on recorded values


def _check_definitions(subject, battery, rows, site, units, reference_means, reference_rows):
    """Record under each lesion and compare with the definition applied to the intact recording."""
    intact, _, _ = read(subject, battery, rows, [site])
    x = intact[site].numpy()
    other = np.setdiff1d(np.arange(x.shape[-1]), units)

    with lesion(subject, {site: units}, "zero"):
        y = read(subject, battery, rows, [site])[0][site].numpy()
    assert np.all(y[..., units] == 0)
    np.testing.assert_array_equal(y[..., other], x[..., other])

    for factor in (0.5, 2.5, -1.0):
        with lesion(subject, {site: units}, "scale", factor=factor):
            y = read(subject, battery, rows, [site])[0][site].numpy()
        np.testing.assert_array_equal(y[..., units], x[..., units] * np.float32(factor))
        np.testing.assert_array_equal(y[..., other], x[..., other])

    with lesion(subject, {site: units}, "mean", reference={site: reference_rows}):
        y = read(subject, battery, rows, [site])[0][site].numpy()
    expect = np.broadcast_to(reference_means[units].astype(np.float32), y[..., units].shape)
    np.testing.assert_allclose(y[..., units], expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y[..., other], x[..., other])

    with lesion(subject, {site: units}, "resample", reference={site: reference_rows}, seed=3) as les:
        y = read(subject, battery, rows, [site])[0][site].numpy()
    (draw_site, draws), = les.draws
    assert draw_site == site and len(draws) == len(rows)
    for b, j in enumerate(draws):  # every token of stimulus b carries reference stimulus j's responses
        expect = np.broadcast_to(reference_rows[j, units].astype(np.float32), y[b][..., units].shape)
        np.testing.assert_array_equal(y[b][..., units], expect)
    np.testing.assert_array_equal(y[..., other], x[..., other])
    assert len(set(draws.tolist())) > 1  # draws vary over stimuli
    with lesion(subject, {site: units}, "resample", reference={site: reference_rows}, seed=3) as again:
        read(subject, battery, rows, [site])
    np.testing.assert_array_equal(again.draws[0][1], draws)  # seeded


def test_definitions_on_planted_recorded_values(planted, tmp_path):
    subject, battery = planted.subject, planted.battery
    rec = open_recording(record(subject, battery, tmp_path / "p.h5", montage="mlp", quiet=True).path)
    screening = np.flatnonzero(rec.stimuli["split"].to_numpy() == "screening")
    responses = np.asarray(rec.responses("hidden")[()], dtype=np.float64)[screening]
    units = np.array([0, 4, 20, 33])
    rows = battery.split("testing").iloc[:10]
    _check_definitions(subject, battery, rows, "hidden", units, responses.mean(0), responses)
    # mean ablation straight from the recording equals the recording's mean response
    with lesion(subject, {"hidden": units}, "mean", reference=rec, reference_split="screening"):
        y = read(subject, battery, rows, ["hidden"])[0]["hidden"].numpy()
    np.testing.assert_allclose(y[..., units], np.broadcast_to(responses.mean(0)[units], y[..., units].shape).astype(np.float32),
                               rtol=1e-6)


def test_definitions_on_minilm_token_sites(minilm, tiny_kinship):
    battery = Battery.load(tiny_kinship)
    site = "encoder.layer.2.mlp"
    ref_rows = battery.split("screening")
    # reference responses computed independently: token means over unpadded positions
    data, _, batch = read(minilm, battery, ref_rows, [site])
    mask = batch.masks["text"].numpy()[..., None]
    pooled = (data[site].numpy().astype(np.float64) * mask).sum(1) / mask.sum(1)
    units = np.array([7, 100, 1535])
    _check_definitions(minilm, battery, battery.split("testing").iloc[:5], site, units, pooled.mean(0), pooled)
    # a stimuli-table reference is pooled the same way
    with lesion(minilm, {site: units}, "mean", reference=ref_rows, battery=battery) as les:
        pass
    np.testing.assert_allclose(les.values[site], pooled.mean(0)[units], rtol=1e-5, atol=1e-6)


def test_lesions_compose_across_sites_and_nest(minilm, tiny_kinship):
    battery = Battery.load(tiny_kinship)
    rows = battery.table.iloc[:4]
    a, b = "encoder.layer.1.mlp", "encoder.layer.4.mlp"
    with lesion(minilm, {a: [3], b: [9, 10]}):
        y = read(minilm, battery, rows, [a, b])[0]
    assert np.all(y[a].numpy()[..., 3] == 0) and np.all(y[b].numpy()[..., [9, 10]] == 0)
    x = read(minilm, battery, rows, [a])[0][a].numpy()
    with lesion(minilm, {a: [3]}, "scale", factor=2.0), lesion(minilm, {a: [3, 4]}, "scale", factor=3.0):
        y = read(minilm, battery, rows, [a])[0][a].numpy()
    np.testing.assert_array_equal(y[..., 3], x[..., 3] * np.float32(2.0) * np.float32(3.0))
    np.testing.assert_array_equal(y[..., 4], x[..., 4] * np.float32(3.0))
    assert no_hooks(minilm.model)


def test_lesion_errors(planted, minilm, tmp_path):
    s = planted.subject
    with pytest.raises(NeuroprobeError, match="reference"):
        lesion(s, {"hidden": [1]}, "mean")
    with pytest.raises(NeuroprobeError, match="factor"):
        lesion(s, {"hidden": [1]}, "scale")
    with pytest.raises(NeuroprobeError, match="mode"):
        lesion(s, {"hidden": [1]}, "burn")
    with pytest.raises(NeuroprobeError, match="no site"):
        lesion(s, {"nowhere": [1]})
    with pytest.raises(NeuroprobeError, match="out of range"):
        with lesion(s, {"hidden": [64]}):
            s.readout(planted.battery.table.iloc[:2], planted.battery)
    assert no_hooks(s.model)
    rec = record(s, planted.battery, tmp_path / "p.h5", montage="mlp", quiet=True)
    with pytest.raises(RecordingError, match="recorded from subject"):
        lesion(minilm, {"encoder.layer.0.mlp": [1]}, "mean", reference=open_recording(rec.path))


# ------------------------------------------------------------ planted truth


def test_planted_cells_forgotten_specifically_and_beat_random(planted):
    study = LesionStudy(planted.subject, planted.battery, planted.truth, quiet=True)
    for concept in ("concept0", "concept3"):
        cells = planted.truth[planted.truth["concept"] == concept]
        dose = dose_response(planted.subject, planted.battery, cells, concept, ks=[len(cells)], mode=["zero", "mean"],
                             random_draws=100, orders=("top", "random"), study=study)
        for mode, g in dose.groupby("mode"):
            top = g[g["order"] == "top"].iloc[0]
            assert top["units"] == "hidden:" + ",".join(map(str, sorted(cells["unit"])))
            assert top["target_change"] < 0
            # far more than the others: each other concept lost at most a twentieth of the target's loss
            assert top["most_hit_other_change"] > top["target_change"] / 20
            rnd = g[g["order"] == "random"]
            assert len(rnd) == 100
            assert (rnd["target_change"] <= top["target_change"]).mean() < 0.05
        table = summarize(dose)
        assert (table["p_random"] < 0.05).all() and (table["target_rank"] == 1).all()


def test_forgetting_table_matches_direct_computation(planted):
    units = [3, 4, 5]  # concept1's planted cells
    table = forgetting(planted.subject, planted.battery, planted.truth, "concept1", k=3, mode="zero", random_draws=20,
                       quiet=True)
    test = planted.battery.split("testing")
    base = planted.subject.readout(test, planted.battery)
    with lesion(planted.subject, {"hidden": units}):
        les = planted.subject.readout(test, planted.battery)
    per = pd.Series(les - base).groupby(test["concept"].to_numpy()).mean()
    row = table.iloc[0]
    assert row["k"] == 3 and row["mode"] == "zero"
    assert row["target_change"] == pytest.approx(per["concept1"])
    assert row["other_change"] == pytest.approx(per.drop("concept1").mean())


def test_own_ranking_finds_planted_cells_and_random_draws_skip_dead_units(planted, tmp_path):
    study = LesionStudy(planted.subject, planted.battery, None, quiet=True)
    hidden = 64
    dead = set(range(hidden - hidden // 8, hidden))
    truth = planted.truth
    for concept in planted.battery.concept_names:
        mine = set(truth[truth["concept"] == concept]["unit"])
        assert set(study.ranking(concept)["unit"].iloc[:3]) == mine  # the planted cells, before any other unit
    assert not dead & set(np.flatnonzero(study.active["hidden"]))
    rng = np.random.default_rng(0)
    drawn = set()
    for _ in range(200):
        drawn |= set(study.random({"hidden": np.arange(8)}, rng)["hidden"].tolist())
    assert not drawn & dead
    # ranking from a recording agrees with the study's own screening d'
    rec = open_recording(record(planted.subject, planted.battery, tmp_path / "p.h5", montage="mlp", quiet=True).path)
    r = rank_units(rec, "concept2")
    own = study.selectivity("concept2").set_index("unit")["dprime"]
    np.testing.assert_allclose(r.set_index("unit")["dprime"].sort_index(), own.sort_index(), rtol=1e-5, atol=1e-6)
    from_rec = LesionStudy(planted.subject, planted.battery, rec, quiet=True)
    assert from_rec.ranking("concept2")["unit"].tolist() == study.ranking("concept2")["unit"].tolist()


def test_forgetting_matrix_diagonal_on_planted(planted):
    m = forgetting_matrix(planted.subject, planted.battery, planted.truth, k=3, mode="zero", quiet=True)
    assert list(m.index) == planted.battery.concept_names
    for c in m.index:
        assert m.loc[c].idxmin() == c
        assert m.loc[c, c] < 20 * m.loc[c].drop(c).min()


def test_cells_ranking_columns():
    cells = pd.DataFrame({"site": ["a", "a", "b", "b", "a"], "unit": [1, 2, 3, 4, 5],
                          "best_concept": ["x", "x", "x", "y", "x"], "dprime": [1.0, 3.0, 2.0, 9.0, 5.0],
                          "is_cell": [True, True, False, True, False], "dead": [False, False, False, False, True]})
    r = cells_ranking(cells, "x")
    assert list(zip(r["site"], r["unit"])) == [("a", 2), ("a", 1), ("b", 3)]
    r2 = cells_ranking(cells.rename(columns={"dprime": "auc_x"}), "x", columns={"score": "auc_x"})
    assert list(r2["unit"]) == [2, 1, 3]
    with pytest.raises(NeuroprobeError, match="concept"):
        cells_ranking(cells.drop(columns="best_concept"), "x")


def test_split_must_differ(planted):
    with pytest.raises(NeuroprobeError, match="other"):
        LesionStudy(planted.subject, planted.battery, None, split="screening", rank_split="screening")


# ------------------------------------------------------------------ CLI


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow  # loads MiniLM in a subprocess and runs ~40 lesioned evaluations (20-40 s)
def test_cli_lesion_minilm(minilm, tiny_kinship, tmp_path):
    cells = pd.DataFrame({"site": ["encoder.layer.3.mlp", "encoder.layer.3.mlp", "encoder.layer.5.mlp", "encoder.layer.1.mlp"],
                          "unit": [11, 700, 42, 5], "best_concept": ["mother", "mother", "mother", "dog"],
                          "dprime": [2.0, 3.0, 1.0, 4.0]})
    cells.to_csv(tmp_path / "cells.csv", index=False)
    res = cli("lesion", "--model", "minilm", "--device", "cpu", "--cells", "cells.csv", "--concept", "mother",
              "--k", "1,3", "--random-draws", "4", "--keep-draws", "1", "--probe", str(tiny_kinship), "--out", "out",
              "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "target_change" in res.stdout and "mother" in res.stdout
    out = tmp_path / "out"
    for name in ("forgetting.csv", "dose_response.csv", "forgetting_matrix_zero.csv", "forgetting_matrix_mean.csv",
                 "dose_response_mother.png", "forgetting_matrix.png"):
        assert (out / name).exists(), name
    table = pd.read_csv(out / "forgetting.csv")
    assert set(zip(table["mode"], table["k"])) == {("zero", 1), ("zero", 3), ("mean", 1), ("mean", 3)}
    # the top-1 unit is the best d' one (layer 3, unit 700); its zero-lesion change equals a direct computation
    battery = Battery.load(tiny_kinship)
    minilm.prepare_readout(battery, "prototype")
    test = battery.split("testing")
    base = minilm.readout(test, battery, "prototype")
    with lesion(minilm, {"encoder.layer.3.mlp": [700]}):
        les = minilm.readout(test, battery, "prototype")
    per = pd.Series(les - base).groupby(test["concept"].to_numpy()).mean()
    row = table[(table["mode"] == "zero") & (table["k"] == 1)].iloc[0]
    assert row["units"] == "encoder.layer.3.mlp:700"
    assert row["target_change"] == pytest.approx(per["mother"], abs=1e-6)
    assert row["other_change"] == pytest.approx(per.drop("mother").mean(), abs=1e-6)
    assert 0 < row["p_random"] <= 1 and row["n_random"] == 4


def test_cli_lesion_rejects_unknown_concept(tiny_kinship, tmp_path):
    bad = cli("lesion", "--model", "minilm", "--device", "cpu", "--concept", "unicorn", "--probe", str(tiny_kinship),
              "--quiet", "--out", "out2", cwd=tmp_path)
    assert bad.returncode == 2
    assert "unicorn" in bad.stderr and "Traceback" not in bad.stderr


def test_forgetting_from_concept_cells_table(planted, tmp_path):
    """The analysis' cells table plugs in as is: its cells of a concept are the planted ones and are forgotten."""
    from neuroprobe.analysis import concept_cells

    rec = record(planted.subject, planted.battery, tmp_path / "p.h5", montage="mlp", quiet=True)
    cells = concept_cells(rec)
    table = forgetting(planted.subject, planted.battery, cells, "concept2", mode="zero", random_draws=30, quiet=True)
    row = table.iloc[0]
    planted_units = sorted(planted.truth[planted.truth["concept"] == "concept2"]["unit"])
    assert row["k"] == len(planted_units)  # default k: the table's cells for the concept
    assert row["units"] == "hidden:" + ",".join(map(str, planted_units))
    assert row["p_random"] < 0.05 and row["target_change"] < 20 * row["most_hit_other_change"]
