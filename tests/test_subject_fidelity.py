"""Subjects against their references (issue 24, items 11-13 and 18).

* CLIP ResNet preprocessing against openai/CLIP's ``_transform``, written out below with PIL and
  numpy from torchvision's rules (torchvision does not import here), and the ViT ``clip`` subject's
  preprocessing against transformers' own ``CLIPImageProcessorPil``, on palette, RGBA, grayscale
  and non-square images.
* The VQGAN encoder's input: the pixels dalle-mini gave its VQGAN when it encoded its datasets.
* ``neuroprobe sites``: DALL·E Mega built on the meta device in bounded memory, unit counts equal
  to what a recording holds.
* User-facing text: the region subjects' missing-detector error names the text-only route, the
  registry table fits a terminal, and DALL·E Mega on a CPU says what it costs before loading.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroprobe import load_subject, open_recording
from neuroprobe.recording.recorder import Recorder
from neuroprobe.stimuli import Battery
from neuroprobe.testing import SUBJECT_FOR_ARCH

ROOT = Path(__file__).resolve().parents[1]
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)  # openai/CLIP clip/clip.py, Normalize
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "COLUMNS", "LINES"):
        env.pop(key, None)
    env.update(extra)
    return env


# ------------------------------------------------------------------ CLIP preprocessing


def _scene(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients plus noise ``[h, w, 3]`` uint8: every pixel differs from its neighbours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 255 * (x + y) / (w + h - 2)], -1)
    return np.clip(base + rng.integers(-70, 71, (h, w, 3)), 0, 255).astype(np.uint8)


def _image(kind: str) -> Image.Image:
    if kind == "palette-250x180":  # as the renderer stores the shipped pictures: 64-colour palette PNGs
        return Image.fromarray(_scene(250, 180, 1)).quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                                             dither=Image.Dither.NONE)
    if kind == "rgba-180x250":
        rgba = np.concatenate([_scene(180, 250, 2), np.random.default_rng(3).integers(0, 256, (250, 180, 1))], -1)
        return Image.fromarray(rgba.astype(np.uint8), "RGBA")
    if kind == "gray-250x180":
        return Image.fromarray(_scene(250, 180, 4)).convert("L")
    if kind == "rgb-250x180":
        return Image.fromarray(_scene(250, 180, 5))
    if kind == "rgb-180x250":
        return Image.fromarray(_scene(180, 250, 6))
    if kind == "shipped-picture":  # a real stimulus: probes/pictures, palette 128 x 128
        path = sorted((ROOT / "probes" / "pictures" / "images").rglob("*.png"))[0]
        with Image.open(path) as im:
            im.load()
            return im
    raise AssertionError(kind)


KINDS = ["palette-250x180", "rgba-180x250", "gray-250x180", "rgb-250x180", "rgb-180x250", "shipped-picture"]


def openai_clip_reference(image: Image.Image, n_px: int) -> np.ndarray:
    """openai/CLIP's ``_transform(n_px)`` (clip/clip.py: ``Resize(n_px, interpolation=BICUBIC)``,
    ``CenterCrop(n_px)``, ``_convert_image_to_rgb``, ``ToTensor()``, ``Normalize(MEAN, STD)``) on a PIL image,
    written out from torchvision's source (torchvision/transforms/functional.py)."""
    # Resize with an int size -> F.resize -> _compute_resized_output_size([h, w], [n_px]):
    #   short, long = (w, h) if w <= h else (h, w)
    #   new_short, new_long = requested_new_short, int(requested_new_short * long / short)
    #   new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    # F.resize returns the image untouched when [h, w] == output size; otherwise _functional_pil.resize
    # runs img.resize(tuple(size[::-1]), interpolation) on the image in its own mode (Pillow then uses
    # nearest-neighbour for "P" images and premultiplied alpha for "RGBA").
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n_px, int(n_px * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # CenterCrop -> F.center_crop (no padding needed after the resize):
    #   crop_top = int(round((image_height - crop_height) / 2.0)); crop_left likewise
    top, left = int(round((new_h - n_px) / 2.0)), int(round((new_w - n_px) / 2.0))
    image = image.crop((left, top, left + n_px, top + n_px))
    image = image.convert("RGB")  # _convert_image_to_rgb
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)  # ToTensor: .div(255)
    return (x - MEAN[:, None, None]) / STD[:, None, None]  # Normalize: sub_(mean).div_(std)


