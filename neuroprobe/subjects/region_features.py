"""Precomputed region features (Faster R-CNN boxes + 2048-d vectors) for LXMERT-style subjects.

Two on-disk formats, each with a reader and a writer, and one lookup over either:

LXMERT ``*_obj36.tsv`` (airsplay/lxmert, made by bottom-up-attention's ``generate_tsv.py``)
    One image per line, tab-separated, no header, fields
    ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
    boxes, features``.  ``img_h``, ``img_w`` and ``num_boxes`` are decimal integers;
    the other numeric fields are base64 of little-endian arrays: ``objects_id`` and
    ``attrs_id`` int64 ``[n]``, ``objects_conf`` and ``attrs_conf`` float32 ``[n]``,
    ``boxes`` float32 ``[n, 4]`` (``x1, y1, x2, y2`` in image pixels), ``features``
    float32 ``[n, D]``.  Lines are long (a 36 x 2048 block is ~400 kB of base64), so the
    ``csv`` field size limit is raised.

HDF5 (this project's plain layout)::

    /features   float32 [N, n, D]   region features
    /boxes      float32 [N, n, 4]   x1/w, y1/h, x2/w, y2/h (normalised by the image size)
    /image_ids  utf-8 str [N]       key of each row
    optional, same first two axes: /raw_boxes [N, n, 4] pixels, /obj_ids, /attr_ids int64 [N, n],
    /obj_scores, /attr_scores float32 [N, n]; /num_regions int64 [N]; /image_sizes int64 [N, 2] (h, w)
    root attributes: format="neuroprobe-region-features", format_version=1, n_regions

Both readers return boxes normalised by image width and height, the form LXMERT's
``visual_pos`` input takes.  :class:`RegionFeatureSource` opens either file lazily
(a byte-offset index for TSV, row index for HDF5) and answers
``source[image_id_or_path] -> (features, boxes)``; a path is matched by its file stem
(``.../COCO_val2014_000000000042.jpg`` -> ``COCO_val2014_000000000042``).
"""
from __future__ import annotations

import base64
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from neuroprobe.errors import NeuroprobeError

__all__ = [
    "TSV_FIELDS",
    "RegionFeatureSource",
    "RegionRecord",
    "iter_obj_tsv",
    "read_features_h5",
    "read_obj_tsv",
    "records_from_regions",
    "write_features_h5",
    "write_obj_tsv",
]

TSV_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
              "num_boxes", "boxes", "features")
H5_FORMAT = "neuroprobe-region-features"
H5_VERSION = 1


def _raise_csv_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 10


@dataclass
class RegionRecord:
    """Regions of one image.

    Attributes
    ----------
    image_id
        Key of the image.
    image_h, image_w
        Original image size in pixels.
    features
        ``[n, D]`` float32.
    raw_boxes
        ``[n, 4]`` float32 ``x1, y1, x2, y2`` in pixels.
    obj_ids, attr_ids
        ``[n]`` int64 Visual Genome object / attribute ids (``-1`` if unknown).
    obj_conf, attr_conf
        ``[n]`` float32 confidences.
    """

    image_id: str
    image_h: int
    image_w: int
    features: np.ndarray
    raw_boxes: np.ndarray
    obj_ids: np.ndarray
    obj_conf: np.ndarray
    attr_ids: np.ndarray
    attr_conf: np.ndarray

    @property
    def boxes(self) -> np.ndarray:
        """``[n, 4]`` float32 boxes normalised by the image width and height."""
        out = self.raw_boxes.astype(np.float32, copy=True)
        out[:, (0, 2)] /= self.image_w
        out[:, (1, 3)] /= self.image_h
        return out

    @property
    def num_boxes(self) -> int:
        """Number of regions."""
        return int(self.features.shape[0])


