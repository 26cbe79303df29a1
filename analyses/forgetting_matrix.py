"""Does lesioning one concept's most selective units make the subject forget that concept only? Bau et al. 2020's class-specific lesions.

Reproduces the class-specific ablations of Bau, Zhu, Strobelt, Lapedriza, Zhou & Torralba
(2020, "Understanding the role of individual units in a deep neural network", PNAS): for
every concept, its ``--k`` most selective units (d′ on the screening split, at ``--sites``)
are lesioned and the zero-shot readout of every concept is measured on the testing split,
giving a lesioned-concept × tested-concept **forgetting matrix**.  Then the complement:
**keep only the top k** — every unit of a site is lesioned except the ``k`` most selective
for a concept; does the concept survive on those units alone?

Controls, in the same run: random lesions of the same size (the same count per site, drawn
from active units; ``--draws`` per concept) give each matrix entry its null and a p-value;
keeping ``k`` random units instead of the top ``k`` is the keep-only curve's control; and the
untrained twin's own top-``k`` lesions give the matrix of a network that learned nothing.
How many of each concept's top ``k`` units are confirmed concept cells is reported beside.

    python analyses/forgetting_matrix.py [--k 4] [--draws 50] [--keep-k 1,2,4,8,16,32]
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from neuroprobe.experiments.cli import experiment_args, run_main

NAME = "forgetting_matrix"


def _options(ap) -> None:
    ap.add_argument("--probe", default=None, help="battery (default: the subject's, digits for the organism)")
    ap.add_argument("--sites", default=None,
                    help="sites whose units are ranked and lesioned (default image.fc,text.fc for the organism, else mlp)")
    ap.add_argument("--k", type=int, default=4, help="units lesioned per concept in the matrix (default 4)")
    ap.add_argument("--draws", type=int, default=50, help="random lesions per concept (default 50; quick 5)")
    ap.add_argument("--keep-k", default="1,2,4,8,16,32", help="units kept in the keep-only curves (quick 1,4)")
    ap.add_argument("--keep-draws", type=int, default=5, help="random keep-k draws per k and concept (quick 2)")
    ap.add_argument("--mode", default="zero", choices=("zero", "mean"), help="lesion mode (default zero, as Bau)")


def _ints(text: str) -> list[int]:
    from neuroprobe.errors import NeuroprobeError

    try:
        vals = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        vals = []
    if not vals or vals[0] < 1:
        raise NeuroprobeError(f"--keep-k expects comma-separated positive integers such as 1,2,4,8, not {text!r}.")
    return vals


def matrix_long(m: pd.DataFrame, condition: str) -> pd.DataFrame:
    """A lesioned × tested matrix in long format."""
    out = m.stack(future_stack=True).rename("change").reset_index()
    return out.assign(condition=condition)


def row_summary(m: pd.DataFrame) -> pd.DataFrame:
    """Per lesioned concept: its own change, the other concepts' mean change, and whether it was hit hardest."""
    rows = []
    for c in m.index:
        r = m.loc[c]
        if r.isna().all():
            continue
        others = r.drop(c)
        rows.append(dict(lesioned=c, target_change=float(r[c]), other_change=float(others.mean()),
                         gap=float(r[c] - others.mean()), hit_hardest=bool(r[c] <= others.min())))
    return pd.DataFrame(rows)


