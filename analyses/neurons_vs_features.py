"""Are grandmother cells neurons or features?  Concept cells among neurons against SAE features.

    python analyses/neurons_vs_features.py [--subjects minilm,organism] [--sizes 0.5,1,2] [--control-sizes 1] [--k 32]
        [--epochs 30] [--lesion-k 8] [--random-draws 10] [--out figures/analyses/neurons_vs_features]

For each subject (MiniLM on ``kinship``: its six MLP sites; the organism on ``digits``: its MLP
sites), everything through neuroprobe's own path:

1. **record** the MLP sites with per-token traces, for the trained subject and its untrained
   twin (``init="random"``);
2. **train** TopK SAEs (``neuroprobe.sae.train_sae``, streamed from those recordings) on the
   *screening* split's tokens only — the SAE never sees a testing stimulus, where cells are
   confirmed — at several dictionary sizes (``--sizes`` × the site's width), for each init, and
   for the trained subject also on a **rotated basis** (the site's token rows times a Haar-random
   rotation; the rotation is folded into the saved SAE, which then reads raw activations);
3. **record** neurons and features together (``Recorder`` with the SAEs attached: sites ``S:sae-N``);
4. **cells**: ``concept_cells`` per unit group (neurons; features of one size and condition), each
   group its own FDR family; plus the neuron rotation control (``rotation_control``). Concept
   cells per 1,000 units, and the selectivity index and lifetime sparseness of every unit;
5. **lesions** (trained subject): for every concept, the top-``k`` neurons and the top-``k``
   features (dictionary size 1×, all sites, ranked by d′ on screening, evaluated on testing;
   zero ablation; a feature lesion removes its decoder contribution) against ``--random-draws``
   random lesions of the same count per site; specificity = target drop over others' drop.

Writes ``results.csv`` (one row per subject × init × unit group), ``lesions.csv``, ``results.md``
(tables and the finding, stated either way) and ``neurons_vs_features.png`` into ``--out``;
recordings and SAEs go to ``--work`` (default: ``--out``/work).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

SUBJECTS = {"minilm": ("kinship", "mlp"), "organism": ("digits", "mlp")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def record_neurons(subject_name: str, init: str, work: Path, batch_size: int) -> Path:
    from neuroprobe import Battery, load_subject
    from neuroprobe.recording.recorder import Recorder

    battery_name, montage = SUBJECTS[subject_name]
    out = work / f"{subject_name}-{init}-neurons.h5"
    if out.exists():
        return out
    subject = load_subject(subject_name, init=init, device="cpu", quiet=True, seed=0)
    Recorder(subject, Battery.load(battery_name), montage=montage, tokens=True, quiet=True, batch_size=batch_size).run(out)
    return out


def rotated_rows(rec, site: str, seed: int, work: Path):
    """A one-site recording whose rows are the site's token rows times a Haar rotation R (and R)."""
    from neuroprobe.analysis.controls import random_rotation
    from neuroprobe.analysis.synthetic import write_recording
    from neuroprobe.sae.train import RowSource

    src = RowSource(rec, site)
    x = np.asarray(src.ds[()], dtype=np.float32)
    stim = rec.stimuli.reset_index(drop=True)
    which = np.asarray(rec.token_stimulus(str(rec.sites.set_index("site").loc[site, "stream"]))[()])
    rot = random_rotation(x.shape[1], np.random.default_rng(seed)).astype(np.float32)
    table = stim.iloc[which][["id", "concept", "modality", "form", "split"]].reset_index(drop=True)
    table["id"] = [f"t{i}" for i in range(len(table))]
    path = work / f"rot-{site}.h5"
    write_recording(path, table, {site: x @ rot}, batch_size=4096)
    return path, rot


def fold_rotation(sae, rot: np.ndarray):
    """The SAE trained on ``x @ R`` as an SAE of ``x``: W_enc' = R W_enc, b_dec' = b_dec R^T, W_dec' = W_dec R^T."""
    import torch

    from neuroprobe.sae import SparseAutoencoder

    r = torch.from_numpy(rot).double()
    s = {k: v.double() for k, v in sae.state().items()}
    return SparseAutoencoder((r @ s["W_enc"]).float(), s["b_enc"].float(), (s["W_dec"] @ r.T).float(), (s["b_dec"] @ r.T).float(),
                             architecture=sae.architecture, k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
                             meta=dict(sae.meta))


