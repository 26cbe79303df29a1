"""``neuroprobe train-organism``: retrain an organism (``--arch dual`` or ``cross``) from scratch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from neuroprobe.errors import NeuroprobeError


def register(app: typer.Typer) -> None:
    """Add the ``train-organism`` command to ``app``."""

    @app.command("train-organism")
    def train_organism_cmd(
        seed: int = typer.Option(0, "--seed", help="Training seed (the committed weights use 0)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: what the committed "
                                            "weights use: 1000 for dual, 1200 for cross)."),
        arch: str = typer.Option("dual", "--arch", help="dual (organism: CLIP-style dual encoder) or cross "
                                 "(organism-cross: image and text tokens in one transformer)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for the weights and model card (load it with "
                                           "--weights; default organism-weights, or organism-cross-weights)."),
        threads: int = typer.Option(1, "--threads", help="CPU threads; weights are bitwise reproducible per thread count."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ) -> None:
        """Train an organism from scratch (--arch dual: organism; cross: organism-cross) and write its weights and card."""
        from neuroprobe.subjects.organism.train import WEIGHTS_DIR, get_arch, train_organism

        spec = get_arch(arch)
        if steps is not None and steps < 1:
            raise NeuroprobeError(f"--steps must be at least 1, not {steps}.")
        if threads < 1:
            raise NeuroprobeError(f"--threads must be at least 1, not {threads}.")
        out = out or Path("organism-weights" if arch == "dual" else f"{spec.subject}-weights")
        if out.exists() and not out.is_dir():
            raise NeuroprobeError(f"--out {out} is a file; give a folder for {spec.weights_file} and {spec.card_file}.")
        committed = WEIGHTS_DIR / spec.card_file  # read before training: --out may be the weights folder itself
        ref = json.loads(committed.read_text(encoding="utf-8")) if committed.is_file() else None
        card = train_organism(seed=seed, steps=steps, out=out, n_threads=threads, progress=not quiet, arch=arch)
        h = card["heldout"]
        typer.echo(f"wrote {out / spec.weights_file} ({card['parameters']:,} parameters, "
                   f"{card['train_seconds']} s)")
        typer.echo(f"held-out zero-shot accuracy: handwritten {h['handwritten']['accuracy']:.3f}, "
                   f"written names {h['written']['accuracy']:.3f}, text retrieval {h['text']['accuracy']:.3f}"
                   + (f", image-text matching {h['matching']['accuracy']:.3f}" if "matching" in h else ""))
        if ref is not None:
            same_recipe = (ref.get("seed"), ref.get("steps"), ref.get("threads")) == (seed, card["steps"], threads)
            if same_recipe:
                same = ref.get("state_sha256") == card["state_sha256"]
                typer.echo("reproduces the committed weights bit for bit" if same else
                           "differs from the committed weights (other library versions or hardware); "
                           f"compare the accuracies above with `neuroprobe subjects {spec.subject}`")
