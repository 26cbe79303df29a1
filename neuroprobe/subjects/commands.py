"""``neuroprobe subjects`` (the registry table, or one subject's card) and ``neuroprobe sites`` (a montage, before recording)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def site_unit_counts(subject, sites, battery=None) -> list:
    """Units of each site, from the modules' shapes (:mod:`neuroprobe.subjects.widths`); where the shapes do not
    tell and the model has weights, read off one forward pass over ``battery`` (one stimulus per modality);
    ``None`` where neither tells."""
    from neuroprobe.subjects.widths import measured_units, units_of

    static = units_of(subject.model, sites)
    if battery is None or all(n is not None for n in static):
        return static
    measured = measured_units(subject, [s for s, n in zip(sites, static) if n is None], battery)
    return [measured.get(s.name, n) if n is None else n for s, n in zip(sites, static)]


def sites_table(subject, montage: str, battery=None):
    """The sites a montage of ``subject`` records, as a DataFrame (site, kind, direction, stream, layout, units,
    module); ``units`` is ``"?"`` where :func:`site_unit_counts` cannot tell."""
    import pandas as pd

    sites = subject.sites(montage)
    units = site_unit_counts(subject, sites, battery)
    rows = [dict(site=s.name, kind=s.kind, direction=s.direction, stream=s.stream, layout=s.layout,
                 units="?" if n is None else int(n), module=s.module) for s, n in zip(sites, units)]
    return pd.DataFrame(rows, columns=["site", "kind", "direction", "stream", "layout", "units", "module"])


def terminal_width() -> int:
    """Columns to fit: ``$COLUMNS`` or the terminal's width, else 100."""
    import shutil

    return max(40, shutil.get_terminal_size((100, 24)).columns)


def registry_text(width: int | None = None) -> str:
    """The registry as text that fits ``width`` columns (default :func:`terminal_width`).

    One line per subject (name, parameters, whether it runs here, modalities), then an
    indented line, wrapped to the width, with the checkpoint, revision, licence and description.
    """
    import textwrap

    from neuroprobe.subjects.registry import REGISTRY, runnable

    width = width or terminal_width()
    rows = [(s.name, s.params, runnable(s), "+".join(s.modalities),
             f"{s.checkpoint} @ {s.revision}; {s.licence}; {s.description}") for s in REGISTRY.values()]
    head = ("subject", "params", "runnable", "modalities")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    columns = 4 if sum(widths) + 3 <= width else 3  # too narrow: the modalities move to the indented line
    if columns == 3:
        rows = [(*r[:3], r[3], f"{r[3]}; {r[4]}") for r in rows]
    lines = [" ".join(h.ljust(w) for h, w in zip(head[:columns], widths)).rstrip()]
    lines.append(textwrap.fill(("modalities; " if columns == 3 else "") + "checkpoint @ revision; licence; description",
                               width, initial_indent="    ", subsequent_indent="    "))
    for row in rows:
        lines.append(" ".join(c.ljust(w) for c, w in zip(row[:columns], widths)).rstrip())
        lines.append(textwrap.fill(row[4], width, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False))
    notes = ("runnable: yes = everything is here (pretrained and --init random); random only = the untrained control "
             "runs offline, the weights are missing; (text; ...) = image stimuli also need the region detector; "
             "nothing is downloaded to decide this. Also: hf:<hub id or local dir> for any transformers model.")
    return "\n".join(lines) + "\n\n" + textwrap.fill(notes, width)


def _load_for_sites(name: str, init: str, weights: Optional[Path], options: dict):
    from neuroprobe.subjects.registry import load_subject

    return load_subject(name, init=init, weights=weights, device="cpu", quiet=True, **options)


def _battery_for(spec):
    """The subject's default battery (one stimulus per modality measures the widths), or ``None``."""
    from neuroprobe.stimuli import Battery

    try:
        return Battery.load(spec.default_battery)
    except Exception:  # noqa: BLE001 - widths then come from the shapes alone
        return None


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
        from neuroprobe.subjects.registry import get_spec, load_subject, runnable

        if name is None:
            typer.echo(registry_text())
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
            meta = init == "random" and spec.builds_on_meta
            subject = load_subject(name, init=init, weights=weights, device="meta" if meta else "cpu", quiet=True)
            typer.echo(f"sites ({sites}):")
            typer.echo(sites_table(subject, sites, _battery_for(spec)).to_string(index=False))

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

        # models without weights are built on the meta device when their loader can: no memory, no waiting
        spec = get_spec(model)
        meta = init == "random" and spec.builds_on_meta
        subject = load_subject(model, init=init, weights=weights, device="meta" if meta else "cpu", quiet=True,
                               trust_remote_code=trust_remote_code, **parse_options(option))
        table = sites_table(subject, sites, _battery_for(spec))
        typer.echo(table.to_string(index=False))
        kinds = ", ".join(f"{k} {n}" for k, n in table["kind"].value_counts().items())
        known = [int(u) for u in table["units"] if u != "?"]
        units = f"{sum(known):,} units" + (f" (+ {len(table) - len(known)} sites of unknown width)"
                                            if len(known) < len(table) else "")
        typer.echo(f"{len(table)} sites ({kinds}), {units}; record them with "
                   f"`neuroprobe record --model {model} --sites {sites}`.")
