"""The cross-modal organism as a neuroprobe subject: every stimulus goes through one fused pass.

An **image** stimulus is shown alone (its text side is the one neutral
:data:`~neuroprobe.subjects.organism.cross.EMPTY` token), a **text** stimulus alone (its
image side is blank), a **pair** with both.  So every site sees every stimulus, and a
unit's responses to a digit as an image, as a text and as both come from one recording.

Streams (the position axis a site's units live on):

================ ================================================ =====================================
stream            positions                                        sites
================ ================================================ =====================================
``image-32x32``   the image's pixels                              ``image.conv1`` (BCHW)
``image-16x16``   after one pooling                                ``image.conv2`` (BCHW)
``image-8x8``     after two poolings                               ``image.conv3`` (BCHW)
``image-4x4``     the image tokens                                 ``image.patches`` (BCHW)
``joint``         ``[CLS]``, the 16 image tokens, the text tokens   ``fusion.embed``, ``fusion.layers.*``
                  (single stream)
``text``          ``[CLS]`` and the text tokens (co-attention)      ``layers.*.text*``
``image``         ``[CLS]`` and the 16 image tokens (co-attention)  ``layers.*.image*``
``pooled``        one per stimulus                                 ``head.fc``, ``head.proj``, ``joint.embed``
================ ================================================ =====================================

Token ids in traces: bytes as themselves, ``[CLS]`` 256, the empty text 257, image token
``p`` ``1000 + p``.  Readouts are the organism's (:mod:`.subject`): ``zero_shot`` scores an
image or a pair against the battery's prompts (each prompt shown alone), a text against
the class-mean embeddings of the reference images (each shown alone), all in one fused
pass with the stimuli, so a lesion acts on both sides of the comparison.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Batch, SitePattern
from neuroprobe.subjects.copies import stimulus_copies
from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism.cross import CLS, EMPTY, IMAGE_TOKEN_BASE, CrossConfig, CrossModel
from neuroprobe.subjects.organism.subject import OrganismSubject

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

STEM_STREAMS = {"image.conv1": "image-32x32", "image.conv2": "image-16x16", "image.conv3": "image-8x8",
                "image.patches": "image-4x4"}


def cross_site_patterns(cfg: CrossConfig) -> dict[str, list[SitePattern]]:
    """Montage -> site patterns of a cross-modal organism of either fusion design."""
    stem = [SitePattern(m, "output", "conv", s, "BCHW") for m, s in list(STEM_STREAMS.items())[:3]]
    patches = SitePattern("image.patches", "output", "resid", "image-4x4", "BCHW")
    pooled = [SitePattern("head.fc", "output", "mlp", "pooled", "BU")]
    embeds = [SitePattern("head.proj", "output", "embed", "pooled", "BU"),
              SitePattern("embed", "output", "embed", "pooled", "BU", name="joint.embed")]
    if cfg.fusion == "single":
        return {
            "mlp": stem + [SitePattern("fusion.layers.*.mlp.act", "output", "mlp", "joint", "BTU")] + pooled,
            "resid": [patches, SitePattern("fusion.embed", "output", "resid", "joint", "BTU"),
                      SitePattern("fusion.layers.*", "output", "resid", "joint", "BTU")] + embeds,
            "attn": [SitePattern("fusion.layers.*.attn.heads", "output", "attn", "joint", "BTU", n_heads=cfg.heads)],
        }
    streams = ("text", "image")
    return {
        "mlp": stem + [SitePattern(f"layers.*.{s}.mlp.act", "output", "mlp", s, "BTU") for s in streams] + pooled,
        "resid": [patches] + [SitePattern("layers.*", "output", "resid", s, "BTU", index=k, name=f"layers.{{0}}.{s}")
                              for k, s in enumerate(streams)] + embeds,
        "attn": [SitePattern(f"layers.*.{s}.{a}.heads", "output", "attn", s, "BTU", n_heads=cfg.heads)
                 for s in streams for a in ("attn", "co")],
    }


def cross_block_order(cfg: CrossConfig) -> dict[str, list[str]]:
    """Chain -> module globs in forward order: the image tokens' stem, the text's byte embedding, and
    the fused blocks through the heads to the joint embedding (which read both stems)."""
    image = ["image.conv1", "image.pool1", "image.conv2", "image.pool2", "image.conv3", "image.pool3",
             "image.patches", "image.norm"]
    if cfg.fusion == "single":
        fused = ["fusion.embed", "fusion.layers.*", "fusion.ln_final"]
    else:
        fused = ["layers.*", "text.ln_final", "image.ln_final"]
    return {"image": image, "text": ["text.embed"], "fusion": fused + ["head.fc", "head.proj", "embed"]}


class CrossSubject(OrganismSubject):
    """The cross-modal organism (:class:`~neuroprobe.subjects.organism.cross.CrossModel`) as a subject."""

    @property
    def block_order(self) -> dict[str, list[str]]:  # type: ignore[override]
        """The blocks of :func:`cross_block_order` for this model's fusion design (the generic lesion runner)."""
        return cross_block_order(self.config)

    #: the fused blocks read the image tokens' stem and the text's byte embedding
    block_inputs: dict[str, tuple[str, ...]] = {"fusion": ("image", "text")}
    modalities = ("text", "image", "pair")
    split_by_modality = False

    model: CrossModel

    def patterns(self) -> dict[str, list[SitePattern]]:
        return cross_site_patterns(self.config)


    # --------------------------------------------------------------- encoding
    def _text_side(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """UTF-8 byte ids and mask of each text; ``None`` gives the one :data:`EMPTY` token."""
        real = [t for t in texts if t is not None]
        ids_r, mask_r = D.tokenize(real, self.config.max_bytes) if real else (torch.zeros(0, 1, dtype=torch.long),
                                                                              torch.zeros(0, 1, dtype=torch.bool))
        width = max(1, ids_r.shape[1])
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.bool)
        k = 0
        for i, t in enumerate(texts):
            if t is None:
                ids[i, 0], mask[i, 0] = EMPTY, True
            else:
                ids[i, : ids_r.shape[1]], mask[i, : ids_r.shape[1]] = ids_r[k], mask_r[k]
                k += 1
        return ids, mask

    def _image_side(self, rows: pd.DataFrame, battery: "Battery") -> torch.Tensor:
        size = self.config.image_size
        out = torch.zeros(len(rows), 1, size, size)
        has = rows["modality"].isin(["image", "pair"]).to_numpy()
        if has.any():
            out[torch.tensor(has)] = self.images(rows[has], battery)
        return out

    def encode(self, stimuli: pd.DataFrame, battery: "Battery") -> Batch:
        """Image (blank for texts) and bytes (:data:`EMPTY` for images) of every stimulus, one row each."""
        modality = stimuli["modality"].to_numpy()
        bad = sorted(set(modality) - set(self.modalities))
        if bad:
            raise NeuroprobeError(f"the cross-modal organism takes image, text and pair stimuli, not {', '.join(bad)}.")
        texts = [str(t) if m != "image" else None for t, m in zip(stimuli["text"], modality)]
        ids, mask = self._text_side(texts)
        images = self._image_side(stimuli, battery)
        n, cfg = len(stimuli), self.config
        masks: dict[str, torch.Tensor] = {}
        token_ids: dict[str, torch.Tensor] = {}
        side = cfg.image_size
        for k, stream in enumerate(STEM_STREAMS.values()):
            positions = (side >> k) ** 2 if k < 3 else cfg.n_image_tokens  # each conv block runs after k poolings
            masks[stream] = torch.ones(n, positions, dtype=torch.bool)
            token_ids[stream] = torch.arange(positions).expand(n, positions).clone()
        cls = torch.full((n, 1), CLS, dtype=torch.long)
        ones = torch.ones(n, 1, dtype=torch.bool)
        img_ids = (IMAGE_TOKEN_BASE + torch.arange(cfg.n_image_tokens)).expand(n, -1)
        img_mask = torch.ones(n, cfg.n_image_tokens, dtype=torch.bool)
        cmask = torch.zeros_like(mask)
        has_text = modality != "image"
        if has_text.any():
            rows = stimuli[has_text]
            cmask[torch.tensor(has_text)] = self._concept_bytes(rows, battery, ids.shape[1])
        none = torch.zeros(n, 1, dtype=torch.bool)
        if cfg.fusion == "single":
            masks["joint"] = torch.cat([ones, img_mask, mask], 1)
            token_ids["joint"] = torch.cat([cls, img_ids, ids], 1)
            concept = {"joint": torch.cat([none, torch.zeros_like(img_mask), cmask], 1)}
        else:
            masks["text"], token_ids["text"] = torch.cat([ones, mask], 1), torch.cat([cls, ids], 1)
            masks["image"], token_ids["image"] = torch.cat([ones, img_mask], 1), torch.cat([cls, img_ids], 1)
            concept = {"text": torch.cat([none, cmask], 1)}
        masks["pooled"] = torch.ones(n, 1, dtype=torch.bool)
        token_ids["pooled"] = torch.zeros(n, 1, dtype=torch.long)
        return Batch(inputs={"images": images, "text_ids": ids, "text_mask": mask}, masks=masks,
                     token_ids=token_ids, concept_masks=concept)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Unit-norm joint embeddings ``[B, D]``, one fused pass."""
        inp = batch.inputs
        dtype = next(self.model.parameters()).dtype
        return self.model(inp["images"].to(self.device, dtype), inp["text_ids"].to(self.device),
                          inp["text_mask"].to(self.device))

    # ---------------------------------------------------------------- readouts
    def concept_scores(self, stimuli: pd.DataFrame, battery: "Battery") -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities over the battery's concepts, and the index of each stimulus's concept.

        Images and pairs are scored against the prompts (each shown alone), texts against the
        class-mean embeddings of the reference images (each shown alone); stimuli, prompts and
        references go through the model in one pass.
        """
        concepts = list(battery.concepts)
        unknown = sorted(set(stimuli["concept"]) - set(concepts))
        if unknown:
            raise NeuroprobeError(f"stimuli name concepts {', '.join(unknown)} that battery {battery.name!r} does not declare.")
        modality = stimuli["modality"].to_numpy()
        is_text = modality == "text"
        has_text, has_other = bool(is_text.any()), bool((~is_text).any())
        if has_text and [c for c in concepts if c not in D.CONCEPTS]:
            raise NeuroprobeError(
                f"text-to-image retrieval needs digit concepts ({', '.join(D.CONCEPTS)}), but battery "
                f"{battery.name!r} has others; use the digits or digits-cross battery."
            )
        copies = stimulus_copies(stimuli)
        n = len(stimuli)
        m = n // copies  # stimuli per copy
        prompts = [str(battery.concepts[c].get("prompt") or D.PROMPT_TEMPLATE.format(c)) for c in concepts] if has_other else []
        ref_images, ref_labels = self.reference() if has_text else (torch.zeros(0, 1, 1, 1), torch.zeros(0))
        size = self.config.image_size
        first = stimuli.iloc[:m]  # one copy is encoded; the pass holds every copy, each with its prompts and references
        texts = [str(t) if k != "image" else None for t, k in zip(first["text"], modality[:m])]
        ids, mask = self._text_side(texts + prompts + [None] * len(ref_images))
        images = torch.cat([self._image_side(first, battery), torch.zeros(len(prompts), 1, size, size),
                            ref_images.reshape(-1, 1, size, size) if len(ref_images) else torch.zeros(0, 1, size, size)])
        if copies > 1:
            ids, mask, images = ids.repeat(copies, 1), mask.repeat(copies, 1), images.repeat(copies, 1, 1, 1)
        emb = self.forward(Batch(inputs={"images": images, "text_ids": ids, "text_mask": mask}))
        scale = self.model.scale()
        logp = np.zeros((n, len(concepts)))
        per = m + len(prompts) + len(ref_images)
        digits = [D.CONCEPTS.index(c) for c in concepts] if has_text else []
        for c in range(copies):
            e_c = emb[c * per : (c + 1) * per]
            text_c = is_text[c * m : (c + 1) * m]
            if (~text_c).any():
                p_emb = e_c[m : m + len(prompts)]
                logp[c * m + np.flatnonzero(~text_c)] = (
                    scale * e_c[:m][torch.tensor(~text_c)] @ p_emb.T).log_softmax(-1).float().cpu().numpy()
            if text_c.any():
                ref = e_c[m + len(prompts) :]
                labels = ref_labels.to(ref.device)
                protos = torch.nn.functional.normalize(torch.stack([ref[labels == d].mean(0) for d in digits]), dim=-1)
                logp[c * m + np.flatnonzero(text_c)] = (
                    scale * e_c[:m][torch.tensor(text_c)] @ protos.T).log_softmax(-1).float().cpu().numpy()
        target = np.tile(np.array([concepts.index(c) for c in first["concept"]], dtype=np.int64), copies)
        return logp, target
