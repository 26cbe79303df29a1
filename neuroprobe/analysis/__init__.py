"""Analyses of a recording: per-unit indices, concept cells, invariance, controls, population.

Everything streams a site's units in blocks from the HDF5 file and returns a
pandas DataFrame with one row per unit (or per site x stimulus, per unit x index...).

>>> from neuroprobe.analysis import concept_cells, rotation_control   # doctest: +SKIP
>>> cells = concept_cells("recordings/minilm_kinship_mlp.h5", k=5, fdr=0.05)   # doctest: +SKIP
"""
from __future__ import annotations

from neuroprobe.analysis.controls import (
    bootstrap_ci, label_shuffle_control, rotate_recording, rotation_control, untrained_control,
)
from neuroprobe.analysis.criterion import (
    concept_cells, design_check, fdr_qvalues, load_cells, power, save_cells, summarize,
)
from neuroprobe.analysis.indices import population_sparseness, unit_indices
from neuroprobe.analysis.population import decode_concepts, rdm

__all__ = [
    "bootstrap_ci", "concept_cells", "decode_concepts", "design_check", "fdr_qvalues", "label_shuffle_control", "load_cells",
    "population_sparseness", "power", "rdm", "rotate_recording", "rotation_control", "save_cells", "summarize",
    "unit_indices", "untrained_control",
]
