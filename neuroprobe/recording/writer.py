"""Stream responses into a recording file, batch by batch, from a writer thread.

:class:`RecordingWriter` owns the h5py file; :class:`ThreadedWriter` hands it
batches through a bounded queue so the model computes the next batch while the
previous one goes to disk.  Memory stays flat: at most ``queue_size`` batches wait.
The bulk of each batch is written with ``os.pwrite`` straight into chunks HDF5 has
allocated (:mod:`neuroprobe.recording.chunkio`), so the thread does not hold the GIL
against the forward pass while the bytes go to disk.

Faults (see ``docs/GUARANTEES.md``):

- The file is written in HDF5's single-writer/multiple-reader (SWMR) mode, so
  readers (``open_recording``, ``neuroprobe inspect``) can open it while it is being
  written, and HDF5 orders its metadata writes so that the file stays readable.
- ``n_done`` is committed only after the batch's data has been flushed without
  error.  Before each batch the free space on the file system is checked against
  the batch's size (with a margin), so a full disk stops the recording *before*
  HDF5 runs out of space in the middle of a write; an ``ENOSPC`` that still
  happens ends in the same one-sentence error and nothing more is written.
- A file left in SWMR-write state by a killed process has its status flags
  cleared (:func:`clear_status_flags`) before ``--resume`` reopens it.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd

from neuroprobe.errors import RecordingError
from neuroprobe.recording import chunkio, schema
from neuroprobe.subjects.base import Site


@dataclass
class BatchResult:
    """One batch's worth of data for the writer.

    Attributes
    ----------
    offset, n
        First stimulus index and number of stimuli.
    pooled
        Site name -> ``[n, n_units]`` responses.
    stream_tokens
        Stream -> dict(``counts`` [n], ``token_ids``, ``stimulus``, ``position`` [n_tok]).
    site_tokens
        Site name -> ``[n_tok(stream), n_units]`` per-token traces.
    """

    offset: int
    n: int
    pooled: dict[str, np.ndarray]
    stream_tokens: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    site_tokens: dict[str, np.ndarray] = field(default_factory=dict)


def _str_attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


#: File-format bounds: HDF5 1.10 is the oldest library with SWMR, and capping the
#: format at 1.10 keeps recordings readable by every HDF5 since.
LIBVER = ("v110", "v110")

#: Files HDF5 failed to close after a write error (kept referenced on purpose; see ``close``).
_UNCLOSABLE: list[Any] = []

#: Free space kept in reserve beyond twice a batch's size (HDF5 metadata, index growth).
RESERVE_BYTES = 1 << 20


def disk_full_message(path: Path) -> str:
    """The one sentence for a full disk."""
    return (f"the disk is full: {path} cannot grow any further; its committed stimuli are safe — "
            f"free some space and rerun with --resume.")


def os_error(err: BaseException, path: Path, doing: str) -> RecordingError:
    """Turn an ``OSError`` (or h5py's ``RuntimeError``) from the file system or HDF5 into one sentence."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if getattr(err, "errno", None) == errno.ENOSPC or "No space" in text or "file write failed" in text:
        return RecordingError(disk_full_message(path))
    reason = err.strerror if getattr(err, "strerror", None) else text
    return RecordingError(f"cannot {doing} {path} ({reason}).")


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged user may still write on ``path``'s file system (``None`` if unknown)."""
    try:
        st = os.statvfs(path if path.exists() else path.parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _load_libc() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        return libc
    except (OSError, AttributeError):  # not Linux/glibc: the free-space check stands in
        return None


_LIBC = _load_libc()
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


def _fallocate_keep_size(fd: int, offset: int, length: int) -> int:
    """Allocate ``length`` bytes past ``offset`` without changing the file's size; 0 or an errno."""
    import ctypes

    if _LIBC.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return 0
    return ctypes.get_errno() or errno.EOPNOTSUPP


def _fallocate_punch(fd: int, offset: int, length: int) -> None:
    """Free blocks from ``offset`` on, keeping the size (the unused part of a claim)."""
    _LIBC.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def _make_reserve(path: Path) -> Path | None:
    """Set aside ``RESERVE_BYTES`` beside ``path`` (``.<name>.reserve``), given back if the disk fills up.

    When the disk fills up in the middle of a write, HDF5 still holds dirty caches
    that it must flush to close the file; deleting the reserve makes room for that.
    """
    reserve = path.with_name(("" if path.name.startswith(".") else ".") + f"{path.name}.reserve")
    try:
        with open(reserve, "wb") as fh:
            fh.write(bytes(RESERVE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        reserve.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise RecordingError(disk_full_message(path)) from None
        return None  # a file system that refuses the reserve for another reason: record without it
    return reserve


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` with seed 0: HDF5's metadata checksum."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    n = len(data)
    a = b = c = (0xDEADBEEF + n) & mask
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & mask
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & mask
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        i += 12
    if i == n:
        return c
    rest = data[i:] + bytes(12 - (n - i))
    a = (a + int.from_bytes(rest[0:4], "little")) & mask
    b = (b + int.from_bytes(rest[4:8], "little")) & mask
    c = (c + int.from_bytes(rest[8:12], "little")) & mask
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


def clear_status_flags(path: Path) -> bool:
    """Clear the "open for (SWMR) write" flags a killed writer left in the superblock (``h5clear -s``).

    Only call this while holding the recording's :class:`~neuroprobe.recording.lock.WriterLock`
    (so no live writer owns the flags).  Returns whether anything was changed.
    Superblock versions 2 and 3 (the only ones with these flags) keep them in byte
    11 and end with a lookup3 checksum of the preceding bytes.
    """
    with open(path, "r+b") as fh:
        head = fh.read(48 + 12)
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[11] == 0:
            return False
        size_of_offsets = head[9]
        end = 12 + 4 * size_of_offsets
        block = bytearray(head[:end])
        stored = struct.unpack("<I", head[end : end + 4])[0]
        if _lookup3(bytes(block)) != stored:
            return False  # not a superblock we understand: leave it to HDF5's own error
        block[11] = 0
        fh.seek(0)
        fh.write(bytes(block) + struct.pack("<I", _lookup3(bytes(block))))
        fh.flush()
        os.fsync(fh.fileno())
    return True


class RecordingWriter:
    """Create or resume a recording file and append batches to it."""

    def __init__(self, path: Path, file: h5py.File, streams: Sequence[str], tokens: bool, sites: Sequence[str],
                 reserve: Path | None = None) -> None:
        self.path = path
        self.f = file
        self._reserve = reserve
        self.streams = list(streams)
        self.tokens = tokens
        self.sites = list(sites)
        self.n_done = int(file.attrs.get("n_done", 0))
        self.failed = False
        self._handles: dict[str, Any] = {}
        self._fallocate_ok = _LIBC is not None
        self._streams_of: dict[str, str] = {}
        self._row_writers: dict[str, chunkio.RowWriter | None] = {}
        self._chunk_plans: dict[str, chunkio.ChunkPlan | None] = {}
        self.n_tokens = {s: int(file[f"{schema.TOKENS}/{s}"].attrs["n_tokens"]) for s in self.streams} if tokens else {}

    # -------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: Path,
        provenance: dict[str, Any],
        stimuli: pd.DataFrame,
        sites: Sequence[tuple[Site, int]],
        *,
        pooling_per_site: dict[str, str],
        tokens: bool,
        dtype: str,
        compression: str | None,
        chunk_rows: int,
    ) -> "RecordingWriter":
        """Create the file with every dataset allocated (written as ``complete=False``), in SWMR mode.

        Create it under a temporary name and move it into place (the recorder
        does), so that a crash here never leaves a stub at the recording's path.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise os_error(err, path, "create") from None
        reserve = _make_reserve(path)
        try:
            f = h5py.File(path, "w", track_order=True, libver=LIBVER)
        except OSError as err:
            if reserve is not None:
                reserve.unlink(missing_ok=True)
            raise os_error(err, path, "create") from None
        try:
            for k, v in provenance.items():
                f.attrs[k] = _str_attr(v)
            f.attrs["complete"] = False
            f.attrs["n_done"] = 0
            n = len(stimuli)
            g = f.create_group(schema.STIMULI, track_order=True)
            g.create_dataset("index", data=np.arange(n, dtype=np.int64))
            for col in stimuli.columns:
                g.create_dataset(col, data=stimuli[col].astype(str).to_numpy(dtype=object), dtype=h5py.string_dtype())
            comp = dict(compression=compression) if compression else {}
            streams = sorted({s.stream for s, _ in sites})
            if tokens:
                for stream in streams:
                    t = f.create_group(f"{schema.TOKENS}/{stream}")
                    t.create_dataset("offsets", data=np.zeros(n + 1, dtype=np.int64), chunks=True)
                    for name in ("token_ids", "stimulus", "position"):
                        t.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,),
                                         **chunkio.creation_kwargs())
                    t.attrs["n_tokens"] = 0
            for site, n_units in sites:
                sg = f.create_group(schema.site_path(site.name))
                rows = max(1, min(chunk_rows, n))
                # chunks: a batch of stimuli by at most 4096 units (so unit-block reads stay cheap), <= ~1 MiB
                width = max(1, min(n_units, 4096))
                rows = max(1, min(rows, (1 << 20) // (4 * width) or 1))
                sg.create_dataset(
                    schema.RESPONSES, shape=(n, n_units), dtype=dtype, chunks=(rows, width),
                    fillvalue=np.nan, **comp,
                )
                if tokens:
                    trow = max(1, min(4096, (1 << 20) // (4 * width)))
                    direct = {} if compression else chunkio.creation_kwargs()  # written by chunkio.RowWriter
                    sg.create_dataset(schema.SITE_TOKENS, shape=(0, n_units), maxshape=(None, n_units), dtype=dtype,
                                      chunks=(trow, width), **comp, **direct)
                attrs = dict(module=site.module, direction=site.direction, kind=site.kind, stream=site.stream,
                             layout=site.layout, call=-1 if site.call is None else site.call, index=site.index,
                             n_heads=site.n_heads or 0, pooling=pooling_per_site[site.name], n_units=n_units)
                if site.sae is not None:
                    attrs.update(schema.feature_site_attrs(site))
                for k, v in attrs.items():
                    sg.attrs[k] = v
            f.flush()
            f.swmr_mode = True  # from here on readers may open the file while it grows
        except BaseException as err:
            if reserve is not None:
                reserve.unlink(missing_ok=True)  # room for HDF5 to close the file cleanly
            try:
                f.close()
            except Exception:  # noqa: BLE001 - the file is discarded anyway
                _UNCLOSABLE.append(f)
            path.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise os_error(err, path, "create") from None
            raise
        return cls(path, f, streams, tokens, [s.name for s, _ in sites], reserve=reserve)

    @classmethod
    def resume(cls, path: Path, identity: dict[str, Any]) -> "RecordingWriter":
        """Open an interrupted recording; check it is the same job; drop uncommitted tokens.

        Hold the recording's :class:`~neuroprobe.recording.lock.WriterLock` while calling this.
        """
        try:
            clear_status_flags(path)
            f = h5py.File(path, "r+", libver=LIBVER)
        except OSError as err:
            raise RecordingError(
                f"cannot resume {path}: it is not a readable recording ({str(err).splitlines()[0]}); use --overwrite to start over."
            ) from None
        if f.attrs.get("format") != schema.FORMAT:
            f.close()
            raise RecordingError(f"cannot resume {path}: it is not a neuroprobe recording; use --overwrite or another --out.")
        for key in schema.IDENTITY_KEYS:
            have, want = f.attrs.get(key, "" if key in schema.OPTIONAL_IDENTITY_KEYS else None), _str_attr(identity.get(key))
            if isinstance(have, bytes):
                have = have.decode()
            if isinstance(have, np.generic):
                have = have.item()
            if have != want:
                f.close()
                raise RecordingError(
                    f"cannot resume {path}: it was recorded with {key}={have!r}, not {want!r}; "
                    f"resume with the same settings or use --overwrite."
                )
        if bool(f.attrs.get("complete", False)):
            f.close()
            raise RecordingError(f"{path} is already complete; nothing to resume (use --overwrite to record again).")
        sites = list(f[schema.SITES].keys())
        streams = list(f[schema.TOKENS].keys()) if schema.TOKENS in f else []
        tokens = bool(f.attrs["tokens"])
        try:
            reserve = _make_reserve(path)
        except RecordingError:
            f.close()
            raise
        w = cls(path, f, streams, tokens, sites, reserve=reserve)
        if tokens:  # drop rows written after the last commit
            for stream, count in w.n_tokens.items():
                t = f[f"{schema.TOKENS}/{stream}"]
                for name in ("token_ids", "stimulus", "position"):
                    t[name].resize((count,))
            for site in sites:
                sg = f[schema.site_path(site)]
                count = w.n_tokens[sg.attrs["stream"]]
                sg[schema.SITE_TOKENS].resize((count, sg[schema.SITE_TOKENS].shape[1]))
        try:
            f.flush()
            f.swmr_mode = True
        except (OSError, ValueError):  # a file from before SWMR (superblock < 3): written as before
            pass
        return w

    # ------------------------------------------------------------------ space
    def _claim_space(self, nbytes: int) -> None:
        """Make sure the next ``nbytes`` the file grows by are on disk already, or stop with "disk full".

        The blocks past the end of the file are allocated up front
        (``fallocate(FALLOC_FL_KEEP_SIZE)``): HDF5 then writes the batch into space
        that is already the file's, so no other process can take it and HDF5 never
        meets ``ENOSPC`` half-way through a batch.  On file systems without
        ``fallocate`` the free space is checked instead.
        """
        fd = self._fd()
        if fd is not None and self._fallocate_ok:
            err = _fallocate_keep_size(fd, os.fstat(fd).st_size, nbytes)
            if err == 0:
                return
            if err == errno.ENOSPC:
                raise RecordingError(disk_full_message(self.path))
            self._fallocate_ok = False  # unsupported here: fall back to the free-space check
        free = free_bytes(self.path)
        if free is not None and free < nbytes:
            raise RecordingError(disk_full_message(self.path))

    def _fd(self) -> int | None:
        try:
            return int(self.f.id.get_vfd_handle())
        except Exception:  # noqa: BLE001 - another HDF5 driver: no descriptor to reserve through
            return None

    def _release_claim(self) -> None:
        """Give back the blocks claimed past the end of the file (before closing it)."""
        fd = self._fd()
        if fd is not None and self._fallocate_ok:
            _fallocate_punch(fd, os.fstat(fd).st_size, 1 << 40)

    # ------------------------------------------------------------------ write
    def _handle(self, name: str) -> Any:
        """The open h5py object at ``name``, opened once and kept.

        Kept open on purpose: closing a dataset flushes its chunk cache, and h5py
        swallows an error raised there (a full disk) — data would be lost without a
        word.  With the handles kept, every write error surfaces in ``flush``.
        """
        obj = self._handles.get(name)
        if obj is None:
            obj = self._handles[name] = self.f[name]
        return obj

    def _stream_of(self, site: str) -> str:
        stream = self._streams_of.get(site)
        if stream is None:
            stream = self._streams_of[site] = str(self._handle(schema.site_path(site)).attrs["stream"])
        return stream

    def _put_rows(self, key: str, ds: h5py.Dataset, start: int, data: np.ndarray) -> None:
        """Write rows of a growing dataset (already resized): straight into its chunks where it allows, else h5py."""
        if key not in self._row_writers:
            fd = self._fd()
            self._row_writers[key] = chunkio.RowWriter(ds, fd) if fd is not None and chunkio.supports(ds) else None
        rows = self._row_writers[key]
        if rows is not None:
            try:
                rows.write(start, data)  # os.pwrite: the GIL is free for the forward pass meanwhile
                return
            except chunkio.NotAllocated:  # an HDF5 that did not allocate on growth: h5py from here on
                self._row_writers[key] = None
        ds[start : start + len(data)] = data

    def write(self, r: BatchResult) -> None:
        """Write one batch and commit progress (data first, then counters, then flush)."""
        f = self.f
        sl = slice(r.offset, r.offset + r.n)
        if self.failed:
            raise RecordingError(f"{self.path} had a write error; nothing more is written to it.")
        need = sum(a.nbytes for a in r.pooled.values()) + sum(a.nbytes for a in r.site_tokens.values())
        need += sum(v.nbytes for d in r.stream_tokens.values() for v in d.values())
        self._claim_space(2 * need + RESERVE_BYTES)
        h = self._handle
        try:
            for name, arr in r.pooled.items():
                key = f"{schema.site_path(name)}/{schema.RESPONSES}"
                ds = h(key)
                if key not in self._chunk_plans:
                    self._chunk_plans[key] = chunkio.chunk_plan(ds)
                plan = self._chunk_plans[key]
                if plan is None or not chunkio.write_chunk_rows(ds, r.offset, arr, plan):
                    ds[sl] = arr
            new_counts = {}
            if self.tokens:
                for stream in self.streams:
                    group = f"{schema.TOKENS}/{stream}"
                    info = r.stream_tokens.get(stream)
                    start = self.n_tokens[stream]
                    counts = info["counts"] if info is not None else np.zeros(r.n, dtype=np.int64)
                    ends = start + np.cumsum(counts)
                    h(f"{group}/offsets")[r.offset + 1 : r.offset + r.n + 1] = ends
                    total = int(ends[-1]) if len(ends) else start
                    if info is not None and total > start:
                        for key in ("token_ids", "stimulus", "position"):
                            ds = h(f"{group}/{key}")
                            ds.resize((total,))
                            self._put_rows(f"{group}/{key}", ds, start, info[key])
                    new_counts[stream] = total
                for name, arr in r.site_tokens.items():
                    stream = self._stream_of(name)
                    start, total = self.n_tokens[stream], new_counts[stream]
                    ds = h(f"{schema.site_path(name)}/{schema.SITE_TOKENS}")
                    ds.resize((total, ds.shape[1]))
                    self._put_rows(name, ds, start, arr)
            f.flush()  # raises if any of the batch's data did not reach the file
            # commit
            for stream, total in new_counts.items():
                h(f"{schema.TOKENS}/{stream}").attrs["n_tokens"] = total
                self.n_tokens[stream] = total
            f.attrs["n_done"] = r.offset + r.n
            f.flush()
            self.n_done = r.offset + r.n
        except (OSError, RuntimeError) as err:
            # nothing after a failed write reaches the file: n_done stays at the last good batch
            self.failed = True
            raise os_error(err, self.path, "write to") from None

    def finish(self) -> None:
        """Mark the recording complete."""
        if self.failed:
            raise RecordingError(f"{self.path} had a write error; it is not complete.")
        try:
            self.f.attrs["complete"] = True
            self.f.flush()
        except (OSError, RuntimeError) as err:
            self.failed = True
            raise os_error(err, self.path, "finish") from None

    def close(self) -> None:
        """Close the file (progress stays committed); after a write error, close without raising."""
        if self.failed and self._reserve is not None:
            # give HDF5 back the reserved space so that it can flush its caches and close cleanly
            # (a failed close leaves h5py ids that crash the interpreter when collected)
            self._reserve.unlink(missing_ok=True)
            self._reserve = None
        if self.f.id.valid:
            try:
                self._release_claim()
                self.f.close()
            except (OSError, RuntimeError):
                if not self.failed:
                    raise
                # keep every handle referenced: never collected, never closed twice (HDF5 would crash)
                _UNCLOSABLE.append((self.f, self._handles))
        self._handles = {}
        self._row_writers = {}
        if self._reserve is not None:
            self._reserve.unlink(missing_ok=True)
            self._reserve = None


class ThreadedWriter:
    """Run a :class:`RecordingWriter` in a background thread with a bounded queue.

    Errors raised in the thread are re-raised in the caller at the next
    :meth:`put` or at :meth:`close`.
    """

    _STOP = object()

    def __init__(self, writer: RecordingWriter, queue_size: int = 2) -> None:
        self.writer = writer
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="neuroprobe-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is self._STOP:
                return
            if self.error is None:
                try:
                    self.writer.write(item)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                    self.error = err

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def put(self, result: BatchResult) -> None:
        """Queue a batch (blocks while ``queue_size`` batches are waiting)."""
        self._check()
        self.q.put(result)

    def close(self) -> None:
        """Wait for every queued batch to be written; re-raise a writer error."""
        self.q.put(self._STOP)
        self.thread.join()
        self._check()
