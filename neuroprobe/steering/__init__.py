"""Steering: PPLM (Dathathri et al. 2020) as an intervention beside lesions.

``steer(model, tokenizer, prompt, bag="space")`` returns a steered and an unsteered
continuation and the bag's probability mass per step; attribute models (bags of
words, discriminator heads) live in :mod:`neuroprobe.steering.attributes`, the
concept-cell analysis in :mod:`neuroprobe.steering.analysis`.
"""
from __future__ import annotations

from neuroprobe.steering.attributes import (
    BagOfWords,
    ClassificationHead,
    Discriminator,
    available_bags,
    bag_from_words,
    load_bag,
    load_discriminator,
)
from neuroprobe.steering.pplm import PPLMHyperparameters, SteeringResult, steer

__all__ = [
    "BagOfWords",
    "ClassificationHead",
    "Discriminator",
    "PPLMHyperparameters",
    "SteeringResult",
    "available_bags",
    "bag_from_words",
    "load_bag",
    "load_discriminator",
    "steer",
]
