"""PPLM attribute models: bags of words and discriminator heads.

A **bag of words** is a list of words, one per line (UTF-8, any script); steering
toward it raises the probability mass the language model puts on those words.  A
word is tokenised with a leading space, as a word in running text is written for
GPT-2's byte-level BPE.  PPLM's reference code keeps only single-token words; here a
word of several tokens counts too, with the probability of the whole word (the
product of its pieces' probabilities under teacher forcing), so a Korean list works
with a multilingual tokenizer.  ``multi_token=False`` restores PPLM's rule.  Words
that cannot count are named in :attr:`BagOfWords.dropped`.

A **discriminator head** is a linear layer over the mean last hidden state of the
language model (:class:`ClassificationHead`, state dict ``mlp.weight``, ``mlp.bias``),
loaded with ``torch.load(weights_only=True)``.

Packaged data live in ``neuroprobe/data/pplm/`` (see its README): PPLM's own word
lists and discriminators (Apache-2.0) and neuroprobe's bags for the battery's
concept families (``kinship``, ``animals``, ``colours``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from neuroprobe.errors import MissingWeightsError, NeuroprobeError, is_refused_pickle, refused_pickle

#: Where the packaged PPLM data live.
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "pplm"
WORDLIST_DIRS = (DATA_DIR / "wordlists", DATA_DIR / "concepts")
DISCRIMINATOR_DIR = DATA_DIR / "discriminators"

#: Packaged discriminator heads: file, number of classes, named classes, default class.
DISCRIMINATORS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "file": "sentiment_classifierhead.pt",
        "class_size": 5,
        "embed_size": 1024,
        "class_vocab": {"very_positive": 2, "very_negative": 3},
        "default_class": 3,
    },
    "clickbait": {
        "file": "clickbait_classifierhead.pt",
        "class_size": 2,
        "embed_size": 1024,
        "class_vocab": {"non_clickbait": 0, "clickbait": 1},
        "default_class": 1,
    },
    "toxicity": {
        "file": "toxicity_classifierhead.pt",
        "class_size": 2,
        "embed_size": 1024,
        "class_vocab": {"non_toxic": 0, "toxic": 1},
        "default_class": 0,
    },
}


# --------------------------------------------------------------------------- bags
@dataclass(frozen=True)
class BagOfWords:
    """A bag of words resolved against one tokenizer.

    Attributes
    ----------
    name
        The packaged name or the file's stem.
    words
        The words that count, in file order; a word whose pieces repeat an earlier
        word's is not listed twice.
    pieces
        Each word's token ids (of ``" " + word``), aligned with :attr:`words`: one id for a
        single-token word, several for a multi-token word (a Korean word in a byte-level
        BPE is often several pieces), whose probability is the product of its pieces'
        probabilities under teacher forcing.
    dropped
        Words of the list that do not count, each as ``"word (reason)"``: the tokenizer
        cannot spell it (an unknown token), it is empty, or — with ``multi_token=False``,
        PPLM's original rule — it is more than one token.
    """

    name: str
    words: tuple[str, ...]
    pieces: tuple[tuple[int, ...], ...]
    dropped: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.words)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Ids of the single-token words (in word order)."""
        return tuple(p[0] for p in self.pieces if len(p) == 1)

    @property
    def multi_token_words(self) -> tuple[str, ...]:
        """The words that are more than one token."""
        return tuple(w for w, p in zip(self.words, self.pieces) if len(p) > 1)

    @property
    def dropped_words(self) -> tuple[str, ...]:
        """The dropped words without their reasons."""
        return tuple(d.rsplit(" (", 1)[0] for d in self.dropped)

    def ids_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The single-token words' ids as a long tensor."""
        return torch.tensor(self.token_ids, dtype=torch.long, device=device)

    def describe(self) -> str:
        """One line: counts of single- and multi-token words and the dropped words by name."""
        n_multi = len(self.multi_token_words)
        n = len(self)
        text = f"bag {self.name}: {n} word{'' if n == 1 else 's'} ({n - n_multi} single-token, {n_multi} multi-token)"
        if self.dropped:
            text += f"; dropped {len(self.dropped)}: " + ", ".join(self.dropped)
        return text


def available_bags() -> list[str]:
    """Names of the packaged bags of words (PPLM's lists and neuroprobe's concept bags)."""
    names: set[str] = set()
    for folder in WORDLIST_DIRS:
        names.update(p.stem for p in folder.glob("*.txt"))
    return sorted(names)


