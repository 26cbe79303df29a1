"""CLIP, LXMERT and VisualBERT subjects, the pictures battery, its renderer and CLIP preprocessing.

Tiny random models are saved with ``save_pretrained`` and loaded back through
``load_subject(..., weights=dir)``; every recorded value and readout is compared with
a direct computation through the transformers modules (no electrodes involved).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neuroprobe import load_subject
from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.recording.recorder import Recorder
from neuroprobe.stimuli import Battery
from neuroprobe.stimuli.images import CLIP_MEAN, CLIP_STD, ClipPreprocess
from neuroprobe.stimuli.render import DRAWINGS, build_battery, draw, render_name
from neuroprobe.subjects.region_features import RegionFeatureSource, write_features_h5
from neuroprobe.testing import VISUAL_FEAT_DIM, make_tiny

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["sun", "cat", "house"]
ANSWERS_9500 = ROOT / "neuroprobe" / "data" / "lxmert" / "lxmert" / "all_ans.json"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pictures() -> Battery:
    return Battery.load("pictures")


@pytest.fixture(scope="module")
def small(pictures: Battery) -> Battery:
    """One stimulus per (concept, form) for three concepts: images, texts and pairs."""
    t = pictures.table
    rows = t[t["concept"].isin(CONCEPTS)].groupby(["concept", "form"], sort=False).head(1).reset_index(drop=True)
    b = Battery.from_table(rows, concepts={c: pictures.concepts[c] for c in CONCEPTS}, name="pictures-small",
                           root=pictures.root)
    b.meta["vqa_question"] = pictures.meta["vqa_question"]
    return b


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved models, re-initialised with large weights so that readouts differ between concepts
    (at the usual 0.02 scale every score is -log(n_concepts) to five digits); LXMERT gets the
    9500-answer pre-training QA head."""
    import transformers as tf

    root = tmp_path_factory.mktemp("vl-models")
    out = {}
    for arch, cls in (("clip", tf.CLIPModel), ("lxmert", tf.LxmertForPreTraining), ("visualbert", tf.VisualBertForPreTraining)):
        out[arch] = make_tiny(arch, root / arch)
        cfg = tf.AutoConfig.from_pretrained(out[arch])
        if arch == "clip":
            for c in (cfg, cfg.text_config, cfg.vision_config):
                c.initializer_factor = 20.0
        else:
            cfg.initializer_range = 0.5
        if arch == "lxmert":
            cfg.num_qa_labels = 9500
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            cls(cfg).save_pretrained(out[arch])
    return out


@pytest.fixture(scope="module")
def features(small: Battery, tmp_path_factory) -> Path:
    """Random region features (HDF5) for the small battery's images, keyed by file stem; 36 regions, the
    first image only 5 (a short image pads)."""
    images = sorted(set(small.table["image"]) - {""})
    rng = np.random.default_rng(0)
    n = len(images)
    feats = rng.standard_normal((n, 36, VISUAL_FEAT_DIM)).astype(np.float32)
    xy = rng.uniform(0, 0.5, (n, 36, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (n, 36, 2))], -1).astype(np.float32)
    num = np.full(n, 36, dtype=np.int64)
    num[0] = 5
    path = tmp_path_factory.mktemp("vl-features") / "regions.h5"
    write_features_h5(path, [Path(i).stem for i in images], feats, boxes, num_regions=num)
    return path


@pytest.fixture(scope="module")
def clip(models):
    return load_subject("clip", weights=models["clip"], device="cpu", quiet=True, heads=True)


@pytest.fixture(scope="module")
def lxmert(models, features):
    return load_subject("lxmert", weights=models["lxmert"], device="cpu", quiet=True, heads=True, features=features)


@pytest.fixture(scope="module")
def visualbert(models, features):
    return load_subject("visualbert", weights=models["visualbert"], device="cpu", quiet=True, heads=True,
                        features=features)


def first(battery: Battery, modality: str, form: str | None = None) -> pd.DataFrame:
    t = battery.table
    t = t[t["modality"] == modality]
    if form:
        t = t[t["form"] == form]
    return t.iloc[[0]]


