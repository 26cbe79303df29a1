"""The ``vilbert`` subject: two-stream ViLBERT as a recorded, lesionable subject.

Streams
-------
``text``
    ``[CLS]``, the 12-in-1 task token (multi-task checkpoint only; token id ``-1`` in
    recordings), the WordPiece tokens, ``[SEP]``; padding masked.
``image``
    The global region (mean of the kept regions; region index 0) then the detector
    regions (index 1...); padding masked.  A text stimulus has no image: its image
    stream is the single global region with a zero feature.

Sites
-----
Every text layer (``bert.encoder.layer.<i>``), image layer (``bert.encoder.v_layer.<i>``)
and co-attention layer (``bert.encoder.c_layer.<k>``, both directions) is a site
(see :func:`vilbert_site_patterns`).

Readouts
--------
``alignment``
    Log-softmax over the battery's concepts of the image-text match score at the
    stimulus's concept.  Image and pair stimuli: their image against every concept's
    prompt; text stimuli: their text against every concept's reference image (the
    first image of that concept in the battery).  The match score is the retrieval
    logit (``vil_logit``, COCO retrieval task token) of the 12-in-1 model, or
    ``log p(match)`` from ``cls.bi_seq_relationship`` for the pretrained model.
``vqa`` (12-in-1 model only)
    ``log p(answer)`` (softmax over the 3129 VQA answers) of the concept's best-scoring
    name for "what is this?" (``battery.json`` key ``vqa_question`` overrides), image and
    pair stimuli.  Needs the VQA answer list (``answers=`` a JSON list or text file).

Lesions
-------
Both readouts are :func:`~neuroprobe.subjects.base.replica_safe` (``vqa``: one pass;
``alignment``: one pass per block of concepts over every row's pairs, see
:func:`~neuroprobe.subjects.vision_language.concept_pair_scores`).  The block order is one
chain, ``encoder``: the text, image and co-attention layers in the order the forward pass runs
them (:func:`vilbert_block_order`); the streams exchange state at every co-attention layer, so
they are not independent chains.

Regions
-------
Image regions come from the same :class:`~neuroprobe.subjects.vision_language.RegionSource`
LXMERT and VisualBERT use: a precomputed features file (``--features FILE``: an LXMERT
``*_obj36.tsv`` or a region-feature HDF5 file, looked up by the image's file stem) or the
bottom-up-attention Faster R-CNN (``--detector-weights DIR``, else the Hugging Face cache of
``unc-nlp/frcnn-vg-finetuned``), up to ``max_regions`` (100) per image.  ViLBERT was
trained on regions of a different Visual Genome detector (ResNeXt-152, 10-100 boxes per
image); the BUTD ResNet-101 regions have the same size (2048-d) but are a stand-in: for
the published model's exact input pass its features with ``--features``.  A plain
function ``regions=fn(battery, image_path) -> (features [R, D], boxes [R, 4] normalised)``
may be passed instead (library use).

Files
-----
``--weights DIR`` holds ``multi_task_model.bin`` or ``pretrained_model.bin`` and
optionally ``config.json`` (the architecture; read for ``--init random`` too, which is how
tiny test models are built) and the tokenizer: ``tokenizer.json``/``tokenizer_config.json``
files or a bare WordPiece ``vocab.txt`` (lower-cased, as ``bert-base-uncased``).  Without
tokenizer files there, ``bert-base-uncased`` comes from the Hugging Face cache.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.base import Batch, SitePattern as P, Subject, replica_safe, tokens_in_spans
from neuroprobe.subjects.vilbert.config import CHECKPOINTS, TASK_IDS, ViLBERTConfig
from neuroprobe.subjects.vilbert.load import load_vilbert, prepare_regions, resolve_weights
from neuroprobe.subjects.vilbert.model import ViLBERTModel, ViLBERTOutput
from neuroprobe.subjects.vision_language import RegionSource, concept_pair_scores

#: A plain region function: fn(battery, image path relative to the battery) -> (features [R, D], boxes [R, 4])
RegionFn = Callable[[Any, str], tuple[Any, Any]]

#: Hugging Face id of the tokenizer ViLBERT was trained with.
TOKENIZER_ID = "bert-base-uncased"


def vilbert_block_order(config: ViLBERTConfig) -> dict[str, list[str]]:
    """The encoder's layers as one chain in the order a forward pass runs them (:meth:`ViLBERTConfig.run_order`).

    The text and image streams exchange state at every co-attention layer (text layer
    ``i`` after co-attention layer ``k`` reads its output, which read both streams), so
    they are not separate chains: a lesion at any layer changes only the layers after it in
    this order, and every layer runs once per forward pass.
    """
    names = {"text": "layer", "image": "v_layer", "co": "c_layer"}
    return {"encoder": [f"bert.encoder.{names[stream]}.{i}" for stream, i in config.run_order()]}


def vilbert_site_patterns(config: ViLBERTConfig) -> dict[str, list[P]]:
    """Site patterns of :class:`~neuroprobe.subjects.vilbert.model.ViLBERTModel` (``*`` = one path segment)."""
    th, vh, bh = config.num_attention_heads, config.v_num_attention_heads, config.bi_num_attention_heads
    enc = "bert.encoder"
    return {
        "mlp": [
            P(f"{enc}.layer.*.output.dense", "input", "mlp", "text", name="text.{0}.mlp"),
            P(f"{enc}.v_layer.*.output.dense", "input", "mlp", "image", name="image.{0}.mlp"),
            P(f"{enc}.c_layer.*.t_output.dense", "input", "mlp", "text", name="co.{0}.text_mlp"),
            P(f"{enc}.c_layer.*.v_output.dense", "input", "mlp", "image", name="co.{0}.image_mlp"),
        ],
        "resid": [
            P(f"{enc}.layer.*", "output", "resid", "text", name="text.{0}"),
            P(f"{enc}.v_layer.*", "output", "resid", "image", name="image.{0}"),
            P(f"{enc}.c_layer.*.t_output", "output", "resid", "text", name="co.{0}.text"),
            P(f"{enc}.c_layer.*.v_output", "output", "resid", "image", name="co.{0}.image"),
        ],
        "attn": [
            P(f"{enc}.layer.*.attention.output.dense", "input", "attn", "text", name="text.{0}.attn", n_heads=th),
            P(f"{enc}.v_layer.*.attention.output.dense", "input", "attn", "image", name="image.{0}.attn", n_heads=vh),
            # co-attention: text queries over image keys (dense2), image queries over text keys (dense1)
            P(f"{enc}.c_layer.*.biOutput.dense2", "input", "attn", "text", name="co.{0}.text_xattn", n_heads=bh),
            P(f"{enc}.c_layer.*.biOutput.dense1", "input", "attn", "image", name="co.{0}.image_xattn", n_heads=bh),
        ],
    }


# --------------------------------------------------------------------------- helpers
#: Files that make a folder a saved transformers tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _local_tokenizer(path: Path) -> Any | None:
    """A tokenizer from a folder (saved tokenizer files, else a bare ``vocab.txt``) or a ``vocab.txt`` file."""
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(folder))
    vocab = path if path.is_file() and path.suffix == ".txt" else folder / "vocab.txt"
    if vocab.is_file():
        tok = BertTokenizerFast(str(vocab), do_lower_case=True)  # positional: vocab_file (v4) / vocab (v5)
        lines = len({line for line in vocab.read_text(encoding="utf-8").splitlines() if line})
        if len(tok) < lines:  # a keyword the installed transformers ignores would leave only the specials
            raise NeuroprobeError(f"{vocab} has {lines} tokens but the tokenizer built from it has {len(tok)}; "
                                  f"save the tokenizer with save_pretrained into that folder instead.")
        return tok
    return None


def load_tokenizer(source: str | Path | None = None, weights: Path | None = None) -> Any:
    """ViLBERT's WordPiece tokenizer (``bert-base-uncased``).

    Looked up in this order: ``source`` (a folder, a ``vocab.txt`` or a hub id); the
    weights folder (saved tokenizer files, else a bare ``vocab.txt``, lower-cased); the
    Hugging Face cache of ``bert-base-uncased``; a download when online.

    Raises
    ------
    MissingWeightsError
        When it is nowhere to be found (no fallback vocabulary is ever built).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    local = [Path(source).expanduser()] if source is not None and Path(source).expanduser().exists() else []
    if source is None and weights is not None:
        local.append(Path(weights))
    for path in local:
        try:
            tok = _local_tokenizer(path)
        except (OSError, ValueError, TypeError) as err:
            raise MissingWeightsError(
                f"the tokenizer files in {path} cannot be read ({type(err).__name__}); save bert-base-uncased's "
                f"tokenizer there again or remove them."
            ) from None
        if tok is not None:
            return tok
    if source is not None and local:
        raise MissingWeightsError(
            f"{source} holds no tokenizer (tokenizer.json/tokenizer_config.json or vocab.txt); save "
            f"{TOKENIZER_ID}'s tokenizer files there."
        )
    if source is None:
        # the bert subject caches the same tokenizer under its current hub id
        for ident in (TOKENIZER_ID, "google-bert/bert-base-uncased"):
            try:
                return AutoTokenizer.from_pretrained(ident, local_files_only=True)
            except (OSError, ValueError, TypeError):
                pass
        from neuroprobe.subjects.offline import build_tokenizer, minilm_vocab

        if minilm_vocab() is not None:  # bert-base-uncased's own vocabulary, shipped by a dependency
            return build_tokenizer("bert-wordpiece-uncased")
    source = source or TOKENIZER_ID
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError):
        raise MissingWeightsError(
            f"ViLBERT's tokenizer {source} is not available offline; run once online, point HF_HOME at a cache "
            f"that has {TOKENIZER_ID}, or put its vocab.txt (or tokenizer files) into the --weights folder."
        ) from None


