"""Text subjects' readouts are replica-safe and their blocks are data (issue 23 item 1).

Every family is a tiny random-init model of the real architecture (``neuroprobe.testing.make_tiny``),
saved with ``save_pretrained`` and loaded back through ``load_subject`` (PPLM and Meena through their
own registry entries).  For each readout:

* the batched readout (one right-padded pass over all rows) equals the per-row loop it replaced,
  kept here as the reference (:func:`_old_next_token`, :func:`_old_seq2seq`, :func:`_old_masked_lm`);
* many lesions scored in one tiled call (``replicas.replica_scores``) equal each lesion on its own
  (``replicas.single_scores``), for zero / mean / scale, an empty lesion, the first and the last
  site, encoder and decoder together;
* ``resolve_blocks`` finds the declared blocks in the order a forward pass runs them.

Tolerance: scores are sums of a few log-probabilities (|score| ~ 5-30); batched and per-row
passes differ only by float rounding (padding and batch size change the matrix shapes), so
they are compared to 1e-5 of the largest |score|.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe.lesions import replicas
from neuroprobe.lesions.staged import resolve_blocks, stage_of
from neuroprobe.stimuli.battery import Battery
from neuroprobe.subjects.hf import _cloze_parts, _model_dtype, masked_cloze
from neuroprobe.subjects.registry import load_subject
from neuroprobe.subjects.widths import site_units
from neuroprobe.testing import LAYERS

#: (tiny architecture, registry subject, readout): every readout of every transformers text family
CASES = [
    ("gpt2", "gpt2", "next_token"),
    ("gpt2", "pplm", "next_token"),
    ("xlnet", "xlnet", "next_token"),
    ("bart", "bart", "seq2seq"),
    ("t5", "t5", "seq2seq"),
    ("t5-gated", "t5", "seq2seq"),
    ("blenderbot", "meena", "seq2seq"),
    ("bert", "bert", "masked_lm"),
    ("roberta", "roberta", "masked_lm"),
]
IDS = [f"{name}-{arch}-{readout}" for arch, name, readout in CASES]

#: first and last block and what a forward pass runs, per family (module names of the base model)
BLOCKS = {
    "gpt2": {"text": [f"h.{i}" for i in range(LAYERS)]},
    "xlnet": {"text": [f"layer.{i}" for i in range(LAYERS)]},
    "bart": {"encoder": [f"encoder.layers.{i}" for i in range(LAYERS)],
             "decoder": [f"decoder.layers.{i}" for i in range(LAYERS)]},
    "blenderbot": {"encoder": [f"encoder.layers.{i}" for i in range(LAYERS)],
                   "decoder": [f"decoder.layers.{i}" for i in range(LAYERS)]},
    "t5": {"encoder": [f"encoder.block.{i}" for i in range(LAYERS)],
           "decoder": [f"decoder.block.{i}" for i in range(LAYERS)]},
    "t5-gated": {"encoder": [f"encoder.block.{i}" for i in range(LAYERS)],
                 "decoder": [f"decoder.block.{i}" for i in range(LAYERS)]},
    "bert": {"text": ["embeddings"] + [f"encoder.layer.{i}" for i in range(LAYERS)]},
    "roberta": {"text": ["embeddings"] + [f"encoder.layer.{i}" for i in range(LAYERS)]},
}


def _battery() -> Battery:
    rows = [  # prefixes and targets of different lengths (padding differs row to row); one empty prefix
        ("g0", "grandmother", "I thought about my grandmother all day. In one word, this is about my {mask}.",
         "grandmother"),
        ("d0", "dog", "A photo of a {mask}.", "dog"),
        ("g1", "grandmother", "Yesterday I saw my grandma. In one word, this is about my {mask}.", "grandma"),
        ("d1", "dog", "Everyone was talking about the {mask}.", "dog"),
        ("c0", "cat", "{mask} is what the story is about.", "Cat"),
        ("c1", "cat", "This story is about my {mask}, the lion of the house.", "cat"),
    ]
    table = pd.DataFrame(rows, columns=["id", "concept", "cloze", "target"])
    table["text"] = [c.replace("{mask}", t) for c, t in zip(table["cloze"], table["target"])]
    table["split"], table["modality"], table["form"] = "testing", "text", "text-name"
    concepts = {"grandmother": {"prompt": "my grandmother", "names": ["grandmother", "grandma"]},
                "dog": {"prompt": "a dog", "names": ["dog"]}, "cat": {"prompt": "a cat", "names": ["cat"]}}
    return Battery.from_table(table, concepts, name="tiny-cloze")


BATTERY = _battery()
_LOADED: dict[tuple[str, str], Any] = {}


@pytest.fixture
def subject_for(tiny_dir):
    """Load (once per session) the tiny model of ``arch`` as registry subject ``name``, with its head."""

    def get(arch: str, name: str):
        if (arch, name) not in _LOADED:
            torch.set_num_threads(1)
            _LOADED[arch, name] = load_subject(name, weights=tiny_dir(arch), device="cpu", heads=True, quiet=True)
        return _LOADED[arch, name]

    return get


# ------------------------------------------------------ the per-row readouts they replaced (reference)


def _old_next_token(subject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """The per-row ``next_token`` loop of neuroprobe before issue 23 (one forward pass per stimulus)."""
    head = subject.require_head()
    tok = subject.tokenizer
    out = []
    for _, row in stimuli.iterrows():
        prefix, target, _ = _cloze_parts(row)
        p_ids = tok(prefix.rstrip(), add_special_tokens=False)["input_ids"]
        t_ids = tok(" " + target if prefix.endswith(" ") else target, add_special_tokens=False)["input_ids"]
        if subject.arch.kind == "xlnet":
            ids = torch.tensor([p_ids + t_ids])
            T, n = ids.shape[1], len(t_ids)
            dtype = _model_dtype(head)
            perm = torch.zeros(1, T, T, dtype=dtype)
            perm[:, :, T - n:] = 1.0
            tm = torch.zeros(1, n, T, dtype=dtype)
            tm[0, torch.arange(n), torch.arange(T - n, T)] = 1.0
            lp = head(input_ids=ids, perm_mask=perm, target_mapping=tm).logits.float().log_softmax(-1)
            out.append(float(lp[0, torch.arange(n), torch.tensor(t_ids)].sum()))
        else:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None and not p_ids else []
            ids = torch.tensor([bos + p_ids + t_ids])
            lp = head(input_ids=ids).logits.float().log_softmax(-1)
            start = len(bos) + len(p_ids)
            pos = torch.arange(start - 1, start - 1 + len(t_ids))
            out.append(float(lp[0, pos, torch.tensor(t_ids)].sum()))
    return np.array(out)


def _old_seq2seq(subject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """The per-row ``seq2seq`` loop of neuroprobe before issue 23 (one forward pass per stimulus)."""
    head = subject.require_head()
    tok = subject.tokenizer
    fmt = subject.arch.cloze
    out = []
    for _, row in stimuli.iterrows():
        prefix, target, suffix = _cloze_parts(row)
        parts = dict(prefix=prefix, target=target, suffix=suffix)
        enc = tok(fmt["encoder"].format(**parts), return_tensors="pt")
        dec = tok(fmt["decoder"].format(**parts), return_tensors="pt", return_offsets_mapping=True)
        offsets = dec.pop("offset_mapping")[0]
        a = len(fmt["decoder"].split("{target}")[0].format(**parts))
        b = a + len(target)
        labels = dec["input_ids"]
        lp = head(**enc, labels=labels).logits.float().log_softmax(-1)[0]
        hit = ((offsets[:, 0] < b) & (offsets[:, 1] > a)).nonzero().flatten()
        out.append(float(lp[hit, labels[0, hit]].sum()))
    return np.array(out)


def _old_masked_lm(subject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """The ``masked_lm`` readout before issue 23 (log-softmax over every position, then the mask slots)."""
    head = subject.require_head()
    tok = subject.tokenizer
    texts, targets = masked_cloze(tok, stimuli)
    enc = tok(texts, padding=True, return_tensors="pt")
    logp = head(**enc).logits.float().log_softmax(-1)
    out = []
    for i, target in enumerate(targets):
        pos = (enc["input_ids"][i] == tok.mask_token_id).nonzero().flatten()
        k = min(len(pos), len(target))
        out.append(float(logp[i, pos[:k], torch.tensor(target[:k], dtype=torch.long)].sum()))
    return np.array(out)


OLD = {"next_token": _old_next_token, "seq2seq": _old_seq2seq, "masked_lm": _old_masked_lm}


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=what)


# ------------------------------------------------------------------ batched readouts


@pytest.mark.parametrize("arch,name,readout", CASES, ids=IDS)
def test_batched_readout_equals_the_per_row_readout(arch, name, readout, subject_for):
    subject = subject_for(arch, name)
    rows = BATTERY.table
    with torch.inference_mode():
        old = OLD[readout](subject, rows, BATTERY)
        new = subject.readouts[readout](subject, rows, BATTERY)
        one_by_one = np.concatenate([subject.readouts[readout](subject, rows.iloc[[i]], BATTERY)
                                     for i in range(len(rows))])
    assert new.shape == (len(rows),) and np.isfinite(new).all()
    assert len(np.unique(np.round(old, 4))) > len(rows) // 2  # rows really differ: a mix-up would show
    _close(new, old, f"{name} {readout}: batched vs per-row loop")
    _close(new, one_by_one, f"{name} {readout}: batched vs one row per call")
    # and through Subject.readout's own chunks (batch_size 4: 2 chunks of different padding)
    _close(subject.readout(rows, BATTERY, readout, batch_size=4), old, f"{name} {readout}: Subject.readout")


@pytest.mark.parametrize("arch,name,readout", CASES, ids=IDS)
def test_readout_is_marked_replica_safe_and_has_a_tensor_form(arch, name, readout, subject_for):
    subject = subject_for(arch, name)
    assert all(replicas.is_replica_safe(subject, r) for r in subject.readouts), subject.readouts
    rows = BATTERY.table.iloc[:3]
    with torch.inference_mode():
        want = subject.readout(rows, BATTERY, readout)
    tensor = subject.readout_tensor(rows, BATTERY, readout)
    _close(tensor.detach().numpy(), want, f"{name} {readout}: tensor form")
    assert tensor.requires_grad  # differentiable (attribution takes its gradient)


# ------------------------------------------------------------------ replicas = one at a time


def _lesions(subject, rng: np.random.Generator) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """An empty lesion, the first and the last site, a few sites of every chain together, a big one; and a reference."""
    sites = subject.sites("all")
    width = {s.name: site_units(subject.model, s) for s in sites}
    assert all(width.values()), width

    def pick(site, share=0.75):  # a large share of the site's units: tiny random models move little otherwise
        return np.sort(rng.choice(width[site.name], size=int(width[site.name] * share), replace=False))

    chains = defaultdict(list)
    for s in sites:
        chains[s.stream].append(s)
    first = sites[0]
    # the last site of the last block that reaches the readout (XLNet answers from its query stream:
    # the content stream's last feed-forward call, layer.N.mlp#1, runs after it and changes nothing)
    last = [s for s in sites if s.stream != "text"][-1] if subject.arch.kind == "xlnet" else sites[-1]
    lesions = [
        {},
        {first.name: pick(first, 0.9)},  # not all: scaling a whole post-LayerNorm stream is nearly a no-op
        {last.name: pick(last)},
        {chain[len(chain) // 2].name: pick(chain[len(chain) // 2]) for chain in chains.values()},  # every chain
        {s.name: pick(s, 0.25) for s in sites[:: max(1, len(sites) // 4)]},
        {first.name: pick(first, 0.5), last.name: pick(last, 0.25)},
    ]
    reference = {s.name: rng.standard_normal((5, width[s.name])).astype(np.float32) for s in sites}
    return lesions, reference


@pytest.mark.parametrize("mode", ["zero", "mean", "scale"])
@pytest.mark.parametrize("arch,name,readout", CASES, ids=IDS)
def test_replica_scores_equal_one_lesion_at_a_time(arch, name, readout, mode, subject_for):
    subject = subject_for(arch, name)
    lesions, reference = _lesions(subject, np.random.default_rng(zlib.crc32(f"{arch}-{mode}".encode())))
    kw = dict(readout=readout, factor=2.5 if mode == "scale" else None, reference=reference if mode == "mean" else None)
    rows = BATTERY.table
    many = replicas.replica_scores(subject, BATTERY, rows, lesions, mode, **kw)
    # lesion() takes no empty lesion: its one-at-a-time score is the intact model's
    single = replicas.single_scores(subject, BATTERY, rows, lesions[1:], mode, **kw)
    with torch.inference_mode():
        intact = subject.readouts[readout](subject, rows, BATTERY)
    assert many.shape == (len(lesions), len(rows))
    _close(many, np.vstack([intact, single]), f"{name} {readout} {mode}")
    # any two lesions (the empty one included) score apart by more than twice the tolerance:
    # scores landing on another lesion's replica would show
    every = np.vstack([intact, single])
    apart = np.abs(every[:, None] - every[None]).max(-1)[np.triu_indices(len(every), 1)]
    tol = 1e-5 * max(1.0, float(np.abs(intact).max()))
    assert (apart > 2 * tol).all(), (apart.min(), tol)


# ------------------------------------------------------------------ block order as data


@pytest.mark.parametrize("arch,name,readout", CASES, ids=IDS)
def test_blocks_are_declared_in_forward_order(arch, name, readout, subject_for):
    subject = subject_for(arch, name)
    blocks = resolve_blocks(subject)
    assert blocks == BLOCKS[arch]
    seq2seq = "decoder" in blocks
    assert subject.block_inputs == ({"decoder": ("encoder",)} if seq2seq else {})
    # ground truth: the order the readout's forward pass enters the blocks (plain torch hooks)
    order: list[str] = []
    names = [n for chain in blocks.values() for n in chain]
    handles = [subject.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n))
               for n in names]
    try:
        with torch.inference_mode():
            subject.readouts[readout](subject, BATTERY.table, BATTERY)
    finally:
        for h in handles:
            h.remove()
    # each block once per forward pass, encoder chain before the decoder that reads it (XLNet scores
    # rows with an empty prefix in a pass of their own)
    assert order == names * (2 if arch == "xlnet" else 1)
    # every site of the subject lies in a declared block
    for site in subject.sites("all"):
        assert stage_of(blocks, site) is not None, site.name


def test_unknown_structure_declares_no_blocks(tiny_dir, tmp_path):
    """An ``hf:`` folder of an architecture neuroprobe has no entry for keeps an empty block order."""
    import shutil

    import transformers

    folder = tmp_path / "opt"
    folder.mkdir()
    config = transformers.OPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    transformers.OPTModel(config).save_pretrained(folder)
    for f in tiny_dir("gpt2").iterdir():
        if f.name.startswith(("vocab", "merges", "tokenizer", "special")):
            shutil.copy(f, folder / f.name)
    subject = load_subject(f"hf:{folder}", device="cpu", quiet=True)
    assert subject.sites("resid")  # its sites are found from its structure ...
    assert subject.block_order == {} and resolve_blocks(subject) == {} and subject.block_inputs == {}  # ... its blocks are not
    known = load_subject(f"hf:{tiny_dir('t5')}", device="cpu", quiet=True)  # a known model_type gets its entry's blocks
    assert resolve_blocks(known) == BLOCKS["t5"]
