"""Controls for every concept-cell claim, one call each.

* :func:`rotation_control` — rotate each site's basis at random and look for cells
  again (``fraction=t``: only part of the way, along the rotation group's geodesic
  ``Q(t) = expm(t logm Q)``, for Bau et al. 2017's rotation curve).  Concept information
  that is spread across units survives a rotation;
  single-unit (axis-aligned) tuning does not.  A claim about *units* needs more
  cells than the rotated site gives.  Units are z-scored first (mean and SD of each
  unit on the screening split): without it a rotated direction is dominated by the
  few highest-variance units and inherits their tuning, so the control would
  understate how unit-specific a code is.
* :func:`untrained_control` — the same criterion on the untrained subject
  (``init="random"``): how many "cells" architecture and stimuli alone produce.
* :func:`label_shuffle_control` — concept labels permuted among stimuli (within
  split and form): every cell found is a false discovery, so this measures the
  criterion's false-positive count on this recording.
* :func:`bootstrap_ci` — confidence intervals of the cells' indices over stimuli.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd

from neuroprobe.analysis.criterion import concept_cells
from neuroprobe.analysis.design import Design
from neuroprobe.analysis.indices import (
    auc_from_u, class_means, d_prime, group_medians, group_stats, lifetime_sparseness, midranks, morcos_si, nonneg,
    rank_sum, selectivity_index,
)
from neuroprobe.analysis.scan import as_recording, battery_concepts, site_order
from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording import schema
from neuroprobe.recording.reader import Recording, open_recording

#: Sites up to this many units get a dense Haar rotation; wider sites a block-diagonal one.
MAX_DENSE_ROTATION = 4096
_ROW_BYTES = 64 << 20


# ---------------------------------------------------------------- rotation
def random_rotation(n: int, rng: np.random.Generator, *, special: bool = False) -> np.ndarray:
    """A Haar-random orthogonal ``[n, n]`` matrix (QR of a Gaussian matrix, signs fixed).

    ``special=True`` makes it a rotation proper (determinant +1, Haar on SO(n)) by negating
    the last column when the determinant is -1; the same draw otherwise.
    """
    from threadpoolctl import threadpool_limits

    g = rng.standard_normal((n, n))
    # OpenBLAS's threaded Householder QR spins badly on a busy machine (8x slower on 2 shared
    # cores); one thread is fast and predictable
    with threadpool_limits(limits=1, user_api="blas"):
        q, r = np.linalg.qr(g)
        q = q * np.sign(np.diag(r))
        if special and np.linalg.det(q) < 0:
            q[:, -1] = -q[:, -1]
    return q


def fractional_rotation(q: np.ndarray, t: float) -> np.ndarray:
    """The point ``Q(t) = expm(t logm(Q))`` of the geodesic from the identity to the rotation ``q``.

    ``t = 0`` is the identity (the unit axes), ``t = 1`` is ``q`` itself; every ``Q(t)`` is a
    rotation whose principal angles are ``t`` times ``q``'s (Bau et al. 2017's interpolation
    between the unit basis and a random one).  The logarithm is made exactly antisymmetric
    (its real part, antisymmetrised), so ``Q(t)`` is orthogonal to rounding.

    Parameters
    ----------
    q
        ``[n, n]`` rotation (orthogonal, determinant +1; see ``random_rotation(special=True)``).
    t
        Fraction of the way, in ``[0, 1]``.

    Returns
    -------
    ndarray
        ``[n, n]`` rotation.
    """
    from scipy.linalg import expm, logm
    from threadpoolctl import threadpool_limits

    if not 0.0 <= t <= 1.0:
        raise NeuroprobeError(f"a rotation fraction is between 0 and 1, not {t}.")
    n = q.shape[0]
    if t == 0.0:
        return np.eye(n)
    if t == 1.0:
        return np.array(q, dtype=np.float64, copy=True)
    if np.linalg.det(q) < 0:
        raise NeuroprobeError("a fractional rotation needs a rotation proper (determinant +1).")
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # logm's accuracy estimate; checked below
        log = logm(q)
        a = np.real(log)
        a = (a - a.T) / 2.0
        out = expm(t * a)
    return out


def rotation_angle(q: np.ndarray) -> float:
    """Mean angle in degrees between each unit axis ``e_i`` and its rotated image ``q[:, i]``."""
    return float(np.degrees(np.arccos(np.clip(np.diag(q), -1.0, 1.0))).mean()) if len(q) else 0.0


def rotate_recording(
    rec: Recording | str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    max_dense: int = MAX_DENSE_ROTATION,
    standardize: bool = True,
    fraction: float | None = None,
) -> Path:
    """Write a copy of ``rec`` whose every site is expressed in a random orthonormal basis.

    Each site's responses are standardised per unit — minus the unit's mean, divided by its
    SD (ddof=1), both over the screening stimuli the site fired for; a unit constant there
    becomes 0 — and multiplied by a Haar-random rotation; stimuli the site did not fire for
    stay NaN.  ``standardize=False`` only centres (mean over every stimulus the site fired
    for), as before: then high-variance units dominate every rotated direction.
    Sites wider than ``max_dense`` units are rotated by random orthogonal blocks of
    ``max_dense`` units after a random permutation of the units (memory O(max_dense^2)).
    Streams over stimuli: memory is one slab of rows plus the rotation.

    ``fraction=t`` rotates only part of the way: the same draw is made a rotation proper
    (determinant +1) and ``Q(t) = expm(t logm Q)`` is applied (:func:`fractional_rotation`):
    ``t = 0`` keeps the unit axes (standardised), ``t = 1`` is a full Haar-random rotation.
    ``None`` (default) applies the draw as it is (Haar on the orthogonal group).  Each site's
    mean angle between a unit axis and its image is written in its ``rotation_angle``
    attribute (degrees).

    Returns
    -------
    Path
        ``out``, a valid recording (root attribute ``control = "rotation"``).
    """
    if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
        raise NeuroprobeError(f"a rotation fraction is between 0 and 1, not {fraction}.")
    rec = as_recording(rec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = site_order(rec) if sites is None else list(sites)
    rng = np.random.default_rng(seed)
    stimuli = rec.stimuli
    screening = (stimuli["split"].astype(str).to_numpy() == "screening") if "split" in stimuli else \
        np.ones(len(stimuli), dtype=bool)
    with h5py.File(rec.path, "r") as src, h5py.File(out, "w", track_order=True) as dst:
        for key, v in src.attrs.items():
            dst.attrs[key] = v
        dst.attrs["control"] = "rotation"
        dst.attrs["rotation_seed"] = seed
        dst.attrs["rotation_of"] = str(rec.path)
        dst.attrs["rotation_standardize"] = bool(standardize)
        if fraction is not None:
            dst.attrs["rotation_fraction"] = float(fraction)
        dst.attrs["sites_list"] = json.dumps(names)
        src.copy(src[schema.STIMULI], dst, name=schema.STIMULI)
        for site in names:
            sds = src[schema.site_path(site)][schema.RESPONSES]
            n, u = sds.shape
            g = dst.create_group(schema.site_path(site))
            for key, v in src[schema.site_path(site)].attrs.items():
                g.attrs[key] = v
            dds = g.create_dataset(schema.RESPONSES, shape=(n, u), dtype=np.float32, chunks=sds.chunks,
                                   fillvalue=np.nan)
            if n == 0 or u == 0:
                continue
            step = max(1, _ROW_BYTES // (8 * u))
            total, count = np.zeros(u), np.zeros(u)
            for a in range(0, n, step):
                x = sds[a : a + step].astype(np.float64)
                ok = np.isfinite(x) & (screening[a : a + step, None] if standardize else True)
                total += np.where(ok, x, 0.0).sum(0)
                count += ok.sum(0)
            mean = np.divide(total, count, out=np.zeros(u), where=count > 0)
            scale = np.ones(u)
            if standardize:  # second pass: the SD about that mean (stable, no cancellation)
                ss = np.zeros(u)
                for a in range(0, n, step):
                    x = sds[a : a + step].astype(np.float64)
                    ok = np.isfinite(x) & screening[a : a + step, None]
                    ss += np.where(ok, (x - mean) ** 2, 0.0).sum(0)
                sd = np.sqrt(np.divide(ss, count - 1, out=np.zeros(u), where=count > 1))
                scale = np.divide(1.0, sd, out=np.zeros(u), where=sd > 0)
            special = fraction is not None

            def draw(m: int) -> np.ndarray:
                q = random_rotation(m, rng, special=special)
                return q if fraction is None else fractional_rotation(q, float(fraction))

            if u <= max_dense:
                perm, blocks = np.arange(u), [(0, u, draw(u))]
            else:
                perm = rng.permutation(u)
                blocks = [(b, min(b + max_dense, u), draw(min(max_dense, u - b))) for b in range(0, u, max_dense)]
            g.attrs["rotation_angle"] = float(sum(rotation_angle(q) * (hi - lo) for lo, hi, q in blocks) / u)
            for a in range(0, n, step):
                x = sds[a : a + step].astype(np.float64)
                fired = ~np.isnan(x).all(axis=1)
                y = np.nan_to_num((x - mean) * scale)[:, perm]
                z = np.empty_like(y)
                for lo, hi, q in blocks:
                    z[:, lo:hi] = y[:, lo:hi] @ q
                z[~fired] = np.nan
                dds[a : a + len(x)] = z.astype(np.float32)
    return out


def _scratch(name: str, rec: Recording | str | Path, criterion: dict[str, Any]) -> Path:
    """A temporary folder for a control's recording: the system's, or, when a Dask ``client`` scans it,
    beside the recording (whose folder the workers see)."""
    near = None
    if criterion.get("client") is not None:
        near = (rec.path if isinstance(rec, Recording) else Path(rec)).resolve().parent
    return Path(tempfile.mkdtemp(prefix=f"neuroprobe-{name}-", dir=near))


def rotation_control(
    rec: Recording | str | Path,
    *,
    rotation_seed: int = 0,
    out: str | Path | None = None,
    standardize: bool = True,
    fraction: float | None = None,
    **criterion: Any,
) -> pd.DataFrame:
    """Concept cells of ``rec`` after a random rotation of every site (see :func:`rotate_recording`).

    By default every unit is z-scored on the screening split before the rotation
    (``standardize=False``: centred only).  ``fraction=t`` rotates part of the way along
    the geodesic to the (proper) random rotation; ``attrs["rotation_angle"]`` is then the
    mean angle (degrees) between a unit axis and its image over the analysed sites' units.

    Parameters
    ----------
    rec
        The recording.
    rotation_seed
        Seed of the rotations.
    out
        Keep the rotated recording here (default: a temporary file, deleted).
    **criterion
        Options of :func:`~neuroprobe.analysis.criterion.concept_cells` (k, fdr, method, ...).

    Returns
    -------
    DataFrame
        The cells table of the rotated recording (``attrs["control"] == "rotation"``).
    """
    tmp = None
    if out is None:
        tmp = _scratch("rotation", rec, criterion)
        out = tmp / "rotated.h5"
    try:
        path = rotate_recording(rec, out, seed=rotation_seed, sites=criterion.get("sites"), standardize=standardize,
                                fraction=fraction)
        with open_recording(path) as rotated:
            cells = concept_cells(rotated, **criterion)
            angles = {s: (float(rotated.responses(s).parent.attrs.get("rotation_angle", np.nan)),
                          rotated.responses(s).shape[1]) for s in dict.fromkeys(cells["site"])}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    cells.attrs["control"] = "rotation"
    cells.attrs["rotation_seed"] = rotation_seed
    cells.attrs["rotation_standardize"] = standardize
    if fraction is not None:
        cells.attrs["rotation_fraction"] = float(fraction)
    n = sum(u for _, u in angles.values())
    cells.attrs["rotation_angle"] = float(sum(a * u for a, u in angles.values()) / n) if n else 0.0
    return cells


# ---------------------------------------------------------------- untrained subject
def untrained_control(
    rec: Recording | str | Path,
    random_rec: Recording | str | Path | None = None,
    *,
    out: str | Path | None = None,
    **criterion: Any,
) -> pd.DataFrame:
    """Concept cells of the untrained subject (``init="random"``) shown the same battery.

    Parameters
    ----------
    rec
        The trained subject's recording.
    random_rec
        The untrained subject's recording; when omitted it is recorded now (the subject
        named in ``rec``, ``init="random"``, same battery, montage, pooling and seed).
    out
        Where to write that recording (default: a temporary file, deleted).
    **criterion
        Options of :func:`~neuroprobe.analysis.criterion.concept_cells`.
    """
    rec = as_recording(rec)
    a = rec.attrs
    tmp = None
    if random_rec is None:
        from neuroprobe.recording.entry import record
        from neuroprobe.stimuli.battery import Battery
        from neuroprobe.subjects.registry import load_subject

        try:
            subject = load_subject(str(a.get("subject")), init="random", seed=int(a.get("seed", 0)), quiet=True)
        except NeuroprobeError as err:
            raise NeuroprobeError(f"cannot rebuild the untrained subject of {rec.path} ({err}); record it yourself "
                                  f"with --init random and pass that recording.") from None
        battery = Battery.load(str(a.get("battery")))
        if out is None:
            tmp = _scratch("untrained", rec, criterion)
            out = tmp / "untrained.h5"
        random_rec = record(subject, battery, out, montage=str(a.get("montage", "mlp")),
                            pooling=str(a.get("pooling", "mean")), quiet=True, overwrite=True)
    try:
        ctrl = as_recording(random_rec)
        b = ctrl.attrs
        if str(b.get("init")) != "random":
            raise NeuroprobeError(f"{ctrl.path} is not an untrained recording (init={b.get('init')}); "
                                  f"record it with --init random.")
        if a.get("battery_hash") and b.get("battery_hash") and a["battery_hash"] != b["battery_hash"]:
            raise NeuroprobeError(f"{ctrl.path} was recorded on another battery than {rec.path}; "
                                  f"record the untrained subject on the same battery.")
        cells = concept_cells(ctrl, **criterion)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    cells.attrs["control"] = "untrained"
    return cells


# ---------------------------------------------------------------- label shuffle
def shuffled_labels(stimuli: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Concept labels permuted among stimuli of the same split and form."""
    labels = stimuli["concept"].astype(str).to_numpy().copy()
    keys = [c for c in ("split", "form") if c in stimuli]
    groups = stimuli.groupby(keys, sort=False).indices if keys else {"all": np.arange(len(stimuli))}
    for idx in groups.values():
        labels[idx] = labels[rng.permutation(idx)]
    return labels


