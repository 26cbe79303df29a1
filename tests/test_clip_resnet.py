"""CLIP ResNet subjects (clip-rn50, clip-rn50x4): key manifest and parity against openai/CLIP's own code,
strict loading, recording every bottleneck block, the zero-shot readout, the CLI.

The fixtures in tests/data were made by running openai/CLIP's clip/model.py unchanged
(tests/data/make_clip_resnet_fixture.py; see tests/data/README.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neuroprobe import load_subject, open_recording
from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.recording.recorder import Recorder
from neuroprobe.stimuli import Battery
from neuroprobe.subjects.clip_resnet.config import VARIANTS, CLIPResNetConfig
from neuroprobe.subjects.clip_resnet.load import load_clip_resnet, read_state_dict
from neuroprobe.subjects.clip_resnet.model import CLIPResNet

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
JIT = DATA / "clip_resnet_tiny_jit.pt"
PARITY = DATA / "clip_resnet_tiny_parity.safetensors"
CONCEPTS = ["sun", "cat", "house"]


def tiny_config() -> CLIPResNetConfig:
    with safe_open(str(PARITY), "pt") as fh:
        cfg = json.loads(fh.metadata()["config"])
    cfg.pop("vision_patch_size")
    return CLIPResNetConfig.from_dict(cfg)


@pytest.mark.parametrize("variant", ["RN50", "RN50x4"])
def test_key_manifest_is_the_original_build_model(variant):
    """Keys, order and shapes equal those of openai/CLIP's CLIP class built with the published shape
    (what its build_model loads the released files into with strict=True)."""
    manifest = json.loads((DATA / f"clip_{variant.lower()}_keys.json").read_text())
    with torch.device("meta"):
        model = CLIPResNet(VARIANTS[variant].config)
    sd = model.state_dict()
    assert list(sd) == list(manifest)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v[0] for k, v in manifest.items()}
    # the published shape is what build_model would infer from such a file
    fake = {k: torch.empty(v[0], device="meta") for k, v in manifest.items()}
    assert CLIPResNetConfig.from_state_dict(fake) == VARIANTS[variant].config


def test_parity_with_the_original_code():
    """The TorchScript archive the original code saved loads strictly, and every bottleneck block, the
    attention pool, the text features and the logits equal the original's outputs."""
    model = load_clip_resnet(JIT, config=tiny_config())
    ref = load_file(str(PARITY))
    acts: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(f"visual.{n}", o))
             for n, mod in model.visual.named_modules() if n.startswith("layer") and n.count(".") == 1]
    text = ref["in.text"]
    lengths = text.argmax(-1) + 1  # the original reads the end-of-text token (the largest id)
    with torch.inference_mode():
        image = model.encode_image(ref["in.images"])
        txt = model.encode_text(text, lengths)
        txt_short = model.encode_text(text[:, : int(lengths.max())], lengths)  # causal: padding never matters
        logits, _ = model(ref["in.images"], text, lengths)
    for h in hooks:
        h.remove()
    names = sorted(k[4:] for k in ref if k.startswith("act."))
    assert sorted(acts) == names and len(names) == sum(tiny_config().vision_layers)

    def close(got, want, rtol=2e-6):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= rtol * float(want.abs().max())

    for name in names:
        close(acts[name], ref[f"act.{name}"])
    close(image, ref["out.image_features"])
    close(txt, ref["out.text_features"])
    close(txt_short, ref["out.text_features"])
    close(logits, ref["out.logits_per_image"])


