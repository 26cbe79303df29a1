"""Lesions: edit units at sites through electrodes, exactly and reversibly.

A lesion replaces the values of chosen units at chosen sites during every
forward pass of the subject, through the project's one hook mechanism
(:class:`~neuroprobe.electrodes.Electrodes` with ``edits``).  Four modes:

``zero``
    ``x[..., u] = 0`` at every token.
``mean``
    ``x[..., u] = m_u``, the unit's mean response over a reference set (the mean,
    over reference stimuli, of each stimulus's pooled response; see
    :func:`reference_responses`).  Zeroing shifts every embedding away from the
    data; mean ablation removes the unit's information without that shift, so
    report it beside zero ablation.
``resample``
    ``x[b, :, u] = r_{j_b, u}``: every stimulus ``b`` of a batch gets the pooled
    responses of one reference stimulus ``j_b`` drawn uniformly (seeded; one draw
    per stimulus, site and forward pass, shared by the site's lesioned units so
    their joint statistics are kept).  Use a reference set disjoint from the
    evaluated stimuli (the screening split when evaluating the testing split) so
    the values come from *other* stimuli.
``scale``
    ``x[..., u] = factor * x[..., u]``; ``factor > 1`` amplifies, ``0`` equals zero.

The lesion is a context manager; hooks exist only inside the ``with`` block, so
outside it the model is untouched (parameters are never written).  Lesions
compose: one lesion may cover many sites, and nested lesions stack (edits of
the same site apply in the order the lesions were entered)::

    with lesion(subject, {"encoder.layer.3.mlp": [7, 12]}, "mean", reference=rec):
        scores = subject.readout(stimuli, battery)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.recording.pooling import pool
from neuroprobe.subjects.base import Site, Subject

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

MODES = ("zero", "mean", "resample", "scale")

#: what :func:`lesion` accepts as ``units``
UnitsLike = Any  # Mapping[str, Iterable[int]] | pd.DataFrame | Iterable[tuple[str, int]]


# ------------------------------------------------------------------ scale factor


def scale_factor(factor: Any, name: str = "factor=") -> float:
    """Check the factor of a ``scale`` lesion: any finite number.

    ``x -> factor * x``: 0 silences the units, 0 < f < 1 weakens them, f > 1 amplifies them,
    and a negative factor inverts them (a sign flip scaled by ``|f|``, a meaningful edit of a
    signed activation).  NaN and infinity are refused: they would turn every activation
    downstream into NaN and the readout into no number at all.

    Parameters
    ----------
    factor
        The factor given.
    name
        How the caller names it in the message (``--factor`` for the CLI).

    Returns
    -------
    float
        The factor.
    """
    if factor is None:
        raise NeuroprobeError(f"a scale lesion needs {name.rstrip('=')} (0 silences, 0.5 halves, 2 amplifies, -1 inverts).")
    try:
        value = float(factor)
    except (TypeError, ValueError):
        raise NeuroprobeError(f"the scale factor ({name.rstrip('=')}) must be a number, not {factor!r}.") from None
    if not np.isfinite(value):
        raise NeuroprobeError(f"the scale factor ({name.rstrip('=')}) must be a finite number, not {value}; "
                              f"0 silences, 0.5 halves, 2 amplifies, -1 inverts.")
    return value


# ------------------------------------------------------------------ units


def normalize_units(units: UnitsLike, *, site_col: str = "site", unit_col: str = "unit") -> dict[str, np.ndarray]:
    """Turn any description of units into ``{site: sorted unique unit indices}``.

    Parameters
    ----------
    units
        A mapping ``site -> unit indices``, a DataFrame with ``site_col`` and
        ``unit_col`` columns, or an iterable of ``(site, unit)`` pairs.
    site_col, unit_col
        Column names when ``units`` is a DataFrame.

    Returns
    -------
    dict
        Site name -> ``int64`` array of unit indices (sites with no units dropped).
    """
    pairs: dict[str, list[int]] = {}
    if isinstance(units, pd.DataFrame):
        missing = [c for c in (site_col, unit_col) if c not in units.columns]
        if missing:
            raise NeuroprobeError(f"the units table needs column(s) {', '.join(missing)}; it has {', '.join(map(str, units.columns))}.")
        for site, unit in zip(units[site_col].astype(str), units[unit_col]):
            pairs.setdefault(site, []).append(int(unit))
    elif isinstance(units, Mapping):
        for site, us in units.items():
            if isinstance(us, (set, frozenset)):
                us = sorted(us)
            pairs.setdefault(str(site), []).extend(int(u) for u in np.atleast_1d(np.asarray(us)).ravel())
    else:
        for item in units:
            site, unit = item
            pairs.setdefault(str(site), []).append(int(unit))
    out = {}
    for site, us in pairs.items():
        arr = np.unique(np.asarray(us, dtype=np.int64))
        if arr.size and arr.min() < 0:
            raise NeuroprobeError(f"unit indices must be non-negative; site {site!r} has {int(arr.min())}.")
        if arr.size:
            out[site] = arr
    return out


def count_units(units: Mapping[str, np.ndarray]) -> int:
    """Total number of units in a normalized units mapping."""
    return int(sum(len(v) for v in units.values()))


# -------------------------------------------------------------- responses


def resolve_sites(subject: Subject, names: Iterable[str | Site]) -> list[Site]:
    """The subject's :class:`Site` objects for ``names`` (one clear error for an unknown name)."""
    available = {s.name: s for s in subject.sites("all") + getattr(subject, "feature_sites", list)()}
    out = []
    for name in names:
        if isinstance(name, Site):
            out.append(name)
            continue
        if name not in available:
            some = ", ".join(list(available)[:6])
            raise NeuroprobeError(
                f"subject {subject.name!r} has no site {name!r}; its sites look like {some}... "
                f"(`neuroprobe subjects {subject.name} --sites all` lists them)."
            )
        out.append(available[name])
    return out


