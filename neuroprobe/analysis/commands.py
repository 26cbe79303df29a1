"""``neuroprobe cells`` and ``neuroprobe figures``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _sibling(out: Path, tag: str) -> Path:
    """``cells.csv`` -> ``cells.<tag>.csv`` (where the controls' tables go)."""
    return out.with_name(f"{out.stem}.{tag}{out.suffix}")


def cells_report(cells, rotation=None, untrained=None) -> str:
    """The CLI summary: counts per site and per concept, each control beside the count."""
    import pandas as pd

    from neuroprobe.analysis.criterion import summarize

    a = cells.attrs
    lines = [
        f"{a.get('recording')}: {a.get('subject')} ({a.get('init')}) x {a.get('battery')}",
        f"criterion: median > baseline mean + {a.get('k'):g} SD on screening, rank-sum {str(a.get('method')).upper()} "
        f"FDR {a.get('fdr'):g} over {a.get('n_tests')} unit x concept tests; confirmed on testing; "
        f"invariance: label-shuffle p <= {a.get('alpha'):g} ({a.get('n_perm')} permutations)",
    ]
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


def register(app: typer.Typer) -> None:
    """Add the analysis commands to ``app``."""

    @app.command()
    def cells(
        recording: Path = typer.Argument(..., help="A recording (.h5)."),
        k: float = typer.Option(5.0, "--k", help="Effect size: concept median above baseline mean by k SD."),
        fdr: float = typer.Option(0.05, "--fdr", help="False-discovery rate of the rank-sum tests."),
        method: str = typer.Option("bh", "--method", help="bh (Benjamini-Hochberg) or by (Benjamini-Yekutieli)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the per-unit table (.csv or .parquet)."),
        control: Optional[Path] = typer.Option(None, "--control", help="Recording of the untrained subject (--init random)."),
        rotation: bool = typer.Option(True, "--rotation/--no-rotation", help="Run the random-rotation control (default on)."),
        rotation_seed: int = typer.Option(0, "--rotation-seed", help="Seed of the random rotations."),
        n_perm: int = typer.Option(1000, "--n-perm", help="Label-shuffle permutations for invariance tests."),
        transform: str = typer.Option("shift", "--transform", help="Non-negative transform for SI/sparseness: shift or clip."),
        sites: Optional[str] = typer.Option(None, "--sites", help="Comma-separated sites (default: all)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the permutations."),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Scan sites in N processes (0: one per core); same table."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Find concept cells in a recording; print cells per site and per concept beside the controls."""
        from neuroprobe.analysis.controls import rotation_control, untrained_control
        from neuroprobe.analysis.criterion import concept_cells, save_cells
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.recording.reader import open_recording

        if out is not None and out.suffix.lower() not in (".csv", ".tsv", ".parquet", ".pq"):
            raise NeuroprobeError(f"cannot write {out}: use a .csv or .parquet file name.")
        opts = dict(k=k, fdr=fdr, method=method, n_perm=n_perm, transform=transform, seed=seed, quiet=quiet, jobs=jobs,
                    sites=[s.strip() for s in sites.split(",")] if sites else None)
        with open_recording(recording) as rec:
            table = concept_cells(rec, **opts)
            rot = rotation_control(rec, rotation_seed=rotation_seed, **opts) if rotation else None
            untrained = untrained_control(rec, control, **opts) if control is not None else None
        typer.echo(cells_report(table, rot, untrained), nl=False)
        if out is not None:
            save_cells(table, out)
            written = [out]
            if rot is not None:
                written.append(save_cells(rot, _sibling(out, "rotation")))
            if untrained is not None:
                written.append(save_cells(untrained, _sibling(out, "untrained")))
            if not quiet:
                typer.echo("wrote " + ", ".join(map(str, written)))

    @app.command()
    def figures(
        recording: Path = typer.Argument(..., help="A recording (.h5)."),
        cells_table: Path = typer.Option(..., "--cells", help="Table written by `neuroprobe cells --out`."),
        out: Path = typer.Option(Path("figures"), "--out", "-o", help="Folder for the PNG files."),
        untrained: Optional[Path] = typer.Option(None, "--untrained", help="Cells table of the untrained subject (default: <cells>.untrained.<ext> if present)."),
        rotation: Optional[Path] = typer.Option(None, "--rotation", help="Cells table of the rotated basis (default: <cells>.rotation.<ext> if present)."),
        top: int = typer.Option(6, "--top", help="Quiroga panels for this many cells (strongest first)."),
        index: str = typer.Option("si", "--index", help="Index for the selectivity distributions."),
        dpi: int = typer.Option(150, "--dpi", help="Resolution."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing."),
    ) -> None:
        """Draw the concept-cell figures: Quiroga panels, selectivity per site, cells per layer, invariance."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from neuroprobe.analysis import figures as F
        from neuroprobe.analysis.criterion import load_cells
        from neuroprobe.recording.reader import open_recording

        table = load_cells(cells_table)
        untrained = untrained or (_sibling(cells_table, "untrained") if _sibling(cells_table, "untrained").exists() else None)
        rotation = rotation or (_sibling(cells_table, "rotation") if _sibling(cells_table, "rotation").exists() else None)
        u_table = load_cells(untrained) if untrained else None
        r_table = load_cells(rotation) if rotation else None
        out.mkdir(parents=True, exist_ok=True)
        written = []

        def save(fig, name: str) -> None:
            path = out / name
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            written.append(path)

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
