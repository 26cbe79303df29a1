"""Teacher-forced image-token likelihood: how well DALL·E predicts an image's codes from a text.

The decoder sees the start token followed by the first ``N - 1`` codes and must
predict all ``N`` codes; the score is the log-probability of the true codes.

Conditioning.  min-dalle samples with *super-conditioning*: it runs the decoder
twice, on the prompt and on the empty prompt (``<s> </s>``), and mixes the logits
as ``(1 - a) * uncond + a * cond`` with ``a = 16``.  That mixture is a sampling
heuristic, not a normalised model of images, so scores here use the conditioned
branch only: ``log p(codes | text)`` under the model itself.  The unconditioned
branch is available as :func:`unconditioned_text_tokens` (for a pointwise mutual
information ``log p(codes | text) - log p(codes | empty text)``).

Normalisation.  The decoder has ``image_vocab_count + 1`` outputs, but only the
first ``code_count`` (16384 VQGAN codes) are images; as min-dalle's sampler does,
log-probabilities are normalised over those codes only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neuroprobe.subjects.dalle.bart import DalleBartDecoder, DalleBartEncoder


def decoder_inputs(image_tokens: torch.Tensor, bos_token: int) -> torch.Tensor:
    """Shift codes right: ``[bos, c_0, ..., c_{N-2}]`` for targets ``[c_0, ..., c_{N-1}]``."""
    bos = torch.full_like(image_tokens[:, :1], bos_token)
    return torch.cat([bos, image_tokens[:, :-1]], dim=1)


def unconditioned_text_tokens(count: int, length: int, bos: int = 0, eos: int = 2, pad: int = 1) -> torch.Tensor:
    """min-dalle's empty prompt ``[<s>, </s>, <pad>, ...]`` repeated ``count`` times."""
    out = torch.full((count, length), pad, dtype=torch.long)
    out[:, 0], out[:, 1] = bos, eos
    return out


def image_token_logprobs(
    encoder: DalleBartEncoder,
    decoder: DalleBartDecoder,
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    *,
    bos_token: int | None = None,
    code_count: int | None = None,
) -> torch.Tensor:
    """Per-position ``log p(code_t | text, codes_<t)``, shape ``[B, N]``.

    Parameters
    ----------
    encoder, decoder
        The DALL·E BART halves.
    text_tokens
        ``[B, S]`` text ids padded with 1 (see :meth:`TextTokenizer.batch`).
    image_tokens
        ``[B, N]`` image codes in ``[0, code_count)``, ``N <= image_token_count``.
    bos_token, code_count
        Default to the decoder config's values.
    """
    config = decoder.config
    bos_token = config.bos_token if bos_token is None else bos_token
    code_count = config.code_count if code_count is None else code_count
    device = next(decoder.parameters()).device
    text_tokens = text_tokens.to(device)
    image_tokens = image_tokens.to(device).long()
    if image_tokens.ndim != 2 or image_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(f"image_tokens must be [B, N] with B={text_tokens.shape[0]}, got {tuple(image_tokens.shape)}")
    if image_tokens.numel() and (int(image_tokens.min()) < 0 or int(image_tokens.max()) >= code_count):
        raise ValueError(f"image codes must lie in [0, {code_count})")
    logits = decoder(decoder_inputs(image_tokens, bos_token), encoder(text_tokens), text_tokens)
    logp = F.log_softmax(logits[..., :code_count].float(), dim=-1)
    return logp.gather(-1, image_tokens.unsqueeze(-1)).squeeze(-1)


def score_image_tokens(
    encoder: DalleBartEncoder,
    decoder: DalleBartDecoder,
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    reduction: str = "mean",
    *,
    bos_token: int | None = None,
    code_count: int | None = None,
) -> torch.Tensor:
    """Log-likelihood of each stimulus's image codes given its text (teacher forced).

    Parameters
    ----------
    encoder, decoder, text_tokens, image_tokens, bos_token, code_count
        As in :func:`image_token_logprobs`.
    reduction
        ``"mean"`` (nats per code; comparable across grid sizes), ``"sum"`` (total
        log-likelihood) or ``"none"`` (``[B, N]``).

    Returns
    -------
    torch.Tensor
        ``[B]`` (or ``[B, N]`` for ``"none"``), float32.
    """
    logp = image_token_logprobs(encoder, decoder, text_tokens, image_tokens, bos_token=bos_token, code_count=code_count)
    if reduction == "mean":
        return logp.mean(dim=-1)
    if reduction == "sum":
        return logp.sum(dim=-1)
    if reduction == "none":
        return logp
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
