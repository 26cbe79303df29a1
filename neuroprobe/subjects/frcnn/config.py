"""Configuration of the bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome).

The published checkpoint ``unc-nlp/frcnn-vg-finetuned`` ships a ``config.yaml``
read by transformers' ``examples/research_projects/lxmert`` code: sections
``model``, ``resnets``, ``rpn``, ``roi_heads``, ``roi_box_head``,
``anchor_generator``, ``proposal_generator``, ``input`` plus top-level
``min_detections``, ``max_detections``, ``size_divisibility`` and ``pad_value``
(keys in either case).  :meth:`FrcnnConfig.from_yaml` reads that file (and also
detectron2-style files where the sections sit under ``MODEL``); anything the file
does not set keeps the defaults below, which are the values of the
bottom-up-attention VG model (``faster_rcnn_R_101_C4_attr_caffemaxpool``: caffe
max-pool stem, 12 anchors, 512-wide RPN, RoIPool 14x14 on ``res4``, a stride-1
dilated ``res5``, 1600 object classes + background, 400 attributes + "none").

Two deliberate departures from the reference code, both documented where used:
the network is always fed BGR images (the caffe weights and the BGR pixel mean need
it; the reference's ``INPUT.FORMAT`` switch is inverted, so it is kept here only as
data), and ``size_divisibility > 0`` pads up to a multiple (the reference raises).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuroprobe.errors import NeuroprobeError

#: Residual blocks in res2, res3, res4 for each standard depth.
BLOCKS_BY_DEPTH = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}


@dataclass
class FrcnnConfig:
    """Shape and test-time behaviour of the detector.

    Attributes
    ----------
    pixel_mean, pixel_std
        Per-channel normalisation, in BGR order.
    min_size_test, max_size_test
        Resize: shortest edge to ``min_size_test`` unless the longest edge would
        exceed ``max_size_test``.
    size_divisibility, pad_value
        Batch padding (``0`` = pad to the largest image only); value of padded pixels
        after normalisation.
    input_format
        ``INPUT.FORMAT`` of the file, kept for the record; the network is fed BGR.
    depth, blocks_per_stage
        ResNet depth; ``blocks_per_stage`` overrides the res2-res4 block counts
        (tiny test models).
    num_groups, width_per_group, stem_out_channels, res2_out_channels
        ResNet widths.
    stride_in_1x1, res5_dilation, caffe_maxpool
        MSRA/caffe details: stride in the first 1x1 conv, dilation of res5 in the
        backbone (unused: res5 lives in the RoI head), stem max-pool without padding
        and with ``ceil_mode``.
    bn_eps
        Epsilon of the (frozen) batch norms.
    anchor_sizes, anchor_aspect_ratios, anchor_offset
        Anchors at every ``res4`` cell (stride 16).
    rpn_hidden_channels, rpn_nms_thresh, rpn_pre_nms_topk, rpn_post_nms_topk,
    rpn_min_size, rpn_bbox_reg_weights
        Region proposal network at test time.
    num_classes, num_attrs, use_attr, cls_agnostic_bbox_reg
        Box predictor: ``num_classes`` object classes plus background (last),
        ``num_attrs`` attributes plus "no attribute" (last).
    pooler_resolution, res5_halve, res5_blocks, roi_bbox_reg_weights
        RoI head: RoIPool size; ``res5_halve=False`` is the VG modification (first
        res5 block stride 1, all res5 3x3 convs dilated by 2); blocks in res5.
    nms_thresh_test, score_thresh_test, min_detections, max_detections
        Post-processing thresholds of the reference (see
        :func:`neuroprobe.subjects.frcnn.extract.extract_regions`).
    """

    pixel_mean: list[float] = field(default_factory=lambda: [102.9801, 115.9465, 122.7717])
    pixel_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    min_size_test: int = 600
    max_size_test: int = 1000
    size_divisibility: int = 0
    pad_value: float = 0.0
    input_format: str = "BGR"
    depth: int = 101
    blocks_per_stage: list[int] | None = None
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    stride_in_1x1: bool = True
    res5_dilation: int = 1
    caffe_maxpool: bool = True
    bn_eps: float = 1e-5
    anchor_sizes: list[float] = field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0])
    anchor_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_offset: float = 0.0
    rpn_hidden_channels: int = 512
    rpn_nms_thresh: float = 0.7
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_min_size: float = 0.0
    rpn_bbox_reg_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    num_classes: int = 1600
    num_attrs: int = 400
    use_attr: bool = True
    cls_agnostic_bbox_reg: bool = False
    pooler_resolution: int = 14
    res5_halve: bool = False
    res5_blocks: int = 3
    roi_bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    nms_thresh_test: list[float] = field(default_factory=lambda: [0.6])
    score_thresh_test: float = 0.2
    min_detections: int = 10
    max_detections: int = 36

    # ---- derived -------------------------------------------------------------------
    @property
    def stage_blocks(self) -> tuple[int, int, int]:
        """Blocks in res2, res3, res4."""
        if self.blocks_per_stage is not None:
            return tuple(int(b) for b in self.blocks_per_stage)  # type: ignore[return-value]
        if self.depth not in BLOCKS_BY_DEPTH:
            raise NeuroprobeError(f"ResNet depth {self.depth} is not one of {sorted(BLOCKS_BY_DEPTH)}; "
                                  "set resnets.depth to 50, 101 or 152.")
        return BLOCKS_BY_DEPTH[self.depth]

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.anchor_sizes) * len(self.anchor_aspect_ratios)

    @property
    def res4_channels(self) -> int:
        """Channels of the ``res4`` map (input of the RPN and of RoI pooling)."""
        return self.res2_out_channels * 4

    @property
    def roi_feature_size(self) -> int:
        """Width of one region feature (``res5`` output channels, 2048 for the VG model)."""
        return self.res2_out_channels * 8

    # ---- constructors ----------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> "FrcnnConfig":
        """A few-thousand-parameter detector with the same wiring, for tests."""
        values: dict[str, Any] = dict(
            min_size_test=64, max_size_test=96, blocks_per_stage=[1, 1, 1], width_per_group=4,
            stem_out_channels=8, res2_out_channels=16, anchor_sizes=[16.0, 32.0],
            rpn_hidden_channels=16, rpn_pre_nms_topk=200, rpn_post_nms_topk=50,
            num_classes=12, num_attrs=6, pooler_resolution=4, res5_blocks=1,
            min_detections=4, max_detections=8,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FrcnnConfig":
        """Read a parsed ``config.yaml`` (HF lxmert layout or detectron2 layout).

        Keys are matched case-insensitively; sections are looked up at the top level
        and under ``model``.  Unknown keys are ignored.
        """
        root = _upper(data)
        model = root.get("MODEL", {}) if isinstance(root.get("MODEL"), dict) else {}

        def section(name: str) -> dict[str, Any]:
            for place in (root, model):
                if isinstance(place.get(name), dict):
                    return place[name]
            return {}

        def pick(sec: dict[str, Any], key: str, attr: str, cast=lambda v: v) -> None:
            if key in sec and sec[key] is not None:
                values[attr] = cast(sec[key])

        values: dict[str, Any] = {}
        resnets, rpn = section("RESNETS"), section("RPN")
        heads, box_head = section("ROI_HEADS"), section("ROI_BOX_HEAD")
        anchors, proposals, inp = section("ANCHOR_GENERATOR"), section("PROPOSAL_GENERATOR"), section("INPUT")
        pick(model, "PIXEL_MEAN", "pixel_mean", _floats)
        pick(model, "PIXEL_STD", "pixel_std", _floats)
        pick(model, "MAX_POOL", "caffe_maxpool", bool)
        pick(model, "CAFFE_MAXPOOL", "caffe_maxpool", bool)
        pick(inp, "MIN_SIZE_TEST", "min_size_test", int)
        pick(inp, "MAX_SIZE_TEST", "max_size_test", int)
        pick(inp, "FORMAT", "input_format", str)
        for place in (root, inp):
            pick(place, "SIZE_DIVISIBILITY", "size_divisibility", int)
            pick(place, "PAD_VALUE", "pad_value", float)
        pick(resnets, "DEPTH", "depth", int)
        pick(resnets, "NUM_GROUPS", "num_groups", int)
        pick(resnets, "WIDTH_PER_GROUP", "width_per_group", int)
        pick(resnets, "STEM_OUT_CHANNELS", "stem_out_channels", int)
        pick(resnets, "RES2_OUT_CHANNELS", "res2_out_channels", int)
        pick(resnets, "STRIDE_IN_1X1", "stride_in_1x1", bool)
        pick(resnets, "RES5_DILATION", "res5_dilation", int)
        pick(resnets, "BLOCKS_PER_STAGE", "blocks_per_stage", lambda v: [int(x) for x in v])
        pick(anchors, "SIZES", "anchor_sizes", lambda v: _floats(_first(v)))
        pick(anchors, "ASPECT_RATIOS", "anchor_aspect_ratios", lambda v: _floats(_first(v)))
        pick(anchors, "OFFSET", "anchor_offset", float)
        pick(proposals, "HIDDEN_CHANNELS", "rpn_hidden_channels", int)
        pick(proposals, "HID_CHANNELS", "rpn_hidden_channels", int)
        pick(proposals, "MIN_SIZE", "rpn_min_size", float)
        pick(rpn, "NMS_THRESH", "rpn_nms_thresh", float)
        pick(rpn, "PRE_NMS_TOPK_TEST", "rpn_pre_nms_topk", int)
        pick(rpn, "POST_NMS_TOPK_TEST", "rpn_post_nms_topk", int)
        pick(rpn, "BBOX_REG_WEIGHTS", "rpn_bbox_reg_weights", _floats)
        pick(heads, "NUM_CLASSES", "num_classes", int)
        pick(heads, "NMS_THRESH_TEST", "nms_thresh_test",
             lambda v: _floats(v) if isinstance(v, (list, tuple)) else [float(v)])
        pick(heads, "SCORE_THRESH_TEST", "score_thresh_test", float)
        pick(box_head, "NUM_ATTRS", "num_attrs", int)
        pick(box_head, "ATTR", "use_attr", bool)
        pick(box_head, "CLS_AGNOSTIC_BBOX_REG", "cls_agnostic_bbox_reg", bool)
        pick(box_head, "POOLER_RESOLUTION", "pooler_resolution", int)
        pick(box_head, "RES5HALVE", "res5_halve", bool)
        pick(box_head, "RES5_BLOCKS", "res5_blocks", int)
        pick(box_head, "BBOX_REG_WEIGHTS", "roi_bbox_reg_weights", _floats)
        pick(root, "MIN_DETECTIONS", "min_detections", int)
        pick(root, "MAX_DETECTIONS", "max_detections", int)
        norm = str(resnets.get("NORM", "BN"))
        if norm not in ("BN", "FrozenBN"):
            raise NeuroprobeError(f"resnets.norm is {norm!r}; only batch norm ('BN' or 'FrozenBN') "
                                  "detectors are supported.")
        pooler = str(box_head.get("POOLER_TYPE", "ROIPool"))
        if pooler != "ROIPool":
            raise NeuroprobeError(f"roi_box_head.pooler_type is {pooler!r}; only 'ROIPool' is supported.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FrcnnConfig":
        """Read a ``config.yaml`` file (see :meth:`from_dict`)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise NeuroprobeError(f"Cannot read the detector config {path} ({err}); "
                                  "pass the config.yaml of unc-nlp/frcnn-vg-finetuned.") from err
        if not isinstance(data, dict):
            raise NeuroprobeError(f"The detector config {path} is not a YAML mapping; "
                                  "pass the config.yaml of unc-nlp/frcnn-vg-finetuned.")
        return cls.from_dict(data)

    def to_yaml_dict(self) -> dict[str, Any]:
        """This config in the lowercase HF lxmert layout that :meth:`from_dict` reads."""
        return {
            "model": {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std),
                      "max_pool": self.caffe_maxpool},
            "input": {"min_size_test": self.min_size_test, "max_size_test": self.max_size_test,
                      "format": self.input_format},
            "size_divisibility": self.size_divisibility,
            "pad_value": self.pad_value,
            "resnets": {"depth": self.depth, "num_groups": self.num_groups,
                        "width_per_group": self.width_per_group,
                        "stem_out_channels": self.stem_out_channels,
                        "res2_out_channels": self.res2_out_channels,
                        "stride_in_1x1": self.stride_in_1x1, "res5_dilation": self.res5_dilation,
                        "norm": "BN", "out_features": ["res4"],
                        **({"blocks_per_stage": list(self.blocks_per_stage)}
                           if self.blocks_per_stage is not None else {})},
            "anchor_generator": {"sizes": [list(self.anchor_sizes)],
                                 "aspect_ratios": [list(self.anchor_aspect_ratios)],
                                 "offset": self.anchor_offset},
            "proposal_generator": {"hidden_channels": self.rpn_hidden_channels,
                                   "min_size": self.rpn_min_size},
            "rpn": {"nms_thresh": self.rpn_nms_thresh, "pre_nms_topk_test": self.rpn_pre_nms_topk,
                    "post_nms_topk_test": self.rpn_post_nms_topk,
                    "bbox_reg_weights": list(self.rpn_bbox_reg_weights), "in_features": ["res4"]},
            "roi_heads": {"num_classes": self.num_classes, "nms_thresh_test": list(self.nms_thresh_test),
                          "score_thresh_test": self.score_thresh_test, "in_features": ["res4"]},
            "roi_box_head": {"num_attrs": self.num_attrs, "attr": self.use_attr,
                             "cls_agnostic_bbox_reg": self.cls_agnostic_bbox_reg,
                             "pooler_resolution": self.pooler_resolution, "pooler_type": "ROIPool",
                             "res5halve": self.res5_halve, "res5_blocks": self.res5_blocks,
                             "bbox_reg_weights": list(self.roi_bbox_reg_weights)},
            "min_detections": self.min_detections,
            "max_detections": self.max_detections,
        }

    def save_yaml(self, path: str | Path) -> None:
        """Write :meth:`to_yaml_dict` to ``path``."""
        Path(path).write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "FrcnnConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _upper(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k).upper(): _upper(v) for k, v in obj.items()}
    return obj


def _floats(v: Any) -> list[float]:
    return [float(x) for x in v]


def _first(v: Any) -> Any:
    """``[[a, b, c]]`` (one list per feature map) -> ``[a, b, c]``; ``[a, b]`` unchanged."""
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
        if len(v) != 1:
            raise NeuroprobeError("anchor_generator lists one entry per feature map; the C4 detector "
                                  "has one map, so give exactly one list of sizes and of ratios.")
        return v[0]
    return v
