"""The bottom-up-attention Faster R-CNN (ResNet C4 + RPN + res5 RoI head), inference only.

Written from transformers' ``examples/research_projects/lxmert/modeling_frcnn.py``
(itself detectron2's ``GeneralizedRCNN`` for py-bottom-up-attention) so that module
names and parameter shapes equal that code's: the state dict of
``unc-nlp/frcnn-vg-finetuned`` (``pytorch_model.bin``) loads with ``strict=True``.

::

    Detector
      backbone            ResNetC4: stem (7x7 conv, caffe max-pool), res2, res3, res4
      proposal_generator  RPN: anchor_generator.cell_anchors.0, rpn_head.{conv, objectness_logits, anchor_deltas}
      roi_heads           Res5ROIHeads: RoIPool 14x14 @ 1/16 -> res5 (stride 1, dilation 2) -> mean
                          box_predictor.{cls_score, bbox_pred, cls_embedding, fc_attr, attr_score}

Batch norms are frozen (running statistics always; the checkpoint's
``num_batches_tracked`` buffers are kept so the key sets match).  The forward pass
returns raw per-proposal outputs; post-processing (NMS, top regions) lives in
:mod:`neuroprobe.subjects.frcnn.extract`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuroprobe.subjects.frcnn.config import FrcnnConfig
from neuroprobe.subjects.frcnn.ops import BoxCoder, clip_boxes_, nms, nonempty_boxes, roi_pool

__all__ = ["Detector", "DetectorOutput", "FrozenBatchNorm2d"]

#: Stride of ``res4`` relative to the input image.
RES4_STRIDE = 16


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that always normalises with its running statistics.

    While ``calibrating`` is set, it first overwrites those statistics with the mean and
    variance of its current input (used once by :meth:`Detector.init_weights`).
    """

    calibrating: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.calibrating:
            with torch.no_grad():
                self.running_mean.copy_(x.mean(dim=(0, 2, 3)))
                self.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class ConvNorm(nn.Conv2d):
    """Bias-free convolution followed by its batch norm (held as ``.norm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.norm(super().forward(x))


class Stem(nn.Module):
    """7x7/2 convolution, ReLU, 3x3/2 max-pool (caffe style: no padding, ceil mode)."""

    def __init__(self, out_channels: int, caffe_maxpool: bool, eps: float) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3, eps=eps)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.relu(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1) with a projection shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, *, stride: int = 1,
                 num_groups: int = 1, stride_in_1x1: bool = True, dilation: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride=stride, eps=eps)
                         if in_channels != out_channels else None)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=s1, eps=eps)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=s3, padding=dilation,
                              dilation=dilation, groups=num_groups, eps=eps)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


def _stage(n_blocks: int, in_channels: int, out_channels: int, bottleneck_channels: int, first_stride: int,
           config: FrcnnConfig, dilation: int = 1) -> nn.Sequential:
    blocks = []
    for i in range(n_blocks):
        blocks.append(Bottleneck(in_channels, out_channels, bottleneck_channels,
                                 stride=first_stride if i == 0 else 1, num_groups=config.num_groups,
                                 stride_in_1x1=config.stride_in_1x1, dilation=dilation, eps=config.bn_eps))
        in_channels = out_channels
    return nn.Sequential(*blocks)


class ResNetC4(nn.Module):
    """Stem and res2-res4 of a ResNet; returns the stride-16 ``res4`` map."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.stem = Stem(config.stem_out_channels, config.caffe_maxpool, config.bn_eps)
        in_ch, out_ch = config.stem_out_channels, config.res2_out_channels
        bott = config.num_groups * config.width_per_group
        for idx, (name, n_blocks) in enumerate(zip(("res2", "res3", "res4"), config.stage_blocks)):
            self.add_module(name, _stage(n_blocks, in_ch, out_ch, bott, 1 if idx == 0 else 2, config))
            in_ch, out_ch, bott = out_ch, out_ch * 2, bott * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.res4(self.res3(self.res2(self.stem(x))))


