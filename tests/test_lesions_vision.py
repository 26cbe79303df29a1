"""Many lesions in one call of a vision subject's readout equal each lesion on its own (issue 23).

For CLIP (ViT and ResNet), DALL·E, the organism and the cross-modal organism:
``replicas.replica_scores`` (stimuli tiled once per lesion, each replica lesioned on its
own rows) equals ``replicas.single_scores`` (each lesion alone through ``lesion()``) in
modes zero, mean and scale, for an empty lesion and lesions at the first and the last
block of the image and the text side; and each subject's declared blocks
(``block_order``) are found in forward order, hold every site, and ``block_inputs``
names chains that run before the chains reading them.
"""
from __future__ import annotations

import json
import types
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import Battery, load_subject
from neuroprobe.errors import NeuroprobeError
from neuroprobe.lesions import replicas
from neuroprobe.lesions.staged import resolve_blocks, stage_of
from neuroprobe.subjects.base import _compile_glob
from neuroprobe.subjects.copies import shared_state, stimulus_copies
from neuroprobe.subjects.widths import measured_units

MODES = ("zero", "mean", "scale")
PICTURE_CONCEPTS = ["sun", "cat", "house"]


# ------------------------------------------------------------------------ helpers


def lesion_set(widths: dict[str, int], first: list[str], last: list[str], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """An empty lesion, one lesion per site in ``first + last``, and one spanning a first and a last site."""
    rng = np.random.default_rng(seed)

    def units(site: str) -> np.ndarray:
        n = widths[site]
        return np.sort(rng.choice(n, size=max(1, n // 3), replace=False))

    out: list[dict[str, np.ndarray]] = [{}]
    out += [{s: units(s)} for s in first + last]
    out.append({first[0]: units(first[0]), last[-1]: units(last[-1])})
    return out


def mean_reference(widths: dict[str, int], seed: int = 1) -> dict[str, np.ndarray]:
    """Per-unit replacement values for ``mean`` mode (site -> ``[n_units]``)."""
    rng = np.random.default_rng(seed)
    return {s: rng.normal(0.0, 1.0, n) for s, n in widths.items()}


def single_scores(subject, battery: Battery, rows: pd.DataFrame, lesions, mode: str, **kw) -> np.ndarray:
    """``replicas.single_scores``, with the intact readout for an empty lesion (which ``lesion()`` refuses)."""
    out = np.zeros((len(lesions), len(rows)))
    real = [i for i, les in enumerate(lesions) if les]
    out[real] = replicas.single_scores(subject, battery, rows, [lesions[i] for i in real], mode, **kw)
    fn = replicas.readout_function(subject, kw.get("readout"))
    with torch.inference_mode():
        intact = np.asarray(fn(subject, rows.reset_index(drop=True), battery), dtype=np.float64)
    for i, les in enumerate(lesions):
        if not les:
            out[i] = intact
    return out


def check_replicas(subject, battery: Battery, rows: pd.DataFrame, lesions, widths, *, readout: str | None = None,
                   modes=MODES, effect: bool = True) -> None:
    """``replica_scores`` equals ``single_scores`` to 1e-5 of the readout's scale in every mode."""
    reference = mean_reference(widths)
    for mode in modes:
        kw: dict[str, Any] = {"readout": readout}
        if mode == "mean":
            kw["reference"] = reference
        if mode == "scale":
            kw["factor"] = 2.5
        single = single_scores(subject, battery, rows, lesions, mode, **kw)
        many = replicas.replica_scores(subject, battery, rows, lesions, mode, **kw)
        assert many.shape == single.shape == (len(lesions), len(rows))
        assert np.isfinite(single).all()
        scale = max(1.0, float(np.abs(single).max()))
        np.testing.assert_allclose(many, single, rtol=0, atol=1e-5 * scale, err_msg=f"mode {mode}")
        if effect:  # the lesions change the scores, so equality tests something
            assert np.abs(single[1:] - single[0]).max(axis=1).min() > 1e-4 * scale, mode


def check_blocks(subject, run: Callable[[], Any], block_order=None, block_inputs=None) -> dict[str, list[str]]:
    """Declared blocks resolve, every glob finds a module, they run in declared order, hold every site,
    and each chain a chain reads runs before it."""
    declared = block_order if block_order is not None else subject.block_order
    inputs = block_inputs if block_inputs is not None else getattr(subject, "block_inputs", {})
    assert declared, "no block order declared"
    view = types.SimpleNamespace(model=subject.model, block_order=declared)
    blocks = resolve_blocks(view)
    assert set(blocks) == set(declared) and all(blocks.values())
    for chain, globs in declared.items():
        for g in globs:
            assert any(_compile_glob(g).match(n) for n in blocks[chain]), (chain, g)
    calls: list[str] = []
    names = [n for chain in blocks.values() for n in chain]
    hooks = [subject.model.get_submodule(n).register_forward_hook(lambda _m, _i, _o, n=n: calls.append(n)) for n in names]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    first = {n: calls.index(n) for n in names if n in calls}
    for chain, chain_names in blocks.items():
        assert all(n in first for n in chain_names), [n for n in chain_names if n not in first]
        order = [first[n] for n in chain_names]
        assert order == sorted(order), (chain, chain_names)
    for chain, deps in inputs.items():
        assert chain in blocks and all(d in blocks for d in deps)
        for d in deps:
            assert first[blocks[d][0]] < first[blocks[chain][0]], (d, chain)
    for site in subject.sites("all"):
        assert stage_of(blocks, site) is not None, site.name
    return blocks


def widths_of(subject, sites: list[str], battery: Battery) -> dict[str, int]:
    chosen = [s for s in subject.sites("all") if s.name in sites]
    assert len(chosen) == len(sites)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        widths = measured_units(subject, chosen, battery)
    assert set(widths) == set(sites)
    return widths


# ----------------------------------------------------------------- stimulus copies


def test_stimulus_copies_counts_whole_repeats():
    t = Battery.load("pictures").table.head(6).reset_index(drop=True)
    assert stimulus_copies(t) == 1 and stimulus_copies(t.head(1)) == 1 and stimulus_copies(t.head(0)) == 1
    assert stimulus_copies(replicas.tile(t, 4)) == 4
    # rows that repeat inside one copy: the smallest whole period, a multiple of the replicas
    twice = pd.concat([t.head(2)] * 2, ignore_index=True)
    assert stimulus_copies(replicas.tile(twice, 3)) == 6
    # not whole copies: a repeat of the head only
    assert stimulus_copies(pd.concat([t, t.head(3)], ignore_index=True)) == 1
    assert stimulus_copies(t.iloc[[0, 1, 0, 2]]) == 1
    # integrated gradients' steps are copies that share the readout's state
    with shared_state():
        assert stimulus_copies(replicas.tile(t, 4)) == 1
    assert stimulus_copies(replicas.tile(t, 4)) == 4


# ----------------------------------------------------------------------- CLIP ViT


@pytest.fixture(scope="module")
def pictures() -> Battery:
    full = Battery.load("pictures")
    t = full.table
    rows = t[t["concept"].isin(PICTURE_CONCEPTS)].groupby(["concept", "form"], sort=False).head(1).reset_index(drop=True)
    return Battery.from_table(rows, concepts={c: full.concepts[c] for c in PICTURE_CONCEPTS}, name="pictures-small",
                              root=full.root)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Tiny CLIP ViT, re-initialised with large weights so readouts differ between concepts."""
    import transformers as tf

    from neuroprobe.testing import make_tiny

    folder = make_tiny("clip", tmp_path_factory.mktemp("clip") / "clip")
    cfg = tf.AutoConfig.from_pretrained(folder)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c.initializer_factor = 20.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tf.CLIPModel(cfg).save_pretrained(folder)
    return load_subject("clip", weights=folder, device="cpu", quiet=True)


def _clip_sets(subject, battery):
    first, last = ["vision.0.mlp", "text.0.mlp"], ["vision.1", "text.1.attn"]
    widths = widths_of(subject, first + last, battery)
    return lesion_set(widths, first, last), widths


@pytest.mark.parametrize("prepared", [False, True], ids=["prompts-lesioned", "prompts-intact"])
def test_clip_vit_replicas_equal_single(clip, pictures, prepared):
    lesions, widths = _clip_sets(clip, pictures)
    rows = pictures.table
    assert set(rows["modality"]) == {"image", "text", "pair"}
    if prepared:
        clip.prepare_readout(pictures)
    try:
        check_replicas(clip, pictures, rows, lesions, widths)
    finally:
        clip._prompt_cache = None


def test_clip_vit_blocks(clip, pictures):
    check_blocks(clip, lambda: clip.readouts["zero_shot"](clip, pictures.table, pictures))


# ---------------------------------------------------------------------- CLIP ResNet


@pytest.fixture(scope="module")
def clip_rn(tmp_path_factory):
    """A tiny clip-rn50 (config and tokenizer in the weights folder), random weights with the last batch norms on."""
    from safetensors.torch import save_file

    from neuroprobe.subjects.clip_resnet.config import CLIPResNetConfig
    from neuroprobe.subjects.clip_resnet.model import CLIPResNet
    from neuroprobe.testing import _tokenizer

    root = tmp_path_factory.mktemp("clip-rn")
    tok = _tokenizer("clip", root)
    tok.save_pretrained(root)
    cfg = CLIPResNetConfig(embed_dim=16, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=4,
                           context_length=32, vocab_size=len(tok), transformer_width=32, transformer_heads=2,
                           transformer_layers=2)
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = CLIPResNet(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn3.weight"):
                p.fill_(1.0)
        model.text_projection.mul_(5.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return load_subject("clip-rn50", weights=root, device="cpu", quiet=True)


@pytest.mark.parametrize("prepared", [False, True], ids=["prompts-lesioned", "prompts-intact"])
def test_clip_resnet_replicas_equal_single(clip_rn, pictures, prepared):
    first, last = ["image.stem", "text.0.mlp"], ["image.attnpool", "text.1"]
    widths = widths_of(clip_rn, first + last + ["image.layer4.0"], pictures)
    lesions = lesion_set(widths, first, last) + [{"image.layer4.0": np.arange(0, widths["image.layer4.0"], 3)}]
    if prepared:
        clip_rn.prepare_readout(pictures)
    try:
        check_replicas(clip_rn, pictures, pictures.table, lesions, widths)
    finally:
        clip_rn._prompt_cache = None


def test_clip_resnet_blocks(clip_rn, pictures):
    check_blocks(clip_rn, lambda: clip_rn.readouts["zero_shot"](clip_rn, pictures.table, pictures))


# --------------------------------------------------------------------------- DALL·E

DALLE_VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "\u0120", "\u0120h", "\u0120he", "ll", "\u0120hell", "\u0120hello"]
DALLE_VOCAB += list("abcdefghijklmnopqrstuvwxyz!")
DALLE_MERGES = ["#version: 0.2", "\u0120 h", "\u0120h e", "l l", "\u0120he ll", "\u0120hell o", ""]


@pytest.fixture(scope="module")
def dalle(tmp_path_factory):
    from neuroprobe.subjects.dalle import DalleBart, DalleConfig
    from neuroprobe.subjects.dalle.bart import init_random

    weights = tmp_path_factory.mktemp("dalle")
    model = init_random(DalleBart(DalleConfig.tiny()), std=0.3, seed=4).eval()
    torch.save(model.encoder.state_dict(), weights / "encoder.pt")
    torch.save(model.decoder.state_dict(), weights / "decoder.pt")
    (weights / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(DALLE_VOCAB)}), encoding="utf8")
    (weights / "merges.txt").write_text("\n".join(DALLE_MERGES), encoding="utf8")
    return load_subject("dalle", weights=weights, variant="tiny", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def dalle_battery(tmp_path_factory) -> Battery:
    """Three concepts, each as an image, a text and a pair (coloured squares)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dalle-battery")
    (root / "img").mkdir()
    colours = {"hello": (250, 10, 10), "ab": (10, 10, 250), "cd": (10, 200, 40)}
    rows = []
    for k, (concept, colour) in enumerate(colours.items()):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{k}.png")
        Image.new("RGB", (40, 40), colour[::-1]).save(root / "img" / f"{k}b.png")
        rows += [
            {"id": f"t{k}", "concept": concept, "modality": "text", "form": "text", "split": "testing",
             "text": f"hello {concept}"},
            {"id": f"i{k}", "concept": concept, "modality": "image", "form": "photo", "split": "testing",
             "image": f"img/{k}.png"},
            {"id": f"p{k}", "concept": concept, "modality": "pair", "form": "photo", "split": "testing",
             "text": concept, "image": f"img/{k}b.png"},
        ]
    concepts = {c: {"prompt": c, "names": [c]} for c in colours}
    return Battery.from_table(pd.DataFrame(rows), concepts, name="dalle-tiny", root=root)


@pytest.mark.parametrize("readout", ["image_token_loglik", "image_token_pmi"])
def test_dalle_replicas_equal_single(dalle, dalle_battery, readout):
    first, last = ["encoder.0.mlp", "decoder.0.mlp"], ["encoder.1", "decoder.1.cross_attn"]
    widths = widths_of(dalle, first + last, dalle_battery)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stand-in codes
        check_replicas(dalle, dalle_battery, dalle_battery.table, lesion_set(widths, first, last), widths,
                       readout=readout)


def test_dalle_blocks(dalle, dalle_battery):
    assert dalle.block_inputs == {"decoder": ("encoder",)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_blocks(dalle, lambda: dalle.readouts["image_token_pmi"](dalle, dalle_battery.table, dalle_battery))


# ------------------------------------------------------------------------- organism


def _digits(name: str, per: int = 1) -> Battery:
    full = Battery.load(name)
    rows = full.table.groupby(["concept", "modality"], sort=False).head(per).reset_index(drop=True)
    return Battery.from_table(rows, concepts=full.concepts, name=name, root=full.root)


@pytest.fixture(scope="module")
def organism():
    return load_subject("organism", device="cpu", quiet=True)


@pytest.mark.parametrize("readout", ["zero_shot", "zero_shot_correct"])
def test_organism_replicas_equal_single(organism, readout):
    battery = _digits("digits")
    first, last = ["image.conv1", "text.embed"], ["image.proj", "text.proj", "joint.embed"]
    widths = widths_of(organism, first + last, battery)
    lesions = lesion_set(widths, first, last)
    check_replicas(organism, battery, battery.table, lesions, widths, readout=readout,
                   effect=readout == "zero_shot")
    # one modality per call (the recorder's batches; LesionStudy(modality=...))
    for modality in ("image", "text"):
        rows = battery.table[battery.table["modality"] == modality]
        check_replicas(organism, battery, rows, lesions, widths, readout=readout, modes=("zero",), effect=False)
    # the towers take no pairs: one clear error, tiled or not
    pairs = _digits("digits-cross")
    with pytest.raises(NeuroprobeError, match="takes image and text stimuli, not pair"):
        replicas.replica_scores(organism, pairs, pairs.table, lesions[:2], readout=readout)


def test_organism_blocks(organism):
    battery = _digits("digits")
    assert organism.block_inputs == {"joint": ("image", "text")}
    check_blocks(organism, lambda: organism.readouts["zero_shot"](organism, battery.table, battery))


# ------------------------------------------------------------------- organism-cross


@pytest.fixture(scope="module")
def cross():
    return load_subject("organism-cross", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def cross_co():
    """A co-attention cross-modal organism (random init): its text and image streams have their own sites."""
    from neuroprobe.subjects.organism.cross import CrossConfig, build_cross
    from neuroprobe.subjects.organism.cross_subject import CrossSubject

    model = build_cross(CrossConfig(fusion="co", layers=2), seed=2).eval()
    return CrossSubject(model, name="organism-cross", device="cpu", init="random")


@pytest.mark.parametrize("readout", ["zero_shot", "zero_shot_correct"])
def test_cross_replicas_equal_single(cross, readout):
    battery = _digits("digits-cross")
    assert set(battery.table["modality"]) == {"image", "text", "pair"}
    first, last = ["image.conv1", "fusion.layers.0.mlp.act"], ["fusion.layers.3", "head.fc", "joint.embed"]
    widths = widths_of(cross, first + last, battery)
    lesions = lesion_set(widths, first, last)
    check_replicas(cross, battery, battery.table, lesions, widths, readout=readout, effect=readout == "zero_shot")
    # the per-modality evaluations of LesionStudy(modality=...)
    for modality in ("image", "text", "pair"):
        rows = battery.table[battery.table["modality"] == modality]
        check_replicas(cross, battery, rows, lesions, widths, readout=readout, modes=("zero",), effect=False)


def test_cross_co_replicas_equal_single(cross_co):
    battery = _digits("digits-cross")
    first, last = ["layers.0.image.mlp.act", "layers.0.text.mlp.act"], ["layers.1.image", "layers.1.text.co.heads"]
    widths = widths_of(cross_co, first + last, battery)
    check_replicas(cross_co, battery, battery.table, lesion_set(widths, first, last), widths)


@pytest.mark.parametrize("design", ["single", "co"])
def test_cross_blocks(cross, cross_co, design):
    from neuroprobe.subjects.organism.cross_subject import CrossSubject, cross_block_order

    subject = cross if design == "single" else cross_co
    battery = _digits("digits-cross")
    assert CrossSubject.block_inputs == {"fusion": ("image", "text")}
    check_blocks(subject, lambda: subject.readouts["zero_shot"](subject, battery.table, battery),
                 block_order=cross_block_order(subject.config), block_inputs=CrossSubject.block_inputs)
