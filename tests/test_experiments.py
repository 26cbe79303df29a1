"""The shared steps of analyses/ scripts: the provenance-keyed cache, cells with controls, the Report."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

import neuroprobe as npb
from neuroprobe.experiments import Report, cache_key, cached_recording, cells_with_controls


def test_cached_recording_is_reused_and_keyed_by_provenance(tmp_path):
    battery = npb.load_battery("digits")
    trained = npb.load_subject("organism", device="cpu", quiet=True)
    first = cached_recording(trained, battery, cache=tmp_path, montage="image.fc")
    mtime = first.path.stat().st_mtime_ns
    again = cached_recording(trained, battery, cache=tmp_path, montage="image.fc")
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # reused, not re-recorded
    # the untrained twin and another montage are other recordings
    twin = npb.load_subject("organism", init="random", device="cpu", quiet=True)
    other = cached_recording(twin, battery, cache=tmp_path, montage="image.fc")
    wider = cached_recording(trained, battery, cache=tmp_path, montage="image.fc,text.fc")
    assert len({first.path, other.path, wider.path}) == 3
    # the recorded values are the subject's: the cached file equals a direct recording
    direct = npb.record(trained, battery, tmp_path / "direct.h5", montage="image.fc", quiet=True)
    pd.testing.assert_frame_equal(pd.DataFrame(first.responses("image.fc")[:]),
                                  pd.DataFrame(direct.responses("image.fc")[:]))


def test_cache_key_changes_with_every_identity_field():
    base = {"subject": "organism", "checkpoint": "w sha256:1", "init": "pretrained", "battery_hash": "a",
            "montage": "all", "pooling": "mean", "seed": 0}
    keys = {cache_key(base)}
    for field, value in [("checkpoint", "w sha256:2"), ("init", "random"), ("battery_hash", "b"),
                         ("montage", "mlp"), ("pooling", "max"), ("seed", 1)]:
        keys.add(cache_key({**base, field: value}))
    assert len(keys) == 7
    assert cache_key(dict(base)) == cache_key(base)


def test_cells_with_controls_finds_cells_only_in_the_trained_organism(tmp_path):
    study = cells_with_controls("organism", "digits", cache=tmp_path, montage="image.fc,text.fc", n_shuffles=2,
                                device="cpu", n_perm=0)
    counts = study.counts()
    per = counts.groupby("condition")["cells"].sum()
    assert per["trained"] >= 10                    # the organism's cells (README: 30 over all sites)
    assert per["untrained"] == 0 and per["shuffle"] <= 1 and per["rotation"] <= per["trained"]
    # the tables are cached: a second call reads them back equal
    again = cells_with_controls("organism", "digits", cache=tmp_path, montage="image.fc,text.fc", n_shuffles=2,
                                device="cpu", n_perm=0)
    pd.testing.assert_frame_equal(again.counts(), counts)


def test_report_writes_every_number_the_finding_and_a_thumbnail(tmp_path):
    import argparse

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = argparse.Namespace(model="organism", quick=True, gallery=tmp_path / "gallery")
    rep = Report("demo", tmp_path / "out", "Does it work?", args=args)
    rep.add("cells", 30, condition="trained", site="image.fc")
    rep.add("cells", 0, condition="untrained", site="image.fc", ci=(0.0, 1.0))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, 1], [0, 30])
    rep.figure(fig, "curve")
    md = rep.write(finding="30 cells.", control="0 in the untrained twin.", published="Quiroga et al. 2005")
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table["value"]) == [30.0, 0.0] and list(table["condition"]) == ["trained", "untrained"]
    text = md.read_text()
    assert "30 cells." in text and "0 in the untrained twin." in text and "--quick" in text
    from PIL import Image

    with Image.open(tmp_path / "gallery" / "demo.png") as im:
        assert im.width == 480
    assert rep.value("cells", condition="untrained") == 0.0


def test_experiment_args_usage_error_is_one_line(tmp_path):
    code = "from neuroprobe.experiments.cli import experiment_args; experiment_args('x', 'doc', argv=['--seed', 'a'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "invalid int value" in r.stderr and "Traceback" not in r.stderr