def rec_all(subject, battery: Battery, path: Path, **kw):
    from neuroprobe import open_recording

    return open_recording(Recorder(subject, battery, montage="all", quiet=True, **kw).run(path))


# ---------------------------------------------------------------- rendering + battery


def test_written_names_and_drawings_are_deterministic(tmp_path, pictures):
    a = np.asarray(render_name("Umbrella", font="serif-italic", colour=(120, 20, 20)))
    b = np.asarray(render_name("Umbrella", font="serif-italic", colour=(120, 20, 20)))
    assert np.array_equal(a, b)
    assert (a < 128).any() and (a > 200).any()  # ink on paper
    assert not np.array_equal(a, np.asarray(render_name("Umbrella", font="mono")))
    for concept in DRAWINGS:
        assert np.array_equal(np.asarray(draw(concept, seed=3)), np.asarray(draw(concept, seed=3)))
        assert not np.array_equal(np.asarray(draw(concept, seed=3)), np.asarray(draw(concept, seed=4)))
    # rebuilding part of the battery gives the same files; byte-identical to the committed ones
    # when Pillow and FreeType are the versions the battery was built with
    one = build_battery(tmp_path / "one", concepts=["umbrella", "cat"])
    two = build_battery(tmp_path / "two", concepts=["umbrella", "cat"])
    files = sorted(p.name for p in (one / "images").glob("*.png"))
    assert len(files) == 2 * 16
    for name in files:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes()
    import PIL
    from PIL import features as pil_features

    built = pictures.meta["built_with"]
    if built["pillow"] == PIL.__version__ and built["freetype"] == (pil_features.version("freetype2") or ""):
        for name in files:
            assert (one / "images" / name).read_bytes() == (pictures.root / "images" / name).read_bytes(), name


def test_pictures_battery_layout(pictures):
    t = pictures.table
    assert len(t) == 16 * 20
    assert set(t["modality"]) == {"image", "text", "pair"}
    forms = t.groupby(["concept", "form"]).size().unstack()
    assert (forms[["drawing", "sketch", "written-name", "text-name"]] == 4).all().all()
    assert (t.groupby(["form", "split"]).size().unstack().pipe(lambda x: x["screening"] == x["testing"])).all()
    answers = {a["ans"] for a in json.loads(ANSWERS_9500.read_text())}
    vqa = set(json.loads((ROOT / "neuroprobe/data/lxmert/vqa/trainval_label2ans.json").read_text()))
    for concept, info in pictures.concepts.items():
        assert concept in answers and concept in vqa
        assert concept in info["prompt"]
    im = pictures.load_image(t.iloc[0])
    assert im.size == (128, 128) and im.mode == "RGB"
    assert (ROOT / "neuroprobe/data/lxmert/LICENSE").is_file()


# ------------------------------------------------------------------ CLIP preprocessing

_PREC = 22  # Pillow's fixed-point precision for 8-bit resampling


