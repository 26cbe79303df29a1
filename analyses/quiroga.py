"""The Quiroga protocol on a subject: responsive units, concept cells, invariant cells and sparseness per layer.

Reproduces the measurements of Quiroga et al. 2005 (Nature 435:1102, "Invariant visual
representation by single neurons in the human brain") and Waydo et al. 2006 (J Neurosci
26:10232, "Sparse representation in the human medial temporal lobe") on a network: per
site (layer), the fraction of units that respond to at least one concept, of concept cells
(one concept, confirmed on held-out stimuli), of invariant cells (the concept's stimuli
beat the others within every form the site sees), the population sparseness (per stimulus,
over units) and the lifetime sparseness (per unit, over stimuli), and Waydo's sparseness
``a`` (the probability that a unit responds to a stimulus).  The trained subject is
measured beside its untrained twin, a random rotation of every site's basis and a label
shuffle, in one run.  The human figures are printed beside the network's as a reference,
not a target: a network layer is not a medial temporal lobe.

Definitions (all from ``neuroprobe.concept_cells`` and its controls):

* responsive unit: its concept is significant in the FDR family and its screening median is
  k SD above the baseline (``neuroprobe.analysis.criterion.responsive_units``; Quiroga's
  response criterion, with the other concepts' stimuli as the baseline);
* concept cell: exactly one responsive concept, confirmed on the testing split;
* invariant cell: a concept cell whose concept wins in every form the site sees (label-shuffle
  p <= 0.05 per form, testing split);
* population sparseness: Vinje–Gallant sparseness of a stimulus's responses over the live
  units of a site, averaged over stimuli; lifetime sparseness: the same per unit over
  stimuli, averaged over live units (0 = dense, 1 = one stimulus or one unit);
* response probability a: the fraction of (live unit, stimulus) pairs where the response
  exceeds the unit's median by k robust SD (1.4826 MAD over the site's stimuli; a unit
  whose MAD is 0, a mostly silent ReLU, responds where it exceeds its median at all).

    python analyses/quiroga.py [--model organism] [--out DIR] [--quick] [--seed 0]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.experiments.cli import experiment_args, run_main  # noqa: E402

NAME = "quiroga"
QUESTION = ("How many of a network's units respond to a concept, how many are concept cells, how many are "
            "invariant across forms, and how sparse is the code, layer by layer, against its untrained twin, "
            "a rotated basis and shuffled labels?")
PUBLISHED = (
    "Quiroga et al. 2005 (Nature 435:1102) recorded MTL units in epilepsy patients and found that a minority of them "
    "responded to at least one picture; among the responsive units a subset responded invariantly to strikingly "
    "different pictures of one person or landmark, and some also to its written name.  Waydo et al. 2006 "
    "(J Neurosci 26:10232) estimated from those data, with a Bayesian model, that a given image activates only a "
    "very small fraction of MTL neurons (of the order of a percent or less).  Stated qualitatively: the papers' exact "
    "counts and estimates were not checked for this page.  A reference, not a target."
)

MEASURES = {
    "responsive_pct": "responsive units (%)",
    "cells_pct": "concept cells (%)",
    "invariant_pct": "invariant cells (%)",
}
SPARSENESS = {
    "population_sparseness": "population sparseness",
    "lifetime_sparseness": "lifetime sparseness",
    "response_probability_pct": "response probability a (%)",
}


def add_options(ap) -> None:
    """The script's own options."""
    ap.add_argument("--battery", default=None, help="battery (default: the subject's default battery)")


def response_probability(rec, site: str, k: float) -> tuple[float, int]:
    """Waydo's sparseness ``a`` at ``site``: the fraction of live unit x stimulus pairs above threshold.

    The threshold of a unit is its median over the site's stimuli plus ``k`` robust SD
    (1.4826 MAD); with a MAD of 0 it is the median itself (strictly above it responds).

    Returns
    -------
    a, n_units
        The fraction (0-1) and the live units it was measured over.
    """
    x = np.asarray(rec.responses(site)[()], dtype=np.float64)
    x = x[~np.isnan(x).all(axis=1)]
    if not len(x):
        return float("nan"), 0
    live = np.nanmax(x, axis=0) > np.nanmin(x, axis=0)
    x = x[:, live]
    if not x.shape[1]:
        return float("nan"), 0
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    return float((x > med + k * mad).mean()), int(x.shape[1])


