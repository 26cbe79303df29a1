"""Nothing read wrong (issue 24, items 1-2): truncated and corrupted recordings, and live ones.

Every reader (``inspect``, ``cells``, ``figures``, ``atlas``, ``export`` and
``open_recording``) must refuse a recording that is shorter than HDF5 says, or whose
metadata is damaged, within seconds and in one line (``neuroprobe: error: <file>: ...``,
exit 2) — before, a truncated file read as zeros with exit 0, and damaged metadata
made every reader hang (HDF5's SWMR read retries a failed checksum 100 times,
doubling a sleep each time).  A recording that is still being written must stay
readable.  The commands run as real processes with a timeout: a hang fails the test.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from neuroprobe import open_recording, record
from neuroprobe.errors import RecordingError

ROOT = Path(__file__).resolve().parents[1]

#: Seconds a command may take: a refusal costs one interpreter start-up (2-8 s on a loaded
#: 2-core machine); the old readers never ended.
TIMEOUT = 90

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))


def run_cli(*args: str, cwd: Path) -> tuple[int, str, str, float]:
    """Run ``neuroprobe ARGS`` in a real process; (exit code, stdout, stderr, seconds). A hang fails here."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=ENV,
                         cwd=cwd, timeout=TIMEOUT)
    return res.returncode, res.stdout, res.stderr, time.perf_counter() - t0


