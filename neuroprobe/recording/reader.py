"""Read a recording lazily: ``open_recording(path)``.

Responses stay on disk (h5py datasets): slicing a site reads only that slice, so a
recording larger than memory can be analysed chunk by chunk.

Readers open recording files through :func:`open_h5` and check them with
:func:`check_storage` (``open_recording`` does both), so a damaged file fails at once,
in one sentence:

- A finished file is opened as plain read-only HDF5, which checks that the file is as
  long as its superblock says and reads each piece of metadata once.  Only a file
  marked "open for write" — being written now (SWMR), or left so by a killed writer —
  is opened for SWMR reading.  HDF5 retries a SWMR read whose metadata checksum fails
  (a torn read of a block the writer is rewriting), sleeping 1 ns, 2 ns, 4 ns, ...
  between its 100 default attempts: on a damaged block that is 2**100 ns, a hang.
  :func:`open_h5` bounds the attempts (:data:`SWMR_READ_ATTEMPTS`: a damaged file
  opened this way fails in about a second).
- A SWMR read skips HDF5's end-of-file check, and a truncated file reads as zeros
  where its data should be; :func:`check_storage` checks that every chunk holding
  committed data lies inside the file (committed: rows below ``n_done``, token rows
  below ``n_tokens``), which also holds while a writer is still growing the file.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from neuroprobe.errors import RecordingError
from neuroprobe.recording import schema, superblock


#: Metadata read attempts of a SWMR read: HDF5 sleeps 2**(k-1) ns after the k-th failed
#: attempt, so 30 attempts retry a torn read for up to ~0.5 s (HDF5's default, 100, never ends).
SWMR_READ_ATTEMPTS = 30

_SWMR_DRIVER = "neuroprobe-swmr-read"


@lru_cache(maxsize=1)
def _read_attempts_setter() -> Callable[[int, int], int] | None:
    """``H5Pset_metadata_read_attempts`` of the libhdf5 that h5py uses (h5py does not wrap it), or ``None``.

    The candidate libraries are those mapped into this process (or bundled beside
    h5py); the right one is recognised by setting a property through it and reading
    it back through h5py.
    """
    names: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            names = [line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6]
    except OSError:  # not Linux: the libraries bundled with h5py's wheel
        here = Path(h5py.__file__).parent
        names = [str(p) for p in (*here.parent.glob("h5py.libs/libhdf5*"), *here.glob(".dylibs/libhdf5*"))]
    seen: set[str] = set()
    for name in names:
        base = os.path.basename(name)
        if name in seen or not base.startswith("libhdf5") or "_hl" in base or not (".so" in base or base.endswith(".dylib")):
            continue
        seen.add(name)
        try:
            lib = ctypes.CDLL(name)
            setter, probe = lib.H5Pset_metadata_read_attempts, lib.H5Pset_meta_block_size
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
        probe.argtypes, probe.restype = [ctypes.c_int64, ctypes.c_uint64], ctypes.c_int
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        if probe(fapl.id, 12345) >= 0 and fapl.get_meta_block_size() == 12345:
            return setter
    return None


def _swmr_read_fapl(plist: h5py.h5p.PropFAID, **_: Any) -> None:
    """h5py driver hook: the default (sec2) driver with bounded metadata read attempts."""
    plist.set_fapl_sec2()
    setter = _read_attempts_setter()
    if setter is not None:
        setter(plist.id, SWMR_READ_ATTEMPTS)


def _open_failure(path: Path, err: BaseException) -> RecordingError:
    """One sentence for a file HDF5 refused to open."""
    text = str(err)
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if m:
        return RecordingError(f"{path} is truncated: it has {int(m[1]):,} bytes where its HDF5 superblock says "
                              f"{int(m[2]):,}; it cannot be read (copy or record it again).")
    if "checksum" in text:
        return _damaged(path, err)
    return RecordingError(f"{path} cannot be opened as HDF5 ({text.splitlines()[0] if text else type(err).__name__}).")


def _damaged(path: Path, err: BaseException) -> RecordingError:
    """One sentence for a file whose HDF5 structure fails while it is read."""
    text = str(err).splitlines()[0] if str(err) else ""
    sb = superblock.read(path)
    eof = sb.eof if sb is not None else None
    size = path.stat().st_size if path.exists() else None
    short = f"it has {size:,} bytes where its HDF5 superblock says {eof:,}, and " if eof and size is not None and size < eof else ""
    if "checksum" in text:
        return RecordingError(f"{path} is {'truncated' if short else 'damaged'}: {short}a block of its HDF5 metadata "
                              f"fails its checksum; it cannot be read (copy or record it again).")
    if short:
        return RecordingError(f"{path} is truncated: {short}reading it fails ({type(err).__name__}: {text}).")
    return RecordingError(f"{path} is a damaged recording ({type(err).__name__}: {text}).")


def open_h5(path: str | Path) -> h5py.File:
    """Open a recording file (or shard) for reading; fail fast and in one sentence if it is damaged.

    A finished file opens as plain read-only HDF5 (which checks its length and reads
    metadata once); a file that is being written, or was left open by a killed
    writer, opens for SWMR reading with at most :data:`SWMR_READ_ATTEMPTS` metadata
    read attempts.  Pair it with :func:`check_storage`.

    Raises
    ------
    RecordingError
        If HDF5 cannot open the file (naming the file, and its two lengths if it is truncated).
    """
    path = Path(path)
    sb = superblock.read(path)
    # a live SWMR writer keeps the superblock's status flags set, and a killed one leaves them behind: such a
    # file opens only for SWMR reading, and its superblock's length may run ahead of the file
    if sb is None or sb.flags == 0:
        try:
            return h5py.File(path, "r")
        except OSError as err:
            again = superblock.read(path) if sb is None else sb  # the first read may have met a writer mid-update
            if "already open for write" not in str(err) and (again is None or again.flags == 0):
                raise _open_failure(path, err) from None
    if _SWMR_DRIVER not in h5py.registered_drivers():
        h5py.register_driver(_SWMR_DRIVER, _swmr_read_fapl)
    try:
        return h5py.File(path, "r", swmr=True, driver=_SWMR_DRIVER)
    except OSError as err:
        raise _open_failure(path, err) from None


def _committed_rows(f: h5py.File, name: str, ds: h5py.Dataset) -> int:
    """Rows of ``ds`` (along its first axis) that hold committed data."""
    parts = name.strip("/").split("/")
    try:
        if parts[0] == schema.SITES and parts[-1] == schema.RESPONSES:
            return min(ds.shape[0], int(f.attrs.get("n_done", ds.shape[0])))
        if parts[0] == schema.SITES and parts[-1] == schema.SITE_TOKENS:
            stream = _decode(f["/".join(parts[:-1])].attrs["stream"])
            return min(ds.shape[0], int(f[f"{schema.TOKENS}/{stream}"].attrs["n_tokens"]))
        if parts[0] == schema.TOKENS and parts[-1] != "offsets":
            return min(ds.shape[0], int(f["/".join(parts[:-1])].attrs["n_tokens"]))
    except (KeyError, TypeError, ValueError):
        pass
    return ds.shape[0]


def _chunks(ds: h5py.Dataset) -> list[tuple[int, int, int]]:
    """``(first row, byte offset, bytes)`` of every allocated chunk of ``ds``."""
    out: list[tuple[int, int, int]] = []
    sid = ds.id
    if hasattr(sid, "chunk_iter"):
        sid.chunk_iter(lambda c: out.append((c.chunk_offset[0], c.byte_offset, c.size)))
    else:  # older HDF5: one lookup per chunk
        for i in range(sid.get_num_chunks()):
            c = sid.get_chunk_info(i)
            out.append((c.chunk_offset[0], c.byte_offset, c.size))
    return [c for c in out if c[1] is not None]


def _data_end(f: h5py.File, name: str, ds: h5py.Dataset) -> int:
    """The byte just past the last committed data of ``ds`` in its file (0 if it has none stored there)."""
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        return 0 if offset is None else offset + ds.id.get_storage_size()
    if layout != h5py.h5d.CHUNKED or ds.ndim == 0:
        return 0  # compact (inside its object header) or virtual (its sources are checked on their own)
    limit = _committed_rows(f, name, ds)
    rows = ds.chunks[0]
    filtered = dcpl.get_nfilters() > 0
    end = 0
    for first, offset, size in _chunks(ds):
        if first >= limit:
            continue
        if filtered or first + rows <= limit:
            end = max(end, offset + size)
        else:  # rows first .. limit of an unfiltered chunk: its leading bytes (rows are stored row-major)
            end = max(end, offset + (limit - first) * (size // rows))
    return end


def _file_size(f: h5py.File, path: Path) -> int:
    try:
        return os.fstat(f.id.get_vfd_handle()).st_size
    except Exception:  # noqa: BLE001 - a driver without a descriptor
        return path.stat().st_size


def check_storage(f: h5py.File, path: str | Path) -> None:
    """Refuse a file that ends before data it has committed (a truncated copy).

    Every stored dataset is checked: each chunk that holds committed rows (every row,
    except rows at or past ``n_done`` of responses and past ``n_tokens`` of token
    rows, which a live writer may not have written yet) must lie inside the file.
    A live writer only ever grows the file, and it writes data before the metadata
    that points to it, so the file's size is read again after each index: a live
    recording passes.  Reading every chunk index also surfaces damaged metadata here.

    Raises
    ------
    RecordingError
        Naming the file, the dataset and the two lengths.
    """
    path = Path(path)
    datasets: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    for name, ds in datasets:
        end = _data_end(f, name, ds)
        if end and end > (size := _file_size(f, path)):
            raise RecordingError(f"{path} is truncated: /{name} has data up to byte {end:,} but the file ends at "
                                 f"byte {size:,}; it cannot be read (copy or record it again).")


def raw_attr(f: h5py.File | h5py.Group, key: str, default: Any = None) -> Any:
    """A root (or group) attribute as a plain Python value: text decoded, numpy scalars unwrapped, JSON left as text."""
    v = f.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def is_virtual(f: h5py.File) -> bool:
    """Whether an open recording is a virtual recording over shards (see :mod:`neuroprobe.recording.shards`).

    Decided by the data, not only the ``virtual`` attribute, which a file derived from
    a virtual recording (e.g. a rotated copy) may have inherited.
    """
    if not bool(raw_attr(f, "virtual", False)) or schema.SITES not in f:
        return False
    for g in f[schema.SITES].values():
        return bool(schema.RESPONSES in g and g[schema.RESPONSES].is_virtual)
    return False


def listed_shards(f: h5py.File, path: Path) -> list[Path]:
    """The shard files a virtual recording maps (resolved beside ``path``)."""
    rows = json.loads(raw_attr(f, "shards", "[]"))
    return [(Path(path).parent / r["file"]) for r in rows]


def check_sources(f: h5py.File, path: Path) -> None:
    """Refuse to read a virtual recording whose shard files are not where it says, or are truncated.

    (HDF5 would silently read fill values instead.)
    """
    if not is_virtual(f):
        return
    for p in listed_shards(f, path):
        if not p.exists():
            raise RecordingError(
                f"{path} is a virtual recording and its shard {p} is missing; keep its .shards folder beside it "
                f"(or make one self-contained file with `neuroprobe merge`)."
            )
        with open_h5(p) as shard:  # a truncated shard would read as zeros through the virtual datasets
            check_storage(shard, p)


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply to be ours
            return v
    return v


class Recording:
    """An open recording file.

    Attributes
    ----------
    path
        The file.
    attrs
        Provenance (root attributes), decoded.
    stimuli
        One row per stimulus (DataFrame; ``index`` is the row in every response array).
    sites
        One row per site: name, module, direction, kind, stream, n_units, pooling.
    units
        One row per unit of every site: site, unit, kind, head (attention sites).

    Examples
    --------
    >>> rec = open_recording("recordings/minilm_kinship_mlp.h5")  # doctest: +SKIP
    >>> rec.responses("encoder.layer.3.mlp")[:10, :5]            # reads 10x5 values  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise RecordingError(f"{self.path} does not exist.")
        if self.path.is_dir():
            raise RecordingError(f"{self.path} is a directory, not a recording file.")
        self._f = open_h5(self.path)  # a recording that is still being written opens too (SWMR)
        try:
            self.attrs  # noqa: B018 - read every attribute now: a damaged one must not pass for a missing one
            self._check_layout()
            check_storage(self._f, self.path)
            self.stimuli  # noqa: B018 - read now: a damaged table fails here, not in the middle of an analysis
        except RecordingError:
            self._f.close()
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file must still end in one sentence
            self._f.close()
            raise _damaged(self.path, err) from None

    def _check_layout(self) -> None:
        """Check the parts every reader relies on, so a damaged file fails here in one sentence."""
        f, p = self._f, self.path
        if _decode(f.attrs.get("format")) != schema.FORMAT:
            raise RecordingError(f"{p} is not a neuroprobe recording.")
        raw = _decode(f.attrs.get("format_version", 0))
        try:
            version = int(raw)
            if isinstance(raw, float) and raw != version:
                raise ValueError
        except (TypeError, ValueError):
            raise RecordingError(f"{p} has a malformed format_version {raw!r}; it is not a readable recording.") from None
        if version > schema.FORMAT_VERSION:
            raise RecordingError(
                f"{p} uses recording format {version}, newer than this neuroprobe reads "
                f"({schema.FORMAT_VERSION}); upgrade neuroprobe."
            )
        for group in (schema.STIMULI, schema.SITES):
            if group not in f or not isinstance(f[group], h5py.Group):
                raise RecordingError(f"{p} has no /{group} group; it is not a complete recording file.")
        stim = f[schema.STIMULI]
        missing = [c for c in schema.STIMULUS_COLUMNS if c not in stim]
        if missing:
            raise RecordingError(f"{p} lacks the stimulus column(s) {', '.join(missing)} in /{schema.STIMULI}.")
        lengths = {name: ds.shape[0] if ds.ndim == 1 else -1 for name, ds in stim.items() if isinstance(ds, h5py.Dataset)}
        n = lengths["index"]
        bad = [k for k, v in lengths.items() if v != n]
        if bad:
            raise RecordingError(f"{p}: stimulus column {bad[0]!r} has {lengths[bad[0]]} rows, not {n} like 'index'.")
        if len(f[schema.SITES]) == 0:
            raise RecordingError(f"{p} has no sites; record it again with a montage that selects some.")
        for name, g in f[schema.SITES].items():
            absent = [a for a in schema.SITE_ATTRS if a not in g.attrs]
            if absent:
                raise RecordingError(f"{p}: site {name!r} lacks the attribute(s) {', '.join(absent)}.")
            if schema.RESPONSES not in g:
                raise RecordingError(f"{p}: site {name!r} has no responses.")
            shape = g[schema.RESPONSES].shape
            if len(shape) != 2 or shape[0] != n or shape[1] != int(_decode(g.attrs["n_units"])):
                raise RecordingError(
                    f"{p}: site {name!r} holds responses of shape {shape}, but the recording has {n} stimuli "
                    f"and the site {_decode(g.attrs['n_units'])} units."
                )
        done = _decode(f.attrs.get("n_done", 0))
        if not isinstance(done, (int, np.integer)) or not 0 <= int(done) <= n:
            raise RecordingError(f"{p} has a malformed n_done {done!r} for {n} stimuli.")
        check_sources(f, p)  # a virtual recording needs its shards (HDF5 alone would read fill values)

    # -------------------------------------------------------------- metadata
    @cached_property
    def attrs(self) -> dict[str, Any]:
        return {k: _decode(v) for k, v in self._f.attrs.items()}

    @property
    def complete(self) -> bool:
        """Whether every stimulus was recorded."""
        return bool(self._f.attrs.get("complete", False))

    @property
    def file_size(self) -> int:
        """Bytes of the open file (of this file, even if its path now leads to another)."""
        return _file_size(self._f, self.path)

    @property
    def n_done(self) -> int:
        """Stimuli committed so far (equals ``len(stimuli)`` when complete)."""
        return int(self._f.attrs.get("n_done", 0))

    @property
    def n_stimuli(self) -> int:
        """Stimuli in the battery (rows of every response array)."""
        return int(self._f[schema.STIMULI]["index"].shape[0])

    def require_complete(self, allow_incomplete: bool = False) -> str | None:
        """Refuse an incomplete recording unless ``allow_incomplete``; then return a one-line note.

        Raises
        ------
        RecordingError
            If the recording is incomplete and ``allow_incomplete`` is false.
        """
        if self.complete:
            return None
        cover = f"it covers {self.n_done} of {self.n_stimuli} stimuli"
        if not allow_incomplete:
            raise RecordingError(f"{self.path} is an incomplete recording ({cover}); finish it with `neuroprobe record "
                                 f"... --resume`, or pass --allow-incomplete to analyse the stimuli it covers.")
        return f"note: {self.path} is incomplete: {cover}; the stimuli not yet recorded are left out."

    @cached_property
    def stimuli(self) -> pd.DataFrame:
        g = self._f[schema.STIMULI]
        data = {}
        for name, ds in g.items():
            arr = ds[()]
            if ds.dtype.kind == "O" or h5py.check_string_dtype(ds.dtype):
                arr = ds.asstr()[()]
            data[name] = arr
        df = pd.DataFrame(data)
        return df.set_index("index", drop=False).rename_axis(None)

    @cached_property
    def sites(self) -> pd.DataFrame:
        rows = []
        for name, g in self._f[schema.SITES].items():
            a = {k: _decode(v) for k, v in g.attrs.items()}
            rows.append(dict(site=name, module=a["module"], direction=a["direction"], kind=a["kind"],
                             stream=a["stream"], n_units=int(a["n_units"]), pooling=a["pooling"],
                             n_heads=int(a.get("n_heads", 0)), call=int(a.get("call", -1)),
                             tokens=schema.SITE_TOKENS in g))
        return pd.DataFrame(rows)

    def site_attrs(self, site: str) -> dict[str, Any]:
        """Every attribute of ``site``'s group, decoded (feature sites add ``source``, ``sae_hash``, ...)."""
        return {k: _decode(v) for k, v in self._site(site).attrs.items()}

    @property
    def site_names(self) -> list[str]:
        return list(self._f[schema.SITES].keys())

    @cached_property
    def units(self) -> pd.DataFrame:
        parts = []
        for row in self.sites.itertuples(index=False):
            unit = np.arange(row.n_units)
            head = unit // max(1, row.n_units // row.n_heads) if row.kind == "attn" and row.n_heads else np.full(row.n_units, -1)
            parts.append(pd.DataFrame({"site": row.site, "unit": unit, "kind": row.kind, "head": head}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["site", "unit", "kind", "head"])

    # ------------------------------------------------------------------ data
    def _site(self, site: str) -> h5py.Group:
        if site not in self._f[schema.SITES]:
            raise RecordingError(f"{self.path} has no site {site!r}; it has {', '.join(self.site_names[:8])}...")
        return self._f[schema.site_path(site)]

    def responses(self, site: str) -> h5py.Dataset:
        """The ``[n_stimuli, n_units]`` responses of ``site`` (lazy: slice it to read)."""
        return self._site(site)[schema.RESPONSES]

    def tokens(self, site: str) -> h5py.Dataset:
        """The ``[n_tokens, n_units]`` per-token traces of ``site`` (lazy)."""
        g = self._site(site)
        if schema.SITE_TOKENS not in g:
            raise RecordingError(f"{self.path} has no per-token traces; record with --tokens.")
        return g[schema.SITE_TOKENS]

    def token_table(self, stream: str = "text") -> pd.DataFrame:
        """One row per stored token of ``stream``: stimulus, position, token_id (row = row in :meth:`tokens`)."""
        if schema.TOKENS not in self._f or stream not in self._f[schema.TOKENS]:
            raise RecordingError(f"{self.path} has no per-token traces for stream {stream!r}.")
        t = self._f[f"{schema.TOKENS}/{stream}"]
        n = int(t.attrs["n_tokens"])
        return pd.DataFrame({k: t[k][:n] for k in ("stimulus", "position", "token_ids")}).rename(columns={"token_ids": "token_id"})

    def token_stimulus(self, stream: str = "text") -> h5py.Dataset:
        """``[n_tokens]`` stimulus index of each stored token row of ``stream`` (lazy: slice it to read)."""
        if schema.TOKENS not in self._f or stream not in self._f[schema.TOKENS]:
            raise RecordingError(f"{self.path} has no per-token traces for stream {stream!r}.")
        return self._f[f"{schema.TOKENS}/{stream}/stimulus"]

    def token_offsets(self, stream: str = "text") -> np.ndarray:
        """``[n_stimuli + 1]`` offsets: stimulus ``i`` owns token rows ``offsets[i]:offsets[i+1]``."""
        return self._f[f"{schema.TOKENS}/{stream}/offsets"][()]

    def iter_chunks(self, site: str, rows: Sequence[int] | np.ndarray | None = None, chunk_units: int = 4096) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(unit_slice, float64 block [n_rows, chunk])`` over a site's units (memory bounded)."""
        ds = self.responses(site)
        idx = None if rows is None else np.asarray(rows)
        for a in range(0, ds.shape[1], chunk_units):
            sl = slice(a, min(a + chunk_units, ds.shape[1]))
            block = ds[:, sl] if idx is None else ds[:, sl][idx]
            yield sl, np.asarray(block, dtype=np.float64)

    def to_xarray(self, sites: Sequence[str] | None = None):
        """The responses as an ``xarray.Dataset`` (one variable per site; loads those sites)."""
        import xarray as xr

        stim = self.stimuli
        coords = {"stimulus": stim["id"].to_numpy()}
        for col in ("concept", "modality", "form", "split"):
            if col in stim:
                coords[col] = ("stimulus", stim[col].to_numpy())
        data = {}
        for s in sites or self.site_names:
            data[s] = xr.DataArray(self.responses(s)[()], dims=("stimulus", f"unit:{s}"))
        return xr.Dataset(data, coords=coords, attrs={k: str(v) for k, v in self.attrs.items()})

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self.attrs
        state = "complete" if self.complete else f"incomplete ({self.n_done}/{a.get('n_stimuli')})"
        return (f"<Recording {self.path.name}: {a.get('subject')} ({a.get('init')}) x {a.get('battery')}, "
                f"{len(self.site_names)} sites, {a.get('n_stimuli')} stimuli, {state}>")


def open_recording(path: str | Path) -> Recording:
    """Open a recording for reading (see :class:`Recording`)."""
    return Recording(path)