# ---------------------------------------------------------------------------- TSV
def _decode(field: str, dtype: type, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
    try:
        return np.frombuffer(base64.b64decode(field), dtype=dtype).reshape(shape).copy()
    except (ValueError, TypeError) as err:
        raise NeuroprobeError(f"Field {what} of {where} is not base64 {np.dtype(dtype).name} "
                              f"of shape {shape}; the file is not an LXMERT obj36 TSV.") from err


def _record_from_fields(row: Sequence[str], where: str) -> RegionRecord:
    if len(row) != len(TSV_FIELDS):
        raise NeuroprobeError(f"{where} has {len(row)} tab-separated fields, expected {len(TSV_FIELDS)} "
                              f"({', '.join(TSV_FIELDS)}).")
    item = dict(zip(TSV_FIELDS, row))
    try:
        h, w, n = int(item["img_h"]), int(item["img_w"]), int(item["num_boxes"])
    except ValueError as err:
        raise NeuroprobeError(f"img_h, img_w or num_boxes of {where} is not an integer.") from err
    feats = _decode(item["features"], np.float32, (n, -1), "features", where)
    return RegionRecord(
        image_id=item["img_id"], image_h=h, image_w=w, features=feats,
        raw_boxes=_decode(item["boxes"], np.float32, (n, 4), "boxes", where),
        obj_ids=_decode(item["objects_id"], np.int64, (n,), "objects_id", where),
        obj_conf=_decode(item["objects_conf"], np.float32, (n,), "objects_conf", where),
        attr_ids=_decode(item["attrs_id"], np.int64, (n,), "attrs_id", where),
        attr_conf=_decode(item["attrs_conf"], np.float32, (n,), "attrs_conf", where),
    )


def _parse_line(line: str, where: str) -> RegionRecord:
    _raise_csv_limit()
    rows = list(csv.reader([line.rstrip("\r\n")], delimiter="\t"))
    return _record_from_fields(rows[0] if rows else [], where)


def iter_obj_tsv(path: str | Path) -> Iterator[RegionRecord]:
    """Stream the records of an LXMERT ``*_obj36.tsv`` file, one image at a time."""
    path = Path(path)
    _raise_csv_limit()
    try:
        with open(path, newline="") as f:
            for i, row in enumerate(csv.reader(f, delimiter="\t")):
                if row:
                    yield _record_from_fields(row, f"line {i + 1} of {path}")
    except OSError as err:
        raise NeuroprobeError(f"Cannot read region features {path} ({err}).") from err


def read_obj_tsv(path: str | Path, image_ids: Iterable[str] | None = None) -> dict[str, RegionRecord]:
    """Read an LXMERT ``*_obj36.tsv`` file into ``{image_id: RegionRecord}``.

    Parameters
    ----------
    path
        The TSV file.
    image_ids
        Keep only these images (all when ``None``).
    """
    wanted = None if image_ids is None else {str(i) for i in image_ids}
    return {r.image_id: r for r in iter_obj_tsv(path) if wanted is None or r.image_id in wanted}


def _b64(array: np.ndarray, dtype: type) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def write_obj_tsv(path: str | Path, records: Iterable[RegionRecord], append: bool = False) -> Path:
    """Write records in the LXMERT ``*_obj36.tsv`` format (see the module docstring)."""
    path = Path(path)
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for r in records:
            n = r.num_boxes
            writer.writerow([r.image_id, int(r.image_h), int(r.image_w),
                             _b64(r.obj_ids.reshape(n), np.int64), _b64(r.obj_conf.reshape(n), np.float32),
                             _b64(r.attr_ids.reshape(n), np.int64), _b64(r.attr_conf.reshape(n), np.float32),
                             n, _b64(r.raw_boxes.reshape(n, 4), np.float32),
                             _b64(r.features.reshape(n, -1), np.float32)])
    return path


# ---------------------------------------------------------------------------- HDF5
def write_features_h5(path: str | Path, image_ids: Sequence[str], features: np.ndarray, boxes: np.ndarray,
                      **extra: np.ndarray) -> Path:
    """Write region features in the HDF5 layout of the module docstring.

    Parameters
    ----------
    path
        Output file (overwritten).
    image_ids
        ``N`` keys.
    features, boxes
        ``[N, n, D]`` features and ``[N, n, 4]`` normalised boxes (numpy or torch).
    **extra
        Optional datasets: ``raw_boxes``, ``obj_ids``, ``obj_scores``, ``attr_ids``,
        ``attr_scores``, ``num_regions``, ``image_sizes``.  The dict returned by
        :func:`neuroprobe.subjects.frcnn.extract_regions` can be passed as
        ``**{k: v for k, v in regions.items() if k not in ("features", "boxes")}``.
    """
    allowed = {"raw_boxes", "obj_ids", "obj_scores", "attr_ids", "attr_scores", "num_regions", "image_sizes"}
    unknown = set(extra) - allowed
    if unknown:
        raise NeuroprobeError(f"Unknown region datasets {sorted(unknown)}; allowed are {sorted(allowed)}.")
    features, boxes = _np(features).astype(np.float32), _np(boxes).astype(np.float32)
    if features.ndim != 3 or boxes.shape != features.shape[:2] + (4,) or len(image_ids) != len(features):
        raise NeuroprobeError(f"Region features {features.shape}, boxes {boxes.shape} and {len(image_ids)} ids "
                              "do not agree; expected [N, n, D], [N, n, 4] and N ids.")
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = H5_FORMAT
        f.attrs["format_version"] = H5_VERSION
        f.attrs["n_regions"] = features.shape[1]
        f.create_dataset("features", data=features, chunks=(1,) + features.shape[1:])
        f.create_dataset("boxes", data=boxes)
        f.create_dataset("image_ids", data=np.array([str(i) for i in image_ids], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        for key, value in extra.items():
            f.create_dataset(key, data=_np(value))
    return path


def read_features_h5(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``(image_ids, features [N, n, D], boxes [N, n, 4] normalised)`` from an HDF5 file."""
    with _open_h5(path) as f:
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["image_ids"][()]]
        return ids, f["features"][()], f["boxes"][()]


def _open_h5(path: str | Path) -> h5py.File:
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise NeuroprobeError(f"Cannot open region features {path} as HDF5 ({err}).") from err
    missing = [k for k in ("features", "boxes", "image_ids") if k not in f]
    if missing:
        f.close()
        raise NeuroprobeError(f"Region feature file {path} lacks the datasets {missing}; "
                              "write it with write_features_h5.")
    return f


def _np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x)


# ---------------------------------------------------------------------------- lookup
class RegionFeatureSource:
    """Lazy ``image id or path -> (features, boxes)`` lookup over a TSV or HDF5 file.

    Parameters
    ----------
    path
        ``*.tsv`` (LXMERT obj36) or ``*.h5`` / ``*.hdf5`` file.

    Examples
    --------
    >>> source = RegionFeatureSource("val2014_obj36.tsv")        # doctest: +SKIP
    >>> feats, boxes = source["COCO_val2014_000000000042.jpg"]  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NeuroprobeError(f"Region feature file {self.path} does not exist; give an LXMERT *_obj36.tsv "
                                  "or a region-feature HDF5 file.")
        self.kind = "h5" if self.path.suffix.lower() in (".h5", ".hdf5") else "tsv"
        self._h5: h5py.File | None = None
        self._index: dict[str, int] = {}
        if self.kind == "h5":
            self._h5 = _open_h5(self.path)
            ids = self._h5["image_ids"][()]
            self._index = {(s.decode() if isinstance(s, bytes) else str(s)): i for i, s in enumerate(ids)}
        else:
            with open(self.path, "rb") as f:
                offset = 0
                for line in f:
                    key = line.split(b"\t", 1)[0].decode("utf-8", errors="replace")
                    if key.strip():
                        self._index[key] = offset
                    offset += len(line)

    # -- mapping-like interface
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return self._key(key, strict=False) is not None

    def __getitem__(self, key: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """``(features [n, D] float32, boxes [n, 4] float32 normalised)`` of one image."""
        if self.kind == "h5":
            feats, boxes, _ = self._h5_row(self._index[self._key(key)])  # type: ignore[index]
            return feats, boxes
        record = self.record(key)
        return record.features, record.boxes

    @property
    def ids(self) -> list[str]:
        """All image ids in file order."""
        return list(self._index)

    def _key(self, key: object, strict: bool = True) -> str | None:
        candidates = [str(key)]
        if isinstance(key, (str, Path)):
            p = Path(key)
            candidates += [p.name, p.stem]
        for c in candidates:
            if c in self._index:
                return c
        if strict:
            raise NeuroprobeError(f"No region features for {key!s} in {self.path}; "
                                  f"its ids look like {', '.join(self.ids[:3])}.")
        return None

    def record(self, key: str | Path) -> RegionRecord:
        """The full :class:`RegionRecord` of one image (ids, confidences, pixel boxes too)."""
        k = self._key(key)
        assert k is not None
        if self.kind == "tsv":
            with open(self.path, "rb") as f:
                f.seek(self._index[k])
                line = f.readline().decode("utf-8")
            return _parse_line(line, f"image {k} of {self.path}")
        f5 = self._h5
        assert f5 is not None
        i = self._index[k]
        feats, boxes, n = self._h5_row(i)
        if "image_sizes" in f5:
            h, w = (int(v) for v in f5["image_sizes"][i])
            raw = f5["raw_boxes"][i][:n] if "raw_boxes" in f5 else boxes * np.array([w, h, w, h], np.float32)
        else:  # no image size: keep the normalised boxes (as pixels of a 1 x 1 image)
            h, w, raw = 1, 1, boxes

        def opt(name: str, fill: float, dtype: type) -> np.ndarray:
            return f5[name][i][:n].astype(dtype) if name in f5 else np.full(n, fill, dtype=dtype)

        return RegionRecord(k, h, w, feats, np.asarray(raw, dtype=np.float32),
                            opt("obj_ids", -1, np.int64), opt("obj_scores", 0.0, np.float32),
                            opt("attr_ids", -1, np.int64), opt("attr_scores", 0.0, np.float32))

    def _h5_row(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        f5 = self._h5
        assert f5 is not None
        feats = f5["features"][i].astype(np.float32)
        n = int(f5["num_regions"][i]) if "num_regions" in f5 else feats.shape[0]
        return feats[:n], f5["boxes"][i][:n].astype(np.float32), n

    def batch(self, keys: Sequence[str | Path], n_regions: int = 36) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stack several images: ``features [B, n, D]``, ``boxes [B, n, 4]``, ``mask [B, n]`` (True = real).

        Images with more than ``n_regions`` regions are cut, fewer are zero-padded.
        """
        pairs = [self[k] for k in keys]
        dim = max((f.shape[1] for f, _ in pairs), default=0)
        feats = np.zeros((len(pairs), n_regions, dim), dtype=np.float32)
        boxes = np.zeros((len(pairs), n_regions, 4), dtype=np.float32)
        mask = np.zeros((len(pairs), n_regions), dtype=bool)
        for i, (f, b) in enumerate(pairs):
            k = min(len(f), n_regions)
            feats[i, :k], boxes[i, :k], mask[i, :k] = f[:k], b[:k], True
        return feats, boxes, mask

    def close(self) -> None:
        """Close the HDF5 file (no-op for TSV)."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "RegionFeatureSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def records_from_regions(image_ids: Sequence[str], regions: Mapping[str, object]) -> list[RegionRecord]:
    """Turn the dict of :func:`neuroprobe.subjects.frcnn.extract_regions` into TSV records."""
    out = []
    arr = {k: _np(v) for k, v in regions.items()}
    for i, key in enumerate(image_ids):
        n = int(arr["num_regions"][i])
        h, w = (int(v) for v in arr["image_sizes"][i])
        out.append(RegionRecord(str(key), h, w, arr["features"][i, :n].astype(np.float32),
                                arr["raw_boxes"][i, :n].astype(np.float32), arr["obj_ids"][i, :n].astype(np.int64),
                                arr["obj_scores"][i, :n].astype(np.float32), arr["attr_ids"][i, :n].astype(np.int64),
                                arr["attr_scores"][i, :n].astype(np.float32)))
    return out
