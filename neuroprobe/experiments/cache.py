"""Recordings and trained organisms made once and reused while their provenance holds.

An experiment script may run many times (a quick run, the full run, a figure tweak); the
recording it needs is the same each time.  :func:`cached_recording` keys a recording by
everything that decides its contents — the :class:`~neuroprobe.recording.recorder.Recorder`'s
identity (subject, checkpoint with its weights' hash, init, seed, battery name and content
hash, montage, pooling, tokens, dtype, sites) and the neuroprobe and file-format versions —
so a changed battery, other weights or a new release records afresh, and an interrupted
recording resumes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from neuroprobe.errors import NeuroprobeError


def cache_key(identity: dict[str, Any]) -> str:
    """A short hash of a recording's identity plus the library and format versions."""
    import neuroprobe
    from neuroprobe.recording import schema

    blob = dict(identity, neuroprobe=neuroprobe.__version__, format_version=schema.FORMAT_VERSION)
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cached_recording(
    subject: Any,
    battery: Any,
    *,
    cache: str | Path = Path("recordings") / "cache",
    montage: str = "all",
    pooling: str = "mean",
    tokens: bool = False,
    batch_size: int = 64,
    quiet: bool = True,
):
    """Record ``subject`` on ``battery`` into the cache, or open the recording already there.

    Parameters
    ----------
    subject
        A loaded subject (:func:`neuroprobe.load_subject`).
    battery
        A :class:`~neuroprobe.stimuli.battery.Battery` or its name.
    cache
        The cache folder (created).
    montage, pooling, tokens, batch_size
        Recorder options (part of the key, except that ``batch_size`` only cuts the commits).
    quiet
        No progress bar.

    Returns
    -------
    Recording
        Opened for reading; its file is ``<cache>/<subject>[-random]_<battery>_<key>.h5``.
    """
    from neuroprobe.recording.entry import record
    from neuroprobe.recording.reader import open_recording
    from neuroprobe.recording.recorder import Recorder
    from neuroprobe.stimuli.battery import Battery

    if not isinstance(battery, Battery):
        battery = Battery.load(battery)
    recorder = Recorder(subject, battery, montage=montage, pooling=pooling, tokens=tokens,
                        batch_size=batch_size, quiet=quiet)
    key = cache_key(recorder.identity())
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{subject.name.replace(':', '_').replace('/', '_')}{'-random' if subject.init == 'random' else ''}"
    path = cache / f"{stem}_{battery.name}_{key}.h5"
    if path.exists():
        with open_recording(path) as rec:
            done = rec.complete
        if done:
            return open_recording(path)
    return record(subject, battery, path, resume=path.exists(), montage=montage, pooling=pooling, tokens=tokens,
                  batch_size=batch_size, quiet=quiet)


def organism_weights(seed: int, *, steps: int = 1000, cache: str | Path = Path("recordings") / "cache",
                     quiet: bool = True) -> Path | None:
    """The weights of the organism trained from ``seed``: trained once, then reused.

    Seed 0 with the committed recipe is the committed organism (``None`` is returned:
    load it without ``weights``).  Other seeds are trained with the committed recipe on
    one CPU thread (bitwise reproducible per thread count) into
    ``<cache>/organisms/seed-<seed>-steps-<steps>/``, written under a temporary name and
    renamed when complete, so an interrupted training leaves nothing half-written.

    Parameters
    ----------
    seed
        Training seed.
    steps
        Optimiser steps (the committed organism uses 1000; fewer for quick runs).
    cache
        The cache folder.
    quiet
        No progress bar.

    Returns
    -------
    Path or None
        A folder to pass as ``load_subject("organism", weights=...)``.
    """
    from neuroprobe.subjects.organism.train import train_organism

    if seed < 0 or steps < 1:
        raise NeuroprobeError(f"an organism needs a seed >= 0 and steps >= 1, not seed={seed}, steps={steps}.")
    if seed == 0 and steps == 1000:
        return None
    folder = Path(cache) / "organisms" / f"seed-{seed}-steps-{steps}"
    if (folder / "organism.safetensors").is_file() and (folder / "card.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".seed-{seed}-", dir=folder.parent))
    try:
        train_organism(seed=seed, steps=steps, out=tmp, n_threads=1, progress=not quiet)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
