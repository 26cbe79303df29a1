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
import importlib
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from neuroprobe.subjects.organism import data as D
from neuroprobe.subjects.organism.model import OrganismModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "organism.safetensors"
CARD_FILE = "card.json"


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the organisms, as data: files, names, and where the code of each piece lives.

    Each ``*_ref`` is ``"module:attribute"``, imported when needed.
    """

    name: str
    subject: str
    weights_file: str
    card_file: str
    title: str
    description: str
    config_ref: str
    build_ref: str
    objective_ref: str
    recipe_ref: str

    def config(self, d: dict | None = None) -> Any:
        """The config class (``d`` given: built from that dict)."""
        cls = _resolve(self.config_ref)
        return cls() if d is None else cls.from_dict(d)

    def build(self, config: Any = None, seed: int = 0) -> nn.Module:
        return _resolve(self.build_ref)(config, seed)

    def objective(self, model: nn.Module, td: D.TrainingData, r: dict[str, Any]) -> Callable[[torch.Generator], torch.Tensor]:
        return _resolve(self.objective_ref)(model, td, r)

    def recipe(self) -> dict[str, Any]:
        return dict(_resolve(self.recipe_ref))


_HERE = "neuroprobe.subjects.organism"
ARCHS: dict[str, ArchSpec] = {
    "dual": ArchSpec(
        "dual", "organism", WEIGHTS_FILE, CARD_FILE, "neuroprobe organism",
        "CLIP-style dual encoder (CNN image tower, byte-level transformer text tower) trained in this repository on "
        "the ten digits: handwritten (scikit-learn load_digits), names drawn with Pillow's fonts, and text in "
        "English, numerals, Roman numerals and Korean.",
        f"{_HERE}.model:OrganismConfig", f"{_HERE}.model:build_model", f"{_HERE}.train:dual_objective",
        f"{_HERE}.train:RECIPE"),
    "cross": ArchSpec(
        "cross", "organism-cross", "organism-cross.safetensors", "card-cross.json", "neuroprobe cross-modal organism",
        "Cross-modal transformer (a convolution stem's 4x4 image tokens and UTF-8 byte tokens fused in one model) "
        "trained in this repository on the organism's world: the ten digits handwritten, drawn as names and "
        "written as text; image-text matching, masked-token prediction on both sides and a contrastive loss "
        "between images shown alone, texts shown alone and pairs.",
        f"{_HERE}.cross:CrossConfig", f"{_HERE}.cross:build_cross", f"{_HERE}.cross_train:cross_objective",
        f"{_HERE}.cross_train:RECIPE"),
}


def get_arch(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``arch`` (``dual`` or ``cross``)."""
    if arch not in ARCHS:
        from neuroprobe.errors import NeuroprobeError

        raise NeuroprobeError(f"unknown organism architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    return ARCHS[arch]


def arch_of(config: dict | None) -> str:
    """The arch a stored config dict describes (the dual encoder's configs carry no ``arch`` key)."""
    return str((config or {}).get("arch", "dual"))

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


def draw_batch(td: D.TrainingData, gen: torch.Generator, r: dict[str, Any],
               text_by_concept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's draw: augmented images (handwritten, then drawn names), their labels, and the indices of
    ``texts_per_concept`` training texts per concept (in concept order)."""
    aug = {k: (tuple(v) if isinstance(v, list) else v) for k, v in r["augment"].items()}
    n_hw = int(round(r["batch_images"] * r["handwritten_fraction"]))
    n_wr = r["batch_images"] - n_hw
    i_hw = torch.randint(len(td.hw_images), (n_hw,), generator=gen)
    i_wr = torch.randint(len(td.written_images), (n_wr,), generator=gen)
    images = D.augment(torch.cat([td.hw_images[i_hw], td.written_images[i_wr]]), gen, **aug)
    img_labels = torch.cat([td.hw_labels[i_hw], td.written_labels[i_wr]])
    picks = torch.cat([
        pool[torch.randint(len(pool), (r["texts_per_concept"],), generator=gen)] for pool in text_by_concept
    ])
    return images, img_labels, picks


def dual_objective(model: OrganismModel, td: D.TrainingData, r: dict[str, Any]) -> Callable[[torch.Generator], torch.Tensor]:
    """The dual encoder's loss of one step (:data:`RECIPE`): contrastive, every same-concept pair a positive."""
    text_by_concept = [torch.nonzero(td.text_labels == d).flatten() for d in range(len(D.CONCEPTS))]

    def step(gen: torch.Generator) -> torch.Tensor:
        images, img_labels, picks = draw_batch(td, gen, r, text_by_concept)
        ids, mask = td.text_ids[picks], td.text_mask[picks]
        width = int(mask.sum(1).max())
        img, h_img = model.image(images, return_hidden=True)
        txt, h_txt = model.text(ids[:, :width], mask[:, :width], return_hidden=True)
        img, txt = nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1)
        loss = contrastive_loss(img, txt, img_labels, td.text_labels[picks], model.scale())
        if r["activity_l1"]:
            loss = loss + r["activity_l1"] * 0.5 * (h_img.abs().mean() + h_txt.abs().mean())
        return loss

    return step


def lr_schedule(opt: torch.optim.Optimizer, r: dict[str, Any], steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (``lr``, ``pct_start``), or piecewise linear through ``lr_points``: ``[[fraction of the run,
    learning rate], ...]`` from ``[0, ...]`` to ``[1, ...]``."""
    points = r.get("lr_points")
    if not points:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=max(steps, 2),
                                                   pct_start=r["pct_start"])
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) / r["lr"] for p in points]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: float(np.interp(i / max(steps, 1), xs, ys)))


def train_model(
    seed: int = 0,
    steps: int = 1000,
    *,
    n_threads: int = 1,
    progress: bool = False,
    config: Any = None,
    recipe: dict[str, Any] | None = None,
    arch: str = "dual",
) -> tuple[nn.Module, list[float]]:
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
        Architecture (default: the arch's default config).
    recipe
        Overrides of the arch's recipe (:data:`RECIPE` for ``dual``).
    arch
        ``dual`` (the CLIP-style organism) or ``cross`` (the cross-modal organism); see :data:`ARCHS`.
    """
    spec = get_arch(arch)
    r = {**spec.recipe(), **(recipe or {})}
    td = D.training_data()
    with threads(n_threads):
        model = spec.build(config, seed)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        sched = lr_schedule(opt, r, steps)
        objective = spec.objective(model, td, r)
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"train-organism ({arch})", unit="step")
        for _ in range(steps):
            loss = objective(gen)
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
def _embed_images(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.embed_images(images[i : i + batch]) for i in range(0, len(images), batch)])


