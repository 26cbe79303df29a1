"""VQGAN f16 (16384 codes): the detokenizer (codes -> pixels) and the tokenizer (pixels -> codes).

The detokenizer's module and parameter names follow min-dalle's ``detoker.pt``
(converted from dalle-mini/vqgan_imagenet_f16_16384), so it loads with ``strict=True``.

The tokenizer (:class:`VQGANTokenizer`) is not among min-dalle's files.  It is the
encoder half of the same VQGAN, written after taming-transformers' ``Encoder``
(``taming/modules/diffusionmodules/model.py``), its 1x1 ``quant_conv`` and the
nearest-codebook lookup of ``VectorQuantizer2``, with taming's module and parameter
names (``encoder.down.<i>.block.<j>.norm1.weight``, ``quant_conv.weight``,
``quantize.embedding.weight``); see :mod:`neuroprobe.subjects.dalle.encoder` for the
files it loads.
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

    def __init__(self, count_in: int, count_out: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, count_in, eps=eps)
        self.conv1 = nn.Conv2d(count_in, count_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, count_out, eps=eps)
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

    def __init__(self, count: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, count, eps=eps)
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


# ============================================================================ tokenizer


@dataclass(frozen=True)
class VQGANEncoderConfig:
    """Sizes of the VQGAN encoder (taming-transformers ``ddconfig`` names).

    Attributes
    ----------
    ch, ch_mult
        Base width and per-level multipliers (level ``i`` has ``ch * ch_mult[i]`` channels).
    num_res_blocks
        Resnet blocks per level.
    attn_resolutions
        Feature-map sides at which each resnet block is followed by attention.
    resolution
        Input side the attention resolutions refer to.
    z_channels
        Encoder output width.
    embed_dim, n_embed
        Codebook vector width and size.
    groups
        GroupNorm groups (taming: 32).
    eps
        GroupNorm epsilon (taming: 1e-6).
    pixel_range
        Input pixel range the encoder expects: ``(-1, 1)`` for taming's own checkpoints;
        ``(0, 1)`` for dalle-mini's f16-16384, as dalle-mini encoded its training images
        (``T.ToTensor()`` pixels given unchanged to ``VQModel.encode``: borisdayma/dalle-mini
        ``dev/encoding/vqgan-jax-encoding*.ipynb`` and ``tools/dataset/encode_dataset.ipynb``;
        see :func:`neuroprobe.subjects.dalle.encoder.image_pixels`), matching min-dalle's
        detokenizer, whose output is clipped to ``[0, 1]``.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 2**14
    groups: int = 32
    eps: float = 1e-6
    pixel_range: tuple[float, float] = (0.0, 1.0)

    @property
    def downsampling(self) -> int:
        """Input pixels per code along one side (16 for f16)."""
        return 2 ** (len(self.ch_mult) - 1)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 convolution (taming's asymmetric padding)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(count, count, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    """One resolution level: resnet blocks (each with attention where asked), then an optional downsample."""

    def __init__(self, count_in: int, count_out: int, blocks: int, cfg: VQGANEncoderConfig, attention: bool,
                 downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(count_in if j == 0 else count_out, count_out, cfg.groups, cfg.eps) for j in range(blocks)
        )
        self.attn = nn.ModuleList(AttentionBlock(count_out, cfg.groups, cfg.eps) for _ in range(blocks)) if attention else nn.ModuleList()
        if downsample:
            self.downsample = Downsample(count_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Encoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` -> latent ``[B, z_channels, H/16, W/16]``."""

    def __init__(self, cfg: VQGANEncoderConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        count_in, side = cfg.ch, cfg.resolution
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(DownLevel(count_in, width, cfg.num_res_blocks, cfg, side in cfg.attn_resolutions, not last))
            count_in, side = width, side // 2
        top = widths[-1]
        self.mid = MiddleLayer(top, cfg.groups)
        for module in self.mid.modules():  # the encoder's norms use taming's epsilon
            if isinstance(module, nn.GroupNorm):
                module.eps = cfg.eps
        self.norm_out = nn.GroupNorm(cfg.groups, top, eps=cfg.eps)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Codebook(nn.Module):
    """Nearest-neighbour lookup into ``embedding`` (taming's ``quantize`` module, inference only)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, D, h, w]`` -> code indices ``[B, h*w]`` (row-major), argmin of ``‖z − e‖²``."""
        b, d = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(dim=1).view(b, -1)


class VQGANTokenizer(nn.Module):
    """Images -> VQGAN codes: ``encoder``, ``quant_conv``, ``quantize`` (taming's names).

    ``forward`` takes pixels in ``[0, 1]`` ``[B, 3, H, W]`` (mapped to
    :attr:`VQGANEncoderConfig.pixel_range`) and returns codes ``[B, (H/16)·(W/16)]``.
    """

    def __init__(self, config: VQGANEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQGANEncoderConfig()
        self.encoder = Encoder(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.embed_dim, 1)
        self.quantize = Codebook(self.config.n_embed, self.config.embed_dim)

    def latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pre-quantisation latent ``quant_conv(encoder(x))`` of pixels in ``[0, 1]``."""
        lo, hi = self.config.pixel_range
        x = pixels.to(self.quant_conv.weight.dtype) * (hi - lo) + lo
        return self.quant_conv(self.encoder(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.latent(pixels))
