"""OpenAI CLIP with its modified-ResNet image tower, in plain torch.

Written from the description in Radford et al. (2021) and the structure of
openai/CLIP's ``clip/model.py`` (module and parameter names are kept, so the
released state dicts load with ``strict=True``; nothing here depends on torchvision):

* a three-convolution stem (3×3, stride 2 first) with an average pool instead of a max pool;
* bottleneck blocks whose stride is an average pool after the 3×3 convolution
  ("anti-aliased" striding), the shortcut likewise average-pooled before its 1×1 convolution;
* an attention pool: the mean of the final feature map, prepended to it, with learned
  positions, is the only query of one multi-head attention over all positions;
* the causal text transformer (QuickGELU MLPs, pre-LayerNorm), read at the end-of-text token.

Differences of form, not of numbers: the text transformer runs batch-first and only over
the positions a batch needs (the mask is causal, so trailing positions never change
earlier ones); attention is computed by explicit projections so that the output
projection (``attn.out_proj``, ``attnpool.c_proj``) is a module call a site can hook.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from neuroprobe.subjects.clip_resnet.config import CLIPResNetConfig


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1, 3×3, [avg-pool], 1×1 ×4) with an average-pooled shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            # parameter names "0" and "1" as in the released checkpoints; "-1" is the (parameter-free) pool
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(self.avgpool(h)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(h + shortcut)


class AttentionPool2d(nn.Module):
    """Multi-head attention from the mean position to all positions of a feature map."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        h, d = self.num_heads, c // self.num_heads
        q = self.q_proj(tokens[:, :1]).view(b, 1, h, d).transpose(1, 2)
        k = self.k_proj(tokens).view(b, -1, h, d).transpose(1, 2)
        v = self.v_proj(tokens).view(b, -1, h, d).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
        heads = (weights @ v).transpose(1, 2).reshape(b, c)  # [B, C]: head = unit // d
        return self.c_proj(heads)


class ModifiedResNet(nn.Module):
    """The image tower: stem, ``layer1`` … ``layer4``, attention pool."""

    def __init__(self, config: CLIPResNetConfig) -> None:
        super().__init__()
        w = config.vision_width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        # parameter-free modules, so each stem step is a block of its own (lesion replicas answer them from the
        # record instead of re-running a functional ReLU on every replica's copy)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        inplanes = w
        for k, blocks in enumerate(config.vision_layers):
            planes = w * 2**k
            stride = 1 if k == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*layer))
        self.attnpool = AttentionPool2d(config.image_resolution // 32, config.feature_dim, config.vision_heads,
                                        config.embed_dim)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The three stem convolutions and the 2×2 average pool."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.to(self.conv1.weight.dtype))
        for k in range(1, 5):
            x = getattr(self, f"layer{k}")(x)
        return self.attnpool(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the model's dtype (as the original does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x · sigmoid(1.702 x)``, the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a packed input projection (``in_proj_weight``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block of the text tower."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of text blocks (``transformer.resblocks.<i>``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class CLIPResNet(nn.Module):
    """CLIP with a modified-ResNet image tower (state-dict compatible with OpenAI's files)."""

    def __init__(self, config: CLIPResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = ModifiedResNet(config)
        self.transformer = TextTransformer(config.transformer_width, config.transformer_layers, config.transformer_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.transformer_width))
        self.ln_final = LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation (used for ``init="random"``; loading overwrites it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        pool = self.visual.attnpool
        std = pool.c_proj.in_features**-0.5
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for name, param in self.visual.named_parameters():
            if name.startswith("layer") and name.endswith("bn3.weight"):
                nn.init.zeros_(param)
        width, layers = self.config.transformer_width, self.config.transformer_layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Attention-pool output ``[B, embed_dim]`` (not normalised)."""
        return self.visual(pixels.to(self.dtype))

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Projected features ``[B, embed_dim]`` read at the last real token (``lengths - 1``, the end-of-text)."""
        t = ids.shape[1]
        if t > self.config.context_length:
            raise ValueError(f"text of {t} tokens is longer than the context ({self.config.context_length})")
        x = self.token_embedding(ids).to(self.dtype) + self.positional_embedding[:t].to(self.dtype)
        x = self.ln_final(self.transformer(x))
        last = x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]
        return last @ self.text_projection

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits_per_image, logits_per_text`` as the original's ``forward``."""
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids, lengths), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()
