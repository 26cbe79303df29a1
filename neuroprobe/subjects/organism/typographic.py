"""Typographic attacks and Stroop-like conflicts in the organism's world.

Goh et al. 2021 showed that CLIP reads: an apple with a handwritten "iPod" label is
classified as an iPod.  Here the picture is a held-out handwritten digit (the
organism's :func:`~neuroprobe.subjects.organism.data.handwritten` samples) and the
label is a word drawn over it with the organism's own renderer
(:func:`~neuroprobe.subjects.organism.data.render_text`, Pillow's scalable default font),
ink bright on dark as everywhere in this world, composited by taking the brighter pixel.

Conditions (the word drawn over a digit ``a``):

================  ==========================================================================
``clean``         no word
``congruent``     the name of ``a`` itself ("three" over a 3)
``incongruent``   the name of another digit ``b`` (the attack; the Stroop conflict)
``word``          a common English word of the same length that names no digit (any text?)
``nonsense``      random letters of the same length (letters without a word)
================  ==========================================================================

For ``word`` and ``nonsense`` the stimulus still carries the ``b`` its incongruent twin
would have named (``word_concept`` is empty, ``foil`` is ``b``), so a flip to ``b`` can
be counted as a control.  :func:`build_battery` writes a battery of these stimuli
(``probes/stroop`` is one, see ``probes/stroop/make_battery.py``); the stimulus's
``concept`` is always the picture's digit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.organism import data as D

CONDITIONS: tuple[str, ...] = ("clean", "congruent", "incongruent", "word", "nonsense")

#: common English words by length (none names a digit in any script the organism reads)
WORDS: dict[int, tuple[str, ...]] = {
    3: ("cat", "sun", "box", "red", "map", "pen", "cup", "hat"),
    4: ("tree", "book", "fish", "lamp", "door", "milk", "rain", "bird"),
    5: ("house", "table", "chair", "water", "bread", "green", "cloud", "apple"),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"

#: where the word goes: pixel offset of its centre from the image centre
POSITIONS: dict[str, tuple[int, int]] = {"center": (0, 0), "top": (0, -8), "bottom": (0, 8)}


@dataclass(frozen=True)
class Attack:
    """The word drawn over one picture (a row of :func:`attack_items`)."""

    sample: int           # index into scikit-learn's load_digits
    digit: int            # the picture's digit
    condition: str
    word: str             # "" for clean
    word_digit: int       # the digit the word names; -1 when it names none
    foil: int             # the other digit of this stimulus's incongruent twin
    size: int             # font size in pixels (0 for clean)
    position: str


def font(size: int) -> D.FontStyle:
    """The label font: Pillow's scalable default font at ``size`` pixels (drawn at 2x, shrunk)."""
    return D.FontStyle(f"pil-sans-{size}", "pil-sans", int(size))


def nonsense(length: int, rng: np.random.Generator) -> str:
    """``length`` random lowercase letters (re-drawn if they spell a digit's name or a :data:`WORDS` word)."""
    banned = set(D.CONCEPTS) | {w for ws in WORDS.values() for w in ws}
    while True:
        text = "".join(rng.choice(list(LETTERS), size=int(length)))
        if text not in banned:
            return text


def attack_items(samples: Sequence[int], digits: Sequence[int], *, sizes: Sequence[int], positions: Sequence[str],
                 conditions: Sequence[str] = CONDITIONS, seed: int = 0) -> pd.DataFrame:
    """Every (sample, condition, size, position) stimulus, in a fixed order.

    Parameters
    ----------
    samples, digits
        ``load_digits`` sample indices and their digits.
    sizes
        Font sizes in pixels (text wider than the 32-pixel canvas is shrunk to fit).
    positions
        Keys of :data:`POSITIONS`.
    conditions
        Any of :data:`CONDITIONS` (``clean`` once per sample).
    seed
        Chooses the foil digit, the neutral word and the nonsense letters.

    Returns
    -------
    pandas.DataFrame
        One row per stimulus with the fields of :class:`Attack`.
    """
    bad = sorted(set(conditions) - set(CONDITIONS))
    if bad:
        raise NeuroprobeError(f"condition(s) {', '.join(bad)} not among {', '.join(CONDITIONS)}.")
    bad = sorted(set(positions) - set(POSITIONS))
    if bad:
        raise NeuroprobeError(f"position(s) {', '.join(bad)} not among {', '.join(POSITIONS)}.")
    rng = np.random.default_rng([seed, 20])
    rows: list[Attack] = []
    for sample, digit in zip(samples, digits):
        sample, digit = int(sample), int(digit)
        foil = (digit + 1 + int(rng.integers(9))) % 10  # another digit, uniform over the nine
        name = D.CONCEPTS[foil]
        neutral = str(rng.choice(WORDS[len(name)]))
        letters = nonsense(len(name), rng)
        if "clean" in conditions:
            rows.append(Attack(sample, digit, "clean", "", -1, foil, 0, "none"))
        for size in sizes:
            for pos in positions:
                for cond in conditions:
                    if cond == "congruent":
                        rows.append(Attack(sample, digit, cond, D.CONCEPTS[digit], digit, foil, int(size), pos))
                    elif cond == "incongruent":
                        rows.append(Attack(sample, digit, cond, name, foil, foil, int(size), pos))
                    elif cond == "word":
                        rows.append(Attack(sample, digit, cond, neutral, -1, foil, int(size), pos))
                    elif cond == "nonsense":
                        rows.append(Attack(sample, digit, cond, letters, -1, foil, int(size), pos))
    return pd.DataFrame([r.__dict__ for r in rows])


