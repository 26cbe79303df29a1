"""Benchmark: 100 last-layer lesions on real-size subjects, one at a time against batched + prefix-cached.

Run by hand (or through ``python bench/lesion.py --real-size``)::

    python bench/lesion_real.py [--subjects pplm,t5,clip,clip-rn50,lxmert,organism,minilm] [--draws 100]
                                [--single-draws 3] [--stimuli 16] [--append bench/RESULTS.md]

Every registered subject here is loaded through ``load_subject`` — the committed
organism and the shipped MiniLM with their weights, the others with ``init="random"``
from their published configurations (no download; LXMERT's regions are random
features of the right shape in a features file, as its tests use).  For each: one
intact evaluation of its readout over ``--stimuli`` testing stimuli; ``--single-draws``
random lesions of ``--k`` active units at the last layer evaluated one at a time
(``LesionStudy.evaluate``, the reference path); ``--draws`` lesions through
``LesionStudy.evaluate_many`` (batched and prefix-cached when the subject's engine
allows — the table says which engine ran).  Times are CPU seconds of this process
(the machine is shared); ratios are to one intact evaluation measured in the same
run.  Equality: the largest difference of the per-concept readout change between
the two paths on the shared lesions, relative to the readout's scale (largest
|intact score|).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import neuroprobe as npb
from neuroprobe.lesions import LesionStudy

#: case -> (subject, readout, battery, modality of the evaluation stimuli, last-layer site, label)
CASES = {
    "organism": ("organism", "zero_shot", "digits", "image", "image.fc", "organism (committed)"),
    "minilm": ("minilm", "prototype", "kinship", "text", "encoder.layer.5.mlp", "MiniLM (pretrained)"),
    "pplm": ("pplm", "next_token", "kinship", "text", "h.23.mlp", "GPT-2 medium (pplm)"),
    "t5": ("t5", "seq2seq", "kinship", "text", "decoder.11.mlp", "T5-base"),
    "clip": ("clip", "zero_shot", "pictures", "image", "vision.11.mlp", "CLIP ViT-B/32"),
    "clip-rn50": ("clip-rn50", "zero_shot", "pictures", "image", "image.layer4.2", "CLIP RN50 (last conv block)"),
    "clip-rn50-pool": ("clip-rn50", "zero_shot", "pictures", "image", "image.attnpool.heads", "CLIP RN50 (attention pool)"),
    "lxmert": ("lxmert", "vqa", "pictures", "image", "cross.4.lang_mlp", "LXMERT"),
}


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def small_battery(name: str, modality: str, n: int) -> npb.Battery:
    """``n`` testing and ``n`` screening stimuli of one modality, spread over the concepts."""
    full = npb.load_battery(name)
    t = full.table
    t = t[t["modality"] == modality]
    parts = []
    for split in ("testing", "screening"):
        rows = t[t["split"] == split]
        per = max(1, -(-n // rows["concept"].nunique()))
        parts.append(rows.groupby("concept", sort=False).head(per).head(n))
    return npb.Battery.from_table(pd.concat(parts), concepts=full.concepts, name=f"{name}-bench", root=full.root)


def region_features(battery: npb.Battery, folder: Path) -> Path:
    """Random region features (36 regions of 2048 dims) for the battery's images, as LXMERT's tests make them."""
    from neuroprobe.subjects.region_features import write_features_h5

    images = sorted({str(p) for p in battery.table["image"].dropna() if str(p)})
    rng = np.random.default_rng(0)
    feats = rng.random((len(images), 36, 2048), dtype=np.float32)
    boxes = np.sort(rng.random((len(images), 36, 4), dtype=np.float32), axis=-1)
    path = folder / "regions.h5"
    write_features_h5(path, [Path(i).stem for i in images], feats, boxes, num_regions=[36] * len(images))
    return path


def run_case(case: str, args, tmp: Path) -> dict:
    name, readout, battery_name, modality, site, label = CASES[case]
    battery = small_battery(battery_name, modality, args.stimuli)
    options = {}
    if name == "lxmert":
        options["features"] = region_features(battery, tmp)
    init = "pretrained" if name in ("organism", "minilm") else "random"
    torch.manual_seed(0)
    w_load, c_load, subject = clock(lambda: npb.load_subject(name, init=init, device="cpu", quiet=True, heads=True,
                                                                **options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = LesionStudy(subject, battery, None, sites=site, readout=readout, quiet=True, batch_size=args.stimuli)
    test = study.test
    ic = min(clock(lambda: subject.readout(test, battery, readout, batch_size=args.stimuli))[1] for _ in range(2))
    rng = np.random.default_rng([0, args.k])
    pool = np.flatnonzero(study.active[site])
    lesions = [{site: np.sort(rng.choice(pool, size=min(args.k, len(pool)), replace=False))} for _ in range(args.draws)]
    n1 = min(args.single_draws, args.draws)
    w1, c1, ref = clock(lambda: [study.evaluate(u) for u in lesions[:n1]])
    batched = study.engine.startswith("batched")
    n = args.draws if batched else n1
    wb, cb, got = clock(lambda: study.evaluate_many(lesions[:n]))
    ref = np.array([r.to_numpy() for r in ref])
    got = np.array([g.to_numpy() for g in got])
    scale = float(np.nanmax(np.abs(study.baseline))) or 1.0
    diff = float(np.nanmax(np.abs(got[:n1] - ref))) / scale
    row = dict(subject=label, parameters=f"{subject.n_parameters / 1e6:.1f} M", readout=readout, site=site,
               stimuli=len(test), engine=study.engine, intact_cpu_s=ic, single_per_lesion_x=c1 / n1 / ic,
               lesions=n, many_cpu_s=cb, many_x_intact=cb / ic, many_per_lesion_x=cb / n / ic,
               speedup=(c1 / n1) / (cb / n), rel_diff=diff, load_s=w_load,
               warning="; ".join(str(w.message) for w in caught if "one at a time" in str(w.message)))
    print(row, flush=True)
    return row


def table(rows: list[dict], draws: int) -> list[str]:
    lines = ["| subject | params | readout | last-layer site | stimuli | engine | intact CPU s | one at a time, per lesion × intact | "
             "lesions | evaluate_many CPU s | **× one intact** | speed-up per lesion | max diff / readout scale |",
             "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['parameters']} | {r['readout']} | {r['site']} | {r['stimuli']} | {r['engine']} | "
                     f"{r['intact_cpu_s']:.2f} | {r['single_per_lesion_x']:.2f} | {r['lesions']} | {r['many_cpu_s']:.1f} | "
                     f"**{r['many_x_intact']:.1f}** | {r['speedup']:.0f}× | {r['rel_diff']:.1e} |")
    ok = [r for r in rows if r["lesions"] == draws]
    lines += ["", f"Target: {draws} lesions ≤ 10× one intact evaluation — met by "
              f"{sum(r['many_x_intact'] <= 10 for r in ok)} of {len(rows)} subjects "
              f"({', '.join(r['subject'] for r in ok if r['many_x_intact'] <= 10) or 'none'})."]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default=",".join(CASES))
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--single-draws", type=int, default=3)
    ap.add_argument("--stimuli", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="np-bench-lesion-") as tmp:
        for name in args.subjects.split(","):
            rows.append(run_case(name.strip(), args, Path(tmp)))
    head = ["## Last-layer lesions on real-size subjects (bench/lesion_real.py)", "",
            f"Run {started}–{time.strftime('%H:%M', time.gmtime())} UTC on {platform.machine()}, {os.cpu_count()} CPUs shared "
            f"with other jobs (load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end); torch {torch.__version__} "
            f"on {args.threads} thread(s); CPU s = this process's CPU time. {args.k} random active units per lesion, zero "
            f"ablation; one-at-a-time cost measured on {args.single_draws} lesions.", ""]
    text = head + table(rows, args.draws)
    print("\n".join(text))
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(text) + "\n")
    return text


if __name__ == "__main__":
    main()
