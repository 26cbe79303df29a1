"""``neuroprobe export``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

FORMATS = ("nwb",)


def register(app: typer.Typer) -> None:
    """Add the export command to ``app``."""

    @app.command()
    def export(
        recording: Path = typer.Argument(..., help="A recording (.h5)."),
        to: str = typer.Option("nwb", "--to", help="Format: nwb (Neurodata Without Borders, via pynwb)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: the recording's name with .nwb)."),
        cells: Optional[Path] = typer.Option(None, "--cells", help="Cells table whose labels join the units table."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
        inspect: bool = typer.Option(True, "--inspect/--no-inspect", help="Check the file with nwbinspector afterwards."),
        buffer_mb: int = typer.Option(64, "--buffer-mb", help="Responses held in memory at a time while writing."),
        experimenter: Optional[List[str]] = typer.Option(None, "--experimenter", help="Who ran it, as 'Last, First' "
                                                         "(NWB/DANDI form); repeat for several."),
        institution: Optional[str] = typer.Option(None, "--institution", help="Where it was run."),
        species: Optional[str] = typer.Option(None, "--species", help="NWB subject species: a Latin binomial or an NCBI "
                                              "taxon IRI (default: NCBITaxon_32630, 'synthetic construct': a network "
                                              "has no species)."),
    ) -> None:
        """Export a recording for sharing (NWB: units, stimuli as trials, responses aligned to trials)."""
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.export.nwb import SPECIES, export_nwb, inspect_nwb

        if to.lower() not in FORMATS:
            raise NeuroprobeError(f"cannot export to {to!r}; formats: {', '.join(FORMATS)}.")
        target = out or recording.with_suffix(".nwb")
        path = export_nwb(recording, target, cells=cells, buffer_mb=buffer_mb, overwrite=overwrite,
                          experimenter=experimenter or None, institution=institution, species=species or SPECIES)
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
        if inspect:
            messages = inspect_nwb(path)
            levels: dict[str, int] = {}
            for m in messages:
                levels[m.importance.name] = levels.get(m.importance.name, 0) + 1
            typer.echo("nwbinspector: " + (", ".join(f"{n} {k.lower().replace('_', ' ')}" for k, n in sorted(levels.items()))
                                           or "no issues"))
            crit = [m for m in messages if m.importance.name == "CRITICAL"]
            for m in crit:
                typer.echo(f"  CRITICAL {m.check_function_name}: {m.message} ({m.location})", err=True)
            if crit:
                raise NeuroprobeError(f"nwbinspector found {len(crit)} critical issue(s) in {path}.")
