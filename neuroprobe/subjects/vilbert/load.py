"""Loading ViLBERT weights and preparing its image input.

The released checkpoints are plain ``torch.save(state_dict)`` files at Facebook's
download server (there is no Hugging Face hub copy):

* ``multi_task_model.bin`` — the 12-in-1 multi-task model (task tokens, task heads),
* ``pretrained_model.bin`` — the Conceptual Captions pretrained model (pretraining heads).

:func:`load_vilbert` reads them from a local folder (``--weights DIR``), from the
torch hub cache, or downloads them there; :func:`prepare_regions` turns detector
output into the image stream's input (global mean region first, 5-d locations).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError, is_refused_pickle, refused_pickle
from neuroprobe.subjects.vilbert.config import CHECKPOINTS, ViLBERTConfig
from neuroprobe.subjects.vilbert.model import ViLBERTModel

#: Where the released checkpoints are published.
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/vilbert-multi-task/{name}"

#: Backbone submodule names: keys starting with these belong under ``bert.``.
_BACKBONE = ("embeddings.", "v_embeddings.", "encoder.", "t_pooler.", "v_pooler.")

#: A key only the 12-in-1 checkpoint has.
_MULTI_TASK_KEY = "vil_prediction.logit_fc.0.weight"


def _missing_message(checkpoint: str, where: str) -> str:
    url = DOWNLOAD_URL.format(name=checkpoint)
    return (
        f"ViLBERT weights {checkpoint} were not found {where}; download {url} into a folder "
        f"and pass --weights DIR (weights=DIR)."
    )


def hub_cache_dir() -> Path:
    """Folder where downloaded checkpoints are cached (under ``torch.hub.get_dir()``)."""
    return Path(torch.hub.get_dir()) / "vilbert-multi-task"


def resolve_weights(
    weights: str | Path | None, checkpoint: str = "multi_task_model.bin", *, download: bool = True
) -> Path:
    """Find the checkpoint file.

    Parameters
    ----------
    weights
        A folder holding ``checkpoint``, or the checkpoint file itself.  ``None`` looks in
        :func:`hub_cache_dir` and, if allowed, downloads the file there.
    checkpoint
        ``"multi_task_model.bin"`` or ``"pretrained_model.bin"``.
    download
        Whether a missing file may be downloaded (never when ``HF_HUB_OFFLINE`` or
        ``NEUROPROBE_OFFLINE`` is set).

    Returns
    -------
    pathlib.Path
        The checkpoint file.

    Raises
    ------
    MissingWeightsError
        When the file is not there and cannot be downloaded.
    """
    if checkpoint not in CHECKPOINTS:
        raise NeuroprobeError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}.")
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if (path / checkpoint).is_file():
            return path / checkpoint
        raise MissingWeightsError(_missing_message(checkpoint, f"in {path}"))
    cached = hub_cache_dir() / checkpoint
    if cached.is_file():
        return cached
    offline = any(os.environ.get(v, "") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "NEUROPROBE_OFFLINE"))
    if not offline:
        from neuroprobe.subjects.offline import reachable

        offline = not reachable(DOWNLOAD_URL.format(name=""))  # one quick check instead of a long failing download
    if not download or offline:
        raise MissingWeightsError(_missing_message(checkpoint, f"in the cache {cached.parent}"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(cached.suffix + ".part")
    try:
        torch.hub.download_url_to_file(DOWNLOAD_URL.format(name=checkpoint), str(partial), progress=True)
    except Exception:  # any network failure means: the user has to fetch the file
        partial.unlink(missing_ok=True)
        raise MissingWeightsError(_missing_message(checkpoint, "and could not be downloaded")) from None
    partial.replace(cached)
    return cached


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and normalise its key names.

    Accepts a bare state dict or a training checkpoint holding ``model_state_dict``/``state_dict``;
    strips a ``module.`` (DataParallel) prefix and puts bare backbone keys under ``bert.``.
    """
    path = Path(path)
    try:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zipfile) serialisation cannot be memory-mapped
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if is_refused_pickle(err):
            raise refused_pickle(path) from None
        raise MissingWeightsError(
            f"{path} is not a readable ViLBERT checkpoint ({type(err).__name__}); download it again."
        ) from None
    if isinstance(raw, Mapping):
        for key in ("model_state_dict", "state_dict"):
            if key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise MissingWeightsError(f"{path} does not hold a state dict of tensors; give the released ViLBERT .bin file.")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(_BACKBONE):
            key = "bert." + key
        out[key] = value
    return out


def checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which released layout a state dict has: ``multi_task_model.bin`` or ``pretrained_model.bin``."""
    return "multi_task_model.bin" if _MULTI_TASK_KEY in state_dict else "pretrained_model.bin"


def load_vilbert(
    weights: str | Path | None = None,
    checkpoint: str = "multi_task_model.bin",
    init: str = "pretrained",
    config: ViLBERTConfig | None = None,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    download: bool = True,
) -> ViLBERTModel:
    """Build ViLBERT and load the released weights (or initialise it randomly).

    Parameters
    ----------
    weights
        Folder with the checkpoint (and optionally a ``config.json``), or the file itself;
        ``None`` uses the torch hub cache, downloading on first use.
    checkpoint
        ``"multi_task_model.bin"`` (12-in-1) or ``"pretrained_model.bin"``.  When a file is
        given, its keys decide which heads the model gets.
    init
        ``"pretrained"`` or ``"random"`` (same architecture, BERT-style init from ``seed``).
    config
        Architecture; default ``config.json`` next to the weights (for ``init="random"`` too),
        else :meth:`ViLBERTConfig.base`.
    device, dtype
        Where and in what precision the model lives.
    seed
        Seed of the random initialisation.
    download
        Allow downloading a missing checkpoint.

    Returns
    -------
    ViLBERTModel
        In eval mode.
    """
    if init not in ("pretrained", "random"):
        raise NeuroprobeError(f"init must be 'pretrained' or 'random', not {init!r}.")
    if checkpoint not in CHECKPOINTS:
        raise NeuroprobeError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}.")
    if init == "random":
        if config is None and weights is not None:
            folder = Path(weights).expanduser()
            folder = folder if folder.is_dir() else folder.parent
            if (folder / "config.json").is_file():
                config = config_from_file(folder / "config.json")
        cfg = (config or ViLBERTConfig.base()).for_checkpoint(checkpoint)
        model = ViLBERTModel(cfg)
        model.init_weights(torch.Generator().manual_seed(seed))
        return model.to(device=device, dtype=dtype).eval()

    path = resolve_weights(weights, checkpoint, download=download)
    if config is None and (path.parent / "config.json").is_file():
        config = config_from_file(path.parent / "config.json")
    state = read_state_dict(path)
    kind = checkpoint_kind(state)
    cfg = (config or ViLBERTConfig.base()).for_checkpoint(kind)
    with torch.device("meta"):
        model = ViLBERTModel(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise NeuroprobeError(
            f"{path} does not match the ViLBERT architecture ({detail}); give a released "
            f"vilbert-multi-task checkpoint or the matching config.json."
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def config_from_file(path: str | Path) -> ViLBERTConfig:
    """Read a ``config.json`` written by :func:`save_vilbert` or a reference JSON config."""
    try:
        return ViLBERTConfig.from_json(path)
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise NeuroprobeError(f"{path} is not a valid ViLBERT config: {err}.") from None


def save_vilbert(model: ViLBERTModel, directory: str | Path) -> Path:
    """Write ``config.json`` and the checkpoint file (released name and layout) into ``directory``.

    Returns
    -------
    pathlib.Path
        The checkpoint file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = "multi_task_model.bin" if model.config.task_heads else "pretrained_model.bin"
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    path = directory / name
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------------------- regions
def _as_list(x: torch.Tensor | np.ndarray | Sequence, what: str) -> list[torch.Tensor]:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.ndim == 2:
            return [t]
        if t.ndim == 3:
            return list(t)
        raise NeuroprobeError(f"{what} must be [R, D] or [B, R, D], not of shape {tuple(t.shape)}.")
    return [torch.as_tensor(np.asarray(item), dtype=torch.float32) for item in x]


