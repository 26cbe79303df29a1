"""The descriptive indices of a recording's units and stimuli (no concept-cell criterion).

Both stream the recording through the scan (:func:`neuroprobe.analysis.parallel.run_scan`, so
``jobs`` works as for concept cells); the definitions of the indices are in
:mod:`neuroprobe.analysis.indices`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from neuroprobe.analysis.parallel import run_scan
from neuroprobe.recording.reader import Recording


def unit_indices(
    rec: Recording | str | Path,
    *,
    sites: Sequence[str] | None = None,
    transform: str = "shift",
    quiet: bool = True,
    read_bytes: int | None = None,
    block_units: int | None = None,
    jobs: int = 1,
    client: Any = None,
) -> pd.DataFrame:
    """The standard indices of every unit of every site, streamed from the recording.

    Parameters
    ----------
    rec
        A recording or its path.
    sites
        Sites to analyse (default: all, in recording order).
    transform
        Non-negative transform for selectivity and sparseness: ``shift`` or ``clip``.
    quiet
        No progress bar.
    read_bytes, block_units
        Memory knobs of the stream (see :mod:`neuroprobe.analysis.stream`).
    jobs, client
        Scan on a local Dask cluster of ``jobs`` worker processes, or on ``client`` (see
        :func:`~neuroprobe.analysis.criterion.concept_cells`); same table as ``jobs=1``.

    Returns
    -------
    DataFrame
        One row per unit: ``site, unit, kind, n_stimuli, dead, transform``, the class
        means ``mean:<concept>``, ``si, si_morcos, lifetime_sparseness, kurtosis`` (all the
        site's stimuli), and ``pref_concept`` (largest mean on the screening split) with its
        ``d_prime`` and ``auc`` measured on the testing split (selected on one split,
        measured on the other).
    """
    return run_scan(rec, sites=sites, transform=transform, criterion=False, quiet=quiet, read_bytes=read_bytes,
                    block_units=block_units, jobs=jobs, client=client).table


def population_sparseness(
    rec: Recording | str | Path,
    *,
    sites: Sequence[str] | None = None,
    transform: str = "shift",
    quiet: bool = True,
) -> pd.DataFrame:
    """Vinje–Gallant sparseness over the (live) units of each site, per stimulus.

    Returns
    -------
    DataFrame
        One row per site and stimulus: ``site, index, id, concept, form, modality, split,
        n_units, population_sparseness``.
    """
    return run_scan(rec, sites=sites, transform=transform, criterion=False, quiet=quiet).population
