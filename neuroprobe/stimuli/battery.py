"""Probe batteries: stimulus sets kept as data in ``probes/<name>/``.

A battery folder holds

``battery.json``
    ``{"name": ..., "description": ..., "concepts": {concept: {"prompt": ..., "names": [...]}}}``.
    ``prompt`` is the text a zero-shot readout compares against; ``names`` are the
    words that name the concept (used for ``concept-token`` pooling and readouts).
``stimuli.csv``
    One row per stimulus with columns

    ============  ==============================================================
    ``id``        unique stimulus id
    ``concept``   the concept the stimulus shows (a key of ``concepts``)
    ``modality``  ``text``, ``image`` or ``pair`` (an image with a text)
    ``form``      e.g. ``photo``, ``drawing``, ``written-name``, ``text-name``
    ``split``     ``screening`` (find cells) or ``testing`` (confirm them)
    ``text``      the text (text and pair stimuli)
    ``image``     image path relative to the folder (image and pair stimuli)
    ``cloze``     optional: a sentence with ``{mask}`` where the concept word goes
    ``target``    optional: the word that fills ``{mask}``
    ============  ==============================================================

Validation errors name the file and the row.

A battery folder may come from someone else, so validation treats it as
untrusted: ``battery.json`` must be UTF-8 JSON with one object per concept; text
may not hold NUL characters; column names may not be ``index`` (the recording's
own row column) or hold ``/``; every image must lie inside the battery folder
(``../`` and absolute paths are refused unless ``battery.json`` says
``"allow_outside_images": true`` or the caller passes ``allow_outside_images=True``,
the CLI's ``--allow-outside-images``), ``battery.json`` and ``stimuli.csv`` may not be
links to files outside the folder (no opt-in: the folder itself may be a link), and
``battery.json`` may nest at most ``MAX_JSON_DEPTH`` levels; every image is decoded
once, before any model is loaded, so a corrupt, truncated, empty or oversized image
stops the run at validation with its row named.  Text cells of ``stimuli.csv`` that
begin with ``'`` followed by ``=``, ``+``, ``-``, ``@``, tab, carriage return or ``'``
lose that one quote (the spreadsheet escape neuroprobe writes, :mod:`neuroprobe.output`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from neuroprobe.errors import BatteryError

MODALITIES = ("text", "image", "pair")
SPLITS = ("screening", "testing")
REQUIRED = ("id", "concept", "modality", "form", "split")
OPTIONAL = ("text", "image", "cloze", "target")

#: Deepest nesting of objects and lists ``battery.json`` may have (the format itself needs 4).
MAX_JSON_DEPTH = 32

#: Largest image (in pixels) a battery may hold: 64 megapixels (e.g. 8000 x 8000).
MAX_IMAGE_PIXELS = 64_000_000

#: Images already decoded without error: (resolved path, size, mtime) -> None.
_CHECKED_IMAGES: dict[tuple[str, int, int], None] = {}


def check_image(path: Path) -> str | None:
    """Decode ``path`` fully; return why it is not a usable image (``None`` when it is)."""
    from PIL import Image

    try:
        st = path.stat()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _CHECKED_IMAGES:
        return None
    if st.st_size == 0:
        return "is empty"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                return f"is too large ({w} x {h} pixels; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels)"
            im.load()
    except Image.DecompressionBombError:
        return f"is too large (more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels)"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for bad files
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"cannot be decoded as an image ({text})"
    _CHECKED_IMAGES[key] = None
    return None


def probes_root() -> Path:
    """Folder holding the shipped batteries (``probes/`` of the repository or install)."""
    here = Path(__file__).resolve().parents[2] / "probes"
    return here


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after following ``..`` and symlinks) lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _target(path: Path) -> str:
    """Where a link points (for messages)."""
    try:
        return str(path.resolve())
    except OSError:
        return "unreadable link"


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (objects and lists), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((x, d + 1) for x in v)
    return deepest


def _concepts(raw: Any, where: Path) -> dict[str, dict[str, Any]]:
    """Check ``battery.json``'s ``concepts``: one object (or null) per concept, with a text prompt and a list of names."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise BatteryError(
                f"{where}: concept {str(key)!r} must be an object like {{\"prompt\": ..., \"names\": [...]}}, "
                f"not {type(value).__name__} {value!r:.40}."
            )
        prompt = value.get("prompt", key)
        names = value.get("names", [key])
        if not isinstance(prompt, str):
            raise BatteryError(f"{where}: the prompt of concept {str(key)!r} must be text.")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise BatteryError(f"{where}: the names of concept {str(key)!r} must be a non-empty list of words.")
        if any("\x00" in x for x in [str(key), prompt, *names]):
            raise BatteryError(f"{where}: concept {str(key)!r} holds a NUL character.")
        out[str(key)] = dict(value)
    if not out:
        raise BatteryError(f"{where}: declares no concepts.")
    return out


