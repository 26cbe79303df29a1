"""A sparse autoencoder (SAE): a dictionary whose features can be a site's units.

One inference-time model covers the architectures SAELens and sparsify save for
plain (non-transcoding) autoencoders, in SAELens' conventions::

    sae_in  = x - b_dec · apply_b_dec_to_input
    pre     = sae_in @ W_enc + b_enc                 (· ‖W_dec_i‖ with rescale_acts_by_decoder_norm)
    f       = act(pre)            standard: ReLU; jumprelu: pre · [pre > threshold];
                                  topk: ReLU of the k largest, zero elsewhere
    x_hat   = f @ W_dec + b_dec                      (f / ‖W_dec_i‖ with rescale_acts_by_decoder_norm)
    error   = x - x_hat

``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``.  Feature ``i``'s
**decoder contribution** to ``x`` is ``f_i · d_i`` with ``d_i`` row ``i`` of
:meth:`SparseAutoencoder.directions` (``W_dec``, or its rows over their norms when
activations are rescaled); ``x = Σ_i f_i d_i + b_dec + error`` exactly, which is what a
feature lesion edits (:mod:`neuroprobe.sae.sites`).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from neuroprobe.errors import NeuroprobeError

#: inference architectures understood (SAELens names)
ARCHITECTURES = ("standard", "jumprelu", "topk")


class SparseAutoencoder(torch.nn.Module):
    """An SAE at inference time (see the module docstring for the equations).

    Parameters
    ----------
    W_enc, b_enc, W_dec, b_dec
        ``[d_in, d_sae]``, ``[d_sae]``, ``[d_sae, d_in]``, ``[d_in]``.
    architecture
        ``standard`` (ReLU), ``jumprelu`` (needs ``threshold``) or ``topk`` (needs ``k``).
    threshold
        JumpReLU thresholds ``[d_sae]``.
    k
        TopK: features kept per token.
    apply_b_dec_to_input
        Subtract ``b_dec`` from the input before encoding (SAELens' default; sparsify always does).
    rescale_acts_by_decoder_norm
        TopK SAEs of SAELens: pre-activations are multiplied by the decoder row norms
        and activations divided by them before decoding.
    meta
        Free-form provenance (``hook_name``, ``model_name``, where it was loaded from...).
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        architecture: str = "standard",
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        rescale_acts_by_decoder_norm: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise NeuroprobeError(f"SAE architecture {architecture!r} is not supported; neuroprobe reads {', '.join(ARCHITECTURES)}.")
        d_in, d_sae = W_enc.shape
        shapes = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)), "b_dec": (b_dec, (d_in,))}
        if architecture == "jumprelu":
            if threshold is None:
                raise NeuroprobeError("a jumprelu SAE needs its threshold tensor.")
            shapes["threshold"] = (threshold, (d_sae,))
        for name, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise NeuroprobeError(f"SAE tensor {name} has shape {tuple(t.shape)}, not {want} (W_enc is {tuple(W_enc.shape)}).")
        if architecture == "topk" and not (k and 0 < int(k) <= d_sae):
            raise NeuroprobeError(f"a topk SAE needs k between 1 and d_sae={d_sae}, not {k!r}.")
        self.W_enc = torch.nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec.detach().clone(), requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        self.threshold = (torch.nn.Parameter(threshold.detach().clone(), requires_grad=False)
                          if threshold is not None and architecture == "jumprelu" else None)
        self.architecture = architecture
        self.k = int(k) if architecture == "topk" else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.meta: dict[str, Any] = dict(meta or {})
        self._cast: dict[tuple[Any, Any], dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------- shape
    @property
    def d_in(self) -> int:
        """Width of the activation it reads (the site's units)."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    def _weights(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weights on ``like``'s device and dtype (cached per device and dtype)."""
        key = (like.device, like.dtype)
        if key not in self._cast:
            names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.threshold is not None else [])
            w = {n: getattr(self, n).detach().to(like.device, like.dtype) for n in names}
            norms = self.W_dec.detach().double().norm(dim=-1).clamp_min(1e-12)
            w["norm"] = norms.to(like.device, like.dtype)
            w["dirs"] = ((self.W_dec.detach().double() / norms[:, None]) if self.rescale_acts_by_decoder_norm
                         else self.W_dec.detach().double()).to(like.device, like.dtype)
            self._cast[key] = w
        return self._cast[key]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise NeuroprobeError(f"the SAE reads {self.d_in} units but the activation has {x.shape[-1]}; "
                                  f"it was trained on another site (or model).")

    # -------------------------------------------------------------- compute
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``pre`` of the module docstring, in ``x``'s dtype."""
        self._check(x)
        w = self._weights(x)
        sae_in = x - w["b_dec"] if self.apply_b_dec_to_input else x
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if self.rescale_acts_by_decoder_norm:
            pre = pre * w["norm"]
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation function applied to pre-activations."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return pre * (pre > self._weights(pre)["threshold"]).to(pre.dtype)
        values, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of activations ``x`` ``[..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def directions(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder directions ``[d_sae, d_in]``: feature ``i`` adds ``f_i · directions[i]`` to the reconstruction."""
        if like is None:
            like = self.W_dec.detach()
        return self._weights(like)["dirs"]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat = f @ directions + b_dec``."""
        w = self._weights(f)
        return f @ w["dirs"] + w["b_dec"]

    def contribution(self, f: torch.Tensor) -> torch.Tensor:
        """``f @ directions`` (no bias): what features ``f`` add to the site's activation."""
        return f @ self._weights(f)["dirs"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - the reconstruction
        return self.decode(self.encode(x))

    # ------------------------------------------------------------ identity
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors as SAELens names them (``threshold`` only for jumprelu)."""
        out = {"W_enc": self.W_enc.detach(), "b_enc": self.b_enc.detach(), "W_dec": self.W_dec.detach(),
               "b_dec": self.b_dec.detach()}
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach()
        return out

    def content_hash(self) -> str:
        """SHA-256 of the architecture, its settings and every tensor's bytes (the SAE's identity in provenance)."""
        h = hashlib.sha256()
        h.update(repr((self.architecture, self.k, self.apply_b_dec_to_input, self.rescale_acts_by_decoder_norm)).encode())
        for name, t in sorted(self.state().items()):
            t = t.contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @property
    def source(self) -> str:
        """Where it was loaded from (empty for an SAE made in memory)."""
        return str(self.meta.get("path", ""))

    def describe(self) -> str:
        """One line: architecture, sizes, sparsity setting."""
        extra = f", k={self.k}" if self.k else ""
        return f"{self.architecture} SAE {self.d_in} -> {self.d_sae} features{extra}"

    def __repr__(self) -> str:
        return f"<{self.describe()}{' from ' + self.source if self.source else ''}>"
