"""Are a unit's responses reproduced by some unit of a network trained from another seed? Gurnee et al. 2024's analogue.

Reproduces the universality measure of Gurnee et al. (2024, "Universal neurons in GPT2
language models") on organisms trained from ``--seeds N`` seeds (seed 0 is the committed
organism; the others are trained once into the cache and shared with
``selectivity_importance.py``): every unit of every site of the ``mlp`` montage is
matched to its most correlated unit at the same site of each other organism (Pearson
correlation of the responses over the whole battery), and that best match is compared with
the best match after a random rotation of the other organism's basis.  A unit is universal
when the excess (best match minus rotated baseline, averaged over the other seeds) exceeds
``--threshold`` (0.5, Gurnee's).  Are the concept cells the universal ones?  The fraction
universal among concept cells is set against the fraction among the other units of the
sites that have cells.

Controls, in the same run: the querying organism's basis rotated too (no unit can be
universal; its fraction should be near 0), and the untrained twins (the same architecture
from the same seeds, untrained: how much universality the architecture and the stimuli give
without learning).  Fractions are summarised over seeds by their mean and a t-interval.

    python analyses/universality.py [--seeds 5] [--threshold 0.5]
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from neuroprobe.experiments.cli import experiment_args, run_main

NAME = "universality"
CONDITIONS = {"trained": "trained", "rotation": "rotated basis", "untrained": "untrained twins"}


def _options(ap) -> None:
    ap.add_argument("--seeds", type=int, default=5, help="organisms trained from seeds 0..N-1 (default 5; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per organism (default 1000; quick 60)")
    ap.add_argument("--probe", default=None, help="battery (default: the subject's, digits for the organism)")
    ap.add_argument("--montage", default="mlp", help="sites compared (default mlp: units after a nonlinearity)")
    ap.add_argument("--threshold", type=float, default=0.5, help="excess correlation of a universal unit (default 0.5)")


def site_responses(recs: list, sites: list[str]) -> dict[str, list[np.ndarray]]:
    """Site -> each run's ``[stimuli, units]`` responses over the stimuli that reach the site."""
    out = {}
    for site in sites:
        xs = [np.asarray(r.responses(site)[()], dtype=np.float64) for r in recs]
        reach = ~np.isnan(xs[0]).all(axis=1)
        out[site] = [x[reach] for x in xs]
    return out


