"""ViLBERT: checkpoint layout, run order, numerical parity with the reference, loading, regions.

Ground truth comes from ``tests/data/vilbert_reference_keys.json``, derived from the
reference code (facebookresearch/vilbert-multi-task, see its ``source`` field):
every state-dict key and shape of both released checkpoints, the order in which the
reference encoder runs its layers for ``bert_base_6layer_6conect.json``, and the
outputs of the reference classes for a tiny config with seeded weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.vilbert import (
    ViLBERTConfig,
    ViLBERTModel,
    load_vilbert,
    prepare_regions,
    save_vilbert,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "vilbert_reference_keys.json").read_text())
CHECKPOINTS = ["pretrained_model.bin", "multi_task_model.bin"]


# ----------------------------------------------------------------- checkpoint layout
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_published_keys_load_strictly_into_base_model(checkpoint: str) -> None:
    manifest = REFERENCE["checkpoints"][checkpoint]["keys"]
    with torch.device("meta"):
        model = ViLBERTModel(ViLBERTConfig.base(checkpoint))
        state = {k: torch.empty(shape) for k, shape in manifest.items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_checkpoint_flavours_differ_by_task_tokens_and_heads() -> None:
    pre = set(REFERENCE["checkpoints"]["pretrained_model.bin"]["keys"])
    multi = set(REFERENCE["checkpoints"]["multi_task_model.bin"]["keys"])
    assert pre < multi
    assert "bert.embeddings.task_embeddings.weight" in multi - pre
    assert {k.split(".")[0] for k in multi - pre} >= {"vil_prediction", "vil_logit", "vil_prediction_gqa"}


# ------------------------------------------------------------------------ run order
def test_run_order_matches_reference_for_base_config() -> None:
    expected = [tuple(x) for x in REFERENCE["run_order"]["order"]]
    assert ViLBERTConfig.base().run_order() == expected
    with torch.device("meta"):
        model = ViLBERTModel(ViLBERTConfig.base()).eval()
        ids = torch.ones(1, 5, dtype=torch.long)
        feat, loc = torch.zeros(1, 3, 2048), torch.zeros(1, 3, 5)
        task = torch.ones(1, 1, dtype=torch.long)
    called: list[tuple[str, int]] = []
    enc = model.bert.encoder
    handles = []
    for stream, layers in (("text", enc.layer), ("image", enc.v_layer), ("co", enc.c_layer)):
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(lambda *_, s=stream, i=i: called.append((s, i))))
    with torch.no_grad():
        model(ids, feat, loc, task_ids=task, heads=())
    for h in handles:
        h.remove()
    assert called == expected


# -------------------------------------------------------------- parity with reference
def _fill_like_reference(model: ViLBERTModel) -> None:
    """The seeded weights the reference outputs were computed with (recipe in the JSON)."""
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    new = {}
    for key in sorted(state):
        if key == "cls.predictions.decoder.weight":
            continue
        t = torch.randn(tuple(state[key].shape), generator=gen) * 0.3
        if key.endswith("LayerNorm.weight") or key.endswith("logit_fc.2.weight"):
            t = t + 1.0
        new[key] = t
    new["cls.predictions.decoder.weight"] = new["bert.embeddings.word_embeddings.weight"]
    model.load_state_dict(new, strict=True)


def _tiny_inputs() -> dict[str, torch.Tensor]:
    raw = REFERENCE["tiny_parity"]["inputs"]
    out = {k: torch.tensor(v) for k, v in raw.items()}
    for k in ("image_feat", "image_loc"):
        out[k] = out[k].float()
    return out


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_tiny_outputs_match_reference_implementation(checkpoint: str) -> None:
    parity = REFERENCE["tiny_parity"]
    config = ViLBERTConfig(**parity["config"]).for_checkpoint(checkpoint)
    assert config == ViLBERTConfig.tiny(checkpoint)
    model = ViLBERTModel(config).eval()
    _fill_like_reference(model)
    x = _tiny_inputs()
    if checkpoint == "pretrained_model.bin":
        x.pop("task_ids")
    expected = parity["outputs"][checkpoint]
    heads = [k for k in expected if k not in ("text", "image", "pooled_text", "pooled_image")]
    with torch.no_grad():
        out = model(**x, heads=heads)
    got = {"text": out.text, "image": out.image, "pooled_text": out.pooled_text, "pooled_image": out.pooled_image,
           **out.logits}
    for name, value in expected.items():
        want = torch.tensor(value)
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-4, msg=name)


# ------------------------------------------------------------------- tiny forward
def test_tiny_forward_shapes_and_heads() -> None:
    torch.manual_seed(0)
    cfg = ViLBERTConfig.tiny()
    model = load_vilbert(init="random", config=cfg, seed=0)
    B, T, R = 3, 5, 4
    ids = torch.randint(1, cfg.vocab_size, (B, T))
    feat, loc, mask = prepare_regions(torch.randn(B, R, cfg.v_feature_size), torch.rand(B, R, 4).sort(-1).values)
    with torch.no_grad():
        out = model(ids, feat, loc, image_attention_mask=mask, task_ids=torch.full((B,), 7))
    assert out.text.shape == (B, T + 1, cfg.hidden_size)  # task token after [CLS]
    assert out.image.shape == (B, R + 1, cfg.v_hidden_size)
    assert out.pooled_text.shape == out.pooled_image.shape == (B, cfg.bi_hidden_size)
    assert out.alignment.shape == (B, 2)
    assert out.vqa.shape == (B, cfg.vqa_labels)
    fused = out.pooled_text * out.pooled_image
    torch.testing.assert_close(out.alignment, model.cls.bi_seq_relationship(fused))
    pre = load_vilbert(init="random", config=cfg, checkpoint="pretrained_model.bin")
    with torch.no_grad():
        out = pre(ids, feat, loc)
    assert out.text.shape == (B, T, cfg.hidden_size) and out.vqa is None and out.alignment.shape == (B, 2)
    with pytest.raises(ValueError, match="multi-task"):
        pre(ids, feat, loc, heads=["vqa"])


def test_padding_does_not_change_real_positions() -> None:
    cfg = ViLBERTConfig.tiny()
    model = load_vilbert(init="random", config=cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (1, 5), generator=g)
    f, b = torch.randn(3, cfg.v_feature_size, generator=g), torch.rand(3, 4, generator=g)
    task = torch.tensor([1])
    feat, loc, mask = prepare_regions(f, b)
    # the same image padded with two junk regions, the same text padded with two junk tokens
    feat2 = torch.cat([feat, torch.randn(1, 2, cfg.v_feature_size, generator=g)], 1)
    loc2 = torch.cat([loc, torch.rand(1, 2, 5, generator=g)], 1)
    mask2 = torch.cat([mask, torch.zeros(1, 2, dtype=torch.long)], 1)
    ids2 = torch.cat([ids, torch.randint(1, cfg.vocab_size, (1, 2), generator=g)], 1)
    amask2 = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids, feat, loc, image_attention_mask=mask, task_ids=task)
        b2 = model(ids2, feat2, loc2, attention_mask=amask2, image_attention_mask=mask2, task_ids=task)
    torch.testing.assert_close(b2.text[:, :6], a.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b2.image[:, :4], a.image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b2.vqa, a.vqa, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ regions
def test_prepare_regions_matches_reference_formula() -> None:
    rng = np.random.default_rng(0)
    W, H = 640.0, 480.0
    feats = [rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)]
    pix = []
    for n in (5, 2):
        x1, y1 = rng.uniform(0, W / 2, n), rng.uniform(0, H / 2, n)
        pix.append(np.stack([x1, y1, x1 + rng.uniform(1, W / 2, n), y1 + rng.uniform(1, H / 2, n)], 1))
    norm = [p / np.array([W, H, W, H]) for p in pix]
    feat, loc, mask = prepare_regions(feats, norm, max_regions=4)
    assert feat.shape == (2, 5, 6) and loc.shape == (2, 5, 5) and mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    for i, n in enumerate((4, 2)):
        f, p = feats[i][:n], pix[i][:n]
        np.testing.assert_allclose(feat[i, 0].numpy(), f.sum(0) / n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(feat[i, 1 : 1 + n].numpy(), f)
        np.testing.assert_allclose(loc[i, 0].numpy(), [0, 0, 1, 1, 1])
        area = (p[:, 3] - p[:, 1]) * (p[:, 2] - p[:, 0]) / (W * H)
        want = np.concatenate([p / np.array([W, H, W, H]), area[:, None]], 1)
        np.testing.assert_allclose(loc[i, 1 : 1 + n].numpy(), want, rtol=1e-5, atol=1e-6)
    assert float(feat[1, 3:].abs().sum()) == 0.0


def test_prepare_regions_rejects_bad_input() -> None:
    with pytest.raises(NeuroprobeError, match="normalised"):
        prepare_regions(torch.randn(2, 6), torch.tensor([[10.0, 10.0, 200.0, 300.0]] * 2))
    with pytest.raises(NeuroprobeError, match="no regions"):
        prepare_regions([torch.zeros(0, 6)], [torch.zeros(0, 4)])


# -------------------------------------------------------------------------- loading
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_saved_tiny_weights_load_back_exactly(tmp_path: Path, checkpoint: str) -> None:
    model = load_vilbert(init="random", config=ViLBERTConfig.tiny(), checkpoint=checkpoint, seed=1)
    path = save_vilbert(model, tmp_path)
    assert path.name == checkpoint
    loaded = load_vilbert(tmp_path, checkpoint=checkpoint)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_load_strips_module_prefix_and_unwraps_training_checkpoints(tmp_path: Path) -> None:
    model = load_vilbert(init="random", config=ViLBERTConfig.tiny(), seed=2)
    save_vilbert(model, tmp_path)  # writes config.json
    wrapped = {"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "multi_task_model.bin")
    loaded = load_vilbert(tmp_path / "multi_task_model.bin")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_kind_comes_from_the_file(tmp_path: Path) -> None:
    pre = load_vilbert(init="random", config=ViLBERTConfig.tiny(), checkpoint="pretrained_model.bin")
    path = save_vilbert(pre, tmp_path)
    loaded = load_vilbert(path)  # default checkpoint name says multi-task; the keys say pretraining
    assert not loaded.config.task_heads and not hasattr(loaded, "vil_prediction")


def test_mismatched_architecture_is_one_clear_error(tmp_path: Path) -> None:
    model = load_vilbert(init="random", config=ViLBERTConfig.tiny())
    torch.save(model.state_dict(), tmp_path / "multi_task_model.bin")  # no config.json: base config assumed
    with pytest.raises(NeuroprobeError, match="does not match the ViLBERT architecture"):
        load_vilbert(tmp_path)


def test_missing_weights_say_where_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingWeightsError, match=r"dl\.fbaipublicfiles\.com/vilbert-multi-task/multi_task_model\.bin.*--weights DIR"):
        load_vilbert(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="pretrained_model.bin"):
        load_vilbert(None, checkpoint="pretrained_model.bin", download=False)
    monkeypatch.setenv("NEUROPROBE_OFFLINE", "1")
    with pytest.raises(MissingWeightsError):
        load_vilbert(None)


def test_random_init_is_seeded() -> None:
    cfg = ViLBERTConfig.tiny()
    a = load_vilbert(init="random", config=cfg, seed=0).state_dict()
    b = load_vilbert(init="random", config=cfg, seed=0).state_dict()
    c = load_vilbert(init="random", config=cfg, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bert.encoder.c_layer.0.biattention.query1.weight"],
                           c["bert.encoder.c_layer.0.biattention.query1.weight"])


# -------------------------------------------------------------------------- subject
WORDS = ["a", "photo", "of", "the", "cat", "dog", "bird", "my", "is", "here", "what", "this", "?", "black", "small"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    """A tiny saved ViLBERT, a tiny WordPiece tokenizer, a battery with images and a fake region source."""
    from PIL import Image
    from transformers import BertTokenizerFast

    from neuroprobe.stimuli.battery import Battery

    root = tmp_path_factory.mktemp("vilbert")
    weights = root / "weights"
    save_vilbert(load_vilbert(init="random", config=ViLBERTConfig.tiny(), seed=5), weights)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok_dir = root / "tokenizer"
    BertTokenizerFast(str(vocab), do_lower_case=True).save_pretrained(tok_dir)
    bat = root / "battery"
    (bat / "img").mkdir(parents=True)
    rows = []
    for k, concept in enumerate(["cat", "dog", "bird"]):
        for j in range(2):
            name = f"img/{concept}{j}.png"
            Image.new("RGB", (8, 6), (40 * k, 20 * j, 90)).save(bat / name)
            rows.append(dict(id=f"{concept}-img{j}", concept=concept, modality="image", form="photo",
                             split=["screening", "testing"][j], text="", image=name))
        rows.append(dict(id=f"{concept}-txt", concept=concept, modality="text", form="text-name", split="screening",
                         text=f"a photo of my {concept} here", image=""))
        rows.append(dict(id=f"{concept}-pair", concept=concept, modality="pair", form="photo+caption",
                         split="testing", text=f"the small black {concept}", image=f"img/{concept}0.png"))
    concepts = {c: {"prompt": f"a photo of the {c}", "names": [c]} for c in ["cat", "dog", "bird"]}
    battery = Battery.from_table(pd.DataFrame(rows), concepts, name="tiny", root=bat)
    calls: list[str] = []

    def regions(battery, image: str):
        calls.append(image)
        g = torch.Generator().manual_seed(sum(map(ord, image)))
        n = 2 + len(image) % 3
        xy = torch.rand(n, 2, generator=g) * 0.5
        return torch.randn(n, ViLBERTConfig.tiny().v_feature_size, generator=g), torch.cat([xy, xy + 0.4], 1)

    return dict(weights=weights, tokenizer=tok_dir, battery=battery, regions=regions, calls=calls)


def _subject(setup, **kw):
    from neuroprobe.subjects.registry import load_subject

    return load_subject("vilbert", weights=setup["weights"], device="cpu", tokenizer=setup["tokenizer"],
                        regions=setup["regions"], **kw)


def test_site_patterns_cover_every_layer_once() -> None:
    from neuroprobe.subjects.vilbert.subject import vilbert_site_patterns
    from neuroprobe.subjects.base import Subject

    cfg = ViLBERTConfig.base()
    with torch.device("meta"):
        model = ViLBERTModel(cfg)
    subject = Subject("vilbert", model)
    subject.site_patterns = vilbert_site_patterns(cfg)
    for montage in ("mlp", "resid", "attn"):
        sites = subject.sites(montage)
        assert len(sites) == 12 + 6 + 2 * 6, montage
        assert sum(s.stream == "text" for s in sites) == 12 + 6
        assert len({s.module for s in sites}) == len(sites)
    mlp = {s.name: s for s in subject.sites("mlp")}
    assert mlp["text.3.mlp"].module == "bert.encoder.layer.3.output.dense" and mlp["text.3.mlp"].direction == "input"
    assert mlp["co.5.image_mlp"].module == "bert.encoder.c_layer.5.v_output.dense"
    attn = {s.name: s for s in subject.sites("attn")}
    assert attn["co.0.text_xattn"].module == "bert.encoder.c_layer.0.biOutput.dense2" and attn["co.0.text_xattn"].n_heads == 8
    assert attn["text.0.attn"].n_heads == 12 and attn["image.0.attn"].n_heads == 8


def test_subject_records_every_site_with_matching_masks(tiny_setup) -> None:
    from neuroprobe.electrodes import Electrodes

    subject = _subject(tiny_setup)
    battery = tiny_setup["battery"]
    batch = subject.encode(battery.table, battery)
    n = len(battery.table)
    text_len = batch.inputs["input_ids"].shape[1]
    assert batch.masks["text"].shape == (n, text_len + 1)  # task token
    assert (batch.token_ids["text"][:, 1] == -1).all()
    is_text = torch.as_tensor((battery.table["modality"] == "text").to_numpy(copy=True))
    assert batch.masks["image"][is_text].sum(1).tolist() == [1] * int(is_text.sum())  # global region only
    cm = batch.concept_masks["text"]
    assert cm[torch.as_tensor((battery.table["modality"] == "image").to_numpy(copy=True))].sum() == 0
    assert (cm[is_text].sum(1) == 1).all()
    sites = subject.sites("all")
    shapes: dict[str, tuple] = {}

    def on_read(site, x):
        assert x.shape[:2] == batch.masks[site.stream].shape, site.name
        shapes[site.name] = tuple(x.shape)

    with torch.inference_mode(), Electrodes(subject.model, sites, on_read=on_read):
        subject.forward(batch)
    cfg = subject.config
    assert len(shapes) == len(sites) == 3 * (4 + 3 + 2 * 3)
    assert shapes["text.0.mlp"][-1] == shapes["co.2.text_mlp"][-1] == cfg.intermediate_size
    assert shapes["image.1.mlp"][-1] == cfg.v_intermediate_size
    assert shapes["co.1.image_xattn"][-1] == shapes["co.1.text_xattn"][-1] == cfg.bi_hidden_size
    assert shapes["co.0.image"][-1] == cfg.v_hidden_size and shapes["co.0.text"][-1] == cfg.hidden_size


def test_alignment_readout_matches_direct_computation(tiny_setup) -> None:
    subject = _subject(tiny_setup)
    battery = tiny_setup["battery"]
    stimuli = battery.table.iloc[[0, 2, 3]]  # cat image, cat text, cat pair
    scores = subject.readout(stimuli, battery, "alignment")
    assert scores.shape == (3,) and np.isfinite(scores).all() and (scores < 0).all()
    prompts = [battery.concepts[c]["prompt"] for c in battery.concept_names]
    regions = tiny_setup["regions"]

    def match(text: str, image: str) -> float:
        f, b = regions(battery, image)
        feat, loc, mask = prepare_regions(f, b)
        enc = subject.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            out = subject.model(enc["input_ids"], feat, loc, attention_mask=enc["attention_mask"],
                                image_attention_mask=mask, task_ids=torch.tensor([7]), heads=["retrieval"])
        return float(out.logits["retrieval"][0])

    img = [match(p, "img/cat0.png") for p in prompts]
    txt = [match("a photo of my cat here", f"img/{c}0.png") for c in battery.concept_names]
    want = [torch.tensor(v).double().log_softmax(0)[0].item() for v in (img, txt, img)]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)


def test_vqa_readout_matches_direct_computation(tiny_setup) -> None:
    answers = ["yes", "no", "dog", "cat", "bird", "red", "2", "white", "black", "man", "tree"]
    subject = _subject(tiny_setup, answers=None)
    assert "vqa" in subject.readouts
    with pytest.raises(NeuroprobeError, match="answer list"):
        subject.readout(tiny_setup["battery"].table.iloc[[0]], tiny_setup["battery"], "vqa")
    subject.answers = answers
    battery = tiny_setup["battery"]
    stimuli = battery.table[battery.table["modality"] == "image"]
    scores = subject.readout(stimuli, battery, "vqa")
    f, b = zip(*(tiny_setup["regions"](battery, p) for p in stimuli["image"]))
    feat, loc, mask = prepare_regions(list(f), list(b))
    enc = subject.tokenizer(["what is this?"] * len(stimuli), return_tensors="pt")
    with torch.no_grad():
        out = subject.model(enc["input_ids"], feat, loc, image_attention_mask=mask,
                            task_ids=torch.ones(len(stimuli), dtype=torch.long), heads=["vqa"])
    logp = out.vqa.double().log_softmax(-1)
    want = [logp[i, answers.index(c)].item() for i, c in enumerate(stimuli["concept"])]
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(NeuroprobeError, match="image and pair"):
        subject.readout(battery.table[battery.table["modality"] == "text"], battery, "vqa")


def test_pretrained_flavour_subject_and_random_control(tiny_setup, tmp_path: Path) -> None:
    save_vilbert(load_vilbert(init="random", config=ViLBERTConfig.tiny(), checkpoint="pretrained_model.bin"), tmp_path)
    setup = dict(tiny_setup, weights=tmp_path)
    subject = _subject(setup, checkpoint="pretrained_model.bin")
    assert set(subject.readouts) == {"alignment"}
    battery = setup["battery"]
    batch = subject.encode(battery.table.iloc[:4], battery)
    assert batch.masks["text"].shape == batch.inputs["input_ids"].shape  # no task token
    scores = subject.readout(battery.table.iloc[:4], battery, "alignment")
    assert np.isfinite(scores).all()
    control = _subject(setup, init="random", checkpoint="pretrained_model.bin", config=ViLBERTConfig.tiny(), seed=9)
    assert control.init == "random"
    assert not torch.equal(control.model.bert.encoder.layer[0].output.dense.weight,
                           subject.model.bert.encoder.layer[0].output.dense.weight)


def test_subject_without_tokenizer_is_missing_weights(tiny_setup, tmp_path: Path) -> None:
    from neuroprobe.subjects.vilbert.subject import load_tokenizer

    with pytest.raises(MissingWeightsError, match="tokenizer"):
        load_tokenizer(tmp_path)