@dataclass
class Battery:
    """A validated stimulus set.

    Attributes
    ----------
    name
        Battery name (folder name by default).
    root
        The battery folder.
    table
        One row per stimulus (columns as in the module docstring), in file order.
    concepts
        Concept -> metadata (``prompt``, ``names``) from ``battery.json``.
    meta
        The whole ``battery.json``.
    """

    name: str
    root: Path
    table: pd.DataFrame
    concepts: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    allow_outside_images: bool = False

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, spec: str | Path, *, allow_outside_images: bool = False) -> "Battery":
        """Load and validate a battery by name (under ``probes/``) or by folder path.

        Parameters
        ----------
        spec
            A shipped battery's name or a battery folder.
        allow_outside_images
            Let image paths point outside the battery folder (``../shared/x.png``,
            absolute paths).  Off by default: a battery from someone else must not
            read files elsewhere on this machine.
        """
        path = Path(spec)
        if not path.exists():
            candidate = probes_root() / str(spec)
            if candidate.exists():
                path = candidate
            else:
                known = ", ".join(sorted(p.name for p in probes_root().glob("*") if (p / "stimuli.csv").exists()))
                raise BatteryError(
                    f"battery {str(spec)!r} not found: give a folder with battery.json and stimuli.csv "
                    f"or one of the shipped batteries ({known or 'none'})."
                )
        if not path.is_dir():
            raise BatteryError(f"battery {str(spec)!r} is not a folder; a battery is a folder with battery.json and stimuli.csv.")
        return cls._load_dir(path.resolve(), allow_outside_images)

    @classmethod
    def _load_dir(cls, root: Path, allow_outside_images: bool = False) -> "Battery":
        from neuroprobe.output import read_csv

        meta_path, csv_path = root / "battery.json", root / "stimuli.csv"
        for p in (meta_path, csv_path):
            if not p.exists():
                raise BatteryError(f"{p}: missing; a battery folder needs battery.json and stimuli.csv.")
            # the battery's own files obey the rule its images do, and no opt-in lifts it for them
            # (allow_outside_images is declared in battery.json itself and is about shared image folders)
            if not _inside(p, root):
                raise BatteryError(
                    f"{p}: is a link to a file outside the battery folder ({_target(p)}); a battery may not read "
                    f"files elsewhere — copy the file into the folder (a battery folder that is itself a link is fine)."
                )
        try:
            meta = json.loads(meta_path.resolve().read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise BatteryError(f"{meta_path}: not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
        except json.JSONDecodeError as err:
            raise BatteryError(f"{meta_path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
        except RecursionError:
            raise BatteryError(f"{meta_path}: nested too deeply to read (more than {MAX_JSON_DEPTH} levels).") from None
        except OSError as err:
            raise BatteryError(f"{meta_path}: cannot be read ({err.strerror}).") from None
        if _depth(meta) > MAX_JSON_DEPTH:
            raise BatteryError(f"{meta_path}: nested too deeply (more than {MAX_JSON_DEPTH} levels of objects and lists).")
        if not isinstance(meta, dict) or not isinstance(meta.get("concepts"), dict):
            raise BatteryError(f"{meta_path}: needs an object with a 'concepts' mapping.")
        try:
            # cells that a spreadsheet would run as formulas may carry a leading ' (neuroprobe writes them so)
            table = read_csv(csv_path.resolve(), dtype=str, keep_default_na=False, encoding="utf-8")
        except UnicodeDecodeError as err:
            raise BatteryError(f"{csv_path}: not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
        except Exception as err:  # pandas parser errors name the line
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BatteryError(f"{csv_path}: cannot be parsed as CSV ({text}).") from None
        battery = cls(
            name=str(meta.get("name", root.name)),
            root=root,
            table=table,
            concepts=_concepts(meta["concepts"], meta_path),
            meta=meta,
            allow_outside_images=allow_outside_images or meta.get("allow_outside_images") is True,
        )
        battery.validate()
        return battery

    @classmethod
    def from_table(
        cls, table: pd.DataFrame, concepts: dict[str, dict[str, Any]] | None = None, name: str = "custom",
        root: str | Path = ".", *, allow_outside_images: bool = False,
    ) -> "Battery":
        """Build a battery in memory (for paper code and tests); validated like a folder."""
        table = table.copy()
        for col in OPTIONAL:
            if col not in table:
                table[col] = ""
        table = table.astype({c: str for c in REQUIRED + OPTIONAL})
        if concepts is None:
            concepts = {c: {"prompt": c, "names": [c]} for c in pd.unique(table["concept"])}
        concepts = _concepts(concepts, Path(root) / "battery.json")
        battery = cls(name=name, root=Path(root).resolve(), table=table.reset_index(drop=True), concepts=concepts,
                      meta={"name": name, "concepts": concepts}, allow_outside_images=allow_outside_images)
        battery.validate()
        return battery

    # -------------------------------------------------------------- validate
    def validate(self) -> None:
        """Check columns, values, ids and image files; raise :class:`BatteryError` naming file and row."""
        where = self.root / "stimuli.csv"
        t = self.table
        missing = [c for c in REQUIRED if c not in t.columns]
        if missing:
            raise BatteryError(f"{where}: missing column(s) {', '.join(missing)}; required are {', '.join(REQUIRED)}.")
        for col in OPTIONAL:
            if col not in t.columns:
                t[col] = ""
        if len(t) == 0:
            raise BatteryError(f"{where}: has no stimuli.")
        for col in t.columns:
            name = str(col)
            if name == "index" or "/" in name or not name.strip() or "\x00" in name:
                raise BatteryError(
                    f"{where}: column name {name!r} is not allowed (it may not be 'index', be empty, or hold '/'); rename it."
                )
        for col in t.columns:
            has_nul = t[col].astype(str).str.contains("\x00", regex=False)
            if has_nul.any():
                line = int(has_nul.to_numpy().argmax()) + 2
                raise BatteryError(f"{where}, row {line}: column {str(col)!r} holds a NUL character; remove it.")
        seen: dict[str, int] = {}
        for i, row in enumerate(t.itertuples(index=False)):
            line = i + 2  # header is line 1
            r = row._asdict()
            for col in REQUIRED:
                if not str(r[col]).strip():
                    raise BatteryError(f"{where}, row {line}: empty {col!r}.")
            if r["id"] in seen:
                raise BatteryError(f"{where}, row {line}: duplicate id {r['id']!r} (first on row {seen[r['id']]}).")
            seen[r["id"]] = line
            if r["modality"] not in MODALITIES:
                raise BatteryError(f"{where}, row {line}: modality {r['modality']!r} is not one of {', '.join(MODALITIES)}.")
            if r["split"] not in SPLITS:
                raise BatteryError(f"{where}, row {line}: split {r['split']!r} is not one of {', '.join(SPLITS)}.")
            if r["concept"] not in self.concepts:
                raise BatteryError(f"{where}, row {line}: concept {r['concept']!r} is not declared in battery.json.")
            if r["modality"] in ("text", "pair") and not str(r["text"]).strip():
                raise BatteryError(f"{where}, row {line}: a {r['modality']} stimulus needs a 'text'.")
            if r["modality"] in ("image", "pair"):
                if not str(r["image"]).strip():
                    raise BatteryError(f"{where}, row {line}: a {r['modality']} stimulus needs an 'image' path.")
                image = self.root / r["image"]
                if not self.allow_outside_images and not _inside(image, self.root):
                    raise BatteryError(
                        f"{where}, row {line}: image {r['image']!r} lies outside the battery folder; set "
                        f"\"allow_outside_images\": true in battery.json (or pass --allow-outside-images) if that is intended."
                    )
                if not image.is_file():
                    raise BatteryError(f"{where}, row {line}: image file {r['image']!r} does not exist.")
                problem = check_image(image.resolve())
                if problem:
                    raise BatteryError(f"{where}, row {line}: image {r['image']!r} {problem}.")
            if r["cloze"] and "{mask}" not in r["cloze"]:
                raise BatteryError(f"{where}, row {line}: cloze text must contain '{{mask}}'.")
        for concept, info in self.concepts.items():
            info.setdefault("prompt", concept)
            info.setdefault("names", [concept])

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.table)

    @property
    def concept_names(self) -> list[str]:
        """Concepts in declaration order."""
        return list(self.concepts)

    def load_image(self, row_or_path: Any):
        """Open a stimulus image as RGB (``PIL.Image.Image``)."""
        from PIL import Image

        rel = row_or_path["image"] if not isinstance(row_or_path, (str, Path)) else row_or_path
        path = self.root / str(rel)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise BatteryError(f"{path}: image file does not exist.") from None
        except Exception as err:
            raise BatteryError(f"{path}: cannot be read as an image ({err}).") from None

    def content_hash(self) -> str:
        """SHA-256 over the manifest, the table and every image file (provenance)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode())
        h.update(self.table.to_csv(index=False).encode())
        for rel in sorted(set(self.table["image"]) - {""}):
            h.update(rel.encode())
            h.update((self.root / rel).read_bytes())
        return h.hexdigest()

    def split(self, split: str) -> pd.DataFrame:
        """Rows of one split (``screening`` or ``testing``)."""
        return self.table[self.table["split"] == split]

    def concept_words(self, concept: str) -> list[str]:
        """Words that name ``concept`` (battery.json ``names``), longest first."""
        return sorted(self.concepts[concept]["names"], key=len, reverse=True)

    def concept_spans(self, text: str, concept: str) -> list[tuple[int, int]]:
        """Character spans in ``text`` where a name of ``concept`` occurs (whole words, case-insensitive)."""
        # one compiled alternation per concept, longest name first (regex alternation is ordered),
        # so overlapping names ("grandma" in "grandmother") yield the longest match only
        cache = self.__dict__.setdefault("_span_patterns", {})
        rx = cache.get(concept)
        if rx is None:
            words = "|".join(re.escape(w) for w in self.concept_words(concept))
            rx = cache[concept] = re.compile(r"(?<!\w)(?:" + words + r")(?!\w)", flags=re.IGNORECASE)
        return [m.span() for m in rx.finditer(text)]
