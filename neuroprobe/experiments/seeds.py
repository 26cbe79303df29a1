"""Replicates of a subject trained from different seeds, and intervals across them.

Claims about "a unit of a network" (selectivity against importance, universal units) are
claims about a training run unless they hold across runs.  :func:`replicates` gives the
runs an experiment compares: organisms trained from seeds ``0 .. n-1`` (seed 0 with the
committed recipe is the committed organism; the others are trained once into the cache by
:func:`~neuroprobe.experiments.cache.organism_weights`), or a comma-separated list of
subjects that are one model trained from several seeds (``hf:google/multiberts-seed_0,
hf:google/multiberts-seed_1``).  :func:`seed_interval` summarises a number measured once
per run: its mean and a t-interval over runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neuroprobe.errors import NeuroprobeError


@dataclass(frozen=True)
class Replicate:
    """One training run of a subject.

    Attributes
    ----------
    label
        How figures and tables name it (``seed 3``, or the model's name).
    seed
        The training seed (for a list of models: its position in the list).
    model
        The registry name to load.
    weights
        A local weights folder (``None``: the registry's own weights).
    steps
        Training steps (organisms trained here), else ``None``.
    """

    label: str
    seed: int
    model: str
    weights: Path | None = None
    steps: int | None = None

    def load(self, *, init: str = "pretrained", device: str | None = None, heads: bool = True,
             modalities: Sequence[str] | None = None) -> Any:
        """Load this run (``init="random"``: its untrained twin, initialised from :attr:`seed`)."""
        from neuroprobe.subjects.registry import load_subject

        weights = self.weights if init == "pretrained" else None
        return load_subject(self.model, init=init, weights=weights, device=device, seed=self.seed, heads=heads,
                            quiet=True, modalities=tuple(modalities) if modalities else None)


def replicates(model: str, n_seeds: int, *, steps: int = 1000, cache: str | Path = Path("recordings") / "cache",
               minimum: int = 1, quiet: bool = True) -> list[Replicate]:
    """The training runs an across-seeds experiment compares.

    Parameters
    ----------
    model
        ``organism`` (trained here from seeds ``0 .. n_seeds-1``), a comma-separated list of
        subjects that are one model trained from several seeds, or one subject (one run).
    n_seeds
        Organisms to train (ignored for a list of subjects).
    steps
        Training steps of each organism (1000 is the committed recipe; fewer only for quick runs).
    cache
        Where trained organisms are kept (``<cache>/organisms``) and reused.
    minimum
        The fewest runs the experiment needs; fewer end in one clear error.
    quiet
        No training progress bars.

    Returns
    -------
    list of Replicate
    """
    names = [m.strip() for m in model.split(",") if m.strip()]
    if not names:
        raise NeuroprobeError("give --model a subject name (or a comma-separated list of seeds of one model).")
    if names == ["organism"]:
        if n_seeds < 1:
            raise NeuroprobeError(f"--seeds must be at least 1, not {n_seeds}.")
        from neuroprobe.experiments.cache import organism_weights

        runs = [Replicate(f"seed {s}", s, "organism", organism_weights(s, steps=steps, cache=cache, quiet=quiet), steps)
                for s in range(n_seeds)]
    else:
        from neuroprobe.subjects.registry import get_spec

        for n in names:
            get_spec(n)  # an unknown name fails here, in one sentence
        runs = [Replicate(n, i, n) for i, n in enumerate(names)]
    if len(runs) < minimum:
        raise NeuroprobeError(
            f"this experiment compares at least {minimum} training runs, and {model!r} gives {len(runs)}: use the "
            f"organism (trained here from --seeds N seeds) or list several seeds of one model, e.g. "
            f"--model hf:google/multiberts-seed_0,hf:google/multiberts-seed_1.")
    return runs


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a number measured once per run and its t-interval over runs.

    ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)`` (NaN values are left out); with one
    run the interval is ``(nan, nan)``.

    Returns
    -------
    mean, low, high
    """
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half
