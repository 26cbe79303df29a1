"""``neuroprobe subjects`` (the registry table, or one subject's card) and ``neuroprobe sites`` (a montage, before recording)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def sites_table(subject, montage: str):
    """The sites a montage of ``subject`` records, as a DataFrame (site, kind, direction, stream, layout, module)."""
    import pandas as pd

    rows = [dict(site=s.name, kind=s.kind, direction=s.direction, stream=s.stream, layout=s.layout, module=s.module)
            for s in subject.sites(montage)]
    return pd.DataFrame(rows, columns=["site", "kind", "direction", "stream", "layout", "module"])


def _load_for_sites(name: str, init: str, weights: Optional[Path], options: dict):
    from neuroprobe.subjects.registry import load_subject

    return load_subject(name, init=init, weights=weights, device="cpu", quiet=True, **options)


def register(app: typer.Typer) -> None:
    """Add the ``subjects`` and ``sites`` commands to ``app``."""

    @app.command()
    def subjects(
        name: Optional[str] = typer.Argument(None, metavar="SUBJECT", help="Show one subject's card (and sites with --sites)."),
        sites: Optional[str] = typer.Option(None, "--sites", help="Also list the sites of this montage (loads the subject)."),
        init: str = typer.Option("pretrained", "--init", help="With --sites: pretrained, or random (the untrained control)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="With --sites: local folder with the checkpoint files."),
    ) -> None:
        """List subjects: checkpoint, licence, parameters, and whether each runs here right now."""
        import pandas as pd

        from neuroprobe.subjects.registry import REGISTRY, get_spec, load_subject, runnable

        if name is None:
            rows = [dict(subject=s.name, checkpoint=s.checkpoint, revision=s.revision, licence=s.licence,
                         params=s.params, modalities="+".join(s.modalities), runnable=runnable(s),
                         description=s.description)
                    for s in REGISTRY.values()]
            typer.echo(pd.DataFrame(rows).to_string(index=False))
            typer.echo("\nrunnable: yes = everything is here (pretrained and --init random); random only = the "
                       "untrained control runs offline, the weights are missing; (text; ...) = image stimuli also need "
                       "the region detector; nothing is downloaded to decide this.")
            typer.echo("Also: hf:<hub id or local dir> for any transformers model.")
            return
        spec = get_spec(name)
        for k in ("name", "checkpoint", "revision", "licence", "params", "modalities", "description", "note"):
            v = getattr(spec, k)
            if v:
                typer.echo(f"{k}: {v if not isinstance(v, tuple) else ', '.join(v)}")
        typer.echo(f"runnable: {runnable(spec)}")
        typer.echo(f"default battery: {spec.default_battery}")
        card = None
        try:
            import importlib

            mod = importlib.import_module(spec.loader.split(":")[0])
            card = getattr(mod, "model_card", None)
        except ModuleNotFoundError:
            pass
        if callable(card):  # a loader module's card takes the registry entry (one module may serve several)
            typer.echo(json.dumps(card(spec=spec), indent=2, ensure_ascii=False))
        if sites:
            subject = load_subject(name, init=init, weights=weights, device="cpu", quiet=True)
            typer.echo(f"sites ({sites}):")
            for s in subject.sites(sites):
                typer.echo(f"  {s.name:40s} {s.kind:6s} {s.direction:6s} {s.stream:8s} {s.module}")

    @app.command("sites")
    def sites_command(
        model: str = typer.Argument(..., help="Subject name (see `neuroprobe subjects`) or hf:<id|dir>."),
        sites: str = typer.Option("mlp", "--sites", help="Montage: mlp, resid, attn, all, or comma-separated globs."),
        init: str = typer.Option("random", "--init",
                                 help="random (default: the same modules without needing the weights) or pretrained."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local folder with the checkpoint files."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let hf: models run their own code."),
        option: list[str] = typer.Option([], "--option", "-O", help="Subject-specific KEY=VALUE; repeatable."),
    ) -> None:
        """List the sites a montage would record (site, unit kind, hook, stream, module), before recording."""
        from neuroprobe.recording.commands import parse_options
        from neuroprobe.subjects.registry import get_spec, load_subject

        # transformers models without weights are built on the meta device: no memory, no waiting
        meta = init == "random" and get_spec(model).loader.endswith("load_hf_subject")
        subject = load_subject(model, init=init, weights=weights, device="meta" if meta else "cpu", quiet=True,
                               trust_remote_code=trust_remote_code, **parse_options(option))
        table = sites_table(subject, sites)
        typer.echo(table.to_string(index=False))
        kinds = ", ".join(f"{k} {n}" for k, n in table["kind"].value_counts().items())
        typer.echo(f"{len(table)} sites ({kinds}); record them with `neuroprobe record --model {model} --sites {sites}`.")
