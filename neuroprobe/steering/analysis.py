"""Steering meets concept cells: two causal questions, one figure.

1. :func:`steering_cell_responses` — does steering toward a concept raise the
   responses of that concept's cells?  Electrodes read the cells' sites while
   :func:`~neuroprobe.steering.pplm.steer` runs; for each generated token we keep the
   cell's response at the forward pass that produced it, in the steered run and in
   the unsteered run, and average over tokens.  Cells of the other concepts are the
   control.
2. :func:`lesion_steering` — does lesioning those cells weaken the steering?  The
   same steering is run on the intact subject, with the concept's cells silenced
   (zeroed), and with as many random non-cell units of the same sites silenced;
   the steering gain is the steered run's mean bag mass minus the unsteered run's.

:func:`steering_summary` condenses both tables, :func:`plot_steering` draws them.

3. :func:`steering_tradeoff` — Dathathri et al.'s trade-off: the bag's probability
   mass and the perplexity of the generated text (:func:`continuation_perplexity`,
   under the subject's own unsteered model) against step size and iterations, with
   the unsteered baseline.
Everything goes through :class:`neuroprobe.electrodes.Electrodes`, the one hook
mechanism; steering itself registers none.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.steering.attributes import BagOfWords, available_bags, bag_from_words, load_bag
from neuroprobe.steering.pplm import SteeringResult, language_model, resolve_bags, steer

RUNS = ("steered", "unsteered")


def _cells_table(cells: pd.DataFrame) -> pd.DataFrame:
    need = {"site", "unit", "concept", "is_cell"}
    missing = need - set(cells.columns)
    if missing:
        raise NeuroprobeError(
            f"the cells table lacks column(s) {', '.join(sorted(missing))}; pass the table `neuroprobe cells` writes."
        )
    return cells


def _concept_bag(subject: Any, concept: str, bag: str | BagOfWords | Sequence[str] | None) -> BagOfWords:
    if bag is None:
        if concept in available_bags():
            return load_bag(concept, subject.tokenizer)
        return bag_from_words([concept], subject.tokenizer, name=concept)
    if isinstance(bag, (list, tuple)):
        return bag_from_words(list(bag), subject.tokenizer, name=concept)
    return load_bag(bag, subject.tokenizer)


def _sites_by_name(subject: Any, names: Iterable[str]) -> dict[str, Any]:
    wanted = sorted(set(names))
    sites = {s.name: s for s in subject.sites(wanted)}
    lost = [n for n in wanted if n not in sites]
    if lost:
        raise NeuroprobeError(f"site(s) {', '.join(lost)} of the cells table are not sites of subject {subject.name!r}; "
                              f"use a cells table found on a recording of this subject.")
    return sites


def steering_cell_responses(
    subject: Any,
    cells: pd.DataFrame,
    concept: str,
    prompts: Sequence[str],
    *,
    bag: str | BagOfWords | Sequence[str] | None = None,
    length: int = 20,
    seeds: Sequence[int] = (0,),
    **hyperparameters: Any,
) -> pd.DataFrame:
    """Responses of concept cells during steered and unsteered generation.

    Parameters
    ----------
    subject
        A loaded subject with ``model``, ``tokenizer``, ``name`` and ``sites(...)``.
    cells
        One row per unit with columns ``site``, ``unit``, ``concept``, ``is_cell``.
    concept
        The concept to steer toward.
    prompts
        Prompts to continue.
    bag
        The bag to steer with; default: the packaged bag named after the concept if
        there is one, else a bag of the concept's own name.
    length, seeds, **hyperparameters
        Passed to :func:`~neuroprobe.steering.pplm.steer`.

    Returns
    -------
    pandas.DataFrame
        One row per prompt, seed, run and cell: ``prompt``, ``seed``, ``run``,
        ``site``, ``unit``, ``cell_concept``, ``is_target`` and ``response`` (mean over
        the generated tokens of the cell's response at the pass that produced them).
    """
    from neuroprobe.electrodes import Electrodes

    table = _cells_table(cells)
    chosen = table[table["is_cell"].astype(bool)]
    if not (chosen["concept"] == concept).any():
        raise NeuroprobeError(f"no concept cell of {concept!r} in the cells table; pick a concept that has cells.")
    the_bag = _concept_bag(subject, concept, bag)
    sites = _sites_by_name(subject, chosen["site"])
    units_at = {name: chosen.loc[chosen["site"] == name, "unit"].astype(int).tolist() for name in sites}
    index_at = {name: torch.tensor(units, dtype=torch.long) for name, units in units_at.items()}
    concept_of = {(r.site, int(r.unit)): r.concept for r in chosen.itertuples(index=False)}

    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        for seed in seeds:
            state = {"phase": ""}
            sums: dict[tuple[str, str], np.ndarray] = {}
            counts: dict[tuple[str, str], int] = defaultdict(int)

            def on_forward(phase: str) -> None:
                state["phase"] = phase

            def on_read(site: Any, x: torch.Tensor) -> None:
                run = state["phase"]
                if run not in RUNS:
                    return
                value = x[0, -1, index_at[site.name].to(x.device)].double().cpu().numpy()
                key = (run, site.name)
                sums[key] = sums.get(key, 0.0) + value
                counts[key] += 1

            with Electrodes(subject.model, list(sites.values()), read=False, on_read=on_read):
                steer(language_model(subject), subject.tokenizer, prompt, bag=the_bag, length=length, seed=seed,
                      on_forward=on_forward, **hyperparameters)
            for (run, site_name), total in sums.items():
                means = total / counts[(run, site_name)]
                for unit, value in zip(units_at[site_name], means):
                    cell_concept = concept_of[(site_name, int(unit))]
                    rows.append({
                        "prompt": prompt, "seed": seed, "run": run, "site": site_name, "unit": int(unit),
                        "cell_concept": cell_concept, "is_target": cell_concept == concept, "response": float(value),
                    })
    return pd.DataFrame(rows, columns=["prompt", "seed", "run", "site", "unit", "cell_concept", "is_target", "response"])


def lesion_steering(
    subject: Any,
    cells: pd.DataFrame,
    concept: str,
    prompts: Sequence[str],
    *,
    bag: str | BagOfWords | Sequence[str] | None = None,
    length: int = 20,
    seeds: Sequence[int] = (0,),
    random_draws: int = 0,
    random_seed: int = 0,
    **hyperparameters: Any,
) -> pd.DataFrame:
    """Steering gain on the intact subject, with the concept's cells lesioned, and with random lesions.

    Parameters
    ----------
    subject, cells, concept, prompts, bag, length, seeds, **hyperparameters
        As in :func:`steering_cell_responses`.
    random_draws
        Random lesions of the same size (per site, drawn among the site's other units
        listed in ``cells``).
    random_seed
        Seed of the random draws.

    Returns
    -------
    pandas.DataFrame
        One row per condition, draw, prompt and seed: ``condition`` (``intact``,
        ``lesion``, ``random``), ``draw``, ``n_units``, ``prompt``, ``seed``,
        ``steered_mass``, ``unsteered_mass`` and ``gain`` (their difference).
    """
    from contextlib import nullcontext

    from neuroprobe.lesions import lesion

    table = _cells_table(cells)
    target = table[table["is_cell"].astype(bool) & (table["concept"] == concept)]
    if target.empty:
        raise NeuroprobeError(f"no concept cell of {concept!r} in the cells table; pick a concept that has cells.")
    the_bag = _concept_bag(subject, concept, bag)
    sites = _sites_by_name(subject, target["site"])
    lesion_units = {name: target.loc[target["site"] == name, "unit"].astype(int).tolist() for name in sites}

    conditions: list[tuple[str, int, dict[str, list[int]]]] = [("intact", 0, {}), ("lesion", 0, lesion_units)]
    rng = np.random.default_rng(random_seed)
    for draw in range(random_draws):
        drawn: dict[str, list[int]] = {}
        for name, units in lesion_units.items():
            pool = np.setdiff1d(table.loc[table["site"] == name, "unit"].astype(int).unique(), units)
            if len(pool) < len(units):
                raise NeuroprobeError(f"site {name!r} lists too few non-cell units for a random lesion of "
                                      f"{len(units)}; pass the full per-unit table.")
            drawn[name] = sorted(rng.choice(pool, size=len(units), replace=False).tolist())
        conditions.append(("random", draw, drawn))

    rows: list[dict[str, Any]] = []
    for condition, draw, units in conditions:
        n_units = int(sum(len(u) for u in units.values()))
        for prompt in prompts:
            for seed in seeds:
                # the project's lesion (zero ablation through Electrodes); the intact run has none
                with lesion(subject, units, "zero") if units else nullcontext():
                    result = steer(language_model(subject), subject.tokenizer, prompt, bag=the_bag, length=length, seed=seed,
                                   **hyperparameters)
                means = result.mean_mass()
                rows.append({
                    "condition": condition, "draw": draw, "n_units": n_units, "prompt": prompt, "seed": seed,
                    "steered_mass": float(means["steered"]), "unsteered_mass": float(means["unsteered"]),
                    "gain": float(means["steered"] - means["unsteered"]),
                })
    return pd.DataFrame(rows)


def steering_summary(responses: pd.DataFrame, lesions: pd.DataFrame | None = None) -> pd.DataFrame:
    """One table answering both questions.

    Returns
    -------
    pandas.DataFrame
        Rows ``target cells`` / ``other cells``: mean response in each run and the
        change (steered − unsteered); and, with ``lesions``, rows per condition with
        the mean steering gain and its ratio to the intact gain.
    """
    out: list[dict[str, Any]] = []
    for is_target, label in ((True, "target cells"), (False, "other cells")):
        part = responses[responses["is_target"] == is_target]
        if part.empty:
            continue
        by_run = part.groupby("run")["response"].mean()
        steered, unsteered = float(by_run.get("steered", np.nan)), float(by_run.get("unsteered", np.nan))
        out.append({"what": label, "steered": steered, "unsteered": unsteered, "change": steered - unsteered})
    if lesions is not None and not lesions.empty:
        intact = float(lesions.loc[lesions["condition"] == "intact", "gain"].mean())
        for condition, part in lesions.groupby("condition", sort=False):
            gain = float(part["gain"].mean())
            out.append({"what": f"gain ({condition})", "steered": float(part["steered_mass"].mean()),
                        "unsteered": float(part["unsteered_mass"].mean()), "change": gain,
                        "relative_to_intact": gain / intact if intact else np.nan})
    return pd.DataFrame(out)


def plot_steering(responses: pd.DataFrame, lesions: pd.DataFrame | None = None):
    """Left: cell responses, steered vs unsteered, target vs other cells.  Right: steering gain per lesion condition.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    n = 2 if lesions is not None and not lesions.empty else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    data = responses.assign(cells=np.where(responses["is_target"], "target concept", "other concepts"))
    sns.barplot(data=data, x="cells", y="response", hue="run", hue_order=list(RUNS), ax=axes[0, 0], errorbar=("ci", 95))
    axes[0, 0].set_title("concept-cell response during generation")
    axes[0, 0].set_xlabel("")
    if n == 2:
        sns.barplot(data=lesions, x="condition", y="gain", ax=axes[0, 1], errorbar=("ci", 95), color="0.6")
        sns.stripplot(data=lesions, x="condition", y="gain", ax=axes[0, 1], color="k", size=3)
        axes[0, 1].axhline(0, color="k", lw=0.8)
        axes[0, 1].set_title("steering gain (bag mass, steered − unsteered)")
        axes[0, 1].set_xlabel("")
    fig.tight_layout()
    return fig


def continuation_perplexity(model: Any, prompt_ids: Sequence[int], continuation: Sequence[int]) -> float:
    """Perplexity of ``continuation`` given ``prompt_ids`` under ``model`` (no steering, no hooks of its own).

    ``exp(−mean_t log p(x_t | prompt, x_<t))`` over the continuation's tokens: the fluency
    measure of Dathathri et al. 2020, computed with the unsteered language model.

    Parameters
    ----------
    model
        A causal language model with an LM head (``language_model(subject)``).
    prompt_ids
        The prompt's token ids (with BOS when the generation had one); at least one.
    continuation
        The generated token ids; at least one.
    """
    import torch.nn.functional as F

    if not len(prompt_ids) or not len(continuation):
        raise NeuroprobeError("perplexity needs a prompt and a continuation of at least one token each.")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(continuation)], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    n = len(prompt_ids)
    targets = ids[0, n:]
    logp = F.log_softmax(logits[n - 1:-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(torch.exp(-logp.mean()))


def steering_tradeoff(
    subject: Any,
    bag: str | BagOfWords | Sequence[str],
    prompts: Sequence[str],
    *,
    stepsizes: Sequence[float] = (0.01, 0.03, 0.1),
    iterations: Sequence[int] = (1, 3),
    length: int = 10,
    seed: int = 0,
    **hyperparameters: Any,
) -> pd.DataFrame:
    """PPLM's trade-off: bag mass and perplexity against step size and iterations, beside the unsteered run.

    Every (prompt, step size, iterations) runs :func:`~neuroprobe.steering.pplm.steer`
    once with the same sampling seed; the unsteered continuation of a prompt is the
    same in every run (it is checked) and is kept once, as the baseline at step size 0.

    Parameters
    ----------
    subject
        A loaded causal-LM subject (``heads=True``).
    bag
        The bag of words (packaged name, file, word list or :class:`BagOfWords`).
    prompts
        Prompts to continue.
    stepsizes, iterations
        The grid (step sizes > 0; the baseline is added).
    length, seed, **hyperparameters
        Passed to :func:`~neuroprobe.steering.pplm.steer`.

    Returns
    -------
    pandas.DataFrame
        One row per prompt and setting: ``bag``, ``prompt``, ``run`` (``steered`` /
        ``unsteered``), ``stepsize`` (0 for the unsteered run), ``num_iterations`` (0 for it),
        ``mass`` (mean per-token probability mass of the bag's whole words in the
        distribution sampled from), ``mass_unpert`` (the unperturbed model's mass at the
        same contexts), ``in_bag`` (fraction of generated tokens that start a bag word),
        ``perplexity`` (of the continuation under the unsteered model), ``text`` and
        ``token_ids`` (the continuation's ids, space-separated).
    """
    lm = language_model(subject)
    the_bag = resolve_bags(bag, None, subject.tokenizer)[0]
    if any(float(a) <= 0 for a in stepsizes) or any(int(k) < 1 for k in iterations):
        raise NeuroprobeError("the trade-off grid needs step sizes > 0 and iterations >= 1; the unsteered baseline is added.")
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        baseline: SteeringResult | None = None
        for alpha in stepsizes:
            for k in iterations:
                result = steer(lm, subject.tokenizer, prompt, bag=the_bag, length=length, seed=seed,
                               stepsize=float(alpha), num_iterations=int(k), **hyperparameters)
                if baseline is None:
                    baseline = result
                    rows.append(_tradeoff_row(lm, the_bag, result, "unsteered", 0.0, 0))
                elif result.unsteered_ids != baseline.unsteered_ids:
                    raise NeuroprobeError("the unsteered continuation changed between runs of one seed; "
                                          "steering needs a deterministic model (eval mode, no dropout).")
                rows.append(_tradeoff_row(lm, the_bag, result, "steered", float(alpha), int(k)))
    return pd.DataFrame(rows)


def _tradeoff_row(lm: Any, bag: BagOfWords, result: SteeringResult, run: str, alpha: float, k: int) -> dict[str, Any]:
    part = result.mass[result.mass["run"] == run]
    ids = result.steered_ids if run == "steered" else result.unsteered_ids
    return {
        "bag": bag.name, "prompt": result.prompt, "run": run, "stepsize": alpha, "num_iterations": k,
        "mass": float(part["bag_mass"].mean()), "mass_unpert": float(part["bag_mass_unpert"].mean()),
        "in_bag": float(part["in_bag"].mean()),
        "perplexity": continuation_perplexity(lm, result.prompt_ids, ids),
        "text": result.steered_text if run == "steered" else result.unsteered_text,
        "token_ids": " ".join(map(str, ids)),
    }
