"""The organism: data, training determinism, committed weights, battery, subject, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism import train as T
from neuroprobe.subjects.organism.model import OrganismConfig, build_model

REPO = Path(__file__).resolve().parents[1]
BATTERY_DIR = REPO / "probes" / "digits"


# ----------------------------------------------------------------------- data
def test_training_data_is_deterministic():
    a, b = D.training_data(), D.training_data()
    for field in ("hw_images", "hw_labels", "written_images", "written_labels", "text_ids", "text_mask", "text_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # every concept has handwriting, drawn names and texts
    for t in (a.hw_labels, a.written_labels, a.text_labels):
        assert set(t.tolist()) == set(range(10))


def test_handwritten_matches_sklearn_and_split_is_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels, idx = D.handwritten(np.array([0, 5, 1500]))
    assert labels.tolist() == raw.target[[0, 5, 1500]].tolist()
    # the 24x24 centre is the upscaled 8x8 digit: its 3x3-block means follow the original's ordering
    centre = images[0, 4:28, 4:28]
    assert images[0].shape == (32, 32) and np.all(images[0, :4] == 0) and np.all(images[0, 28:] == 0)
    small = centre.reshape(8, 3, 8, 3).mean((1, 3))
    assert np.corrcoef(small.ravel(), raw.images[0].ravel())[0, 1] > 0.9
    train, held = D.handwritten_split("train"), D.handwritten_split("heldout")
    assert not set(train) & set(held) and len(train) + len(held) == len(raw.target)


def test_templates_and_fonts_are_held_out():
    assert not set(D.HELDOUT_TEMPLATES) & set(D.TRAIN_TEMPLATES + D.random_templates())
    assert not {f.name for f in D.HELDOUT_FONTS} & {f.name for f in D.TRAIN_FONTS}
    # held-out templates' distinctive words never occur in training text
    train_words = set(" ".join(D.TRAIN_TEMPLATES + D.random_templates()).split())
    for word in ("image", "sketch", "shows", "그림", "이것은"):
        assert word not in train_words


def test_render_and_augment_are_deterministic():
    a = D.render_text("seven", D.HELDOUT_FONTS[1], (1, -1))
    b = D.render_text("seven", D.HELDOUT_FONTS[1], (1, -1))
    assert a.shape == (32, 32) and a.max() > 0.5 and np.array_equal(a, b)
    assert not np.array_equal(a, D.render_text("eight", D.HELDOUT_FONTS[1], (1, -1)))
    x = torch.rand(4, 1, 32, 32)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (3, 3, 4))
    assert torch.equal(D.augment(x, g1), D.augment(x, g2))
    assert not torch.equal(D.augment(x, torch.Generator().manual_seed(3)), D.augment(x, g3))


def test_tokenize_utf8_bytes():
    ids, mask = D.tokenize(["seven", "일곱의 사진"])
    assert bytes(ids[1][mask[1]].tolist()).decode("utf-8") == "일곱의 사진"
    assert mask[0].sum() == 5 and ids.shape[1] == len("일곱의 사진".encode())


# ------------------------------------------------------------------- training
def test_contrastive_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    il, tl = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([1, 0, 1, 2])
    scale = torch.tensor(7.0)
    got = float(T.contrastive_loss(img, txt, il, tl, scale))
    s = (scale * img @ txt.T).tolist()
    rows = []
    for i in range(5):
        pos = [j for j in range(4) if tl[j] == il[i]]
        if pos:
            z = math.log(sum(math.exp(v) for v in s[i]))
            rows.append(sum(z - s[i][j] for j in pos) / len(pos))
    cols = []
    for j in range(4):
        pos = [i for i in range(5) if il[i] == tl[j]]
        z = math.log(sum(math.exp(s[i][j]) for i in range(5)))
        cols.append(sum(z - s[i][j] for i in pos) / len(pos))
    expected = 0.5 * (sum(rows) / len(rows) + sum(cols) / len(cols))
    assert got == pytest.approx(expected, rel=1e-5)


def test_short_training_is_bitwise_reproducible_and_restores_threads():
    before = torch.get_num_threads()
    rng_before = torch.get_rng_state()
    a, la = T.train_model(seed=0, steps=20)
    b, lb = T.train_model(seed=0, steps=20)
    c, _ = T.train_model(seed=1, steps=20)
    assert torch.get_num_threads() == before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert la == lb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert la[-1] < la[0]  # it learns something even in 20 steps


def test_save_and_load_roundtrip(tmp_path):
    model = build_model(OrganismConfig(), seed=3)
    digest = T.save_weights(model, tmp_path / "w.safetensors")
    assert digest == T.sha256_file(tmp_path / "w.safetensors")
    loaded = T.load_weights(tmp_path / "w.safetensors")
    assert T.state_sha256(loaded) == T.state_sha256(model)


# ---------------------------------------------------------- committed weights
@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((T.WEIGHTS_DIR / T.CARD_FILE).read_text(encoding="utf-8"))


def test_committed_weights_match_card(card):
    path = T.WEIGHTS_DIR / T.WEIGHTS_FILE
    assert T.sha256_file(path) == card["weights_sha256"]
    model = T.load_weights(path)
    assert T.state_sha256(model) == card["state_sha256"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert path.stat().st_size < 1_200_000


def test_committed_weights_reproduce_card_accuracy(card):
    metrics = T.evaluate(T.load_weights(T.WEIGHTS_DIR / T.WEIGHTS_FILE))
    for part in ("handwritten", "written", "text"):
        assert metrics[part]["n"] == card["heldout"][part]["n"]
        assert abs(metrics[part]["accuracy"] - card["heldout"][part]["accuracy"]) < 1e-6, part
        for c, v in card["heldout"][part]["per_concept"].items():
            assert abs(metrics[part]["per_concept"][c] - v) < 1e-6, (part, c)
    # the organism knows its digits: far above chance (0.1) on held-out images
    assert metrics["handwritten"]["accuracy"] > 0.9
    assert metrics["written"]["accuracy"] > 0.8


@pytest.mark.slow
def test_full_training_reproduces_committed_weights(card):
    if card["versions"]["torch"] != torch.__version__:
        pytest.skip("bitwise reproduction is only claimed for the same torch version")
    model, _ = T.train_model(seed=card["seed"], steps=card["steps"], n_threads=card["threads"])
    assert T.state_sha256(model) == card["state_sha256"]


# --------------------------------------------------------------------- battery
@pytest.fixture(scope="module")
def battery():
    from neuroprobe.stimuli.battery import Battery

    return Battery.load("digits")


def test_battery_is_valid_and_balanced(battery):
    t = battery.table
    assert set(battery.concepts) == set(D.CONCEPTS)
    assert 600 <= len(t) <= 1200
    forms = {"handwritten", "written-name", "written-numeral", "written-roman", "text-name", "text-numeral",
             "text-roman", "text-korean-sino", "text-korean-native"}
    assert set(t["form"]) == forms
    counts = t.groupby(["form", "split", "concept"]).size()
    assert len(counts) == len(forms) * 2 * 10  # every concept in every form and split
    for c, info in battery.concepts.items():
        assert info["prompt"] == f"a photo of {c}" and c in info["names"]
    text = t[t["modality"] == "text"]
    assert all(r.cloze.replace("{mask}", r.target) == r.text for r in text.itertuples())
    assert not set(text["cloze"].str.replace("{mask}", "{}", regex=False)) & set(D.TRAIN_TEMPLATES)


def test_battery_handwriting_is_held_out(battery):
    hw = battery.table[battery.table["form"] == "handwritten"]
    idx = hw["id"].str.rsplit("-", n=1).str[1].astype(int)
    assert (idx >= D.HW_TRAIN_END).all()
    # and the pixels are those samples
    images, labels, _ = D.handwritten(idx.to_numpy()[:5])
    for k, (_, row) in enumerate(hw.head(5).iterrows()):
        png = np.asarray(battery.load_image(row).convert("L"), np.float32) / 255
        assert np.abs(png - images[k]).max() <= 0.5 / 255 + 1e-6
        assert D.CONCEPTS[labels[k]] == row["concept"]


def test_battery_rebuilds_identically(tmp_path, battery):
    D.build_digits_battery(tmp_path)
    assert (tmp_path / "stimuli.csv").read_bytes() == (BATTERY_DIR / "stimuli.csv").read_bytes()
    assert (tmp_path / "battery.json").read_bytes() == (BATTERY_DIR / "battery.json").read_bytes()
    for rel in battery.table["image"][battery.table["image"] != ""][::25]:
        assert (tmp_path / rel).read_bytes() == (BATTERY_DIR / rel).read_bytes(), rel


# --------------------------------------------------------------------- subject
@pytest.fixture(scope="module")
def subject():
    from neuroprobe.subjects import load_subject

    return load_subject("organism", device="cpu", quiet=True)


def _sample(battery, n_per_form=2):
    return battery.table.groupby("form", sort=False).head(n_per_form)


def test_sites_cover_both_towers(subject):
    mlp = {s.name: s for s in subject.sites("mlp")}
    assert {"image.conv1", "image.conv2", "image.conv3", "image.fc", "text.layers.0.mlp.act",
            "text.layers.1.mlp.act", "text.fc"} == set(mlp)
    assert mlp["image.conv1"].layout == "BCHW" and mlp["image.fc"].layout == "BU"
    every = {s.name for s in subject.sites("all")}
    assert {"text.embed", "text.layers.0", "text.layers.1.attn.heads", "image.proj", "text.proj"} <= every
    # post-ReLU: every mlp site is a ReLU output
    for s in mlp.values():
        mod = subject.model.get_submodule(s.module)
        last = list(mod)[-1] if isinstance(mod, torch.nn.Sequential) else mod
        assert isinstance(last, torch.nn.ReLU), s.name


def test_electrodes_see_the_units_and_masks_fit(subject, battery):
    from neuroprobe.electrodes import Electrodes

    rows = _sample(battery)
    sites = subject.sites("all")
    batch = subject.encode(rows, battery)
    with torch.inference_mode(), Electrodes(subject.model, sites) as el:
        img, txt = subject.forward(batch)
    for s in sites:
        x = el.data[s.name]
        assert batch.masks[s.stream].shape == x.shape[:2], s.name
    # direct computation of the image fc units and the text fc units
    with torch.inference_mode():
        _, hidden = subject.model.image(batch.inputs["images"], return_hidden=True)
        _, thidden = subject.model.text(batch.inputs["text_ids"], batch.inputs["text_mask"], return_hidden=True)
    assert torch.allclose(el.data["image.fc"][:, 0], hidden)
    assert torch.allclose(el.data["text.fc"][:, 0], thidden)
    assert (el.data["image.conv2"] >= 0).all()
    n_img = int((rows["modality"] == "image").sum())
    assert img.shape[0] == n_img and txt.shape[0] == len(rows) - n_img


def test_concept_mask_marks_the_concept_word(subject, battery):
    rows = battery.table[battery.table["modality"] == "text"].head(40)
    batch = subject.encode(rows, battery)
    ids, cm = batch.token_ids["text"], batch.concept_masks["text"]
    for k, r in enumerate(rows.itertuples()):
        assert bytes(ids[k][cm[k]].tolist()).decode("utf-8") == r.target


def test_zero_shot_readout_matches_direct_computation(subject, battery):
    rows = _sample(battery, 3)
    scores = subject.readout(rows, battery, "zero_shot")
    correct = subject.readout(rows, battery, "zero_shot_correct")
    model = subject.model
    with torch.inference_mode():
        prompts = T.prompt_embeddings(model, [battery.concepts[c]["prompt"] for c in battery.concepts])
        protos = T.image_prototypes(model)
        batch = subject.encode(rows, battery)
        img, txt = model(batch.inputs["images"], batch.inputs["text_ids"], batch.inputs["text_mask"])
        s = model.scale()
    concepts = list(battery.concepts)
    is_img = (rows["modality"] == "image").to_numpy()
    expected = np.zeros(len(rows))
    hits = np.zeros(len(rows))
    logp_img = (s * img @ prompts.T).log_softmax(-1).numpy()
    logp_txt = (s * txt @ protos.T).log_softmax(-1).numpy()
    ii = it = 0
    for k, c in enumerate(rows["concept"]):
        lp = logp_img[ii] if is_img[k] else logp_txt[it]
        ii, it = ii + is_img[k], it + (not is_img[k])
        expected[k] = lp[concepts.index(c)]
        hits[k] = float(lp.argmax() == concepts.index(c))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, hits)
    assert correct[is_img].mean() > 0.7  # trained: mostly right


def test_random_init_is_the_untrained_twin():
    from neuroprobe.subjects import load_subject

    a = load_subject("organism", init="random", seed=0, device="cpu", quiet=True)
    b = load_subject("organism", init="random", seed=0, device="cpu", quiet=True)
    t = load_subject("organism", device="cpu", quiet=True)
    assert T.state_sha256(a.model) == T.state_sha256(b.model) != T.state_sha256(t.model)
    assert [s.name for s in a.sites("all")] == [s.name for s in t.sites("all")]


def test_missing_weights_and_bad_options(tmp_path):
    from neuroprobe.subjects.organism.subject import load_organism_subject

    with pytest.raises(MissingWeightsError):
        load_organism_subject(None, weights=tmp_path)
    with pytest.raises(NeuroprobeError):
        load_organism_subject(None, colour="blue")


def test_record_digits_end_to_end(subject, battery, tmp_path):
    from neuroprobe.recording import record
    from neuroprobe.stimuli.battery import Battery

    rows = _sample(battery, 2).reset_index(drop=True)
    small = Battery.from_table(rows, battery.concepts, name="digits-small", root=battery.root)
    rec = record(subject, small, tmp_path / "r.h5", montage="mlp", pooling="mean", quiet=True)
    from neuroprobe.electrodes import record_once

    site = [s for s in subject.sites("mlp") if s.name == "image.fc"]
    img_rows = rows[rows["modality"] == "image"]
    with torch.inference_mode():
        data = record_once(subject.model, site, lambda: subject.forward(subject.encode(img_rows, small)))
    got = np.asarray(rec.responses("image.fc"))
    np.testing.assert_allclose(got[img_rows.index.to_numpy()], data["image.fc"][:, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert np.isnan(got[rows.index[rows["modality"] == "text"]]).all()


# ------------------------------------------------------------------------- CLI
def test_train_organism_command(tmp_path):
    from typer.testing import CliRunner

    from neuroprobe.cli import app

    out = tmp_path / "w"
    result = CliRunner().invoke(app, ["train-organism", "--steps", "3", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 3 and T.sha256_file(out / "organism.safetensors") == card["weights_sha256"]
    assert "held-out zero-shot accuracy" in result.output
    from neuroprobe.subjects.organism.subject import load_organism_subject

    s = load_organism_subject(None, weights=out)
    assert T.state_sha256(s.model) == card["state_sha256"]
