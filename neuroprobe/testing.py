"""Tiny random-init subjects for tests: real transformers architectures, built offline.

:func:`make_tiny` builds a small (hidden size 32, two layers) randomly initialised
model of one architecture together with a matching tokenizer trained on a small
in-code corpus, and saves both with ``save_pretrained`` so that
``load_subject(name, weights=folder)`` loads them back through the real code path.

Tokenizers are made the way the published ones were, only smaller:

* WordPiece (BERT, MiniLM, LXMERT, VisualBERT): a ``vocab.txt`` written here.
* byte-level BPE (RoBERTa, GPT-2, BART, BlenderBot, CLIP): ``vocab.json`` and
  ``merges.txt`` trained with the ``tokenizers`` library.
* SentencePiece unigram (XLNet, T5 with its ``<extra_id_*>`` sentinels): a
  ``spiece.model`` trained with the ``sentencepiece`` library.

Models are saved as the *head* class a readout needs (``BertForMaskedLM``,
``T5ForConditionalGeneration``...); the base model loads from the same folder.

Examples
--------
>>> from neuroprobe.testing import make_tiny, SUBJECT_FOR_ARCH
>>> folder = make_tiny("bert", tmp_path / "bert")            # doctest: +SKIP
>>> subject = load_subject(SUBJECT_FOR_ARCH["bert"], weights=folder)  # doctest: +SKIP
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

#: architectures :func:`make_tiny` can build
TINY_ARCHS: tuple[str, ...] = (
    "bert", "minilm", "roberta", "xlnet", "bart", "t5", "t5-gated", "gpt2", "blenderbot", "clip", "lxmert",
    "visualbert",
)

#: registry subject whose loader and site patterns fit each tiny architecture
SUBJECT_FOR_ARCH: dict[str, str] = {
    "bert": "bert", "minilm": "minilm", "roberta": "roberta", "xlnet": "xlnet", "bart": "bart", "t5": "t5",
    "t5-gated": "t5", "gpt2": "gpt2", "blenderbot": "meena", "clip": "clip", "lxmert": "lxmert",
    "visualbert": "visualbert",
}

#: sizes shared by every tiny model (distinct numbers catch transposed axes)
HIDDEN, LAYERS, HEADS, FFN, MAX_POSITIONS = 32, 2, 4, 40, 64

#: LXMERT / VisualBERT region-feature size of the tiny models (the published ones use 2048)
VISUAL_FEAT_DIM = 16

#: CLIP tiny vision tower: image side and patch side in pixels
IMAGE_SIZE, PATCH_SIZE = 32, 8

_PEOPLE = ["grandmother", "grandma", "grandfather", "grandpa", "mother", "mom", "father", "dad", "sister",
           "brother", "aunt", "uncle", "daughter", "son", "wife", "husband", "friend", "teacher"]
_THINGS = ["cat", "dog", "horse", "lion", "bird", "fish", "red", "blue", "green", "yellow", "Paris", "London",
           "Tokyo", "Rome", "Einstein", "Obama", "Shakespeare", "picture", "story", "house", "city", "colour"]
_FRAMES = [
    "I thought about my {} all day.",
    "Yesterday I saw a picture of my {}.",
    "Everyone was talking about the {}.",
    "This story is about my {}.",
    "In one word, this is about my {}.",
    "The {} of my father lives in a small house.",
    "A photo of a {}.",
]


def corpus() -> list[str]:
    """The small in-code corpus every tiny tokenizer is trained on."""
    words = _PEOPLE + _THINGS
    alphabet = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789 .,;:!?'\"-()"]
    return [frame.format(word) for frame in _FRAMES for word in words] + alphabet


# ------------------------------------------------------------------ tokenizers


def _wordpiece(folder: Path):
    from transformers import BertTokenizerFast

    vocab: list[str] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab += list(chars) + ["##" + c for c in chars]
    words = sorted({w.strip(".,").lower() for s in corpus() for w in s.split()} - set(vocab))
    vocab += words + ["##s", "##er", "##ther", "##ma", "##pa"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), model_max_length=MAX_POSITIONS)


def _bpe(specials: list[str], *, clip: bool = False, merges: int = 160) -> tuple[dict[str, int], list[str]]:
    """Learn a byte-level BPE (GPT-2 style, or CLIP style with ``</w>``); return vocab and merges.

    The ``tokenizers`` library pre-tokenizes the corpus exactly as the model's tokenizer
    will; the merges are learnt here (most frequent pair, ties broken by the pair
    itself) so the result is the same on every run.
    """
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    if clip:
        normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        normalizer = None
        pre = pre_tokenizers.ByteLevel(add_prefix_space=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus():
        text = normalizer.normalize_str(line) if normalizer else line
        for piece, _ in pre.pre_tokenize_str(text):
            symbols = list(piece)
            if clip:
                symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    learnt: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        learnt.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == best:
                    out.append(word[k] + word[k + 1])
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            merged[tuple(out)] += count
        words = merged
    tokens = specials + alphabet + ([ch + "</w>" for ch in alphabet] if clip else []) + [a + b for a, b in learnt]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in learnt]


def _save_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _sentencepiece(folder: Path, **ids: Any) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=160, model_type="unigram",
        hard_vocab_limit=False, character_coverage=1.0, minloglevel=2, num_threads=1, seed_sentencepiece_size=10000,
        **ids,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder


def _tokenizer(arch: str, work: Path):
    """A tokenizer of the right family for ``arch`` (built in the scratch folder ``work``)."""
    import transformers as tf

    if arch in ("bert", "minilm", "lxmert", "visualbert"):
        return _wordpiece(work)
    if arch in ("roberta", "bart"):
        vocab, merges = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        v, m = _save_bpe_files(work, vocab, merges)
        return tf.RobertaTokenizerFast(vocab=v, merges=m, model_max_length=MAX_POSITIONS)
    if arch == "blenderbot":
        vocab, merges = _bpe(["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
        v, m = _save_bpe_files(work, vocab, merges)
        tok = tf.BlenderbotTokenizerFast(vocab=v, merges=m, model_max_length=MAX_POSITIONS)
        from tokenizers.processors import TemplateProcessing

        # BlenderBot ends every sequence with </s> and has no start token
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.eos_token_id)])
        return tok
    if arch == "gpt2":  # like the published GPT-2: one special token, no padding token
        vocab, merges = _bpe(["<|endoftext|>"])
        v, m = _save_bpe_files(work, vocab, merges)
        return tf.GPT2TokenizerFast(vocab=v, merges=m, model_max_length=MAX_POSITIONS)
    if arch == "clip":
        vocab, merges = _bpe(["<|startoftext|>", "<|endoftext|>"], clip=True)
        v, m = _save_bpe_files(work, vocab, merges)
        return tf.CLIPTokenizerFast(vocab=v, merges=m, model_max_length=MAX_POSITIONS)
    if arch in ("t5", "t5-gated"):
        _sentencepiece(work, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
        return tf.T5TokenizerFast.from_pretrained(str(work), extra_ids=100, model_max_length=MAX_POSITIONS)
    if arch == "xlnet":
        _sentencepiece(work, unk_id=0, bos_id=1, eos_id=2, pad_id=5,
                       control_symbols=["<cls>", "<sep>", "<mask>", "<eod>", "<eop>"])
        return tf.XLNetTokenizerFast.from_pretrained(str(work), model_max_length=MAX_POSITIONS)
    raise ValueError(f"no tiny tokenizer for {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


# ---------------------------------------------------------------------- models


def _config(arch: str, tok) -> Any:
    import transformers as tf

    n = len(tok)
    bert_like = dict(vocab_size=n, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS, pad_token_id=tok.pad_token_id)
    seq2seq = dict(vocab_size=n, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                   encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                   decoder_ffn_dim=FFN, max_position_embeddings=MAX_POSITIONS)
    if arch in ("bert", "minilm"):
        return tf.BertConfig(**bert_like)
    if arch == "roberta":  # RoBERTa positions start after the padding index
        return tf.RobertaConfig(**{**bert_like, "max_position_embeddings": MAX_POSITIONS + 2}, type_vocab_size=1,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "xlnet":
        return tf.XLNetConfig(vocab_size=n, d_model=HIDDEN, n_layer=LAYERS, n_head=HEADS, d_inner=FFN, mem_len=None,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "bart":
        return tf.BartConfig(**seq2seq, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                             forced_eos_token_id=tok.eos_token_id)
    if arch == "blenderbot":
        return tf.BlenderbotConfig(**seq2seq, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.bos_token_id)
    if arch in ("t5", "t5-gated"):
        return tf.T5Config(vocab_size=n, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                           num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                           relative_attention_max_distance=16,
                           feed_forward_proj="gated-gelu" if arch == "t5-gated" else "relu",
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    if arch == "gpt2":
        eos = tok.eos_token_id
        return tf.GPT2Config(vocab_size=n, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                             n_positions=MAX_POSITIONS, bos_token_id=eos, eos_token_id=eos)
    if arch == "clip":
        text = dict(vocab_size=n, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        vision = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
        return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    if arch == "lxmert":
        return tf.LxmertConfig(vocab_size=n, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
                               l_layers=LAYERS, x_layers=LAYERS, r_layers=LAYERS, visual_feat_dim=VISUAL_FEAT_DIM,
                               visual_pos_dim=4, num_qa_labels=5, num_object_labels=7, num_attr_labels=3,
                               max_position_embeddings=MAX_POSITIONS, pad_token_id=tok.pad_token_id)
    if arch == "visualbert":
        return tf.VisualBertConfig(**bert_like, visual_embedding_dim=VISUAL_FEAT_DIM)
    raise ValueError(f"no tiny config for {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


def head_class_name(arch: str) -> str:
    """The transformers class a tiny ``arch`` model is saved as (the readout head of its architecture)."""
    from neuroprobe.subjects.hf import ARCHITECTURES

    return ARCHITECTURES["t5" if arch == "t5-gated" else arch].head


def make_tiny(arch: str, directory: Path, seed: int = 0) -> Path:
    """Build a tiny random-init model of ``arch`` with its tokenizer and save both in ``directory``.

    Parameters
    ----------
    arch
        One of :data:`TINY_ARCHS`.
    directory
        Folder to write (created if needed): ``config.json``, ``model.safetensors``,
        the tokenizer files, and for CLIP an image-processor config.
    seed
        Seed of the random weights (same seed, same weights).

    Returns
    -------
    Path
        ``directory``; pass it as ``load_subject(SUBJECT_FOR_ARCH[arch], weights=directory)``.
    """
    import transformers as tf

    if arch not in TINY_ARCHS:
        raise ValueError(f"no tiny model for {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        with tempfile.TemporaryDirectory() as scratch:
            tok = _tokenizer(arch, Path(scratch))
        config = _config(arch, tok)
        cls = getattr(tf, head_class_name(arch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config).eval()
            base = model.base_model
            if getattr(base, "pooler", False) is None:
                # masked-LM heads drop the pooler, but published checkpoints keep it: so do we,
                # so that the base model loads every weight it has
                base.pooler = type(base)(config).pooler
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
        if arch == "clip":
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
            proc.save_pretrained(directory)
    return directory


class _quiet_transformers:
    """Silence transformers' warnings and progress bars (e.g. when writing shards) inside a block."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        self._bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging

        logging.set_verbosity(self._level)
        if self._bars:
            logging.enable_progress_bar()