def label_shuffle_control(
    rec: Recording | str | Path,
    *,
    n_shuffles: int = 10,
    seed: int = 0,
    **criterion: Any,
) -> pd.DataFrame:
    """Run the criterion with concept labels shuffled ``n_shuffles`` times.

    Every candidate or cell found is a false discovery.  Invariance permutations are
    skipped unless ``n_perm`` is given (they do not change the counts).

    Returns
    -------
    DataFrame
        One row per shuffle and site: ``shuffle, site, units, responsive, candidates, cells``
        (``responsive``: :func:`~neuroprobe.analysis.criterion.responsive_units`).
    """
    from neuroprobe.analysis.criterion import responsive_units

    rec = as_recording(rec)
    criterion.setdefault("n_perm", 0)
    rng = np.random.default_rng(seed)
    stimuli = rec.stimuli.reset_index(drop=True)
    rows = []
    for i in range(n_shuffles):
        cells = concept_cells(rec, labels=shuffled_labels(stimuli, rng), **criterion)
        cells["responsive"] = responsive_units(cells)
        for site, g in cells.groupby("site", sort=False):
            rows.append(dict(shuffle=i, site=site, units=len(g), responsive=int(g["responsive"].sum()),
                             candidates=int(g["is_candidate"].sum()), cells=int(g["is_cell"].sum())))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- bootstrap
