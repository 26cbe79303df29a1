"""Shared steps of the experiment scripts in ``analyses/``.

Every script in ``analyses/`` is one experiment of the field (Quiroga's concept cells,
Goh's typographic attack, Bau's rotation control, Morcos' selectivity against
importance, ...).  What they have in common lives here, not in copies across scripts:

* :func:`experiment_args` — the options every script takes (``--model``, ``--out``,
  ``--quick``, ``--seed``, ``--device``, ``--quiet``);
* :func:`cached_recording` — record a subject on a battery once and reuse the file
  while its provenance (subject, checkpoint hash, init, seed, battery hash, montage,
  pooling, neuroprobe version) is unchanged;
* :func:`cells_with_controls` — concept cells of a subject beside its untrained twin,
  the rotated basis and the label shuffle, cached the same way (:func:`study_from_args`:
  the same from a script's parsed options, ``--quick`` included);
* :func:`organism_weights` — organisms trained from other seeds, trained once and cached;
* :func:`replicates` and :func:`seed_interval` — the training runs an across-seeds
  experiment compares, and a number's t-interval over them;
* :func:`untrained_twin`, :func:`subject_status` — a subject's untrained twin at real size
  or tiny (:func:`neuroprobe.testing.make_tiny`), and whether its weights are here;
* :class:`Report` — ``results.csv`` (every number in the figures), ``results.md``
  (question, finding, control, published number) and the figures.
"""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

_EXPORTS = {
    "experiment_args": "neuroprobe.experiments.cli",
    "cached_recording": "neuroprobe.experiments.cache",
    "cache_key": "neuroprobe.experiments.cache",
    "organism_weights": "neuroprobe.experiments.cache",
    "cells_with_controls": "neuroprobe.experiments.study",
    "cached_cells": "neuroprobe.experiments.study",
    "study_from_args": "neuroprobe.experiments.study",
    "battery_for": "neuroprobe.experiments.study",
    "Report": "neuroprobe.experiments.report",
    "Replicate": "neuroprobe.experiments.seeds",
    "replicates": "neuroprobe.experiments.seeds",
    "seed_interval": "neuroprobe.experiments.seeds",
    "untrained_twin": "neuroprobe.experiments.twins",
    "tiny_folder": "neuroprobe.experiments.twins",
    "subject_status": "neuroprobe.experiments.twins",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