def bag_path(name_or_path: str | Path) -> Path:
    """Resolve a packaged bag name (``"space"``, ``"kinship"``) or a file path.

    Raises
    ------
    NeuroprobeError
        If it is neither a packaged bag nor an existing file.
    """
    text = str(name_or_path)
    for folder in WORDLIST_DIRS:
        candidate = folder / f"{text}.txt"
        if "/" not in text and candidate.is_file():
            return candidate
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise NeuroprobeError(
        f"bag of words {text!r} is neither a packaged bag ({', '.join(available_bags())}) "
        f"nor an existing file; pass one of those names or a path to a file with one word per line."
    )


def read_words(path: str | Path) -> list[str]:
    """Read a word list: one word or phrase per line, blank lines skipped, outer spaces stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NeuroprobeError(f"cannot read bag of words {str(path)!r} ({err}); pass a UTF-8 text file.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def word_pieces(tokenizer: Any, word: str) -> list[int]:
    """Token ids of ``" " + word`` (a word as it is written in running text), no special tokens."""
    return [int(i) for i in tokenizer.encode(" " + word.strip(), add_special_tokens=False)]


def single_token_id(tokenizer: Any, word: str) -> int | None:
    """The token id of ``" " + word`` if it is exactly one token, else ``None``."""
    ids = word_pieces(tokenizer, word)
    return ids[0] if len(ids) == 1 else None


def bag_from_words(words: Sequence[str], tokenizer: Any, name: str = "custom", *,
                   multi_token: bool = True) -> BagOfWords:
    """Build a :class:`BagOfWords` from words.

    Parameters
    ----------
    words
        Candidate words or phrases.
    tokenizer
        The subject's tokenizer (anything with ``encode(text, add_special_tokens=False)``).
    name
        A label for the bag.
    multi_token
        Keep words of several tokens (scored as whole words); ``False`` keeps only
        single-token words, as PPLM's reference code does.

    Raises
    ------
    NeuroprobeError
        If no word counts, naming the dropped words and why.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    kept_words: list[str] = []
    kept: list[tuple[int, ...]] = []
    dropped: list[str] = []
    seen: set[tuple[int, ...]] = set()
    for word in words:
        word = word.strip()
        ids = tuple(word_pieces(tokenizer, word)) if word else ()
        if not ids:
            dropped.append(f"{word!r} (empty)")
        elif unk is not None and unk in ids:
            dropped.append(f"{word} (not spelt by this tokenizer)")
        elif len(ids) > 1 and not multi_token:
            dropped.append(f"{word} ({len(ids)} tokens)")
        elif ids not in seen:
            seen.add(ids)
            kept_words.append(word)
            kept.append(ids)
    if not kept:
        raise NeuroprobeError(
            f"bag of words {name!r} has no word this tokenizer can score: dropped {', '.join(dropped) or 'all'}."
        )
    return BagOfWords(name=name, words=tuple(kept_words), pieces=tuple(kept), dropped=tuple(dropped))


def check_bag(name_or_path: str | Path) -> Path:
    """Check a bag before any model is loaded: it resolves to a readable file with at least one word.

    Returns the file; raises :class:`NeuroprobeError` otherwise.
    """
    path = bag_path(name_or_path)
    if not read_words(path):
        raise NeuroprobeError(f"bag of words {str(name_or_path)!r} ({path}) holds no word; put one word per line.")
    return path


def load_bag(name_or_path: str | Path | BagOfWords, tokenizer: Any, *, multi_token: bool = True) -> BagOfWords:
    """Load a bag of words by packaged name or path and resolve it against ``tokenizer``.

    Parameters
    ----------
    name_or_path
        A packaged name (see :func:`available_bags`), a path to a word list, or an
        already built :class:`BagOfWords` (returned unchanged).
    tokenizer
        The subject's tokenizer.
    multi_token
        Keep words of several tokens (default); ``False`` is PPLM's single-token rule.

    Returns
    -------
    BagOfWords
    """
    if isinstance(name_or_path, BagOfWords):
        return name_or_path
    path = bag_path(name_or_path)
    return bag_from_words(read_words(path), tokenizer, name=path.stem, multi_token=multi_token)


