"""Pool a site's ``[B, T, U]`` activations into one response per stimulus.

Padding is masked in every pooling.  ``concept-token`` averages the tokens of the
stimulus's concept word; a stimulus without such tokens (an image, a text that
never names the concept) gets NaN, so it is never silently replaced by another
pooling.  Streams without concept masks (image patches, regions) fall back to
``mean``; this is recorded in the site's ``pooling`` attribute.
"""
from __future__ import annotations

import torch

__all__ = ["pool", "BatchPooler", "MaskMismatch"]


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens as one batched matmul (no [B, T, U] temporary)."""
    return torch.bmm(mask.to(x.dtype).unsqueeze(1), x).squeeze(1)


def pool(x: torch.Tensor, mask: torch.Tensor, how: str, concept_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``x [B, T, U]`` over real tokens (``mask [B, T]``) into ``[B, U]`` (float32).

    Parameters
    ----------
    x
        Canonical site activations.
    mask
        ``True`` at real (unpadded) positions.
    how
        ``mean``, ``max``, ``first``, ``last`` or ``concept-token``.
    concept_mask
        ``True`` at the concept word's tokens (for ``concept-token``).
    """
    x = x.float()
    mask = mask.to(x.device)
    if how == "concept-token":
        if concept_mask is None:
            how = "mean"
        else:
            cm = concept_mask.to(x.device) & mask
            n = cm.sum(1, keepdim=True)
            return (_masked_sum(x, cm) / n.clamp_min(1)).masked_fill(n == 0, float("nan"))
    if how == "mean":
        return _masked_sum(x, mask) / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
    if how == "max":
        return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    if how in ("first", "last"):
        pos = torch.arange(mask.shape[1], device=x.device).expand_as(mask)
        if how == "first":
            idx = torch.where(mask, pos, torch.full_like(pos, mask.shape[1])).amin(1).clamp_max(mask.shape[1] - 1)
        else:
            idx = torch.where(mask, pos, torch.full_like(pos, -1)).amax(1).clamp_min(0)
        return x[torch.arange(x.shape[0], device=x.device), idx]
    raise ValueError(f"unknown pooling {how!r}")


class MaskMismatch(RuntimeError):
    """A site's activations do not line up with its stream's mask (a subject declared the wrong stream or layout)."""


class BatchPooler:
    """Pool every site of one batch, with what the sites share computed once per stream.

    A recording hook runs once per site and batch; computing the float mask and
    token counts (and, for per-token traces, the flat indices of the real tokens)
    once per stream leaves one or two torch ops per site.  Results equal
    :func:`pool` and ``x[mask]`` bit for bit.

    Parameters
    ----------
    how
        The pooling (see :func:`pool`).
    masks, concept_masks
        Stream -> ``[B, T]`` masks of the batch (as in :class:`~neuroprobe.subjects.base.Batch`).
    """

    def __init__(self, how: str, masks: dict[str, torch.Tensor], concept_masks: dict[str, torch.Tensor]) -> None:
        self.how = how
        self.masks = masks
        self.concept_masks = concept_masks
        self._pool: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _mask(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(stream)
        if mask is None or mask.shape != x.shape[:2]:
            raise MaskMismatch(
                f"activations {tuple(x.shape)} do not match the {stream!r} stream mask "
                f"{None if mask is None else tuple(mask.shape)}"
            )
        return mask

    def pool(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """``pool(x, mask, how, concept_mask)`` for ``x [B, T, U]`` of ``stream``."""
        mask = self._mask(stream, x)
        cmask = self.concept_masks.get(stream)
        how = "mean" if self.how == "concept-token" and cmask is None else self.how
        if how not in ("mean", "concept-token"):
            return pool(x, mask, how, cmask)
        key = (stream, x.device)
        cached = self._pool.get(key)
        if cached is None:
            m = mask.to(x.device)
            if how == "concept-token":
                m = cmask.to(x.device) & m  # type: ignore[union-attr]
                n = m.sum(1, keepdim=True)
                cached = (m.to(torch.float32).unsqueeze(1), n.clamp_min(1), n == 0)
            else:
                cached = (m.to(torch.float32).unsqueeze(1), m.sum(1, keepdim=True).clamp_min(1).to(torch.float32), None)
            self._pool[key] = cached
        weights, denom, empty = cached
        out = torch.bmm(weights, x.float()).squeeze(1) / denom
        return out if empty is None else out.masked_fill(empty, float("nan"))

    def tokens(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """``x[mask]``: the real tokens' rows ``[n_tokens, U]`` in batch order."""
        mask = self._mask(stream, x)
        if not x.is_contiguous():
            return x[mask.to(x.device)]
        key = (stream, x.device)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = mask.to(x.device).reshape(-1).nonzero().squeeze(1)
        return x.reshape(-1, x.shape[-1]).index_select(0, idx)
