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
    """The organism's ``digits`` recording, killed in its 5th batch of 32 images: no text recorded."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "kill_record.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    out = root / "organism.h5"
    res = subprocess.run([sys.executable, str(script), "record", "--model", "organism", "--batch-size", "32",
                          "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(ENV, KILL_AT="5"))
    assert res.returncode == -9, (res.returncode, res.stderr)
    with h5py.File(out, "r", swmr=True) as f:
        n_done = int(f.attrs["n_done"])
        assert not f.attrs["complete"] and n_done in (64, 96, 128), n_done  # batches committed before the kill
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
