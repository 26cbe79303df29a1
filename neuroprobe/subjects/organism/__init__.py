"""The organism: a small CLIP-style dual encoder trained in this repository on the ten digits.

No pretrained multimodal model can be downloaded offline, so neuroprobe ships its own
model organism: handwritten digits, digit names drawn as pixels and digit words in
four writing systems, trained contrastively (:mod:`.train`) from data that installs
with pip (:mod:`.data`); the committed weights (``weights/``) are what
``load_subject("organism")`` loads (:mod:`.subject`).
"""
