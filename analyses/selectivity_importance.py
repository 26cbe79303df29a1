"""Does a unit's class selectivity predict how much the subject needs it? Morcos et al. 2018 across training seeds.

Reproduces the single-unit ablation analysis of Morcos, Barrett, Rabinowitz & Botvinick
(2018, "On the importance of single directions for generalization"; followed up by
Leavitt & Morcos 2021, "Selectivity considered harmful"): every active unit of the
chosen sites is ablated alone, and its class selectivity index (Morcos' SI on the
screening split) is set against the drop of the zero-shot readout it causes on the
testing split — over all concepts ("overall"), and on the unit's own preferred concept
("own class").  Each organism is one training run; ``--seeds N`` organisms are trained
from seeds 0..N-1 (seed 0 is the committed organism, the others are trained once into the
cache and reused by ``universality.py``).

Controls, in the same run: a shuffled null (selectivity permuted across the units of a
site, ``--permutations`` times, per seed), the drop on a randomly chosen other concept
instead of the preferred one (is the own-class relation class-specific?), and the mean
drop of the most selective tenth of the units against random units of the same count.
Spearman correlations are summarised over seeds by their mean and a t-interval over seeds.

    python analyses/selectivity_importance.py [--seeds 5] [--sites image.fc,text.fc] [--mode zero]
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from neuroprobe.experiments.cli import experiment_args, run_main

NAME = "selectivity_importance"
#: the fraction of most selective units compared with random units of the same count
TOP_FRACTION = 0.1
MEASURES = {"overall": "overall drop", "own_class": "own-class drop", "random_class": "random-class drop"}


def _options(ap) -> None:
    ap.add_argument("--seeds", type=int, default=5, help="organisms trained from seeds 0..N-1 (default 5; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per organism (default 1000; quick 60)")
    ap.add_argument("--probe", default=None, help="battery (default: the subject's, digits for the organism)")
    ap.add_argument("--sites", default=None,
                    help="sites whose units are ablated one by one (default image.fc,text.fc for the organism, else mlp)")
    ap.add_argument("--mode", default="zero", choices=("zero", "mean"), help="ablation (default zero, as Morcos)")
    ap.add_argument("--max-units", type=int, default=None,
                    help="ablate at most this many random active units per site (default: all for the organism, 64 else)")
    ap.add_argument("--permutations", type=int, default=1000, help="shuffled-null permutations per seed (quick 200)")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def unit_table(study, mode: str, rng: np.random.Generator, max_units: int | None) -> pd.DataFrame:
    """Selectivity and single-ablation drops of the study's active units (one row per unit)."""
    sel = study.class_selectivity()
    sel = sel[sel["active"] & np.isfinite(sel["si_morcos"])]
    if max_units is not None:
        sel = pd.concat([g if len(g) <= max_units else g.iloc[np.sort(rng.choice(len(g), max_units, replace=False))]
                         for _, g in sel.groupby("site", sort=False)])
    changes = study.single_unit_changes(mode, units=sel[["site", "unit"]])
    concepts = list(study.concepts)
    ch = changes[concepts].to_numpy()
    pref = sel["pref_concept"].to_numpy()
    col = np.array([concepts.index(c) for c in pref])
    other = np.array([rng.choice([j for j in range(len(concepts)) if j != c]) for c in col])
    rows = np.arange(len(col))
    return pd.DataFrame({
        "site": sel["site"].to_numpy(), "unit": sel["unit"].to_numpy(), "si_morcos": sel["si_morcos"].to_numpy(),
        "pref_concept": pref, "overall": -ch.mean(axis=1), "own_class": -ch[rows, col],
        "random_class": -ch[rows, other], "random_class_concept": np.asarray(concepts)[other],
    })


