"""``neuroprobe record`` and ``neuroprobe inspect``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def parse_options(items: list[str]) -> dict[str, str]:
    """Turn repeated ``--option KEY=VALUE`` into a dict (one clear error for a malformed item)."""
    from neuroprobe.errors import NeuroprobeError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NeuroprobeError(f"--option expects KEY=VALUE, got {item!r}.")
        out[key.strip().replace("-", "_")] = value
    return out


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know or this machine does not have (one sentence, before any loading)."""
    from neuroprobe.errors import NeuroprobeError

    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise NeuroprobeError(f"--device {device!r} is not a device torch knows; use cpu or cuda (cuda:N).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeuroprobeError(f"--device {device!r}: this machine has no CUDA device torch can use; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise NeuroprobeError(f"--device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise NeuroprobeError(f"--device {device!r}: MPS is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise NeuroprobeError(f"--device {device!r} is not supported; use cpu or cuda (cuda:N).")


def register(app: typer.Typer) -> None:
    """Add the recording commands to ``app``."""

    @app.command()
    def record(
        model: str = typer.Option(..., "--model", "-m", help="Subject name (see `neuroprobe subjects`) or hf:<id|dir>."),
        probe: Optional[str] = typer.Option(None, "--probe", "-p", help="Battery name under probes/ or a battery folder (default: one the subject's modalities reach, e.g. kinship for text models, pictures or digits for image-taking ones)."),
        sites: str = typer.Option("mlp", "--sites", help="Montage: mlp, resid, attn, all, or comma-separated globs."),
        pool: str = typer.Option("mean", "--pool", help="Pooling: mean, max, first, last, concept-token."),
        tokens: bool = typer.Option(False, "--tokens", help="Also keep per-token traces (ragged, no padding)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default recordings/<subject>_<battery>_<montage>.h5)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted recording."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing recording."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda (default when available) or cpu."),
        init: str = typer.Option("pretrained", "--init", help="pretrained, or random (the untrained control)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local folder with the checkpoint files."),
        batch_size: int = typer.Option(32, "--batch-size", help="Stimuli per forward pass."),
        dtype: str = typer.Option("float32", "--dtype", help="Storage dtype: float32 or float16."),
        model_dtype: str = typer.Option("float32", "--model-dtype", help="Weights dtype: float32, float16 or bfloat16."),
        compression: Optional[str] = typer.Option(None, "--compression", help="gzip or lzf (default none)."),
        seed: int = typer.Option(0, "--seed", help="Seed (random init and anything stochastic)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let hf: models run their own code."),
        detector_weights: Optional[Path] = typer.Option(None, "--detector-weights", help="LXMERT/VisualBERT/ViLBERT: Faster R-CNN folder."),
        features: Optional[Path] = typer.Option(None, "--features", help="Precomputed region features (*_obj36.tsv or .h5)."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="DALL-E: allow loading OpenAI's pickled dVAE."),
        device_map: Optional[str] = typer.Option(None, "--device-map", help="auto, balanced, sequential or a JSON file: spread a big transformers subject over GPUs, CPU and disk (accelerate)."),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With --device-map: per-device budget, e.g. 0=20GiB,cpu=64GiB."),
        offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help="With --device-map: where weights offloaded to disk go."),
        allow_outside_images: bool = typer.Option(False, "--allow-outside-images", help="Let the battery's image paths leave its folder."),
        option: list[str] = typer.Option([], "--option", "-O", help="Subject-specific KEY=VALUE (e.g. variant=mini, codes=FILE); repeatable."),
        sae: Optional[str] = typer.Option(None, "--sae", help="SAE folder(s), DIR[@SITE] comma-separated: also record each SAE's features as site SITE:sae."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Record every unit at the chosen sites of a subject shown a battery."""
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.recording.recorder import Recorder, check_output, default_output_for
        from neuroprobe.stimuli.battery import Battery
        from neuroprobe.subjects.registry import get_spec, load_subject

        # everything that can be refused is refused before the model loads
        if not sites.strip():
            raise NeuroprobeError("--sites is empty; give mlp, resid, attn, all or comma-separated site patterns.")
        check_device(device)
        if out is not None:  # an explicit output is checked before anything else is looked up
            check_output(out, resume=resume, overwrite=overwrite)
        if probe is None:
            probe = get_spec(model).default_battery
            if not quiet:
                typer.echo(f"battery: {probe} (the default for {model}; choose another with --probe)", err=True)
        battery = Battery.load(probe, allow_outside_images=allow_outside_images)
        saes = []
        if sae is not None:  # SAEs load (and are refused) before the model
            from neuroprobe.sae.commands import load_for_recording, parse_sae_list

            saes = load_for_recording(parse_sae_list(sae))
        if out is None:
            check_output(default_output_for(model, init, battery.name, sites), resume=resume, overwrite=overwrite)
        options = {}
        if detector_weights is not None:
            options["detector_weights"] = detector_weights
        if features is not None:
            options["features"] = features
        if trust_pickle:
            options["trust_pickle"] = True
        options.update(parse_options(option))
        for key, value in (("device_map", device_map), ("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                options[key] = value
        from neuroprobe.distributed import local_device, world

        device = local_device(device, world())
        subject = load_subject(model, init=init, weights=weights, device=device, seed=seed, dtype=model_dtype,
                               trust_remote_code=trust_remote_code, quiet=quiet,
                               modalities=tuple(battery.table["modality"].unique()), **options)
        if saes:
            from neuroprobe.sae.sites import attach

            for model_sae, source, name in saes:
                attach(subject, model_sae, source, name=name)
        recorder = Recorder(subject, battery, montage=sites, pooling=pool, tokens=tokens, dtype=dtype,
                            batch_size=batch_size, compression=compression, quiet=quiet,
                            command=" ".join(["neuroprobe"] + sys.argv[1:]))
        from neuroprobe.recording.entry import run

        path = run(recorder, out, resume=resume, overwrite=overwrite)
        if not quiet:
            typer.echo(f"wrote {path} ({len(battery)} stimuli, {len(recorder.sites)} sites)")

    @app.command()
    def inspect(path: Path = typer.Argument(..., metavar="RECORDING", help="A recording (.h5).")) -> None:
        """Print a recording's provenance and sites."""
        from neuroprobe.recording.reader import open_recording

        with open_recording(path) as rec:
            typer.echo(repr(rec))
            for k, v in rec.attrs.items():
                if k != "sites_list":
                    typer.echo(f"  {k}: {v}")
            typer.echo(rec.sites.to_string(index=False))

    @app.command()
    def merge(
        path: Path = typer.Argument(..., help="A virtual recording written by a sharded (torchrun) run."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (default: replace REC.h5 in place)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Materialise a virtual recording into one self-contained file (the shards are checked first)."""
        from neuroprobe.recording.shards import merge as merge_shards, shard_dir

        written = merge_shards(path, out, quiet=quiet)
        if not quiet:
            typer.echo(f"wrote {written}; the shards in {shard_dir(path)} are no longer needed by it")
