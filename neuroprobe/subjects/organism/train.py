"""Training the organism from scratch, and its model card.

The recipe (:data:`RECIPE`): each step shows a batch of augmented images (half
handwritten training samples, half digit names drawn in the training fonts) and a
batch of texts (a few per concept, random form and training template).  The loss is
contrastive in both directions, and *every* text of an image's concept is a
positive (and every image of a text's concept): the loss averages ``-log p`` over
the positives.  AdamW with a one-cycle learning-rate schedule.

Training runs on one CPU thread (``torch.set_num_threads(1)``, the previous count is
restored afterwards): with the same seed, thread count and library versions the
weights come out bit for bit the same; different thread counts give different
(equally good) weights.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism.model import OrganismConfig, OrganismModel, build_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "organism.safetensors"
CARD_FILE = "card.json"

RECIPE: dict[str, Any] = {
    "steps": 1000,
    "batch_images": 128,
    "handwritten_fraction": 0.5,
    "texts_per_concept": 6,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "pct_start": 0.25,
    "activity_l1": 0.0,
    "augment": {"max_rotation": 12.0, "max_shift": 2.5, "scale": [0.85, 1.1], "noise": 0.05, "gain": [0.8, 1.6]},
}


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, img_labels: torch.Tensor, txt_labels: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where every same-concept pair is a positive.

    ``-log softmax`` is averaged over each row's positives (image -> texts) and each
    column's positives (text -> images); the two directions are averaged.
    """
    logits = scale * img @ txt.T
    pos = (img_labels[:, None] == txt_labels[None, :]).float()
    lp_i2t = logits.log_softmax(1)
    lp_t2i = logits.log_softmax(0)
    i2t = -(lp_i2t * pos).sum(1) / pos.sum(1).clamp(min=1)
    t2i = -(lp_t2i * pos).sum(0) / pos.sum(0).clamp(min=1)
    return 0.5 * (i2t[pos.sum(1) > 0].mean() + t2i[pos.sum(0) > 0].mean())


def train_model(
    seed: int = 0,
    steps: int = 1000,
    *,
    n_threads: int = 1,
    progress: bool = False,
    config: OrganismConfig | None = None,
    recipe: dict[str, Any] | None = None,
) -> tuple[OrganismModel, list[float]]:
    """Train an organism; returns the model (eval mode) and the loss per step.

    Parameters
    ----------
    seed
        Seeds the initial weights and every random draw of training.
    steps
        Optimiser steps.
    n_threads
        Torch CPU threads during training (the previous count is restored).
    progress
        Show a tqdm bar.
    config
        Architecture (default :class:`OrganismConfig`).
    recipe
        Overrides of :data:`RECIPE`.
    """
    r = {**RECIPE, **(recipe or {})}
    aug = {k: (tuple(v) if isinstance(v, list) else v) for k, v in r["augment"].items()}
    td = D.training_data()
    with threads(n_threads):
        model = build_model(config, seed)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=max(steps, 2),
                                                    pct_start=r["pct_start"])
        n_hw = int(round(r["batch_images"] * r["handwritten_fraction"]))
        n_wr = r["batch_images"] - n_hw
        text_by_concept = [torch.nonzero(td.text_labels == d).flatten() for d in range(len(D.CONCEPTS))]
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="train-organism", unit="step")
        for _ in range(steps):
            i_hw = torch.randint(len(td.hw_images), (n_hw,), generator=gen)
            i_wr = torch.randint(len(td.written_images), (n_wr,), generator=gen)
            images = D.augment(torch.cat([td.hw_images[i_hw], td.written_images[i_wr]]), gen, **aug)
            img_labels = torch.cat([td.hw_labels[i_hw], td.written_labels[i_wr]])
            picks = torch.cat([
                pool[torch.randint(len(pool), (r["texts_per_concept"],), generator=gen)] for pool in text_by_concept
            ])
            ids, mask = td.text_ids[picks], td.text_mask[picks]
            width = int(mask.sum(1).max())
            img, h_img = model.image(images, return_hidden=True)
            txt, h_txt = model.text(ids[:, :width], mask[:, :width], return_hidden=True)
            img, txt = nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1)
            loss = contrastive_loss(img, txt, img_labels, td.text_labels[picks], model.scale())
            if r["activity_l1"]:
                loss = loss + r["activity_l1"] * 0.5 * (h_img.abs().mean() + h_txt.abs().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if bar is not None:
            bar.close()
    return model.eval(), losses


# ------------------------------------------------------------------- evaluation
def _embed_images(model: OrganismModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch])[0] for i in range(0, len(images), batch)])


