"""Untrained twins at real size or tiny, and what each registered subject can run here.

Every concept-cell claim needs its untrained twin: the same architecture with random
weights.  At real size that is :func:`~neuroprobe.subjects.load_subject` with
``init="random"``; on a small CPU budget a *tiny* twin — the subject's architecture at
hidden size 32 with two layers and a tokenizer trained on a small in-code corpus
(:func:`neuroprobe.testing.make_tiny`) — shows the same pipeline for a fraction of the
cost, and must be labelled as such wherever its numbers appear.

:func:`subject_status` says, without loading or downloading anything, whether a
subject's pretrained weights are here and why not.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from neuroprobe.errors import NeuroprobeError

#: Sizes an untrained twin is built at.
SCALES = ("real", "tiny")


def tiny_arch(model: str) -> str | None:
    """The :func:`~neuroprobe.testing.make_tiny` architecture of a registered subject, or ``None``.

    Only transformers subjects whose architecture has a tiny configuration have one
    (not the CLIP ResNets, ViLBERT, DALL-E or the organism).
    """
    from neuroprobe.subjects.registry import get_spec
    from neuroprobe.testing import TINY_ARCHS

    spec = get_spec(model)
    if not spec.loader.endswith("load_hf_subject"):
        return None
    return spec.arch if spec.arch in TINY_ARCHS else None


def tiny_folder(model: str, *, seed: int = 0, cache: str | Path = Path("recordings") / "cache") -> Path:
    """A folder with the tiny configuration and tokenizer of ``model``'s architecture, made once.

    Written under a temporary name and renamed when complete
    (``<cache>/tiny/<arch>-seed-<seed>/``), so an interrupted build leaves nothing half-written.

    Raises
    ------
    NeuroprobeError
        When the subject's architecture has no tiny configuration.
    """
    from neuroprobe.testing import TINY_ARCHS, make_tiny

    arch = tiny_arch(model)
    if arch is None:
        raise NeuroprobeError(f"subject {model!r} has no tiny configuration (neuroprobe.testing.make_tiny builds "
                              f"{', '.join(TINY_ARCHS)}); use its real size.")
    folder = Path(cache) / "tiny" / f"{arch}-seed-{seed}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=folder.parent))
    try:
        make_tiny(arch, tmp, seed=seed)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def untrained_twin(model: str, *, scale: str = "real", seed: int = 0, device: str | None = None,
                   cache: str | Path = Path("recordings") / "cache", heads: bool = False,
                   modalities: Sequence[str] | None = None) -> Any:
    """Load ``model``'s untrained twin (``init="random"``, seeded) at real size or tiny.

    Parameters
    ----------
    model
        A registry name.
    scale
        ``real`` (the published shape) or ``tiny`` (:func:`tiny_folder`'s configuration).
    seed
        Seed of the random weights.
    device, heads, modalities
        As in :func:`~neuroprobe.subjects.load_subject`.
    cache
        Where tiny folders are kept.

    Returns
    -------
    Subject
        With ``init == "random"``; a tiny twin's ``checkpoint`` is its folder.
    """
    from neuroprobe.subjects.registry import load_subject

    if scale not in SCALES:
        raise NeuroprobeError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}.")
    weights = tiny_folder(model, seed=seed, cache=cache) if scale == "tiny" else None
    return load_subject(model, init="random", weights=weights, seed=seed, device=device, heads=heads, quiet=True,
                        modalities=tuple(modalities) if modalities is not None else None)


@dataclass(frozen=True)
class SubjectStatus:
    """What a registered subject can run here (nothing loaded, nothing downloaded).

    Attributes
    ----------
    name
        Registry name.
    params
        Parameter count of the published checkpoint, e.g. ``"110M"``.
    pretrained
        Its pretrained weights are on this machine.
    images
        Its untrained twin can take image stimuli (a region subject's detector is here).
    missing
        Why the pretrained subject cannot load (one sentence), or ``""``.
    """

    name: str
    params: str
    pretrained: bool
    images: bool
    missing: str = ""

    @property
    def n_params(self) -> float:
        """``params`` as a number (``"22.7M"`` -> 2.27e7); NaN when unknown."""
        return parse_params(self.params)


def parse_params(text: str) -> float:
    """``"230k"``, ``"22.7M"``, ``"2.6B"`` -> a number; NaN when it is not one."""
    text = str(text).strip()
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1.0)
    try:
        return float(text[:-1] if text[-1:] in "kMB" else text) * scale
    except ValueError:
        return float("nan")


def subject_status(model: str) -> SubjectStatus:
    """Whether ``model``'s pretrained weights (and, for region subjects, the detector) are here.

    Decided offline (:func:`~neuroprobe.subjects.offline.assume_offline`): a download
    that would be possible does not count as present.
    """
    from neuroprobe.subjects.offline import assume_offline, missing_message
    from neuroprobe.subjects.registry import get_spec, requirements

    spec = get_spec(model)
    with assume_offline():
        missing = missing_message(spec.name, "pretrained", requirements(spec, init="pretrained"), ("text",))
        images = "image" in spec.modalities and missing_message(
            spec.name, "random", requirements(spec, init="random"), ("image",)) is None
    return SubjectStatus(name=spec.name, params=spec.params, pretrained=missing is None, images=images,
                         missing=missing or "")
