"""Batched lesions of the region-based vision-language subjects: LXMERT, VisualBERT and ViLBERT.

Issue 23 item 1.  Every readout (``matching``, ``vqa``, ``masked_lm``; ViLBERT's
``alignment``, ``vqa``) is replica-safe: many lesions scored in one call of the readout on
stimuli tiled once per lesion (:func:`neuroprobe.lesions.replicas.replica_scores`) equal each
lesion on its own through :func:`~neuroprobe.lesions.lesion.lesion`
(:func:`~neuroprobe.lesions.replicas.single_scores`), and each pass of a tiled call is the
tiled pass of the plain call (what a prefix cache replays).  Block orders are data and name
the layers a forward pass runs, once each, in order.

Tiny random-init models of the real classes (transformers' LXMERT and VisualBERT in tiny
configs, neuroprobe's ViLBERT), weights drawn large (std 0.5) so that lesions move the
scores; regions come from an HDF5 features file, and for one test from a tiny Faster R-CNN.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import load_subject
from neuroprobe.electrodes import Electrodes, capture_calls
from neuroprobe.lesions import replicas
from neuroprobe.lesions.staged import resolve_blocks
from neuroprobe.stimuli import Battery
from neuroprobe.subjects.hf import block_lists
from neuroprobe.subjects.region_features import write_features_h5
from neuroprobe.testing import VISUAL_FEAT_DIM, make_tiny

#: five concepts: the matching readouts make two passes (CONCEPTS_PER_PASS = 4, then 1)
CONCEPTS = ["sun", "cat", "house", "tree", "boat"]
MODES = ("zero", "mean", "scale")
#: the existing standard for replicas against single lesions, relative to the readout's scale
TOL = 1e-5

#: sites per subject: first and last block of every stream / chain, both calls of LXMERT's shared
#: cross-attention, and MLP, attention and residual sites
SITES = {
    "lxmert": ["lang.0.mlp", "lang.1", "visn.0.attn", "visn.1.mlp", "cross.0.xattn#0", "cross.0.xattn#1",
               "cross.1.lang_mlp", "cross.1.visn"],
    "visualbert": ["encoder.layer.0.mlp", "encoder.layer.0.attn", "encoder.layer.1", "encoder.layer.1.mlp"],
    "vilbert": ["text.0.mlp", "image.0.attn", "co.0.text_xattn", "co.0.image", "image.2.mlp", "co.2.image_xattn",
                "text.3", "text.3.mlp"],
}
READOUTS = {"lxmert": ("matching", "vqa", "masked_lm"), "visualbert": ("matching", "masked_lm"),
            "vilbert": ("alignment", "vqa")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def battery() -> Battery:
    """One stimulus per (concept, form) of five pictures concepts: images, texts and pairs."""
    pictures = Battery.load("pictures")
    t = pictures.table
    rows = t[t["concept"].isin(CONCEPTS)].groupby(["concept", "form"], sort=False).head(1).reset_index(drop=True)
    b = Battery.from_table(rows, concepts={c: pictures.concepts[c] for c in CONCEPTS}, name="pictures-five",
                           root=pictures.root)
    b.meta["vqa_question"] = pictures.meta["vqa_question"]
    return b


@pytest.fixture(scope="module")
def features(battery: Battery, tmp_path_factory) -> Path:
    """Random region features of the battery's images (HDF5); image sizes differ, so regions pad."""
    images = sorted(set(battery.table["image"]) - {""})
    rng = np.random.default_rng(0)
    n = len(images)
    feats = rng.standard_normal((n, 36, VISUAL_FEAT_DIM)).astype(np.float32)
    xy = rng.uniform(0, 0.5, (n, 36, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (n, 36, 2))], -1).astype(np.float32)
    num = rng.integers(3, 37, n)
    path = tmp_path_factory.mktemp("regions-features") / "regions.h5"
    write_features_h5(path, [Path(i).stem for i in images], feats, boxes, num_regions=num)
    return path


