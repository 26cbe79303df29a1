"""The attack experiments of the gallery: typographic attacks (Goh 2021) and knowledge neurons (Dai 2022).

Library parts against ground truth: integrated gradients through an electrode equal the
analytic attribution of a planted linear readout, satisfy completeness on the organism's
text tower (token sites with padding) and on a masked LM's pre-hooked MLP sites; the
differentiable readouts equal the readouts; Dai et al.'s knowledge-neuron selection on
hand-made attributions; the Stroop battery rebuilds bit for bit.  The two scripts run
``--quick`` in subprocesses on the organism and their outputs are checked (files,
columns, ranges, controls near zero); their full runs are slow tests.
"""
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
from neuroprobe.stimuli.battery import Battery

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["experiment", "subject", "condition", "site", "concept", "measure", "x", "value", "ci_low", "ci_high", "n",
           "note"]


def run_script(name: str, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    base = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    base.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "analyses" / f"{name}.py"), *args], capture_output=True, text=True,
                          env=base, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def organism():
    from neuroprobe.subjects.registry import load_subject

    return load_subject("organism", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def digits():
    return Battery.load("digits")


# ------------------------------------------------------------ integrated gradients
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from neuroprobe.planted import make_planted

    return make_planted(tmp_path_factory.mktemp("planted"), n_concepts=4, per_form=2, hidden=24, d_in=16)


def _logit(subject, rows, battery) -> torch.Tensor:
    """The planted network's logit of each stimulus's concept: linear in the hidden units."""
    out = subject.forward(subject.encode(rows, battery))
    idx = torch.tensor([subject.concepts.index(c) for c in rows["concept"]])
    return out[torch.arange(len(idx)), idx]


def _logprob(subject, rows, battery) -> torch.Tensor:
    """Log-probability of each stimulus's concept (one forward pass): not linear in the hidden units."""
    out = subject.forward(subject.encode(rows, battery)).log_softmax(-1)
    idx = torch.tensor([subject.concepts.index(c) for c in rows["concept"]])
    return out[torch.arange(len(idx)), idx]


@pytest.mark.parametrize("rule", ["midpoint", "left", "right"])
@pytest.mark.parametrize("steps", [1, 3])
def test_ig_of_a_linear_readout_is_activation_times_weight(planted, rule, steps):
    from neuroprobe.lesions.attribution import integrated_gradients

    subj, bat = planted.subject, planted.battery
    rows = bat.table.iloc[::3]
    got = integrated_gradients(subj, bat, rows, ["hidden"], score=_logit, probability=False, steps=steps, rule=rule,
                               batch_size=7)["hidden"]
    # ground truth from the weights: logit_c = W2[c] . h + b2[c], so IG_u = h_u * W2[c, u] exactly
    with torch.no_grad():
        h = subj.model.act(subj.model.layer1(subj.features(rows))).double().numpy()
    w = subj.model.out.weight.detach().double().numpy()
    c = np.array([subj.concepts.index(x) for x in rows["concept"]])
    truth = h * w[c]
    assert got.shape == truth.shape == (len(rows), 24)
    np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-6 * np.abs(truth).max())
    assert (np.abs(truth) > 1e-3).sum() > 10  # a real test: many units carry attribution


def test_ig_of_a_probability_matches_a_direct_integral(planted):
    from neuroprobe.lesions.attribution import alphas, integrated_gradients

    subj, bat = planted.subject, planted.battery
    rows = bat.table.iloc[:5]
    got = integrated_gradients(subj, bat, rows, ["hidden"], score=_logprob, probability=True, steps=64)["hidden"]
    # the same integral computed on the network's own layers, no electrode, no subject
    with torch.no_grad():
        h = subj.model.act(subj.model.layer1(subj.features(rows)))
    c = torch.tensor([subj.concepts.index(x) for x in rows["concept"]])
    grads = []
    for a in alphas(64):
        z = (a * h).clone().requires_grad_(True)
        p = subj.model.out(z).softmax(-1)[torch.arange(len(c)), c]
        grads.append(torch.autograd.grad(p.sum(), z)[0])
    direct = (h * torch.stack(grads).mean(0)).double().numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-7)
    # completeness: a site's attributions sum to p(x) - p(0)
    with torch.no_grad():
        p1 = subj.model.out(h).softmax(-1)[torch.arange(len(c)), c]
        p0 = subj.model.out(torch.zeros_like(h)).softmax(-1)[torch.arange(len(c)), c]
    np.testing.assert_allclose(got.sum(1), (p1 - p0).double().numpy(), atol=2e-3)


