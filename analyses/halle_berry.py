"""The invariance figure of one cell: every stimulus's response by concept and form, for each concept's best cell.

Reproduces the single-cell figure of Quiroga et al. 2005 (Nature 435:1102, Fig. 1: the
"Halle Berry" neuron, answering to photographs, a drawing and the written name of one
person) on a network, and separates two claims that are often merged:

* invariance across **image forms** (a picture and a rendered name, both seen as images:
  Goh et al. 2021's "multimodal" neurons in CLIP's image tower), and
* invariance across **modalities** (one unit answering to the concept's images *and* its
  text).

For every concept, the most invariant concept cell (invariant in every form its site sees
first, then the largest smallest-per-form AUC) is drawn as a raster: a row per form
(handwriting, rendered name, numeral, Roman numeral, text name, Korean...), a column per
concept, one bar per stimulus.  The main figure puts the most invariant cell of all beside
the untrained twin's most selective unit for the same concept at the same site.  The counts
of cells invariant across image forms, across text forms and across modalities are given
for the trained subject, its untrained twin and the rotated basis.

The organism's two towers meet only in a 64-d embedding (``joint.embed``, the one site that
sees both modalities, a parameter-free normalisation of each tower's projection); no unit of
either tower ever sees the other modality, so a cell across modalities can only be found
there.

    python analyses/halle_berry.py [--model organism] [--out DIR] [--quick] [--seed 0]
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.experiments.cli import experiment_args, run_main  # noqa: E402

NAME = "halle_berry"
QUESTION = ("Does a network have concept cells that answer to every form of their concept, like Quiroga's Halle "
            "Berry neuron, and are they invariant across image forms only (picture and rendered name) or across "
            "modalities (image and text)?")
PUBLISHED = (
    "Quiroga et al. 2005 (Nature 435:1102) showed single MTL neurons answering to strikingly different pictures of "
    "one person (the 'Halle Berry' neuron: photographs, a drawing) and, in some cases, to the person's written name "
    "shown as letters on the screen (images of text).  Goh et al. 2021 (Distill, 'Multimodal neurons in artificial "
    "neural networks') found CLIP image-tower neurons that answer to a concept's photos, drawings and rendered "
    "text, all images; CLIP's towers meet only in the joint embedding.  Stated qualitatively, as a reference."
)
CATEGORIES = {
    "cells": "concept cells",
    "all_forms": "invariant in every form seen",
    "image_forms": "invariant across image forms\n(picture + rendered name)",
    "text_forms": "invariant across text forms",
    "modalities": "across modalities\n(image and text)",
}


def add_options(ap) -> None:
    """The script's own options."""
    ap.add_argument("--battery", default=None, help="battery (default: the subject's default battery)")
    ap.add_argument("--rendered-prefix", default="written",
                    help="image forms whose name starts with this are rendered text (default: written)")
    ap.add_argument("--name-form", default="written-name",
                    help="the image form that renders the concept's name (default: written-name)")


def form_groups(stimuli: pd.DataFrame, prefix: str) -> dict[str, list[str]]:
    """The battery's forms by kind: ``picture`` and ``rendered`` image forms, ``text`` forms."""
    pairs = stimuli[["form", "modality"]].astype(str).drop_duplicates()
    image = [f for f, m in zip(pairs["form"], pairs["modality"]) if m == "image"]
    return {"picture": [f for f in image if not f.startswith(prefix)],
            "rendered": [f for f in image if f.startswith(prefix)],
            "text": [f for f, m in zip(pairs["form"], pairs["modality"]) if m == "text"]}


def invariance_flags(cells: pd.DataFrame, groups: dict[str, list[str]], name_form: str,
                     alpha: float) -> pd.DataFrame:
    """Per unit: is it a cell invariant across image forms, across text forms, across modalities?

    ``image_forms``: a concept cell whose concept wins (label-shuffle p <= ``alpha``, testing
    split) in every picture form and in the rendered-name form; ``text_forms``: in every text
    form (two at least); ``all_forms``: the criterion's ``invariant``; ``modalities``: the
    criterion's ``multimodal`` (the concept's effect and its per-modality test in every modality).
    """
    def wins(forms: list[str]) -> pd.Series:
        ok = pd.Series(True, index=cells.index)
        for f in forms:
            col = f"p_form:{f}"
            ok &= cells[col].le(alpha) if col in cells else False
        return ok

    cell = cells["is_cell"].astype(bool)
    img = groups["picture"] + ([name_form] if name_form in groups["rendered"] else [])
    out = pd.DataFrame(index=cells.index)
    out["cells"] = cell
    out["image_forms"] = cell & (len(groups["picture"]) > 0) & (name_form in groups["rendered"]) & wins(img)
    out["text_forms"] = cell & (len(groups["text"]) >= 2) & wins(groups["text"])
    out["all_forms"] = cells["invariant"].astype(bool)
    out["modalities"] = cells["multimodal"].astype(bool)
    return out


