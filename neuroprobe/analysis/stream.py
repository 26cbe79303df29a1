"""Stream a site's responses over units, memory bounded.

A recording stores ``[n_stimuli, n_units]`` chunked along stimuli, each chunk
spanning (nearly) every unit.  Any read of "all stimuli for some units" therefore
touches every chunk of the site.  :class:`UnitStream` reads wide *super-blocks*
(as many units as ``read_bytes`` allows, so a site is read ``n_units / width``
times, usually once) and hands out narrow *blocks* of units, transposed to
``[units, stimuli]`` float32, small enough for the vectorised statistics
(sorting, ranking, medians) to work in cache-sized temporaries.

Rows where a site did not fire (all NaN, e.g. image-tower sites for text stimuli)
are dropped: :attr:`UnitStream.valid` says which stimuli remain.  A unit that is
NaN or infinite in a remaining row is passed through unchanged; the statistics
report it as dead.
"""
from __future__ import annotations

from typing import Iterator

import h5py
import numpy as np

#: Bytes of the raw super-block buffer (file dtype, all stimuli x width units).
DEFAULT_READ_BYTES = 256 << 20
#: Bytes of one float64 ``[block, n_valid]`` working array; the statistics keep ~10 of them alive.
DEFAULT_BLOCK_BYTES = 16 << 20


class UnitStream:
    """Iterate over a site's units in blocks.

    Parameters
    ----------
    ds
        The site's ``responses`` dataset ``[n_stimuli, n_units]``.
    read_bytes
        Size of the raw read buffer.
    block_units
        Units per block handed to the statistics (default: from ``DEFAULT_BLOCK_BYTES``).
    valid
        Which stimuli to keep; default: rows that are not all-NaN in the first super-block.
    start, stop
        Only units ``start:stop`` (default: all).  Super-blocks then start at ``start``: a worker
        reading one piece of a site gives that piece's blocks of the whole site's stream when
        ``start`` is where one of them starts (and passes the whole site's ``valid``).

    Yields
    ------
    (lo, hi, x)
        Units ``lo:hi`` of the site and their responses as a C-contiguous float32
        array ``[hi - lo, n_valid]`` (units x stimuli).
    """

    def __init__(self, ds: h5py.Dataset, *, read_bytes: int = DEFAULT_READ_BYTES, block_units: int | None = None,
                 valid: np.ndarray | None = None, start: int = 0, stop: int | None = None) -> None:
        self.ds = ds
        self.n_rows, self.n_units = int(ds.shape[0]), int(ds.shape[1])
        self.start = int(start)
        self.stop = self.n_units if stop is None else min(int(stop), self.n_units)
        self.read_bytes = int(read_bytes)
        self._block_units = block_units
        self.valid = None if valid is None else np.asarray(valid, dtype=bool)
        self.passes = 0  # super-block reads (each touches every chunk of the site)

    def block_units(self, n_valid: int) -> int:
        """Units per block for ``n_valid`` stimuli."""
        if self._block_units:
            return max(1, int(self._block_units))
        return int(np.clip(DEFAULT_BLOCK_BYTES // (8 * max(1, n_valid)), 16, 4096))

    def width(self) -> int:
        """Units per super-block (one read of at most ``read_bytes``)."""
        return self._width()

    def first_valid(self) -> np.ndarray:
        """The rows the whole site's stream keeps (not all-NaN in its first super-block), read a few
        units at a time (at most ``DEFAULT_BLOCK_BYTES`` at once, stopping once every row has a value)."""
        item = np.dtype(self.ds.dtype).itemsize
        width = self._width()
        step = int(max(1, min(width, DEFAULT_BLOCK_BYTES // (item * max(1, self.n_rows)))))
        valid = np.zeros(self.n_rows, dtype=bool)
        for a in range(0, width, step):
            valid |= ~np.isnan(self.ds[:, a : min(a + step, width)]).all(axis=1)
            if valid.all():
                break
        return valid

    def _width(self) -> int:
        item = np.dtype(self.ds.dtype).itemsize
        width = max(1, self.read_bytes // (item * max(1, self.n_rows)))
        chunks = self.ds.chunks
        if chunks is not None and chunks[1] < self.n_units and width > chunks[1]:
            width -= width % chunks[1]  # whole chunks across units
        return int(min(self.n_units, width))

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        if self.n_units == 0 or self.n_rows == 0 or self.start >= self.stop:
            return
        width = min(self._width(), self.stop - self.start)
        buf = np.empty((self.n_rows, width), dtype=self.ds.dtype)
        for a in range(self.start, self.stop, width):
            b = min(a + width, self.stop)
            w = b - a
            view = buf[:, :w] if w == width else np.empty((self.n_rows, w), dtype=self.ds.dtype)
            self.ds.read_direct(view, source_sel=np.s_[:, a:b])
            self.passes += 1
            if self.valid is None:
                self.valid = ~np.isnan(view).all(axis=1)
            rows = None if self.valid.all() else np.flatnonzero(self.valid)
            g = self.block_units(int(self.valid.sum()))
            for lo in range(0, w, g):
                hi = min(lo + g, w)
                part = view[:, lo:hi] if rows is None else view[rows, lo:hi]
                yield a + lo, a + hi, np.ascontiguousarray(part.T, dtype=np.float32)