def sparseness_rows(rec, cells: pd.DataFrame, condition: str, k: float) -> list[dict]:
    """Population, lifetime and response-probability sparseness per site of one recording."""
    from neuroprobe.analysis import population_sparseness

    pop = population_sparseness(rec)
    pop_site = pop.groupby("site", sort=False)["population_sparseness"].mean()
    rows = []
    for site, g in cells.groupby("site", sort=False):
        live = g[~g["dead"]]
        a, n_live = response_probability(rec, site, k)
        rows += [
            dict(condition=condition, site=site, measure="population_sparseness", value=pop_site.get(site, np.nan),
                 n=int(len(live))),
            dict(condition=condition, site=site, measure="lifetime_sparseness",
                 value=float(live["lifetime_sparseness"].mean()) if len(live) else np.nan, n=int(len(live))),
            dict(condition=condition, site=site, measure="response_probability_pct", value=100.0 * a, n=n_live),
        ]
    return rows


def fraction_rows(cells: pd.DataFrame, condition: str) -> list[dict]:
    """Units, dead, responsive, cells and invariant per site (counts and % of the site's units)."""
    from neuroprobe.analysis.criterion import responsive_units

    cells = cells.assign(responsive=responsive_units(cells))
    rows = []
    for site, g in cells.groupby("site", sort=False):
        units = len(g)
        counts = dict(units=units, dead=int(g["dead"].sum()), responsive=int(g["responsive"].sum()),
                      cells=int(g["is_cell"].sum()), invariant=int(g["invariant"].sum()))
        for m, v in counts.items():
            rows.append(dict(condition=condition, site=site, measure=m, value=float(v), n=units))
        for m in ("responsive", "cells", "invariant"):
            rows.append(dict(condition=condition, site=site, measure=f"{m}_pct", value=100.0 * counts[m] / units,
                             n=units))
    return rows


def shuffle_rows(shuffle: pd.DataFrame) -> list[dict]:
    """The label-shuffle control's responsive units and cells per site (mean over shuffles)."""
    rows = []
    n_shuffles = int(shuffle["shuffle"].nunique())
    for site, g in shuffle.groupby("site", sort=False):
        units = int(g["units"].iloc[0])
        for m in ("responsive", "cells"):
            if m not in g:
                continue
            v = float(g[m].mean())
            rows.append(dict(condition="shuffle", site=site, measure=m, value=v, n=units,
                             note=f"mean of {n_shuffles} shuffles"))
            rows.append(dict(condition="shuffle", site=site, measure=f"{m}_pct", value=100.0 * v / units, n=units,
                             note=f"mean of {n_shuffles} shuffles"))
    return rows


