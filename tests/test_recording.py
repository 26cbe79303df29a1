"""Recording: values, pooling, provenance, resume after SIGKILL, and bad input through the real CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import Battery, load_subject, open_recording, record
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.planted import make_planted
from neuroprobe.recording.pooling import pool

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def minilm():
    return load_subject("minilm", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def small_kinship() -> Battery:
    full = Battery.load("kinship")
    rows = full.table.groupby(["concept", "form"]).head(1).reset_index(drop=True)
    return Battery.from_table(rows, concepts=full.concepts, name="kinship-small", root=full.root)


def all_datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


# ----------------------------------------------------------------- values


def test_pooling_matches_numpy_over_unpadded_tokens(minilm, small_kinship, tmp_path):
    rec = record(minilm, small_kinship, tmp_path / "r.h5", montage="mlp", tokens=True, quiet=True, batch_size=7)
    offsets = rec.token_offsets("text")
    tokens_table = rec.token_table("text")
    # the stored token ids are the tokenizer's ids without padding
    for i, text in enumerate(small_kinship.table["text"][:5]):
        ids = minilm.tokenizer(text)["input_ids"]
        assert tokens_table["token_id"].to_numpy()[offsets[i] : offsets[i + 1]].tolist() == ids
    for site in rec.site_names[:2]:
        traces = rec.tokens(site)[()]
        pooled = rec.responses(site)[()]
        expect = np.stack([traces[offsets[i] : offsets[i + 1]].astype(np.float64).mean(0) for i in range(len(offsets) - 1)])
        np.testing.assert_allclose(pooled, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["mean", "max", "first", "last", "concept-token"])
def test_pool_function_against_numpy(how):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    cmask = torch.tensor([[0, 1, 1, 0, 0, 0], [0] * 6, [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = pool(x, mask, how, cmask).numpy()
    xn, mn, cn = x.numpy(), mask.numpy(), cmask.numpy()
    for b in range(4):
        real = xn[b][mn[b]]
        if how == "mean":
            want = real.mean(0)
        elif how == "max":
            want = real.max(0)
        elif how == "first":
            want = real[0]
        elif how == "last":
            want = real[-1]
        else:
            sel = xn[b][mn[b] & cn[b]]
            want = sel.mean(0) if len(sel) else np.full(3, np.nan)
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)


def test_recorded_values_equal_direct_computation(tmp_path):
    planted = make_planted(tmp_path / "battery", seed=3)
    rec = record(planted.subject, planted.battery, tmp_path / "p.h5", montage="all", quiet=True, batch_size=5)
    net = planted.subject.model
    hidden, logits = [], []
    with torch.no_grad():  # same batches as the recorder: matmul results depend on batch shape
        for a in range(0, len(planted.battery), 5):
            x = planted.subject.features(planted.battery.table.iloc[a : a + 5])
            hidden.append(net.act(net.layer1(x)).numpy())
            logits.append(net(x).numpy())
    hidden, logits = np.concatenate(hidden), np.concatenate(logits)
    assert np.array_equal(rec.responses("hidden")[()], hidden)
    assert np.array_equal(rec.responses("logits")[()], logits)


def test_float16_storage_and_provenance(minilm, small_kinship, tmp_path):
    rec = record(minilm, small_kinship, tmp_path / "h.h5", montage="encoder.layer.0.mlp", dtype="float16", quiet=True)
    assert rec.responses("encoder.layer.0.mlp").dtype == np.float16
    a = rec.attrs
    for key in ("subject", "checkpoint", "revision", "init", "dtype", "battery", "battery_hash", "montage", "pooling",
                "library_versions", "command", "created", "complete", "format", "format_version", "seed"):
        assert key in a, key
    assert a["complete"] and a["subject"] == "minilm" and a["battery_hash"] == small_kinship.content_hash()
    assert list(rec.stimuli["id"]) == list(small_kinship.table["id"])


def test_concept_token_pooling_marks_stimuli_without_the_word(minilm, small_kinship, tmp_path):
    rec = record(minilm, small_kinship, tmp_path / "c.h5", montage="encoder.layer.5.mlp", pooling="concept-token", quiet=True)
    r = rec.responses("encoder.layer.5.mlp")[()]
    names = [small_kinship.concept_spans(t, c) for t, c in zip(small_kinship.table["text"], small_kinship.table["concept"])]
    has = np.array([bool(s) for s in names])
    assert np.isnan(r[~has]).all() and np.isfinite(r[has]).all()
    assert has.any() and (~has).any()


# ------------------------------------------------------------------ resume


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    common = ["record", "--model", "minilm", "--probe", "kinship", "--sites", "mlp", "--tokens", "--batch-size", "8",
              "--device", "cpu", "--quiet"]
    full = tmp_path / "full.h5"
    assert cli(*common, "--out", str(full)).returncode == 0
    part = tmp_path / "part.h5"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", *common, "--out", str(part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if part.exists():
            try:
                with open_recording(part) as live:  # a live recording is readable (SWMR)
                    done = live.n_done
            except Exception:
                continue
            if done >= 40:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done < 299, f"the kill came too late or too early (n_done={done})"
    with h5py.File(part, "r", swmr=True) as f:  # a killed SWMR writer leaves its flags: read it as SWMR
        assert not f.attrs["complete"]
    assert open_recording(part).n_done < 299
    res = cli(*common, "--out", str(part), "--resume")
    assert res.returncode == 0, res.stderr
    a, b = all_datasets(full), all_datasets(part)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k
    assert open_recording(part).complete


# --------------------------------------------------------------- bad input


def _one_clear_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("neuroprobe: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]


def test_unknown_subject(tmp_path):
    line = _one_clear_line(cli("record", "--model", "nosuchmodel", "--out", str(tmp_path / "x.h5")))
    assert "unknown subject" in line and not (tmp_path / "x.h5").exists()


def test_missing_weights_offline(tmp_path):
    res = cli("record", "--model", "bert", "--out", str(tmp_path / "x.h5"), env={"HF_HOME": str(tmp_path / "hf")})
    line = _one_clear_line(res)
    assert "google-bert/bert-base-uncased" in line and "--weights" in line
    assert not (tmp_path / "x.h5").exists()


def test_malformed_battery_names_file_and_row(tmp_path):
    b = tmp_path / "bad"
    b.mkdir()
    (b / "battery.json").write_text(json.dumps({"name": "bad", "concepts": {"a": {}, "b": {}}}))
    pd.DataFrame([dict(id="1", concept="a", modality="text", form="f", split="screening", text="hi"),
                  dict(id="2", concept="b", modality="text", form="f", split="sideways", text="yo")]).to_csv(b / "stimuli.csv", index=False)
    line = _one_clear_line(cli("record", "--model", "minilm", "--probe", str(b), "--out", str(tmp_path / "x.h5")))
    assert "stimuli.csv, row 3" in line and "sideways" in line
    pd.DataFrame([dict(id="1", concept="a", modality="image", form="photo", split="screening", image="nope.png")]).to_csv(b / "stimuli.csv", index=False)
    line = _one_clear_line(cli("record", "--model", "minilm", "--probe", str(b), "--out", str(tmp_path / "x.h5")))
    assert "row 2" in line and "nope.png" in line
    assert not (tmp_path / "x.h5").exists()


def test_existing_output_and_mismatched_resume(minilm, small_kinship, tmp_path):
    out = tmp_path / "r.h5"
    res = cli("record", "--model", "minilm", "--probe", "kinship", "--sites", "encoder.layer.0.mlp", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    line = _one_clear_line(cli("record", "--model", "minilm", "--probe", "kinship", "--sites", "encoder.layer.0.mlp", "--out", str(out)))
    assert "--resume" in line and "--overwrite" in line
    # an interrupted file from another subject/settings cannot be resumed
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
        f.attrs["n_done"] = 10
    line = _one_clear_line(cli("record", "--model", "minilm", "--init", "random", "--probe", "kinship",
                               "--sites", "encoder.layer.0.mlp", "--out", str(out), "--resume"))
    assert "init" in line
    line = _one_clear_line(cli("record", "--model", "minilm", "--probe", "kinship", "--sites", "encoder.layer.1.mlp",
                               "--out", str(out), "--resume"))
    assert "montage" in line
    with h5py.File(out, "r") as f:
        assert not f.attrs["complete"]


def test_library_errors_are_neuroprobe_errors(minilm, small_kinship, tmp_path):
    with pytest.raises(NeuroprobeError, match="pooling"):
        record(minilm, small_kinship, tmp_path / "a.h5", pooling="median", quiet=True)
    with pytest.raises(NeuroprobeError, match="matches no site"):
        record(minilm, small_kinship, tmp_path / "a.h5", montage="decoder.*", quiet=True)
    record(minilm, small_kinship, tmp_path / "a.h5", montage="encoder.layer.0.mlp", quiet=True)
    with pytest.raises(RecordingError, match="already exists"):
        record(minilm, small_kinship, tmp_path / "a.h5", montage="encoder.layer.0.mlp", quiet=True)


def test_reader_slices_lazily_and_exports(minilm, small_kinship, tmp_path):
    rec = record(minilm, small_kinship, tmp_path / "x.h5", montage="resid", quiet=True)
    ds = rec.responses("encoder.layer.2")
    assert isinstance(ds, h5py.Dataset) and ds.shape == (len(small_kinship), 384)
    assert ds.chunks is not None and ds.chunks[0] <= 32
    assert len(rec.units) == 6 * 384 and set(rec.sites["kind"]) == {"resid"}
    xr = rec.to_xarray(["encoder.layer.2"])
    assert np.array_equal(xr["encoder.layer.2"].values, ds[()])
    assert list(xr["concept"].values) == list(small_kinship.table["concept"])


def test_default_output_folder_is_created_in_a_fresh_directory(tmp_path):
    # a newcomer runs `record` without --out from a folder that has no recordings/ yet
    res = cli("record", "--model", "organism", "--probe", "digits", "--sites", "image.fc", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "recordings" / "organism_digits_image.fc.h5"
    with open_recording(out) as rec:
        assert rec.attrs["complete"] and rec.n_stimuli == len(Battery.load("digits").table)
