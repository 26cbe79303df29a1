"""Render image stimuli with Pillow: procedural drawings and written names.

Two kinds of picture, both deterministic for a given seed:

* **Drawings** (:func:`draw`): a small procedural picture of a concept (a sun, a
  house, a cat's face...), in a ``colour`` style (filled shapes on a tinted
  background) or a ``sketch`` style (black outlines on white).  Each seed varies
  position, size, tilt, colours and line width, so one concept has many
  different-looking pictures.
* **Written names** (:func:`render_name`): the concept's name rendered as pixels,
  as in Quiroga et al.'s written-name stimuli and CLIP's typographic responses,
  in several fonts, cases, sizes and colours.

:func:`build_battery` writes a whole image + text + pair battery (the shipped
``probes/pictures`` battery is made by it; see ``probes/pictures/make_battery.py``).

Shapes are drawn at :data:`SUPERSAMPLE` times the target size and reduced with
a Lanczos filter (anti-aliasing without any dependency beyond Pillow).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from neuroprobe.errors import NeuroprobeError

#: drawings are made this many times larger, then reduced (anti-aliasing)
SUPERSAMPLE = 4

RGB = tuple[int, int, int]
Point = tuple[float, float]


# ----------------------------------------------------------------- the canvas


@dataclass
class Pen:
    """Drawing state for one picture: the style, colours and the unit-square transform."""

    draw: ImageDraw.ImageDraw
    size: int                 # pixel size of the (supersampled) square canvas
    cx: float                 # centre of the figure, in unit coordinates
    cy: float
    scale: float              # figure size as a fraction of the canvas
    width: float              # line width in unit coordinates
    sketch: bool              # outline-only style
    rng: random.Random
    ink: RGB = (20, 20, 20)

    # unit coordinates: the figure lives in [-0.5, 0.5]^2 around (cx, cy), y down
    def p(self, x: float, y: float) -> tuple[float, float]:
        """Unit figure coordinates -> canvas pixels."""
        return ((self.cx + x * self.scale) * self.size, (self.cy + y * self.scale) * self.size)

    def lw(self, factor: float = 1.0) -> int:
        """Line width in pixels."""
        return max(1, int(round(self.width * factor * self.scale * self.size)))

    def fill(self, colour: RGB) -> RGB | None:
        return None if self.sketch else colour

    def outline(self, colour: RGB) -> RGB:
        return self.ink if self.sketch else _darker(colour)

    def polygon(self, points: Iterable[Point], colour: RGB) -> None:
        pts = [self.p(x, y) for x, y in points]
        self.draw.polygon(pts, fill=self.fill(colour), outline=self.outline(colour), width=self.lw())

    def ellipse(self, x: float, y: float, rx: float, ry: float, colour: RGB) -> None:
        a, b = self.p(x - rx, y - ry), self.p(x + rx, y + ry)
        self.draw.ellipse([a, b], fill=self.fill(colour), outline=self.outline(colour), width=self.lw())

    def circle(self, x: float, y: float, r: float, colour: RGB) -> None:
        self.ellipse(x, y, r, r, colour)

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: RGB, radius: float = 0.0) -> None:
        a, b = self.p(x0, y0), self.p(x1, y1)
        rad = int(radius * self.scale * self.size)
        self.draw.rounded_rectangle([a, b], radius=rad, fill=self.fill(colour), outline=self.outline(colour), width=self.lw())

    def line(self, points: Sequence[Point], colour: RGB, factor: float = 1.0) -> None:
        """A stroke (always drawn, in both styles)."""
        pts = [self.p(x, y) for x, y in points]
        self.draw.line(pts, fill=self.ink if self.sketch else colour, width=self.lw(factor), joint="curve")

    def dot(self, x: float, y: float, r: float, colour: RGB = (20, 20, 20)) -> None:
        """A small solid dot (eyes, centres): solid in both styles."""
        a, b = self.p(x - r, y - r), self.p(x + r, y + r)
        self.draw.ellipse([a, b], fill=self.ink if self.sketch else colour)

    def jitter(self, colour: RGB, amount: int = 30) -> RGB:
        """A colour near ``colour`` (per-picture variation)."""
        return tuple(int(min(255, max(0, c + self.rng.randint(-amount, amount)))) for c in colour)  # type: ignore[return-value]


def _darker(c: RGB, f: float = 0.55) -> RGB:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 40) -> list[Point]:
    """Points on an elliptic arc from angle ``a0`` to ``a1`` (radians, y down)."""
    return [(cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n + 1)]


# ------------------------------------------------------------------ drawings


def _sun(p: Pen) -> None:
    col = p.jitter((250, 200, 40))
    n = p.rng.choice([8, 10, 12])
    phase = p.rng.uniform(0, math.pi)
    for i in range(n):
        a = phase + 2 * math.pi * i / n
        p.line([(0.28 * math.cos(a), 0.28 * math.sin(a)), (0.46 * math.cos(a), 0.46 * math.sin(a))], col, 1.3)
    p.circle(0, 0, 0.22, col)


def _moon(p: Pen) -> None:
    col = p.jitter((240, 225, 120))
    r, d = 0.38, p.rng.uniform(0.22, 0.32)
    # crescent: the outer circle minus a shifted circle of the same radius
    yi = math.sqrt(r * r - (d / 2) ** 2)
    a = math.atan2(yi, d / 2)
    outer = _arc(0, 0, r, r, a, 2 * math.pi - a)
    b = math.atan2(yi, -d / 2)
    inner = _arc(d, 0, r, r, 2 * math.pi - b, b, n=40)  # back along the inner edge
    p.polygon([(x - d / 4, y) for x, y in outer + inner], col)


def _star(p: Pen) -> None:
    col = p.jitter((250, 210, 50))
    pts = []
    for i in range(10):
        rad = 0.46 if i % 2 == 0 else 0.19
        ang = -math.pi / 2 + math.pi * i / 5
        pts.append((rad * math.cos(ang), rad * math.sin(ang) + 0.03))
    p.polygon(pts, col)


def _heart(p: Pen) -> None:
    col = p.jitter((220, 40, 60))
    pts = []
    for i in range(80):
        t = 2 * math.pi * i / 80
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 36, -y / 36 + 0.04))
    p.polygon(pts, col)


def _house(p: Pen) -> None:
    wall = p.jitter(p.rng.choice([(230, 200, 150), (200, 220, 240), (240, 240, 220)]))
    roof = p.jitter((180, 60, 50))
    p.rect(-0.32, -0.05, 0.32, 0.42, wall)
    p.polygon([(-0.42, -0.03), (0.0, -0.42), (0.42, -0.03)], roof)
    p.rect(-0.08, 0.16, 0.08, 0.42, p.jitter((120, 80, 50)))
    win = p.jitter((150, 200, 240))
    p.rect(-0.26, 0.04, -0.13, 0.16, win)
    p.rect(0.13, 0.04, 0.26, 0.16, win)


def _tree(p: Pen) -> None:
    trunk = p.jitter((120, 80, 40))
    leaves = p.jitter((60, 150, 60))
    p.rect(-0.06, 0.05, 0.06, 0.46, trunk)
    if p.rng.random() < 0.5:  # a round tree
        p.circle(0.0, -0.12, 0.3, leaves)
    else:  # a pine
        p.polygon([(-0.34, 0.12), (0.0, -0.46), (0.34, 0.12)], leaves)


def _flower(p: Pen) -> None:
    petal = p.jitter(p.rng.choice([(230, 80, 140), (240, 140, 40), (150, 90, 220), (240, 230, 240)]))
    p.line([(0.0, 0.0), (0.0, 0.48)], p.jitter((60, 140, 60)), 1.2)
    p.ellipse(0.1, 0.32, 0.09, 0.04, p.jitter((70, 160, 70)))
    n = p.rng.choice([5, 6, 8])
    for i in range(n):
        a = 2 * math.pi * i / n
        p.circle(0.17 * math.cos(a), -0.12 + 0.17 * math.sin(a), 0.1, petal)
    p.circle(0.0, -0.12, 0.09, p.jitter((250, 210, 60)))


def _apple(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(210, 40, 40), (120, 190, 60)]))
    p.line([(0.0, -0.2), (0.03, -0.38)], (100, 60, 30), 1.1)
    p.ellipse(0.12, -0.32, 0.1, 0.05, p.jitter((70, 160, 70)))
    # the outline of three overlapping circles (two shoulders, one bottom), seen from the middle
    lobes = [(-0.12, -0.05, 0.25), (0.12, -0.05, 0.25), (0.0, 0.06, 0.29)]
    pts = []
    for i in range(90):
        t = 2 * math.pi * i / 90
        ux, uy = math.cos(t), math.sin(t)
        d = 0.0
        for cx, cy, r in lobes:
            b = ux * cx + uy * cy
            d = max(d, b + math.sqrt(max(0.0, b * b - (cx * cx + cy * cy) + r * r)))
        pts.append((d * ux, 0.04 + d * uy))
    p.polygon(pts, col)


def _fish(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(240, 140, 40), (70, 140, 220), (230, 200, 60)]))
    p.polygon([(0.2, 0.0), (0.46, -0.2), (0.46, 0.2)], col)
    p.ellipse(-0.06, 0.0, 0.32, 0.18, col)
    p.dot(-0.24, -0.04, 0.035)
    p.line(_arc(-0.1, 0.0, 0.08, 0.13, -math.pi / 2, math.pi / 2, 10), _darker(col), 0.6)


def _bird(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(80, 130, 210), (220, 70, 60), (240, 200, 60)]))
    p.line([(-0.02, 0.18), (-0.06, 0.4)], (200, 150, 40), 0.8)
    p.line([(0.08, 0.18), (0.06, 0.4)], (200, 150, 40), 0.8)
    p.polygon([(0.22, -0.02), (0.46, -0.16), (0.42, 0.08)], col)  # tail
    p.ellipse(0.04, 0.04, 0.26, 0.17, col)
    p.circle(-0.22, -0.16, 0.12, col)
    p.polygon([(-0.33, -0.19), (-0.46, -0.13), (-0.33, -0.11)], (240, 170, 40))
    p.dot(-0.24, -0.19, 0.025)
    p.polygon([(-0.04, -0.02), (0.2, -0.04), (0.08, 0.12)], _darker(col, 0.8))  # wing


def _cat(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(230, 150, 70), (150, 150, 150), (60, 60, 60), (240, 230, 210)]))
    p.polygon([(-0.34, -0.05), (-0.3, -0.44), (-0.06, -0.24)], col)
    p.polygon([(0.34, -0.05), (0.3, -0.44), (0.06, -0.24)], col)
    p.ellipse(0.0, 0.04, 0.36, 0.32, col)
    eye = (40, 160, 60)
    p.ellipse(-0.13, -0.04, 0.06, 0.05, eye)
    p.ellipse(0.13, -0.04, 0.06, 0.05, eye)
    p.dot(-0.13, -0.04, 0.022)
    p.dot(0.13, -0.04, 0.022)
    p.polygon([(-0.04, 0.08), (0.04, 0.08), (0.0, 0.13)], (230, 120, 130))
    for s in (-1, 1):
        for dy in (0.1, 0.16):
            p.line([(s * 0.08, dy + 0.02), (s * 0.44, dy - 0.03 + (dy - 0.1))], (30, 30, 30), 0.4)


def _car(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(200, 40, 40), (40, 90, 200), (240, 190, 40), (60, 160, 90)]))
    p.polygon([(-0.22, -0.04), (-0.12, -0.22), (0.16, -0.22), (0.26, -0.04)], col)
    p.rect(-0.46, -0.05, 0.46, 0.16, col, radius=0.05)
    win = (170, 210, 240)
    p.polygon([(-0.17, -0.06), (-0.1, -0.18), (0.0, -0.18), (0.0, -0.06)], win)
    p.polygon([(0.04, -0.06), (0.04, -0.18), (0.14, -0.18), (0.21, -0.06)], win)
    for x in (-0.26, 0.26):
        p.circle(x, 0.17, 0.1, (40, 40, 40))
        p.circle(x, 0.17, 0.04, (180, 180, 180))


def _boat(p: Pen) -> None:
    hull = p.jitter(p.rng.choice([(150, 90, 50), (200, 50, 50), (60, 80, 150)]))
    sail = p.jitter((245, 245, 235), 10)
    p.line([(0.0, 0.16), (0.0, -0.44)], (90, 60, 30), 1.0)
    p.polygon([(0.03, -0.4), (0.03, 0.1), (0.36, 0.1)], sail)
    p.polygon([(-0.03, -0.3), (-0.03, 0.1), (-0.26, 0.1)], sail)
    p.polygon([(-0.44, 0.16), (0.44, 0.16), (0.3, 0.32), (-0.3, 0.32)], hull)
    water = (60, 120, 210)
    wave = [(x / 20 - 0.5, 0.4 + 0.03 * math.sin(x * 1.3)) for x in range(21)]
    p.line(wave, water, 0.8)


def _umbrella(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(200, 40, 60), (50, 90, 200), (240, 180, 40), (120, 60, 170)]))
    p.line([(0.0, -0.1), (0.0, 0.32)], (60, 60, 60), 1.0)
    p.line(_arc(0.08, 0.32, 0.08, 0.08, math.pi, 0, 12), (60, 60, 60), 1.0)
    top = _arc(0.0, 0.0, 0.46, 0.4, math.pi, 2 * math.pi, 40)
    scallops: list[Point] = []
    for k in range(4):  # scalloped lower edge, right to left
        x0 = 0.46 - k * 0.23
        scallops += _arc(x0 - 0.115, 0.0, 0.115, 0.06, 0, math.pi, 10)
    p.polygon(top + scallops, col)
    p.line([(0.0, -0.4), (0.0, -0.46)], (60, 60, 60), 1.0)


def _clock(p: Pen) -> None:
    rim = p.jitter(p.rng.choice([(240, 240, 235), (250, 230, 200)]), 10)
    p.circle(0.0, 0.0, 0.44, rim)
    for i in range(12):
        a = 2 * math.pi * i / 12
        r0 = 0.34 if i % 3 else 0.3
        p.line([(r0 * math.cos(a), r0 * math.sin(a)), (0.4 * math.cos(a), 0.4 * math.sin(a))], (30, 30, 30), 0.6)
    h, m = p.rng.uniform(0, 2 * math.pi), p.rng.uniform(0, 2 * math.pi)
    p.line([(0, 0), (0.2 * math.sin(h), -0.2 * math.cos(h))], (30, 30, 30), 1.2)
    p.line([(0, 0), (0.32 * math.sin(m), -0.32 * math.cos(m))], (30, 30, 30), 0.8)
    p.dot(0, 0, 0.03)


def _cup(p: Pen) -> None:
    col = p.jitter(p.rng.choice([(240, 240, 240), (200, 60, 60), (60, 120, 200), (240, 200, 80)]), 15)
    p.line(_arc(0.3, 0.06, 0.14, 0.13, -math.pi / 2, math.pi / 2, 16), _darker(col), 1.6)
    p.polygon([(-0.32, -0.14), (0.32, -0.14), (0.26, 0.3), (-0.26, 0.3)], col)
    p.ellipse(0.0, 0.36, 0.4, 0.05, col)
    for x in (-0.1, 0.1):  # steam
        p.line([(x + 0.03 * math.sin(t * 1.6), -0.2 - t * 0.05) for t in range(6)], (150, 150, 150), 0.5)


#: concept -> drawing function ``fn(pen)``; the figure lives in the unit square around the centre
DRAWINGS: dict[str, Callable[[Pen], None]] = {
    "sun": _sun, "moon": _moon, "star": _star, "heart": _heart, "house": _house, "tree": _tree,
    "flower": _flower, "apple": _apple, "fish": _fish, "bird": _bird, "cat": _cat, "car": _car,
    "boat": _boat, "umbrella": _umbrella, "clock": _clock, "cup": _cup,
}

STYLES = ("colour", "sketch")


def draw(concept: str, *, size: int = 128, style: str = "colour", seed: int = 0) -> Image.Image:
    """Draw one picture of ``concept``.

    Parameters
    ----------
    concept
        A key of :data:`DRAWINGS`.
    size
        Width and height in pixels.
    style
        ``"colour"`` (filled, tinted background) or ``"sketch"`` (black outlines on white).
    seed
        Varies position, size, tilt, colours and line width; same seed, same picture.

    Returns
    -------
    PIL.Image.Image
        An RGB image of ``size`` × ``size`` pixels.
    """
    if concept not in DRAWINGS:
        raise NeuroprobeError(f"no drawing for concept {concept!r}; drawable concepts are {', '.join(DRAWINGS)}.")
    if style not in STYLES:
        raise NeuroprobeError(f"drawing style {style!r} is not one of {', '.join(STYLES)}.")
    rng = random.Random(f"{concept}/{style}/{seed}")
    big = size * SUPERSAMPLE
    sketch = style == "sketch"
    if sketch:
        bg: RGB = (255, 255, 255)
    else:
        hue = rng.choice([(235, 242, 250), (245, 240, 228), (232, 246, 234), (248, 236, 240), (240, 240, 240)])
        bg = tuple(min(255, c + rng.randint(-6, 6)) for c in hue)  # type: ignore[assignment]
    img = Image.new("RGB", (big, big), bg)
    pen = Pen(
        draw=ImageDraw.Draw(img),
        size=big,
        cx=0.5 + rng.uniform(-0.06, 0.06),
        cy=0.5 + rng.uniform(-0.06, 0.06),
        scale=rng.uniform(0.72, 0.9),
        width=rng.uniform(0.018, 0.032) if sketch else rng.uniform(0.01, 0.02),
        sketch=sketch,
        rng=rng,
    )
    DRAWINGS[concept](pen)
    angle = rng.uniform(-12, 12)
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=bg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ------------------------------------------------------------- written names

#: font name -> file name looked up in matplotlib's bundled fonts, then the system's
FONT_FILES: dict[str, str] = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf",
}
#: ``"default"`` is Pillow's own embedded font (always available)
FONTS = ("default",) + tuple(FONT_FILES)


def font_path(font: str) -> Path | None:
    """File of a named font (``None`` for Pillow's embedded ``default`` font).

    Fonts come from matplotlib's bundled DejaVu fonts (installed with seaborn) or
    ``/usr/share/fonts``; a missing font raises with how to get it.
    """
    if font == "default":
        return None
    if font not in FONT_FILES:
        raise NeuroprobeError(f"unknown font {font!r}; choose one of {', '.join(FONTS)}.")
    name = FONT_FILES[font]
    candidates: list[Path] = []
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)
    except ImportError:  # pragma: no cover - matplotlib comes with seaborn
        pass
    candidates += [Path("/usr/share/fonts/truetype/dejavu") / name, Path("/usr/share/fonts/TTF") / name]
    for c in candidates:
        if c.is_file():
            return c
    raise NeuroprobeError(f"font file {name} was not found; install matplotlib (it bundles the DejaVu fonts) or fonts-dejavu.")


def load_font(font: str, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType font object of ``size`` pixels."""
    path = font_path(font)
    if path is None:
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    return ImageFont.truetype(str(path), size=size)


def render_name(
    text: str,
    *,
    size: int = 128,
    font: str = "sans-bold",
    font_size: int | None = None,
    colour: RGB = (0, 0, 0),
    background: RGB = (255, 255, 255),
    margin: float = 0.08,
) -> Image.Image:
    """Render ``text`` as pixels, centred on a square image (a written-name stimulus).

    Parameters
    ----------
    text
        The word(s) to write; a space may break the text onto two lines when it
        would otherwise have to shrink a lot.
    size
        Width and height in pixels.
    font
        One of :data:`FONTS`.
    font_size
        Font size in pixels; by default the largest size that fits within the margins
        (capped at a third of the image height).
    colour, background
        Ink and paper colours.
    margin
        Fraction of the image kept free on each side.

    Returns
    -------
    PIL.Image.Image
        An RGB image; the same arguments always give the same pixels.
    """
    if not text.strip():
        raise NeuroprobeError("render_name needs a non-empty text.")
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    room = size * (1 - 2 * margin)

    def fits(fs: int, t: str) -> bool:
        box = d.multiline_textbbox((0, 0), t, font=load_font(font, fs), align="center")
        return box[2] - box[0] <= room and box[3] - box[1] <= room

    layouts = [text]
    if " " in text.strip():
        layouts.append(text.strip().replace(" ", "\n", 1))
    best = (0, text)
    for t in layouts:
        fs = font_size or int(size / 3)
        if font_size is None:
            while fs > 6 and not fits(fs, t):
                fs -= 1
        if fs > best[0]:
            best = (fs, t)
    fs, t = best
    f = load_font(font, fs)
    box = d.multiline_textbbox((0, 0), t, font=f, align="center")
    x = (size - (box[2] - box[0])) / 2 - box[0]
    y = (size - (box[3] - box[1])) / 2 - box[1]
    d.multiline_text((round(x), round(y)), t, font=f, fill=colour, align="center")
    return img


# ------------------------------------------------------------ the battery


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


#: (font, case, ink, paper) of the written-name variants
NAME_STYLES: list[tuple[str, str, RGB, RGB]] = [
    ("sans-bold", "lower", (0, 0, 0), (255, 255, 255)),
    ("serif", "title", (30, 30, 120), (250, 248, 235)),
    ("mono", "upper", (0, 0, 0), (235, 240, 250)),
    ("serif-italic", "lower", (120, 20, 20), (255, 255, 255)),
    ("default", "upper", (20, 90, 40), (245, 245, 245)),
    ("sans", "title", (0, 0, 0), (250, 245, 225)),
]

TEXT_TEMPLATES = [
    "I saw {a} {x} yesterday.",
    "There is {a} {x} in the story.",
    "She told me about the {x}.",
    "This sentence is about {a} {x}.",
    "We talked about {a} {x} all day.",
    "He pointed at the {x}.",
]

CAPTIONS = ["A drawing of {a} {x}.", "{a} {x} in a simple picture."]
QUESTIONS = ["What is in the picture?", "What is this?"]


def _case(word: str, case: str) -> str:
    return {"lower": word.lower(), "upper": word.upper(), "title": word.title()}[case]


def build_battery(
    out: str | Path,
    *,
    concepts: Sequence[str] | None = None,
    name: str = "pictures",
    size: int = 128,
    per_form: int = 4,
    pairs_per_form: int = 2,
    seed: int = 0,
) -> Path:
    """Write an offline image + text + pair battery into ``out``.

    Forms per concept (splits alternate screening / testing within each form):

    ============================  ========  ==================================================
    form                          modality  stimulus
    ============================  ========  ==================================================
    ``drawing``                   image     a colour drawing (:func:`draw`, style ``colour``)
    ``sketch``                    image     a black-outline drawing (style ``sketch``)
    ``written-name``              image     the name as pixels in one of :data:`NAME_STYLES`
    ``text-name``                 text      a sentence naming the concept
    ``captioned-drawing``         pair      a drawing with a caption naming the concept
    ``drawing-question``          pair      a drawing with a question that does not name it
    ============================  ========  ==================================================

    Every stimulus has a cloze sentence and target for masked-word readouts (image
    and pair stimuli: "This is a picture of a {mask}." with the image as visual input).

    Parameters
    ----------
    out
        Folder to write (``battery.json``, ``stimuli.csv``, ``images/``); existing files are replaced.
    concepts
        Concepts to draw (default: all of :data:`DRAWINGS`).
    name
        Battery name.
    size
        Image size in pixels.
    per_form
        Stimuli per concept for each of the image and text forms.
    pairs_per_form
        Stimuli per concept for each pair form.
    seed
        Base seed of the drawings.

    Returns
    -------
    pathlib.Path
        The battery folder.
    """
    import PIL

    out = Path(out)
    concepts = list(concepts or DRAWINGS)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    rows: list[dict[str, str]] = []
    meta_concepts: dict[str, dict] = {}
    splits = ("screening", "testing")

    def save(img: Image.Image, stem: str) -> str:
        # a 64-colour palette keeps the files small; the pictures have few colours anyway
        rel = f"images/{stem}.png"
        img.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out / rel, optimize=True)
        return rel

    order = list(DRAWINGS)
    for c in concepts:
        ci = order.index(c) if c in order else len(order)  # fixed per concept, so subsets render identically
        a = _article(c)
        meta_concepts[c] = {"prompt": f"a drawing of {a} {c}", "names": [c]}
        cloze_img = f"This is a picture of {a} {{mask}}."
        for form, style in (("drawing", "colour"), ("sketch", "sketch")):
            for k in range(per_form):
                rel = save(draw(c, size=size, style=style, seed=seed + k), f"{c}-{form}-{k}")
                rows.append(dict(id=f"{c}-{form}-{k}", concept=c, modality="image", form=form, split=splits[k % 2],
                                 text="", image=rel, cloze=cloze_img, target=c))
        for k in range(per_form):
            font, case, ink, paper = NAME_STYLES[(k + ci) % len(NAME_STYLES)]
            rel = save(render_name(_case(c, case), size=size, font=font, colour=ink, background=paper), f"{c}-written-name-{k}")
            rows.append(dict(id=f"{c}-written-name-{k}", concept=c, modality="image", form="written-name",
                             split=splits[k % 2], text="", image=rel, cloze=cloze_img, target=c))
        for k in range(per_form):
            text = TEXT_TEMPLATES[k % len(TEXT_TEMPLATES)].format(a=a, x=c)
            rows.append(dict(id=f"{c}-text-name-{k}", concept=c, modality="text", form="text-name", split=splits[k % 2],
                             text=text, image="", cloze=f"{text} In one word, it is about the {{mask}}.", target=c))
        for k in range(pairs_per_form):
            rel = save(draw(c, size=size, style="colour", seed=seed + 100 + k), f"{c}-captioned-drawing-{k}")
            cap = CAPTIONS[k % len(CAPTIONS)].format(a=a, x=c)
            cap = cap[0].upper() + cap[1:]
            rows.append(dict(id=f"{c}-captioned-drawing-{k}", concept=c, modality="pair", form="captioned-drawing",
                             split=splits[k % 2], text=cap, image=rel, cloze=cloze_img, target=c))
        for k in range(pairs_per_form):
            rel = save(draw(c, size=size, style="sketch", seed=seed + 200 + k), f"{c}-drawing-question-{k}")
            q = QUESTIONS[k % len(QUESTIONS)]
            rows.append(dict(id=f"{c}-drawing-question-{k}", concept=c, modality="pair", form="drawing-question",
                             split=splits[k % 2], text=q, image=rel, cloze=cloze_img, target=c))

    import pandas as pd
    from PIL import features

    from neuroprobe.output import write_csv

    meta = {
        "name": name,
        "description": (
            "Offline image + text + pair battery made by neuroprobe.stimuli.render: procedural colour drawings "
            "and sketches, written names rendered in several fonts (Quiroga's written-name stimuli, CLIP's "
            "typographic stimuli), sentences naming the concept, and drawings with a caption or a question."
        ),
        "vqa_question": QUESTIONS[0],
        "built_with": {"pillow": PIL.__version__, "freetype": features.version("freetype2") or "", "size": size,
                       "seed": seed},
        "concepts": meta_concepts,
    }
    (out / "battery.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cols = ["id", "concept", "modality", "form", "split", "text", "image", "cloze", "target"]
    write_csv(pd.DataFrame(rows, columns=cols), out / "stimuli.csv", encoding="utf-8")
    return out
