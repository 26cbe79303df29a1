"""The organism as a neuroprobe subject: sites in both towers, zero-shot readouts.

Streams (the position axis a site's units live on):

============== ====================================== =======================
stream          positions                              sites
============== ====================================== =======================
``image-32x32`` the 32×32 pixels of an image           ``image.conv1`` (BCHW)
``image-16x16`` 16×16 positions after one pooling      ``image.conv2`` (BCHW)
``image-8x8``   8×8 positions after two poolings       ``image.conv3`` (BCHW)
``image``       one per image                          ``image.fc``, ``image.proj``
``text``        the text's UTF-8 bytes                 ``text.embed``, ``text.layers.*``
``text-pooled`` one per text (after max pooling)       ``text.fc``, ``text.proj``
============== ====================================== =======================

Image stimuli go through the image tower, text stimuli through the text tower; a
batch may mix both (each stream's masks then have one row per stimulus of its
modality, in table order), but the recorder is told to group by modality
(:attr:`OrganismSubject.split_by_modality`).

Readouts (one score per stimulus, higher = knows its concept better):

``zero_shot``
    log-probability of the stimulus's concept.  Image stimuli: softmax over the
    learned-temperature cosine similarities to the battery's concept prompts
    (``a photo of seven``).  Text stimuli: text-to-image retrieval, softmax over
    the similarities to the class-mean embeddings of ten training handwritten
    images per digit (:func:`~neuroprobe.subjects.organism.data.reference_images`).
    Prompts and reference images run through the model in the same forward pass
    as the stimuli, so a lesion acts on both sides of the comparison.  Stimuli that
    are copies of one block, one after another (a batch tiled once per lesion,
    :func:`~neuroprobe.subjects.copies.stimulus_copies`), get prompts and references
    once per copy, in that copy's place in the pass: the readouts are replica-safe.
``zero_shot_correct``
    1.0 if that concept has the highest score, else 0.0 (accuracy).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError
from neuroprobe.subjects.base import Batch, SitePattern, Subject, replica_safe
from neuroprobe.subjects.copies import stimulus_copies
from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism.model import OrganismConfig, OrganismModel
from neuroprobe.subjects.organism.train import WEIGHTS_DIR, load_weights, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

CONV_STREAMS = {"image.conv1": "image-32x32", "image.conv2": "image-16x16", "image.conv3": "image-8x8"}


def _site_patterns(cfg: OrganismConfig) -> dict[str, list[SitePattern]]:
    conv = [SitePattern(m, "output", "conv", s, "BCHW") for m, s in CONV_STREAMS.items()]
    return {
        "mlp": conv + [
            SitePattern("image.fc", "output", "mlp", "image", "BU"),
            SitePattern("text.layers.*.mlp.act", "output", "mlp", "text", "BTU"),
            SitePattern("text.fc", "output", "mlp", "text-pooled", "BU"),
        ],
        "resid": [
            SitePattern("text.embed", "output", "resid", "text", "BTU"),
            SitePattern("text.layers.*", "output", "resid", "text", "BTU"),
            SitePattern("image.proj", "output", "embed", "image", "BU"),
            SitePattern("text.proj", "output", "embed", "text-pooled", "BU"),
            # the shared embedding space (one module for both towers): where multimodal cells can live
            SitePattern("embed", "output", "embed", "joint", "BU", name="joint.embed"),
        ],
        "attn": [
            SitePattern("text.layers.*.attn.heads", "output", "attn", "text", "BTU", n_heads=cfg.text_heads),
        ],
    }


#: blocks of each tower in forward order, then the shared embedding (for batched, prefix-cached lesions);
#: the text tower max-pools its tokens between ``text.ln_final`` and ``text.fc``
BLOCK_ORDER = {
    "image": ["image.conv1", "image.pool1", "image.conv2", "image.pool2", "image.conv3", "image.pool3",
              "image.fc", "image.drop", "image.proj"],
    "text": ["text.embed", "text.layers.*", "text.ln_final", "text.fc", "text.drop", "text.proj"],
    "joint": ["embed"],
}


class OrganismSubject(Subject):
    """The organism (:class:`~neuroprobe.subjects.organism.model.OrganismModel`) as a subject."""

    block_order = BLOCK_ORDER
    #: the shared embedding reads both towers' projections
    block_inputs: dict[str, tuple[str, ...]] = {"joint": ("image", "text")}

    modalities = ("text", "image")
    split_by_modality = True
    default_readout = "zero_shot"

    def __init__(self, model: OrganismModel, name: str = "organism", **kwargs: Any) -> None:
        super().__init__(name, model, **kwargs)
        self.config: OrganismConfig = model.config
        self.site_patterns = self.patterns()
        self.readouts = {"zero_shot": _zero_shot, "zero_shot_correct": _zero_shot_correct}
        self.tensor_readouts = {"zero_shot": _zero_shot_tensor}
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def patterns(self) -> dict[str, list[SitePattern]]:
        """Montage -> site patterns of this model (data; see the module docstring for the streams)."""
        return _site_patterns(self.config)

    # --------------------------------------------------------------- encoding
    def images(self, rows: pd.DataFrame, battery: "Battery") -> torch.Tensor:
        """Image stimuli as ``float [N, 1, S, S]`` in ``[0, 1]`` (grey levels, resized to the model's size)."""
        from PIL import Image

        size = self.config.image_size
        out = np.zeros((len(rows), 1, size, size), np.float32)
        cache = self.__dict__.setdefault("_image_cache", {})  # decoded pixels: readouts revisit the same stimuli
        for k, (_, row) in enumerate(rows.iterrows()):
            key = (str(battery.root), str(row["image"]))
            if key not in cache:
                im = battery.load_image(row).convert("L")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                if len(cache) > 50_000:
                    cache.clear()
                cache[key] = np.asarray(im, np.float32) / 255.0
            out[k, 0] = cache[key]
        return torch.from_numpy(out)

    def _modalities_of(self, stimuli: pd.DataFrame) -> np.ndarray:
        """The stimuli's modalities (one clear error for one the towers do not take)."""
        modality = stimuli["modality"].to_numpy()
        bad = sorted(set(modality) - {"image", "text"})
        if bad:
            raise NeuroprobeError(f"the organism takes image and text stimuli, not {', '.join(bad)}; choose another battery.")
        return modality

    def encode(self, stimuli: pd.DataFrame, battery: "Battery") -> Batch:
        """Images for the image tower, UTF-8 bytes for the text tower (see the module docstring for streams)."""
        modality = self._modalities_of(stimuli)
        img_rows = stimuli[modality == "image"]
        txt_rows = stimuli[modality == "text"]
        inputs: dict[str, Any] = {"images": None, "text_ids": None, "text_mask": None}
        masks: dict[str, torch.Tensor] = {}
        token_ids: dict[str, torch.Tensor] = {}
        concept_masks: dict[str, torch.Tensor] = {}
        if len(img_rows):
            n = len(img_rows)
            inputs["images"] = self.images(img_rows, battery)
            side = self.config.image_size
            for k, stream in enumerate(CONV_STREAMS.values()):
                positions = (side >> k) ** 2  # each conv block runs after k poolings
                masks[stream] = torch.ones(n, positions, dtype=torch.bool)
                token_ids[stream] = torch.arange(positions).expand(n, positions).clone()
            masks["image"] = torch.ones(n, 1, dtype=torch.bool)
            token_ids["image"] = torch.zeros(n, 1, dtype=torch.long)
        if len(txt_rows):
            n = len(txt_rows)
            texts = txt_rows["text"].astype(str).tolist()
            ids, mask = D.tokenize(texts, self.config.max_bytes)
            inputs["text_ids"], inputs["text_mask"] = ids, mask
            masks["text"], token_ids["text"] = mask, ids
            masks["text-pooled"] = torch.ones(n, 1, dtype=torch.bool)
            token_ids["text-pooled"] = torch.zeros(n, 1, dtype=torch.long)
        if len(stimuli):
            # the shared embedding sees the batch's images first, then its texts (the recorder
            # splits batches by modality, so there its rows are the stimuli in order)
            masks["joint"] = torch.ones(len(stimuli), 1, dtype=torch.bool)
            token_ids["joint"] = torch.zeros(len(stimuli), 1, dtype=torch.long)
        if len(txt_rows):
            concept_masks["text"] = self._concept_bytes(txt_rows, battery, inputs["text_ids"].shape[1])
        return Batch(inputs=inputs, masks=masks, token_ids=token_ids, concept_masks=concept_masks)

    def _concept_bytes(self, rows: pd.DataFrame, battery: "Battery", width: int) -> torch.Tensor:
        """Byte positions of the concept word: from ``cloze``/``target`` when they fit, else the battery's names."""
        out = torch.zeros(len(rows), width, dtype=torch.bool)
        for k, (_, row) in enumerate(rows.iterrows()):
            text = str(row["text"])
            cloze, target = str(row.get("cloze", "") or ""), str(row.get("target", "") or "")
            spans: list[tuple[int, int]] = []
            if cloze and target and "{mask}" in cloze and cloze.replace("{mask}", target) == text:
                start = cloze.index("{mask}")
                spans = [(start, start + len(target))]
            elif str(row["concept"]) in battery.concepts:
                spans = battery.concept_spans(text, str(row["concept"]))
            for a, b in spans:
                lo, hi = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
                out[k, lo : min(hi, width)] = True
        return out

    def forward(self, batch: Batch, copies: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unit-norm embeddings ``(images, texts)``; one call of the model runs both towers (``copies``: as
        :meth:`~neuroprobe.subjects.organism.model.OrganismModel.forward`)."""
        inp = batch.inputs
        dtype = next(self.model.parameters()).dtype
        images = inp.get("images")
        ids, mask = inp.get("text_ids"), inp.get("text_mask")
        return self.model(
            images.to(self.device, dtype) if images is not None else None,
            ids.to(self.device) if ids is not None else None,
            mask.to(self.device) if mask is not None else None,
            copies=copies,
        )

    # ---------------------------------------------------------------- readouts
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference handwritten images and labels for text-to-image retrieval (cached)."""
        if self._reference is None:
            self._reference = D.reference_images()
        return self._reference

    def concept_scores(self, stimuli: pd.DataFrame, battery: "Battery") -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities over the battery's concepts, and the index of each stimulus's concept.

        Returns
        -------
        logp, target
            ``float [N, n_concepts]`` and ``int [N]``.
        """
        logp, target = self.concept_logp(stimuli, battery)
        return logp.detach().float().cpu().numpy().astype(np.float64), target

    def concept_logp(self, stimuli: pd.DataFrame, battery: "Battery") -> tuple[torch.Tensor, np.ndarray]:
        """:meth:`concept_scores` as a tensor that keeps its graph (for gradients; one forward pass).

        Returns
        -------
        logp, target
            ``torch.float32 [N, n_concepts]`` on the model's device, and ``int [N]``.
        """
        concepts = list(battery.concepts)
        unknown = sorted(set(stimuli["concept"]) - set(concepts))
        if unknown:
            raise NeuroprobeError(f"stimuli name concepts {', '.join(unknown)} that battery {battery.name!r} does not declare.")
        modality = self._modalities_of(stimuli)
        has_text = bool((modality == "text").any())
        if has_text:
            missing = [c for c in concepts if c not in D.CONCEPTS]
            if missing:
                raise NeuroprobeError(
                    f"text-to-image retrieval needs digit concepts ({', '.join(D.CONCEPTS)}), but battery "
                    f"{battery.name!r} has {', '.join(missing[:3])}; use the digits battery."
                )
        copies = stimulus_copies(stimuli)
        m = len(stimuli) // copies  # stimuli per copy: one copy is encoded, the pass holds every copy
        first = modality[:m]
        n_img = int((modality == "image").sum())
        ni, nt = int((first == "image").sum()), int((first == "text").sum())
        prompts = [str(battery.concepts[c].get("prompt") or D.PROMPT_TEMPLATE.format(c)) for c in concepts]
        ref_images, ref_labels = self.reference()
        # each copy with its own prompts and references, copy after copy (one copy: the stimuli, then them)
        images = ([self.images(stimuli.iloc[:m][first == "image"], battery)] if ni else []) + (
            [ref_images] if has_text else [])
        texts = stimuli.iloc[:m].loc[first == "text", "text"].astype(str).tolist() + (prompts if n_img else [])
        ids, mask = D.tokenize(texts, self.config.max_bytes) if texts else (None, None)
        img_in = torch.cat(images * copies) if images else None
        if ids is not None and copies > 1:
            ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)
        img, txt = self.forward(Batch(inputs={"images": img_in, "text_ids": ids, "text_mask": mask}), copies=copies)
        scale = self.model.scale()
        emb = img if img is not None else txt
        logp = torch.zeros((len(stimuli), len(concepts)), dtype=torch.float32, device=emb.device)
        img_rows = torch.from_numpy(np.flatnonzero(modality == "image")).to(emb.device)
        txt_rows = torch.from_numpy(np.flatnonzero(modality == "text")).to(emb.device)
        per_img = ni + (len(ref_images) if has_text else 0)
        per_txt = nt + (len(prompts) if n_img else 0)
        digits = [D.CONCEPTS.index(c) for c in concepts] if has_text else []
        labels = ref_labels.to(emb.device)
        for c in range(copies):
            i_c = img[c * per_img : (c + 1) * per_img] if img is not None else None
            t_c = txt[c * per_txt : (c + 1) * per_txt] if txt is not None else None
            if n_img:
                p_emb = t_c[nt:]
                logp[img_rows[c * ni : (c + 1) * ni]] = (scale * i_c[:ni] @ p_emb.T).log_softmax(-1).float()
            if has_text:
                ref = i_c[ni:]
                protos = torch.nn.functional.normalize(torch.stack([ref[labels == d].mean(0) for d in digits]), dim=-1)
                logp[txt_rows[c * nt : (c + 1) * nt]] = (scale * t_c[:nt] @ protos.T).log_softmax(-1).float()
        target = np.tile(np.array([concepts.index(c) for c in stimuli["concept"].iloc[:m]], dtype=np.int64), copies)
        return logp, target


@replica_safe
def _zero_shot(subject: OrganismSubject, stimuli: pd.DataFrame, battery: "Battery") -> np.ndarray:
    logp, target = subject.concept_scores(stimuli, battery)
    return logp[np.arange(len(target)), target]


@replica_safe
def _zero_shot_correct(subject: OrganismSubject, stimuli: pd.DataFrame, battery: "Battery") -> np.ndarray:
    logp, target = subject.concept_scores(stimuli, battery)
    return (logp.argmax(1) == target).astype(np.float64)


def _zero_shot_tensor(subject: OrganismSubject, stimuli: pd.DataFrame, battery: "Battery") -> torch.Tensor:
    logp, target = subject.concept_logp(stimuli, battery)
    return logp[torch.arange(len(target), device=logp.device), torch.as_tensor(target, device=logp.device)]


# ------------------------------------------------------------------- loading
def _arch(spec: Any) -> str:
    """The organism architecture a registry entry names (``extra["arch"]``; the organism's entry: ``dual``)."""
    return str((getattr(spec, "extra", None) or {}).get("arch", "dual"))


def _resolve_weights(weights: Path | None, arch: str = "dual") -> Path:
    from neuroprobe.subjects.organism.train import get_arch

    a = get_arch(arch)
    if weights is None:
        path = WEIGHTS_DIR / a.weights_file
    else:
        weights = Path(weights)
        path = weights / a.weights_file if weights.is_dir() else weights
    if not path.is_file():
        flag = "" if arch == "dual" else f" --arch {arch}"
        raise MissingWeightsError(
            f"{a.subject} weights {path} are missing; retrain them with `neuroprobe train-organism{flag} --out DIR` "
            f"and pass --weights DIR (or reinstall neuroprobe, which ships them)."
        )
    return path


def model_card(weights: str | Path | None = None, arch: str = "dual", *, spec: Any = None) -> dict[str, Any]:
    """The model card (``card.json`` next to the weights; ``card-cross.json`` for ``cross``): recipe, versions,
    held-out accuracies, hashes.  ``spec`` (a registry entry) names the arch instead of ``arch``."""
    from neuroprobe.subjects.organism.train import get_arch

    if spec is not None:
        arch = _arch(spec)

    path = _resolve_weights(Path(weights) if weights else None, arch).parent / get_arch(arch).card_file
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def load_organism_subject(
    spec: Any = None,
    *,
    init: str = "pretrained",
    weights: Path | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    **options: Any,
) -> OrganismSubject:
    """Registry loader for ``organism`` and ``organism-cross``.

    Parameters
    ----------
    spec
        The registry entry; ``spec.extra["arch"]`` names the architecture (``dual`` when absent,
        ``cross`` for ``organism-cross``).
    init
        ``"pretrained"``: the committed weights (or ``weights``); ``"random"``: the
        same architecture freshly initialised with ``seed`` (the untrained twin).
    weights
        A folder holding the weights file (as written by ``neuroprobe train-organism
        --out``) or the file itself.
    device, dtype
        Where and in which precision the model runs.
    seed
        Initialisation seed for ``init="random"``.
    """
    from neuroprobe.subjects.organism.train import get_arch

    arch = _arch(spec)
    a = get_arch(arch)
    options.pop("quiet", None)
    if options:
        raise NeuroprobeError(f"subject {a.subject!r} does not take the option(s) {', '.join(sorted(options))}.")
    if init not in ("pretrained", "random"):
        raise NeuroprobeError(f"init must be 'pretrained' or 'random', not {init!r}.")
    if init == "pretrained":
        path = _resolve_weights(Path(weights) if weights else None, arch)
        model = load_weights(path)
        digest = sha256_file(path)
        checkpoint = f"{path.name} sha256:{digest[:16]}"
        revision = "repo" if weights is None else "local"
    else:
        cfg = a.config()
        try:  # the committed card says which architecture the trained organism has
            cfg = a.config(model_card(weights, arch).get("config", {}))
        except MissingWeightsError:
            pass
        model = a.build(cfg, seed)
        checkpoint, revision = f"{a.subject} (random init, seed {seed})", ""
    model = model.to(device=torch.device(device), dtype=dtype).eval()
    if arch == "cross":
        from neuroprobe.subjects.organism.cross_subject import CrossSubject as cls
    else:
        cls = OrganismSubject
    subject = cls(model, name=a.subject, device=device, init=init, checkpoint=checkpoint, revision=revision, seed=seed)
    subject.spec = spec
    return subject


def load_organism(init: str = "pretrained", device: torch.device | str = "cpu", **kwargs: Any) -> OrganismSubject:
    """Shorthand for :func:`load_organism_subject` without a registry entry."""
    return load_organism_subject(None, init=init, device=device, **kwargs)
