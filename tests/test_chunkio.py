"""The recording hot path: batch pooling, direct chunk writes, and per-token traces against the model itself."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from neuroprobe import Battery, load_subject, record
from neuroprobe.recording import chunkio
from neuroprobe.recording.pooling import BatchPooler, pool


def _batch(seed: int = 0, contiguous: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 6, generator=g)
    if not contiguous:
        x = torch.randn(5, 6, 7, generator=g).transpose(1, 2)
    mask = torch.rand(5, 7, generator=g) > 0.3
    mask[:, 0] = True
    cmask = (torch.rand(5, 7, generator=g) > 0.5) & mask
    cmask[2] = False  # a stimulus without its concept word
    return x, mask, cmask


@pytest.mark.parametrize("how", ["mean", "max", "first", "last", "concept-token"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_batch_pooler_equals_pool_and_boolean_indexing_bitwise(how, contiguous):
    x, mask, cmask = _batch(1, contiguous)
    pooler = BatchPooler(how, {"text": mask}, {"text": cmask})
    for _ in range(2):  # the second site of a batch reuses the cached weights and indices
        assert torch.equal(pooler.pool(x, "text").nan_to_num(7.0), pool(x, mask, how, cmask).nan_to_num(7.0))
        assert torch.equal(pooler.tokens(x, "text"), x[mask])
    if how == "concept-token":
        assert torch.isnan(pooler.pool(x, "text")[2]).all()


def test_batch_pooler_refuses_a_mask_of_another_shape():
    x, mask, cmask = _batch()
    with pytest.raises(RuntimeError, match="do not match"):
        BatchPooler("mean", {"text": mask[:, :3]}, {}).pool(x, "text")
    with pytest.raises(RuntimeError, match="do not match"):
        BatchPooler("mean", {"image": mask}, {}).tokens(x, "text")


@pytest.mark.parametrize("n_units,chunks,dtype", [(1536, (170, 1536), "f4"), (10, (7, 4), "f2"), (5000, (50, 4096), "f4"),
                                                  (1, (4096,), "i8")])
def test_row_writer_appends_equal_what_h5py_reads_back(tmp_path, n_units, chunks, dtype):
    one_d = len(chunks) == 1
    rng = np.random.default_rng(0)
    path = tmp_path / "x.h5"
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        shape, maxshape = ((0,), (None,)) if one_d else ((0, n_units), (None, n_units))
        ds = f.create_dataset("t", shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks, **chunkio.creation_kwargs())
        f.swmr_mode = True
        assert chunkio.supports(ds)
        rows = chunkio.RowWriter(ds, f.id.get_vfd_handle())
        parts, n = [], 0
        for size in [0, 3, 60, 1, 4095, 4097, 17]:
            x = (rng.integers(0, 1 << 40, size) if one_d else rng.standard_normal((size, n_units))).astype(dtype)
            ds.resize((n + size,) if one_d else (n + size, n_units))
            rows.write(n, x)
            f.flush()
            parts.append(x)
            n += size
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["t"][()], np.concatenate(parts))


def test_datasets_the_row_writer_must_not_touch(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        plain = f.create_dataset("plain", shape=(0, 4), maxshape=(None, 4), chunks=(8, 4), dtype="f4")
        packed = f.create_dataset("packed", shape=(0, 4), maxshape=(None, 4), chunks=(8, 4), dtype="f4",
                                  compression="gzip", **chunkio.creation_kwargs())
        flat = f.create_dataset("flat", shape=(8, 4), dtype="f4")
        assert not chunkio.supports(plain)  # chunks allocated on write: no address before h5py writes it
        assert not chunkio.supports(packed)  # a chunk's bytes are not its rows
        assert not chunkio.supports(flat)


def test_whole_chunk_writes_and_their_fallback(tmp_path):
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("r", shape=(10, 5000), chunks=(4, 4096), dtype="f4", fillvalue=np.nan)
        a = rng.standard_normal((4, 5000)).astype("f4")
        assert chunkio.write_chunk_rows(ds, 4, a)
        assert not chunkio.write_chunk_rows(ds, 2, a)  # not on a chunk boundary: the caller uses h5py
        assert not chunkio.write_chunk_rows(ds, 0, a[:3])  # a partial chunk that is not the dataset's last
        assert not chunkio.write_chunk_rows(ds, 0, a.astype("f8"))  # would need a type conversion
        last = rng.standard_normal((2, 5000)).astype("f4")
        assert chunkio.write_chunk_rows(ds, 8, last)  # the edge chunk, padded with the fill value
        got = ds[()]
        assert np.array_equal(got[4:8], a) and np.array_equal(got[8:], last) and np.isnan(got[:4]).all()
        packed = f.create_dataset("p", shape=(8, 3), chunks=(4, 3), dtype="f4", compression="gzip")
        assert not chunkio.write_chunk_rows(packed, 0, a[:, :3])


@pytest.fixture(scope="module")
def minilm():
    return load_subject("minilm", device="cpu", quiet=True)


@pytest.mark.parametrize("options", [dict(dtype="float32"), dict(dtype="float16"), dict(dtype="float32", compression="gzip")])
def test_per_token_traces_equal_the_module_input_computed_directly(minilm, tmp_path, options):
    full = Battery.load("kinship")
    battery = Battery.from_table(full.table.iloc[:23].reset_index(drop=True), concepts=full.concepts, name="k23",
                                 root=full.root)
    sites = ["encoder.layer.1.mlp", "encoder.layer.4.mlp"]
    rec = record(minilm, battery, tmp_path / "t.h5", montage=",".join(sites), tokens=True, batch_size=6, quiet=True,
                 **options)
    captured: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    handles = [minilm.model.get_submodule(f"encoder.layer.{s.split('.')[2]}.output.dense").register_forward_pre_hook(
        lambda m, args, _s=s: captured[_s].append(args[0])) for s in sites]
    try:
        with torch.inference_mode():
            for a in range(0, len(battery), 6):  # the recorder's batches: padding changes nothing, batch shape might
                texts = battery.table["text"].iloc[a : a + 6].tolist()
                enc = minilm.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
                minilm.model(**enc)
                mask = enc["attention_mask"].bool()
                for s in sites:
                    captured[s][-1] = captured[s][-1][mask].numpy()
    finally:
        for h in handles:
            h.remove()
    dtype = np.float16 if options["dtype"] == "float16" else np.float32
    for s in sites:
        want = np.concatenate(captured[s]).astype(dtype)
        assert np.array_equal(rec.tokens(s)[()], want), s
    with h5py.File(rec.path, "r") as f:
        direct = chunkio.supports(f[f"sites/{sites[0]}/tokens"])
    assert direct == ("compression" not in options)  # which path wrote them


def test_a_dataset_without_allocated_chunks_falls_back_to_h5py(minilm, tmp_path, monkeypatch):
    """If HDF5 ever left a chunk unallocated, the writer must notice and write through h5py, losing nothing."""
    full = Battery.load("kinship")
    battery = Battery.from_table(full.table.iloc[:9].reset_index(drop=True), concepts=full.concepts, name="k9",
                                 root=full.root)
    options = dict(montage="encoder.layer.2.mlp", tokens=True, batch_size=4, quiet=True)
    want = record(minilm, battery, tmp_path / "a.h5", **options).tokens("encoder.layer.2.mlp")[()]
    monkeypatch.setattr(chunkio, "creation_kwargs", lambda: {})  # chunks allocated on write, as h5py's default
    monkeypatch.setattr(chunkio, "supports", lambda ds: True)  # ...and the writer told it may write them directly
    with pytest.raises(chunkio.NotAllocated):
        with h5py.File(tmp_path / "probe.h5", "w") as f:
            ds = f.create_dataset("t", shape=(3, 2), maxshape=(None, 2), chunks=(2, 2), dtype="f4")
            chunkio.RowWriter(ds, f.id.get_vfd_handle()).write(0, np.ones((3, 2), "f4"))
    got = record(minilm, battery, tmp_path / "b.h5", **options).tokens("encoder.layer.2.mlp")[()]
    assert np.array_equal(got, want)