def _embed_texts(model: nn.Module, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = D.tokenize(texts[i : i + batch])
        out.append(model.embed_texts(ids, mask))
    return torch.cat(out)


def prompt_embeddings(model: nn.Module, prompts: list[str] | None = None) -> torch.Tensor:
    """Unit-norm text embeddings of the ten concept prompts (``a photo of zero`` ...)."""
    return _embed_texts(model, prompts or [D.PROMPT_TEMPLATE.format(c) for c in D.CONCEPTS])


def image_prototypes(model: nn.Module) -> torch.Tensor:
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


def evaluate(model: nn.Module, n_threads: int = 1) -> dict[str, Any]:
    """Held-out zero-shot accuracies (deterministic; Pillow fonts only, so any machine can recompute them).

    Returns
    -------
    dict
        ``handwritten``: image -> ten prompts, on the held-out handwritten samples;
        ``written``: the same on names drawn in held-out font styles, overall and per
        form; ``text``: text -> ten class-mean image embeddings of the reference
        handwritten images, for texts in held-out templates, overall and per form;
        for a model that takes pairs (``match_logits``), ``matching``: image–text
        matching of held-out handwriting with held-out texts (see :func:`heldout_pairs`).
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
        matching = _matching(model, held) if hasattr(model, "match_logits") else None
    out: dict[str, Any] = {"handwritten": _accuracy_table(hw_pred, held.hw_labels.numpy())}
    wl = held.written["label"].to_numpy()
    out["written"] = _accuracy_table(wr_pred, wl)
    out["written"]["per_form"] = {f: float((wr_pred == wl)[held.written["form"].to_numpy() == f].mean())
                                  for f in D.WRITTEN_FORMS}
    tl = held.texts["label"].to_numpy()
    out["text"] = _accuracy_table(tx_pred, tl)
    out["text"]["per_form"] = {f: float((tx_pred == tl)[held.texts["form"].to_numpy() == f].mean())
                               for f in D.TEXT_WORDS}
    if matching is not None:
        out["matching"] = matching
    return out


def heldout_pairs(held: D.HeldOutData, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Each held-out handwritten image twice: with a held-out text of its digit and with one of another digit.

    Returns
    -------
    image_index, texts, match, labels
        Row ``i`` pairs image ``image_index[i]`` with ``texts[i]``; ``match[i]`` says whether they
        show the same digit; ``labels[i]`` is the image's digit.
    """
    rng = np.random.default_rng(seed)
    tl = held.texts["label"].to_numpy()
    texts_all = held.texts["text"].tolist()
    labels = held.hw_labels.numpy()
    idx, texts, match = [], [], []
    for i, d in enumerate(labels):
        other = (int(d) + int(rng.integers(1, len(D.CONCEPTS)))) % len(D.CONCEPTS)
        for want, same in ((int(d), True), (other, False)):
            pool = np.flatnonzero(tl == want)
            idx.append(i)
            texts.append(texts_all[int(pool[rng.integers(len(pool))])])
            match.append(same)
    return np.array(idx), texts, np.array(match), labels[np.array(idx)]


def _matching(model: nn.Module, held: D.HeldOutData, batch: int = 256) -> dict[str, Any]:
    idx, texts, match, labels = heldout_pairs(held)
    logits = []
    for a in range(0, len(idx), batch):
        ids, mask = D.tokenize(texts[a : a + batch])
        logits.append(model.match_logits(held.hw_images[idx[a : a + batch]], ids, mask))
    pred = (torch.cat(logits) > 0).numpy()
    correct = pred == match
    return {"accuracy": float(correct.mean()), "n": int(len(match)),
            "matched": float(correct[match].mean()), "mismatched": float(correct[~match].mean()),
            "per_concept": {c: float(correct[labels == d].mean()) for d, c in enumerate(D.CONCEPTS)}}


# --------------------------------------------------------------------- save/load
def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> str:
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


def state_sha256(model: nn.Module) -> str:
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
    steps: int | None = None,
    out: str | Path | None = None,
    *,
    n_threads: int = 1,
    progress: bool = False,
    recipe: dict[str, Any] | None = None,
    config: Any = None,
    arch: str = "dual",
) -> dict[str, Any]:
    """Train an organism from scratch, evaluate it on held-out data, and optionally save it.

    Parameters
    ----------
    seed
        Training seed (the committed weights use 0).
    steps
        Optimiser steps (default: the arch recipe's, which the committed weights use).
    out
        Folder to write the arch's weights file and card into (``organism.safetensors`` and
        ``card.json`` for ``dual``; nothing is written when ``None``).
    n_threads
        CPU threads during training; weights are bitwise reproducible only for the
        same count.
    progress
        Show a progress bar.
    recipe
        Overrides of the arch's recipe.
    config
        Architecture (default: the arch's default config).
    arch
        ``dual`` or ``cross`` (:data:`ARCHS`).

    Returns
    -------
    dict
        The model card: recipe, seed, steps, threads, versions, held-out accuracies,
        parameter count, weight hashes, final loss, training time.
    """
    spec = get_arch(arch)
    steps = int(steps if steps is not None else spec.recipe()["steps"])
    t0 = time.perf_counter()
    model, losses = train_model(seed, steps, n_threads=n_threads, progress=progress, recipe=recipe, config=config,
                                arch=arch)
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, n_threads=n_threads)
    card: dict[str, Any] = {
        "name": spec.title,
        "description": spec.description,
        "recipe": {**spec.recipe(), **(recipe or {}), "steps": steps},
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
    if arch != "dual":
        card["arch"] = arch
        card["readout"]["image"] += "; the image is shown alone and each prompt alone"
        card["readout"]["pair"] = "zero-shot, as for images: the pair's embedding against the prompts"
    if out is not None:
        out = Path(out)
        card["weights_sha256"] = save_weights(model, out / spec.weights_file, {"seed": str(seed), "steps": str(steps)})
        (out / spec.card_file).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def load_weights(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Build an organism (either arch, from the file's stored config) from a file written by :func:`save_weights`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if model is None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        stored = json.loads(meta["config"]) if "config" in meta else None
        spec = get_arch(arch_of(stored))
        model = spec.build(spec.config(stored) if stored is not None else None, 0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
