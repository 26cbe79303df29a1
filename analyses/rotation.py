"""Bau et al. 2017's rotation experiment: concept cells as each site's basis turns from the unit axes to a random one.

Network dissection (Bau, Zhou, Khosla, Oliva & Torralba 2017, CVPR, "Network dissection:
quantifying interpretability of deep visual representations") asked whether interpretable
units are a property of the representation's *space* or of its *basis*: they rotated a
layer's basis by a growing amount toward a random rotation and counted the interpretable
units, which fell as the rotation grew although a rotation changes no information the layer
carries.  Here the same with the concept-cell criterion: for a random rotation proper ``Q``
of each site (Haar on SO(n), after z-scoring every unit on the screening split), the basis
``Q(t) = expm(t logm Q)`` moves along the rotation group's geodesic from the unit axes
(``t = 0``) to ``Q`` (``t = 1``); at each ``t`` the criterion counts concept cells and the
distinct concepts they cover, for several random rotations.  The untrained twin (at ``t = 0``
and ``t = 1``) and a label shuffle (at ``t = 0``) are the controls.

    python analyses/rotation.py [--model organism] [--fractions 0,0.1,...,1] [--draws 2] [--sites ...]
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.experiments.cli import experiment_args, run_main  # noqa: E402

NAME = "rotation"
QUESTION = ("Are a network's concept cells a property of its unit basis: how many remain as each site's basis is "
            "rotated from the unit axes toward a random rotation?")
PUBLISHED = (
    "Bau et al. 2017 (CVPR, 'Network dissection') rotated a trained CNN layer's basis step by step toward a random "
    "orthogonal basis and found that the number of interpretable (unique-concept) units dropped as the rotation "
    "grew, while the layer's information (and its discriminative power) is unchanged by a rotation: the "
    "interpretability of units is not an inevitable property of the space.  Stated qualitatively, as a reference."
)
FULL_FRACTIONS = "0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.75,1"
QUICK_FRACTIONS = "0,0.5,1"


def add_options(ap) -> None:
    """The script's own options."""
    ap.add_argument("--battery", default=None, help="battery (default: the subject's default battery)")
    ap.add_argument("--fractions", default=None,
                    help=f"rotation fractions t in [0, 1] (default {FULL_FRACTIONS}; --quick {QUICK_FRACTIONS})")
    ap.add_argument("--draws", type=int, default=None, help="random rotations per fraction (default 2; --quick 1)")
    ap.add_argument("--sites", default=None,
                    help="comma-separated sites to rotate (default: the sites where the trained subject has cells, "
                         "or every site when it has none)")


def parse_fractions(text: str) -> list[float]:
    """``"0,0.5,1"`` -> sorted unique fractions, each in [0, 1] (a user error otherwise)."""
    from neuroprobe.errors import NeuroprobeError

    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise NeuroprobeError(f"--fractions takes numbers between 0 and 1 separated by commas, not {text!r}.") from None
    if not values or values[0] < 0 or values[-1] > 1:
        raise NeuroprobeError(f"--fractions takes numbers between 0 and 1 separated by commas, not {text!r}.")
    return values


def count(cells: pd.DataFrame) -> dict:
    """Cells, unique concepts and cells per site of one cells table."""
    sel = cells[cells["is_cell"]]
    return dict(cells=int(len(sel)), unique_concepts=int(sel["concept"].nunique()),
                per_site=cells.groupby("site", sort=False)["is_cell"].sum().astype(int).to_dict())


def plot_curve(curve: pd.DataFrame, controls: pd.DataFrame, angles: pd.Series):
    """Cells and unique concepts against the rotation fraction, the controls beside."""
    from neuroprobe.analysis.figures import CONDITION_COLORS, CONDITION_LABELS, COLUMN_WIDTH, column_style

    plt, sns = column_style()
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_WIDTH, 3.6), sharex=True)
    for ax, (measure, label) in zip(axes, (("cells", "concept cells (count)"),
                                           ("unique_concepts", "unique concepts (count)"))):
        mean = curve.groupby("t")[measure].mean()
        ax.plot(mean.index, mean.to_numpy(), color=CONDITION_COLORS["trained"], lw=1.2,
                label=f"{CONDITION_LABELS['trained']} (mean)")
        ax.scatter(curve["t"], curve[measure], s=10, color=CONDITION_COLORS["trained"], alpha=0.6, lw=0,
                   label="one random rotation")
        # the controls sit beside the effect: nudged left (untrained) and right (shuffle) of their t
        for cond, marker, nudge in (("untrained", "s", -0.015), ("shuffle", "^", 0.015)):
            sub = controls[controls["condition"] == cond].dropna(subset=[measure])
            if len(sub):
                ax.scatter(sub["t"] + nudge, sub[measure], s=22, marker=marker, color=CONDITION_COLORS[cond], lw=0,
                           label=CONDITION_LABELS[cond], zorder=3)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=-0.5)
        ax.yaxis.get_major_locator().set_params(integer=True)
        sns.despine(ax=ax)
    axes[1].set_xlabel("rotation fraction t  (0: unit axes, 1: random rotation)")
    axes[1].set_xlim(-0.04, 1.04)
    top = axes[0].secondary_xaxis("top")
    ticks = [t for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    top.set_xticks(ticks, [f"{np.interp(t, angles.index, angles.to_numpy()):.0f}" for t in ticks])
    top.set_xlabel("mean angle of a unit axis to its image (degrees)")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles, labels, loc="upper right", frameon=False, handletextpad=0.3)
    fig.tight_layout()
    return fig


