"""The cross-modal organism: train a design, record it and its untrained twin, count concept and multimodal cells.

One run of this script is one row of the design comparison in the cross organism's card:

    python analyses/organism_cross.py --design single [--steps 1200] [--out figures/organism_cross]

``--design`` names an entry of :data:`DESIGNS` (a fusion and which objectives are on).
``--weights DIR`` skips training and measures weights already written there (the
committed ones: ``--weights neuroprobe/subjects/organism/weights``).  Every stimulus of
``digits-cross`` is recorded (image alone, text alone, pairs; montage ``all``), concept
cells are found with the defaults of ``neuroprobe cells`` and the rotation and
label-shuffle controls, and the table per site, per concept and the summary row go to
``--out``.  Training runs on one thread; run one design at a time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import neuroprobe as npb
from neuroprobe.analysis.criterion import summarize

ALL = {"contrastive": 1.0, "matching": 1.0, "masked_text": 1.0, "masked_image": 1.0}
#: design name -> (config overrides, objective weights[, other recipe overrides])
DESIGNS: dict[str, tuple] = {
    # the committed design (the recipe's defaults), and what it was chosen against
    "single": ({"fusion": "single", "layers": 4}, ALL),
    "co": ({"fusion": "co", "layers": 2}, ALL),
    "single-no-contrastive": ({"fusion": "single", "layers": 4}, {**ALL, "contrastive": 0.0}),
    # the learning-rate designs (--steps 1200): one-cycle to 1e-3 (2% warm-up), with an activity penalty;
    # 1e-3 then 3e-3 from 35%; 3e-3 held from 30% to 70%
    "single-lr1e-3": ({"fusion": "single", "layers": 4}, ALL, {"lr": 1e-3, "pct_start": 0.02, "lr_points": None}),
    "single-lr1e-3-l1": ({"fusion": "single", "layers": 4}, ALL,
                         {"lr": 1e-3, "pct_start": 0.02, "lr_points": None, "activity_l1": 0.1}),
    "single-lr3": ({"fusion": "single", "layers": 4}, ALL,
                   {"lr_points": [[0, 4e-5], [0.02, 1e-3], [0.25, 1e-3], [0.35, 3e-3], [1, 1e-5]]}),
    "single-lr3-hold": ({"fusion": "single", "layers": 4}, ALL,
                        {"lr_points": [[0, 4e-5], [0.02, 1e-3], [0.2, 1e-3], [0.3, 3e-3], [0.7, 3e-3], [1, 1e-5]]}),
}


def measure(subject, battery, path: Path, controls: bool) -> tuple[pd.DataFrame, dict]:
    """Record ``subject`` on every site, find its cells (and controls); returns the cells table and counts."""
    rec = npb.record(subject, battery, path, montage="all", overwrite=True, quiet=True)
    cells = npb.concept_cells(rec, quiet=True)
    out = {"cells": int(cells["is_cell"].sum()), "invariant": int(cells["invariant"].sum()),
           "multimodal": int(cells["multimodal"].sum()),
           "multimodal_concepts": int(cells.loc[cells["multimodal"], "concept"].nunique())}
    if controls:
        from neuroprobe.analysis.controls import label_shuffle_control, rotation_control

        rot = rotation_control(rec, quiet=True)
        shuf = label_shuffle_control(rec, quiet=True)  # 10 shuffles; a multimodal cell is a cell, so cells bound it
        out.update(rotated_cells=int(rot["is_cell"].sum()), rotated_multimodal=int(rot["multimodal"].sum()),
                   shuffled_cells_in_10=int(shuf["cells"].sum()))
    return cells, out


def lesion_table(subject, battery, cells: pd.DataFrame, concept: str, *, draws: int = 100,
                 sides: tuple[str, ...] = ("image", "text", "pair")) -> pd.DataFrame:
    """Zero the concept's multimodal cells; readout change on each side against ``draws`` random lesions.

    The random lesions have the cells' count at the cells' sites, drawn from active units, the same
    draws for every side (:class:`~neuroprobe.lesions.forgetting.LesionStudy` with ``modality``).
    """
    from neuroprobe.lesions.forgetting import LesionStudy

    mine = cells[cells["multimodal"] & (cells["concept"] == concept)]
    if mine.empty:
        raise SystemExit(f"no multimodal cell of {concept!r} to lesion")
    rows = []
    for side in sides:
        study = LesionStudy(subject, battery, mine, quiet=True, batch_size=256, modality=side)
        dose = study.dose_response(concept, [len(mine)], "zero", random_draws=draws, orders=("top", "random"))
        top = dose[dose["order"] == "top"].iloc[0]
        rnd = dose[dose["order"] == "random"]
        rows.append(dict(
            readout=f"{side} side", stimuli=len(study.test), units=len(mine),
            sites=";".join(sorted(set(mine["site"]))), target_change=top["target_change"],
            other_change=top["other_change"], target_rank=int(top["target_rank"]),
            random_target_mean=rnd["target_change"].mean(), random_target_sd=rnd["target_change"].std(),
            random_other_mean=rnd["other_change"].mean(), n_random=len(rnd),
            p_random=(1 + int((rnd["target_change"] <= top["target_change"]).sum())) / (1 + len(rnd)),
            p_random_specific=(1 + int(((rnd["target_change"] - rnd["other_change"])
                                        <= (top["target_change"] - top["other_change"])).sum())) / (1 + len(rnd))))
    return pd.DataFrame(rows)


def compare(out: Path, wdir: Path) -> pd.DataFrame:
    """Cells of both organisms, trained and untrained, on ``digits`` (image alone and text alone, the same stimuli
    for both) and of the cross-modal organism on ``digits-cross`` (with pairs); one row each, montage ``all``."""
    rows = []
    for name, probe in (("organism", "digits"), ("organism-cross", "digits"), ("organism-cross", "digits-cross")):
        battery = npb.load_battery(probe)
        for init in ("pretrained", "random"):
            kw = {"weights": wdir} if name == "organism-cross" else {}
            subject = npb.load_subject(name, init=init, device="cpu", quiet=True, **kw)
            cells, counts = measure(subject, battery, Path("recordings") / f"compare-{name}-{init}-{probe}.h5",
                                    controls=init == "pretrained")
            rows.append({"subject": name, "battery": probe, "init": init, "units": int((~cells["dead"]).sum()),
                         **counts})
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.to_string(index=False))
    return table


def collect(folder: Path) -> pd.DataFrame:
    """The summary rows of every design measured under ``folder`` (one ``<design>/summary.json`` each)."""
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*/summary.json"))]
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", default="single", choices=sorted(DESIGNS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=None, help="measure these weights instead of training")
    ap.add_argument("--controls", action="store_true", help="also the rotation and label-shuffle controls")
    ap.add_argument("--lesion", default=None, help="also lesion this concept's multimodal cells against 100 random "
                    "lesions (auto: the concept with the most)")
    ap.add_argument("--out", default="figures/organism_cross")
    ap.add_argument("--collect", action="store_true", help="print the table of every design measured under --out")
    ap.add_argument("--compare", action="store_true", help="also the dual-encoder organism and both on the digits "
                    "battery (the same single-modality stimuli), trained and untrained, in one table")
    args = ap.parse_args()
    if args.collect:
        with pd.option_context("display.width", 250, "display.max_columns", 40):
            print(collect(Path(args.out)).to_string(index=False))
        return
    out = Path(args.out) / args.design
    out.mkdir(parents=True, exist_ok=True)
    from neuroprobe.subjects.organism.cross import CrossConfig
    from neuroprobe.subjects.organism.train import train_organism

    cfg, weights, *more = DESIGNS[args.design]
    extra = more[0] if more else {}
    row: dict = {"design": args.design}
    if args.weights is None:
        t0 = time.process_time()
        card = train_organism(seed=args.seed, steps=args.steps, out=out / "weights", arch="cross",
                              config=CrossConfig(**cfg), recipe={"weights": weights, **extra}, progress=True)
        row.update(train_cpu_seconds=round(time.process_time() - t0, 1))
        wdir = out / "weights"
    else:
        wdir = Path(args.weights)
        card = json.loads((wdir / "card-cross.json").read_text(encoding="utf-8"))
    h = card["heldout"]
    row.update(parameters=card["parameters"], steps=card["steps"], train_seconds=card["train_seconds"],
               handwritten=round(h["handwritten"]["accuracy"], 3), written=round(h["written"]["accuracy"], 3),
               text=round(h["text"]["accuracy"], 3), matching=round(h.get("matching", {}).get("accuracy", float("nan")), 3))
    battery = npb.load_battery("digits-cross")
    torch.set_num_threads(1)
    for init in ("pretrained", "random"):
        subject = npb.load_subject("organism-cross", init=init, weights=wdir, device="cpu", quiet=True)
        cells, counts = measure(subject, battery, Path("recordings") / f"cross-{args.design}-{init}.h5",
                                controls=args.controls and init == "pretrained")
        cells.to_csv(out / f"cells_{init}.csv", index=False)
        row.update({(k if init == "pretrained" else f"untrained_{k}"): v for k, v in counts.items()})
        if init == "pretrained":
            print(summarize(cells, by="site").to_string())
            print(summarize(cells, by="concept").to_string())
            if args.lesion:
                concept = args.lesion
                if concept == "auto":  # the concept with the most multimodal cells (first in battery order on ties)
                    counts = summarize(cells, by="concept")["multimodal"]
                    concept = str(counts.idxmax())
                row["lesion_concept"] = concept
                table = lesion_table(subject, battery, cells, concept)
                table.to_csv(out / f"lesion_{concept}.csv", index=False)
                with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
                    print(table.to_string(index=False))
    if args.compare:
        compare(out, wdir)
    print(json.dumps(row))
    (out / "summary.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
