"""Region features for LXMERT-style subjects: images -> top-``n`` regions of the detector.

Two post-processing recipes, both on the detector's 300 proposals:

``method="butd"`` (default) — bottom-up-attention's ``tools/generate_tsv.py``, the
    recipe behind LXMERT's ``*_obj36.tsv`` features: for every object class run NMS
    (IoU 0.3) over the *proposal* boxes under that class's probability; a proposal's
    confidence is its best probability among the classes whose NMS it survives;
    keep the proposals with confidence >= ``conf_thresh``, but at least
    ``min_boxes`` and at most ``max_boxes`` of them (both ``n_regions`` by default,
    i.e. exactly the top ``n_regions``).  Boxes are the proposals; features the
    mean-pooled res5 map of those proposals; object/attribute ids the argmax over the
    1600 classes / 400 attributes (background and "no attribute" excluded).
``method="hf"`` — transformers' ``lxmert/modeling_frcnn.py`` (``ROIOutputs``): boxes
    regressed for the most probable class, clipped, one class-agnostic NMS per
    threshold of ``roi_heads.nms_thresh_test`` until between ``min_detections`` and
    ``n_regions`` survive (the last threshold's result is used when none does).

Boxes are returned in original-image pixels (``raw_boxes``) and normalised by the
original width and height (``boxes``: ``x1/w, y1/h, x2/w, y2/h``), the input LXMERT
takes.  Images with fewer than ``n_regions`` regions are zero-padded (ids ``-1``) and
``num_regions`` says how many are real.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.frcnn.model import Detector, DetectorOutput
from neuroprobe.subjects.frcnn.ops import clip_boxes_, multiclass_nms_shared_boxes, nms
from neuroprobe.subjects.frcnn.preprocess import ImageLike, PreprocessedImages, preprocess_images

__all__ = ["METHODS", "extract_regions", "select_regions"]

METHODS = ("butd", "hf")

#: ``cfg.TEST.NMS`` of the bottom-up-attention caffe models used by ``generate_tsv.py``.
BUTD_NMS_THRESH = 0.3


def extract_regions(detector: Detector, images: ImageLike | Sequence[ImageLike], n_regions: int = 36, *,
                    method: str = "butd", batch_size: int = 1, conf_thresh: float = 0.2,
                    min_boxes: int | None = None, nms_thresh: float | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the detector and keep the top regions of each image.

    Parameters
    ----------
    detector
        A loaded :class:`~neuroprobe.subjects.frcnn.model.Detector`
        (:func:`~neuroprobe.subjects.frcnn.loading.load_detector`).
    images
        One image or a sequence: PIL images, paths or ``[H, W, 3]`` RGB arrays.
    n_regions
        Regions per image (36 for LXMERT); also ``max_boxes``.
    method
        ``"butd"`` or ``"hf"`` (see the module docstring).
    batch_size
        Images per forward pass.  1 (default) makes every image's result independent
        of the batch; larger batches are padded together as in the reference.
    conf_thresh, min_boxes, nms_thresh
        ``"butd"`` only: confidence threshold, minimum boxes (default ``n_regions``)
        and per-class NMS IoU (default 0.3).
    progress
        Show a progress bar.

    Returns
    -------
    dict[str, torch.Tensor]
        On CPU: ``features`` ``[B, n, D]`` float32, ``boxes`` ``[B, n, 4]`` normalised,
        ``raw_boxes`` ``[B, n, 4]`` pixels, ``obj_ids`` / ``attr_ids`` ``[B, n]`` int64,
        ``obj_scores`` / ``attr_scores`` ``[B, n]``, ``num_regions`` ``[B]`` and
        ``image_sizes`` ``[B, 2]`` original ``(h, w)``.
    """
    if method not in METHODS:
        raise NeuroprobeError(f"Unknown region method {method!r}; use one of {', '.join(METHODS)}.")
    if n_regions < 1:
        raise NeuroprobeError(f"n_regions must be at least 1, got {n_regions}.")
    if not isinstance(images, (list, tuple)):
        images = [images]
    device = next(detector.parameters()).device
    per_image: list[dict[str, torch.Tensor]] = []
    starts = range(0, len(images), max(1, batch_size))
    for start in tqdm(starts, desc="regions", unit="batch", disable=not progress):
        prep = preprocess_images(images[start:start + max(1, batch_size)], detector.config)
        with torch.inference_mode():
            out = detector(prep.tensor.to(device), prep.image_sizes)
            per_image.extend(select_regions(detector, out, prep, n_regions, method=method,
                                            conf_thresh=conf_thresh, min_boxes=min_boxes,
                                            nms_thresh=nms_thresh))
    return _stack(per_image, n_regions, detector.config.roi_feature_size)


