"""Tests of the plain-torch bottom-up-attention Faster R-CNN and the region-feature files.

Ground truths used here:
* pure-python transcriptions of the torchvision CPU kernels (NMS, RoIPool), below;
* ``tests/data/frcnn_vg_keys.json``: every state-dict key and shape of the reference
  ``GeneralizedRCNN`` (transformers' lxmert ``modeling_frcnn.py``) for the published
  ``unc-nlp/frcnn-vg-finetuned`` checkpoint;
* ``tests/data/frcnn_tiny_parity.safetensors``: a tiny random model's weights, two
  images, and the reference code's outputs for them (see its metadata).
"""
from __future__ import annotations

import base64
import csv
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.frcnn import (Detector, FrcnnConfig, extract_regions, load_detector, preprocess_images,
                                       save_detector)
from neuroprobe.subjects.frcnn import ops
from neuroprobe.subjects.frcnn.extract import select_regions
from neuroprobe.subjects.frcnn.preprocess import resized_shape
from neuroprobe.subjects.region_features import (RegionFeatureSource, RegionRecord, TSV_FIELDS, read_features_h5,
                                                 read_obj_tsv, records_from_regions, write_features_h5, write_obj_tsv)

DATA = Path(__file__).parent / "data"
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- brute force
def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union != 0 else math.nan  # 0/0 is NaN in the kernels: it never suppresses


def _nms(boxes, scores, thresh):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if not any(_iou(boxes[i], boxes[j]) > thresh for j in kept):
            kept.append(i)
    return kept


def _batched_nms(boxes, scores, classes, thresh):
    kept = []
    for c in sorted(set(classes)):
        members = [i for i in range(len(scores)) if classes[i] == c]
        kept += [members[k] for k in _nms([boxes[i] for i in members], [scores[i] for i in members], thresh)]
    return sorted(kept, key=lambda i: (-scores[i], i))


def _round_half_away(x: float) -> int:
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def _roi_pool(features: np.ndarray, rois: np.ndarray, ph: int, pw: int, scale: float) -> np.ndarray:
    """torchvision's roi_pool forward loop, one bin and one channel at a time (float32 bin edges)."""
    f32 = np.float32
    _, channels, height, width = features.shape
    out = np.zeros((rois.shape[0], channels, ph, pw), dtype=features.dtype)
    for n in range(rois.shape[0]):
        b = int(rois[n, 0])
        x1, y1, x2, y2 = (_round_half_away(float(f32(rois[n, k]) * f32(scale))) for k in range(1, 5))
        bin_h = f32(max(y2 - y1 + 1, 1)) / f32(ph)
        bin_w = f32(max(x2 - x1 + 1, 1)) / f32(pw)
        for i in range(ph):
            for j in range(pw):
                hs = min(max(int(math.floor(f32(i) * bin_h)) + y1, 0), height)
                he = min(max(int(math.ceil(f32(i + 1) * bin_h)) + y1, 0), height)
                ws = min(max(int(math.floor(f32(j) * bin_w)) + x1, 0), width)
                we = min(max(int(math.ceil(f32(j + 1) * bin_w)) + x1, 0), width)
                if he <= hs or we <= ws:
                    continue
                for c in range(channels):
                    best = -np.inf
                    for y in range(hs, he):
                        for x in range(ws, we):
                            best = max(best, features[b, c, y, x])
                    out[n, c, i, j] = best
    return out


def _random_boxes(rng: np.random.RandomState, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.rand(n, 2) * size
    wh = rng.rand(n, 2) * size / 2 + 0.5
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[: n // 5] = boxes[n // 5: 2 * (n // 5)] + rng.rand(n // 5, 4).astype(np.float32)  # near-duplicates
    return boxes


# ----------------------------------------------------------------------------- ops
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force(seed, thresh):
    rng = np.random.RandomState(seed)
    boxes = _random_boxes(rng, 60)
    scores = rng.rand(60).astype(np.float32)
    scores[5] = scores[6]  # a tie, broken by index
    expected = _nms(boxes.tolist(), scores.tolist(), thresh)
    got = ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).tolist()
    assert got == expected
    assert ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh, max_output=5).tolist() == expected[:5]


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_matches_brute_force(seed):
    rng = np.random.RandomState(10 + seed)
    boxes = _random_boxes(rng, 50)
    scores = rng.rand(50).astype(np.float32)
    classes = rng.randint(0, 4, 50)
    expected = _batched_nms(boxes.tolist(), scores.tolist(), classes.tolist(), 0.4)
    got = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.4)
    assert got.tolist() == expected


