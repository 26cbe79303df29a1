"""Read a recording lazily: ``open_recording(path)``.

Responses stay on disk (h5py datasets): slicing a site reads only that slice, so a
recording larger than memory can be analysed chunk by chunk.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from neuroprobe.errors import RecordingError
from neuroprobe.recording import schema


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
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
        try:
            # SWMR read: a recording that is still being written can be opened (and a finished one as usual)
            self._f = h5py.File(self.path, "r", swmr=True)
        except OSError as err:
            raise RecordingError(f"{self.path} cannot be opened as HDF5 ({str(err).splitlines()[0]}).") from None
        try:
            self._check_layout()
        except RecordingError:
            self._f.close()
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file must still end in one sentence
            self._f.close()
            raise RecordingError(f"{self.path} is a damaged recording ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None

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
        from neuroprobe.recording.shards import check_sources

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
