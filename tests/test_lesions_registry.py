"""Every registered subject batches and prefix-caches the lesions of every readout (issue 23, item 1).

Each registry entry is built as ``neuroprobe sites`` builds it (untrained, on the meta device
when its loader can: shapes only) and asked, for each of its readouts, which lesion engine
:class:`~neuroprobe.lesions.forgetting.LesionStudy` would use.  None may fall back to one lesion
at a time, and every declared chain must name modules that exist in the model.  That each engine
gives the one-at-a-time numbers is tested per family on tiny models (``test_lesions_text.py``,
``test_lesions_vision.py``, ``test_lesions_regions.py``, ``test_lesions_generic.py``).
"""
from __future__ import annotations

import pytest
import torch

from neuroprobe import Battery, load_subject
from neuroprobe.lesions.replicas import is_replica_safe
from neuroprobe.lesions.staged import make_runner, resolve_blocks
from neuroprobe.subjects.registry import REGISTRY


@pytest.fixture(scope="module")
def built():
    torch.set_num_threads(1)
    return {}


def _subject(name: str, cache: dict):
    if name not in cache:
        spec = REGISTRY[name]
        if spec.builds_on_meta:
            cache[name] = load_subject(name, init="random", device="meta", quiet=True, heads=True)
        else:
            init = "pretrained" if name in ("organism", "organism-cross", "minilm") else "random"
            cache[name] = load_subject(name, init=init, device="cpu", quiet=True, heads=True)
    return cache[name]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_readout_of_every_registered_subject_is_batched_and_prefix_cached(name, built):
    spec = REGISTRY[name]
    subject = _subject(name, built)
    battery = Battery.load(spec.default_battery)
    assert subject.readouts, f"{name} has no readout"
    blocks = resolve_blocks(subject)
    assert blocks, f"{name} declares no block order"
    for chain, modules in blocks.items():
        assert modules, f"{name}: chain {chain!r} matches no module"
    for chain, inputs in (subject.block_inputs or {}).items():
        assert chain in blocks and set(inputs) <= set(blocks), f"{name}: block_inputs name unknown chains"
    for readout in subject.readouts:
        assert is_replica_safe(subject, readout), f"{name}: readout {readout} is not replica-safe"
        runner, why = make_runner(subject, battery, readout)
        assert runner is not None, f"{name}/{readout}: {why}"
        assert "without prefix cache" not in why, f"{name}/{readout}: {why}"


def test_tokenizing_one_copy_of_tiled_texts_equals_tokenizing_all():
    from neuroprobe.subjects.copies import text_copies, tokenize_copies

    tok = load_subject("minilm", device="cpu", quiet=True).tokenizer
    texts = ["my mother baked bread", "a red door", "the dog"]
    assert text_copies(texts * 4) == 4 and text_copies(texts) == 1 and text_copies(texts + texts[:1]) == 1
    want = tok(texts * 4, padding=True, return_tensors="pt")
    got = tokenize_copies(tok, texts * 4, padding=True, return_tensors="pt")
    assert set(got.keys()) == set(want.keys())
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_readme_lesion_speeds_are_the_benchmarks_numbers():
    """The README's multiples of one intact evaluation are those of the last `bench/lesion_real.py` table."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    results = (root / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    table = results[results.rindex("## Last-layer lesions on real-size subjects (bench/lesion_real.py)"):]
    table = table[: table.find("\n## ", 10) if "\n## " in table[10:] else len(table)]
    para = readme[readme.index("**Many lesions, one forward pass.**"):readme.index("**Many processes, one lesion study.**")]
    para = " ".join(para.split())
    claims = {"GPT-2 medium (pplm)": "GPT-2 medium", "T5-base": "T5-base", "CLIP ViT-B/32": "CLIP ViT-B/32",
              "LXMERT": "LXMERT", "MiniLM (pretrained)": "MiniLM", "organism (committed)": "the organism",
              "CLIP RN50 (attention pool)": "attention pool", "CLIP RN50 (last conv block)": "block costs"}
    for row_label, words in claims.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {row_label} |"))
        value = re.search(r"\*\*([0-9.]+)\*\*", row).group(1)
        assert re.search(re.escape(words) + r"\s+" + re.escape(value) + "×", para), (row_label, value)


def test_lesion_without_probe_takes_the_subjects_default_battery_as_record_does(tmp_path):
    """`neuroprobe lesion --model organism-cross` evaluates on digits-cross (its registry default), not kinship."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-m", "neuroprobe", "lesion", "--model", "organism-cross", "--concept", "sixx"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("neuroprobe: error:") and "battery 'digits-cross' (the default for organism-cross)" in last
    assert REGISTRY["organism-cross"].default_battery == "digits-cross"
