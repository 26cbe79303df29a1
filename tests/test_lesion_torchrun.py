"""Lesion sweeps under torchrun (issue 23, item 3) and the recording package's import graph (item 5).

Real ``torchrun --nproc-per-node 2`` runs (gloo, CPU) of ``neuroprobe lesion`` on the organism
(committed weights) against one process: the tables are the same bytes; rank 1 writes nothing;
a rank that fails ends the job with one clear line and no tables.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from importgraph import find_cycle, package_imports

ROOT = Path(__file__).resolve().parents[1]

#: Run on every rank instead of ``-m neuroprobe``: ranks other than 0 may not write any file (every writer of
#: neuroprobe.output raises there), and NEUROPROBE_TEST_FAULT makes rank 1 fail inside its share of the
#: forgetting matrix's lesions (``raise``: an exception; ``kill``: SIGKILL), after rank 0 has made every table
#: of the dose-response.
RANKS = '''
import os, signal, sys
rank = int(os.environ["RANK"])
from neuroprobe import output
if rank != 0:
    def refuse(*args, **kwargs):
        raise AssertionError(f"rank {rank} wrote {args[:1]}")
    for name in ("make_folder", "atomic_path", "write_csv", "save_figure", "write_text"):
        setattr(output, name, refuse)
fault = os.environ.get("NEUROPROBE_TEST_FAULT")
if fault and rank == 1:
    from neuroprobe.lesions.forgetting import LesionStudy
    matrix, here, state = LesionStudy.forgetting_matrix, LesionStudy._scores_here, {"matrix": False}
    def forgetting_matrix(self, *args, **kwargs):
        state["matrix"] = True
        return matrix(self, *args, **kwargs)
    def scores_here(self, *args, **kwargs):
        if state["matrix"]:
            if fault == "raise":
                raise RuntimeError("injected fault")
            os.kill(os.getpid(), signal.SIGKILL)
        return here(self, *args, **kwargs)
    LesionStudy.forgetting_matrix, LesionStudy._scores_here = forgetting_matrix, scores_here
from neuroprobe.cli import entry
sys.argv[0] = "neuroprobe"
entry()
'''

#: A small sweep: two lesion modes (``zero`` is batched, ``resample`` one lesion at a time), 10 fixed random
#: draws and 1 keep-random draw at k = 4, and the 10 x 10 forgetting matrix of each mode.
SWEEP = ["lesion", "--model", "organism", "--probe", "digits", "--device", "cpu", "--concept", "seven", "--k", "4",
         "--mode", "zero,resample", "--random-draws", "10", "--keep-draws", "1", "--quiet"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def one_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "neuroprobe", *args]


def torchrun(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", _free_port(), str(script), *args]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=600, cwd=ROOT)


@pytest.fixture
def ranks(tmp_path: Path) -> Path:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    return script


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_torchrun_sweep_tables_equal_one_process_and_rank_1_writes_nothing(ranks, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = run(one_process(*SWEEP, "--out", str(one)))
    assert res.returncode == 0, res.stderr
    res = run(torchrun(ranks, *SWEEP, "--out", str(two)))
    assert res.returncode == 0, res.stderr
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b)  # the same files, nothing left over (no temporary files)
    tables = [n for n in a if n.endswith(".csv")]
    assert {"dose_response.csv", "forgetting.csv", "forgetting_matrix_zero.csv", "forgetting_matrix_resample.csv"} <= set(tables)
    for name in tables:
        assert a[name] == b[name], name  # bit for bit
    assert b"random" in a["dose_response.csv"] and b"resample" in a["dose_response.csv"]


@pytest.mark.slow
def test_torchrun_sequential_draws_equal_one_process(tmp_path):
    args = [*SWEEP[: SWEEP.index("--mode")], "--mode", "mean", "--max-draws", "30", "--keep-draws", "0", "--no-matrix",
            "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (res := run(one_process(*args, "--out", str(one)))).returncode == 0, res.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", _free_port(), "-m", "neuroprobe", *args, "--out", str(two)]
    assert (res := run(cmd)).returncode == 0, res.stderr
    for name in ("dose_response.csv", "forgetting.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_with_no_tables(ranks, tmp_path, fault):
    out = tmp_path / "out"
    res = run(torchrun(ranks, *SWEEP, "--out", str(out)), NEUROPROBE_TEST_FAULT=fault)
    assert res.returncode != 0
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"rank 0 left {left}"
    if fault == "raise":  # rank 0 says which rank failed and why, in one line
        lines = [l for l in res.stderr.splitlines() if l.startswith("neuroprobe: error: ")]
        assert "neuroprobe: error: rank 1 of 2 failed while evaluating its share of the lesions " \
               "(RuntimeError: injected fault)" in lines[0], res.stderr
        assert "RuntimeError: injected fault" in res.stderr  # rank 1's own traceback


# ------------------------------------------------------------------ item 5: the recording package's imports


def test_recording_import_graph_has_no_cycle():
    graph = package_imports("neuroprobe.recording")
    assert {"recorder", "distributed", "shards", "reader", "entry"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_recorder_knows_nothing_of_torchrun():
    graph = package_imports("neuroprobe.recording")
    assert not graph["recorder"] & {"distributed", "entry", "shards"}
    assert graph["entry"] >= {"recorder", "distributed"}
    source = (ROOT / "neuroprobe" / "recording" / "recorder.py").read_text()
    assert "neuroprobe.distributed" not in source and "WORLD_SIZE" not in source
    # one module knows ranks and devices; recording and lesion sweeps both use it
    for module in ("recording/distributed.py", "recording/commands.py", "lesions/sweep.py", "lesions/commands.py"):
        text = (ROOT / "neuroprobe" / module).read_text()
        assert "from neuroprobe.distributed import" in text, module
        assert "def world(" not in text and "init_process_group" not in text, module
