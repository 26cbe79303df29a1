"""Detection operators in plain torch: IoU, NMS, RoI max pooling, the box coder.

torchvision does not import in this environment, so the few operators the
bottom-up-attention Faster R-CNN needs are written here with the exact
semantics of the torchvision CPU kernels the reference detector calls:

* :func:`nms` follows ``torchvision.ops.nms``: greedy, by decreasing score, a box is
  dropped when its IoU with a kept box is *strictly* greater than the threshold;
  areas are ``(x2 - x1) * (y2 - y1)`` (no ``+ 1``).
* :func:`batched_nms` runs :func:`nms` separately per class (what
  ``torchvision.ops.batched_nms`` computes with its coordinate-offset trick).
* :func:`roi_pool` follows ``torchvision.ops.RoIPool`` (the legacy Caffe ROIPooling
  the C4 detector uses on ``res4`` at spatial scale 1/16): corners are rounded half
  away from zero, bins are ``floor``/``ceil`` of float32 multiples of the bin size,
  clipped to the map, and an empty bin gives 0.
* :class:`BoxCoder` is detectron2's ``Box2BoxTransform`` (weights, ``dw``/``dh``
  clamped at ``log(1000 / 16)``).

Boxes are ``[x1, y1, x2, y2]`` in pixels throughout.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "BoxCoder",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes_",
    "multiclass_nms_shared_boxes",
    "nms",
    "nonempty_boxes",
    "roi_pool",
]

#: detectron2's clamp on predicted log-scale factors: no box grows past 1000/16 times.
SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of ``[N, 4]`` boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union.

    Parameters
    ----------
    a, b
        Boxes ``[N, 4]`` and ``[M, 4]``.

    Returns
    -------
    torch.Tensor
        ``[N, M]`` IoU, computed as ``inter / (area_a + area_b - inter)``.
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def _iou_one_to_many(box: torch.Tensor, area: torch.Tensor, boxes: torch.Tensor,
                     areas: torch.Tensor) -> torch.Tensor:
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (area + areas - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        max_output: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Parameters
    ----------
    boxes
        ``[N, 4]`` boxes.
    scores
        ``[N]`` scores.
    iou_threshold
        A box is suppressed when its IoU with an already kept box is greater than this.
    max_output
        Stop after this many boxes are kept (the result is then the first
        ``max_output`` of the full result, since boxes are kept in score order).

    Returns
    -------
    torch.Tensor
        int64 indices of the kept boxes, by decreasing score (ties by index).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    areas = box_area(b)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    suppressed_list = [False] * n
    keep: list[int] = []
    for i in range(n):
        if suppressed_list[i]:
            continue
        keep.append(i)
        if max_output is not None and len(keep) >= max_output:
            break
        if i + 1 < n:
            over = _iou_one_to_many(b[i], areas[i], b[i + 1:], areas[i + 1:]) > iou_threshold
            suppressed[i + 1:] |= over
            if bool(over.any()):
                suppressed_list = suppressed.tolist()
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Non-maximum suppression done independently within each category.

    Parameters
    ----------
    boxes, scores
        ``[N, 4]`` boxes and ``[N]`` scores.
    idxs
        ``[N]`` integer category of each box; boxes of different categories never
        suppress each other.
    iou_threshold
        As in :func:`nms`.

    Returns
    -------
    torch.Tensor
        int64 indices of the kept boxes, by decreasing score (ties by index).
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    kept = []
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).squeeze(1)
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(kept)
    keep = keep.sort().values  # index order, so the stable score sort breaks ties by index
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def multiclass_nms_shared_boxes(boxes: torch.Tensor, scores: torch.Tensor,
                                iou_threshold: float) -> torch.Tensor:
    """Per-class NMS when every class scores the same set of boxes.

    This is the per-class loop of bottom-up-attention's ``generate_tsv.py``
    (``nms`` of the proposal boxes under each class's scores), vectorised over
    classes: the IoU matrix is computed once and the greedy pass runs for all
    classes at the same time.

    Parameters
    ----------
    boxes
        ``[R, 4]`` boxes shared by all classes.
    scores
        ``[R, C]`` score of every box for every class.
    iou_threshold
        As in :func:`nms`.

    Returns
    -------
    torch.Tensor
        bool ``[R, C]``: ``True`` where box ``r`` survives the NMS of class ``c``.
    """
    r, c = scores.shape
    keep = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    if r == 0 or c == 0:
        return keep.T
    overlaps = box_iou(boxes, boxes) > iou_threshold  # [R, R]
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices.T  # [C, R]
    suppressed = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    rows = torch.arange(c, device=scores.device)
    for k in range(r):
        i = order[:, k]  # the k-th best box of every class
        alive = ~suppressed[rows, i]
        keep[rows, i] = alive
        suppressed |= alive[:, None] & overlaps[i]
    return keep.T


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int],
             spatial_scale: float) -> torch.Tensor:
    """RoI max pooling with torchvision's ``RoIPool`` semantics.

    Parameters
    ----------
    features
        ``[N, C, H, W]`` feature maps.
    rois
        ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
    output_size
        ``ph`` or ``(ph, pw)`` bins per RoI.
    spatial_scale
        Factor from image pixels to feature-map cells (1/16 for ``res4``).

    Returns
    -------
    torch.Tensor
        ``[K, C, ph, pw]`` maxima; bins that fall outside the map are 0.
    """
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    k = rois.shape[0]
    _, channels, height, width = features.shape
    out = features.new_zeros((k, channels, ph, pw))
    if k == 0:
        return out
    # Corner arithmetic in float32, as the float kernel does it.
    r = rois.detach().to(torch.float32).cpu()
    scale = torch.tensor(spatial_scale, dtype=torch.float32)
    corners = _round_half_away(r[:, 1:5] * scale).to(torch.int64)
    x1, y1, x2, y2 = corners.unbind(1)
    roi_w = torch.clamp(x2 - x1 + 1, min=1).to(torch.float32)
    roi_h = torch.clamp(y2 - y1 + 1, min=1).to(torch.float32)
    bin_w = roi_w / torch.tensor(float(pw), dtype=torch.float32)
    bin_h = roi_h / torch.tensor(float(ph), dtype=torch.float32)
    gw = torch.arange(pw + 1, dtype=torch.float32)
    gh = torch.arange(ph + 1, dtype=torch.float32)
    wstart = torch.floor(gw[None, :-1] * bin_w[:, None]).to(torch.int64) + x1[:, None]
    wend = torch.ceil(gw[None, 1:] * bin_w[:, None]).to(torch.int64) + x1[:, None]
    hstart = torch.floor(gh[None, :-1] * bin_h[:, None]).to(torch.int64) + y1[:, None]
    hend = torch.ceil(gh[None, 1:] * bin_h[:, None]).to(torch.int64) + y1[:, None]
    wstart, wend = wstart.clamp(0, width).tolist(), wend.clamp(0, width).tolist()
    hstart, hend = hstart.clamp(0, height).tolist(), hend.clamp(0, height).tolist()
    batch = r[:, 0].to(torch.int64).tolist()
    for n in range(k):
        ws, we, hs, he = wstart[n], wend[n], hstart[n], hend[n]
        h_lo, h_hi = min(hs), max(he)
        w_lo, w_hi = min(ws), max(we)
        if h_hi <= h_lo or w_hi <= w_lo:
            continue
        crop = features[batch[n], :, h_lo:h_hi, w_lo:w_hi]
        # Columns first: [C, h, pw]; empty column bins stay -inf until the end.
        cols = crop.new_full((channels, h_hi - h_lo, pw), float("-inf"))
        for j in range(pw):
            if we[j] > ws[j]:
                cols[:, :, j] = crop[:, :, ws[j] - w_lo:we[j] - w_lo].amax(dim=2)
        for i in range(ph):
            if he[i] > hs[i]:
                out[n, :, i, :] = cols[:, hs[i] - h_lo:he[i] - h_lo, :].amax(dim=1)
        out[n] = torch.where(torch.isneginf(out[n]), torch.zeros_like(out[n]), out[n])
    return out


class BoxCoder:
    """detectron2's ``Box2BoxTransform``: boxes <-> ``(dx, dy, dw, dh)`` deltas.

    Parameters
    ----------
    weights
        ``(wx, wy, ww, wh)`` by which the deltas are scaled: ``(1, 1, 1, 1)`` for the
        RPN, ``(10, 10, 5, 5)`` for the box head.
    scale_clamp
        Upper bound on ``dw`` and ``dh`` before ``exp``.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = SCALE_CLAMP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Deltas ``[N, 4]`` that take boxes ``src`` to boxes ``dst`` (both ``[N, 4]``)."""
        wx, wy, ww, wh = self.weights
        sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
        sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
        tw, th = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
        tx, ty = dst[:, 0] + 0.5 * tw, dst[:, 1] + 0.5 * th
        return torch.stack((wx * (tx - sx) / sw, wy * (ty - sy) / sh,
                            ww * torch.log(tw / sw), wh * torch.log(th / sh)), dim=1)

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Apply ``[N, 4k]`` deltas to ``[N, 4]`` boxes, giving ``[N, 4k]`` boxes."""
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        px = dx * widths[:, None] + ctr_x[:, None]
        py = dy * heights[:, None] + ctr_y[:, None]
        pw = torch.exp(dw) * widths[:, None]
        ph = torch.exp(dh) * heights[:, None]
        out = torch.empty_like(deltas)
        out[:, 0::4] = px - 0.5 * pw
        out[:, 1::4] = py - 0.5 * ph
        out[:, 2::4] = px + 0.5 * pw
        out[:, 3::4] = py + 0.5 * ph
        return out


def clip_boxes_(boxes: torch.Tensor, size_hw: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Clip ``[N, 4]`` boxes in place to ``[0, w] x [0, h]`` and return them."""
    h, w = (int(s) for s in size_hw)
    boxes[:, 0].clamp_(min=0, max=w)
    boxes[:, 1].clamp_(min=0, max=h)
    boxes[:, 2].clamp_(min=0, max=w)
    boxes[:, 3].clamp_(min=0, max=h)
    return boxes


def nonempty_boxes(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """bool ``[N]``: width and height both greater than ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)
