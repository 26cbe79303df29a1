"""Many lesions scored by one call of a subject's own readout: stimuli tiled once per lesion.

The generic way to evaluate ``L`` lesions at once, for any subject whose readout is
marked :func:`~neuroprobe.subjects.base.replica_safe`: tile the evaluation rows
``L`` times (replica-major), install :func:`~neuroprobe.lesions.staged.replica_edits`
(replica ``l`` edits only its own rows) and call the readout once.  No per-family
code: what a subject needs is a replica-safe readout.

:func:`single_scores` is the reference it must equal: each lesion on its own,
through :func:`~neuroprobe.lesions.lesion.lesion`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Subject

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery


def readout_function(subject: Subject, readout: str | None) -> Any:
    """The subject's readout function for ``readout`` (default: its default readout)."""
    name = readout or subject.default_readout
    if name not in subject.readouts:
        raise NeuroprobeError(
            f"subject {subject.name!r} has no readout {name!r}; it has {', '.join(subject.readouts) or 'none'}."
        )
    return subject.readouts[name]


def is_replica_safe(subject: Subject, readout: str | None) -> bool:
    """Whether ``subject``'s ``readout`` is marked :func:`~neuroprobe.subjects.base.replica_safe`."""
    return bool(getattr(readout_function(subject, readout), "replica_safe", False))


def tile(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """``rows`` repeated ``n`` times, replica-major (copy ``l`` is rows ``l*len(rows) ..``)."""
    return pd.concat([rows] * n, ignore_index=True) if n > 1 else rows.reset_index(drop=True)


def replica_scores(
    subject: Subject,
    battery: "Battery",
    rows: pd.DataFrame,
    lesions: Sequence[Mapping[str, np.ndarray]],
    mode: str = "zero",
    *,
    readout: str | None = None,
    factor: float | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Readout scores ``[len(lesions), len(rows)]``, every lesion in one call of the readout.

    Parameters
    ----------
    subject, battery
        The subject and the battery ``rows`` come from.
    rows
        Evaluation stimuli (one forward pass of ``len(lesions) * len(rows)`` rows).
    lesions
        ``site -> unit indices`` per lesion.
    mode, factor, reference, seed
        As for :func:`~neuroprobe.lesions.staged.replica_edits`: ``zero``, ``mean``,
        ``scale`` or ``resample`` (``reference``: site -> ``[n_ref, n_units]``
        responses; each replica draws from its own generator seeded with ``seed``,
        one draw per row of its copy at each edit, so it draws what :func:`single_scores`
        draws for that lesion with the same ``seed``: the same numbers).
    readout
        Readout name (default: the subject's default); it must be replica-safe.
    """
    from neuroprobe.lesions.lesion import resolve_sites
    from neuroprobe.lesions.staged import replica_edits

    fn = readout_function(subject, readout)
    if not getattr(fn, "replica_safe", False):
        raise NeuroprobeError(f"readout {readout or subject.default_readout!r} of subject {subject.name!r} is not "
                              "replica-safe; evaluate its lesions one at a time.")
    n_rep = len(lesions)
    if n_rep == 0:
        return np.zeros((0, len(rows)))
    edits = replica_edits(lesions, mode, factor=factor, reference=reference, seed=seed)
    sites = resolve_sites(subject, list(edits))
    with torch.inference_mode(), Electrodes(subject.model, sites, read=False, edits=edits):
        scores = np.asarray(fn(subject, tile(rows, n_rep), battery), dtype=np.float64)
    return scores.reshape(n_rep, len(rows))


def single_scores(
    subject: Subject,
    battery: "Battery",
    rows: pd.DataFrame,
    lesions: Sequence[Mapping[str, np.ndarray]],
    mode: str = "zero",
    *,
    readout: str | None = None,
    factor: float | None = None,
    reference: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """The reference for :func:`replica_scores`: each lesion on its own, ``[len(lesions), len(rows)]``."""
    from neuroprobe.lesions.lesion import lesion

    fn = readout_function(subject, readout)
    out = np.zeros((len(lesions), len(rows)))
    for i, units in enumerate(lesions):
        with lesion(subject, units, mode, factor=factor, reference=reference, seed=seed), torch.inference_mode():
            out[i] = np.asarray(fn(subject, rows.reset_index(drop=True), battery), dtype=np.float64)
    return out