def correlations(units: pd.DataFrame, n_perm: int, rng: np.random.Generator) -> pd.DataFrame:
    """Spearman ρ of selectivity with each drop, per site and over all sites, with the shuffled null.

    ``all sites`` correlates within-site percentile ranks, so it measures the relation inside
    sites (the shuffled null is then centred on zero).
    """
    rows = []
    # pooled over sites on within-site percentile ranks: sites differ in both selectivity and drop, and a
    # pooled correlation of raw values would measure that difference (it survives the within-site shuffle)
    pooled = units.copy()
    cols = ["si_morcos", *MEASURES]
    pooled[cols] = units.groupby("site", sort=False)[cols].rank(pct=True)
    groups = [(s, g) for s, g in units.groupby("site", sort=False)] + [("all sites", pooled)]
    site_of = units["site"].to_numpy()
    for site, g in groups:
        si = g["si_morcos"].to_numpy()
        for m in MEASURES:
            rows.append(dict(site=site, measure=m, condition="trained", rho=_spearman(si, g[m].to_numpy()), n=len(g)))
        # shuffled null: selectivity permuted across the units of each site (pooled sites keep their own units)
        sites_g = site_of[g.index.to_numpy()] if site == "all sites" else None
        null = {m: np.empty(n_perm) for m in ("overall", "own_class")}
        for p in range(n_perm):
            if sites_g is None:
                perm = rng.permutation(si)
            else:
                perm = si.copy()
                for s in np.unique(sites_g):
                    idx = np.flatnonzero(sites_g == s)
                    perm[idx] = perm[rng.permutation(idx)]
            for m in null:
                null[m][p] = _spearman(perm, g[m].to_numpy())
        for m, v in null.items():
            obs = rows[-3 + list(MEASURES).index(m)]["rho"]
            p_two = (1 + np.sum(np.abs(v) >= abs(obs))) / (1 + n_perm) if np.isfinite(obs) else np.nan
            rows.append(dict(site=site, measure=m, condition="shuffle", rho=float(np.nanmean(v)),
                             lo=float(np.nanpercentile(v, 2.5)), hi=float(np.nanpercentile(v, 97.5)), n=len(g),
                             p_trained=p_two))
    return pd.DataFrame(rows)


def top_vs_random(units: pd.DataFrame, rng: np.random.Generator, draws: int = 1000) -> pd.DataFrame:
    """Mean overall drop of the most selective tenth of each site's units against random units of the same count."""
    rows = []
    for site, g in units.groupby("site", sort=False):
        n = max(1, int(round(TOP_FRACTION * len(g))))
        top = g.nlargest(n, "si_morcos")["overall"].mean()
        null = np.array([g["overall"].to_numpy()[rng.choice(len(g), n, replace=False)].mean() for _ in range(draws)])
        rows.append(dict(site=site, n=n, top=float(top), random=float(null.mean()),
                         lo=float(np.percentile(null, 2.5)), hi=float(np.percentile(null, 97.5)),
                         p=float((1 + np.sum(null >= top)) / (1 + draws))))
    return pd.DataFrame(rows)


