"""PPLM steering (Dathathri et al. 2020) on the transformers cache API.

The cache goes in by the keyword the installed transformers takes (``cache=`` from 5.x,
``past_key_values=`` before; :func:`cache_keyword`) as a ``DynamicCache``, and comes out
of the output's ``cache`` (or ``past_key_values``) field, so no deprecated path is used.

For every generated token, PPLM takes a few gradient steps on a perturbation ΔH of
every layer's past keys and values so that the next-token distribution moves toward
an attribute — a bag of words (loss −log Σ_{w∈bag} p(w)) and/or a discriminator's
class (cross-entropy of a linear head over the mean last hidden state) — while a KL
term keeps it near the unperturbed distribution::

    loss = attribute(p_pert) + kl_scale · KL(p_pert ‖ p_unpert)
    ΔH_l ← ΔH_l − stepsize · m ⊙ ∇_l / ‖m ⊙ ∇_l‖^γ        (per layer l, window mask m)

The next token is then sampled from the fusion p ∝ p_pert^gm · p_unpert^(1−gm)
restricted to its top k entries.  The perturbed keys and values stay in the cache,
so the push accumulates along the continuation, as in PPLM.

The weights are never touched: gradients are taken only with respect to the
perturbation (``torch.autograd.grad``), inside local ``torch.enable_grad()`` /
``torch.inference_mode(False)`` blocks, with every parameter's ``requires_grad``
switched off for the call and restored afterwards.  Steering registers no hook, so
it composes with :class:`neuroprobe.electrodes.Electrodes` (record the steered run,
or steer a lesioned subject): every forward pass goes through ``model(...)``.

Differences from uber-research/PPLM's ``run_pplm.py``, on purpose:

* the window (``window_length > 0``) covers the *most recent* positions of the
  past, as the paper describes (the reference masks the oldest ones);
* the unperturbed distribution is computed incrementally with its own cache instead
  of re-running the whole sequence each step (same numbers, less work);
* the fused top-k distribution is always renormalised;
* a bag word of several tokens counts, with the probability of the whole word (the
  reference keeps single-token words only; ``multi_token=False`` restores that), and
  several bags are steered toward together with the reference's ``Σ −log mass`` loss.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from neuroprobe.errors import NeuroprobeError
from neuroprobe.steering.attributes import (
    BagOfWords,
    ClassificationHead,
    Discriminator,
    bag_from_words,
    load_bag,
    load_discriminator,
)

Bag = str | BagOfWords | Sequence[str]

#: Added to probabilities at or below it before taking logs (PPLM's constant).
SMALL_CONST = 1e-15

Past = list[tuple[torch.Tensor, torch.Tensor]]
OnForward = Callable[[str], None]


@dataclass(frozen=True)
class PPLMHyperparameters:
    """PPLM's knobs, with the paper's defaults.

    Attributes
    ----------
    stepsize
        Step size α of the normalised gradient step.
    gamma
        Exponent γ of the gradient-norm normalisation.
    gm_scale
        Fusion weight: p ∝ p_pert^gm · p_unpert^(1−gm).
    kl_scale
        Weight of KL(p_pert ‖ p_unpert) in the loss (0 switches it off).
    num_iterations
        Gradient steps per generated token.
    top_k
        Sample among the k most probable tokens (0: the whole vocabulary).
    temperature
        Divides the perturbed logits before the softmax.
    window_length
        Perturb only the most recent positions of the past (0: all of them).
    decay
        Weigh the window linearly, from 1/window at its oldest to 1 at its newest.
    horizon_length
        Soft future tokens fed to the discriminator loss.
    grad_length
        Stop perturbing after this many generated tokens.
    sample
        Sample (True) or take the most probable token (False).
    prepend_bos
        Put the tokenizer's BOS token (GPT-2: ``<|endoftext|>``) before the prompt, as PPLM does.
    """

    stepsize: float = 0.02
    gamma: float = 1.5
    gm_scale: float = 0.9
    kl_scale: float = 0.01
    num_iterations: int = 3
    top_k: int = 10
    temperature: float = 1.0
    window_length: int = 0
    decay: bool = False
    horizon_length: int = 1
    grad_length: int = 10000
    sample: bool = True
    prepend_bos: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.stepsize >= 0, "stepsize must be >= 0"),
            (0.0 <= self.gm_scale <= 1.0, "gm_scale must be within [0, 1]"),
            (self.kl_scale >= 0, "kl_scale must be >= 0"),
            (self.num_iterations >= 0, "num_iterations must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 means no top-k filter)"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.window_length >= 0, "window_length must be >= 0 (0 means the whole past)"),
            (self.horizon_length >= 1, "horizon_length must be >= 1"),
            (self.grad_length >= 0, "grad_length must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise NeuroprobeError(f"PPLM hyperparameter out of range: {message}.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "PPLMHyperparameters":
        """Build from keyword arguments, rejecting unknown names with a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise NeuroprobeError(
                f"unknown PPLM hyperparameter {', '.join(unknown)}; use {', '.join(sorted(known))}."
            )
        return cls(**kwargs)


