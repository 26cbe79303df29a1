"""Every registered subject offline: shipped configs, offline tokenizers, one message naming every
missing piece, a hub that does not answer, generic sites of unknown architectures, and the
untrained control recorded with ``--init random`` (tiny configs here; real size under ``-m slow``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.recording.reader import open_recording
from neuroprobe.recording.recorder import Recorder
from neuroprobe.stimuli.battery import Battery
from neuroprobe.subjects import offline
from neuroprobe.subjects.registry import REGISTRY, get_spec, load_subject, requirements

PROBES = Path(__file__).resolve().parents[1] / "probes"
HF_LOADER = "neuroprobe.subjects.hf:load_hf_subject"


def _params(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}[text[-1]]
    return float(text[:-1]) * scale


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean offline machine: empty Hugging Face and torch caches, nothing downloaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "MPLBACKEND": "Agg",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)
    env.update(extra)
    return env


def short_battery(name: str, out: Path, per: int = 1, concepts: int = 2) -> Path:
    """The first ``concepts`` concepts of a shipped battery, ``per`` stimuli of each modality each."""
    src = PROBES / name
    meta = json.loads((src / "battery.json").read_text(encoding="utf-8"))
    keep = list(meta["concepts"])[:concepts]
    meta["concepts"] = {k: meta["concepts"][k] for k in keep}
    meta["name"] = out.name
    table = pd.read_csv(src / "stimuli.csv", keep_default_na=False, dtype=str)
    table = table[table["concept"].isin(keep)].groupby(["concept", "modality"], sort=False).head(per)
    out.mkdir(parents=True, exist_ok=True)
    (out / "battery.json").write_text(json.dumps(meta), encoding="utf-8")
    table.to_csv(out / "stimuli.csv", index=False)
    for image in table["image"]:
        if image:
            (out / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / image, out / image)
    return out


def battery_for(name: str) -> str:
    """The shipped battery whose stimuli reach every stream of subject ``name`` without a detector."""
    if name == "organism":
        return "digits"
    if name == "clip" or name.startswith("clip-rn"):
        return "pictures"
    return "kinship"  # region subjects run text stimuli with a blank/global region: both streams fire


# ------------------------------------------------------------------ shipped data


def test_every_transformers_subject_ships_its_config() -> None:
    for spec in REGISTRY.values():
        if spec.loader == HF_LOADER and "package" not in spec.extra:
            ship = offline.shipped(spec.checkpoint)
            assert ship is not None and ship.config_file.is_file(), spec.name
            assert ship.licence == spec.licence, spec.name
            assert ship.tokenizer in offline.RECIPES and offline.recipe_available(ship.tokenizer), spec.name


def test_shipped_configs_have_the_published_parameter_counts() -> None:
    """A model built from each shipped config has the registry's (published) parameter count."""
    import transformers

    from neuroprobe.subjects.hf import ARCHITECTURES

    for spec in REGISTRY.values():
        ship = offline.shipped(spec.checkpoint)
        if ship is None:
            continue
        head = ARCHITECTURES[spec.arch].head
        with torch.device("meta"):
            model = getattr(transformers, head)(ship.config())
        n = sum(p.numel() for p in model.parameters())
        want = _params(spec.params)
        # the registry rounds to three digits: 110M means 109.5M..110.5M
        assert abs(n - want) <= 0.5 * 10 ** (len(str(int(want))) - 3), (spec.name, n, spec.params)


