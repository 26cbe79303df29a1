"""Image preprocessing of the bottom-up-attention detector (Pillow + torch only).

As transformers' ``examples/research_projects/lxmert/processing_image.py``:

1. decode to RGB, flip to BGR (the caffe weights expect BGR), cast to float32;
2. resize so the shortest edge is ``min_size_test`` unless the longest edge would pass
   ``max_size_test`` (sizes rounded with ``int(x + 0.5)``), bilinear,
   ``align_corners=False``, no antialiasing (``torch.nn.functional.interpolate`` on
   the float image, which is what the reference does);
3. subtract ``pixel_mean`` and divide by ``pixel_std`` (BGR order);
4. pad at the bottom/right with ``pad_value`` to the largest image of the batch
   (and up to a multiple of ``size_divisibility`` when it is positive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.frcnn.config import FrcnnConfig

ImageLike = Union[Image.Image, str, Path, np.ndarray]

__all__ = ["ImageLike", "PreprocessedImages", "load_rgb", "preprocess_images", "resized_shape"]


@dataclass
class PreprocessedImages:
    """A padded batch ready for the detector.

    Attributes
    ----------
    tensor
        ``[B, 3, H, W]`` float32, BGR, normalised, padded.
    image_sizes
        ``[B, 2]`` int64 ``(h, w)`` of each resized image before padding.
    raw_sizes
        ``[B, 2]`` int64 ``(h, w)`` of each original image.
    """

    tensor: torch.Tensor
    image_sizes: torch.Tensor
    raw_sizes: torch.Tensor

    @property
    def scales_yx(self) -> torch.Tensor:
        """``[B, 2]`` factors from resized to original pixels, ``raw / resized``."""
        return self.raw_sizes.to(torch.float32) / self.image_sizes.to(torch.float32)

    def to(self, device: torch.device | str) -> "PreprocessedImages":
        """The same batch with the pixel tensor on ``device``."""
        return PreprocessedImages(self.tensor.to(device), self.image_sizes, self.raw_sizes)


def resized_shape(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of detectron2's ``ResizeShortestEdge`` at test time."""
    scale = min_size * 1.0 / min(h, w)
    if h < w:
        newh, neww = float(min_size), scale * w
    else:
        newh, neww = scale * h, float(min_size)
    if max(newh, neww) > max_size:
        shrink = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * shrink, neww * shrink
    return int(newh + 0.5), int(neww + 0.5)


def load_rgb(image: ImageLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB array of a PIL image, an image path or an array.

    Arrays are taken as RGB (``[H, W, 3]``) or grey (``[H, W]``).
    """
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise NeuroprobeError(f"Cannot read image {image} ({err}); give a readable image file.") from err
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise NeuroprobeError(f"An image array must be [H, W, 3] RGB or [H, W] grey, got {image.shape}.")
        return image
    raise NeuroprobeError(f"Cannot use a {type(image).__name__} as an image; give a PIL image, a path "
                          "or an array.")


def preprocess_images(images: Sequence[ImageLike], config: FrcnnConfig) -> PreprocessedImages:
    """Resize, normalise and pad a batch of images for the detector.

    Parameters
    ----------
    images
        PIL images, image paths or ``[H, W, 3]`` RGB arrays.
    config
        Detector config (sizes, pixel mean/std, padding).

    Returns
    -------
    PreprocessedImages
        The padded BGR batch with per-image resized and original sizes.
    """
    if len(images) == 0:
        raise NeuroprobeError("No images were given to the detector; pass at least one image.")
    mean = torch.tensor(config.pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.pixel_std, dtype=torch.float32).view(3, 1, 1)
    tensors, sizes, raw = [], [], []
    for image in images:
        rgb = load_rgb(image)
        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).to(torch.float32)  # BGR
        x = x.permute(2, 0, 1).unsqueeze(0)
        newh, neww = resized_shape(h, w, config.min_size_test, config.max_size_test)
        x = F.interpolate(x, (newh, neww), mode="bilinear", align_corners=False).squeeze(0)
        tensors.append((x - mean) / std)
        sizes.append((newh, neww))
        raw.append((h, w))
    max_h = max(s[0] for s in sizes)
    max_w = max(s[1] for s in sizes)
    if config.size_divisibility > 0:
        d = config.size_divisibility
        max_h, max_w = int(math.ceil(max_h / d) * d), int(math.ceil(max_w / d) * d)
    batch = torch.stack([F.pad(t, [0, max_w - t.shape[2], 0, max_h - t.shape[1]], value=config.pad_value)
                         for t in tensors])
    return PreprocessedImages(batch, torch.tensor(sizes, dtype=torch.long), torch.tensor(raw, dtype=torch.long))
