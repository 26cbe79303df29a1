"""Two-stream ViLBERT in plain torch.

Written from the description of the model in Lu et al. (2019, 2020) and the parameter
layout of the released checkpoints of facebookresearch/vilbert-multi-task: module
names are chosen so that ``model.state_dict()`` has exactly the keys (and shapes) of
``pretrained_model.bin`` or ``multi_task_model.bin``, and every text layer, image
layer and co-attention layer is its own module (a site):

* ``bert.encoder.layer.<i>``   text layers (BERT-base),
* ``bert.encoder.v_layer.<i>`` image layers,
* ``bert.encoder.c_layer.<k>`` co-attention ("connection") layers, each with a text
  half (``t_intermediate``/``t_output``) and an image half (``v_intermediate``/``v_output``).

Inputs of the image stream are region features ``[B, R, v_feature_size]`` with 5-d
locations ``[B, R, 5]`` (see :func:`neuroprobe.subjects.vilbert.load.prepare_regions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from neuroprobe.subjects.vilbert.config import ViLBERTConfig

#: Heads :meth:`ViLBERTModel.forward` can compute, and whether they need the 12-in-1 task heads.
HEADS = {
    "alignment": False,  # cls.bi_seq_relationship on the fused pooled vectors, [B, 2]; column 0 = matched
    "mlm": False,  # masked-token logits, [B, T, vocab]
    "regions": False,  # masked-region class logits, [B, R, v_target_size]
    "vqa": True,  # VQA answer logits, [B, vqa_labels]
    "gqa": True,  # GQA answer logits, [B, gqa_labels]
    "retrieval": True,  # image-text retrieval logit (vil_logit), [B]
    "entailment": True,  # visual entailment logits (contradiction, neutral, entailment), [B, 3]
    "grounding": True,  # referring-expression logit per region (padding at -10000), [B, R]
    "nlvr2": True,  # NLVR2 logits on consecutive pairs of the batch, [B // 2, 2]
}


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` 1/0 mask -> ``[B, 1, 1, L]`` additive mask (0 for real, -10000 for padding)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, heads: int, dropout: nn.Dropout
) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` over ``k``/``v`` with an additive key mask.

    ``q`` is ``[B, Lq, W]``, ``k`` and ``v`` are ``[B, Lk, W]``, ``mask`` is ``[B, 1, 1, Lk]``;
    returns the concatenated head outputs ``[B, Lq, W]``.
    """
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]) + mask
    probs = dropout(scores.softmax(dim=-1))
    out = probs @ vh  # [B, H, Lq, d]
    b, _, lq, _ = out.shape
    return out.transpose(1, 2).reshape(b, lq, -1)


# --------------------------------------------------------------------------- embeddings
class TextEmbeddings(nn.Module):
    """Word + position + segment embeddings, with the optional 12-in-1 task token after ``[CLS]``."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if config.task_specific_tokens:
            self.task_embeddings = nn.Embedding(config.n_task_tokens, config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings(
            token_type_ids
        )
        if hasattr(self, "task_embeddings"):
            if task_ids is None:
                raise ValueError("this ViLBERT uses task tokens: pass task_ids of shape [B, 1]")
            task = self.task_embeddings(task_ids.reshape(-1, 1))
            x = torch.cat([x[:, :1], task, x[:, 1:]], dim=1)
        return self.dropout(self.LayerNorm(x))


class ImageEmbeddings(nn.Module):
    """Region feature and 5-d location projections, summed and normalised."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = nn.Linear(5, config.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.v_hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        x = self.image_embeddings(image_feat) + self.image_location_embeddings(image_loc)
        return self.dropout(self.LayerNorm(x))


