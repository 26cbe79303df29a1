"""Three gaps closed on 2026-12-07.

1. ``neuroprobe cells --allow-incomplete`` on a recording killed before any stimulus of one
   tower was recorded (the organism's ``digits`` battery lists its 660 images before its 300
   texts): the text tower's sites are left out with a one-line warning naming them and the
   image tower's cells are computed; if no site asked for has a recorded stimulus, one line
   on stderr and exit 2.  The recording is killed for real (SIGKILL inside a forward pass of
   the command itself), at a fixed batch.
2. The atlas's concept pages link the experiments of ``analyses/`` whose ``results.csv`` names the
   concept for the atlas's subject (``--experiments DIR``, default ``figures/analyses`` if present):
   results written by the real :class:`~neuroprobe.experiments.report.Report`, an organism recording,
   the real command; every link resolves to a file inside the atlas.
3. The cross-modal organism: every number the README states about it (parameters, steps, CPU time,
   held-out accuracies, cells, multimodal cells per digit and per site, controls, the ``digits``
   battery beside the dual encoder, the lesion of six's multimodal cells, the co-attention design) is
   the number of the card that ``neuroprobe subjects organism-cross`` prints, and the card's numbers
   are what ``neuroprobe record`` + ``neuroprobe cells`` (+ ``neuroprobe lesion``) give now.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from test_faults import ROOT, one_sentence

WEIGHTS = ROOT / "neuroprobe" / "subjects" / "organism" / "weights"

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")

# ------------------------------------------------------------------------ 1. an organism killed mid-way

KILL_SCRIPT = """
import os, runpy, signal
import torch
torch.set_num_threads(1)
from neuroprobe.subjects import registry

subject = registry.load_subject("organism", quiet=True)
KILL_AT = int(os.environ["KILL_AT"])
image = subject.model.image
forward = image.forward
calls = [0]

def dying_forward(*args, **kwargs):  # the image tower's KILL_AT-th batch never ends: the process is killed
    calls[0] += 1
    if calls[0] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(*args, **kwargs)

