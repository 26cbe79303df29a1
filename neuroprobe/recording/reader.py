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
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            raise RecordingError(f"{self.path} cannot be opened as HDF5 ({str(err).splitlines()[0]}).") from None
        if _decode(self._f.attrs.get("format")) != schema.FORMAT:
            self._f.close()
            raise RecordingError(f"{self.path} is not a neuroprobe recording.")
        version = int(_decode(self._f.attrs.get("format_version", 0)))
        if version > schema.FORMAT_VERSION:
            self._f.close()
            raise RecordingError(
                f"{self.path} uses recording format {version}, newer than this neuroprobe reads "
                f"({schema.FORMAT_VERSION}); upgrade neuroprobe."
            )
        from neuroprobe.recording.shards import check_sources

        try:
            check_sources(self._f, self.path)  # a virtual recording needs its shards
        except RecordingError:
            self._f.close()
            raise

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
