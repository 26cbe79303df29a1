"""Transformers-native subjects: what the electrodes record is what the model computes.

Every subject is a tiny random-init model of the real architecture, built offline by
:func:`neuroprobe.testing.make_tiny`, saved with ``save_pretrained`` and loaded back
through ``load_subject(name, weights=folder)``.  Ground truth is computed without
neuroprobe's electrodes: plain torch hooks, ``output_hidden_states=True``, the
MLP's own up-projection and activation, and the heads' own losses.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.stimuli.battery import Battery
from neuroprobe.subjects.base import Site
from neuroprobe.subjects.registry import load_subject
from neuroprobe.testing import FFN, HIDDEN, LAYERS, SUBJECT_FOR_ARCH

#: every transformers-native text subject (CLIP: its text tower)
TEXT_ARCHS = ["bert", "minilm", "roberta", "xlnet", "bart", "t5", "t5-gated", "gpt2", "blenderbot", "clip"]
MONTAGES = ["mlp", "resid", "attn", "all"]
NO_ATTN = {"xlnet"}  # XLNet's attention output projection is a bare parameter, not a module

CLOZE = "I thought about my grandmother all day. In one word, this is about my {mask}."


def _battery() -> Battery:
    rows = [
        ("g0", "grandmother", "screening", "I thought about my grandmother all day.", CLOZE, "grandmother"),
        ("d0", "dog", "screening", "A dog.", "A photo of a {mask}.", "dog"),
        ("g1", "grandmother", "testing", "Yesterday I saw a picture of my grandma in Paris with a red cat.",
         "Yesterday I saw my grandma. In one word, this is about my {mask}.", "grandmother"),
        ("d1", "dog", "testing", "Everyone was talking about the dog.", "Everyone was talking about the {mask}.", "dog"),
    ]
    table = pd.DataFrame(rows, columns=["id", "concept", "split", "text", "cloze", "target"])
    table["modality"], table["form"] = "text", "text-name"
    concepts = {"grandmother": {"prompt": "my grandmother", "names": ["grandmother", "grandma"]},
                "dog": {"prompt": "a dog", "names": ["dog"]}}
    return Battery.from_table(table, concepts, name="tiny")


BATTERY = _battery()
_SUBJECTS: dict[tuple[str, bool], Any] = {}


@pytest.fixture
def subject_for(tiny_dir) -> Callable[..., Any]:
    """Load (once per session) the tiny subject of an architecture."""

    def get(arch: str, heads: bool = False):
        key = (arch, heads)
        if key not in _SUBJECTS:
            _SUBJECTS[key] = load_subject(SUBJECT_FOR_ARCH[arch], weights=tiny_dir(arch), device="cpu",
                                          heads=heads, quiet=True)
        return _SUBJECTS[key]

    return get


def _text_sites(subject, montage: str) -> list[Site]:
    # CLIP shown text runs only its text tower; every other subject here is text-only
    return [s for s in subject.sites(montage) if not s.name.startswith("vision.")]


# ---------------------------------------------------------------- direct values


def _direct(model: torch.nn.Module, sites: list[Site], run: Callable[[], Any]) -> dict[tuple[str, str], list[Any]]:
    """Every call's native input args / output at the sites' modules, with plain torch hooks."""
    seen: dict[tuple[str, str], list[Any]] = defaultdict(list)
    handles = []
    for module, direction in {(s.module, s.direction) for s in sites}:
        mod = model.get_submodule(module)
        key = (module, direction)
        if direction == "output":
            handles.append(mod.register_forward_hook(lambda m, a, o, key=key: seen[key].append(o)))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: seen[key].append(a)))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _canonical(native: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BTU":
        return native
    if layout == "TBU":  # time-major [T, B, U] -> [B, T, U]
        return native.permute(1, 0, 2)
    raise AssertionError(f"unexpected layout {layout} for a transformers text site")


def _record(subject, sites, batch) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), Electrodes(subject.model, sites) as el:
        subject.forward(batch)
    return el.data


@pytest.mark.parametrize("montage", MONTAGES)
@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_recorded_values_equal_module_values(arch: str, montage: str, subject_for) -> None:
    subject = subject_for(arch)
    if montage == "attn" and arch in NO_ATTN:
        with pytest.raises(NeuroprobeError):
            subject.sites(montage)
        return
    sites = _text_sites(subject, montage)
    assert sites, f"{arch} has no {montage} sites"
    batch = subject.encode(BATTERY.table, BATTERY)
    recorded = _record(subject, sites, batch)
    direct = _direct(subject.model, sites, lambda: subject.forward(batch))
    assert set(recorded) == {s.name for s in sites}
    for site in sites:
        calls = direct[(site.module, site.direction)]
        if site.call is None:
            assert len(calls) == 1, f"{site.module} fired {len(calls)} times but its site has no call index"
        obj = calls[site.call or 0]
        native = obj if isinstance(obj, torch.Tensor) else obj[site.index]
        expected = _canonical(native, site.layout)
        got = recorded[site.name]
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), site.name
        # canonical [B, T, U]: tokens line up with the site's stream, units with the site's kind
        assert tuple(got.shape[:2]) == tuple(batch.masks[site.stream].shape), site.name
        assert got.shape[2] == (FFN if site.kind == "mlp" else HIDDEN), site.name


def _hidden_states(arch: str, subject, batch) -> dict[str, torch.Tensor]:
    """Residual-stream site name -> block output, from ``output_hidden_states=True``."""
    inputs = dict(batch.inputs)
    model = subject.model
    last = LAYERS - 1
    with torch.inference_mode():
        if arch == "clip":
            hs = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  output_hidden_states=True).hidden_states
            return {f"text.{i}": hs[i + 1] for i in range(LAYERS)}
        if arch in ("bert", "minilm", "roberta"):
            hs = model(**inputs, output_hidden_states=True).hidden_states
            return {f"encoder.layer.{i}": hs[i + 1] for i in range(LAYERS)}
        if arch == "gpt2":  # the last entry has ln_f applied: not a block output
            inputs.pop("token_type_ids", None)
            hs = model(**inputs, output_hidden_states=True).hidden_states
            return {f"h.{i}": hs[i + 1] for i in range(last)}
        if arch == "xlnet":  # (h, g) per layer, flattened and made batch-first by XLNetModel
            hs = model(**inputs, output_hidden_states=True).hidden_states
            out = {}
            for i in range(LAYERS):
                out[f"layer.{i}"] = hs[2 * (i + 1)]
                out[f"layer.{i}.query"] = hs[2 * (i + 1) + 1]
            return out
        out = model(**inputs, output_hidden_states=True)
        # BART has no final layer norm; T5 and BlenderBot normalise the last entry
        n = LAYERS if arch == "bart" else last
        res = {f"encoder.{i}": out.encoder_hidden_states[i + 1] for i in range(n)}
        res.update({f"decoder.{i}": out.decoder_hidden_states[i + 1] for i in range(n)})
        return res


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_resid_equals_output_hidden_states(arch: str, subject_for) -> None:
    subject = subject_for(arch)
    batch = subject.encode(BATTERY.table, BATTERY)
    recorded = _record(subject, _text_sites(subject, "resid"), batch)
    expected = _hidden_states(arch, subject, batch)
    assert expected
    for name, value in expected.items():
        assert torch.equal(recorded[name], value), name


def _up_projections(arch: str, model) -> dict[str, Callable[[dict], torch.Tensor]]:
    """mlp site name -> recomputation act(up(x)) from captured up-projection outputs (per arch)."""
    out: dict[str, tuple[list[str], Callable[..., torch.Tensor]]] = {}
    for i in range(LAYERS):
        if arch in ("bert", "minilm", "roberta"):
            layer = model.encoder.layer[i]
            out[f"encoder.layer.{i}.mlp"] = ([f"encoder.layer.{i}.intermediate.dense"], layer.intermediate.intermediate_act_fn)
        elif arch == "gpt2":
            out[f"h.{i}.mlp"] = ([f"h.{i}.mlp.c_fc"], model.h[i].mlp.act)
        elif arch in ("bart", "blenderbot"):
            out[f"encoder.{i}.mlp"] = ([f"encoder.layers.{i}.fc1"], model.encoder.layers[i].activation_fn)
            out[f"decoder.{i}.mlp"] = ([f"decoder.layers.{i}.fc1"], model.decoder.layers[i].activation_fn)
        elif arch == "clip":
            out[f"text.{i}.mlp"] = ([f"text_model.encoder.layers.{i}.mlp.fc1"], model.text_model.encoder.layers[i].mlp.activation_fn)
        elif arch == "t5":
            for side, j in (("encoder", 1), ("decoder", 2)):
                ff = getattr(model, side).block[i].layer[j].DenseReluDense
                out[f"{side}.{i}.mlp"] = ([f"{side}.block.{i}.layer.{j}.DenseReluDense.wi"], ff.act)
        elif arch == "t5-gated":
            for side, j in (("encoder", 1), ("decoder", 2)):
                ff = getattr(model, side).block[i].layer[j].DenseReluDense
                base = f"{side}.block.{i}.layer.{j}.DenseReluDense"
                out[f"{side}.{i}.mlp"] = ([f"{base}.wi_0", f"{base}.wi_1"], lambda g, lin, act=ff.act: act(g) * lin)
        elif arch == "xlnet":  # query stream first, then the content stream
            act = model.layer[i].ff.activation_function
            out[f"layer.{i}.mlp#0"] = ([f"layer.{i}.ff.layer_1@0"], act)
            out[f"layer.{i}.mlp#1"] = ([f"layer.{i}.ff.layer_1@1"], act)
    return out


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_mlp_units_are_the_activation_of_the_up_projection(arch: str, subject_for) -> None:
    subject = subject_for(arch)
    batch = subject.encode(BATTERY.table, BATTERY)
    sites = _text_sites(subject, "mlp")
    recorded = _record(subject, sites, batch)
    recipes = _up_projections(arch, subject.model)
    modules = {m.split("@")[0] for mods, _ in recipes.values() for m in mods}
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [subject.model.get_submodule(m).register_forward_hook(
        lambda mod, a, o, m=m: captured[m].append(o)) for m in modules]
    try:
        with torch.inference_mode():
            subject.forward(batch)
            expected = {}
            for name, (mods, fn) in recipes.items():
                args = []
                for m in mods:
                    path, _, call = m.partition("@")
                    args.append(captured[path][int(call or 0)])
                expected[name] = fn(*args)
    finally:
        for h in handles:
            h.remove()
    assert set(expected) == {s.name for s in sites}
    layouts = {s.name: s.layout for s in sites}
    for name, value in expected.items():
        assert torch.equal(recorded[name], _canonical(value, layouts[name])), name


def test_xlnet_streams_are_two_sites(subject_for) -> None:
    subject = subject_for("xlnet")
    batch = subject.encode(BATTERY.table, BATTERY)
    sites = {s.name: s for s in subject.sites("all")}
    assert sites["layer.0.mlp#0"].stream == "query" and sites["layer.0.mlp#1"].stream == "text"
    assert sites["layer.0.query"].stream == "query" and sites["layer.0"].stream == "text"
    recorded = _record(subject, list(sites.values()), batch)
    B, T = batch.masks["text"].shape
    assert recorded["layer.0.mlp#0"].shape == (B, 1, FFN)
    assert recorded["layer.0.mlp#1"].shape == (B, T, FFN)
    assert recorded["layer.1.query"].shape == (B, 1, HIDDEN)


def test_site_firing_twice_without_call_index_raises(subject_for) -> None:
    subject = subject_for("xlnet")
    batch = subject.encode(BATTERY.table, BATTERY)
    site = Site("ff", "layer.0.ff.layer_2", "input", "mlp", layout="TBU")  # fires for g, then for h
    with pytest.raises(NeuroprobeError, match="more than once"):
        _record(subject, [site], batch)


def test_repeated_forward_passes_restart_call_counts(subject_for) -> None:
    # two passes in one context: each pass is counted on its own (CLIP's text tower is
    # reached through get_text_features, not through the model's own forward)
    for arch in ("clip", "xlnet"):
        subject = subject_for(arch)
        batch = subject.encode(BATTERY.table, BATTERY)
        sites = _text_sites(subject, "all")
        first = _record(subject, sites, batch)
        with torch.inference_mode(), Electrodes(subject.model, sites) as el:
            subject.forward(batch)
            subject.forward(batch)
        assert set(el.data) == set(first)
        for name in first:
            assert torch.equal(el.data[name], first[name]), (arch, name)


# ----------------------------------------------------------------- random init


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_random_init_is_same_architecture_other_values_and_seeded(arch: str, tiny_dir, subject_for) -> None:
    folder, name = tiny_dir(arch), SUBJECT_FOR_ARCH[arch]
    trained = _params(subject_for(arch).model)
    a = load_subject(name, weights=folder, init="random", seed=1, device="cpu", quiet=True)
    b = load_subject(name, weights=folder, init="random", seed=1, device="cpu", quiet=True)
    c = load_subject(name, weights=folder, init="random", seed=2, device="cpu", quiet=True)
    assert a.init == "random"
    pa, pb, pc = _params(a.model), _params(b.model), _params(c.model)
    assert {k: tuple(v.shape) for k, v in pa.items()} == {k: tuple(v.shape) for k, v in trained.items()}
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "same seed must give the same weights"
    # weights drawn at random (not constant initialisations) differ from the saved ones and between seeds
    drawn = [k for k, v in trained.items() if v.dim() == 2 and v.std() > 0]
    assert drawn
    assert all(not torch.equal(pa[k], trained[k]) for k in drawn)
    assert all(not torch.equal(pa[k], pc[k]) for k in drawn)
    assert [s.name for s in a.sites("all")] == [s.name for s in subject_for(arch).sites("all")]


# -------------------------------------------------------------------- readouts


def _one(stimulus_id: str = "g0") -> pd.DataFrame:
    return BATTERY.table[BATTERY.table["id"] == stimulus_id]


def _split_cloze(row) -> tuple[str, str, str]:
    prefix, _, suffix = row["cloze"].partition("{mask}")
    return prefix, row["target"], suffix


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_masked_lm_readout_equals_head_loss(arch: str, subject_for) -> None:
    subject = subject_for(arch, heads=True)
    scores = subject.readout(BATTERY.table, BATTERY, "masked_lm")
    assert scores.shape == (len(BATTERY),) and np.isfinite(scores).all()
    tok, head = subject.tokenizer, subject.head_model
    row = _one().iloc[0]
    prefix, target, suffix = _split_cloze(row)
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    enc = tok(prefix + tok.mask_token * len(target_ids) + suffix, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    where = enc["input_ids"][0] == tok.mask_token_id
    assert int(where.sum()) == len(target_ids)
    labels[0, where] = torch.tensor(target_ids)
    with torch.inference_mode():
        loss = head(**enc, labels=labels).loss
    assert scores[0] == pytest.approx(-float(loss) * len(target_ids), rel=1e-5, abs=1e-5)


def test_next_token_readout_equals_lm_loss_gpt2(subject_for) -> None:
    subject = subject_for("gpt2", heads=True)
    scores = subject.readout(BATTERY.table, BATTERY, "next_token")
    assert np.isfinite(scores).all()
    tok, head = subject.tokenizer, subject.head_model
    prefix, target, _ = _split_cloze(_one().iloc[0])
    p_ids = tok(prefix.rstrip())["input_ids"]
    t_ids = tok(" " + target)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    labels = torch.tensor([[-100] * len(p_ids) + t_ids])
    with torch.inference_mode():
        loss = head(input_ids=ids, labels=labels).loss
    assert scores[0] == pytest.approx(-float(loss) * len(t_ids), rel=1e-5)


def test_next_token_readout_equals_lm_loss_xlnet(subject_for) -> None:
    subject = subject_for("xlnet", heads=True)
    scores = subject.readout(BATTERY.table, BATTERY, "next_token")
    assert np.isfinite(scores).all()
    tok, head = subject.tokenizer, subject.head_model
    prefix, target, _ = _split_cloze(_one().iloc[0])
    p_ids = tok(prefix.rstrip(), add_special_tokens=False)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    n, T = len(t_ids), len(p_ids) + len(t_ids)
    perm = torch.zeros(1, T, T)
    perm[0, :, len(p_ids):] = 1.0  # the targets are hidden from every position
    mapping = torch.zeros(1, n, T)
    for k in range(n):
        mapping[0, k, len(p_ids) + k] = 1.0
    with torch.inference_mode():
        loss = head(input_ids=torch.tensor([p_ids + t_ids]), perm_mask=perm, target_mapping=mapping,
                    labels=torch.tensor([t_ids])).loss
    assert scores[0] == pytest.approx(-float(loss) * n, rel=1e-5)


# the decoder text each seq2seq subject is scored on, and where the target sits in it
_DECODER = {
    "bart": lambda p, t, s: (p + t + s, len(p)),
    "blenderbot": lambda p, t, s: (t + s, 0),
    "t5": lambda p, t, s: (f"<extra_id_0> {t} <extra_id_1>", len("<extra_id_0> ")),
    "t5-gated": lambda p, t, s: (f"<extra_id_0> {t} <extra_id_1>", len("<extra_id_0> ")),
}
_ENCODER = {
    "bart": lambda p, s: p + "<mask>" + s,
    "blenderbot": lambda p, s: p,
    "t5": lambda p, s: p + "<extra_id_0>" + s,
    "t5-gated": lambda p, s: p + "<extra_id_0>" + s,
}


@pytest.mark.parametrize("arch", ["bart", "t5", "t5-gated", "blenderbot"])
def test_seq2seq_readout_equals_teacher_forced_loss(arch: str, subject_for) -> None:
    subject = subject_for(arch, heads=True)
    scores = subject.readout(BATTERY.table, BATTERY, "seq2seq")
    assert scores.shape == (len(BATTERY),) and np.isfinite(scores).all()
    tok, head = subject.tokenizer, subject.head_model
    prefix, target, suffix = _split_cloze(_one().iloc[0])  # the prefix names the target too
    dec_text, start = _DECODER[arch](prefix, target, suffix)
    dec = tok(dec_text, return_offsets_mapping=True)
    ids = dec["input_ids"]
    inside = [i for i, (a, b) in enumerate(dec["offset_mapping"]) if b > a and a < start + len(target) and b > start]
    assert inside and "".join(tok.convert_ids_to_tokens([ids[i] for i in inside])).strip("▁Ġ ").lower().endswith(
        target[-3:])
    labels = torch.full((1, len(ids)), -100)
    labels[0, inside] = torch.tensor([ids[i] for i in inside])
    # decoder inputs: the full decoder text shifted right, as the readout feeds it
    full = torch.tensor([ids])
    start_id = head.config.decoder_start_token_id
    dec_in = torch.cat([torch.tensor([[start_id]]), full[:, :-1]], dim=1)
    enc = tok(_ENCODER[arch](prefix, suffix), return_tensors="pt")
    with torch.inference_mode():
        loss = head(**enc, decoder_input_ids=dec_in, labels=labels).loss
    assert scores[0] == pytest.approx(-float(loss) * len(inside), rel=1e-5)


@pytest.mark.parametrize("arch", ["minilm", "bert"])
def test_prototype_readout_equals_direct_cosine_softmax(arch: str, subject_for) -> None:
    from neuroprobe.subjects.hf import PROTOTYPE_TEMPERATURE

    subject = subject_for(arch)
    subject.prepare_readout(BATTERY, "prototype")
    scores = subject.readout(BATTERY.table, BATTERY, "prototype")
    assert np.isfinite(scores).all() and (scores <= 0).all()
    tok, model = subject.tokenizer, subject.model

    def embed(text: str) -> np.ndarray:
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state[0].double().numpy()
        v = h.mean(0)  # one unpadded text: the mean over its tokens
        return v / np.linalg.norm(v)

    concepts = list(BATTERY.concepts)
    protos = np.stack([embed(BATTERY.concepts[c]["prompt"]) for c in concepts])
    for i, row in BATTERY.table.iterrows():
        logits = protos @ embed(row["text"]) / PROTOTYPE_TEMPERATURE
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert scores[i] == pytest.approx(logp[concepts.index(row["concept"])], abs=1e-4)


# ------------------------------------------------------------ loading, errors


def test_packaged_minilm_loads_offline_and_matches_sentence_transformers(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    subject = load_subject("minilm", device="cpu", quiet=True)
    assert subject.init == "pretrained" and 22_000_000 < subject.n_parameters < 23_500_000
    from sentence_transformers import SentenceTransformer

    from neuroprobe.subjects.hf import _embed

    texts = ["my grandmother", "A photo of a dog in Paris."]
    with torch.inference_mode():
        ours = _embed(subject, texts).numpy()
    reference = SentenceTransformer(subject.checkpoint, device="cpu").encode(texts, normalize_embeddings=True)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert (cosine > 0.9999).all(), cosine


def test_missing_weights_offline_is_one_sentence(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = (
        "from neuroprobe.subjects.registry import load_subject\n"
        "from neuroprobe.errors import MissingWeightsError\n"
        "try:\n    load_subject('bert', device='cpu', quiet=True)\n"
        "except MissingWeightsError as err:\n    print('MISSING:' + str(err))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MISSING:")]
    assert len(lines) == 1, out.stdout + out.stderr
    message = lines[0][len("MISSING:"):]
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0
    assert "google-bert/bert-base-uncased" in message and "--weights" in message and "model.safetensors" in message
    assert "config.json" not in message  # the published config ships with neuroprobe


def test_incomplete_weights_folder_names_the_missing_files(tmp_path: Path, tiny_dir) -> None:
    with pytest.raises(MissingWeightsError, match="not a folder"):
        load_subject("bert", weights=tmp_path / "nowhere", device="cpu", quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError) as err:
        load_subject("bert", weights=tmp_path / "empty", device="cpu", quiet=True)
    message = str(err.value)
    assert "config.json" in message and "model.safetensors" in message and "tokenizer" in message
    assert "\n" not in message and message.endswith(".")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_dir("bert").iterdir():
        if f.name != "model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MissingWeightsError) as err:
        load_subject("bert", weights=partial, device="cpu", quiet=True)
    message = str(err.value)
    assert "model.safetensors" in message and "config.json" not in message and "tokenizer" not in message


def test_unknown_subject_raises() -> None:
    with pytest.raises(NeuroprobeError, match="unknown subject"):
        load_subject("no-such-model")


def test_meena_prints_its_stand_in_note(tiny_dir, capsys) -> None:
    subject = load_subject("meena", weights=tiny_dir("blenderbot"), device="cpu")
    err = capsys.readouterr().err
    assert "Meena's weights were never released" in err and "BlenderBot" in err
    assert len([line for line in err.splitlines() if line.startswith("meena:")]) == 1
    assert subject.arch.kind == "seq2seq"
    load_subject("meena", weights=tiny_dir("blenderbot"), device="cpu", quiet=True)
    assert "meena:" not in capsys.readouterr().err


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_concept_masks_mark_the_concept_word(arch: str, subject_for) -> None:
    subject = subject_for(arch)
    batch = subject.encode(BATTERY.table, BATTERY)
    ids, cmask, mask = batch.token_ids["text"], batch.concept_masks["text"], batch.masks["text"]
    assert not (cmask & ~mask).any(), "padding marked as concept"
    for i, row in BATTERY.table.iterrows():
        names = {n.lower() for n in BATTERY.concepts[row["concept"]]["names"]}
        word = subject.tokenizer.decode(ids[i][cmask[i]].tolist()).strip(" .,").lower()
        assert word in names, (row["text"], word)
    if "decoder" in batch.concept_masks:  # the decoder reads the text shifted right by one
        dec, dmask = batch.token_ids["decoder"], batch.concept_masks["decoder"]
        assert torch.equal(batch.inputs["decoder_input_ids"], dec)
        for i, row in BATTERY.table.iterrows():
            real = dec[i][batch.masks["decoder"][i]]
            assert real[0] == subject.model.config.decoder_start_token_id
            assert torch.equal(real[1:], ids[i][mask[i]][:-1])
            names = {n.lower() for n in BATTERY.concepts[row["concept"]]["names"]}
            assert subject.tokenizer.decode(dec[i][dmask[i]].tolist()).strip(" .,").lower() in names


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_padding_never_changes_a_stimulus_values(arch: str, subject_for) -> None:
    # each stimulus recorded alone equals its unpadded positions recorded in a padded batch
    subject = subject_for(arch)
    sites = _text_sites(subject, "all")
    batch = subject.encode(BATTERY.table, BATTERY)
    together = _record(subject, sites, batch)
    for i in range(len(BATTERY)):
        alone_batch = subject.encode(BATTERY.table.iloc[i : i + 1], BATTERY)
        alone = _record(subject, sites, alone_batch)
        for site in sites:
            padded = together[site.name][i][batch.masks[site.stream][i]]
            single = alone[site.name][0][alone_batch.masks[site.stream][0]]
            assert padded.shape == single.shape, site.name
            torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-5, msg=site.name)


def test_hf_prefix_loads_any_local_folder(tiny_dir) -> None:
    subject = load_subject(f"hf:{tiny_dir('bert')}", device="cpu", quiet=True)
    assert subject.arch.kind == "encoder"
    assert [s.name for s in subject.sites("mlp")] == [f"encoder.layer.{i}.mlp" for i in range(LAYERS)]
    batch = subject.encode(BATTERY.table, BATTERY)
    recorded = _record(subject, subject.sites("mlp"), batch)
    assert recorded["encoder.layer.0.mlp"].shape == (len(BATTERY), batch.masks["text"].shape[1], FFN)


@pytest.mark.parametrize("arch", sorted(SUBJECT_FOR_ARCH))
def test_tiny_folder_loads_base_and_head_without_missing_weights(arch: str, tiny_dir) -> None:
    import transformers

    from neuroprobe.subjects.hf import ARCHITECTURES

    spec = ARCHITECTURES["t5" if arch == "t5-gated" else arch]
    folder = tiny_dir(arch)
    for cls_name in {spec.base, spec.head}:
        model, info = getattr(transformers, cls_name).from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"], (cls_name, info["missing_keys"])
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) <= model.config.get_text_config().vocab_size
    assert tok.pad_token is not None or arch == "gpt2"


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_half_precision_records_or_says_why_not(arch: str, tiny_dir) -> None:
    name = SUBJECT_FOR_ARCH[arch]
    if arch == "xlnet":
        with pytest.raises(NeuroprobeError, match="float32 only"):
            load_subject(name, weights=tiny_dir(arch), dtype="bfloat16", device="cpu", quiet=True)
        return
    subject = load_subject(name, weights=tiny_dir(arch), dtype="bfloat16", device="cpu", quiet=True)
    batch = subject.encode(BATTERY.table, BATTERY)
    recorded = _record(subject, _text_sites(subject, "resid"), batch)
    assert recorded and all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in recorded.values())


@pytest.mark.parametrize("arch", ["gpt2", "t5", "clip"])
def test_make_tiny_is_deterministic(arch: str, tmp_path: Path, tiny_dir) -> None:
    from neuroprobe.testing import make_tiny

    again = make_tiny(arch, tmp_path / arch)
    other = make_tiny(arch, tmp_path / f"{arch}-1", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir(arch) / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
