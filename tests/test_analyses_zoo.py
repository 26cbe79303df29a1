"""The gallery's PPLM and model-zoo experiments (``analyses/pplm_bags.py``, ``analyses/model_zoo.py``).

Each script runs with ``--quick`` as a real subprocess on tiny or committed subjects, and its
outputs are checked: files present, the CSV's columns, numbers in range, controls near zero.
The library steps they share are checked against ground truth (perplexity computed token by
token; untrained twins at tiny size).  Full runs are slow tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.experiments.report import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    """Offline, with an empty Hugging Face cache, so which weights are 'here' is the same on every machine."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               HF_HOME=str(tmp_path / "hf-home"))
    return env


def _script(name: str, *args: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analyses" / f"{name}.py"), "--quiet", *args],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------- library steps
def test_continuation_perplexity_is_the_token_by_token_perplexity(tiny_dir):
    from neuroprobe.steering.analysis import continuation_perplexity
    from neuroprobe.steering.pplm import language_model
    from neuroprobe.subjects import load_subject

    subject = load_subject("gpt2", weights=tiny_dir("gpt2"), heads=True, device="cpu", quiet=True)
    lm = language_model(subject)
    prompt, cont = [5, 17, 3], [40, 2, 99, 7]
    seq = prompt + cont
    nll = []
    with torch.no_grad():
        for t in range(len(cont)):  # one forward per token: the definition, no shared pass
            logits = lm(input_ids=torch.tensor([seq[: len(prompt) + t]])).logits[0, -1].double()
            nll.append(-torch.log_softmax(logits, -1)[cont[t]].item())
    assert continuation_perplexity(lm, prompt, cont) == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)
    with pytest.raises(NeuroprobeError):
        continuation_perplexity(lm, [], cont)


def test_steering_tradeoff_keeps_one_baseline_and_measures_it(tiny_dir):
    from neuroprobe.steering.analysis import continuation_perplexity, steering_tradeoff
    from neuroprobe.steering.pplm import encode_prompt, language_model
    from neuroprobe.subjects import load_subject

    subject = load_subject("gpt2", weights=tiny_dir("gpt2"), heads=True, device="cpu", quiet=True)
    table = steering_tradeoff(subject, ["mother", "father", "sister"], ["My"], stepsizes=(0.05, 0.5), iterations=(1, 2),
                              length=3, seed=1)
    assert list(table["run"]).count("unsteered") == 1 and list(table["run"]).count("steered") == 4
    base = table[table["run"] == "unsteered"].iloc[0]
    assert base["stepsize"] == 0 and base["num_iterations"] == 0
    ids = [int(i) for i in base["token_ids"].split()]
    assert len(ids) == 3 and subject.tokenizer.decode(ids) == base["text"]
    assert base["perplexity"] == pytest.approx(
        continuation_perplexity(language_model(subject), encode_prompt(subject.tokenizer, "My"), ids), rel=1e-5)
    assert ((table["mass"] > 0) & (table["mass"] <= 1)).all() and (table["in_bag"].between(0, 1)).all()
    strongest = table[(table["stepsize"] == 0.5) & (table["num_iterations"] == 2)].iloc[0]
    assert strongest["mass"] > base["mass"]  # steering toward the bag raises its mass
    with pytest.raises(NeuroprobeError):
        steering_tradeoff(subject, ["mother"], ["My"], stepsizes=(0.0,), iterations=(1,), length=2)


def test_untrained_twin_tiny_and_subject_status(tmp_path):
    from neuroprobe.experiments.twins import parse_params, subject_status, tiny_folder, untrained_twin

    twin = untrained_twin("bert", scale="tiny", seed=3, cache=tmp_path, device="cpu")
    assert twin.init == "random" and twin.model.config.hidden_size == 32
    assert (tmp_path / "tiny" / "bert-seed-3" / "config.json").is_file()
    again = untrained_twin("bert", scale="tiny", seed=3, cache=tmp_path, device="cpu")
    for a, b in zip(twin.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)  # seeded: the same twin every time
    with pytest.raises(NeuroprobeError, match="no tiny configuration"):
        tiny_folder("clip-rn50", cache=tmp_path)
    with pytest.raises(NeuroprobeError):
        untrained_twin("bert", scale="huge", cache=tmp_path)
    assert subject_status("organism").pretrained and subject_status("minilm").pretrained
    assert parse_params("22.7M") == pytest.approx(22.7e6) and parse_params("230k") == 230e3
    assert np.isnan(parse_params("?"))


def test_korean_bag_is_packaged_and_is_byte_tokens_under_gpt2():
    from neuroprobe.steering.attributes import available_bags, load_bag
    from neuroprobe.subjects.offline import RECIPES, build_tokenizer, shipped

    assert "kinship_ko" in available_bags()
    ship = shipped("openai-community/gpt2-medium")
    tok = build_tokenizer(RECIPES[ship.tokenizer].name, ship.config())
    bag = load_bag("kinship_ko", tok)
    assert len(bag) >= 10 and not bag.dropped
    assert all(len(p) >= 3 for p in bag.pieces)  # every Korean word is several byte-level pieces