def train_saes(subject_name: str, init: str, rec_path: Path, work: Path, args) -> list[dict]:
    """Train every SAE of one subject and init (cached in ``work``); return their descriptions."""
    from neuroprobe import open_recording
    from neuroprobe.sae import TrainConfig, train_sae, write_result

    made = []
    conditions = ["trained" if init == "pretrained" else "untrained"] + (["rotated"] if init == "pretrained" and args.rotated else [])
    with open_recording(rec_path) as rec:
        for site in rec.site_names:
            width = int(rec.sites.set_index("site").loc[site, "n_units"])
            for cond in conditions:
                for size in (args.sizes if cond == "trained" else args.control_sizes or args.sizes):
                    d = max(8, int(round(size * width)))
                    k = max(2, min(args.k, d // 8, width // 4))
                    folder = work / "saes" / f"{subject_name}-{init}" / cond / site / str(d)
                    if not (folder / "training.json").exists():
                        cfg = TrainConfig(features=d, k=k, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, seed=0)
                        t0 = time.perf_counter()
                        if cond == "rotated":
                            rpath, rot = rotated_rows(rec, site, seed=1, work=work)
                            with open_recording(rpath) as rrec:
                                res = train_sae(rrec, site, cfg, data="responses", split="screening")
                            res.sae = fold_rotation(res.sae, rot)
                            write_result(res, folder)
                            rpath.unlink()
                        else:
                            res = train_sae(rec, site, cfg, split="screening")
                            write_result(res, folder)
                        log(f"{subject_name} {init} {cond} {site} {d}: FVE {res.summary['fve']:.3f}, dead "
                            f"{res.summary['dead']}, {time.perf_counter() - t0:.0f} s")
                    summary = json.loads((folder / "training.json").read_text())
                    made.append(dict(site=site, condition=cond, size=size, d_sae=d, k=k, folder=folder,
                                     fve=summary["fve"], dead=summary["dead"], rows=summary["rows"]))
    return made


def feature_name(site: str, cond: str, d: int) -> str:
    return f"{site}:sae-{'rot' if cond == 'rotated' else ''}{d}"


def record_features(subject_name: str, init: str, saes: list[dict], work: Path, batch_size: int) -> Path:
    from neuroprobe import Battery, load_subject
    from neuroprobe.recording.recorder import Recorder
    from neuroprobe.sae import attach, load_sae

    out = work / f"{subject_name}-{init}-features.h5"
    if out.exists():
        return out
    battery_name, montage = SUBJECTS[subject_name]
    subject = load_subject(subject_name, init=init, device="cpu", quiet=True, seed=0)
    for s in saes:
        attach(subject, load_sae(s["folder"]), s["site"], name=feature_name(s["site"], s["condition"], s["d_sae"]))
    Recorder(subject, Battery.load(battery_name), montage=montage, quiet=True, batch_size=batch_size).run(out)
    return out


def cells_of(rec_path: Path, sites: list[str], **kw) -> pd.DataFrame:
    from neuroprobe import concept_cells

    return concept_cells(rec_path, sites=sites, **kw)


def group_row(cells: pd.DataFrame, **labels) -> dict:
    live = cells[~cells["dead"]] if "dead" in cells else cells
    n = len(cells)
    return dict(labels, units=n, live_units=len(live), cells=int(cells["is_cell"].sum()),
                candidates=int(cells["is_candidate"].sum()), cells_per_1000=1000.0 * cells["is_cell"].sum() / max(n, 1),
                cells_per_1000_live=1000.0 * cells["is_cell"].sum() / max(len(live), 1),
                concepts_with_cell=int(cells.loc[cells["is_cell"], "concept"].nunique()),
                si_median=float(live["si"].median()) if "si" in live else np.nan,
                si_q90=float(live["si"].quantile(0.9)) if "si" in live else np.nan,
                sparseness_median=float(live["lifetime_sparseness"].median()) if "lifetime_sparseness" in live else np.nan,
                sparseness_q90=float(live["lifetime_sparseness"].quantile(0.9)) if "lifetime_sparseness" in live else np.nan)


def lesion_comparison(subject_name: str, rec_path: Path, saes: list[dict], args) -> pd.DataFrame:
    from neuroprobe import Battery, load_subject, open_recording
    from neuroprobe.lesions import LesionStudy, summarize
    from neuroprobe.sae.sites import attach_recorded

    battery_name, montage = SUBJECTS[subject_name]
    battery = Battery.load(battery_name)
    subject = load_subject(subject_name, device="cpu", quiet=True, seed=0)
    with open_recording(rec_path) as rec:
        neuron_sites = [s for s in rec.site_names if ":sae" not in s]
        one = [feature_name(s["site"], "trained", s["d_sae"]) for s in saes if s["condition"] == "trained" and s["size"] == 1.0]
        attach_recorded(subject, rec, one)
    rows = []
    for unit, sites in (("neurons", neuron_sites), ("features", one)):
        study = LesionStudy(subject, battery, None, sites=",".join(sites), quiet=True, batch_size=args.batch_size, seed=0)
        for c in study.concepts:
            dose = study.dose_response(c, [args.lesion_k], ["zero"], random_draws=args.random_draws, keep_draws=0,
                                       orders=["top", "random"], sequential=False)
            t = summarize(dose)
            t.insert(0, "unit_type", unit)
            rows.append(t)
        log(f"{subject_name} lesions of top-{args.lesion_k} {unit}: {study.engine}")
    return pd.concat(rows, ignore_index=True)


def plot(results: pd.DataFrame, cells_all: pd.DataFrame, lesions: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    subjects = list(dict.fromkeys(results["subject"]))
    fig, axes = plt.subplots(len(subjects), 3, figsize=(16, 4.2 * len(subjects)), squeeze=False)
    for i, subj in enumerate(subjects):
        r = results[results["subject"] == subj]
        ax = axes[i, 0]
        sns.barplot(data=r, x="group", y="cells_per_1000", hue="init", ax=ax)
        ax.set_title(f"{subj}: concept cells per 1,000 units")
        ax.tick_params(axis="x", rotation=40)
        ax.set_xlabel("")
        c = cells_all[(cells_all["subject"] == subj) & (cells_all["init"] == "pretrained") & ~cells_all["dead"]]
        ax = axes[i, 1]
        sns.ecdfplot(data=c, x="si", hue="group", ax=ax)
        ax.set_title(f"{subj} (trained): selectivity index")
        ax = axes[i, 2]
        lz = lesions[lesions["subject"] == subj] if len(lesions) else lesions
        if len(lz):
            sns.stripplot(data=lz, x="unit_type", y="specificity", ax=ax, alpha=0.6)
            sns.pointplot(data=lz, x="unit_type", y="specificity", estimator=np.median, errorbar=None, color="k", ax=ax)
            ax.set_yscale("symlog")
            ax.set_title(f"{subj}: lesion specificity of top-k (per concept; median)")
        else:
            ax.set_axis_off()
    fig.tight_layout()
    path = out / "neurons_vs_features.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="minilm,organism")
    ap.add_argument("--sizes", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 1.0, 2.0])
    ap.add_argument("--control-sizes", type=lambda s: [float(v) for v in s.split(",")], default=None,
                    help="Dictionary sizes of the control SAEs (untrained twin, rotated basis); default: --sizes.")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--max-steps", type=int, default=400, help="At most this many steps per SAE (conv sites have many rows).")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lesion-k", type=int, default=8)
    ap.add_argument("--random-draws", type=int, default=10)
    ap.add_argument("--no-rotated", dest="rotated", action="store_false")
    ap.add_argument("--no-lesions", dest="lesions", action="store_false")
    ap.add_argument("--out", type=Path, default=Path("figures/analyses/neurons_vs_features"))
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = args.out
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results, all_cells, lesions, sae_rows = [], [], [], []
    for subj in [s.strip() for s in args.subjects.split(",") if s.strip()]:
        if subj not in SUBJECTS:
            raise SystemExit(f"unknown subject {subj!r}; choose from {', '.join(SUBJECTS)}")
        for init in ("pretrained", "random"):
            neurons = record_neurons(subj, init, work, args.batch_size)
            log(f"{subj} {init}: recorded {neurons.name}")
            saes = train_saes(subj, init, neurons, work, args)
            sae_rows += [dict(s, subject=subj, init=init, folder=str(s["folder"])) for s in saes]
            feats = record_features(subj, init, saes, work, args.batch_size)
            log(f"{subj} {init}: recorded {feats.name}")
            from neuroprobe import open_recording

            with open_recording(feats) as rec:
                neuron_sites = [s for s in rec.site_names if ":sae" not in s]
            groups = [("neurons", neuron_sites)]
            for cond in ("trained", "untrained", "rotated"):
                for size in args.sizes:
                    sites = [feature_name(s["site"], cond, s["d_sae"]) for s in saes if s["condition"] == cond and s["size"] == size]
                    if sites:
                        groups.append((f"features {size:g}x" + (" (rotated basis)" if cond == "rotated" else ""), sites))
            for name, sites in groups:
                cells = cells_of(feats, sites)
                results.append(group_row(cells, subject=subj, init=init, group=name,
                                         sizes="/".join(str(s["d_sae"]) for s in saes if feature_name(s["site"], s["condition"], s["d_sae"]) in sites) or "",
                                         fve=float(np.mean([s["fve"] for s in saes if feature_name(s["site"], s["condition"], s["d_sae"]) in sites])) if name != "neurons" else np.nan))
                all_cells.append(cells.assign(subject=subj, init=init, group=name)[["subject", "init", "group", "site", "unit", "dead", "is_cell", "si", "lifetime_sparseness", "concept"]])
                log(f"{subj} {init} {name}: {results[-1]['cells']} cells in {results[-1]['units']} units")
            if init == "pretrained":
                from neuroprobe.analysis.controls import rotation_control

                rot = rotation_control(feats, sites=neuron_sites)
                results.append(group_row(rot, subject=subj, init=init, group="neurons (rotated basis)", sizes="", fve=np.nan))
                all_cells.append(rot.assign(subject=subj, init=init, group="neurons (rotated basis)")[["subject", "init", "group", "site", "unit", "dead", "is_cell", "si", "lifetime_sparseness", "concept"]])
                if args.lesions:
                    les = lesion_comparison(subj, feats, saes, args)
                    lesions.append(les.assign(subject=subj))
    res = pd.DataFrame(results)
    cells_all = pd.concat(all_cells, ignore_index=True)
    les = pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / "results.csv", index=False)
    pd.DataFrame(sae_rows).to_csv(out / "saes.csv", index=False)
    if len(les):
        les.to_csv(out / "lesions.csv", index=False)
    png = plot(res, cells_all, les, out)
    write_markdown(res, les, pd.DataFrame(sae_rows), args, out, time.perf_counter() - t_start)
    log(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {png}")


def write_markdown(res: pd.DataFrame, les: pd.DataFrame, saes: pd.DataFrame, args, out: Path, seconds: float) -> None:
    import platform

    import torch

    lines = ["# Neurons or features? Concept cells among neurons and SAE features", "",
             f"Run {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs (shared, load "
             f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} thread(s); {seconds / 60:.0f} min. "
             f"`python analyses/neurons_vs_features.py --subjects {args.subjects} --sizes {','.join(f'{s:g}' for s in args.sizes)} "
             + (f"--control-sizes {','.join(f'{s:g}' for s in args.control_sizes)} " if args.control_sizes else "") +
             f"--k {args.k} --epochs {args.epochs:g} --lesion-k {args.lesion_k} --random-draws {args.random_draws}`.", "",
             "TopK SAEs trained on the screening split's per-token traces only (k = min(32, d_sae/8, units/4)); "
             "features recorded per token through the electrodes and mean-pooled like neurons; the concept-cell "
             "criterion (k=5 SD, exact rank-sum, hierarchical FDR 0.05, confirmed on testing) run per group "
             "(each group its own FDR family). `live` excludes dead units (no response on any stimulus).", "",
             "## Concept cells per 1,000 units", ""]
    cols = ["subject", "init", "group", "sizes", "units", "live_units", "cells", "cells_per_1000", "cells_per_1000_live",
            "concepts_with_cell", "si_median", "si_q90", "sparseness_median", "fve"]
    lines.append(res[[c for c in cols if c in res]].pipe(markdown))
    lines += ["", "## SAEs", "", saes.groupby(["subject", "init", "condition", "size"])[["fve", "dead", "d_sae", "rows"]]
              .agg({"fve": "mean", "dead": "sum", "d_sae": "sum", "rows": "mean"}).reset_index().pipe(markdown), ""]
    if len(les):
        lines += [f"## Lesion specificity: top-{args.lesion_k} neurons against top-{args.lesion_k} features (1×)", "",
                  "Per concept, zero ablation, evaluated on the testing split; specificity = target drop / others' drop "
                  f"(floored); p_random against {args.random_draws} random lesions of the same count per site.", ""]
        g = les.groupby(["subject", "unit_type"]).agg(concepts=("concept", "size"), specificity_median=("specificity", "median"),
                                                  target_change_median=("target_change", "median"),
                                                  other_change_median=("other_change", "median"),
                                                  target_rank_1=("target_rank", lambda r: int((r == 1).sum())),
                                                  p_random_le_01=("p_random", lambda p: int((p <= 0.1).sum()))).reset_index()
        g = g.rename(columns={"p_random_le_01": f"concepts with p_random <= 0.1 (min p = 1/{args.random_draws + 1})"})
        lines.append(g.pipe(markdown))
        lines.append("")
    lines += ["## Finding", "", finding(res, les), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def markdown(df: pd.DataFrame) -> str:
    """A pipe table (numbers to 3 significant digits)."""
    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.3g}"
        return str(v)

    rows = ["| " + " | ".join(map(str, df.columns)) + " |", "| " + " | ".join("---" for _ in df.columns) + " |"]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


