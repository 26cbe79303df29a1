"""A subject's concept cells beside its controls, computed once and reused.

Every concept-cell claim needs its controls in the same run: the untrained twin (the
same architecture, random weights), a random rotation of each site's basis (cells that
are an artefact of the unit axes vanish) and a label shuffle (every cell found is a false
discovery).  :func:`cells_with_controls` runs the four for one subject and battery,
keeping each recording and each table in the cache under the recording's key and the
criterion's options.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from neuroprobe.errors import NeuroprobeError

CONTROLS = ("untrained", "rotation", "shuffle")


def _criterion_key(rec_path: Path, control: str, criterion: dict[str, Any]) -> str:
    text = json.dumps({"recording": rec_path.name, "control": control, **criterion}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


#: Bumped when a control's table gains columns, so tables cached before are made again.
_TABLE_VERSION = {"shuffle": 2}


def cached_cells(rec: Any, *, control: str = "none", rotation_seed: int = 0, n_shuffles: int = 5,
                 rotation_fraction: float | None = None, quiet: bool = True, **criterion: Any) -> pd.DataFrame:
    """Concept cells of ``rec`` (or of one control of it), kept beside the recording.

    Parameters
    ----------
    rec
        A recording in the cache (its file name carries its provenance key).
    control
        ``none`` (the recording itself), ``rotation`` (a random rotation of each site) or
        ``shuffle`` (``n_shuffles`` label shuffles; a per-shuffle, per-site count table).
    rotation_seed, n_shuffles
        Options of the rotation and shuffle controls.
    rotation_fraction
        Rotate only this fraction of the way to the random rotation (``0``: the unit axes,
        ``1``: a full rotation proper; :func:`~neuroprobe.analysis.controls.rotate_recording`);
        ``None``: the rotation control as it always was.  The table's ``attrs`` carry the
        ``rotation_angle`` (mean degrees between a unit axis and its image).
    quiet
        No progress bar.
    **criterion
        Options of :func:`neuroprobe.concept_cells` (part of the cache key).

    Returns
    -------
    DataFrame
        The cells table (``control`` in ``attrs``), or the shuffle count table.
    """
    from neuroprobe.analysis.controls import label_shuffle_control, rotation_control
    from neuroprobe.analysis.criterion import concept_cells

    path = Path(rec.path)
    opts = dict(criterion, rotation_seed=rotation_seed) if control == "rotation" else dict(criterion)
    if control == "rotation" and rotation_fraction is not None:
        opts["rotation_fraction"] = float(rotation_fraction)
    if control == "shuffle":
        opts["n_shuffles"] = n_shuffles
    if control in _TABLE_VERSION:
        opts["table_version"] = _TABLE_VERSION[control]
    table = path.with_name(f"{path.stem}.cells-{control}-{_criterion_key(path, control, opts)}.parquet")
    if table.is_file():
        cells = pd.read_parquet(table)
        cells.attrs.setdefault("control", control)
        return cells
    if control == "none":
        cells = concept_cells(rec, quiet=quiet, **criterion)
    elif control == "rotation":
        cells = rotation_control(rec, rotation_seed=rotation_seed, fraction=rotation_fraction, quiet=quiet,
                                 **criterion)
    elif control == "shuffle":
        cells = label_shuffle_control(rec, n_shuffles=n_shuffles, seed=int(criterion.get("seed", 0)),
                                      **{k: v for k, v in criterion.items() if k != "seed"})
    else:
        raise NeuroprobeError(f"control {control!r} is not one of none, rotation, shuffle.")
    frame = cells.copy()
    frame.attrs = {k: v for k, v in cells.attrs.items() if isinstance(v, (str, int, float, bool))}
    frame.attrs["control"] = control
    tmp = table.with_name(f".{table.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(table)
    return cells


@dataclass
class Study:
    """A subject's cells and its controls (what :func:`cells_with_controls` returns).

    Attributes
    ----------
    subject
        The trained subject (loaded; lesion it, read its readouts).
    recording, untrained_recording
        The two recordings.
    cells
        ``{"trained", "untrained", "rotation"}`` -> cells table; ``"shuffle"`` -> the
        per-shuffle, per-site counts.  Only the controls asked for are present.
    """

    subject: Any
    recording: Any
    cells: dict[str, pd.DataFrame]
    untrained_recording: Any = None
    notes: list[str] = field(default_factory=list)

    def counts(self, by: str = "site") -> pd.DataFrame:
        """Cells, invariant and multimodal cells per ``site`` (or ``concept``) for each condition, long format.

        Returns
        -------
        DataFrame
            ``condition, <by>, units/candidates, cells, invariant, multimodal``; the shuffle
            rows are the mean over shuffles.
        """
        from neuroprobe.analysis.criterion import summarize

        frames = []
        for cond, table in self.cells.items():
            if cond == "shuffle":
                g = table.groupby("site", sort=False)[["units", "candidates", "cells"]].mean().reset_index()
                if by == "site":
                    frames.append(g.assign(condition=cond))
                continue
            s = summarize(table, by=by).reset_index().rename(columns={"index": by})
            frames.append(s.assign(condition=cond))
        out = pd.concat(frames, ignore_index=True)
        return out[["condition"] + [c for c in out.columns if c != "condition"]]


def cells_with_controls(
    model: str = "organism",
    battery: str = "digits",
    *,
    controls: Sequence[str] = CONTROLS,
    weights: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    cache: str | Path = Path("recordings") / "cache",
    montage: str = "all",
    pooling: str = "mean",
    tokens: bool = False,
    n_shuffles: int = 5,
    quiet: bool = True,
    **criterion: Any,
) -> Study:
    """Record ``model`` (and its untrained twin) on ``battery``, find concept cells and their controls.

    Parameters
    ----------
    model
        A registry name or ``hf:...``.
    battery
        A battery name or folder.
    controls
        Any of ``untrained``, ``rotation``, ``shuffle``.
    weights
        A local weights folder (e.g. an organism trained from another seed).
    seed
        The untrained twin's initialisation seed, the rotation's and the shuffles' seed.
    device
        Torch device (default: cuda when available).
    cache
        Where recordings and tables are kept.
    montage, pooling, tokens
        Recording options.
    n_shuffles
        Label shuffles of the shuffle control.
    quiet
        No progress bars.
    **criterion
        Options of :func:`neuroprobe.concept_cells`.

    Returns
    -------
    Study
    """
    from neuroprobe.experiments.cache import cached_recording
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import load_subject

    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise NeuroprobeError(f"control(s) {', '.join(unknown)} not one of {', '.join(CONTROLS)}.")
    bat = Battery.load(battery)
    modalities = tuple(bat.table["modality"].unique())
    subject = load_subject(model, weights=weights, device=device, quiet=True, modalities=modalities)
    rec = cached_recording(subject, bat, cache=cache, montage=montage, pooling=pooling, tokens=tokens, quiet=quiet)
    crit = dict(criterion)
    crit.setdefault("seed", seed)
    cells = {"trained": cached_cells(rec, quiet=quiet, **crit)}
    study = Study(subject=subject, recording=rec, cells=cells)
    if "untrained" in controls:
        twin = load_subject(model, init="random", seed=seed, device=device, quiet=True, modalities=modalities)
        study.untrained_recording = cached_recording(twin, bat, cache=cache, montage=montage, pooling=pooling,
                                                     tokens=tokens, quiet=quiet)
        cells["untrained"] = cached_cells(study.untrained_recording, quiet=quiet, **crit)
        del twin
    if "rotation" in controls:
        cells["rotation"] = cached_cells(rec, control="rotation", rotation_seed=seed, quiet=quiet, **crit)
    if "shuffle" in controls:
        cells["shuffle"] = cached_cells(rec, control="shuffle", n_shuffles=n_shuffles, quiet=quiet, **crit)
    return study


#: What ``--quick`` changes in :func:`study_from_args`: the rank-sum test's normal approximation
#: instead of the exact permutation p-values, fewer invariance permutations, two label shuffles.
QUICK_CRITERION = {"exact": False, "n_perm": 200}
QUICK_SHUFFLES = 2


def battery_for(args: Any) -> str:
    """The battery an experiment runs on: ``--battery`` when the script has it, else the subject's default."""
    from neuroprobe.subjects.registry import get_spec

    chosen = getattr(args, "battery", None)
    if chosen:
        return str(chosen)
    return get_spec(str(args.model)).default_battery