def most_invariant(cells: pd.DataFrame, concept: str) -> pd.Series | None:
    """The concept's most invariant cell: invariant first, then the largest smallest-per-form AUC, then z."""
    sel = cells[cells["is_cell"] & (cells["concept"] == concept)]
    if not len(sel):
        return None
    key = sel.assign(_inv=sel["invariant"].astype(int), _auc=sel["auc_form_min"].fillna(-1.0),
                     _z=sel["z"].replace(np.inf, 1e300).fillna(-1.0))
    return key.sort_values(["_inv", "_auc", "_z"], ascending=False, kind="stable").iloc[0]


def twin_unit(cells: pd.DataFrame, site: str, concept: str) -> pd.Series | None:
    """The untrained twin's most selective unit for ``concept`` at ``site`` (largest z for that concept)."""
    sel = cells[(cells["site"] == site) & ~cells["dead"] & (cells["concept"] == concept)]
    if not len(sel):
        sel = cells[(cells["site"] == site) & ~cells["dead"]]
        if not len(sel):
            return None
        col = f"mean:{concept}"
        return sel.sort_values(col, ascending=False).iloc[0] if col in sel else sel.iloc[0]
    return sel.assign(_z=sel["z"].replace(np.inf, 1e300)).sort_values("_z", ascending=False).iloc[0]


def add_raster_numbers(rep, rec, site: str, unit: int, condition: str, drawn_for: str) -> None:
    """Every bar of a raster as a row of results.csv (the unit's response to each stimulus)."""
    from neuroprobe.analysis.figures import unit_frame

    df = unit_frame(rec, site, unit)
    for r in df.itertuples(index=False):
        rep.add("response", r.response, condition=condition, site=site, concept=str(r.concept), x=str(r.id),
                note=f"unit {unit}, form {r.form}, drawn for {drawn_for}")


def plot_counts(counts: pd.DataFrame):
    """Horizontal bars: each category's count for each condition, every bar labelled."""
    from neuroprobe.analysis.figures import CONDITION_COLORS, CONDITION_LABELS, COLUMN_WIDTH, column_style

    plt, sns = column_style()
    cats = list(CATEGORIES)
    conds = [c for c in ("trained", "untrained", "rotation") if c in set(counts["condition"])]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.5 + 0.42 * len(cats)))
    h = 0.8 / len(conds)
    for i, cond in enumerate(conds):
        sub = counts[counts["condition"] == cond].set_index("category")["count"].reindex(cats).fillna(0)
        y = len(cats) - 1 - np.arange(len(cats)) + (len(conds) / 2 - i - 0.5) * h
        bars = ax.barh(y, sub.to_numpy(), height=h, color=CONDITION_COLORS[cond], label=CONDITION_LABELS[cond])
        ax.bar_label(bars, fmt="%d", fontsize=8, padding=1)
    ax.set_yticks(len(cats) - 1 - np.arange(len(cats)), [CATEGORIES[c] for c in cats])
    ax.set_xlabel("units (count)")
    ax.margins(x=0.15)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(conds), frameon=False, handlelength=1.0,
              columnspacing=0.8)
    sns.despine(fig)
    fig.tight_layout()
    return fig


