"""Copies of the stimuli in one readout call: lesion replicas, and the state each needs.

A replica-safe readout (:func:`~neuroprobe.subjects.base.replica_safe`) is called with
its stimuli tiled once per lesion.  When it also runs per-call state through the model
(the organism's prompts and reference images, CLIP's prompts when no intact copy was
prepared), that state must go through each replica's own lesion: the readout encodes it
once per copy of the stimuli, in the copy's place in the pass, and needs to know how many
copies it was given.  :func:`stimulus_copies` reads that off the rows themselves, so no
caller has to say it.

Integrated gradients (:mod:`neuroprobe.lesions.attribution`) also tile the stimuli (one
copy per step) but edit only the stimuli's own rows; inside :func:`shared_state` the
copies share one encoding of the state, as a plain call does.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

_SHARED: ContextVar[bool] = ContextVar("neuroprobe_copies_share_state", default=False)


def stimulus_copies(stimuli: pd.DataFrame) -> int:
    """How many identical copies, one after another, ``stimuli`` consists of (1: none repeats).

    With ``L`` replicas of ``B`` rows this is a multiple of ``L`` (the smallest whole
    period divides ``B``), so every replica's rows hold whole copies; on an untiled call it
    is 1 unless the rows themselves repeat, which changes nothing but the batch size.
    Always 1 inside :func:`shared_state`.
    """
    n = len(stimuli)
    if n < 2 or _SHARED.get():
        return 1
    try:
        h = pd.util.hash_pandas_object(stimuli, index=False).to_numpy()
    except (TypeError, ValueError):  # unhashable cells (lists): compare their text
        h = pd.util.hash_pandas_object(stimuli.astype(str), index=False).to_numpy()
    return _copies(n, lambda p: np.array_equal(h[p:], h[:-p]) and stimuli.iloc[p:].reset_index(drop=True).equals(
        stimuli.iloc[:-p].reset_index(drop=True)))


def _copies(n: int, shifted_equal: Callable[[int], bool]) -> int:
    """``n // p`` for the smallest period ``p`` dividing ``n`` for which the sequence equals itself shifted by
    ``p`` (``shifted_equal(p)``), or 1."""
    for period in range(1, n // 2 + 1):
        if n % period == 0 and shifted_equal(period):
            return n // period
    return 1


def text_copies(texts: Sequence[str]) -> int:
    """How many identical copies, one after another, the list ``texts`` consists of (1: none repeats).

    Tokenizing is pure, so a readout may tokenize one copy and repeat its tensors: the same
    ids, masks and padding as tokenizing every copy (stimuli tiled once per lesion replica).
    """
    texts = list(texts)
    return _copies(len(texts), lambda p: texts[p:] == texts[:-p])


def tokenize_copies(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> Any:
    """``tokenizer(texts, **kwargs)`` (tensors), tokenizing one copy when ``texts`` repeats (:func:`text_copies`)."""
    texts = list(texts)
    k = text_copies(texts)
    enc = tokenizer(texts[: len(texts) // k], **kwargs)
    if k > 1:
        for key in list(enc.keys()):
            v = enc[key]
            if hasattr(v, "repeat") and getattr(v, "dim", lambda: 0)() >= 1:
                enc[key] = v.repeat(k, *([1] * (v.dim() - 1)))
    return enc


@contextmanager
def shared_state() -> Iterator[None]:
    """Inside this block the copies of a call's stimuli are not lesion replicas: per-call state is
    encoded once for all of them (:func:`stimulus_copies` is 1)."""
    token = _SHARED.set(True)
    try:
        yield
    finally:
        _SHARED.reset(token)