def _pil_bicubic_numpy(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pillow's 8-bit bicubic resize (a = -0.5, antialiased support, horizontal then vertical pass) in numpy."""

    def cubic(x: float) -> float:
        x, a_ = abs(x), -0.5
        if x < 1:
            return ((a_ + 2) * x - (a_ + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a_
        return 0.0

    def one_pass(arr: np.ndarray, out_size: int, axis: int) -> np.ndarray:
        arr = np.moveaxis(arr, axis, 0).astype(np.int64)
        n = arr.shape[0]
        scale = n / out_size
        fs = max(scale, 1.0)
        out = np.zeros((out_size,) + arr.shape[1:], dtype=np.int64)
        for i in range(out_size):
            centre = (i + 0.5) * scale
            lo, hi = max(int(centre - 2 * fs + 0.5), 0), min(int(centre + 2 * fs + 0.5), n)
            wts = np.array([cubic((x + lo - centre + 0.5) / fs) for x in range(hi - lo)])
            wts = wts / wts.sum()
            k = np.where(wts >= 0, np.floor(wts * (1 << _PREC) + 0.5), np.ceil(wts * (1 << _PREC) - 0.5)).astype(np.int64)
            out[i] = np.clip(((1 << (_PREC - 1)) + np.tensordot(k, arr[lo:hi], axes=(0, 0))) >> _PREC, 0, 255)
        return np.moveaxis(out, 0, axis)

    if w != a.shape[1]:
        a = one_pass(a, w, 1)
    if h != a.shape[0]:
        a = one_pass(a, h, 0)
    return a.astype(np.uint8)


@pytest.mark.parametrize("hw", [(13, 9), (9, 13), (7, 7), (5, 11)])
def test_clip_preprocessing_matches_numpy(hw):
    rng = np.random.default_rng(sum(hw))
    arr = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    size = 6
    pre = ClipPreprocess(size=size, crop_height=size, crop_width=size)
    got = pre([Image.fromarray(arr)])[0].numpy()
    H, W = hw
    short, long = min(H, W), max(H, W)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if H <= W else (new_long, size)
    resized = _pil_bicubic_numpy(arr, nw, nh)
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    expect = ((crop - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5)
    # and the processor of transformers agrees
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    np.testing.assert_allclose(got, ref(Image.fromarray(arr), return_tensors="np")["pixel_values"][0], atol=1e-5)


def test_clip_preprocessing_reads_the_processor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 18}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25], "resample": 2}))
    pre = ClipPreprocess.from_source(tmp_path, image_size=224)
    assert (pre.size, pre.crop_height, pre.crop_width, pre.mean, pre.std, pre.resample) == (
        20, 16, 18, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2)
    assert pre([Image.new("RGB", (40, 30), (255, 0, 128))]).shape == (1, 3, 16, 18)
    default = ClipPreprocess.from_source(tmp_path / "nothing-here", image_size=32)
    assert (default.size, default.crop_height, default.mean) == (32, 32, CLIP_MEAN)


# ------------------------------------------------------------------------------ CLIP