def main() -> None:
    args = experiment_args(NAME, __doc__, add=_options)
    from neuroprobe.experiments.cache import cached_recording
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.study import cached_cells
    from neuroprobe.lesions.forgetting import LesionStudy
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import get_spec, load_subject

    rep = Report(NAME, args.out, "When a concept's most selective units are lesioned, does the subject forget that "
                 "concept more than the others and more than after random lesions of the same size, and does the "
                 "concept survive on its top units alone?", args=args)
    draws = 5 if args.quick and args.draws == 50 else args.draws
    keep_ks = _ints("1,4" if args.quick and args.keep_k == "1,2,4,8,16,32" else args.keep_k)
    keep_draws = 2 if args.quick and args.keep_draws == 5 else args.keep_draws
    battery = Battery.load(args.probe or get_spec(args.model).default_battery)
    modalities = tuple(battery.table["modality"].unique())
    sites = [s.strip() for s in (args.sites or ("image.fc,text.fc" if args.model == "organism" else "mlp")).split(",")
             if s.strip()]
    site_arg = sites if len(sites) > 1 else sites[0]
    subject = load_subject(args.model, device=args.device, seed=args.seed, heads=True, quiet=True,
                           modalities=modalities)
    study = LesionStudy(subject, battery, None, sites=site_arg, seed=args.seed, quiet=args.quiet, batch_size=256)
    concepts = list(study.concepts)
    if args.quick:
        concepts = concepts[:4]

    # ---- the matrix, its random null, the untrained twin's matrix
    m = study.forgetting_matrix(concepts, args.k, args.mode)
    null = study.forgetting_null(concepts, args.k, args.mode, draws=draws)
    twin = load_subject(args.model, init="random", device=args.device, seed=args.seed, heads=True, quiet=True,
                        modalities=modalities)
    twin_study = LesionStudy(twin, battery, None, sites=site_arg, seed=args.seed, quiet=args.quiet, batch_size=256)
    m_twin = twin_study.forgetting_matrix(concepts, args.k, args.mode)
    del twin_study, twin

    # which of the top-k are concept cells (the criterion on a recording of the same subject)
    rec = cached_recording(subject, battery, cache=args.cache, quiet=args.quiet)
    cells = cached_cells(rec, quiet=args.quiet, seed=args.seed)
    is_cell = cells.set_index(["site", "unit"])
    top_rows = []
    for c in concepts:
        top = study.top(c, args.k) or {}
        for s, units in top.items():
            for u in units:
                key = (s, int(u))
                cell = key in is_cell.index and bool(is_cell.loc[key, "is_cell"]) and is_cell.loc[key, "concept"] == c
                top_rows.append(dict(concept=c, site=s, unit=int(u), concept_cell=cell))
    tops = pd.DataFrame(top_rows, columns=["concept", "site", "unit", "concept_cell"])
    rep.table(tops, "top_units")

    # null per entry: mean, 2.5/97.5 percentiles, one-sided p (random lesion at least as harmful)
    q = null.groupby(["lesioned", "tested"])["change"]
    stats = pd.DataFrame({"null_mean": q.mean(), "null_lo": q.quantile(0.025), "null_hi": q.quantile(0.975)})
    long = matrix_long(m, "trained").merge(stats.reset_index(), on=["lesioned", "tested"], how="left")
    g = null.merge(long[["lesioned", "tested", "change"]].rename(columns={"change": "obs"}), on=["lesioned", "tested"])
    g["hit"] = g["change"] <= g["obs"]
    pvals = g.groupby(["lesioned", "tested"]).agg(hits=("hit", "sum"), n=("hit", "size"))
    pvals["p_random"] = (1 + pvals["hits"]) / (1 + pvals["n"])
    long = long.merge(pvals["p_random"].reset_index(), on=["lesioned", "tested"], how="left")
    long["diagonal"] = long["lesioned"] == long["tested"]
    frame = pd.concat([long, matrix_long(m_twin, "untrained").assign(diagonal=lambda d: d["lesioned"] == d["tested"])],
                      ignore_index=True)
    rep.table(frame, "matrix")

    # ---- the numbers: per lesioned concept, and over concepts
    rs = row_summary(m).assign(condition="trained")
    rs_twin = row_summary(m_twin).assign(condition="untrained")
    rnd_rows = []
    for (c, d), gg in null.groupby(["lesioned", "draw"]):
        r = gg.set_index("tested")["change"]
        rnd_rows.append(dict(lesioned=c, draw=d, target_change=float(r[c]), other_change=float(r.drop(c).mean()),
                             gap=float(r[c] - r.drop(c).mean()), hit_hardest=bool(r[c] <= r.drop(c).min())))
    rnd = pd.DataFrame(rnd_rows).assign(condition="random")
    for _, r in pd.concat([rs, rs_twin], ignore_index=True).iterrows():
        for meas in ("target_change", "other_change", "gap"):
            rep.add(meas, r[meas], condition=r["condition"], concept=r["lesioned"], n=args.k,
                    note=f"top-{args.k} lesion, {args.mode}")
    for c, gg in rnd.groupby("lesioned"):
        for meas in ("target_change", "other_change", "gap"):
            rep.add(meas, gg[meas].mean(), condition="random", concept=c, n=len(gg),
                    ci=(gg[meas].quantile(0.025), gg[meas].quantile(0.975)),
                    note=f"mean of {len(gg)} random {args.k}-unit lesions (same count per site), 95% band")
    summary = []
    for cond, table in (("trained", rs), ("random", rnd), ("untrained", rs_twin)):
        if table.empty:
            continue
        per_c = table.groupby("lesioned")[["target_change", "other_change", "gap", "hit_hardest"]].mean()
        row = dict(condition=cond, target_change=per_c["target_change"].mean(), other_change=per_c["other_change"].mean(),
                   gap=per_c["gap"].mean(), hit_hardest=per_c["hit_hardest"].mean(), concepts=len(per_c))
        summary.append(row)
        rep.add("mean_target_change", row["target_change"], condition=cond, n=len(per_c),
                note="mean over lesioned concepts of the lesioned concept's own readout change (nats)")
        rep.add("mean_other_change", row["other_change"], condition=cond, n=len(per_c),
                note="mean over lesioned concepts of the other concepts' mean change (nats)")
        rep.add("fraction_target_hit_hardest", row["hit_hardest"], condition=cond, n=len(per_c),
                note="lesioned concept lost the most of all concepts (chance 1/concepts)")
    p_diag = long[long["diagonal"]].set_index("lesioned")["p_random"]
    for c, p in p_diag.items():
        rep.add("p_random_target", p, condition="trained", concept=c, n=draws,
                note="(1 + random lesions at least as harmful to the concept) / (1 + draws)")
    cell_share = tops.groupby("concept")["concept_cell"].mean() if len(tops) else pd.Series(dtype=float)
    for c, v in cell_share.items():
        rep.add("top_k_concept_cells_fraction", v, condition="trained", concept=c, n=args.k)

    # ---- keep only the top k: per site, every unit lesioned but the k most selective for the concept
    keep_parts = []
    for s in sites:
        everything = study.evaluate_many([{s: np.arange(study.n_units[s])}], args.mode)[0]
        for c in concepts:
            dose = study.keep_only(c, keep_ks, s, args.mode, draws=keep_draws)
            if len(dose):
                keep_parts.append(dose.assign(all_lesioned_target=float(everything[c]),
                                              all_lesioned_other=float(everything.drop(c).mean())))
    keep = pd.concat(keep_parts, ignore_index=True) if keep_parts else pd.DataFrame()
    if len(keep):
        rep.table(keep.drop(columns=["units"], errors="ignore"), "keep_only")
        agg = keep.groupby(["site", "order", "k"])[["target_change", "other_change"]].mean().reset_index()
        for _, r in agg.iterrows():
            rep.add("keep_target_change", r["target_change"], condition="trained" if r["order"] == "keep_top" else "random",
                    site=r["site"], x=int(r["k"]), note=f"{r['order']}: all units but k lesioned ({args.mode}); mean over concepts")
        for s, gg in keep.groupby("site"):
            rep.add("all_lesioned_target_change", gg.groupby("concept")["all_lesioned_target"].first().mean(),
                    condition="all units lesioned", site=s, note="every unit of the site lesioned; mean over concepts")

    rep.figure(plot_matrix(m, rs, rnd, rs_twin, args.k), "forgetting_matrix", main=True)
    if len(keep):
        rep.figure(plot_keep(keep), "keep_only_top_k")

    sm = pd.DataFrame(summary)
    tr = sm.set_index("condition")
    n_sig = int((p_diag <= 0.05).sum())
    finding = (f"Lesioning a concept's top {args.k} units ({', '.join(sites)}, {args.mode}) changes its own zero-shot "
               f"log-probability by {tr.loc['trained', 'target_change']:+.3f} nats on average, the other concepts' by "
               f"{tr.loc['trained', 'other_change']:+.3f}; the lesioned concept is hit hardest in "
               f"{tr.loc['trained', 'hit_hardest']:.0%} of {len(rs)} rows, and its own loss exceeds that of "
               f"random {args.k}-unit lesions (p ≤ 0.05, {draws} draws) for {n_sig} of {len(p_diag)} concepts.")
    if len(keep):
        kt = keep[keep["order"] == "keep_top"].groupby(["site", "k"])["target_change"].mean()
        kr = keep[keep["order"] == "keep_random"].groupby(["site", "k"])["target_change"].mean()
        kmax = {s: int(keep[keep["site"] == s]["k"].max()) for s in sites if (keep["site"] == s).any()}
        finding += " Keeping only the top k: " + "; ".join(
            f"{s} at k={k}: {kt.get((s, k), np.nan):+.2f} nats (random k kept: {kr.get((s, k), np.nan):+.2f})"
            for s, k in kmax.items()) + "."
    control = (f"Random {args.k}-unit lesions (same count per site): own change {tr.loc['random', 'target_change']:+.3f}, "
               f"others {tr.loc['random', 'other_change']:+.3f}, lesioned concept hit hardest in "
               f"{tr.loc['random', 'hit_hardest']:.0%} (chance {1 / max(len(study.concepts), 1):.0%}). Untrained twin's own "
               f"top-{args.k}: own change {tr.loc['untrained', 'target_change']:+.3f}, others "
               f"{tr.loc['untrained', 'other_change']:+.3f}.")
    published = ("Bau et al. 2020 (PNAS; VGG-16 on Places365): removing the few units most important to a class "
                 "(e.g. 20 for 'ski resort') sharply lowers that class's accuracy while the average of the other "
                 "classes barely changes (qualitative comparison: a 230k-parameter digit model, zero-shot readout).")
    rep.write(finding=finding, control=control, published=published, summary=sm)
    if not args.quiet:
        print(f"{NAME}: {finding}\n{control}\nwrote {args.out}", file=sys.stderr)


