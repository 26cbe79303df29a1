"""DALL·E as a subject: min-dalle's DALL·E Mini/Mega transformer, its VQGAN detokenizer, OpenAI's dVAE.

OpenAI released only DALL·E's discrete VAE, not its transformer; the transformer
studied here is DALL·E Mini / Mega (dalle-mini, as converted to PyTorch by
kuprel/min-dalle), which predicts VQGAN codes (16 x 16 grid, 16384 codes) from a
BART-encoded text.
"""
from neuroprobe.subjects.dalle.bart import DalleBart, DalleBartDecoder, DalleBartEncoder
from neuroprobe.subjects.dalle.config import DalleConfig
from neuroprobe.subjects.dalle.dvae import encode_image_dvae, load_dvae, map_pixels
from neuroprobe.subjects.dalle.load import DalleBundle, load_dalle, load_detokenizer
from neuroprobe.subjects.dalle.score import image_token_logprobs, score_image_tokens
from neuroprobe.subjects.dalle.tokenizer import TextTokenizer
from neuroprobe.subjects.dalle.vqgan import VQGANConfig, VQGANDetokenizer

__all__ = [
    "DalleBart",
    "DalleBartDecoder",
    "DalleBartEncoder",
    "DalleBundle",
    "DalleConfig",
    "TextTokenizer",
    "VQGANConfig",
    "VQGANDetokenizer",
    "encode_image_dvae",
    "image_token_logprobs",
    "load_dalle",
    "load_detokenizer",
    "load_dvae",
    "map_pixels",
    "score_image_tokens",
]