def main() -> None:
    args = experiment_args(NAME, __doc__, add=_options)
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.seeds import replicates, seed_interval
    from neuroprobe.lesions.forgetting import LesionStudy
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import get_spec

    n_seeds = 2 if args.quick and args.seeds == 5 else args.seeds
    steps = args.steps or (60 if args.quick else 1000)
    n_perm = 200 if args.quick and args.permutations == 1000 else args.permutations
    rep = Report(NAME, args.out, "Does a unit's class selectivity predict the readout drop its single ablation "
                 "causes, overall and on its own preferred concept?", args=args)
    runs = replicates(args.model, n_seeds, steps=steps, cache=args.cache, quiet=args.quiet)
    battery = Battery.load(args.probe or get_spec(runs[0].model).default_battery)
    sites = args.sites or ("image.fc,text.fc" if runs[0].model == "organism" else "mlp")
    site_list = [s.strip() for s in sites.split(",") if s.strip()]
    max_units = args.max_units if args.max_units is not None else (None if runs[0].model == "organism" else 64)

    all_units, all_corr, all_top = [], [], []
    for run in runs:
        rng = np.random.default_rng([args.seed, run.seed])
        subject = run.load(device=args.device, modalities=tuple(battery.table["modality"].unique()))
        study = LesionStudy(subject, battery, None, sites=site_list if len(site_list) > 1 else site_list[0],
                            seed=args.seed, quiet=args.quiet, batch_size=256)
        units = unit_table(study, args.mode, rng, max_units)
        corr = correlations(units, n_perm, rng)
        top = top_vs_random(units, rng)
        for frame in (units, corr, top):
            frame.insert(0, "seed", run.seed)
        all_units.append(units)
        all_corr.append(corr)
        all_top.append(top)
        if not args.quiet:
            c = corr[(corr["site"] == "all sites") & (corr["condition"] == "trained")].set_index("measure")["rho"]
            print(f"{run.label}: {len(units)} units; Spearman overall {c['overall']:+.3f}, own class "
                  f"{c['own_class']:+.3f}, random class {c['random_class']:+.3f}", file=sys.stderr)
        del study, subject
    units = pd.concat(all_units, ignore_index=True)
    corr = pd.concat(all_corr, ignore_index=True)
    top = pd.concat(all_top, ignore_index=True)
    rep.table(units, "units")
    rep.table(corr, "correlations_per_seed")

    # ---- numbers: per seed, and the mean with its t-interval over seeds
    summary = []
    for (site, measure, cond), g in corr.groupby(["site", "measure", "condition"], sort=False):
        label = "random class" if measure == "random_class" else cond
        meas = "own_class" if measure == "random_class" else measure
        for _, r in g.iterrows():
            rep.add(f"spearman_{meas}_seed", r["rho"], condition=label, site=site, x=int(r["seed"]), n=int(r["n"]),
                    ci=(r["lo"], r["hi"]) if cond == "shuffle" else None,
                    note="shuffled-null mean and 95% band" if cond == "shuffle" else None)
        mean, lo, hi = seed_interval(g["rho"])
        if cond == "shuffle":  # the null's spread, not the uncertainty of its mean
            lo, hi = float(g["lo"].mean()), float(g["hi"].mean())
        rep.add(f"spearman_{meas}", mean, condition=label, site=site, ci=(lo, hi), n=len(g),
                note="shuffled null: mean, and its 95% band averaged over seeds" if cond == "shuffle"
                else "mean over seeds, 95% t-interval over seeds")
        summary.append(dict(site=site, measure=MEASURES["own_class" if meas == "own_class" else meas],
                            condition=label, spearman=mean, ci_low=lo, ci_high=hi, seeds=len(g)))
    for site, g in top.groupby("site", sort=False):
        for what, col in (("trained", "top"), ("random", "random")):
            mean, lo, hi = seed_interval(g[col])
            rep.add("mean_overall_drop_top_selective" if what == "trained" else "mean_overall_drop_random_units",
                    mean, condition="trained" if what == "trained" else "random units", site=site, ci=(lo, hi),
                    n=len(g), note=f"most selective {TOP_FRACTION:.0%} of units vs random units of the same count; "
                                   "t-interval over seeds")
    for site, g in top.groupby("site", sort=False):
        rep.add("p_top_vs_random_seeds_below_05", float((g["p"] <= 0.05).mean()), condition="trained", site=site,
                n=len(g), note="fraction of seeds where the top-selective mean drop exceeds 95% of random draws")

    fig_main = plot_correlations(corr)
    rep.figure(fig_main, "selectivity_importance", main=True)
    rep.figure(plot_scatter(units), "selectivity_vs_drop")

    sm = pd.DataFrame(summary)
    all_tr = sm[(sm["site"] == "all sites")].set_index(["measure", "condition"])

    def fmt(meas: str, cond: str) -> str:
        r = all_tr.loc[(meas, cond)]
        return f"{r['spearman']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"

    n = len(runs)
    ov, own, rnd = fmt("overall drop", "trained"), fmt("own-class drop", "trained"), fmt("own-class drop", "random class")
    sh_ov = corr[(corr["site"] == "all sites") & (corr["condition"] == "shuffle") & (corr["measure"] == "overall")]
    band = (sh_ov["lo"].mean(), sh_ov["hi"].mean())
    ov_r = all_tr.loc[("overall drop", "trained")]
    own_r = all_tr.loc[("own-class drop", "trained")]

    def verdict(r) -> str:
        if not np.isfinite(r["ci_low"]):
            return "one seed, no interval"
        if r["ci_low"] > 0:
            return "positive (the interval excludes 0)"
        if r["ci_high"] < 0:
            return "negative (the interval excludes 0)"
        return "not distinguishable from 0 (the interval includes 0)"

    finding = (f"Over {n} organism(s) ({len(units) // max(n, 1)} active units per organism on average, at "
               f"{', '.join(site_list)}; {args.mode} ablation of one unit at a time), Spearman's ρ between Morcos' "
               f"class selectivity and the unit's overall readout drop (sites pooled on within-site ranks) is {ov} "
               f"(mean [95% t-interval over seeds]): "
               f"{verdict(ov_r)}. With the drop on the unit's own preferred concept it is {own}: {verdict(own_r)}.")
    tops = "; ".join(
        f"{site}: {g['top'].mean():.2g} vs {g['random'].mean():.2g} nats (above 95% of random draws in "
        f"{int((g['p'] <= 0.05).sum())} of {len(g)} seeds)" for site, g in top.groupby("site", sort=False))
    control = (f"Shuffled selectivity (within site, {n_perm} permutations per seed) gives ρ within [{band[0]:+.2f}, "
               f"{band[1]:+.2f}] (mean 95% band). The drop on a random other concept instead of the preferred one gives "
               f"ρ {rnd}. Mean overall drop of the most selective {TOP_FRACTION:.0%} of units against random units of "
               f"the same count (mean over seeds) — {tops}.")
    published = ("Morcos et al. 2018 (ICLR; MNIST MLPs, CIFAR-10 convnets, ImageNet ResNet-50): class selectivity was a "
                 "poor predictor of a unit's importance — weakly correlated with the accuracy drop its ablation causes "
                 "and, in some networks, negatively; Leavitt & Morcos 2021 (ICLR) found that regularising class "
                 "selectivity away costs little or no test accuracy (qualitative; the networks and measures differ from "
                 "this organism's).")
    rep.write(finding=finding, control=control, published=published, summary=sm)
    if not args.quiet:
        print(f"{NAME}: {finding}\n{control}\nwrote {args.out}", file=sys.stderr)


