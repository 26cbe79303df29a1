"""``neuroprobe record`` never writes where it must not, and Ctrl-C ends it at once (issue 24).

- ``--resume`` refuses, byte for byte untouched, any existing file that is not an
  incomplete neuroprobe recording of the same job: a text file, an HDF5 file of
  someone else, a recording of another subject, battery, montage or pooling (the
  message names every difference);
- a second writer reaching a live recording through a symbolic link or a hard link
  is refused, naming the first writer;
- Ctrl-C during one long forward pass (a single operator that Python cannot
  interrupt) ends the command within seconds with ``neuroprobe: interrupted`` and
  exit 130, once or twice in a row, and ``--resume`` then completes the recording
  bit for bit equal to an uninterrupted one.

Every case runs the real command in a subprocess.  The refusals of ``--resume`` use
minilm; the rest use a small script that puts a slow module into the planted subject
and then runs ``neuroprobe`` exactly as ``python -m neuroprobe`` does: its long pass is
one operator Python cannot interrupt (Ctrl-C tests), or a sleep that keeps a writer
live while a second one comes through a link.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from neuroprobe.planted import make_planted
from neuroprobe.recording.writer import LIBVER
from test_faults import ROOT, one_sentence, run_cli, snapshot

#: Longest the command may take to end after Ctrl-C (measured: ~0.3 s on a loaded 2-core machine).
INTERRUPT_LIMIT_S = 5.0

MINILM = ["--model", "minilm", "--sites", "encoder.layer.0.mlp", "--batch-size", "8", "--device", "cpu", "--quiet"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_recording(a: Path, b: Path) -> None:
    da, db = all_datasets(a), all_datasets(b)
    assert da.keys() == db.keys()
    for k in da:
        assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), k
    with h5py.File(b, "r") as f:
        assert bool(f.attrs["complete"])


@pytest.fixture(scope="module")
def kin16(tmp_path_factory) -> tuple[Path, Path]:
    """(a 16-stimulus kinship battery, an incomplete minilm recording of it: 8 of 16 committed)."""
    from neuroprobe import Battery

    root = tmp_path_factory.mktemp("kin16")
    full = Battery.load("kinship")
    battery = root / "kin16"
    battery.mkdir()
    (battery / "battery.json").write_bytes((full.root / "battery.json").read_bytes())
    full.table.head(16).to_csv(battery / "stimuli.csv", index=False)
    rec = root / "partial.h5"
    code, err = run_cli("record", *MINILM, "--probe", str(battery), "--out", str(rec))
    assert code == 0, err
    with h5py.File(rec, "r+") as f:  # as if stopped after its first batch
        f.attrs["complete"] = False
        f.attrs["n_done"] = 8
    return battery, rec


def killed_writer_copy(src: Path, dst: Path, **attrs: object) -> None:
    """``src`` copied to ``dst`` with ``attrs`` set and left open for SWMR writing, as a killed writer leaves it."""
    dst.write_bytes(src.read_bytes())
    code = (f"import h5py, os\nf = h5py.File({str(dst)!r}, 'r+', libver={LIBVER!r})\n"
            + "".join(f"f.attrs[{k!r}] = {v!r}\n" for k, v in attrs.items())
            + "f.swmr_mode = True\nf.flush()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- --resume of what is not the same recording


def test_resume_refuses_a_file_that_is_no_recording_and_leaves_it(kin16, tmp_path):
    battery, _ = kin16
    (tmp_path / "notes.txt").write_text("x\n")
    (tmp_path / "garbage.h5").write_bytes(b"not HDF5, and more than an HDF5 signature would be" * 3)
    with h5py.File(tmp_path / "theirs.h5", "w") as f:  # somebody's HDF5 file
        f["data"] = np.arange(10.0)
        f.attrs["owner"] = "someone else"
    before = snapshot(tmp_path)
    for name, word in (("notes.txt", "not an HDF5 file"), ("garbage.h5", "not an HDF5 file"),
                       ("theirs.h5", "without format=neuroprobe-recording")):
        code, err = run_cli("record", *MINILM, "--probe", str(battery), "--resume", "--out", str(tmp_path / name),
                            cwd=tmp_path)
        assert snapshot(tmp_path) == before, (name, code, err)
        line = one_sentence(code, err)
        assert "not a neuroprobe recording" in line and word in line and "left as it is" in line, line


def test_resume_refuses_a_recording_of_other_settings_naming_what_differs(kin16, tmp_path):
    """Killed-writer files (SWMR flags still set): refusing must not even clear those flags."""
    battery, partial = kin16
    other_subject = tmp_path / "other_subject.h5"
    killed_writer_copy(partial, other_subject, subject="bert", checkpoint="google-bert/bert-base-uncased")
    mine = tmp_path / "mine.h5"
    killed_writer_copy(partial, mine)
    other_battery = tmp_path / "kin12"
    other_battery.mkdir()
    (other_battery / "battery.json").write_bytes((battery / "battery.json").read_bytes())
    (other_battery / "stimuli.csv").write_text("".join((battery / "stimuli.csv").read_text().splitlines(True)[:13]))
    before = snapshot(tmp_path)
    cases = [
        (other_subject, ["--probe", str(battery)], ["subject='bert' (not 'minilm')", "checkpoint="]),
        (mine, ["--probe", str(other_battery)], ["battery_hash="]),
        (mine, ["--probe", str(battery), "--sites", "encoder.layer.1.mlp", "--pool", "max"],
         ["montage='encoder.layer.0.mlp' (not 'encoder.layer.1.mlp')", "pooling='mean' (not 'max')"]),
    ]
    for out, extra, words in cases:
        args = MINILM if "--sites" not in extra else [*MINILM[:2], *MINILM[4:]]  # MINILM without its --sites
        code, err = run_cli("record", *args, *extra, "--resume", "--out", str(out))
        assert snapshot(tmp_path) == before, (out.name, extra, err)
        line = one_sentence(code, err)
        assert "cannot resume" in line and "left as it is" in line and all(w in line for w in words), line


# ------------------------------------------------------------------------------------- a slow recording

SLOW_SCRIPT = """
import os, runpy, sys, time
import torch
torch.set_num_threads(1)
from neuroprobe.planted import make_planted
from neuroprobe.subjects import registry

