"""Benchmark: many lesions one at a time, batched, and batched + prefix-cached; the quick start's lesion stage.

Run by hand::

    python bench/lesion.py [--draws 100] [--single-draws 20] [--k 16] [--threads 1] [--real-size] [--append bench/RESULTS.md]

Every contender runs in the same process on the same model and the same lesions;
times are CPU seconds of this process (``time.process_time``, torch on
``--threads`` threads) beside wall seconds, because the machine is shared: CPU time
is what the work costs, wall time is what the load let it have.  Ratios are to one
intact evaluation (the readout over the evaluation split, measured in the same run).

Sections
--------
1. ``--draws`` random lesions of ``--k`` units at one site, at the bottom block and at
   the top block, on the organism (``zero_shot`` readout, digits testing split) and
   on the real MiniLM (``prototype`` readout, kinship testing split):

   one-at-a-time        ``LesionStudy.evaluate`` per lesion (the reference path),
                        on the first ``--single-draws`` lesions
   batched              replicas along the batch, raw inputs replicated, every block
                        run (``--single-draws`` lesions)
   batched+cached       replicas resumed at the lesioned block from the cached intact
                        pass: ``--draws`` lesions at the top block, ``--single-draws``
                        at the bottom block (where nothing upstream can be cached)

   Batched timings include the intact pass that fills the cache.

   Equality: the largest difference of the per-concept readout change between each
   batched contender and one-at-a-time on the shared lesions.
2. The organism quick start's lesion stage (``analyses/quickstart.py`` step 3: study,
   top/bottom/50 random lesions for k = 2, 8, 16, zero and mean ablation) with
   ``batched=False`` (the path before batching) and ``batched=True``.
3. ``--real-size``: ``bench/lesion_real.py`` — GPT-2 medium, T5-base, CLIP ViT-B/32 and
   RN50, LXMERT (random init from their published configurations, no download), the
   organism and MiniLM, loaded through ``load_subject``: ``--draws`` last-layer lesions
   through ``LesionStudy.evaluate_many`` against one at a time and one intact evaluation.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import neuroprobe as npb
from neuroprobe.lesions import LesionStudy
from neuroprobe.lesions.staged import BatchedEvaluator


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def load_case(name: str, batch_size: int):
    if name == "organism":
        subject = npb.load_subject("organism", device="cpu", quiet=True)
        battery = npb.load_battery("digits")
        return subject, battery, ("image.conv1", "text.proj"), batch_size or 256
    subject = npb.load_subject("minilm", device="cpu", quiet=True)
    battery = npb.load_battery("kinship")
    return subject, battery, ("encoder.layer.0.mlp", "encoder.layer.5.mlp"), batch_size or 32


def section_many(args) -> list[str]:
    lines = ["| subject | lesion site | contender | lesions | CPU s | wall s | CPU × intact | per lesion × intact | max abs diff vs one-at-a-time |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    notes = []
    for case in ("organism", "minilm"):
        subject, battery, sites, bs = load_case(case, 0)
        study = LesionStudy(subject, battery, None, sites=",".join(sites), quiet=True, batch_size=bs)
        single = LesionStudy(subject, battery, None, sites=",".join(sites), quiet=True, batch_size=bs, batched=False)
        readout = study.readout
        iw, ic, _ = clock(lambda: subject.readout(study.test, battery, readout, batch_size=bs))
        iw2, ic2, _ = clock(lambda: subject.readout(study.test, battery, readout, batch_size=bs))
        iw, ic = min(iw, iw2), min(ic, ic2)
        lines.append(f"| {case} | — | intact evaluation ({len(study.test)} stimuli, batches of {bs}) | 1 | {ic:.2f} | {iw:.2f} | 1.00 | | |")
        for site in sites:
            rng = np.random.default_rng([0, args.k])
            pool = np.flatnonzero(study.active[site])
            lesions = [{site: np.sort(rng.choice(pool, size=min(args.k, len(pool)), replace=False))} for _ in range(args.draws)]
            n1 = min(args.single_draws, args.draws)
            w1, c1, ref = clock(lambda: [single.evaluate(u) for u in lesions[:n1]])
            ref = np.array([r.to_numpy() for r in ref])
            lines.append(f"| {case} | {site} | one-at-a-time | {n1} | {c1:.2f} | {w1:.2f} | {c1 / ic:.1f} "
                         f"| {c1 / n1 / ic:.2f} | reference |")
            per_single = c1 / n1
            top_layer = site == sites[-1]
            for name, cached in (("batched", False), ("batched+cached", True)):
                n = args.draws if (cached and top_layer) else n1
                def run(cached=cached, n=n):
                    study._engine = BatchedEvaluator(study._engine.runner, study.test, batch_size=bs, prefix_cache=cached)
                    study.baseline = study._engine.intact()
                    return study.evaluate_many(lesions[:n], "zero")
                w, c, got = clock(run)
                got = np.array([g.to_numpy() for g in got])
                diff = float(np.abs(got[:n1] - ref).max())
                lines.append(f"| {case} | {site} | {name} | {n} | {c:.2f} | {w:.2f} | **{c / ic:.1f}** | {c / n / ic:.3f} "
                             f"| {'0 (bitwise)' if diff == 0 else f'{diff:.1e}'} |")
                if name == "batched+cached":
                    notes.append(f"{case}, {n} lesions at {site}: batched+cached {c / ic:.1f}× one intact evaluation, "
                                 f"one at a time {per_single * n / ic:.0f}× ({per_single / ic:.2f}× per lesion, measured on {n1}): "
                                 f"**{per_single * n / c:.1f}× faster**")
            print("\n".join(lines[-3:]), flush=True)
    return lines + [""] + [f"- {n}" for n in notes]


def section_quickstart(args) -> list[str]:
    subject = npb.load_subject("organism", device="cpu", quiet=True)
    battery = npb.load_battery("digits")
    cells_path = Path(args.cells)
    if not cells_path.is_file():
        tmp = Path(args.tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        rec = npb.record(subject, battery, tmp / "organism_digits_all.h5", montage="all", overwrite=True, quiet=True)
        cells = npb.concept_cells(rec, quiet=True)
        cells.to_csv(cells_path, index=False)
    cells = pd.read_csv(cells_path)
    out = {}
    for name, batched in (("before (one at a time)", False), ("after (batched+cached)", True)):
        def stage(batched=batched):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study = LesionStudy(subject, battery, cells, quiet=True, batch_size=256, batched=batched)
                return study.dose_response("seven", [2, 8, 16], ("zero", "mean"), random_draws=50,
                                           orders=("top", "bottom", "random"))
        out[name] = clock(stage)
        print(name, out[name][:2], flush=True)
    (wb, cb, db), (wa, ca, da) = out.values()
    diff = float(np.abs(db[["target_change", "other_change"]].to_numpy() - da[["target_change", "other_change"]].to_numpy()).max())
    return [
        "| quick start lesion stage (312 lesions) | CPU s | wall s |",
        "| --- | ---: | ---: |",
        f"| before: one at a time (`batched=False`) | {cb:.1f} | {wb:.1f} |",
        f"| after: batched + prefix-cached | {ca:.1f} | {wa:.1f} |",
        "",
        f"Speed-up **{cb / ca:.1f}×** in CPU time ({wb / wa:.1f}× wall); largest difference of any readout change "
        f"between the two: {diff:.1e}{' (bitwise equal)' if diff == 0 else ''}.",
    ]


def section_real_size(args) -> list[str]:
    """Section 3: ``bench/lesion_real.py`` (every subject through ``load_subject``, 100 last-layer lesions)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lesion_real

    return lesion_real.main(["--draws", str(args.draws), "--k", str(args.k), "--threads", str(args.threads)])[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--single-draws", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real-size", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--cells", default="/tmp/neuroprobe-bench-lesion/cells_pretrained.csv")
    ap.add_argument("--tmp", default="/tmp/neuroprobe-bench-lesion")
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    load0, started = os.getloadavg()[0], time.strftime('%Y-%m-%d %H:%M', time.gmtime())
    body = []
    if not args.skip_many:
        body += ["### Many lesions: one at a time, batched, batched + prefix-cached", "", *section_many(args), ""]
    if not args.skip_quickstart:
        body += ["### The organism quick start's lesion stage", "", *section_quickstart(args), ""]
    if args.real_size:
        body += ["### Real-size architectures (random init from published configs)", "", *section_real_size(args), ""]
    load1 = os.getloadavg()[0]
    head = [
        "## Batched and prefix-cached lesions (bench/lesion.py)",
        "",
        f"Run {started}–{time.strftime('%H:%M', time.gmtime())} UTC on {platform.machine()}, {os.cpu_count()} CPUs shared with "
        f"other jobs (load average {load0:.1f} at start, {load1:.1f} at end); torch {torch.__version__} on {args.threads} "
        f"thread(s); CPU s = this process's CPU time, the cost of the work whatever the load; wall s depends on the load. "
        f"{args.k} random active units per lesion (zero ablation).",
        "",
    ]
    text = "\n".join(head + body)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
