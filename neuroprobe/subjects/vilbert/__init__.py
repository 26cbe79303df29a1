"""ViLBERT (Lu et al. 2019; 12-in-1, Lu et al. 2020): a two-stream vision-and-language BERT.

Not part of transformers; this package holds a clean torch implementation whose
parameter names match the released vilbert-multi-task checkpoints.
"""
from __future__ import annotations

from neuroprobe.subjects.vilbert.config import CHECKPOINTS, TASK_IDS, ViLBERTConfig
from neuroprobe.subjects.vilbert.load import (
    DOWNLOAD_URL,
    load_vilbert,
    prepare_regions,
    read_state_dict,
    resolve_weights,
    save_vilbert,
)
from neuroprobe.subjects.vilbert.model import HEADS, ViLBERTModel, ViLBERTOutput

__all__ = [
    "CHECKPOINTS",
    "DOWNLOAD_URL",
    "HEADS",
    "TASK_IDS",
    "ViLBERTConfig",
    "ViLBERTModel",
    "ViLBERTOutput",
    "load_vilbert",
    "prepare_regions",
    "read_state_dict",
    "resolve_weights",
    "save_vilbert",
]
