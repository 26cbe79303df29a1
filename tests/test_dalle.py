"""Tests of the DALL·E subject (min-dalle's DALL·E Mini/Mega, VQGAN detokenizer, OpenAI dVAE).

The published weights cannot be downloaded here, so the full-size architecture is
checked against key-and-shape manifests of min-dalle's files (tests/data/dalle_*_keys.json,
derived from the reference code), and everything else runs on tiny random models.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.dalle import (
    DalleBart,
    DalleConfig,
    TextTokenizer,
    VQGANConfig,
    VQGANDetokenizer,
    encode_image_dvae,
    load_dalle,
    load_dvae,
    map_pixels,
    score_image_tokens,
)
from neuroprobe.subjects.dalle.bart import LayerNorm, init_random
from neuroprobe.subjects.dalle.codes import pixel_codes
from neuroprobe.subjects.dalle.dvae import preprocess_image
from neuroprobe.subjects.dalle.score import image_token_logprobs, unconditioned_text_tokens

DATA = Path(__file__).parent / "data"


def _manifest(name: str) -> dict:
    return json.loads((DATA / f"dalle_{name}_keys.json").read_text())


def _meta_state(manifest: dict) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, manifest["dtype"])
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in manifest["keys"].items()}


# ------------------------------------------------------------------ full-size layout
@pytest.mark.parametrize("variant", ["mega", "mini"])
def test_published_encoder_decoder_load_strict(variant):
    config = DalleConfig.named(variant)
    with torch.device("meta"):
        model = DalleBart(config)
    for part in ("encoder", "decoder"):
        manifest = _manifest(f"{variant}_{part}")
        assert manifest["file"] == config.hub_files[part]
        module = getattr(model, part)
        result = module.load_state_dict(_meta_state(manifest), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert sum(p.numel() for p in module.parameters()) == manifest["parameters"]


def test_published_detokenizer_loads_strict():
    manifest = _manifest("detoker")
    with torch.device("meta"):
        module = VQGANDetokenizer()
    module.load_state_dict(_meta_state(manifest), strict=True)
    assert sum(p.numel() for p in module.parameters()) == manifest["parameters"]


def test_scaleless_norm_accepts_only_unit_scale():
    norm = LayerNorm(4, scale=False)
    norm.load_state_dict({"bias": torch.arange(4.0), "weight": torch.ones(4)}, strict=True)
    assert torch.equal(norm.bias, torch.arange(4.0))
    with pytest.raises(RuntimeError, match="without a scale"):
        norm.load_state_dict({"bias": torch.zeros(4), "weight": torch.full((4,), 2.0)}, strict=True)
    x = torch.randn(3, 4)
    assert torch.allclose(norm(x), F.layer_norm(x, (4,), None, None, 1e-5))


# ------------------------------------------------------------------------ tiny model
def _tiny(seed: int = 0) -> tuple[DalleConfig, DalleBart]:
    config = DalleConfig.tiny()
    model = init_random(DalleBart(config), std=0.3, seed=seed).eval()
    return config, model


def _text(config: DalleConfig, lengths=(5, 9), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), config.text_token_count), config.text_pad_token, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(3, config.text_vocab_count, (n,), generator=g)
        out[i, 0] = config.text_bos_token
    return out


def _codes(config: DalleConfig, batch: int = 2, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.code_count, (batch, config.image_token_count), generator=g)


def test_scoring_equals_prefix_by_prefix_log_softmax():
    config, model = _tiny()
    text, codes = _text(config), _codes(config)
    with torch.no_grad():
        got = score_image_tokens(model.encoder, model.decoder, text, codes, reduction="none")
        state = model.encoder(text)
        want = torch.zeros_like(got)
        for t in range(config.image_token_count):
            prefix = torch.cat([torch.full((2, 1), config.bos_token), codes[:, :t]], dim=1)
            logits = model.decoder(prefix, state, text)[:, -1, : config.code_count]
            want[:, t] = torch.log_softmax(logits.double(), -1).gather(1, codes[:, t : t + 1]).squeeze(1).float()
        mean = score_image_tokens(model.encoder, model.decoder, text, codes)
        total = score_image_tokens(model.encoder, model.decoder, text, codes, reduction="sum")
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(mean, want.mean(1), atol=1e-5)
    assert torch.allclose(total, want.sum(1), atol=1e-4)
    assert (got < 0).all()


def test_teacher_forcing_is_causal_and_text_conditioned():
    config, model = _tiny()
    text, codes = _text(config), _codes(config)
    k = 7
    changed = codes.clone()
    changed[:, k] = (changed[:, k] + 1) % config.code_count
    with torch.no_grad():
        a = image_token_logprobs(model.encoder, model.decoder, text, codes)
        b = image_token_logprobs(model.encoder, model.decoder, text, changed)
        other = image_token_logprobs(model.encoder, model.decoder, _text(config, seed=5), codes)
    assert torch.allclose(a[:, :k], b[:, :k], atol=1e-6)
    assert not torch.allclose(a[:, k + 1 :], b[:, k + 1 :], atol=1e-4)
    assert not torch.allclose(a, other, atol=1e-4)


def test_padding_is_invisible():
    config, model = _tiny()
    text, codes = _text(config), _codes(config)
    # padding (id 1) is masked: cutting the padded length changes nothing
    with torch.no_grad():
        full = score_image_tokens(model.encoder, model.decoder, text, codes)
        short = score_image_tokens(model.encoder, model.decoder, text[:, :10], codes)
    assert torch.allclose(full, short, atol=1e-5)


def test_unconditioned_prompt_matches_tokenizer_empty_text():
    tok = _tiny_tokenizer()
    assert torch.equal(tok.batch([""] * 3, 8), unconditioned_text_tokens(3, 8, tok.bos, tok.eos, tok.pad))


def test_save_and_load_back_through_load_dalle(tmp_path):
    config, model = _tiny(seed=3)
    # published files are float16 state dicts of the two halves
    torch.save({k: v.half() for k, v in model.encoder.state_dict().items()}, tmp_path / "encoder.pt")
    torch.save({k: v.half() for k, v in model.decoder.state_dict().items()}, tmp_path / "decoder.pt")
    _write_tokenizer(tmp_path)
    bundle = load_dalle(tmp_path, variant="tiny")
    text, codes = _text(config), _codes(config)
    with torch.no_grad():
        half = init_random(DalleBart(config), 0.3, seed=3)
        half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        want = score_image_tokens(half.encoder, half.decoder, text, codes)
        got = score_image_tokens(bundle.encoder, bundle.decoder, text, codes)
    assert torch.allclose(got, want, atol=1e-6)
    assert next(bundle.model.parameters()).dtype == torch.float32
    # the random control builds the same architecture with different weights
    rnd = load_dalle(tmp_path, variant="tiny", init="random", seed=0)
    assert [n for n, _ in rnd.model.named_parameters()] == [n for n, _ in bundle.model.named_parameters()]
    with torch.no_grad():
        assert not torch.allclose(score_image_tokens(rnd.encoder, rnd.decoder, text, codes), got)


def test_missing_files_name_the_files(tmp_path, monkeypatch):
    _write_tokenizer(tmp_path)
    with pytest.raises(MissingWeightsError, match="encoder.pt, decoder.pt"):
        load_dalle(tmp_path, variant="tiny")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MissingWeightsError) as err:
        load_dalle(None, variant="mini")
    msg = str(err.value)
    for needed in ("encoder_mini.pt", "decoder_mini.pt", "vocab_mini.json", "merges_mini.txt", "HF_HOME", "--weights"):
        assert needed in msg


def test_wrong_variant_is_a_clear_error(tmp_path):
    config, model = _tiny()
    torch.save(model.encoder.state_dict(), tmp_path / "encoder.pt")
    bigger = init_random(DalleBart(config.with_(embed_count=48)), 0.02)
    torch.save(bigger.decoder.state_dict(), tmp_path / "decoder.pt")
    _write_tokenizer(tmp_path)
    with pytest.raises(NeuroprobeError, match="does not fit"):
        load_dalle(tmp_path, variant="tiny")


# ------------------------------------------------------------------------- tokenizer
VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "\u0120", "\u0120h", "\u0120he", "ll", "\u0120hell", "\u0120hello"]
VOCAB += list("abcdefghijklmnopqrstuvwxyz!")
MERGES = ["#version: 0.2", "\u0120 h", "\u0120h e", "l l", "\u0120he ll", "\u0120hell o", ""]


def _write_tokenizer(folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(VOCAB)}), encoding="utf8")
    (folder / "merges.txt").write_text("\n".join(MERGES), encoding="utf8")


def _tiny_tokenizer() -> TextTokenizer:
    return TextTokenizer({s: i for i, s in enumerate(VOCAB)}, MERGES)


def test_tokenizer_bpe_and_round_trip():
    tok = _tiny_tokenizer()
    v = {s: i for i, s in enumerate(VOCAB)}
    ids = tok.tokenize("Hello  WORLD!")
    # "hello" merges fully; "world!" has no merges: the space symbol then one id per character
    want = [v["<s>"], v["\u0120hello"], v["\u0120"]] + [v[c] for c in "world!"] + [v["</s>"]]
    assert ids == want
    assert tok.decode(ids) == "hello world!"
    assert tok.tokenize("héllo") == [0, v["\u0120h"], v["ll"], v["o"], 2]  # non-ASCII dropped: "hllo"
    assert tok.tokenize("hello 7")[-2] == tok.unk
    batch = tok.batch(["hello", "a b c d e f g h i j"], length=6)
    assert batch.shape == (2, 6) and batch[0].tolist() == [0, v["\u0120hello"], 2, 1, 1, 1]
    assert batch[1].tolist()[:2] == [0, v["\u0120"]]


def test_tokenizer_agrees_with_tokenizers_library():
    tokenizers = pytest.importorskip("tokenizers")
    tok = _tiny_tokenizer()
    vocab = {s: i for i, s in enumerate(VOCAB)}
    merges = [tuple(m.split()) for m in MERGES[1:-1]]
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    for word in ("hello", "hell", "helloo", "oh", "lll"):
        assert tok.tokenize(word)[1:-1] == ref.encode("\u0120" + word).ids


# ------------------------------------------------------------------------------ VQGAN
def test_tiny_detokenizer_forward_and_round_trip():
    torch.manual_seed(0)
    config = VQGANConfig.tiny()
    module = VQGANDetokenizer(config).eval()
    codes = torch.randint(0, config.vocab_count, (2, 4))
    with torch.no_grad():
        images = module(codes)
    assert images.shape == (2, 32, 32, 3)
    assert images.min() >= 0 and images.max() <= 255
    copy = VQGANDetokenizer(config)
    copy.load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(copy(codes), images)
    # a code's embedding matters: changing one code changes its image region
    other = codes.clone()
    other[0, 0] = (other[0, 0] + 1) % config.vocab_count
    with torch.no_grad():
        assert not torch.equal(module(other)[0], images[0])


# ------------------------------------------------------------------------------- dVAE
def test_dvae_refuses_without_trust_pickle(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save(torch.nn.Conv2d(3, 4, 8, stride=8), path)
    with pytest.raises(NeuroprobeError) as err:
        load_dvae(path)
    msg = str(err.value)
    assert "--trust-pickle" in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_dvae_tokens_are_argmax_of_logits(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8))
    path = tmp_path / "encoder.pkl"
    torch.save(enc, path)
    loaded = load_dvae(path, trust_pickle=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    tokens = encode_image_dvae(loaded, image)
    assert tokens.shape == (32 * 32,)
    x = preprocess_image(image)
    assert x.shape == (1, 3, 256, 256) and float(x.min()) >= 0.1 - 1e-6 and float(x.max()) <= 0.9 + 1e-6
    with torch.no_grad():
        want = enc(x).argmax(1).reshape(-1)
    assert torch.equal(tokens, want)
    assert torch.allclose(map_pixels(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.1, 0.5, 0.9]))


# ------------------------------------------------------------------------ image codes
def test_pixel_codes_quantise_cell_colours():
    from PIL import Image

    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 32, 64, 64))
    codes = pixel_codes(image, grid=4, code_count=2**14)  # 25 levels per channel
    assert codes.shape == (16,)
    red, blue = (24 * 25 + 0) * 25 + 0, 24
    assert codes.view(4, 4)[0, 0] == red and codes.view(4, 4)[3, 3] == blue and codes.view(4, 4)[3, 0] == red


# --------------------------------------------------------------------------- subject
def _battery(tmp_path: Path):
    from PIL import Image

    from neuroprobe.stimuli.battery import Battery

    (tmp_path / "img").mkdir(parents=True)
    for i, color in enumerate([(250, 10, 10), (10, 10, 250)]):
        Image.new("RGB", (40, 40), color).save(tmp_path / "img" / f"{i}.png")
    table = pd.DataFrame(
        [
            {"id": "t0", "concept": "hello", "modality": "text", "form": "text-name", "split": "screening", "text": "hello world"},
            {"id": "i0", "concept": "hello", "modality": "image", "form": "photo", "split": "screening", "image": "img/0.png"},
            {"id": "p1", "concept": "ab", "modality": "pair", "form": "photo", "split": "testing", "text": "ab", "image": "img/1.png"},
        ]
    )
    concepts = {"hello": {"prompt": "hello", "names": ["hello"]}, "ab": {"prompt": "ab", "names": ["ab"]}}
    return Battery.from_table(table, concepts, name="tiny", root=tmp_path)


def test_subject_sites_encode_forward_and_readout(tmp_path):
    from neuroprobe.subjects.dalle.subject import load_dalle_subject
    from neuroprobe.subjects.registry import get_spec

    config, model = _tiny(seed=4)
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(model.encoder.state_dict(), weights / "encoder.pt")
    torch.save(model.decoder.state_dict(), weights / "decoder.pt")
    _write_tokenizer(weights)
    battery = _battery(tmp_path / "probe")
    subject = load_dalle_subject(get_spec("dalle"), weights=weights, variant="tiny", device="cpu")

    mlp = subject.sites("mlp")
    assert [s.name for s in mlp] == ["encoder.0.mlp", "encoder.1.mlp", "decoder.0.mlp", "decoder.1.mlp"]
    assert {s.stream for s in mlp} == {"text", "image"} and all(s.direction == "input" for s in mlp)
    assert len(subject.sites("resid")) == 4 and len(subject.sites("attn")) == 6
    assert all(s.module.endswith("out_proj") and s.n_heads == config.head_count for s in subject.sites("attn"))

    with pytest.warns(UserWarning, match="stand-in"):
        batch = subject.encode(battery.table, battery)
    assert batch.masks["image"].sum(1).tolist() == [1, config.image_token_count, config.image_token_count]
    assert batch.masks["text"][1].sum() == 2  # image stimulus: the empty prompt <s> </s>
    assert batch.concept_masks["text"][0].tolist()[:3] == [False, True, False]  # "hello" in "hello world"
    with torch.no_grad():
        logits = subject.forward(batch)
    assert logits.shape == (3, config.image_token_count, config.image_vocab_count + 1)

    scores = subject.readout(battery.table, battery)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # the image stimulus scores its own codes given the concept prompt
    codes = subject.codes.for_image(battery, "img/0.png").unsqueeze(0)
    with torch.no_grad():
        want = score_image_tokens(model.encoder, model.decoder, subject.tokenizer.batch(["hello"], config.text_token_count), codes)
    assert scores[1] == pytest.approx(float(want[0]), abs=1e-5)
    # the text stimulus scores its concept's reference image (the first image of "hello")
    with torch.no_grad():
        want_t = score_image_tokens(model.encoder, model.decoder, subject.tokenizer.batch(["hello world"], config.text_token_count), codes)
    assert scores[0] == pytest.approx(float(want_t[0]), abs=1e-5)
    pmi = subject.readout(battery.table, battery, "image_token_pmi")
    assert not np.allclose(pmi, scores)


def test_codes_file_is_used_and_checked(tmp_path):
    from neuroprobe.subjects.dalle.codes import ImageCodes, write_codes_file

    battery = _battery(tmp_path)
    codes = ImageCodes(16, 36)
    write_codes_file(tmp_path / "dalle_codes.json", {"img/0.png": list(range(16)), "concept:ab": [35] * 16})
    assert codes.for_image(battery, "img/0.png").tolist() == list(range(16))
    assert codes.for_concept(battery, "ab").tolist() == [35] * 16
    assert not codes.used_fallback
    write_codes_file(tmp_path / "bad.json", {"img/0.png": [99] * 16})
    with pytest.raises(NeuroprobeError, match="16 codes"):
        ImageCodes(16, 36, tmp_path / "bad.json").for_image(battery, "img/0.png")


def test_subject_through_registry_records_and_lesions(tmp_path):
    from neuroprobe.electrodes import Electrodes
    from neuroprobe.subjects import load_subject

    config, model = _tiny(seed=5)
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(model.encoder.state_dict(), weights / "encoder.pt")
    torch.save(model.decoder.state_dict(), weights / "decoder.pt")
    _write_tokenizer(weights)
    battery = _battery(tmp_path / "probe")
    subject = load_subject("dalle", weights=weights, variant="tiny", device="cpu", quiet=True)
    with pytest.warns(UserWarning):
        batch = subject.encode(battery.table, battery)
    sites = subject.sites("all")
    with torch.no_grad(), Electrodes(subject.model, sites) as el:
        subject.forward(batch)
    n, s, t = len(battery), config.text_token_count, config.image_token_count
    assert el.data["encoder.0.mlp"].shape == (n, s, config.glu_embed_count)
    assert el.data["decoder.1.mlp"].shape == (n, t, config.glu_embed_count)
    assert el.data["decoder.1.cross_attn"].shape == (n, t, config.embed_count)
    assert el.data["decoder.1"].shape == (n, t, config.embed_count)
    base = subject.readout(battery.table, battery)
    site = next(x for x in sites if x.name == "decoder.1.mlp")
    with Electrodes(subject.model, [site], read=False, edits={site.name: lambda x, _s: torch.zeros_like(x)}):
        lesioned = subject.readout(battery.table, battery)
    assert not np.allclose(base, lesioned)
    assert np.allclose(subject.readout(battery.table, battery), base)


# ---------------------------------------------------------------- VQGAN encoder (images -> codes)
VQGAN_FIXTURE = Path(__file__).resolve().parent / "data" / "vqgan_encoder_tiny.safetensors"


def _vqgan_tiny_config():
    import json as _json

    from safetensors import safe_open

    from neuroprobe.subjects.dalle.vqgan import VQGANEncoderConfig

    meta = safe_open(str(VQGAN_FIXTURE), "pt").metadata()
    dd, codes = _json.loads(meta["ddconfig"]), _json.loads(meta["codes"])
    return VQGANEncoderConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                              attn_resolutions=tuple(dd["attn_resolutions"]), resolution=dd["resolution"],
                              z_channels=dd["z_channels"], embed_dim=codes["embed_dim"], n_embed=codes["n_embed"],
                              pixel_range=(-1.0, 1.0))


def _vqgan_weights(tmp_path) -> Path:
    """The fixture's taming-layout weights as a full-VQModel-like checkpoint (with decoder and loss keys to ignore)."""
    from safetensors.torch import load_file

    ref = load_file(str(VQGAN_FIXTURE))
    state = {k[len("weight."):]: v.float() for k, v in ref.items() if k.startswith("weight.")}
    state["decoder.conv_in.weight"] = torch.zeros(2, 2, 3, 3)
    state["loss.discriminator.main.0.weight"] = torch.zeros(2)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def test_vqgan_encoder_key_manifest_is_taming_f16_16384():
    """The encoder's keys and shapes equal taming-transformers' Encoder + quant_conv + quantize built with the
    f16-16384 configuration (the inferred layout of dalle-mini's VQGAN)."""
    from neuroprobe.subjects.dalle.vqgan import VQGANTokenizer

    manifest = json.loads((VQGAN_FIXTURE.parent / "vqgan_f16_16384_encoder_keys.json").read_text())
    with torch.device("meta"):
        sd = VQGANTokenizer().state_dict()
    assert list(sd) == list(manifest) and {k: list(v.shape) for k, v in sd.items()} == manifest
    assert manifest["quantize.embedding.weight"] == [16384, 256]