@pytest.fixture(scope="module")
def clip_rn50():
    return load_subject("clip-rn50", init="random", device="meta", quiet=True)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_resnet_preprocessing_is_openai_clips_transform(clip_rn50, kind):
    """The clip-rn subjects see what openai/CLIP's clip.load transform gives: a 250 x 180 image is cropped at
    column round(87 / 2) = 44 (not 43), and palette / RGBA images are resized before they become RGB."""
    image = _image(kind)
    n_px = clip_rn50.config.image_resolution
    assert n_px == 224
    got = clip_rn50.preprocess([image])[0].numpy()
    want = openai_clip_reference(image, n_px)
    assert got.shape == want.shape == (3, n_px, n_px)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_clip_vit_preprocessing_is_transformers_processor(kind):
    """The ViT ``clip`` subject follows transformers' CLIPImageProcessor instead (what HF users of the same
    checkpoint get): RGB first (transparency onto white), floor crop ``(H - h) // 2``."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    subject = load_subject("clip", init="random", device="meta", quiet=True)
    image = _image(kind)
    got = subject.preprocess([image])[0].numpy()
    want = CLIPImageProcessorPil()(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ VQGAN encoder input


def test_vqgan_takes_the_pixels_dalle_mini_encoded_with(tmp_path):
    """dalle-mini encoded its datasets with pixels in [0, 1], unchanged: borisdayma/dalle-mini,
    dev/encoding/vqgan-jax-encoding-streaming.ipynb (also -webdataset, -alamy; at 07eca3c^):
    ``get_image`` -> ``.convert('RGB')``, ``TF.resize(image, 256, InterpolationMode.LANCZOS)``,
    ``TF.center_crop(image, 2 * [256])``, ``T.ToTensor()``, then ``model.encode(batch)`` of
    patil-suraj/vqgan-jax, whose ``encode`` runs the encoder on ``pixel_values`` as given.
    So the published encoder's range is (0, 1) and a subject's codes come from exactly those pixels."""
    from neuroprobe.subjects.dalle.encoder import image_pixels
    from neuroprobe.subjects.dalle.vqgan import VQGANEncoderConfig, VQGANTokenizer

    assert VQGANEncoderConfig().pixel_range == (0.0, 1.0)
    side = 32
    for image in (Image.fromarray(_scene(100, 70, 7)), _image("palette-250x180").resize((70, 100))):
        # the reference, from the notebook's calls and torchvision's rules (see openai_clip_reference)
        rgb = image.convert("RGB")
        w, h = rgb.size
        short, long = (w, h) if w <= h else (h, w)
        new_w, new_h = (side, int(side * long / short)) if w <= h else (int(side * long / short), side)
        rgb = rgb.resize((new_w, new_h), Image.Resampling.LANCZOS)
        top, left = int(round((new_h - side) / 2.0)), int(round((new_w - side) / 2.0))
        ref = np.asarray(rgb.crop((left, top, left + side, top + side)), np.float32) / np.float32(255)
        ref_t = torch.from_numpy(ref).permute(2, 0, 1).unsqueeze(0)
        pixels = image_pixels(image, side)
        np.testing.assert_allclose(pixels.numpy(), ref_t.numpy(), rtol=0, atol=1e-7)
        # the tokenizer hands those pixels to the encoder unchanged (a tiny model of the same layout)
        torch.manual_seed(0)
        tok = VQGANTokenizer(VQGANEncoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                                                resolution=side, z_channels=4, embed_dim=4, n_embed=16, groups=4)).eval()
        with torch.no_grad():
            direct = tok.quant_conv(tok.encoder(ref_t))
            assert torch.allclose(tok.latent(pixels), direct, rtol=1e-5, atol=1e-6 * float(direct.abs().max()))
            assert torch.equal(tok(pixels), tok.quantize(direct))


# ------------------------------------------------------------------ neuroprobe sites


_RSS_REPORT = (
    "import atexit, resource, sys\n"
    # VmHWM: the peak RSS of this program's own memory (ru_maxrss keeps the parent's peak across fork and exec,
    # so under a pytest process that has grown past 2 GB it would report the parent)
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1])\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "atexit.register(lambda: sys.stderr.write(f'maxrss_kb={_hwm()}\\n'))\n"
    "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # Mega in float32 needs 10.4 GB\n"
    "sys.argv = ['neuroprobe'] + sys.argv[1:]\n"
    "from neuroprobe.cli import main\n"
    "main()\n"
)


def test_sites_dalle_builds_mega_on_meta_and_counts_units(tmp_path):
    """`neuroprobe sites dalle` lists DALL·E Mega (the default) without building its 2.59 B parameters:
    under an 8 GB address-space limit, in well under 2 GB of resident memory, with each site's units."""
    res = subprocess.run([sys.executable, "-c", _RSS_REPORT, "sites", "dalle", "--sites", "all"],
                         env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    maxrss_gb = int(res.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) / 2**20
    assert maxrss_gb < 2.0, maxrss_gb
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["site", "kind", "direction", "stream", "layout", "units", "module"]
    rows = {r.split()[0]: r.split() for r in lines[1:-1]}
    # Mega: width 2048, GLU width 4096, 24 + 24 layers (DalleConfig.mega, min-dalle's sizes)
    assert rows["encoder.0"][5] == "2048" and rows["decoder.23"][5] == "2048"
    assert rows["encoder.0.mlp"][5] == "4096" and rows["decoder.23.mlp"][5] == "4096"
    assert rows["decoder.5.cross_attn"][5] == "2048"
    assert len(rows) == 24 * 2 * 3 + 24  # resid, mlp, self-attention per layer; cross-attention per decoder layer
    total = sum(int(r[5]) for r in rows.values())
    assert lines[-1].startswith(f"{len(rows)} sites (") and f"{total:,} units" in lines[-1]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "xlnet", "bart", "clip"])