def plot_correlations(corr: pd.DataFrame):
    """Main figure: ρ per seed and its mean with the t-interval, beside the shuffled null and the random-class control."""
    import matplotlib.pyplot as plt

    from neuroprobe.experiments.seeds import seed_interval
    from neuroprobe.experiments.style import COLUMN, CONDITION_COLOURS, paper_style

    d = corr[corr["site"] == "all sites"]
    groups = [("overall", "trained", "overall drop", CONDITION_COLOURS["trained"]),
              ("overall", "shuffle", "overall drop,\nshuffled SI", CONDITION_COLOURS["shuffle"]),
              ("own_class", "trained", "own-class drop", CONDITION_COLOURS["trained"]),
              ("own_class", "shuffle", "own-class drop,\nshuffled SI", CONDITION_COLOURS["shuffle"]),
              ("random_class", "trained", "random-class\ndrop", CONDITION_COLOURS["untrained"])]
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN, 2.9))
        for i, (m, cond, label, colour) in enumerate(groups):
            g = d[(d["measure"] == m) & (d["condition"] == cond)]
            if g.empty:
                continue
            if cond == "shuffle":  # the null's 95% band per seed, as a bar
                ax.vlines(np.full(len(g), i) + np.linspace(-0.12, 0.12, len(g)), g["lo"], g["hi"], color=colour,
                          lw=2, alpha=0.6)
            else:
                jitter = np.linspace(-0.12, 0.12, len(g)) if len(g) > 1 else np.zeros(1)
                ax.scatter(np.full(len(g), i) + jitter, g["rho"], s=12, color=colour, alpha=0.55, lw=0)
                mean, lo, hi = seed_interval(g["rho"])
                ax.errorbar([i + 0.28], [mean], yerr=None if not np.isfinite(lo) else [[mean - lo], [hi - mean]],
                            fmt="o", color="k", ms=4, capsize=2, lw=1)
            ax.set_xticks(range(len(groups)), [gr[2] for gr in groups], rotation=35, ha="right")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("Spearman ρ (selectivity index,\nreadout drop from ablating the unit)")
        ax.set_xlim(-0.5, len(groups) - 0.4)
        ax.set_title(f"single-unit ablations, {d['seed'].nunique()} seeds (dots: seeds; black: mean, 95% t-CI; "
                     "grey bars: null 95%)", fontsize=8, loc="left", wrap=True)
        fig.tight_layout()
    return fig


def plot_scatter(units: pd.DataFrame):
    """Selectivity index against the overall and own-class drop, every unit of every seed, one panel per site."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from neuroprobe.experiments.style import COLUMN, paper_style

    sites = list(dict.fromkeys(units["site"]))
    with paper_style():
        fig, axes = plt.subplots(len(sites), 2, figsize=(COLUMN * 1.5, 2.1 * len(sites)), squeeze=False)
        for r, site in enumerate(sites):
            g = units[units["site"] == site]
            for c, (m, label) in enumerate((("overall", "overall drop"), ("own_class", "own-class drop"))):
                ax = axes[r][c]
                for seed, h in g.groupby("seed"):
                    ax.scatter(h["si_morcos"], h[m], s=6, alpha=0.6, lw=0, label=f"seed {seed}")
                mag = np.abs(g[m].to_numpy())
                mag = mag[mag > 0]
                lin = 10.0 ** np.floor(np.log10(np.percentile(mag, 25))) if len(mag) else 1e-3
                ax.set_yscale("symlog", linthresh=lin, linscale=1.5)
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
                ax.axhline(0, color="k", lw=0.5)
                ax.set_xlabel("class selectivity index (Morcos)")
                ax.set_ylabel(f"{label} (nats)")
                ax.set_title(site, fontsize=8, loc="left")
        axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, markerscale=2)
        fig.tight_layout()
    return fig


if __name__ == "__main__":
    run_main(main)
