"""Integrated-gradient attribution of units to a readout, and Dai et al.'s knowledge neurons.

**Integrated gradients through an electrode.**  For a site with activation ``x``
(canonical ``[batch, tokens, units]``) and a differentiable score ``F`` (the
readout of :meth:`~neuroprobe.subjects.base.Subject.readout_tensor`, or its
probability), the attribution of unit ``u`` is

.. math::

    \\mathrm{IG}_u = \\sum_t x_{t,u} \\int_0^1 \\frac{\\partial F(\\alpha x)}{\\partial (\\alpha x)_{t,u}}\\, d\\alpha ,

the path that scales the whole site from zero (the baseline) to its activation, as in
Dai et al. 2022 (they scale one layer's FFN units at once, layer by layer).  The edit
``x -> alpha * x`` is an ordinary electrode edit (:class:`~neuroprobe.electrodes.Electrodes`),
the gradient is taken with respect to the edited activation, and the integral is a
Riemann sum over ``steps`` values of ``alpha`` (``midpoint`` by default; ``left`` is
Dai et al.'s released code: ``alpha = k/m``, ``k = 0..m-1``).  The ``steps`` values of
``alpha`` run as replicas along the batch, so one forward and one backward pass
serve a chunk of stimuli at every step.  Other sites are left intact, so every
site's attributions are computed with the rest of the network unedited.

Properties a caller can check (and the tests do): for a score that is linear in the
site's units, ``IG_u = x_u * dF/dx_u`` exactly at any number of steps; in general the
attributions of a site sum to ``F(x) - F(0)`` (completeness), up to the Riemann error.

**Knowledge neurons** (:func:`knowledge_neurons`): per prompt, the units whose
attribution exceeds ``threshold`` times the prompt's largest attribution (over all
sites); per fact, those kept by at least ``share`` of the fact's prompts (and at least
``min_prompts``).  Dai et al. use ``threshold = 0.2`` and ``share = 0.7``, moved by
0.05 (at most 6 times) until facts have 2 to 5 knowledge neurons on average, with
at least 3 prompts (their released ``2_get_kn.py``).

Units are scaled at every token of the site (as neuroprobe's lesions act); Dai et al.
scale the ``[MASK]`` position only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.electrodes import Electrodes
from neuroprobe.errors import NeuroprobeError
from neuroprobe.lesions.lesion import resolve_sites
from neuroprobe.subjects.base import Site, Subject
from neuroprobe.subjects.copies import shared_state

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

RULES = ("midpoint", "left", "right")

#: ``score(subject, stimuli, battery) -> tensor [n]`` (differentiable)
Score = Callable[[Subject, pd.DataFrame, "Battery"], torch.Tensor]


def alphas(steps: int, rule: str = "midpoint") -> np.ndarray:
    """The scale factors of a ``steps``-point Riemann sum over ``[0, 1]`` (each weighs ``1/steps``)."""
    if int(steps) < 1:
        raise NeuroprobeError(f"integrated gradients need at least 1 step, not {steps}.")
    if rule not in RULES:
        raise NeuroprobeError(f"the Riemann rule {rule!r} is not one of {', '.join(RULES)}.")
    k = np.arange(int(steps), dtype=np.float64)
    shift = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[rule]
    return (k + shift) / int(steps)


def integrated_gradients(
    subject: Subject,
    battery: "Battery",
    stimuli: pd.DataFrame,
    sites: Sequence[str | Site],
    *,
    readout: str | None = None,
    score: Score | None = None,
    probability: bool = True,
    steps: int = 20,
    rule: str = "midpoint",
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Integrated-gradient attribution of every unit at ``sites`` to each stimulus's score.

    Parameters
    ----------
    subject, battery
        The subject and the battery ``stimuli`` come from.
    stimuli
        Rows of ``battery.table`` (each one prompt).
    sites
        Site names (or :class:`Site` objects); each is attributed with the others intact.
        A site must see each stimulus once per forward pass (one row per stimulus).
    readout
        Readout whose differentiable form is scored (default: the subject's default).
    score
        Instead of a readout: ``score(subject, rows, battery) -> tensor [len(rows)]``.
    probability
        Attribute ``exp(score)`` (the answer's probability, as Dai et al.) rather than
        the score itself (a log-probability for neuroprobe's readouts).
    steps, rule
        Riemann sum over ``alpha`` (see the module docstring).
    batch_size
        Rows per forward pass (stimuli × steps); at least one stimulus with all its steps.

    Returns
    -------
    dict
        Site name -> ``float64 [n_stimuli, n_units]`` attributions, rows in ``stimuli`` order.
    """
    a = alphas(steps, rule)
    site_objs = resolve_sites(subject, sites)
    if score is None:
        name = readout or subject.default_readout
        prepare = getattr(subject, "prepare_readout", None)
        if prepare is not None:  # readout state (prototypes) from the intact model
            prepare(battery, name)

        def score(subj: Subject, rows: pd.DataFrame, bat: "Battery") -> torch.Tensor:
            return subj.readout_tensor(rows, bat, name)

    rows_all = stimuli.reset_index(drop=True)
    n, m = len(rows_all), len(a)
    per_pass = max(1, int(batch_size) // m)
    out: dict[str, np.ndarray] = {}
    for site in site_objs:
        result: np.ndarray | None = None
        for start in range(0, n, per_pass):
            rows = rows_all.iloc[start : start + per_pass]
            got = _site_pass(subject, battery, rows, site, a, score, probability)
            if result is None:
                result = np.zeros((n, got.shape[1]), dtype=np.float64)
            result[start : start + len(rows)] = got
        out[site.name] = result if result is not None else np.zeros((0, 0))
    return out


def _site_pass(subject: Subject, battery: "Battery", rows: pd.DataFrame, site: Site, a: np.ndarray, score: Score,
               probability: bool) -> np.ndarray:
    """Attributions ``[len(rows), n_units]`` at one site: the steps as replicas along the batch."""
    b, m = len(rows), len(a)
    reps = pd.concat([rows] * m, ignore_index=True)  # replica-major: rows k*b .. k*b+b-1 take alpha_k
    scale = torch.as_tensor(np.repeat(a, b))
    held: dict[str, torch.Tensor] = {}

    def edit(x: torch.Tensor, s: Site) -> torch.Tensor:
        if "y" in held:
            raise NeuroprobeError(f"site {s.name!r} fired twice while the score was computed; integrated gradients "
                                  f"need a score that runs the site once (prepare the readout first).")
        if x.shape[0] != len(reps):
            raise NeuroprobeError(
                f"site {s.name!r} saw {x.shape[0]} rows in a forward pass of {len(reps)} stimuli; integrated "
                f"gradients need a site that sees each stimulus once (choose a site of the stimuli's own stream)."
            )
        f = scale.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        y = (x.detach() * f).requires_grad_(True)
        held["x"], held["y"] = x.detach(), y
        return y

    with torch.inference_mode(False), torch.enable_grad(), Electrodes(subject.model, [site], read=False, edits={site.name: edit}):
        with shared_state():  # the steps are not lesion replicas: prompts and references encoded once
            value = score(subject, reps, battery)
        if "y" not in held:
            raise NeuroprobeError(f"site {site.name!r} never fired for these stimuli; choose a site the battery reaches.")
        value = value.float()
        if probability:
            value = value.exp()
        if value.shape != (len(reps),):
            raise NeuroprobeError(f"the score gave {tuple(value.shape)} values for {len(reps)} stimuli.")
        if not value.requires_grad:
            raise NeuroprobeError(f"the score does not depend on site {site.name!r}; nothing to attribute.")
        (grad,) = torch.autograd.grad(value.sum(), held["y"], allow_unused=True)
    x = held["x"]
    if grad is None:
        grad = torch.zeros_like(x)
    mean_grad = grad.double().reshape(m, b, *grad.shape[1:]).mean(0)  # the Riemann sum's average gradient
    attr = (x[:b].double() * mean_grad).sum(1)  # every replica holds the same intact x; sum over tokens
    return attr.cpu().numpy()


def knowledge_neurons(
    attributions: Mapping[str, np.ndarray],
    facts: Sequence[Any],
    *,
    threshold: float = 0.2,
    share: float = 0.7,
    min_prompts: int = 3,
    target: tuple[float, float] | None = (2.0, 5.0),
    max_adjust: int = 6,
    step: float = 0.05,
) -> tuple[dict[Any, dict[str, np.ndarray]], float]:
    """Dai et al.'s knowledge neurons of each fact from per-prompt attributions.

    Parameters
    ----------
    attributions
        Site -> ``[n_prompts, n_units]`` (from :func:`integrated_gradients`).
    facts
        The fact of each prompt (``n_prompts`` labels; prompts of a fact are its paraphrases).
    threshold
        A prompt keeps the units whose attribution is above ``threshold`` times its
        largest attribution over every site (units with a positive maximum only).
    share
        A fact keeps the units kept by at least ``share`` of its prompts.
    min_prompts
        ... and by at least this many prompts (or all of a fact's prompts, if fewer).
    target
        Adjust ``share`` by ``step`` (up to ``max_adjust`` times) until the mean number of
        knowledge neurons per fact lies in ``target`` (``None``: no adjustment).

    Returns
    -------
    neurons, share
        Fact -> ``{site: unit indices}`` (sites without neurons omitted), and the share used.
    """
    names = list(attributions)
    if not names:
        raise NeuroprobeError("knowledge neurons need attributions at one site at least.")
    facts = np.asarray(list(facts), dtype=object)
    widths = [attributions[s].shape[1] for s in names]
    flat = np.concatenate([np.asarray(attributions[s], dtype=np.float64) for s in names], axis=1)
    if len(flat) != len(facts):
        raise NeuroprobeError(f"{len(facts)} fact labels for {len(flat)} prompts; give one per prompt.")
    top = flat.max(axis=1, keepdims=True)
    kept = (flat > threshold * top) & (top > 0)  # the coarse neurons of each prompt
    bounds = np.cumsum([0] + widths)
    order = list(dict.fromkeys(facts.tolist()))
    counts = {f: kept[facts == f].sum(axis=0) for f in order}
    sizes = {f: int((facts == f).sum()) for f in order}

    def choose(p: float) -> dict[Any, np.ndarray]:
        return {f: np.flatnonzero(counts[f] >= max(p * sizes[f], min(min_prompts, sizes[f]))) for f in order}

    p = float(share)
    chosen = choose(p)
    if target is not None:
        for _ in range(int(max_adjust)):
            mean = float(np.mean([len(v) for v in chosen.values()]))
            if mean < target[0] and p > step:
                p = round(max(p - step, step), 10)
            elif mean > target[1] and p < 1.0:
                p = round(min(p + step, 1.0), 10)  # rounded: 0.7 + 6 * 0.05 is 1.0, not 1.0000000000000002
            else:
                break
            chosen = choose(p)
    out: dict[Any, dict[str, np.ndarray]] = {}
    for f, idx in chosen.items():
        per: dict[str, np.ndarray] = {}
        for k, s in enumerate(names):
            units = idx[(idx >= bounds[k]) & (idx < bounds[k + 1])] - bounds[k]
            if len(units):
                per[s] = units.astype(np.int64)
        out[f] = per
    return out, p
