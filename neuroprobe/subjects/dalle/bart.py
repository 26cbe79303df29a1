"""The DALL·E BART: a text encoder and an image-token decoder (min-dalle layout).

Written for neuroprobe from the published architecture (dalle-mini's NormFormer
BART with GLU feed-forwards, as ported by kuprel/min-dalle).  Parameter names and
shapes follow min-dalle's converted state dicts, so ``encoder.pt`` / ``decoder.pt``
load with ``strict=True``.

Differences from min-dalle's own modules, none of which changes the function:

* The decoder runs one full causal forward over given image tokens (teacher
  forcing); there is no sampling cache and no super-conditioning inside the module.
* Norms that dalle-mini trained without a scale (``use_scale=False``: the
  pre-attention norms, both GLU norms and the final norm) have no ``weight``
  parameter here, exactly as in the converted files; min-dalle instead kept a
  ones-initialised weight and loaded with ``strict=False``.

Every layer, attention output projection and GLU is its own module, so sites can be
addressed by name: ``encoder.layers.3``, ``encoder.layers.3.self_attn.out_proj``,
``decoder.layers.3.encoder_attn.out_proj``, ``decoder.layers.3.glu.fc2`` ...
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroprobe.subjects.dalle.config import DalleConfig


class LayerNorm(nn.Module):
    """Layer normalisation with an optional scale (dalle-mini's ``use_scale=False`` norms).

    Parameters
    ----------
    count
        Normalised width.
    eps
        Epsilon.
    scale
        Whether the norm has a learned scale (``weight``); the shift (``bias``) is always there.

    Notes
    -----
    A scale-less norm still accepts a ``weight`` entry in a state dict if it is all
    ones (what a re-saved min-dalle module would contain); anything else is an error.
    """

    def __init__(self, count: int, eps: float = 1e-5, scale: bool = True) -> None:
        super().__init__()
        self.normalized_shape = (count,)
        self.eps = eps
        if scale:
            self.weight = nn.Parameter(torch.ones(count))
        else:
            self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.zeros(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        key = prefix + "weight"
        if self.weight is None and key in state_dict:
            value = state_dict.pop(key)
            if tuple(value.shape) != self.normalized_shape or (not value.is_meta and not bool(torch.all(value == 1))):
                error_msgs.append(f"{key}: this norm was trained without a scale, so a stored scale must be all ones.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, scale={self.weight is not None}"


class GLU(nn.Module):
    """Gated feed-forward: ``fc2(ln1(gelu(fc0(x)) * fc1(x)))`` with ``x = ln0(input)``.

    The units of this block (what an ``mlp`` site records) are the input of
    ``fc2``: the normalised gated activations.
    """

    def __init__(self, count_in_out: int, count_middle: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gelu = nn.GELU()
        self.ln0 = LayerNorm(count_in_out, eps, scale=False)
        self.ln1 = LayerNorm(count_middle, eps, scale=False)
        self.fc0 = nn.Linear(count_in_out, count_middle, bias=False)
        self.fc1 = nn.Linear(count_in_out, count_middle, bias=False)
        self.fc2 = nn.Linear(count_middle, count_in_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln0(x)
        gated = self.gelu(self.fc0(x)) * self.fc1(x)
        return self.fc2(self.ln1(gated))


class Attention(nn.Module):
    """Multi-head attention without biases; ``out_proj`` takes the concatenated head outputs."""

    def __init__(self, head_count: int, embed_count: int) -> None:
        super().__init__()
        if embed_count % head_count:
            raise ValueError(f"embed_count {embed_count} is not divisible by head_count {head_count}")
        self.head_count = head_count
        self.embed_count = embed_count
        self.k_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.v_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.q_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.out_proj = nn.Linear(embed_count, embed_count, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.head_count, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``queries`` [B, Tq, D] to ``keys_values`` [B, Tk, D].

        ``mask`` is boolean, broadcastable to ``[B, heads, Tq, Tk]``; ``True`` = may attend.
        """
        q = self._heads(self.q_proj(queries))
        k = self._heads(self.k_proj(keys_values))
        v = self._heads(self.v_proj(keys_values))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_count))