def unit_stats(x: np.ndarray, design: Design, concept: np.ndarray, transform: str = "shift") -> dict[str, np.ndarray]:
    """Indices of units ``x[units, stimuli]`` for their ``concept`` over all the design's stimuli."""
    sub = design.all
    x64 = x.astype(np.float64)
    r = nonneg(x64, transform)
    means_pos = class_means(r, sub.onehot)
    st = group_stats(x64, sub.onehot)
    ranks, tie = midranks(x)
    U, _ = rank_sum(ranks, tie, sub.onehot)

    def pick(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, concept[:, None], axis=1)[:, 0]

    med = pick(group_medians(x64, sub.groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (med - pick(st.mean_b)) / np.sqrt(pick(st.var_b))
    return {
        "si": selectivity_index(means_pos),
        "si_morcos": morcos_si(means_pos),
        "lifetime_sparseness": lifetime_sparseness(r),
        "d_prime": pick(d_prime(st)),
        "auc": pick(auc_from_u(U, st.n_c, st.n_b)),
        "z": z,
    }


def bootstrap_ci(
    rec: Recording | str | Path,
    cells: pd.DataFrame,
    *,
    units: pd.DataFrame | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    transform: str = "shift",
    max_units: int = 2000,
) -> pd.DataFrame:
    """Percentile bootstrap confidence intervals of the cells' indices over stimuli.

    Stimuli are resampled with replacement within each concept (all the stimuli a site
    fired for); each resample recomputes, for every selected unit at once, SI, Morcos'
    SI, lifetime sparseness, and d', AUC and effect z of the unit's concept against
    the rest.

    Parameters
    ----------
    rec
        The recording.
    cells
        A table from :func:`concept_cells` (``site, unit, concept`` used).
    units
        Rows of ``cells`` to bootstrap (default: the confirmed cells).
    n_boot, level, seed
        Resamples, interval level, seed.
    transform
        Non-negative transform (as in the cells table).
    max_units
        Refuse more units than this (the selected units' responses are loaded).

    Returns
    -------
    DataFrame
        One row per unit and index: ``site, unit, concept, index, estimate, lo, hi``.
    """
    rec = as_recording(rec)
    sel = cells[cells["is_cell"]] if units is None else units
    if len(sel) > max_units:
        raise NeuroprobeError(f"{len(sel)} units selected for the bootstrap (more than max_units={max_units}); "
                              f"pass fewer units or raise max_units.")
    stimuli = rec.stimuli.reset_index(drop=True)
    concepts = battery_concepts(stimuli)
    names = np.array(concepts, dtype=object)
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    parts = []
    for site, g in sel.groupby("site", sort=False):
        unit_idx = np.sort(g["unit"].to_numpy().astype(int))
        x_all = np.asarray(rec.responses(site)[:, unit_idx], dtype=np.float32).T  # [units, stimuli]
        valid = ~np.isnan(x_all).all(axis=0)
        design = Design.build(stimuli, valid, concepts)
        x = x_all[:, valid]
        concept_of = dict(zip(g["unit"].astype(int), g["concept"]))
        concept = np.array([concepts.index(concept_of[u]) for u in unit_idx], dtype=np.intp)
        est = unit_stats(x, design, concept, transform)
        boots = {key: np.empty((n_boot, len(unit_idx))) for key in est}
        groups = [gr for gr in design.all.groups if len(gr)]
        # resampling within concepts keeps every concept's count: one design serves every resample
        order = np.concatenate(groups)
        boot_design = Design.build(design.stimuli.iloc[order].reset_index(drop=True), np.ones(len(order), bool),
                                   concepts)
        for b in range(n_boot):
            idx = np.concatenate([rng.choice(gr, size=len(gr), replace=True) for gr in groups])
            for key, v in unit_stats(x[:, idx], boot_design, concept, transform).items():
                boots[key][b] = v
        for key, v in est.items():
            bs = np.where(np.isfinite(boots[key]), boots[key], np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (e.g. z with a silent baseline)
                lo, hi = np.nanquantile(bs, [lo_q, hi_q], axis=0)
            parts.append(pd.DataFrame(dict(site=site, unit=unit_idx, concept=names[concept], index=key,
                                           estimate=v, lo=lo, hi=hi)))
    if not parts:
        return pd.DataFrame(columns=["site", "unit", "concept", "index", "estimate", "lo", "hi"])
    return pd.concat(parts, ignore_index=True).sort_values(["site", "unit", "index"], kind="stable",
                                                           ignore_index=True)
