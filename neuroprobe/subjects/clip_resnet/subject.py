"""``clip-rn50``, ``clip-rn101``, ``clip-rn50x4``: OpenAI CLIP with its modified-ResNet image tower.

Goh et al. (2021) found the multimodal neurons of CLIP (the Spider-Man and Halle Berry
units) in RN50x4's last ResNet block; these subjects put electrodes on every block.

Streams (the position axis a site's units live on; sizes for RN50 at 224 px, RN50x4 at 288 px)
------------------------------------------------------------------------------------------
``image-GxG``
    The ``G×G`` positions of a feature map: ``image-56x56`` for the stem and ``layer1``
    (RN50x4: 72), then 28, 14, 7 for ``layer2``…``layer4`` (RN50x4: 36, 18, 9).
``image``
    One position per image: the attention pool.
``text``
    The BPE tokens, ``<|startoftext|>`` … ``<|endoftext|>``; padding masked.

Sites
-----
``image.stem`` (the stem after its pool), ``image.layer<K>.<i>`` (every bottleneck block's
output: ``conv`` units, one per channel, canonical ``[B, G·G, C]``), ``image.attnpool`` (the
attention pool's output, the image embedding), ``image.attnpool.heads`` (its heads before
the output projection), and per text block ``text.<i>`` (residual stream), ``text.<i>.mlp``
(QuickGELU units), ``text.<i>.attn`` (heads).  Montages: ``mlp`` = text MLP units, every
bottleneck output and the attention pool; ``resid`` = text blocks, stem, bottleneck outputs,
attention pool; ``attn`` = text heads and the pool's heads.

Readout ``zero_shot``: as the Hugging Face ``clip`` subject
(:func:`neuroprobe.subjects.vision_language.readout_zero_shot`): log-softmax over the battery's
concept prompts of ``logit_scale · cos`` at the stimulus's concept.

Files
-----
``--weights`` is OpenAI's released file (``RN50.pt``, ``RN50x4.pt``: TorchScript archives, read
as described in :mod:`neuroprobe.subjects.clip_resnet.load`), a state dict with the same keys
(``.safetensors`` or ``.bin``/``.pt``), or a folder holding one, optionally with a
``config.json`` (:class:`~neuroprobe.subjects.clip_resnet.config.CLIPResNetConfig` fields; needed
only for shapes the published rule cannot infer, e.g. tiny test models) and tokenizer files.
Without ``--weights`` the file is looked up in ``~/.cache/clip`` (where ``clip.load`` puts it).
The tokenizer (the same 49 408-token BPE for every OpenAI CLIP) comes from the weights folder,
else from the Hugging Face cache of ``openai/clip-vit-base-patch32``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.stimuli.images import ClipPreprocess
from neuroprobe.subjects.base import Batch, SitePattern as P, Subject, encode_dual_encoder
from neuroprobe.subjects.clip_resnet.config import VARIANTS, CLIPResNetConfig, Variant
from neuroprobe.subjects.clip_resnet.load import load_clip_resnet, resolve_weights
from neuroprobe.subjects.clip_resnet.model import CLIPResNet

#: Hub id whose tokenizer files are OpenAI CLIP's BPE (shared by every OpenAI CLIP model).
TOKENIZER_ID = "openai/clip-vit-base-patch32"


def grid_stream(side: int) -> str:
    """Stream name of a ``side × side`` feature map."""
    return f"image-{side}x{side}"


def clip_resnet_site_patterns(config: CLIPResNetConfig) -> dict[str, list[P]]:
    """Site patterns of :class:`~neuroprobe.subjects.clip_resnet.model.CLIPResNet` (``*`` = one path segment)."""
    blocks = [P(f"visual.layer{k}.*", "output", "conv", grid_stream(config.grid(k)), "BCHW", name=f"image.layer{k}.{{0}}")
              for k in range(1, 5)]
    stem = P("visual.avgpool", "output", "conv", grid_stream(config.grid(0)), "BCHW", name="image.stem")
    pool = P("visual.attnpool", "output", "embed", "image", "BU", name="image.attnpool")
    heads = P("visual.attnpool.c_proj", "input", "attn", "image", "BU", name="image.attnpool.heads",
              n_heads=config.vision_heads)
    text = "transformer.resblocks.*"
    return {
        "mlp": [P(f"{text}.mlp.c_proj", "input", "mlp", "text", name="text.{0}.mlp"), *blocks, pool],
        "resid": [P(text, "output", "resid", "text", name="text.{0}"), stem, *blocks, pool],
        "attn": [P(f"{text}.attn.out_proj", "input", "attn", "text", name="text.{0}.attn",
                   n_heads=config.transformer_heads), heads],
    }


def load_tokenizer(folder: Path | None) -> Any:
    """CLIP's BPE tokenizer: tokenizer files in ``folder``, else the Hugging Face cache (never downloads)."""
    from transformers import AutoTokenizer, CLIPTokenizerFast

    if folder is not None and folder.is_dir():
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    try:
        return AutoTokenizer.from_pretrained(TOKENIZER_ID, local_files_only=True)
    except Exception:  # not in the cache: CLIP's own BPE, shipped with neuroprobe (exact: same pieces and ids)
        from neuroprobe.subjects.offline import build_tokenizer, recipe_available

        if recipe_available("clip-bpe"):
            return build_tokenizer("clip-bpe")
        raise MissingWeightsError(
            f"CLIP's tokenizer was not found: put its files (tokenizer.json, or vocab.json and merges.txt) beside "
            f"the weights, or get {TOKENIZER_ID} into the Hugging Face cache (HF_HOME)."
        ) from None


