"""Loading the VQGAN f16-16384 *encoder* that turns images into the codes min-dalle scores.

min-dalle ships only the detokenizer (``detoker.pt``).  The encoder of the same model is
published as dalle-mini/vqgan_imagenet_f16_16384 (a Flax checkpoint) and, in PyTorch, in
taming-transformers' layout (the ``state_dict`` of its ``VQModel``, e.g. a Lightning
``last.ckpt`` or a torch conversion of the Flax file).  neuroprobe loads **taming's layout**:
the tensors under ``encoder.``, ``quant_conv.`` and ``quantize.embedding.weight`` (decoder,
loss and discriminator tensors of a full checkpoint are ignored).  Flax files are not read:
convert them to a torch state dict first.

The expected key list (``tests/data/vqgan_f16_16384_encoder_keys.json``) is **inferred** from
taming-transformers' code with the f16-16384 configuration, not read from a released file.
Loading is strict: a file whose encoder keys or shapes differ fails with a message naming
them, so a wrong inference shows itself at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.dalle.vqgan import VQGANEncoderConfig, VQGANTokenizer

#: Which tensors of a taming VQModel state dict the tokenizer uses.
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "quantize.embedding.")

#: What neuroprobe assumes the file is.
SOURCE = "dalle-mini/vqgan_imagenet_f16_16384 in taming-transformers' state-dict layout"


def read_vqgan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder-side tensors of a taming-layout checkpoint (``.safetensors``, or a torch file read
    with ``weights_only=True``; a Lightning checkpoint's ``state_dict`` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"VQGAN encoder weights {path} not found; give a torch state dict of {SOURCE}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Mapping[str, torch.Tensor] = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable file is the user's to replace: say which and why
        raise NeuroprobeError(
            f"{path} is not readable as a torch state dict ({type(err).__name__}); save the VQGAN's state dict "
            f"with torch.save or safetensors (Flax files must be converted first)."
        ) from None
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise NeuroprobeError(f"{path} does not hold a state dict; give the VQGAN's state dict ({SOURCE}).")
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor) and k.startswith(ENCODER_PREFIXES)}


def load_vqgan_tokenizer(
    path: str | Path, config: VQGANEncoderConfig | None = None, *, device: torch.device | str = "cpu"
) -> VQGANTokenizer:
    """Build :class:`~neuroprobe.subjects.dalle.vqgan.VQGANTokenizer` and load ``path`` strictly.

    Raises
    ------
    NeuroprobeError
        Naming every missing, unexpected or wrongly shaped key when the file does not match the
        inferred layout.
    """
    state = read_vqgan_state(path)
    config = config or config_beside(path) or VQGANEncoderConfig()
    with torch.device("meta"):
        model = VQGANTokenizer(config)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise NeuroprobeError(
            f"{path} does not match the VQGAN encoder layout neuroprobe infers from taming-transformers' code "
            f"(the inference may be wrong for this file): {'; '.join(parts)}."
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


#: Optional file beside the weights giving another shape (tiny test models): VQGANEncoderConfig fields.
CONFIG_FILE = "vqgan_config.json"


def config_beside(path: str | Path) -> VQGANEncoderConfig | None:
    """The :class:`VQGANEncoderConfig` in ``vqgan_config.json`` beside ``path``, if there is one."""
    import dataclasses
    import json

    file = Path(path).with_name(CONFIG_FILE)
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    names = {f.name for f in dataclasses.fields(VQGANEncoderConfig)}
    if set(data) - names:
        raise NeuroprobeError(f"{file}: unknown VQGAN encoder fields {', '.join(sorted(set(data) - names))}.")
    return VQGANEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def image_pixels(image, side: int) -> torch.Tensor:
    """A PIL image as ``[1, 3, side, side]`` in ``[0, 1]``, prepared the way dalle-mini prepared what it encoded.

    dalle-mini's dataset-encoding notebooks (borisdayma/dalle-mini,
    ``dev/encoding/vqgan-jax-encoding-streaming.ipynb``, ``-webdataset.ipynb``, ``-alamy.ipynb``,
    2021; removed in 07eca3c) convert to RGB, ``TF.resize(image, 256, InterpolationMode.LANCZOS)``
    (shorter side to 256), ``TF.center_crop(image, [256, 256])`` and ``T.ToTensor()``, and give
    those ``[0, 1]`` pixels straight to ``VQModel.encode`` (patil-suraj/vqgan-jax,
    ``modeling_flax_vqgan.py``: ``encode`` runs the encoder on ``pixel_values`` unchanged); its
    ``tools/dataset/encode_dataset.ipynb`` does the same with webdataset's ``decode("rgb")``
    (floats in ``[0, 1]``).  Hence :attr:`VQGANEncoderConfig.pixel_range` ``(0, 1)``.  Sizes and
    the crop corner follow torchvision (:func:`~neuroprobe.stimuli.images.resize_shortest_side`,
    :func:`~neuroprobe.stimuli.images.center_crop` with ``convention="torchvision"``).
    """
    import numpy as np

    from neuroprobe.stimuli.images import center_crop, resize_shortest_side

    image = resize_shortest_side(image.convert("RGB"), side, resample=1)  # 1 = Lanczos
    image = center_crop(image, side, side, convention="torchvision")
    return torch.from_numpy(np.asarray(image, np.float32) / np.float32(255)).permute(2, 0, 1).unsqueeze(0)
