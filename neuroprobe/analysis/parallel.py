"""Scan a recording on a Dask cluster (``--jobs N``, ``--scheduler ADDRESS``), giving the table of one process.

This layer sits above the scan (it imports :mod:`neuroprobe.analysis.scan`, never the reverse):
:func:`run_scan` is the one entry the analyses call, and it decides between one process
(:func:`~neuroprobe.analysis.scan.scan`, no Dask at all) and a cluster (:func:`scan_on`):
a ``distributed.LocalCluster`` of ``jobs`` single-threaded worker processes, or the workers of
an existing scheduler (``client=``).

The work is split by site and by block of units.  Each piece is a run of consecutive blocks of
one site that lies inside one super-block of the one-process stream (see
:mod:`neuroprobe.analysis.stream`); a worker opens the recording itself (read-only, through
:func:`~neuroprobe.recording.reader.open_recording` and its checks; a virtual recording reads the
matching columns of every shard behind it) and reads only its piece: at most ``read_bytes`` at
once per worker thread.  Every per-unit statistic depends only on the unit's own responses and its
site's design (built from the site's valid stimuli, which a first task per site finds exactly as
the one-process stream does; the label-shuffle null is seeded by subset, not by call order), and
the pieces are the one-process stream's own blocks, so each block's numbers are bit for bit those
of one process.  The driver joins the pieces in site and unit order, adds the population sums block
by block in that order, and the multiple-comparison corrections run afterwards on the gathered
arrays: the table equals ``jobs=1`` exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from neuroprobe.analysis.design import Design
from neuroprobe.analysis.invariance import PermutationNull
from neuroprobe.analysis.scan import (
    Gathered, Part, ScanResult, Settings, SiteScan, checked_request, scan, scan_concepts, scan_units,
)
from neuroprobe.analysis.stream import DEFAULT_READ_BYTES, UnitStream
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.recording.reader import Recording, open_recording

#: Pieces of work per worker, at least (smaller pieces balance the load; a piece never spans super-blocks).
PIECES_PER_WORKER = 4


def n_jobs(jobs: int | None) -> int:
    """``jobs`` workers; 0 or a negative number means one per CPU core."""
    if jobs is None:
        return 1
    if jobs <= 0:
        return max(1, os.cpu_count() or 1)
    return int(jobs)


def _distributed():
    """The ``distributed`` package, or the user's mistake in one sentence."""
    try:
        import distributed
    except ImportError:
        raise NeuroprobeError("more than one job (or a Dask scheduler) needs Dask: pip install 'dask[distributed]' "
                              "(or neuroprobe-cells[dask]).") from None
    return distributed


def connect_timeout() -> float:
    """Seconds to wait for a scheduler: Dask's ``distributed.comm.timeouts.connect`` (environment
    ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT``, e.g. ``10s``)."""
    import dask

    return float(dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s"))


def connect(address: str):
    """A ``distributed.Client`` of the scheduler at ``address``, with at least one worker.

    Raises
    ------
    NeuroprobeError
        If the scheduler cannot be reached within :func:`connect_timeout`, or has no worker.
    """
    distributed = _distributed()
    timeout = connect_timeout()
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        why = "it did not answer" if isinstance(err, (TimeoutError, OSError)) else str(err).splitlines()[0]
        raise NeuroprobeError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({why}); start one "
                              f"with `dask scheduler` and its workers with `dask worker ADDRESS --nthreads 1`, or "
                              f"check the address.") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise NeuroprobeError(f"the Dask scheduler at {address} has no workers; start some with "
                              f"`dask worker {address} --nthreads 1`.") from None
    return client


