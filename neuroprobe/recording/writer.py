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

from neuroprobe.errors import RecordingError, option
# free space and fallocate are shared with the other writers of output files (neuroprobe/output.py)
from neuroprobe.output import LIBC as _LIBC
from neuroprobe.output import fallocate_keep_size as _fallocate_keep_size
from neuroprobe.output import UNCLOSABLE, free_bytes, release_past_end
from neuroprobe.recording import chunkio, schema, superblock
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

#: Files HDF5 failed to close after a write error (kept referenced on purpose; see ``close``).  The list is
#: shared with the other writers (neuroprobe/output.py): the CLI then skips HDF5's exit handler, which would crash.
_UNCLOSABLE = UNCLOSABLE

#: Free space kept in reserve beyond twice a batch's size (HDF5 metadata, index growth).
RESERVE_BYTES = 1 << 20


def disk_full_message(path: Path) -> str:
    """The one sentence for a full disk."""
    return (f"the disk is full: {path} cannot grow any further; its committed stimuli are safe — "
            f"free some space and rerun with {option('resume')}.")


def os_error(err: BaseException, path: Path, doing: str) -> RecordingError:
    """Turn an ``OSError`` (or h5py's ``RuntimeError``) from the file system or HDF5 into one sentence."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if getattr(err, "errno", None) == errno.ENOSPC or "No space" in text or "file write failed" in text:
        return RecordingError(disk_full_message(path))
    reason = err.strerror if getattr(err, "strerror", None) else text
    return RecordingError(f"cannot {doing} {path} ({reason}).")


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


def clear_status_flags(path: Path) -> bool:
    """Clear the "open for (SWMR) write" flags a killed writer left in the superblock (``h5clear -s``).

    Only call this while holding the recording's :class:`~neuroprobe.recording.lock.WriterLock`
    (so no live writer owns the flags).  Returns whether anything was changed.
    Superblock versions 2 and 3 (the only ones with these flags) keep them in byte
    11 and end with a lookup3 checksum of the preceding bytes.
    """
    sb = superblock.read(path)
    if sb is None or sb.flags == 0:
        return False  # nothing to clear, or not a superblock we understand: leave it to HDF5's own error
    block = bytearray(sb.block)
    block[11] = 0
    with open(path, "r+b") as fh:
        fh.write(bytes(block) + struct.pack("<I", superblock.lookup3(bytes(block))))
        fh.flush()
        os.fsync(fh.fileno())
    return True


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: How much of a refused file's differing settings a message shows.
_SHOWN_DIFFERENCES, _SHOWN_CHARS = 4, 60


def _superblock_size(head: bytes) -> int:
    """Bytes of the HDF5 superblock that ``head`` (a file's first bytes) starts with (0 if unknown)."""
    if len(head) < 16:
        return 1 << 30  # not even the superblock's fixed fields: a superblock cut short
    version = head[8]
    if version in (0, 1):  # fixed fields, 4 addresses, the root group's symbol table entry
        o = head[13]
        return 24 + (4 if version == 1 else 0) + 4 * o + (2 * o + 24)
    if version in (2, 3):  # fixed fields, 4 addresses, checksum
        return 12 + 4 * head[9] + 4
    return 0


def holds_nothing(path: Path) -> bool:
    """Whether the file at ``path`` holds no data at all, so ``--resume`` may start it afresh.

    True for an empty file, the HDF5 signature cut short, or an HDF5 superblock with
    nothing after it (no group, no dataset, no attribute can be in it): what a crash of
    an older neuroprobe left while creating a recording in place.  Anything else is
    somebody's data and is never replaced by ``--resume``.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    if size == 0:
        return True
    if size < len(HDF5_SIGNATURE):
        return HDF5_SIGNATURE.startswith(head)
    return head.startswith(HDF5_SIGNATURE) and size <= _superblock_size(head)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check_resumable(path: Path, identity: dict[str, Any] | None = None) -> bool:
    """Whether ``--resume`` may continue ``path``; it reads the file and never changes a byte of it.

    Returns ``False`` for a file that holds nothing (:func:`holds_nothing`: start it
    afresh) and ``True`` for an incomplete neuroprobe recording made with ``identity``
    (every key of :data:`~neuroprobe.recording.schema.IDENTITY_KEYS`; ``None`` checks
    only that it is a neuroprobe recording).

    Raises
    ------
    RecordingError
        ``path`` is not HDF5, not readable, not a neuroprobe recording, a recording of
        other settings (the message names each difference), or complete.
    """
    if holds_nothing(path):
        return False
    left = f"it was left as it is; give another output path, or {option('overwrite')} to replace it."
    try:
        with open(path, "rb") as fh:
            is_hdf5 = fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError as err:
        raise RecordingError(f"cannot resume {path}: cannot read it ({err.strerror}).") from None
    if not is_hdf5:
        raise RecordingError(f"cannot resume {path}: it is not a neuroprobe recording (not an HDF5 file); {left}")
    if identity is None:
        return True
    try:  # read-only; a file a killed SWMR writer left flagged opens as a SWMR reader
        try:
            f = h5py.File(path, "r")
        except OSError:
            f = h5py.File(path, "r", swmr=True)
    except OSError as err:
        raise RecordingError(
            f"cannot resume {path}: it is not a readable recording ({str(err).splitlines()[0]}); {left}"
        ) from None
    with f:
        attrs = f.attrs
        if _attr(attrs.get("format")) != schema.FORMAT:
            raise RecordingError(
                f"cannot resume {path}: it is not a neuroprobe recording (an HDF5 file without "
                f"format={schema.FORMAT}); {left}"
            )
        differences = []
        for key in schema.IDENTITY_KEYS:
            default = "" if key in schema.OPTIONAL_IDENTITY_KEYS else None  # absent in files from before the key
            have, want = _attr(attrs.get(key, default)), _str_attr(identity.get(key))
            if have != want:
                differences.append(f"{key}={_short(have)} (not {_short(want)})")
        if differences:
            more = len(differences) - _SHOWN_DIFFERENCES
            shown = ", ".join(differences[:_SHOWN_DIFFERENCES]) + (f" and {more} more" if more > 0 else "")
            raise RecordingError(
                f"cannot resume {path}: it was recorded with {shown}; it was left as it is — resume with the "
                f"same settings, give another output path, or {option('overwrite')} to replace it."
            )
        if bool(attrs.get("complete", False)):
            raise RecordingError(f"{path} is already complete; nothing to resume (use {option('overwrite')} to record again).")
        if schema.SITES not in f or "tokens" not in attrs or "n_done" not in attrs:
            raise RecordingError(f"cannot resume {path}: its layout is incomplete (no /sites or progress); {left}")
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

        Hold the recording's :class:`~neuroprobe.recording.lock.WriterLock` (with the file
        claimed) while calling this.  Nothing is written to a file that
        :func:`check_resumable` refuses.
        """
        if not check_resumable(path, identity):
            raise RecordingError(f"cannot resume {path}: it holds nothing yet; record it afresh.")
        try:
            clear_status_flags(path)
            f = h5py.File(path, "r+", libver=LIBVER)
        except OSError as err:
            raise RecordingError(
                f"cannot resume {path}: it is not a readable recording ({str(err).splitlines()[0]}); use {option('overwrite')} to start over."
            ) from None
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
            release_past_end(fd)  # a punch alone frees nothing past the end of the file on ext4

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
        self._dropping = False
        self.thread = threading.Thread(target=self._run, name="neuroprobe-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is self._STOP:
                return
            if self.error is None and not self._dropping:
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

    def abort(self) -> None:
        """Stop after the batch being written (after Ctrl-C): queued batches are dropped, ``--resume`` redoes them.

        Waits for the thread whatever happens meanwhile (a further Ctrl-C included):
        the file must not be closed under a write.
        """
        self._dropping = True
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.q.put(self._STOP)  # room: the queue was just emptied and only this thread puts
        while self.thread.is_alive():
            try:
                self.thread.join()
            except KeyboardInterrupt:
                continue