def main() -> None:
    args = experiment_args(NAME, __doc__, add=_options)
    from neuroprobe.analysis.universality import universal_units
    from neuroprobe.experiments.cache import cached_recording
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.seeds import replicates, seed_interval
    from neuroprobe.experiments.study import cached_cells
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import get_spec

    rep = Report(NAME, args.out, "Is a unit's response reproduced by a unit of a network trained from another seed, "
                 "more than a rotated basis allows, and are concept cells the universal units?", args=args)
    n_seeds = 2 if args.quick and args.seeds == 5 else args.seeds
    steps = args.steps or (60 if args.quick else 1000)
    runs = replicates(args.model, n_seeds, steps=steps, cache=args.cache, minimum=2, quiet=args.quiet)
    battery = Battery.load(args.probe or get_spec(runs[0].model).default_battery)
    modalities = tuple(battery.table["modality"].unique())

    recs, twins, cells = [], [], []
    for run in runs:
        subject = run.load(device=args.device, modalities=modalities)
        rec = cached_recording(subject, battery, cache=args.cache, montage=args.montage, quiet=args.quiet)
        recs.append(rec)
        c = cached_cells(rec, quiet=args.quiet, seed=args.seed)
        cells.append(c.assign(run=len(cells))[["run", "site", "unit", "is_cell", "concept"]])
        twin = run.load(init="random", device=args.device, modalities=modalities)
        twins.append(cached_recording(twin, battery, cache=args.cache, montage=args.montage, quiet=args.quiet))
        del subject, twin
    sites = list(recs[0].site_names)
    trained = site_responses(recs, sites)
    tables = {
        "trained": universal_units(trained, threshold=args.threshold, seed=args.seed),
        "rotation": universal_units(trained, threshold=args.threshold, seed=args.seed, rotate_query=True),
        "untrained": universal_units(site_responses(twins, sites), threshold=args.threshold, seed=args.seed),
    }
    cell_table = pd.concat(cells, ignore_index=True)
    units = pd.concat([t.assign(condition=c) for c, t in tables.items()], ignore_index=True)
    units["seed"] = units["run"].map({i: r.seed for i, r in enumerate(runs)})
    units = units.merge(cell_table, on=["run", "site", "unit"], how="left")
    units.loc[units["condition"] != "trained", ["is_cell", "concept"]] = [False, None]
    units["is_cell"] = units["is_cell"].fillna(False).astype(bool)
    rep.table(units.drop(columns="run"), "units")

    # ---- fraction universal per site and condition: per seed, then the mean and t-interval over seeds
    alive = units[units["alive"]]
    per_seed = (alive.groupby(["condition", "site", "seed"], sort=False)
                .agg(universal=("universal", "mean"), excess=("excess", "mean"), best_match=("best_match", "mean"),
                     baseline=("baseline", "mean"), units=("unit", "size")).reset_index())
    pooled = (alive.groupby(["condition", "seed"], sort=False)
              .agg(universal=("universal", "mean"), excess=("excess", "mean"), best_match=("best_match", "mean"),
                   baseline=("baseline", "mean"), units=("unit", "size")).reset_index().assign(site="all sites"))
    per_seed = pd.concat([per_seed, pooled], ignore_index=True)
    rep.table(per_seed, "fractions_per_seed")
    summary = []
    for (cond, site), g in per_seed.groupby(["condition", "site"], sort=False):
        for measure, label in (("universal", "fraction_universal"), ("excess", "mean_excess_correlation"),
                               ("best_match", "mean_best_match"), ("baseline", "mean_rotated_baseline")):
            mean, lo, hi = seed_interval(g[measure])
            rep.add(label, mean, condition=cond, site=site, ci=(lo, hi), n=len(g),
                    note=f"mean over seeds, 95% t-interval over seeds; {int(g['units'].mean())} live units per seed")
            if measure == "universal":
                summary.append(dict(condition=CONDITIONS[cond], site=site, fraction_universal=mean, ci_low=lo,
                                    ci_high=hi, mean_excess=g["excess"].mean(), live_units=int(g["units"].mean())))

    # ---- concept cells against the other units of the sites that have cells
    tr = alive[alive["condition"] == "trained"]
    cell_sites = sorted(set(tr.loc[tr["is_cell"], "site"]))
    kinds = []
    if cell_sites:
        sub = tr[tr["site"].isin(cell_sites)]
        kinds = (sub.assign(kind=np.where(sub["is_cell"], "concept cells", "other units"))
                 .groupby(["kind", "seed"]).agg(universal=("universal", "mean"), excess=("excess", "mean"),
                                                n_universal=("universal", "sum"), units=("unit", "size"))
                 .reset_index())
        for kind, g in kinds.groupby("kind"):
            for measure, label in (("universal", "fraction_universal"), ("excess", "mean_excess_correlation")):
                mean, lo, hi = seed_interval(g[measure])
                rep.add(label, mean, condition="trained", site=",".join(cell_sites), concept=kind, ci=(lo, hi),
                        n=len(g), note=f"{g['units'].sum()} units over seeds; t-interval over seeds")
        for kind, g in kinds.groupby("kind"):
            k, n = int(g["n_universal"].sum()), int(g["units"].sum())
            rep.add("fraction_universal_pooled", k / n if n else np.nan, condition="trained", site=",".join(cell_sites),
                    concept=kind, ci=wilson(k, n), n=n, note=f"{k} of {n} units, all seeds pooled; Wilson 95% interval")
        from scipy.stats import fisher_exact

        table = [[int(sub.loc[sub["is_cell"], "universal"].sum()), int((~sub.loc[sub["is_cell"], "universal"]).sum())],
                 [int(sub.loc[~sub["is_cell"], "universal"].sum()), int((~sub.loc[~sub["is_cell"], "universal"]).sum())]]
        odds, p_fisher = fisher_exact(table, alternative="two-sided")
        rep.add("fisher_p_cells_vs_other", p_fisher, condition="trained", site=",".join(cell_sites),
                note=f"universal/not among cells {table[0]}, among other units {table[1]} (all seeds pooled)")
    rep.figure(plot_fractions(alive, per_seed, kinds, args.threshold), "universality", main=True)

    sm = pd.DataFrame(summary)
    allrow = sm[sm["site"] == "all sites"].set_index("condition")

    def frac(cond: str) -> str:
        r = allrow.loc[CONDITIONS[cond]]
        ci = f" [{r['ci_low']:.1%}, {r['ci_high']:.1%}]" if np.isfinite(r["ci_low"]) else ""
        return f"{r['fraction_universal']:.1%}{ci}"

    best_site = sm[(sm["condition"] == "trained") & (sm["site"] != "all sites")].sort_values("fraction_universal")
    top_site = best_site.iloc[-1] if len(best_site) else None
    cell_txt = "no concept cells were found, so the cell comparison is empty"
    if len(kinds):
        kc = kinds.groupby("kind")[["n_universal", "units"]].sum()

        def share(kind: str) -> str:
            k, n = (int(kc.loc[kind, "n_universal"]), int(kc.loc[kind, "units"])) if kind in kc.index else (0, 0)
            return f"{k}/{n} ({k / n:.1%})" if n else "none"

        verdict = ("the cells are not detectably more universal than the other units" if p_fisher > 0.05 else
                   "the two differ (Fisher p ≤ 0.05)")
        cell_txt = (f"are concept cells the universal ones? Universal among concept cells: {share('concept cells')}, "
                    f"among the other live units of {', '.join(cell_sites)}: {share('other units')} (seeds pooled; "
                    f"Fisher's exact p = {p_fisher:.2g}): {verdict}")
    finding = (f"Across {len(runs)} organisms, {frac('trained')} of live units (all sites of the {args.montage} montage; "
               f"mean [95% t-interval over seeds]) have an excess correlation above {args.threshold:g}"
               + (f"; the most universal site is {top_site['site']} ({top_site['fraction_universal']:.1%})"
                  if top_site is not None else "") + f". {cell_txt[0].upper() + cell_txt[1:]}.")
    control = (f"Rotating the querying organism's basis too gives {frac('rotation')} universal (the null; should be ~0). "
               f"Untrained twins from the same seeds give {frac('untrained')}: the share the architecture and the "
               f"stimuli produce without learning.")
    published = ("Gurnee et al. 2024 (GPT-2 small/medium, 5 seeds, 100M tokens): 1-5% of neurons are universal "
                 "(excess correlation over a randomly rotated baseline > 0.5), and universal neurons tend to be "
                 "interpretable (qualitative comparison: a 230k-parameter digit model on a 960-stimulus battery).")
    rep.write(finding=finding, control=control, published=published, summary=sm)
    if not args.quiet:
        print(f"{NAME}: {finding}\n{control}\nwrote {args.out}", file=sys.stderr)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def plot_fractions(alive: pd.DataFrame, per_seed: pd.DataFrame, kinds: pd.DataFrame, threshold: float):
    """Main figure: excess correlations (effect and controls), universal fraction per site, cells against other units."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from neuroprobe.experiments.seeds import seed_interval
    from neuroprobe.experiments.style import COLUMN, CONDITION_COLOURS, paper_style

    has_kinds = len(kinds) > 0
    sites = list(dict.fromkeys(per_seed["site"]))
    with paper_style():
        ratios = [1.25, 1.5] + ([0.55] if has_kinds else [])
        fig, axes = plt.subplots(len(ratios), 1, figsize=(COLUMN, 6.2 if has_kinds else 5.0),
                                 gridspec_kw={"height_ratios": ratios})
        ax = axes[0]
        lo_edge = min(-0.3, float(alive["excess"].min()))
        bins = np.linspace(lo_edge, max(1.0, float(alive["excess"].max())), 41)
        for cond, label in CONDITIONS.items():
            d = alive[alive["condition"] == cond]["excess"]
            if len(d):
                sns.histplot(d, bins=bins, stat="percent", element="step", fill=False, ax=ax,
                             color=CONDITION_COLOURS[cond], label=label)
        ax.axvline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(0, 2000)  # headroom above the histograms for the legend
        ax.set_yticks([0, 1, 10, 100], ["0", "1", "10", "100"])
        ax.set_xlabel("excess correlation (best match − rotated baseline)")
        ax.set_ylabel("units (% of live)")
        ax.legend(frameon=False, loc="upper left", fontsize=8, handlelength=1.2, ncol=2, columnspacing=0.8)
        ax.set_title("A  all live units of all seeds", loc="left", fontsize=8)

        ax = axes[1]
        offsets = {c: o for c, o in zip(CONDITIONS, (-0.22, 0.0, 0.22))}
        for cond, label in CONDITIONS.items():
            d = per_seed[per_seed["condition"] == cond]
            for i, site in enumerate(sites):
                g = d[d["site"] == site]["universal"] * 100
                if g.empty:
                    continue
                mean, lo, hi = seed_interval(g)
                y = i + offsets[cond]
                ax.errorbar([mean], [y], xerr=[[mean - lo], [hi - mean]] if np.isfinite(lo) else None, fmt="o",
                            ms=3.5, color=CONDITION_COLOURS[cond], lw=1, capsize=1.5,
                            label=label if i == 0 else None)
        ax.set_yticks(range(len(sites)), sites)
        ax.invert_yaxis()
        ax.set_xlabel(f"universal units (% of live units; excess > {threshold:g})")
        ax.set_title("B  per site: mean over seeds, 95% t-interval", loc="left", fontsize=8)
        ax.legend(frameon=False, loc="lower right", fontsize=8)
        ax.set_xlim(left=-0.5)

        if has_kinds:
            ax = axes[2]
            for i, kind in enumerate(["concept cells", "other units"]):
                g = kinds[kinds["kind"] == kind]
                k, n = int(g["n_universal"].sum()), int(g["units"].sum())
                if n == 0:
                    continue
                lo, hi = wilson(k, n)
                ax.errorbar([100 * k / n], [i], xerr=[[100 * (k / n - lo)], [100 * (hi - k / n)]], fmt="o", ms=4,
                            color=CONDITION_COLOURS["trained"], capsize=2, lw=1)
                ax.text(100 * hi, i, f"  {k}/{n}", va="center", fontsize=8)
            ax.set_yticks([0, 1], ["concept cells", "other units"])
            ax.set_ylim(1.6, -0.6)
            ax.set_xlim(left=0)
            ax.set_xlabel("universal (% of units; seeds pooled, Wilson 95% CI)")
            ax.set_title("C  trained, sites with concept cells", loc="left", fontsize=8)
        fig.tight_layout()
    return fig


if __name__ == "__main__":
    run_main(main)
