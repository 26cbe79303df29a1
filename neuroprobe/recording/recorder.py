"""The Recorder: show a subject a battery and stream every unit's responses to HDF5.

Electrodes pool each site's activations inside the hook (so full activations are
never kept), the pooled batch goes to a writer thread, and progress is committed
after every batch.  An interrupted recording is a valid file that ``resume=True``
continues; the resumed file equals an uninterrupted one bit for bit because
batches are cut at the same stimulus boundaries.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from neuroprobe import interrupts
from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError, RecordingError, option
from neuroprobe.recording import schema
from neuroprobe.recording.lock import WriterLock, real_path
from neuroprobe.recording.pooling import BatchPooler, MaskMismatch
from neuroprobe.recording.writer import BatchResult, RecordingWriter, ThreadedWriter, check_resumable
from neuroprobe.stimuli.battery import Battery
from neuroprobe.subjects.base import Site, Subject

DTYPES = {"float32": np.float32, "float16": np.float16}


def library_versions() -> dict[str, str]:
    """Versions of the libraries a recording depends on (provenance)."""
    import h5py
    import transformers

    from neuroprobe import __version__

    return {
        "neuroprobe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }


def with_feature_sites(subject: Subject, sites: list[Site]) -> list[Site]:
    """``sites`` plus the subject's attached feature sites (and each one's source site), in model order.

    Every SAE attached to the subject is recorded, beside the site it reads.
    """
    by_name = {s.name: s for s in sites}
    features = [s for s in sites if s.sae is not None] + [s for s in getattr(subject, "feature_sites", list)() if s.name not in by_name]
    if not features:
        return sites
    every = {s.name: s for s in subject.sites("all")}
    for f in features:
        by_name.setdefault(f.source, every[f.source])
        by_name[f.name] = f
    order = {n: i for i, (n, _) in enumerate(subject.model.named_modules())}
    return sorted(by_name.values(), key=lambda s: (order.get(s.module, 0), s.call or 0, s.name))


def default_output(subject: Subject, battery: Battery, montage: str) -> Path:
    """``recordings/<subject>[-random]_<battery>_<montage>.h5`` in the working directory."""
    return default_output_for(subject.name, subject.init, battery.name, montage)


def default_output_for(subject: str, init: str, battery: str, montage: str) -> Path:
    """:func:`default_output` from names (so the CLI can check the path before loading the model)."""
    tag = subject.replace(":", "_").replace("/", "_")
    if init == "random":
        tag += "-random"
    mont = montage.replace(",", "+").replace("*", "x").replace("/", "_")
    return Path("recordings") / f"{tag}_{battery}_{mont}.h5"


def check_output(path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output path before any work is done (the CLI calls this before loading the model).

    Raises
    ------
    RecordingError
        ``path`` is a directory, lies under a regular file, exists without
        ``resume``/``overwrite``, exists with ``resume`` but is no recording (not HDF5,
        and not a file that holds nothing), or its folder cannot be created or written.
    """
    if resume and overwrite:
        raise NeuroprobeError(f"give either {option('resume')} or {option('overwrite')}, not both.")
    if path.is_dir():
        raise RecordingError(f"{path} is a directory; give a file name for the recording (e.g. {path / 'recording.h5'}).")
    if path.exists() and not resume and not overwrite:
        raise RecordingError(f"{path} already exists; pass {option('resume')} to continue it or {option('overwrite')} to replace it.")
    if resume and path.is_file():
        check_resumable(path)  # a file that is no recording at all is refused before the model loads
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise RecordingError(f"cannot write {path}: {p} is a file, not a folder.")
            if not os.access(p, os.W_OK | os.X_OK) or _read_only_fs(p):
                raise RecordingError(f"cannot write {path}: {p} is not writable.")
            break


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Recorder:
    """Record a subject's responses to a battery.

    Parameters
    ----------
    subject
        A loaded :class:`~neuroprobe.subjects.base.Subject`.
    battery
        The stimuli.
    montage
        Which sites (``mlp``, ``resid``, ``attn``, ``all``, or glob patterns).
    pooling
        ``mean``, ``max``, ``first``, ``last`` or ``concept-token``.
    tokens
        Also keep per-token traces (ragged, padding never stored).
    dtype
        Storage dtype, ``float32`` or ``float16``.
    batch_size
        Stimuli per forward pass (also the commit unit).
    compression
        h5py compression filter (``gzip``, ``lzf``) or ``None``.
    quiet
        No progress bar.
    command
        Command line stored in provenance (the CLI passes ``sys.argv``).

    Examples
    --------
    >>> rec = Recorder(load_subject("minilm"), Battery.load("kinship")).run("rec.h5")  # doctest: +SKIP
    """

    def __init__(
        self,
        subject: Subject,
        battery: Battery,
        *,
        montage: str | Sequence[str] = "mlp",
        pooling: str = "mean",
        tokens: bool = False,
        dtype: str = "float32",
        batch_size: int = 32,
        compression: str | None = None,
        quiet: bool = False,
        command: str | None = None,
    ) -> None:
        if pooling not in schema.POOLINGS:
            raise NeuroprobeError(f"pooling {pooling!r} is not one of {', '.join(schema.POOLINGS)}.")
        if dtype not in DTYPES:
            raise NeuroprobeError(f"storage dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        if batch_size < 1:
            raise NeuroprobeError("batch size must be at least 1.")
        if compression not in (None, "gzip", "lzf"):
            raise NeuroprobeError(f"compression {compression!r} is not one of gzip, lzf.")
        subject.check_battery(battery)
        self.subject = subject
        self.battery = battery
        self.montage = montage if isinstance(montage, str) else ",".join(montage)
        self.sites: list[Site] = subject.sites(montage)
        if not self.sites:
            raise NeuroprobeError(f"montage {self.montage!r} selects no site; give mlp, resid, attn, all or site patterns.")
        self.sites = with_feature_sites(subject, self.sites)
        self.pooling = pooling
        self.tokens = tokens
        self.dtype = dtype
        self.np_dtype = DTYPES[dtype]
        self.torch_dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.compression = compression
        self.quiet = quiet
        self.command = command if command is not None else "python: neuroprobe.record(...)"
        self.split_by_modality = bool(getattr(subject, "split_by_modality", False))

    # ---------------------------------------------------------------- identity
    def identity(self) -> dict[str, Any]:
        """Attributes that must match for ``--resume``."""
        s = self.subject
        return {
            "subject": s.name,
            "checkpoint": s.checkpoint,
            "revision": s.revision,
            "init": s.init,
            "dtype": self.dtype,
            "battery": self.battery.name,
            "battery_hash": self.battery.content_hash(),
            "montage": self.montage,
            "pooling": self.pooling,
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "seed": s.seed,
            "sites_list": [x.name for x in self.sites],
            "saes": {x.name: x.sae.content_hash() for x in self.sites if x.sae is not None} or None,
        }

    def provenance(self) -> dict[str, Any]:
        """Every root attribute written at creation."""
        prov = self.identity()
        prov.update(
            format=schema.FORMAT,
            format_version=schema.FORMAT_VERSION,
            device=str(self.subject.device),
            n_stimuli=len(self.battery),
            library_versions=library_versions(),
            command=self.command,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            compression=self.compression or "none",
        )
        prov.update(getattr(self.subject, "provenance_notes", None) or {})  # e.g. config_source, tokenizer_source
        return prov

    # ------------------------------------------------------------------- run
    def run(self, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
            span: tuple[int, int] | None = None, attrs: dict[str, Any] | None = None) -> Path:
        """Record the whole battery into ``out``; return its path.

        ``span`` (``[start, stop)``, batch-aligned) records only those stimuli into a file
        that still spans the battery, and ``attrs`` adds root attributes: together they
        make a shard (:mod:`neuroprobe.recording.distributed`; which to record is decided by
        :func:`neuroprobe.recording.entry.run`).

        Raises
        ------
        RecordingError
            If ``out`` exists and neither ``resume`` nor ``overwrite`` is given, or
            the file to resume was made with other settings.
        """
        path = Path(out) if out is not None else default_output(self.subject, self.battery, self.montage)
        check_output(path, resume=resume, overwrite=overwrite)
        real = real_path(path)  # the file a symlink leads to is the one locked, resumed or replaced
        with WriterLock(real) as lock:
            self._run_locked(real, resume=resume, overwrite=overwrite, span=span, attrs=attrs, lock=lock)
        return path

    def _run_locked(self, path: Path, *, resume: bool, overwrite: bool, span: tuple[int, int] | None = None,
                    attrs: dict[str, Any] | None = None, lock: WriterLock | None = None) -> Path:
        """:meth:`run` while holding the path's writer lock (``lock``, which claims each file written).

        A new recording is created under a temporary name beside ``path`` and moved
        into place once its layout is on disk (so ``path`` is never a stub).  With
        ``overwrite``, the new recording stays under its temporary name until it is
        complete and only then replaces ``path`` atomically: a failed or interrupted
        overwrite leaves the old recording untouched (and is not resumable).
        """
        check_output(path, resume=resume, overwrite=overwrite)  # again, now that no other writer can race us
        if lock is not None and resume and path.is_file():
            lock.claim(path)  # before anything reads it: another name of it (a hard link) may be in use
        for stale in path.parent.glob(f".{path.name}.*"):  # temporary files left by killed writers of this path
            if stale.name.endswith((".partial", ".reserve")):
                stale.unlink(missing_ok=True)
        replace_at_end = False
        if path.exists() and resume and check_resumable(path, self.identity()):  # False: it holds nothing
            writer = RecordingWriter.resume(path, self.identity())
        else:
            replace_at_end = path.exists() and not resume  # overwrite; a stub to resume is simply replaced
            counts = self._unit_counts()
            pooling_per_site = {s.name: self._site_pooling(s) for s in self.sites}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            writer = RecordingWriter.create(
                tmp, {**self.provenance(), **(attrs or {})}, self.battery.table, [(s, counts[s.name]) for s in self.sites],
                pooling_per_site=pooling_per_site, tokens=self.tokens, dtype=self.dtype,
                compression=self.compression, chunk_rows=self.batch_size,
            )
            if lock is not None:
                try:
                    lock.claim(writer.path)  # the inode keeps the claim when it is moved into place
                except BaseException:
                    writer.close()
                    writer.path.unlink(missing_ok=True)
                    raise
            if not replace_at_end:
                self._move(writer, path)
        try:
            self._record(writer, span)
        except BaseException:
            if replace_at_end:
                writer.close()
                writer.path.unlink(missing_ok=True)
            raise
        if replace_at_end:
            self._move(writer, path)
        return path

    @staticmethod
    def _move(writer: RecordingWriter, path: Path) -> None:
        """Rename the writer's file to ``path`` (atomic on one file system; the open handle stays valid)."""
        try:
            os.replace(writer.path, path)
        except OSError as err:
            writer.close()
            writer.path.unlink(missing_ok=True)
            raise RecordingError(f"cannot move the new recording into place at {path} ({err.strerror}).") from None
        writer.path = path

    def _record(self, writer: RecordingWriter, span: tuple[int, int] | None = None) -> None:
        """Stream every uncommitted batch (of ``span``) through ``writer``, then mark it complete and close it."""
        lo, hi = span if span is not None else (0, len(self.battery))
        start = max(writer.n_done, lo)
        threaded = ThreadedWriter(writer)
        bar = tqdm(total=hi - lo, initial=start - lo, unit="stim", desc=f"record {self.subject.name}",
                   disable=self.quiet, dynamic_ncols=True)
        try:
            # one set of electrodes for the whole recording (implanting them costs ~3 ms, a few % of a batch)
            with Electrodes(self.subject.model, self.sites, on_read=self._dispatch):
                for offset in range(start, hi, self.batch_size):
                    rows = self.battery.table.iloc[offset : min(offset + self.batch_size, hi)]
                    threaded.put(self._compute(rows, offset))
                    bar.update(len(rows))
            threaded.close()
            writer.finish()
        except KeyboardInterrupt:
            threaded.abort()  # Ctrl-C: finish the batch being written, drop the queued ones (resume redoes them)
            raise
        except BaseException:
            try:
                threaded.close()  # batches already computed are still committed
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                threaded.abort()
            raise
        finally:
            bar.close()
            writer.close()

    # --------------------------------------------------------------- helpers
    _reader: Any = None

    def _forward(self, batch: Any) -> None:
        """One forward pass without autograd (run through :func:`neuroprobe.interrupts.run_forward`)."""
        with torch.inference_mode():
            self.subject.forward(batch)

    def _dispatch(self, site: Site, x: torch.Tensor) -> None:
        """The electrodes' reader: hand a site's activations to the batch being computed (none outside a forward)."""
        if self._reader is not None:
            self._reader(site, x)

    def _site_pooling(self, site: Site) -> str:
        if self.pooling == "concept-token" and site.stream not in self._concept_streams():
            return "mean"
        return self.pooling

    def _concept_streams(self) -> set[str]:
        cached = getattr(self, "_cstreams", None)
        if cached is None:
            cached = set()
            for rows in self._groups(self.battery.table.iloc[: min(len(self.battery), self.batch_size)]):
                cached |= set(self.subject.encode(rows, self.battery).concept_masks)
            self._cstreams = cached
        return cached

    def _groups(self, rows: pd.DataFrame) -> list[pd.DataFrame]:
        if not self.split_by_modality:
            return [rows]
        return [g for _, g in rows.groupby("modality", sort=False)]

    def _unit_counts(self) -> dict[str, int]:
        """Units per site, from one stimulus of each modality in the battery."""
        counts: dict[str, int] = {}
        probes = self.battery.table.groupby("modality", sort=False).head(1)
        groups = [probes.iloc[[i]] for i in range(len(probes))] if self.split_by_modality else [probes]

        def on_read(site: Site, x: torch.Tensor) -> None:
            counts[site.name] = int(x.shape[-1])

        for rows in groups:
            batch = self.subject.encode(rows, self.battery)
            with Electrodes(self.subject.model, self.sites, on_read=on_read):
                interrupts.run_forward(lambda: self._forward(batch))
        missing = [s.name for s in self.sites if s.name not in counts]
        if missing:
            from neuroprobe.subjects.base import suggest_sites

            fired = [s for s in self.sites if s.name in counts]
            raise NeuroprobeError(
                f"site(s) {', '.join(missing[:5])} never fired for any stimulus of battery {self.battery.name!r} "
                f"({'+'.join(sorted(self.battery.table['modality'].unique()))} stimuli); "
                f"{suggest_sites(fired, self.montage)}."
            )
        return counts

    def _compute(self, rows: pd.DataFrame, offset: int) -> BatchResult:
        n = len(rows)
        pooled = {s.name: np.full((n, 0), np.nan, dtype=self.np_dtype) for s in self.sites}
        position_of = {idx: i for i, idx in enumerate(rows.index)}
        per_stim_tokens: dict[str, list[dict[str, np.ndarray]]] = {}
        per_stim_site: dict[str, list[np.ndarray | None]] = {}
        groups = self._groups(rows)
        direct_tokens: dict[str, dict[str, np.ndarray]] = {}
        direct_sites: dict[str, np.ndarray] = {}
        for group in groups:
            rows_pos = np.array([position_of[i] for i in group.index])
            batch = self.subject.encode(group, self.battery)
            results: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

            pooler = BatchPooler(self.pooling, batch.masks, batch.concept_masks)

            def on_read(site: Site, x: torch.Tensor, _pooler=pooler, _results=results) -> None:
                try:
                    p = _pooler.pool(x, site.stream).to(self.torch_dtype).cpu().numpy()
                    toks = _pooler.tokens(x, site.stream).to(self.torch_dtype).cpu().numpy() if self.tokens else None
                except MaskMismatch as err:
                    raise MaskMismatch(f"site {site.name}: {err}") from None
                _results[site.name] = (p, toks)

            self._reader = on_read
            try:
                interrupts.run_forward(lambda: self._forward(batch))
            finally:
                self._reader = None
            for site in self.sites:
                if site.name not in results:
                    continue
                p, toks = results[site.name]
                if pooled[site.name].shape[1] == 0:
                    pooled[site.name] = np.full((n, p.shape[1]), np.nan, dtype=self.np_dtype)
                pooled[site.name][rows_pos] = p
            if self.tokens and len(groups) == 1:
                # one group: the rows are the batch in order, so the traces are already in place
                for stream, mask in batch.masks.items():
                    m = mask.cpu()
                    counts = m.sum(1).numpy().astype(np.int64)
                    direct_tokens[stream] = {
                        "counts": counts,
                        "token_ids": batch.token_ids[stream].cpu()[m].numpy().astype(np.int64),
                        "position": torch.arange(m.shape[1]).expand_as(m)[m].numpy().astype(np.int64),
                        "stimulus": np.repeat(np.arange(offset, offset + n, dtype=np.int64), counts),
                    }
                for site in self.sites:
                    if site.name in results:
                        direct_sites[site.name] = results[site.name][1]
            elif self.tokens:
                for stream, mask in batch.masks.items():
                    m = mask.cpu()
                    counts = m.sum(1).numpy().astype(np.int64)
                    bounds = np.concatenate([[0], np.cumsum(counts)])
                    ids = batch.token_ids[stream].cpu()[m].numpy().astype(np.int64)
                    pos = torch.arange(m.shape[1]).expand_as(m)[m].numpy().astype(np.int64)
                    lst = per_stim_tokens.setdefault(stream, [None] * n)  # type: ignore[list-item]
                    for j, rp in enumerate(rows_pos):
                        a, b = bounds[j], bounds[j + 1]
                        lst[rp] = {"token_ids": ids[a:b], "position": pos[a:b], "count": counts[j]}
                for site in self.sites:
                    if site.name not in results:
                        continue
                    toks = results[site.name][1]
                    counts = batch.masks[site.stream].sum(1).cpu().numpy()
                    bounds = np.concatenate([[0], np.cumsum(counts)])
                    lst2 = per_stim_site.setdefault(site.name, [None] * n)
                    for j, rp in enumerate(rows_pos):
                        lst2[rp] = toks[bounds[j] : bounds[j + 1]]
        result = BatchResult(offset=offset, n=n, pooled=pooled)
        if self.tokens and len(groups) == 1:
            result.stream_tokens = direct_tokens
            for site in self.sites:
                arr = direct_sites.get(site.name)
                if arr is None:  # did not fire for this batch
                    c = int(direct_tokens.get(site.stream, {"counts": np.zeros(1, np.int64)})["counts"].sum())
                    arr = np.full((c, self._width(site, pooled)), np.nan, dtype=self.np_dtype)
                result.site_tokens[site.name] = arr
        elif self.tokens:
            for stream, lst in per_stim_tokens.items():
                counts = np.array([0 if d is None else d["count"] for d in lst], dtype=np.int64)
                ids = [d["token_ids"] for d in lst if d is not None]
                pos = [d["position"] for d in lst if d is not None]
                stim = [np.full(int(c), offset + i, dtype=np.int64) for i, c in enumerate(counts) if c]
                result.stream_tokens[stream] = {
                    "counts": counts,
                    "token_ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
                    "position": np.concatenate(pos) if pos else np.zeros(0, np.int64),
                    "stimulus": np.concatenate(stim) if stim else np.zeros(0, np.int64),
                }
            for site in self.sites:
                lst2 = per_stim_site.get(site.name)
                stream_counts = result.stream_tokens.get(site.stream, {}).get("counts")
                parts = []
                for i in range(n):
                    c = 0 if stream_counts is None else int(stream_counts[i])
                    v = None if lst2 is None else lst2[i]
                    if v is None:
                        width = self._width(site, pooled)
                        v = np.full((c, width), np.nan, dtype=self.np_dtype)
                    parts.append(v)
                result.site_tokens[site.name] = np.concatenate(parts) if parts else np.zeros((0, self._width(site, pooled)), self.np_dtype)
        for site in self.sites:  # sites that did not fire for this batch: all NaN
            if pooled[site.name].shape[1] == 0:
                pooled[site.name] = np.full((n, self._width(site, pooled)), np.nan, dtype=self.np_dtype)
        return result

    def _width(self, site: Site, pooled: dict[str, np.ndarray]) -> int:
        w = pooled[site.name].shape[1]
        if w:
            return w
        if not hasattr(self, "_counts_cache"):
            self._counts_cache = self._unit_counts()
        return self._counts_cache[site.name]

