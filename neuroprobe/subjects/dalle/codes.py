"""Where the DALL·E subject gets the image codes it scores.

min-dalle's decoder predicts **VQGAN codes** (16 x 16 grid, 16384 codes).  The VQGAN
*encoder* (pixels -> codes) is not among min-dalle's files; with its weights
(``vqgan=FILE``, see :mod:`neuroprobe.subjects.dalle.encoder`) the subject encodes images
itself.  Codes come from, in order:

1. a **codes file** (``dalle_codes.json`` in the battery folder, or the subject's
   ``codes=PATH`` option) written by running the VQGAN encoder elsewhere::

       {"codebook": "vqgan_imagenet_f16_16384",
        "codes": {"images/berry_photo.png": [256 ints], "concept:halle_berry": [256 ints]}}

   keys are image paths relative to the battery folder, or ``concept:<name>`` for a
   concept's reference image;
2. the **VQGAN encoder**, when its weights were given;
3. otherwise a deterministic **pixel-code fallback** (:func:`pixel_codes`): the
   image is centre-cropped and averaged to a 16 x 16 grid and each cell's colour is
   quantised to a code index.  These are *not* VQGAN codes: a pretrained model's
   likelihood of them says little about what it knows, so the subject warns when it
   uses them.  They exist so that the whole pipeline (recording, lesions, readouts)
   runs offline and deterministically on any battery.

OpenAI's dVAE tokens (:mod:`neuroprobe.subjects.dalle.dvae`; 8192 codes on 32 x 32)
are a different code space and cannot be scored by this decoder.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neuroprobe.errors import NeuroprobeError

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

CODES_FILE = "dalle_codes.json"


def pixel_codes(image, grid: int = 16, code_count: int = 2**14) -> torch.Tensor:
    """Deterministic stand-in codes: colour of each grid cell quantised to ``L**3 <= code_count`` levels.

    Parameters
    ----------
    image
        A PIL image.
    grid
        Grid side (16 for min-dalle: 256 codes).
    code_count
        Size of the code space.

    Returns
    -------
    torch.Tensor
        Long ``[grid * grid]``, row-major, values in ``[0, code_count)``.
    """
    from PIL import Image

    levels = max(1, int(round(code_count ** (1 / 3))))
    while levels**3 > code_count:
        levels -= 1
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    cells = image.crop((left, top, left + s, top + s)).resize((grid, grid), Image.BOX)
    rgb = np.asarray(cells, dtype=np.int64)  # [grid, grid, 3] in 0..255
    q = np.minimum(rgb * levels // 256, levels - 1)
    codes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    return torch.from_numpy(codes.reshape(-1).astype(np.int64))


def read_codes_file(path: str | Path) -> dict[str, list[int]]:
    """Read a codes file (``{"codes": {key: [ints]}}`` or a plain ``{key: [ints]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeuroprobeError(f"codes file {path} does not exist; give a JSON file mapping image paths to VQGAN codes.") from None
    except json.JSONDecodeError as err:
        raise NeuroprobeError(f"codes file {path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    codes = data.get("codes", data) if isinstance(data, dict) else None
    if not isinstance(codes, dict):
        raise NeuroprobeError(f"codes file {path} must map image paths (or 'concept:<name>') to lists of codes.")
    return {str(k): v for k, v in codes.items() if k not in ("codebook", "format")}


def write_codes_file(path: str | Path, codes: dict[str, Any], codebook: str = "vqgan_imagenet_f16_16384") -> None:
    """Write a codes file readable by :func:`read_codes_file`."""
    out = {k: [int(c) for c in np.asarray(v).reshape(-1)] for k, v in codes.items()}
    Path(path).write_text(json.dumps({"codebook": codebook, "codes": out}), encoding="utf-8")


class ImageCodes:
    """Resolves and caches the image codes of stimuli and concepts for one subject.

    Parameters
    ----------
    count
        Codes per image (256).
    code_count
        Valid code values (16384).
    codes_path
        Optional codes file used for every battery (else ``<battery>/dalle_codes.json`` if present).
    encoder
        Optional ``fn(PIL image) -> codes [count]`` (the VQGAN encoder) for images without a file entry.
    """

    def __init__(self, count: int, code_count: int, codes_path: str | Path | None = None, encoder: Any = None) -> None:
        self.encoder = encoder
        self.count = count
        self.code_count = code_count
        self.codes_path = Path(codes_path) if codes_path else None
        self._files: dict[Path, dict[str, list[int]]] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.used_fallback = False

    def _table(self, battery: "Battery") -> tuple[dict[str, list[int]], Path | None]:
        path = self.codes_path or (battery.root / CODES_FILE)
        if self.codes_path is None and not path.is_file():
            return {}, None
        if path not in self._files:
            self._files[path] = read_codes_file(path)
        return self._files[path], path

    def _check(self, value: Any, key: str, path: Path | None) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(value, dtype=np.int64).reshape(-1))
        if codes.numel() != self.count or (codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.code_count)):
            raise NeuroprobeError(
                f"{path}: entry {key!r} must hold {self.count} codes in [0, {self.code_count}), "
                f"got {codes.numel()} values; write VQGAN f16-16384 codes."
            )
        return codes

    def for_image(self, battery: "Battery", rel: str) -> torch.Tensor:
        """Codes of the image at ``rel`` (relative to the battery folder)."""
        key = (str(battery.root), rel)
        if key not in self._cache:
            table, path = self._table(battery)
            if rel in table:
                self._cache[key] = self._check(table[rel], rel, path)
            elif self.encoder is not None:
                self._cache[key] = self._check(self.encoder(battery.load_image(rel)), rel, None)
            else:
                if not self.used_fallback:
                    warnings.warn(
                        "dalle: no VQGAN codes for some images (no dalle_codes.json entry); using deterministic "
                        "pixel-colour stand-in codes, which are not VQGAN codes (see neuroprobe.subjects.dalle.codes).",
                        stacklevel=2,
                    )
                self.used_fallback = True
                grid = int(round(self.count**0.5))
                self._cache[key] = pixel_codes(battery.load_image(rel), grid, self.code_count)
        return self._cache[key]

    def for_concept(self, battery: "Battery", concept: str) -> torch.Tensor:
        """A concept's reference codes: a ``concept:<name>`` entry, else its first image in the battery."""
        table, path = self._table(battery)
        key = f"concept:{concept}"
        if key in table:
            return self._check(table[key], key, path)
        t = battery.table
        rows = t[(t["concept"] == concept) & (t["modality"].isin(["image", "pair"]))]
        if len(rows) == 0:
            raise NeuroprobeError(
                f"the DALL-E readout of text stimuli needs an image of concept {concept!r}: add an image stimulus "
                f"of it to the battery or a 'concept:{concept}' entry to {CODES_FILE}."
            )
        return self.for_image(battery, str(rows.iloc[0]["image"]))