def test_multiclass_nms_shared_boxes_matches_per_class_loop():
    rng = np.random.RandomState(3)
    boxes = _random_boxes(rng, 40)
    scores = rng.rand(40, 7).astype(np.float32)
    got = ops.multiclass_nms_shared_boxes(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3)
    for c in range(7):
        expected = set(_nms(boxes.tolist(), scores[:, c].tolist(), 0.3))
        assert set(torch.nonzero(got[:, c]).squeeze(1).tolist()) == expected


@pytest.mark.parametrize("output_size,scale", [((4, 4), 1 / 16), ((3, 5), 0.5), ((14, 14), 1 / 16)])
def test_roi_pool_matches_brute_force(output_size, scale):
    rng = np.random.RandomState(7)
    feats = rng.randn(2, 3, 9, 13).astype(np.float32)
    size = 13 / scale
    boxes = _random_boxes(rng, 12, size)
    boxes[0] = [-30, -20, size * 1.3, size * 0.9]          # beyond the map on every side
    boxes[1] = [40, 40, 20, 10]                            # malformed (x2 < x1)
    boxes[2] = np.array([0.5, 1.5, 2.5, 3.5], np.float32) / scale  # corners land on .5: round half away
    boxes[3] = [size * 2, size * 2, size * 3, size * 3]    # entirely outside: all bins empty
    rois = np.concatenate([rng.randint(0, 2, (12, 1)).astype(np.float32), boxes], 1)
    expected = _roi_pool(feats, rois, *output_size, scale)
    got = ops.roi_pool(torch.from_numpy(feats), torch.from_numpy(rois), output_size, scale)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert (got[3] == 0).all()


def test_box_coder_round_trip_and_clamp():
    rng = np.random.RandomState(0)
    src = torch.from_numpy(_random_boxes(rng, 20)).double()
    dst = torch.from_numpy(_random_boxes(rng, 20)).double()
    coder = ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.apply_deltas(coder.get_deltas(src, dst), src), dst)
    # a huge dw is clamped at log(1000/16): the width grows by exactly 62.5x
    deltas = torch.tensor([[0.0, 0.0, 100.0, 0.0]], dtype=torch.float64)
    box = torch.tensor([[10.0, 10.0, 20.0, 30.0]], dtype=torch.float64)
    out = ops.BoxCoder((1, 1, 1, 1)).apply_deltas(deltas, box)
    assert float(out[0, 2] - out[0, 0]) == pytest.approx(10.0 * 1000 / 16)
    assert float(out[0, 3] - out[0, 1]) == pytest.approx(20.0)
    # class-specific deltas [N, 4k]: every group of 4 is applied to the same box
    d = torch.randn(5, 12, dtype=torch.float64)
    b = src[:5]
    many = coder.apply_deltas(d, b)
    for k in range(3):
        torch.testing.assert_close(many[:, 4 * k:4 * k + 4], coder.apply_deltas(d[:, 4 * k:4 * k + 4], b))


def test_clip_and_nonempty():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 80.0], [10.0, 10.0, 10.0, 30.0]])
    ops.clip_boxes_(boxes, (60, 40))
    assert boxes.tolist() == [[0.0, 0.0, 40.0, 60.0], [10.0, 10.0, 10.0, 30.0]]
    assert ops.nonempty_boxes(boxes).tolist() == [True, False]


# ----------------------------------------------------------------------------- preprocessing and config
def test_resized_shape_examples():
    assert resized_shape(333, 500, 600, 1000) == (600, 901)     # 500 * 600/333 = 900.9
    assert resized_shape(480, 1600, 600, 1000) == (300, 1000)   # long edge capped
    assert resized_shape(1000, 700, 600, 1000) == (857, 600)


