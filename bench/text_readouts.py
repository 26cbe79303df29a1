"""Benchmark: the batched ``next_token`` / ``seq2seq`` readouts against the per-row loops they replaced.

Run by hand::

    python bench/text_readouts.py [--rows 32] [--repeats 3] [--threads 1] [--append bench/RESULTS.md]

GPT-2 and T5, each at two sizes, random init: ``tiny`` (neuroprobe.testing.make_tiny: hidden 32,
2 layers) and ``small`` (the published GPT-2 small and T5-small configurations, vocabularies
included, with the tiny tokenizer: its ids are a subset of the vocabulary).  Both are saved with
``save_pretrained`` and loaded through ``load_subject``.  One call of the readout over ``--rows``
kinship stimuli (the default readout batch), per-row loop (``tests/test_lesions_text.py``'s
reference copy of the code before issue 23) beside the batched pass, in the same process;
best of ``--repeats``; CPU seconds (``time.process_time``) beside wall seconds (shared machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import neuroprobe as npb  # noqa: E402
from neuroprobe.testing import make_tiny  # noqa: E402
from test_lesions_text import _old_next_token, _old_seq2seq  # noqa: E402


def _small(arch: str, tiny: Path, out: Path) -> Path:
    """The published small configuration of ``arch``, random init, beside the tiny tokenizer files."""
    import shutil

    import transformers as T

    torch.manual_seed(0)
    if arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 50257 tokens
    else:
        model = T.T5ForConditionalGeneration(T.T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8,
                                                        vocab_size=32128, decoder_start_token_id=0, pad_token_id=0,
                                                        eos_token_id=1))  # T5-small
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    return out


def best(fn, subject, rows, battery, repeats: int) -> tuple[float, float, np.ndarray]:
    """Best wall and CPU seconds of ``fn(subject, rows, battery)`` over ``repeats`` calls, and its scores."""
    runs = []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = fn(subject, rows, battery)
        runs.append((time.perf_counter() - w, time.process_time() - c, out))
    w = min(r[0] for r in runs)
    c = min(r[1] for r in runs)
    return w, c, runs[-1][2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    battery = npb.load_battery("kinship")
    rows = battery.table.sample(args.rows, random_state=0).reset_index(drop=True)
    lines = [f"### Text readouts, batched vs per-row ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores shared, torch {torch.__version__}, {args.threads} thread(s), "
             f"{args.rows} kinship stimuli, best of {args.repeats})", "",
             "| model (random init) | readout | per-row CPU s | batched CPU s | CPU speed-up | per-row wall s | "
             "batched wall s | max abs diff |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as scratch:
        for arch, name, readout, old in (("gpt2", "gpt2", "next_token", _old_next_token),
                                         ("t5", "t5", "seq2seq", _old_seq2seq)):
            tiny = make_tiny(arch, Path(scratch) / f"{arch}-tiny")
            for size, folder in (("tiny", tiny), ("small", _small(arch, tiny, Path(scratch) / f"{arch}-small"))):
                subject = npb.load_subject(name, weights=folder, device="cpu", heads=True, quiet=True)
                fn = subject.readouts[readout]
                wo, co, so = best(old, subject, rows, battery, args.repeats)
                wn, cn, sn = best(fn, subject, rows, battery, args.repeats)
                lines.append(f"| {name} {size} ({subject.n_parameters / 1e6:.3g} M) | {readout} | {co:.3f} | {cn:.3f} | "
                             f"**{co / cn:.1f}×** | {wo:.3f} | {wn:.3f} | {np.abs(so - sn).max():.1e} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