def test_unit_counts_equal_the_recording(arch, tiny_dir, tmp_path):
    """The widths `neuroprobe sites` prints for a weightless (meta) model are the widths a recording holds."""
    from neuroprobe.subjects.commands import site_unit_counts

    name = SUBJECT_FOR_ARCH[arch]
    folder = tiny_dir(arch)
    subject = load_subject(name, weights=folder, device="cpu", quiet=True)
    battery = Battery.load("pictures" if arch == "clip" else "kinship")
    table = battery.table
    rows = table.groupby("modality", sort=False).head(1) if arch == "clip" else table.head(2)
    small = Battery.from_table(rows.reset_index(drop=True), concepts=battery.concepts, name="small",
                               root=battery.root)
    rec = open_recording(Recorder(subject, small, montage="all", quiet=True).run(tmp_path / "r.h5"))
    recorded = dict(zip(rec.sites["site"], rec.sites["n_units"]))
    meta = load_subject(name, weights=folder, device="meta", quiet=True)
    sites = meta.sites("all")
    static = dict(zip([s.name for s in sites], site_unit_counts(meta, sites)))
    assert static == {k: int(v) for k, v in recorded.items()}


def test_unit_counts_measured_where_shapes_do_not_tell(tmp_path):
    """The organism taps an ``nn.Identity`` (its heads) and activations: their widths come from one forward pass."""
    from neuroprobe.subjects.commands import site_unit_counts

    subject = load_subject("organism", device="cpu", quiet=True)
    battery = Battery.load("digits")
    small = Battery.from_table(battery.table.groupby("modality", sort=False).head(1).reset_index(drop=True),
                               concepts=battery.concepts, name="small", root=battery.root)
    rec = open_recording(Recorder(subject, small, montage="all", quiet=True).run(tmp_path / "r.h5"))
    recorded = dict(zip(rec.sites["site"], rec.sites["n_units"]))
    sites = subject.sites("all")
    assert None in site_unit_counts(subject, sites)  # the shapes alone leave these open
    assert dict(zip([s.name for s in sites], site_unit_counts(subject, sites, battery))) == recorded


# ------------------------------------------------------------------ user-facing text


def test_region_subject_without_detector_names_the_text_route(tmp_path):
    res = subprocess.run([sys.executable, "-m", "neuroprobe", "record", "--model", "lxmert", "--init", "random",
                          "--probe", "pictures", "--out", str(tmp_path / "r.h5"), "-q"],
                         env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuroprobe: error:"), res.stderr
    assert "--probe kinship" in lines[0] and "detector" in lines[0]


@pytest.mark.parametrize("columns", [None, "100", "80"])
def test_subjects_table_fits_the_terminal(tmp_path, columns):
    """Every line fits ``$COLUMNS`` (a pipe without it: 100); each subject keeps its row with its runnable state."""
    from neuroprobe.subjects.registry import REGISTRY

    env = _offline_env(tmp_path, **({"COLUMNS": columns} if columns else {}))
    res = subprocess.run([sys.executable, "-m", "neuroprobe", "subjects"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    limit = int(columns or 100)
    assert max(len(line) for line in res.stdout.splitlines()) <= limit
    starts = {line.split()[0]: line for line in res.stdout.splitlines() if line and not line[0].isspace()}
    assert set(REGISTRY) <= set(starts)
    assert "random only (text; images need the detector)" in starts["lxmert"] and starts["organism"].split()[2] == "yes"


def test_dalle_mega_on_a_cpu_says_so_before_loading(monkeypatch, capsys):
    """Mega stays the default (one command, one model, on every machine); on a CPU one line says what it costs
    and how to pick Mini, before anything is built."""
    import neuroprobe.subjects.dalle.subject as dalle_subject
    from neuroprobe.subjects.registry import get_spec

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(dalle_subject, "load_dalle", stop)
    with pytest.raises(Stop):
        dalle_subject.load_dalle_subject(get_spec("dalle"), init="random", device="cpu")
    err = capsys.readouterr().err
    assert "Mega" in err and "variant=mini" in err and "CPU" in err
    for kwargs in ({"variant": "mini"}, {"quiet": True}, {"device": "meta"}):
        with pytest.raises(Stop):
            dalle_subject.load_dalle_subject(get_spec("dalle"), init="random", **{"device": "cpu", **kwargs})
        assert capsys.readouterr().err == ""