class CLIPResNetSubject(Subject):
    """A CLIP ResNet's two towers as one subject (see the module docstring)."""

    modalities = ("text", "image", "pair")
    split_by_modality = True
    default_readout = "zero_shot"
    #: the two towers in forward order (the stem's convolutions and norms, the bottlenecks, the
    #: attention pool; the token embedding, the text blocks, the final norm): independent chains
    block_order = {
        "image": ["visual.conv1", "visual.bn1", "visual.relu1", "visual.conv2", "visual.bn2", "visual.relu2",
                  "visual.conv3", "visual.bn3", "visual.relu3", "visual.avgpool", "visual.layer*.*", "visual.attnpool"],
        "text": ["token_embedding", "transformer.resblocks.*", "ln_final"],
    }
    block_inputs: dict[str, tuple[str, ...]] = {}

    def __init__(self, name: str, model: CLIPResNet, tokenizer: Any, **kwargs: Any) -> None:
        from neuroprobe.subjects.vision_language import readout_zero_shot

        super().__init__(name, model, **kwargs)
        self.config: CLIPResNetConfig = model.config
        self.tokenizer = tokenizer
        self.site_patterns = clip_resnet_site_patterns(self.config)
        self.readouts = {"zero_shot": readout_zero_shot}
        #: openai/CLIP's own transform (resize in the image's mode, rounded crop, then RGB), not transformers'
        self.preprocess = ClipPreprocess.openai(self.config.image_resolution)
        self._prompt_cache: tuple[tuple[str, ...], torch.Tensor] | None = None

    # ---------------------------------------------------------------- encode
    def _tokenize(self, texts: list[str], concepts: list[str] | None, battery: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.context_length,
                             return_tensors="pt", return_offsets_mapping=fast)
        offsets = enc.pop("offset_mapping", None)
        cmask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
        if concepts is not None and offsets is not None and battery is not None:
            for i, (text, concept) in enumerate(zip(texts, concepts)):
                for a, b in battery.concept_spans(text, concept):
                    o = offsets[i]
                    cmask[i] |= (o[:, 0] < b) & (o[:, 1] > a) & (o[:, 1] > o[:, 0])
        return dict(enc), cmask

    def image_streams(self) -> dict[str, int]:
        """Image stream name -> positions per image."""
        out = {grid_stream(self.config.grid(k)): self.config.grid(k) ** 2 for k in range(5)}
        out["image"] = 1
        return out

    def encode(self, stimuli: pd.DataFrame, battery: Any) -> Batch:
        """One modality per batch: text tokens, image pixels, or both for pairs."""
        return encode_dual_encoder(stimuli, battery, self.name, self._tokenize, self.preprocess, self.image_streams())

    # --------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Run the towers the batch needs; returns ``text_embeds`` and/or ``image_embeds`` (not normalised)."""
        inputs = batch.to(self.device).inputs
        out: dict[str, torch.Tensor] = {}
        if "input_ids" in inputs:
            lengths = inputs["attention_mask"].sum(dim=1)
            out["text_embeds"] = self.model.encode_text(inputs["input_ids"], lengths)
        if "pixel_values" in inputs:
            out["image_embeds"] = self.model.encode_image(inputs["pixel_values"])
        return out

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[N, E]`` (float32)."""
        enc, _ = self._tokenize(list(texts), None, None)
        out = self.forward(Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
        return torch.nn.functional.normalize(out["text_embeds"].float(), dim=-1)

    def image_embeddings(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm image embeddings ``[N, E]`` (float32) of PIL images."""
        out = self.forward(Batch(inputs={"pixel_values": self.preprocess(list(images))}))
        return torch.nn.functional.normalize(out["image_embeds"].float(), dim=-1)

    # --------------------------------------------------------------- readout
    def prompt_embeddings(self, battery: Any, copies: int = 1) -> tuple[list[str], torch.Tensor]:
        """The battery's concepts and their prompt embeddings: as the ``clip`` subject's
        (:meth:`neuroprobe.subjects.vision_language.CLIPSubject.prompt_embeddings`)."""
        from neuroprobe.subjects.vision_language import _prompt_embeddings

        return _prompt_embeddings(self, battery, copies)

    def prepare_readout(self, battery: Any, name: str | None = None) -> None:
        """Embed the concept prompts with the intact model, so a lesion is scored against them."""
        self._prompt_cache = None
        concepts, protos = self.prompt_embeddings(battery)
        self._prompt_cache = (tuple(str(battery.concepts[c]["prompt"]) for c in concepts), protos)


