"""Benchmark: what a lesioned evaluation costs over the intact one, and 100 random draws.

Run by hand::

    python bench/lesion.py [--repeats 3] [--k 16] [--draws 100] [--threads 1] [--append bench/RESULTS.md]

One evaluation = the real MiniLM's ``prototype`` readout over the kinship
battery's testing split (137 stimuli, batches of 32).  Every contender runs in the
same process, interleaved over ``--repeats`` rounds; the table reports the median
time and its ratio to the intact evaluation measured in the same run.

Contenders
----------
intact               ``subject.readout`` without a lesion
neuroprobe-zero      ``with lesion(subject, top_k, "zero")``: the same readout
neuroprobe-mean      mean ablation (reference: screening-split responses)
neuroprobe-resample  resample ablation (same reference)
torch-hook-zero      a hand-written ``register_forward_pre_hook`` zeroing the same units
nnsight-zero         nnsight ``model.trace`` setting the same MLP inputs to 0 (if installed)
study-evaluate       ``LesionStudy.evaluate`` (lesion + readout + per-concept change)
random-100           ``LesionStudy.dose_response`` with 100 random-k draws (ratio to 100 intact evaluations
                     is given as well)
"""
from __future__ import annotations

import argparse
import statistics
import warnings
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import neuroprobe as npb
from neuroprobe.lesions import LesionStudy, lesion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concept", default="mother")
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*nnsight already serves.*")

    subject = npb.load_subject("minilm", device="cpu", quiet=True)
    battery = npb.load_battery("kinship")
    study = LesionStudy(subject, battery, None, quiet=True)  # prepares the readout from the intact model
    test = study.test
    top = study.top(args.concept, args.k)
    assert top is not None
    ref = study.screen

    def intact():
        return subject.readout(test, battery, "prototype")

    def np_mode(mode):
        def run():
            with lesion(subject, top, mode, reference=ref if mode != "zero" else None):
                return subject.readout(test, battery, "prototype")
        return run

    def torch_hook():
        handles = []
        for site, units in top.items():
            module = subject.model.get_submodule(site.replace(".mlp", ".output.dense"))
            idx = torch.as_tensor(units)

            def pre(mod, inputs, _idx=idx):
                return (inputs[0].index_fill(-1, _idx, 0.0),) + tuple(inputs[1:])

            handles.append(module.register_forward_pre_hook(pre))
        try:
            return subject.readout(test, battery, "prototype")
        finally:
            for h in handles:
                h.remove()

    contenders = {"intact": intact, "neuroprobe-zero": np_mode("zero"), "neuroprobe-mean": np_mode("mean"),
                  "neuroprobe-resample": np_mode("resample"), "torch-hook-zero": torch_hook}
    try:
        from nnsight import NNsight

        from neuroprobe.subjects.hf import PROTOTYPE_TEMPERATURE

        nn_model = NNsight(subject.model)
        concepts, protos = subject._prototypes

        def nnsight_zero():
            out = []
            for a in range(0, len(test), 32):
                rows = test.iloc[a : a + 32]
                enc = subject.tokenizer(rows["text"].tolist(), padding=True, truncation=True, return_tensors="pt")
                with torch.inference_mode(), nn_model.trace(**enc):
                    for site, units in sorted(top.items(), key=lambda kv: int(kv[0].split(".")[2])):  # model order
                        layer = int(site.split(".")[2])
                        nn_model.encoder.layer[layer].E_output.dense.input[..., torch.as_tensor(units)] = 0.0
                    hidden = nn_model.output.last_hidden_state.save()
                h = getattr(hidden, "value", hidden).float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                lp = (emb @ protos.T / PROTOTYPE_TEMPERATURE).log_softmax(-1)
                idx = torch.tensor([concepts.index(c) for c in rows["concept"]])
                out.append(lp[torch.arange(len(idx)), idx].numpy())
            return np.concatenate(out)

        contenders["nnsight-zero"] = nnsight_zero
    except ImportError:
        pass
    contenders["study-evaluate"] = lambda: study.evaluate(top, "zero")

    # every contender must compute the same thing
    expect = contenders["neuroprobe-zero"]()
    for name in ("torch-hook-zero", "nnsight-zero"):
        if name in contenders:
            got = contenders[name]()
            ok = np.allclose(got, expect, atol=1e-5)
            print(f"{name} agrees with neuroprobe-zero: {ok} (max |diff| {np.abs(got - expect).max():.2e})")
            if not ok:
                del contenders[name]

    times: dict[str, list[float]] = {k: [] for k in contenders}
    rand_times = []
    for r in range(args.repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        study.dose_response(args.concept, [args.k], "zero", random_draws=args.draws, orders=("random",))
        rand_times.append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats} done")

    base = statistics.median(times["intact"])
    rows = [dict(contender=k, median_s=statistics.median(v), ratio_to_intact=statistics.median(v) / base) for k, v in times.items()]
    rmed = statistics.median(rand_times)
    rows.append(dict(contender=f"random-{args.draws}", median_s=rmed, ratio_to_intact=rmed / base))
    df = pd.DataFrame(rows)
    per_draw = rmed / args.draws / base
    lines = [
        "## Lesion cost (bench/lesion.py)",
        "",
        f"Real MiniLM (all-MiniLM-L6-v2), `prototype` readout over kinship testing split ({len(test)} stimuli, "
        f"batches of 32), CPU, torch threads {args.threads}; top-{args.k} units for {args.concept!r} "
        f"at {len(top)} site(s); median of {args.repeats} interleaved rounds; torch {torch.__version__}.",
        "",
        "| contender | median s | × intact |",
        "| --- | ---: | ---: |",
        *[f"| {r.contender} | {r.median_s:.3f} | {r.ratio_to_intact:.2f} |" for r in df.itertuples()],
        "",
        f"{args.draws} random draws cost {rmed / base:.1f}× one intact evaluation, i.e. {per_draw:.2f}× per draw "
        f"({rmed:.1f} s in all).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