class EncoderLayer(nn.Module):
    """NormFormer encoder layer: scale-less pre-norm, self-attention, post-norm, residual; GLU, residual."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        d, eps = config.embed_count, config.layer_norm_eps
        self.pre_self_attn_layer_norm = LayerNorm(d, eps, scale=False)
        self.self_attn = Attention(config.head_count, d)
        self.self_attn_layer_norm = LayerNorm(d, eps)
        self.glu = GLU(d, config.glu_embed_count, eps)

    def forward(self, state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.pre_self_attn_layer_norm(state)
        state = state + self.self_attn_layer_norm(self.self_attn(h, h, mask))
        return state + self.glu(state)


class DecoderLayer(nn.Module):
    """NormFormer decoder layer: causal self-attention, cross-attention to the text, GLU."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        d, eps = config.embed_count, config.layer_norm_eps
        self.pre_self_attn_layer_norm = LayerNorm(d, eps, scale=False)
        self.self_attn = Attention(config.head_count, d)
        self.self_attn_layer_norm = LayerNorm(d, eps)
        self.pre_encoder_attn_layer_norm = LayerNorm(d, eps, scale=False)
        self.encoder_attn = Attention(config.head_count, d)
        self.encoder_attn_layer_norm = LayerNorm(d, eps)
        self.glu = GLU(d, config.glu_embed_count, eps)

    def forward(
        self, state: torch.Tensor, encoder_state: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.pre_self_attn_layer_norm(state)
        state = state + self.self_attn_layer_norm(self.self_attn(h, h, self_mask))
        h = self.pre_encoder_attn_layer_norm(state)
        state = state + self.encoder_attn_layer_norm(self.encoder_attn(h, encoder_state, cross_mask))
        return state + self.glu(state)


def text_mask(text_tokens: torch.Tensor, pad_token: int = 1) -> torch.Tensor:
    """Boolean ``[B, T]``: ``True`` where a text token is real (not padding)."""
    return text_tokens.ne(pad_token)


class DalleBartEncoder(nn.Module):
    """Text encoder: token + position embeddings, layer norm, NormFormer layers, final norm."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_count
        self.embed_tokens = nn.Embedding(config.text_vocab_count, d)
        self.embed_positions = nn.Embedding(config.text_token_count, d)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layer_count))
        self.layernorm_embedding = LayerNorm(d, config.layer_norm_eps)
        self.final_ln = LayerNorm(d, config.layer_norm_eps, scale=False)

    def forward(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Encode text ids ``[B, T]`` (T <= text_token_count, padded with 1) into states ``[B, T, D]``."""
        t = text_tokens.shape[1]
        positions = torch.arange(t, device=text_tokens.device)
        state = self.layernorm_embedding(self.embed_tokens(text_tokens) + self.embed_positions(positions))
        mask = text_mask(text_tokens, self.config.text_pad_token)[:, None, None, :]
        for layer in self.layers:
            state = layer(state, mask)
        return self.final_ln(state)


class DalleBartDecoder(nn.Module):
    """Image-token decoder: a causal transformer over VQGAN codes, cross-attending to the text."""

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_count
        self.embed_tokens = nn.Embedding(config.image_vocab_count + 1, d)
        self.embed_positions = nn.Embedding(config.image_token_count, d)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layer_count))
        self.layernorm_embedding = LayerNorm(d, config.layer_norm_eps)
        self.final_ln = LayerNorm(d, config.layer_norm_eps, scale=False)
        self.lm_head = nn.Linear(d, config.image_vocab_count + 1, bias=False)

    def forward(self, image_tokens: torch.Tensor, encoder_state: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, image_vocab_count + 1]`` for the token after each input position.

        Parameters
        ----------
        image_tokens
            Decoder inputs ``[B, T]`` (T <= image_token_count): the start token then codes.
        encoder_state
            Encoder output ``[B, S, D]``.
        text_tokens
            The text ids ``[B, S]`` the encoder saw (padding, id 1, is not attended to).
        """
        t = image_tokens.shape[1]
        positions = torch.arange(t, device=image_tokens.device)
        state = self.layernorm_embedding(self.embed_tokens(image_tokens) + self.embed_positions(positions))
        causal = torch.ones(t, t, dtype=torch.bool, device=image_tokens.device).tril()
        cross = text_mask(text_tokens, self.config.text_pad_token)[:, None, None, :]
        for layer in self.layers:
            state = layer(state, encoder_state, causal, cross)
        return self.lm_head(self.final_ln(state))


class DalleBart(nn.Module):
    """Encoder and decoder together: the module a DALL·E subject records from.

    Module names are ``encoder.*`` and ``decoder.*``; the state dicts of the two
    children are min-dalle's ``encoder.pt`` and ``decoder.pt``.
    """

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DalleBartEncoder(config)
        self.decoder = DalleBartDecoder(config)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, image_vocab_count + 1]`` for decoder inputs ``image_tokens``."""
        return self.decoder(image_tokens, self.encoder(text_tokens), text_tokens)


def init_random(model: nn.Module, std: float, seed: int = 0) -> nn.Module:
    """Initialise ``model`` as an untrained control: normal(0, std) weights, unit scales, zero shifts.

    dalle-mini initialised dense kernels and embeddings from ``normal(init_std)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * std)
    return model
