"""The ``dalle`` subject: DALL·E Mini / Mega (min-dalle) as a recorded, lesionable subject.

Streams
-------
``text``
    The encoder's 64 text positions (padding masked).
``image``
    The decoder's 256 positions: the start token then the first 255 image codes
    (position ``t`` predicts code ``t``).

Stimuli
-------
* text: the text is encoded; the decoder sees only its start token (position 0 is
  the one real image position: what the subject "begins to draw" for the text).
* image: the text is min-dalle's empty prompt (``<s> </s>``: its unconditioned
  branch), the decoder reads the image's codes.
* pair: the pair's text, and the image's codes.

Image codes come from a codes file, the VQGAN encoder (``vqgan=FILE``: the
f16-16384 encoder in taming's layout, :mod:`neuroprobe.subjects.dalle.encoder`), or a
pixel-colour stand-in (:mod:`neuroprobe.subjects.dalle.codes`).

Readouts
--------
``image_token_loglik``
    Mean ``log p(code | text, earlier codes)`` over the 256 codes, teacher forced,
    conditioned branch only (:mod:`neuroprobe.subjects.dalle.score`).  Text
    stimuli score their concept's reference image given the stimulus text; image
    stimuli score their own codes given the concept's prompt; pairs score their
    image given their text.
``image_token_pmi``
    The same minus the score under the empty prompt: how much the text helps.

Loading
-------
``neuroprobe record --model dalle [--weights DIR] [--option variant=mega|mini|tiny]
[--option codes=FILE] [--option dvae=encoder.pkl --trust-pickle]``: min-dalle's files come
from ``DIR`` or the Hugging Face cache of ``kuprel/min-dalle`` (see
:mod:`neuroprobe.subjects.dalle.load`); ``--init random`` needs only the tokenizer files.
The ``tiny`` variant (:meth:`~neuroprobe.subjects.dalle.config.DalleConfig.tiny`) is the
same architecture at test size, from a local folder only.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Batch, SitePattern as P, Subject, replica_safe
from neuroprobe.subjects.dalle.codes import ImageCodes
from neuroprobe.subjects.dalle.load import DalleBundle, load_dalle
from neuroprobe.subjects.dalle.score import decoder_inputs, score_image_tokens, unconditioned_text_tokens


def dalle_site_patterns(head_count: int) -> dict[str, list[P]]:
    """Site patterns of the DALL·E BART (module names of :class:`~neuroprobe.subjects.dalle.bart.DalleBart`)."""
    return {
        "mlp": [
            P("encoder.layers.*.glu.fc2", "input", "mlp", "text", name="encoder.{0}.mlp"),
            P("decoder.layers.*.glu.fc2", "input", "mlp", "image", name="decoder.{0}.mlp"),
        ],
        "resid": [
            P("encoder.layers.*", "output", "resid", "text", name="encoder.{0}"),
            P("decoder.layers.*", "output", "resid", "image", name="decoder.{0}"),
        ],
        "attn": [
            P("encoder.layers.*.self_attn.out_proj", "input", "attn", "text", name="encoder.{0}.attn", n_heads=head_count),
            P("decoder.layers.*.self_attn.out_proj", "input", "attn", "image", name="decoder.{0}.attn", n_heads=head_count),
            P("decoder.layers.*.encoder_attn.out_proj", "input", "attn", "image", name="decoder.{0}.cross_attn",
              n_heads=head_count),
        ],
    }


def _condition_and_codes(subject: "DalleSubject", row: Any, battery) -> tuple[str, torch.Tensor]:
    if row["modality"] == "text":
        return str(row["text"]), subject.codes.for_concept(battery, row["concept"])
    codes = subject.codes.for_image(battery, str(row["image"]))
    if row["modality"] == "pair":
        return str(row["text"]), codes
    return str(battery.concepts[row["concept"]].get("prompt", row["concept"])), codes


def _loglik(subject: "DalleSubject", stimuli: pd.DataFrame, battery, pmi: bool = False) -> np.ndarray:
    texts, codes = [], []
    for _, row in stimuli.iterrows():
        text, c = _condition_and_codes(subject, row, battery)
        texts.append(text)
        codes.append(c)
    cfg = subject.config
    text_tokens = subject.tokenizer.batch(texts, cfg.text_token_count).to(subject.device)
    image = torch.stack(codes).to(subject.device)
    enc, dec = subject.model.encoder, subject.model.decoder
    score = score_image_tokens(enc, dec, text_tokens, image)
    if pmi:
        empty = unconditioned_text_tokens(len(texts), cfg.text_token_count, cfg.text_bos_token, cfg.text_eos_token,
                                          cfg.text_pad_token).to(subject.device)
        score = score - score_image_tokens(enc, dec, empty, image)
    return score.float().cpu().numpy()


@replica_safe
def image_token_loglik(subject: "DalleSubject", stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Readout: mean teacher-forced log-probability of the stimulus's image codes given its text.

    One teacher-forced pass of the encoder and decoder over all the stimuli (replica-safe).
    """
    return _loglik(subject, stimuli, battery)


