"""ViLBERT and DALL-E recorded end to end from the command line on the offline image battery.

``neuroprobe record --model vilbert|dalle --probe pictures`` runs in a subprocess (offline,
one thread) on tiny models saved in the native formats: ViLBERT as ``config.json`` +
``multi_task_model.bin`` + a WordPiece ``vocab.txt``, its regions from a tiny random
Faster R-CNN (``save_detector``) or a region-feature HDF5 file; DALL-E as min-dalle's
``encoder.pt`` / ``decoder.pt`` / ``vocab.json`` / ``merges.txt`` of the ``tiny`` variant,
its image codes from the pixel stand-in or a ``dalle_codes.json``-style codes file.
Recorded responses are compared with a direct forward pass of the same weights on inputs
built here (regions from ``extract_regions``, tokens from the tokenizer, codes from the file),
not through the subject's own encoding or the electrodes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroprobe import load_subject, open_recording
from neuroprobe.stimuli import Battery

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _cli_all(*runs: tuple[list[str], dict | None]) -> list[subprocess.CompletedProcess]:
    """Several ``neuroprobe`` runs at once (each ``(args, env)``); start-up dominates, so they overlap."""
    procs = []
    for args, env in runs:
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
        procs.append((args, subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", *args], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)))
    out = []
    for args, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return out


def _one_clear_line(res: subprocess.CompletedProcess) -> str:
    """A failed run: non-zero exit, no traceback, the error is the last line of stderr."""
    assert res.returncode != 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("neuroprobe: error: ") and last.endswith("."), last
    return last


def _no_complete_file(path: Path) -> None:
    if path.exists():
        with open_recording(path) as rec:
            assert not rec.complete


@pytest.fixture(scope="module")
def pictures() -> Battery:
    return Battery.load("pictures")


# ============================================================================= ViLBERT


def _wordpiece_vocab(battery: Battery) -> list[str]:
    """A small uncased WordPiece vocabulary: specials, characters, and the battery's words."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    texts = list(battery.table["text"].fillna("")) + [str(c["prompt"]) for c in battery.concepts.values()]
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars if c.isalnum()]
    return list(dict.fromkeys(vocab + sorted(words)))


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    from neuroprobe.subjects.frcnn import FrcnnConfig, load_detector, save_detector

    return save_detector(load_detector(init="random", config=FrcnnConfig.tiny(), seed=0),
                         tmp_path_factory.mktemp("frcnn") / "frcnn")


@pytest.fixture(scope="module")
def vilbert_dir(pictures, tmp_path_factory) -> Path:
    """Tiny 12-in-1 ViLBERT (config.json + multi_task_model.bin) with a vocab.txt; regions as wide as the tiny detector's."""
    from neuroprobe.subjects.frcnn import FrcnnConfig
    from neuroprobe.subjects.vilbert import ViLBERTConfig, load_vilbert, save_vilbert

    folder = tmp_path_factory.mktemp("vilbert") / "weights"
    vocab = _wordpiece_vocab(pictures)
    config = ViLBERTConfig.tiny()
    config.vocab_size = len(vocab)
    config.max_position_embeddings = 48
    config.v_feature_size = FrcnnConfig.tiny().roi_feature_size
    config.initializer_range = 0.2  # responses that differ between stimuli
    save_vilbert(load_vilbert(init="random", config=config, seed=3), folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def region_file(pictures, vilbert_dir, tmp_path_factory) -> Path:
    """Random region features (HDF5, keyed by file stem) of every image of the battery, 3-10 regions each."""
    from neuroprobe.subjects.region_features import write_features_h5

    dim = json.loads((vilbert_dir / "config.json").read_text())["v_feature_size"]
    images = sorted(set(pictures.table["image"]) - {""})
    rng = np.random.default_rng(0)
    n, r = len(images), 10
    xy = rng.uniform(0, 0.5, (n, r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (n, r, 2))], -1)
    path = tmp_path_factory.mktemp("regions") / "pictures_regions.h5"
    write_features_h5(path, [Path(i).stem for i in images], rng.standard_normal((n, r, dim)), boxes,
                      num_regions=rng.integers(3, r + 1, n))
    return path