def site_responses(
    subject: Subject,
    battery: "Battery",
    stimuli: pd.DataFrame,
    sites: Sequence[str | Site],
    *,
    pooling: str = "mean",
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Pooled responses ``[n_stimuli, n_units]`` of ``sites``, read with electrodes.

    The same pooling the :class:`~neuroprobe.recording.Recorder` applies (padding
    masked), without writing a file.  Runs under whatever lesions are active.

    Parameters
    ----------
    subject, battery
        The subject and the battery ``stimuli`` come from.
    stimuli
        Rows of ``battery.table``.
    sites
        Site names (or :class:`Site` objects).
    pooling
        ``mean``, ``max``, ``first``, ``last`` or ``concept-token``.
    batch_size
        Stimuli per forward pass.

    Returns
    -------
    dict
        Site name -> ``float32`` array, one row per stimulus in ``stimuli`` order.
    """
    site_objs = resolve_sites(subject, sites)
    n = len(stimuli)
    out: dict[str, np.ndarray] = {}
    split_modality = bool(getattr(subject, "split_by_modality", False))
    for offset in range(0, n, batch_size):
        rows = stimuli.iloc[offset : offset + batch_size]
        groups = [g for _, g in rows.groupby("modality", sort=False)] if split_modality else [rows]
        pos_of = {idx: offset + i for i, idx in enumerate(rows.index)}
        for group in groups:
            batch = subject.encode(group, battery)
            got: dict[str, np.ndarray] = {}

            def on_read(site: Site, x: torch.Tensor, _batch=batch, _got=got) -> None:
                mask = _batch.masks.get(site.stream)
                if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
                    mask = torch.ones(x.shape[:2], dtype=torch.bool)
                _got[site.name] = pool(x, mask, pooling, _batch.concept_masks.get(site.stream)).cpu().numpy()

            with torch.inference_mode(), Electrodes(subject.model, site_objs, on_read=on_read):
                subject.forward(batch)
            where = np.array([pos_of[i] for i in group.index])
            for name, values in got.items():
                if name not in out:
                    out[name] = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
                out[name][where] = values
    missing = [s.name for s in site_objs if s.name not in out]
    if missing:
        raise NeuroprobeError(f"site(s) {', '.join(missing[:4])} never fired for these stimuli; choose sites the battery reaches.")
    return out


def reference_responses(
    reference: Any,
    sites: Sequence[str],
    *,
    subject: Subject | None = None,
    battery: "Battery | None" = None,
    split: str | None = None,
) -> dict[str, np.ndarray]:
    """Reference responses ``[n_ref, n_units]`` per site, from any reference source.

    Parameters
    ----------
    reference
        A :class:`~neuroprobe.recording.reader.Recording` (its rows are used),
        a :class:`~neuroprobe.stimuli.battery.Battery` or a stimuli DataFrame (run
        through ``subject`` with electrodes reading, mean pooling), or a mapping
        ``site -> array`` (``[n_ref, n_units]`` responses, or ``[n_units]`` means
        for mean ablation).
    sites
        Sites needed.
    subject, battery
        Needed when ``reference`` is a stimuli table (and to check a recording's subject).
    split
        Keep only reference stimuli of this split (recordings, batteries, tables).

    Returns
    -------
    dict
        Site name -> 1-D or 2-D float array.
    """
    from neuroprobe.stimuli.battery import Battery

    sites = list(sites)
    if hasattr(reference, "responses") and hasattr(reference, "stimuli"):  # a Recording
        rec = reference
        if subject is not None:
            rec_subject = rec.attrs.get("subject")
            if rec_subject not in (None, subject.name):
                raise RecordingError(
                    f"{rec.path} was recorded from subject {rec_subject!r}, not {subject.name!r}; "
                    f"use a recording of the subject you lesion as the reference."
                )
        rows = np.arange(len(rec.stimuli))
        if split is not None:
            rows = np.flatnonzero(rec.stimuli["split"].to_numpy() == split)
            if rows.size == 0:
                raise RecordingError(f"{rec.path} has no {split!r} stimuli to serve as the reference set.")
        out = {}
        for s in sites:
            data = np.asarray(rec.responses(s)[()], dtype=np.float64)
            out[s] = data[rows]
        return out
    if isinstance(reference, (Battery, pd.DataFrame)):
        if subject is None:
            raise NeuroprobeError("a reference given as stimuli needs the subject to run them through.")
        if isinstance(reference, Battery):
            battery = reference
            table = reference.table
        else:
            table = reference
            if battery is None:
                raise NeuroprobeError("a reference given as a stimuli table needs battery= (the battery it comes from).")
        if split is not None:
            table = table[table["split"] == split]
        if len(table) == 0:
            raise NeuroprobeError("the reference set has no stimuli; give a non-empty reference.")
        return {k: v.astype(np.float64) for k, v in site_responses(subject, battery, table, sites).items()}
    if isinstance(reference, Mapping):
        out = {}
        for s in sites:
            if s not in reference:
                raise NeuroprobeError(f"the reference has no responses for site {s!r}; give one for every lesioned site.")
            out[s] = np.asarray(reference[s], dtype=np.float64)
        return out
    raise NeuroprobeError(
        "reference must be a recording, a battery, a stimuli table or a mapping site -> responses; "
        f"got {type(reference).__name__}."
    )


# ------------------------------------------------------------------ lesion


class Lesion:
    """A set of units silenced (or replaced, or scaled) at one or more sites.

    Use it as a context manager (see :func:`lesion`).

    Attributes
    ----------
    units
        Site name -> unit indices.
    mode
        One of :data:`MODES`.
    factor
        The scale factor (``scale`` mode).
    values
        ``mean`` mode: site -> the replacement value of each lesioned unit.
    pool
        ``resample`` mode: site -> ``[n_ref, n_lesioned]`` reference responses.
    draws
        ``resample`` mode: ``(site, reference row per stimulus)`` for every edit
        made, in order (to check or reproduce a resampled run).
    """

    def __init__(
        self,
        subject: Subject,
        units: UnitsLike,
        mode: str = "zero",
        *,
        factor: float | None = None,
        reference: Any = None,
        battery: "Battery | None" = None,
        reference_split: str | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise NeuroprobeError(f"lesion mode {mode!r} is not one of {', '.join(MODES)}.")
        if mode == "scale":
            factor = scale_factor(factor)
        elif factor is not None:
            raise NeuroprobeError(f"factor= only applies to mode 'scale', not {mode!r}.")
        self.subject = subject
        self.mode = mode
        self.factor = factor
        self.seed = int(seed)
        self.units = normalize_units(units)
        if not self.units:
            raise NeuroprobeError("the lesion has no units; give at least one (site, unit).")
        self.sites = resolve_sites(subject, self.units)
        self.values: dict[str, np.ndarray] = {}
        self.pool: dict[str, np.ndarray] = {}
        self.draws: list[tuple[str, np.ndarray]] = []
        if mode in ("mean", "resample"):
            if reference is None:
                raise NeuroprobeError(
                    f"a {mode} lesion needs reference= (a recording, a battery or stimuli, or site -> responses) "
                    f"to take the units' values from."
                )
            ref = reference_responses(reference, list(self.units), subject=subject, battery=battery, split=reference_split)
            for site, idx in self.units.items():
                r = ref[site]
                n_units = r.shape[-1]
                if idx.max() >= n_units:
                    raise NeuroprobeError(
                        f"unit {int(idx.max())} is out of range for site {site!r}, which has {n_units} units."
                    )
                if mode == "mean":
                    self.values[site] = (r[idx] if r.ndim == 1 else np.nanmean(r[:, idx], axis=0)).astype(np.float64)
                    if not np.all(np.isfinite(self.values[site])):
                        raise NeuroprobeError(f"the reference has no finite responses for some units of {site!r}.")
                else:
                    if r.ndim != 2:
                        raise NeuroprobeError("a resample lesion needs per-stimulus reference responses, not means.")
                    sub = r[:, idx]
                    sub = sub[np.all(np.isfinite(sub), axis=1)]
                    if len(sub) == 0:
                        raise NeuroprobeError(f"the reference has no stimulus with finite responses at {site!r}.")
                    self.pool[site] = sub
        self._electrodes: Electrodes | None = None
        self._gen: torch.Generator | None = None

    # ---------------------------------------------------------------- edits
    def _edit(self, site_name: str):
        idx_np = self.units[site_name]
        cache: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor | None]] = {}
        mode, factor = self.mode, self.factor

        def prepared(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            key = (x.device, x.dtype)
            if key not in cache:
                idx = torch.as_tensor(idx_np, device=x.device)
                extra = None
                if mode == "mean":
                    extra = torch.as_tensor(self.values[site_name], dtype=x.dtype, device=x.device)
                elif mode == "resample":
                    extra = torch.as_tensor(self.pool[site_name], dtype=x.dtype, device=x.device)
                cache[key] = (idx, extra)
            return cache[key]

        def edit(x: torch.Tensor, site: Site) -> torch.Tensor:
            n_units = x.shape[-1]
            if int(idx_np[-1]) >= n_units:
                raise NeuroprobeError(f"unit {int(idx_np[-1])} is out of range for site {site.name!r}, which has {n_units} units.")
            idx, extra = prepared(x)
            if mode == "zero":
                return x.index_fill(-1, idx, 0.0)
            y = x.clone()
            if mode == "scale":
                y[..., idx] = x[..., idx] * factor
            elif mode == "mean":
                y[..., idx] = extra
            else:  # resample
                assert extra is not None and self._gen is not None
                draw = torch.randint(extra.shape[0], (x.shape[0],), generator=self._gen)
                self.draws.append((site.name, draw.numpy().copy()))
                y[..., idx] = extra[draw.to(x.device)].unsqueeze(1)
            return y

        return edit

    # ------------------------------------------------------------- context
    def __enter__(self) -> "Lesion":
        self._gen = torch.Generator().manual_seed(self.seed)
        self.draws = []
        edits = {s.name: self._edit(s.name) for s in self.sites}
        self._electrodes = Electrodes(self.subject.model, self.sites, read=False, edits=edits)
        self._electrodes.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._electrodes is not None:
            self._electrodes.__exit__(*exc)
            self._electrodes = None

    @property
    def n_units(self) -> int:
        """Number of lesioned units over all sites."""
        return count_units(self.units)

    def __repr__(self) -> str:
        extra = f" x{self.factor:g}" if self.mode == "scale" else ""
        return f"<Lesion {self.mode}{extra}: {self.n_units} units at {len(self.units)} site(s)>"


def lesion(
    subject: Subject,
    units: UnitsLike,
    mode: str = "zero",
    *,
    factor: float | None = None,
    reference: Any = None,
    battery: "Battery | None" = None,
    reference_split: str | None = None,
    seed: int = 0,
) -> Lesion:
    """Lesion units of a subject inside a ``with`` block.

    Parameters
    ----------
    subject
        The subject whose model is edited (its parameters are never written).
    units
        Site -> unit indices, a DataFrame with ``site`` and ``unit`` columns, or
        ``(site, unit)`` pairs; may span several sites.
    mode
        ``zero``, ``mean``, ``resample`` or ``scale`` (see the module docstring).
    factor
        ``scale`` mode: the multiplier (``> 1`` amplifies).
    reference
        ``mean``/``resample`` modes: where the units' values come from — a
        recording, a battery, a stimuli table (with ``battery``), or a mapping
        ``site -> [n_ref, n_units]`` responses (``[n_units]`` means for ``mean``).
    battery
        The battery a stimuli-table reference comes from.
    reference_split
        Restrict the reference to one split (e.g. ``"screening"``).
    seed
        Seed of the ``resample`` draws (re-seeded every time the block is entered).

    Returns
    -------
    Lesion
        A context manager; inside its block every forward pass is lesioned.

    Examples
    --------
    >>> with lesion(subject, {"encoder.layer.3.mlp": [7, 12]}):          # doctest: +SKIP
    ...     scores = subject.readout(battery.split("testing"), battery)
    """
    return Lesion(subject, units, mode, factor=factor, reference=reference, battery=battery,
                  reference_split=reference_split, seed=seed)