def test_preprocess_matches_direct_computation():
    cfg = FrcnnConfig.tiny(size_divisibility=32, pad_value=0.0)
    rng = np.random.RandomState(0)
    a = (rng.rand(50, 80, 3) * 255).astype(np.uint8)
    b = (rng.rand(70, 40, 3) * 255).astype(np.uint8)
    prep = preprocess_images([Image.fromarray(a), b], cfg)
    assert prep.image_sizes.tolist() == [list(resized_shape(50, 80, 64, 96)), list(resized_shape(70, 40, 64, 96))]
    assert prep.raw_sizes.tolist() == [[50, 80], [70, 40]]
    h, w = prep.image_sizes[0].tolist()
    bgr = torch.from_numpy(a[:, :, ::-1].copy()).float().permute(2, 0, 1)[None]
    direct = torch.nn.functional.interpolate(bgr, (h, w), mode="bilinear", align_corners=False)[0]
    direct = direct - torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    torch.testing.assert_close(prep.tensor[0, :, :h, :w], direct, rtol=0, atol=1e-4)
    assert prep.tensor.shape[2] % 32 == 0 and prep.tensor.shape[3] % 32 == 0
    assert (prep.tensor[0, :, h:, :] == 0).all() and (prep.tensor[0, :, :, w:] == 0).all()
    torch.testing.assert_close(prep.scales_yx[1], torch.tensor([70 / prep.image_sizes[1, 0], 40 / prep.image_sizes[1, 1]]))


def test_config_yaml_round_trip_and_detectron2_layout(tmp_path):
    cfg = FrcnnConfig.tiny(nms_thresh_test=[0.3, 0.6], anchor_offset=0.5)
    cfg.save_yaml(tmp_path / "config.yaml")
    assert FrcnnConfig.from_yaml(tmp_path / "config.yaml") == cfg
    d2 = {"MODEL": {"PIXEL_MEAN": [1, 2, 3], "CAFFE_MAXPOOL": False, "RESNETS": {"DEPTH": 50},
                    "ANCHOR_GENERATOR": {"SIZES": [[32, 64]]}, "PROPOSAL_GENERATOR": {"HID_CHANNELS": 256},
                    "ROI_HEADS": {"NUM_CLASSES": 80, "NMS_THRESH_TEST": 0.5}},
          "INPUT": {"MIN_SIZE_TEST": 800}}
    got = FrcnnConfig.from_dict(d2)
    assert (got.pixel_mean, got.caffe_maxpool, got.stage_blocks, got.anchor_sizes, got.rpn_hidden_channels,
            got.num_classes, got.nms_thresh_test, got.min_size_test) == (
        [1.0, 2.0, 3.0], False, (3, 4, 6), [32.0, 64.0], 256, 80, [0.5], 800)
    with pytest.raises(NeuroprobeError):
        FrcnnConfig.from_dict({"resnets": {"norm": "GN"}})


# ----------------------------------------------------------------------------- the published checkpoint's keys
def test_published_key_manifest_loads_strictly_into_full_model():
    manifest = json.loads((DATA / "frcnn_vg_keys.json").read_text())
    with torch.device("meta"):
        model = Detector(FrcnnConfig())
        state = {k: torch.empty(shape) for k, shape in manifest["keys"].items()}
    assert len(state) == manifest["count"] == 640
    model.load_state_dict(state, strict=True, assign=True)
    n = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n == manifest["numel"] == 65_545_214
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["keys"]


