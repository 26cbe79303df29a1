"""Batched, prefix-cached lesions equal one-at-a-time lesions; sequential random controls keep the fixed decision."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import Battery, load_subject
from neuroprobe.lesions import LesionStudy
from neuroprobe.lesions.forgetting import sequential_h, sequential_p, summarize
from neuroprobe.lesions.staged import make_runner, replica_edits, resolve_blocks, stage_of
from neuroprobe.subjects.base import Site

KINSHIP = ["mother", "dog", "red"]


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    return load_subject("organism", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def tiny_digits() -> Battery:
    """Four stimuli of every concept x modality x split of the digits battery (images and texts)."""
    full = Battery.load("digits")
    t = full.table
    rows = t.groupby(["concept", "modality", "split"], sort=False).head(4)
    return Battery.from_table(rows, concepts=full.concepts, name="digits", root=full.root)


@pytest.fixture(scope="module")
def org_study(organism, tiny_digits):
    return LesionStudy(organism, tiny_digits, None, sites="all", quiet=True, batch_size=48)


@pytest.fixture(scope="module")
def minilm_study():
    torch.set_num_threads(1)
    subject = load_subject("minilm", device="cpu", quiet=True)
    full = Battery.load("kinship")
    rows = full.table[full.table["concept"].isin(KINSHIP)]
    battery = Battery.from_table(rows, concepts={c: full.concepts[c] for c in KINSHIP}, name="tiny", root=full.root)
    return LesionStudy(subject, battery, None, sites="encoder.layer.0.mlp,encoder.layer.5.mlp", quiet=True, batch_size=16)


def close(single: list[pd.Series], many: list[pd.Series], scale: float) -> None:
    """Equal up to the backend's rounding: 1e-5 of the readout's scale (log-probabilities of ~1)."""
    for a, b in zip(single, many):
        np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------- replica edits


@pytest.mark.parametrize("mode", ["zero", "mean", "scale"])
def test_replica_edit_is_each_lesion_on_its_own_rows(mode):
    rng = np.random.default_rng(0)
    L, B, T, U = 5, 3, 4, 11
    lesions = [{"s": np.sort(rng.choice(U, size=rng.integers(1, 5), replace=False))} for _ in range(L)]
    lesions[2] = {}  # a replica that does not lesion this site stays intact
    ref = {"s": rng.standard_normal((7, U))}
    edit = replica_edits(lesions, mode, factor=2.5 if mode == "scale" else None, reference=ref)["s"]
    x = torch.randn(L * B, T, U)
    y = edit(x, Site("s", "m"))
    for r, les in enumerate(lesions):
        want = x[r * B : (r + 1) * B].clone()
        if les:
            idx = torch.as_tensor(les["s"])
            if mode == "zero":
                want[..., idx] = 0.0
            elif mode == "scale":
                want[..., idx] = want[..., idx] * 2.5
            else:
                want[..., idx] = torch.as_tensor(ref["s"][:, les["s"]].mean(0), dtype=x.dtype)
        assert torch.equal(y[r * B : (r + 1) * B], want), r


def test_blocks_are_data_and_sites_map_to_them(organism):
    blocks = resolve_blocks(organism)
    assert blocks["text"][:3] == ["text.embed", "text.layers.0", "text.layers.1"]
    by_name = {s.name: s for s in organism.sites("all")}
    assert stage_of(blocks, by_name["text.layers.1.mlp.act"]) == ("text", 2)
    assert stage_of(blocks, by_name["image.fc"]) == ("image", blocks["image"].index("image.fc"))
    assert stage_of(blocks, by_name["joint.embed"]) == ("joint", 0)


# ------------------------------------------------------------- equality


def _lesions(study, concept, rng, sites=None):
    top = study.top(concept, 6)
    per_site = [{s: np.sort(rng.choice(np.flatnonzero(study.active[s]), 3, replace=False))} for s in sites or study.site_names]
    return [top, study.bottom(concept, top), study.random(top, rng)] + per_site


def test_organism_batched_equals_one_at_a_time(org_study):
    study = org_study
    assert study.engine.startswith("batched (organism runner")
    rng = np.random.default_rng(1)
    # a first image block, a text layer, the last text block; then image and shared embedding together
    lesions = _lesions(study, "seven", rng, ["image.conv2", "text.layers.0.mlp.act", "text.proj"])
    lesions.append({"image.conv1": np.array([0, 5]), "joint.embed": np.array([3, 9])})
    for mode in ("zero", "mean", "scale"):
        factor = 0.3 if mode == "scale" else None
        chosen = lesions if mode == "zero" else lesions[::2]
        single = [study.evaluate(u, mode, factor=factor) for u in chosen]
        many = study.evaluate_many(chosen, mode, factor=factor)
        close(single, many, 1.0)
        # the lesions do something, and differently: the test could fail
        moved = [float(np.abs(s.to_numpy()).max()) for s in single]
        assert max(moved) > 1e-3 and len({round(m, 6) for m in moved}) > len(moved) // 2
    # without the prefix cache (raw inputs replicated), the same numbers
    study._engine.prefix_cache = False
    try:
        close([study.evaluate(u, "zero") for u in lesions[2:5]], study.evaluate_many(lesions[2:5], "zero"), 1.0)
    finally:
        study._engine.prefix_cache = True


def test_minilm_batched_equals_one_at_a_time(minilm_study):
    study = minilm_study
    assert study.engine.startswith("batched (generic runner, prefix-cached")
    # an MLP site resumes at its layer's output sub-block (the third the layer calls); an attention site at the layer
    runner = study._engine.runner
    sites = {s.name: s for s in study.subject.sites("all")}
    assert runner.child_order["encoder.layer.5"] == ["attention", "intermediate", "output"]
    # block 0 of the chain is the embeddings (they run on every replica's copy otherwise), layer i is block i + 1
    assert runner.blocks["text"][0] == "embeddings"
    assert runner.cut_of(sites["encoder.layer.5.mlp"]) == ("text", (6, 2))
    assert runner.cut_of(sites["encoder.layer.5.attn"]) == ("text", (6, 0))
    assert runner.cut_of(sites["encoder.layer.0"]) == ("text", (1, 0))
    rng = np.random.default_rng(2)
    lesions = _lesions(study, "mother", rng)
    for mode in ("zero", "mean"):
        chosen = lesions if mode == "zero" else lesions[:2]
        single = [study.evaluate(u, mode) for u in chosen]
        many = study.evaluate_many(chosen, mode)
        close(single, many, 1.0)
        assert max(float(np.abs(s.to_numpy()).max()) for s in single) > 1e-4


def test_memory_budget_chunks_and_resample_falls_back(org_study):
    study = org_study
    rng = np.random.default_rng(3)
    lesions = _lesions(study, "two", rng, ["image.fc"])
    whole = study.evaluate_many(lesions, "zero")
    budget = study._engine.memory
    study._engine.memory = 1.0  # one replica per pass
    try:
        close(whole, study.evaluate_many(lesions, "zero"), 1.0)
    finally:
        study._engine.memory = budget
    # resample: each replica draws what its single run draws, so the batched numbers equal evaluate()
    res = study.evaluate_many(lesions[:2], "resample")
    close([study.evaluate(u, "resample") for u in lesions[:2]], res, 1.0)


def test_subject_without_blocks_says_so_and_falls_back(minilm_study, tmp_path):
    from neuroprobe.planted import make_planted

    runner, why = make_runner(minilm_study.subject, minilm_study.battery, "masked_lm")
    assert runner is None and "no readout 'masked_lm'" in why
    planted = make_planted(tmp_path, seed=0)
    classify = planted.subject.readouts["classify"]
    # the same readout, not marked replica-safe (a user's own readout before it declares itself so)
    planted.subject.readouts = {"classify": lambda subject, stimuli, battery: classify(subject, stimuli, battery)}
    with pytest.warns(UserWarning, match="one at a time: readout 'classify' of subject 'planted' is not marked replica-safe"):
        study = LesionStudy(planted.subject, planted.battery, None, sites="all", quiet=True)
    assert study.engine.startswith("one lesion at a time")
    units = [{study.site_names[0]: np.array([1, 2])}, {study.site_names[0]: np.array([3])}]
    close([study.evaluate(u) for u in units], study.evaluate_many(units), 1.0)


# ------------------------------------------------------------- sequential


def test_sequential_decision_is_the_fixed_decision_and_valid():
    rng = np.random.default_rng(0)
    for n_max in (19, 50, 100, 999):
        for alpha in (0.01, 0.05, 0.1):
            for rate in (0.0, 0.01, 0.05, 0.2, 0.6):
                for _ in range(30):
                    exceed = rng.random(n_max) < rate
                    p_fixed = (1 + exceed.sum()) / (1 + n_max)
                    p_seq, used = sequential_p(exceed, n_max, alpha)
                    assert (p_seq <= alpha) == (p_fixed <= alpha)
                    assert 1 <= used <= n_max
                    if used < n_max:
                        assert exceed[:used].sum() == sequential_h(alpha, n_max) and exceed[used - 1]
    # under the null the observed lesion is exchangeable with the draws: P(p <= alpha) <= alpha
    n_max, alpha, trials = 99, 0.05, 4000
    ranks = rng.random((trials, n_max + 1))
    exceed = ranks[:, 1:] <= ranks[:, :1]
    rejected = np.mean([sequential_p(e, n_max, alpha)[0] <= alpha for e in exceed])
    assert rejected <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    # and a null lesion stops early: about h / P(exceed) draws
    assert np.mean([sequential_p(e, n_max, alpha)[1] for e in exceed]) < 40


def test_sequential_dose_response_matches_fixed_decisions(org_study):
    study = org_study
    kw = dict(modes="zero", orders=("top", "random"), random_draws=40)
    seq = summarize(study.dose_response("seven", [1, 6], sequential=True, alpha=0.05, **kw))
    fixed = summarize(study.dose_response("seven", [1, 6], **kw))
    assert set(seq["p_method"]) == {"sequential"} and set(fixed["p_method"]) == {"fixed"}
    assert (seq["n_random"] <= 40).all() and (fixed["n_random"] == 40).all()
    for col in ("p_random", "p_random_specific"):
        assert ((seq[col] <= 0.05) == (fixed[col] <= 0.05)).all()
    # the draws used are a prefix of the fixed draws
    assert np.allclose(seq["random_target_change"].notna(), True)


# ------------------------------------------------------------- CLI


def test_cli_takes_the_battery_from_the_recording_of_the_cells(tmp_path, tiny_digits):
    # the recording's battery: a small digits battery in a folder (images by absolute path)
    folder = tmp_path / "smalldigits"
    folder.mkdir()
    table = tiny_digits.table.copy()
    table["image"] = [str(tiny_digits.root / p) if p else "" for p in table["image"]]
    table.to_csv(folder / "stimuli.csv", index=False)
    (folder / "battery.json").write_text(json.dumps({"name": "smalldigits", "concepts": tiny_digits.concepts,
                                                     "allow_outside_images": True}))
    cells = pd.DataFrame({"site": ["image.fc"] * 3, "unit": [1, 2, 3], "concept": ["three"] * 3, "score": [3.0, 2.0, 1.0]})
    path = tmp_path / "cells.csv"
    cells.to_csv(path, index=False)
    (tmp_path / "cells.csv.json").write_text(json.dumps({"battery": str(folder), "init": "pretrained", "subject": "organism",
                                                         "recording": "recordings/organism_digits_all.h5"}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "neuroprobe.cli", "lesion", "--model", "organism", "--cells", str(path), "--concept", "three",
           "--k", "1", "--mode", "zero", "--random-draws", "3", "--keep-draws", "0", "--no-matrix", "--batch-size", "512",
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "battery: smalldigits (the battery of recordings/organism_digits_all.h5" in r.stderr
    assert "exactly 3 per k and mode" in r.stdout
    table = pd.read_csv(tmp_path / "out" / "forgetting.csv")
    assert table["concept"].tolist() == ["three"] and table["n_random"].tolist() == [3]