def main() -> None:
    """Run the protocol and write the report."""
    args = experiment_args(NAME, __doc__, add=add_options)
    from neuroprobe.analysis.controls import rotate_recording
    from neuroprobe.analysis.figures import plot_by_site
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.study import study_from_args
    from neuroprobe.recording.reader import open_recording

    rep = Report(NAME, args.out, QUESTION, args=args)
    study = study_from_args(args)
    k = float(study.cells["trained"].attrs.get("k", 5.0))
    rows: list[dict] = []
    for cond in ("trained", "untrained", "rotation"):
        rows += fraction_rows(study.cells[cond], cond)
    rows += shuffle_rows(study.cells["shuffle"])
    rows += sparseness_rows(study.recording, study.cells["trained"], "trained", k)
    rows += sparseness_rows(study.untrained_recording, study.cells["untrained"], "untrained", k)
    with tempfile.TemporaryDirectory(prefix="quiroga-rotation-") as tmp:
        # the rotation control's own basis (same seed, same z-scoring), for the sparseness of a rotated code
        path = rotate_recording(study.recording, Path(tmp) / "rotated.h5", seed=int(args.seed))
        with open_recording(path) as rotated:
            rows += sparseness_rows(rotated, study.cells["rotation"], "rotation", k)
    frame = pd.DataFrame(rows)
    for r in frame.itertuples(index=False):
        rep.add(r.measure, r.value, condition=r.condition, site=r.site, n=int(r.n),
                note=getattr(r, "note", None) if isinstance(getattr(r, "note", None), str) else None)

    # whole subject: every site's units together
    totals = []
    for cond in ("trained", "untrained", "rotation", "shuffle"):
        sub = frame[frame["condition"] == cond].pivot_table(index="site", columns="measure", values="value",
                                                             sort=False)
        units = float(sub["units"].sum()) if "units" in sub else float(
            frame[(frame["condition"] == "trained") & (frame["measure"] == "units")]["value"].sum())
        row = {"condition": cond, "units": int(units)}
        for m in ("responsive", "cells", "invariant"):
            if m in sub:
                row[f"{m} (%)"] = 100.0 * float(sub[m].sum()) / units
                rep.add(f"{m}_pct", row[f"{m} (%)"], condition=cond, site="all", n=int(units))
        if "response_probability_pct" in sub:
            live = frame[(frame["condition"] == cond) & (frame["measure"] == "response_probability_pct")]
            w = live["n"].to_numpy(dtype=float)
            a = float(np.nansum(live["value"].to_numpy() * w) / w[np.isfinite(live["value"].to_numpy())].sum())
            row["response probability a (%)"] = a
            rep.add("response_probability_pct", a, condition=cond, site="all", n=int(w.sum()))
        totals.append(row)
    summary = pd.DataFrame(totals)

    fig = plot_by_site(frame, MEASURES, title=f"{args.model}: the Quiroga protocol per site")
    rep.figure(fig, "quiroga_fractions", main=True)
    fig = plot_by_site(frame, SPARSENESS, conditions=["trained", "untrained", "rotation"],
                       title=f"{args.model}: sparseness per site")
    rep.figure(fig, "quiroga_sparseness")

    t = summary.set_index("condition")
    tr = t.loc["trained"]
    cells_sites = frame[(frame["condition"] == "trained") & (frame["measure"] == "cells") & (frame["value"] > 0)]
    where = ", ".join(f"{s} ({int(v)})" for s, v in zip(cells_sites["site"], cells_sites["value"])) or "no site"
    finding = (
        f"Of the {int(tr['units'])} units of {args.model} ({len(set(frame['site']))} sites), "
        f"{tr['responsive (%)']:.1f}% respond to a concept, {tr['cells (%)']:.1f}% are concept cells "
        f"({where}) and {tr['invariant (%)']:.1f}% are invariant cells.  "
        f"A unit responds to {tr['response probability a (%)']:.1f}% of the stimuli on average (response "
        f"probability a, over live units).")
    sp = frame[frame["measure"].isin(["population_sparseness", "lifetime_sparseness"])].pivot_table(
        index=["site", "condition"], columns="measure", values="value", sort=False)
    cell_sites = list(cells_sites["site"])
    if cell_sites:
        def pair(s: str, cond: str) -> str:
            return f"{sp.loc[(s, cond), 'population_sparseness']:.2f} / {sp.loc[(s, cond), 'lifetime_sparseness']:.2f}"

        finding += "  Sparseness where the cells are (population / lifetime; untrained twin in brackets): " + "; ".join(
            f"{s} {pair(s, 'trained')} ({pair(s, 'untrained')})" for s in cell_sites if (s, "untrained") in sp.index
        ) + "."
    if float(tr["cells (%)"]) == 0:
        finding += "  No concept cell was found: a null result."
    ctrl = []
    for cond, label in (("untrained", "untrained twin"), ("rotation", "rotated basis"), ("shuffle", "label shuffle")):
        if cond in t.index:
            r = t.loc[cond]
            ctrl.append(f"{label}: {r.get('responsive (%)', float('nan')):.1f}% responsive, "
                        f"{r.get('cells (%)', float('nan')):.2f}% cells"
                        + (f", {r['invariant (%)']:.1f}% invariant" if pd.notna(r.get("invariant (%)")) else ""))
    control = "; ".join(ctrl) + (
        ".  The label shuffle's invariance is not computed (no permutations under shuffled labels); its invariant "
        "cells are at most its cells.  Sparseness does not depend on labels, so the shuffle has none.")
    if args.quick:
        control += "  (--quick: the rank-sum test's normal approximation, 200 permutations, 2 shuffles.)"
    rep.conclude(finding=finding, control=control, published=PUBLISHED, summary=summary)


if __name__ == "__main__":
    run_main(main)
