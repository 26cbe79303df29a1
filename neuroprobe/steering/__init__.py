"""Steering: PPLM (Dathathri et al. 2020) as an intervention beside lesions.

``steer(model, tokenizer, prompt, bag="space")`` returns a steered and an unsteered
continuation and the bag's probability mass per step; attribute models (bags of
words, discriminator heads) live in :mod:`neuroprobe.steering.attributes`, the
concept-cell analysis in :mod:`neuroprobe.steering.analysis`.
"""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "BagOfWords": "neuroprobe.steering.attributes",
    "ClassificationHead": "neuroprobe.steering.attributes",
    "Discriminator": "neuroprobe.steering.attributes",
    "available_bags": "neuroprobe.steering.attributes",
    "bag_from_words": "neuroprobe.steering.attributes",
    "load_bag": "neuroprobe.steering.attributes",
    "load_discriminator": "neuroprobe.steering.attributes",
    "PPLMHyperparameters": "neuroprobe.steering.pplm",
    "SteeringResult": "neuroprobe.steering.pplm",
    "steer": "neuroprobe.steering.pplm",
    "continuation_perplexity": "neuroprobe.steering.analysis",
    "steering_tradeoff": "neuroprobe.steering.analysis",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["BagOfWords", "ClassificationHead", "Discriminator", "PPLMHyperparameters", "SteeringResult", "available_bags", "bag_from_words", "continuation_perplexity", "load_bag", "load_discriminator", "steer", "steering_tradeoff"]
