"""Text tokenizer of DALL·E Mini/Mega as min-dalle runs it: BART byte-pair encoding.

Cleanup as in min-dalle: emoji are spelled out (``emoji.demojize``, when the
``emoji`` package is installed; otherwise they are dropped with the other
non-ASCII characters), the text is lower-cased, non-ASCII characters are removed,
and the text is split on spaces.  Each word is encoded with the BPE merges,
starting from ``"Ġ"`` (GPT-2's byte symbol for the leading space) followed by the
word's characters.  Unknown subwords become ``<unk>``; the sequence is wrapped in
``<s> ... </s>``.  (dalle-mini's own text normaliser, with ftfy and more rules, is
not applied: min-dalle does not apply it either.)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from neuroprobe.errors import NeuroprobeError

#: GPT-2's byte-level symbol for a leading space (``chr(ord(" ") + 256)``).
SPACE = "\u0120"


def clean_text(text: str) -> str:
    """min-dalle's cleanup: spell out emoji (if possible), lower-case, drop non-ASCII."""
    try:
        from emoji import demojize  # optional, as in min-dalle
    except ImportError:  # pragma: no cover - depends on the environment
        demojize = None
    if demojize is not None:
        text = demojize(text, delimiters=("", ""))
    return text.lower().encode("ascii", errors="ignore").decode()


@dataclass
class Encoding:
    """Token ids of one text plus, per token, the character span of its word in the cleaned text."""

    ids: list[int]
    spans: list[tuple[int, int] | None]
    text: str


class TextTokenizer:
    """Byte-pair encoder over a BART vocabulary.

    Parameters
    ----------
    vocab
        Subword -> id (``vocab.json``).
    merges
        Merge rules ``"a b"`` in priority order (``merges.txt`` without its header line).
    """

    def __init__(self, vocab: dict[str, int], merges: list[str]) -> None:
        self.vocab = dict(vocab)
        self.inverse = {i: s for s, i in self.vocab.items()}
        pairs = [tuple(m.split()) for m in merges if m.strip() and not m.startswith("#version")]
        self.ranks: dict[tuple[str, ...], int] = {p: r for r, p in enumerate(pairs)}
        for special in ("<s>", "</s>", "<unk>", "<pad>"):
            if special not in self.vocab:
                raise NeuroprobeError(f"the DALL-E vocabulary has no {special!r} token; use min-dalle's vocab.json.")
        self.bos, self.eos, self.unk, self.pad = (self.vocab[s] for s in ("<s>", "</s>", "<unk>", "<pad>"))
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> "TextTokenizer":
        """Read ``vocab.json`` and ``merges.txt``."""
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf8"))
        merges = Path(merges_path).read_text(encoding="utf8").split("\n")
        return cls(vocab, merges)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        parts = [SPACE] + list(word)
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                rank = self.ranks.get((parts[i], parts[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = i, rank
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return tuple(parts)

    def subwords(self, word: str) -> tuple[str, ...]:
        """BPE pieces of one (cleaned) word, the first carrying the leading-space symbol."""
        return self._bpe(word)

    def encode_with_spans(self, text: str) -> Encoding:
        """Token ids of ``text`` with ``<s>``/``</s>`` and each token's word span in the cleaned text."""
        cleaned = clean_text(text)
        ids, spans = [self.bos], [None]
        for m in re.finditer(r"[^ ]+", cleaned):
            for piece in self.subwords(m.group(0)):
                ids.append(self.vocab.get(piece, self.unk))
                spans.append((m.start(), m.end()))
        ids.append(self.eos)
        spans.append(None)
        return Encoding(ids, spans, cleaned)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, ``[<s>, ..., </s>]``."""
        return self.encode_with_spans(text).ids

    def decode(self, ids: list[int]) -> str:
        """Inverse of :meth:`tokenize` on the cleaned text (special tokens dropped)."""
        specials = {self.bos, self.eos, self.pad}
        pieces = [self.inverse.get(i, "") for i in ids if i not in specials]
        return "".join(pieces).replace(SPACE, " ").strip()

    def batch(self, texts: list[str], length: int = 64) -> torch.Tensor:
        """Token ids ``[B, length]``: each text cut to ``length`` tokens (as min-dalle does) and padded with ``<pad>``."""
        out = torch.full((len(texts), length), self.pad, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)[:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
