"""``neuroprobe subjects``: the registry table, or one subject's card and sites."""
from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``subjects`` command to ``app``."""

    @app.command()
    def subjects(
        name: Optional[str] = typer.Argument(None, metavar="SUBJECT", help="Show one subject's card (and sites with --sites)."),
        sites: Optional[str] = typer.Option(None, "--sites", help="Also list the sites of this montage (loads the subject)."),
        init: str = typer.Option("pretrained", "--init", help="With --sites: pretrained, or random (the untrained control)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="With --sites: local folder with the checkpoint files."),
    ) -> None:
        """List subjects: checkpoint, revision, licence, parameters."""
        import pandas as pd

        from neuroprobe.subjects.registry import REGISTRY, get_spec, load_subject

        if name is None:
            rows = [dict(subject=s.name, checkpoint=s.checkpoint, revision=s.revision, licence=s.licence,
                         params=s.params, modalities="+".join(s.modalities), description=s.description)
                    for s in REGISTRY.values()]
            typer.echo(pd.DataFrame(rows).to_string(index=False))
            typer.echo("\nAlso: hf:<hub id or local dir> for any transformers model.")
            return
        spec = get_spec(name)
        for k in ("name", "checkpoint", "revision", "licence", "params", "modalities", "description", "note"):
            v = getattr(spec, k)
            if v:
                typer.echo(f"{k}: {v if not isinstance(v, tuple) else ', '.join(v)}")
        card = None
        try:
            import importlib

            mod = importlib.import_module(spec.loader.split(":")[0])
            card = getattr(mod, "model_card", None)
        except ModuleNotFoundError:
            pass
        if callable(card):
            typer.echo(json.dumps(card(), indent=2, ensure_ascii=False))
        if sites:
            subject = load_subject(name, init=init, weights=weights, device="cpu", quiet=True)
            typer.echo(f"sites ({sites}):")
            for s in subject.sites(sites):
                typer.echo(f"  {s.name:40s} {s.kind:6s} {s.direction:6s} {s.stream:8s} {s.module}")
