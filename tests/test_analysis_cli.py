"""`neuroprobe cells` and `neuroprobe figures` in a subprocess, on a real recording of the planted subject."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

from neuroprobe import record
from neuroprobe.analysis import concept_cells
from neuroprobe.planted import make_planted

matplotlib.use("Agg")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    p = make_planted(root / "battery", seed=2)
    rec = record(p.subject, p.battery, root / "planted.h5", montage="mlp", quiet=True)
    rec.close()
    q = make_planted(root / "battery_random", seed=2, init="random")
    rnd = record(q.subject, q.battery, root / "planted_random.h5", montage="mlp", quiet=True)
    rnd.close()
    return p, root / "planted.h5", root / "planted_random.h5"


def test_cells_command_prints_counts_beside_controls_and_writes_the_table(recordings, tmp_path):
    p, path, rnd = recordings
    out = tmp_path / "cells.csv"
    r = cli("cells", str(path), "--k", "5", "--fdr", "0.05", "--method", "by", "--control", str(rnd),
            "--out", str(out), "--n-perm", "200", "-q", "--controls", "rotation,shuffle", "--shuffles", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # what is tested, against which null, in which family; the design check; how each control was made
    assert "exact permutation null" in r.stdout and "over" in r.stdout and "units" in r.stdout
    assert any(line.startswith("design:") and "smallest attainable p" in line for line in lines)
    assert any(line.startswith("rotation control: units z-scored on the screening split") for line in lines)
    shuffle_line = next(line for line in lines if line.startswith("label-shuffle control"))
    shuffles = pd.read_csv(tmp_path / "cells.shuffle.csv")
    assert shuffles["shuffle"].nunique() == 2 and "2 shuffles" in shuffle_line
    assert f"{shuffles['cells'].sum() / 2:.1f} cells per shuffle" in shuffle_line
    header = next(line for line in lines if "cells|rotated" in line)
    assert "cells|untrained" in header and "candidates|rotated" in header
    site_row = next(line for line in lines if line.startswith("hidden"))
    values = dict(zip(header.split(), site_row.split()[1:]))
    table = pd.read_csv(out)
    api = concept_cells(path, k=5, fdr=0.05, method="by", n_perm=200)
    # the printed counts are the table's counts, and the table is the API's table
    assert int(values["cells"]) == int(table["is_cell"].sum()) == int(api["is_cell"].sum()) == len(p.truth)
    assert int(values["cells|rotated"]) == int(pd.read_csv(tmp_path / "cells.rotation.csv")["is_cell"].sum())
    assert int(values["cells|untrained"]) == int(pd.read_csv(tmp_path / "cells.untrained.csv")["is_cell"].sum())
    found = table[table["is_cell"]].set_index("unit")["concept"].to_dict()
    assert found == {int(u): c for u, c in zip(p.truth["unit"], p.truth["concept"])}
    assert {"site", "unit", "si", "si_morcos", "d_prime", "auc", "lifetime_sparseness", "kurtosis", "concept", "p", "q",
            "is_candidate", "is_cell", "invariant", "multimodal", "dead", "transform"} <= set(table.columns)
    assert (table["transform"] == "shift").all()
    assert "per concept" in r.stdout and "concept0" in r.stdout


def test_cells_command_parquet_and_no_rotation(recordings, tmp_path):
    _, path, _ = recordings
    out = tmp_path / "cells.parquet"
    r = cli("cells", str(path), "--no-rotation", "--out", str(out), "--n-perm", "0", "-q", "--transform", "clip")
    assert r.returncode == 0, r.stderr
    assert "rotated" not in r.stdout
    table = pd.read_parquet(out)
    assert (table["transform"] == "clip").all() and table["is_cell"].sum() > 0


def test_cells_command_bad_input_is_one_line(recordings, tmp_path):
    _, path, _ = recordings
    r = cli("cells", str(tmp_path / "nope.h5"), "-q")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = cli("cells", str(path), "--out", str(tmp_path / "cells.xlsx"), "-q")
    assert r.returncode == 2 and ".csv or .parquet" in r.stderr
    r = cli("cells", str(path), "--controls", "rotation,bogus", "-q")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown control 'bogus'" in r.stderr


def test_cells_command_says_when_a_perfect_cell_could_not_pass(tmp_path):
    import numpy as np

    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    st = make_stimuli(n_concepts=8, per_concept=4)  # 2 screening stimuli per concept
    x = np.random.default_rng(0).standard_normal((len(st), 200))
    x[:, 0] = 10.0 * (st["concept"] == "c1").to_numpy()  # perfectly selective, and still not findable
    path = write_recording(tmp_path / "small.h5", st, {"s": x})
    r = cli("cells", str(path), "--controls", "none", "--n-perm", "0", "-q")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "could NOT pass" in line)
    # 1/120 is above even a single unit's threshold (0.05 / 8): no number of units helps
    assert "stimuli (both splits)" in line and "no number of units helps" in line


def test_figures_command_and_functions(recordings, tmp_path):
    p, path, rnd = recordings
    out = tmp_path / "cells.csv"
    assert cli("cells", str(path), "--control", str(rnd), "--out", str(out), "--n-perm", "100", "-q").returncode == 0
    figs = tmp_path / "figs"
    r = cli("figures", str(path), "--cells", str(out), "--out", str(figs), "--top", "2")
    assert r.returncode == 0, r.stderr
    names = sorted(f.name for f in figs.iterdir())
    assert "cells_per_layer.png" in names and "invariance.png" in names and "selectivity_si.png" in names
    assert sum(n.startswith("unit_hidden_") for n in names) == 2
    from neuroprobe.analysis import figures as F

    table = pd.read_csv(out)
    fig = F.plot_unit(path, "hidden", int(p.truth["unit"].iloc[0]), cells=table)
    assert "concept cell" in fig._suptitle.get_text()
    fig = F.plot_cells_per_layer(table, pd.read_csv(tmp_path / "cells.untrained.csv"), pd.read_csv(tmp_path / "cells.rotation.csv"))
    heights = [b.get_height() for b in fig.axes[0].patches if b.get_height() > 0]
    assert max(heights) == table["is_cell"].sum()