def test_exact_tokenizers_give_the_published_ids() -> None:
    bert = offline.build_tokenizer("bert-wordpiece-uncased")
    assert bert("hello world")["input_ids"] == [101, 7592, 2088, 102]
    gpt2 = offline.build_tokenizer("gpt2-bpe")
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert gpt2.eos_token_id == 50256 and len(gpt2) == 50257
    clip = offline.build_tokenizer("clip-bpe")
    assert clip("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip) == 49408 and clip.model_max_length == 77


@pytest.mark.parametrize("name", ["roberta", "bart", "meena", "t5", "xlnet"])
def test_substitute_tokenizers_fit_the_model(name: str) -> None:
    """Stand-ins keep the model's special-token ids and never leave its vocabulary."""
    ship = offline.shipped(get_spec(name).checkpoint)
    assert not offline.RECIPES[ship.tokenizer].exact
    config = ship.config()
    tok = offline.build_tokenizer(ship.tokenizer, config)
    enc = tok(["The king's daughter visited Jerusalem.", "a photo of a cat"], padding=True)
    ids = torch.tensor(enc["input_ids"])
    assert int(ids.max()) < config.vocab_size and len(tok) <= config.vocab_size
    assert tok.pad_token_id == config.pad_token_id
    for key in ("eos_token_id", "bos_token_id"):
        value = getattr(config, key, None)
        token = getattr(tok, key.replace("_id", ""), None)
        if isinstance(value, int) and token is not None:
            assert tok.convert_tokens_to_ids(token) == value, (name, key)
    assert (ids == config.pad_token_id).any()  # the shorter text is padded with the model's pad id


def test_truncated_bpe_keeps_only_merges_whose_pieces_exist() -> None:
    vocab, merges = offline.bpe_with_specials({"<pad>": 0}, 1000)
    assert len(vocab) == 1000 and len(merges) == 1000 - 1 - 256
    for merge in merges:
        a, b = merge.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


# ------------------------------------------------------------ missing pieces

_EXPECTED = {
    # pieces every message must name on a clean offline machine (pretrained weights asked for)
    "bert": ["google-bert/bert-base-uncased", "model.safetensors"],
    "roberta": ["tokenizer", "model.safetensors"],
    "t5": ["tokenizer", "model.safetensors"],
    "lxmert": ["unc-nlp/lxmert-base-uncased", "model.safetensors", "unc-nlp/frcnn-vg-finetuned"],
    "visualbert": ["uclanlp/visualbert-vqa-coco-pre", "model.safetensors", "unc-nlp/frcnn-vg-finetuned"],
    "vilbert": ["multi_task_model.bin", "unc-nlp/frcnn-vg-finetuned"],
    "dalle": ["encoder.pt", "decoder.pt", "vocab.json", "merges.txt"],
    "clip": ["openai/clip-vit-base-patch32", "model.safetensors"],
    "clip-rn50x4": ["RN50x4.pt"],
}


def test_missing_weights_message_names_every_missing_piece(tmp_path: Path) -> None:
    """One sentence per subject, naming every missing piece, raised before anything loads."""
    code = (
        "import json, sys\n"
        "from neuroprobe.subjects.registry import REGISTRY, load_subject\n"
        "from neuroprobe.errors import MissingWeightsError\n"
        "out = {}\n"
        "for name in list(REGISTRY) + ['hf:nobody/unknown-model']:\n"
        "    for init in ('pretrained', 'random'):\n"
        "        for mods in (('text',), ('text', 'image')):\n"
        "            key = f'{name}/{init}/{\"+\".join(mods)}'\n"
        "            try:\n"
        "                if name in ('organism', 'minilm') or (init == 'random' and name in REGISTRY):\n"
        "                    from neuroprobe.subjects.registry import requirements\n"
        "                    from neuroprobe.subjects.offline import preflight\n"
        "                    preflight(name, init, requirements(name, init=init), mods)\n"
        "                else:\n"
        "                    load_subject(name, init=init, device='cpu', quiet=True, modalities=mods)\n"
        "                out[key] = None\n"
        "            except MissingWeightsError as err:\n"
        "                out[key] = str(err)\n"
        "print('JSON:' + json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_offline_env(tmp_path), capture_output=True, text=True,
                         timeout=600)
    line = next((x for x in res.stdout.splitlines() if x.startswith("JSON:")), None)
    assert line, res.stdout + res.stderr
    messages = json.loads(line[5:])
    for name, pieces in _EXPECTED.items():
        message = messages[f"{name}/pretrained/text+image"]
        assert message, name
        for piece in pieces:
            assert piece in message, (name, piece, message)
        assert "\n" not in message and message.endswith(".") and ". " not in message, message
        assert "HF_HUB_OFFLINE" in message and "--init random" in message
    # the untrained control of every registered subject runs offline on text; image stimuli of the
    # region subjects need the (pretrained) detector, and that is all the message asks for
    for name in REGISTRY:
        assert messages[f"{name}/random/text"] is None, (name, messages[f"{name}/random/text"])
        message = messages[f"{name}/random/text+image"]
        if name in ("lxmert", "visualbert", "vilbert"):
            assert "unc-nlp/frcnn-vg-finetuned" in message and "1 piece" in message, message
            assert "weights of" not in message and "model.safetensors" not in message, message
        else:
            assert message is None, (name, message)
    for name in ("organism", "minilm"):
        assert messages[f"{name}/pretrained/text+image"] is None
    # an unknown hf: model offline: random init asks only for what it needs (config and tokenizer)
    unknown = messages["hf:nobody/unknown-model/random/text"]
    assert "config.json" in unknown and "tokenizer" in unknown
    assert "model.safetensors" not in unknown and "weights" not in unknown.split("—")[0]


def test_detector_is_required_only_for_image_stimuli(tmp_path: Path) -> None:
    spec = get_spec("lxmert")
    needs = requirements(spec, init="random", options={"features": None})
    detector = [n for n in needs if "frcnn" in n.what]
    assert len(detector) == 1 and detector[0].when == "images"
    if detector[0].present:
        pytest.skip("the detector is in this machine's Hugging Face cache")
    assert offline.missing_message("lxmert", "random", needs, ("text",)) is None
    message = offline.missing_message("lxmert", "random", needs, ("text", "image"))
    assert "unc-nlp/frcnn-vg-finetuned" in message and "--features" in message
    assert "model.safetensors" not in message  # random init never asks for weight files
    with_features = requirements(spec, init="random", options={"features": tmp_path / "f.h5"})
    assert offline.missing_message("lxmert", "random", with_features, ("image",)) is None


def test_unreachable_hub_fails_at_once_with_the_clear_message(tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE, but the hub does not answer: one quick check, no retries, the same clear message."""
    env = _offline_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # a closed port: refused at once
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key)
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "record", "--model", "gpt2", "--probe", "kinship",
                          "--out", str(tmp_path / "x.h5"), "-q"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuroprobe: error:"), res.stderr
    assert "unreachable" in lines[0] and "openai-community/gpt2" in lines[0] and "--init random" in lines[0]
    assert "Retrying" not in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------- defaults and sites


def test_default_battery_fits_the_subject() -> None:
    for spec in REGISTRY.values():
        battery = Battery.load(spec.default_battery)
        have = set(battery.table["modality"].unique())
        assert have <= set(spec.modalities), spec.name
        if "image" in spec.modalities:
            assert "image" in have, spec.name
    assert get_spec("organism").default_battery == "digits"
    assert get_spec("clip").default_battery == "pictures"
    assert get_spec("bert").default_battery == "kinship"


def test_never_fired_message_says_which_sites_work(tmp_path: Path) -> None:
    subject = load_subject("clip", init="random", weights=_tiny_config_dir("clip", tmp_path), device="cpu", quiet=True)
    text_only = Battery.load(short_battery("kinship", tmp_path / "kin", per=1))
    with pytest.raises(NeuroprobeError) as err:
        Recorder(subject, text_only, montage="mlp", quiet=True).run(tmp_path / "x.h5")
    message = str(err.value)
    assert "never fired" in message and "--sites 'text.*.mlp'" in message
    # following the advice works
    path = Recorder(subject, text_only, montage="text.*.mlp", quiet=True).run(tmp_path / "y.h5")
    with open_recording(path) as rec:
        assert set(rec.sites["stream"]) == {"text"}


def _llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama (an architecture neuroprobe has no entry for) with the shipped GPT-2 tokenizer."""
    import transformers

    folder = tmp_path / "llama"
    tok = offline.build_tokenizer("gpt2-bpe")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_unknown_architecture_sites_are_blocks_and_mlp_units(tmp_path: Path) -> None:
    """resid = each decoder block's output, mlp = the FFN down-projection's input (not q/k/v or every Linear)."""
    folder = _llama_dir(tmp_path)
    subject = load_subject(f"hf:{folder}", device="cpu", quiet=True)
    resid = subject.sites("resid")
    assert [s.module for s in resid] == ["layers.0", "layers.1"]
    mlp = subject.sites("mlp")
    assert [s.module for s in mlp] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert all(s.direction == "input" and s.kind == "mlp" for s in mlp)
    assert [s.module for s in subject.sites("attn")] == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]
    # the recorded values are what the modules compute: the block output and the down-projection's input
    battery = Battery.load(short_battery("kinship", tmp_path / "kin", per=1))
    path = Recorder(subject, battery, montage="resid,mlp", pooling="last", quiet=True).run(tmp_path / "r.h5")
    enc = subject.tokenizer([battery.table["text"].iloc[0]], return_tensors="pt")
    seen = {}
    hooks = [subject.model.layers[1].register_forward_hook(lambda m, i, o: seen.__setitem__("resid", o[0] if isinstance(o, tuple) else o)),
             subject.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("mlp", i[0]))]
    try:
        with torch.no_grad():
            subject.model(**enc)
    finally:
        for h in hooks:
            h.remove()
    with open_recording(path) as rec:
        for key, site in (("resid", "layers.1"), ("mlp", "layers.1.mlp")):
            got = torch.as_tensor(rec.responses(site)[0])
            want = seen[key][0, -1].float()
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), key


