"""Image transforms in Pillow and torch (no torchvision).

:class:`ClipPreprocess` reproduces one of two references, which differ on some images:

``reference="transformers"`` (the ``clip`` subject; ``CLIPImageProcessor`` of ``transformers``)
    Convert to RGB first (``do_convert_rgb``; transparent pixels are composited onto white,
    as ``image_transforms.convert_to_rgb`` does in transformers 5 — 4.x dropped the alpha),
    resize the shortest side to ``size`` with a bicubic filter (the long side becomes
    ``int(size * long / short)``), centre-crop with the corner at ``((H - h) // 2, (W - w) // 2)``
    (``image_transforms.center_crop``), scale to ``[0, 1]``, normalise.
``reference="openai"`` (the ``clip-rn*`` subjects; ``_transform`` of openai/CLIP's ``clip/clip.py``)
    ``Resize(n_px, BICUBIC)``, ``CenterCrop(n_px)``, then ``_convert_image_to_rgb``,
    ``ToTensor``, ``Normalize``: the resize runs on the image in its own mode (Pillow
    resizes palette images with nearest-neighbour whatever filter is asked for, and RGBA
    with premultiplied alpha; the final conversion drops the alpha), and torchvision's crop
    corner is rounded,
    ``int(round((H - h) / 2.0))`` (``torchvision/transforms/functional.py``, ``center_crop``;
    Python's ``round`` takes halves to even).  The long side is ``int(size * long / short)``
    as in ``_compute_resized_output_size``.

The settings come from ``preprocessor_config.json`` next to the checkpoint when
there is one, else from CLIP's published defaults at the model's image size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

#: OpenAI CLIP's published normalisation (``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Pillow resampling filters by the integer codes processor configs use
_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


def to_rgb(image: Image.Image, onto_white: bool = False) -> Image.Image:
    """The image in RGB: Pillow's ``convert("RGB")`` (drops any alpha), or, with ``onto_white``, transparent
    pixels composited onto white first (an alpha band or a ``transparency`` entry, as transformers 5 does)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if onto_white and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int, resample: int = 3) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio.

    The longer side becomes ``int(size * long / short)`` (as ``transformers`` and
    torchvision compute it).
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=_RESAMPLE[int(resample)])


def crop_origin(size: int, crop: int, convention: str = "transformers") -> int:
    """First kept row (or column) when ``crop`` of ``size >= crop`` pixels are kept from the centre.

    ``transformers`` takes ``(size - crop) // 2``; ``torchvision`` rounds,
    ``int(round((size - crop) / 2.0))``, so an odd margin leaves its extra pixel on the
    other side half of the time (Python's ``round`` goes to even).
    """
    if convention == "torchvision":
        return int(round((size - crop) / 2.0))
    return (size - crop) // 2