def render_attacks(items: pd.DataFrame) -> np.ndarray:
    """The pictures of :func:`attack_items` rows: ``float32 [N, 32, 32]`` in ``[0, 1]``."""
    pictures, _, _ = D.handwritten(np.unique(items["sample"].to_numpy()))
    by_sample = dict(zip(np.unique(items["sample"].to_numpy()).tolist(), pictures))
    labels: dict[tuple[str, int, str], np.ndarray] = {}
    out = np.zeros((len(items), D.IMAGE_SIZE, D.IMAGE_SIZE), np.float32)
    for k, r in enumerate(items.itertuples(index=False)):
        picture = by_sample[int(r.sample)]
        if not r.word:
            out[k] = picture
            continue
        key = (str(r.word), int(r.size), str(r.position))
        if key not in labels:
            labels[key] = D.render_text(str(r.word), font(int(r.size)), POSITIONS[str(r.position)],
                                        max_width=D.IMAGE_SIZE)
        out[k] = np.maximum(picture, labels[key])
    return out


def build_battery(out_dir: str | Path, *, name: str = "stroop", per_split: int = 3, sizes: Sequence[int] = (10, 14),
                  positions: Sequence[str] = ("center",), conditions: Sequence[str] = CONDITIONS,
                  seed: int = 0, description: str | None = None) -> pd.DataFrame:
    """Write a typographic battery (battery.json, stimuli.csv, images/) from held-out handwriting.

    ``per_split`` held-out samples per digit go to each split (screening and testing get
    different samples, as in ``probes/digits``); each is shown under every condition at
    every size and position.  Extra columns: ``word`` (the drawn text), ``word_concept``
    (the concept it names, or empty), ``foil`` (the incongruent twin's concept),
    ``condition``, ``font_size``, ``position``, ``sample``.  ``form`` is the condition
    (``clean`` or ``<condition>-<size>px-<position>``).

    Returns
    -------
    pandas.DataFrame
        The stimulus table as written.
    """
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    rng = np.random.default_rng([seed, 21])
    idx = D.handwritten_split("heldout")
    _, target = D._digits()
    chosen: list[tuple[int, int, str]] = []
    for digit in range(10):
        mine = idx[target[idx] == digit]
        parts = {"screening": mine[0::2], "testing": mine[1::2]}  # the digits battery's split of samples
        for split, pool in parts.items():
            take = np.sort(rng.choice(pool, size=min(int(per_split), len(pool)), replace=False))
            chosen += [(int(i), digit, split) for i in take]
    split_of = {s: sp for s, _, sp in chosen}
    items = attack_items([s for s, _, _ in chosen], [d for _, d, _ in chosen], sizes=sizes, positions=positions,
                         conditions=conditions, seed=seed)
    pictures = render_attacks(items)
    rows = []
    for r, picture in zip(items.itertuples(index=False), pictures):
        form = "clean" if r.condition == "clean" else f"{r.condition}-{r.size}px-{r.position}"
        sid = f"{D.CONCEPTS[r.digit]}-{int(r.sample):04d}-{form}"
        rel = f"images/{sid}.png"
        D._save_png(picture, out / rel)
        rows.append(dict(id=sid, concept=D.CONCEPTS[r.digit], modality="image", form=form, split=split_of[r.sample],
                         text="", image=rel, cloze="", target="", word=r.word,
                         word_concept=D.CONCEPTS[r.word_digit] if r.word_digit >= 0 else "",
                         foil=D.CONCEPTS[r.foil], condition=r.condition, font_size=r.size, position=r.position,
                         sample=r.sample))
    table = pd.DataFrame(rows)
    meta = {
        "name": name,
        "description": description or (
            "Stroop-like conflicts for the organism (Goh et al. 2021's typographic attack in the digits world): "
            "held-out handwritten digits (scikit-learn load_digits, samples 1257+) with a word drawn over them in "
            "Pillow's default font: nothing (clean), the digit's own name (congruent), another digit's name "
            "(incongruent), a common word of the same length (word) or random letters (nonsense). The concept of "
            "every stimulus is the picture's digit; word_concept names the digit the word names. Built by "
            "neuroprobe.subjects.organism.typographic.build_battery."
        ),
        "concepts": {c: {"prompt": D.PROMPT_TEMPLATE.format(c), "names": D.concept_names(d)}
                     for d, c in enumerate(D.CONCEPTS)},
        "readout": "zero_shot",
        "subject": "organism",
        "built_with": {"per_split": int(per_split), "sizes": [int(s) for s in sizes], "positions": list(positions),
                       "conditions": list(conditions), "seed": int(seed)},
    }
    from neuroprobe.output import write_csv

    (out / "battery.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_csv(table, out / "stimuli.csv", encoding="utf-8")
    return table