@dataclass
class SteeringResult:
    """What :func:`steer` returns.

    Attributes
    ----------
    prompt
        The prompt text.
    prompt_ids
        Its token ids (with BOS when it was prepended).
    steered_ids, unsteered_ids
        Generated token ids (continuation only).
    steered_text, unsteered_text
        Decoded continuations.
    mass
        One row per run and step: ``run`` (``steered``/``unsteered``), ``step``,
        ``token_id``, ``token``, ``in_bag`` (the token is a bag word or a multi-token
        word's first piece), ``bag_mass`` (Σ over the bags' words of the probability of
        the whole word: its first piece from the distribution the run samples from — the
        fusion for the steered run, the model's softmax for the unsteered one — and its
        further pieces, teacher-forced, from the (perturbed) model that run uses),
        ``bag_mass_unpert`` (the unperturbed model's mass at the same context),
        ``attribute_loss`` (the attribute loss at the last PPLM iteration; NaN when none
        ran) and, with several bags, ``bag_mass[<name>]`` per bag.
    bag
        The first resolved bag of words, if any.
    discriminator
        Name of the discriminator, if any, and ``class_id`` its target class.
    hyperparameters
        The hyperparameters used.
    seed
        The sampling seed.
    """

    prompt: str
    prompt_ids: list[int]
    steered_ids: list[int]
    unsteered_ids: list[int]
    steered_text: str
    unsteered_text: str
    mass: pd.DataFrame
    bag: BagOfWords | None
    discriminator: str | None
    class_id: int | None
    hyperparameters: dict[str, Any]
    seed: int
    bags: list[BagOfWords] = field(default_factory=list)

    def word_counts(self) -> pd.DataFrame:
        """How often each bag's words occur in each run's text (rows ``steered``/``unsteered``, one column per bag)."""
        texts = {"steered": self.steered_text, "unsteered": self.unsteered_text}
        return pd.DataFrame({b.name: {run: sum(t.count(w) for w in b.words) for run, t in texts.items()}
                             for b in self.bags})

    def mean_mass(self) -> pd.Series:
        """Mean bag probability mass per run (index ``steered``, ``unsteered``)."""
        return self.mass.groupby("run")["bag_mass"].mean()

    @property
    def mass_gain(self) -> float:
        """Mean bag mass of the steered run minus that of the unsteered run."""
        means = self.mean_mass()
        return float(means.get("steered", np.nan) - means.get("unsteered", np.nan))


# ----------------------------------------------------------- pure pieces (tested)
def kl_term(probs: torch.Tensor, unpert_probs: torch.Tensor, kl_scale: float) -> torch.Tensor:
    """PPLM's KL term ``kl_scale · Σ p log(p / q)`` with p the perturbed distribution.

    Probabilities at or below :data:`SMALL_CONST` are raised by it first (both sides),
    so the logarithm stays finite; the correction carries no gradient.
    """
    q = unpert_probs.detach()
    q = q + SMALL_CONST * (q <= SMALL_CONST).to(q.dtype)
    p = probs + (SMALL_CONST * (probs <= SMALL_CONST).to(probs.dtype)).detach()
    return kl_scale * (p * (p / q).log()).sum()


def bag_loss(probs: torch.Tensor, bag_ids: torch.Tensor) -> torch.Tensor:
    """Bag-of-words loss ``−log Σ_{w∈bag} p(w)`` (summed over the batch)."""
    return -torch.log(probs[..., bag_ids].sum())


def fuse(pert_probs: torch.Tensor, unpert_probs: torch.Tensor, gm_scale: float) -> torch.Tensor:
    """Geometric-mean fusion ``p ∝ p_pert^gm · p_unpert^(1−gm)``, normalised over the last axis."""
    fused = pert_probs.pow(gm_scale) * unpert_probs.pow(1.0 - gm_scale)
    return fused / fused.sum(dim=-1, keepdim=True)