def plot_matrix(m: pd.DataFrame, rs: pd.DataFrame, rnd: pd.DataFrame, rs_twin: pd.DataFrame, k: int):
    """Main figure: the forgetting matrix, and each concept's own change beside random lesions and the untrained twin."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from neuroprobe.experiments.style import COLUMN, CONDITION_COLOURS, paper_style

    with paper_style():
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(COLUMN, 6.6), gridspec_kw={"height_ratios": [1.1, 1]})
        vals = m.to_numpy(dtype=float)
        lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
        sns.heatmap(m.astype(float), ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim,
                    cbar_kws={"label": "readout change (nats)", "pad": 0.03}, xticklabels=True, yticklabels=True)
        ax.set_xlabel("tested concept")
        ax.set_ylabel(f"lesioned concept\n(its top {k} units)")
        ax.set_title("forgetting matrix", fontsize=8, loc="left")
        ax.tick_params(axis="x", rotation=90)
        order = list(m.index)
        y = np.arange(len(order))
        if len(rnd):
            q = rnd.groupby("lesioned")["target_change"].quantile([0.025, 0.5, 0.975]).unstack().reindex(order)
            ax2.hlines(y, q[0.025], q[0.975], color=CONDITION_COLOURS["random"], lw=3, alpha=0.6,
                       label="random units: 95% of draws")
        t = rs.set_index("lesioned").reindex(order)
        ax2.scatter(t["target_change"], y, color=CONDITION_COLOURS["trained"], s=16, zorder=3, label=f"top-{k}: own concept")
        ax2.scatter(t["other_change"], y, color=CONDITION_COLOURS["trained"], marker="x", s=14, zorder=3,
                    label=f"top-{k}: other concepts (mean)")
        if len(rs_twin):
            u = rs_twin.set_index("lesioned").reindex(order)
            ax2.scatter(u["target_change"], y, color=CONDITION_COLOURS["untrained"], marker="s", s=10, zorder=3,
                        label=f"untrained twin top-{k}: own")
        ax2.axvline(0, color="k", lw=0.6)
        ax2.set_yticks(y, order)
        ax2.invert_yaxis()
        ax2.set_xlabel("readout change (nats, lesioned − intact)")
        ax2.set_ylabel("lesioned concept")
        handles, labels = ax2.get_legend_handles_labels()
        fig.legend(handles, labels, frameon=False, loc="lower center", ncol=2, fontsize=8, handletextpad=0.3,
                   columnspacing=0.8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_keep(keep: pd.DataFrame):
    """Keep only the top k: the concept's readout change when all units of a site but k are lesioned."""
    import matplotlib.pyplot as plt

    from neuroprobe.experiments.style import COLUMN, CONDITION_COLOURS, paper_style

    sites = list(dict.fromkeys(keep["site"]))
    with paper_style():
        fig, axes = plt.subplots(1, len(sites), figsize=(COLUMN * len(sites), 3.1), squeeze=False, sharey=True)
        for ax, s in zip(axes[0], sites):
            d = keep[keep["site"] == s]
            top = d[d["order"] == "keep_top"].groupby("k")["target_change"].agg(["mean", "min", "max"])
            rnd = d[d["order"] == "keep_random"].groupby("k")["target_change"]
            r = pd.DataFrame({"mean": rnd.mean(), "lo": rnd.quantile(0.025), "hi": rnd.quantile(0.975)})
            ax.fill_between(r.index, r["lo"], r["hi"], color=CONDITION_COLOURS["random"], alpha=0.3, lw=0,
                            label="keep random k: 95% of draws")
            ax.plot(r.index, r["mean"], color=CONDITION_COLOURS["random"], marker="o", ms=3, label="keep random k: mean")
            ax.plot(top.index, top["mean"], color=CONDITION_COLOURS["trained"], marker="o", ms=3,
                    label="keep top k: mean over concepts")
            ax.axhline(d.groupby("concept")["all_lesioned_target"].first().mean(), color="k", ls="--", lw=0.8,
                       label="all units lesioned")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xscale("log", base=2)
            ks = sorted(d["k"].unique())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel(f"units kept at {s} (k)")
            ax.set_title(s, fontsize=8, loc="left")
        axes[0][0].set_ylabel("concept's readout change\n(nats, lesioned − intact)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, frameon=False, fontsize=8, loc="lower center", ncol=len(labels))
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


if __name__ == "__main__":
    run_main(main)