def prepare_regions(
    features: torch.Tensor | np.ndarray | Sequence,
    boxes_normalised: torch.Tensor | np.ndarray | Sequence,
    max_regions: int = 100,
    region_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn detector regions into ViLBERT's image input.

    Keeps the first ``max_regions`` regions of each image (detectors return them by
    confidence), prepends a global region whose feature is the mean of the kept regions
    and whose box is the whole image, and builds 5-d locations
    ``(x1/W, y1/H, x2/W, y2/H, area / (W*H))``.

    Parameters
    ----------
    features
        ``[R, D]``, ``[B, R, D]`` or a list of ``[R_i, D]`` (one per image).
    boxes_normalised
        Matching ``[..., 4]`` boxes ``(x1, y1, x2, y2)`` already divided by the image
        width and height.
    max_regions
        Most detector regions kept per image (the global region comes on top).
    region_mask
        Optional ``[B, R]`` mask of real regions when ``features`` is a padded batch.

    Returns
    -------
    image_feat, image_loc, image_mask
        ``[B, 1 + N, D]`` float, ``[B, 1 + N, 5]`` float and ``[B, 1 + N]`` long (1 = real),
        ``N`` the most regions kept for any image of the batch.
    """
    feats = _as_list(features, "features")
    boxes = _as_list(boxes_normalised, "boxes_normalised")
    if len(feats) != len(boxes):
        raise NeuroprobeError(f"got features for {len(feats)} images but boxes for {len(boxes)}.")
    if region_mask is not None:
        keep = torch.as_tensor(region_mask).bool()
        feats = [f[keep[i]] for i, f in enumerate(feats)]
        boxes = [b[keep[i]] for i, b in enumerate(boxes)]
    kept_f, kept_b = [], []
    for i, (f, b) in enumerate(zip(feats, boxes)):
        if f.ndim != 2 or b.ndim != 2 or b.shape[-1] != 4 or f.shape[0] != b.shape[0]:
            raise NeuroprobeError(
                f"image {i}: expected features [R, D] and boxes [R, 4], got {tuple(f.shape)} and {tuple(b.shape)}."
            )
        if f.shape[0] == 0:
            raise NeuroprobeError(f"image {i} has no regions; lower the detector's score threshold.")
        if b.numel() and (b.min() < -0.01 or b.max() > 1.01):
            raise NeuroprobeError(
                f"image {i}: boxes must be normalised by the image size (values in [0, 1]); divide x by W and y by H."
            )
        kept_f.append(f[:max_regions])
        kept_b.append(b[:max_regions])
    n = max(f.shape[0] for f in kept_f)
    dim = kept_f[0].shape[1]
    batch = len(kept_f)
    image_feat = torch.zeros(batch, 1 + n, dim)
    image_loc = torch.zeros(batch, 1 + n, 5)
    image_mask = torch.zeros(batch, 1 + n, dtype=torch.long)
    for i, (f, b) in enumerate(zip(kept_f, kept_b)):
        r = f.shape[0]
        if f.shape[1] != dim:
            raise NeuroprobeError(f"image {i} has {f.shape[1]}-d features but image 0 has {dim}-d ones.")
        image_feat[i, 0] = f.mean(dim=0)
        image_feat[i, 1 : 1 + r] = f
        image_loc[i, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
        image_loc[i, 1 : 1 + r, :4] = b
        image_loc[i, 1 : 1 + r, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        image_mask[i, : 1 + r] = 1
    return image_feat, image_loc, image_mask