# --------------------------------------------------------------- the scripts, --quick
def test_pplm_bags_quick(tmp_path):
    out = tmp_path / "out"
    proc = _script("pplm_bags", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.csv", "results.md", "tradeoff.png", "tradeoff.csv"):
        assert (out / name).is_file(), name
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == list(COLUMNS)
    assert {"bag_mass", "perplexity", "fraction_tokens_in_bag", "bag_mass_unperturbed_model"} <= set(res["measure"])
    mass = res[res["measure"] == "bag_mass"]
    assert set(mass["site"]) == {"kinship", "kinship_ko"}
    assert ((mass["value"] > 0) & (mass["value"] <= 1)).all()
    base = mass[mass["condition"] == "unsteered"].set_index("site")["value"]
    assert (mass.loc[mass["condition"] == "unsteered", "x"] == 0).all()
    assert base["kinship_ko"] < 1e-3 * base["kinship"]  # Korean words are several byte tokens: a tiny mass
    for bag in ("kinship", "kinship_ko"):
        top = mass[(mass["site"] == bag) & (mass["condition"] == "steered")]
        assert top.loc[top["x"].idxmax(), "value"] > base[bag]  # the strongest push raises the bag's mass
    ppl = res[res["measure"] == "perplexity"]["value"]
    assert np.isfinite(ppl).all() and (ppl > 1).all()
    frac = res[res["measure"] == "fraction_tokens_in_bag"]["value"]
    assert frac.between(0, 1).all()
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "say nothing about language" in md and "--quick" in md and "e-" in md  # masses in scientific notation


def test_model_zoo_quick(tmp_path):
    out = tmp_path / "out"
    proc = _script("model_zoo", "--quick", "--subjects", "organism,gpt2,pplm,clip-rn50", "--shuffles", "1",
                   "--out", str(out), "--cache", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.csv", "results.md", "zoo.png", "layers.png", "subjects.csv"):
        assert (out / name).is_file(), name
    subjects = pd.read_csv(out / "subjects.csv", dtype=str, keep_default_na=False)
    row = {(r.subject, r.condition): r for r in subjects.itertuples(index=False)}
    assert row[("organism", "pretrained")].status == "ran" and row[("organism", "untrained")].scale == "real"
    assert row[("gpt2", "pretrained")].status == "skipped" and row[("gpt2", "pretrained")].note.startswith("missing weights")
    assert row[("gpt2", "untrained")].status == "ran" and row[("gpt2", "untrained")].scale == "tiny"
    assert row[("pplm", "untrained")].status == "skipped" and "gpt2" in row[("pplm", "untrained")].note
    assert "no tiny configuration" in row[("clip-rn50", "untrained")].note
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == list(COLUMNS)
    frac = res[res["measure"] == "fraction_concept_cells"]
    assert frac["value"].between(0, 1).all() and frac["x"].between(0, 1).all()
    org = frac[frac["subject"] == "organism"]

    def overall(cond: str) -> float:
        part = org[org["condition"] == cond]
        return float((part["value"] * part["n"]).sum() / part["n"].sum())

    assert overall("pretrained") > 0.02
    assert overall("untrained") <= 0.02 and overall("shuffle") <= 0.02  # the controls stay near zero
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "Not run at all: pplm, clip-rn50" in md and "tiny" in md


def test_scripts_end_user_mistakes_in_one_line(tmp_path):
    for name, args, words in (
        ("pplm_bags", ("--model", "organism"), "not a causal language model"),
        ("pplm_bags", ("--init", "pretrained"), "missing 1 piece"),
        ("model_zoo", ("--subjects", "nosuch"), "unknown subject"),
    ):
        proc = _script(name, *args, "--out", str(tmp_path / name), tmp_path=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr


# --------------------------------------------------------------- full runs
@pytest.mark.slow
def test_pplm_bags_full(tmp_path):
    out = tmp_path / "out"
    proc = _script("pplm_bags", "--out", str(out), "--cache", str(tmp_path / "cache"), tmp_path=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "tradeoff.csv")
    assert set(table["bag"]) == {"kinship", "kinship_ko"}
    en = table[table["bag"] == "kinship"]
    assert set(en["stepsize"]) == {0.0, 0.01, 0.03, 0.1} and set(en["num_iterations"]) == {0, 1, 3}
    assert en.loc[en["run"] == "steered", "mass"].max() > en.loc[en["run"] == "unsteered", "mass"].max()


@pytest.mark.slow
def test_model_zoo_full(tmp_path):
    out = tmp_path / "out"
    proc = _script("model_zoo", "--out", str(out), "--cache", str(tmp_path / "cache"), tmp_path=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    subjects = pd.read_csv(out / "subjects.csv")
    from neuroprobe.subjects.registry import REGISTRY

    assert set(subjects["subject"]) == set(REGISTRY)
    ran = subjects[subjects["status"] == "ran"]
    assert {("organism", "pretrained"), ("minilm", "pretrained"), ("minilm", "untrained")} <= set(
        zip(ran["subject"], ran["condition"]))
