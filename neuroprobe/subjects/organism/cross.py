"""The cross-modal organism's brain: units that see an image and a text in one pass.

The dual-encoder organism (:mod:`.model`) keeps its modalities apart until a 64-d joint
embedding.  This model fuses them the way the seed's multimodal transformers do, in one
of two designs (:attr:`CrossConfig.fusion`):

``single``
    one stream (VisualBERT, DALL·E's transformer): ``[CLS]``, the image tokens and the
    text's UTF-8 byte tokens go through the same transformer blocks
    (``fusion.layers.*``), every unit seeing both modalities at every position;
``co``
    two streams with co-attention (ViLBERT, LXMERT): a text stream (``text.layers.*``)
    and an image stream (``image.layers.*``), each layer a self-attention, a
    co-attention to the other stream (queries from one, keys and values from the
    other) and an MLP per stream.

Image tokens: the dual encoder's convolution blocks (``image.conv1``–``image.conv3``: 3×3
conv + ReLU, each followed by 2×2 max pooling), a 1×1 projection ``image.patches`` and a
LayerNorm (``image.norm``) give a 4×4 grid of tokens (the stand-in for the seed's detector regions and dVAE codes).
Text tokens: UTF-8 bytes plus three special tokens, :data:`CLS`, :data:`EMPTY` (the text
side of an image shown alone: one neutral token) and :data:`MASK` (masked-token
training).  An image shown without text has the one :data:`EMPTY` token as its text; a
text shown alone has a blank (all-zero) image.

Heads: the ``[CLS]`` output (single) or both streams' ``[CLS]`` outputs side by side (co)
feed ``head.fc`` (ReLU units, like the organism's towers' ``fc``) and ``head.proj``
into the embedding the zero-shot readouts and the contrastive loss use; ``itm``
(image–text matching) reads the same ``[CLS]`` outputs; ``mlm`` predicts masked bytes
from text positions and ``mim`` masked image tokens' pixels from image positions.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from neuroprobe.subjects.organism.model import Block, ByteEmbedding, SelfAttention, _conv_block, attend

#: special token ids after the 256 bytes
CLS, EMPTY, MASK = 256, 257, 258
VOCAB = 259
#: token id of image token ``p`` in recorded token traces (never an embedding index)
IMAGE_TOKEN_BASE = 1000
FUSIONS = ("single", "co")
#: what the heads read: the [CLS] state, or the largest value of each unit over every real position
POOLS = ("max", "cls")


@dataclass(frozen=True)
class CrossConfig:
    """Architecture hyperparameters (stored in the model card and the weights' metadata)."""

    fusion: str = "single"
    image_size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    grid: int = 4
    width: int = 64
    heads: int = 4
    layers: int = 4
    mlp: int = 128
    hidden: int = 128
    embed_dim: int = 64
    max_bytes: int = 48
    pool: str = "max"

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {self.pool!r}")

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def patch_pixels(self) -> int:
        """Pixels of the image region one image token covers."""
        return (self.image_size // self.grid) ** 2

    def to_dict(self) -> dict:
        """JSON-friendly form (with ``arch: cross`` so a card says which model it describes)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return {"arch": "cross", **d}

    @classmethod
    def from_dict(cls, d: dict) -> "CrossConfig":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


class ImageTokens(nn.Module):
    """``[B, 1, S, S]`` images -> ``[B, grid², width]`` tokens (conv stem, then a patch embedding)."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        # the dual encoder's convolution blocks (3x3 conv + ReLU, 2x2 max pooling after each)
        self.conv1 = _conv_block(1, c1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = _conv_block(c1, c2)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = _conv_block(c2, c3)
        self.pool3 = nn.MaxPool2d(2)
        side = cfg.image_size // 8
        if side % cfg.grid:
            raise ValueError("image_size / 8 must be a multiple of grid")
        stride = side // cfg.grid
        self.patches = nn.Conv2d(c3, cfg.width, stride, stride=stride)
        self.norm = nn.LayerNorm(cfg.width)  # tokens on the byte embeddings' scale (VisualBERT normalises its regions)
        self.positions = nn.Parameter(torch.zeros(cfg.n_image_tokens, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens with positions; ``image_mask [B, grid²]`` replaces those tokens' content by ``mask_token``."""
        x = self.pool3(self.conv3(self.pool2(self.conv2(self.pool1(self.conv1(images))))))
        x = self.norm(self.patches(x).flatten(2).transpose(1, 2))
        if image_mask is not None:
            x = torch.where(image_mask[..., None], self.mask_token.expand_as(x), x)
        return x + self.positions


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) to ``context`` (keys, values); ``heads`` outputs the heads."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.heads = nn.Identity()
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.n_heads
        q = self.q(x).view(b, t, h, w // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)
        return self.out(self.heads(attend(q, k, v, mask)))


class CoBlock(nn.Module):
    """One co-attention layer of one stream: self-attention, co-attention to the other stream, MLP (pre-norm)."""

    def __init__(self, width: int, n_heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_heads)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.co = CrossAttention(width, n_heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(width, mlp), act=nn.ReLU(), proj=nn.Linear(mlp, width)))

    def self_part(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln1(x), mask)

    def rest(self, x: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.co(self.ln_q(x), self.ln_kv(other), other_mask)
        return x + self.mlp(self.ln2(x))


class CoLayer(nn.Module):
    """Both streams' :class:`CoBlock` of one depth; the co-attentions read the other stream's state after its
    self-attention, simultaneously (as ViLBERT's co-TRM)."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        self.text = CoBlock(cfg.width, cfg.heads, cfg.mlp)
        self.image = CoBlock(cfg.width, cfg.heads, cfg.mlp)

    def forward(self, t: torch.Tensor, tm: torch.Tensor, i: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t1, i1 = self.text.self_part(t, tm), self.image.self_part(i, im)
        return self.text.rest(t1, i1, im), self.image.rest(i1, t1, tm)


class CrossModel(nn.Module):
    """The cross-modal organism.  ``forward(images, ids, mask)`` embeds each (image, text) row in one fused pass.

    Every row has an image (``[B, 1, S, S]``; blank for a text shown alone) and a text
    (``ids``/``mask`` ``[B, T]``, UTF-8 bytes; the one :data:`EMPTY` token for an image
    shown alone).
    """

    def __init__(self, cfg: CrossConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = cfg or CrossConfig()
        w = cfg.width
        self.image = ImageTokens(cfg)
        self.text = nn.Module()
        self.text.embed = ByteEmbedding(w, cfg.max_bytes, VOCAB)
        if cfg.fusion == "single":
            self.fusion = nn.Module()
            self.fusion.segments = nn.Embedding(3, w)  # 0: [CLS], 1: image tokens, 2: text tokens
            self.fusion.embed = nn.Identity()  # the joint sequence entering the first block (a site)
            self.fusion.layers = nn.ModuleList(Block(w, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
            self.fusion.ln_final = nn.LayerNorm(w)
            pooled = w
        else:
            self.image.cls = nn.Parameter(torch.zeros(1, 1, w))
            self.layers = nn.ModuleList(CoLayer(cfg) for _ in range(cfg.layers))
            self.text.ln_final = nn.LayerNorm(w)
            self.image.ln_final = nn.LayerNorm(w)
            pooled = 2 * w
        self.head = nn.Module()
        self.head.fc = nn.Sequential(nn.Linear(pooled, cfg.hidden), nn.ReLU())
        self.head.proj = nn.Linear(cfg.hidden, cfg.embed_dim)
        self.embed = nn.Identity()  # the joint embedding (before normalisation), as in the dual encoder
        self.itm = nn.Linear(pooled, 1)
        self.mlm = nn.Linear(w, 256)
        self.mim = nn.Linear(w, cfg.patch_pixels)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    # ------------------------------------------------------------------ passes
    def encode(self, images: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor,
               image_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The fused pass.

        Parameters
        ----------
        images
            ``[B, 1, S, S]``; ``None`` stands for blank images (computed once for all rows).
        ids, mask
            ``[B, T]`` text token ids (bytes or specials) and real-token mask.
        image_mask
            Optional ``[B, grid²]`` bool: image tokens replaced by the :data:`MASK` embedding
            (masked image modelling).

        Returns
        -------
        dict
            ``pooled [B, P]`` (what the heads read), ``text [B, T, W]`` and ``image [B, grid², W]``
            (final states at text and image positions).
        """
        b = ids.shape[0]
        if images is None:  # texts shown alone: one blank image's tokens for every row (training shortcut)
            blank = blank_images(1, self.config.image_size).to(ids.device, self.logit_scale.dtype)
            img = self.image(blank).expand(b, -1, -1)
        else:
            img = self.image(images, image_mask)
        txt = self.text.embed(ids)
        n_img = img.shape[1]
        if self.config.fusion == "single":
            seg = self.fusion.segments.weight
            cls = (self.text.embed.bytes.weight[CLS] + seg[0]).expand(b, 1, -1)
            x = self.fusion.embed(torch.cat([cls, img + seg[1], txt + seg[2]], 1))
            m = torch.cat([torch.ones(b, 1 + n_img, dtype=torch.bool, device=mask.device), mask], 1)
            for layer in self.fusion.layers:
                x = layer(x, m)
            x = self.fusion.ln_final(x)
            return {"pooled": self._pool(x, m), "image": x[:, 1 : 1 + n_img], "text": x[:, 1 + n_img :]}
        cls_t = self.text.embed.bytes.weight[CLS].expand(b, 1, -1)
        t = torch.cat([cls_t, txt], 1)
        tm = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], 1)
        i = torch.cat([self.image.cls.expand(b, 1, -1), img], 1)
        im = torch.ones(b, 1 + n_img, dtype=torch.bool, device=mask.device)
        for layer in self.layers:
            t, i = layer(t, tm, i, im)
        t, i = self.text.ln_final(t), self.image.ln_final(i)
        return {"pooled": torch.cat([self._pool(t, tm), self._pool(i, im)], -1), "image": i[:, 1:], "text": t[:, 1:]}

    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "cls":
            return x[:, 0]
        return x.masked_fill(~mask[..., None], float("-inf")).amax(1)

    def embedding(self, pooled: torch.Tensor, return_hidden: bool = False):
        """Unit-norm joint embedding from the pooled state (through ``head.fc``, ``head.proj``, ``embed``);
        with ``return_hidden`` also the ``head.fc`` units."""
        hidden = self.head.fc(pooled)
        emb = nn.functional.normalize(self.embed(self.head.proj(hidden)), dim=-1)
        return (emb, hidden) if return_hidden else emb

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm joint embeddings ``[B, embed_dim]``, one per (image, text) row."""
        return self.embedding(self.encode(images, ids, mask)["pooled"])

    def scale(self) -> torch.Tensor:
        """The learned inverse temperature (clamped to at most 100)."""
        return self.logit_scale.exp().clamp(max=100.0)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images shown alone (text side: one :data:`EMPTY` token) ``[N, D]``."""
        ids, mask = empty_text(len(images))
        return self(images, ids.to(images.device), mask.to(images.device))

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of texts shown alone (image side blank) ``[N, D]``."""
        dtype = self.logit_scale.dtype
        return self(blank_images(len(ids), self.config.image_size).to(ids.device, dtype), ids, mask)

    def match_logits(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Image–text matching logits ``[N]`` of (image, text) pairs (> 0: they show the same concept)."""
        return self.itm(self.encode(images, ids, mask)["pooled"]).squeeze(-1)


def build_cross(cfg: CrossConfig | None = None, seed: int = 0) -> CrossModel:
    """A freshly initialised cross-modal organism, deterministic under ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CrossModel(cfg)
        # bytes keep N(0, 1) (the dual encoder's text tower) and image tokens are LayerNorm'd, so both
        # modalities start on one scale and tell their digits apart from the first step: with small byte
        # embeddings a text alone is drowned by its blank image's tokens, and with small image positions an
        # image starts as a bag of patches; either way the contrastive loss sits on its collapsed plateau
        if model.config.fusion == "single":
            nn.init.normal_(model.fusion.segments.weight, std=0.02)
        nn.init.normal_(model.text.embed.positions, std=0.02)
        nn.init.normal_(model.image.positions, std=1.0)
        nn.init.normal_(model.image.mask_token, std=0.02)
        if model.config.fusion == "co":
            nn.init.normal_(model.image.cls, std=0.02)
    return model


def blank_images(n: int, size: int) -> torch.Tensor:
    """The image side of a text shown alone: ``n`` all-zero images."""
    return torch.zeros(n, 1, size, size)


def empty_text(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text side of an image shown alone: one :data:`EMPTY` token per row."""
    return torch.full((n, 1), EMPTY, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool)
