"""A recording as a microelectrode array: each site's units as tiles of response maps, and one text's token raster.

A recording of a network is read the way the field reads a microelectrode array (a Utah
array in cortex, microwires in the human MTL as in Quiroga et al. 2005): each site (layer)
is a row of electrodes, each unit one electrode, and each tile shows that unit's response
map over the battery — its mean response to each concept (columns) in each form
(rows), in SD from the unit's mean.  Concept cells are framed.  The per-token traces of one
text stimulus are drawn as a raster (units × tokens), the analogue of spike rasters over
the time of a trial.  The untrained twin is drawn beside the trained subject in both
views; the share of each unit's response variance explained by the concept and by the form
(one-way eta squared, every unit of every site) gives the numbers behind the picture.

    python analyses/electrode_array.py [--model organism] [--units 5] [--stimulus ID] [--quick]
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.experiments.cli import experiment_args, run_main  # noqa: E402

NAME = "electrode_array"
QUESTION = ("What does a network's recording look like when read as a microelectrode array — where do concept "
            "cells sit among the units, and how do units fire along the tokens of one text — against the "
            "untrained twin?")
PUBLISHED = (
    "Quiroga et al. 2005 (Nature 435:1102) recorded human MTL neurons through microwires (eight per depth "
    "electrode) and showed each neuron's responses to every picture as rasters and histograms, a few neurons per "
    "electrode answering to one person or place.  The array view is that picture for a network; it reproduces a way "
    "of looking, not a number."
)


def add_options(ap) -> None:
    """The script's own options."""
    ap.add_argument("--battery", default=None, help="battery (default: the subject's default battery)")
    ap.add_argument("--units", type=int, default=5, help="units (electrodes) shown per site (default 5)")
    ap.add_argument("--stimulus", default=None,
                    help="id of the text stimulus of the token raster (default: a testing text-name stimulus of the "
                         "concept with the most cells)")
    ap.add_argument("--token-sites", default=None,
                    help="comma-separated sites of the token raster (default: the text stream's mlp sites)")


def response_maps(rec, site: str, units: np.ndarray, concepts: list[str], forms: list[str]) -> np.ndarray:
    """``[units, forms, concepts]`` mean responses in SD from each unit's mean over the site's stimuli (NaN: unseen)."""
    x = np.asarray(rec.responses(site)[()], dtype=np.float64)[:, units]
    stim = rec.stimuli.reset_index(drop=True)
    ok = ~np.isnan(x).all(axis=1)
    mu = np.nanmean(x[ok], axis=0) if ok.any() else np.zeros(len(units))
    sd = np.nanstd(x[ok], axis=0, ddof=1) if ok.sum() > 1 else np.ones(len(units))
    z = (x - mu) / np.where(sd > 0, sd, 1.0)
    out = np.full((len(units), len(forms), len(concepts)), np.nan)
    form = stim["form"].astype(str).to_numpy()
    concept = stim["concept"].astype(str).to_numpy()
    for i, f in enumerate(forms):
        for j, c in enumerate(concepts):
            rows = ok & (form == f) & (concept == c)
            if rows.any():
                out[:, i, j] = z[rows].mean(axis=0)
    return out


def eta_squared(rec, site: str, factor: str) -> np.ndarray:
    """One-way eta squared of every live unit of ``site``: the share of its variance explained by ``factor``."""
    x = np.asarray(rec.responses(site)[()], dtype=np.float64)
    stim = rec.stimuli.reset_index(drop=True)
    ok = ~np.isnan(x).all(axis=1)
    x = x[ok]
    if len(x) < 2:
        return np.zeros(0)
    x = x[:, x.max(axis=0) > x.min(axis=0)]
    labels = stim[factor].astype(str).to_numpy()[ok]
    grand = x.mean(axis=0)
    total = ((x - grand) ** 2).sum(axis=0)
    between = np.zeros(x.shape[1])
    for g in np.unique(labels):
        m = labels == g
        between += m.sum() * (x[m].mean(axis=0) - grand) ** 2
    return between / total


