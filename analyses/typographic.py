"""Does the organism read? Goh et al. 2021's typographic attack on its image tower, with Stroop-like controls.

Goh et al. (2021, "Multimodal Neurons in Artificial Neural Networks", Distill) showed that
CLIP reads what is written on an object: an apple with a handwritten "iPod" label is
classified as an iPod (a qualitative example; no rate is published for it).  Here the
object is a held-out handwritten digit and the label is another digit's name drawn over
it (``neuroprobe.subjects.organism.typographic``) at several font sizes and positions.
The script measures

* the **flip rate** — the share of images whose zero-shot prediction becomes the written
  digit — against font size, beside its controls: the same overlay with a common word of
  the same length (does any text flip it?), with random letters of the same length, and
  the untrained twin;
* **which concept's cells fire** — the mean response of the picture's concept cells and
  of the written digit's concept cells (cells found on the ``digits`` battery; each cell's
  response divided by its mean response to clean pictures of its own digit), per size;
* the **Stroop-like conflict** on the shipped ``stroop`` battery: the log-probability of
  the picture's digit when its own name (congruent), another digit's name (incongruent),
  a word or nonsense letters are drawn over it.

    python analyses/typographic.py [--samples 20] [--sizes 6,8,10,12,14,16] [--positions center,top,bottom]
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.experiments.cli import experiment_args, run_main  # noqa: E402

NAME = "typographic"
#: overlay conditions of the sweep (clean pictures are added once per sample)
OVERLAYS = ("incongruent", "word", "nonsense", "congruent")
LABELS = {"incongruent": "another digit's name", "word": "common word", "nonsense": "random letters",
          "congruent": "its own name", "clean": "no text"}
RC = {"font.size": 8, "axes.labelsize": 8, "axes.titlesize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
      "legend.fontsize": 8, "legend.title_fontsize": 8}


def _options(ap) -> None:
    ap.add_argument("--samples", type=int, default=None, help="held-out pictures per digit (default 20; quick 4)")
    ap.add_argument("--sizes", default=None, help="font sizes in pixels (default 6,8,10,12,14,16; quick 8,12,16)")
    ap.add_argument("--positions", default=None, help="where the word goes: center, top, bottom (default all three; "
                                                      "quick center)")
    ap.add_argument("--site", default=None, help="site whose concept cells are read (default: the deepest MLP site "
                                                 "of the image tower, image.fc for the organism)")


# ------------------------------------------------------------------ stimuli
def sweep_battery(cache: Path, samples: int, sizes: list[int], positions: list[str], seed: int):
    """The sweep battery (built once by the library's generator, kept in the cache by its parameters)."""
    import neuroprobe
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.organism import data as D
    from neuroprobe.subjects.organism import typographic as T

    source = b"".join(Path(m.__file__).read_bytes() for m in (T, D))  # a changed generator builds afresh
    params = f"{neuroprobe.__version__}|{samples}|{sizes}|{positions}|{seed}|".encode() + source
    key = hashlib.sha256(params).hexdigest()[:12]
    folder = cache / "batteries" / f"typographic-{key}"
    if not (folder / "stimuli.csv").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".typographic-", dir=folder.parent))
        try:
            T.build_battery(tmp, name="typographic-sweep", per_split=(samples + 1) // 2, sizes=sizes,
                            positions=positions, conditions=("clean",) + OVERLAYS, seed=seed,
                            description="The typographic sweep of analyses/typographic.py (made by "
                                        "neuroprobe.subjects.organism.typographic.build_battery).")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Battery.load(folder)


def concept_logp(subject, battery, rows: pd.DataFrame, batch_size: int = 512) -> np.ndarray:
    """Log-probabilities over the battery's concepts ``[n, n_concepts]`` (zero-shot).

    The organism gives them in one pass (``concept_scores``); any other subject's readout
    is asked once per concept, with every stimulus relabelled to that concept.
    """
    import torch

    concepts = list(battery.concepts)
    parts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        if hasattr(subject, "concept_scores"):
            with torch.inference_mode():
                parts.append(subject.concept_scores(chunk, battery)[0])
        else:
            parts.append(np.stack([subject.readout(chunk.assign(concept=c), battery) for c in concepts], axis=1))
    return np.concatenate(parts)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def mean_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and its normal 95% interval."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    h = 1.96 * float(x.std(ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return m, m - h, m + h


