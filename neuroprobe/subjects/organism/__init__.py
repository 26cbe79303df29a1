"""The organisms: small digit models trained in this repository, in two architectures.

``organism`` is a CLIP-style dual encoder (:mod:`.model`); ``organism-cross`` fuses image
tokens and byte tokens in one transformer (:mod:`.cross`, trained by :mod:`.cross_train`,
shown as a subject by :mod:`.cross_subject`).  Both share the data, the training loop, the
card and the loader; the architecture is data (:data:`.train.ARCHS`).

No pretrained multimodal model can be downloaded offline, so neuroprobe ships its own
model organism: handwritten digits, digit names drawn as pixels and digit words in
four writing systems, trained contrastively (:mod:`.train`) from data that installs
with pip (:mod:`.data`); the committed weights (``weights/``) are what
``load_subject("organism")`` loads (:mod:`.subject`).
"""