# ------------------------------------------------------------------ single-stream layers
class SelfAttention(nn.Module):
    """Query/key/value projections of one stream; returns the concatenated head outputs."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _attend(self.query(x), self.key(x), self.value(x), mask, self.heads, self.dropout)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``: the output projection of a sub-block."""

    def __init__(self, width_in: int, width_out: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        self.LayerNorm = nn.LayerNorm(width_out, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """Self-attention block: ``self`` (q/k/v) then ``output`` (projection + residual + norm)."""

    def __init__(self, width: int, heads: int, eps: float, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.self = SelfAttention(width, heads, attn_dropout)
        self.output = AddNorm(width, width, eps, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """First MLP projection and GELU; its output are the post-activation MLP units."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)
        self.act = nn.GELU()  # exact (erf) GELU, as in the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TransformerLayer(nn.Module):
    """A post-norm BERT layer (used for both the text and the image stream)."""

    def __init__(self, width: int, heads: int, inner: int, config: ViLBERTConfig) -> None:
        super().__init__()
        eps, p = config.layer_norm_eps, config.hidden_dropout_prob
        self.attention = Attention(width, heads, eps, p, config.attention_probs_dropout_prob)
        self.intermediate = Intermediate(width, inner)
        self.output = AddNorm(inner, width, eps, p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


# ------------------------------------------------------------------ co-attention layers
class CoAttention(nn.Module):
    """Each stream's queries attend over the other stream's keys and values.

    Index 1 projections read the image stream, index 2 projections the text stream
    (the checkpoint's naming).  Returns ``(image_ctx, text_ctx)``: the image positions'
    context gathered from the text, and the text positions' context gathered from the image,
    both of width ``bi_hidden_size``.
    """

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        bi, v, t = config.bi_hidden_size, config.v_hidden_size, config.hidden_size
        self.heads = config.bi_num_attention_heads
        self.query1, self.key1, self.value1 = nn.Linear(v, bi), nn.Linear(v, bi), nn.Linear(v, bi)
        self.dropout1 = nn.Dropout(config.attention_probs_dropout_prob)
        self.query2, self.key2, self.value2 = nn.Linear(t, bi), nn.Linear(t, bi), nn.Linear(t, bi)
        self.dropout2 = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self, image: torch.Tensor, image_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_ctx = _attend(self.query2(text), self.key1(image), self.value1(image), image_mask, self.heads, self.dropout1)
        image_ctx = _attend(self.query1(image), self.key2(text), self.value2(text), text_mask, self.heads, self.dropout2)
        return image_ctx, text_ctx


class CoAttentionOutput(nn.Module):
    """Output projections of the co-attention, back into each stream, with residual and norm.

    ``q_dense1``/``q_dense2`` exist in the released checkpoints but are never used in the
    forward pass (as in the reference); they are kept so the weights load strictly.
    """

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        bi, v, t, eps = config.bi_hidden_size, config.v_hidden_size, config.hidden_size, config.layer_norm_eps
        p = config.hidden_dropout_prob
        self.dense1 = nn.Linear(bi, v)
        self.LayerNorm1 = nn.LayerNorm(v, eps=eps)
        self.dropout1 = nn.Dropout(p)
        self.q_dense1 = nn.Linear(bi, v)
        self.dense2 = nn.Linear(bi, t)
        self.LayerNorm2 = nn.LayerNorm(t, eps=eps)
        self.dropout2 = nn.Dropout(p)
        self.q_dense2 = nn.Linear(bi, t)

    def forward(
        self, image_ctx: torch.Tensor, image: torch.Tensor, text_ctx: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_out = self.LayerNorm1(self.dropout1(self.dense1(image_ctx)) + image)
        text_out = self.LayerNorm2(self.dropout2(self.dense2(text_ctx)) + text)
        return image_out, text_out


class ConnectionLayer(nn.Module):
    """One co-attention layer: cross-attention both ways, then each stream's own MLP."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        eps, p = config.layer_norm_eps, config.hidden_dropout_prob
        self.biattention = CoAttention(config)
        self.biOutput = CoAttentionOutput(config)
        self.v_intermediate = Intermediate(config.v_hidden_size, config.v_intermediate_size)
        self.v_output = AddNorm(config.v_intermediate_size, config.v_hidden_size, eps, p)
        self.t_intermediate = Intermediate(config.hidden_size, config.intermediate_size)
        self.t_output = AddNorm(config.intermediate_size, config.hidden_size, eps, p)

    def forward(
        self, image: torch.Tensor, image_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_ctx, text_ctx = self.biattention(image, image_mask, text, text_mask)
        image_h, text_h = self.biOutput(image_ctx, image, text_ctx, text)
        image_out = self.v_output(self.v_intermediate(image_h), image_h)
        text_out = self.t_output(self.t_intermediate(text_h), text_h)
        return image_out, text_out


class Encoder(nn.Module):
    """Text layers, image layers and co-attention layers, run in the published order."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.schedule = config.run_order()
        self.layer = nn.ModuleList(
            TransformerLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size, config)
            for _ in range(config.num_hidden_layers)
        )
        self.v_layer = nn.ModuleList(
            TransformerLayer(config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size, config)
            for _ in range(config.v_num_hidden_layers)
        )
        self.c_layer = nn.ModuleList(ConnectionLayer(config) for _ in range(config.n_coattention_layers))

    def forward(
        self, text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for stream, i in self.schedule:
            if stream == "text":
                text = self.layer[i](text, text_mask)
            elif stream == "image":
                image = self.v_layer[i](image, image_mask)
            else:
                image, text = self.c_layer[i](image, image_mask, text, text_mask)
        return text, image


class Pooler(nn.Module):
    """First position -> linear -> ReLU (into the shared ``bi_hidden_size`` space)."""

    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x[:, 0]))


class Backbone(nn.Module):
    """The two-stream encoder with its embeddings and poolers (``bert.*`` in the checkpoints)."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.v_embeddings = ImageEmbeddings(config)
        self.encoder = Encoder(config)
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)


# ---------------------------------------------------------------------------- heads
class HeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm, before a prediction decoder."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MaskedTokenHead(nn.Module):
    """Masked-token prediction; the decoder weight is tied to the word embeddings."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.transform = HeadTransform(config.hidden_size, config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MaskedRegionHead(nn.Module):
    """Masked-region class prediction (Visual Genome classes)."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.transform = HeadTransform(config.v_hidden_size, config.layer_norm_eps)
        self.decoder = nn.Linear(config.v_hidden_size, config.v_target_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class PretrainingHeads(nn.Module):
    """The pretraining heads (``cls.*``): masked tokens, image-text alignment, masked regions."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.predictions = MaskedTokenHead(config)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.imagePredictions = MaskedRegionHead(config)
        self.dropout = nn.Dropout(0.1)


class AnswerClassifier(nn.Module):
    """Two-layer answer classifier of the 12-in-1 heads (linear, GELU, LayerNorm, linear)."""

    def __init__(self, width_in: int, hidden: int, n_out: int, eps: float) -> None:
        super().__init__()
        self.logit_fc = nn.Sequential(
            nn.Linear(width_in, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps), nn.Linear(hidden, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(x)


# ---------------------------------------------------------------------------- model
@dataclass
class ViLBERTOutput:
    """What one forward pass of :class:`ViLBERTModel` returns.

    Attributes
    ----------
    text
        Final text stream ``[B, T, hidden_size]`` (``T`` counts the task token when used).
    image
        Final image stream ``[B, R, v_hidden_size]``.
    pooled_text, pooled_image
        Pooled vectors ``[B, bi_hidden_size]``.
    logits
        Head name -> tensor, for the heads asked for (see :data:`HEADS`).
    """

    text: torch.Tensor
    image: torch.Tensor
    pooled_text: torch.Tensor
    pooled_image: torch.Tensor
    logits: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def alignment(self) -> torch.Tensor | None:
        """Image-text alignment logits ``[B, 2]`` (column 0 = the caption matches the image)."""
        return self.logits.get("alignment")

    @property
    def vqa(self) -> torch.Tensor | None:
        """VQA answer logits ``[B, vqa_labels]`` (12-in-1 checkpoint only)."""
        return self.logits.get("vqa")


class ViLBERTModel(nn.Module):
    """ViLBERT with the heads of one of the released checkpoints.

    ``config.task_heads=False`` gives the layout of ``pretrained_model.bin``
    (``bert.*`` + ``cls.*``); ``True`` adds the 12-in-1 heads of ``multi_task_model.bin``
    (``vil_prediction``, ``vil_prediction_gqa``, ``vil_binary_prediction``, ``vil_logit``,
    ``vil_tri_prediction``, ``vision_logit``, ``linguisic_logit``).
    """

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Backbone(config)
        self.cls = PretrainingHeads(config)
        if config.task_heads:
            bi, eps = config.bi_hidden_size, config.layer_norm_eps
            self.dropout = nn.Dropout(0.1)
            self.vil_prediction = AnswerClassifier(bi, 2 * bi, config.vqa_labels, eps)
            self.vil_prediction_gqa = AnswerClassifier(bi, 2 * bi, config.gqa_labels, eps)
            self.vil_binary_prediction = AnswerClassifier(2 * bi, 2 * bi, 2, eps)
            self.vil_logit = nn.Linear(bi, 1)
            self.vil_tri_prediction = nn.Linear(bi, 3)
            self.vision_logit = nn.Linear(config.v_hidden_size, 1)
            self.linguisic_logit = nn.Linear(config.hidden_size, 1)  # (sic) the checkpoint's spelling
        self.tie_weights()

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        """Share the masked-token decoder weight with the word embeddings."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """BERT-style random init: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.cls.predictions.bias)
        self.tie_weights()

    # ------------------------------------------------------------------ forward
    def text_stream_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The ``[B, T']`` mask of the text stream inside the encoder (task token inserted after ``[CLS]``)."""
        if not self.config.task_specific_tokens:
            return attention_mask
        ones = torch.ones_like(attention_mask[:, :1])
        return torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)

    def default_heads(self) -> tuple[str, ...]:
        """Heads computed when none are asked for: alignment, plus VQA when the task heads exist."""
        return ("alignment", "vqa") if self.config.task_heads else ("alignment",)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        heads: Sequence[str] | None = None,
    ) -> ViLBERTOutput:
        """Run both streams and the requested heads.

        Parameters
        ----------
        input_ids
            ``[B, T]`` WordPiece ids starting with ``[CLS]``.
        image_feat, image_loc
            ``[B, R, v_feature_size]`` region features and ``[B, R, 5]`` locations, the
            global (mean) region first.
        token_type_ids, attention_mask
            ``[B, T]``; default all zeros / all ones.
        image_attention_mask
            ``[B, R]`` 1 for real regions; default all ones.
        task_ids
            ``[B]`` or ``[B, 1]`` task-token ids (12-in-1 model only; e.g. 1 = VQA,
            7 = COCO retrieval, see :data:`~neuroprobe.subjects.vilbert.config.TASK_IDS`).
        heads
            Names from :data:`HEADS`; default :meth:`default_heads`.

        Returns
        -------
        ViLBERTOutput
        """
        heads = tuple(self.default_heads() if heads is None else heads)
        for name in heads:
            if name not in HEADS:
                raise ValueError(f"unknown ViLBERT head {name!r}; choose from {', '.join(HEADS)}")
            if HEADS[name] and not self.config.task_heads:
                raise ValueError(f"head {name!r} exists only in the multi-task (12-in-1) checkpoint")
        dtype = self.bert.embeddings.word_embeddings.weight.dtype
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if image_attention_mask is None:
            image_attention_mask = torch.ones(image_feat.shape[:2], dtype=torch.long, device=image_feat.device)
        text_mask = _additive_mask(self.text_stream_mask(attention_mask), dtype)
        image_mask = _additive_mask(image_attention_mask, dtype)

        text = self.bert.embeddings(input_ids, token_type_ids, task_ids)
        image = self.bert.v_embeddings(image_feat.to(dtype), image_loc.to(dtype))
        text, image = self.bert.encoder(text, image, text_mask, image_mask)
        pooled_t, pooled_v = self.bert.t_pooler(text), self.bert.v_pooler(image)
        out = ViLBERTOutput(text, image, pooled_t, pooled_v)
        if not heads:
            return out

        fused = pooled_t * pooled_v if self.config.fusion_method == "mul" else pooled_t + pooled_v
        for name in heads:
            if name == "alignment":
                out.logits[name] = self.cls.bi_seq_relationship(self.cls.dropout(fused))
            elif name == "mlm":
                out.logits[name] = self.cls.predictions(text)
            elif name == "regions":
                out.logits[name] = self.cls.imagePredictions(image)
            else:
                out.logits[name] = self._task_head(name, self.dropout(fused), text, image, image_attention_mask)
        return out

    def _task_head(
        self, name: str, fused: torch.Tensor, text: torch.Tensor, image: torch.Tensor, image_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if name == "vqa":
            return self.vil_prediction(fused)
        if name == "gqa":
            return self.vil_prediction_gqa(fused)
        if name == "retrieval":
            return self.vil_logit(fused).squeeze(-1)
        if name == "entailment":
            return self.vil_tri_prediction(fused)
        if name == "grounding":
            pad = (1.0 - image_attention_mask.to(image.dtype)) * -10000.0
            return self.vision_logit(self.dropout(image)).squeeze(-1) + pad
        if name == "nlvr2":
            if fused.shape[0] % 2:
                raise ValueError("the nlvr2 head scores consecutive pairs of images: use an even batch size")
            return self.vil_binary_prediction(fused.reshape(-1, 2 * fused.shape[1]))
        raise ValueError(f"unknown ViLBERT head {name!r}")  # pragma: no cover