def _config_from(folder: Path | None, variant: Variant) -> CLIPResNetConfig:
    if folder is not None and (folder / "config.json").is_file():
        return CLIPResNetConfig.from_json(folder / "config.json")
    return variant.config


def load_clip_resnet_subject(
    spec: Any,
    *,
    init: str = "pretrained",
    weights: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    **options: Any,
) -> CLIPResNetSubject:
    """Registry loader for the CLIP ResNet subjects (``spec.extra["variant"]`` names the release).

    ``init="random"`` builds the published shape (or ``config.json`` in ``--weights DIR``) with the
    original initialisation, seeded by ``seed`` (on ``device="meta"``: the shapes only).  Takes no options.
    """
    if options:
        raise NeuroprobeError(f"subject {spec.name!r} takes no options, not {', '.join(sorted(options))}.")
    variant = VARIANTS[spec.extra["variant"]]
    folder = None
    if weights is not None:
        folder = weights if weights.is_dir() else weights.parent
    config = _config_from(folder, variant)
    # find every piece before building anything, and name all that are missing in one message
    problems: list[str] = []
    tokenizer = path = None
    try:
        tokenizer = load_tokenizer(folder)
    except MissingWeightsError as err:
        problems.append(str(err).rstrip("."))
    if init != "random":
        try:
            path = resolve_weights(weights, variant)
        except MissingWeightsError as err:
            problems.append(str(err).rstrip("."))
    if problems:
        raise MissingWeightsError("; and ".join(problems) + ".")
    if init == "random" and torch.device(device).type == "meta":  # shapes only (`neuroprobe sites`)
        with torch.device("meta"):
            model = CLIPResNet(config)
    elif init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPResNet(config)
    else:
        has_config = folder is not None and (folder / "config.json").is_file()
        model = load_clip_resnet(path, dtype=torch.float32, config=config if has_config else None,
                                 expect=None if has_config else variant.config)
    model = model.to(device=device, dtype=dtype)
    if len(tokenizer) > config.vocab_size:
        raise NeuroprobeError(f"the tokenizer has {len(tokenizer)} tokens but the model's table has {config.vocab_size}.")
    return CLIPResNetSubject(spec.name, model, tokenizer, device=device, init=init,
                             checkpoint=spec.checkpoint, revision=spec.revision, seed=seed)