def _clip_direct_mlp(model, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Post-activation MLP units of vision layer ``layer``, computed from the modules, ``[T, U]``."""
    vm = model.vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    for i, blk in enumerate(vm.encoder.layers):
        a = h + blk.self_attn(blk.layer_norm1(h))[0]
        pre = blk.mlp.activation_fn(blk.mlp.fc1(blk.layer_norm2(a)))
        if i == layer:
            return pre[0]
        h = a + blk.mlp.fc2(pre)
    raise AssertionError


def test_clip_records_both_towers(clip, small, tmp_path):
    assert clip.split_by_modality
    rec = rec_all(clip, small, tmp_path / "clip.h5", batch_size=7)
    t = small.table
    text_rows, image_rows = t["modality"] == "text", t["modality"] == "image"
    for site in clip.sites("all"):
        r = rec.responses(site.name)[()]
        assert np.isfinite(r[t["modality"] == "pair"]).all()  # a pair runs both towers
        if site.stream == "image":
            assert np.isnan(r[text_rows]).all() and np.isfinite(r[image_rows]).all()
        else:
            assert np.isnan(r[image_rows]).all() and np.isfinite(r[text_rows]).all()
    # recorded vision MLP units equal the direct computation (mean over the class token and patches)
    with torch.inference_mode():
        for i in np.flatnonzero(image_rows)[:2]:
            px = clip.preprocess([small.load_image(t.iloc[i])])
            for layer in range(2):
                direct = _clip_direct_mlp(clip.model, px, layer).mean(0).numpy()
                np.testing.assert_allclose(rec.responses(f"vision.{layer}.mlp")[i], direct, rtol=1e-4, atol=1e-5)
    batch = clip.encode(t[image_rows].head(2), small)
    assert batch.masks["image"].all() and batch.masks["image"].shape == (2, (32 // 8) ** 2 + 1)


def test_clip_encode_rejects_mixed_batches(clip, small):
    with pytest.raises(NeuroprobeError, match="one modality per batch"):
        clip.encode(small.table.head(len(small.table)), small)


def test_clip_zero_shot_equals_direct(clip, small):
    concepts = small.concept_names
    prompts = [small.concepts[c]["prompt"] for c in concepts]
    img = first(small, "image", "drawing")
    txt = first(small, "text")
    with torch.inference_mode():
        got = clip.readout(pd.concat([img, txt]), small, "zero_shot")
        enc = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        px = clip.preprocess([small.load_image(img.iloc[0])])
        out = clip.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        want_img = out.logits_per_image.log_softmax(-1)[0, concepts.index(img["concept"].iloc[0])]
        t1 = clip.tokenizer(txt["text"].tolist(), return_tensors="pt")
        e = clip.model.get_text_features(**t1).pooler_output
        e = e / e.norm(dim=-1, keepdim=True)
        p = out.text_embeds
        want_txt = (clip.model.logit_scale.exp() * e @ p.T).log_softmax(-1)[0, concepts.index(txt["concept"].iloc[0])]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [float(want_img), float(want_txt)], rtol=1e-5, atol=1e-5)
    # prepared prompts come from the intact model: silencing the text tower afterwards leaves image scores alone
    clip.prepare_readout(small)
    weight = clip.model.text_projection.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.zero_()
        np.testing.assert_allclose(clip.readout(img, small, "zero_shot"), got[:1], rtol=1e-5)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        clip._prompt_cache = None


# ---------------------------------------------------------------------------- LXMERT


def _ext(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def test_lxmert_cross_attention_sites_are_the_two_directions(lxmert, small):
    rows = pd.concat([first(small, "image", "drawing"), first(small, "pair"), first(small, "text")])
    batch = lxmert.encode(rows, small)
    assert batch.masks["image"].sum(1).tolist() == [36, 36, 1]
    sites = [s for s in lxmert.sites("attn") if s.name.startswith("cross.0.xattn")]
    assert [(s.name, s.call, s.stream) for s in sites] == [("cross.0.xattn#0", 0, "text"), ("cross.0.xattn#1", 1, "image")]
    with torch.inference_mode(), Electrodes(lxmert.model, sites) as el:
        lxmert.forward(batch)
        out = lxmert.model(**batch.inputs, output_hidden_states=True)
    lang_in = out.language_hidden_states[lxmert.model.config.l_layers - 1]
    visn_in = out.vision_hidden_states[lxmert.model.config.r_layers - 1]
    att = lxmert.model.encoder.x_layers[0].visual_attention.att
    tmask, vmask = batch.masks["text"], batch.masks["image"]
    with torch.inference_mode():
        l2v = att(lang_in, visn_in, _ext(vmask))[0]  # language queries over regions
        v2l = att(visn_in, lang_in, _ext(tmask))[0]  # regions over language
    x0, x1 = el.data["cross.0.xattn#0"], el.data["cross.0.xattn#1"]
    assert x0.shape[:2] == tmask.shape and x1.shape[:2] == vmask.shape
    torch.testing.assert_close(x0[tmask], l2v[tmask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x1[vmask], v2l[vmask], rtol=1e-4, atol=1e-5)


def test_lxmert_records_and_mlp_equals_direct(lxmert, small, tmp_path, features):
    rec = rec_all(lxmert, small, tmp_path / "lx.h5", batch_size=5)
    names = {s.name for s in lxmert.sites("all")}
    assert {"cross.1.xattn#0", "cross.1.xattn#1", "visn.0.mlp", "cross.0.visn_mlp", "lang.1"} <= names
    for name in names:
        assert np.isfinite(rec.responses(name)[()]).all(), name
    # a drawing's visual-layer MLP units, directly from the modules (one stimulus, no padding)
    t = small.table
    i = int(np.flatnonzero(t["modality"] == "image")[1])
    feats, boxes = RegionFeatureSource(features)[t["image"].iloc[i]]
    enc = lxmert.model.encoder
    with torch.inference_mode():
        v = enc.visn_fc(torch.tensor(feats)[None], torch.tensor(boxes)[None])
        a = enc.r_layers[0].attention(v, None)[0]
        direct = enc.r_layers[0].intermediate(a)[0].mean(0).numpy()
    np.testing.assert_allclose(rec.responses("visn.0.mlp")[i], direct, rtol=1e-4, atol=1e-5)
    # image-only stimuli see the empty text; text-only stimuli one blank whole-image region
    batch = lxmert.encode(pd.concat([first(small, "image"), first(small, "text")]), small)
    assert batch.masks["text"][0].sum() == 2  # [CLS] [SEP]
    assert batch.masks["image"][1].sum() == 1
    assert batch.inputs["visual_pos"][1, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert not batch.inputs["visual_feats"][1, 0].any()


def _masked_lm_direct(tok, row, run) -> torch.Tensor:
    """Sum of log p of the target's word pieces, each at its own [MASK] of the cloze sentence."""
    target = tok(row["target"], add_special_tokens=False)["input_ids"]
    enc = tok([row["cloze"].replace("{mask}", tok.mask_token * len(target))], return_tensors="pt")
    lm = run(enc).prediction_logits[0].log_softmax(-1)
    pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0]
    assert len(pos) == len(target)
    return lm[pos, torch.tensor(target)].sum()