def top_k_probs(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest probabilities (0: all), zero the others, renormalise."""
    if k <= 0 or k >= probs.shape[-1]:
        return probs / probs.sum(dim=-1, keepdim=True)
    idx = torch.topk(probs, k, dim=-1).indices
    kept = torch.zeros_like(probs).scatter(-1, idx, probs.gather(-1, idx))
    return kept / kept.sum(dim=-1, keepdim=True)


def window_mask(length: int, window_length: int, decay: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Weights over the past positions, shape ``[length]``.

    All ones when ``window_length`` is 0 or covers the whole past; otherwise ones (or,
    with ``decay``, ``1/W, 2/W, …, 1``) on the ``W`` most recent positions and zeros before.
    """
    mask = torch.ones(length, device=device)
    if 0 < window_length < length:
        mask.zero_()
        weights = (
            torch.arange(1, window_length + 1, device=device, dtype=mask.dtype) / window_length
            if decay
            else torch.ones(window_length, device=device)
        )
        mask[length - window_length :] = weights
    return mask


# ----------------------------------------------------------------- model plumbing
@functools.lru_cache(maxsize=None)
def cache_keyword(model_class: type) -> str:
    """The keyword a model's ``forward`` takes its cache by.

    ``cache`` from transformers 5.x on (``past_key_values=`` is deprecated there and goes
    away in 5.40), ``past_key_values`` before.
    """
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_cache(past: Past) -> DynamicCache | None:
    """A :class:`~transformers.DynamicCache` holding ``past`` (one ``(keys, values)`` per layer), or ``None``."""
    if not past:
        return None
    try:
        return DynamicCache(ddp_cache_data=past)
    except TypeError:  # transformers < 4.56 builds a DynamicCache from the legacy layout
        return DynamicCache.from_legacy_cache(tuple(past))


def _past_of(cache: Any) -> Past:
    """One ``(keys, values)`` per layer from a cache object (any transformers version) or legacy tuples."""
    if isinstance(cache, (tuple, list)) and all(isinstance(layer, (tuple, list)) for layer in cache):
        return [(layer[0], layer[1]) for layer in cache]
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    raise NeuroprobeError(
        f"PPLM steering needs a model whose cache holds keys and values per layer, not {type(cache).__name__}; "
        f"steer a GPT-2-style causal language model."
    )


def past_from_output(out: Any) -> Past:
    """The past of a forward pass's output, read without touching deprecated attributes."""
    keys = out.keys()
    cache = out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None
    if cache is None:
        raise NeuroprobeError("the model returned no cache; steer a causal language model that supports use_cache.")
    return _past_of(cache)


def call_with_past(model: torch.nn.Module, past: Past, **inputs: Any) -> Any:
    """``model(**inputs)`` continuing from ``past``, through the cache API of the installed transformers."""
    return model(**inputs, **{cache_keyword(type(model)): make_cache(past)}, use_cache=True)


def _forward(
    model: torch.nn.Module,
    past: Past,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    hidden: bool = False,
    phase: str = "",
    on_forward: OnForward | None = None,
) -> tuple[torch.Tensor, Past, torch.Tensor | None]:
    """One forward pass through ``model(...)`` (so electrodes see it).

    Returns the last position's logits ``[B, V]``, the new past, and the final
    hidden states ``[B, T, E]`` when ``hidden``.
    """
    if on_forward is not None:
        on_forward(phase)
    out = call_with_past(model, past, input_ids=input_ids, inputs_embeds=inputs_embeds, output_hidden_states=hidden)
    last_hidden = out.hidden_states[-1] if hidden else None
    return out.logits[:, -1, :], past_from_output(out), last_hidden


# ------------------------------------------------------------------- bags as tensors
@dataclass
class BagTensors:
    """Several bags of words resolved to tensors, scored together.

    Single-token words are read off the next-token distribution; each multi-token
    word ``t1 … tn`` gets ``p(t1) · Π p(ti | t<i)``, its continuation pieces scored in one
    batched teacher-forced pass over the words (all bags share it).
    """

    names: list[str]
    single: list[torch.Tensor]
    multi: list[torch.Tensor]
    union_single: torch.Tensor
    union_multi: torch.Tensor
    first: torch.Tensor
    cont_in: torch.Tensor
    cont_tgt: torch.Tensor
    cont_mask: torch.Tensor
    starts: set[int] = field(default_factory=set)

    @classmethod
    def build(cls, bags: Sequence[BagOfWords], device: torch.device | str = "cpu") -> "BagTensors":
        """Tensors for ``bags`` on ``device``."""
        table: dict[tuple[int, ...], int] = {}
        singles, multis = [], []
        for bag in bags:
            s_ids, m_idx = [], []
            for pieces in bag.pieces:
                if len(pieces) == 1:
                    s_ids.append(pieces[0])
                else:
                    m_idx.append(table.setdefault(tuple(pieces), len(table)))
            singles.append(torch.tensor(sorted(set(s_ids)), dtype=torch.long, device=device))
            multis.append(torch.tensor(sorted(set(m_idx)), dtype=torch.long, device=device))
        seqs = list(table)
        width = max((len(q) - 1 for q in seqs), default=0)
        cont_in = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        cont_tgt = torch.zeros_like(cont_in)
        cont_mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=device)
        for i, q in enumerate(seqs):
            n = len(q) - 1
            cont_in[i, :n] = torch.tensor(q[:-1])
            cont_tgt[i, :n] = torch.tensor(q[1:])
            cont_mask[i, :n] = True
        names: list[str] = []
        for bag in bags:  # unique column names
            name, k = bag.name, 2
            while name in names:
                name, k = f"{bag.name}-{k}", k + 1
            names.append(name)
        return cls(
            names=names, single=singles, multi=multis,
            union_single=torch.unique(torch.cat(singles)) if singles else torch.zeros(0, dtype=torch.long, device=device),
            union_multi=torch.arange(len(seqs), device=device),
            first=torch.tensor([q[0] for q in seqs], dtype=torch.long, device=device),
            cont_in=cont_in, cont_tgt=cont_tgt, cont_mask=cont_mask,
            starts={int(i) for s in singles for i in s.tolist()} | {q[0] for q in seqs},
        )

    @property
    def n_multi(self) -> int:
        """Number of distinct multi-token words."""
        return int(self.first.numel())

    def continuation_logprob(self, model: torch.nn.Module, past_full: Past, on_forward: OnForward | None = None) -> torch.Tensor:
        """``Σ_i log p(t_i | context, t_<i)`` over each multi-token word's pieces after the first, ``[M]``.

        ``past_full`` is the past including the position whose logits give the first piece.
        """
        m = self.n_multi
        if on_forward is not None:
            on_forward("words")
        past = [(k.expand(m, *k.shape[1:]), v.expand(m, *v.shape[1:])) for k, v in past_full]
        out = call_with_past(model, past, input_ids=self.cont_in)
        logp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, self.cont_tgt.unsqueeze(-1)).squeeze(-1)
        return (logp * self.cont_mask).sum(dim=1)

    def masses(
        self,
        model: torch.nn.Module,
        past_full: Past,
        first_probs: torch.Tensor,
        on_forward: OnForward | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each bag's probability mass and that of their union (scalars; differentiable when the inputs are).

        ``first_probs`` ``[1, V]`` is the next-token distribution the first pieces are read from.
        """
        probs = first_probs[0]
        words = None
        if self.n_multi:
            words = probs[self.first] * self.continuation_logprob(model, past_full, on_forward).exp().to(probs.dtype)
        per_bag = []
        for single, multi in zip(self.single, self.multi):
            mass = probs[single].sum()
            if words is not None and multi.numel():
                mass = mass + words[multi].sum()
            per_bag.append(mass)
        union = probs[self.union_single].sum() + (words.sum() if words is not None else 0.0)
        return per_bag, union

    def loss(self, model: torch.nn.Module, past_full: Past, probs: torch.Tensor, on_forward: OnForward | None = None) -> torch.Tensor:
        """PPLM's bag loss over several bags: ``Σ_b −log mass_b``."""
        if not self.n_multi and len(self.single) == 1:
            return bag_loss(probs, self.single[0])  # PPLM's own form, bit for bit
        per_bag, _ = self.masses(model, past_full, probs, on_forward)
        return -sum(torch.log(m) for m in per_bag)


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter, restored on exit."""
    saved_grad: list[torch.nn.Parameter] = []
    saved_mode: list[tuple[torch.nn.Module, bool]] = []
    try:
        for module in modules:
            if module is None:
                continue
            for sub in module.modules():
                saved_mode.append((sub, sub.training))
                sub.training = False
            for p in module.parameters():
                if p.requires_grad:
                    saved_grad.append(p)
                    p.requires_grad_(False)
        yield
    finally:
        for p in saved_grad:
            # a parameter made under inference mode may only regain requires_grad there
            with torch.inference_mode() if p.is_inference() else contextlib.nullcontext():
                p.requires_grad_(True)
        for sub, flag in saved_mode:
            sub.training = flag


def _hidden_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_embd", "hidden_size", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class _Attribute:
    bags: BagTensors | None
    head: ClassificationHead | None
    class_id: int | None

    @property
    def bag_only(self) -> bool:
        return self.bags is not None and self.head is None


# --------------------------------------------------------------- the PPLM update
def perturb_past(
    model: torch.nn.Module,
    past: Past,
    last: torch.Tensor,
    unpert_probs: torch.Tensor,
    hp: PPLMHyperparameters,
    *,
    bag_ids: torch.Tensor | None = None,
    head: ClassificationHead | None = None,
    class_id: int | None = None,
    bags: BagTensors | None = None,
    unpert_past_full: Past | None = None,
    hidden_sum: torch.Tensor | None = None,
    n_tokens: int = 0,
    grad_norms: list[torch.Tensor] | None = None,
    stepsize: float | None = None,
    on_forward: OnForward | None = None,
) -> tuple[Past, list[torch.Tensor] | None, float]:
    """Run PPLM's gradient iterations for one token and return the perturbation.

    Parameters
    ----------
    model
        The causal language model (parameters should not require grad).
    past
        Keys and values of the context before ``last`` (one ``(k, v)`` per layer).
    last
        The last token ``[1, 1]``, whose forward pass gives the next-token distribution.
    unpert_probs
        The unperturbed next-token distribution ``[1, V]`` (for the KL term).
    hp
        Hyperparameters.
    bag_ids, head, class_id
        The attribute: a bag's token ids and/or a discriminator head and target class.
    bags
        Bags of words with multi-token words and/or several bags (instead of ``bag_ids``).
    unpert_past_full, hidden_sum, n_tokens
        For the discriminator: the unperturbed past including ``last``, the sum of the
        unperturbed final hidden states before ``last`` ``[1, E]``, and the number of
        tokens so far (including ``last``).
    grad_norms
        Running gradient norms per layer (bag-only PPLM keeps their maximum over
        iterations and tokens); pass what the previous call returned.
    stepsize
        Override ``hp.stepsize`` (e.g. 0 after ``grad_length``).

    Returns
    -------
    deltas, grad_norms, attribute_loss
        One ``(Δk, Δv)`` per layer (detached), the updated norms, and the attribute
        loss (without the KL term) at the last iteration.
    """
    alpha = hp.stepsize if stepsize is None else stepsize
    length = past[0][0].shape[-2]
    mask = window_mask(length, hp.window_length, hp.decay, device=last.device).view(1, 1, length, 1)
    deltas: Past = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in past]
    attribute_loss = float("nan")
    if bags is None and bag_ids is not None:
        bags = BagTensors.build([BagOfWords("bag", tuple(map(str, bag_ids.tolist())),
                                            tuple((int(i),) for i in bag_ids.tolist()))], device=bag_ids.device)
    bag_only = bags is not None and head is None
    for _ in range(hp.num_iterations):
        leaves = [(dk.clone().requires_grad_(True), dv.clone().requires_grad_(True)) for dk, dv in deltas]
        with torch.enable_grad():
            shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, leaves)]
            logits, shifted_full, hidden = _forward(
                model, shifted, input_ids=last, hidden=head is not None, phase="perturbation", on_forward=on_forward
            )
            probs = F.softmax(logits, dim=-1)
            loss = probs.new_zeros(())
            if bags is not None:
                loss = loss + bags.loss(model, shifted_full, probs, on_forward)
            if head is not None:
                loss = loss + _discriminator_loss(
                    model, probs, hidden, head, class_id, unpert_past_full, hidden_sum, n_tokens, hp, on_forward
                )
            attribute_loss = float(loss.detach())
            if hp.kl_scale > 0:
                loss = loss + kl_term(probs, unpert_probs, hp.kl_scale)
            flat = [t for pair in leaves for t in pair]
            grads = torch.autograd.grad(loss, flat)
        with torch.no_grad():
            norms = []
            for layer in range(len(past)):
                gk, gv = grads[2 * layer] * mask, grads[2 * layer + 1] * mask
                norm = torch.sqrt(gk.pow(2).sum() + gv.pow(2).sum()) + SMALL_CONST
                if bag_only and grad_norms is not None:
                    norm = torch.maximum(grad_norms[layer], norm)
                norms.append(norm)
            grad_norms = norms
            deltas = [
                (dk - alpha * grads[2 * i] * mask / norms[i] ** hp.gamma,
                 dv - alpha * grads[2 * i + 1] * mask / norms[i] ** hp.gamma)
                for i, (dk, dv) in enumerate(deltas)
            ]
    return deltas, grad_norms, attribute_loss


def _discriminator_loss(
    model: torch.nn.Module,
    probs: torch.Tensor,
    hidden: torch.Tensor | None,
    head: ClassificationHead,
    class_id: int | None,
    unpert_past_full: Past | None,
    hidden_sum: torch.Tensor | None,
    n_tokens: int,
    hp: PPLMHyperparameters,
    on_forward: OnForward | None,
) -> torch.Tensor:
    """Cross-entropy of the head on the mean hidden state, with ``horizon_length`` soft future tokens."""
    assert hidden is not None and unpert_past_full is not None and class_id is not None
    accumulated = (hidden_sum if hidden_sum is not None else 0) + hidden[:, -1, :].detach()
    embeddings = model.get_input_embeddings().weight
    soft = probs.unsqueeze(1) @ embeddings  # [1, 1, E], differentiable through probs
    future = unpert_past_full
    for _ in range(hp.horizon_length):
        _, future, future_hidden = _forward(
            model, future, inputs_embeds=soft, hidden=True, phase="horizon", on_forward=on_forward
        )
        accumulated = accumulated + future_hidden.sum(dim=1)
    prediction = head(accumulated / (n_tokens + hp.horizon_length))
    target = torch.full((prediction.shape[0],), class_id, dtype=torch.long, device=prediction.device)
    return F.cross_entropy(prediction, target)


# ------------------------------------------------------------------- generation
def _sample(probs: torch.Tensor, hp: PPLMHyperparameters, generator: torch.Generator) -> torch.Tensor:
    filtered = top_k_probs(probs, hp.top_k)
    if hp.sample:
        return torch.multinomial(filtered, 1, generator=generator)
    return filtered.argmax(dim=-1, keepdim=True)


def _masses(bags: BagTensors | None, model: torch.nn.Module, past_full: Past, probs: torch.Tensor,
            on_forward: OnForward | None) -> tuple[float, dict[str, float]]:
    """Union mass and per-bag masses (floats) at one step; NaN without bags."""
    if bags is None:
        return float("nan"), {}
    per_bag, union = bags.masses(model, past_full, probs, on_forward)
    return float(union), ({f"bag_mass[{n}]": float(m) for n, m in zip(bags.names, per_bag)} if len(per_bag) > 1 else {})


def _row(run: str, step: int, token: int, tokenizer: Any, bags: BagTensors | None, mass: tuple[float, dict[str, float]],
         mass_unpert: float, loss: float) -> dict[str, Any]:
    return {
        "run": run,
        "step": step,
        "token_id": token,
        "token": tokenizer.decode([token]),
        "in_bag": bags is not None and token in bags.starts,
        "bag_mass": mass[0],
        "bag_mass_unpert": mass_unpert,
        "attribute_loss": loss,
        **mass[1],
    }


def _unsteered(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    length: int,
    attr: _Attribute,
    hp: PPLMHyperparameters,
    generator: torch.Generator,
    on_forward: OnForward | None,
    tick: Callable[[], None],
) -> tuple[list[int], list[dict[str, Any]]]:
    past: Past = []
    if prompt_ids.shape[1] > 1:
        _, past, _ = _forward(model, [], input_ids=prompt_ids[:, :-1], phase="prompt", on_forward=on_forward)
    last = prompt_ids[:, -1:]
    tokens: list[int] = []
    rows: list[dict[str, Any]] = []
    for step in range(length):
        logits, past, _ = _forward(model, past, input_ids=last, phase="unsteered", on_forward=on_forward)
        probs = F.softmax(logits / hp.temperature, dim=-1)
        last = _sample(probs, hp, generator)
        token = int(last[0, 0])
        mass = _masses(attr.bags, model, past, probs, on_forward)
        rows.append(_row("unsteered", step, token, tokenizer, attr.bags, mass, mass[0], float("nan")))
        tokens.append(token)
        tick()
    return tokens, rows


def _steered(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    length: int,
    attr: _Attribute,
    hp: PPLMHyperparameters,
    generator: torch.Generator,
    on_forward: OnForward | None,
    tick: Callable[[], None],
) -> tuple[list[int], list[dict[str, Any]]]:
    need_hidden = attr.head is not None
    past: Past = []
    hidden_sum: torch.Tensor | None = None
    if prompt_ids.shape[1] > 1:
        _, past, hidden = _forward(
            model, [], input_ids=prompt_ids[:, :-1], hidden=need_hidden, phase="prompt", on_forward=on_forward
        )
        if hidden is not None:
            hidden_sum = hidden.sum(dim=1)
    unpert_past: Past = list(past)
    last = prompt_ids[:, -1:]
    grad_norms: list[torch.Tensor] | None = None
    tokens: list[int] = []
    rows: list[dict[str, Any]] = []
    for step in range(length):
        n_tokens = prompt_ids.shape[1] + step
        unpert_logits, unpert_past_full, unpert_hidden = _forward(
            model, unpert_past, input_ids=last, hidden=need_hidden, phase="unperturbed", on_forward=on_forward
        )
        unpert_probs = F.softmax(unpert_logits, dim=-1)
        loss = float("nan")
        alpha = hp.stepsize if step < hp.grad_length else 0.0
        if past and hp.num_iterations > 0 and alpha > 0:
            deltas, grad_norms, loss = perturb_past(
                model, past, last, unpert_probs, hp,
                bags=attr.bags, head=attr.head, class_id=attr.class_id,
                unpert_past_full=unpert_past_full, hidden_sum=hidden_sum, n_tokens=n_tokens,
                grad_norms=grad_norms, stepsize=alpha, on_forward=on_forward,
            )
            pert_past = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, deltas)]
        else:
            pert_past = past
        pert_logits, past, _ = _forward(model, pert_past, input_ids=last, phase="steered", on_forward=on_forward)
        pert_probs = F.softmax(pert_logits / hp.temperature, dim=-1)
        fused = fuse(pert_probs, unpert_probs, hp.gm_scale)
        last = _sample(fused, hp, generator)
        token = int(last[0, 0])
        # the fused distribution gives the first pieces, the perturbed model the rest of each word
        mass = _masses(attr.bags, model, past, fused, on_forward)
        mass_unpert = _masses(attr.bags, model, unpert_past_full, unpert_probs, on_forward)[0]
        rows.append(_row("steered", step, token, tokenizer, attr.bags, mass, mass_unpert, loss))
        tokens.append(token)
        unpert_past = unpert_past_full
        if unpert_hidden is not None:
            step_sum = unpert_hidden.sum(dim=1)
            hidden_sum = step_sum if hidden_sum is None else hidden_sum + step_sum
        tick()
    return tokens, rows


def language_model(subject: Any) -> Any:
    """The subject's causal LM with its head (``head_model`` when the registry split it off)."""
    lm = getattr(subject, "head_model", None) or subject.model
    get_head = getattr(lm, "get_output_embeddings", None)
    if getattr(subject, "tokenizer", None) is None or get_head is None or get_head() is None:
        raise NeuroprobeError(f"subject {getattr(subject, 'name', '?')!r} is not a causal language model with a tokenizer; "
                              f"steer --model pplm or gpt2.")
    return lm


def encode_prompt(tokenizer: Any, prompt: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of the prompt, with the tokenizer's BOS token first when asked and available."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [int(bos)] + ids
    if not ids:
        raise NeuroprobeError("the prompt is empty and the tokenizer has no BOS token; pass --prompt with some text.")
    return ids


def resolve_bags(bag: Bag | None, bags: Sequence[Bag] | None, tokenizer: Any, *, multi_token: bool = True) -> list[BagOfWords]:
    """Resolve ``bag`` and ``bags`` (names, files, word lists or :class:`BagOfWords`) against ``tokenizer``."""
    out: list[BagOfWords] = []
    for item in ([bag] if bag is not None else []) + list(bags or []):
        if isinstance(item, BagOfWords):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.append(bag_from_words(list(item), tokenizer, name="custom", multi_token=multi_token))
        else:
            out.append(load_bag(item, tokenizer, multi_token=multi_token))
    return out


def steer(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    bag: Bag | None = None,
    discriminator: str | Discriminator | ClassificationHead | None = None,
    class_label: str | int | None = None,
    length: int = 20,
    seed: int = 0,
    *,
    bags: Sequence[Bag] | None = None,
    multi_token: bool = True,
    progress: bool = False,
    on_forward: OnForward | None = None,
    **hyperparameters: Any,
) -> SteeringResult:
    """Generate a PPLM-steered and an unsteered continuation of ``prompt``.

    Parameters
    ----------
    model
        A GPT-2-style causal LM (``transformers``, with a key/value cache).
    tokenizer
        Its tokenizer.
    prompt
        The text to continue.
    bag
        A bag of words: packaged name (``"space"``, ``"kinship"``...), a file path, a
        list of words, or a :class:`BagOfWords`.
    discriminator
        ``"sentiment"``, ``"clickbait"``, ``"toxicity"``, a path to a head's state
        dict, or a head.
    class_label
        The discriminator's target class (name or index; default: the head's default).
    length
        Tokens to generate.
    seed
        Seed of the sampling generators (each run has its own, both seeded with it).
    bags
        More bags (each as ``bag``), steered toward together: the loss is PPLM's
        ``Σ_bags −log mass(bag)``.
    multi_token
        Score words of several tokens as whole words (default); ``False`` keeps only
        single-token words, PPLM's original rule.
    progress
        Show a progress bar.
    on_forward
        Called as ``on_forward(phase)`` before every forward pass, with phase one of
        ``prompt``, ``unperturbed``, ``perturbation``, ``horizon``, ``steered``,
        ``unsteered``, ``words`` (the teacher-forced pass over multi-token words): lets
        electrodes that are reading tell the passes apart.
    **hyperparameters
        See :class:`PPLMHyperparameters` (``stepsize=0.02, gamma=1.5, gm_scale=0.9,
        kl_scale=0.01, num_iterations=3, top_k=10`` ...).

    Returns
    -------
    SteeringResult
        Both continuations and the bags' probability mass per step.

    Notes
    -----
    Works while :class:`~neuroprobe.electrodes.Electrodes` are active on ``model``
    (reading or editing): steering itself registers no hook.  Gradient mode, thread
    count, parameters and their ``.grad`` are left as they were.
    """
    hp = PPLMHyperparameters.from_kwargs(**hyperparameters)
    if bag is None and not bags and discriminator is None:
        raise NeuroprobeError("steering needs an attribute: pass a bag of words (--bag) and/or a discriminator (--discrim).")
    if length < 1:
        raise NeuroprobeError(f"length must be at least 1 token, not {length}.")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise NeuroprobeError("the model has no parameters; pass a loaded language model.") from None

    resolved = resolve_bags(bag, bags, tokenizer, multi_token=multi_token)
    if resolved:
        emb = model.get_output_embeddings()
        vocab = emb.weight.shape[0] if emb is not None else None
        for b in resolved:
            if vocab is not None and max(max(p) for p in b.pieces) >= vocab:
                raise NeuroprobeError(f"bag {b.name!r} has token ids beyond the model's vocabulary; "
                                      f"use the subject's own tokenizer.")
    if discriminator is None and class_label is not None:
        raise NeuroprobeError("a class label needs a discriminator; pass --discrim too.")
    prompt_list = encode_prompt(tokenizer, prompt, hp.prepend_bos)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * length, desc="steer", unit="tok")

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    disc: Discriminator | None = None
    class_id: int | None = None
    try:
        # Every tensor of the call is made here, outside inference mode, so that a caller
        # inside torch.inference_mode() still gets a differentiable perturbation.
        with torch.inference_mode(False):
            if discriminator is not None:
                disc = load_discriminator(discriminator, device=device)
                class_id = disc.class_id(class_label)
                width = _hidden_size(model)
                if width is not None and disc.head.embed_size != width:
                    raise NeuroprobeError(
                        f"discriminator {disc.name!r} reads {disc.head.embed_size}-wide hidden states but the "
                        f"model's are {width} wide; use a head trained on this model (PPLM's heads are for GPT-2 medium)."
                    )
            prompt_ids = torch.tensor([prompt_list], dtype=torch.long, device=device)
            attr = _Attribute(
                bags=BagTensors.build(resolved, device) if resolved else None,
                head=disc.head if disc is not None else None,
                class_id=class_id,
            )
            with _frozen(model, attr.head), torch.no_grad():
                gen_u = torch.Generator(device=device).manual_seed(seed)
                unsteered_ids, rows_u = _unsteered(model, tokenizer, prompt_ids, length, attr, hp, gen_u, on_forward, tick)
                gen_s = torch.Generator(device=device).manual_seed(seed)
                steered_ids, rows_s = _steered(model, tokenizer, prompt_ids, length, attr, hp, gen_s, on_forward, tick)
    finally:
        if bar is not None:
            bar.close()

    mass = pd.DataFrame(rows_s + rows_u)
    return SteeringResult(
        prompt=prompt,
        prompt_ids=prompt_list,
        steered_ids=steered_ids,
        unsteered_ids=unsteered_ids,
        steered_text=tokenizer.decode(steered_ids),
        unsteered_text=tokenizer.decode(unsteered_ids),
        mass=mass,
        bag=resolved[0] if resolved else None,
        discriminator=disc.name if disc is not None else None,
        class_id=class_id,
        hyperparameters=asdict(hp),
        seed=seed,
        bags=resolved,
    )