def test_sites_command_lists_a_montage_before_recording(tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "sites", "lxmert", "--sites", "resid"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("lang.0", "lang.8", "visn.4", "cross.4.lang", "cross.4.visn"):
        assert any(line.split()[:1] == [name] for line in res.stdout.splitlines()), (name, res.stdout)
    assert "24 sites" in res.stdout  # 9 language + 5 vision + 5 cross layers x 2 streams
    listed = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "subjects"], env=env, capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert "random only" in rows["bert"] and " yes " in rows["organism"] and " yes " in rows["minilm"]
    assert "random only (text; images need the detector)" in rows["lxmert"]  # nothing is cached here


# ------------------------------------------------- the untrained control, offline

#: Shrink a shipped config to a tiny one of the same architecture (vocabulary kept: the tokenizer's ids must fit).
_TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "visual_bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        visual_embedding_dim=2048),
    "xlnet": dict(d_model=32, n_layer=2, n_head=2, d_inner=64, d_head=16),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64),
    "blenderbot": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64),
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2),
    "lxmert": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=2, x_layers=1, r_layers=1,
                   num_hidden_layers={"language": 2, "vision": 1, "cross_encoder": 1}),
}


def _tiny_config_dir(name: str, root: Path) -> Path | None:
    spec = get_spec(name)
    if name.startswith("clip-rn"):  # the tiny shape of tests/data's parity fixture, with CLIP's full vocabulary
        from safetensors import safe_open

        with safe_open(str(Path(__file__).parent / "data" / "clip_resnet_tiny_parity.safetensors"), "pt") as fh:
            values = json.loads(fh.metadata()["config"])
        values.pop("vision_patch_size", None)
        values.update(vocab_size=49408, context_length=77)
        folder = root / f"{name}-tiny"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(values), encoding="utf-8")
        return folder
    ship = offline.shipped(spec.checkpoint)
    if ship is None:
        return None
    values = ship.config_dict()
    if values["model_type"] == "clip":
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        values["text_config"].update(small)
        values["vision_config"].update(small)
        values["projection_dim"] = 16
    else:
        values.update(_TINY[values["model_type"]])
    folder = root / f"{name}-tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values), encoding="utf-8")  # a config and nothing else
    return folder