def test_lxmert_readouts_equal_direct(lxmert, small, features):
    head = lxmert.head_model
    tok = lxmert.tokenizer
    concepts = small.concept_names
    img = first(small, "image", "sketch")
    feats, boxes = (torch.tensor(x)[None] for x in RegionFeatureSource(features)[img["image"].iloc[0]])
    c = concepts.index(img["concept"].iloc[0])
    with torch.inference_mode():
        # matching: log-softmax over concepts of the match log-odds of (image, prompt)
        odds = []
        for concept in concepts:
            enc = tok([small.concepts[concept]["prompt"]], return_tensors="pt")
            s = head(**enc, visual_feats=feats, visual_pos=boxes).cross_relationship_score[0]
            odds.append(s[1] - s[0])
        want_match = torch.stack(odds).log_softmax(0)[c]
        # vqa: the concept name among the 9500 pre-training answers
        answers = [a["ans"] for a in json.loads(ANSWERS_9500.read_text())]
        enc = tok([small.meta["vqa_question"]], return_tensors="pt")
        qa = head(**enc, visual_feats=feats, visual_pos=boxes).question_answering_score[0].log_softmax(-1)
        want_vqa = qa[answers.index(img["concept"].iloc[0])]
        # masked_lm: "This is a picture of a [MASK]." with the image
        want_lm = _masked_lm_direct(tok, img.iloc[0], lambda enc: head(**enc, visual_feats=feats, visual_pos=boxes))
    got = {name: lxmert.readout(img, small, name) for name in ("matching", "vqa", "masked_lm")}
    for name, want in [("matching", want_match), ("vqa", want_vqa), ("masked_lm", want_lm)]:
        assert np.isfinite(got[name]).all()
        np.testing.assert_allclose(got[name], [float(want)], rtol=1e-4, atol=1e-5, err_msg=name)
    # every readout is finite on the image and pair stimuli; text stimuli have no vqa score
    all_scores = {name: lxmert.readout(small.table, small, name) for name in lxmert.readouts}
    seen = small.table["modality"].isin(["image", "pair"]).to_numpy()
    for name, scores in all_scores.items():
        assert np.isfinite(scores[seen]).all(), name
    assert np.isnan(all_scores["vqa"][~seen]).all()
    assert np.isfinite(all_scores["matching"]).all() and np.isfinite(all_scores["masked_lm"]).all()


def test_lxmert_regions_from_the_detector(models, small, tmp_path):
    """--detector-weights: regions from the (tiny) Faster R-CNN equal extract_regions on the image."""
    import transformers as tf

    from neuroprobe.subjects.frcnn import FrcnnConfig, extract_regions, load_detector, save_detector

    det_dir = save_detector(load_detector(init="random", config=FrcnnConfig.tiny(), seed=0), tmp_path / "frcnn")
    detector = load_detector(det_dir)
    dim = detector.config.roi_feature_size
    lx_dir = tmp_path / "lxmert"
    shutil.copytree(models["lxmert"], lx_dir)
    cfg = tf.LxmertConfig.from_pretrained(lx_dir)
    cfg.visual_feat_dim = dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tf.LxmertModel(cfg).save_pretrained(lx_dir)
    subject = load_subject("lxmert", weights=lx_dir, device="cpu", quiet=True, detector_weights=det_dir)
    rows = first(small, "image", "drawing")
    batch = subject.encode(rows, small)
    regions = extract_regions(detector, [small.load_image(rows.iloc[0])], n_regions=36)
    n = int(regions["num_regions"][0])
    assert batch.masks["image"].sum() == n > 0
    torch.testing.assert_close(batch.inputs["visual_feats"][0, :n], regions["features"][0, :n])
    torch.testing.assert_close(batch.inputs["visual_pos"][0, :n], regions["boxes"][0, :n])