def shown_units(cells: pd.DataFrame, site: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` units of a site drawn: its concept cells first, then live units by screening z; and which are cells."""
    g = cells[cells["site"] == site]
    g = g.assign(_cell=g["is_cell"].astype(int), _live=(~g["dead"]).astype(int),
                 _z=g["z"].replace(np.inf, 1e300).fillna(-np.inf))
    g = g.sort_values(["_cell", "_live", "_z"], ascending=False, kind="stable").head(n)
    return g["unit"].to_numpy(dtype=int), g["is_cell"].to_numpy(dtype=bool)


def plot_array(panels: list[tuple[str, dict]], sites: list[str], concepts: list[str], n_units: int):
    """Sites x units of tiles (forms x concepts) for each condition, side by side, cells framed."""
    from matplotlib.patches import Rectangle

    from neuroprobe.analysis.figures import CONDITION_COLORS, CONDITION_LABELS, COLUMN_WIDTH, column_style

    plt, sns = column_style()
    heights = {site: max(m.shape[1] for _, maps in panels for m in [maps[site][0]]) for site in sites}
    w = len(concepts)
    gap = 1
    tops = np.concatenate([[0], np.cumsum([heights[s] + gap for s in sites])])
    fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH, 1.2 + 0.045 * tops[-1]), sharey=True,
                             squeeze=False)
    im = None
    for ax, (cond, maps) in zip(axes[0], panels):
        mosaic = np.full((int(tops[-1]), n_units * (w + gap)), np.nan)
        frames = []
        for r, site in enumerate(sites):
            m, units, is_cell = maps[site]
            for c in range(len(units)):
                tile = m[c]
                y0, x0 = int(tops[r]), c * (w + gap)
                mosaic[y0:y0 + tile.shape[0], x0:x0 + w] = tile
                if is_cell[c]:
                    frames.append((x0 - 0.5, y0 - 0.5, w, tile.shape[0]))
        im = ax.imshow(mosaic, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto", interpolation="nearest")
        for x0, y0, ww, hh in frames:
            ax.add_patch(Rectangle((x0, y0), ww, hh, fill=False, edgecolor="k", lw=0.9))
        ax.set_xticks([c * (w + gap) + w / 2 - 0.5 for c in range(n_units)], [str(c + 1) for c in range(n_units)])
        ax.set_title(CONDITION_LABELS.get(cond, cond), color=CONDITION_COLORS.get(cond, "k"))
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    axes[0, 0].set_yticks([tops[r] + heights[s] / 2 - 0.5 for r, s in enumerate(sites)], sites)
    fig.subplots_adjust(left=0.42, right=0.98, top=0.95, bottom=0.2, wspace=0.08)
    fig.text(0.70, 0.14, "electrode (units ranked: concept cells first, then by screening z)", ha="center",
             va="top", fontsize=8)
    cax = fig.add_axes([0.45, 0.06, 0.5, 0.015])
    cb = fig.colorbar(im, cax=cax, orientation="horizontal")
    cb.set_label("mean response (SD from the unit's mean)\na tile: concepts (x) by forms (y); framed: concept cells")
    cb.ax.tick_params(labelsize=8)
    return fig


def token_traces(rec, stimulus: int, sites: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """One stimulus's per-token traces ``{site: [units, tokens]}`` in SD from each unit's mean over every token."""
    from neuroprobe.atlas.stimuli import token_decoder

    offsets = rec.token_offsets("text")
    a, b = int(offsets[stimulus]), int(offsets[stimulus + 1])
    ids = rec.token_table("text")["token_id"].to_numpy()[a:b]
    labels = [""] * (b - a)
    for text, rows in token_decoder(rec.attrs)(ids):
        shown = text if text.isascii() and text.isprintable() else f"U+{ord(text[0]):04X}" if text else "?"
        labels[rows[0]] = shown.replace(" ", "\u2423")
        for r in rows[1:]:
            labels[r] = "\u00b7"
    out = {}
    for site in sites:
        t = np.asarray(rec.tokens(site)[()], dtype=np.float64)
        mu, sd = t.mean(axis=0), t.std(axis=0, ddof=1)
        out[site] = ((t[a:b] - mu) / np.where(sd > 0, sd, 1.0)).T
    return labels, out


def peak_order(x: np.ndarray) -> np.ndarray:
    """Units ordered by the token of their peak (then by the peak's height): a sequence plot's order."""
    peak = np.argmax(x, axis=1)
    return np.lexsort((-x.max(axis=1), peak))


def plot_tokens(panels: list[tuple[str, list[str], dict]], text: str):
    """Per-token raster (units x tokens) of one text stimulus, a band per site, trained above untrained."""
    from neuroprobe.analysis.figures import CONDITION_COLORS, CONDITION_LABELS, COLUMN_WIDTH, column_style

    plt, sns = column_style()
    sites = list(panels[0][2])
    n_rows = sum(panels[0][2][s].shape[0] for s in sites)
    fig, axes = plt.subplots(len(panels), 1, figsize=(COLUMN_WIDTH, 0.6 + len(panels) * (0.5 + n_rows / 90)),
                             sharex=True, squeeze=False)
    im = None
    for ax, (cond, labels, traces) in zip(axes[:, 0], panels):
        blocks, ticks, bounds = [], [], []
        top = 0
        for s in sites:
            x = traces[s][peak_order(traces[s])]
            blocks.append(x)
            ticks.append(top + len(x) / 2)
            top += len(x)
            bounds.append(top)
        im = ax.imshow(np.vstack(blocks), cmap="magma", vmin=0, vmax=4, aspect="auto", interpolation="nearest")
        for b in bounds[:-1]:
            ax.axhline(b - 0.5, color="w", lw=1.0)
        ax.set_yticks(ticks, [f"{s}\n({traces[s].shape[0]} units)" for s in sites])
        ax.set_title(CONDITION_LABELS.get(cond, cond), color=CONDITION_COLORS.get(cond, "k"), loc="left")
        ax.tick_params(length=0)
        ax.set_xticks(np.arange(len(labels)), labels)
    axes[-1, 0].set_xlabel(f"token (UTF-8 byte) of \u201c{text}\u201d\n(units sorted by the token of their peak)"
                           if text.isascii() else "token (units sorted by the token of their peak)")
    cb = fig.colorbar(im, ax=axes[:, 0].tolist(), orientation="vertical", fraction=0.05, pad=0.02)
    cb.set_label("activation (SD from the unit's\nmean over every token)")
    return fig


def main() -> None:
    """Record with per-token traces, draw the array and the raster for the subject and its untrained twin."""
    args = experiment_args(NAME, __doc__, add=add_options)
    from neuroprobe.analysis.figures import plot_by_site
    from neuroprobe.analysis.scan import battery_concepts
    from neuroprobe.errors import NeuroprobeError
    from neuroprobe.experiments.cache import cached_recording
    from neuroprobe.experiments.report import Report
    from neuroprobe.experiments.study import battery_for, study_from_args
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import load_subject

    if args.units < 1:
        raise NeuroprobeError(f"--units must be at least 1, not {args.units}.")
    rep = Report(NAME, args.out, QUESTION, args=args)
    study = study_from_args(args, controls=("untrained",))
    cells = {"trained": study.cells["trained"], "untrained": study.cells["untrained"]}
    recs = {"trained": study.recording, "untrained": study.untrained_recording}
    stim = study.recording.stimuli.reset_index(drop=True)
    concepts = battery_concepts(stim)
    sites = list(dict.fromkeys(cells["trained"]["site"]))

    # 1. the array: a tile per unit, a row per site
    panels = []
    for cond in ("trained", "untrained"):
        maps = {}
        for site in sites:
            units, is_cell = shown_units(cells[cond], site, args.units)
            seen = stim.loc[~np.isnan(np.asarray(recs[cond].responses(site)[:, 0], dtype=np.float64)), "form"]
            forms = list(dict.fromkeys(seen.astype(str)))
            m = response_maps(recs[cond], site, units, concepts, forms)
            maps[site] = (m, units, is_cell)
            for c, u in enumerate(units):
                for i, f in enumerate(forms):
                    for j, con in enumerate(concepts):
                        if np.isfinite(m[c, i, j]):
                            rep.add("tile_z", m[c, i, j], condition=cond, site=site, concept=con, x=int(u),
                                    note=f"form {f}; electrode {c + 1}{'; concept cell' if is_cell[c] else ''}")
        panels.append((cond, maps))
    rep.figure(plot_array(panels, sites, concepts, args.units), "electrode_array", main=True)

    # 2. what the tiles show, over every unit: variance explained by concept and by form
    rows = []
    for cond in ("trained", "untrained"):
        for site in sites:
            for factor in ("concept", "form"):
                eta = eta_squared(recs[cond], site, factor)
                v = float(eta.mean()) if len(eta) else float("nan")
                rows.append(dict(condition=cond, site=site, measure=f"eta2_{factor}", value=v, n=len(eta)))
                rep.add(f"eta2_{factor}", v, condition=cond, site=site, n=len(eta))
    eta = pd.DataFrame(rows)
    rep.figure(plot_by_site(eta, {"eta2_concept": "variance explained by concept (eta\u00b2)",
                                  "eta2_form": "variance explained by form (eta\u00b2)"},
                            title=f"{args.model}: what a unit's response follows"), "variance_explained")

    # 3. one text's per-token raster, trained above untrained
    text_rows = stim.index[stim["modality"].astype(str) == "text"]
    if len(text_rows):
        if args.stimulus:
            hit = stim.index[stim["id"].astype(str) == args.stimulus]
            if not len(hit) or stim.loc[hit[0], "modality"] != "text":
                raise NeuroprobeError(f"--stimulus {args.stimulus} is not a text stimulus of the battery.")
            idx = int(hit[0])
        else:
            tr = cells["trained"]
            top = tr[tr["is_cell"]]["concept"].value_counts()
            concept = top.index[0] if len(top) else stim.loc[text_rows[0], "concept"]
            pick = stim[(stim["modality"] == "text") & (stim["concept"] == concept)]
            pref = pick[(pick["split"] == "testing") & pick["form"].astype(str).str.endswith("name")]
            idx = int((pref if len(pref) else pick).index[0])
        # per-token traces of the text stream's sites only (a montage of those sites: images add no traces)
        text_sites = [s for s in study.subject.sites("all") if s.stream == "text" and s.layout in ("BTU", "TBU")]
        if args.token_sites:
            tsites = [s.strip() for s in args.token_sites.split(",") if s.strip()]
            bad = [s for s in tsites if s not in {t.name for t in text_sites}]
            if bad:
                raise NeuroprobeError(f"--token-sites {', '.join(bad)}: not a site of the text stream with tokens "
                                      f"(those are {', '.join(t.name for t in text_sites) or 'none'}).")
        else:
            mlp = [t.name for t in text_sites if t.kind == "mlp"]
            tsites = mlp or [t.name for t in text_sites]
        if not tsites:
            raise NeuroprobeError(f"{args.model} has no text-stream site with per-token positions for a token raster.")
        battery = Battery.load(battery_for(args))
        montage = ",".join(tsites)
        token_recs = {"trained": cached_recording(study.subject, battery, cache=args.cache, montage=montage,
                                                  tokens=True, quiet=args.quiet)}
        twin = load_subject(args.model, init="random", seed=int(args.seed), device=args.device, quiet=True,
                            modalities=tuple(battery.table["modality"].unique()))
        token_recs["untrained"] = cached_recording(twin, battery, cache=args.cache, montage=montage, tokens=True,
                                                   quiet=args.quiet)
        text = str(stim.loc[idx, "text"])
        tpanels = []
        for cond in ("trained", "untrained"):
            labels, traces = token_traces(token_recs[cond], idx, tsites)
            tpanels.append((cond, labels, traces))
            for site, x in traces.items():
                for u in range(x.shape[0]):
                    for pos in range(x.shape[1]):
                        rep.add("token_z", x[u, pos], condition=cond, site=site, concept=str(stim.loc[idx, "concept"]),
                                x=pos, note=f"unit {u}; token {labels[pos]}; stimulus {stim.loc[idx, 'id']}")
        rep.figure(plot_tokens(tpanels, text), "token_raster")
        token_note = (f"The token raster shows \u201c{text}\u201d ({stim.loc[idx, 'id']}) at "
                      f"{', '.join(tsites)}.")
    else:
        token_note = "The battery has no text stimulus, so there is no token raster."

    e = eta.pivot_table(index=["site", "condition"], columns="measure", values="value", sort=False)
    tr_cells = cells["trained"].groupby("site", sort=False)["is_cell"].sum()
    best_site = e.xs("trained", level="condition")["eta2_concept"].idxmax()
    form_site = e.xs("trained", level="condition")["eta2_form"].idxmax()
    shown = list(dict.fromkeys([s for s, v in tr_cells.items() if v] + [best_site]))

    def eta_text(cond: str) -> str:
        return "; ".join(f"{s} {e.loc[(s, cond), 'eta2_concept']:.2f} (form {e.loc[(s, cond), 'eta2_form']:.2f})"
                         for s in shown if (s, cond) in e.index)

    n_cells = int(tr_cells.sum())
    finding = (
        f"{n_cells} concept cells among {len(cells['trained'])} units "
        f"({', '.join(f'{s}: {int(v)}' for s, v in tr_cells.items() if v) or 'none'}); the framed tiles are they.  "
        f"Share of a unit's variance explained by the concept, mean over the site's live units (eta\u00b2): "
        f"{eta_text('trained')}; the most concept-driven site is {best_site}, the most form-driven "
        f"{form_site} (form eta\u00b2 {e.loc[(form_site, 'trained'), 'eta2_form']:.2f}).  {token_note}")
    control = (f"Untrained twin: {int(cells['untrained']['is_cell'].sum())} concept cells; eta\u00b2 of the concept: "
               f"{eta_text('untrained')}.")
    summary = e.reset_index()
    rep.conclude(finding=finding, control=control, published=PUBLISHED, summary=summary)


if __name__ == "__main__":
    run_main(main)