def test_ig_completeness_on_the_organism_text_tower(organism, digits):
    """Token sites (with padding) and a pooled site: attributions sum to p(intact) - p(site zeroed)."""
    from neuroprobe.lesions import lesion
    from neuroprobe.lesions.attribution import integrated_gradients

    t = digits.table
    rows = t[(t["modality"] == "text") & (t["split"] == "screening")].iloc[::25]  # mixed lengths, forms, concepts
    sites = ["text.layers.1.mlp.act", "text.fc"]
    att = integrated_gradients(organism, digits, rows, sites, steps=32, batch_size=512)
    p = np.exp(organism.readout(rows, digits))
    for s in sites:
        with lesion(organism, {s: np.arange(att[s].shape[1])}, "zero"):
            p0 = np.exp(organism.readout(rows, digits))
        assert np.abs(p - p0).max() > 0.05, s  # zeroing the site matters, so the check has teeth
        np.testing.assert_allclose(att[s].sum(1), p - p0, atol=0.01)


def test_ig_through_a_masked_lm_pre_hook_site(tiny_dir):
    """A masked LM's MLP sites are forward pre-hooks; its masked_lm readout is differentiable."""
    from neuroprobe.lesions import lesion
    from neuroprobe.lesions.attribution import integrated_gradients
    from neuroprobe.subjects.registry import load_subject

    subj = load_subject("bert", weights=tiny_dir("bert"), device="cpu", heads=True, quiet=True)
    bat = Battery.load("kinship")
    rows = bat.table.iloc[::40]
    with torch.no_grad():
        tensor = subj.readout_tensor(rows, bat, "masked_lm").numpy()
    np.testing.assert_allclose(tensor, subj.readout(rows, bat, "masked_lm"), rtol=1e-6)
    site = "encoder.layer.1.mlp"
    att = integrated_gradients(subj, bat, rows, [site], readout="masked_lm", steps=24)[site]
    p = np.exp(subj.readout(rows, bat, "masked_lm"))
    with lesion(subj, {site: np.arange(att.shape[1])}, "zero"):
        p0 = np.exp(subj.readout(rows, bat, "masked_lm"))
    np.testing.assert_allclose(att.sum(1), p - p0, atol=2e-3 * max(1.0, float(np.abs(p - p0).max())) + 1e-6)


def test_ig_refuses_a_site_that_sees_other_rows(organism, digits):
    """The image tower runs the retrieval's reference images, not the text prompts: one clear error."""
    from neuroprobe.lesions.attribution import integrated_gradients

    rows = digits.table[digits.table["modality"] == "text"].iloc[:3]
    with pytest.raises(NeuroprobeError, match="saw 100 rows in a forward pass of"):
        integrated_gradients(organism, digits, rows, ["image.fc"], steps=2)
    with pytest.raises(NeuroprobeError, match="at least 1 step"):
        integrated_gradients(organism, digits, rows, ["text.fc"], steps=0)


def test_readout_tensor_equals_the_readout(organism, digits, planted):
    rows = digits.table.groupby("form", sort=False).head(2)  # images and texts in one batch
    with torch.no_grad():
        tensor = organism.readout_tensor(rows, digits).numpy()
    np.testing.assert_array_equal(tensor.astype(np.float64), organism.readout(rows, digits))
    with pytest.raises(NeuroprobeError, match="no differentiable form"):
        planted.subject.readout_tensor(planted.battery.table.iloc[:2], planted.battery)
    with pytest.raises(NeuroprobeError, match="has no readout 'nope'"):
        organism.readout_tensor(rows, digits, "nope")


