"""``neuroprobe sae train`` (and ``sae info``): sparse autoencoders on recorded sites."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def parse_sae_list(text: str) -> list[tuple[Path, str | None]]:
    """``DIR[@SITE][,DIR[@SITE]...]`` -> ``[(folder, site or None)]`` (one clear error for an empty item)."""
    from neuroprobe.errors import NeuroprobeError

    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        folder, _, site = item.partition("@")
        if not folder:
            raise NeuroprobeError(f"--sae expects DIR or DIR@SITE items, comma-separated; got {item!r}.")
        out.append((Path(folder).expanduser(), site or None))
    if not out:
        raise NeuroprobeError("--sae is empty; give the SAE's folder (DIR or DIR@SITE, comma-separated).")
    return out


def load_for_recording(items: list[tuple[Path, str | None]]) -> list[tuple[object, str | None, str | None]]:
    """Load every SAE of ``--sae`` before the model loads; name feature sites (``S:sae``, or ``S:sae-<d_sae>`` when one site has several).

    Returns
    -------
    list
        ``(sae, source site or None, feature site name or None)`` per item.
    """
    from neuroprobe.errors import NeuroprobeError
    from neuroprobe.sae.io import load_sae

    loaded = [(load_sae(folder), site) for folder, site in items]
    by_site: dict[str, list[int]] = {}
    for i, (sae, site) in enumerate(loaded):
        src = site or sae.meta.get("hook_name")
        if not src:
            raise NeuroprobeError(f"the SAE in {items[i][0]} does not say which site it reads (no hook_name); give it as DIR@SITE.")
        by_site.setdefault(str(src), []).append(i)
    names: dict[int, str | None] = {}
    for src, idx in by_site.items():
        if len(idx) == 1:
            names[idx[0]] = None
            continue
        seen: dict[int, int] = {}
        for i in idx:
            d = loaded[i][0].d_sae
            seen[d] = seen.get(d, 0) + 1
            names[i] = f"{src}:sae-{d}" + (f"-{seen[d]}" if seen[d] > 1 else "")
    return [(sae, site, names[i]) for i, (sae, site) in enumerate(loaded)]


def register(app: typer.Typer) -> None:
    """Add the ``sae`` command group to ``app``."""
    group = typer.Typer(help="Sparse autoencoders: train one on a recorded site; their features become units (record --sae).",
                        no_args_is_help=True, add_completion=False, rich_markup_mode=None)

    @group.command("train")
    def train(
        recording: Path = typer.Argument(..., metavar="RECORDING", help="A recording (.h5) holding the site."),
        site: str = typer.Option(..., "--site", "-s", help="The site whose units the SAE reconstructs."),
        features: int = typer.Option(..., "--features", "-n", help="Dictionary size (number of features)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write the SAE to (SAELens format)."),
        objective: str = typer.Option("topk", "--objective", help="topk (Gao et al. 2024) or relu (ReLU + L1)."),
        k: int = typer.Option(32, "--k", help="topk: features active per row."),
        l1: float = typer.Option(5.0, "--l1", help="relu: L1 coefficient (on inputs scaled to mean norm sqrt(units))."),
        epochs: float = typer.Option(10.0, "--epochs", help="Passes over the rows."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimiser steps (whatever --epochs says)."),
        batch_size: int = typer.Option(1024, "--batch-size", help="Rows per optimiser step."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: by dictionary size)."),
        data: str = typer.Option("auto", "--data", help="tokens (per-token traces), responses (pooled) or auto (tokens when recorded)."),
        split: Optional[str] = typer.Option(None, "--split", help="Train on the rows of this split only (e.g. screening)."),
        seed: int = typer.Option(0, "--seed", help="Seed of initialisation and row order."),
        block_mb: float = typer.Option(64.0, "--block-mb", help="Rows read from disk at once (MiB): memory is flat in the stimuli."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an SAE already in --out."),
        allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Train on the stimuli an incomplete recording covers."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    ) -> None:
        """Train an SAE on a recorded site, streamed from disk; write it in SAELens' format with its training curve."""
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.recording.reader import open_recording
        from neuroprobe.sae.io import SAELENS_CFG
        from neuroprobe.sae.train import TrainConfig, train_sae, write_result

        if out.exists() and not out.is_dir():
            raise NeuroprobeError(f"--out {out} is a file; give a folder for the SAE.")
        if (out / SAELENS_CFG).exists() and not overwrite:
            raise NeuroprobeError(f"{out} already holds an SAE; pass --overwrite to replace it or choose another --out.")
        config = TrainConfig(features=features, objective=objective, k=k, l1=l1, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                             lr=lr, seed=seed, block_mb=block_mb)
        with open_recording(recording) as rec:
            note = rec.require_complete(allow_incomplete)
            if note and not quiet:
                typer.echo(note, err=True)

            def progress(step: int, row: dict) -> None:
                if not quiet:
                    typer.echo(f"step {step}: loss {row['loss']:.4g}, nmse {row['nmse']:.4g}, L0 {row['l0']:.1f}", err=True)

            result = train_sae(rec, site, config, data=data, split=split, progress=progress)
        write_result(result, out)
        s = result.summary
        typer.echo(f"wrote {out}: {result.sae.describe()} on {s['rows']:,} {s['data']} rows of {site}; "
                   f"FVE {s['fve']:.4f}, L0 {s['l0']:.1f}, dead {s['dead']} of {s['d_sae']}; "
                   f"{s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} s CPU, peak RSS {s['peak_rss_mib']:.0f} MiB")

    @group.command("info")
    def info(folder: Path = typer.Argument(..., metavar="DIR", help="An SAE folder (SAELens or sparsify).")) -> None:
        """Print an SAE's format, architecture, sizes, site and hash."""
        from neuroprobe.sae.io import load_sae

        sae = load_sae(folder)
        typer.echo(f"{sae.describe()} ({sae.meta.get('format')} format)")
        for key in ("hook_name", "model_name", "sae_lens_version"):
            if sae.meta.get(key):
                typer.echo(f"  {key}: {sae.meta[key]}")
        typer.echo(f"  hash: {sae.content_hash()}")

    app.add_typer(group, name="sae")