# ------------------------------------------------------------------ discriminators
class ClassificationHead(torch.nn.Module):
    """PPLM's discriminator head: a linear layer over the mean last hidden state.

    Parameters
    ----------
    class_size
        Number of classes.
    embed_size
        Width of the language model's hidden state (1024 for GPT-2 medium).
    """

    def __init__(self, class_size: int, embed_size: int) -> None:
        super().__init__()
        self.class_size = class_size
        self.embed_size = embed_size
        self.mlp = torch.nn.Linear(embed_size, class_size)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Class logits for a mean hidden state ``[..., embed_size]``."""
        return self.mlp(hidden_state)


@dataclass
class Discriminator:
    """A discriminator head plus its class names.

    Attributes
    ----------
    name
        ``"sentiment"``, ``"clickbait"``, ``"toxicity"``, or a file stem.
    head
        The :class:`ClassificationHead` (eval mode, parameters not requiring grad).
    class_vocab
        Named classes -> class index (may be empty for a custom head).
    default_class
        The class used when no label is given.
    """

    name: str
    head: ClassificationHead
    class_vocab: dict[str, int] = field(default_factory=dict)
    default_class: int | None = None

    def class_id(self, label: str | int | None) -> int:
        """Resolve a class label (name or index) to an index; raise a clear error if it is not one."""
        n = self.head.class_size
        if label is None:
            if self.default_class is None:
                raise NeuroprobeError(f"discriminator {self.name!r} needs a class label; pass --class-label 0..{n - 1}.")
            return self.default_class
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label in self.class_vocab:
                return self.class_vocab[label]
            raise NeuroprobeError(
                f"discriminator {self.name!r} has no class {label!r}; use one of "
                f"{', '.join(f'{k} ({v})' for k, v in self.class_vocab.items()) or f'0..{n - 1}'}."
            )
        idx = int(label)
        allowed = sorted(set(self.class_vocab.values())) if self.class_vocab else list(range(n))
        if idx not in allowed:
            named = ", ".join(f"{v} ({k})" for k, v in sorted(self.class_vocab.items(), key=lambda kv: kv[1]))
            raise NeuroprobeError(
                f"discriminator {self.name!r} has no class {idx}; use one of {named or ', '.join(map(str, allowed))}."
            )
        return idx


def head_from_state_dict(state: dict[str, torch.Tensor]) -> ClassificationHead:
    """Build a :class:`ClassificationHead` from a state dict with ``mlp.weight`` and ``mlp.bias``."""
    if set(state) != {"mlp.weight", "mlp.bias"}:
        raise NeuroprobeError(
            f"a discriminator head must hold exactly 'mlp.weight' and 'mlp.bias', not {sorted(state)}; "
            f"save ClassificationHead.state_dict()."
        )
    class_size, embed_size = state["mlp.weight"].shape
    head = ClassificationHead(int(class_size), int(embed_size))
    head.load_state_dict(state)
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def _copy_head(head: ClassificationHead, device: torch.device | str) -> ClassificationHead:
    """A frozen copy of a head (so the caller's module is never touched, even if made under inference mode)."""
    state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    return head_from_state_dict(state).to(device)


def load_discriminator(
    name_or_path: str | Path | Discriminator | ClassificationHead,
    device: torch.device | str = "cpu",
    class_vocab: dict[str, int] | None = None,
) -> Discriminator:
    """Load a discriminator head by packaged name or path.

    Parameters
    ----------
    name_or_path
        ``"sentiment"``, ``"clickbait"``, ``"toxicity"``, a path to a ``.pt`` state
        dict (``mlp.weight``, ``mlp.bias``), or an already built head.
    device
        Where to put the head.
    class_vocab
        Class names for a custom head (optional).

    Returns
    -------
    Discriminator
    """
    if isinstance(name_or_path, Discriminator):
        given = name_or_path
        return Discriminator(given.name, _copy_head(given.head, device), dict(given.class_vocab), given.default_class)
    if isinstance(name_or_path, ClassificationHead):
        return Discriminator("custom", _copy_head(name_or_path, device), dict(class_vocab or {}), None)
    text = str(name_or_path)
    if text in DISCRIMINATORS:
        meta = DISCRIMINATORS[text]
        path = DISCRIMINATOR_DIR / meta["file"]
        if not path.is_file():
            raise MissingWeightsError(
                f"the packaged discriminator file {path} is missing; reinstall neuroprobe-cells or pass a path to the head."
            )
        name, vocab, default = text, dict(meta["class_vocab"]), meta["default_class"]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise NeuroprobeError(
                f"discriminator {text!r} is neither a packaged head ({', '.join(DISCRIMINATORS)}) nor an existing "
                f"file; pass one of those names or a path to a saved ClassificationHead state dict."
            )
        name, vocab, default = path.stem, dict(class_vocab or {}), None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the user's file
        if is_refused_pickle(err):
            raise refused_pickle(path) from None
        raise NeuroprobeError(f"cannot load discriminator head {str(path)!r} ({type(err).__name__}); "
                              f"save it with torch.save(head.state_dict(), path).") from None
    if not isinstance(state, dict):
        raise NeuroprobeError(f"discriminator file {str(path)!r} does not hold a state dict; save head.state_dict().")
    head = head_from_state_dict(state).to(device)
    return Discriminator(name, head, vocab, default)