def test_lxmert_reads_obj36_tsv_like_hdf5(models, small, features, tmp_path):
    from neuroprobe.subjects.region_features import write_obj_tsv

    source = RegionFeatureSource(features)
    records = [source.record(key) for key in source.ids]
    for r in records:  # pixel boxes of a 128 x 128 image, as the LXMERT TSV files store them
        r.image_h, r.image_w, r.raw_boxes = 128, 128, r.raw_boxes * 128
    tsv = write_obj_tsv(tmp_path / "pictures_obj36.tsv", records)
    short = sorted(set(small.table["image"]) - {""})[0]  # the image with 5 regions
    rows = pd.concat([small.table[small.table["image"] == short], first(small, "image"), first(small, "text")])
    a = load_subject("lxmert", weights=models["lxmert"], quiet=True, features=features).encode(rows, small)
    b = load_subject("lxmert", weights=models["lxmert"], quiet=True, features=tsv).encode(rows, small)
    assert torch.equal(a.masks["image"], b.masks["image"])
    torch.testing.assert_close(a.inputs["visual_feats"], b.inputs["visual_feats"])
    torch.testing.assert_close(a.inputs["visual_pos"], b.inputs["visual_pos"])
    assert a.masks["image"].sum(1).tolist() == [5, 36, 1]  # a short image pads; a text gets one blank region


def test_missing_detector_names_what_and_how(models, small, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    subject = load_subject("lxmert", weights=models["lxmert"], device="cpu", quiet=True)
    with pytest.raises(MissingWeightsError) as err:
        subject.encode(first(small, "image"), small)
    msg = str(err.value)
    assert "unc-nlp/frcnn-vg-finetuned" in msg and "--detector-weights" in msg and "--features" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence
    with pytest.raises(MissingWeightsError, match="--detector-weights"):
        load_subject("lxmert", weights=models["lxmert"], quiet=True, detector_weights=tmp_path / "nope")
    # text stimuli need no regions
    assert subject.encode(first(small, "text"), small).masks["image"].sum() == 1


# ------------------------------------------------------------------------ VisualBERT


def test_visualbert_joint_stream_and_mlp_equals_direct(visualbert, small, tmp_path, features):
    rec = rec_all(visualbert, small, tmp_path / "vb.h5", batch_size=4)
    for s in visualbert.sites("all"):
        assert s.stream == "joint"
        assert np.isfinite(rec.responses(s.name)[()]).all()
    t = small.table
    rows = pd.concat([first(small, "image"), first(small, "text"), first(small, "pair")])
    batch = visualbert.encode(rows, small)
    tm = batch.inputs["attention_mask"].bool()
    vm = batch.inputs["visual_attention_mask"].bool()
    assert torch.equal(batch.masks["joint"], torch.cat([tm, vm], 1))
    assert vm[1].sum() == 0 and vm[0].sum() > 0  # text-only: no regions
    assert (batch.token_ids["joint"][:, tm.shape[1]:][vm] < 0).all()
    # one pair stimulus, directly: embeddings -> layer 0 attention -> intermediate, mean over the joint positions
    i = int(np.flatnonzero(t["modality"] == "pair")[0])
    row = t.iloc[i]
    feats, _ = RegionFeatureSource(features)[row["image"]]
    enc = visualbert.tokenizer([row["text"]], return_tensors="pt")
    m = visualbert.model
    with torch.inference_mode():
        emb = m.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                           visual_embeds=torch.tensor(feats)[None])
        layer = m.encoder.layer[0]
        a = layer.attention(emb)[0]
        direct = layer.intermediate(a)[0].mean(0).numpy()
    np.testing.assert_allclose(rec.responses("encoder.layer.0.mlp")[i], direct, rtol=1e-4, atol=1e-5)


