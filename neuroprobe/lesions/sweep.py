"""Lesion sweeps across processes: under ``torchrun``, each rank evaluates its share of every list of lesions.

A forgetting matrix, a dose-response and its random-lesion null evaluate lists of lesions
that do not depend on one another.  Inside :func:`across_ranks` (which ``neuroprobe
lesion`` enters when launched with ``WORLD_SIZE`` above 1), every call of
:meth:`~neuroprobe.lesions.forgetting.LesionStudy.evaluate_many` and
:meth:`~neuroprobe.lesions.forgetting.LesionStudy.scores_many` goes through
:func:`evaluate`: rank *r* of *n* evaluates the contiguous share
:func:`neuroprobe.distributed.share` of the list on its own device, and the shares are
gathered (``all_gather_object`` over gloo) so that every rank holds every result, in the
list's order.

Every rank runs the whole study with the same seed: lesion lists (random draws
included) are drawn identically on every rank and only their evaluation is split, and
every rank takes the same decisions from the gathered results (e.g. when sequential
random draws stop).  Each lesion is evaluated exactly as in one process, so the numbers
equal a one-process run's at the same number of threads per process (``torchrun`` sets
``OMP_NUM_THREADS=1``).  Only rank 0 writes and prints (the command's business).

When a rank's share fails, every rank raises: the failing rank its own exception, the
others a :class:`~neuroprobe.errors.NeuroprobeError` naming that rank (or the very same
sentence, when the failure was a ``NeuroprobeError``, as a one-process run would say).
Outside :func:`across_ranks`, or in one process, :func:`evaluate` simply calls its
function on the whole list.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from neuroprobe.distributed import Group, World, share, world
from neuroprobe.errors import NeuroprobeError

T = TypeVar("T")

#: The job and its process group while a sweep is split across ranks.
_ACTIVE: ContextVar[tuple[World, Group] | None] = ContextVar("neuroprobe_lesion_sweep", default=None)
#: True while this rank evaluates its share (a nested call evaluates locally: the others are not there).
_IN_SHARE: ContextVar[bool] = ContextVar("neuroprobe_lesion_share", default=False)


@contextmanager
def across_ranks(w: World | None = None) -> Iterator[World]:
    """Split the lesion evaluations of the block across the ranks of a ``torchrun`` job (one process: no change).

    Every rank must run the same study (same subject, battery, cells, seed and calls) inside
    the block.  Yields the :class:`~neuroprobe.distributed.World` (``primary`` is the rank
    that should write results).
    """
    w = w or world()
    if not w.distributed:
        yield w
        return
    group = Group()
    token = _ACTIVE.set((w, group))
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # unwind (staged outputs removed) when torchrun stops us
    try:
        yield w
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _ACTIVE.reset(token)
        group.close()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise NeuroprobeError("stopped by SIGTERM (torchrun stops every rank when one of them fails).")


def evaluate(fn: Callable[[Sequence[T], Any], Any], lesions: Sequence[T], progress: Any = None) -> Any:
    """``fn(lesions, progress)``, split across the ranks of an active :func:`across_ranks`.

    Parameters
    ----------
    fn
        Evaluates a list of lesions, calling ``progress(n)`` (when not ``None``) as lesions
        finish; returns one result per lesion, as a list or as an array with one row each.
    lesions
        The lesions (identical on every rank).
    progress
        Called with the number of lesions finished; this rank's own as they finish, the
        other ranks' once their shares arrive.

    Returns
    -------
    list or numpy.ndarray
        The results of all ``lesions`` in order, on every rank.
    """
    active = _ACTIVE.get()
    if active is None or _IN_SHARE.get() or len(lesions) == 0:
        return fn(lesions, progress)
    w, group = active
    start, stop = share(len(lesions), w)
    mine, error, failure = None, None, None
    token = _IN_SHARE.set(True)
    try:
        if stop > start:
            mine = fn(lesions[start:stop], progress)
    except Exception as err:  # reported to every rank below; KeyboardInterrupt ends this rank (torchrun ends the job)
        failure = err
        error = (isinstance(err, NeuroprobeError), f"{type(err).__name__}: {err}" if not isinstance(err, NeuroprobeError)
                 else str(err))
    finally:
        _IN_SHARE.reset(token)
    try:
        parts = group.gather((error, mine))
    except RuntimeError as err:  # a peer died (gloo: connection closed) or the job was torn down
        raise NeuroprobeError(f"another rank of the torchrun job stopped while lesions were being evaluated ({err}).") from None
    failed = [(r, e) for r, (e, _) in enumerate(parts) if e is not None]
    if failed:
        rank, (user_error, text) = failed[0]
        if failure is not None and rank == w.rank:
            raise failure
        if user_error:
            raise NeuroprobeError(text)
        raise NeuroprobeError(f"rank {rank} of {w.size} failed while evaluating its share of the lesions ({text}); "
                              f"its own error output says more.")
    if progress is not None and len(lesions) > stop - start:
        progress(len(lesions) - (stop - start))
    done = [p for _, p in parts if p is not None]
    if isinstance(done[0], np.ndarray):
        return np.concatenate(done, axis=0)
    return [x for p in done for x in p]