class AnchorGenerator(nn.Module):
    """Anchors of every ``res4`` cell; ``cell_anchors.0`` is a (frozen) parameter as in the reference."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.stride = RES4_STRIDE
        self.offset = config.anchor_offset
        cell = self.cell_anchor_boxes(config.anchor_sizes, config.anchor_aspect_ratios)
        self.cell_anchors = nn.ParameterList([nn.Parameter(cell, requires_grad=False)])

    @staticmethod
    def cell_anchor_boxes(sizes: list[float], aspect_ratios: list[float]) -> torch.Tensor:
        """``[len(sizes) * len(ratios), 4]`` anchors centred on 0 (sizes outer, ratios inner)."""
        rows = []
        for size in sizes:
            area = float(size) ** 2.0
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(rows, dtype=torch.float32)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """``[height * width * A, 4]`` anchors, ordered (y, x, anchor)."""
        base = self.cell_anchors[0]
        shifts_x = torch.arange(self.offset * self.stride, width * self.stride, step=self.stride,
                                dtype=torch.float32, device=base.device)
        shifts_y = torch.arange(self.offset * self.stride, height * self.stride, step=self.stride,
                                dtype=torch.float32, device=base.device)
        sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), dim=1)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv (to ``rpn_hidden_channels``), then 1x1 objectness and 1x1 anchor deltas."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        a = config.num_anchors
        hid = config.res4_channels if config.rpn_hidden_channels == -1 else config.rpn_hidden_channels
        self.conv = nn.Conv2d(config.res4_channels, hid, kernel_size=3, stride=1, padding=1)
        self.objectness_logits = nn.Conv2d(hid, a, kernel_size=1, stride=1)
        self.anchor_deltas = nn.Conv2d(hid, a * 4, kernel_size=1, stride=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """Region proposal network (test time): top-k, clip, drop tiny boxes, NMS, top-k."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(config)
        self.rpn_head = RPNHead(config)
        self.box_coder = BoxCoder(config.rpn_bbox_reg_weights)

    def forward(self, features: torch.Tensor, image_sizes: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Proposals per image.

        Parameters
        ----------
        features
            ``[N, C, H, W]`` ``res4`` maps.
        image_sizes
            ``[N, 2]`` ``(h, w)`` of each (resized, unpadded) image.

        Returns
        -------
        tuple of lists
            Per image, ``[K, 4]`` proposal boxes and their ``[K]`` objectness logits,
            by decreasing logit.
        """
        cfg = self.config
        n, _, h, w = features.shape
        logits, deltas = self.rpn_head(features)
        a = logits.shape[1]
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        anchors = self.anchor_generator(h, w)
        proposals = self.box_coder.apply_deltas(deltas, anchors.repeat(n, 1)).view(n, -1, 4)
        k = min(cfg.rpn_pre_nms_topk, logits.shape[1])
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
        boxes_out, logits_out = [], []
        for i in range(n):
            boxes = proposals[i, order[i]].clone()
            scores = logits[i, order[i]]
            clip_boxes_(boxes, image_sizes[i].tolist())
            keep = nonempty_boxes(boxes, cfg.rpn_min_size)
            boxes, scores = boxes[keep], scores[keep]
            keep = nms(boxes, scores, cfg.rpn_nms_thresh, max_output=cfg.rpn_post_nms_topk)
            boxes_out.append(boxes[keep])
            logits_out.append(scores[keep])
        return boxes_out, logits_out


class BoxPredictor(nn.Module):
    """Class scores, class-specific box deltas and (VG) attribute scores of pooled regions."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        d = config.roi_feature_size
        self.cls_score = nn.Linear(d, config.num_classes + 1)
        n_reg = 1 if config.cls_agnostic_bbox_reg else config.num_classes
        self.bbox_pred = nn.Linear(d, n_reg * 4)
        self.use_attr = config.use_attr
        if config.use_attr:
            self.cls_embedding = nn.Embedding(config.num_classes + 1, d // 8)
            self.fc_attr = nn.Linear(d + d // 8, d // 4)
            self.attr_score = nn.Linear(d // 4, config.num_attrs + 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(class logits [R, K+1], attribute logits [R, A+1] or None, box deltas [R, 4K])``."""
        scores = self.cls_score(x)
        deltas = self.bbox_pred(x)
        if not self.use_attr:
            return scores, None, deltas
        emb = self.cls_embedding(scores.argmax(dim=-1))
        attr = self.attr_score(F.relu(self.fc_attr(torch.cat([x, emb], dim=-1))))
        return scores, attr, deltas


class Res5ROIHeads(nn.Module):
    """RoIPool on ``res4``, the res5 stage per region, mean-pool to one 2048-d vector."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.config = config
        in_ch = config.res4_channels
        bott = config.num_groups * config.width_per_group * 8
        self.res5 = _stage(config.res5_blocks, in_ch, config.roi_feature_size, bott, 2, config)
        if not config.res5_halve:
            # VG modification (bottom-up-attention test.prototxt): res5 keeps the 14x14 grid
            # and its 3x3 convs are dilated by 2.
            self.res5[0].conv1.stride = (1, 1)
            self.res5[0].shortcut.stride = (1, 1)
            for block in self.res5:
                block.conv2.padding = (2, 2)
                block.conv2.dilation = (2, 2)
        self.box_predictor = BoxPredictor(config)

    def forward(self, features: torch.Tensor, proposals: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(class logits, attribute logits, box deltas, pooled features [R, 2048])`` of all proposals."""
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype, device=b.device), b], 1)
                          for i, b in enumerate(proposals)])
        x = roi_pool(features, rois, self.config.pooler_resolution, 1.0 / RES4_STRIDE)
        pooled = self.res5(x).mean(dim=(2, 3))
        scores, attrs, deltas = self.box_predictor(pooled)
        return scores, attrs, deltas, pooled


