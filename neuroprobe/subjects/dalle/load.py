"""Loading DALL·E Mini / Mega (min-dalle's converted weights) and the VQGAN detokenizer.

Files (Hugging Face repository ``kuprel/min-dalle``):

======== ==================== ==================== =============
variant  encoder / decoder    tokenizer            detokenizer
======== ==================== ==================== =============
mega     encoder.pt           vocab.json           detoker.pt
         decoder.pt           merges.txt
mini     encoder_mini.pt      vocab_mini.json      detoker.pt
         decoder_mini.pt      merges_mini.txt
======== ==================== ==================== =============

A local folder (``--weights DIR``) may hold the files under those names, under the
plain names (``encoder.pt``, ``vocab.json`` ...), or in min-dalle's own layout
(``DIR/dalle_bart_mini/encoder.pt``, ``DIR/vqgan/detoker.pt``).  The state dicts are
read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError, is_refused_pickle, refused_pickle
from neuroprobe.subjects.dalle.bart import DalleBart, init_random
from neuroprobe.subjects.dalle.config import DETOKENIZER_FILE, HUB_REPO, DalleConfig
from neuroprobe.subjects.dalle.tokenizer import TextTokenizer
from neuroprobe.subjects.dalle.vqgan import VQGANConfig, VQGANDetokenizer

_PLAIN = {"encoder": "encoder.pt", "decoder": "decoder.pt", "vocab": "vocab.json", "merges": "merges.txt"}


@dataclass
class DalleBundle:
    """A loaded DALL·E BART with its tokenizer.

    Attributes
    ----------
    model
        :class:`~neuroprobe.subjects.dalle.bart.DalleBart` (``.encoder``, ``.decoder``), eval mode.
    tokenizer
        The text tokenizer.
    config
        Architecture.
    files
        Role (``encoder``, ``decoder``, ``vocab``, ``merges``) -> file used.
    init
        ``"pretrained"`` or ``"random"``.
    """

    model: DalleBart
    tokenizer: TextTokenizer
    config: DalleConfig
    files: dict[str, Path] = field(default_factory=dict)
    init: str = "pretrained"

    @property
    def encoder(self):
        return self.model.encoder

    @property
    def decoder(self):
        return self.model.decoder


def _local_candidates(root: Path, role: str, hub_name: str, variant: str) -> list[Path]:
    names = [hub_name, _PLAIN.get(role, hub_name)]
    subdir = "vqgan" if role == "detokenizer" else f"dalle_bart_{variant}"
    out: list[Path] = []
    for base in (root, root / subdir):
        for name in names:
            if base / name not in out:
                out.append(base / name)
    return out


def _hub_file(filename: str) -> Path | None:
    """Path of ``filename`` from the Hub cache, downloading it when online; ``None`` if unavailable."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface-hub is a dependency
        return None
    try:
        return Path(hf_hub_download(HUB_REPO, filename, local_files_only=True))
    except Exception:
        pass
    from neuroprobe.subjects.offline import hub_reachable

    if not hub_reachable():  # offline, or the hub does not answer: fail at once, no retries
        return None
    try:
        return Path(hf_hub_download(HUB_REPO, filename, etag_timeout=10))
    except Exception:
        return None


def resolve_files(
    roles: dict[str, str], weights: str | Path | None, variant: str, what: str
) -> dict[str, Path]:
    """Find each role's file locally (``weights`` folder) or through the Hub cache.

    Raises
    ------
    MissingWeightsError
        Naming the missing files and how to get them.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    if weights is not None:
        root = Path(weights)
        if not root.is_dir():
            raise MissingWeightsError(f"--weights {root} is not a folder; give the folder holding min-dalle's {what} files.")
        for role, name in roles.items():
            hit = next((p for p in _local_candidates(root, role, name, variant) if p.is_file()), None)
            if hit is None:
                missing.append(name)
            else:
                found[role] = hit
        if missing:
            raise MissingWeightsError(
                f"{what} file(s) {', '.join(missing)} not found in {root}; download them from the Hugging Face "
                f"repository {HUB_REPO} into that folder (names as listed, or encoder.pt/decoder.pt/vocab.json/merges.txt)."
            )
        return found
    for role, name in roles.items():
        path = _hub_file(name)
        if path is None:
            missing.append(name)
        else:
            found[role] = path
    if missing:
        raise MissingWeightsError(
            f"{what} file(s) {', '.join(missing)} from {HUB_REPO} are not in the Hugging Face cache and could not be "
            f"downloaded; run once online to fetch them, point HF_HOME at a cache that has them, or pass --weights DIR "
            f"with those files."
        )
    return found


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err).lower() and "zip" not in str(err).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if is_refused_pickle(err):
            raise refused_pickle(path) from None
        raise NeuroprobeError(f"{path} cannot be read as a torch state dict ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None
    if not isinstance(state, dict):
        raise NeuroprobeError(f"{path} does not hold a state dict; give min-dalle's encoder/decoder/detoker .pt files.")
    return state


def load_into(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load the state dict in ``path`` into ``module`` (``strict=True``, ``assign=True``)."""
    state = load_state_dict_file(path)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise NeuroprobeError(f"{path} does not fit the {what} architecture ({detail}); check --variant.") from None