def center_crop(image: Image.Image, height: int, width: int, convention: str = "transformers") -> Image.Image:
    """Crop the centre ``height`` × ``width`` (corner from :func:`crop_origin`).

    An image smaller than the crop is padded with zeros first: the larger half of an odd
    padding goes before the image for ``transformers`` (``ceil``), after it for ``torchvision``.
    """
    w, h = image.size
    if w < width or h < height:
        W, H = max(w, width), max(h, height)
        canvas = Image.new(image.mode, (W, H))
        if image.mode == "P":
            canvas.putpalette(image.getpalette() or [])
        before = (lambda d: d // 2) if convention == "torchvision" else (lambda d: (d + 1) // 2)
        canvas.paste(image, (before(W - w), before(H - h)))
        image, (w, h) = canvas, canvas.size
    top, left = crop_origin(h, height, convention), crop_origin(w, width, convention)
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float], scale: float = 1 / 255) -> torch.Tensor:
    """RGB ``PIL`` image -> float32 tensor ``[3, H, W]``, scaled then normalised per channel.

    The scaling divides by ``1 / scale`` (255), as torchvision's ``ToTensor`` does.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(1.0 / scale)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _size_of(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for k in (key, "shortest_edge", "height"):
            if value.get(k) is not None:
                return int(value[k])
    return None


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP image preprocessing settings (see the module docstring).

    Attributes
    ----------
    size
        Target length of the shorter side after resizing.
    crop_height, crop_width
        Centre-crop size (the model's input size).
    mean, std
        Per-channel normalisation after scaling to ``[0, 1]``.
    resample
        Pillow filter code (3 = bicubic).
    do_resize, do_center_crop, do_normalize
        Steps of the processor config that are switched on.
    rescale_factor
        Multiplier turning 8-bit values into ``[0, 1]``.
    reference
        ``"transformers"`` or ``"openai"``: whose order and crop rounding to follow
        (see the module docstring).
    """

    size: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    reference: str = "transformers"

    def __post_init__(self) -> None:
        if self.reference not in ("transformers", "openai"):
            raise ValueError(f"reference must be 'transformers' or 'openai', not {self.reference!r}")

    @classmethod
    def openai(cls, n_px: int) -> "ClipPreprocess":
        """openai/CLIP's ``_transform(n_px)`` (what ``clip.load`` returns for a model of input size ``n_px``)."""
        return cls(size=n_px, crop_height=n_px, crop_width=n_px, reference="openai")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, image_size: int = 224) -> "ClipPreprocess":
        """Settings from a ``preprocessor_config.json`` dict, defaults from CLIP at ``image_size``."""
        config = config or {}
        size = _size_of(config.get("size"), "shortest_edge") or image_size
        crop = config.get("crop_size")
        ch = _size_of(crop, "height") or image_size
        cw = (int(crop["width"]) if isinstance(crop, dict) and crop.get("width") else ch)
        return cls(
            size=size,
            crop_height=ch,
            crop_width=cw,
            mean=tuple(float(x) for x in config.get("image_mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in config.get("image_std", CLIP_STD)),  # type: ignore[arg-type]
            resample=int(config.get("resample", 3)),
            do_resize=bool(config.get("do_resize", True)),
            do_center_crop=bool(config.get("do_center_crop", True)),
            do_normalize=bool(config.get("do_normalize", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        )

    @classmethod
    def from_source(cls, source: str | Path, image_size: int = 224, revision: str | None = None) -> "ClipPreprocess":
        """Read ``preprocessor_config.json`` from a local folder or the Hugging Face cache (never downloads).

        Parameters
        ----------
        source
            A checkpoint folder or a hub id.
        image_size
            The vision tower's input size, used when no config is found.
        revision
            Hub revision for a hub id.
        """
        found: Path | None = None
        folder = Path(str(source))
        if folder.is_dir():
            candidate = folder / "preprocessor_config.json"
            found = candidate if candidate.is_file() else None
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(str(source), "preprocessor_config.json", revision=revision)
                found = Path(hit) if isinstance(hit, str) else None
            except Exception:  # noqa: BLE001 - a malformed id simply has no cached config
                found = None
        config = json.loads(found.read_text(encoding="utf-8")) if found else None
        return cls.from_config(config, image_size)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess a list of images into ``pixel_values`` ``[B, 3, crop_height, crop_width]``."""
        out = []
        for im in images:
            if self.reference == "transformers":  # do_convert_rgb runs first; openai/CLIP converts after the crop
                im = to_rgb(im, onto_white=True)
            if self.do_resize:
                im = resize_shortest_side(im, self.size, self.resample)
            if self.do_center_crop:
                convention = "torchvision" if self.reference == "openai" else "transformers"
                im = center_crop(im, self.crop_height, self.crop_width, convention)
            mean, std = (self.mean, self.std) if self.do_normalize else ((0.0,) * 3, (1.0,) * 3)
            out.append(to_tensor(im, mean, std, self.rescale_factor))
        return torch.stack(out)
