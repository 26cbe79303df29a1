"""Sizes and special tokens of the DALL·E Mega / Mini transformers (min-dalle ports).

The numbers are those of kuprel/min-dalle (``min_dalle/min_dalle.py``) and of the
dalle-mini training configurations it was converted from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

#: Hugging Face repository holding min-dalle's converted weights.
HUB_REPO = "kuprel/min-dalle"

#: Number of VQGAN codes (``2 ** 14``); logits beyond it are not image codes.
VQGAN_CODES = 2**14


@dataclass(frozen=True)
class DalleConfig:
    """Architecture of one DALL·E BART (text encoder + image-token decoder).

    Attributes
    ----------
    variant
        ``"mega"``, ``"mini"`` or ``"tiny"`` (tests only).
    embed_count
        Model width.
    layer_count
        Layers in the encoder and (the same number) in the decoder.
    head_count
        Attention heads.
    glu_embed_count
        Width of the gated feed-forward (GLU) hidden layer.
    text_vocab_count
        Rows of the text embedding.
    text_token_count
        Text positions (64: prompts are padded with :attr:`text_pad_token` to this length).
    image_vocab_count
        The decoder has ``image_vocab_count + 1`` embedding rows and output logits.
    image_token_count
        Image positions (256 = a 16 x 16 VQGAN grid).
    code_count
        Valid image codes (the VQGAN vocabulary); scoring normalises over these.
    bos_token
        The decoder's start token.  dalle-mini trained both models with
        ``decoder_start_token_id = 16384``; min-dalle's sampler used
        ``image_vocab_count`` (16415 for Mega) before v0.4.11 and ``2**14 - 1`` after.
    text_pad_token, text_bos_token, text_eos_token
        Special text ids (BART's ``<pad>=1``, ``<s>=0``, ``</s>=2``).
    layer_norm_eps
        LayerNorm epsilon (dalle-mini used 1e-5).
    init_std
        Standard deviation of the normal initialisation of the untrained control.
    hub_files
        File names in :data:`HUB_REPO` (``encoder``, ``decoder``, ``vocab``, ``merges``).
    """

    variant: str
    embed_count: int
    layer_count: int
    head_count: int
    glu_embed_count: int
    text_vocab_count: int
    text_token_count: int = 64
    image_vocab_count: int = 16384
    image_token_count: int = 256
    code_count: int = VQGAN_CODES
    bos_token: int = 16384
    text_pad_token: int = 1
    text_bos_token: int = 0
    text_eos_token: int = 2
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    hub_files: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def mega(cls) -> "DalleConfig":
        """DALL·E Mega: width 2048, 24 + 24 layers, 32 heads (about 2.6 B parameters)."""
        return cls(
            variant="mega",
            embed_count=2048,
            layer_count=24,
            head_count=32,
            glu_embed_count=4096,
            text_vocab_count=50272,
            image_vocab_count=16415,
            init_std=0.01,
            hub_files={"encoder": "encoder.pt", "decoder": "decoder.pt", "vocab": "vocab.json", "merges": "merges.txt"},
        )

    @classmethod
    def mini(cls) -> "DalleConfig":
        """DALL·E Mini: width 1024, 12 + 12 layers, 16 heads (about 0.4 B parameters)."""
        return cls(
            variant="mini",
            embed_count=1024,
            layer_count=12,
            head_count=16,
            glu_embed_count=2730,
            text_vocab_count=50264,
            image_vocab_count=16384,
            hub_files={
                "encoder": "encoder_mini.pt",
                "decoder": "decoder_mini.pt",
                "vocab": "vocab_mini.json",
                "merges": "merges_mini.txt",
            },
        )

    @classmethod
    def tiny(cls) -> "DalleConfig":
        """A tiny model of the same architecture for tests (random weights only)."""
        return cls(
            variant="tiny",
            embed_count=32,
            layer_count=2,
            head_count=4,
            glu_embed_count=40,
            text_vocab_count=64,
            text_token_count=16,
            image_vocab_count=40,
            image_token_count=16,
            code_count=36,
            bos_token=36,
            hub_files={"encoder": "encoder.pt", "decoder": "decoder.pt", "vocab": "vocab.json", "merges": "merges.txt"},
        )

    @classmethod
    def named(cls, variant: str) -> "DalleConfig":
        """Config by variant name (``mega``, ``mini`` or ``tiny``)."""
        makers = {"mega": cls.mega, "mini": cls.mini, "tiny": cls.tiny}
        if variant not in makers:
            from neuroprobe.errors import NeuroprobeError

            raise NeuroprobeError(f"unknown DALL-E variant {variant!r}; choose mega or mini.")
        return makers[variant]()

    def with_(self, **changes) -> "DalleConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)


#: The VQGAN detokenizer file (shared by both variants).
DETOKENIZER_FILE = "detoker.pt"
