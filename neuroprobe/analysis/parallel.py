"""Scan a recording's sites in parallel processes (``--jobs N``), giving the table of one process.

This layer sits above the scan (it imports :mod:`neuroprobe.analysis.scan`, never the reverse):
:func:`run_scan` is the one entry the analyses call, and it decides between one process
(:func:`~neuroprobe.analysis.scan.scan`) and the pool (:func:`scan_sites`).

Every per-unit statistic of :func:`neuroprobe.analysis.scan.scan` depends only on
the unit's own site (the design is built from the site's valid rows; the
label-shuffle null is seeded by subset, not by call order), and the
multiple-comparison corrections run afterwards on the gathered arrays.  So the
sites can be scanned independently — each worker opens the recording by path and
runs ``scan(path, sites=[site])`` with the same memory knobs (memory stays bounded
per worker: ``read_bytes`` each) — and the results joined in site order equal
a one-process scan exactly.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from neuroprobe.analysis.scan import ScanResult, checked_request, scan
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.recording.reader import Recording


def n_jobs(jobs: int | None) -> int:
    """``jobs`` processes; 0 or a negative number means one per CPU core."""
    if jobs is None:
        return 1
    if jobs <= 0:
        return max(1, os.cpu_count() or 1)
    return int(jobs)


def _context() -> mp.context.BaseContext:
    """``fork`` where there is one: workers start at once and never re-run the caller's script
    (a paper script without an ``if __name__ == "__main__"`` guard stays safe); they only
    read HDF5 by path and run numpy, never the parent's open files or torch."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def run_scan(rec: Recording | str | Path, *, sites: Sequence[str] | None = None, jobs: int = 1, quiet: bool = True,
             transform: str = "shift", **options: Any) -> ScanResult:
    """:func:`~neuroprobe.analysis.scan.scan` in this process, or its sites in ``jobs`` processes: the same result.

    Parameters
    ----------
    rec
        Recording or path.
    sites
        Sites (default all, montage order).
    jobs
        Worker processes (0: one per core); with one job or one site, this process.
    quiet
        No progress bar.
    transform, **options
        The other options of :func:`~neuroprobe.analysis.scan.scan`.

    Sites none of whose stimuli an unfinished recording holds yet are left out and named in
    ``ScanResult.skipped``.

    Raises
    ------
    RecordingError
        If every site asked for is left out that way (nothing to analyse).
    """
    rec, names = checked_request(rec, sites, transform)
    if n_jobs(jobs) > 1 and len(names) > 1:
        res = scan_sites(rec.path, names, n_jobs(jobs), quiet=quiet,
                         unit_counts=[int(rec.responses(s).shape[1]) for s in names], transform=transform, **options)
    else:
        res = scan(rec, sites=names, quiet=quiet, transform=transform, **options)
    if res.skipped and res.table.empty:
        raise RecordingError(f"{rec.path} holds no recorded stimulus for {', '.join(res.skipped)} (it covers "
                             f"{rec.n_done} of {rec.n_stimuli} stimuli); nothing to analyse.")
    return res


def _scan_one(path: str, site: str, options: dict[str, Any]) -> ScanResult:
    return scan(path, sites=[site], quiet=True, **options)


def scan_sites(path: str | Path, sites: Sequence[str], jobs: int, *, quiet: bool = True,
               unit_counts: Sequence[int] | None = None, **options: Any) -> ScanResult:
    """Run :func:`~neuroprobe.analysis.scan.scan` over ``sites`` in ``jobs`` processes and join the results.

    Parameters
    ----------
    path
        The recording file (each worker opens it).
    sites
        Sites, in the order of the result.
    jobs
        Worker processes.
    quiet
        No progress bar.
    unit_counts
        Units per site (for the progress bar).
    **options
        The other :func:`scan` options (transform, criterion, k, n_perm, seed, labels, ...).
    """
    sites = list(sites)
    counts = list(unit_counts) if unit_counts is not None else [1] * len(sites)
    results: dict[int, ScanResult] = {}
    bar = tqdm(total=int(sum(counts)), unit="unit", desc=("cells" if options.get("criterion", True) else "indices")
               + f" ({jobs} jobs)", disable=quiet, dynamic_ncols=True)
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(sites)) or 1, mp_context=_context()) as pool:
            futures = {pool.submit(_scan_one, str(path), site, options): i for i, site in enumerate(sites)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except NeuroprobeError:
                        raise
                    except Exception as err:  # a worker died (e.g. out of memory)
                        raise NeuroprobeError(f"scanning site {sites[i]} in a worker process failed ({err}); "
                                              f"retry with fewer --jobs.") from None
                    bar.update(counts[i])
    finally:
        bar.close()
    parts = [results[i] for i in range(len(sites))]
    tables = [r.table for r in parts if len(r.table.columns)]
    pops = [r.population for r in parts if len(r.population.columns)]
    forms: list[str] = []
    mods: list[str] = []
    pairs: dict[str, list] = {}
    for r in parts:
        forms += [f for f in r.forms if f not in forms]
        mods += [m for m in r.modalities if m not in mods]
        for name, v in r.pairs.items():
            pairs.setdefault(name, []).append(v)
    return ScanResult(
        table=pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(),
        population=pd.concat(pops, ignore_index=True) if pops else pd.DataFrame(),
        concepts=parts[0].concepts if parts else [],
        forms=forms, modalities=mods,
        pairs={name: np.concatenate(v) for name, v in pairs.items()},
        passes=sum(r.passes for r in parts),
        screening={site: v for r in parts for site, v in getattr(r, "screening", {}).items()},
        testing={site: v for r in parts for site, v in r.testing.items()},
        cutoffs={site: v for r in parts for site, v in r.cutoffs.items()},
        skipped=[site for r in parts for site in r.skipped],
    )
