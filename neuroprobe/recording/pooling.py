"""Pool a site's ``[B, T, U]`` activations into one response per stimulus.

Padding is masked in every pooling.  ``concept-token`` averages the tokens of the
stimulus's concept word; a stimulus without such tokens (an image, a text that
never names the concept) gets NaN, so it is never silently replaced by another
pooling.  Streams without concept masks (image patches, regions) fall back to
``mean``; this is recorded in the site's ``pooling`` attribute.
"""
from __future__ import annotations

import torch


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