def main() -> None:
    """Find each concept's most invariant cell, draw it, count invariance by kind."""
    args = experiment_args(NAME, __doc__, add=add_options)
    import matplotlib.pyplot as plt

    from neuroprobe.analysis.figures import COLUMN_WIDTH, column_style, plot_unit_raster
    from neuroprobe.analysis.scan import battery_concepts
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.study import study_from_args

    rep = Report(NAME, args.out, QUESTION, args=args)
    study = study_from_args(args)
    trained = study.cells["trained"]
    alpha = float(trained.attrs.get("alpha", 0.05))
    stimuli = study.recording.stimuli
    groups = form_groups(stimuli, args.rendered_prefix)
    concepts = battery_concepts(stimuli.reset_index(drop=True))

    # counts by kind of invariance, for the subject and its controls
    rows = []
    for cond in ("trained", "untrained", "rotation"):
        flags = invariance_flags(study.cells[cond], groups, args.name_form, alpha)
        for cat in CATEGORIES:
            n = int(flags[cat].sum())
            rows.append(dict(condition=cond, category=cat, count=n))
            rep.add(cat, n, condition=cond, site="all", n=len(flags))
    counts = pd.DataFrame(rows)
    both = trained[trained["n_modalities"] >= 2] if "n_modalities" in trained else trained.iloc[:0]
    both_sites = sorted(set(both["site"]))
    rep.add("units_seeing_both_modalities", len(both), condition="trained", site=";".join(both_sites) or None)
    rep.add("cells_among_them", int(both["is_cell"].sum()), condition="trained", site=";".join(both_sites) or None)

    # each concept's most invariant cell
    chosen = []
    for c in concepts:
        row = most_invariant(trained, c)
        if row is None:
            rep.add("most_invariant_cell", float("nan"), condition="trained", concept=c, note="no concept cell")
            continue
        chosen.append(row)
        rep.add("auc_form_min", row["auc_form_min"], condition="trained", site=row["site"], concept=c,
                x=int(row["unit"]), note="invariant" if row["invariant"] else "not invariant in every form")
        for f in groups["picture"] + groups["rendered"] + groups["text"]:
            col = f"p_form:{f}"
            if col in row.index and pd.notna(row[col]):
                rep.add("p_form", row[col], condition="trained", site=row["site"], concept=c, x=int(row["unit"]),
                        note=f"form {f}")
    untrained = study.cells["untrained"]
    if chosen:
        best = sorted(chosen, key=lambda r: (bool(r["invariant"]), float(np.nan_to_num(r["auc_form_min"], nan=-1)),
                                             float(min(r["z"], 1e300))), reverse=True)[0]
        site, unit, concept = str(best["site"]), int(best["unit"]), str(best["concept"])
        twin = twin_unit(untrained, site, concept)
        plt_, _ = column_style()
        n_forms = stimuli["form"].nunique()
        fig, axes = plt_.subplots(2, 1, figsize=(COLUMN_WIDTH, 2 * (0.9 + 0.24 * n_forms)))
        plot_unit_raster(study.recording, site, unit, cells=trained, ax=axes[0],
                         title=f"trained: {site} unit {unit}, cell for '{concept}'")
        add_raster_numbers(rep, study.recording, site, unit, "trained", concept)
        if twin is not None:
            tu = int(twin["unit"])
            plot_unit_raster(study.untrained_recording, site, tu, cells=untrained, ax=axes[1],
                             title=f"untrained twin: {site} unit {tu}, most selective for '{concept}'")
            add_raster_numbers(rep, study.untrained_recording, site, tu, "untrained", concept)
        axes[0].set_xlabel("")
        fig.tight_layout()
        rep.figure(fig, "halle_berry_cell", main=True)
        for row in chosen:
            c = str(row["concept"])
            fig = plot_unit_raster(study.recording, str(row["site"]), int(row["unit"]), cells=trained,
                                   title=f"'{c}': {row['site']} unit {int(row['unit'])}"
                                         f"{' (invariant)' if row['invariant'] else ''}")
            rep.figure(fig, f"cell_{c}")
            if not (str(row["site"]) == site and int(row["unit"]) == unit):
                add_raster_numbers(rep, study.recording, str(row["site"]), int(row["unit"]), "trained", c)
    fig = plot_counts(counts)
    rep.figure(fig, "invariance_counts")
    plt.close("all")

    t = counts.pivot_table(index="category", columns="condition", values="count", sort=False)
    tr = t["trained"]
    chosen_txt = ", ".join(f"{r['concept']}: {r['site']} unit {int(r['unit'])}"
                           f"{' (invariant)' if r['invariant'] else ''}" for r in chosen)
    missing = [c for c in concepts if c not in {str(r['concept']) for r in chosen}]
    finding = (
        f"{int(tr['cells'])} concept cells; {int(tr['all_forms'])} are invariant in every form their site sees, "
        f"{int(tr['image_forms'])} across image forms (a picture form and the rendered name: Goh's 'multimodal'), "
        f"{int(tr['text_forms'])} across text forms.  Across modalities (image and text): "
        f"{int(tr['modalities'])} cells.  Only {len(both)} units see both modalities "
        f"({', '.join(both_sites) or 'no site'}), of which {int(both['is_cell'].sum())} are concept cells.  "
        f"Most invariant cell per concept: {chosen_txt or 'none'}"
        + (f"; no concept cell for {', '.join(missing)}" if missing else "") + ".")
    n_modalities = stimuli["modality"].nunique()
    if n_modalities < 2:
        finding += "  The battery has one modality: invariance across modalities is not tested here."
    elif int(tr["modalities"]) == 0 and not len(both):
        finding += ("  A null result across modalities, as the architecture predicts: no unit of this subject "
                    "sees both modalities.")
    elif int(tr["modalities"]) == 0:
        finding += (f"  A null result across modalities: the only units that see both modalities are in "
                    f"{', '.join(both_sites)}, where the towers meet"
                    + (" (the organism's 64-d joint embedding, a normalisation of each tower's projection; no unit "
                       "of either tower sees the other modality)" if args.model == "organism" else "")
                    + ", and none of them is a concept cell.")
    control = ("Untrained twin: " + ", ".join(f"{int(t.loc[c, 'untrained'])} {c.replace('_', ' ')}" for c in CATEGORIES)
               + "; rotated basis: " + ", ".join(f"{int(t.loc[c, 'rotation'])} {c.replace('_', ' ')}"
                                                 for c in CATEGORIES) + ".")
    if args.quick:
        control += "  (--quick: the rank-sum test's normal approximation, 200 permutations.)"
    summary = t.reset_index().rename(columns={"category": "count of"})
    rep.conclude(finding=finding, control=control, published=PUBLISHED, summary=summary)


if __name__ == "__main__":
    run_main(main)
