"""Three gaps closed on 2026-12-07.

1. ``neuroprobe cells --allow-incomplete`` on a recording killed before any stimulus of one
   tower was recorded (the organism's ``digits`` battery lists its 660 images before its 300
   texts): the text tower's sites are left out with a one-line warning naming them and the
   image tower's cells are computed; if no site asked for has a recorded stimulus, one line
   on stderr and exit 2.  The recording is killed for real (SIGKILL inside a forward pass of
   the command itself), at a fixed batch.
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