def test_prototype_readout_tensor_and_gradient(tiny_dir):
    from neuroprobe.lesions.attribution import integrated_gradients
    from neuroprobe.subjects.registry import load_subject

    subj = load_subject("minilm", weights=tiny_dir("minilm"), device="cpu", quiet=True)
    bat = Battery.load("kinship")
    rows = bat.table.iloc[::50]
    subj.prepare_readout(bat, "prototype")  # prototypes made under inference_mode, as lesion studies do
    with torch.no_grad():
        np.testing.assert_allclose(subj.readout_tensor(rows, bat, "prototype").numpy(),
                                   subj.readout(rows, bat, "prototype"), rtol=1e-6)
    att = integrated_gradients(subj, bat, rows, ["encoder.layer.0.mlp"], readout="prototype", steps=4)
    assert np.isfinite(att["encoder.layer.0.mlp"]).all() and np.abs(att["encoder.layer.0.mlp"]).sum() > 0


# ------------------------------------------------------------ knowledge neurons
def test_knowledge_neuron_selection():
    from neuroprobe.lesions.attribution import knowledge_neurons

    # two sites; fact "a" has 4 prompts, fact "b" 4 prompts
    s1 = np.zeros((8, 4))
    s2 = np.zeros((8, 3))
    s1[:4, 0] = 10.0                 # a: unit s1#0 kept by all of a's prompts
    s1[:2, 1] = 5.0                  # a: s1#1 kept by 2 of 4 prompts (< 0.7 share, < 3 prompts)
    s1[:4, 2] = 1.0                  # a: s1#2 below 0.2 of the prompt's largest (10): never kept
    s2[:3, 0] = 3.0                  # a: s2#0 kept by 3 of 4 (0.75 >= 0.7, 3 prompts)
    s2[4:, 1] = 2.0                  # b: s2#1 by all of b's prompts
    s1[4:, 3] = -5.0                 # negative attributions are never kept
    facts = ["a"] * 4 + ["b"] * 4
    kn, share = knowledge_neurons({"s1": s1, "s2": s2}, facts, target=None)
    assert share == 0.7
    assert {k: {s: u.tolist() for s, u in v.items()} for k, v in kn.items()} == {
        "a": {"s1": [0], "s2": [0]}, "b": {"s2": [1]}}
    # the share moves until facts have 2-5 neurons on average, within [0.05, 1]
    many = np.full((6, 12), 1.0)     # every unit kept by every prompt: 12 per fact
    kn, share = knowledge_neurons({"s": many}, ["x"] * 6)
    assert share == 1.0 and len(kn["x"]["s"]) == 12  # share capped at exactly 1.0, so all prompts still qualify
    with pytest.raises(NeuroprobeError, match="fact labels"):
        knowledge_neurons({"s": many}, ["x"] * 5)


def test_scores_many_batched_equals_one_at_a_time(organism, digits):
    from neuroprobe.lesions.forgetting import LesionStudy

    text = digits.table[digits.table["modality"] == "text"].iloc[::6].reset_index(drop=True)
    bat = Battery.from_table(text, concepts=digits.concepts, name="digits-text", root=digits.root)
    lesions = [{"text.fc": np.array([3, 7])}, {"text.layers.1.mlp.act": np.arange(10), "text.fc": np.array([1])}]
    kw = dict(sites=["text.layers.1.mlp.act", "text.fc"], quiet=True, batch_size=64)
    fast = LesionStudy(organism, bat, **kw)
    slow = LesionStudy(organism, bat, batched=False, **kw)
    assert fast.engine.startswith("batched")
    for mode, factor in (("zero", None), ("scale", 2.0)):
        a = fast.scores_many(lesions, mode, factor=factor)
        b = slow.scores_many(lesions, mode, factor=factor)
        assert a.shape == (2, len(fast.test))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert np.abs(a - fast.baseline).max() > 1e-3  # the lesions change the readout
        change = fast.evaluate_many(lesions, mode, factor=factor)[0]
        direct = pd.Series(a[0] - fast.baseline).groupby(fast.test["concept"].to_numpy()).mean()
        np.testing.assert_allclose(change.to_numpy(), direct.reindex(change.index).to_numpy())