def run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str, float]]:
    """Run several ``neuroprobe`` commands side by side (real processes); name -> (code, stdout, stderr, seconds)."""
    t0 = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)
             for name, args in commands.items()}
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=max(1.0, TIMEOUT - (time.perf_counter() - t0)))  # a hang fails here
            results[name] = (proc.returncode, out, err, time.perf_counter() - t0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def one_line(code: int, err: str, path: Path) -> str:
    """Assert exit 2 and exactly one ``neuroprobe: error:`` line naming ``path``; return it."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("neuroprobe: error: "), err[-2000:]
    assert path.name in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def reader_commands(rec: Path, folder: Path) -> dict[str, list[str]]:
    """Every CLI command that reads a recording, with outputs under ``folder`` (none may appear)."""
    cells = folder / "cells.csv"
    if not cells.exists():
        cells.write_text("site,unit,concept,is_cell,z,si\nimage.fc,0,zero,True,9,0.5\n")
    return {
        "inspect": ["inspect", str(rec)],
        "cells": ["cells", str(rec), "--controls", "none", "--n-perm", "0", "-q", "--out", str(folder / "out.csv")],
        "figures": ["figures", str(rec), "--cells", str(cells), "--out", str(folder / "figures"), "-q"],
        "atlas": ["atlas", str(rec), "--out", str(folder / "atlas"), "-q"],
        "export": ["export", str(rec), "--out", str(folder / "out.nwb"), "--no-inspect"],
    }


# ------------------------------------------------------------------ faults (bytes -> bytes)


def half(data: bytes) -> bytes:
    """The issue's cut: half the file — its data chunks are gone, its metadata (at the start) is whole."""
    return data[: len(data) // 2]


def flip_20_84(data: bytes) -> bytes:
    b = bytearray(data)
    for i in range(20, 85):
        b[i] ^= 0xFF
    return bytes(b)


def first_kb(data: bytes) -> bytes:
    return data[:1024]


def random_bits(data: bytes, n: int = 2000, seed: int = 24) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    bits = np.random.default_rng(seed).choice(arr.size * 8, size=n, replace=False)
    np.bitwise_xor.at(arr, bits // 8, (1 << (bits % 8)).astype(np.uint8))
    return arr.tobytes()


FAULTS = {"truncated to half": half, "bytes 20-84 flipped": flip_20_84, "truncated to 1 KB": first_kb,
          "2000 random bits flipped": random_bits}


# ------------------------------------------------------------------ recordings


@pytest.fixture(scope="module")
def organism_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real recording: the organism shown the digits battery (as ``neuroprobe record --model organism``)."""
    from neuroprobe import load_subject

    path = tmp_path_factory.mktemp("organism") / "digits_organism.h5"
    record(load_subject("organism", device="cpu", quiet=True), "digits", path, quiet=True).close()
    return path


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from neuroprobe.analysis.synthetic import make_stimuli, write_recording

def rows(offset, n):
    if offset == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-way: the file keeps its SWMR-write flags and n_done = {kill_at}
    return {{"s0": np.full((n, 64), offset + 1, "f4"), "s1": np.full((n, 48), -offset - 1, "f4")}}

write_recording(sys.argv[1], make_stimuli(10, 60), {{"s0": 64, "s1": 48}}, rows=rows, batch_size=20)
"""


@pytest.fixture(scope="module")
def killed_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recording whose writer was SIGKILLed after 300 of 600 stimuli (it opens only for SWMR reading)."""
    path = tmp_path_factory.mktemp("killed") / "killed.h5"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(kill_at=300), str(path)], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r").close()
    return path


def damaged_copy(src: Path, folder: Path, fault) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bad = folder / f"bad-{src.name}"
    bad.write_bytes(fault(src.read_bytes()))
    return bad


# ------------------------------------------------------------------ tests


def test_the_issue_cut_keeps_metadata_readable_and_reads_zeros_without_the_check(organism_rec, tmp_path):
    """The kind of file item 1 is about: HDF5's SWMR read opens it and reads zeros where data were."""
    bad = damaged_copy(organism_rec, tmp_path, half)
    with h5py.File(bad, "r", swmr=True) as f, h5py.File(organism_rec, "r") as good:
        cut = good["sites/image.fc/responses"][()]
        read = f["sites/image.fc/responses"][()]  # no error: the metadata is intact
        assert np.any(read != cut) and np.all(read[read != cut] == 0)
    with pytest.raises(RecordingError, match="truncated") as info:
        open_recording(bad)
    assert "\n" not in str(info.value) and bad.name in str(info.value)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_recording_fails_fast_in_every_reader(fault, organism_rec, tmp_path):
    bad = damaged_copy(organism_rec, tmp_path / "work", FAULTS[fault])
    commands = reader_commands(bad, tmp_path / "work")
    before = snapshot(tmp_path)
    for name, (code, _, err, seconds) in run_all(commands, cwd=tmp_path).items():
        line = one_line(code, err, bad)
        if fault.startswith("truncated"):
            assert "truncated" in line, (name, line)
    assert snapshot(tmp_path) == before  # no output of any command, nothing changed
    with pytest.raises(RecordingError) as info:  # the library refuses it the same way
        open_recording(bad)
    assert "\n" not in str(info.value) and bad.name in str(info.value)


@pytest.mark.parametrize("fraction", [0.999, 0.75, 0.25, 0.02])
def test_truncated_recording_at_several_lengths(fraction, organism_rec, tmp_path):
    data = organism_rec.read_bytes()
    bad = tmp_path / "cut.h5"
    bad.write_bytes(data[: int(len(data) * fraction)])
    code, out, err, _ = run_cli("inspect", str(bad), cwd=tmp_path)
    assert "truncated" in one_line(code, err, bad) and not out


@pytest.mark.parametrize("fault", ["cut in its data", "cut off its tail", "bytes 20-84 flipped", "truncated to 1 KB"])
def test_killed_writers_file_damaged_afterwards_fails_fast(fault, killed_rec, tmp_path):
    """A file left by a killed writer opens only for SWMR reading (no HDF5 length check, retried reads)."""
    data = killed_rec.read_bytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes({"cut in its data": lambda d: d[: len(d) * 3 // 4], "cut off its tail": lambda d: d[:-100],
                     "bytes 20-84 flipped": flip_20_84, "truncated to 1 KB": first_kb}[fault](data))
    code, out, err, _ = run_cli("inspect", str(bad), cwd=tmp_path)
    line = one_line(code, err, bad)
    if fault.startswith(("cut", "truncated")):
        assert "truncated" in line, line


def test_killed_writers_file_still_reads(killed_rec):
    with open_recording(killed_rec) as rec:
        assert (rec.n_done, rec.complete) == (300, False)
        assert np.array_equal(rec.responses("s0")[:300], np.repeat(np.arange(1, 300, 20), 20)[:, None] * np.ones((1, 64)))


# ------------------------------------------------------------------ live recordings stay readable

SLOW_WRITER = """
import sys, time
import numpy as np
from neuroprobe.analysis.synthetic import make_stimuli, write_recording

def rows(offset, n):
    time.sleep(0.25)
    return {"s0": np.full((n, 300), offset + 1, "f4")}

write_recording(sys.argv[1], make_stimuli(6, 40), {"s0": 300}, rows=rows, batch_size=6)  # 40 batches, ~10 s
"""


def test_live_recording_is_read_by_inspect_and_open_recording(tmp_path):
    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not path.exists():
            time.sleep(0.05)
        code, out, err, _ = run_cli("inspect", str(path), cwd=tmp_path)
        assert code == 0, err
        assert "incomplete" in out.splitlines()[0]
        seen = []
        while proc.poll() is None:
            with open_recording(path) as rec:
                n = rec.n_done
                rows = rec.responses("s0")[:n]
                assert np.array_equal(rows[:, 0], np.repeat(np.arange(1, n + 1, 6), 6)[:n]), n
                seen.append(n)
            time.sleep(0.02)
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
    assert proc.returncode == 0
    assert any(0 < n < 240 for n in seen) and seen == sorted(seen)
    assert open_recording(path).complete


def test_real_recorder_with_tokens_is_read_while_it_writes(tmp_path):
    """``neuroprobe record --tokens`` in another process: every poll reads the committed rows the final file holds."""
    battery = tmp_path / "digit-names"  # the digits battery's 300 text stimuli (a shorter run)
    battery.mkdir()
    shutil.copy(ROOT / "probes" / "digits" / "battery.json", battery)
    lines = (ROOT / "probes" / "digits" / "stimuli.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (battery / "stimuli.csv").write_text(lines[0] + "".join(l for l in lines[1:] if l.split(",")[2] == "text"))
    path = tmp_path / "org.h5"
    proc = subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", "record", "--model", "organism", "--probe", str(battery),
                             "--tokens", "--sites", "text.layers.0.mlp.act", "--batch-size", "8", "--quiet", "--out", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    snaps = []
    try:
        while proc.poll() is None:
            if path.exists():
                with open_recording(path) as rec:  # must never fail on a live file
                    n = rec.n_done
                    snaps.append((n, rec.token_table("text"), {s: rec.responses(s)[:n] for s in rec.site_names}))
            time.sleep(0.05)
    finally:
        proc.kill() if proc.poll() is None else None
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    live = [s for s in snaps if 0 < s[0] < 300]
    assert live, "no poll saw the recording mid-way"
    with open_recording(path) as rec:
        assert rec.complete
        final_tokens = rec.token_table("text")
        for n, tokens, data in live:
            assert tokens.equals(final_tokens.iloc[: len(tokens)]), n
            for site, rows in data.items():
                assert np.array_equal(rows, rec.responses(site)[:n], equal_nan=True), (site, n)
