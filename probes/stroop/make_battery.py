"""Build the stroop battery: Stroop-like conflicts (typographic attacks) for the organism.

Held-out handwritten digits with a word drawn over them: nothing (``clean``), the
digit's own name (``congruent``), another digit's name (``incongruent``: Goh et al.
2021's typographic attack), a common word of the same length (``word``) or random
letters (``nonsense``), at font sizes of 10 and 14 pixels in the image centre; 3
samples per digit in each split.  The concept of every stimulus is the picture's digit.

Run ``python probes/stroop/make_battery.py`` to regenerate ``stimuli.csv``,
``battery.json`` and ``images/`` (see
:func:`neuroprobe.subjects.organism.typographic.build_battery`); the result is the same
bit for bit.
"""
from __future__ import annotations

from pathlib import Path

from neuroprobe.subjects.organism.typographic import build_battery

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    build_battery(HERE, name="stroop", per_split=3, sizes=(10, 14), positions=("center",), seed=0)
    print(f"wrote {HERE}")
