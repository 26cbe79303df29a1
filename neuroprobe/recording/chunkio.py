"""Write rows of an uncompressed chunked HDF5 dataset straight into its chunks' bytes.

h5py holds the GIL for the whole of every write, so a writer thread that writes
through h5py stalls the model's forward pass (every torch op needs the GIL between
its kernels).  The per-token datasets are the bulk of a recording, so the writer
lets HDF5 do only what is small — grow the dataset (which allocates its chunks,
see :func:`creation_kwargs`), tell where a chunk lies — and puts the rows into the file
itself with ``os.pwrite``, which releases the GIL.

This is sound because of what such a dataset is (checked by :func:`supports`):
chunked, no filters (the bytes of a chunk are the chunk's rows, row-major, padded
to the full chunk shape), allocated when it grows, never filled by HDF5
(``fill_time=never``), and never written through HDF5, so no chunk cache holds
a copy that could later overwrite the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

def creation_kwargs() -> dict[str, Any]:
    """``create_dataset`` keywords: chunks allocated as the dataset grows, never filled by HDF5."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return {"dcpl": dcpl, "fill_time": "never"}


def supports(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` can be written by :class:`RowWriter` (else write it through h5py)."""
    if ds.chunks is None or ds.ndim not in (1, 2) or ds.dtype.kind not in "fiu" or not hasattr(ds.id, "get_chunk_info_by_coord"):
        return False
    dcpl = ds.id.get_create_plist()
    return (dcpl.get_nfilters() == 0 and dcpl.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
            and dcpl.get_fill_time() == h5py.h5d.FILL_TIME_NEVER)


class NotAllocated(RuntimeError):
    """A chunk the rows belong to has no storage (yet): write this dataset through h5py instead."""


class RowWriter:
    """Put rows into a 1-d or 2-d dataset that :func:`supports`, bypassing h5py.

    Parameters
    ----------
    ds
        The dataset (its rows must already exist: grow it first with ``resize``).
    fd
        A file descriptor open for writing on the dataset's file.
    """

    def __init__(self, ds: h5py.Dataset, fd: int) -> None:
        self.ds = ds
        self.fd = fd
        self.rows, self.width = ds.chunks if ds.ndim == 2 else (ds.chunks[0], 1)
        self.n_units = ds.shape[1] if ds.ndim == 2 else 1
        self.index = (lambda r, u: (r, u)) if ds.ndim == 2 else (lambda r, u: (r,))
        self.dtype = ds.dtype
        self._addr: dict[tuple[int, int], int] = {}

    def _address(self, row0: int, col0: int) -> int:
        key = (row0, col0)
        addr = self._addr.get(key)
        if addr is None:
            info = self.ds.id.get_chunk_info_by_coord(self.index(row0, col0))
            if info.byte_offset is None or info.size != self.rows * self.width * self.dtype.itemsize:
                raise NotAllocated(f"chunk {key} of {self.ds.name} is not allocated as expected")
            addr = self._addr[key] = int(info.byte_offset)
        return addr

    def write(self, start: int, data: np.ndarray) -> None:
        """Write ``data`` (``[k, n_units]``, or ``[k]`` for a 1-d dataset) as rows ``start .. start + k``."""
        k = len(data)
        if k == 0:
            return
        if data.dtype != self.dtype:
            data = data.astype(self.dtype)
        if data.ndim == 1:
            data = data.reshape(k, 1)
        item = self.dtype.itemsize
        r, w = self.rows, self.width
        for c0 in range(start // r * r, start + k, r):
            a, b = max(start, c0), min(start + k, c0 + r)
            for u0 in range(0, self.n_units, w):  # the last column block is padded to the chunk's width
                block = _chunk_block(data[a - start : b - start], u0, w, 0)
                _pwrite_all(self.fd, memoryview(block).cast("B"), self._address(c0, u0) + (a - c0) * w * item)


def _chunk_block(rows: np.ndarray, u0: int, width: int, fill: Any) -> np.ndarray:
    """Columns ``u0 .. u0 + width`` of ``rows`` as a contiguous block, padded with ``fill`` past the last unit."""
    block = rows[:, u0 : u0 + width]
    if block.shape[1] < width:
        padded = np.full((len(rows), width), fill, rows.dtype)
        padded[:, : block.shape[1]] = block
        return padded
    return np.ascontiguousarray(block)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


@dataclass(frozen=True)
class ChunkPlan:
    """What :func:`write_chunk_rows` needs to know of a fixed-shape dataset (read once, not per batch)."""

    rows: int
    width: int
    n: int
    n_units: int
    dtype: np.dtype
    fill: Any


def chunk_plan(ds: h5py.Dataset) -> ChunkPlan | None:
    """The :class:`ChunkPlan` of ``ds``, or ``None`` if it cannot take whole chunks (not chunked, not 2-d, filtered)."""
    if ds.chunks is None or ds.ndim != 2 or ds.id.get_create_plist().get_nfilters():
        return None
    return ChunkPlan(ds.chunks[0], ds.chunks[1], ds.shape[0], ds.shape[1], ds.dtype, ds.fillvalue)


def write_chunk_rows(ds: h5py.Dataset, start: int, data: np.ndarray, plan: ChunkPlan | None = None) -> bool:
    """Write ``data`` as rows ``start ..`` of ``ds`` as whole chunks (``write_direct_chunk``).

    Only when the rows are exactly whole chunks (or run to the dataset's last row)
    and ``ds`` has no filters; returns ``False`` (nothing written) otherwise, and the
    caller writes through h5py.  One HDF5 call per chunk, no chunk cache, no type
    conversion: the GIL is held for a single ``pwrite`` instead of h5py's selection
    machinery.  Rows of an edge chunk beyond the dataset are padded with its fill value.
    ``plan`` is :func:`chunk_plan` of ``ds``, if the caller keeps it.
    """
    p = plan if plan is not None else chunk_plan(ds)
    if p is None:
        return False
    r, w = p.rows, p.width
    k = len(data)
    if start % r or (k % r and start + k != p.n) or data.dtype != p.dtype:
        return False
    for c0 in range(start, start + k, r):
        rows = data[c0 - start : c0 - start + r]
        if len(rows) < r:  # the dataset's last chunk: rows past its end are padded with the fill value
            rows = np.concatenate([rows, np.full((r - len(rows), p.n_units), p.fill, p.dtype)])
        for u0 in range(0, p.n_units, w):
            ds.id.write_direct_chunk((c0, u0), _chunk_block(rows, u0, w, p.fill))
    return True