# ------------------------------------------------------------------ measurements
def flips(table: pd.DataFrame, logp: np.ndarray, concepts: list[str]) -> pd.DataFrame:
    """Per stimulus: the prediction, whether it is the picture's digit and whether it is the foil (the written digit)."""
    pred = np.asarray(concepts, dtype=object)[logp.argmax(1)]
    return table.assign(pred=pred, correct=pred == table["concept"].to_numpy(), flip=pred == table["foil"].to_numpy(),
                        logp_true=logp[np.arange(len(table)), [concepts.index(c) for c in table["concept"]]])


def rates(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Flip rate and accuracy with Wilson intervals per group."""
    rows = []
    for key, g in frame.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        n = len(g)
        k = float(g["flip"].sum())
        lo, hi = wilson(k, n)
        c = float(g["correct"].sum())
        clo, chi = wilson(c, n)
        rows.append(dict(zip(by, key), n=n, flip_rate=k / n, flip_lo=lo, flip_hi=hi, accuracy=c / n, acc_lo=clo,
                         acc_hi=chi))
    return pd.DataFrame(rows)


def cell_responses(responses: np.ndarray, table: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per stimulus: the mean normalised response of the picture's concept cells and of the foil's concept cells.

    Each cell's response is divided by its mean response to the clean pictures of its own
    concept, so 1 is "as much as for its own digit" and 0 is silence.
    """
    concept = table["concept"].to_numpy()
    clean = (table["condition"] == "clean").to_numpy()
    norm: dict[str, list[np.ndarray]] = {}
    for c, g in cells.groupby("concept"):
        cols = []
        for u in g["unit"].astype(int):
            ref = responses[clean & (concept == c), u].mean() if (clean & (concept == c)).any() else np.nan
            if np.isfinite(ref) and ref > 0:
                cols.append(responses[:, u] / ref)
        if cols:
            norm[str(c)] = cols
    mean = {c: np.mean(np.stack(v), axis=0) for c, v in norm.items()}
    nan = np.full(len(table), np.nan)
    img = np.array([mean[c][i] if c in mean else np.nan for i, c in enumerate(concept)]) if mean else nan
    foil = table["foil"].to_numpy()
    txt = np.array([mean[c][i] if c in mean else np.nan for i, c in enumerate(foil)]) if mean else nan
    return table.assign(image_cells=img, text_cells=txt)


# ------------------------------------------------------------------ figures
def main_figure(rate_size: pd.DataFrame, cells_size: pd.DataFrame, site: str, n_cells: int, position: str):
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks", rc=RC)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(3.5, 4.8), sharex=True, constrained_layout=True)
    styles = [("trained", "incongruent", "#c0392b", "-", "o"), ("trained", "word", "#2c7fb8", "-", "s"),
              ("trained", "nonsense", "#7f7f7f", "-", "^"), ("untrained", "incongruent", "#c0392b", "--", "x")]
    for model, overlay, colour, ls, marker in styles:
        g = rate_size[(rate_size["model"] == model) & (rate_size["condition"] == overlay)].sort_values("font_size")
        if g.empty:
            continue
        label = LABELS[overlay] + (" (untrained twin)" if model == "untrained" else "")
        ax1.plot(g["font_size"], 100 * g["flip_rate"], ls=ls, marker=marker, color=colour, label=label, ms=4)
        ax1.fill_between(g["font_size"], 100 * g["flip_lo"], 100 * g["flip_hi"], color=colour, alpha=0.15, lw=0)
    ax1.set_ylabel("predicted as the foil digit (%)")
    ax1.set_ylim(bottom=0)
    ax1.legend(title="drawn over the digit", frameon=False, loc="upper left")
    ax1.set_title(f"a  flip rate (word in the {position})", loc="left")
    rows = [("incongruent", "image_cells", "#2c7fb8", "-", "o", "picture's digit cells"),
            ("incongruent", "text_cells", "#c0392b", "-", "s", "written digit's cells"),
            ("nonsense", "text_cells", "#7f7f7f", "--", "^", "foil digit's cells, random letters")]
    drawn = False
    for overlay, col, colour, ls, marker, label in rows:
        g = cells_size[(cells_size["condition"] == overlay) & (cells_size["cells"] == col)].sort_values("font_size")
        if g.empty or not np.isfinite(g["mean"]).any():
            continue
        drawn = True
        ax2.plot(g["font_size"], g["mean"], ls=ls, marker=marker, color=colour, label=label, ms=4)
        ax2.fill_between(g["font_size"], g["lo"], g["hi"], color=colour, alpha=0.15, lw=0)
    ax2.axhline(1.0, color="0.6", lw=0.6, ls=":")
    ax2.set_ylabel("cell response\n(1 = clean own digit)")
    ax2.set_xlabel("font size of the drawn word (px; image 32 px)")
    ax2.set_title(f"b  {n_cells} concept cells at {site}", loc="left")
    if drawn:
        ax2.legend(frameon=False, loc="center left")
    else:
        ax2.text(0.5, 0.5, "no concept cells at this site", ha="center", va="center", transform=ax2.transAxes)
    sns.despine(fig)
    return fig


def stroop_figure(stroop: pd.DataFrame, by_pos: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks", rc=RC)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(3.5, 5.4), constrained_layout=True)
    order = ["clean", "congruent", "word", "nonsense", "incongruent"]
    sizes = sorted(s for s in stroop["font_size"].unique() if s > 0)
    width = 0.8 / max(len(sizes), 1)
    palette = sns.color_palette("crest", len(sizes) + 1)[1:]
    x = np.arange(len(order))

    def cell(model: str, cond: str, size: int | None) -> pd.DataFrame:
        g = stroop[(stroop["model"] == model) & (stroop["condition"] == cond)]
        return g if cond == "clean" or size is None else g[g["font_size"] == size]

    for j, size in enumerate(sizes):
        g = [cell("trained", c, size) for c in order]
        vals = np.array([100 * r["accuracy"].mean() for r in g])
        los = np.array([100 * r["acc_lo"].mean() for r in g])
        his = np.array([100 * r["acc_hi"].mean() for r in g])
        pos = x - 0.4 + width * (j + 0.5)
        ax1.bar(pos, vals, width=width, color=palette[j], label=f"trained, words of {size} px", lw=0)
        ax1.errorbar(pos, vals, yerr=np.clip([vals - los, his - vals], 0, None), fmt="none", ecolor="0.3", lw=0.6)
    untrained = [100 * cell("untrained", c, None)["accuracy"].mean() for c in order]
    ax1.plot(x, untrained, ls="none", marker="x", color="0.2", ms=5, label="untrained twin (all sizes)")
    ticks = {"clean": "no\ntext", "congruent": "own\nname", "word": "common\nword", "nonsense": "random\nletters",
             "incongruent": "other\ndigit's\nname"}
    ax1.set_xticks(x, [ticks[c] for c in order])
    ax1.set_ylabel("predicted as the picture's digit (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(frameon=False, ncol=2, loc="upper center", bbox_to_anchor=(0.45, -0.36), fontsize=8, handlelength=1.2,
               columnspacing=0.8)
    ax1.set_title("a  Stroop battery (probes/stroop)", loc="left")
    colours = {"center": "#c0392b", "top": "#e67e22", "bottom": "#8e44ad"}
    for pos_name, g in by_pos.groupby("position"):
        g = g.sort_values("font_size")
        c = colours.get(pos_name, "0.3")
        ax2.plot(g["font_size"], 100 * g["flip_rate"], marker="o", ms=4, color=c, label=pos_name)
        ax2.fill_between(g["font_size"], 100 * g["flip_lo"], 100 * g["flip_hi"], color=c, alpha=0.15, lw=0)
    ax2.set_xlabel("font size of the drawn digit name (px; image 32 px)")
    ax2.set_ylabel("predicted as the written digit (%)")
    ax2.set_ylim(bottom=0)
    ax2.legend(title="word position", frameon=False, loc="upper left")
    ax2.set_title("b  flip rate by position (trained)", loc="left")
    sns.despine(fig)
    return fig


# ------------------------------------------------------------------ main
def main() -> None:
    args = experiment_args(NAME, __doc__, add=_options)
    from neuroprobe.experiments import Report, cached_recording, cells_with_controls
    from neuroprobe.stimuli.battery import Battery
    from neuroprobe.subjects.registry import load_subject

    quick = args.quick
    samples = args.samples or (4 if quick else 20)
    sizes = [int(s) for s in (args.sizes or ("8,12,16" if quick else "6,8,10,12,14,16")).split(",")]
    positions = [p.strip() for p in (args.positions or ("center" if quick else "center,top,bottom")).split(",")]
    rep = Report(NAME, args.out, "Does text drawn over a handwritten digit change what the organism sees, and do the "
                                 "cells of the written digit fire instead of the picture's?", args=args)

    subject = load_subject(args.model, device=args.device, quiet=True, modalities=("image", "text"))
    twin = load_subject(args.model, init="random", seed=args.seed, device=args.device, quiet=True,
                        modalities=("image", "text"))
    sweep = sweep_battery(Path(args.cache), samples, sizes, positions, args.seed)
    stroop = Battery.load("stroop")
    site = args.site or [s.name for s in subject.sites("mlp") if s.stream.startswith("image")][-1]

    # 1. predictions on the sweep and on the Stroop battery, trained and untrained
    concepts = list(sweep.concepts)
    table = sweep.table.assign(font_size=sweep.table["font_size"].astype(int))
    stroop_table = stroop.table.assign(font_size=stroop.table["font_size"].astype(int))
    per, stroop_rows = [], []
    for model, subj in (("trained", subject), ("untrained", twin)):
        per.append(flips(table, concept_logp(subj, sweep, table), concepts).assign(model=model))
        stroop_rows.append(flips(stroop_table, concept_logp(subj, stroop, stroop_table), concepts).assign(model=model))
    per = pd.concat(per, ignore_index=True)
    stroop_per = pd.concat(stroop_rows, ignore_index=True)
    attacked = per[per["condition"] != "clean"]
    rate_size = rates(attacked, ["model", "condition", "font_size"])
    rate_pos = rates(attacked, ["model", "condition", "font_size", "position"])
    focus = "center" if "center" in positions else positions[0]  # where the word covers the digit
    rate_focus = rate_pos[rate_pos["position"] == focus]
    clean = rates(per[per["condition"] == "clean"], ["model"])
    for r in rate_size.itertuples():
        cond = f"{r.model}:{r.condition}"
        rep.add("flip_rate", r.flip_rate, condition=cond, x=r.font_size, ci=(r.flip_lo, r.flip_hi), n=r.n,
                note="share predicted as the foil digit, all positions")
        rep.add("accuracy", r.accuracy, condition=cond, x=r.font_size, ci=(r.acc_lo, r.acc_hi), n=r.n,
                note="share predicted as the picture's digit, all positions")
    for r in rate_pos.itertuples():
        rep.add("flip_rate", r.flip_rate, condition=f"{r.model}:{r.condition}", x=r.font_size,
                ci=(r.flip_lo, r.flip_hi), n=r.n, note=f"position {r.position}")
    for r in clean.itertuples():
        rep.add("accuracy", r.accuracy, condition=f"{r.model}:clean", ci=(r.acc_lo, r.acc_hi), n=r.n,
                note="clean pictures of the sweep")
        rep.add("flip_rate", r.flip_rate, condition=f"{r.model}:clean", ci=(r.flip_lo, r.flip_hi), n=r.n,
                note="clean pictures predicted as their (unwritten) foil digit")

    # 2. Stroop battery: the picture's digit under each condition
    stroop_rates = rates(stroop_per, ["model", "condition", "font_size"])
    stroop_logp = stroop_per.groupby(["model", "condition", "font_size"])["logp_true"].apply(mean_ci)
    for r in stroop_rates.itertuples():
        m, lo, hi = stroop_logp[(r.model, r.condition, r.font_size)]
        x = r.font_size if r.condition != "clean" else None
        rep.add("stroop_accuracy", r.accuracy, condition=f"{r.model}:{r.condition}", x=x, ci=(r.acc_lo, r.acc_hi),
                n=r.n, note="probes/stroop, share predicted as the picture's digit")
        rep.add("stroop_logp", m, condition=f"{r.model}:{r.condition}", x=x, ci=(lo, hi), n=r.n,
                note="probes/stroop, zero-shot log-probability of the picture's digit (nats)")
    interference = {}
    for model in ("trained", "untrained"):
        for size in sorted(s for s in stroop_per["font_size"].unique() if s > 0):
            g = stroop_per[(stroop_per["model"] == model) & (stroop_per["font_size"] == size)]
            base = g[g["condition"] == "word"].set_index("sample")["logp_true"]
            for cond, measure in (("incongruent", "stroop_interference"), ("congruent", "stroop_facilitation"),
                                  ("nonsense", "stroop_nonsense_effect")):
                d = (g[g["condition"] == cond].set_index("sample")["logp_true"] - base).dropna().to_numpy()
                m, lo, hi = mean_ci(d)
                interference[(model, size, measure)] = m
                rep.add(measure, m, condition=f"{model}:{cond}-word", x=size, ci=(lo, hi), n=len(d),
                        note="paired difference of the picture digit's log-probability against the common word (nats)")

    # 3. which concept's cells fire: concept cells from the digits battery, their responses to the sweep
    study = cells_with_controls(args.model, "digits", controls=("untrained",), montage=site, seed=args.seed,
                                device=args.device, cache=args.cache, quiet=args.quiet)
    cells = study.cells["trained"]
    cells = cells[cells["is_cell"] & (cells["site"] == site)]
    n_untrained = int(study.cells["untrained"]["is_cell"].sum())
    rep.add("concept_cells", len(cells), condition="trained", site=site, note="found on the digits battery")
    rep.add("concept_cells", n_untrained, condition="untrained", site=site, note="found on the digits battery")
    rec = cached_recording(subject, sweep, cache=args.cache, montage=site, quiet=args.quiet)
    responses = np.asarray(rec.responses(site)[()], dtype=np.float64)
    if list(rec.stimuli["id"]) != list(table["id"]):
        raise RuntimeError("the recording's stimuli are not the sweep battery's, in order")
    resp = cell_responses(responses, table.reset_index(drop=True), cells)
    rows = []
    attacked_resp = resp[resp["condition"] != "clean"]
    for pos, part in [("all positions", attacked_resp)] + [(f"position {q}", g) for q, g in
                                                            attacked_resp.groupby("position", sort=True)]:
        for (cond, size), g in part.groupby(["condition", "font_size"]):
            for col in ("image_cells", "text_cells"):
                m, lo, hi = mean_ci(g[col].to_numpy())
                n = int(np.isfinite(g[col]).sum())
                rows.append(dict(position=pos, condition=cond, font_size=size, cells=col, mean=m, lo=lo, hi=hi, n=n))
                what = "picture's digit" if col == "image_cells" else "foil (written) digit"
                rep.add(f"cell_response_{col.split('_')[0]}_concept", m, condition=f"trained:{cond}", site=site,
                        x=size, ci=(lo, hi), n=n,
                        note=f"{pos}; mean response of the {what}'s concept cells / their clean own-digit mean")
    cells_all = pd.DataFrame(rows)
    cells_size = cells_all[cells_all["position"] == f"position {focus}"]

    # 4. figures
    rep.figure(main_figure(rate_focus, cells_size, site, len(cells), focus), "typographic", main=True)
    by_pos = rate_pos[(rate_pos["condition"] == "incongruent") & (rate_pos["model"] == "trained")]
    rep.figure(stroop_figure(stroop_rates, by_pos), "stroop")

    # 5. the finding, in numbers
    big = max(sizes)

    def rate(model: str, cond: str, frame: pd.DataFrame | None = None) -> tuple[float, float, float]:
        frame = rate_focus if frame is None else frame
        r = frame[(frame["model"] == model) & (frame["condition"] == cond) & (frame["font_size"] == big)]
        return (float(r["flip_rate"].iloc[0]), float(r["flip_lo"].iloc[0]), float(r["flip_hi"].iloc[0])) \
            if len(r) else (np.nan, np.nan, np.nan)

    def pc(t: tuple[float, float, float]) -> str:
        return f"{100 * t[0]:.1f}% ({100 * t[1]:.1f}–{100 * t[2]:.1f}%)"

    name_t, word_t, nons_t, name_u = (rate("trained", "incongruent"), rate("trained", "word"),
                                      rate("trained", "nonsense"), rate("untrained", "incongruent"))
    acc_clean = float(clean[clean["model"] == "trained"]["accuracy"].iloc[0])
    n_big = int(rate_focus[(rate_focus["font_size"] == big)]["n"].iloc[0])
    others = [q for q in positions if q != focus]
    elsewhere = ", ".join(f"{q} {100 * rate('trained', 'incongruent', rate_pos[rate_pos['position'] == q])[0]:.1f}%"
                          for q in others)

    def cell_at(col: str, cond: str) -> float:
        g = cells_size[(cells_size["cells"] == col) & (cells_size["condition"] == cond) &
                       (cells_size["font_size"] == big)]
        return float(g["mean"].iloc[0]) if len(g) else float("nan")

    img_c, txt_c, txt_n = cell_at("image_cells", "incongruent"), cell_at("text_cells", "incongruent"), \
        cell_at("text_cells", "nonsense")
    sizes_s = max(s for s in stroop_per["font_size"].unique())
    reads = name_t[1] > max(word_t[2], nons_t[2])
    finding = (
        f"The organism reads. At {big} px (the largest size) in the {focus} of the picture ({n_big} attacked "
        f"pictures per condition), drawing another digit's name over a handwritten digit makes the zero-shot "
        f"prediction that digit for {pc(name_t)} of the pictures (clean pictures: {100 * acc_clean:.1f}% correct). "
        if reads else
        f"No typographic attack beyond its controls: at {big} px in the {focus} another digit's name flips "
        f"{pc(name_t)} of the predictions, not clearly more than a common word or random letters. "
    ) + (
        f"Where the word covers less of the digit it flips fewer ({elsewhere}; all {len(positions)} positions "
        f"together {pc(rate('trained', 'incongruent', rate_size))}). " if others else ""
    ) + (
        f"Cells ({focus}, {big} px): the picture's concept cells fall to {img_c:.2f} of their clean response while "
        f"the written digit's cells rise to {txt_c:.2f} ({len(cells)} concept cells at {site}). "
        if len(cells) else f"No concept cells at {site}, so no cell readout. "
    ) + (
        f"Stroop battery ({sizes_s} px): the picture digit's log-probability is "
        f"{interference.get(('trained', sizes_s, 'stroop_interference'), np.nan):+.2f} nats under another digit's "
        f"name and {interference.get(('trained', sizes_s, 'stroop_facilitation'), np.nan):+.2f} under its own name, "
        f"relative to a common word."
    )
    which = "it is the digit's name, not any text, that" if reads else "the digit's name no more than any text"
    control = (
        f"Same size and place, a common word 'flips' {pc(word_t)} and random letters {pc(nons_t)} to the same foil "
        f"digit, so {which} flips the prediction; the untrained twin "
        f"'flips' {pc(name_u)} (chance-level confusions). The foil digit's cells under random letters stay at "
        f"{txt_n:.2f} of their own-digit response. Untrained twin: {n_untrained} concept cells at {site}."
    )
    published = ("Goh et al. 2021 (Distill): CLIP RN50x4 classifies an apple with a handwritten 'iPod' label as an "
                 "iPod, and its multimodal neurons respond to written words as to the objects — qualitative examples, "
                 "no flip rate is published for them; here the same attack on a 230k-parameter digit model.")
    rep.table(pd.concat([rate_size.assign(position="all"), rate_pos], ignore_index=True), "flip_rates")
    rep.table(cells_all, "cell_responses")
    rep.write(finding=finding, control=control, published=published, summary=rate_focus[rate_focus["font_size"] == big][
        ["model", "condition", "position", "font_size", "n", "flip_rate", "flip_lo", "flip_hi", "accuracy"]])
    print(f"{NAME}: {finding}")


if __name__ == "__main__":
    run_main(main)