# ------------------------------------------------------------ the Stroop battery
def test_stroop_battery_rebuilds_identically_and_says_what_it_shows(tmp_path):
    from neuroprobe.subjects.organism import data as D
    from neuroprobe.subjects.organism.typographic import build_battery

    shipped = Battery.load("stroop")
    build_battery(tmp_path, name="stroop", per_split=3, sizes=(10, 14), positions=("center",), seed=0)
    for name in ("stimuli.csv", "battery.json"):
        assert (tmp_path / name).read_bytes() == (shipped.root / name).read_bytes(), name
    for rel in shipped.table["image"][::17]:
        assert (tmp_path / rel).read_bytes() == (shipped.root / rel).read_bytes(), rel
    total = sum((shipped.root / rel).stat().st_size for rel in shipped.table["image"])
    assert total < 400_000  # committed images stay small
    t = shipped.table
    assert set(t["condition"]) == {"clean", "congruent", "incongruent", "word", "nonsense"}
    assert (t.loc[t["condition"] == "congruent", "word"] == t.loc[t["condition"] == "congruent", "concept"]).all()
    inc = t[t["condition"] == "incongruent"]
    assert (inc["word"] == inc["foil"]).all() and (inc["word_concept"] == inc["foil"]).all()
    assert (inc["foil"] != inc["concept"]).all()
    for cond in ("word", "nonsense"):
        g = t[t["condition"] == cond]
        assert (g["word_concept"] == "").all()
        assert (g["word"].str.len() == g["foil"].str.len()).all()  # same length as the digit name it stands for
        assert not set(g["word"]) & set(D.CONCEPTS)
    # the clean pictures are the held-out samples themselves; an overlay only adds ink
    clean = t[t["condition"] == "clean"].head(3)
    pics, labels, _ = D.handwritten(clean["sample"].astype(int).to_numpy())
    for k, (_, row) in enumerate(clean.iterrows()):
        png = np.asarray(shipped.load_image(row).convert("L"), np.float32) / 255
        assert np.abs(png - pics[k]).max() <= 0.5 / 255 + 1e-6
        assert D.CONCEPTS[labels[k]] == row["concept"]
        over = t[(t["sample"] == row["sample"]) & (t["condition"] == "incongruent")].iloc[0]
        attacked = np.asarray(shipped.load_image(over).convert("L"), np.float32) / 255
        assert (attacked >= png - 1e-6).all() and (attacked > png + 0.2).sum() > 10
    meta = json.loads((shipped.root / "battery.json").read_text(encoding="utf-8"))
    assert meta["concepts"]["seven"]["prompt"] == "a photo of seven"


