"""``neuroprobe train-organism``: retrain the organism from scratch."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from neuroprobe.errors import NeuroprobeError


def register(app: typer.Typer) -> None:
    """Add the ``train-organism`` command to ``app``."""

    @app.command("train-organism")
    def train_organism_cmd(
        seed: int = typer.Option(0, "--seed", help="Training seed (the committed weights use 0)."),
        steps: int = typer.Option(1000, "--steps", help="Optimiser steps (the committed weights use 1000)."),
        out: Path = typer.Option(Path("organism-weights"), "--out",
                                 help="Folder for organism.safetensors and card.json (load it with --weights)."),
        threads: int = typer.Option(1, "--threads", help="CPU threads; weights are bitwise reproducible per thread count."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ) -> None:
        """Train the organism (CLIP-style digit model) from scratch and write its weights and model card."""
        from neuroprobe.subjects.organism.train import CARD_FILE, WEIGHTS_DIR, train_organism

        if steps < 1:
            raise NeuroprobeError(f"--steps must be at least 1, not {steps}.")
        if threads < 1:
            raise NeuroprobeError(f"--threads must be at least 1, not {threads}.")
        if out.exists() and not out.is_dir():
            raise NeuroprobeError(f"--out {out} is a file; give a folder for organism.safetensors and card.json.")
        card = train_organism(seed=seed, steps=steps, out=out, n_threads=threads, progress=not quiet)
        h = card["heldout"]
        typer.echo(f"wrote {out / 'organism.safetensors'} ({card['parameters']:,} parameters, "
                   f"{card['train_seconds']} s)")
        typer.echo(f"held-out zero-shot accuracy: handwritten {h['handwritten']['accuracy']:.3f}, "
                   f"written names {h['written']['accuracy']:.3f}, text retrieval {h['text']['accuracy']:.3f}")
        committed = WEIGHTS_DIR / CARD_FILE
        if committed.is_file():
            ref = json.loads(committed.read_text(encoding="utf-8"))
            same_recipe = (ref.get("seed"), ref.get("steps"), ref.get("threads")) == (seed, steps, threads)
            if same_recipe:
                same = ref.get("state_sha256") == card["state_sha256"]
                typer.echo("reproduces the committed weights bit for bit" if same else
                           "differs from the committed weights (other library versions or hardware); "
                           "compare the accuracies above with `neuroprobe subjects organism`")
