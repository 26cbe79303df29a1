"""The generic batched lesion engine: a replica-safe readout called once on tiled stimuli, prefix-cached.

Every test compares ``LesionStudy.evaluate_many`` (batched, prefix-cached) with ``evaluate`` (one lesion at a
time through ``lesion()``), the reference path, on real models: MiniLM, the organism's two towers, and tiny
random-init GPT-2, BERT and Llama saved with ``save_pretrained`` and loaded as ``hf:DIR``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import Battery, load_subject
from neuroprobe.lesions import LesionStudy
from neuroprobe.lesions.staged import GenericRunner, resolve_blocks
from neuroprobe.subjects import offline
from neuroprobe.subjects.base import replica_safe

KIN = ["mother", "dog", "red"]
MODES = (("zero", None), ("mean", None), ("scale", 0.3), ("resample", None))


def close(single: list[pd.Series], many: list[pd.Series], scale: float = 1.0) -> None:
    """Equal up to the backend's rounding of batch-size-dependent products: 1e-5 of the readout's scale."""
    assert len(single) == len(many)
    for a, b in zip(single, many):
        np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-5 * scale)


def moved(changes: list[pd.Series]) -> float:
    return max(float(np.abs(c.to_numpy()).max()) for c in changes)


def kinship(per: int = 3) -> Battery:
    """``per`` stimuli of each of three kinship concepts per split."""
    full = Battery.load("kinship")
    rows = full.table[full.table["concept"].isin(KIN)].groupby(["concept", "split"], sort=False).head(per)
    return Battery.from_table(rows, concepts={c: full.concepts[c] for c in KIN}, name="kin3", root=full.root)


@contextlib.contextmanager
def sub_block_calls(model: torch.nn.Module, blocks: list[str]):
    """Per sub-block (direct child) of each block: how many modules inside it ran (its hooks fire even when it
    is stood in, its insides run only when it computes).  Sub-blocks with nothing inside are left out."""
    counts: dict[str, int] = {}
    handles = []
    for name in blocks:
        for child, module in model.get_submodule(name).named_children():
            key = f"{name}.{child}"
            for inner in list(module.modules())[1:]:
                counts[key] = 0
                handles.append(inner.register_forward_hook(lambda m, a, o, _k=key: counts.__setitem__(_k, counts[_k] + 1)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def lesions_at(study: LesionStudy, rng: np.random.Generator, n: int = 3) -> list[dict[str, np.ndarray]]:
    """``n`` random active units at each study site alone, all sites together, and an empty lesion."""
    one = [{s: np.sort(rng.choice(np.flatnonzero(study.active[s]), n, replace=False))} for s in study.site_names]
    both = {s: u for les in one for s, u in les.items()}
    return one + [both, {}]


def check_modes(study: LesionStudy, lesions: list[dict[str, np.ndarray]], scale: float = 1.0) -> None:
    for mode, factor in MODES:
        single = [study.evaluate(u, mode, factor=factor) for u in lesions]
        many = study.evaluate_many(lesions, mode, factor=factor)
        close(single, many, scale)
        assert moved(single) > 1e-5 * scale, mode  # the lesions do something: the comparison could fail
        assert moved([single[-1]]) == 0.0  # the empty lesion changes nothing


# ------------------------------------------------------------------ MiniLM


@pytest.fixture(scope="module")
def minilm_study() -> LesionStudy:
    torch.set_num_threads(1)
    subject = load_subject("minilm", device="cpu", quiet=True)
    return LesionStudy(subject, kinship(4), None, sites="encoder.layer.0.mlp,encoder.layer.5.mlp", quiet=True,
                       batch_size=5)


def test_minilm_batched_cached_equals_one_at_a_time_in_every_mode(minilm_study):
    study = minilm_study
    assert study.engine == "batched (generic runner, prefix-cached; zero, mean, scale, resample in replicas)"
    assert isinstance(study._engine.runner, GenericRunner)
    check_modes(study, lesions_at(study, np.random.default_rng(0)))
    # resample draws are each lesion's own: not the mean, and the same draws as its single run
    les = lesions_at(study, np.random.default_rng(1))[:2]
    res, mean = study.evaluate_many(les, "resample"), study.evaluate_many(les, "mean")
    assert max(float(np.abs(a - b).max()) for a, b in zip(res, mean)) > 1e-6
    assert study._engine.runner.misses == []  # every group used the cache


def test_replica_scores_resample_draws_each_lesions_own_single_run(minilm_study):
    from neuroprobe.lesions import replicas

    study = minilm_study
    rows = study.test.head(5)
    ref = {s: r.astype(np.float64) for s, r in study.screen.items()}
    lesions = [{"encoder.layer.0.mlp": np.array([1, 5, 9])}, {"encoder.layer.5.mlp": np.array([3])},
               {"encoder.layer.0.mlp": np.array([7]), "encoder.layer.5.mlp": np.array([3, 8])}]
    many = replicas.replica_scores(study.subject, study.battery, rows, lesions, "resample", reference=ref, seed=3)
    single = replicas.single_scores(study.subject, study.battery, rows, lesions, "resample", reference=ref, seed=3)
    np.testing.assert_allclose(many, single, rtol=0, atol=1e-5)
    other = replicas.single_scores(study.subject, study.battery, rows, lesions, "resample", reference=ref, seed=4)
    assert np.abs(single - other).max() > 1e-6  # the draws matter: another seed gives other numbers


def test_prefix_cache_skips_the_blocks_before_the_cut(minilm_study):
    study = minilm_study
    assert isinstance(study._engine.runner, GenericRunner)  # the generic runner's stand-ins, not a hand-written resume
    model = study.subject.model
    blocks = resolve_blocks(study.subject)["text"]
    rng = np.random.default_rng(2)
    last = [{"encoder.layer.5.mlp": np.sort(rng.choice(1536, 4, replace=False))} for _ in range(3)]
    with sub_block_calls(model, blocks) as calls:
        study.evaluate_many(last)
    for i in range(5):  # layers before the lesioned one do not run at all
        assert all(calls[f"encoder.layer.{i}.{c}"] == 0 for c in ("attention", "intermediate", "output")), calls
    # in the lesioned layer, the sub-blocks it calls before the lesioned MLP output do not run either
    assert calls["encoder.layer.5.attention"] == 0 and calls["encoder.layer.5.intermediate"] == 0
    n_batches = len(study._engine.prepared())
    per_pass = 3  # output.dense, output.dropout, output.LayerNorm: once per evaluation batch for the three lesions
    assert calls["encoder.layer.5.output"] == per_pass * n_batches
    first = [{"encoder.layer.0.mlp": np.array([1, 2])}]
    with sub_block_calls(model, blocks) as calls:
        study.evaluate_many(first)
    assert calls["encoder.layer.0.attention"] == 0 and calls["encoder.layer.0.output"] == per_pass * n_batches
    assert all(calls[f"encoder.layer.{i}.attention"] > 0 for i in range(1, 6))
    # without the prefix cache every block runs, and the numbers are the same
    study._engine.prefix_cache = False
    try:
        with sub_block_calls(model, blocks) as calls:
            uncached = study.evaluate_many(last)
        assert all(v > 0 for v in calls.values()), calls
    finally:
        study._engine.prefix_cache = True
    close(study.evaluate_many(last), uncached)


def test_memory_budget_chunks_the_replicas_with_the_same_numbers(minilm_study):
    study = minilm_study
    model = study.subject.model
    lesions = lesions_at(study, np.random.default_rng(3))[:-1] * 2
    n_batches = len(study._engine.prepared())
    with sub_block_calls(model, ["encoder.layer.5"]) as calls:
        whole = study.evaluate_many(lesions, "mean")
    groups, per_pass = 2, 3  # lesions touching layer 0 start there, the others at layer 5; output's 3 modules
    assert calls["encoder.layer.5.output"] == groups * per_pass * n_batches
    budget = study._engine.memory
    study._engine.memory = 1.0  # one replica per pass
    try:
        with sub_block_calls(model, ["encoder.layer.5"]) as calls:
            chunked = study.evaluate_many(lesions, "mean")
        assert calls["encoder.layer.5.output"] == len(lesions) * per_pass * n_batches
    finally:
        study._engine.memory = budget
    close(whole, chunked)
    # a budget the recorded intact pass does not fit: it is not kept, each batch's is recorded again when needed
    from neuroprobe.lesions.staged import BatchedEvaluator

    tight = BatchedEvaluator(study._engine.runner, study.test, batch_size=5, memory_mb=1e-3)
    np.testing.assert_array_equal(tight.intact(), study.baseline)
    assert tight._prepared is None
    scores = tight.scores(lesions, "mean", reference=study.screen, sites={s.name: s for s in study.subject.sites("all")})
    np.testing.assert_allclose(scores, study.scores_many(lesions, "mean"), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the organism: two chains


@replica_safe
def _embedding_score(subject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Each stimulus's joint embedding against a fixed direction per concept: images and texts in separate passes."""
    concepts = list(battery.concepts)
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(len(concepts), subject.model.config.embed_dim, generator=g), dim=-1)
    out = np.zeros(len(stimuli))
    for modality in ("image", "text"):
        rows = (stimuli["modality"] == modality).to_numpy()
        if rows.any():
            img, txt = subject.forward(subject.encode(stimuli[rows], battery))
            emb = img if modality == "image" else txt
            idx = torch.tensor([concepts.index(c) for c in stimuli.loc[rows, "concept"]])
            out[rows] = (emb * directions[idx]).sum(-1).double().numpy()
    return out


