"""Stimuli as the atlas shows them: image thumbnails and text split into tokens.

Token ids in a recording are whatever the subject's tokenizer produced; turning them
back into text is per-subject knowledge, kept here as data: the organism reads UTF-8
bytes, transformers subjects have a tokenizer beside their checkpoint.  When no
decoder is available the tokens are shown by id (the shading still holds).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

#: subject name -> how its text token ids decode ("bytes": one UTF-8 byte per token).
BYTE_SUBJECTS = {"organism": "bytes", "organism-cross": "bytes"}
#: token ids above the bytes in the byte subjects' traces (the cross-modal organism's special and image tokens)
BYTE_SPECIALS = {256: "[CLS]", 257: "\u2205", 258: "[MASK]"}
IMAGE_TOKEN_BASE = 1000

Segments = list[tuple[str, list[int]]]  # (text, token rows that make it)


def _byte_segments(ids: np.ndarray) -> Segments:
    """Group UTF-8 byte tokens into characters (a Korean syllable is three byte tokens); ids above 255 are
    special tokens (:data:`BYTE_SPECIALS`) or image token ``p`` (``1000 + p``, shown as ``▦p``)."""
    out: Segments = []
    i, n = 0, len(ids)
    while i < n:
        b = int(ids[i])
        if b > 255:
            label = BYTE_SPECIALS.get(b) or (f"\u25a6{b - IMAGE_TOKEN_BASE}" if b >= IMAGE_TOKEN_BASE else f"\u27e8{b}\u27e9")
            out.append((label, [i]))
            i += 1
            continue
        width = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        while width > 1 and any(int(x) > 255 for x in ids[i : i + width]):
            width -= 1
        chunk = bytes(int(x) & 0xFF for x in ids[i : i + width])
        out.append((chunk.decode("utf-8", errors="replace"), list(range(i, min(i + width, n)))))
        i += width
    return out


def _clean(tok: str) -> str:
    if tok.startswith("##"):
        return tok[2:]
    return tok.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")


def token_decoder(attrs: dict) -> Callable[[np.ndarray], Segments]:
    """A function ``ids -> segments`` for a recording's text stream (see the module docstring)."""
    subject = str(attrs.get("subject", ""))
    if BYTE_SUBJECTS.get(subject) == "bytes":
        return _byte_segments
    tok = None
    checkpoint = str(attrs.get("checkpoint", "") or "")
    if checkpoint and subject not in ("planted", "synthetic"):
        try:  # offline: only what is already on disk (HF cache or a local folder)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(checkpoint, revision=str(attrs.get("revision") or "") or None,
                                                local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "no decoder": ids are shown instead
            tok = None
    if tok is not None:
        def decode(ids: np.ndarray) -> Segments:
            toks = tok.convert_ids_to_tokens([int(i) for i in ids])
            return [(_clean(str(t)) if t is not None else f"\u27e8{int(i)}\u27e9", [j]) for j, (t, i) in enumerate(zip(toks, ids))]
        return decode
    return lambda ids: [(f"\u27e8{int(i)}\u27e9", [j]) for j, i in enumerate(ids)]


class Thumbnails:
    """Writes one small PNG per image stimulus the atlas shows (once), from the battery's folder."""

    def __init__(self, battery, folder: Path, size: int = 96) -> None:
        self.battery = battery
        self.folder = folder
        self.size = size
        self.done: dict[int, str | None] = {}

    def __call__(self, index: int, row) -> str | None:
        """Relative path (from the atlas root) of stimulus ``index``'s thumbnail, or ``None``."""
        if index in self.done:
            return self.done[index]
        rel = None
        image = str(row.get("image", "") or "")
        if self.battery is not None and image and image != "nan":
            try:
                img = self.battery.load_image(image)
                img.thumbnail((self.size, self.size))
                self.folder.mkdir(parents=True, exist_ok=True)
                img.save(self.folder / f"{index}.png")
                rel = f"stimuli/{index}.png"
            except Exception:  # noqa: BLE001 - a missing image shows as a placeholder, not an error
                rel = None
        self.done[index] = rel
        return rel


def find_battery(attrs: dict, battery: str | Path | None = None):
    """The recording's battery (for its images), or ``None`` when it cannot be found.

    An explicit ``battery`` (name or folder) wins; otherwise the name in the recording's
    provenance is looked up among the shipped batteries, and used only when its content
    hash matches the recording's.
    """
    from neuroprobe.stimuli.battery import Battery

    try:
        b = Battery.load(str(battery if battery is not None else attrs.get("battery", "")))
    except Exception:  # noqa: BLE001
        if battery is not None:
            raise
        return None
    if battery is None:
        want = str(attrs.get("battery_hash", "") or "")
        try:
            have = b.content_hash()
        except Exception:  # noqa: BLE001
            have = want
        if want and have != want:
            return None
    return b