def read_answers(path: str | Path) -> list[str]:
    """Read the VQA answer list (JSON list, JSON ``{label: answer}``/``{answer: label}``, or one answer per line)."""
    path = Path(path)
    if not path.is_file():
        raise NeuroprobeError(f"VQA answer list {path} does not exist; give a JSON list or a text file of the 3129 answers.")
    if path.suffix == ".pkl":
        raise NeuroprobeError(
            f"{path} is a pickle, which neuroprobe does not load; convert it once with "
            f"python -c \"import pickle,json;json.dump(pickle.load(open('{path.name}','rb')),open('answers.json','w'))\"."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            if all(str(k).isdigit() for k in data):
                return [str(data[k]) for k in sorted(data, key=int)]
            return [a for a, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        return [str(a) for a in data]
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- subject
class ViLBERTSubject(Subject):
    """ViLBERT with text and image-region streams (see the module docstring)."""

    modalities = ("text", "image", "pair")
    #: one chain (see :func:`vilbert_block_order`): no chain reads another
    block_inputs: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        name: str,
        model: ViLBERTModel,
        tokenizer: Any,
        *,
        regions: RegionSource | RegionFn | None = None,
        task: str = "retrieval_coco",
        answers: list[str] | None = None,
        max_length: int = 64,
        max_regions: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, model, **kwargs)
        self.config: ViLBERTConfig = model.config
        self.tokenizer = tokenizer
        if len(tokenizer) > self.config.vocab_size:
            raise NeuroprobeError(
                f"the tokenizer has {len(tokenizer)} tokens but this ViLBERT's vocabulary has {self.config.vocab_size}; "
                f"use the tokenizer the model was trained with ({TOKENIZER_ID})."
            )
        self.max_regions = max_regions
        self.regions = regions or RegionSource(device=self.device, n_regions=max_regions, subject=name)
        if task not in TASK_IDS:
            raise NeuroprobeError(f"unknown ViLBERT task {task!r}; choose one of {', '.join(TASK_IDS)}.")
        self.task = task
        self.answers = answers
        # positions beyond the position table do not exist (tiny configs have few)
        self.max_length = min(max_length, self.config.max_position_embeddings)
        self.site_patterns = vilbert_site_patterns(self.config)
        self.block_order = vilbert_block_order(self.config)
        self.readouts = {"alignment": readout_alignment}
        if self.config.task_heads:
            self.readouts["vqa"] = readout_vqa
        self.default_readout = "alignment"
        self._region_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # ------------------------------------------------------------ inputs
    def regions_of(self, battery: Any, images: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Region features and normalised boxes of battery images (paths relative to the battery).

        A :class:`~neuroprobe.subjects.vision_language.RegionSource` gets all the images at
        once (it runs the detector on the uncached ones and keeps its own bounded cache);
        a plain region function is called once per image and its results are cached here.
        """
        if isinstance(self.regions, RegionSource):
            return [(f.float(), b.float()) for f, b in self.regions(battery, list(images))]
        out = []
        for image in images:
            key = f"{battery.root}::{image}"
            if key in self._region_cache:
                self._region_cache.move_to_end(key)
            else:
                feats, boxes = self.regions(battery, image)
                self._region_cache[key] = (torch.as_tensor(np.asarray(feats), dtype=torch.float32),
                                           torch.as_tensor(np.asarray(boxes), dtype=torch.float32))
                if len(self._region_cache) > RegionSource.cache_size:
                    self._region_cache.popitem(last=False)
            out.append(self._region_cache[key])
        return out

    def image_regions(self, battery: Any, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Region features and normalised boxes of one battery image."""
        return self.regions_of(battery, [image])[0]

    def build_inputs(
        self,
        texts: list[str],
        images: list[tuple[torch.Tensor, torch.Tensor] | None],
        task: str | None = None,
        concept_spans: list[list[tuple[int, int]]] | None = None,
    ) -> Batch:
        """Model inputs and stream masks for parallel lists of texts and region sets (``None`` = no image)."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        ids, amask = enc["input_ids"], enc["attention_mask"]
        n = len(texts)
        cmask = (torch.from_numpy(tokens_in_spans(offsets.numpy(), concept_spans)) if concept_spans is not None
                 else torch.zeros_like(ids, dtype=torch.bool))
        feat, loc, imask = self._image_batch(images)
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "token_type_ids": enc.get("token_type_ids", torch.zeros_like(ids)),
            "attention_mask": amask,
            "image_feat": feat,
            "image_loc": loc,
            "image_attention_mask": imask,
        }
        text_ids, text_mask = ids, amask.bool()
        if self.config.task_specific_tokens:
            inputs["task_ids"] = torch.full((n, 1), TASK_IDS[task or self.task], dtype=torch.long)
            text_ids = torch.cat([ids[:, :1], torch.full((n, 1), -1, dtype=ids.dtype), ids[:, 1:]], dim=1)
            text_mask = self.model.text_stream_mask(amask).bool()
            cmask = torch.cat([cmask[:, :1], torch.zeros(n, 1, dtype=torch.bool), cmask[:, 1:]], dim=1)
        region_ids = torch.arange(imask.shape[1]).expand(n, -1).clone()
        return Batch(
            inputs=inputs,
            masks={"text": text_mask, "image": imask.bool()},
            token_ids={"text": text_ids, "image": region_ids},
            concept_masks={"text": cmask},
        )

    def _image_batch(self, images: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, ...]:
        real = [i for i, im in enumerate(images) if im is not None]
        n, dim = len(images), self.config.v_feature_size
        if real:
            feat_r, loc_r, mask_r = prepare_regions([images[i][0] for i in real], [images[i][1] for i in real],
                                                    max_regions=self.max_regions)
            if feat_r.shape[-1] != dim:
                raise NeuroprobeError(f"region features are {feat_r.shape[-1]}-d but ViLBERT takes {dim}-d ones.")
            width = feat_r.shape[1]
        else:
            width = 1
        feat = torch.zeros(n, width, dim)
        loc = torch.zeros(n, width, 5)
        mask = torch.zeros(n, width, dtype=torch.long)
        loc[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
        mask[:, 0] = 1  # no image: the global region alone, with a zero feature
        if real:
            idx = torch.tensor(real)
            feat[idx], loc[idx], mask[idx] = feat_r, loc_r, mask_r
        return feat, loc, mask

    def encode(self, stimuli: pd.DataFrame, battery: Any) -> Batch:
        """Tokenize texts (concept words marked) and gather image regions for a batch of stimuli."""
        texts, paths, spans = [], [], []
        for _, row in stimuli.iterrows():
            has_text = row["modality"] in ("text", "pair")
            text = str(row["text"]) if has_text else ""
            texts.append(text)
            spans.append(battery.concept_spans(text, row["concept"]) if has_text else [])
            paths.append(str(row["image"]) if row["modality"] in ("image", "pair") else None)
        wanted = [p for p in paths if p is not None]
        found = dict(zip(wanted, self.regions_of(battery, wanted))) if wanted else {}
        images = [found[p] if p is not None else None for p in paths]
        return self.build_inputs(texts, images, concept_spans=spans)

    def forward(self, batch: Batch, heads: tuple[str, ...] = ()) -> ViLBERTOutput:
        """Run both streams (and ``heads``, none by default) on an encoded batch."""
        return self.model(**batch.to(self.device).inputs, heads=heads)

    # ------------------------------------------------------------ readout helpers
    def match_scores(self, texts: list[str], images: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Image-text match score per pair (retrieval logit, or log p(match) for the pretrained model), one pass."""
        if not texts:
            return torch.zeros(0)
        if self.config.task_heads:
            res = self.forward(self.build_inputs(texts, images, task="retrieval_coco"), heads=("retrieval",))
            return res.logits["retrieval"].float().cpu()
        res = self.forward(self.build_inputs(texts, images), heads=("alignment",))
        return res.logits["alignment"].float().log_softmax(-1)[:, 0].cpu()

    def reference_image(self, battery: Any, concept: str) -> str:
        """The first image (image or pair stimulus) of ``concept`` in the battery."""
        t = battery.table
        rows = t[(t["concept"] == concept) & t["modality"].isin(["image", "pair"])]
        if rows.empty:
            raise NeuroprobeError(
                f"the alignment readout scores text stimuli against each concept's image, but concept {concept!r} "
                f"has no image stimulus in battery {battery.name!r}; add one or score image stimuli only."
            )
        return str(rows.iloc[0]["image"])


# --------------------------------------------------------------------------- readouts
@replica_safe
def readout_alignment(subject: ViLBERTSubject, stimuli: pd.DataFrame, battery: Any) -> np.ndarray:
    """Log-softmax over concepts of the image-text match score, at the stimulus's concept.

    Every stimulus is paired with every concept in passes over blocks of concepts
    (:func:`~neuroprobe.subjects.vision_language.concept_pair_scores`); each image's regions
    are looked up once per call.
    """
    concepts = battery.concept_names
    prompts = [str(battery.concepts[c].get("prompt", c)) for c in concepts]
    is_text = (stimuli["modality"] == "text").to_numpy()
    texts = stimuli["text"].astype(str).tolist()
    paths = [None if t else str(p) for t, p in zip(is_text, stimuli["image"])]
    refs = [subject.reference_image(battery, c) for c in concepts] if is_text.any() else []
    unique = list(dict.fromkeys([p for p in paths if p is not None] + refs))
    found = dict(zip(unique, subject.regions_of(battery, unique)))

    def score(rows: list[int], cs: list[int]) -> torch.Tensor:
        pair_texts = [texts[i] if is_text[i] else prompts[c] for i, c in zip(rows, cs)]
        pair_images = [found[refs[c]] if is_text[i] else found[paths[i]] for i, c in zip(rows, cs)]
        return subject.match_scores(pair_texts, pair_images)

    logp = concept_pair_scores(score, len(stimuli), len(concepts)).double().log_softmax(-1)
    idx = torch.tensor([concepts.index(c) for c in stimuli["concept"]])
    return logp[torch.arange(len(idx)), idx].numpy()


@replica_safe
def readout_vqa(subject: ViLBERTSubject, stimuli: pd.DataFrame, battery: Any) -> np.ndarray:
    """log p(best name of the concept) among the VQA answers, for "what is this?" about the stimulus's image."""
    if subject.answers is None:
        raise NeuroprobeError(
            "the vqa readout needs ViLBERT's VQA answer list; pass answers=FILE (a JSON list of the 3129 answers, "
            "or answers.json/answers.txt in the --weights folder)."
        )
    if (stimuli["modality"] == "text").any():
        raise NeuroprobeError("the vqa readout asks about images: it scores image and pair stimuli; use the alignment readout for text.")
    lookup = {a.strip().lower(): i for i, a in enumerate(subject.answers)}
    targets: list[list[int]] = []
    for concept in stimuli["concept"]:
        ids = [lookup[w.lower()] for w in battery.concept_words(concept) if w.lower() in lookup]
        if not ids:
            raise NeuroprobeError(
                f"no name of concept {concept!r} is among the VQA answers; add an answer word to its 'names' in "
                f"battery.json or use the alignment readout."
            )
        targets.append(ids)
    question = str(battery.meta.get("vqa_question", "what is this?"))
    images = subject.regions_of(battery, [str(row["image"]) for _, row in stimuli.iterrows()])
    res = subject.forward(subject.build_inputs([question] * len(images), images, task="vqa"), heads=("vqa",))
    logp = res.logits["vqa"].double().log_softmax(-1).cpu()
    return np.array([float(logp[i, ids].max()) for i, ids in enumerate(targets)])


# --------------------------------------------------------------------------- loader
def _find_answers(answers: str | Path | None, weights: Path | None) -> list[str] | None:
    if answers is not None:
        return read_answers(answers)
    if weights is not None:
        folder = weights if weights.is_dir() else weights.parent
        for name in ("answers.json", "answers.txt", "trainval_label2ans.json"):
            if (folder / name).is_file():
                return read_answers(folder / name)
    return None


def _config_option(config: ViLBERTConfig | str | Path | None, weights: Path | None) -> ViLBERTConfig | None:
    """The architecture: a config, a JSON file, else ``config.json`` in the weights folder (``None``: base)."""
    from neuroprobe.subjects.vilbert.load import config_from_file

    if isinstance(config, ViLBERTConfig):
        return config
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise NeuroprobeError(f"ViLBERT config {path} does not exist; give a JSON config such as bert_base_6layer_6conect.json.")
        return config_from_file(path)
    if weights is not None:
        folder = weights if weights.is_dir() else weights.parent
        if (folder / "config.json").is_file():
            return config_from_file(folder / "config.json")
    return None


def _checkpoint_option(checkpoint: str | None, weights: Path | None, config: ViLBERTConfig | None) -> str:
    """Which released layout to build: the option, else the one file in the weights folder, else the config's."""
    if checkpoint is not None:
        return checkpoint
    if weights is not None:
        if weights.is_file():
            return weights.name if weights.name in CHECKPOINTS else CHECKPOINTS[0]
        present = [name for name in CHECKPOINTS if (weights / name).is_file()]
        if len(present) == 1:
            return present[0]
    if config is not None and not config.task_heads:
        return "pretrained_model.bin"
    return "multi_task_model.bin"


def _int_option(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NeuroprobeError(f"option {name} must be an integer, not {value!r}.") from None


def load_vilbert_subject(
    spec: Any,
    *,
    init: str = "pretrained",
    weights: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    checkpoint: str | None = None,
    tokenizer: str | Path | None = None,
    features: Path | None = None,
    detector_weights: Path | None = None,
    regions: RegionSource | RegionFn | None = None,
    answers: str | Path | None = None,
    task: str = "retrieval_coco",
    config: ViLBERTConfig | str | Path | None = None,
    max_regions: int | str = 100,
    **options: Any,
) -> ViLBERTSubject:
    """Registry loader for ``vilbert``.

    Options (``--option KEY=VALUE`` on the command line): ``checkpoint``
    (``multi_task_model.bin`` | ``pretrained_model.bin``; default the one in the weights
    folder, else the 12-in-1 model), ``tokenizer`` (folder, ``vocab.txt`` or hub id; default
    the weights folder's, else ``bert-base-uncased`` from the cache), ``features`` /
    ``detector_weights`` (where regions come from), ``regions`` (a ready region source),
    ``answers`` (VQA answer list), ``task`` (task token used when recording, default
    ``retrieval_coco``), ``config`` (a :class:`ViLBERTConfig` or JSON file; default
    ``config.json`` in the weights folder, else the released architecture, also for
    ``init="random"``), ``max_regions`` (detector regions per image, default 100).
    """
    options.pop("quiet", None)
    if options:
        raise NeuroprobeError(f"subject 'vilbert' does not take the option(s) {', '.join(sorted(options))}.")
    weights = Path(weights).expanduser() if weights is not None else None
    cfg = _config_option(config, weights)
    checkpoint = _checkpoint_option(checkpoint, weights, cfg)
    if checkpoint not in CHECKPOINTS:
        raise NeuroprobeError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}.")
    max_regions = _int_option(max_regions, "max_regions")
    if init == "pretrained":
        # the checkpoint first: a missing download is the first thing to say
        path = resolve_weights(weights, checkpoint)
        source = str(path)
    else:
        path, source = weights, f"vilbert-multi-task ({checkpoint}, random init)"
    tok = load_tokenizer(tokenizer, weights)
    model = load_vilbert(path, checkpoint=checkpoint, init=init, config=cfg, device=device, dtype=dtype, seed=seed)
    if regions is None:
        regions = RegionSource(features=features, detector_weights=detector_weights, device=device,
                               n_regions=max_regions, subject=getattr(spec, "name", "vilbert"))
    subject = ViLBERTSubject(
        getattr(spec, "name", "vilbert"), model, tok, regions=regions, task=task, max_regions=max_regions,
        answers=_find_answers(answers, weights), device=device, init=init, checkpoint=source,
        revision="local" if weights is not None else "dl.fbaipublicfiles.com", seed=seed,
    )
    subject.spec = spec
    return subject