def load_dalle(
    weights: str | Path | None = None,
    variant: str = "mini",
    init: str = "pretrained",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DalleBundle:
    """Load DALL·E Mini or Mega (encoder + decoder + text tokenizer).

    Parameters
    ----------
    weights
        Local folder with the files; ``None`` uses the Hugging Face cache
        (downloading from ``kuprel/min-dalle`` when online).
    variant
        ``"mini"`` or ``"mega"`` (``"tiny"``: tests, local folder only).
    init
        ``"pretrained"`` or ``"random"`` (same architecture, normal(0, init_std)
        weights; the tokenizer files are still needed).
    device, dtype
        Where and in which precision the model lives (the files are float16); ``"meta"``
        builds the architecture without weights (nothing is read or allocated).
    seed
        Seed of the random initialisation.

    Returns
    -------
    DalleBundle
    """
    if init not in ("pretrained", "random"):
        raise NeuroprobeError(f"init must be 'pretrained' or 'random', not {init!r}.")
    config = DalleConfig.named(variant)
    if variant == "tiny" and weights is None:
        raise NeuroprobeError("the tiny DALL-E variant exists only for tests and needs --weights DIR.")
    roles = {"vocab": config.hub_files["vocab"], "merges": config.hub_files["merges"]}
    if init == "pretrained":
        roles = {"encoder": config.hub_files["encoder"], "decoder": config.hub_files["decoder"], **roles}
    substitute = False
    try:
        files = resolve_files(roles, weights, variant, f"DALL-E {variant}")
    except MissingWeightsError:
        if init != "random" or weights is not None:
            raise
        # the untrained control runs offline: a stated stand-in tokenizer (recorded in provenance)
        from neuroprobe.subjects.offline import dalle_substitute_files

        files = dict(zip(("vocab", "merges"), dalle_substitute_files(config)))
        substitute = True
    tokenizer = TextTokenizer.from_files(files["vocab"], files["merges"])
    if substitute:
        from neuroprobe.subjects.offline import RECIPES

        tokenizer.neuroprobe_source = RECIPES["gpt2-bpe-dalle"].description
    if torch.device(device).type == "meta":  # shapes only (`neuroprobe sites`): no memory, no weights read
        with torch.device("meta"):
            model = DalleBart(config)
    elif init == "pretrained":
        with torch.device("meta"):
            model = DalleBart(config)
        load_into(model.encoder, files["encoder"], f"DALL-E {variant} encoder")
        load_into(model.decoder, files["decoder"], f"DALL-E {variant} decoder")
    else:
        model = init_random(DalleBart(config), config.init_std, seed)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return DalleBundle(model=model, tokenizer=tokenizer, config=config, files=files, init=init)


def load_detokenizer(
    weights: str | Path | None = None,
    init: str = "pretrained",
    device: str | torch.device = "cpu",
    config: VQGANConfig | None = None,
    seed: int = 0,
) -> VQGANDetokenizer:
    """Load min-dalle's VQGAN detokenizer (``detoker.pt``): codes -> images.

    Parameters
    ----------
    weights
        Local folder with ``detoker.pt`` (or ``vqgan/detoker.pt``); ``None`` uses the Hub cache.
    init
        ``"pretrained"`` or ``"random"`` (PyTorch default initialisation, seeded).
    device
        Where the module lives (kept in float32, as min-dalle does).
    config
        Sizes (default: the published VQGAN f16-16384).
    seed
        Seed of the random initialisation.
    """
    config = config or VQGANConfig()
    if init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = VQGANDetokenizer(config)
        return module.to(device).eval()
    files = resolve_files({"detokenizer": DETOKENIZER_FILE}, weights, "vqgan", "VQGAN detokenizer")
    with torch.device("meta"):
        module = VQGANDetokenizer(config)
    load_into(module, files["detokenizer"], "VQGAN detokenizer")
    return module.to(device=device, dtype=torch.float32).eval()