def _streams(subject, battery) -> set[str]:
    """Streams the subject's sites can have for this battery (every stream its sites name)."""
    return {s.stream for s in subject.sites("all")}


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "dalle"])
def test_untrained_control_records_offline_tiny(name: str, tmp_path: Path) -> None:
    """Every registered subject (tiny config, --init random): a site recorded in every stream it has.

    DALL-E's tiny variant is covered by tests/test_dalle.py (its text table has 64 ids);
    the real-size loop over every subject is ``test_untrained_control_records_offline_real_size``.
    """
    options = {}
    weights = _tiny_config_dir(name, tmp_path)
    if name == "vilbert":
        from neuroprobe.subjects.vilbert.config import ViLBERTConfig

        options["config"] = dataclasses.replace(ViLBERTConfig.tiny(), vocab_size=30522)
    battery = Battery.load(short_battery(battery_for(name), tmp_path / "battery", per=1))
    subject = load_subject(name, init="random", weights=weights, device="cpu", quiet=True,
                           modalities=tuple(battery.table["modality"].unique()), **options)
    path = Recorder(subject, battery, montage="all", quiet=True).run(tmp_path / "rec.h5")
    with open_recording(path) as rec:
        recorded = set(rec.sites["stream"])
        assert rec.attrs["init"] == "random"
        for site in rec.sites["site"]:
            x = torch.as_tensor(rec.responses(site)[:])
            fired = ~torch.isnan(x).all(1)  # a tower a stimulus does not reach leaves its row NaN (CLIP)
            assert fired.any() and torch.isfinite(x[fired]).all(), site
    assert recorded == _streams(subject, battery), (recorded, _streams(subject, battery))


