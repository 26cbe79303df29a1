"""The organism's brain: a small CLIP-style dual encoder.

Image tower (``image.*``): three 3×3 convolution blocks (16/32/64 channels, each
``Conv2d`` + ``ReLU`` in a ``Sequential`` so the block's output *is* the post-ReLU
map), 2×2 max pooling after each, a 128-unit ReLU layer ``image.fc`` and a linear
projection ``image.proj`` to the shared embedding.

Text tower (``text.*``): UTF-8 bytes (so Korean needs no vocabulary) embedded with
learned positions (``text.embed``), two pre-norm transformer blocks
(``text.layers.0``, ``text.layers.1``; each with ``attn.heads`` — the concatenated
head outputs — and ``mlp.act`` — the post-ReLU MLP units), a final LayerNorm,
max pooling over the real tokens, a 128-unit ReLU head ``text.fc`` and a projection
``text.proj``.

Every post-activation layer is a module output, so an electrode at the module sees
the units themselves.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OrganismConfig:
    """Architecture hyperparameters (stored in the model card and the weights' metadata)."""

    image_size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    embed_dim: int = 64
    text_width: int = 48
    text_heads: int = 4
    text_layers: int = 2
    text_mlp: int = 96
    max_bytes: int = 48
    dropout: float = 0.0

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OrganismConfig":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


class ImageTower(nn.Module):
    """``[B, 1, 32, 32]`` images -> ``[B, embed_dim]`` (unnormalised)."""

    def __init__(self, cfg: OrganismConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.conv1 = _conv_block(1, c1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = _conv_block(c1, c2)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = _conv_block(c2, c3)
        self.pool3 = nn.MaxPool2d(2)
        side = cfg.image_size // 8
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, cfg.hidden), nn.ReLU())
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        """Embedding ``[B, embed_dim]``; with ``return_hidden`` also the ``fc`` units ``[B, hidden]``."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        hidden = self.fc(x)
        emb = self.proj(self.drop(hidden))
        return (emb, hidden) if return_hidden else emb


class ByteEmbedding(nn.Module):
    """Byte embedding plus learned position embedding: ``[B, T]`` ids -> ``[B, T, width]``.

    ``vocab`` is 256 (the bytes) plus any special tokens a model adds after them.
    """

    def __init__(self, width: int, max_len: int, vocab: int = 256) -> None:
        super().__init__()
        self.bytes = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(max_len, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bytes(ids) + self.positions[: ids.shape[1]]


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``heads`` (an identity) outputs the concatenated head outputs."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError("text_width must be divisible by text_heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.heads = nn.Identity()
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, w // h).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        return self.out(self.heads(attend(q, k, v, mask)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of ``q [B, H, Tq, D]`` over ``k, v [B, H, Tk, D]``; ``mask [B, Tk]`` marks
    real keys.  Returns the concatenated head outputs ``[B, Tq, H·D]``."""
    b, h, t, d = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = scores.softmax(-1) @ v  # [B, H, Tq, D]
    return ctx.transpose(1, 2).reshape(b, t, h * d)


class Block(nn.Module):
    """Pre-norm transformer block; its output is the residual stream."""

    def __init__(self, width: int, n_heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(width, mlp), act=nn.ReLU(), proj=nn.Linear(mlp, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class TextTower(nn.Module):
    """``[B, T]`` UTF-8 byte ids + mask -> ``[B, embed_dim]`` (unnormalised)."""

    def __init__(self, cfg: OrganismConfig) -> None:
        super().__init__()
        self.embed = ByteEmbedding(cfg.text_width, cfg.max_bytes)
        self.layers = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, cfg.text_mlp) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.fc = nn.Sequential(nn.Linear(cfg.text_width, cfg.hidden), nn.ReLU())
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.hidden, cfg.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, return_hidden: bool = False):
        """Embedding ``[B, embed_dim]``; with ``return_hidden`` also the ``fc`` units ``[B, hidden]``."""
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.ln_final(x)
        pooled = x.masked_fill(~mask[..., None], float("-inf")).amax(1)
        hidden = self.fc(pooled)
        emb = self.proj(self.drop(hidden))
        return (emb, hidden) if return_hidden else emb


class OrganismModel(nn.Module):
    """The dual encoder.  ``forward`` runs whichever towers get input, in one call."""

    def __init__(self, cfg: OrganismConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or OrganismConfig()
        self.image = ImageTower(self.config)
        self.text = TextTower(self.config)
        # the shared embedding space: both towers' projections pass through this one
        # (parameter-free) module, so its units are one site that sees images and texts alike
        self.embed = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(
        self,
        images: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        copies: int = 1,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unit-norm embeddings ``(image [Bi, D] or None, text [Bt, D] or None)``.

        ``copies``: the images, and the texts, are that many equal-sized groups, one after
        another; the shared embedding then sees each group's images then its texts, group
        after group (with one group: all images, then all texts), so a batch tiled once per
        lesion keeps each lesion's rows together in every pass.
        """
        parts = []
        if images is not None and len(images):
            parts.append(self.image(images))
        if text_ids is not None and len(text_ids):
            if text_mask is None:
                text_mask = torch.ones_like(text_ids, dtype=torch.bool)
            parts.append(self.text(text_ids, text_mask))
        if not parts:
            return None, None
        n_img = len(images) if images is not None and len(images) else 0
        if copies > 1 and len(parts) > 1:
            d = parts[0].shape[-1]
            per = torch.cat([p.reshape(copies, -1, d) for p in parts], 1)
            joint = nn.functional.normalize(self.embed(per.reshape(-1, d)), dim=-1).view(copies, -1, d)
            k = n_img // copies
            return joint[:, :k].reshape(-1, d), joint[:, k:].reshape(-1, d)
        # one call of the shared embedding for the whole batch: images first, then texts
        joint = nn.functional.normalize(self.embed(torch.cat(parts) if len(parts) > 1 else parts[0]), dim=-1)
        img = joint[:n_img] if n_img else None
        txt = joint[n_img:] if len(joint) > n_img else None
        return img, txt

    def scale(self) -> torch.Tensor:
        """The learned inverse temperature (clamped to at most 100)."""
        return self.logit_scale.exp().clamp(max=100.0)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images shown alone ``[N, D]``."""
        return self(images)[0]

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of texts shown alone ``[N, D]``."""
        return self(None, ids, mask)[1]


def build_model(cfg: OrganismConfig | None = None, seed: int = 0) -> OrganismModel:
    """A freshly initialised organism, deterministic under ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OrganismModel(cfg)
        nn.init.normal_(model.text.embed.positions, std=0.02)
    return model
