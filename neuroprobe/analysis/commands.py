"""``neuroprobe cells`` and ``neuroprobe figures``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _sibling(out: Path, tag: str) -> Path:
    """``cells.csv`` -> ``cells.<tag>.csv`` (where the controls' tables go)."""
    return out.with_name(f"{out.stem}.{tag}{out.suffix}")


def cells_report(cells, rotation=None, untrained=None, shuffle=None) -> str:
    """The CLI summary: the design check, counts per site and per concept, each control beside the count."""
    import pandas as pd

    from neuroprobe.analysis.criterion import summarize

    a = cells.attrs
    family = a.get("family", "pairs")
    fam = (f"Bonferroni over each unit's concepts, {str(a.get('method')).upper()} FDR {a.get('fdr'):g} over "
           f"{a.get('n_units_tested')} units, concept within each selected unit" if family == "units" else
           f"{str(a.get('method')).upper()} FDR {a.get('fdr'):g} over {a.get('n_tests')} unit x concept tests")
    lo, hi = a.get("exact_cutoff_min", 0.01), a.get("exact_cutoff", 0.01)
    cut = f"{hi:.2g}" if f"{lo:.2g}" == f"{hi:.2g}" else f"{lo:.2g}-{hi:.2g} (by site)"
    over = a.get("n_over_budget")
    null = (f"exact permutation null for {a.get('n_exact')} of {a.get('n_tests')} tests (every one with asymptotic "
            f"p <= {cut}, the largest threshold that can apply but at least 0.01"
            f"{'' if not over else ', but ' + str(over) + ' over the budget'}), normal approximation elsewhere"
            if a.get("exact") else "normal approximation")
    lines = [
        f"{a.get('recording')}: {a.get('subject')} ({a.get('init')}) x {a.get('battery')}",
        f"criterion: median > baseline mean + {a.get('k'):g} SD on screening (constant baseline: median above it), "
        f"one-sided rank-sum test ({null}); {fam}; a unit with two or more responsive concepts is no cell; "
        f"confirmed on testing; invariance: label-shuffle p <= {a.get('alpha'):g} ({a.get('n_perm')} permutations)",
    ]
    design = a.get("design") or {}
    if design.get("message"):
        lines += str(design["message"]).splitlines()
    if rotation is not None:
        how = "units z-scored on the screening split, then" if rotation.attrs.get("rotation_standardize", True) else \
            "units centred, then"
        lines.append(f"rotation control: {how} a random rotation of each site's basis (seed "
                     f"{rotation.attrs.get('rotation_seed')})")
    if shuffle is not None and len(shuffle):
        n = int(shuffle["shuffle"].nunique())
        per = shuffle.groupby("shuffle")[["candidates", "cells"]].sum()
        lines.append(f"label-shuffle control: concept labels permuted within split and form, {n} shuffles: "
                     f"{per['candidates'].mean():.1f} candidates and {per['cells'].mean():.1f} cells per shuffle "
                     f"(every one a false discovery)")
    controls = [("rotated", rotation), ("untrained", untrained)]
    for by in ("site", "concept"):
        table = summarize(cells, by)
        for name, ctrl in controls:
            if ctrl is None:
                continue
            c = summarize(ctrl, by).reindex(table.index).fillna(0).astype(int)
            table[f"candidates|{name}"] = c["candidates"]
            table[f"cells|{name}"] = c["cells"]
        if by == "concept":
            table = table[(table != 0).any(axis=1)] if len(table) else table
        cols = [c for c in ["units", "dead", "candidates", "candidates|rotated", "candidates|untrained", "cells",
                            "cells|rotated", "cells|untrained", "invariant", "multimodal"] if c in table.columns]
        table = table[cols]
        total = pd.DataFrame([table.sum()], index=["TOTAL"])
        lines += ["", f"per {by}:" + ("" if len(table) else " none"),
                  pd.concat([table, total]).to_string() if len(table) else ""]
    return "\n".join(lines).rstrip() + "\n"


def _check_range(option: str, value: float, low: float | None = None, high: float | None = None, strict: bool = False) -> None:
    """Refuse an option value outside ``[low, high]`` (``(low, high]`` when ``strict``) in one sentence."""
    from neuroprobe.errors import NeuroprobeError

    if low is not None and (value <= low if strict else value < low):
        raise NeuroprobeError(f"{option} must be {'greater than' if strict else 'at least'} {low:g}, not {value:g}.")
    if high is not None and value > high:
        raise NeuroprobeError(f"{option} must be at most {high:g}, not {value:g}.")


def _note(text: str | None) -> None:
    if text:
        typer.echo(text, err=True)


def _require_finite(rec) -> None:
    """Refuse a recording in which no site holds a single finite response (nothing to analyse)."""
    import numpy as np

    from neuroprobe.errors import RecordingError

    for site in rec.site_names:
        ds = rec.responses(site)
        step = max(1, min(ds.shape[0], (1 << 22) // max(1, 4 * ds.shape[1])))
        for a in range(0, ds.shape[0], step):
            if np.isfinite(ds[a : a + step]).any():
                return
    raise RecordingError(f"{rec.path} holds no finite response at any site (all NaN or inf); nothing to analyse.")


def register(app: typer.Typer) -> None:
    """Add the analysis commands to ``app``."""

    @app.command()
    def cells(
        recording: Path = typer.Argument(..., metavar="RECORDING", help="A recording (.h5)."),
        k: float = typer.Option(5.0, "--k", help="Effect size: concept median above baseline mean by k SD."),
        fdr: float = typer.Option(0.05, "--fdr", help="False-discovery rate of the rank-sum tests."),
        method: str = typer.Option("bh", "--method", help="bh (Benjamini-Hochberg) or by (Benjamini-Yekutieli)."),
        family: str = typer.Option("units", "--family", help="FDR family: units (hierarchical) or pairs (every unit x concept test)."),
        exact: bool = typer.Option(True, "--exact/--asymptotic", help="Exact rank-sum p-values where they can matter, or the normal approximation."),
        controls: str = typer.Option("rotation", "--controls", help="Comma-separated controls: rotation, shuffle (or none)."),
        shuffles: int = typer.Option(5, "--shuffles", help="Label shuffles of the shuffle control."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the per-unit table (.csv or .parquet)."),
        control: Optional[Path] = typer.Option(None, "--control", help="Recording of the untrained subject (--init random)."),
        rotation: bool = typer.Option(True, "--rotation/--no-rotation", help="Run the random-rotation control (default on)."),
        rotation_seed: int = typer.Option(0, "--rotation-seed", help="Seed of the random rotations."),
        n_perm: int = typer.Option(1000, "--n-perm", help="Label-shuffle permutations for invariance tests."),
        transform: str = typer.Option("shift", "--transform", help="Non-negative transform for SI/sparseness: shift or clip."),
        sites: Optional[str] = typer.Option(None, "--sites", help="Comma-separated sites (default: all)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the permutations."),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Scan on a local Dask cluster of N worker processes (0: one per core; needs dask[distributed]); same table."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scan on the workers of this running Dask scheduler (tcp://HOST:PORT; the recording's path must be visible on every worker); same table."),
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Analyse an unfinished recording (the stimuli it covers)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Find concept cells in a recording; print cells per site and per concept beside the controls."""
        from neuroprobe.analysis.controls import label_shuffle_control, rotation_control, untrained_control
        from neuroprobe.analysis.criterion import concept_cells, save_cells
        from neuroprobe.analysis.parallel import cluster
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.recording.reader import open_recording

        if out is not None and out.suffix.lower() not in (".csv", ".tsv", ".parquet", ".pq"):
            raise NeuroprobeError(f"cannot write {out}: use a .csv or .parquet file name.")
        _check_range("--k", k, low=0, strict=True)
        _check_range("--fdr", fdr, low=0, high=1, strict=True)
        _check_range("--n-perm", n_perm, low=0)
        wanted = {c.strip().lower() for c in controls.split(",") if c.strip()} - {"none"}
        unknown = wanted - {"rotation", "shuffle"}
        if unknown:
            raise NeuroprobeError(f"unknown control {sorted(unknown)[0]!r}: use rotation, shuffle, or none.")
        if not rotation:
            wanted.discard("rotation")
        if scheduler and jobs != 1:
            raise NeuroprobeError("--jobs sizes a local cluster; with --scheduler the scheduler's workers do the work "
                                  "(leave --jobs out).")
        opts = dict(k=k, fdr=fdr, method=method, family=family, exact=exact, n_perm=n_perm, transform=transform,
                    seed=seed, quiet=quiet, sites=[s.strip() for s in sites.split(",")] if sites else None)
        with open_recording(recording) as rec:
            incomplete = rec.require_complete(allow_incomplete)
            _require_finite(rec)
            with cluster(jobs, scheduler) as client:  # one cluster for the table and its controls
                opts["client"] = client
                table = concept_cells(rec, **opts)  # an error here is the one line on stderr: the note would repeat it
                _note(incomplete)
                skipped = table.attrs.get("skipped_sites") or []
                if skipped:
                    _note(f"warning: {len(skipped)} site(s) left out, none of their stimuli recorded yet: "
                          f"{', '.join(skipped)}.")
                rot = rotation_control(rec, rotation_seed=rotation_seed, **opts) if "rotation" in wanted else None
                shuf = None
                if "shuffle" in wanted:
                    shuf = label_shuffle_control(rec, n_shuffles=shuffles, **{**opts, "n_perm": 0})
                untrained = untrained_control(rec, control, **opts) if control is not None else None
        typer.echo(cells_report(table, rot, untrained, shuf), nl=False)
        if out is not None:
            from neuroprobe.output import staged_outputs

            with staged_outputs():  # the table and its controls appear together, complete, or not at all
                save_cells(table, out)
                written = [out]
                if rot is not None:
                    written.append(save_cells(rot, _sibling(out, "rotation")))
                if untrained is not None:
                    written.append(save_cells(untrained, _sibling(out, "untrained")))
                if shuf is not None:
                    written.append(save_cells(shuf, _sibling(out, "shuffle")))
            if not quiet:
                typer.echo("wrote " + ", ".join(map(str, written)))

    @app.command()
    def figures(
        recording: Path = typer.Argument(..., metavar="RECORDING", help="A recording (.h5)."),
        cells_table: Path = typer.Option(..., "--cells", help="Table written by `neuroprobe cells --out`."),
        out: Path = typer.Option(Path("figures"), "--out", "-o", help="Folder for the PNG files."),
        untrained: Optional[Path] = typer.Option(None, "--untrained", help="Cells table of the untrained subject (default: <cells>.untrained.<ext> if present)."),
        rotation: Optional[Path] = typer.Option(None, "--rotation", help="Cells table of the rotated basis (default: <cells>.rotation.<ext> if present)."),
        top: int = typer.Option(6, "--top", help="Quiroga panels for this many cells (strongest first)."),
        index: str = typer.Option("si", "--index", help="Index for the selectivity distributions."),
        dpi: int = typer.Option(150, "--dpi", help="Resolution."),
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Draw from an unfinished recording."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing."),
    ) -> None:
        """Draw the concept-cell figures: Quiroga panels, selectivity per site, cells per layer, invariance."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from neuroprobe.analysis import figures as F
        from neuroprobe.analysis.criterion import load_cells
        from neuroprobe.output import save_figure, staged_outputs
        from neuroprobe.recording.reader import open_recording

        _check_range("--top", top, low=0)
        _check_range("--dpi", dpi, low=1, high=2400)
        with open_recording(recording) as rec:  # refuse a bad recording before drawing anything
            _note(rec.require_complete(allow_incomplete))
            _require_finite(rec)
        table = load_cells(cells_table)
        untrained = untrained or (_sibling(cells_table, "untrained") if _sibling(cells_table, "untrained").exists() else None)
        rotation = rotation or (_sibling(cells_table, "rotation") if _sibling(cells_table, "rotation").exists() else None)
        u_table = load_cells(untrained) if untrained else None
        r_table = load_cells(rotation) if rotation else None
        written = []

        def save(fig, name: str) -> None:
            path = out / name
            try:
                save_figure(fig, path, dpi=dpi)
            finally:
                plt.close(fig)
            written.append(path)

        # every figure is written under a temporary name; they take their names together at the end
        with staged_outputs():
            save(F.plot_selectivity(table, index), f"selectivity_{index}.png")
            save(F.plot_cells_per_layer(table, u_table, r_table), "cells_per_layer.png")
            if table["is_cell"].any():
                save(F.plot_invariance(table), "invariance.png")
            best = table[table["is_cell"]].sort_values("z", ascending=False).head(top)
            with open_recording(recording) as rec:
                for row in best.itertuples(index=False):
                    save(F.plot_unit(rec, row.site, int(row.unit), cells=table),
                         f"unit_{row.site.replace('/', '_')}_{int(row.unit)}.png")
        if not quiet:
            typer.echo(f"wrote {len(written)} figures to {out}")