# ------------------------------------------------------------ the scripts
@pytest.fixture(scope="module")
def typographic_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("typographic")
    res = run_script("typographic", "--quick", "--quiet", "--out", str(out / "out"), "--cache", str(out / "cache"),
                     "--gallery", str(out / "gallery"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_typographic_quick_writes_its_results(typographic_quick):
    out = typographic_quick / "out"
    for name in ("results.csv", "results.md", "typographic.png", "stroop.png", "flip_rates.csv"):
        assert (out / name).is_file(), name
    assert (typographic_quick / "gallery" / "typographic.png").is_file()
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS
    assert set(df["experiment"]) == {"typographic"}
    for m in ("flip_rate", "accuracy", "stroop_accuracy"):
        v = df[df["measure"] == m]["value"]
        assert len(v) and v.between(0, 1).all(), m
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "**Finding.**" in md and "**Control.**" in md and "Goh et al. 2021" in md and "--quick" in md


def test_typographic_quick_effect_and_controls(typographic_quick):
    df = pd.read_csv(typographic_quick / "out" / "results.csv")
    flip = df[(df["measure"] == "flip_rate") & (df["note"] == "share predicted as the foil digit, all positions")]

    def at(cond: str, size: int) -> float:
        return float(flip[(flip["condition"] == cond) & (flip["x"] == size)]["value"].iloc[0])

    # the name of another digit flips the trained organism; a word or random letters of the same size barely do
    assert at("trained:incongruent", 16) > 0.3
    assert at("trained:word", 16) < 0.2 and at("trained:nonsense", 16) < 0.2
    assert at("trained:incongruent", 16) > at("trained:word", 16) + 0.2
    assert at("trained:incongruent", 8) < 0.1  # small text does not
    clean = df[(df["measure"] == "accuracy") & (df["condition"] == "trained:clean")]["value"].iloc[0]
    assert clean > 0.9
    untrained = df[(df["measure"] == "accuracy") & (df["condition"] == "untrained:clean")]["value"].iloc[0]
    assert untrained < 0.4  # the untrained twin does not know the digits
    # cells: the picture's cells respond less as the written name grows; the foil's cells stay silent under nonsense
    cells = df[df["measure"].str.startswith("cell_response")]
    img = cells[(cells["measure"] == "cell_response_image_concept") & (cells["condition"] == "trained:incongruent")]
    assert img.sort_values("x")["value"].iloc[0] > img.sort_values("x")["value"].iloc[-1]
    noise = cells[(cells["measure"] == "cell_response_text_concept") & (cells["condition"] == "trained:nonsense")]
    assert noise["value"].abs().max() < 0.15
    n_cells = df[(df["measure"] == "concept_cells")].set_index("condition")["value"]
    assert n_cells["trained"] > 0 and n_cells["untrained"] == 0


@pytest.fixture(scope="module")
def knowledge_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("knowledge")
    res = run_script("knowledge_neurons", "--quick", "--quiet", "--out", str(out / "out"), "--cache",
                     str(out / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "out"


def test_knowledge_neurons_quick(knowledge_quick):
    out = knowledge_quick
    for name in ("results.csv", "results.md", "knowledge_neurons.png", "edits.csv", "neurons.csv"):
        assert (out / name).is_file(), name
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS
    summary = df[df["concept"].isna() & df["measure"].isin(["suppress_change", "amplify_change"])]
    v = summary.set_index(["measure", "condition"])["value"]
    # suppressing the knowledge neurons lowers their fact; random units of the same count barely move it
    assert v[("suppress_change", "trained:knowledge, own fact")] < -0.05
    assert abs(v[("suppress_change", "trained:random, own fact")]) < 0.03
    assert abs(v[("amplify_change", "trained:random, own fact")]) < 0.03
    assert v[("amplify_change", "trained:knowledge, own fact")] > v[("amplify_change", "trained:random, own fact")]
    assert v[("suppress_change", "trained:knowledge, own fact")] < v[("suppress_change", "trained:knowledge, other facts")]
    facts = df[df["measure"] == "facts_with_neurons"].set_index("condition")["value"]
    assert facts["trained"] >= 5
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "no masked-LM head" in md and "Dai et al. 2022" in md  # says which readout stood in for the masked LM


def test_knowledge_neurons_without_weights_ends_in_one_line(tmp_path):
    res = run_script("knowledge_neurons", "--model", "bert", "--quick", "--out", str(tmp_path / "out"),
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("knowledge_neurons.py: error:") and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["typographic", "knowledge_neurons"])
def test_full_runs(name, tmp_path):
    res = run_script(name, "--quiet", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(df.columns) == COLUMNS and len(df) > 20
    assert "--quick" not in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
