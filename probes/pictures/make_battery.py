"""Build the pictures battery: an offline image + text + pair battery made by neuroprobe.

Sixteen concepts (sun, moon, star, heart, house, tree, flower, apple, fish, bird, cat,
car, boat, umbrella, clock, cup: every one is an answer in LXMERT's VQA, GQA and
pre-training answer vocabularies), each shown as colour drawings, black-outline
sketches, written names rendered in several fonts (Quiroga's written-name stimuli,
CLIP's typographic stimuli), sentences naming it, and drawings paired with a caption
or a question.  Splits alternate within each form.

Run ``python probes/pictures/make_battery.py`` to regenerate ``stimuli.csv``,
``battery.json`` and ``images/`` (see :func:`neuroprobe.stimuli.render.build_battery`).
"""
from __future__ import annotations

from pathlib import Path

from neuroprobe.stimuli.render import build_battery

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    build_battery(HERE, name="pictures", size=128, per_form=4, pairs_per_form=2, seed=0)
    print(f"wrote {HERE}")
