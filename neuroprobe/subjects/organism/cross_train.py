"""The cross-modal organism's training objective (the loop, data and card are :mod:`.train`'s).

Each step draws the dual encoder's batch (:func:`~neuroprobe.subjects.organism.train.draw_batch`:
augmented handwriting and drawn names, and a few training texts per digit) and shows it
three ways, with the objectives of the seed's multimodal models:

* **alone** — every image with the one :data:`~.cross.EMPTY` text token, every text with a
  blank image; a contrastive loss (the organism's, every same-digit pair a positive) between
  the two (CLIP's objective, here between two passes of one fused model);
* **paired** — the first ``pairs`` images each with a text.  The second half of them are shown
  whole, with a text of the same digit with probability ``match_fraction`` and of another
  digit otherwise: **image–text matching** (LXMERT, ViLBERT, VisualBERT; binary
  cross-entropy on ``itm``);
* **masked** — the first half always match and are masked: **masked-token prediction on both
  sides**: the digit word's bytes (probability ``mask_word``; else ``mask_bytes`` of all
  bytes) are masked and predicted from the rest, the image included (BERT's and VisualBERT's
  masked language modelling: the word can only come from the image); and ``mask_image`` of
  the image tokens are masked and their pixels regressed (LXMERT's masked region feature
  regression).  Masking only pairs that match would let a mask tell a match, so the two
  halves are kept apart.
* every matching pair is also an anchor of the contrastive loss, against the images alone
  and the texts alone (``contrastive_pairs``): a pair shows both modalities of one digit
  and bridges them.

``weights`` sets each objective's weight (0 turns it off: the design comparison in the
card trains with some of them off).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism.cross import MASK, CrossModel, empty_text
from neuroprobe.subjects.organism.train import RECIPE as DUAL_RECIPE
from neuroprobe.subjects.organism.train import contrastive_loss, draw_batch

RECIPE: dict[str, Any] = {
    **DUAL_RECIPE,
    "steps": 1500,
    # learning rate, piecewise linear over the run: 1e-3 (reached after 2% of the steps) until the loss has
    # left its collapsed plateau (every embedding alike; the dual encoder's one-cycle 3e-3 keeps this model
    # there for the whole run), then 4e-3 for half the run (the high rate is what makes head.fc sparse and
    # its units selective: with 1e-3 throughout they stay broadly tuned), then down to zero
    "lr": 4e-3,
    "lr_points": [[0, 4e-5], [0.02, 1e-3], [0.15, 1e-3], [0.25, 4e-3], [0.75, 4e-3], [1, 1e-5]],
    "batch_images": 64,
    "texts_per_concept": 4,
    "pairs": 48,
    "match_fraction": 0.5,
    "mask_word": 0.5,
    "mask_bytes": 0.15,
    "mask_image": 0.25,
    "weights": {"contrastive": 1.0, "contrastive_pairs": 1.0, "matching": 1.0, "masked_text": 1.0, "masked_image": 1.0},
}


def patch_pixels(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, 1, S, S]`` -> ``[B, grid², (S/grid)²]``: each image token's pixels, row-major (the ``mim`` target)."""
    b, _, s, _ = images.shape
    p = s // grid
    return images.reshape(b, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, p * p)