def finding(res: pd.DataFrame, les: pd.DataFrame) -> str:
    parts = []
    for subj, r in res[res["init"] == "pretrained"].groupby("subject", sort=False):
        neu = r[r["group"] == "neurons"].iloc[0]
        feats = r[r["group"].str.startswith("features") & ~r["group"].str.contains("rotated")]
        best = feats.sort_values("cells_per_1000", ascending=False).iloc[0] if len(feats) else None
        unt = res[(res["subject"] == subj) & (res["init"] == "random")]
        unt_feats = unt[unt["group"].str.startswith("features")]["cells_per_1000"].max() if len(unt) else np.nan
        unt_neu = unt[unt["group"] == "neurons"]["cells_per_1000"].max() if len(unt) else np.nan
        rot = r[r["group"] == "neurons (rotated basis)"]["cells_per_1000"].max()
        rot_f = r[r["group"].str.contains("features") & r["group"].str.contains("rotated")]["cells_per_1000"].max()
        if best is None:
            continue
        ratio = best["cells_per_1000"] / neu["cells_per_1000"] if neu["cells_per_1000"] > 0 else np.inf
        verdict = ("features carry more concept cells than neurons" if best["cells_per_1000"] > neu["cells_per_1000"]
                   else "features carry no more concept cells than neurons")
        parts.append(
            f"**{subj}**: {verdict} — {neu['cells_per_1000']:.2f} per 1,000 neurons against {best['cells_per_1000']:.2f} per "
            f"1,000 features at best ({best['group']}; {ratio:.1f}×). Controls: untrained twin {unt_neu:.2f} (neurons) and "
            f"{unt_feats:.2f} (features, best size); neurons in a rotated basis {rot:.2f}; SAEs trained on a rotated basis "
            f"{rot_f:.2f} per 1,000 features.")
        if len(les):
            l = les[les["subject"] == subj].groupby("unit_type")["specificity"].median()
            if {"neurons", "features"} <= set(l.index):
                parts.append(f"Lesion specificity (median over concepts) of the top features {l['features']:.3g} against "
                             f"{l['neurons']:.3g} for the top neurons.")
    return " ".join(parts)


if __name__ == "__main__":
    main()
