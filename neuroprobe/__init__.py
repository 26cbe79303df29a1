"""neuroprobe: record, find and lesion concept cells in neural networks.

The public API (everything a CLI command does is one call of it)::

    import neuroprobe as npb
    subject = npb.load_subject("minilm")
    battery = npb.load_battery("kinship")
    rec = npb.record(subject, battery, "recordings/minilm_kinship_mlp.h5", montage="mlp")
    cells = npb.concept_cells(rec)                # one row per unit
    table = npb.forgetting(subject, battery, cells, concept="halle berry")

Names load on first use (torch, transformers, scipy and seaborn are imported only when
needed), so ``import neuroprobe`` and ``neuroprobe --help`` are fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

from neuroprobe._lazy import lazy_exports
from neuroprobe.errors import NeuroprobeError

_EXPORTS = {
    "Electrodes": "neuroprobe.electrodes",
    "Recorder": "neuroprobe.recording.recorder",
    "record": "neuroprobe.recording.entry",
    "Recording": "neuroprobe.recording.reader",
    "open_recording": "neuroprobe.recording.reader",
    "Battery": "neuroprobe.stimuli.battery",
    "load_battery": "neuroprobe.stimuli.battery:Battery.load",
    "Site": "neuroprobe.subjects.base",
    "Subject": "neuroprobe.subjects.base",
    "load_subject": "neuroprobe.subjects.registry",
    # analysis and lesion functions
    "concept_cells": "neuroprobe.analysis.criterion",
    "unit_indices": "neuroprobe.analysis.indices",
    "power": "neuroprobe.analysis.criterion",
    "design_check": "neuroprobe.analysis.criterion",
    "lesion": "neuroprobe.lesions.lesion",
    "forgetting": "neuroprobe.lesions.forgetting",
    "dose_response": "neuroprobe.lesions.forgetting",
    "forgetting_matrix": "neuroprobe.lesions.forgetting",
    "steer": "neuroprobe.steering.pplm",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Battery", "Electrodes", "NeuroprobeError", "Recorder", "Recording", "Site", "Subject",
    "load_battery", "load_subject", "open_recording", "record",
]