def test_vqgan_encoder_parity_with_taming(tmp_path):
    from safetensors.torch import load_file

    from neuroprobe.subjects.dalle.encoder import load_vqgan_tokenizer

    ref = load_file(str(VQGAN_FIXTURE))
    model = load_vqgan_tokenizer(_vqgan_weights(tmp_path), _vqgan_tiny_config())
    pixels = (ref["in.images"] + 1) / 2  # the tokenizer takes [0, 1] and maps it to the model's range
    levels = {}
    hooks = [model.encoder.down[i].register_forward_hook(lambda m, a, o, i=i: levels.__setitem__(i, o)) for i in (2, 3, 4)]
    with torch.no_grad():
        latent = model.latent(pixels)
        codes = model(pixels)
    for h in hooks:
        h.remove()
    for i in (2, 3, 4):
        want = ref[f"act.level.{i}"]
        assert float((levels[i] - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((latent - ref["out.pre_quant"]).abs().max()) <= 1e-5 * float(ref["out.pre_quant"].abs().max())
    assert torch.equal(codes, ref["out.indices"])


def test_vqgan_encoder_strict_loading_names_keys(tmp_path):
    from neuroprobe.subjects.dalle.encoder import load_vqgan_tokenizer

    path = _vqgan_weights(tmp_path)
    state = torch.load(path, weights_only=True)["state_dict"]
    state["encoder.down.0.block.0.norm_1.weight"] = state.pop("encoder.down.0.block.0.norm1.weight")
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(NeuroprobeError, match="infers from taming") as err:
        load_vqgan_tokenizer(bad, _vqgan_tiny_config())
    assert "encoder.down.0.block.0.norm1.weight" in str(err.value) and "norm_1" in str(err.value)
    # the real shape is refused for the tiny file, naming shapes
    with pytest.raises(NeuroprobeError, match="wrong shape"):
        load_vqgan_tokenizer(path)


def test_subject_encodes_images_with_the_vqgan(tmp_path):
    from neuroprobe.subjects.dalle.encoder import image_pixels
    from neuroprobe.subjects.dalle.subject import load_dalle_subject
    from neuroprobe.subjects.registry import get_spec

    config, model = _tiny(seed=4)
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(model.encoder.state_dict(), weights / "encoder.pt")
    torch.save(model.decoder.state_dict(), weights / "decoder.pt")
    _write_tokenizer(weights)
    vq = _vqgan_weights(tmp_path)
    import dataclasses

    (vq.parent / "vqgan_config.json").write_text(json.dumps(dataclasses.asdict(_vqgan_tiny_config())))
    battery = _battery(tmp_path / "probe")
    subject = load_dalle_subject(get_spec("dalle"), weights=weights, variant="tiny", device="cpu", vqgan=str(vq))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stand-in codes
        codes = subject.codes.for_image(battery, "img/0.png")
        scores = subject.readout(battery.table, battery)
    with torch.no_grad():
        want = subject.vqgan(image_pixels(battery.load_image("img/0.png"), 64))[0]
    assert torch.equal(codes, want) and codes.shape == (config.image_token_count,)
    assert np.isfinite(scores).all() and not subject.codes.used_fallback


# ---------------------------------------------------------------- OpenAI dVAE encoder, ported
DATA = Path(__file__).resolve().parent / "data"


def _dvae_filled(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """The fixture generator's weight rule (tests/data/make_dvae_encoder_fixture.py), repeated here."""
    out = {}
    for i, (k, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed + i)
        scale = (shape[1] * shape[2] * shape[3]) ** -0.5 if len(shape) == 4 else 0.1
        out[k] = torch.randn(tuple(shape), generator=g) * scale
    return out


def test_dvae_encoder_key_manifest_is_the_original():
    from neuroprobe.subjects.dalle.dvae import DVAEEncoder

    manifest = json.loads((DATA / "dvae_encoder_keys.json").read_text())
    with torch.device("meta"):
        sd = DVAEEncoder().state_dict()
    assert list(sd) == list(manifest) and {k: list(v.shape) for k, v in sd.items()} == manifest


def test_dvae_encoder_parity_with_openai_code():
    from safetensors import safe_open
    from safetensors.torch import load_file

    from neuroprobe.subjects.dalle.dvae import DVAEEncoder

    ref = load_file(str(DATA / "dvae_encoder_tiny_parity.safetensors"))
    meta = safe_open(str(DATA / "dvae_encoder_tiny_parity.safetensors"), "pt").metadata()
    cfg = json.loads(meta["config"])
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in DVAEEncoder(**cfg).state_dict().items()}
    model = DVAEEncoder.from_state_dict(_dvae_filled(shapes, int(meta["seed"])))
    assert (model.n_hid, model.n_blk_per_group, model.vocab_size) == (cfg["n_hid"], cfg["n_blk_per_group"], cfg["vocab_size"])
    with torch.no_grad():
        logits = model(ref["in.images"])
    want = ref["out.logits"]
    assert float((logits - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert torch.equal(logits.argmax(1).reshape(2, -1), ref["out.codes"])


def test_dvae_pickle_is_read_without_running_it(tmp_path):
    """The original's pickled EncoderBlock gives its tensors through the restricted reader (no dall_e import)."""
    import sys

    from neuroprobe.subjects.archive import module_state_dict, read_module_tree
    from neuroprobe.subjects.dalle.dvae import load_dvae_encoder

    assert "dall_e" not in sys.modules
    state = module_state_dict(read_module_tree(DATA / "dvae_encoder_block.pkl"))
    want = json.loads((DATA / "dvae_encoder_block_state.json").read_text())
    assert list(state) == list(want) and all(state[k].flatten().tolist() == want[k] for k in want)
    assert "dall_e" not in sys.modules
    # a block is not an encoder: the strict loader names what is missing
    with pytest.raises(NeuroprobeError, match="blocks.input.w"):
        load_dvae_encoder(DATA / "dvae_encoder_block.pkl")
    # a pickle naming something outside the allowed set is not run; without --trust-pickle it is refused
    path = tmp_path / "encoder.pkl"
    torch.save(torch.nn.Conv2d(3, 4, 8, stride=8), path)
    import zipfile

    evil = tmp_path / "evil.pkl"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R." if item.endswith("/data.pkl") else src.read(item))
    with pytest.raises(NeuroprobeError, match="--trust-pickle"):
        load_dvae_encoder(evil)
