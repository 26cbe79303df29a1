"""Loading and saving the detector: a local folder or the Hugging Face hub.

A detector folder holds the two files of ``unc-nlp/frcnn-vg-finetuned``:
``config.yaml`` (read by :meth:`FrcnnConfig.from_yaml`) and ``pytorch_model.bin``
(a state dict, read with ``torch.load(weights_only=True)``).  The state dict is
loaded with ``strict=True`` after two harmless normalisations the reference also
tolerates: ``gamma``/``beta`` names become ``weight``/``bias``, and buffers that
older checkpoints may lack (``num_batches_tracked``, the anchor table
``cell_anchors.0``, both fully determined by the config) are filled in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError, is_refused_pickle, refused_pickle
from neuroprobe.subjects.frcnn.config import FrcnnConfig
from neuroprobe.subjects.frcnn.model import Detector

__all__ = ["CONFIG_NAME", "DEFAULT_HUB_ID", "WEIGHTS_NAME", "load_detector", "save_detector"]

DEFAULT_HUB_ID = "unc-nlp/frcnn-vg-finetuned"
CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "pytorch_model.bin"
_ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"


def _how_to_get(hub_id: str) -> str:
    return (f"download them once while online (they come from the Hugging Face repo {hub_id}), point HF_HOME "
            f"at a cache that has them, or pass --detector-weights DIR with {CONFIG_NAME} and {WEIGHTS_NAME}")


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE):
        return True
    from neuroprobe.subjects.offline import hub_reachable

    return not hub_reachable()  # an unreachable hub fails at once instead of retrying


def _resolve_files(weights: str | Path | None, hub_id: str, need_weights: bool) -> tuple[Path | None, Path | None]:
    """Paths of config.yaml and pytorch_model.bin (the latter only when ``need_weights``)."""
    if weights is not None:
        path = Path(weights).expanduser()
        folder = path.parent if path.is_file() else path
        config = folder / CONFIG_NAME
        bin_path = path if path.is_file() else folder / WEIGHTS_NAME
        missing = [p.name for p in ([config] + ([bin_path] if need_weights else [])) if not p.is_file()]
        if missing:
            raise MissingWeightsError(f"The detector folder {folder} lacks {' and '.join(missing)}; "
                                      f"{_how_to_get(hub_id)}.")
        return config, bin_path if need_weights else None
    from huggingface_hub import hf_hub_download

    found: list[Path] = []
    names = [CONFIG_NAME] + ([WEIGHTS_NAME] if need_weights else [])
    missing = []
    for name in names:
        try:
            found.append(Path(hf_hub_download(hub_id, name, local_files_only=_offline())))
        except Exception:  # offline, not cached, unreachable, unknown repo: all mean "not available"
            missing.append(name)
    if missing:
        raise MissingWeightsError(f"The detector files {' and '.join(missing)} of {hub_id} are not available "
                                  f"here; {_how_to_get(hub_id)}.")
    return found[0], (found[1] if need_weights else None)


def _normalise_state_dict(state: dict[str, Any], model: Detector) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise NeuroprobeError(f"{WEIGHTS_NAME} does not hold a state dict; use the file of unc-nlp/frcnn-vg-finetuned.")
    if "model" in state and isinstance(state["model"], dict) and not any(k.startswith("backbone.") for k in state):
        state = state["model"]  # detectron2-style {"model": state_dict}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        parts = key.split(".")
        if parts[-1] == "gamma":
            parts[-1] = "weight"
        elif parts[-1] == "beta":
            parts[-1] = "bias"
        out[".".join(parts)] = value
    own = model.state_dict()
    for key, value in own.items():
        if key not in out and (key.endswith("num_batches_tracked") or key == _ANCHORS_KEY):
            out[key] = value.clone()
    return out


def load_detector(weights: str | Path | None = None, hub_id: str = DEFAULT_HUB_ID,
                  device: str | torch.device = "cpu", init: str = "pretrained",
                  config: FrcnnConfig | None = None, seed: int = 0) -> Detector:
    """Build the bottom-up-attention detector and load its weights.

    Parameters
    ----------
    weights
        A folder with ``config.yaml`` and ``pytorch_model.bin`` (or the path of the
        ``.bin`` next to its ``config.yaml``).  ``None`` takes both from the Hugging
        Face hub cache, downloading them when online.
    hub_id
        Hub repository of the files.
    device
        Where the detector runs.
    init
        ``"pretrained"`` loads the weights; ``"random"`` builds the same architecture with
        detectron2's random initialisation from ``seed`` (no weight file needed; the
        config comes from ``config``, else from ``weights`` if given, else the defaults).
    config
        Use this config instead of the file's.
    seed
        Seed of the random initialisation.

    Returns
    -------
    Detector
        In eval mode, on ``device``.

    Raises
    ------
    MissingWeightsError
        The files are not in ``weights`` or not available from the hub (offline).
    """
    if init not in ("pretrained", "random"):
        raise NeuroprobeError(f"init must be 'pretrained' or 'random', got {init!r}.")
    if init == "random":
        if config is None and weights is not None:
            config_path, _ = _resolve_files(weights, hub_id, need_weights=False)
            config = FrcnnConfig.from_yaml(config_path)
        model = Detector(config or FrcnnConfig()).init_weights(seed)
        return model.to(device).eval()
    config_path, bin_path = _resolve_files(weights, hub_id, need_weights=True)
    config = config or FrcnnConfig.from_yaml(config_path)
    with torch.device("meta"):
        model = Detector(config)
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        if is_refused_pickle(err):
            raise refused_pickle(bin_path) from None
        raise NeuroprobeError(f"Cannot read the detector weights {bin_path} ({type(err).__name__}); "
                              "download pytorch_model.bin of unc-nlp/frcnn-vg-finetuned again.") from err
    model = model.to_empty(device="cpu")
    anchors = model.proposal_generator.anchor_generator
    with torch.no_grad():
        anchors.cell_anchors[0].copy_(anchors.cell_anchor_boxes(config.anchor_sizes, config.anchor_aspect_ratios))
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.zero_()
    state = _normalise_state_dict(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))[:3]
        unexpected = sorted(set(state) - set(own))[:3]
        wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)
                 and not (own[k].dim() == 0 and state[k].numel() == 1)][:3]
        raise NeuroprobeError(
            f"The detector weights {bin_path} do not fit the architecture of {config_path} (missing {missing}, "
            f"unexpected {unexpected}, wrong shape {wrong}); use the config.yaml that came with the weights.") from err
    return model.to(device).eval()


def save_detector(detector: Detector, directory: str | Path) -> Path:
    """Write ``config.yaml`` and ``pytorch_model.bin`` of ``detector`` to ``directory``.

    The folder is what :func:`load_detector` reads back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    detector.config.save_yaml(directory / CONFIG_NAME)
    torch.save({k: v.detach().cpu() for k, v in detector.state_dict().items()}, directory / WEIGHTS_NAME)
    return directory
