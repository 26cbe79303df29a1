"""neuroprobe: record, find and lesion concept cells in neural networks.

The public API (everything a CLI command does is one call of it)::

    import neuroprobe as npb
    subject = npb.load_subject("minilm")
    battery = npb.load_battery("kinship")
    rec = npb.record(subject, battery, "rec.h5", montage="mlp")
    cells = npb.concept_cells(rec)                # one row per unit
    table = npb.forgetting(subject, battery, cells, concept="mother")
"""
from __future__ import annotations

__version__ = "0.1.0"

from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording import Recorder, Recording, open_recording, record
from neuroprobe.stimuli import Battery, load_battery
from neuroprobe.subjects import Site, Subject, load_subject

__all__ = [
    "Battery", "Electrodes", "NeuroprobeError", "Recorder", "Recording", "Site", "Subject",
    "load_battery", "load_subject", "open_recording", "record",
]


def __getattr__(name: str):
    # analysis and lesion functions load lazily (they pull in scipy/sklearn/seaborn)
    lazy = {
        "concept_cells": "neuroprobe.analysis",
        "unit_indices": "neuroprobe.analysis",
        "power": "neuroprobe.analysis",
        "lesion": "neuroprobe.lesions",
        "forgetting": "neuroprobe.lesions",
        "dose_response": "neuroprobe.lesions",
        "forgetting_matrix": "neuroprobe.lesions",
        "steer": "neuroprobe.steering",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'neuroprobe' has no attribute {name!r}")