@dataclass
class DetectorOutput:
    """Raw per-proposal outputs of :class:`Detector` for a batch.

    Attributes
    ----------
    proposals
        Per image, ``[K_i, 4]`` RPN boxes in resized-image pixels.
    obj_logits, attr_logits, box_deltas, features
        Concatenated over images (``sum K_i`` rows): class logits ``[.., K+1]``
        (background last), attribute logits ``[.., A+1]`` ("none" last), class-specific
        box deltas ``[.., 4K]`` and mean-pooled res5 features ``[.., 2048]``.
    image_sizes
        ``[B, 2]`` resized image sizes the boxes live in.
    """

    proposals: list[torch.Tensor]
    obj_logits: torch.Tensor
    attr_logits: torch.Tensor | None
    box_deltas: torch.Tensor
    features: torch.Tensor
    image_sizes: torch.Tensor

    def split(self) -> list[dict[str, torch.Tensor | None]]:
        """Per-image views of the concatenated tensors."""
        counts = [len(p) for p in self.proposals]
        parts = [t.split(counts) if t is not None else [None] * len(counts)
                 for t in (self.obj_logits, self.attr_logits, self.box_deltas, self.features)]
        return [{"proposals": p, "obj_logits": o, "attr_logits": a, "box_deltas": d, "features": f}
                for p, o, a, d, f in zip(self.proposals, *parts)]


class Detector(nn.Module):
    """The bottom-up-attention Faster R-CNN (see the module docstring for its layout).

    Parameters
    ----------
    config
        Architecture and test-time settings.
    """

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetC4(config)
        self.proposal_generator = RPN(config)
        self.roi_heads = Res5ROIHeads(config)
        self.box_coder = BoxCoder(config.roi_bbox_reg_weights)

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> DetectorOutput:
        """Backbone, proposals and RoI head of a preprocessed batch.

        Parameters
        ----------
        images
            ``[B, 3, H, W]`` from :func:`neuroprobe.subjects.frcnn.preprocess.preprocess_images`.
        image_sizes
            ``[B, 2]`` resized ``(h, w)`` of each image.
        """
        features = self.backbone(images)
        proposals, _ = self.proposal_generator(features, image_sizes)
        scores, attrs, deltas, pooled = self.roi_heads(features, proposals)
        return DetectorOutput(proposals, scores, attrs, deltas, pooled, image_sizes)

    def init_weights(self, seed: int = 0) -> "Detector":
        """Random initialisation (the untrained control), deterministic in ``seed``.

        Weights are filled as detectron2 does (MSRA fill for the ResNet convolutions,
        N(0, 0.01) for the RPN and the class scores, N(0, 0.001) for the box deltas), with
        the last batch-norm scale of every residual branch set to zero (Goyal et al. 2017),
        and the frozen batch norms get their statistics from one pass over a fixed
        synthetic batch (smooth random blobs plus grain in pixel range, drawn from
        ``seed``).  Without this, frozen unit statistics let activations grow to ~1e6
        through the 100-odd layers and every proposal becomes an empty box.
        """
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, ConvNorm):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    module.norm.reset_parameters()
            for module in self.modules():
                if isinstance(module, Bottleneck):  # zero-gamma residual branches (Goyal et al. 2017)
                    nn.init.zeros_(module.conv3.norm.weight)
            head = self.proposal_generator.rpn_head
            for layer in (head.conv, head.objectness_logits, head.anchor_deltas):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
            pred = self.roi_heads.box_predictor
            nn.init.normal_(pred.cls_score.weight, std=0.01)
            nn.init.normal_(pred.bbox_pred.weight, std=0.001)
            nn.init.zeros_(pred.cls_score.bias)
            nn.init.zeros_(pred.bbox_pred.bias)
            if pred.use_attr:
                pred.cls_embedding.reset_parameters()
                pred.fc_attr.reset_parameters()
                pred.attr_score.reset_parameters()
            device = next(self.parameters()).device
            if device.type != "meta":
                side = max(64, cfg.min_size_test // 2)
                mean = torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1)
                std = torch.tensor(cfg.pixel_std).view(1, 3, 1, 1)
                # smooth noise (random blobs at 1/16 resolution, bilinear) plus fine grain: image-like
                coarse = torch.rand(2, 3, side // 16 + 1, (side + side // 2) // 16 + 1)
                x = F.interpolate(coarse, (side, side + side // 2), mode="bilinear", align_corners=False)
                x = (0.8 * x + 0.2 * torch.rand_like(x)) * 255.0
                x = ((x - mean) / std).to(device)
                norms = [m for m in self.modules() if isinstance(m, FrozenBatchNorm2d)]
                for m in norms:
                    m.calibrating = True
                try:
                    with torch.no_grad():
                        self.roi_heads.res5(self.backbone(x))
                finally:
                    for m in norms:
                        m.calibrating = False
        return self

    def train(self, mode: bool = True) -> "Detector":
        """The detector is inference-only; it stays in eval mode."""
        return super().train(False)
