"""VQGAN detokenizer: image codes -> pixels (the decoder half of VQGAN f16, 16384 codes).

Module and parameter names follow min-dalle's ``detoker.pt`` (converted from
dalle-mini/vqgan_imagenet_f16_16384), so it loads with ``strict=True``.  The VQGAN
*encoder* (pixels -> codes) is not part of that file and not implemented here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQGANConfig:
    """Sizes of the VQGAN decoder.

    Attributes
    ----------
    vocab_count
        Codebook size.
    embed_count
        Codebook vector (latent) width.
    channels
        Base channel count; block ``i`` has ``channels * channel_mult[i]`` channels.
    channel_mult
        Channel multipliers of the five resolution levels.
    groups
        GroupNorm groups.
    """

    vocab_count: int = 2**14
    embed_count: int = 2**8
    channels: int = 2**7
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    groups: int = 2**5

    @classmethod
    def tiny(cls) -> "VQGANConfig":
        """A tiny configuration for tests."""
        return cls(vocab_count=24, embed_count=8, channels=4, channel_mult=(1, 1, 2, 2, 4), groups=2)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, count_in: int, count_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, count_in)
        self.conv1 = nn.Conv2d(count_in, count_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, count_out)
        self.conv2 = nn.Conv2d(count_out, count_out, 3, padding=1)
        if count_in != count_out:
            self.nin_shortcut = nn.Conv2d(count_in, count_out, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions."""

    def __init__(self, count: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, count)
        self.q = nn.Conv2d(count, count, 1)
        self.k = nn.Conv2d(count, count, 1)
        self.v = nn.Conv2d(count, count, 1)
        self.proj_out = nn.Conv2d(count, count, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).reshape(b, c, -1)  # [B, C, HW]
        v = self.v(h).reshape(b, c, -1)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) / math.sqrt(c), dim=-1)  # [B, HW(q), HW(k)]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class MiddleLayer(nn.Module):
    """Resnet block, attention, resnet block at the lowest resolution."""

    def __init__(self, count: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(count, count, groups)
        self.attn_1 = AttentionBlock(count, groups)
        self.block_2 = ResnetBlock(count, count, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(count, count, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpsampleBlock(nn.Module):
    """Three resnet blocks (each followed by attention at the top level), then an optional upsample."""

    def __init__(self, count_in: int, count_out: int, groups: int, has_attention: bool, has_upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(count_in, count_out, groups)] + [ResnetBlock(count_out, count_out, groups) for _ in range(2)]
        )
        self.attn = nn.ModuleList(AttentionBlock(count_out, groups) for _ in range(3)) if has_attention else None
        self.upsample = Upsample(count_out) if has_upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if self.attn is not None:
                h = self.attn[j](h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class Decoder(nn.Module):
    """Latent ``[B, embed, h, w]`` -> RGB ``[B, 3, 16h, 16w]`` (unclipped)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        top = len(widths) - 1
        g = config.groups
        self.conv_in = nn.Conv2d(config.embed_count, widths[top], 3, padding=1)
        self.mid = MiddleLayer(widths[top], g)
        self.up = nn.ModuleList(
            UpsampleBlock(widths[min(i + 1, top)], widths[i], g, has_attention=i == top, has_upsample=i > 0)
            for i in range(len(widths))
        )
        self.norm_out = nn.GroupNorm(g, widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.mid(self.conv_in(z))
        for block in reversed(self.up):
            z = block(z)
        return self.conv_out(_swish(self.norm_out(z)))


class VQGANDetokenizer(nn.Module):
    """Codes ``[B, h*w]`` (a square grid, row-major) -> images ``[B, 16h, 16w, 3]`` in 0..255 (float)."""

    def __init__(self, config: VQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQGANConfig()
        self.embedding = nn.Embedding(self.config.vocab_count, self.config.embed_count)
        self.post_quant_conv = nn.Conv2d(self.config.embed_count, self.config.embed_count, 1)
        self.decoder = Decoder(self.config)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"expected a square grid of codes, got {n}")
        z = self.embedding(codes).view(b, side, side, -1).permute(0, 3, 1, 2).contiguous()
        x = self.decoder(self.post_quant_conv(z))
        return x.permute(0, 2, 3, 1).clamp(0.0, 1.0) * 255.0
