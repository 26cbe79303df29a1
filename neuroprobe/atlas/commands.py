"""``neuroprobe atlas``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the atlas command to ``app``."""

    @app.command()
    def atlas(
        recording: Path = typer.Argument(..., help="A recording (.h5)."),
        out: Path = typer.Option(Path("figures/atlas"), "--out", "-o", help="Folder for the atlas (index.html is its front page; default figures/atlas, ignored by git)."),
        cells: Optional[Path] = typer.Option(None, "--cells", help="Cells table (`neuroprobe cells --out`); its .untrained/.rotation siblings are shown beside it."),
        lesions: Optional[Path] = typer.Option(None, "--lesions", help="Lesion summary (forgetting.csv of `neuroprobe lesion`)."),
        untrained: Optional[Path] = typer.Option(None, "--untrained", help="Cells table of the untrained control."),
        rotation: Optional[Path] = typer.Option(None, "--rotation", help="Cells table of the rotated-basis control."),
        battery: Optional[str] = typer.Option(None, "--battery", help="Battery name or folder for image thumbnails (default: the recording's)."),
        units: str = typer.Option("cells", "--units", help="cells: pages for cells and top units per concept; all: every unit."),
        top: int = typer.Option(3, "--top", help="Top units per concept that get a page."),
        per_site: int = typer.Option(1, "--per-site", help="And the best units of every concept at every site."),
        n_show: int = typer.Option(8, "--show", help="Top- and bottom-driving stimuli per unit page."),
        memory_mb: int = typer.Option(128, "--memory-mb", help="Responses read at a time (MB)."),
        experiments: Optional[str] = typer.Option(None, "--experiments", metavar="DIR", help="Outputs of the analyses/ scripts: concept pages link the experiments whose results name them (default: figures/analyses if present; none: off)."),
        serve: bool = typer.Option(False, "--serve", help="Then serve it on 127.0.0.1 (other units' pages are written on demand)."),
        port: int = typer.Option(8000, "--port", help="Port for --serve (0: any free port)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Write a browsable atlas of a recording: sites, cells, a page per concept and per unit (opens from disk)."""
        from neuroprobe.atlas.build import build_atlas

        summary = build_atlas(recording, out, cells=cells, lesions=lesions, untrained=untrained, rotation=rotation,
                              battery=battery, units=units, top=top, per_site=per_site, n_show=n_show, memory_mb=memory_mb,
                              experiments=False if experiments == "none" else experiments, quiet=quiet)
        typer.echo(f"wrote {summary.out}/ ({summary.n_unit_pages} unit pages, {summary.n_concept_pages} concept pages, "
                   f"{summary.bytes / 2**20:.1f} MB in {summary.files} files, {summary.seconds:.1f} s); "
                   f"open {summary.index.resolve().as_uri()}")
        if serve:
            from neuroprobe.atlas.build import Atlas
            from neuroprobe.atlas import tables as T
            from neuroprobe.atlas.serve import serve as run
            from neuroprobe.recording.reader import open_recording

            controls = {"untrained": untrained or (T.control_sibling(cells, "untrained") if cells else None),
                        "rotated": rotation or (T.control_sibling(cells, "rotation") if cells else None)}
            with open_recording(recording) as rec:
                live = Atlas(rec, out, cells=T.read_table(cells, "cells"), lesions=T.read_table(lesions, "lesion"),
                             controls={k: T.read_table(v, k) for k, v in controls.items() if v is not None},
                             battery=battery, top=top, per_site=per_site, n_show=n_show, memory_mb=memory_mb, quiet=True)
                run(live, port, quiet=quiet, ready=lambda url: typer.echo(f"serving {url} (Ctrl-C stops)"))