def select_regions(detector: Detector, out: DetectorOutput, prep: PreprocessedImages, n_regions: int, *,
                   method: str = "butd", conf_thresh: float = 0.2, min_boxes: int | None = None,
                   nms_thresh: float | None = None) -> list[dict[str, torch.Tensor]]:
    """Post-process one batch of raw detector outputs (see :func:`extract_regions`).

    Returns one dict per image with unpadded ``[k, ...]`` tensors (k <= ``n_regions``).
    """
    results = []
    for i, parts in enumerate(out.split()):
        proposals = parts["proposals"]
        probs = torch.softmax(parts["obj_logits"], dim=-1)[:, :-1]
        attr_logits = parts["attr_logits"]
        if method == "butd":
            idx, boxes = _butd(proposals, probs, n_regions, conf_thresh,
                               n_regions if min_boxes is None else min_boxes,
                               BUTD_NMS_THRESH if nms_thresh is None else nms_thresh)
            obj_scores, obj_ids = probs[idx].max(dim=-1) if len(idx) else _empty_max(probs)
            attr_probs = torch.softmax(attr_logits, dim=-1)[:, :-1] if attr_logits is not None else None
        else:
            idx, boxes, obj_scores, obj_ids = _hf(proposals, probs, parts["box_deltas"],
                                                  out.image_sizes[i].tolist(), detector, n_regions)
            attr_probs = torch.softmax(attr_logits[:, :-1], dim=-1) if attr_logits is not None else None
        if attr_probs is not None and len(idx):
            attr_scores, attr_ids = attr_probs[idx].max(dim=-1)
        else:
            attr_scores = torch.zeros(len(idx), device=probs.device)
            attr_ids = torch.full((len(idx),), -1, dtype=torch.long, device=probs.device)
        sy, sx = prep.scales_yx[i].tolist()
        raw = boxes.detach().to(torch.float32).cpu().clone()
        raw[:, 0::2] *= sx
        raw[:, 1::2] *= sy
        h, w = prep.raw_sizes[i].tolist()
        norm = raw.clone()
        norm[:, 0::2] /= w
        norm[:, 1::2] /= h
        results.append({
            "features": parts["features"][idx].float().cpu(), "raw_boxes": raw, "boxes": norm,
            "obj_ids": obj_ids.cpu(), "obj_scores": obj_scores.float().cpu(),
            "attr_ids": attr_ids.cpu(), "attr_scores": attr_scores.float().cpu(),
            "image_size": prep.raw_sizes[i].clone(),
        })
    return results


def _empty_max(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return probs.new_zeros(0), torch.zeros(0, dtype=torch.long, device=probs.device)


def _butd(proposals: torch.Tensor, probs: torch.Tensor, max_boxes: int, conf_thresh: float,
          min_boxes: int, nms_thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate_tsv.py``'s selection: proposal indices and their boxes."""
    survives = multiclass_nms_shared_boxes(proposals, probs, nms_thresh)
    max_conf = torch.where(survives, probs, torch.zeros_like(probs)).amax(dim=1) if len(probs) else probs.new_zeros(0)
    keep = torch.nonzero(max_conf >= conf_thresh).squeeze(1)
    by_conf = torch.sort(max_conf, descending=True, stable=True).indices
    if len(keep) < min_boxes:
        keep = by_conf[:min_boxes]
    elif len(keep) > max_boxes:
        keep = by_conf[:max_boxes]
    keep = keep[:max_boxes]
    return keep, proposals[keep]


def _hf(proposals: torch.Tensor, probs: torch.Tensor, deltas: torch.Tensor, size_hw: list[int],
        detector: Detector, max_d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ROIOutputs.inference`` of the HF reference: indices, boxes, scores, classes."""
    cfg = detector.config
    r = len(proposals)
    boxes = detector.box_coder.apply_deltas(deltas, proposals)
    n_reg = boxes.shape[1] // 4
    boxes = clip_boxes_(boxes.reshape(-1, 4), size_hw).view(r, n_reg, 4)
    if r == 0:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, boxes.view(0, 4), probs.new_zeros(0), empty
    max_scores, max_classes = probs.max(dim=1)
    rows = torch.arange(r, device=probs.device)
    max_boxes = boxes[rows, max_classes if n_reg > 1 else torch.zeros_like(max_classes)]
    min_d = min(cfg.min_detections, max_d)
    keep = torch.zeros(0, dtype=torch.long, device=probs.device)
    for thresh in cfg.nms_thresh_test:
        keep = nms(max_boxes, max_scores, thresh)[:max_d]
        if min_d <= len(keep) <= max_d:
            break
    return keep, max_boxes[keep], max_scores[keep], max_classes[keep]


def _stack(per_image: list[dict[str, torch.Tensor]], n: int, dim: int) -> dict[str, torch.Tensor]:
    b = len(per_image)
    out = {
        "features": torch.zeros(b, n, dim),
        "boxes": torch.zeros(b, n, 4),
        "raw_boxes": torch.zeros(b, n, 4),
        "obj_ids": torch.full((b, n), -1, dtype=torch.long),
        "obj_scores": torch.zeros(b, n),
        "attr_ids": torch.full((b, n), -1, dtype=torch.long),
        "attr_scores": torch.zeros(b, n),
        "num_regions": torch.zeros(b, dtype=torch.long),
        "image_sizes": torch.zeros(b, 2, dtype=torch.long),
    }
    for i, r in enumerate(per_image):
        k = len(r["features"])
        for key in ("features", "boxes", "raw_boxes", "obj_ids", "obj_scores", "attr_ids", "attr_scores"):
            out[key][i, :k] = r[key]
        out["num_regions"][i] = k
        out["image_sizes"][i] = r["image_size"]
    return out