def study_from_args(args: Any, *, controls: Sequence[str] = CONTROLS, **criterion: Any) -> Study:
    """:func:`cells_with_controls` for an experiment script's parsed options.

    Uses ``--model``, ``--battery`` (when the script has it; else the subject's default
    battery), ``--seed``, ``--device``, ``--cache`` and ``--quiet``; ``--quick`` applies
    :data:`QUICK_CRITERION` and :data:`QUICK_SHUFFLES` (under a few seconds of analysis on
    the organism).  Scripts that ask the same question share the cached recordings and tables.

    Parameters
    ----------
    args
        From :func:`~neuroprobe.experiments.cli.experiment_args`.
    controls
        Controls to run.
    **criterion
        Options of :func:`neuroprobe.concept_cells` (after the quick ones, so they win).

    Returns
    -------
    Study
    """
    quick = bool(getattr(args, "quick", False))
    crit = dict(QUICK_CRITERION) if quick else {}
    crit.update(criterion)
    crit.setdefault("n_shuffles", QUICK_SHUFFLES if quick else 5)
    return cells_with_controls(args.model, battery_for(args), controls=controls, seed=int(args.seed),
                               device=getattr(args, "device", None), cache=getattr(args, "cache", "recordings/cache"),
                               quiet=bool(getattr(args, "quiet", True)), **crit)