@pytest.fixture(scope="module")
def organism_study() -> LesionStudy:
    torch.set_num_threads(1)
    subject = load_subject("organism", device="cpu", quiet=True)
    subject.readouts = dict(subject.readouts, embedding=_embedding_score)
    subject.block_inputs = {"joint": ("image", "text")}
    full = Battery.load("digits")
    rows = full.table[full.table["concept"].isin(["one", "seven", "nine"])]
    rows = rows.groupby(["concept", "modality", "split"], sort=False).head(2)
    battery = Battery.from_table(rows, concepts=full.concepts, name="digits", root=full.root)
    return LesionStudy(subject, battery, None, sites="image.conv1,text.proj,joint.embed", readout="embedding",
                       quiet=True, batch_size=8)


def test_organism_two_chains_batched_cached_equals_one_at_a_time(organism_study):
    study = organism_study
    assert study.engine.startswith("batched (generic runner, prefix-cached")
    # the first image block, the last text block, the shared embedding; image and text units together
    check_modes(study, lesions_at(study, np.random.default_rng(4)))
    assert study._engine.runner.misses == []
    # a text lesion leaves the image tower to the cache (a chain no lesion reaches) but the shared embedding,
    # which reads both towers (block_inputs), runs
    model = study.subject.model
    blocks = resolve_blocks(study.subject)
    text_only = [{"text.proj": np.array([0, 3])}]
    counted = [b for b in blocks["image"] + blocks["text"] if list(model.get_submodule(b).children())]
    with sub_block_calls(model, counted) as calls:
        embed = []
        handle = model.embed.register_forward_pre_hook(lambda m, a: embed.append(a[0].shape[0]))
        try:
            study.evaluate_many(text_only)
        finally:
            handle.remove()
    assert counted and all(v == 0 for v in calls.values()), calls
    assert embed  # the joint embedding ran on the lesioned texts