@replica_safe
def image_token_pmi(subject: "DalleSubject", stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Readout: :func:`image_token_loglik` minus the same under the empty prompt.

    Two passes over all the stimuli, conditioned then unconditioned (replica-safe: each holds
    every row of every copy, in order).
    """
    return _loglik(subject, stimuli, battery, pmi=True)


class DalleSubject(Subject):
    """DALL·E Mini / Mega with text and image-code streams (see the module docstring)."""

    modalities = ("text", "image", "pair")
    readouts = {"image_token_loglik": image_token_loglik, "image_token_pmi": image_token_pmi}
    default_readout = "image_token_loglik"
    #: the BART halves in forward order; the decoder's cross-attention reads the encoder's output
    block_order = {
        "encoder": ["encoder.layernorm_embedding", "encoder.layers.*", "encoder.final_ln"],
        "decoder": ["decoder.layernorm_embedding", "decoder.layers.*"],
    }
    block_inputs: dict[str, tuple[str, ...]] = {"decoder": ("encoder",)}

    def __init__(self, name: str, bundle: DalleBundle, *, codes: str | Path | None = None,
                 vqgan: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(name, bundle.model, **kwargs)
        self.bundle = bundle
        self.config = bundle.config
        self.tokenizer = bundle.tokenizer
        self.site_patterns = dalle_site_patterns(bundle.config.head_count)
        #: the VQGAN encoder (images -> codes) when its weights were given, else ``None``
        self.vqgan = vqgan
        self.codes = ImageCodes(bundle.config.image_token_count, bundle.config.code_count, codes,
                                encoder=self.vqgan_codes if vqgan is not None else None)
        #: OpenAI's dVAE encoder when loaded (``dvae`` option with ``trust_pickle``), else ``None``
        self.dvae: torch.nn.Module | None = None

    def encode(self, stimuli: pd.DataFrame, battery) -> Batch:
        """Text ids (padded to 64) and decoder inputs (start token + codes) for a batch of stimuli."""
        cfg = self.config
        n, s, t = len(stimuli), cfg.text_token_count, cfg.image_token_count
        text_ids = torch.full((n, s), cfg.text_pad_token, dtype=torch.long)
        concept_mask = torch.zeros(n, s, dtype=torch.bool)
        image_in = torch.full((n, t), cfg.bos_token, dtype=torch.long)
        image_mask = torch.zeros(n, t, dtype=torch.bool)
        for i, (_, row) in enumerate(stimuli.iterrows()):
            text = str(row["text"]) if row["modality"] in ("text", "pair") else ""
            enc = self.tokenizer.encode_with_spans(text)
            ids = enc.ids[:s]
            text_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if text and row["concept"] in battery.concepts:
                spans = battery.concept_spans(enc.text, row["concept"])
                for j, span in enumerate(enc.spans[:s]):
                    if span is not None and any(a < span[1] and span[0] < b for a, b in spans):
                        concept_mask[i, j] = True
            if row["modality"] in ("image", "pair"):
                codes = self.codes.for_image(battery, str(row["image"]))
                image_in[i] = decoder_inputs(codes.unsqueeze(0), cfg.bos_token)[0]
                image_mask[i] = True
            else:
                image_mask[i, 0] = True
        return Batch(
            inputs={"text_tokens": text_ids, "image_tokens": image_in},
            masks={"text": text_ids.ne(cfg.text_pad_token), "image": image_mask},
            token_ids={"text": text_ids, "image": image_in},
            concept_masks={"text": concept_mask, "image": torch.zeros(n, t, dtype=torch.bool)},
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        """Teacher-forced logits ``[B, 256, image_vocab_count + 1]``."""
        inputs = batch.to(self.device).inputs
        return self.model(inputs["text_tokens"], inputs["image_tokens"])

    @torch.no_grad()
    def vqgan_codes(self, image) -> torch.Tensor:
        """VQGAN codes ``[256]`` of a PIL image (centre crop, 16 pixels per code), from the loaded encoder."""
        from neuroprobe.subjects.dalle.encoder import image_pixels

        if self.vqgan is None:
            raise NeuroprobeError("no VQGAN encoder is loaded; pass --option vqgan=FILE (its state dict).")
        side = int(round(self.config.image_token_count**0.5)) * self.vqgan.config.downsampling
        param = next(self.vqgan.parameters())
        return self.vqgan(image_pixels(image, side).to(param.device))[0].cpu()

    def dvae_tokens(self, battery, image: str) -> torch.Tensor:
        """OpenAI dVAE tokens ``[1024]`` of a battery image (needs the ``dvae`` option; not scored by this decoder)."""
        if self.dvae is None:
            raise NeuroprobeError("no dVAE is loaded; pass --option dvae=encoder.pkl together with --trust-pickle.")
        from neuroprobe.subjects.dalle.dvae import encode_image_dvae

        return encode_image_dvae(self.dvae, battery.load_image(image))


#: Printed before DALL·E Mega loads on a CPU (the parameter count and size are those of :meth:`DalleConfig.mega`).
CPU_NOTE = ("dalle: DALL-E Mega (2.59B parameters, 10.4 GB in float32) runs slowly on a CPU, minutes per batch; "
            "--option variant=mini (0.44B) is six times smaller, --device cuda is much faster.")


def _flag(value: Any, name: str) -> bool:
    """A boolean option given as a bool or as text (``--option trust_pickle=yes``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise NeuroprobeError(f"option {name} must be true or false, not {value!r}.")


def load_dalle_subject(
    spec,
    *,
    init: str = "pretrained",
    weights: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    variant: str = "mega",
    codes: str | Path | None = None,
    vqgan: str | Path | None = None,
    dvae: str | Path | None = None,
    trust_pickle: bool | str = False,
    quiet: bool = False,
    **options: Any,
) -> DalleSubject:
    """Registry loader for ``dalle``.

    Options (``--option KEY=VALUE`` on the command line)
    ----------------------------------------------------
    variant
        ``mega`` (default), ``mini``, or ``tiny`` (a few-thousand-parameter model of the same
        architecture for tests: needs ``--weights DIR`` with a ``vocab.json``/``merges.txt``
        whose ids fit its 64-row text table, plus ``encoder.pt``/``decoder.pt`` unless
        ``--init random``).
    codes
        A codes file (see :mod:`neuroprobe.subjects.dalle.codes`); default the battery's
        ``dalle_codes.json``, else the VQGAN encoder (``vqgan``), else the pixel-colour
        stand-in (with a warning).
    vqgan
        The VQGAN f16-16384 encoder's weights in taming-transformers' state-dict layout
        (:mod:`neuroprobe.subjects.dalle.encoder`; key list inferred, loaded strictly): images
        without a codes-file entry are encoded with it.  It is preprocessing: pretrained even
        for ``init="random"``.
    dvae
        OpenAI's dVAE ``encoder.pkl``, attached as :attr:`DalleSubject.dvae` (the ported
        :class:`~neuroprobe.subjects.dalle.dvae.DVAEEncoder`: an image tokenizer for
        OpenAI-style tokens; they are not what this decoder scores).  Its tensors are read
        without running the pickle; a file in the old torch format needs ``trust_pickle``.
    trust_pickle
        Allow fully unpickling ``dvae`` when the safe reader cannot take it.

    Mega stays the default on every device, so one command names one model everywhere; on a
    CPU a line on stderr says, before loading, what Mega costs and how to pick Mini (unless
    ``quiet``).
    """
    if options:
        raise NeuroprobeError(
            f"subject 'dalle' takes the options variant, codes, vqgan, dvae and trust_pickle, not {', '.join(sorted(options))}."
        )
    trust = _flag(trust_pickle, "trust_pickle")
    if str(variant) == "mega" and torch.device(device).type == "cpu" and not quiet:
        print(CPU_NOTE, file=sys.stderr)
    tokenizer = None
    if vqgan is not None:  # checked before the transformer loads
        from neuroprobe.subjects.dalle.encoder import load_vqgan_tokenizer

        tokenizer = load_vqgan_tokenizer(vqgan, device=device)
    bundle = load_dalle(weights, variant=str(variant), init=init, device=device, dtype=dtype, seed=seed)
    checkpoint = f"kuprel/min-dalle (DALL-E {variant})" if weights is None else str(weights)
    subject = DalleSubject(
        getattr(spec, "name", "dalle"), bundle, codes=codes, vqgan=tokenizer, device=device, init=init, checkpoint=checkpoint,
        revision="main" if weights is None else "local", seed=seed,
    )
    if dvae is not None:
        from neuroprobe.subjects.dalle.dvae import load_dvae_encoder

        subject.dvae = load_dvae_encoder(dvae, trust_pickle=trust, device=device)
    subject.spec = spec
    return subject
