"""The organism's world: the ten digits as handwriting, as rendered names and as text.

Everything here is offline and reproducible from packages that install with pip:

* **handwritten** digits come from scikit-learn's bundled ``load_digits`` (1797
  8×8 images), upscaled to 24×24 and centred on a 32×32 canvas; samples are split
  by index: the first :data:`HW_TRAIN_END` are for training, the rest (about 30 %,
  mostly other writers) are held out;
* **written names** (the digit's name drawn as pixels — Quiroga's written-name
  stimuli, CLIP's typographic responses) are drawn with Pillow's own fonts only (its
  bitmap font and its scalable default font at several sizes, plus synthetic bold and
  oblique variants), so a fresh machine renders the same pixels; the bold and
  oblique styles are held out of training;
* **text** is the English word, the numeral, the Roman numeral, the Sino-Korean and
  the native Korean number word, inside templates ("a photo of seven", ...); some
  templates are held out of training.

Ink is bright on a dark background for every image form, in ``[0, 1]``.  Training
images are augmented on the fly with :func:`augment` (seeded shifts, rotations,
scale and pixel noise).  :func:`build_digits_battery` writes the ``probes/digits``
battery from held-out material only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

IMAGE_SIZE = 32
#: handwritten samples with index < HW_TRAIN_END train the organism; the rest are held out
HW_TRAIN_END = 1257

CONCEPTS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS: tuple[str, ...] = tuple(str(i) for i in range(10))
#: Roman numerals had no zero; Romans wrote the word "nulla" (nothing), used here for zero.
ROMAN: tuple[str, ...] = ("nulla", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX")
KOREAN_SINO: tuple[str, ...] = ("영", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구")
#: native Korean numbers have no zero; 공 (the spoken zero of phone numbers) stands in.
KOREAN_NATIVE: tuple[str, ...] = ("공", "하나", "둘", "셋", "넷", "다섯", "여섯", "일곱", "여덟", "아홉")

#: text form -> the ten words (index = digit)
TEXT_WORDS: dict[str, tuple[str, ...]] = {
    "name": CONCEPTS,
    "numeral": NUMERALS,
    "roman": ROMAN,
    "korean-sino": KOREAN_SINO,
    "korean-native": KOREAN_NATIVE,
}
#: forms that are also drawn as pixels (Pillow's fonts have no Hangul)
WRITTEN_FORMS: tuple[str, ...] = ("name", "numeral", "roman")

TRAIN_TEMPLATES: tuple[str, ...] = (
    "{}", "a photo of {}", "the number {}", "a drawing of {}", "a picture of the digit {}",
    "digit {}", "this is {}", "{} written by hand", "숫자 {}", "{}의 사진",
)
#: held out of training; the first three make the battery's screening split, the rest its testing split
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image of {}", "the digit {}", "{}의 그림",
    "a sketch of {}", "it shows {}", "이것은 {}",
)
PROMPT_TEMPLATE = "a photo of {}"

#: words random training templates are made of (none names a digit or occurs in a held-out template)
FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("a", "the", "photo", "picture", "number", "digit", "of", "this", "is", "written", "by", "hand",
           "drawing", "my", "your", "nice", "big", "small", "little", "here", "look", "at", "see", "printed",
           "label", "card", "page", "with", "on", "and"),
    "ko": ("숫자", "사진", "손글씨", "큰", "작은", "여기", "보세요", "카드", "글자", "종이"),
}
N_RANDOM_TEMPLATES = 200


def random_templates(n: int = N_RANDOM_TEMPLATES, seed: int = 1234) -> tuple[str, ...]:
    """``n`` training templates of 0–3 filler words before and 0–2 after the digit word (fixed seed).

    They teach the text tower to find the digit word among arbitrary words, so it
    generalises to the held-out templates.
    """
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(n):
        words = FILLER_WORDS["en" if rng.random() < 0.75 else "ko"]
        before = [str(w) for w in rng.choice(words, size=int(rng.integers(0, 4)))]
        after = [str(w) for w in rng.choice(words, size=int(rng.integers(0, 3)))]
        out.append(" ".join(before + ["{}"] + after))
    return tuple(out)


def case_variants(word: str, form: str = "name") -> list[str]:
    """The spellings a word is shown in: English names lower, Capitalised and UPPER; Roman
    numerals UPPER and lower; numerals and Korean as they are."""
    if form == "name":
        variants = [word.lower(), word.capitalize(), word.upper()]
    elif form == "roman":
        variants = [word.upper(), word.lower()]
    else:
        variants = [word]
    return list(dict.fromkeys(variants))


def concept_names(digit: int) -> list[str]:
    """Every word that names ``digit`` (used as the battery's ``names``)."""
    return [TEXT_WORDS[f][digit] for f in TEXT_WORDS]


# --------------------------------------------------------------------- handwriting
@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def handwritten(indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Handwritten digits as 32×32 images in ``[0, 1]``.

    Parameters
    ----------
    indices
        Sample indices into ``load_digits`` (default: all 1797).

    Returns
    -------
    images, labels, indices
        ``float32 [N, 32, 32]``, ``int64 [N]`` and the sample indices.
    """
    from PIL import Image

    raw, target = _digits()
    idx = np.arange(len(raw)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros((len(idx), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    inner, pad = 24, (IMAGE_SIZE - 24) // 2
    for k, i in enumerate(idx):
        im = Image.fromarray(raw[i], mode="F").resize((inner, inner), Image.Resampling.BILINEAR)
        out[k, pad : pad + inner, pad : pad + inner] = np.clip(np.asarray(im, np.float32), 0.0, 1.0)
    return out, target[idx], idx


def handwritten_split(part: str) -> np.ndarray:
    """Sample indices of ``part``: ``"train"`` (index < :data:`HW_TRAIN_END`) or ``"heldout"``."""
    n = len(_digits()[0])
    if part == "train":
        return np.arange(0, HW_TRAIN_END)
    if part == "heldout":
        return np.arange(HW_TRAIN_END, n)
    raise ValueError(f"part must be 'train' or 'heldout', not {part!r}")


# ------------------------------------------------------------------------- fonts
@dataclass(frozen=True)
class FontStyle:
    """A way to draw text with Pillow's own fonts.

    ``family`` is ``"pil-bitmap"`` (Pillow's built-in bitmap font) or ``"pil-sans"``
    (Pillow's scalable default font, Aileron); ``stroke`` thickens strokes (bold),
    ``shear`` slants the text (oblique).
    """

    name: str
    family: str
    size: int = 11
    stroke: int = 0
    shear: float = 0.0

    def font(self):
        from PIL import ImageFont

        if self.family == "pil-bitmap":
            return ImageFont.load_default_imagefont()
        if self.family == "pil-sans":
            return ImageFont.load_default(size=self.size * self.supersample)
        return ImageFont.truetype(self.family, self.size * self.supersample)

    @property
    def supersample(self) -> int:
        """Scalable fonts are drawn at twice the size and shrunk (smoother; half-pixel strokes)."""
        return 1 if self.family == "pil-bitmap" else 2  # a font file (optional, never used for training)


TRAIN_FONTS: tuple[FontStyle, ...] = (
    FontStyle("pil-bitmap", "pil-bitmap"),
    *(FontStyle(f"pil-sans-{s}", "pil-sans", s) for s in (9, 10, 11, 12, 13, 14)),
)
#: font styles never seen in training (bold and oblique); screening and testing get different ones
HELDOUT_FONTS: tuple[FontStyle, ...] = (
    FontStyle("pil-sans-bold-11", "pil-sans", 11, stroke=1),
    FontStyle("pil-sans-oblique-12", "pil-sans", 12, shear=0.3),
    FontStyle("pil-sans-bold-13", "pil-sans", 13, stroke=1),
    FontStyle("pil-sans-oblique-10", "pil-sans", 10, shear=0.3),
)


def render_text(text: str, style: FontStyle, offset: tuple[int, int] = (0, 0), max_width: int = 30) -> np.ndarray:
    """Draw ``text`` bright on dark, centred (plus ``offset``) on a 32×32 canvas.

    Text wider than ``max_width`` pixels is scaled down to fit.

    Returns
    -------
    numpy.ndarray
        ``float32 [32, 32]`` in ``[0, 1]``.
    """
    from PIL import Image, ImageDraw

    font = style.font()
    ss = style.supersample
    canvas = Image.new("L", (160 * ss, 64 * ss), 0)
    ImageDraw.Draw(canvas).text((16, 16), text, fill=255, font=font, stroke_width=style.stroke, stroke_fill=255)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"nothing drawn for {text!r} with {style.name}")
    glyphs = canvas.crop(box)
    if ss > 1:
        glyphs = glyphs.resize((max(1, round(glyphs.width / ss)), max(1, round(glyphs.height / ss))),
                               Image.Resampling.LANCZOS)
    if style.shear:
        w, h = glyphs.size
        extra = int(math.ceil(abs(style.shear) * h))
        glyphs = glyphs.transform((w + extra, h), Image.Transform.AFFINE,
                                  (1, style.shear, -extra if style.shear > 0 else 0, 0, 1, 0),
                                  resample=Image.Resampling.BILINEAR)
        glyphs = glyphs.crop(glyphs.getbbox() or (0, 0, w + extra, h))
    w, h = glyphs.size
    limit_h = IMAGE_SIZE - 4
    factor = min(1.0, max_width / w, limit_h / h)
    if factor < 1.0:
        glyphs = glyphs.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)
        w, h = glyphs.size
    out = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    x0 = (IMAGE_SIZE - w) // 2 + offset[0]
    y0 = (IMAGE_SIZE - h) // 2 + offset[1]
    out.paste(glyphs, (x0, y0))
    return np.asarray(out, np.float32) / 255.0


def written_items(fonts: tuple[FontStyle, ...], offsets: tuple[tuple[int, int], ...] = ((0, 0),)) -> pd.DataFrame:
    """Every (concept, written form, spelling, font, offset) combination, in a fixed order."""
    rows = []
    for digit, concept in enumerate(CONCEPTS):
        for form in WRITTEN_FORMS:
            word = TEXT_WORDS[form][digit]
            for spelling in case_variants(word, form):
                for style in fonts:
                    for off in offsets:
                        rows.append(dict(concept=concept, label=digit, form=form, text=spelling, font=style.name,
                                         dx=off[0], dy=off[1]))
    return pd.DataFrame(rows)


def render_items(items: pd.DataFrame, fonts: tuple[FontStyle, ...]) -> np.ndarray:
    """Render the rows of :func:`written_items` as ``float32 [N, 32, 32]``."""
    by_name = {f.name: f for f in fonts}
    return np.stack([render_text(r.text, by_name[r.font], (int(r.dx), int(r.dy))) for r in items.itertuples()]) \
        if len(items) else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)


HELDOUT_OFFSETS: tuple[tuple[int, int], ...] = ((0, 0), (-2, 1), (2, -1))


# -------------------------------------------------------------------------- text
def text_items(templates: tuple[str, ...]) -> pd.DataFrame:
    """Every (concept, text form, spelling, template) text, in a fixed order."""
    rows = []
    for digit, concept in enumerate(CONCEPTS):
        for form, words in TEXT_WORDS.items():
            for spelling in case_variants(words[digit], form):
                for t in templates:
                    rows.append(dict(concept=concept, label=digit, form=form, word=spelling, template=t,
                                     text=t.format(spelling)))
    return pd.DataFrame(rows)


MAX_BYTES = 48


def tokenize(texts: list[str], max_len: int = MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of each text, padded: ``(ids int64 [B, T], mask bool [B, T])``; T = longest (≤ ``max_len``)."""
    encoded = [list(t.encode("utf-8"))[:max_len] for t in texts]
    width = max([len(e) for e in encoded] + [1])
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i, e in enumerate(encoded):
        if not e:
            raise ValueError("empty text")
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = True
    return ids, mask


# ------------------------------------------------------------------ augmentation
def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation: float = 12.0,
    max_shift: float = 2.5,
    scale: tuple[float, float] = (0.85, 1.1),
    noise: float = 0.05,
    gain: tuple[float, float] = (0.8, 1.6),
) -> torch.Tensor:
    """Random affine jitter and pixel noise, drawn from ``generator`` (deterministic).

    Parameters
    ----------
    images
        ``float32 [N, 1, H, W]`` in ``[0, 1]``.
    generator
        Source of randomness (seeded by the caller).
    max_rotation
        Degrees, uniform in ``±max_rotation``.
    max_shift
        Pixels, uniform in ``±max_shift`` along each axis.
    scale
        Uniform zoom range.
    noise
        Standard deviation of additive Gaussian pixel noise (result clipped to ``[0, 1]``).
    gain
        Uniform range of an ink-contrast factor (thin strokes look bolder).
    """
    n, _, h, w = images.shape
    u = torch.rand(n, 5, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_rotation)
    zoom = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * max_shift * 2 / w
    ty = (u[:, 3] * 2 - 1) * max_shift * 2 / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * (gain[0] + u[:, 4] * (gain[1] - gain[0])).view(n, 1, 1, 1)
    out = out + noise * torch.randn(out.shape, generator=generator)
    return out.clamp_(0.0, 1.0)


# ----------------------------------------------------------------- the data sets
@dataclass
class TrainingData:
    """Everything training draws from (built once, deterministic)."""

    hw_images: torch.Tensor      # [N, 1, 32, 32]
    hw_labels: torch.Tensor      # [N]
    written_images: torch.Tensor  # [M, 1, 32, 32], training fonts
    written_labels: torch.Tensor
    text_ids: torch.Tensor       # [K, T] byte ids of every training text
    text_mask: torch.Tensor
    text_labels: torch.Tensor
    text_word: torch.Tensor | None = None  # [K, 2] byte span [start, end) of the digit word in each text


def word_span(template: str, word: str) -> tuple[int, int]:
    """Byte span ``[start, end)`` of ``word`` in ``template.format(word)`` (UTF-8)."""
    start = len(template[: template.index("{}")].encode("utf-8"))
    return start, start + len(word.encode("utf-8"))


def training_data() -> TrainingData:
    """Handwritten training samples, names in the training fonts, texts in the training templates."""
    hw, y, _ = handwritten(handwritten_split("train"))
    items = written_items(TRAIN_FONTS)
    wr = render_items(items, TRAIN_FONTS)
    texts = text_items(TRAIN_TEMPLATES + random_templates())
    ids, mask = tokenize(texts["text"].tolist())
    spans = [word_span(t, w) for t, w in zip(texts["template"], texts["word"])]
    return TrainingData(
        torch.from_numpy(hw).unsqueeze(1), torch.from_numpy(y),
        torch.from_numpy(wr).unsqueeze(1), torch.tensor(items["label"].to_numpy()),
        ids, mask, torch.tensor(texts["label"].to_numpy()),
        torch.tensor(spans, dtype=torch.long).clamp(max=MAX_BYTES),
    )


@dataclass
class HeldOutData:
    """The held-out evaluation sets of the model card (deterministic, Pillow fonts only)."""

    hw_images: torch.Tensor
    hw_labels: torch.Tensor
    written: pd.DataFrame        # rows of written_items (held-out fonts and offsets)
    written_images: torch.Tensor
    texts: pd.DataFrame          # rows of text_items (held-out templates)


def heldout_data() -> HeldOutData:
    """Held-out handwritten samples, names in held-out fonts, texts in held-out templates."""
    hw, y, _ = handwritten(handwritten_split("heldout"))
    items = written_items(HELDOUT_FONTS, HELDOUT_OFFSETS)
    wr = render_items(items, HELDOUT_FONTS)
    return HeldOutData(torch.from_numpy(hw).unsqueeze(1), torch.from_numpy(y), items,
                       torch.from_numpy(wr).unsqueeze(1), text_items(HELDOUT_TEMPLATES))


REFERENCE_PER_CLASS = 10


def reference_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first :data:`REFERENCE_PER_CLASS` training handwritten samples of each digit (unaugmented).

    Their class-mean image embeddings are what a text is matched against in text-to-image
    retrieval (the text stimuli's zero-shot readout and the card's text accuracy).
    """
    idx_all = handwritten_split("train")
    _, target = _digits()
    chosen = np.concatenate([idx_all[target[idx_all] == d][:REFERENCE_PER_CLASS] for d in range(10)])
    images, labels, _ = handwritten(chosen)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


# ------------------------------------------------------------------- the battery
def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array * 255).astype(np.uint8), mode="L").save(path, optimize=True)


#: the battery with pairs (an image and a text of one digit) beside the single-modality stimuli of ``digits``
PAIRS_BATTERY = "digits-cross"


def build_digits_battery(out_dir: str | Path, *, handwritten_per_split: int = 15, written_per_split: int = 6,
                         seed: int = 0, pairs: tuple[int, int] = (0, 0)) -> pd.DataFrame:
    """Write the ``digits`` battery (battery.json, stimuli.csv, images/) from held-out material only.

    Image stimuli: ``handwritten`` (held-out samples; screening and testing get
    different samples), ``written-name`` / ``written-numeral`` / ``written-roman``
    (held-out font styles; screening: bold 11 and oblique 12, testing: bold 13 and
    oblique 10).  Text stimuli: ``text-name``, ``text-numeral``, ``text-roman``,
    ``text-korean-sino``, ``text-korean-native`` in the held-out templates (screening:
    the first three, testing: the last three).

    With ``pairs`` it writes the ``digits-cross`` battery instead: the same stimuli (same
    ids, same pixels) plus **pairs** (modality ``pair``) that show one of the split's
    images with one of the split's texts of the same digit: ``pair-handwritten`` (a
    handwritten image) and ``pair-written`` (a drawn name, its written forms in turn); the
    text's form cycles through the five text forms.  A cross-modal subject sees each
    image alone, each text alone and the pairs in one recording.

    Parameters
    ----------
    out_dir
        Battery folder (created).
    handwritten_per_split
        Handwritten samples per concept in each split.
    written_per_split
        Drawn names per concept, written form and split (6 = every numeral rendering).
    seed
        Seed for choosing which held-out samples and renderings are shown.
    pairs
        ``(pair-handwritten, pair-written)`` stimuli per concept and split; ``(0, 0)``
        (default) writes ``digits``.

    Returns
    -------
    pandas.DataFrame
        The stimulus table as written.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    # handwritten: held-out samples, alternating screening / testing by position
    idx = handwritten_split("heldout")
    _, target = _digits()
    for digit, concept in enumerate(CONCEPTS):
        mine = idx[target[idx] == digit]
        parts = {"screening": mine[0::2], "testing": mine[1::2]}
        for split, pool in parts.items():
            chosen = np.sort(rng.choice(pool, size=min(handwritten_per_split, len(pool)), replace=False))
            images, _, _ = handwritten(chosen)
            for k, (i, im) in enumerate(zip(chosen, images)):
                rel = f"images/handwritten/{concept}-{int(i):04d}.png"
                _save_png(im, out / rel)
                rows.append(dict(id=f"{concept}-handwritten-{int(i):04d}", concept=concept, modality="image",
                                 form="handwritten", split=split, text="", image=rel, cloze="", target=""))

    # written names: held-out font styles
    fonts = {"screening": HELDOUT_FONTS[:2], "testing": HELDOUT_FONTS[2:]}
    for split, styles in fonts.items():
        items = written_items(styles, HELDOUT_OFFSETS)
        for form in WRITTEN_FORMS:
            for concept in CONCEPTS:
                pool = items[(items["form"] == form) & (items["concept"] == concept)]
                take = pool.iloc[np.sort(rng.choice(len(pool), size=min(written_per_split, len(pool)), replace=False))]
                images = render_items(take, styles)
                for k, (r, im) in enumerate(zip(take.itertuples(), images)):
                    sid = f"{concept}-written-{form}-{split[0]}{k:02d}"
                    rel = f"images/written-{form}/{sid}.png"
                    _save_png(im, out / rel)
                    rows.append(dict(id=sid, concept=concept, modality="image", form=f"written-{form}", split=split,
                                     text=r.text, image=rel, cloze="", target=""))

    # text: held-out templates, one spelling per form (as written in TEXT_WORDS)
    for t_index, template in enumerate(HELDOUT_TEMPLATES):
        split = "screening" if t_index < 3 else "testing"
        for digit, concept in enumerate(CONCEPTS):
            for form, words in TEXT_WORDS.items():
                word = words[digit]
                rows.append(dict(id=f"{concept}-text-{form}-t{t_index}", concept=concept, modality="text",
                                 form=f"text-{form}", split=split, text=template.format(word), image="",
                                 cloze=template.format("{mask}"), target=word))

    with_pairs = any(pairs)
    if with_pairs:
        rows += _pair_rows(rows, pairs, seed)
    table = pd.DataFrame(rows, columns=["id", "concept", "modality", "form", "split", "text", "image", "cloze", "target"])
    meta = {
        "name": PAIRS_BATTERY if with_pairs else "digits",
        "description": (
            "The ten digits in every form the neuroprobe organism knows: held-out handwritten digits "
            "(scikit-learn load_digits, samples 1257+), the digit's name drawn in held-out font styles "
            "(English word, numeral, Roman numeral), and text (English, numeral, Roman, Sino-Korean, native "
            "Korean) in held-out templates. Nothing here was seen in training. Built by "
            "neuroprobe.subjects.organism.data.build_digits_battery."
            + (" Besides every stimulus of the digits battery (same ids and pixels), pairs: one of the split's "
               "images shown with one of the split's texts of the same digit (pair-handwritten, pair-written), "
               "so image alone, text alone and both together are forms of one recording." if with_pairs else "")
        ),
        "concepts": {c: {"prompt": PROMPT_TEMPLATE.format(c), "names": concept_names(d)} for d, c in enumerate(CONCEPTS)},
        "readout": "zero_shot",
        "subject": "organism-cross" if with_pairs else "organism",
    }
    from neuroprobe.output import write_csv

    (out / "battery.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_csv(table, out / "stimuli.csv", encoding="utf-8")
    return table


def _pair_rows(rows: list[dict], pairs: tuple[int, int], seed: int) -> list[dict]:
    """The pair stimuli of :func:`build_digits_battery` (images and texts taken from ``rows``, split by split)."""
    rng = np.random.default_rng([seed, 1])
    table = pd.DataFrame(rows)
    forms = list(TEXT_WORDS)
    out: list[dict] = []
    for split in ("screening", "testing"):
        templates = [t for i, t in enumerate(HELDOUT_TEMPLATES) if (i < 3) == (split == "screening")]
        for digit, concept in enumerate(CONCEPTS):
            mine = table[(table["split"] == split) & (table["concept"] == concept)]
            pools = {"handwritten": mine[mine["form"] == "handwritten"],
                     "written": mine[mine["form"].str.startswith("written-")]}
            for (kind, pool), n in zip(pools.items(), pairs):
                if kind == "written":  # the written forms in turn
                    by_form = [g for _, g in pool.groupby("form", sort=True)]
                    take = [by_form[k % len(by_form)].iloc[int(rng.integers(len(by_form[k % len(by_form)])))]
                            for k in range(n)]
                else:
                    take = [pool.iloc[int(i)] for i in np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
                for k, img in enumerate(take):
                    form = forms[k % len(forms)]
                    word = TEXT_WORDS[form][digit]
                    template = templates[int(rng.integers(len(templates)))]
                    out.append(dict(id=f"{concept}-pair-{kind}-{split[0]}{k:02d}", concept=concept, modality="pair",
                                    form=f"pair-{kind}", split=split, text=template.format(word), image=img["image"],
                                    cloze=template.format("{mask}"), target=word))
    return out
