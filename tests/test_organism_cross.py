"""The cross-modal organism: registry entry, fused encoding, recording, readouts, training, battery, lesions, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism import train as T
from neuroprobe.subjects.organism.cross import EMPTY, CrossConfig, build_cross

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "neuroprobe" / "subjects" / "organism" / "weights"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def battery():
    from neuroprobe.stimuli.battery import Battery

    return Battery.load(D.PAIRS_BATTERY)


@pytest.fixture(scope="module")
def untrained():
    from neuroprobe.subjects import load_subject

    return load_subject("organism-cross", init="random", device="cpu", quiet=True)


def _sample(battery, n_per_form: int = 2) -> pd.DataFrame:
    return battery.table.groupby("form", sort=False).head(n_per_form)


# ------------------------------------------------------------------ registry
def test_registered_beside_the_organism():
    from neuroprobe.subjects.registry import REGISTRY

    spec, dual = REGISTRY["organism-cross"], REGISTRY["organism"]
    assert spec.loader == dual.loader  # one loader, the architecture is data
    assert spec.extra["arch"] == "cross" and "arch" not in dual.extra
    assert spec.modalities == ("text", "image", "pair") and spec.default_battery == D.PAIRS_BATTERY


def test_both_fusion_designs_build_and_site_patterns_resolve():
    from neuroprobe.subjects.organism.cross_subject import CrossSubject

    for fusion, layers in (("single", 2), ("co", 1)):
        subject = CrossSubject(build_cross(CrossConfig(fusion=fusion, layers=layers)), name="organism-cross")
        names = {s.name for s in subject.sites("all")}
        assert {"image.conv1", "image.conv2", "image.patches", "head.fc", "head.proj", "joint.embed"} <= names
        if fusion == "single":
            assert {"fusion.layers.1.mlp.act", "fusion.layers.1.attn.heads", "fusion.layers.1", "fusion.embed"} <= names
        else:
            assert {"layers.0.text.mlp.act", "layers.0.image.mlp.act", "layers.0.text.co.heads", "layers.0.text",
                    "layers.0.image"} <= names


# ------------------------------------------------------------------ encoding
def test_one_modality_each_image_alone_text_alone_and_pairs(untrained, battery):
    rows = _sample(battery, 1)
    batch = untrained.encode(rows, battery)
    modality = rows["modality"].to_numpy()
    ids, mask, images = batch.inputs["text_ids"], batch.inputs["text_mask"], batch.inputs["images"]
    for k, m in enumerate(modality):
        if m == "image":  # the text side is the one neutral token
            assert ids[k][mask[k]].tolist() == [EMPTY] and images[k].abs().sum() > 0
        elif m == "text":  # the image side is blank
            assert images[k].abs().sum() == 0
            assert bytes(ids[k][mask[k]].tolist()).decode("utf-8") == rows.iloc[k]["text"]
        else:
            assert images[k].abs().sum() > 0 and bytes(ids[k][mask[k]].tolist()).decode("utf-8") == rows.iloc[k]["text"]


def test_every_site_sees_every_modality_in_one_recording(untrained, battery, tmp_path):
    from neuroprobe.electrodes import record_once
    from neuroprobe.recording import record
    from neuroprobe.stimuli.battery import Battery

    rows = _sample(battery, 2).reset_index(drop=True)
    small = Battery.from_table(rows, battery.concepts, name="digits-cross-small", root=battery.root)
    rec = record(untrained, small, tmp_path / "r.h5", montage="all", quiet=True)
    sites = untrained.sites("all")
    assert set(rec.site_names) == {s.name for s in sites}
    for s in sites:
        x = np.asarray(rec.responses(s.name))
        assert x.shape[0] == len(rows) and np.isfinite(x).all(), s.name  # images, texts and pairs alike
    # the recorded head.fc units are the model's own, computed directly
    batch = untrained.encode(rows, small)
    with torch.inference_mode():
        pooled = untrained.model.encode(batch.inputs["images"], batch.inputs["text_ids"], batch.inputs["text_mask"])
        direct = untrained.model.head.fc(pooled["pooled"]).numpy()
        data = record_once(untrained.model, [s for s in sites if s.name == "fusion.layers.0.mlp.act"],
                           lambda: untrained.forward(batch))
    np.testing.assert_allclose(np.asarray(rec.responses("head.fc")), direct, rtol=1e-5, atol=1e-6)
    # a joint-stream site pools [CLS], the 16 image tokens and the real text tokens
    mask = batch.masks["joint"]
    x = data["fusion.layers.0.mlp.act"]
    assert x.shape[:2] == mask.shape
    mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(np.asarray(rec.responses("fusion.layers.0.mlp.act")), mean.numpy(), rtol=1e-5, atol=1e-6)


def test_zero_shot_readout_matches_direct_computation(untrained, battery):
    rows = _sample(battery, 2)
    scores = untrained.readout(rows, battery, "zero_shot")
    model = untrained.model
    with torch.inference_mode():
        prompts = T.prompt_embeddings(model, [battery.concepts[c]["prompt"] for c in battery.concepts])
        protos = T.image_prototypes(model)
        emb = untrained.forward(untrained.encode(rows, battery))
        s = model.scale()
    concepts = list(battery.concepts)
    expected = []
    for k, (m, c) in enumerate(zip(rows["modality"], rows["concept"])):
        ref = protos if m == "text" else prompts  # texts retrieve images; images and pairs are scored on prompts
        expected.append(float((s * emb[k] @ ref.T).log_softmax(-1)[concepts.index(c)]))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ training
def test_short_cross_training_is_bitwise_reproducible_and_restores_threads():
    before, rng_before = torch.get_num_threads(), torch.get_rng_state()
    cfg = CrossConfig(layers=1)
    a, la = T.train_model(seed=0, steps=3, arch="cross", config=cfg)
    b, lb = T.train_model(seed=0, steps=3, arch="cross", config=cfg)
    c, _ = T.train_model(seed=1, steps=3, arch="cross", config=cfg)
    assert torch.get_num_threads() == before and torch.equal(torch.get_rng_state(), rng_before)
    assert la == lb and T.state_sha256(a) == T.state_sha256(b) != T.state_sha256(c)
    assert all(np.isfinite(la))


def test_objectives_can_be_switched_off():
    from neuroprobe.subjects.organism import cross_train as CT

    td = D.training_data()
    model = build_cross(CrossConfig(layers=1))
    off = {k: 0.0 for k in CT.RECIPE["weights"]}
    step = CT.cross_objective(model, td, {**CT.RECIPE, "weights": off})
    assert float(step(torch.Generator().manual_seed(0))) == 0.0
    only = CT.cross_objective(model, td, {**CT.RECIPE, "weights": {**off, "masked_text": 1.0}})
    assert 0.0 < float(only(torch.Generator().manual_seed(0))) < 10.0


def test_patch_pixels_are_each_tokens_region():
    from neuroprobe.subjects.organism.cross_train import patch_pixels

    x = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    p = patch_pixels(x, 4)
    assert p.shape == (2, 16, 64)
    assert torch.equal(p[1, 5], x[1, 0, 8:16, 8:16].reshape(-1))  # token 5 = row 1, column 1


def test_word_spans_cover_the_digit_word():
    td = D.training_data()
    for k in range(0, len(td.text_ids), 997):
        a, b = td.text_word[k].tolist()
        word = bytes(td.text_ids[k, a:b].tolist()).decode("utf-8")
        assert word in D.concept_names(int(td.text_labels[k])) or word.lower() in D.concept_names(int(td.text_labels[k])) \
            or word.upper() in D.concept_names(int(td.text_labels[k]))


def test_unknown_arch_is_one_sentence():
    with pytest.raises(NeuroprobeError, match="unknown organism architecture"):
        T.get_arch("triple")
    res = run_cli("train-organism", "--arch", "triple", "--steps", "1")
    assert res.returncode == 2 and res.stderr.strip().startswith("neuroprobe: error:") and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- battery
def test_digits_cross_is_digits_plus_pairs(battery):
    from neuroprobe.stimuli.battery import Battery

    digits = Battery.load("digits").table
    t = battery.table
    single = t[t["modality"] != "pair"].reset_index(drop=True)
    pd.testing.assert_frame_equal(single, digits.reset_index(drop=True))
    pairs = t[t["modality"] == "pair"]
    assert set(pairs["form"]) == {"pair-handwritten", "pair-written"}
    counts = pairs.groupby(["form", "split", "concept"]).size()
    assert len(counts) == 2 * 2 * 10  # every concept in both pair forms and splits
    # each pair shows an image of its own split and concept, and a text of its split's templates
    images = digits.set_index("image")
    for r in pairs.itertuples():
        src = images.loc[r.image]
        assert (src["concept"], src["split"]) == (r.concept, r.split)
        template = r.cloze.replace("{mask}", "{}")
        assert r.cloze.replace("{mask}", r.target) == r.text
        assert (D.HELDOUT_TEMPLATES.index(template) < 3) == (r.split == "screening")
        assert r.target in battery.concepts[r.concept]["names"]


def test_digits_cross_rebuilds_identically(tmp_path, battery):
    D.build_digits_battery(tmp_path, pairs=(10, 5))
    here = ROOT / "probes" / D.PAIRS_BATTERY
    assert (tmp_path / "stimuli.csv").read_bytes() == (here / "stimuli.csv").read_bytes()
    assert (tmp_path / "battery.json").read_bytes() == (here / "battery.json").read_bytes()
    for rel in battery.table["image"][battery.table["image"] != ""][::40]:
        assert (tmp_path / rel).read_bytes() == (here / rel).read_bytes(), rel


# ------------------------------------------------------------------- lesions
def test_lesion_study_reads_one_modality(untrained, battery):
    from neuroprobe.lesions.forgetting import LesionStudy
    from neuroprobe.stimuli.battery import Battery

    rows = battery.table.groupby(["form", "split", "concept"], sort=False).head(2).reset_index(drop=True)
    small = Battery.from_table(rows, battery.concepts, name="digits-cross-small", root=battery.root)
    both = LesionStudy(untrained, small, None, sites="head.fc", quiet=True, batch_size=64)
    img = LesionStudy(untrained, small, None, sites="head.fc", quiet=True, batch_size=64, modality="image")
    txt = LesionStudy(untrained, small, None, sites="head.fc", quiet=True, batch_size=64, modality="text")
    assert set(img.test["modality"]) == {"image"} and set(txt.test["modality"]) == {"text"}
    assert len(both.test) == len(img.test) + len(txt.test) + int((both.test["modality"] == "pair").sum())
    # the same units are ranked and drawn, whatever is evaluated
    assert img.ranking("seven").equals(txt.ranking("seven"))
    rng = [np.random.default_rng(3) for _ in range(2)]
    template = img.top("seven", 4)
    assert all(np.array_equal(a, b) for a, b in zip(img.random(template, rng[0]).values(), txt.random(template, rng[1]).values()))
    # the image-side baseline is the both-sides baseline on the image stimuli
    np.testing.assert_allclose(img.baseline, both.baseline[(both.test["modality"] == "image").to_numpy()], rtol=1e-6, atol=1e-6)
    with pytest.raises(NeuroprobeError, match="no sound stimuli"):
        LesionStudy(untrained, small, None, sites="head.fc", quiet=True, modality="sound")


# ------------------------------------------------------------------- atlas
def test_atlas_decodes_the_joint_stream():
    from neuroprobe.atlas.stimuli import token_decoder

    decode = token_decoder({"subject": "organism-cross"})
    ids = np.array([256, 1000, 1015] + list("칠 a".encode()) + [257])
    assert [s for s, _ in decode(ids)] == ["[CLS]", "\u25a60", "\u25a615", "칠", " ", "a", "\u2205"]


# ------------------------------------------------------------ committed weights
@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((WEIGHTS / "card-cross.json").read_text(encoding="utf-8"))


def test_committed_weights_match_card(card):
    path = WEIGHTS / "organism-cross.safetensors"
    assert T.sha256_file(path) == card["weights_sha256"]
    model = T.load_weights(path)
    assert type(model).__name__ == "CrossModel" and model.config.fusion == "single"
    assert T.state_sha256(model) == card["state_sha256"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    # small: no bigger than the dual encoder's file
    assert path.stat().st_size <= (WEIGHTS / "organism.safetensors").stat().st_size


def test_committed_weights_reproduce_card_accuracy(card):
    metrics = T.evaluate(T.load_weights(WEIGHTS / "organism-cross.safetensors"))
    for part in ("handwritten", "written", "text", "matching"):
        assert metrics[part]["n"] == card["heldout"][part]["n"]
        assert abs(metrics[part]["accuracy"] - card["heldout"][part]["accuracy"]) < 1e-6, part
    assert metrics["handwritten"]["accuracy"] > 0.9 and metrics["matching"]["accuracy"] > 0.7


def test_record_then_cells_finds_the_cards_multimodal_cells(card, tmp_path):
    """What the README promises: `neuroprobe record --model organism-cross` then `neuroprobe cells`, offline."""
    res = run_cli("record", "--model", "organism-cross", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rec = tmp_path / "recordings" / "organism-cross_digits-cross_mlp.h5"
    res = run_cli("cells", str(rec), "--out", str(tmp_path / "cells.csv"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cells = pd.read_csv(tmp_path / "cells.csv")
    want = card["phenomenon"]["digits-cross"]
    assert int(cells["is_cell"].sum()) == want["cells"]
    assert int(cells["multimodal"].sum()) == want["multimodal"]
    mm = cells[cells["multimodal"]]
    assert mm["concept"].nunique() == want["multimodal_concepts"] >= 6  # most of the ten digits
    for site, n in want["per_site"].items():
        assert int(cells.loc[cells["site"] == site, "multimodal"].sum()) == n["multimodal"], site
    # a multimodal cell passes the effect size in every modality of the testing split
    assert (mm[["z_modality:image", "z_modality:text", "z_modality:pair"]] > 5).all().all()
    rotated = pd.read_csv(tmp_path / "cells.rotation.csv")
    assert int(rotated["multimodal"].sum()) <= 1


def test_untrained_twin_has_no_cells(tmp_path):
    import neuroprobe as npb

    subject = npb.load_subject("organism-cross", init="random", device="cpu", quiet=True)
    rec = npb.record(subject, npb.load_battery(D.PAIRS_BATTERY), tmp_path / "r.h5", montage="mlp", quiet=True)
    cells = npb.concept_cells(rec, quiet=True, n_perm=0)
    assert int(cells["is_cell"].sum()) == 0


def test_readme_states_the_cards_numbers(card):
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    want = card["phenomenon"]["digits-cross"]
    assert f"{want['cells']} concept cells, {want['multimodal']} of them multimodal" in readme
    assert f"for {want['multimodal_concepts']} of the 10 digits" in readme
    h = card["heldout"]
    for key in ("handwritten", "written", "text", "matching"):
        assert f"{h[key]['accuracy']:.3f}" in readme, key
    assert f"{round(card['parameters'] / 1000)}k parameters" in readme
    lesion = {r["readout"]: r for r in card["phenomenon"]["lesion"]["rows"]}
    assert f"on images by {-lesion['image side']['target_change']:.3f}" in readme
    assert f"on texts by {-lesion['text side']['target_change']:.3f}" in readme


def test_subjects_command_prints_the_cross_card():
    res = run_cli("subjects", "organism-cross")
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "subjects", "organism-cross"], capture_output=True,
                         text=True, env=env, timeout=120).stdout
    assert "neuroprobe cross-modal organism" in out and '"design"' in out and "digits-cross" in out


def test_train_organism_command_cross(tmp_path):
    out = tmp_path / "w"
    res = run_cli("train-organism", "--arch", "cross", "--steps", "2", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    card = json.loads((out / "card-cross.json").read_text())
    assert card["steps"] == 2 and card["arch"] == "cross"
    assert T.sha256_file(out / "organism-cross.safetensors") == card["weights_sha256"]
    from neuroprobe.subjects import load_subject

    s = load_subject("organism-cross", weights=out, device="cpu", quiet=True)
    assert T.state_sha256(s.model) == card["state_sha256"]


@pytest.mark.slow
def test_full_cross_training_reproduces_committed_weights(card):
    if card["versions"]["torch"] != torch.__version__:
        pytest.skip("bitwise reproduction is only claimed for the same torch version")
    model, _ = T.train_model(seed=card["seed"], steps=card["steps"], n_threads=card["threads"], arch="cross")
    assert T.state_sha256(model) == card["state_sha256"]
