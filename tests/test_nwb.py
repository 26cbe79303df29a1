"""NWB export: a recording written through pynwb passes nwbinspector and reads back to the same numbers."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

pynwb = pytest.importorskip("pynwb", reason="pynwb is not installed (pip install 'neuroprobe-cells[nwb]')")
pytest.importorskip("nwbinspector", reason="nwbinspector is not installed (pip install 'neuroprobe-cells[nwb]')")

from neuroprobe import record  # noqa: E402
from neuroprobe.analysis import concept_cells  # noqa: E402
from neuroprobe.analysis.synthetic import make_stimuli, write_recording  # noqa: E402
from neuroprobe.export import export_nwb, inspect_nwb  # noqa: E402
from neuroprobe.export.nwb import _iterator  # noqa: E402
from neuroprobe.errors import NeuroprobeError  # noqa: E402
from neuroprobe.planted import make_planted  # noqa: E402
from neuroprobe.recording.reader import open_recording  # noqa: E402

CLI = [sys.executable, "-m", "neuroprobe.cli"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nwb")
    p = make_planted(root / "battery", seed=1)
    rec = record(p.subject, p.battery, root / "planted.h5", montage="mlp,resid", quiet=True)
    cells = concept_cells(rec, n_perm=100)
    cells.to_csv(root / "cells.csv", index=False)
    rec.close()
    return root, cells


def test_nwb_round_trip_and_inspector(planted):
    root, cells = planted
    res = subprocess.run(CLI + ["export", str(root / "planted.h5"), "--to", "nwb", "--cells", str(root / "cells.csv"),
                                "--out", str(root / "planted.nwb")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "nwbinspector:" in res.stdout
    messages = inspect_nwb(root / "planted.nwb")
    assert not [m for m in messages if m.importance.name in ("CRITICAL", "PYNWB_VALIDATION", "ERROR")], messages
    with open_recording(root / "planted.h5") as rec, pynwb.NWBHDF5IO(str(root / "planted.nwb"), "r") as io:
        nwb = io.read()
        stim = rec.stimuli.reset_index(drop=True)
        # stimuli -> trials, in order, with their labels
        trials = nwb.trials.to_dataframe()
        assert len(trials) == len(stim)
        for src, col in (("id", "stimulus_id"), ("concept", "concept"), ("form", "form"), ("modality", "modality"),
                         ("split", "split")):
            assert trials[col].tolist() == stim[src].astype(str).tolist()
        # responses: one column per site, aligned to trials, equal to the HDF5 values
        table = nwb.processing["neuroprobe"]["responses"]
        assert np.array_equal(table["trial"].data[:], np.arange(len(stim)))
        for site in rec.site_names:
            np.testing.assert_array_equal(table[site].data[:], rec.responses(site)[()])
        # one electrode group per site; units with site, index and cell labels
        assert set(nwb.electrode_groups) == set(rec.site_names)
        units = nwb.processing["neuroprobe"]["units"]
        got = pd.DataFrame({"site": units["site"].data[:], "unit": units["unit"].data[:],
                            "is_cell": units["is_cell"].data[:], "concept": units["concept"].data[:]})
        got["site"] = got["site"].astype(str)
        want = rec.units.merge(cells, on=["site", "unit"], how="left")
        assert got["site"].tolist() == want["site"].tolist() and got["unit"].tolist() == want["unit"].tolist()
        assert got["is_cell"].astype(bool).tolist() == want["is_cell"].fillna(False).astype(bool).tolist()
        assert int(got["is_cell"].sum()) > 0
        assert got.loc[got["is_cell"].astype(bool), "concept"].astype(str).tolist() == \
            want.loc[want["is_cell"].fillna(False).astype(bool), "concept"].tolist()
        groups = [units["electrode_group"][i].name for i in (0, len(got) - 1)]
        assert groups == [got["site"].iloc[0], got["site"].iloc[-1]]
        assert nwb.subject.subject_id == rec.attrs["subject"]


def test_nwb_streams_in_bounded_chunks(tmp_path):
    """The writer reads the responses a buffer at a time, never the whole site."""
    stim = make_stimuli(4, 100)
    rng = np.random.default_rng(0)
    path = write_recording(tmp_path / "wide.h5", stim, {"s": rng.standard_normal((len(stim), 3000)).astype(np.float32)},
                           batch_size=16)
    with open_recording(path) as rec:
        ds = rec.responses("s")
        it = _iterator(ds, buffer_mb=1)
        assert it.buffer_shape[0] * ds.shape[1] * 4 <= 2**20 and it.buffer_shape[0] < ds.shape[0]
        rows = 0
        for chunk in it:
            assert chunk.data.nbytes <= 2**20
            rows += chunk.data.shape[0]
        assert rows == ds.shape[0]  # every row once, a bounded piece at a time
        export_nwb(rec, tmp_path / "wide.nwb", buffer_mb=1)
    with pynwb.NWBHDF5IO(str(tmp_path / "wide.nwb"), "r") as io:
        got = io.read().processing["neuroprobe"]["responses"]["s"].data[:]
    with open_recording(path) as rec:
        np.testing.assert_array_equal(got, rec.responses("s")[()])
    with pytest.raises(NeuroprobeError, match="exists"):
        export_nwb(path, tmp_path / "wide.nwb")
