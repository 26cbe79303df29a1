"""A subject with planted concept cells: ground truth for the whole pipeline.

:func:`make_planted` builds a small two-layer network whose hidden units include
cells planted with known tuning, writes a matching battery (text and image forms
of every concept) to a folder, and returns the truth table.  Analyses must find
the planted cells with the right concept and nothing else; lesions of a concept's
planted cells must hurt that concept's readout far more than the others'.

Planted units (``truth`` rows):

* ``invariant``  — fires for one concept in every form and modality (a Halle Berry cell);
* ``image-only`` — fires for one concept in image forms only (not invariant);
* ``weak``       — fires for one concept with a small effect;
* everything else — untuned (random weights onto noise dimensions), or dead.

Stimuli are feature vectors made from the stimulus id (a concept direction plus a
form direction plus noise), so the battery's images are placeholders: the
planted subject never reads pixels.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neuroprobe.output import write_csv
from neuroprobe.stimuli.battery import Battery
from neuroprobe.subjects.base import Batch, SitePattern, Subject, replica_safe

FORMS = (("photo", "image"), ("drawing", "image"), ("written-name", "image"), ("text-name", "text"), ("text-definition", "text"))


class PlantedNet(torch.nn.Module):
    """``x -> ReLU(W1 x + b1) -> W2 h``; the hidden layer is where cells are planted."""

    def __init__(self, d_in: int, hidden: int, n_concepts: int) -> None:
        super().__init__()
        self.layer1 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.ReLU()
        self.out = torch.nn.Linear(hidden, n_concepts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.layer1(x)))


@dataclass
class Planted:
    """What :func:`make_planted` returns."""

    subject: "PlantedSubject"
    battery: Battery
    truth: pd.DataFrame  # site, unit, concept, kind


def _stim_seed(stim_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stim_id}".encode()).digest()[:4], "little")


class PlantedSubject(Subject):
    """The subject wrapping :class:`PlantedNet` (site ``act``: the hidden ReLU units)."""

    site_patterns = {
        "mlp": [SitePattern("act", "output", "mlp", "x", "BU", name="hidden")],
        "resid": [SitePattern("out", "output", "resid", "x", "BU", name="logits")],
    }
    modalities = ("text", "image")
    #: one chain of blocks (batched, prefix-cached lesions answer the layers before a lesion from the record)
    block_order = {"x": ["layer1", "act", "out"]}

    def __init__(self, model: PlantedNet, concepts: list[str], concept_vecs: np.ndarray, form_vecs: dict[str, np.ndarray],
                 noise: float, seed: int) -> None:
        super().__init__("planted", model, checkpoint="planted", revision="", seed=seed)
        self.concepts = concepts
        self.concept_vecs = concept_vecs
        self.form_vecs = form_vecs
        self.noise = noise
        self.readouts = {"classify": PlantedSubject._classify}
        self.default_readout = "classify"

    def features(self, stimuli: pd.DataFrame) -> torch.Tensor:
        rows = []
        for _, r in stimuli.iterrows():
            rng = np.random.default_rng(_stim_seed(r["id"], self.seed))
            v = self.concept_vecs[self.concepts.index(r["concept"])] + self.form_vecs[r["form"]]
            rows.append(v + self.noise * rng.standard_normal(v.shape))
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def encode(self, stimuli: pd.DataFrame, battery: Battery) -> Batch:
        x = self.features(stimuli)
        n = len(stimuli)
        return Batch(inputs={"x": x}, masks={"x": torch.ones(n, 1, dtype=torch.bool)},
                     token_ids={"x": torch.zeros(n, 1, dtype=torch.long)})

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.inputs["x"].to(self.device))

    @staticmethod
    @replica_safe
    def _classify(subject: "PlantedSubject", stimuli: pd.DataFrame, battery: Battery) -> np.ndarray:
        logits = subject.forward(subject.encode(stimuli, battery)).float().log_softmax(-1)
        idx = torch.tensor([subject.concepts.index(c) for c in stimuli["concept"]])
        return logits[torch.arange(len(idx)), idx].cpu().numpy()


def make_planted(
    root: str | Path,
    *,
    n_concepts: int = 6,
    per_form: int = 6,
    hidden: int = 64,
    d_in: int = 32,
    noise: float = 0.15,
    weak_gain: float = 0.75,
    seed: int = 0,
    init: str = "pretrained",
) -> Planted:
    """Build the planted subject, its battery (written under ``root``) and the truth table.

    Parameters
    ----------
    root
        Folder for the battery (``battery.json``, ``stimuli.csv``, placeholder images).
    n_concepts, per_form
        Concepts and stimuli per concept and form (half screening, half testing).
    hidden
        Hidden units; the first ``3 * n_concepts`` carry planted tuning (invariant,
        image-only, weak per concept), the last eighth are dead, the rest untuned.
    d_in
        Input dimension (concept and form directions plus noise dimensions).
    noise
        Standard deviation of per-stimulus input noise.
    weak_gain
        Strength of the weak cells' tuning relative to the invariant cells' (their
        noise readout has the invariant cells' expected size, fixed, so the weak
        cells sit reliably between k = 5 and the invariant cells: about 7 SD
        against about 8.6 SD on either split at the default 0.75).
    seed
        Seed for weights, directions and noise.
    init
        ``"random"`` gives the same architecture with untuned random weights (control).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    concepts = [f"concept{i}" for i in range(n_concepts)]
    n_dirs = n_concepts + len(FORMS)
    if d_in < n_dirs + 4:
        raise ValueError("d_in too small for the concept and form directions")
    basis = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0]
    concept_vecs = 2.0 * basis[:n_concepts]
    # forms are strong directions so that an image-only cell can gate on modality with a wide margin
    form_vecs = {f: 3.0 * basis[n_concepts + i] for i, (f, _) in enumerate(FORMS)}
    image_dir = sum(basis[n_concepts + i] for i, (_, m) in enumerate(FORMS) if m == "image")
    rows, placeholder = [], "images/placeholder.png"
    Image.new("RGB", (4, 4), (128, 128, 128)).save(root / placeholder)
    for c in concepts:
        for form, modality in FORMS:
            for k in range(per_form):
                rows.append(dict(id=f"{c}-{form}-{k}", concept=c, modality=modality, form=form,
                                 split="screening" if k % 2 == 0 else "testing",
                                 text=f"{c} as {form} {k}" if modality == "text" else "",
                                 image=placeholder if modality == "image" else "", cloze="", target=""))
    table = pd.DataFrame(rows)
    meta_concepts = {c: {"prompt": c, "names": [c]} for c in concepts}
    import json

    (root / "battery.json").write_text(json.dumps({"name": "planted", "concepts": meta_concepts}, indent=1))
    write_csv(table, root / "stimuli.csv")
    battery = Battery.load(root)

    torch_gen = torch.Generator().manual_seed(seed)
    net = PlantedNet(d_in, hidden, n_concepts)
    with torch.no_grad():
        w1 = torch.randn(hidden, d_in, generator=torch_gen) * 0.15
        b1 = torch.full((hidden,), -0.3)
        w2 = torch.randn(n_concepts, hidden, generator=torch_gen) * 0.02
        truth = []
        if init == "pretrained":
            noise_dirs = torch.tensor(basis[n_dirs:], dtype=torch.float32)
            # untuned units read only noise dimensions
            for u in range(3 * n_concepts, hidden):
                w1[u] = 0.5 * (torch.randn(noise_dirs.shape[0], generator=torch_gen) @ noise_dirs)
                b1[u] = 0.3
            for i in range(n_concepts):
                cdir = torch.tensor(basis[i], dtype=torch.float32)
                inv, img, weak = 3 * i, 3 * i + 1, 3 * i + 2
                # tuned units also read noise dimensions, so their baseline is active and noisy
                w1[inv] = 2.0 * cdir + 0.5 * (torch.randn(noise_dirs.shape[0], generator=torch_gen) @ noise_dirs)
                b1[inv] = 1.0
                # an AND of concept and image modality: ~5 SD above zero for the concept's images,
                # >= 3 SD below zero for its text stimuli and for other concepts' images
                w1[img] = 2.5 * cdir + 3.0 * torch.tensor(image_dir / np.linalg.norm(image_dir), dtype=torch.float32)
                b1[img] = -7.0
                # a fixed-size noise readout: the weak effect is weak in amplitude, not erratic across seeds
                r = torch.randn(noise_dirs.shape[0], generator=torch_gen)
                r = r / r.norm() * float(np.sqrt(noise_dirs.shape[0]))
                w1[weak] = 2.0 * weak_gain * cdir + 0.5 * (r @ noise_dirs)
                b1[weak] = 1.0
                w2[i, inv] = 3.0
                w2[i, img] = 1.0
                w2[i, weak] = 0.5
                truth += [("hidden", inv, concepts[i], "invariant"), ("hidden", img, concepts[i], "image-only"),
                          ("hidden", weak, concepts[i], "weak")]
            dead = range(hidden - hidden // 8, hidden)
            for u in dead:
                w1[u] = 0.0
                b1[u] = -1.0
        net.layer1.weight.copy_(w1)
        net.layer1.bias.copy_(b1)
        net.out.weight.copy_(w2)
        net.out.bias.zero_()
    subject = PlantedSubject(net, concepts, concept_vecs, form_vecs, noise, seed)
    subject.init = init
    return Planted(subject, battery, pd.DataFrame(truth, columns=["site", "unit", "concept", "kind"]))
