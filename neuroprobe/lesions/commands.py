"""``neuroprobe lesion``: lesion a concept's units and print what the subject forgets."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import typer

TABLE_COLUMNS = ["concept", "mode", "k", "target_change", "other_change", "specificity", "random_target_change",
                 "random_target_sd", "p_random", "p_random_specific", "n_random", "bottom_target_change", "target_rank",
                 "most_hit_other"]


def _ints(text: str, what: str) -> list[int]:
    from neuroprobe.errors import NeuroprobeError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise NeuroprobeError(f"{what} expects comma-separated positive integers such as 1,2,4,8,16, not {text!r}.") from None
    if not values or min(values) < 1:
        raise NeuroprobeError(f"{what} expects comma-separated positive integers such as 1,2,4,8,16, not {text!r}.")
    return values


def cells_provenance(cells: Path | None) -> dict[str, str]:
    """Where a cells table came from: ``recording``, ``subject``, ``init``, ``battery`` (what is known).

    A recording (``.h5``) says it itself; a table written by ``neuroprobe cells --out``
    has it in ``<table>.json`` beside it, which names the recording.
    """
    import json

    if cells is None:
        return {}
    cells = Path(cells)
    if cells.suffix in (".h5", ".hdf5") and cells.is_file():
        import h5py

        with h5py.File(cells, "r") as f:
            return {k: str(f.attrs[k]) for k in ("subject", "init", "battery") if k in f.attrs} | {"recording": str(cells)}
    meta: dict[str, str] = {}
    side = Path(str(cells) + ".json")
    if side.is_file():
        try:
            meta = {k: str(v) for k, v in json.loads(side.read_text(encoding="utf-8")).items()}
        except (ValueError, OSError, RecursionError, AttributeError):  # unreadable, too deep, not an object
            meta = {}
    rec = meta.get("recording")
    if rec and Path(rec).is_file() and not {"battery", "init"} <= set(meta):
        meta = cells_provenance(Path(rec)) | meta
    return meta


def default_out(subject_name: str, init: str, battery: str) -> Path:
    """``figures/lesions/<subject>[-random]_<battery>`` in the working directory (git ignores ``figures/``)."""
    tag = subject_name.replace(":", "_").replace("/", "_") + ("-random" if init == "random" else "")
    return Path("figures") / "lesions" / f"{tag}_{battery}"


def register(app: typer.Typer) -> None:
    """Add ``lesion`` to ``app``."""

    @app.command()
    def lesion(
        model: str = typer.Option(..., "--model", "-m", help="Subject name (see `neuroprobe subjects`) or hf:<id|dir>."),
        concept: str = typer.Option(..., "--concept", "-c", help="Concept(s) whose units to lesion, comma-separated."),
        cells: Optional[Path] = typer.Option(None, "--cells", help="Cells table (CSV from `neuroprobe cells`) or a recording (.h5); "
                                             "default: rank units by d' on the screening split here."),
        k: str = typer.Option("1,2,4,8,16", "--k", help="Numbers of units to lesion (dose-response), comma-separated."),
        mode: str = typer.Option("zero,mean", "--mode", help="Lesion mode(s): zero, mean, resample, scale (comma-separated)."),
        factor: Optional[float] = typer.Option(None, "--factor", help="Scale factor for --mode scale (>1 amplifies)."),
        random_draws: Optional[int] = typer.Option(None, "--random-draws", help="Exactly N random lesions per k and mode "
                                                   "(same count per site, active units); default: sequential, see --max-draws."),
        max_draws: int = typer.Option(100, "--max-draws", help="Sequential random lesions: at most N per k and mode, stopping "
                                      "once p <= --alpha is settled (Besag-Clifford)."),
        alpha: float = typer.Option(0.05, "--alpha", help="Level whose decision ends sequential random draws."),
        keep_draws: int = typer.Option(10, "--keep-draws", help="Random keep-only-k complements per k (0 to skip)."),
        probe: Optional[str] = typer.Option(None, "--probe", "-p", help="Battery name under probes/ or a battery folder "
                                            "(default: the battery of the recording the cells came from, else the subject's default battery, as for `record`)."),
        readout: Optional[str] = typer.Option(None, "--readout", help="Readout name (default: the subject's default)."),
        sites: Optional[str] = typer.Option(None, "--sites", help="Montage or site globs to lesion (default: the cells' sites, or mlp)."),
        matrix: bool = typer.Option(True, "--matrix/--no-matrix", help="Also the lesioned x tested concept forgetting matrix."),
        matrix_k: Optional[int] = typer.Option(None, "--matrix-k", help="Units per concept in the matrix (default: the largest k)."),
        importance: int = typer.Option(0, "--importance", help="Single-unit lesions of N top + 3N random units per site (selectivity vs importance); 0 skips."),
        split: str = typer.Option("testing", "--split", help="Evaluation split (units are ranked on the other)."),
        modality: Optional[str] = typer.Option(None, "--modality", help="Evaluate only stimuli of this modality "
                                               "(image, text, pair; comma-separated): a cross-modal subject's "
                                               "image-side or text-side readout. Units are ranked on every stimulus."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default figures/lesions/<subject>_<battery>)."),
        site_col: str = typer.Option("site", "--site-col", help="Cells table: site column."),
        unit_col: str = typer.Option("unit", "--unit-col", help="Cells table: unit column."),
        concept_col: Optional[str] = typer.Option(None, "--concept-col", help="Cells table: concept column (default concept or best_concept)."),
        score_col: Optional[str] = typer.Option(None, "--score-col", help="Cells table: ranking score column (default dprime or similar)."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda (default when available) or cpu."),
        init: Optional[str] = typer.Option(None, "--init", help="pretrained, or random (the untrained control); "
                                           "default: the init of the recording the cells came from, else pretrained."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Local folder with the checkpoint files."),
        seed: int = typer.Option(0, "--seed", help="Seed of random lesions and resample draws."),
        batch_size: int = typer.Option(32, "--batch-size", help="Stimuli per forward pass."),
        option: list[str] = typer.Option([], "--option", "-O", help="Subject-specific KEY=VALUE; repeatable."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Lesion a concept's units; print the forgetting table; write CSVs and figures.

        Under ``torchrun`` every rank runs the study and evaluates its share of each list of
        lesions (:mod:`neuroprobe.lesions.sweep`); rank 0 prints and writes the results.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd

        from neuroprobe.distributed import local_device, world
        from neuroprobe.errors import NeuroprobeError
        from neuroprobe.lesions.figures import plot_dose_response, plot_forgetting_matrix
        from neuroprobe.lesions.forgetting import LesionStudy, importance_summary, summarize
        from neuroprobe.lesions.lesion import MODES, scale_factor
        from neuroprobe.lesions.sweep import across_ranks
        from neuroprobe.output import make_folder, save_figure, staged_outputs, write_csv
        from neuroprobe.recording.commands import parse_options
        from neuroprobe.stimuli.battery import Battery
        from neuroprobe.subjects.registry import get_spec, load_subject

        w = world()  # under torchrun: rank 0 prints and writes, the others only evaluate their shares
        quiet = quiet or not w.primary
        device = local_device(device, w)
        ks = _ints(k, "--k")
        modes = [m.strip() for m in mode.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise NeuroprobeError(f"--mode {mode!r}: use one or more of {', '.join(MODES)}, comma-separated.")
        if "scale" in modes:
            factor = scale_factor(factor, "--factor")
        if (random_draws is not None and random_draws < 0) or keep_draws < 0 or max_draws < 1:
            raise NeuroprobeError("--random-draws and --keep-draws must be >= 0, --max-draws >= 1.")
        if not 0 < alpha < 1:
            raise NeuroprobeError(f"--alpha must be between 0 and 1, not {alpha}.")
        sequential = random_draws is None
        n_draws = max_draws if sequential else random_draws
        concepts = [c.strip() for c in concept.split(",") if c.strip()]
        if cells is not None and not Path(cells).is_file():
            raise NeuroprobeError(f"cells table {cells} does not exist; write one with `neuroprobe cells REC.h5 --out FILE`.")
        origin = cells_provenance(cells)
        if probe is None:
            probe = origin.get("battery") or get_spec(model).default_battery  # as `record` picks it
            where = (f"the battery of {origin.get('recording') or cells}, which the cells came from" if origin.get("battery")
                     else f"the default for {model}")
        else:
            where = "--probe"
        if init is None:
            init = origin.get("init") if origin.get("init") in ("pretrained", "random") else "pretrained"
        battery = Battery.load(probe)
        if not quiet:
            typer.echo(f"battery: {battery.name} ({where}); subject init: {init}", err=True)
        unknown = [c for c in concepts if c not in battery.concepts]
        if unknown or not concepts:
            raise NeuroprobeError(
                f"concept {', '.join(map(repr, unknown)) or '(none)'} is not in battery {battery.name!r} ({where}); "
                f"it has {', '.join(battery.concept_names)}"
                + ("; name the cells' battery with --probe." if where.startswith("the default") else ".")
            )
        columns = {"site": site_col, "unit": unit_col}
        if concept_col:
            columns["concept"] = concept_col
        if score_col:
            columns["score"] = score_col
        # heads: readouts that score words need the task head; encoders without one ignore it
        subject = load_subject(model, init=init, weights=weights, device=device, seed=seed, heads=True, quiet=quiet,
                               **parse_options(option))
        if origin.get("recording") and Path(origin["recording"]).is_file():  # lesioned features need their SAEs
            from neuroprobe.sae.sites import attach_recorded

            attach_recorded(subject, origin["recording"])
        out_dir = Path(out or default_out(subject.name, subject.init, battery.name))
        if w.primary:
            make_folder(out_dir)

        def csv(frame: pd.DataFrame, name: str, **kw: object) -> None:
            if w.primary:
                write_csv(frame, out_dir / name, **kw)

        def figure(fig: object, name: str) -> None:
            save_figure(fig, out_dir / name, dpi=130)
            plt.close(fig)

        def echo(text: str) -> None:
            if w.primary:
                typer.echo(text)

        with contextlib.ExitStack() as stack:
            if not w.primary:  # the same warnings as rank 0's, once is enough
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            stack.enter_context(across_ranks(w))
            stack.enter_context(staged_outputs())  # the tables and figures appear together at the end, or none do
            study = LesionStudy(subject, battery, cells, sites=sites, readout=readout, split=split,
                                rank_split="screening" if split == "testing" else "testing", columns=columns, seed=seed,
                                quiet=quiet, batch_size=batch_size, modality=modality)
            for c in concepts:
                study.check_concept(c)

            orders = ["top", "bottom", "random", "keep_top"] + (["keep_random"] if keep_draws else [])
            doses = []
            for c in concepts:
                dose = study.dose_response(c, ks, modes, random_draws=n_draws, keep_draws=keep_draws, orders=orders,
                                           factor=factor, sequential=sequential, alpha=alpha)
                doses.append(dose)
                if w.primary:
                    figure(plot_dose_response(dose), f"dose_response_{_slug(c)}.png")
            dose_all = pd.concat(doses, ignore_index=True)
            table = summarize(dose_all)
            csv(dose_all, "dose_response.csv")
            csv(table, "forgetting.csv")

            with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
                echo(f"{subject.name} ({subject.init}) x {battery.name}: readout {study.readout!r}, "
                     f"units ranked on {study.rank_split!r}, evaluated on {study.split!r} "
                     f"({len(study.test)} {'+'.join(study.modality) + ' ' if study.modality else ''}stimuli); "
                     f"change = lesioned - intact, per concept")
                echo(f"lesions: {study.engine}; random draws: "
                     + (f"sequential, at most {n_draws} per k and mode, stopped once p <= {alpha:g} was settled "
                        f"(Besag-Clifford; n_random = draws used)" if sequential else f"exactly {n_draws} per k and mode"))
                echo(table[[c for c in TABLE_COLUMNS if c in table.columns]].to_string(index=False))

            if matrix:
                mk = matrix_k or max(ks)
                mats = []
                for m in modes:
                    mat = study.forgetting_matrix(None, mk, m, factor=factor)
                    csv(mat, f"forgetting_matrix_{m}.csv", index=True)
                    mats.append((f"{m} ablation, top-{mk} units", mat))
                    diag = pd.Series({c: mat.loc[c, c] for c in mat.index})
                    off = mat.where(~pd.DataFrame(mat.index.to_numpy()[:, None] == mat.columns.to_numpy()[None, :],
                                                  index=mat.index, columns=mat.columns)).mean(axis=1)
                    if not quiet:
                        typer.echo(f"forgetting matrix ({m}, k={mk}): mean diagonal {diag.mean():.4g}, "
                                   f"mean off-diagonal {off.mean():.4g}; "
                                   f"{int((diag < off).sum())}/{int(diag.notna().sum())} concepts lose most on themselves")
                if w.primary:
                    figure(plot_forgetting_matrix(mats), "forgetting_matrix.png")

            if importance > 0:
                parts = [study.selectivity_vs_importance(c, modes[0], n_top=importance, n_random=3 * importance, factor=factor)
                         for c in concepts]
                units = pd.concat(parts, ignore_index=True)
                csv(units, "importance.csv")
                summary = importance_summary(units)
                csv(summary, "importance_summary.csv")
                with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
                    echo(summary.to_string(index=False))
        if not quiet:
            typer.echo(f"wrote {out_dir}/ (forgetting.csv, dose_response.csv, figures)")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-") or "concept"