def _large_weights(arch: str, folder: Path, **config) -> Path:
    import transformers as tf

    cls = {"lxmert": tf.LxmertForPreTraining, "visualbert": tf.VisualBertForPreTraining}[arch]
    cfg = tf.AutoConfig.from_pretrained(folder)
    cfg.initializer_range = 0.5
    for k, v in config.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        cls(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regions-models")
    out = {arch: make_tiny(arch, root / arch) for arch in ("lxmert", "visualbert")}
    _large_weights("lxmert", out["lxmert"], num_qa_labels=9500)  # the pre-training answers: concept names are answers
    _large_weights("visualbert", out["visualbert"])
    return out


@pytest.fixture(scope="module")
def subjects(folders, features, tmp_path_factory) -> dict:
    from neuroprobe.subjects.vilbert import ViLBERTConfig, load_vilbert, save_vilbert

    out = {arch: load_subject(arch, weights=folders[arch], device="cpu", quiet=True, heads=True, features=features)
           for arch in ("lxmert", "visualbert")}
    tok = out["lxmert"].tokenizer  # the tiny WordPiece vocabulary (ViLBERT reads the same kind)
    answers = ["yes", "no"] + CONCEPTS + ["red", "two", "dog"]
    cfg = dataclasses.replace(ViLBERTConfig.tiny(), vocab_size=len(tok), v_feature_size=VISUAL_FEAT_DIM,
                              max_position_embeddings=64, vqa_labels=len(answers), initializer_range=0.5)
    weights = tmp_path_factory.mktemp("regions-vilbert")
    save_vilbert(load_vilbert(init="random", config=cfg, seed=3), weights)
    out["vilbert"] = load_subject("vilbert", weights=weights, device="cpu", tokenizer=folders["lxmert"],
                                  features=features, answers=None)
    out["vilbert"].answers = answers
    return out


def _rows(battery: Battery, subject: str, readout: str) -> pd.DataFrame:
    t = battery.table
    if subject == "vilbert" and readout == "vqa":  # ViLBERT's vqa refuses text stimuli
        t = t[t["modality"] != "text"]
    return t.reset_index(drop=True)


def _units(subject, battery: Battery, names: list[str] | None = None) -> dict[str, int]:
    """Units of every site (default: :data:`SITES`), read from one intact pass."""
    sites = subject.sites(names or SITES[subject.name])
    with torch.inference_mode(), Electrodes(subject.model, sites) as el:
        subject.forward(subject.encode(battery.table.iloc[[0, 3, 4]], battery))
    return {s.name: int(el.data[s.name].shape[-1]) for s in sites}


def _single(subject, battery: Battery, rows: pd.DataFrame, lesions, mode: str, **kw) -> np.ndarray:
    """:func:`replicas.single_scores`; an empty lesion (which ``lesion()`` refuses) is the intact readout."""
    out = np.zeros((len(lesions), len(rows)))
    some = [i for i, les in enumerate(lesions) if les]
    out[some] = replicas.single_scores(subject, battery, rows, [lesions[i] for i in some], mode, **kw)
    with torch.inference_mode():
        intact = np.asarray(subject.readouts[kw["readout"]](subject, rows.reset_index(drop=True), battery), dtype=np.float64)
    out[[i for i, les in enumerate(lesions) if not les]] = intact
    return out


def _lesions(units: dict[str, int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """An empty lesion, each site alone, and two multi-site lesions (first with last block)."""
    rng = np.random.default_rng(seed)

    def pick(site: str) -> np.ndarray:
        return np.sort(rng.choice(units[site], size=max(1, units[site] // 3), replace=False))

    names = list(units)
    out: list[dict[str, np.ndarray]] = [{}]
    out += [{s: pick(s)} for s in names]
    out.append({names[0]: pick(names[0]), names[-1]: pick(names[-1])})
    out.append({s: pick(s) for s in names[1::2]})
    return out


# ------------------------------------------------------------------------ the readouts


@pytest.mark.parametrize("name", ["lxmert", "visualbert", "vilbert"])
def test_every_readout_is_replica_safe(subjects, name):
    subject = subjects[name]
    assert set(subject.readouts) == set(READOUTS[name])
    for readout in subject.readouts:
        assert replicas.is_replica_safe(subject, readout), readout


CASES = [(name, readout, mode) for name, readouts in READOUTS.items() for readout in readouts for mode in MODES]


@pytest.mark.parametrize("name,readout,mode", CASES)
def test_replica_scores_equal_single_scores(subjects, battery, name, readout, mode):
    subject = subjects[name]
    rows = _rows(battery, name, readout)
    units = _units(subject, battery)
    lesions = _lesions(units, seed=len(readout) + MODES.index(mode))
    rng = np.random.default_rng(7)
    kw = dict(readout=readout)
    if mode == "mean":
        kw["reference"] = {s: rng.standard_normal((5, n)) for s, n in units.items()}
    if mode == "scale":
        kw["factor"] = 3.0
    single = _single(subject, battery, rows, lesions, mode, **kw)
    batched = replicas.replica_scores(subject, battery, rows, lesions, mode, **kw)
    assert batched.shape == single.shape == (len(lesions), len(rows))
    assert np.array_equal(np.isnan(batched), np.isnan(single))
    finite = np.isfinite(single)
    assert finite.any()
    scale = np.abs(single[finite]).max()
    err = np.abs(batched - single)[finite].max()
    assert err <= TOL * scale, (err, scale)
    # the lesions move the scores (the comparison is not vacuous)
    assert np.nanmax(np.abs(single[1:] - single[0])) > 1e-3 * scale


@pytest.mark.parametrize("name,readout", [(n, r) for n, rs in READOUTS.items() for r in rs])
def test_a_tiled_call_makes_the_tiled_passes(subjects, battery, name, readout):
    """Each pass of a call on stimuli tiled L times is the plain call's pass with its rows tiled, replica-major
    (the passes do not depend on how many stimuli there are: what a prefix cache replays call by call)."""
    subject = subjects[name]
    assert replicas.is_replica_safe(subject, readout)
    rows = _rows(battery, name, readout)
    fn = subject.readouts[readout]
    first = [names[0] for _, names in block_lists(subject.model)]  # the first layer of every stack
    assert len(first) == {"lxmert": 3, "visualbert": 1, "vilbert": 3}[name]
    L = 3
    with torch.inference_mode():
        plain = capture_calls(subject.model, first, lambda: fn(subject, rows, battery))
        tiled = capture_calls(subject.model, first, lambda: fn(subject, replicas.tile(rows, L), battery))
    for block in first:
        assert len(tiled[block]) == len(plain[block]) >= 1, block
        for (a, _), (b, _) in zip(plain[block], tiled[block]):
            x, y = a[0], b[0]
            assert y.shape == (L * x.shape[0],) + x.shape[1:], block
            torch.testing.assert_close(y, x.repeat(L, *[1] * (x.dim() - 1)), rtol=1e-5, atol=1e-6)
    if readout in ("matching", "alignment"):  # one pass per block of concepts, whatever the number of stimuli
        from neuroprobe.subjects.vision_language import CONCEPTS_PER_PASS

        assert len(plain[first[0]]) == -(-len(CONCEPTS) // CONCEPTS_PER_PASS) == 2


# ------------------------------------------------------------------------- block order


EXPECTED_CHAINS = {
    "lxmert": {"language": ["encoder.layer.0", "encoder.layer.1"], "vision": ["encoder.r_layers.0", "encoder.r_layers.1"],
               "cross": ["encoder.x_layers.0", "encoder.x_layers.1"]},
    "visualbert": {"joint": ["encoder.layer.0", "encoder.layer.1"]},
}


@pytest.mark.parametrize("name", ["lxmert", "visualbert", "vilbert"])
def test_block_order_names_every_block_once_in_forward_order(subjects, battery, name):
    subject = subjects[name]
    blocks = resolve_blocks(subject)
    if name == "vilbert":  # one chain in run order: the streams exchange state at every co-attention layer
        kind = {"text": "layer", "image": "v_layer", "co": "c_layer"}
        assert blocks == {"encoder": [f"bert.encoder.{kind[s]}.{i}" for s, i in subject.config.run_order()]}
        assert blocks["encoder"][:4] == ["bert.encoder.layer.0", "bert.encoder.c_layer.0", "bert.encoder.layer.1",
                                         "bert.encoder.v_layer.0"]
    else:
        assert blocks == EXPECTED_CHAINS[name]
    assert getattr(subject, "block_inputs", {}) == ({"cross": ("language", "vision")} if name == "lxmert" else {})
    declared = [b for chain in blocks.values() for b in chain]
    # every repeated block of the network is declared, and nothing else
    assert sorted(declared) == sorted(b for _, names in block_lists(subject.model) for b in names)
    # one forward pass (text, image and pair stimuli) runs each block once, chains one after the other in order;
    # called again on the arguments it got, a block returns what it returned (its output depends on them only)
    calls: list[tuple[str, tuple, dict, object]] = []
    handles = [subject.model.get_submodule(b).register_forward_hook(
        lambda mod, args, kwargs, out, _b=b: calls.append((_b, args, kwargs, out)), with_kwargs=True) for b in declared]
    try:
        with torch.inference_mode():
            subject.forward(subject.encode(battery.table.iloc[[0, 3, 4, 6]], battery))
    finally:
        for h in handles:
            h.remove()
    assert [c[0] for c in calls] == declared
    with torch.inference_mode():
        for block, args, kwargs, out in calls:
            again = subject.model.get_submodule(block)(*args, **kwargs)
            first_out = out[0] if isinstance(out, tuple) else out
            first_again = again[0] if isinstance(again, tuple) else again
            assert torch.equal(first_out, first_again), block
            if name == "lxmert" and block.startswith("encoder.x_layers"):  # both streams come out of a cross layer
                assert torch.equal(out[1], again[1]), block


def test_block_order_maps_sites_to_their_chain(subjects):
    from neuroprobe.lesions.staged import stage_of

    lx = subjects["lxmert"]
    blocks = resolve_blocks(lx)
    by_name = {s.name: s for s in lx.sites("all")}
    assert stage_of(blocks, by_name["lang.1.mlp"]) == ("language", 1)
    assert stage_of(blocks, by_name["visn.0.attn"]) == ("vision", 0)
    assert stage_of(blocks, by_name["cross.0.xattn#1"]) == ("cross", 0)
    assert stage_of(blocks, by_name["cross.1.visn"]) == ("cross", 1)
    vil = subjects["vilbert"]
    blocks = resolve_blocks(vil)
    by_name = {s.name: s for s in vil.sites("all")}
    order = blocks["encoder"]
    assert stage_of(blocks, by_name["co.1.image_mlp"]) == ("encoder", order.index("bert.encoder.c_layer.1"))
    assert stage_of(blocks, by_name["image.0.attn"]) == ("encoder", order.index("bert.encoder.v_layer.0"))


# ---------------------------------------------------------------------- the detector


def test_detector_regions_tiled_once_per_image(folders, battery, tmp_path, monkeypatch):
    """With regions from the (tiny) Faster R-CNN, many lesions in one call run the detector once per distinct
    image, not once per copy, and equal single lesions (the detector is preprocessing: never lesioned)."""
    import shutil

    import transformers as tf

    from neuroprobe.subjects import frcnn

    det_dir = frcnn.save_detector(frcnn.load_detector(init="random", config=frcnn.FrcnnConfig.tiny(), seed=0),
                                  tmp_path / "frcnn")
    lx_dir = tmp_path / "lxmert"
    shutil.copytree(folders["lxmert"], lx_dir)
    dim = frcnn.load_detector(det_dir).config.roi_feature_size
    _large_weights("lxmert", lx_dir, visual_feat_dim=dim)
    assert tf.AutoConfig.from_pretrained(lx_dir).visual_feat_dim == dim
    detected: list[int] = []
    real = frcnn.extract_regions

    def counting(detector, images, **kw):
        detected.append(len(images))
        return real(detector, images, **kw)

    monkeypatch.setattr(frcnn, "extract_regions", counting)
    subject = load_subject("lxmert", weights=lx_dir, device="cpu", quiet=True, heads=True, detector_weights=det_dir)
    t = battery.table
    rows = t[t["concept"].isin(CONCEPTS[:2])].reset_index(drop=True)
    units = _units(subject, battery)
    lesions = _lesions(units)[:4]
    batched = replicas.replica_scores(subject, battery, rows, lesions, "zero", readout="matching")
    images = set(rows.loc[rows["modality"] != "text", "image"]) | set(subject.reference_images(battery).values())
    images |= set(t["image"].iloc[[0, 3, 4]]) - {""}  # the pass that counted units
    assert sum(detected) == len(images)
    single = _single(subject, battery, rows, lesions, "zero", readout="matching")
    assert sum(detected) == len(images)  # cached: single lesions do not detect again
    scale = np.nanmax(np.abs(single))
    assert np.nanmax(np.abs(batched - single)) <= TOL * scale


# ------------------------------------------------------- the declared order, replayed


def _tile_output(x, n: int):
    if isinstance(x, torch.Tensor):
        return x.repeat(n, *[1] * (x.dim() - 1))
    if isinstance(x, tuple):
        return tuple(_tile_output(v, n) for v in x)
    return x


def _replayed_scores(subject, battery: Battery, rows: pd.DataFrame, lesions, readout: str,
                     block_inputs: dict[str, tuple[str, ...]]) -> np.ndarray:
    """Replica scores with the prefix cache of the design (LESION23.md) written out on the declared data.

    The intact call records every declared block's output per call; in the tiled call, the blocks
    of a chain before its earliest lesioned block, and every block of a chain no lesion reaches
    and which reads no lesioned chain (``block_inputs``, transitively), return their recorded
    outputs tiled instead of computing.
    """
    from neuroprobe.lesions.staged import stage_of

    blocks = resolve_blocks(subject)
    fn = subject.readouts[readout]
    recorded: dict[str, list] = {b: [] for names in blocks.values() for b in names}
    handles = [subject.model.get_submodule(b).register_forward_hook(
        lambda mod, args, out, _b=b: recorded[_b].append(out)) for b in recorded]
    try:
        with torch.inference_mode():
            fn(subject, rows.reset_index(drop=True), battery)
    finally:
        for h in handles:
            h.remove()
    sites = {s.name: s for s in subject.sites("all")}
    cut: dict[str, int | None] = {c: None for c in blocks}
    for les in lesions:
        for name in les:
            chain, i = stage_of(blocks, sites[name])
            cut[chain] = i if cut[chain] is None else min(cut[chain], i)
    changed = True
    while changed:  # a chain that reads a changed chain runs from its start
        changed = False
        for chain, deps in block_inputs.items():
            if cut[chain] != 0 and any(cut[d] is not None for d in deps):
                cut[chain], changed = 0, True
    replay = [b for c, names in blocks.items() for b in (names if cut[c] is None else names[: cut[c]])]
    modules = {b: subject.model.get_submodule(b) for b in replay}
    for b, module in modules.items():
        calls = iter(recorded[b])
        module.forward = lambda *a, _calls=calls, **k: _tile_output(next(_calls), len(lesions))
    try:
        return replicas.replica_scores(subject, battery, rows, lesions, "zero", readout=readout)
    finally:
        for module in modules.values():
            del module.forward


#: lesion groups by where they start: (subject, readout, sites of the group, blocks the cache replays)
REPLAY = [
    ("lxmert", "matching", ["cross.1.lang_mlp", "cross.0.xattn#1"], 4),  # both streams whole, cross layer 0
    ("lxmert", "masked_lm", ["cross.0.visn"], 4),  # (the last cross layer's region output reaches no readout)
    ("lxmert", "matching", ["visn.1.mlp"], 3),  # language whole, vision layer 0; cross runs (it reads vision)
    ("lxmert", "vqa", ["lang.1", "lang.1.attn"], 3),  # vision whole, language layer 0
    ("visualbert", "matching", ["encoder.layer.1.mlp"], 1),
    ("vilbert", "alignment", ["co.1.text_mlp", "image.1.attn"], 4),  # text 0, co 0, text 1, image 0
    ("vilbert", "vqa", ["text.3.mlp"], 9),  # the last block: everything before it replays
]


@pytest.mark.parametrize("name,readout,group,n_replayed", REPLAY)
def test_the_declared_blocks_replay_to_the_single_scores(subjects, battery, name, readout, group, n_replayed):
    """What a prefix cache built on ``block_order``/``block_inputs`` computes equals single lesions: the declared
    blocks run once per pass, their outputs depend on their inputs only, and the chains read what they declare."""
    subject = subjects[name]
    rows = _rows(battery, name, readout)
    units = _units(subject, battery, group)
    rng = np.random.default_rng(3)
    lesions = [{}] + [{s: np.sort(rng.choice(units[s], units[s] // 2, replace=False))} for s in group]
    lesions.append({s: np.arange(0, units[s], 3) for s in group})
    single = _single(subject, battery, rows, lesions, "zero", readout=readout)
    declared = getattr(subject, "block_inputs", {})
    blocks = resolve_blocks(subject)
    sites = {s.name: s for s in subject.sites("all")}
    from neuroprobe.lesions.staged import stage_of

    first = {}
    for s in group:
        chain, i = stage_of(blocks, sites[s])
        first[chain] = min(first.get(chain, i), i)
    reads = {c for c, deps in declared.items() if set(deps) & set(first)}
    assert n_replayed == sum(len(names) if c not in first and c not in reads else first.get(c, 0)
                             for c, names in blocks.items())
    replayed = _replayed_scores(subject, battery, rows, lesions, readout, declared)
    finite = np.isfinite(single)
    scale = np.abs(single[finite]).max()
    assert np.array_equal(np.isnan(replayed), np.isnan(single))
    assert np.abs(replayed - single)[finite].max() <= TOL * scale
    assert np.nanmax(np.abs(single[1:] - single[0])) > 1e-3 * scale
    if declared:  # without block_inputs, the cross layers would replay intact outputs: wrong when a stream is lesioned
        wrong = _replayed_scores(subject, battery, rows, lesions, readout, {})
        lesioned_stream = set(first) - {"cross"}
        assert (np.nanmax(np.abs(wrong - single)) > 1e-3 * scale) == bool(lesioned_stream)