def test_visualbert_readouts_equal_direct(visualbert, small, features):
    head = visualbert.head_model
    tok = visualbert.tokenizer
    concepts = small.concept_names
    img = first(small, "image", "written-name")
    feats = torch.tensor(RegionFeatureSource(features)[img["image"].iloc[0]][0])[None]
    with torch.inference_mode():
        odds = []
        for concept in concepts:
            enc = tok([small.concepts[concept]["prompt"]], return_tensors="pt")
            s = head(**enc, visual_embeds=feats).seq_relationship_logits[0]
            odds.append(s[0] - s[1])  # label 0 = the text matches the image
        want_match = torch.stack(odds).log_softmax(0)[concepts.index(img["concept"].iloc[0])]
        want_lm = _masked_lm_direct(tok, img.iloc[0], lambda enc: head(**enc, visual_embeds=feats))
    np.testing.assert_allclose(visualbert.readout(img, small, "matching"), [float(want_match)], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(visualbert.readout(img, small, "masked_lm"), [float(want_lm)], rtol=1e-4, atol=1e-5)
    # text stimuli are matched against every concept's reference image
    txt = first(small, "text")
    refs = visualbert.reference_images(small)
    assert set(refs) == set(concepts) and all(small.table.set_index("image").loc[r, "form"] != "written-name"
                                              for r in refs.values())
    with torch.inference_mode():
        odds = []
        for concept in concepts:
            f = torch.tensor(RegionFeatureSource(features)[refs[concept]][0])[None]
            s = head(**tok(txt["text"].tolist(), return_tensors="pt"), visual_embeds=f).seq_relationship_logits[0]
            odds.append(s[0] - s[1])
        want = torch.stack(odds).log_softmax(0)[concepts.index(txt["concept"].iloc[0])]
    np.testing.assert_allclose(visualbert.readout(txt, small, "matching"), [float(want)], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ CLI


def _cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def small_dir(small, tmp_path_factory) -> Path:
    """The small battery as a folder (what --probe takes)."""
    root = tmp_path_factory.mktemp("pictures-small")
    (root / "images").mkdir()
    for rel in set(small.table["image"]) - {""}:
        shutil.copy(small.root / rel, root / rel)
    small.table.to_csv(root / "stimuli.csv", index=False)
    (root / "battery.json").write_text(json.dumps(small.meta))
    return root


@pytest.mark.parametrize("model", ["clip", "lxmert", "visualbert"])
def test_cli_records_the_image_battery(model, models, features, small_dir, small, tmp_path):
    out = tmp_path / f"{model}.h5"
    extra = [] if model == "clip" else ["--features", str(features)]
    res = _cli("record", "--model", model, "--probe", str(small_dir), "--weights", str(models[model]), "--init",
               "random", "--sites", "all", "--out", str(out), "--batch-size", "6", "--quiet", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    from neuroprobe import open_recording

    rec = open_recording(out)
    assert rec.attrs["init"] == "random" and len(rec.site_names) > 0
    subject = load_subject(model, weights=models[model], init="random", device="cpu", quiet=True,
                           **({} if model == "clip" else {"features": features}))
    assert rec.site_names == [s.name for s in subject.sites("all")]
    # every stimulus reaches the sites of its own stream
    finite = np.zeros(len(small.table), dtype=bool)
    for name in rec.site_names:
        finite |= np.isfinite(rec.responses(name)[()]).all(1)
    assert finite.all()


def test_cli_missing_detector_or_checkpoint_says_how(models, small_dir, tmp_path):
    res = _cli("record", "--model", "lxmert", "--probe", str(small_dir), "--weights", str(models["lxmert"]), "--init",
               "random", "--out", str(tmp_path / "x.h5"), "--quiet")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "--detector-weights" in last and "--features" in last and "Traceback" not in res.stderr
    assert not (tmp_path / "x.h5").exists()
    # nothing in the cache, offline: the untrained control needs no checkpoint (its config ships), only the
    # detector for this image battery; one sentence names it and how to provide it, before anything loads
    env_home = tmp_path / "empty-hf-home"
    res = _cli("record", "--model", "visualbert", "--probe", str(small_dir), "--init", "random",
               "--out", str(tmp_path / "y.h5"), "--quiet", env={"HF_HOME": str(env_home)})
    assert res.returncode != 0 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "unc-nlp/frcnn-vg-finetuned" in last and "--detector-weights" in last and "--features" in last
    assert "model.safetensors" not in last and "weights of" not in last