def _embed_texts(model: OrganismModel, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = D.tokenize(texts[i : i + batch])
        out.append(model(None, ids, mask)[1])
    return torch.cat(out)


def prompt_embeddings(model: OrganismModel, prompts: list[str] | None = None) -> torch.Tensor:
    """Unit-norm text embeddings of the ten concept prompts (``a photo of zero`` ...)."""
    return _embed_texts(model, prompts or [D.PROMPT_TEMPLATE.format(c) for c in D.CONCEPTS])


def image_prototypes(model: OrganismModel) -> torch.Tensor:
    """Unit-norm class-mean image embeddings of :func:`~neuroprobe.subjects.organism.data.reference_images`."""
    images, labels = D.reference_images()
    emb = _embed_images(model, images)
    protos = torch.stack([emb[labels == d].mean(0) for d in range(len(D.CONCEPTS))])
    return nn.functional.normalize(protos, dim=-1)


def _accuracy_table(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    correct = pred == labels
    return {
        "accuracy": float(correct.mean()),
        "n": int(len(labels)),
        "per_concept": {c: float(correct[labels == d].mean()) for d, c in enumerate(D.CONCEPTS) if (labels == d).any()},
    }


def evaluate(model: OrganismModel, n_threads: int = 1) -> dict[str, Any]:
    """Held-out zero-shot accuracies (deterministic; Pillow fonts only, so any machine can recompute them).

    Returns
    -------
    dict
        ``handwritten``: image -> ten prompts, on the held-out handwritten samples;
        ``written``: the same on names drawn in held-out font styles, overall and per
        form; ``text``: text -> ten class-mean image embeddings of the reference
        handwritten images, for texts in held-out templates, overall and per form.
        Each entry has ``accuracy``, ``n`` and ``per_concept``.
    """
    held = D.heldout_data()
    with threads(n_threads), torch.inference_mode():
        model.eval()
        prompts = prompt_embeddings(model)
        protos = image_prototypes(model)
        hw_pred = (_embed_images(model, held.hw_images) @ prompts.T).argmax(1).numpy()
        wr_pred = (_embed_images(model, held.written_images) @ prompts.T).argmax(1).numpy()
        tx_pred = (_embed_texts(model, held.texts["text"].tolist()) @ protos.T).argmax(1).numpy()
    out: dict[str, Any] = {"handwritten": _accuracy_table(hw_pred, held.hw_labels.numpy())}
    wl = held.written["label"].to_numpy()
    out["written"] = _accuracy_table(wr_pred, wl)
    out["written"]["per_form"] = {f: float((wr_pred == wl)[held.written["form"].to_numpy() == f].mean())
                                  for f in D.WRITTEN_FORMS}
    tl = held.texts["label"].to_numpy()
    out["text"] = _accuracy_table(tx_pred, tl)
    out["text"]["per_form"] = {f: float((tx_pred == tl)[held.texts["form"].to_numpy() == f].mean())
                               for f in D.TEXT_WORDS}
    return out


# --------------------------------------------------------------------- save/load
def save_weights(model: OrganismModel, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write the state dict as safetensors; returns the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config.to_dict()), **(metadata or {})}
    save_file(state, str(path), metadata=meta)
    return sha256_file(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def state_sha256(model: OrganismModel) -> str:
    """SHA-256 over the parameter bytes in state-dict order (independent of file metadata)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import PIL
    import sklearn

    return {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version(), "machine": platform.machine()}


def train_organism(
    seed: int = 0,
    steps: int = 1000,
    out: str | Path | None = None,
    *,
    n_threads: int = 1,
    progress: bool = False,
    recipe: dict[str, Any] | None = None,
    config: OrganismConfig | None = None,
) -> dict[str, Any]:
    """Train the organism from scratch, evaluate it on held-out data, and optionally save it.

    Parameters
    ----------
    seed
        Training seed (the committed weights use 0).
    steps
        Optimiser steps (the committed weights use 1000).
    out
        Folder to write ``organism.safetensors`` and ``card.json`` into (nothing is
        written when ``None``).
    n_threads
        CPU threads during training; weights are bitwise reproducible only for the
        same count.
    progress
        Show a progress bar.
    recipe
        Overrides of :data:`RECIPE`.
    config
        Architecture (default :class:`OrganismConfig`).

    Returns
    -------
    dict
        The model card: recipe, seed, steps, threads, versions, held-out accuracies,
        parameter count, weight hashes, final loss, training time.
    """
    t0 = time.perf_counter()
    model, losses = train_model(seed, steps, n_threads=n_threads, progress=progress, recipe=recipe, config=config)
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, n_threads=n_threads)
    card: dict[str, Any] = {
        "name": "neuroprobe organism",
        "description": "CLIP-style dual encoder (CNN image tower, byte-level transformer text tower) trained in "
                       "this repository on the ten digits: handwritten (scikit-learn load_digits), names drawn "
                       "with Pillow's fonts, and text in English, numerals, Roman numerals and Korean.",
        "recipe": {**RECIPE, **(recipe or {}), "steps": steps},
        "seed": seed,
        "steps": steps,
        "threads": n_threads,
        "versions": _versions(),
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout": metrics,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_seconds": round(seconds, 1),
        "state_sha256": state_sha256(model),
        "readout": {
            "image": "zero-shot: cosine to the ten prompts 'a photo of <digit>' (battery prompts)",
            "text": "retrieval: cosine to the ten class-mean embeddings of 10 training handwritten images per digit",
        },
    }
    if out is not None:
        out = Path(out)
        card["weights_sha256"] = save_weights(model, out / WEIGHTS_FILE, {"seed": str(seed), "steps": str(steps)})
        (out / CARD_FILE).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def load_weights(path: str | Path, model: OrganismModel | None = None) -> OrganismModel:
    """Build an organism from a safetensors file written by :func:`save_weights`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if model is None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = OrganismConfig.from_dict(json.loads(meta["config"])) if "config" in meta else OrganismConfig()
        model = OrganismModel(cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