def test_organism_runner_takes_resample_in_replicas_too(organism_study):
    subject, battery = organism_study.subject, organism_study.battery
    study = LesionStudy(subject, battery, None, sites="image.fc,text.layers.0.mlp.act,joint.embed", quiet=True,
                        batch_size=8)
    assert study.engine.startswith("batched (organism runner") and "resample" in study.engine
    lesions = lesions_at(study, np.random.default_rng(8))
    single = [study.evaluate(u, "resample") for u in lesions]
    close(single, study.evaluate_many(lesions, "resample"))
    assert moved(single) > 1e-3


def test_undeclared_chain_input_is_caught_and_the_group_runs_without_cache(organism_study):
    study = organism_study
    runner = study._engine.runner
    saved = runner.depends
    runner.depends = {c: set() for c in runner.blocks}  # as if the joint embedding read no tower
    try:
        lesions = [{"image.conv1": np.array([0, 1])}, {"text.proj": np.array([2])}]
        many = study.evaluate_many(lesions)
        assert runner.misses and "embed" in runner.misses[-1]
    finally:
        runner.depends = saved
    close([study.evaluate(u) for u in lesions], many)


# ------------------------------------------------------------------ hf:DIR models


def _save(folder: Path, model, tok) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return f"hf:{folder}"


