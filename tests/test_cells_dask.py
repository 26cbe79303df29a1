"""Concept cells on Dask (issue 23, item 2): a local cluster and a separately started scheduler give the
table of one process, exactly; the mistakes a user can make end in one sentence.

Ground truth is ``--jobs 1`` (this process, no Dask) on the same recording: a synthetic recording written
through the real writer (three sites, one of them image-only: NaN rows for the text stimuli; a small
read buffer so that a site spans several super-blocks and pieces), and a virtual recording over two
shards recorded from a tiny BERT.  The scheduler and its two workers are real ``dask scheduler`` /
``dask worker`` processes started (and killed, by pid) by the fixture.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
#: 120 stimuli x 4 bytes x 64 units: super-blocks of 64 units, so every site is cut into several pieces
READ_BYTES = 120 * 4 * 64
OPTS = dict(n_perm=100, read_bytes=READ_BYTES, block_units=16)


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True,
                          env=env(**extra), timeout=300)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """Three sites (300, 200 and 100 units), 120 stimuli; tuned, rectified (ties) and image-only units."""
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    st = make_stimuli(6, 20, forms=(("photo", "image"), ("drawing", "image"), ("text-name", "text")))
    n = len(st)
    rng = np.random.default_rng(0)
    on = st["concept"].str[1:].astype(int).to_numpy()[:, None] == np.arange(6)[None, :]
    a = rng.standard_normal((n, 300)).astype(np.float32)
    a[:, :30] += 6.0 * on[:, np.arange(30) % 6]
    a[:, 150:] = np.maximum(a[:, 150:] - 0.5, 0.0)
    b = rng.standard_normal((n, 200)).astype(np.float32)
    b[:, ::10] += 5.0 * on[:, [2]]
    b[(st["modality"] == "text").to_numpy()] = np.nan  # an image-only site
    c = rng.standard_normal((n, 100)).astype(np.float32)
    c[:, 7] = 1.5  # a constant (dead) unit
    path = tmp_path_factory.mktemp("dask") / "synthetic.h5"
    return write_recording(path, st, {"a": a, "images": b, "c": c}, batch_size=16)


@contextlib.contextmanager
def dask_cluster(folder: Path, workers: int = 2):
    """A ``dask scheduler`` and ``workers`` single-threaded ``dask worker`` processes on this machine:
    ``(address, worker processes)``; all stopped after."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    sibling = Path(sys.executable).with_name("dask")  # this interpreter's own dask (a venv that is not activated)
    dask = str(sibling) if sibling.is_file() else (shutil.which("dask") or "dask")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env(), cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i in range(workers):
            procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                           "--name", f"w{i}", "--local-directory", str(folder / f"w{i}")],
                                          env=env(), cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while True:
            try:
                with distributed.Client(address, timeout=5, set_as_default=False) as client:
                    client.wait_for_workers(workers, timeout=max(1, deadline - time.time()))
                    break
            except (OSError, TimeoutError):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("the Dask scheduler and workers did not start") from None
                time.sleep(0.5)
        yield address, procs[1:]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """The address of a ``dask scheduler`` with two single-threaded ``dask worker`` processes (this machine)."""
    with dask_cluster(tmp_path_factory.mktemp("dask-cluster")) as (address, _):
        yield address


def assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every column equal, exactly (NaN where NaN), in the same row order; the same attributes."""
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.attrs == b.attrs


def test_local_cluster_and_scheduler_equal_one_process_through_the_api(recording, scheduler):
    from neuroprobe.analysis import concept_cells, unit_indices
    from neuroprobe.analysis.parallel import plan

    one = concept_cells(recording, **OPTS)
    assert one["is_cell"].sum() >= 20 and one["dead"].any()
    assert one.loc[one["site"] == "images", "n_stimuli"].lt(120).all()  # the text rows were left out there
    # the pieces really are many, of whole blocks, inside super-blocks
    pieces = plan(300, 64, 16, 40)
    assert len(pieces) > 5 and all((lo % 64) % 16 == 0 and lo // 64 == (hi - 1) // 64 for lo, hi, _ in pieces)
    assert_same(one, concept_cells(recording, jobs=2, **OPTS))
    with distributed.Client(scheduler, set_as_default=False) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert_same(one, concept_cells(recording, client=client, **OPTS))
        assert_same(concept_cells(recording, family="pairs", exact=False, n_perm=0),
                    concept_cells(recording, family="pairs", exact=False, n_perm=0, client=client))
        pd.testing.assert_frame_equal(unit_indices(recording, block_units=16), unit_indices(recording, block_units=16,
                                                                                             client=client))
    assert_same(one, concept_cells(recording, client=scheduler, **OPTS))  # an address works too


def test_local_cluster_and_scheduler_equal_one_process_through_the_cli(recording, scheduler, tmp_path):
    common = ["cells", str(recording), "--n-perm", "100", "--controls", "rotation", "-q"]
    runs = {}
    for name, extra in (("one", []), ("jobs", ["--jobs", "2"]), ("scheduler", ["--scheduler", scheduler])):
        out = tmp_path / f"{name}.csv"
        res = cli(*common, *extra, "--out", str(out))
        assert res.returncode == 0, res.stderr
        runs[name] = (res.stdout, out.read_bytes(), (tmp_path / f"{name}.rotation.csv").read_bytes())
    assert "cells|rotated" in runs["one"][0]
    assert runs["jobs"] == runs["one"] and runs["scheduler"] == runs["one"]


def test_virtual_recording_over_shards_on_the_scheduler(tiny_dir, scheduler, tmp_path):
    from neuroprobe import Battery, Recorder, load_subject
    from neuroprobe.analysis import concept_cells
    from neuroprobe.recording import distributed as D
    from neuroprobe.recording import shards as S

    subject = load_subject("bert", weights=tiny_dir("bert"), device="cpu", quiet=True)
    full = Battery.load("kinship")
    battery = Battery.from_table(full.table.groupby(["concept", "form"]).head(2).reset_index(drop=True),
                                 concepts=full.concepts, name="kinship-small", root=full.root)
    out = tmp_path / "sharded.h5"
    for rank in range(2):
        span = S.spans(len(battery), 4, 2)[rank]
        path = S.shard_path(out, rank, 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        D._record_shard(Recorder(subject, battery, quiet=True, montage="mlp", batch_size=4), path, span,
                        D.World(rank, 2, rank))
    S.write_virtual(out, S.check_shards([S.shard_path(out, r, 2) for r in range(2)]))
    opts = dict(n_perm=50, read_bytes=len(battery) * 4 * 16)
    assert_same(concept_cells(out, **opts), concept_cells(out, client=scheduler, **opts))


def test_a_path_the_workers_cannot_see_is_named(recording, scheduler, tmp_path):
    from neuroprobe.analysis import concept_cells
    from neuroprobe.errors import NeuroprobeError
    from neuroprobe.recording.reader import open_recording

    copy = tmp_path / "only-here.h5"
    shutil.copy(recording, copy)
    with open_recording(copy) as rec:
        copy.unlink()  # this process still reads its open file; a worker opening the path finds nothing
        with pytest.raises(NeuroprobeError, match="must be visible on every worker") as err:
            concept_cells(rec, client=scheduler, n_perm=0)
    assert str(copy) in str(err.value) and "\n" not in str(err.value)
    # another file at the same path on the workers (here: replaced after this process opened it)
    other = tmp_path / "other.h5"
    shutil.copy(recording, copy)
    with open_recording(copy) as rec:
        with open(other, "wb") as fh:
            fh.write(copy.read_bytes() + b"\0" * 4096)
        os.replace(other, copy)
        with pytest.raises(NeuroprobeError, match="must lead to the same file on every worker"):
            concept_cells(rec, client=scheduler, n_perm=0)


def test_unreachable_scheduler_and_mistakes_are_one_line(recording):
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    t = time.time()
    res = cli("cells", str(recording), "-q", "--scheduler", address, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    assert res.returncode == 2 and time.time() - t < 60
    assert res.stderr.startswith(f"neuroprobe: error: cannot reach the Dask scheduler at {address} within 2 s")
    assert res.stderr.count("\n") == 1, res.stderr
    res = cli("cells", str(recording), "-q", "--scheduler", address, "--jobs", "2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--jobs" in res.stderr, res.stderr


def test_without_dask_more_jobs_say_how_to_install_it(recording):
    # the CLI in a process where ``import distributed`` fails
    code = ("import sys; sys.modules['distributed'] = None; sys.argv = ['neuroprobe'] + sys.argv[1:]; "
            "from neuroprobe.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code, "cells", str(recording), "-q", "--jobs", "2"],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "needs Dask: pip install 'dask[distributed]'" in res.stderr
    # one job needs no Dask at all
    res = subprocess.run([sys.executable, "-c", code, "cells", str(recording), "-q", "--n-perm", "0",
                          "--controls", "none"], capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr


def test_a_worker_killed_mid_scan_loses_nothing(tmp_path):
    """SIGKILL one of two workers while the scan runs: Dask gives its pieces to the other, and the table is
    still the one-process table, exactly."""
    import threading

    from neuroprobe.analysis import concept_cells
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    st = make_stimuli(8, 24, forms=(("photo", "image"), ("drawing", "image"), ("text-name", "text")))
    rng = np.random.default_rng(1)
    on = st["concept"].str[1:].astype(int).to_numpy()[:, None] == np.arange(8)[None, :]
    sites = {}
    for k in range(4):
        x = rng.standard_normal((len(st), 3000)).astype(np.float32)
        x[:, :40] += 6.0 * on[:, np.arange(40) % 8]
        sites[f"s{k}"] = x
    path = write_recording(tmp_path / "big.h5", st, sites, batch_size=32)
    opts = dict(n_perm=1000, read_bytes=len(st) * 4 * 64, block_units=16)
    one = concept_cells(path, **opts)
    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster") as (address, workers):
        out: dict = {}
        run = threading.Thread(target=lambda: out.setdefault("table", concept_cells(path, client=address, **opts)))
        with distributed.Client(address, timeout=10, set_as_default=False) as watch:
            w0 = next(a for a, w in watch.scheduler_info()["workers"].items() if w.get("name") == "w0")
            run.start()
            busy: list = []
            deadline = time.time() + 120
            while run.is_alive() and time.time() < deadline:  # kill w0 while it holds pieces of the scan
                busy = [k for k in watch.processing().get(w0, ()) if "piece" in str(k)]
                if busy:
                    workers[0].kill()
                    break
                time.sleep(0.02)
            assert busy, "w0 never held a piece of the scan while it ran: make the recording larger"
            run.join(timeout=240)
        assert not run.is_alive() and workers[0].poll() is not None
    assert_same(out["table"], one)
