"""Analyses of a recording: per-unit indices, concept cells, invariance, controls, population.

Everything streams a site's units in blocks from the HDF5 file and returns a
pandas DataFrame with one row per unit (or per site x stimulus, per unit x index...).

>>> from neuroprobe.analysis import concept_cells, rotation_control   # doctest: +SKIP
>>> cells = concept_cells("recordings/minilm_kinship_mlp.h5", k=5, fdr=0.05)   # doctest: +SKIP
"""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "bootstrap_ci": "neuroprobe.analysis.controls",
    "label_shuffle_control": "neuroprobe.analysis.controls",
    "rotate_recording": "neuroprobe.analysis.controls",
    "rotation_control": "neuroprobe.analysis.controls",
    "untrained_control": "neuroprobe.analysis.controls",
    "concept_cells": "neuroprobe.analysis.criterion",
    "fdr_qvalues": "neuroprobe.analysis.criterion",
    "design_check": "neuroprobe.analysis.criterion",
    "power": "neuroprobe.analysis.criterion",
    "load_cells": "neuroprobe.analysis.criterion",
    "save_cells": "neuroprobe.analysis.criterion",
    "summarize": "neuroprobe.analysis.criterion",
    "population_sparseness": "neuroprobe.analysis.descriptive",
    "unit_indices": "neuroprobe.analysis.descriptive",
    "decode_concepts": "neuroprobe.analysis.population",
    "rdm": "neuroprobe.analysis.population",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["bootstrap_ci", "concept_cells", "decode_concepts", "design_check", "power", "fdr_qvalues", "label_shuffle_control", "load_cells", "population_sparseness", "rdm", "rotate_recording", "rotation_control", "save_cells", "summarize", "unit_indices", "untrained_control"]
