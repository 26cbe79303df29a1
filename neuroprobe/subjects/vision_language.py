"""Image-taking transformers subjects: CLIP, LXMERT and VisualBERT.

All three are :class:`~neuroprobe.subjects.hf.HFSubject` subclasses, built by
``load_subject("clip" | "lxmert" | "visualbert")`` through the ``subject_class`` of
their :data:`~neuroprobe.subjects.hf.ARCHITECTURES` entry; site patterns live there.

CLIP (:class:`CLIPSubject`)
    Streams ``text`` (tokens, padding masked) and ``image`` (the class token then
    the patches; every position real).  Text and image go through separate towers,
    so a batch is one modality (:attr:`CLIPSubject.split_by_modality`: the Recorder
    groups each batch by modality and the sites of the other tower simply do not
    fire for that group); a pair stimulus runs both towers.  Images are
    preprocessed by :class:`~neuroprobe.stimuli.images.ClipPreprocess`.
    Readout ``zero_shot``: log-softmax over the battery's concept prompts of CLIP's
    logits (``logit_scale · cos``) at the stimulus's concept; image and pair
    stimuli score their image against the prompts, text stimuli their text
    (text-to-text similarity to the same prompt prototypes).

LXMERT (:class:`LxmertSubject`)
    Streams ``text`` and ``image`` (the regions).  Regions (2048-d features and
    boxes normalised by the image size) come from a precomputed features file
    (``features=``: an LXMERT ``*_obj36.tsv`` or a region-feature HDF5 file, looked
    up by the image's file stem) or from the bottom-up-attention Faster R-CNN
    (``detector_weights=DIR`` or the hub copy ``unc-nlp/frcnn-vg-finetuned``), 36
    per image.  The detector is preprocessing: it is pretrained even for
    ``init="random"``.  Text of an image-only stimulus: ``image_text`` (default the
    empty text, i.e. ``[CLS] [SEP]``; ``"{prompt}"`` uses the concept prompt) — the
    empty default keeps concept words out of image stimuli, so text units cannot
    answer to a concept through a caption the stimulus does not have.  Visual input
    of a text-only stimulus: one blank region (zero feature, whole-image box
    ``0, 0, 1, 1``), because LXMERT cannot run without regions.
    The shared cross-attention module ``visual_attention`` fires twice per layer:
    call 0 is language queries over image keys (text positions), call 1 image
    queries over language keys (region positions).

VisualBERT (:class:`VisualBertSubject`)
    One ``joint`` stream: the text tokens then the regions (same sources as LXMERT;
    features must have the config's ``visual_embedding_dim``).  Text-only stimuli
    have no regions (VisualBERT runs on text alone).  Token ids of regions in
    recordings are ``-(r + 1)`` for region ``r``.

Readouts of LXMERT and VisualBERT
    ``matching``: log-softmax over the battery's concepts of the image–text match
    log-odds (LXMERT ``cross_relationship_score``, label 1 = match; VisualBERT
    ``seq_relationship_logits``, label 0 = match) at the stimulus's concept.  Image
    and pair stimuli: their image against every concept prompt; text stimuli: their
    text against every concept's reference image (its first image stimulus that is
    not a written name).
    ``masked_lm``: log p of the cloze target's tokens with the stimulus's image as
    visual input (text stimuli: the visual input above).
    ``vqa`` (LXMERT): log-softmax over the answer vocabulary, at the concept's names
    (log-sum-exp when several are answers), for the pair's question or the battery's
    ``vqa_question`` ("What is in the picture?"); the vocabulary is chosen by the
    head's size: 3129 VQA, 1842 GQA, 9500 pre-training answers (``neuroprobe/data/lxmert``).
    A readout that does not apply to a stimulus gives NaN for it (``vqa`` and the
    contrast of ``matching`` for text stimuli without reference images).

Batched lesions of LXMERT and VisualBERT
    Every readout is :func:`~neuroprobe.subjects.base.replica_safe`: ``vqa`` and
    ``masked_lm`` make one pass over the rows they score; ``matching`` makes one pass per
    block of :data:`CONCEPTS_PER_PASS` concepts, each over every scored row's pairs in row
    order (:func:`concept_pair_scores`), so the passes do not depend on how many rows there
    are.  Regions are looked up once per image and call (:meth:`_RegionSubject.region_table`;
    the detector's are also kept by :class:`RegionSource`), so rows tiled once per lesion do
    not re-run it.  Block order (``block_order``, ``block_inputs``): LXMERT runs the chains
    ``language`` (``encoder.layer.*``), ``vision`` (``encoder.r_layers.*``), then ``cross``
    (``encoder.x_layers.*``), which reads both; VisualBERT one chain ``joint``
    (``encoder.layer.*``).  Each block runs once per pass.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.stimuli.images import ClipPreprocess
from neuroprobe.subjects.base import Batch, encode_dual_encoder, replica_safe
from neuroprobe.subjects.copies import stimulus_copies
from neuroprobe.subjects.hf import HFSubject, masked_cloze, masked_target_logprob

#: Question asked of image stimuli by the ``vqa`` readout (``battery.json`` key ``vqa_question`` overrides).
DEFAULT_QUESTION = "What is in the picture?"

#: Concepts per forward pass of the ``matching`` readout (pass ``j`` pairs every scored stimulus with
#: concepts ``j*K .. j*K+K-1``; see :func:`concept_pair_scores`).
CONCEPTS_PER_PASS = 4

#: Answer vocabularies by head size (files under ``neuroprobe/data/lxmert``).
ANSWER_FILES = {3129: "vqa/trainval_label2ans.json", 1842: "gqa/trainval_label2ans.json", 9500: "lxmert/all_ans.json"}

DATA = Path(__file__).resolve().parents[1] / "data" / "lxmert"


def _rows_with(stimuli: pd.DataFrame, *modalities: str) -> np.ndarray:
    return np.flatnonzero(stimuli["modality"].isin(modalities).to_numpy())


# ============================================================================ CLIP


class CLIPSubject(HFSubject):
    """CLIP's two towers as one subject (see the module docstring)."""

    split_by_modality = True
    #: the two towers in forward order (embeddings, blocks, final norm, projection): independent chains
    block_order = {
        "text": ["text_model.embeddings", "text_model.encoder.layers.*", "text_model.final_layer_norm",
                 "text_projection"],
        "image": ["vision_model.embeddings", "vision_model.pre_layrnorm", "vision_model.encoder.layers.*",
                  "vision_model.post_layernorm", "visual_projection"],
    }
    block_inputs: dict[str, tuple[str, ...]] = {}

    def setup(self, **options: Any) -> None:
        """Read the image preprocessing settings; CLIP takes no options."""
        super().setup(**options)
        self.modalities = ("text", "image", "pair")
        vision = self.model.config.vision_config
        self.preprocess = ClipPreprocess.from_source(
            self.checkpoint, int(vision.image_size), None if self.revision == "local" else self.revision
        )
        self.readouts = {"zero_shot": readout_zero_shot}
        self.default_readout = "zero_shot"
        self._prompt_cache: tuple[tuple[str, ...], torch.Tensor] | None = None

    @property
    def n_image_positions(self) -> int:
        """Class token plus patches."""
        return int(self.model.vision_model.embeddings.num_positions)

    # ---------------------------------------------------------------- encode
    def encode(self, stimuli: pd.DataFrame, battery) -> Batch:
        """One modality per batch: text tokens, image pixels, or both for pairs."""
        return encode_dual_encoder(stimuli, battery, self.name, self._tokenize, self.preprocess,
                                   {"image": self.n_image_positions})

    # --------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Run the towers the batch needs; returns ``text_embeds`` and/or ``image_embeds`` (projected)."""
        inputs = batch.to(self.device).inputs
        out: dict[str, torch.Tensor] = {}
        if "input_ids" in inputs:
            t = self.model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            out["text_embeds"] = self.model.text_projection(t.pooler_output)
        if "pixel_values" in inputs:
            dtype = next(self.model.parameters()).dtype
            v = self.model.vision_model(pixel_values=inputs["pixel_values"].to(dtype))
            out["image_embeds"] = self.model.visual_projection(v.pooler_output)
        return out

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``[N, E]`` (float32)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.forward(Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
        return torch.nn.functional.normalize(out["text_embeds"].float(), dim=-1)

    def image_embeddings(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm projected image embeddings ``[N, E]`` (float32) of PIL images."""
        out = self.forward(Batch(inputs={"pixel_values": self.preprocess(list(images))}))
        return torch.nn.functional.normalize(out["image_embeds"].float(), dim=-1)

    # --------------------------------------------------------------- readout
    def prompt_embeddings(self, battery, copies: int = 1) -> tuple[list[str], torch.Tensor]:
        """The battery's concepts and their prompt embeddings.

        ``[C, E]`` from :meth:`prepare_readout` (the intact model) if it ran; otherwise encoded
        by the model as it is now, ``copies`` times in one pass (``[copies, C, E]`` when
        ``copies > 1``: one set per copy of tiled stimuli, see :func:`readout_zero_shot`).
        """
        return _prompt_embeddings(self, battery, copies)

    def prepare_readout(self, battery, name: str | None = None) -> None:
        """Embed the concept prompts with the intact model, so a lesion is scored against them."""
        concepts = battery.concept_names
        prompts = tuple(str(battery.concepts[c]["prompt"]) for c in concepts)
        self._prompt_cache = None
        with torch.inference_mode():
            self._prompt_cache = (prompts, self.text_embeddings(prompts))


def _prompt_embeddings(subject: Any, battery, copies: int = 1) -> tuple[list[str], torch.Tensor]:
    """:meth:`CLIPSubject.prompt_embeddings` (shared with the CLIP ResNets)."""
    concepts = battery.concept_names
    prompts = tuple(str(battery.concepts[c]["prompt"]) for c in concepts)
    cache = subject._prompt_cache
    if cache is not None and cache[0] == prompts:
        return concepts, cache[1]
    with torch.inference_mode():
        protos = subject.text_embeddings(list(prompts) * copies)
    return concepts, protos.view(copies, len(prompts), -1) if copies > 1 else protos


def _image_pixels(subject: Any, stimuli: pd.DataFrame, rows: np.ndarray, battery) -> torch.Tensor:
    """Preprocessed pixels of ``stimuli.iloc[rows]``, each distinct image read and preprocessed once."""
    paths = stimuli["image"].iloc[rows].astype(str).tolist()
    unique = list(dict.fromkeys(paths))
    pixels = subject.preprocess([battery.load_image(p) for p in unique])
    where = {p: i for i, p in enumerate(unique)}
    return pixels[torch.tensor([where[p] for p in paths])]


@replica_safe
def readout_zero_shot(subject: CLIPSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """log-softmax over concepts of ``logit_scale · cos(stimulus, prompt)`` at the stimulus's concept.

    One pass of the image tower over the image and pair rows, one of the text tower over the
    text rows.  Prompts come from :meth:`~CLIPSubject.prepare_readout` (the intact model) when
    it ran; otherwise the current model encodes them on each call, once per copy of the
    stimuli (:func:`~neuroprobe.subjects.copies.stimulus_copies`) in one pass, so each replica
    of a tiled call compares its stimuli with prompts that went through its own lesion.
    """
    copies = stimulus_copies(stimuli)
    concepts, protos = subject.prompt_embeddings(battery, copies)
    scale = subject.model.logit_scale.exp().float()
    out = np.full(len(stimuli), np.nan)
    emb = torch.zeros(len(stimuli), protos.shape[-1], device=protos.device)
    img = _rows_with(stimuli, "image", "pair")
    txt = _rows_with(stimuli, "text")
    if len(img):
        pixels = _image_pixels(subject, stimuli, img, battery)
        image = subject.forward(Batch(inputs={"pixel_values": pixels}))["image_embeds"]
        emb[img] = torch.nn.functional.normalize(image.float(), dim=-1).to(emb.device)
    if len(txt):
        emb[txt] = subject.text_embeddings(stimuli["text"].iloc[txt].tolist()).to(emb.device)
    if protos.dim() == 2:
        logits = scale * emb @ protos.T
    else:  # one set of prompts per copy of the stimuli
        logits = (scale * emb.view(copies, -1, emb.shape[-1]) @ protos.transpose(1, 2)).reshape(len(stimuli), -1)
    logp = logits.log_softmax(-1)
    idx = torch.tensor([concepts.index(c) for c in stimuli["concept"]], device=logp.device)
    out[:] = logp[torch.arange(len(idx)), idx].cpu().numpy()
    return out


# ================================================================== region sources


class RegionSource:
    """Image regions (features, normalised boxes) for LXMERT-style subjects.

    Parameters
    ----------
    features
        A precomputed file (``*_obj36.tsv`` or HDF5, see
        :mod:`neuroprobe.subjects.region_features`); looked up by the image path,
        file name or stem.
    detector_weights
        A folder with the Faster R-CNN's ``config.yaml`` and ``pytorch_model.bin``;
        ``None`` takes them from the Hugging Face cache (``unc-nlp/frcnn-vg-finetuned``).
    device
        Where the detector runs.
    n_regions
        Regions per image (36 for LXMERT).
    subject
        Name used in messages.

    Notes
    -----
    With a features file, images missing from it go to the detector only when
    ``detector_weights`` is also given.  The detector is loaded at its first use;
    its regions of the last :attr:`cache_size` images are kept (a features file is
    read again each time: that is cheap).
    """

    cache_size = 512

    def __init__(
        self,
        *,
        features: str | Path | None = None,
        detector_weights: str | Path | None = None,
        device: torch.device | str = "cpu",
        n_regions: int = 36,
        subject: str = "lxmert",
    ) -> None:
        from neuroprobe.subjects.region_features import RegionFeatureSource

        self.features = RegionFeatureSource(features) if features is not None else None
        self.detector_weights = Path(detector_weights) if detector_weights is not None else None
        if self.detector_weights is not None and not self.detector_weights.exists():
            raise MissingWeightsError(
                f"--detector-weights {self.detector_weights} does not exist; give the folder holding the Faster R-CNN's "
                f"config.yaml and pytorch_model.bin (unc-nlp/frcnn-vg-finetuned)."
            )
        self.device = torch.device(device)
        self.n_regions = n_regions
        self.subject = subject
        self._detector = None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def detector(self):
        """The Faster R-CNN, loaded on first use."""
        if self._detector is None:
            from neuroprobe.subjects.frcnn import DEFAULT_HUB_ID, load_detector

            try:
                self._detector = load_detector(self.detector_weights, device=self.device)
            except MissingWeightsError:
                where = f"{self.detector_weights}" if self.detector_weights else f"the Hugging Face cache ({DEFAULT_HUB_ID})"
                raise MissingWeightsError(
                    f"{self.subject} sees images as Faster R-CNN regions and the detector {DEFAULT_HUB_ID} "
                    f"(config.yaml + pytorch_model.bin) is not in {where}; download it once online, pass "
                    f"--detector-weights DIR with a local copy, pass --features FILE with precomputed "
                    f"*_obj36.tsv / HDF5 region features, or record text stimuli only (--probe kinship)."
                ) from None
        return self._detector

    def __call__(self, battery, images: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Regions of battery images (paths relative to the battery): ``[(features [R, D], boxes [R, 4])]``."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        to_detect = []
        for rel in dict.fromkeys(images):
            key = f"{battery.root}::{rel}"
            if self.features is not None and (rel in self.features or self.detector_weights is None):
                feats, boxes = self.features[rel]  # raises naming the file when the image is missing
                n = min(len(feats), self.n_regions)
                found[rel] = (torch.as_tensor(feats[:n], dtype=torch.float32),
                              torch.as_tensor(boxes[:n], dtype=torch.float32))
            elif key in self._cache:
                self._cache.move_to_end(key)
                found[rel] = self._cache[key]
            else:
                to_detect.append((key, rel))
        if to_detect:
            from neuroprobe.subjects.frcnn import extract_regions

            detector = self.detector
            out = extract_regions(detector, [battery.load_image(rel) for _, rel in to_detect], n_regions=self.n_regions)
            for i, (key, rel) in enumerate(to_detect):
                n = int(out["num_regions"][i])
                found[rel] = (out["features"][i, :n].float().cpu(), out["boxes"][i, :n].float().cpu())
                self._cache[key] = found[rel]
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [found[rel] for rel in images]


# ============================================================ LXMERT and VisualBERT


class _RegionSubject(HFSubject):
    """Shared machinery of the region-based subjects (regions, texts, readouts)."""

    split_by_modality = False
    #: index of the "image and text match" class of the matching head
    match_label = 1
    #: whether a text-only stimulus gets one blank region (LXMERT) or none (VisualBERT)
    blank_region = True

    def setup(
        self,
        detector_weights: str | Path | None = None,
        features: str | Path | None = None,
        image_text: str = "",
        n_regions: int = 36,
        regions: RegionSource | None = None,
        **options: Any,
    ) -> None:
        """Set up the region source and readouts.

        Parameters
        ----------
        detector_weights
            Faster R-CNN folder (``--detector-weights``).
        features
            Precomputed region features (``--features``).
        image_text
            Text of image-only stimuli; ``{prompt}`` and ``{name}`` are replaced by the
            concept's prompt and first name.
        n_regions
            Regions per image.
        regions
            A ready :class:`RegionSource` (overrides the two paths).
        """
        super().setup(**options)
        self.modalities = ("text", "image", "pair")
        self.regions = regions or RegionSource(features=features, detector_weights=detector_weights, device=self.device,
                                               n_regions=n_regions, subject=self.name)
        self.image_text = image_text
        self.feature_dim = self._feature_dim()

    def _feature_dim(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------- inputs
    def stimulus_texts(self, stimuli: pd.DataFrame, battery) -> list[str]:
        """The text of each stimulus (image-only stimuli: :attr:`image_text`)."""
        out = []
        for _, row in stimuli.iterrows():
            if row["modality"] == "image":
                info = battery.concepts[row["concept"]]
                names = battery.concept_words(row["concept"])
                out.append(self.image_text.format(prompt=info["prompt"], name=names[-1] if names else row["concept"]))
            else:
                out.append(str(row["text"]))
        return out

    def region_table(self, images: Sequence[str | None], battery) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Regions (features, boxes) of each distinct image among ``images`` (``None`` entries are skipped).

        Each image is looked up once, however often it occurs (stimuli tiled once per lesion
        do not re-run the detector; :class:`RegionSource` also keeps detected regions).
        """
        unique = list(dict.fromkeys(p for p in images if p))
        return dict(zip(unique, self.regions(battery, unique))) if unique else {}

    def visual_inputs(
        self,
        images: Sequence[str | None],
        battery,
        found: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded regions of images (``None`` = a text-only stimulus): features, boxes, mask ``[B, R]``.

        ``found``: regions already looked up (:meth:`region_table`); default: look them up.
        """
        if found is None:
            found = self.region_table(images, battery)
        per: list[tuple[torch.Tensor, torch.Tensor]] = []
        D = self.feature_dim
        for p in images:
            if p:
                feats, boxes = found[p]
                if feats.shape[1] != D:
                    raise NeuroprobeError(
                        f"region features of {p} have {feats.shape[1]} dimensions but {self.name} takes {D}; "
                        f"use features from the detector the model was trained with."
                    )
                per.append((feats, boxes))
            elif self.blank_region:
                per.append((torch.zeros(1, D), torch.tensor([[0.0, 0.0, 1.0, 1.0]])))
            else:
                per.append((torch.zeros(0, D), torch.zeros(0, 4)))
        R = max((len(f) for f, _ in per), default=0)
        feats = torch.zeros(len(per), R, D)
        boxes = torch.zeros(len(per), R, 4)
        mask = torch.zeros(len(per), R, dtype=torch.bool)
        for i, (f, b) in enumerate(per):
            feats[i, : len(f)], boxes[i, : len(f)], mask[i, : len(f)] = f, b, True
        return feats, boxes, mask

    def model_inputs(self, texts: Sequence[str], visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of the model (and its heads) for texts with visual inputs."""
        raise NotImplementedError

    def _image_column(self, stimuli: pd.DataFrame) -> list[str | None]:
        return [str(r["image"]) if r["modality"] in ("image", "pair") else None for _, r in stimuli.iterrows()]

    # ------------------------------------------------------------ running
    def forward(self, batch: Batch) -> Any:
        """Run the base model on an encoded batch."""
        return self.model(**batch.to(self.device).inputs)

    def head_outputs(self, texts: Sequence[str], visual) -> Any:
        """Run the pre-training head on texts with visual inputs (a readout's forward pass)."""
        head = self.require_head()
        inputs = self.model_inputs(texts, visual)
        return head(**{k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})

    def match_logodds(
        self,
        texts: Sequence[str],
        images: Sequence[str],
        battery,
        found: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """log-odds that each (text, image) pair matches, ``[N]``, in one forward pass.

        ``found``: regions already looked up (:meth:`region_table`).
        """
        if not len(texts):
            return torch.zeros(0)
        logits = self._match_logits(self.head_outputs(list(texts), self.visual_inputs(list(images), battery, found)))
        logits = logits.float()
        return logits[:, self.match_label] - logits[:, 1 - self.match_label]

    def _match_logits(self, outputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _lm_logits(self, outputs: Any) -> torch.Tensor:
        return outputs.prediction_logits

    def reference_images(self, battery) -> dict[str, str]:
        """Each concept's reference image: its first image stimulus that is not a written name."""
        t = battery.table
        imgs = t[t["modality"] == "image"]
        out: dict[str, str] = {}
        for concept in battery.concept_names:
            rows = imgs[imgs["concept"] == concept]
            preferred = rows[rows["form"] != "written-name"]
            pick = preferred if len(preferred) else rows
            if len(pick):
                out[concept] = str(pick["image"].iloc[0])
        return out


def concept_pair_scores(
    score: Callable[[list[int], list[int]], torch.Tensor],
    n_rows: int,
    n_concepts: int,
    per_pass: int = CONCEPTS_PER_PASS,
) -> torch.Tensor:
    """Scores of every (row, concept) pair, ``[n_rows, n_concepts]``, in passes over concept blocks.

    Pass ``j`` scores every row with concepts ``j*per_pass ..`` (row-major: a row's pairs
    together, rows in order), so the passes do not depend on how many rows there are and a
    pass over rows tiled once per lesion holds each copy's pairs, copy after copy
    (:func:`~neuroprobe.subjects.base.replica_safe`).

    Parameters
    ----------
    score
        ``score(rows, concepts) -> [len(rows)]``: one forward pass over the pairs
        ``(rows[k], concepts[k])``.
    n_rows, n_concepts
        How many rows and concepts.
    per_pass
        Concepts per pass.
    """
    out = torch.zeros(n_rows, n_concepts)
    if not n_rows:
        return out
    for a in range(0, n_concepts, per_pass):
        block = list(range(a, min(a + per_pass, n_concepts)))
        rows = [i for i in range(n_rows) for _ in block]
        concepts = block * n_rows
        out[:, a : a + len(block)] = score(rows, concepts).float().cpu().view(n_rows, len(block))
    return out


@replica_safe
def readout_matching(subject: _RegionSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """log-softmax over concepts of the image–text match log-odds, at the stimulus's concept.

    Every scored stimulus is paired with every concept (image and pair stimuli: their image
    with the concept's prompt; text stimuli: their text with the concept's reference image),
    in passes over blocks of concepts (:func:`concept_pair_scores`); the regions of every image
    are looked up once per call.
    """
    concepts = battery.concept_names
    prompts = [str(battery.concepts[c]["prompt"]) for c in concepts]
    refs = subject.reference_images(battery)
    has_refs = len(refs) == len(concepts)
    modality = stimuli["modality"].to_numpy()
    seen = np.isin(modality, ("image", "pair"))
    usable = np.flatnonzero(seen | (has_refs & (modality == "text")))
    out = np.full(len(stimuli), np.nan)
    if not len(usable):
        return out
    texts = stimuli["text"].astype(str).to_numpy()
    images = stimuli["image"].astype(str).to_numpy() if "image" in stimuli else np.full(len(stimuli), "")
    ref_images = [refs.get(c, "") for c in concepts]
    found = subject.region_table([images[i] for i in usable if seen[i]] + (ref_images if has_refs else []), battery)

    def score(rows: list[int], cs: list[int]) -> torch.Tensor:
        rows = [int(usable[r]) for r in rows]
        pair_texts = [prompts[c] if seen[i] else texts[i] for i, c in zip(rows, cs)]
        pair_images = [images[i] if seen[i] else ref_images[c] for i, c in zip(rows, cs)]
        return subject.match_logodds(pair_texts, pair_images, battery, found)

    logp = concept_pair_scores(score, len(usable), len(concepts)).log_softmax(-1)
    target = [concepts.index(c) for c in stimuli["concept"].iloc[usable]]
    out[usable] = logp[torch.arange(len(usable)), torch.tensor(target)].double().numpy()
    return out


@replica_safe
def readout_masked_lm(subject: _RegionSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Sum of log p(cloze target tokens) with the stimulus's image as visual input."""
    tok = subject.tokenizer
    texts, targets = masked_cloze(tok, stimuli)
    visual = subject.visual_inputs(subject._image_column(stimuli), battery)
    outputs = subject.head_outputs(texts, visual)
    logp = subject._lm_logits(outputs).float().log_softmax(-1).cpu()
    ids = tok(texts, padding=True, truncation=True, return_tensors="pt")["input_ids"]
    return masked_target_logprob(logp, ids, tok.mask_token_id, targets)


# ------------------------------------------------------------------------ LXMERT


def load_answers(n_labels: int) -> list[str]:
    """The answer vocabulary of an LXMERT answer head with ``n_labels`` outputs (label order)."""
    if n_labels not in ANSWER_FILES:
        raise NeuroprobeError(
            f"the LXMERT answer head has {n_labels} answers, which matches none of the shipped vocabularies "
            f"(VQA 3129, GQA 1842, pre-training 9500); use an LXMERT checkpoint with one of those heads."
        )
    data = json.loads((DATA / ANSWER_FILES[n_labels]).read_text(encoding="utf-8"))
    answers = [a["ans"] if isinstance(a, dict) else str(a) for a in data]
    if len(answers) != n_labels:
        raise NeuroprobeError(f"{DATA / ANSWER_FILES[n_labels]} has {len(answers)} answers, expected {n_labels}; reinstall neuroprobe.")
    return answers


class LxmertSubject(_RegionSubject):
    """LXMERT with text and region streams (see the module docstring)."""

    match_label = 1
    blank_region = True
    #: blocks in forward order: the language layers, the region (relational) layers, then the
    #: cross-modality layers, which read the last output of both streams; each runs once per pass
    block_order = {  # type: ignore[assignment]  # data here, a property of HFSubject
        "language": ["encoder.layer.*"], "vision": ["encoder.r_layers.*"], "cross": ["encoder.x_layers.*"]}
    block_inputs: dict[str, tuple[str, ...]] = {"cross": ("language", "vision")}

    def setup(self, **options: Any) -> None:  # noqa: D102 - see _RegionSubject.setup
        super().setup(**options)
        self.readouts = {"matching": readout_matching, "vqa": readout_vqa, "masked_lm": readout_masked_lm}
        self.default_readout = "matching"
        self._answers: list[str] | None = None

    def _feature_dim(self) -> int:
        return int(self.model.config.visual_feat_dim)

    def encode(self, stimuli: pd.DataFrame, battery) -> Batch:
        """Tokens of the texts and the padded regions of the images (see the module docstring)."""
        texts = self.stimulus_texts(stimuli, battery)
        enc, cmask = self._tokenize(texts, stimuli["concept"].tolist(), battery)
        feats, boxes, vmask = self.visual_inputs(self._image_column(stimuli), battery)
        inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      visual_feats=feats, visual_pos=boxes, visual_attention_mask=vmask.long())
        if "token_type_ids" in enc:
            inputs["token_type_ids"] = enc["token_type_ids"]
        R = vmask.shape[1]
        return Batch(
            inputs=inputs,
            masks={"text": enc["attention_mask"].bool(), "image": vmask},
            token_ids={"text": enc["input_ids"], "image": torch.arange(R).expand(len(texts), R).clone()},
            concept_masks={"text": cmask},
        )

    def model_inputs(self, texts: Sequence[str], visual) -> dict[str, Any]:  # noqa: D102
        feats, boxes, vmask = visual
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], visual_feats=feats.to(dtype),
                      visual_pos=boxes.to(dtype), visual_attention_mask=vmask.long())
        if "token_type_ids" in enc:
            inputs["token_type_ids"] = enc["token_type_ids"]
        return inputs

    def forward(self, batch: Batch) -> Any:  # noqa: D102
        inputs = dict(batch.to(self.device).inputs)
        dtype = next(self.model.parameters()).dtype
        inputs["visual_feats"] = inputs["visual_feats"].to(dtype)
        inputs["visual_pos"] = inputs["visual_pos"].to(dtype)
        return self.model(**inputs)

    def _head(self, need: str) -> torch.nn.Module:
        head = self.require_head()
        if need == "cls" and not hasattr(head, "cls"):
            raise NeuroprobeError(
                f"this readout needs LXMERT's pre-training heads but {self.checkpoint} has only a question-answering "
                f"head; use the vqa readout or the pre-trained checkpoint unc-nlp/lxmert-base-uncased."
            )
        return head

    def head_outputs(self, texts: Sequence[str], visual) -> Any:  # noqa: D102
        head = self.require_head()
        inputs = self.model_inputs(texts, visual)
        return head(**{k: v.to(self.device) for k, v in inputs.items()})

    def _match_logits(self, outputs: Any) -> torch.Tensor:
        self._head("cls")
        return outputs.cross_relationship_score

    def _lm_logits(self, outputs: Any) -> torch.Tensor:
        self._head("cls")
        return outputs.prediction_logits

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary of the loaded answer head."""
        if self._answers is None:
            head = self.require_head()
            if not hasattr(head, "answer_head"):
                raise NeuroprobeError(
                    f"{self.checkpoint} has no question-answering head (config task_qa is off); the vqa readout needs "
                    f"an LXMERT checkpoint trained with QA, such as unc-nlp/lxmert-base-uncased or unc-nlp/lxmert-vqa-uncased."
                )
            self._answers = load_answers(int(head.answer_head.logit_fc[-1].out_features))
        return self._answers


@replica_safe
def readout_vqa(subject: LxmertSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """log p(concept's name) among the answers, for the pair's question or the battery's ``vqa_question``."""
    answers = subject.answers
    index = {a.lower(): i for i, a in enumerate(answers)}
    default_q = str(battery.meta.get("vqa_question") or DEFAULT_QUESTION)
    out = np.full(len(stimuli), np.nan)
    rows = _rows_with(stimuli, "image", "pair")
    if not len(rows):
        return out
    sub = stimuli.iloc[rows]
    questions = [str(r["text"]) if r["modality"] == "pair" and str(r["text"]).strip().endswith("?") else default_q
                 for _, r in sub.iterrows()]
    visual = subject.visual_inputs(subject._image_column(sub), battery)
    logp = subject.head_outputs(questions, visual).question_answering_score.float().log_softmax(-1).cpu()
    missing = set()
    for j, (i, concept) in enumerate(zip(rows, sub["concept"])):
        ids = [index[n.lower()] for n in battery.concept_words(concept) if n.lower() in index]
        if not ids:
            missing.add(concept)
            continue
        out[i] = float(torch.logsumexp(logp[j, ids], 0))
    if missing:
        warnings.warn(f"vqa readout: concept(s) {', '.join(sorted(missing))} have no name among the {len(answers)} "
                      f"answers; their stimuli score NaN.", stacklevel=2)
    return out


# -------------------------------------------------------------------- VisualBERT


class VisualBertSubject(_RegionSubject):
    """VisualBERT with one joint stream of text tokens then regions (see the module docstring)."""

    match_label = 0
    blank_region = False
    #: one stream over the text tokens and the regions: the BERT layers, once each per pass
    block_order = {"joint": ["encoder.layer.*"]}  # type: ignore[assignment]  # data here, a property of HFSubject
    block_inputs: dict[str, tuple[str, ...]] = {}

    def setup(self, **options: Any) -> None:  # noqa: D102 - see _RegionSubject.setup
        super().setup(**options)
        self.readouts = {"matching": readout_matching, "masked_lm": readout_masked_lm}
        self.default_readout = "matching"

    def _feature_dim(self) -> int:
        return int(self.model.config.visual_embedding_dim)

    def encode(self, stimuli: pd.DataFrame, battery) -> Batch:
        """Tokens then regions in one ``joint`` stream with one joint mask."""
        texts = self.stimulus_texts(stimuli, battery)
        enc, cmask = self._tokenize(texts, stimuli["concept"].tolist(), battery)
        visual = self.visual_inputs(self._image_column(stimuli), battery)
        inputs = self._inputs_from(enc, visual)
        vmask = visual[2]
        B, R = vmask.shape
        joint = torch.cat([enc["attention_mask"].bool(), vmask], dim=1)
        region_ids = -(torch.arange(R) + 1).expand(B, R)
        return Batch(
            inputs=inputs,
            masks={"joint": joint},
            token_ids={"joint": torch.cat([enc["input_ids"], region_ids], dim=1)},
            concept_masks={"joint": torch.cat([cmask, torch.zeros(B, R, dtype=torch.bool)], dim=1)},
        )

    def _inputs_from(self, enc, visual) -> dict[str, Any]:
        feats, _, vmask = visual
        inputs: dict[str, Any] = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        if "token_type_ids" in enc:
            inputs["token_type_ids"] = enc["token_type_ids"]
        if vmask.shape[1]:
            dtype = next(self.model.parameters()).dtype
            inputs.update(visual_embeds=feats.to(dtype), visual_attention_mask=vmask.long(),
                          visual_token_type_ids=torch.ones(vmask.shape, dtype=torch.long))
        return inputs

    def model_inputs(self, texts: Sequence[str], visual) -> dict[str, Any]:  # noqa: D102
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return self._inputs_from(enc, visual)

    def _match_logits(self, outputs: Any) -> torch.Tensor:
        return outputs.seq_relationship_logits
