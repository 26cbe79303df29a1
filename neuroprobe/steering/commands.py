"""``neuroprobe steer``: PPLM-steered and unsteered continuations side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from neuroprobe.errors import NeuroprobeError


def _class_label(text: Optional[str]) -> str | int | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def mass_text(mass: float) -> str:
    """A bag's probability mass as printed: scientific notation with 3 significant digits.

    Masses span many orders of magnitude (a multi-token word's whole-word probability is a
    product of its pieces': Korean bags sit near 1e-5), so fixed decimals would print 0.0000.
    """
    return f"{float(mass):.2e}"


def _early_tokenizer(model: str, weights: Optional[Path]) -> Any | None:
    """The subject's tokenizer alone (fast), when it can be found without loading the model; else ``None``."""
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from neuroprobe.subjects.hf import _source
        from neuroprobe.subjects.registry import get_spec

        spec = get_spec(model)
        if not spec.loader.endswith("load_hf_subject"):
            return None
        source, local = _source(spec, weights)
        hf_logging.set_verbosity_error()
        return AutoTokenizer.from_pretrained(source, revision=None if local else spec.revision,
                                             local_files_only=True)
    except Exception:  # anything missing is reported by load_subject, with its own message
        return None


def register(app: typer.Typer) -> None:
    """Add the ``steer`` command to ``app``."""

    @app.command("steer")
    def steer_command(
        prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
        model: str = typer.Option("pplm", "--model", "-m", help="Subject to steer (GPT-2 family)."),
        bag: Optional[List[str]] = typer.Option(None, "--bag", "-b",
                                                help="Bag of words: packaged name (space, kinship, ...) or a UTF-8 file, "
                                                     "one word per line; repeat for several bags."),
        single_token_only: bool = typer.Option(False, "--single-token-only",
                                               help="Keep only single-token bag words (PPLM's original rule)."),
        discrim: Optional[str] = typer.Option(None, "--discrim", "-d",
                                              help="Discriminator: sentiment, clickbait, toxicity, or a .pt file."),
        class_label: Optional[str] = typer.Option(None, "--class-label",
                                                  help="Discriminator class (index or name, e.g. 2 or very_positive)."),
        length: int = typer.Option(20, "--length", "-n", help="Tokens to generate."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        stepsize: float = typer.Option(0.02, "--stepsize", help="PPLM step size."),
        num_iterations: int = typer.Option(3, "--num-iterations", help="Gradient steps per token."),
        gamma: float = typer.Option(1.5, "--gamma", help="Gradient-norm exponent."),
        gm_scale: float = typer.Option(0.9, "--gm-scale", help="Fusion weight of the steered distribution."),
        kl_scale: float = typer.Option(0.01, "--kl-scale", help="Weight of the KL term."),
        top_k: int = typer.Option(10, "--top-k", help="Sample among the k most probable tokens."),
        window_length: int = typer.Option(0, "--window", help="Perturb only the last N positions (0: all)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local directory with the model's files."),
        init: str = typer.Option("pretrained", "--init", help="pretrained | random (untrained control)."),
        device: str = typer.Option("cpu", "--device", help="torch device."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the per-step bag mass table (CSV)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Print a PPLM-steered and an unsteered continuation of PROMPT."""
        from neuroprobe.steering.pplm import language_model, steer

        if not bag and discrim is None:
            raise NeuroprobeError("steering needs an attribute: pass --bag NAME|FILE and/or --discrim NAME|FILE.")
        # check the attributes before the (slow) model load, so a typo or an unusable bag fails at once
        from neuroprobe.steering.attributes import DISCRIMINATORS, check_bag, load_bag

        bags = list(bag or [])
        for item in bags:
            check_bag(item)
        early = _early_tokenizer(model, weights) if bags else None
        if early is not None:  # resolve the bags now: a bag no word of which counts fails before the model loads
            for item in bags:
                load_bag(item, early, multi_token=not single_token_only)
        if discrim is not None and discrim not in DISCRIMINATORS and not Path(discrim).expanduser().is_file():
            raise NeuroprobeError(f"discriminator {discrim!r} is neither a packaged head ({', '.join(DISCRIMINATORS)}) "
                                  f"nor an existing file; pass one of those names or a path to a head's state dict.")
        try:
            from neuroprobe.subjects import load_subject
        except ImportError:
            raise NeuroprobeError("the subject registry (neuroprobe.subjects.load_subject) is not available in this "
                                  "installation; reinstall neuroprobe-cells.") from None
        subject = load_subject(model, init=init, weights=weights, device=device, heads=True, quiet=quiet)
        lm = language_model(subject)
        result = steer(
            lm, subject.tokenizer, prompt, bags=bags, discriminator=discrim, class_label=_class_label(class_label),
            multi_token=not single_token_only,
            length=length, seed=seed, progress=not quiet, stepsize=stepsize, num_iterations=num_iterations,
            gamma=gamma, gm_scale=gm_scale, kl_scale=kl_scale, top_k=top_k, window_length=window_length,
        )
        for b in result.bags:
            typer.echo(b.describe())
        if result.discriminator is not None:
            typer.echo(f"discriminator {result.discriminator}, class {result.class_id}")
        typer.echo("= unsteered =")
        typer.echo(prompt + result.unsteered_text)
        typer.echo("= steered =")
        typer.echo(prompt + result.steered_text)
        if result.bags:
            means = result.mean_mass()
            typer.echo(f"mean bag probability mass per token (whole words): unsteered {mass_text(means['unsteered'])}, "
                       f"steered {mass_text(means['steered'])}")
            if len(result.bags) > 1:
                for column in [c for c in result.mass.columns if c.startswith("bag_mass[")]:
                    per = result.mass.groupby("run")[column].mean()
                    typer.echo(f"  {column[9:-1]}: unsteered {mass_text(per['unsteered'])}, steered {mass_text(per['steered'])}")
        if out is not None:
            from neuroprobe.output import write_csv

            write_csv(result.mass, out)  # atomic; a full disk or an unwritable path is one sentence
