"""The stimulus design of one site: concepts, splits, forms and modalities as index arrays.

Every statistic works on a *subset* of the stimuli a site fired for (the screening
split, the testing split, the testing stimuli of one form or one modality...).
:class:`Design` precomputes, for each subset, the column indices into the
``[units, stimuli]`` block and the one-hot concept matrix used to turn per-stimulus
quantities into per-concept sums with one matrix product.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError

SCREENING, TESTING = "screening", "testing"


@dataclass
class Subset:
    """Some stimuli of a site.

    Attributes
    ----------
    name
        e.g. ``"screening"``, ``"testing"``, ``"testing|form=photo"``.
    idx
        Column indices into the site's valid stimuli.
    labels
        Concept code of each stimulus in the subset.
    onehot
        ``[len(idx), n_concepts]`` float64 one-hot of ``labels``.
    counts
        Stimuli per concept in the subset.
    groups
        Per concept, positions (into ``idx``) of that concept's stimuli.
    """

    name: str
    idx: np.ndarray
    labels: np.ndarray
    onehot: np.ndarray
    counts: np.ndarray
    groups: list[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.idx)

    @classmethod
    def make(cls, name: str, idx: np.ndarray, codes: np.ndarray, n_concepts: int) -> "Subset":
        idx = np.asarray(idx, dtype=np.intp)
        labels = codes[idx]
        onehot = np.zeros((len(idx), n_concepts))
        onehot[np.arange(len(idx)), labels] = 1.0
        groups = [np.flatnonzero(labels == c) for c in range(n_concepts)]
        return cls(name, idx, labels, onehot, onehot.sum(0), groups)


@dataclass
class Design:
    """Stimulus structure of one site (only the stimuli the site fired for).

    Attributes
    ----------
    concepts
        Concept names, in battery order; codes index this list.
    stimuli
        The valid stimuli (rows of the recording's stimuli table).
    codes
        Concept code per valid stimulus.
    all, screening, testing
        Subsets.
    forms, modalities
        Names present in the testing split.
    test_forms, test_modalities
        One subset per form / modality of the testing split.
    screen_without_form
        Per form, the screening stimuli of every *other* form (leave-one-form-out).
    """

    concepts: list[str]
    stimuli: pd.DataFrame
    codes: np.ndarray
    all: Subset
    screening: Subset
    testing: Subset
    forms: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    test_forms: list[Subset] = field(default_factory=list)
    test_modalities: list[Subset] = field(default_factory=list)
    screen_without_form: list[Subset] = field(default_factory=list)

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @classmethod
    def build(cls, stimuli: pd.DataFrame, valid: np.ndarray, concepts: list[str],
              labels: np.ndarray | None = None) -> "Design":
        """Design of the ``valid`` rows of ``stimuli``.

        Parameters
        ----------
        stimuli
            The recording's stimuli table (row i = row i of every response array).
        valid
            Boolean mask over rows: stimuli the site fired for.
        concepts
            All concepts of the battery (fixes the codes across sites).
        labels
            Concept per row overriding ``stimuli["concept"]`` (label-shuffle control).
        """
        valid = np.asarray(valid, dtype=bool)
        st = stimuli.iloc[np.flatnonzero(valid)].reset_index(drop=True)
        lab = (stimuli["concept"].to_numpy() if labels is None else np.asarray(labels))[valid]
        pos = {c: i for i, c in enumerate(concepts)}
        try:
            codes = np.array([pos[c] for c in lab], dtype=np.intp)
        except KeyError as err:
            raise NeuroprobeError(f"stimulus concept {err.args[0]!r} is not among the battery's concepts.") from None
        C = len(concepts)
        split = st["split"].astype(str).to_numpy() if "split" in st else np.full(len(st), SCREENING)
        form = st["form"].astype(str).to_numpy() if "form" in st else np.full(len(st), "form")
        modality = st["modality"].astype(str).to_numpy() if "modality" in st else np.full(len(st), "text")
        every = np.arange(len(st))
        scr, test = every[split == SCREENING], every[split == TESTING]
        d = cls(concepts, st, codes, Subset.make("all", every, codes, C), Subset.make(SCREENING, scr, codes, C),
                Subset.make(TESTING, test, codes, C))
        d.forms = list(dict.fromkeys(form[test]))
        d.modalities = list(dict.fromkeys(modality[test]))
        d.test_forms = [Subset.make(f"{TESTING}|form={f}", test[form[test] == f], codes, C) for f in d.forms]
        d.test_modalities = [Subset.make(f"{TESTING}|modality={m}", test[modality[test] == m], codes, C)
                             for m in d.modalities]
        d.screen_without_form = [Subset.make(f"{SCREENING}|form!={f}", scr[form[scr] != f], codes, C) for f in d.forms]
        return d
