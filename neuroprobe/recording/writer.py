"""Stream responses into a recording file, batch by batch, from a writer thread.

:class:`RecordingWriter` owns the h5py file; :class:`ThreadedWriter` hands it
batches through a bounded queue so the model computes the next batch while the
previous one goes to disk.  Memory stays flat: at most ``queue_size`` batches wait.
"""
from __future__ import annotations

import errno
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd

from neuroprobe.errors import RecordingError
from neuroprobe.recording import schema
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


class RecordingWriter:
    """Create or resume a recording file and append batches to it."""

    def __init__(self, path: Path, file: h5py.File, streams: Sequence[str], tokens: bool, sites: Sequence[str]) -> None:
        self.path = path
        self.f = file
        self.streams = list(streams)
        self.tokens = tokens
        self.sites = list(sites)
        self.n_done = int(file.attrs.get("n_done", 0))
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
        """Create the file with every dataset allocated (written as ``complete=False``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = h5py.File(path, "w", track_order=True)
        except OSError as err:
            raise RecordingError(f"cannot create {path}: {err}.") from None
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
                        t.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
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
                    sg.create_dataset(schema.SITE_TOKENS, shape=(0, n_units), maxshape=(None, n_units), dtype=dtype,
                                      chunks=(trow, width), **comp)
                attrs = dict(module=site.module, direction=site.direction, kind=site.kind, stream=site.stream,
                             layout=site.layout, call=-1 if site.call is None else site.call, index=site.index,
                             n_heads=site.n_heads or 0, pooling=pooling_per_site[site.name], n_units=n_units)
                for k, v in attrs.items():
                    sg.attrs[k] = v
            f.flush()
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise
        return cls(path, f, streams, tokens, [s.name for s, _ in sites])

    @classmethod
    def resume(cls, path: Path, identity: dict[str, Any]) -> "RecordingWriter":
        """Open an interrupted recording; check it is the same job; drop uncommitted tokens."""
        try:
            f = h5py.File(path, "r+")
        except OSError as err:
            raise RecordingError(
                f"cannot resume {path}: it is not a readable recording ({str(err).splitlines()[0]}); use --overwrite to start over."
            ) from None
        if f.attrs.get("format") != schema.FORMAT:
            f.close()
            raise RecordingError(f"cannot resume {path}: it is not a neuroprobe recording; use --overwrite or another --out.")
        for key in schema.IDENTITY_KEYS:
            have, want = f.attrs.get(key), _str_attr(identity.get(key))
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
        w = cls(path, f, streams, tokens, sites)
        if tokens:  # drop rows written after the last commit
            for stream, count in w.n_tokens.items():
                t = f[f"{schema.TOKENS}/{stream}"]
                for name in ("token_ids", "stimulus", "position"):
                    t[name].resize((count,))
            for site in sites:
                sg = f[schema.site_path(site)]
                count = w.n_tokens[sg.attrs["stream"]]
                sg[schema.SITE_TOKENS].resize((count, sg[schema.SITE_TOKENS].shape[1]))
        return w

    # ------------------------------------------------------------------ write
    def write(self, r: BatchResult) -> None:
        """Write one batch and commit progress (data first, then counters, then flush)."""
        f = self.f
        sl = slice(r.offset, r.offset + r.n)
        try:
            for name, arr in r.pooled.items():
                f[schema.site_path(name)][schema.RESPONSES][sl] = arr
            new_counts = {}
            if self.tokens:
                for stream in self.streams:
                    t = f[f"{schema.TOKENS}/{stream}"]
                    info = r.stream_tokens.get(stream)
                    start = self.n_tokens[stream]
                    counts = info["counts"] if info is not None else np.zeros(r.n, dtype=np.int64)
                    ends = start + np.cumsum(counts)
                    t["offsets"][r.offset + 1 : r.offset + r.n + 1] = ends
                    total = int(ends[-1]) if len(ends) else start
                    if info is not None and total > start:
                        for key in ("token_ids", "stimulus", "position"):
                            t[key].resize((total,))
                            t[key][start:total] = info[key]
                    new_counts[stream] = total
                for name, arr in r.site_tokens.items():
                    sg = f[schema.site_path(name)]
                    stream = sg.attrs["stream"]
                    start, total = self.n_tokens[stream], new_counts[stream]
                    ds = sg[schema.SITE_TOKENS]
                    ds.resize((total, ds.shape[1]))
                    ds[start:total] = arr
            f.flush()
            # commit
            for stream, total in new_counts.items():
                f[f"{schema.TOKENS}/{stream}"].attrs["n_tokens"] = total
                self.n_tokens[stream] = total
            self.n_done = r.offset + r.n
            f.attrs["n_done"] = self.n_done
            f.flush()
        except OSError as err:
            if getattr(err, "errno", None) == errno.ENOSPC or "No space" in str(err):
                raise RecordingError(f"the disk is full while writing {self.path}; free space and rerun with --resume.") from None
            raise RecordingError(f"writing {self.path} failed ({str(err).splitlines()[0]}); rerun with --resume.") from None

    def finish(self) -> None:
        """Mark the recording complete."""
        self.f.attrs["complete"] = True
        self.f.flush()

    def close(self) -> None:
        """Close the file (progress stays committed)."""
        if self.f.id.valid:
            self.f.close()


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