def _check_vilbert_recording(path: Path, pictures: Battery, weights: Path, init: str) -> None:
    from neuroprobe.subjects.vilbert import ViLBERTConfig

    with open_recording(path) as rec:
        assert rec.complete and rec.attrs["init"] == init and rec.n_done == len(pictures)
        cfg = ViLBERTConfig.from_json(weights / "config.json")
        n_sites = 3 * (cfg.num_hidden_layers + cfg.v_num_hidden_layers + 2 * cfg.n_coattention_layers)
        names = rec.site_names
        assert len(names) == n_sites
        assert {n.split(".")[0] for n in names} == {"text", "image", "co"}
        # both streams run for every stimulus (a text gets the global region, an image the empty text):
        # every text, image and co-attention site fires for every stimulus, and tells stimuli apart
        for name in names:
            x = rec.responses(name)[()]
            assert np.isfinite(x).all(), name
            assert x.std(0).max() > 0, name


def _vilbert_direct(weights: Path, detector: Path, battery: Battery, row) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean final text and image states of one stimulus: tokens from vocab.txt, regions from extract_regions."""
    from transformers import BertTokenizerFast

    from neuroprobe.subjects.frcnn import extract_regions, load_detector
    from neuroprobe.subjects.vilbert import TASK_IDS, load_vilbert, prepare_regions

    model = load_vilbert(weights)
    tok = BertTokenizerFast(str(weights / "vocab.txt"), do_lower_case=True)
    text = str(row["text"]) if row["modality"] in ("text", "pair") else ""
    ids = tok([text], return_tensors="pt")["input_ids"]
    assert tok.unk_token_id not in ids[0].tolist()  # the battery's words are all in vocab.txt
    if row["modality"] in ("image", "pair"):
        regions = extract_regions(load_detector(detector), [battery.load_image(row)], n_regions=100)
        n = int(regions["num_regions"][0])
        feat, loc, mask = prepare_regions(regions["features"][0, :n], regions["boxes"][0, :n])
    else:  # the global region alone, with a zero feature
        feat = torch.zeros(1, 1, model.config.v_feature_size)
        loc, mask = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 1.0]]]), torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        out = model(ids, feat, loc, image_attention_mask=mask, task_ids=torch.tensor([[TASK_IDS["retrieval_coco"]]]),
                    heads=())
    return out.text[0].mean(0), out.image[0].mean(0)


def test_vilbert_cli_records_the_pictures_battery_from_region_features(vilbert_dir, region_file, pictures, tmp_path):
    """The must-show command: --init random on the whole offline image battery, regions from --features."""
    out = tmp_path / "vilbert.h5"
    res = _cli("record", "--model", "vilbert", "--probe", "pictures", "--init", "random", "--weights", str(vilbert_dir),
               "--features", str(region_file), "--sites", "all", "--batch-size", "64", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_vilbert_recording(out, pictures, vilbert_dir, "random")
    subject = load_subject("vilbert", weights=vilbert_dir, init="random", device="cpu", quiet=True, features=region_file)
    with open_recording(out) as rec:
        assert rec.site_names == [s.name for s in subject.sites("all")]
        assert rec.stimuli["id"].tolist() == pictures.table["id"].tolist()
    # the random control is built from the folder's config, not the released (268M) architecture
    assert subject.n_parameters < 200_000


def test_vilbert_regions_come_from_the_shared_region_source(vilbert_dir, region_file, pictures):
    """ViLBERT reads --features through LXMERT's RegionSource: the file's first max_regions regions after the global one."""
    from neuroprobe.subjects.region_features import RegionFeatureSource
    from neuroprobe.subjects.vision_language import RegionSource

    # options arrive from `--option max_regions=4` as text
    subject = load_subject("vilbert", weights=vilbert_dir, init="random", device="cpu", quiet=True,
                           features=region_file, max_regions="4")
    assert isinstance(subject.regions, RegionSource)
    t = pictures.table
    rows = t[t["modality"].isin(["image", "pair"])].iloc[:6]
    batch = subject.encode(rows, pictures)
    with RegionFeatureSource(region_file) as source:
        for i, rel in enumerate(rows["image"]):
            feats, boxes = source[rel]
            k = min(len(feats), 4)
            assert int(batch.inputs["image_attention_mask"][i].sum()) == 1 + k
            got = batch.inputs["image_feat"][i]
            np.testing.assert_allclose(got[1 : 1 + k].numpy(), feats[:k], rtol=1e-6)
            np.testing.assert_allclose(got[0].numpy(), feats[:k].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch.inputs["image_loc"][i, 1 : 1 + k, :4].numpy(), boxes[:k], rtol=1e-6)


def test_vilbert_cli_records_with_the_detector_and_equals_a_direct_pass(vilbert_dir, detector_dir, pictures, tmp_path):
    """--init pretrained loads the saved tiny weights; regions from a tiny Faster R-CNN (--detector-weights)."""
    out = tmp_path / "vilbert-det.h5"
    res = _cli("record", "--model", "vilbert", "--probe", "pictures", "--weights", str(vilbert_dir),
               "--detector-weights", str(detector_dir), "--sites", "resid", "--batch-size", "64",
               "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    from neuroprobe.subjects.vilbert import ViLBERTConfig

    cfg = ViLBERTConfig.from_json(vilbert_dir / "config.json")
    order = cfg.run_order()
    last_text = max(i for s, i in order if s == "text")
    last_image = max(i for s, i in order if s == "image")
    assert order[-1] == ("text", last_text)  # the last layers run are text layers; the last image layer runs before
    t = pictures.table
    picks = [t.index[t["modality"] == m][k] for m, k in (("image", 5), ("text", 3), ("pair", 7))]
    with open_recording(out) as rec:
        assert rec.complete and rec.attrs["init"] == "pretrained"
        got_t = rec.responses(f"text.{last_text}")[()]
        got_v = rec.responses(f"image.{last_image}")[()]
    for i in picks:
        want_t, want_v = _vilbert_direct(vilbert_dir, detector_dir, pictures, t.loc[i])
        np.testing.assert_allclose(got_t[i], want_t.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_v[i], want_v.numpy(), rtol=1e-4, atol=1e-5)


def test_vilbert_cli_missing_files_say_what_and_how(vilbert_dir, tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    empty = tmp_path / "empty"
    empty.mkdir()
    outs = [tmp_path / f"{k}.h5" for k in range(2)]
    base = ["record", "--model", "vilbert", "--probe", "pictures", "-q"]
    results = _cli_all(
        # an empty weights folder: the checkpoint is named, with where to get it
        (base + ["--weights", str(empty), "--out", str(outs[0])], env),
        # no --weights, offline, nothing cached: the same, naming the cache it looked in
        (base + ["--out", str(outs[1])], env),
    )
    lines = [_one_clear_line(res) for res in results]
    assert "multi_task_model.bin" in lines[0] and "dl.fbaipublicfiles.com" in lines[0] and "--weights" in lines[0]
    assert "multi_task_model.bin" in lines[1] and "empty-torch-home" in lines[1]
    for out in outs:
        _no_complete_file(out)


def test_vilbert_missing_tokenizer_or_detector_say_what_and_how(vilbert_dir, pictures, tmp_path, monkeypatch):
    from neuroprobe.errors import MissingWeightsError
    from neuroprobe.subjects.vilbert.subject import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    empty = tmp_path / "empty"
    empty.mkdir()
    # the untrained control needs no checkpoint, but still the tokenizer
    with pytest.raises(MissingWeightsError, match="holds no tokenizer"):
        load_tokenizer(empty)
    # a bare vocab.txt in the weights folder is the uncased WordPiece tokenizer
    tok = load_tokenizer(None, vilbert_dir)
    words = (vilbert_dir / "vocab.txt").read_text().split("\n")
    assert tok("A Sun")["input_ids"] == [words.index(w) for w in ("[CLS]", "a", "sun", "[SEP]")]
    # images without --features or --detector-weights, offline: the detector, and both ways round it
    subject = load_subject("vilbert", weights=vilbert_dir, init="random", device="cpu", quiet=True)
    t = pictures.table
    with pytest.raises(MissingWeightsError) as err:
        subject.encode(t[t["modality"] == "image"].iloc[:2], pictures)
    msg = str(err.value)
    assert "unc-nlp/frcnn-vg-finetuned" in msg and "--detector-weights" in msg and "--features" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
    # text stimuli need no regions: the global region alone
    assert subject.encode(t[t["modality"] == "text"].iloc[:2], pictures).masks["image"].sum(1).tolist() == [1, 1]


# ============================================================================== DALL-E

#: a byte-level BPE vocabulary small enough for the tiny variant's 64-row text table
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = ["\u0120 a", "\u0120 s", "\u0120 o", "\u0120 t", "\u0120t h", "\u0120th e", "\u0120a n", "\u0120an d",
           "\u0120 p", "\u0120p i", "r e", "i n", "o n", "e r", "\u0120 m", "\u0120m o", "\u0120mo on"]


def _dalle_vocab() -> dict[str, int]:
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u0120"] + list(_LETTERS) + list(".,?!'")
    pieces += ["".join(m.split()) for m in _MERGES]
    return {p: i for i, p in enumerate(dict.fromkeys(pieces))}


@pytest.fixture(scope="module")
def dalle_dir(tmp_path_factory) -> Path:
    """min-dalle's files for the tiny variant: encoder.pt, decoder.pt (float16, as published), vocab.json, merges.txt."""
    from neuroprobe.subjects.dalle import DalleBart, DalleConfig
    from neuroprobe.subjects.dalle.bart import init_random

    folder = tmp_path_factory.mktemp("dalle") / "weights"
    folder.mkdir()
    vocab = _dalle_vocab()
    assert max(vocab.values()) < DalleConfig.tiny().text_vocab_count
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    model = init_random(DalleBart(DalleConfig.tiny()), std=0.3, seed=7)
    torch.save({k: v.half() for k, v in model.encoder.state_dict().items()}, folder / "encoder.pt")
    torch.save({k: v.half() for k, v in model.decoder.state_dict().items()}, folder / "decoder.pt")
    return folder