@replica_safe
def _mean_hidden_score(subject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Mean last hidden state (one padded pass, no key/value cache) against a fixed direction per concept."""
    concepts = list(battery.concepts)
    enc = subject.tokenizer(stimuli["text"].tolist(), padding=True, return_tensors="pt")
    hidden = subject.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1)
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(len(concepts), hidden.shape[-1], generator=g)
    idx = torch.tensor([concepts.index(c) for c in stimuli["concept"]])
    return (emb * directions[idx]).sum(-1).double().numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    import transformers as T

    root = tmp_path_factory.mktemp("hfdirs")
    torch.manual_seed(0)
    out = {}
    bert = offline.build_tokenizer("bert-wordpiece-uncased")
    out["bert"] = _save(root / "bert", T.BertModel(T.BertConfig(
        vocab_size=len(bert), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)), bert)
    gpt = offline.build_tokenizer("gpt2-bpe")
    gpt.pad_token = gpt.eos_token
    out["gpt2"] = _save(root / "gpt2", T.GPT2Model(T.GPT2Config(vocab_size=len(gpt), n_embd=32, n_layer=3, n_head=2,
                                                               n_positions=64)), gpt)
    out["xlnet"] = _save(root / "xlnet", T.XLNetModel(T.XLNetConfig(vocab_size=len(gpt), d_model=32, n_layer=3, n_head=2,
                                                                     d_inner=64)), gpt)
    out["llama"] = _save(root / "llama", T.LlamaModel(T.LlamaConfig(
        vocab_size=len(gpt), hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)), gpt)
    return out


def test_hf_dir_bert_prototype_batched_cached_equals_one_at_a_time(hf_dirs):
    subject = load_subject(hf_dirs["bert"], device="cpu", quiet=True)
    study = LesionStudy(subject, kinship(2), None, sites="encoder.layer.0.mlp,encoder.layer.2.mlp", readout="prototype",
                        quiet=True, batch_size=4)
    assert study.engine.startswith("batched (generic runner, prefix-cached")
    check_modes(study, lesions_at(study, np.random.default_rng(5), n=8))
    assert study._engine.runner.misses == []


@pytest.mark.parametrize("family, blocks, sites, inner", [
    ("gpt2", "h.*", ("h.0.mlp", "h.2.mlp"), ("attn", "mlp")),
    # XLNet's blocks are time-major ([T, B, D]): stand-ins tile along the batch axis their first argument has
    ("xlnet", "layer.*", ("layer.0.mlp#0", "layer.2.mlp#0"), ("rel_attn", "ff")),
])
def test_hf_dir_decoder_blocks_batched_cached_equals_one_at_a_time(hf_dirs, family, blocks, sites, inner):
    subject = load_subject(hf_dirs[family], device="cpu", quiet=True)
    subject.arch = dataclasses.replace(subject.arch, blocks=(blocks,))  # the block order as data
    subject.readouts = dict(subject.readouts, embedding=_mean_hidden_score)
    study = LesionStudy(subject, kinship(2), None, sites=",".join(sites), readout="embedding", quiet=True, batch_size=4)
    assert study.engine.startswith("batched (generic runner, prefix-cached")
    scale = float(np.abs(study.baseline).max())
    check_modes(study, lesions_at(study, np.random.default_rng(6), n=8), scale)
    assert study._engine.runner.misses == []
    prefix = blocks[:-1]
    with sub_block_calls(subject.model, [f"{prefix}{i}" for i in range(3)]) as calls:
        study.evaluate_many([{sites[1]: np.array([1, 5])}])
    attn, mlp = inner
    assert all(calls[f"{prefix}{i}.{c}"] == 0 for i in (0, 1) for c in inner), calls
    assert calls[f"{prefix}2.{attn}"] == 0 and calls[f"{prefix}2.{mlp}"] > 0


def test_hf_model_of_unknown_structure_is_batched_without_prefix_cache(hf_dirs):
    subject = load_subject(hf_dirs["llama"], device="cpu", quiet=True)
    assert not subject.block_order
    subject.readouts = dict(subject.readouts, embedding=_mean_hidden_score)
    study = LesionStudy(subject, kinship(2), None, sites="mlp", readout="embedding", quiet=True, batch_size=4)
    assert study.engine.startswith("batched (generic runner without prefix cache: subject 'hf:")
    assert "declares no block order" in study.engine
    lesions = lesions_at(study, np.random.default_rng(7), n=6)
    scale = float(np.abs(study.baseline).max())
    for mode in ("zero", "resample"):
        close([study.evaluate(u, mode) for u in lesions], study.evaluate_many(lesions, mode), scale)
    # a readout not marked replica-safe on such a model: one at a time, saying why
    subject.readouts["plain"] = lambda s, rows, b: _mean_hidden_score(s, rows, b)
    with pytest.warns(UserWarning, match="one at a time: readout 'plain' of 'hf:.*' is not marked replica-safe and "
                                         "neuroprobe does not know the model's structure"):
        LesionStudy(subject, kinship(2), None, sites="mlp", readout="plain", quiet=True, batch_size=4)

