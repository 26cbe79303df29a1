"""Subjects larger than one device: Hugging Face accelerate's big-model dispatch.

``load_subject(..., device_map="auto")`` (CLI ``--device-map auto``) spreads a
transformers subject over every GPU, then CPU RAM, then disk
(``offload_folder``), as accelerate decides from ``max_memory``.  Weights of an
offloaded block are brought to the compute device only while the block runs.

Nothing else changes: electrodes are forward hooks on modules wherever those
modules live, every site's activations arrive on the device that computed them,
the recorder pools them there and copies the result to the CPU, and lesions build
their index and value tensors on the activation's own device.  Inputs go to the
*main* device (the first GPU of the map, or the CPU), where accelerate expects them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neuroprobe.errors import NeuroprobeError

#: accelerate's named strategies
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

#: ``load_subject`` options this module consumes
OPTIONS = ("device_map", "max_memory", "offload_folder")


def parse_max_memory(value: str | dict | None) -> dict[Any, str] | None:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (dicts pass through)."""
    if value is None or isinstance(value, dict):
        return value
    out: dict[Any, str] = {}
    for item in str(value).split(","):
        key, sep, size = item.partition("=")
        if not sep or not key.strip() or not size.strip():
            raise NeuroprobeError(f"--max-memory expects DEVICE=SIZE[,DEVICE=SIZE...] (e.g. 0=20GiB,cpu=64GiB), got {value!r}.")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = size.strip()
    return out


def pop_placement(options: dict[str, Any]) -> dict[str, Any] | None:
    """Take the placement options out of ``options``; ``None`` when no device map was asked for."""
    device_map = options.pop("device_map", None)
    max_memory = parse_max_memory(options.pop("max_memory", None))
    offload = options.pop("offload_folder", None)
    if device_map in (None, "", "none"):
        if max_memory or offload:
            raise NeuroprobeError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto).")
        return None
    if isinstance(device_map, (str, Path)) and str(device_map) not in STRATEGIES:
        path = Path(device_map)
        if not path.is_file():
            raise NeuroprobeError(
                f"--device-map takes {', '.join(STRATEGIES)} or a JSON file mapping modules to devices; "
                f"{device_map} is neither."
            )
        try:
            device_map = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise NeuroprobeError(f"{path} is not a JSON device map ({err.msg}).") from None
    try:
        import accelerate  # noqa: F401
    except ModuleNotFoundError:
        raise NeuroprobeError("--device-map needs Hugging Face accelerate: pip install 'neuroprobe-cells[scale]'.") from None
    placement: dict[str, Any] = {"device_map": device_map}
    if max_memory:
        placement["max_memory"] = max_memory
    if offload:
        Path(offload).mkdir(parents=True, exist_ok=True)
        placement["offload_folder"] = str(offload)
    return placement


def dispatch(model: torch.nn.Module, placement: dict[str, Any]) -> torch.nn.Module:
    """Dispatch an already built model (``init="random"``) the way ``from_pretrained`` would."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = placement["device_map"]
    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        max_memory = placement.get("max_memory")
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    model = dispatch_model(model, device_map=device_map, offload_dir=placement.get("offload_folder"))
    model.hf_device_map = device_map
    return model


def main_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first accelerator in the model's device map, else the CPU (as accelerate does)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    accel = [d for d in device_map.values() if d not in ("cpu", "disk")]
    if not accel:
        return torch.device("cpu")
    d = accel[0]
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def load_error(placement: dict[str, Any] | None, err: Exception) -> NeuroprobeError | None:
    """A clear sentence for a placement mistake that ``from_pretrained`` reports as a ValueError."""
    if placement and "offload" in str(err) and not placement.get("offload_folder"):
        return NeuroprobeError("the device map offloads part of the model to disk; give --offload-folder DIR.")
    return None