def main() -> None:
    """Sweep the rotation fraction, count cells, write the curve."""
    args = experiment_args(NAME, __doc__, add=add_options)
    from neuroprobe.errors import NeuroprobeError
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.study import QUICK_CRITERION, cached_cells, study_from_args

    fractions = parse_fractions(args.fractions or (QUICK_FRACTIONS if args.quick else FULL_FRACTIONS))
    draws = args.draws if args.draws is not None else (1 if args.quick else 2)
    if draws < 1:
        raise NeuroprobeError(f"--draws must be at least 1, not {draws}.")
    rep = Report(NAME, args.out, QUESTION, args=args)
    study = study_from_args(args, controls=("untrained",))
    trained_all = study.cells["trained"]
    all_sites = list(dict.fromkeys(trained_all["site"]))
    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
        bad = [s for s in sites if s not in all_sites]
        if bad:
            raise NeuroprobeError(f"--sites {', '.join(bad)}: not a site of the recording "
                                  f"(it has {', '.join(all_sites)}).")
    else:
        with_cells = [s for s in all_sites if trained_all.loc[trained_all["site"] == s, "is_cell"].any()]
        sites = with_cells or all_sites
    # the sweep's criterion: the sites rotated form the FDR family; invariance is not needed to count cells
    crit = dict(QUICK_CRITERION) if args.quick else {}
    crit.update(n_perm=0, sites=sites, seed=int(args.seed))
    n_shuffles = 2 if args.quick else 5

    rows, ctrl_rows = [], []
    for t in fractions:
        for d in range(1 if t == 0 else draws):
            cells = cached_cells(study.recording, control="rotation", rotation_seed=int(args.seed) + d,
                                 rotation_fraction=t, quiet=args.quiet, **crit)
            c = count(cells)
            angle = float(cells.attrs.get("rotation_angle", np.nan))
            rows.append(dict(t=t, draw=d, angle=angle, cells=c["cells"], unique_concepts=c["unique_concepts"]))
            rep.add("cells", c["cells"], condition="trained", site="all", x=t, note=f"rotation {d}")
            rep.add("unique_concepts", c["unique_concepts"], condition="trained", site="all", x=t,
                    note=f"rotation {d}")
            rep.add("angle_deg", angle, condition="trained", site="all", x=t, note=f"rotation {d}")
            for site, n in c["per_site"].items():
                rep.add("cells", n, condition="trained", site=site, x=t, note=f"rotation {d}")
    curve = pd.DataFrame(rows)
    for t in sorted({fractions[0], fractions[-1]}):
        cells = cached_cells(study.untrained_recording, control="rotation", rotation_seed=int(args.seed),
                             rotation_fraction=t, quiet=args.quiet, **crit)
        c = count(cells)
        ctrl_rows.append(dict(condition="untrained", t=t, cells=c["cells"], unique_concepts=c["unique_concepts"]))
        rep.add("cells", c["cells"], condition="untrained", site="all", x=t, note="rotation 0")
        rep.add("unique_concepts", c["unique_concepts"], condition="untrained", site="all", x=t, note="rotation 0")
    shuffle = cached_cells(study.recording, control="shuffle", n_shuffles=n_shuffles, quiet=args.quiet, **crit)
    per = shuffle.groupby("shuffle")["cells"].sum()
    ctrl_rows.append(dict(condition="shuffle", t=0.0, cells=float(per.mean()), unique_concepts=np.nan))
    rep.add("cells", float(per.mean()), condition="shuffle", site="all", x=0.0,
            note=f"mean of {n_shuffles} shuffles (max {int(per.max())})")
    controls = pd.DataFrame(ctrl_rows)
    angles = curve.groupby("t")["angle"].mean()
    rep.figure(plot_curve(curve, controls, angles), "rotation_curve", main=True)

    g = curve.groupby("t").agg(cells=("cells", "mean"), cells_min=("cells", "min"), cells_max=("cells", "max"),
                               unique_concepts=("unique_concepts", "mean"), angle_deg=("angle", "mean"),
                               rotations=("draw", "nunique"))
    first, last = g.iloc[0], g.iloc[-1]
    half = g["cells"].le(first["cells"] / 2)
    t_half = float(g.index[half.to_numpy().argmax()]) if half.any() and first["cells"] > 0 else float("nan")
    finding = (
        f"At the unit axes (t = {g.index[0]:g}) {args.model} has {first['cells']:.0f} concept cells covering "
        f"{first['unique_concepts']:.0f} concepts in {', '.join(sites)}; at a full random rotation (t = "
        f"{g.index[-1]:g}, mean axis angle {last['angle_deg']:.0f} degrees) {last['cells']:.1f} cells "
        f"(range {last['cells_min']:.0f}-{last['cells_max']:.0f} over {int(last['rotations'])} rotations) covering "
        f"{last['unique_concepts']:.1f} concepts.")
    if np.isfinite(t_half):
        finding += (f"  Half of the cells are gone by t = {t_half:g} (a mean axis angle of "
                    f"{g.loc[t_half, 'angle_deg']:.0f} degrees).")
    if first["cells"] == 0:
        finding += "  No concept cell at the unit axes: nothing for a rotation to remove (a null result)."
    unt = controls[controls["condition"] == "untrained"].set_index("t")["cells"]
    control = (f"Untrained twin: {', '.join(f'{v:.0f} cells at t = {t:g}' for t, v in unt.items())}; label shuffle "
               f"at t = 0: {per.mean():.1f} cells per shuffle ({n_shuffles} shuffles).  The sites rotated are the "
               f"FDR family; invariance was not computed (not needed to count cells).")
    if args.quick:
        control += "  (--quick: the rank-sum test's normal approximation, one rotation per fraction.)"
    summary = g.reset_index()
    rep.conclude(finding=finding, control=control, published=PUBLISHED, summary=summary)


if __name__ == "__main__":
    run_main(main)