def test_torchscript_reader_equals_jit_load_and_runs_nothing(tmp_path):
    import warnings
    import zipfile

    from neuroprobe.subjects.clip_resnet.load import read_torchscript_tensors

    got = read_torchscript_tensors(JIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated; it is only the reference here
        want = torch.jit.load(str(JIT), map_location="cpu").state_dict()
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    # a pickle naming anything else (here: os.system) is refused, not run
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(JIT) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item.endswith("/data.pkl"):
                data = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."
            dst.writestr(item, data)
    with pytest.raises(MissingWeightsError, match="os.system is not allowed"):
        read_state_dict(evil)


def test_strict_loading_names_the_wrong_keys(tmp_path):
    sd = read_state_dict(JIT)
    assert not {"input_resolution", "context_length", "vocab_size"} & set(sd)
    bad = dict(sd)
    bad["visual.layer1.0.conv9.weight"] = bad.pop("visual.layer1.0.conv1.weight")
    bad["visual.attnpool.c_proj.bias"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(NeuroprobeError) as err:
        load_clip_resnet(tmp_path / "bad.safetensors", config=tiny_config())
    msg = str(err.value)
    assert "visual.layer1.0.conv1.weight" in msg and "visual.layer1.0.conv9.weight" in msg
    assert "visual.attnpool.c_proj.bias" in msg
    # a file of another shape than the published one is refused, naming both
    with pytest.raises(NeuroprobeError, match="not the asked-for"):
        load_clip_resnet(JIT, expect=VARIANTS["RN50"].config)


# ------------------------------------------------------------------------- the subject


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A --weights folder: tiny config.json, tokenizer files, random weights (large, so readouts differ)."""
    from neuroprobe.testing import _tokenizer

    root = tmp_path_factory.mktemp("clip-rn")
    tok = _tokenizer("clip", root)
    tok.save_pretrained(root)
    cfg = CLIPResNetConfig(**{**tiny_config().to_dict(), "vision_layers": (1, 2, 1, 1), "vocab_size": len(tok),
                              "context_length": 32})
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(3)
    model = CLIPResNet(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn3.weight"):
                p.fill_(1.0)  # the original zero-initialises them; a recording of zeros tests nothing
        model.text_projection.mul_(5.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def small() -> Battery:
    pictures = Battery.load("pictures")
    t = pictures.table
    rows = t[t["concept"].isin(CONCEPTS)].groupby(["concept", "form"], sort=False).head(1).reset_index(drop=True)
    return Battery.from_table(rows, concepts={c: pictures.concepts[c] for c in CONCEPTS}, name="pictures-small",
                              root=pictures.root)


@pytest.fixture(scope="module")
def subject(folder):
    return load_subject("clip-rn50", weights=folder, device="cpu", quiet=True)


def test_sites_cover_every_block_and_the_pool(subject):
    names = [s.name for s in subject.sites("all")]
    blocks = [n for n in names if n.startswith("image.layer")]
    assert blocks == ["image.layer1.0", "image.layer2.0", "image.layer2.1", "image.layer3.0", "image.layer4.0"]
    assert {"image.stem", "image.attnpool", "image.attnpool.heads", "text.0", "text.0.mlp", "text.1.attn"} <= set(names)
    by = {s.name: s for s in subject.sites("all")}
    assert by["image.layer4.0"].stream == "image-2x2" and by["image.layer1.0"].stream == "image-16x16"
    assert by["image.layer4.0"].kind == "conv" and by["image.attnpool"].layout == "BU"
    assert {s.name for s in subject.sites("mlp")} >= set(blocks) | {"image.attnpool"}


def test_records_block_units_equal_to_the_model(subject, small, tmp_path):
    rec = open_recording(Recorder(subject, small, montage="all", quiet=True, batch_size=5).run(tmp_path / "r.h5"))
    t = small.table
    image_rows = np.flatnonzero(t["modality"] == "image")
    text_rows = np.flatnonzero(t["modality"] == "text")
    m = subject.model
    for i in image_rows[:2]:
        px = subject.preprocess([small.load_image(t.iloc[i])])
        with torch.inference_mode():
            x = m.visual.stem(px)
            want = {"image.stem": x}
            for k in range(1, 5):
                for j, block in enumerate(getattr(m.visual, f"layer{k}")):
                    x = block(x)
                    want[f"image.layer{k}.{j}"] = x
            pooled = m.visual.attnpool(x)
        for name, fmap in want.items():
            direct = fmap[0].flatten(1).mean(1).numpy()  # mean over the G·G positions, one unit per channel
            np.testing.assert_allclose(rec.responses(name)[i], direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())
        np.testing.assert_allclose(rec.responses("image.attnpool")[i], pooled[0].numpy(), rtol=1e-5,
                                   atol=1e-6 * float(pooled.abs().max()))
    assert np.isnan(rec.responses("image.layer4.0")[text_rows]).all()
    assert np.isfinite(rec.responses("text.1.mlp")[text_rows]).all()
    assert np.isnan(rec.responses("text.1.mlp")[image_rows]).all()
    assert np.abs(rec.responses("image.layer4.0")[image_rows]).max() > 0


def test_zero_shot_equals_direct(subject, small):
    concepts = small.concept_names
    tok = subject.tokenizer
    img = small.table[small.table["modality"] == "image"].iloc[[0]]
    txt = small.table[small.table["modality"] == "text"].iloc[[0]]
    with torch.inference_mode():
        got = subject.readout(pd.concat([img, txt]), small, "zero_shot")
        enc = tok([small.concepts[c]["prompt"] for c in concepts], padding=True, return_tensors="pt")
        protos = subject.model.encode_text(enc["input_ids"], enc["attention_mask"].sum(1))
        px = subject.preprocess([small.load_image(img.iloc[0])])
        logits, _ = subject.model(px, enc["input_ids"], enc["attention_mask"].sum(1))
        want_img = logits.log_softmax(-1)[0, concepts.index(img["concept"].iloc[0])]
        e = tok(txt["text"].tolist(), return_tensors="pt")
        e = torch.nn.functional.normalize(subject.model.encode_text(e["input_ids"], e["attention_mask"].sum(1)), dim=-1)
        p = torch.nn.functional.normalize(protos, dim=-1)
        want_txt = (subject.model.logit_scale.exp() * e @ p.T).log_softmax(-1)[0, concepts.index(txt["concept"].iloc[0])]
    np.testing.assert_allclose(got, [float(want_img), float(want_txt)], rtol=1e-5)
    assert abs(got[0] - np.log(1 / len(concepts))) > 1e-3  # the scores are not flat


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_cli_missing_weights_names_every_piece(tmp_path):
    res = _cli("record", "--model", "clip-rn50x4", "--probe", "pictures", "--out", str(tmp_path / "x.h5"),
               "--weights", str(tmp_path), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "RN50x4.pt" in last and "7e526bd1" in last
    assert "tokenizer" not in last  # CLIP's BPE ships with neuroprobe (subjects/configs/vocab): never missing
    assert not (tmp_path / "x.h5").exists()


def test_random_init_is_the_published_shape():
    spec_cfg = VARIANTS["RN50x4"].config
    with torch.device("meta"):
        model = CLIPResNet(spec_cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(178.3e6, rel=1e-3)
    assert spec_cfg.grid(4) == 9 and spec_cfg.vision_heads == 40 and spec_cfg.feature_dim == 2560