def test_untrained_control_cli_offline_on_a_clean_machine(tmp_path: Path) -> None:
    """`neuroprobe record --init random` with nothing cached: config and tokenizer come from the package."""
    folder = _tiny_config_dir("roberta", tmp_path)
    battery = short_battery("kinship", tmp_path / "kin", per=1)
    out = tmp_path / "r.h5"
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "record", "--model", "roberta", "--init", "random",
                          "--weights", str(folder), "--probe", str(battery), "--out", str(out), "-q"],
                         env=_offline_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_recording(out) as rec:
        assert "substitute" in str(rec.attrs["tokenizer_source"]) and "GPT-2" in str(rec.attrs["tokenizer_source"])
        assert str(rec.attrs["config_source"]).startswith("local:")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_untrained_control_records_offline_real_size(name: str, tmp_path: Path) -> None:
    """The real configs, offline, nothing cached, through the CLI: every stream the subject has is recorded."""
    battery = short_battery(battery_for(name), tmp_path / "battery", per=1)
    out = tmp_path / "rec.h5"
    command = [sys.executable, "-m", "neuroprobe.cli", "record", "--model", name, "--init", "random", "--probe",
               str(battery), "--sites", "all", "--out", str(out), "-q"]
    if name == "dalle":
        command += ["--option", "variant=mini"]  # mega (2.6B) fits in memory too, at ~11 GB; mini keeps the loop short
    env = _offline_env(tmp_path)
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open_recording(out) as rec:
        streams = set(rec.sites["stream"])
    # every stream the subject has, as `neuroprobe sites` lists them
    listed = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "sites", name, "--sites", "all"]
                            + (["--option", "variant=mini"] if name == "dalle" else []),
                            env=env, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:-1] if line.strip()]
    assert streams == {row[3] for row in rows}, (name, streams)