@contextlib.contextmanager
def cluster(jobs: int = 1, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask client for a command: the scheduler at ``scheduler``, a ``LocalCluster`` of ``jobs``
    single-threaded worker processes, or ``None`` (one job: this process, no Dask).  Closed after."""
    if scheduler:
        client = connect(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    if n_jobs(jobs) <= 1:
        yield None
        return
    distributed = _distributed()
    import logging

    import dask

    # fork on Linux: the workers start at once and never re-run the caller's script (a paper script without an
    # ``if __name__ == "__main__"`` guard stays safe); they only open the recording by path and run numpy
    method = "fork" if sys.platform.startswith("linux") else dask.config.get("distributed.worker.multiprocessing-method")
    with dask.config.set({"distributed.worker.multiprocessing-method": method}), \
            distributed.LocalCluster(n_workers=n_jobs(jobs), threads_per_worker=1, processes=True,
                                     dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as local, \
            distributed.Client(local, set_as_default=False) as client:
        yield client


def run_scan(rec: Recording | str | Path, *, sites: Sequence[str] | None = None, jobs: int = 1, client: Any = None,
             quiet: bool = True, transform: str = "shift", **options: Any) -> ScanResult:
    """:func:`~neuroprobe.analysis.scan.scan` in this process, or on a Dask cluster: the same result.

    Parameters
    ----------
    rec
        Recording or path.
    sites
        Sites (default all, montage order).
    jobs
        Worker processes of a local cluster (0: one per core); 1: this process, without Dask.
    client
        A ``distributed.Client`` (or a scheduler's address) to run on instead; every worker must
        see the recording at the same path.
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
    if client is None and n_jobs(jobs) <= 1:
        res = scan(rec, sites=names, quiet=quiet, transform=transform, **options)
    elif isinstance(client, str):
        with cluster(scheduler=client) as c:
            res = scan_on(c, rec, names, quiet=quiet, transform=transform, **options)
    elif client is not None:
        res = scan_on(client, rec, names, quiet=quiet, transform=transform, **options)
    else:
        with cluster(jobs) as c:
            res = scan_on(c, rec, names, quiet=quiet, transform=transform, **options)
    if res.skipped and res.table.empty:
        raise RecordingError(f"{rec.path} holds no recorded stimulus for {', '.join(res.skipped)} (it covers "
                             f"{rec.n_done} of {rec.n_stimuli} stimuli); nothing to analyse.")
    return res


# ------------------------------------------------------------------ on the workers
_OPEN: dict[tuple, Recording] = {}
_NULLS: dict[tuple[int, int], PermutationNull] = {}


def _recording(path: str, size: int | None = None) -> Recording:
    """The recording at ``path``, opened once per worker process (again if the file changed); ``size``: the
    file's size where the driver reads it (a different file at the same path is refused)."""
    try:
        st = os.stat(path)
    except OSError:
        raise NeuroprobeError(f"the Dask worker on {socket.gethostname()} cannot read {path}: the recording's path "
                              f"must be visible on every worker (the same path, e.g. on a shared file system).") from None
    if size is not None and st.st_size != size:
        raise NeuroprobeError(f"the Dask worker on {socket.gethostname()} sees another file at {path} ({st.st_size:,} "
                              f"bytes, not {size:,}): the recording's path must lead to the same file on every worker.")
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _OPEN:
        stale = [k for k in _OPEN if k[0] == path] + list(_OPEN)[:-1]  # a changed file, and all but the newest
        for old in dict.fromkeys(stale):
            with contextlib.suppress(Exception):
                _OPEN.pop(old).close()
        _OPEN[key] = open_recording(path)
    return _OPEN[key]


def _one_thread():
    """BLAS/OpenMP limited to one thread in a task (a worker forked from a process whose BLAS had started its
    threads keeps them; the workers are single-threaded by design)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _valid_task(path: str, size: int | None, site: str, read_bytes: int) -> np.ndarray:
    """The site's valid stimuli, as the one-process stream finds them."""
    return UnitStream(_recording(path, size).responses(site), read_bytes=read_bytes).first_valid()


def _piece_task(path: str, size: int | None, piece: "Piece", valid: np.ndarray, settings: Settings,
                labels: np.ndarray | None, read_bytes: int, block_units: int | None) -> Part:
    """The statistics of one piece of a site."""
    key = (settings.n_perm, settings.seed)
    if key not in _NULLS:
        _NULLS[key] = PermutationNull(settings.n_perm, settings.seed)
    with _one_thread():
        return scan_units(_recording(path, size), piece.site, valid, piece.lo, piece.hi, settings, null=_NULLS[key],
                          labels=labels, read_bytes=read_bytes, block_units=block_units)


# ------------------------------------------------------------------ on the driver
@dataclass(frozen=True)
class Piece:
    """Units ``lo:hi`` of ``site``: whole blocks of the one-process stream inside one of its super-blocks."""

    site: str
    lo: int
    hi: int
    first: bool  # starts a super-block (counted as one pass)


def plan(n_units: int, width: int, block: int, target: int) -> list[tuple[int, int, bool]]:
    """Pieces of a site of ``n_units``: super-blocks of ``width`` units cut into runs of whole blocks of
    ``block`` units, about ``target`` units each (never more than a super-block)."""
    per = max(1, math.ceil(target / block)) * block
    out = []
    for a in range(0, n_units, width):
        b = min(a + width, n_units)
        out += [(lo, min(lo + per, b), lo == a) for lo in range(a, b, per)]
    return out


def _workers(client: Any) -> int:
    info = client.scheduler_info()
    return max(1, sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values()))


def _failure(err: BaseException, what: str) -> NeuroprobeError:
    if isinstance(err, NeuroprobeError):
        return err
    name = type(err).__name__
    if name == "KilledWorker":
        return NeuroprobeError(f"a Dask worker died while scanning {what} (out of memory?); give workers more "
                               f"memory or use fewer threads per worker.")
    text = str(err).splitlines()[0] if str(err) else name
    return NeuroprobeError(f"scanning {what} on a Dask worker failed ({name}: {text}).")


def scan_on(client: Any, rec: Recording, names: Sequence[str], *, quiet: bool = True, transform: str = "shift",
            criterion: bool = True, k: float = 5.0, alpha: float = 0.05, n_perm: int = 1000, seed: int = 0,
            labels: np.ndarray | None = None, read_bytes: int | None = None, block_units: int | None = None,
            exact: bool = True, fdr: float = 0.05, family: str = "units", margin: float | None = None,
            budget: float | None = None) -> ScanResult:
    """:func:`~neuroprobe.analysis.scan.scan` of ``names`` on the workers of ``client`` (see the module docstring).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    rec
        The recording (its path is opened by every worker).
    names
        Sites, in the order of the result.
    quiet
        No progress bar.
    transform, criterion, k, alpha, n_perm, seed, labels, read_bytes, block_units, exact, fdr, family, margin, budget
        As :func:`~neuroprobe.analysis.scan.scan`.
    """
    distributed = _distributed()
    settings = Settings(transform=transform, criterion=criterion, k=k, n_perm=n_perm, seed=seed, exact=exact, fdr=fdr,
                        family=family, margin=margin, **({} if budget is None else {"budget": budget}))
    read_bytes = int(read_bytes or DEFAULT_READ_BYTES)
    path = str(Path(rec.path).resolve())
    # the open file's size, to catch another file at the same path on a worker (a live recording grows)
    size = rec.file_size if rec.complete else None
    labels = None if labels is None else np.asarray(labels)
    stimuli, concepts = rec.stimuli.reset_index(drop=True), scan_concepts(rec, labels)
    kinds = dict(zip(rec.sites["site"], rec.sites["kind"]))
    streams = {s: UnitStream(rec.responses(s), read_bytes=read_bytes, block_units=block_units) for s in names}
    live = [s for s in names if streams[s].n_units and streams[s].n_rows]
    futures: list[Any] = []
    bar = None
    try:
        # 1. each site's valid stimuli (they fix its design and its blocks), found by the workers
        found = [client.submit(_valid_task, path, size, s, read_bytes, pure=False) for s in live]
        futures += found
        valid: dict[str, np.ndarray] = {}
        for s, fut in zip(live, found):
            try:
                valid[s] = np.asarray(fut.result(), dtype=bool)
            except Exception as err:  # noqa: BLE001 - any worker failure ends in one sentence
                raise _failure(err, f"site {s}") from None
        skipped = [s for s in live if not valid[s].any()]  # none of its stimuli recorded yet
        live = [s for s in live if s not in skipped]
        # 2. the pieces, about PIECES_PER_WORKER per worker, in site and unit order
        target = max(1, math.ceil(sum(streams[s].n_units for s in live) / (PIECES_PER_WORKER * _workers(client))))
        pieces: list[Piece] = []
        for s in live:
            st = streams[s]
            pieces += [Piece(s, lo, hi, first) for lo, hi, first in
                       plan(st.n_units, st.width(), st.block_units(int(valid[s].sum())), target)]
        labels_f = client.scatter(labels, broadcast=True) if labels is not None and pieces else labels
        valid_f = {s: client.scatter(v, broadcast=True) for s, v in valid.items()}
        parts = [client.submit(_piece_task, path, size, p, valid_f[p.site], settings, labels_f, read_bytes, block_units,
                               pure=False) for p in pieces]
        futures += parts
        index = {f.key: i for i, f in enumerate(parts)}
        # 3. gather in order: each site's pieces are added to it in unit order, as they become available
        bar = tqdm(total=len(pieces), unit="block", desc=("cells" if criterion else "indices")
                   + f" ({_workers(client)} workers)", disable=quiet, dynamic_ncols=True)
        done: dict[int, Part] = {}
        gathered = Gathered(concepts)
        gathered.skipped += skipped
        acc: SiteScan | None = None
        nxt = 0
        for fut in distributed.as_completed(parts, loop=client.loop):
            i = index[fut.key]
            try:
                done[i] = fut.result()
            except Exception as err:  # noqa: BLE001
                p = pieces[i]
                raise _failure(err, f"units {p.lo}-{p.hi - 1} of site {p.site}") from None
            fut.release()
            bar.update(1)
            while nxt in done:
                p, part = pieces[nxt], done.pop(nxt)
                if acc is None or acc.site != p.site:
                    acc = SiteScan(p.site, kinds.get(p.site, ""), Design.build(stimuli, valid[p.site], concepts,
                                                                                 labels), settings)
                acc.add(part)
                gathered.passes += int(p.first)
                nxt += 1
                if nxt == len(pieces) or pieces[nxt].site != p.site:
                    gathered.add(acc)
                    acc = None
        return gathered.result()
    finally:
        if bar is not None:
            bar.close()
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