def cross_objective(model: CrossModel, td: D.TrainingData, r: dict[str, Any]) -> Callable[[torch.Generator], torch.Tensor]:
    """The loss of one step (see the module docstring); ``r`` is :data:`RECIPE` with overrides."""
    cfg = model.config
    w = {**RECIPE["weights"], **r.get("weights", {})}
    text_by_concept = [torch.nonzero(td.text_labels == d).flatten() for d in range(len(D.CONCEPTS))]
    n_concepts = len(D.CONCEPTS)

    def step(gen: torch.Generator) -> torch.Tensor:
        images, img_labels, picks = draw_batch(td, gen, r, text_by_concept)
        txt_labels = td.text_labels[picks]
        loss = torch.zeros(())
        hidden = []  # head.fc units of every pass (the activity penalty)
        if w["contrastive"]:
            ids, mask = td.text_ids[picks], td.text_mask[picks]
            width = int(mask.sum(1).max())
            e_img, h_img = model.embedding(model.encode(images, *empty_text(len(images)))["pooled"], True)
            e_txt, h_txt = model.embedding(model.encode(None, ids[:, :width], mask[:, :width])["pooled"], True)
            hidden += [h_img, h_txt]
            loss = loss + w["contrastive"] * contrastive_loss(e_img, e_txt, img_labels, txt_labels, model.scale())
        n_p = min(int(r["pairs"]), len(images))
        if n_p and (w["matching"] or w["masked_text"] or w["masked_image"] or (w["contrastive"] and w["contrastive_pairs"])):
            p_img, p_lab = images[:n_p], img_labels[:n_p]
            # the first half are masked pairs (matching, for masked-token prediction); the rest are shown whole,
            # matching with probability match_fraction (image-text matching): a mask never tells a match
            n_m = n_p // 2
            match = torch.rand(n_p, generator=gen) < r["match_fraction"]
            match[:n_m] = True
            shift = torch.randint(1, n_concepts, (n_p,), generator=gen)
            want = torch.where(match, p_lab, (p_lab + shift) % n_concepts)
            u = torch.rand(n_p, generator=gen)
            chosen = torch.stack([text_by_concept[int(c)][int(x * len(text_by_concept[int(c)]))]
                                  for c, x in zip(want, u)])
            ids, mask = td.text_ids[chosen], td.text_mask[chosen]
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
            # masked bytes: the digit word (whole) or a random share of all bytes
            pos = torch.arange(width)[None, :]
            span = td.text_word[chosen]
            in_word = (pos >= span[:, :1]) & (pos < span[:, 1:])
            whole = torch.rand(n_p, generator=gen) < r["mask_word"]
            some = torch.rand(n_p, width, generator=gen) < r["mask_bytes"]
            masked = torch.arange(n_p) < n_m
            t_mask = torch.where(whole[:, None], in_word, some) & mask & masked[:, None]
            i_mask = (torch.rand(n_p, cfg.n_image_tokens, generator=gen) < r["mask_image"]) & masked[:, None]
            out = model.encode(p_img, ids.masked_fill(t_mask, MASK), mask, i_mask)
            if w["contrastive_pairs"] and w["contrastive"] and bool(match.any()):
                # the matching pairs bridge the modalities: each shows an image and a text of one digit
                e_pair, h_pair = model.embedding(out["pooled"][match], True)
                hidden.append(h_pair)
                lab = p_lab[match]
                loss = loss + w["contrastive_pairs"] * 0.5 * (
                    contrastive_loss(e_img, e_pair, img_labels, lab, model.scale())
                    + contrastive_loss(e_txt, e_pair, txt_labels, lab, model.scale()))
            if w["matching"] and n_p > n_m:
                itm = model.itm(out["pooled"][n_m:]).squeeze(-1)
                loss = loss + w["matching"] * nn.functional.binary_cross_entropy_with_logits(itm, match[n_m:].float())
            if w["masked_text"] and bool(t_mask.any()):
                logits = model.mlm(out["text"][t_mask])
                loss = loss + w["masked_text"] * nn.functional.cross_entropy(logits, ids[t_mask])
            if w["masked_image"] and bool(i_mask.any()):
                pred = model.mim(out["image"][i_mask])
                target = patch_pixels(p_img, cfg.grid)[i_mask]
                loss = loss + w["masked_image"] * nn.functional.mse_loss(pred, target) * cfg.patch_pixels / 8.0
        if r["activity_l1"] and hidden:
            loss = loss + r["activity_l1"] * torch.cat(hidden).abs().mean()
        return loss

    return step