# ----------------------------------------------------------------------------- parity with the reference code
@pytest.fixture(scope="module")
def parity():
    from safetensors import safe_open

    with safe_open(str(DATA / "frcnn_tiny_parity.safetensors"), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    cfg = FrcnnConfig.from_dict(yaml.safe_load(meta["config_yaml"]))
    model = Detector(cfg)
    model.load_state_dict({k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}, strict=True)
    images = [t["input.image0"].numpy(), t["input.image1"].numpy()]
    prep = preprocess_images(images, cfg)
    with torch.no_grad():
        out = model(prep.tensor, prep.image_sizes)
    return model, prep, out, t


def test_preprocessing_equals_reference(parity):
    _, prep, _, t = parity
    assert list(prep.tensor.shape) == t["ref.pixels_shape"].tolist()
    torch.testing.assert_close(prep.tensor[:, :, ::5, ::5], t["ref.pixels_subsample"], rtol=0, atol=0)
    assert torch.equal(prep.image_sizes, t["ref.image_sizes"])
    torch.testing.assert_close(prep.scales_yx, t["ref.scales_yx"])


def test_model_outputs_equal_reference(parity):
    _, _, out, t = parity
    # Proposals are pixel coordinates decoded from the RPN's deltas (centre + d*size, size*exp(d)),
    # so an error in a delta (held below to 1e-4 absolute, the logit scale) moves a coordinate by up
    # to 1e-4 of the box size, which the image side bounds. The tolerance is therefore relative to
    # the image's scale: 1e-4 x its longest side (0.015 px here), whatever the CPU, its SIMD width or
    # the thread count (one x86 machine measured 5.6e-4 px, i.e. 3.7e-6 of the side).
    for i in range(2):
        side = float(t["ref.image_sizes"][i].max())
        torch.testing.assert_close(out.proposals[i], t[f"ref.proposals{i}"], rtol=1e-5, atol=1e-4 * side)
    for name in ("obj_logits", "attr_logits", "box_deltas", "features"):
        torch.testing.assert_close(getattr(out, name), t[f"ref.{name}"], rtol=1e-5, atol=1e-4)


def test_hf_postprocessing_equals_reference(parity):
    model, prep, out, t = parity
    sel = select_regions(model, out, prep, 10, method="hf")
    for i, s in enumerate(sel):
        k = int(t["ref.preds_per_image"][i])
        assert len(s["features"]) == k
        torch.testing.assert_close(s["raw_boxes"], t["ref.hf.boxes"][i, :k], rtol=0, atol=1e-3)
        assert torch.equal(s["obj_ids"], t["ref.hf.obj_ids"][i, :k])
        assert torch.equal(s["attr_ids"], t["ref.hf.attr_ids"][i, :k])
        torch.testing.assert_close(s["obj_scores"], t["ref.hf.obj_probs"][i, :k])
        torch.testing.assert_close(s["attr_scores"], t["ref.hf.attr_probs"][i, :k])
        torch.testing.assert_close(s["features"], t["ref.hf.roi_features"][i, :k], rtol=1e-5, atol=1e-4)
        h, w = prep.raw_sizes[i].tolist()
        expected = s["raw_boxes"] / torch.tensor([w, h, w, h], dtype=torch.float32)
        torch.testing.assert_close(s["boxes"], expected)


def test_butd_postprocessing_equals_generate_tsv_recipe(parity):
    model, prep, out, _ = parity
    n = 6
    sel = select_regions(model, out, prep, n, method="butd")
    for i, parts in enumerate(out.split()):
        props = parts["proposals"].tolist()
        probs = torch.softmax(parts["obj_logits"], -1)[:, :-1].numpy()
        max_conf = np.zeros(len(props))
        for c in range(probs.shape[1]):  # generate_tsv.py: NMS of the proposals under each class's scores
            keep = _nms(props, probs[:, c].tolist(), 0.3)
            max_conf[keep] = np.maximum(max_conf[keep], probs[keep, c])
        chosen = sorted(range(len(props)), key=lambda r: (-max_conf[r], r))[:n]
        torch.testing.assert_close(sel[i]["features"], parts["features"][chosen])
        sy, sx = prep.scales_yx[i].tolist()
        raw = parts["proposals"][chosen] * torch.tensor([sx, sy, sx, sy])
        torch.testing.assert_close(sel[i]["raw_boxes"], raw)
        assert sel[i]["obj_ids"].tolist() == probs[chosen].argmax(1).tolist()
        attr = torch.softmax(parts["attr_logits"][chosen], -1)[:, :-1]
        assert sel[i]["attr_ids"].tolist() == attr.argmax(1).tolist()


# ----------------------------------------------------------------------------- end to end, loading
def _scene(w: int = 120, h: int = 90) -> Image.Image:
    im = Image.new("RGB", (w, h), (200, 220, 240))
    d = ImageDraw.Draw(im)
    d.rectangle([10, 30, 50, 80], fill=(200, 30, 30))
    d.ellipse([60, 10, 110, 60], fill=(20, 120, 40))
    return im


def test_tiny_detector_end_to_end():
    det = load_detector(init="random", config=FrcnnConfig.tiny(), seed=1)
    regions = extract_regions(det, [_scene(), _scene(64, 100)], n_regions=5)
    assert regions["features"].shape == (2, 5, det.config.roi_feature_size)
    assert regions["boxes"].shape == regions["raw_boxes"].shape == (2, 5, 4)
    assert regions["obj_ids"].shape == regions["attr_ids"].shape == (2, 5)
    assert regions["num_regions"].tolist() == [5, 5]
    assert regions["image_sizes"].tolist() == [[90, 120], [100, 64]]
    assert ((regions["boxes"] >= 0) & (regions["boxes"] <= 1)).all()
    sizes = regions["image_sizes"].flip(1).repeat(1, 2)[:, None, :].float()
    torch.testing.assert_close(regions["boxes"] * sizes, regions["raw_boxes"])
    assert ((regions["obj_ids"] >= 0) & (regions["obj_ids"] < 12)).all()
    assert ((regions["attr_ids"] >= 0) & (regions["attr_ids"] < 6)).all()
    again = extract_regions(det, [_scene()], n_regions=5)
    torch.testing.assert_close(again["features"][0], regions["features"][0])
    hf = extract_regions(det, _scene(), n_regions=5, method="hf")
    assert hf["features"].shape == (1, 5, det.config.roi_feature_size)
    with pytest.raises(NeuroprobeError):
        extract_regions(det, _scene(), method="nope")


def test_random_init_is_seeded_and_keeps_activations_of_order_one():
    cfg = FrcnnConfig.tiny(blocks_per_stage=[3, 4, 6])
    a, b, c = (load_detector(init="random", config=cfg, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.backbone.res4[0].conv2.weight, c.backbone.res4[0].conv2.weight)
    rng = np.random.RandomState(0)
    blocky = Image.fromarray((np.kron(rng.rand(6, 8, 3), np.ones((16, 16, 1))) * 255).astype(np.uint8))
    for image in (_scene(), blocky):
        with torch.no_grad():
            res4 = a.backbone(preprocess_images([image], cfg).tensor)
        assert 0.05 < float(res4.std()) < 20.0
    props = a.proposal_generator(res4, preprocess_images([blocky], cfg).image_sizes)[0][0]
    assert len(props) > 0 and bool(ops.nonempty_boxes(props).all())


def test_default_36_regions_are_padded_when_fewer_exist():
    det = load_detector(init="random", config=FrcnnConfig.tiny(rpn_post_nms_topk=20), seed=2)
    regions = extract_regions(det, _scene(), n_regions=36)
    k = int(regions["num_regions"][0])
    assert regions["features"].shape == (1, 36, det.config.roi_feature_size) and 0 < k <= 20
    assert (regions["features"][0, k:] == 0).all() and (regions["obj_ids"][0, k:] == -1).all()


def test_save_and_load_round_trip(tmp_path):
    det = load_detector(init="random", config=FrcnnConfig.tiny(), seed=3)
    save_detector(det, tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["config.yaml", "pytorch_model.bin"]
    loaded = load_detector(tmp_path / "det")
    assert loaded.config == det.config
    for (k, a), (k2, b) in zip(det.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    r1 = extract_regions(det, _scene(), n_regions=4)
    r2 = extract_regions(loaded, _scene(), n_regions=4)
    torch.testing.assert_close(r1["features"], r2["features"], rtol=0, atol=0)
    random_from_dir = load_detector(tmp_path / "det", init="random", seed=3)
    assert random_from_dir.config == det.config


def test_old_style_checkpoint_is_normalised(tmp_path):
    det = load_detector(init="random", config=FrcnnConfig.tiny(), seed=4)
    state = {}
    for k, v in det.state_dict().items():
        if k.endswith("cell_anchors.0") or (k.endswith("num_batches_tracked") and "res2" in k):
            continue  # absent from older checkpoints
        if k.endswith("num_batches_tracked"):
            v = torch.tensor([0])  # the [1]-shaped buffer of converted detectron2 pickles
        if k.endswith("norm.weight"):
            k = k[: -len("weight")] + "gamma"
        state[k] = v
    (tmp_path / "d").mkdir()
    det.config.save_yaml(tmp_path / "d" / "config.yaml")
    torch.save(state, tmp_path / "d" / "pytorch_model.bin")
    loaded = load_detector(tmp_path / "d")
    for k, v in det.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "d" / "pytorch_model.bin")
    with pytest.raises(NeuroprobeError, match="do not fit"):
        load_detector(tmp_path / "d")


def test_missing_weights_offline(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="config.yaml and pytorch_model.bin"):
        load_detector(empty)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError, match="--detector-weights"):
        load_detector(None)


# ----------------------------------------------------------------------------- region feature files
def _records(n_images: int = 3, n: int = 36, d: int = 16) -> list[RegionRecord]:
    rng = np.random.RandomState(0)
    out = []
    for i in range(n_images):
        h, w = 300 + 10 * i, 400 - 5 * i
        xy = rng.rand(n, 2) * [w / 2, h / 2]
        boxes = np.concatenate([xy, xy + rng.rand(n, 2) * [w / 2, h / 2]], 1).astype(np.float32)
        out.append(RegionRecord(f"COCO_val2014_{i:012d}", h, w, rng.rand(n, d).astype(np.float32), boxes,
                                rng.randint(0, 1600, n).astype(np.int64), rng.rand(n).astype(np.float32),
                                rng.randint(0, 400, n).astype(np.int64), rng.rand(n).astype(np.float32)))
    return out


def test_obj36_tsv_round_trip_and_lxmert_loader_compatibility(tmp_path):
    recs = _records()
    path = write_obj_tsv(tmp_path / "val_obj36.tsv", recs)
    # read back with the airsplay/lxmert loader logic (csv.DictReader + base64 + frombuffer)
    csv.field_size_limit(sys.maxsize)
    with open(path) as f:
        rows = list(csv.DictReader(f, TSV_FIELDS, delimiter="\t"))
    assert len(rows) == 3
    for rec, row in zip(recs, rows):
        n = int(row["num_boxes"])
        assert (row["img_id"], int(row["img_h"]), int(row["img_w"]), n) == (rec.image_id, rec.image_h, rec.image_w, 36)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(row["features"]), np.float32).reshape(n, -1),
                                      rec.features)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(row["objects_id"]), np.int64), rec.obj_ids)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(row["boxes"]), np.float32).reshape(n, 4),
                                      rec.raw_boxes)
    back = read_obj_tsv(path)
    assert list(back) == [r.image_id for r in recs]
    for rec in recs:
        got = back[rec.image_id]
        for field in ("features", "raw_boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
            np.testing.assert_array_equal(getattr(got, field), getattr(rec, field))
        expected = rec.raw_boxes / np.array([rec.image_w, rec.image_h, rec.image_w, rec.image_h], np.float32)
        np.testing.assert_allclose(got.boxes, expected, rtol=1e-6)
    source = RegionFeatureSource(path)
    assert len(source) == 3 and "COCO_val2014_000000000001" in source
    feats, boxes = source["/images/val2014/COCO_val2014_000000000002.jpg"]
    np.testing.assert_array_equal(feats, recs[2].features)
    np.testing.assert_allclose(boxes, recs[2].raw_boxes / np.array([390, 320, 390, 320], np.float32), rtol=1e-6)
    with pytest.raises(NeuroprobeError, match="No region features"):
        source["COCO_val2014_999"]
    f, b, m = source.batch(["COCO_val2014_000000000000", "COCO_val2014_000000000001"], n_regions=40)
    assert f.shape == (2, 40, 16) and m.sum(1).tolist() == [36, 36] and (f[:, 36:] == 0).all()


def test_malformed_tsv_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("img\t1\t2\tnot-base64\n")
    with pytest.raises(NeuroprobeError, match="fields"):
        read_obj_tsv(path)


def test_hdf5_round_trip_and_source(tmp_path):
    det = load_detector(init="random", config=FrcnnConfig.tiny(), seed=5)
    regions = extract_regions(det, [_scene(), _scene(80, 60)], n_regions=4)
    ids = ["a.jpg", "b.jpg"]
    extra = {k: v for k, v in regions.items() if k not in ("features", "boxes")}
    path = write_features_h5(tmp_path / "regions.h5", ids, regions["features"], regions["boxes"], **extra)
    with h5py.File(path) as f:
        assert f.attrs["format"] == "neuroprobe-region-features"
        assert f["features"].shape == (2, 4, det.config.roi_feature_size) and f["boxes"].shape == (2, 4, 4)
    got_ids, feats, boxes = read_features_h5(path)
    assert got_ids == ids
    np.testing.assert_array_equal(feats, regions["features"].numpy())
    np.testing.assert_array_equal(boxes, regions["boxes"].numpy())
    with RegionFeatureSource(path) as source:
        f, b = source["/stimuli/b.jpg"]
        np.testing.assert_array_equal(f, regions["features"][1].numpy())
        np.testing.assert_array_equal(b, regions["boxes"][1].numpy())
        rec = source.record("a.jpg")
        assert (rec.image_h, rec.image_w) == (90, 120)
        np.testing.assert_array_equal(rec.obj_ids, regions["obj_ids"][0].numpy())
    # the same regions through the TSV writer
    tsv = write_obj_tsv(tmp_path / "r.tsv", records_from_regions(ids, regions))
    back = read_obj_tsv(tsv)
    np.testing.assert_allclose(back["b.jpg"].boxes, regions["boxes"][1].numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(NeuroprobeError):
        write_features_h5(tmp_path / "x.h5", ["a"], np.zeros((2, 4, 8)), np.zeros((2, 4, 4)))
