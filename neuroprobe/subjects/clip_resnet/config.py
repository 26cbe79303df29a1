"""Shapes of OpenAI CLIP's ResNet models (Radford et al. 2021), as published.

The hyper-parameters are the ones ``clip.model.build_model`` of openai/CLIP infers
from each released checkpoint (``RN50.pt``, ``RN50x4.pt`` ...); the download URLs
and their SHA-256 digests are those of ``clip/clip.py``.  :meth:`CLIPResNetConfig.from_state_dict`
infers a config from a state dict the same way ``build_model`` does, so a file with
other shapes (a tiny test model) loads too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from neuroprobe.errors import NeuroprobeError

#: Where OpenAI publishes the checkpoints: ``{sha256}/{file}``.
URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"


@dataclass(frozen=True)
class CLIPResNetConfig:
    """Shape of a CLIP with a modified-ResNet image tower.

    Attributes
    ----------
    embed_dim
        Width of the joint embedding (attention-pool output and text projection).
    image_resolution
        Input side in pixels (the attention pool's positional embedding covers
        ``(image_resolution // 32) ** 2 + 1`` positions).
    vision_layers
        Bottleneck blocks in ``layer1`` … ``layer4``.
    vision_width
        Stem width; ``layerK`` has ``vision_width * 2**(K-1) * 4`` output channels.
    context_length, vocab_size, transformer_width, transformer_heads, transformer_layers
        The causal text transformer.
    """

    embed_dim: int = 1024
    image_resolution: int = 224
    vision_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    vision_width: int = 64
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def vision_heads(self) -> int:
        """Heads of the attention pool (``vision_width * 32 // 64``, as in the original)."""
        return self.vision_width * 32 // 64

    @property
    def feature_dim(self) -> int:
        """Channels of the last ResNet block (``vision_width * 32``)."""
        return self.vision_width * 32

    def grid(self, stage: int) -> int:
        """Side of the feature map after ``stage`` (0 = stem, 1…4 = ``layer1``…``layer4``)."""
        side = self.image_resolution // 4  # stride-2 first conv, then the stem's 2x2 average pool
        return side >> max(stage - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        d = dataclasses.asdict(self)
        d["vision_layers"] = list(self.vision_layers)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPResNetConfig":
        """Config from a dict with (a subset of) the fields; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise NeuroprobeError(f"unknown CLIP-ResNet config fields: {', '.join(unknown)}.")
        kwargs = dict(data)
        if "vision_layers" in kwargs:
            kwargs["vision_layers"] = tuple(int(x) for x in kwargs["vision_layers"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPResNetConfig":
        """Read a ``config.json`` written by :meth:`to_dict`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "CLIPResNetConfig":
        """Infer the shape from a checkpoint's tensors, the way the original ``build_model`` does."""
        try:
            layers = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
            )
            pos = sd["visual.attnpool.positional_embedding"].shape[0]
            grid = round((pos - 1) ** 0.5)
            width = sd["ln_final.weight"].shape[0]
            return cls(
                embed_dim=int(sd["text_projection"].shape[1]),
                image_resolution=int(grid * 32),
                vision_layers=layers,  # type: ignore[arg-type]
                vision_width=int(sd["visual.layer1.0.conv1.weight"].shape[0]),
                context_length=int(sd["positional_embedding"].shape[0]),
                vocab_size=int(sd["token_embedding.weight"].shape[0]),
                transformer_width=int(width),
                transformer_heads=max(int(width // 64), 1),  # not stored; the original's rule
                transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            )
        except KeyError as err:
            raise NeuroprobeError(
                f"the checkpoint is not an OpenAI CLIP ResNet state dict (it has no {err.args[0]!r}); "
                f"give RN50.pt, RN50x4.pt or a file with the same keys."
            ) from None


@dataclass(frozen=True)
class Variant:
    """One released checkpoint: its file, digest and shape."""

    file: str
    sha256: str
    config: CLIPResNetConfig

    @property
    def url(self) -> str:
        """Download URL (the digest is part of it)."""
        return URL.format(sha256=self.sha256, file=self.file)


#: The released ResNet checkpoints (shapes as ``build_model`` infers them from each file).
VARIANTS: dict[str, Variant] = {
    "RN50": Variant(
        "RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
        CLIPResNetConfig(1024, 224, (3, 4, 6, 3), 64, 77, 49408, 512, 8, 12),
    ),
    "RN101": Variant(
        "RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
        CLIPResNetConfig(512, 224, (3, 4, 23, 3), 64, 77, 49408, 512, 8, 12),
    ),
    "RN50x4": Variant(
        "RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
        CLIPResNetConfig(640, 288, (4, 6, 10, 6), 80, 77, 49408, 640, 10, 12),
    ),
}
