"""Reading OpenAI's CLIP ResNet checkpoints into :class:`~neuroprobe.subjects.clip_resnet.model.CLIPResNet`.

Accepted files (``--weights FILE`` or a folder holding one):

* the released ``RN50.pt`` / ``RN50x4.pt`` … — TorchScript archives (zip files holding
  ``code/``, ``data.pkl`` and ``data/<n>`` tensor records).  :func:`read_torchscript_tensors`
  reads them without ``torch.jit.load`` (deprecated in torch 2.13) and without running
  anything from the file: ``data.pkl`` is unpickled by a restricted unpickler that admits
  only plain containers, tensor records and placeholder objects for the archive's module
  classes (whose TorchScript code is never compiled), so the result equals
  ``torch.jit.load(path).state_dict()`` (checked in the tests) at no risk of code execution;
* a state dict with the same keys saved by ``torch.save`` (read with ``weights_only=True``) or
  as safetensors (e.g. a conversion: ``safetensors.torch.save_file(jit_model.state_dict(), …)``).

Loading is strict: a file whose keys or shapes differ from the model built for it fails
with a message naming the keys.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.archive import module_state_dict, read_module_tree
from neuroprobe.subjects.clip_resnet.config import CLIPResNetConfig, Variant
from neuroprobe.subjects.clip_resnet.model import CLIPResNet

#: Non-parameter entries some saved models carry (``build_model`` drops them too).
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

#: File names tried inside a ``--weights`` folder, after the variant's own file name.
STATE_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_cache_dir() -> Path:
    """Where the original ``clip.load`` keeps downloads (``~/.cache/clip``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"


def missing_message(variant: Variant, where: str) -> str:
    """One sentence saying what is missing and how to get it."""
    return (f"CLIP weights {variant.file} were not found {where}; download {variant.url} "
            f"(or let `clip.load` put it in {hub_cache_dir()}) and pass --weights FILE_OR_DIR.")


def resolve_weights(weights: str | Path | None, variant: Variant) -> Path:
    """The checkpoint file: ``weights`` (a file or a folder holding one), else the ``clip`` cache.

    Raises
    ------
    MissingWeightsError
        When no file is found (neuroprobe never downloads OpenAI's files itself).
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        for name in (variant.file, *STATE_FILES):
            if (path / name).is_file():
                return path / name
        raise MissingWeightsError(missing_message(variant, f"in {path}"))
    cached = hub_cache_dir() / variant.file
    if cached.is_file():
        return cached
    raise MissingWeightsError(missing_message(variant, f"in {cached.parent}"))


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name (its state dict).

    Nothing from the archive is executed: its code is not read, and its pickle may only name
    tensors, storages, ordered dicts and the archive's own module classes (replaced by inert
    placeholders).
    """
    return module_state_dict(read_module_tree(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive, a ``torch.save``'d state dict or a safetensors file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Mapping[str, torch.Tensor] = load_file(str(path))
        elif zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            raw = read_torchscript_tensors(path)  # TorchScript archive (the released files)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is a user problem: say which file
        raise MissingWeightsError(f"{path} is not a readable CLIP checkpoint ({type(err).__name__}: {err}).") from None
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise MissingWeightsError(f"{path} does not hold a CLIP state dict of tensors.")
    out = {}
    for key, value in raw.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key not in EXTRA_KEYS:
            out[key] = value
    return out


def key_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    """Empty when ``sd`` has exactly the model's keys and shapes, else a sentence naming the differences."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    return "; ".join(parts)


def load_clip_resnet(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     expect: CLIPResNetConfig | None = None, config: CLIPResNetConfig | None = None) -> CLIPResNet:
    """Build the model a checkpoint describes and load it strictly.

    Parameters
    ----------
    path
        The checkpoint file.
    dtype
        Parameter dtype (the released files store fp16 weights; they are cast).
    expect
        The published shape; a file of another shape is an error naming both.
    config
        The shape, when it cannot be inferred: the head count of the text transformer is not
        in the tensors (the original assumes ``width // 64``), so models of other widths need it.
    """
    sd = read_state_dict(path)
    config = config or CLIPResNetConfig.from_state_dict(sd)
    if expect is not None and config != expect:
        raise NeuroprobeError(f"{path} holds a CLIP ResNet of shape {config.to_dict()}, not the asked-for {expect.to_dict()}.")
    with torch.device("meta"):
        model = CLIPResNet(config)
    problem = key_mismatch(model, sd)
    if problem:
        raise NeuroprobeError(f"{path} does not match the CLIP ResNet layout ({problem}).")
    floats = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(floats, strict=True, assign=True)
    return model.eval()