planted = make_planted(os.environ["SCRATCH"], seed=3, n_concepts=3, per_form=2)  # the subject (same battery)
SLOW_AT = int(os.environ.get("SLOW_AT", "0"))

class SlowReLU(torch.nn.ReLU):
    calls = 0

    def forward(self, x):
        SlowReLU.calls += 1
        if SlowReLU.calls == SLOW_AT:
            print("slow pass", flush=True)
            if os.environ.get("SLOW_KIND") == "sleep":  # a writer that stays live (and idle) until it is killed
                time.sleep(600)
            # one operator Python cannot interrupt: 123 products of 4096 x 4096 matrices (minutes on one core)
            torch.linalg.matrix_power(torch.zeros(4096, 4096), (1 << 62) - 1)
        return super().forward(x)

planted.subject.model.act = SlowReLU()
registry.load_subject = lambda *args, **kwargs: planted.subject
runpy.run_module("neuroprobe", run_name="__main__", alter_sys=True)  # as python -m neuroprobe does
"""


@dataclass
class Slow:
    """The slow-pass script, its battery and the uninterrupted recording of it."""

    script: Path
    battery: Path
    scratch: Path  # where the script builds its planted subject
    reference: Path

    def command(self, out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), "record", "--model", "planted", "--probe", str(self.battery),
                "--sites", "all", "--batch-size", "4", "--quiet", "--out", str(out), *extra]

    def env(self, slow_at: int, kind: str = "compute") -> dict[str, str]:
        """``slow_at``: which forward pass is the long one (0: none); ``kind``: ``compute`` or ``sleep``."""
        return dict(os.environ, PYTHONPATH=str(ROOT), SLOW_AT=str(slow_at), SLOW_KIND=kind, SCRATCH=str(self.scratch))

    def start(self, out: Path, slow_at: int, kind: str = "compute") -> subprocess.Popen:
        """Start a recording whose pass ``slow_at`` is long; return once that pass has begun."""
        proc = subprocess.Popen(self.command(out), env=self.env(slow_at, kind), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        line = proc.stdout.readline().strip()
        if line != "slow pass":
            proc.kill()
            raise AssertionError(f"the recording did not reach its slow pass: {proc.communicate()}")
        return proc

    def run(self, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(out, *extra), env=self.env(0), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Slow:
    root = tmp_path_factory.mktemp("slow")
    (root / "slow_record.py").write_text(textwrap.dedent(SLOW_SCRIPT))
    battery = make_planted(root / "battery", seed=3, n_concepts=3, per_form=2).battery.root
    slow = Slow(root / "slow_record.py", battery, root / "subject", root / "reference.h5")
    res = slow.run(slow.reference)
    assert res.returncode == 0, res.stderr
    return slow


def interrupt_during_the_slow_pass(slow: Slow, out: Path, signals: int) -> tuple[int, str, float]:
    """Run the command, send ``signals`` SIGINTs (20 ms apart) once the long pass runs; (exit code, stderr, seconds)."""
    # the 4th pass is the long one: the unit count, two batches (committed), then the third batch
    proc = slow.start(out, 4)
    try:
        time.sleep(0.3)  # well inside the one operator
        t0 = time.monotonic()
        for i in range(signals):
            if i:
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("Ctrl-C did not end the command within 60 s") from None
        return proc.returncode, err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("signals", [1, 2], ids=["one Ctrl-C", "two Ctrl-C"])
def test_ctrl_c_during_one_long_forward_pass_ends_at_once_and_resume_completes(slow, tmp_path, signals):
    out = tmp_path / "r.h5"
    code, err, seconds = interrupt_during_the_slow_pass(slow, out, signals)
    assert code == 130, (code, err)
    assert err.strip().splitlines() == ["neuroprobe: interrupted"], err
    assert seconds < INTERRUPT_LIMIT_S, f"took {seconds:.1f} s to stop"
    with h5py.File(out, "r", swmr=True) as f:  # valid up to its committed, batch-aligned progress
        n_done = int(f.attrs["n_done"])
        assert not f.attrs["complete"] and n_done in (0, 4, 8), n_done
    res = slow.run(out, "--resume")
    assert res.returncode == 0, res.stderr
    assert_same_recording(slow.reference, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]  # no lock, partial or reserve file left


# --------------------------------------------------------------------------- a second writer through a link


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_link_to_a_live_recording_is_refused_naming_its_writer(slow, tmp_path, link):
    """A recording is being written (its writer waits inside a forward pass); the same job resumed through a
    link to it must not write into the live file."""
    live, other = tmp_path / "a.h5", tmp_path / "b.h5"
    writer = slow.start(live, 4, kind="sleep")
    try:
        time.sleep(0.5)  # the two batches before the slow pass are on disk
        if link == "symlink":
            other.symlink_to(live.name)
        else:
            os.link(live, other)
        before = sha(live)
        res = subprocess.run(slow.command(other, "--resume"), env=slow.env(0), capture_output=True, text=True,
                             timeout=300)
        assert sha(live) == before, res.stderr
        line = one_sentence(res.returncode, res.stderr)
        assert f"being written by process {writer.pid} on host {socket.gethostname()}" in line, line
        with h5py.File(live, "r", swmr=True) as f:
            assert not f.attrs["complete"]
    finally:
        writer.kill()
        writer.wait()