image.forward = dying_forward
registry.load_subject = lambda *args, **kwargs: subject
runpy.run_module("neuroprobe", run_name="__main__", alter_sys=True)  # as python -m neuroprobe does
"""

TEXT_SITES = ["text.layers.0.mlp.act", "text.layers.1.mlp.act", "text.fc"]
IMAGE_SITES = ["image.conv1", "image.conv2", "image.conv3", "image.fc"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuroprobe", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """The organism's ``digits`` recording, killed in a batch of its first 320 images: no text recorded.

    The writer commits behind the model by at most its queue (3 batches), so 160 to 256 images are committed."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "kill_record.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    out = root / "organism.h5"
    res = subprocess.run([sys.executable, str(script), "record", "--model", "organism", "--batch-size", "32",
                          "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(ENV, KILL_AT="10"))
    assert res.returncode == -9, (res.returncode, res.stderr)
    with h5py.File(out, "r", swmr=True) as f:
        n_done = int(f.attrs["n_done"])
        assert not f.attrs["complete"] and 0 < n_done < 660 and n_done % 32 == 0, n_done  # images only
        for site in TEXT_SITES:
            assert not np.isfinite(f[f"sites/{site}/responses"][()]).any(), site
    return out


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_cells_of_a_recording_killed_before_its_text_tower_leaves_those_sites_out(killed, tmp_path, jobs):
    from neuroprobe import concept_cells, open_recording

    out = tmp_path / "cells.csv"
    res = cli("cells", str(killed), "--allow-incomplete", "--quiet", "--jobs", jobs, "--out", str(out),
              *(["--controls", "none"] if jobs == "2" else []))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and all(s in warnings[0] for s in TEXT_SITES), res.stderr
    assert not any(s in warnings[0] for s in IMAGE_SITES), warnings
    per_site = res.stdout.split("per site:")[1].split("per concept:")[0]
    assert all(s in per_site for s in IMAGE_SITES) and not any(s in per_site for s in TEXT_SITES), res.stdout
    table = pd.read_csv(out)
    assert list(dict.fromkeys(table["site"])) == IMAGE_SITES
    with open_recording(killed) as rec:  # the image sites' cells: as if only they had been asked for
        expected = concept_cells(rec, sites=IMAGE_SITES, quiet=True)
        assert concept_cells(rec, quiet=True).attrs["skipped_sites"] == TEXT_SITES
    for col in ("unit", "is_candidate", "is_cell", "concept"):
        assert table[col].astype(str).tolist() == expected[col].astype(str).tolist(), col
    np.testing.assert_allclose(table["p"].to_numpy(float), expected["p"].to_numpy(float), rtol=1e-12, atol=0)


def test_cells_of_sites_none_of_whose_stimuli_were_recorded_is_one_line(killed):
    res = cli("cells", str(killed), "--allow-incomplete", "--quiet", "--sites", "text.fc,text.layers.0.mlp.act")
    line = one_sentence(res.returncode, res.stderr)
    assert "text.fc" in line and "text.layers.0.mlp.act" in line and "nothing to analyse" in line, line
    assert "of 960 stimuli" in line, line


# ------------------------------------------------------------------------ 2. the atlas links experiments


def write_experiment(root: Path, name: str, rows: list[dict], figures: list[str]) -> Path:
    """An experiment's outputs as an ``analyses/`` script writes them (:class:`Report`): results.csv, results.md, PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import argparse

    import matplotlib.pyplot as plt

    from neuroprobe.experiments.report import Report

    rep = Report(name, root / name, f"What does {name} ask?", args=argparse.Namespace(model="organism", quick=True))
    for r in rows:
        rep.add(**r)
    for f in figures:
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        rep.figure(fig, f)
    rep.write(finding="a finding", control="a control")
    return root / name


@pytest.fixture(scope="module")
def organism_rec(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("organism") / "organism.h5"
    res = cli("record", "--model", "organism", "--quiet", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    """figures/analyses/ of a working directory: one experiment about seven and one (figures for both and for
    one alone), one about seven for another subject, one without concepts, one folder without results."""
    cwd = tmp_path_factory.mktemp("cwd")
    root = cwd / "figures" / "analyses"
    write_experiment(root, "lesions", [
        dict(measure="target_change", value=-0.5, concept="seven", condition="trained"),
        dict(measure="target_change", value=0.01, concept="seven", condition="random", ci=(-0.02, 0.03), n=50),
        dict(measure="response", value=1.0, concept="seven", condition="trained", x="s1"),
        dict(measure="response", value=2.0, concept="seven", condition="trained", x="s2"),
        dict(measure="target_change", value=-0.25, concept="one", condition="trained"),
        dict(measure="cells", value=30, condition="trained"),
    ], ["lesions_main", "cell_seven", "cell_one", "cell_seventeen"])
    write_experiment(root, "elsewhere", [dict(measure="x", value=1.0, concept="seven", subject="minilm")], ["main"])
    write_experiment(root, "counts", [dict(measure="cells", value=3.0)], ["counts"])
    (root / "not_an_experiment").mkdir()
    return cwd


def atlas(rec: Path, out: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuroprobe", "atlas", str(rec), "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def experiments_section(page: Path) -> str:
    html = page.read_text(encoding="utf-8")
    return html.split("<h2>Experiments</h2>", 1)[1] if "<h2>Experiments</h2>" in html else ""


@pytest.mark.parametrize("how", ["default", "option"])
def test_concept_pages_link_the_experiments_that_name_them(organism_rec, experiments, tmp_path, how):
    from neuroprobe.output import read_csv
    from test_figures_atlas_docs import _broken_links, _refs

    out = tmp_path / "atlas"
    where = experiments if how == "default" else tmp_path  # the default: figures/analyses under the working directory
    extra = [] if how == "default" else ["--experiments", str(experiments / "figures" / "analyses")]
    res = atlas(organism_rec, out, *extra, cwd=where)
    assert res.returncode == 0, res.stderr
    assert _broken_links(out) == []
    seven = experiments_section(out / "concepts" / "seven.html")
    refs = [r for _, r in _refs(seven).refs]
    assert "../experiments/lesions/results.md" in refs and "../experiments/lesions/seven.csv" in refs, refs
    assert "../experiments/lesions/cell_seven.png" in refs, refs  # the concept's own figure, not another's
    assert not any("cell_one" in r or "cell_seventeen" in r or "lesions_main" in r for r in refs), refs
    assert "elsewhere" not in seven and "counts" not in seven and "What does lesions ask?" in seven
    assert "4 numbers about seven" in seven and "-0.5" in seven
    table = read_csv(out / "experiments" / "lesions" / "seven.csv")
    source = read_csv(experiments / "figures" / "analyses" / "lesions" / "results.csv")
    pd.testing.assert_frame_equal(table.reset_index(drop=True),
                                  source[source["concept"] == "seven"].reset_index(drop=True), check_dtype=False)
    one = [r for _, r in _refs(experiments_section(out / "concepts" / "one.html")).refs]
    assert "../experiments/lesions/cell_one.png" in one and not any("cell_seven" in r for r in one), one
    for concept in ("two", "eight"):  # no experiment names them: no section
        assert experiments_section(out / "concepts" / f"{concept}.html") == ""
    assert sorted(p.name for p in (out / "experiments").iterdir()) == ["lesions"]


def test_atlas_experiments_off_and_a_missing_folder(organism_rec, experiments, tmp_path):
    res = atlas(organism_rec, tmp_path / "off", "--experiments", "none", cwd=experiments)
    assert res.returncode == 0, res.stderr
    assert experiments_section(tmp_path / "off" / "concepts" / "seven.html") == ""
    assert not (tmp_path / "off" / "experiments").exists()
    res = atlas(organism_rec, tmp_path / "missing", "--experiments", str(tmp_path / "nowhere"), cwd=tmp_path)
    line = one_sentence(res.returncode, res.stderr)
    assert "--experiments" in line and "nowhere" in line, line


# ------------------------------------------------------------------------ 3. organism-cross: README, card, outputs


@pytest.fixture(scope="module")
def card() -> dict:
    """The card as ``neuroprobe subjects organism-cross`` prints it (it must be the committed card)."""
    import json

    res = cli("subjects", "organism-cross")
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout[res.stdout.index("{"):])
    assert printed == json.loads((WEIGHTS / "card-cross.json").read_text(encoding="utf-8"))
    return printed


def readme() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def signed(x: float, digits: int = 3) -> str:
    """A signed number as the README writes it (Unicode minus)."""
    sign = "\u2212" if x < 0 else "+"
    return f"{sign}{abs(x):.{digits}f}"


def test_readme_states_the_numbers_of_the_printed_card(card):
    text = readme()
    want = card["phenomenon"]["digits-cross"]
    assert card["threads"] == 1
    assert (f"({round(card['parameters'] / 1000)}k parameters, {card['steps']} steps, "
            f"{card['reproducibility']['train_cpu_seconds'] / 60:.1f} CPU-minutes on one thread") in text
    h = card["heldout"]
    assert (f"held out: handwriting {h['handwritten']['accuracy']:.3f}, drawn names {h['written']['accuracy']:.3f}, "
            f"text retrieval {h['text']['accuracy']:.3f}, image\u2013text matching {h['matching']['accuracy']:.3f}") in text
    none = [c for c, n in want["multimodal_per_concept"].items() if n == 0]
    assert len(want["multimodal_per_concept"]) == 10 and 10 - len(none) == want["multimodal_concepts"]
    assert (f"find {want['cells']} concept cells, {want['multimodal']} of them multimodal" in text
            and f"for {want['multimodal_concepts']} of the 10 digits (all but {', '.join(none)})" in text)
    sites = want["per_site"]
    last_two = [f"fusion.layers.{card['config']['layers'] - i}.mlp.act" for i in (2, 1)]
    assert sites["head.fc"]["multimodal"] + sum(sites.get(s, {}).get("multimodal", 0) for s in last_two) == want["multimodal"]
    assert (f"in `head.fc` ({sites['head.fc']['multimodal']}) and the last two blocks' MLPs "
            f"({sum(sites.get(s, {}).get('multimodal', 0) for s in last_two)})") in text
    assert (f"{want['untrained_twin_cells']} in its untrained twin, {want['rotated_cells']} after the rotation, "
            f"{want['label_shuffle_cells_in_10']} in 10 label shuffles") in text
    rows = {(r["subject"], r["battery"], r["init"]): r for r in card["phenomenon"]["beside_the_dual_encoder"]["rows"]}
    cross, dual = rows[("organism-cross", "digits", "pretrained")], rows[("organism", "digits", "pretrained")]
    assert (f"it has {cross['multimodal']} multimodal cells where the dual encoder has {dual['multimodal']} "
            f"(of its {dual['cells']})") in text
    lesion = card["phenomenon"]["lesion"]
    img, txt = ({r["readout"]: r for r in lesion["rows"]}[k] for k in ("image side", "text side"))
    n = img["units"]
    assert "'six'" in lesion["how"] and want["multimodal_per_concept"]["six"] == n == txt["units"]
    assert (f"Zeroing the {n} multimodal cells of *six* lowers its zero-shot log-probability on images by "
            f"{-img['target_change']:.3f} and on texts by {-txt['target_change']:.3f}, against "
            f"{signed(img['random_target_mean'])} \u00b1 {img['random_target_sd']:.3f} and "
            f"{signed(txt['random_target_mean'])} \u00b1 {txt['random_target_sd']:.3f} for {img['n_random']} random "
            f"{n}-unit lesions at the same sites (p = {img['p_random']:.2f} on each side") in text
    assert f"{txt['p_random']:.2f}" == f"{img['p_random']:.2f}" and txt["n_random"] == img["n_random"]
    co = next(r for r in card["design"]["runs"] if r["design"].startswith("two streams") and "committed" in r["design"])
    assert f"(ViLBERT, LXMERT: {co['multimodal']} multimodal cells for {co['multimodal_concepts']} digits" in text
    assert (f"neuroprobe cells recordings/organism-cross_digits-cross_mlp.h5 # {want['cells']} cells, "
            f"{want['multimodal']} multimodal, for {want['multimodal_concepts']} digits") in text


@pytest.fixture(scope="module")
def cross(tmp_path_factory) -> Path:
    """The README's two commands (record with the defaults, then cells; here with the 10 label shuffles too)."""
    cwd = tmp_path_factory.mktemp("cross")
    res = subprocess.run([sys.executable, "-m", "neuroprobe", "record", "--model", "organism-cross", "--quiet"],
                         capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr
    rec = cwd / "recordings" / "organism-cross_digits-cross_mlp.h5"
    res = cli("cells", str(rec), "--controls", "rotation,shuffle", "--shuffles", "10", "--quiet",
              "--out", str(cwd / "cells.csv"))
    assert res.returncode == 0, res.stderr
    return cwd


def test_record_and_cells_give_the_cards_numbers(card, cross):
    want = card["phenomenon"]["digits-cross"]
    cells = pd.read_csv(cross / "cells.csv")
    mm = cells[cells["multimodal"]]
    assert (int(cells["is_cell"].sum()), int(cells["invariant"].sum()), len(mm)) == \
        (want["cells"], want["invariant"], want["multimodal"])
    assert mm.groupby("concept").size().reindex(list(want["multimodal_per_concept"]), fill_value=0).to_dict() == \
        want["multimodal_per_concept"]
    for site, n in want["per_site"].items():
        g = cells[cells["site"] == site]
        got = dict(candidates=int(g["is_candidate"].sum()), cells=int(g["is_cell"].sum()),
                   invariant=int(g["invariant"].sum()), multimodal=int(g["multimodal"].sum()))
        assert got == n, site
    assert int(cells.loc[~cells["site"].isin(list(want["per_site"])), "is_cell"].sum()) == 0
    rotated = pd.read_csv(cross / "cells.rotation.csv")
    assert (int(rotated["is_cell"].sum()), int(rotated["multimodal"].sum())) == (want["rotated_cells"], 0)
    shuffled = pd.read_csv(cross / "cells.shuffle.csv")
    assert shuffled["shuffle"].nunique() == 10 and int(shuffled["cells"].sum()) == want["label_shuffle_cells_in_10"]
    # six's multimodal cells are the lesioned ones of the card, and the README's atlas figure shows one of them
    six = mm[mm["concept"] == "six"]
    lesion = card["phenomenon"]["lesion"]
    assert set(six["site"]) == set(lesion["rows"][0]["sites"].split(";"))
    assert six.groupby("site").size().to_dict() == {"fusion.layers.3.mlp.act": 3, "head.fc": 1}
    assert "fusion.layers.3.mlp.act x3, head.fc x1" in lesion["how"]
    assert 86 in six.loc[six["site"] == "fusion.layers.3.mlp.act", "unit"].tolist()
    assert "unit 86 of `fusion.layers.3.mlp.act`, a multimodal cell for *six*" in readme()


@pytest.mark.parametrize("model, key", [("organism-cross", "organism-cross"), ("organism", "organism")])
def test_the_digits_battery_gives_the_cards_row(card, tmp_path, model, key):
    """On ``digits`` (default montage), the cross-modal organism's multimodal cells and the dual encoder's none."""
    rows = {(r["subject"], r["battery"], r["init"]): r for r in card["phenomenon"]["beside_the_dual_encoder"]["rows"]}
    want = rows[(key, "digits", "pretrained")]
    rec = tmp_path / "r.h5"
    res = cli("record", "--model", model, "--probe", "digits", "--quiet", "--out", str(rec))
    assert res.returncode == 0, res.stderr
    res = cli("cells", str(rec), "--no-rotation", "--quiet", "--out", str(tmp_path / "cells.csv"))
    assert res.returncode == 0, res.stderr
    cells = pd.read_csv(tmp_path / "cells.csv")
    mm = cells[cells["multimodal"]]
    assert (int(cells["is_cell"].sum()), int(cells["invariant"].sum()), len(mm), mm["concept"].nunique()) == \
        (want["cells"], want["invariant"], want["multimodal"], want["multimodal_concepts"])


def lesion_six(cross: Path, side: str, draws: int) -> pd.Series:
    """``neuroprobe lesion`` of six's multimodal cells (zero), read on one modality of the testing split."""
    cells = pd.read_csv(cross / "cells.csv")
    table = cross / "six_multimodal.csv"
    cells[cells["multimodal"] & (cells["concept"] == "six")].to_csv(table, index=False)
    out = cross / f"lesion_{side}_{draws}"
    res = cli("lesion", "--model", "organism-cross", "--probe", "digits-cross", "--cells", str(table), "--concept", "six",
              "--k", "4", "--mode", "zero", "--random-draws", str(draws), "--keep-draws", "0", "--no-matrix",
              "--modality", side, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    return pd.read_csv(out / "forgetting.csv").iloc[0]


@pytest.mark.parametrize("side", ["image", "text"])
def test_lesion_of_six_gives_the_cards_changes(card, cross, side):
    """The lesion's own changes (no random draws needed: one draw keeps it short)."""
    want = {r["readout"]: r for r in card["phenomenon"]["lesion"]["rows"]}[f"{side} side"]
    got = lesion_six(cross, side, 1)
    assert sorted(got["units"].split(";")) == sorted(["head.fc:112", "fusion.layers.3.mlp.act:49,86,104"])
    for col in ("target_change", "other_change"):  # the card keeps 6 decimals; float32 forward passes
        assert abs(got[col] - want[col]) < 2e-6, (col, got[col], want[col])
    assert int(got["target_rank"]) == want["target_rank"]


@pytest.mark.slow
@pytest.mark.parametrize("side", ["image", "text"])
def test_lesion_of_six_against_100_random_lesions_gives_the_cards_control(card, cross, side):
    """The random control of the card and the README (about 4 CPU-minutes per side here)."""
    want = {r["readout"]: r for r in card["phenomenon"]["lesion"]["rows"]}[f"{side} side"]
    got = lesion_six(cross, side, want["n_random"])
    for col, key in (("random_target_change", "random_target_mean"), ("random_target_sd", "random_target_sd"),
                     ("p_random", "p_random"), ("p_random_specific", "p_random_specific")):
        assert abs(got[col] - want[key]) < 2e-6, (col, got[col], want[key])
