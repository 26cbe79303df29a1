"""The main job, offline: record the organism -> find concept cells -> lesion one concept's cells -> figure.

Runs on the project's own model organism (a small CLIP-style digit model whose weights
are committed) and its untrained twin, so every number below is a real measurement
with its control.  Outputs go to ``figures/quickstart/`` (CSV tables and PNG figures)
and ``recordings/``.

    python analyses/quickstart.py [--concept seven] [--k 8] [--random-draws 100] [--device cpu]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import neuroprobe as npb  # noqa: E402
from neuroprobe.analysis import figures as cell_figures  # noqa: E402
from neuroprobe.analysis.criterion import summarize  # noqa: E402
from neuroprobe.lesions import figures as lesion_figures  # noqa: E402
from neuroprobe.lesions.forgetting import LesionStudy  # noqa: E402
from neuroprobe.output import save_figure, write_csv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="seven")
    ap.add_argument("--k", default="2,8,16", help="lesion sizes (units)")
    ap.add_argument("--random-draws", type=int, default=50, help="random lesions of each size (the p-value null; 100+ for a paper)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="figures/quickstart")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    battery = npb.load_battery("digits")

    # 1. record the trained organism and its untrained twin (the control every cell claim needs)
    recs = {}
    for init in ("pretrained", "random"):
        subject = npb.load_subject("organism", init=init, device=args.device)
        path = Path("recordings") / f"organism{'-random' if init == 'random' else ''}_digits_all.h5"
        recs[init] = npb.record(subject, battery, path, montage="all", overwrite=True, quiet=args.quiet)
        print(f"[{time.perf_counter() - t0:5.1f}s] recorded {recs[init]}")

    # 2. concept cells: screening split, k*SD + rank-sum under FDR, confirmed on the testing split
    cells = {init: npb.concept_cells(rec, quiet=args.quiet) for init, rec in recs.items()}
    for init, c in cells.items():
        write_csv(c, out / f"cells_{init}.csv")
    print(f"[{time.perf_counter() - t0:5.1f}s] concept cells per site (trained | untrained):")
    table = summarize(cells["pretrained"], by="site").merge(
        summarize(cells["random"], by="site"), left_index=True, right_index=True, suffixes=("", " (untrained)"))
    print(table.to_string())
    print("\nconfirmed cells per concept (trained):")
    print(summarize(cells["pretrained"], by="concept").to_string())
    # multimodal cells: one unit that fires for a digit's images *and* its names.  Only a unit that sees both
    # modalities can be one; in the organism that is the shared embedding (joint.embed), nothing in the towers.
    trained = cells["pretrained"]
    both = trained[trained["n_modalities"] >= 2] if "n_modalities" in trained else trained.iloc[:0]
    print(f"\nmultimodal cells (trained): {int(trained['multimodal'].sum())}; units that see both modalities: "
          f"{len(both)} ({', '.join(sorted(set(both['site']))) or 'none'}), of which concept cells: {int(both['is_cell'].sum())}")

    # 3. lesion the concept's top units; compare with the other concepts and random lesions of the same size
    subject = npb.load_subject("organism", device=args.device)
    ks = [int(x) for x in args.k.split(",")]
    modes = ("zero", "mean")
    n_lesions = len(ks) * len(modes) * (2 + args.random_draws)  # top, bottom and the random draws per k and mode
    print(f"\n[{time.perf_counter() - t0:5.1f}s] lesioning '{args.concept}': {n_lesions} lesions "
          f"({len(ks)} sizes x {len(modes)} modes x (top + bottom + {args.random_draws} random)); "
          "the progress bar shows the time left")
    study = LesionStudy(subject, battery, cells["pretrained"], quiet=args.quiet, batch_size=256)
    dose = study.dose_response(args.concept, ks, modes, random_draws=args.random_draws,
                               orders=("top", "bottom", "random"))
    write_csv(dose, out / f"dose_response_{args.concept}.csv")
    from neuroprobe.lesions import summarize as lesion_summary

    forgetting = lesion_summary(dose)
    write_csv(forgetting, out / f"forgetting_{args.concept}.csv")
    print(f"\n[{time.perf_counter() - t0:5.1f}s] forgetting after lesioning '{args.concept}' units:")
    print(forgetting.to_string(index=False))

    # 4. figures
    figs = {
        "cells_per_layer": cell_figures.plot_cells_per_layer(cells["pretrained"], cells["random"]),
        f"dose_response_{args.concept}": lesion_figures.plot_dose_response(dose),
    }
    best = cells["pretrained"].query("is_cell and concept == @args.concept")
    if len(best):
        top = best.sort_values("d_prime", ascending=False).iloc[0]
        figs["concept_cell"] = cell_figures.plot_unit(recs["pretrained"], top["site"], int(top["unit"]),
                                                      cells=cells["pretrained"])
    for name, fig in figs.items():
        save_figure(fig, out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    print(f"\n[{time.perf_counter() - t0:5.1f}s] wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")

    # 5. the atlas: a page per concept and per cell, beside the untrained twin; opens from disk
    from neuroprobe.atlas import build_atlas

    atlas = build_atlas(recs["pretrained"], out / "atlas", cells=cells["pretrained"], untrained=cells["random"],
                        lesions=forgetting, quiet=args.quiet)
    print(f"[{time.perf_counter() - t0:5.1f}s] atlas: {atlas.n_unit_pages} unit pages, {atlas.bytes / 2**20:.1f} MB; "
          f"open {atlas.index.resolve().as_uri()}")


if __name__ == "__main__":
    main()