def _check_dalle_recording(path: Path, pictures: Battery, init: str) -> None:
    from neuroprobe.subjects.dalle import DalleConfig

    layers = DalleConfig.tiny().layer_count
    with open_recording(path) as rec:
        assert rec.complete and rec.attrs["init"] == init and rec.n_done == len(pictures)
        assert len(rec.site_names) == layers * (2 + 2 + 3)  # mlp, resid: both halves; attn: self + cross in the decoder
        assert {n.split(".")[0] for n in rec.site_names} == {"encoder", "decoder"}
        # the encoder reads every stimulus's text (an image's is the empty prompt) and the decoder
        # its codes (a text's is the start token alone): every site fires for every stimulus
        for name in rec.site_names:
            x = rec.responses(name)[()]
            assert np.isfinite(x).all(), name
            assert x.std(0).max() > 0, name


def test_dalle_cli_records_the_pictures_battery_with_stand_in_codes(dalle_dir, pictures, tmp_path):
    """The must-show command: --init random, the tiny variant chosen with --option variant=tiny."""
    out = tmp_path / "dalle.h5"
    res = _cli("record", "--model", "dalle", "--probe", "pictures", "--init", "random", "--weights", str(dalle_dir),
               "--option", "variant=tiny", "--sites", "all", "--batch-size", "64", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stand-in" in res.stderr  # pixel codes are not VQGAN codes, and the run says so
    _check_dalle_recording(out, pictures, "random")
    subject = load_subject("dalle", weights=dalle_dir, init="random", variant="tiny", device="cpu", quiet=True)
    with open_recording(out) as rec:
        assert rec.site_names == [s.name for s in subject.sites("all")]


def test_dalle_cli_records_a_codes_file_and_equals_a_direct_pass(dalle_dir, pictures, tmp_path):
    """--init pretrained reads the float16 files; --option codes=FILE gives each image its codes."""
    from neuroprobe.subjects.dalle import DalleConfig, TextTokenizer, load_dalle
    from neuroprobe.subjects.dalle.codes import write_codes_file
    from neuroprobe.subjects.dalle.score import decoder_inputs

    cfg = DalleConfig.tiny()
    images = sorted(set(pictures.table["image"]) - {""})
    rng = np.random.default_rng(1)
    table = {rel: rng.integers(0, cfg.code_count, cfg.image_token_count) for rel in images}
    codes_file = tmp_path / "dalle_codes.json"
    write_codes_file(codes_file, table)
    out = tmp_path / "dalle-codes.h5"
    res = _cli("record", "--model", "dalle", "--probe", "pictures", "--weights", str(dalle_dir), "-O", "variant=tiny",
               "-O", f"codes={codes_file}", "--sites", "resid", "--batch-size", "64", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stand-in" not in res.stderr
    last = cfg.layer_count - 1
    with open_recording(out) as rec:
        assert rec.complete
        enc_got = rec.responses(f"encoder.{last}")[()]
        dec_got = rec.responses(f"decoder.{last}")[()]

    model = load_dalle(dalle_dir, variant="tiny").model
    tok = json.loads((dalle_dir / "vocab.json").read_text())
    bpe = TextTokenizer.from_files(dalle_dir / "vocab.json", dalle_dir / "merges.txt")  # checked in test_dalle.py
    t = pictures.table
    for modality, k in (("image", 4), ("pair", 9), ("text", 2)):
        i = t.index[t["modality"] == modality][k]
        row = t.loc[i]
        # an image stimulus reads the empty prompt <s> </s>; texts are cut to the 16 positions of the tiny model
        text = str(row["text"]) if modality in ("text", "pair") else ""
        ids = bpe.tokenize(text)[: cfg.text_token_count]
        assert ids[0] == tok["<s>"] and (len(ids) == cfg.text_token_count or ids[-1] == tok["</s>"])
        text_ids = torch.tensor([ids])
        if modality == "text":
            dec_in = torch.tensor([[cfg.bos_token]])
        else:
            dec_in = decoder_inputs(torch.as_tensor(table[row["image"]]).long()[None], cfg.bos_token)
        with torch.no_grad():
            enc, dec = model.encoder, model.decoder
            h = enc.layernorm_embedding(enc.embed_tokens(text_ids) + enc.embed_positions(torch.arange(len(ids))))
            real = torch.ones(1, 1, 1, len(ids), dtype=torch.bool)
            for layer in enc.layers:
                h = layer(h, real)
            state = enc.final_ln(h)
            n = dec_in.shape[1]
            g = dec.layernorm_embedding(dec.embed_tokens(dec_in) + dec.embed_positions(torch.arange(n)))
            for layer in dec.layers:
                g = layer(g, state, torch.ones(n, n, dtype=torch.bool).tril(), real)
        np.testing.assert_allclose(enc_got[i], h[0].mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dec_got[i], g[0].mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_dalle_cli_missing_files_say_what_and_how(dalle_dir, tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty-hf-home")}
    empty = tmp_path / "empty"
    empty.mkdir()
    outs = [tmp_path / f"{k}.h5" for k in range(2)]
    base = ["record", "--model", "dalle", "--probe", "pictures", "-q"]
    results = _cli_all(
        # an empty weights folder: every missing file, and where to get them
        (base + ["--weights", str(empty), "--out", str(outs[0])], env),
        # offline without --weights: the hub files of the chosen variant, and the ways to provide them
        (base + ["-O", "variant=mini", "--out", str(outs[1])], env),
    )
    lines = [_one_clear_line(res) for res in results]
    for name in ("encoder.pt", "decoder.pt", "vocab.json", "merges.txt", "kuprel/min-dalle"):
        assert name in lines[0]
    for name in ("encoder_mini.pt", "decoder_mini.pt", "vocab_mini.json", "merges_mini.txt", "HF_HOME", "--weights DIR"):
        assert name in lines[1]
    for out in outs:
        _no_complete_file(out)


def test_dalle_takes_trust_pickle_and_refuses_a_pickle_without_it(dalle_dir, tmp_path):
    from neuroprobe.errors import NeuroprobeError
    from neuroprobe.recording.commands import parse_options

    bomb = tmp_path / "encoder.pkl"
    bomb.write_bytes(b"never read")
    kw = dict(weights=dalle_dir, init="random", device="cpu", quiet=True)
    # what `--option variant=tiny --option dvae=FILE` hands the loader
    options = parse_options(["variant=tiny", f"dvae={bomb}"])
    with pytest.raises(NeuroprobeError, match="--trust-pickle") as err:
        load_subject("dalle", **kw, **options)
    assert str(err.value).count(". ") == 0
    # --trust-pickle alone is accepted (nothing pickled is loaded unless a dVAE is named)
    subject = load_subject("dalle", **kw, variant="tiny", trust_pickle=True)
    assert subject.dvae is None
    with pytest.raises(NeuroprobeError, match="trust-pickle"):
        subject.dvae_tokens(None, "x.png")
