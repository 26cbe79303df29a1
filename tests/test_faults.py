"""Faults and bad input: every case ends in one sentence (exit 2) and leaves every existing file as it was.

The matrix of issue 16, as tests:

- batteries from someone else (encoding, malformed concepts, NUL bytes, reserved
  column names, images outside the folder, corrupt/truncated/empty/huge images),
  as a list of named cases and as a seeded generator of combined mutations;
- damaged recordings given to ``open_recording``, ``inspect``, ``cells`` and
  ``figures``, and bad option values;
- a full disk (a small tmpfs mounted in the test), two writers, a failed
  ``--overwrite``, a stub left by a kill, stale temporary files, a pickle that
  asks to run code.

CLI cases run in-process through ``neuroprobe.cli.main`` (the same code path as
the command, minus ~3 s of interpreter start-up per case); a representative
subset runs as real subprocesses, and the whole matrix does under ``-m slow``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neuroprobe import Battery, open_recording, record
from neuroprobe.analysis.synthetic import make_stimuli, write_recording
from neuroprobe.errors import BatteryError, NeuroprobeError, RecordingError
from neuroprobe.planted import make_planted
from neuroprobe.recording.lock import WriterLock, lock_path
from neuroprobe.recording.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file under ``folder`` (to prove that nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(code: int, err: str) -> str:
    """Assert exit 2 and exactly one ``neuroprobe: error:`` line on stderr, no traceback; return it."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("neuroprobe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_main(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run the command in-process (``neuroprobe.cli.main``); return (exit code, stderr)."""
    from neuroprobe import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["neuroprobe", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, capsys.readouterr().err


def run_cli(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=600)
    return res.returncode, res.stderr


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


GOOD_CONCEPTS = {"mother": {"prompt": "a mother", "names": ["mother", "mom"]}, "father": {"prompt": "a father", "names": ["father"]}}


def good_rows() -> list[dict[str, str]]:
    rows = []
    for i, c in enumerate(["mother", "father"] * 3):
        rows.append(dict(id=f"t{i}", concept=c, modality="text", form="text-name", split=["screening", "testing"][i % 2],
                         text=f"my {c} is here", image=""))
        rows.append(dict(id=f"i{i}", concept=c, modality="image", form="photo", split=["screening", "testing"][i % 2],
                         text="", image="images/ok.png"))
    return rows


def write_battery(folder: Path, rows: list[dict] | None = None, meta: dict | None = None) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "ok.png").write_bytes(png_bytes())
    (folder / "battery.json").write_text(json.dumps(meta or {"name": "b", "concepts": GOOD_CONCEPTS}), encoding="utf-8")
    pd.DataFrame(rows or good_rows()).to_csv(folder / "stimuli.csv", index=False)
    return folder


def set_cell(folder: Path, row: int, column: str, value: str) -> None:
    rows = good_rows()
    rows[row][column] = value
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)


# ---------------------------------------------------------- bad batteries


def _latin1_json(d: Path) -> None:
    (d / "battery.json").write_bytes(json.dumps({"name": "b", "concepts": {"mère": {}, "father": {}}},
                                                ensure_ascii=False).encode("latin-1"))


def _latin1_csv(d: Path) -> None:
    text = pd.DataFrame(good_rows()).to_csv(index=False).replace("my mother", "ma mère")
    (d / "stimuli.csv").write_bytes(text.encode("latin-1"))


def _concept_string(d: Path) -> None:
    (d / "battery.json").write_text(json.dumps({"name": "b", "concepts": {"mother": "a mother", "father": {}}}))


def _names_not_list(d: Path) -> None:
    (d / "battery.json").write_text(json.dumps({"name": "b", "concepts": {"mother": {"names": "mom"}, "father": {}}}))


def _no_concepts(d: Path) -> None:
    (d / "battery.json").write_text(json.dumps({"name": "b", "concepts": {}}))


def _concepts_list(d: Path) -> None:
    (d / "battery.json").write_text(json.dumps({"name": "b", "concepts": ["mother", "father"]}))


def _not_json(d: Path) -> None:
    (d / "battery.json").write_text("{name: b")


def _column(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        rows = [dict(r, **{name: "x"}) for r in good_rows()]
        pd.DataFrame(rows).to_csv(d / "stimuli.csv", index=False)
    return make


def _nul_text(d: Path) -> None:
    set_cell(d, 0, "text", "my mo\x00ther")


def _outside_relative(d: Path) -> None:
    (d.parent / "secret.png").write_bytes(png_bytes())
    set_cell(d, 1, "image", "../secret.png")


def _outside_absolute(d: Path) -> None:
    (d.parent / "secret.png").write_bytes(png_bytes())
    set_cell(d, 1, "image", str(d.parent / "secret.png"))


def _outside_symlink(d: Path) -> None:
    (d.parent / "secret.png").write_bytes(png_bytes())
    (d / "images" / "link.png").symlink_to(d.parent / "secret.png")
    set_cell(d, 1, "image", "images/link.png")


def _image(data: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / "images" / "bad.png").write_bytes(data)
        set_cell(d, 3, "image", "images/bad.png")
    return make


def _empty_table(d: Path) -> None:
    (d / "stimuli.csv").write_text("id,concept,modality,form,split,text,image\n")


def _missing_manifest(d: Path) -> None:
    (d / "battery.json").unlink()


def _bad_value(column: str, value: str, row: int = 3) -> Callable[[Path], None]:
    return lambda d: set_cell(d, row, column, value)  # row 3 is an image stimulus


BAD_BATTERIES: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (mutation, a word the sentence must hold)
    "latin-1 battery.json": (_latin1_json, "UTF-8"),
    "latin-1 stimuli.csv": (_latin1_csv, "UTF-8"),
    "concept given as a string": (_concept_string, "must be an object"),
    "concept names not a list": (_names_not_list, "names"),
    "no concepts": (_no_concepts, "no concepts"),
    "concepts as a list": (_concepts_list, "concepts"),
    "battery.json not JSON": (_not_json, "JSON"),
    "column named index": (_column("index"), "index"),
    "column with a slash": (_column("a/b"), "a/b"),
    "NUL byte in text": (_nul_text, "NUL"),
    "image ../ outside the folder": (_outside_relative, "outside the battery folder"),
    "absolute image path": (_outside_absolute, "outside the battery folder"),
    "symlink out of the folder": (_outside_symlink, "outside the battery folder"),
    "corrupt image": (_image(b"\x89PNG\r\n\x1a\n" + os.urandom(64)), "cannot be decoded"),
    "truncated image": (_image(png_bytes((64, 64))[:60]), "cannot be decoded"),
    "empty image": (_image(b""), "empty"),
    "20000 x 20000 image": (_image(png_header_only(20000, 20000)), "too large"),
    "text file as image": (_image(b"hello, I am not a picture\n"), "cannot be decoded"),
    "no stimuli": (_empty_table, "no stimuli"),
    "no battery.json": (_missing_manifest, "battery.json"),
    "unknown modality": (_bad_value("modality", "smell"), "smell"),
    "unknown split": (_bad_value("split", "sideways"), "sideways"),
    "undeclared concept": (_bad_value("concept", "uncle"), "uncle"),
    "empty id": (_bad_value("id", ""), "id"),
    "missing image file": (_bad_value("image", "images/nope.png"), "nope.png"),
}


@pytest.mark.parametrize("case", list(BAD_BATTERIES))
def test_bad_battery_is_one_sentence_and_touches_nothing(case, tmp_path):
    folder = write_battery(tmp_path / "battery")
    mutate, word = BAD_BATTERIES[case]
    mutate(folder)
    before = snapshot(tmp_path)
    with pytest.raises(BatteryError) as info:
        Battery.load(folder)
    message = str(info.value)
    assert "\n" not in message and word in message, message
    assert snapshot(tmp_path) == before


def test_outside_images_with_explicit_opt_in(tmp_path):
    for mutate in (_outside_relative, _outside_absolute):
        folder = write_battery(tmp_path / mutate.__name__)
        mutate(folder)
        with pytest.raises(BatteryError, match="outside the battery folder"):
            Battery.load(folder)
        assert len(Battery.load(folder, allow_outside_images=True)) == 12
        meta = json.loads((folder / "battery.json").read_text())
        (folder / "battery.json").write_text(json.dumps(dict(meta, allow_outside_images=True)))
        assert len(Battery.load(folder)) == 12
    table = pd.DataFrame(good_rows())
    table.loc[1, "image"] = "../secret.png"
    with pytest.raises(BatteryError, match="outside"):
        Battery.from_table(table, GOOD_CONCEPTS, root=tmp_path / "_outside_relative")


#: mutations that each make a battery invalid, for the generator
_INVALID = [_latin1_json, _concept_string, _names_not_list, _column("index"), _column("x/y"), _nul_text,
            _outside_relative, _outside_absolute, _image(b""), _image(png_header_only(30000, 30000)),
            _image(b"GIF89a" + bytes(10)), _bad_value("modality", "touch"), _bad_value("split", ""),
            _bad_value("concept", "nobody"), _bad_value("image", "/etc/hostname")]


def _noise(d: Path, rng: random.Random) -> None:
    """Valid but unusual content: unicode, quotes, commas, long text (must not matter)."""
    rows = good_rows()
    for r in rows:
        if r["modality"] == "text":
            r["text"] = rng.choice(["ünïcödé mother 🙂", 'a "quoted", text', "x" * 2000, "  padded  ", "tab\there"])
    pd.DataFrame(rows).to_csv(d / "stimuli.csv", index=False)


def _generated_batteries(n: int, seed: int, tmp: Path) -> None:
    rng = random.Random(seed)
    for case in range(n):
        folder = write_battery(tmp / f"gen{case}" / "battery")
        if rng.random() < 0.5:
            _noise(folder, rng)
        for mutate in rng.sample(_INVALID, rng.randint(1, 3)):
            mutate(folder)
        before = snapshot(folder.parent)
        try:
            Battery.load(folder)
        except BatteryError as err:
            assert "\n" not in str(err)
        else:
            raise AssertionError(f"generated case {case} (seed {seed}) was accepted")
        assert snapshot(folder.parent) == before


def test_generated_bad_batteries(tmp_path):
    _generated_batteries(25, seed=0, tmp=tmp_path)


@pytest.mark.slow
def test_generated_bad_batteries_sweep(tmp_path):
    _generated_batteries(400, seed=1, tmp=tmp_path)


# --------------------------------------------------------- bad recordings


@pytest.fixture(scope="module")
def good_recording(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    stim = make_stimuli(3, 8)
    rng = np.random.default_rng(0)
    path = write_recording(folder / "good.h5", stim, {"s0": rng.standard_normal((len(stim), 5)),
                                                       "s1": rng.standard_normal((len(stim), 4))}, batch_size=6)
    return path


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        shutil.copy(src, dst)
        with h5py.File(dst, "r+") as f:
            fn(f)
    return make


def _replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f[name] = data


def _raw(data: bytes) -> Callable[[Path, Path], None]:
    return lambda src, dst: dst.write_bytes(data)


def _only_format(src: Path, dst: Path) -> None:
    with h5py.File(dst, "w") as f:
        f.attrs["format"] = "neuroprobe-recording"


def _plain_hdf5(src: Path, dst: Path) -> None:
    with h5py.File(dst, "w") as f:
        f["x"] = np.arange(3)


def _all_nan(f: h5py.File) -> None:
    for name in f["sites"]:
        ds = f[f"sites/{name}/responses"]
        ds[...] = np.nan


def _drop_sites(f: h5py.File) -> None:
    for name in list(f["sites"]):
        del f[f"sites/{name}"]


BAD_RECORDINGS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "only the format attribute": (_only_format, "/stimuli"),
    "plain HDF5 file": (_plain_hdf5, "not a neuroprobe recording"),
    "text file": (_raw(b"site,unit\nx,1\n"), "cannot be opened as HDF5"),
    "empty file": (_raw(b""), "cannot be opened as HDF5"),
    "format_version not an integer": (_edit(lambda f: f.attrs.__setitem__("format_version", "one")), "format_version"),
    "format_version a fraction": (_edit(lambda f: f.attrs.__setitem__("format_version", 1.5)), "format_version"),
    "format_version from the future": (_edit(lambda f: f.attrs.__setitem__("format_version", 99)), "upgrade"),
    "no sites group": (_edit(lambda f: f.__delitem__("sites")), "/sites"),
    "no stimuli group": (_edit(lambda f: f.__delitem__("stimuli")), "/stimuli"),
    "site attribute missing": (_edit(lambda f: f["sites/s0"].attrs.__delitem__("stream")), "stream"),
    "site responses missing": (_edit(lambda f: f.__delitem__("sites/s1/responses")), "responses"),
    "concept column missing": (_edit(lambda f: f.__delitem__("stimuli/concept")), "concept"),
    "stimulus count mismatch": (_edit(lambda f: _replace(f, "stimuli/id", np.array([b"a", b"b"]))), "rows"),
    "responses shorter than the stimuli": (_edit(lambda f: _replace(f, "sites/s0/responses", np.zeros((3, 5), "f4"))), "shape"),
    "n_done out of range": (_edit(lambda f: f.attrs.__setitem__("n_done", -4)), "n_done"),
    "zero sites": (_edit(_drop_sites), "no sites"),
}

#: damaged files that open, and fail only in the commands that analyse them
ANALYSIS_ONLY: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "all-NaN recording": (_edit(_all_nan), "no finite response"),
    "incomplete recording": (_edit(lambda f: (f.attrs.__setitem__("complete", False), f.attrs.__setitem__("n_done", 6))),
                             "covers 6 of 24"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDINGS) + list(ANALYSIS_ONLY))
def test_bad_recording_is_one_sentence_everywhere(case, good_recording, tmp_path, capsys, monkeypatch):
    make, word = {**BAD_RECORDINGS, **ANALYSIS_ONLY}[case]
    bad = tmp_path / "bad.h5"
    make(good_recording, bad)
    cells_csv = tmp_path / "cells.csv"
    cells_csv.write_text("site,unit,concept,is_cell,z\ns0,0,c0,True,9\n")
    before = snapshot(tmp_path)
    commands = [["cells", str(bad), "--no-rotation", "--n-perm", "0", "-q"],
                ["figures", str(bad), "--cells", str(cells_csv), "--out", str(tmp_path / "figs"), "-q"]]
    if case in BAD_RECORDINGS:
        with pytest.raises(RecordingError) as info:
            open_recording(bad)
        assert "\n" not in str(info.value) and word in str(info.value), str(info.value)
        commands.append(["inspect", str(bad)])
    for args in commands:
        line = one_sentence(*run_main(args, capsys, monkeypatch))
        assert word in line, (args, line)
    assert snapshot(tmp_path) == before


def test_incomplete_recording_needs_opt_in_and_says_what_it_covers(good_recording, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "part.h5"
    ANALYSIS_ONLY["incomplete recording"][0](good_recording, bad)
    code, err = run_main(["cells", str(bad), "--no-rotation", "--n-perm", "0", "-q", "--allow-incomplete"], capsys, monkeypatch)
    assert code == 0 and "incomplete" in err and "covers 6 of 24 stimuli" in err, err


@pytest.mark.parametrize("args, word", [
    (["cells", "{rec}", "--n-perm", "-5", "--no-rotation"], "--n-perm"),
    (["cells", "{rec}", "--k", "0", "--no-rotation"], "--k"),
    (["cells", "{rec}", "--fdr", "1.5", "--no-rotation"], "--fdr"),
    (["cells", "{rec}", "--out", "{tmp}/cells.h5"], ".csv"),
    (["figures", "{rec}", "--cells", "{rec}", "--out", "{tmp}/f"], "not a cells table"),
    (["figures", "{rec}", "--cells", "{tmp}/cells.csv", "--dpi", "0", "--out", "{tmp}/f"], "--dpi"),
    (["figures", "{rec}", "--cells", "{tmp}/cells.csv", "--top", "-1", "--out", "{tmp}/f"], "--top"),
    (["figures", "{rec}", "--cells", "{tmp}/missing.csv", "--out", "{tmp}/f"], "does not exist"),
    (["inspect", "{tmp}"], "directory"),
    (["inspect", "{tmp}/nothing.h5"], "does not exist"),
])
def test_bad_option_values(args, word, good_recording, tmp_path, capsys, monkeypatch):
    (tmp_path / "cells.csv").write_text("site,unit,concept,is_cell,z\ns0,0,c0,True,9\n")
    before = snapshot(tmp_path), snapshot(good_recording.parent)
    args = [a.format(rec=good_recording, tmp=tmp_path) for a in args]
    line = one_sentence(*run_main(args, capsys, monkeypatch))
    assert word in line, line
    assert (snapshot(tmp_path), snapshot(good_recording.parent)) == before


# ------------------------------------------------------------- record: refusals before the model loads


@pytest.mark.parametrize("case", ["device tpu", "empty sites", "out is a directory", "out under a file",
                                  "out exists", "out exists, --overwrite is a directory", "read-only folder",
                                  "bad battery", "resume and overwrite"])
def test_record_refuses_before_loading_the_model(case, tmp_path, capsys, monkeypatch):
    """Every case fails before the subject loads: the subject given does not even exist."""
    battery = write_battery(tmp_path / "battery")
    (tmp_path / "exists.h5").write_bytes(b"precious")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ro").mkdir()
    args = ["record", "--model", "no-such-subject", "--probe", str(battery), "--out", str(tmp_path / "new.h5")]
    extra, word = {
        "device tpu": (["--device", "tpu"], "--device"),
        "empty sites": (["--sites", ""], "--sites"),
        "out is a directory": (["--out", str(tmp_path)], "directory"),
        "out under a file": (["--out", str(tmp_path / "afile" / "r.h5")], "not a folder"),
        "out exists": (["--out", str(tmp_path / "exists.h5")], "already exists"),
        "out exists, --overwrite is a directory": (["--out", str(tmp_path / "battery"), "--overwrite"], "directory"),
        "read-only folder": (["--out", str(tmp_path / "ro" / "r.h5")], "not writable"),
        "bad battery": (["--probe", str(tmp_path / "afile")], "not a folder"),
        "resume and overwrite": (["--out", str(tmp_path / "exists.h5"), "--resume", "--overwrite"], "either"),
    }[case]
    if case == "read-only folder":
        if os.geteuid() == 0:  # root writes anywhere: make the folder a read-only mount instead
            if not _can_mount():
                pytest.skip("needs a read-only folder: running as root without permission to mount")
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp_path / "ro")], check=True)
        else:
            (tmp_path / "ro").chmod(0o555)
    try:
        before = snapshot(tmp_path)
        line = one_sentence(*run_main(args + extra, capsys, monkeypatch))
        assert word in line and "unknown subject" not in line, line
        assert snapshot(tmp_path) == before
    finally:
        if case == "read-only folder" and os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def test_weights_pickle_is_refused_in_one_sentence(tiny_dir, tmp_path):
    """A ``pytorch_model.bin`` that would run code is refused by name, and its code never runs."""
    from neuroprobe import load_subject

    folder = tmp_path / "evil"
    shutil.copytree(tiny_dir("bert"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(NeuroprobeError) as info:
        load_subject("bert", weights=folder, device="cpu", quiet=True)
    message = str(info.value)
    assert "pickle" in message and "will not load" in message and "\n" not in message, message
    assert not marker.exists()


# ----------------------------------------------------------------- writer faults (planted subject: fast)


@pytest.fixture()
def planted(tmp_path):
    return make_planted(tmp_path / "planted-battery", seed=3, n_concepts=3, per_form=2)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".reserve", ".lock")))


def test_failed_overwrite_keeps_the_good_recording(planted, tmp_path, monkeypatch):
    keep = tmp_path / "keep_me.h5"
    record(planted.subject, planted.battery, keep, montage="all", batch_size=4, quiet=True).close()
    before = keep.read_bytes()
    calls = {"n": 0}
    forward = planted.subject.forward

    def failing_forward(batch):
        calls["n"] += 1
        if calls["n"] == 4:  # after the unit count and two committed batches of the new recording
            raise RuntimeError("the model broke")
        return forward(batch)

    monkeypatch.setattr(planted.subject, "forward", failing_forward)
    for failure in (RuntimeError, KeyboardInterrupt):
        calls["n"] = 0
        if failure is KeyboardInterrupt:
            monkeypatch.setattr(planted.subject, "forward", lambda b: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(failure):
            Recorder(planted.subject, planted.battery, montage="all", batch_size=4, quiet=True).run(keep, overwrite=True)
        assert keep.read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.setattr(planted.subject, "forward", forward)
    Recorder(planted.subject, planted.battery, montage="hidden", batch_size=4, quiet=True).run(keep, overwrite=True)
    with open_recording(keep) as rec:  # a finished overwrite replaced the file
        assert rec.complete and rec.site_names == ["hidden"]
    assert leftovers(tmp_path) == []


def test_second_writer_is_refused_naming_the_first(planted, tmp_path):
    out = tmp_path / "r.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom neuroprobe.recording.lock import WriterLock\n"
         f"WriterLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecordingError) as info:
            Recorder(planted.subject, planted.battery, montage="all", quiet=True).run(out)
        message = str(info.value)
        assert f"process {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message, message
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the stale lock file blocks nobody
    assert lock_path(out).exists()
    Recorder(planted.subject, planted.battery, montage="all", quiet=True).run(out)
    assert open_recording(out).complete and not lock_path(out).exists()
    # a second writer in the same process is refused too (and --overwrite does not get around it)
    with WriterLock(out):
        before = out.read_bytes()
        with pytest.raises(RecordingError, match=f"process {os.getpid()}"):
            Recorder(planted.subject, planted.battery, montage="all", quiet=True).run(out, overwrite=True)
        assert out.read_bytes() == before


def test_resume_of_a_stub_starts_afresh_and_stale_temporaries_go(planted, tmp_path):
    """Files that hold nothing: empty, a cut signature, the bare superblock a killed older neuroprobe left."""
    ref = tmp_path / "ref.h5"
    Recorder(planted.subject, planted.battery, montage="all", batch_size=4, quiet=True).run(ref)
    old = tmp_path / "old-stub.h5"  # an older neuroprobe created the file in place, then was killed
    subprocess.run([sys.executable, "-c", f"import h5py, os\nf = h5py.File({str(old)!r}, 'w', track_order=True)\n"
                    "f.attrs['format'] = 'neuroprobe-recording'\nos._exit(0)\n"], check=True)
    superblock_only = old.read_bytes()
    old.unlink()
    assert superblock_only.startswith(b"\x89HDF") and len(superblock_only) <= 96
    for stub in (b"", b"\x89HD", superblock_only):
        out = tmp_path / "stub.h5"
        out.write_bytes(stub)
        (tmp_path / ".stub.h5.12345.partial").write_bytes(b"left by a killed writer")
        (tmp_path / ".stub.h5.12345.partial.reserve").write_bytes(bytes(10))
        Recorder(planted.subject, planted.battery, montage="all", batch_size=4, quiet=True).run(out, resume=True)
        with open_recording(out) as a, open_recording(ref) as b:
            assert a.complete and np.array_equal(a.responses("hidden")[()], b.responses("hidden")[()])
        assert leftovers(tmp_path) == []
        out.unlink()


def test_creation_never_leaves_a_stub(planted, tmp_path, monkeypatch):
    """A crash while the file's layout is written leaves nothing at the recording's path."""
    from neuroprobe.recording import writer

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.RecordingWriter, "_handle", crash)  # the first batch write
    monkeypatch.setattr(writer, "_str_attr", crash)                # inside create()
    with pytest.raises(KeyboardInterrupt):
        Recorder(planted.subject, planted.battery, montage="all", quiet=True).run(tmp_path / "r.h5")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "planted-battery") == []


def test_status_flags_of_a_killed_swmr_writer_are_cleared(tmp_path):
    """A file left open for SWMR writing (by a kill) is reopened for --resume after its flags are cleared."""
    from neuroprobe.recording.writer import LIBVER, clear_status_flags

    path = tmp_path / "killed.h5"
    code = (f"import h5py, os, numpy as np\nf = h5py.File({str(path)!r}, 'w', libver={LIBVER!r})\n"
            "f.create_dataset('x', data=np.arange(4.0)); f.attrs['n_done'] = 2\nf.swmr_mode = True\nf.flush()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(OSError):
        h5py.File(path, "r+")
    assert clear_status_flags(path) and not clear_status_flags(path)
    with h5py.File(path, "r+") as f:
        assert f.attrs["n_done"] == 2 and f["x"][3] == 3.0


# --------------------------------------------------------------------- full disk


def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of 8 MiB mounted in the test (root on Linux; skipped elsewhere, with the reason)."""
    if not _can_mount():
        pytest.skip("the full-disk test mounts a small tmpfs: needs root on Linux (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_in_one_sentence_and_resume_is_bit_exact(small_disk, tmp_path):
    """minilm, 40 stimuli, per-token traces: ~20 MB onto 8 MiB.  Exit 2 with one sentence; the file is a valid
    recording up to a truthful n_done; after the disk grows, --resume gives the uninterrupted file bit for bit."""
    full = Battery.load("kinship")
    battery = tmp_path / "kin40"
    battery.mkdir()
    shutil.copy(full.root / "battery.json", battery / "battery.json")
    full.table.head(40).to_csv(battery / "stimuli.csv", index=False)
    from neuroprobe import load_subject

    common = ["record", "--model", "minilm", "--probe", str(battery), "--sites", "mlp", "--tokens", "--batch-size", "4",
              "--device", "cpu", "--quiet"]
    ref, out = tmp_path / "ref.h5", small_disk / "r.h5"
    minilm = load_subject("minilm", device="cpu", quiet=True)
    options = dict(montage="mlp", tokens=True, batch_size=4, quiet=True)
    Recorder(minilm, Battery.load(battery), **options).run(ref)  # the same recording as the command's, in-process
    line = one_sentence(*run_cli(*common, "--out", str(out)))
    assert "disk is full" in line and "--resume" in line
    with open_recording(out) as part, open_recording(ref) as whole:
        assert not part.complete and 0 < part.n_done < 40
        for site in whole.site_names:  # every committed row is on disk and equal to the uninterrupted one
            assert np.array_equal(part.responses(site)[: part.n_done], whole.responses(site)[: part.n_done])
    assert leftovers(small_disk) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    Recorder(minilm, Battery.load(battery), **options).run(out, resume=True)
    datasets = {}
    for p in (ref, out):
        with h5py.File(p, "r") as f:
            d = {}
            f.visititems(lambda name, obj: d.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            datasets[p] = d
    a, b = datasets[ref], datasets[out]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def test_full_disk_at_creation_leaves_nothing(planted, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(bytes(8 * 1024 * 1024 - 64 * 1024))  # leave 64 KiB
    with pytest.raises(RecordingError, match="disk is full"):
        Recorder(planted.subject, planted.battery, montage="all", quiet=True).run(small_disk / "r.h5")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# --------------------------------------------------------------------- real subprocesses (representative)


def test_cli_subset_by_subprocess(good_recording, tmp_path):
    """The same refusals through a real ``neuroprobe`` process: one line, exit 2, nothing changed."""
    battery = write_battery(tmp_path / "battery")
    _latin1_json(battery)
    damaged = tmp_path / "damaged.h5"
    BAD_RECORDINGS["site attribute missing"][0](good_recording, damaged)
    (tmp_path / "keep_me.h5").write_bytes(b"a recording worth keeping")
    before = snapshot(tmp_path)
    cases = [
        (["record", "--model", "minilm", "--probe", str(battery), "--out", str(tmp_path / "keep_me.h5"), "--overwrite"], "UTF-8"),
        (["inspect", str(damaged)], "stream"),
        (["record", "--model", "no-such-subject", "--out", str(tmp_path / "keep_me.h5")], "already exists"),
    ]
    for args, word in cases:
        line = one_sentence(*run_cli(*args, cwd=tmp_path))
        assert word in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_whole_matrix_by_subprocess(good_recording, tmp_path):
    """Every bad battery (through ``record``) and every damaged recording (through ``inspect``) in a real process."""
    for i, (name, (mutate, word)) in enumerate(BAD_BATTERIES.items()):
        folder = write_battery(tmp_path / f"b{i}" / "battery")
        mutate(folder)
        before = snapshot(tmp_path / f"b{i}")
        line = one_sentence(*run_cli("record", "--model", "minilm", "--probe", str(folder), "--out",
                                     str(tmp_path / f"b{i}" / "r.h5")))
        assert word in line, (name, line)
        assert snapshot(tmp_path / f"b{i}") == before
    for i, (name, (make, word)) in enumerate(BAD_RECORDINGS.items()):
        bad = tmp_path / f"r{i}.h5"
        make(good_recording, bad)
        line = one_sentence(*run_cli("inspect", str(bad)))
        assert word in line, (name, line)
