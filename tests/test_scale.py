"""Scaling out: shards, the virtual recording, merge, and data-parallel recording under torchrun (gloo, CPU).

Ground truth is a one-process recording of the same subject and battery: a sharded
recording must equal it dataset by dataset, bit for bit, read through the virtual
file and after ``merge``.  (Both sides run with the same number of threads per
process: a GEMM's reduction order, hence its last bit, depends on it.)
"""
from __future__ import annotations

import json
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

from neuroprobe import Battery, Recorder, load_subject, open_recording
from neuroprobe.errors import RecordingError
from neuroprobe.recording import distributed as D
from neuroprobe.recording import shards as S

ROOT = Path(__file__).resolve().parents[1]


def all_datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same(a_path: Path, b_path: Path) -> None:
    a, b = all_datasets(a_path), all_datasets(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def virtual_names(path: Path) -> list[str]:
    out = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) and o.is_virtual else None)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tiny_dir):
    return load_subject("bert", weights=tiny_dir("bert"), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def battery() -> Battery:
    full = Battery.load("kinship")
    rows = full.table.groupby(["concept", "form"]).head(2).reset_index(drop=True)
    return Battery.from_table(rows, concepts=full.concepts, name="kinship-small", root=full.root)


def record_shards(subject, battery, out: Path, world: int, **opts) -> list[Path]:
    """Record every rank's shard in this process (what each torchrun rank does)."""
    for rank in range(world):
        span = S.spans(len(battery), opts["batch_size"], world)[rank]
        rec = Recorder(subject, battery, quiet=True, **opts)
        path = S.shard_path(out, rank, world)
        path.parent.mkdir(parents=True, exist_ok=True)
        D._record_shard(rec, path, span, D.World(rank, world, rank))
    return [S.shard_path(out, r, world) for r in range(world)]


OPTS = dict(montage="mlp", tokens=True, batch_size=4)


# ------------------------------------------------------------------ layout


def test_spans_are_contiguous_batch_aligned_and_balanced():
    for n, bs, w in [(299, 8, 2), (10, 4, 5), (7, 7, 3), (100, 1, 7), (0, 4, 2)]:
        sp = S.spans(n, bs, w)
        assert len(sp) == w and sp[0][0] == 0 and sp[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(sp, sp[1:]))
        assert all(start % bs == 0 for start, _ in sp)
        batches = [-(-(b - a) // bs) for a, b in sp]
        assert max(batches) - min(batches) <= 1


def test_world_from_env():
    assert not D.world({}).distributed
    w = D.world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert (w.rank, w.size, w.local_rank) == (1, 2, 1)
    with pytest.raises(Exception, match="MASTER_ADDR"):
        D.world({"RANK": "0", "WORLD_SIZE": "2"})


# ------------------------------------------------ shards and the virtual file


def test_shards_through_virtual_file_and_merge_equal_one_process(tiny_bert, battery, tmp_path):
    single = Recorder(tiny_bert, battery, quiet=True, **OPTS).run(tmp_path / "single.h5")
    out = tmp_path / "sharded.h5"
    paths = record_shards(tiny_bert, battery, out, 3, **OPTS)
    # a shard is an ordinary recording file that holds only its span
    with h5py.File(paths[1], "r") as f:
        a, b = int(f.attrs["shard_start"]), int(f.attrs["shard_stop"])
        assert 0 < a < b < len(battery) and f.attrs["complete"]
        assert np.isnan(f["sites/encoder.layer.0.mlp/responses"][:a]).all()
        assert f["tokens/text/stimulus"][0] == a  # token rows name global stimuli
    S.write_virtual(out, S.check_shards(paths))
    assert "sites/encoder.layer.0.mlp/responses" in virtual_names(out)
    assert "tokens/text/offsets" not in virtual_names(out)  # global offsets are real data
    assert_same(single, out)
    rec = open_recording(out)
    assert rec.complete and rec.attrs["world_size"] == 3 and len(rec.attrs["shards"]) == 3
    offsets, table = rec.token_offsets("text"), rec.token_table("text")
    assert np.array_equal(np.repeat(np.arange(len(battery)), np.diff(offsets)), table["stimulus"].to_numpy())
    rec.close()
    # the analyses read it as one recording (the rotation control copies it into a real file)
    import pandas as pd

    from neuroprobe.analysis import concept_cells
    from neuroprobe.analysis.controls import rotation_control

    pd.testing.assert_frame_equal(concept_cells(single, n_perm=20).drop(columns="recording", errors="ignore"),
                                  concept_cells(out, n_perm=20).drop(columns="recording", errors="ignore"))
    assert len(rotation_control(out, n_perm=20)) == len(open_recording(out).units)
    merged = S.merge(out, tmp_path / "merged.h5")
    assert virtual_names(merged) == [] and not h5py.File(merged, "r").attrs["virtual"]
    shutil.rmtree(S.shard_dir(out))
    assert_same(single, merged)
    assert open_recording(merged).complete
    with pytest.raises(RecordingError, match="virtual recording and its shard .* is missing"):
        open_recording(out)  # HDF5 alone would read fill values


def test_merge_in_place_and_from_shards_alone(tiny_bert, battery, tmp_path):
    single = Recorder(tiny_bert, battery, quiet=True, **OPTS).run(tmp_path / "single.h5")
    out = tmp_path / "x.h5"
    paths = record_shards(tiny_bert, battery, out, 2, **OPTS)
    # rank 0 died before writing the virtual file: merge builds it from the shards
    assert S.merge(out) == out and virtual_names(out) == []
    assert_same(single, out)
    out.unlink()
    S.write_virtual(out, S.check_shards(paths))
    S.merge(out)  # in place
    assert virtual_names(out) == []
    assert_same(single, out)
    with pytest.raises(RecordingError, match="already one self-contained recording"):
        S.merge(out)


def test_bad_shard_sets_are_refused(tiny_bert, battery, tmp_path):
    out = tmp_path / "x.h5"
    paths = record_shards(tiny_bert, battery, out, 3, **OPTS)
    S.write_virtual(out, S.check_shards(paths))
    # a shard of another battery (same world size, same rank)
    other = Battery.from_table(battery.table.iloc[::-1].reset_index(drop=True), concepts=battery.concepts,
                               name="kinship-small", root=battery.root)
    alien = tmp_path / "alien.h5"
    record_shards(tiny_bert, other, alien, 3, **OPTS)
    keep = tmp_path / "keep.h5"
    shutil.copy(paths[1], keep)
    shutil.copy(S.shard_path(alien, 1, 3), paths[1])
    with pytest.raises(RecordingError, match=r"rank-1-of-3.h5 belongs to another recording: its battery_hash"):
        S.merge(out, tmp_path / "m.h5")
    shutil.copy(keep, paths[1])
    # overlapping and gapped spans
    with h5py.File(paths[2], "r+") as f:
        f.attrs["shard_start"] = int(f.attrs["shard_start"]) - 4
    with pytest.raises(RecordingError, match="shards overlap: rank-2-of-3.h5 starts at stimulus"):
        S.merge(out, tmp_path / "m.h5")
    with h5py.File(paths[2], "r+") as f:
        f.attrs["shard_start"] = int(f.attrs["shard_start"]) + 8
    with pytest.raises(RecordingError, match="shards leave a gap"):
        S.merge(out, tmp_path / "m.h5")
    with h5py.File(paths[2], "r+") as f:
        f.attrs["shard_start"] = int(f.attrs["shard_start"]) - 4
        f.attrs["complete"] = False
    with pytest.raises(RecordingError, match="rank-2-of-3.h5 is incomplete .* --resume"):
        S.merge(out, tmp_path / "m.h5")
    # a missing shard
    paths[2].unlink()
    with pytest.raises(RecordingError, match="rank-2-of-3.h5 is missing"):
        S.merge(out, tmp_path / "m.h5")
    with pytest.raises(RecordingError, match="rank-2-of-3.h5 is missing"):
        open_recording(out)
    # shards of two world sizes
    shutil.copy(paths[0], S.shard_path(out, 0, 2))
    with pytest.raises(RecordingError, match="mix recordings made by 2 and 3 processes"):
        S.check_shards(sorted(S.shard_dir(out).iterdir()))
    assert not (tmp_path / "m.h5").exists()


def test_resume_with_another_world_size_is_refused(tiny_bert, battery, tmp_path):
    out = tmp_path / "x.h5"
    paths = record_shards(tiny_bert, battery, out, 3, **OPTS)
    with h5py.File(paths[1], "r+") as f:
        f.attrs["complete"] = False
    msg = D._precheck(out, D.World(0, 2, 0), resume=True, overwrite=False)
    assert msg and "recorded by 3 processes" in msg and "--nproc-per-node 3" in msg
    assert D._precheck(out, D.World(0, 3, 0), resume=True, overwrite=False) is None
    assert "already exists" in D._precheck(out, D.World(0, 3, 0), resume=False, overwrite=False)
    with pytest.raises(RecordingError, match="with one process: it was recorded by 3 processes"):
        D.check_single_process(out, resume=True, overwrite=False)
    # a shard resumed with another batch size would cut other batches
    with pytest.raises(RecordingError, match="covers stimuli"):
        D._record_shard(Recorder(tiny_bert, battery, quiet=True, **{**OPTS, "batch_size": 5}), paths[1],
                        S.spans(len(battery), 5, 3)[1], D.World(1, 3, 1))


# ------------------------------------------------------------ under torchrun


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", _free_port(), "-m", "neuroprobe", *args]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "neuroprobe", *args]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.startswith("neuroprobe: error: ")]
    assert lines, res.stderr
    return lines[-1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_through_virtual_file_and_merge(tiny_dir, tmp_path):
    common = ["record", "--model", "bert", "--weights", str(tiny_dir("bert")), "--probe", "kinship", "--sites", "mlp",
              "--tokens", "--batch-size", "8", "--device", "cpu", "--quiet"]
    single, out = tmp_path / "single.h5", tmp_path / "dist.h5"
    res = run(cli(*common, "--out", str(single)))
    assert res.returncode == 0, res.stderr
    res = run(torchrun(2, *common, "--out", str(out)))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in S.shard_dir(out).iterdir()) == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    assert virtual_names(out)
    assert_same(single, out)
    res = run(cli("inspect", str(out)))
    assert res.returncode == 0 and "world_size: 2" in res.stdout, res.stderr
    # one process cannot resume (or silently shadow) a two-process recording
    assert "recorded by 2 processes" in error_line(run(cli(*common, "--out", str(out), "--resume")))
    assert "already exists" in error_line(run(torchrun(2, *common, "--out", str(out))))
    res = run(cli("merge", str(out), "--out", str(tmp_path / "merged.h5")))
    assert res.returncode == 0, res.stderr
    # cells through the virtual file in two processes = cells of the merged file in one
    a = run(cli("cells", str(out), "--jobs", "2", "--n-perm", "50", "-q"))
    b = run(cli("cells", str(tmp_path / "merged.h5"), "--n-perm", "50", "-q"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.splitlines()[1:] == b.stdout.splitlines()[1:]
    shutil.rmtree(S.shard_dir(out))
    assert_same(single, tmp_path / "merged.h5")
    assert "is missing" in error_line(run(cli("merge", str(out))))


def _big_battery(folder: Path, copies: int) -> Path:
    """kinship repeated ``copies`` times (unique ids): long enough to kill a rank mid-way."""
    import pandas as pd

    src = ROOT / "probes" / "kinship"
    folder.mkdir(parents=True)
    meta = json.loads((src / "battery.json").read_text())
    meta["name"] = "kinship-long"
    (folder / "battery.json").write_text(json.dumps(meta))
    table = pd.read_csv(src / "stimuli.csv", dtype=str, keep_default_na=False)
    parts = [table.assign(id=table["id"] + f"-{i}") for i in range(copies)]
    pd.concat(parts).to_csv(folder / "stimuli.csv", index=False)
    return folder


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of ``rank`` among torchrun's workers (read from their environment)."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
def test_torchrun_rank_sigkilled_then_resume_equals_one_process(tiny_dir, tmp_path):
    probe = _big_battery(tmp_path / "long", copies=6)
    common = ["record", "--model", "bert", "--weights", str(tiny_dir("bert")), "--probe", str(probe), "--sites", "mlp",
              "--tokens", "--batch-size", "2", "--device", "cpu", "--quiet"]
    single, out = tmp_path / "single.h5", tmp_path / "dist.h5"
    launcher = subprocess.Popen(torchrun(2, *common, "--out", str(out)), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    shard = S.shard_path(out, 1, 2)
    deadline, done, start, stop = time.time() + 300, 0, None, None
    while time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
        if not shard.exists():
            continue
        try:
            with h5py.File(shard, "r", swmr=True) as f:  # a live shard is readable (SWMR)
                start, stop = int(f.attrs["shard_start"]), int(f.attrs["shard_stop"])
                done = int(f.attrs.get("n_done", 0))
        except Exception:
            continue
        if done >= start + 40:
            pid = _worker_pid(launcher.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                break
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    assert start is not None and start < done < stop, f"the kill came too late or too early ({start}, {done}, {stop})"
    assert not out.exists() and not S.read_shard(shard).complete
    res = run(torchrun(2, *common, "--out", str(out), "--resume"))
    assert res.returncode == 0, res.stderr
    res = run(cli(*common, "--out", str(single)))
    assert res.returncode == 0, res.stderr
    assert_same(single, out)
    S.merge(out)
    assert_same(single, out)


# ------------------------------------------------------------ analysis over many cores


def test_cells_and_indices_with_jobs_equal_one_process(tmp_path):
    import pandas as pd

    from neuroprobe import record
    from neuroprobe.analysis import concept_cells, unit_indices
    from neuroprobe.planted import make_planted

    p = make_planted(tmp_path / "battery", seed=1)
    rec = record(p.subject, p.battery, tmp_path / "p.h5", montage="all", quiet=True)
    assert len(rec.site_names) >= 2
    one = concept_cells(rec, n_perm=200)
    two = concept_cells(rec, n_perm=200, jobs=2)
    pd.testing.assert_frame_equal(one, two)
    assert one["is_cell"].any()  # the planted cells are there, in both
    pd.testing.assert_frame_equal(unit_indices(rec), unit_indices(rec, jobs=2))


# ------------------------------------------------------- subjects larger than one device


def test_device_map_with_disk_offload_records_and_lesions_like_one_device(tiny_dir, battery, tmp_path):
    from neuroprobe import lesion, record

    battery = Battery.from_table(battery.table.iloc[::6].reset_index(drop=True), concepts=battery.concepts,
                                 name="kinship-tiny", root=battery.root)

    plain = load_subject("bert", weights=tiny_dir("bert"), device="cpu", quiet=True)
    big = load_subject("bert", weights=tiny_dir("bert"), device="cpu", quiet=True, device_map="auto",
                       max_memory="cpu=60KB", offload_folder=tmp_path / "offload")
    # the CPU budget holds the embeddings only: the encoder's weights live on disk until they run
    assert "disk" in big.model.hf_device_map.values() and big.device.type == "cpu"
    assert any(p.device.type == "meta" for p in big.model.parameters())
    a = record(plain, battery, tmp_path / "a.h5", montage="all", tokens=True, quiet=True)
    b = record(big, battery, tmp_path / "b.h5", montage="all", tokens=True, quiet=True)
    assert_same(a.path, b.path)
    units = {"encoder.layer.0.mlp": [0, 3, 5, 7]}
    with lesion(plain, units, "zero"):
        la = record(plain, battery, tmp_path / "la.h5", montage="encoder.layer.1", quiet=True)
    with lesion(big, units, "zero"):
        lb = record(big, battery, tmp_path / "lb.h5", montage="encoder.layer.1", quiet=True)
    assert_same(la.path, lb.path)
    assert not np.array_equal(la.responses("encoder.layer.1")[()], a.responses("encoder.layer.1")[()])


def test_device_map_mistakes_are_one_sentence(tiny_dir):
    from neuroprobe.errors import NeuroprobeError

    with pytest.raises(NeuroprobeError, match="--device-map takes auto"):
        load_subject("bert", weights=tiny_dir("bert"), quiet=True, device_map="everywhere")
    with pytest.raises(NeuroprobeError, match="DEVICE=SIZE"):
        load_subject("bert", weights=tiny_dir("bert"), quiet=True, device_map="auto", max_memory="lots")
