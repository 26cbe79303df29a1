"""Configuration of the two-stream ViLBERT (Lu et al. 2019; 12-in-1, Lu et al. 2020).

The field names follow the published JSON configs of facebookresearch/vilbert-multi-task
(``config/bert_base_6layer_6conect.json``), so :meth:`ViLBERTConfig.from_json` reads
those files directly.  Only what changes the architecture or the forward pass is kept;
training switches of the reference code (dropout schedules, fixed layers, in-batch pairs,
dynamic attention, fast mode) are not part of the released checkpoints and are left out.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The two released checkpoints and what each holds on top of the two-stream encoder.
CHECKPOINTS = ("multi_task_model.bin", "pretrained_model.bin")

#: Task-token ids of the 12-in-1 model (``TASK<n>`` in ``vilbert_tasks.yml``) used by our readouts.
TASK_IDS = {"vqa": 1, "genome_qa": 2, "visual7w": 4, "retrieval_coco": 7, "retrieval_flickr30k": 8,
            "refcoco": 9, "nlvr2": 12, "visual_entailment": 13, "gqa": 15}


@dataclass
class ViLBERTConfig:
    """Shape and wiring of a two-stream ViLBERT.

    Attributes
    ----------
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    max_position_embeddings, type_vocab_size
        The text stream (BERT-base for the released models).
    v_feature_size
        Width of the region features fed to the image stream (2048 for Faster R-CNN fc6/fc7).
    v_target_size
        Classes of the masked-region prediction head (1601 Visual Genome classes).
    v_hidden_size, v_num_hidden_layers, v_num_attention_heads, v_intermediate_size
        The image stream.
    bi_hidden_size, bi_num_attention_heads
        Width and heads of the co-attention (connection) layers; also the pooled width.
    v_biattention_id, t_biattention_id
        Co-attention layer ``k`` runs after the image layers before ``v_biattention_id[k]``
        and the text layers before ``t_biattention_id[k]`` (see :meth:`run_order`).
    fusion_method
        How the pooled text and image vectors are fused for the heads: ``"mul"`` or ``"sum"``.
    task_specific_tokens
        Whether a learned task token is inserted after ``[CLS]`` (the 12-in-1 model does this).
    n_task_tokens
        Rows of the task-token table (20 in the reference code).
    task_heads
        Whether the 12-in-1 task heads (``vil_prediction`` ...) exist.
    vqa_labels, gqa_labels
        Answer vocabulary sizes of the VQA and GQA heads.
    layer_norm_eps
        Epsilon of every LayerNorm (TF-style BERT value).
    initializer_range
        Standard deviation of the normal init of linear and embedding weights (``init="random"``).
    hidden_dropout_prob, attention_probs_dropout_prob
        Dropout used only when the model is put in train mode.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    fusion_method: str = "mul"
    task_specific_tokens: bool = True
    n_task_tokens: int = 20
    task_heads: bool = True
    vqa_labels: int = 3129
    gqa_labels: int = 1533
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        self.v_biattention_id = [int(i) for i in self.v_biattention_id]
        self.t_biattention_id = [int(i) for i in self.t_biattention_id]
        problems = []
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            problems.append("v_biattention_id and t_biattention_id must have the same length")
        if self.v_biattention_id and max(self.v_biattention_id) >= self.v_num_hidden_layers:
            problems.append("v_biattention_id refers to an image layer that does not exist")
        if self.t_biattention_id and max(self.t_biattention_id) >= self.num_hidden_layers:
            problems.append("t_biattention_id refers to a text layer that does not exist")
        for name in ("v_biattention_id", "t_biattention_id"):
            ids = getattr(self, name)
            if any(b < a for a, b in zip(ids, ids[1:])):
                problems.append(f"{name} must be non-decreasing")
        for width, heads, what in (
            (self.hidden_size, self.num_attention_heads, "hidden_size"),
            (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size"),
            (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size"),
        ):
            if width % heads:
                problems.append(f"{what} ({width}) is not a multiple of its number of heads ({heads})")
        if self.fusion_method not in ("mul", "sum"):
            problems.append(f"fusion_method must be 'mul' or 'sum', not {self.fusion_method!r}")
        if problems:
            raise ValueError("invalid ViLBERT config: " + "; ".join(problems))

    # ----------------------------------------------------------- constructors
    @classmethod
    def base(cls, checkpoint: str = "multi_task_model.bin") -> "ViLBERTConfig":
        """The released architecture (``bert_base_6layer_6conect.json``).

        Parameters
        ----------
        checkpoint
            ``"multi_task_model.bin"`` (12-in-1: task tokens and task heads) or
            ``"pretrained_model.bin"`` (Conceptual Captions pretraining heads only).
        """
        return cls().for_checkpoint(checkpoint)

    @classmethod
    def tiny(cls, checkpoint: str = "multi_task_model.bin") -> "ViLBERTConfig":
        """A few-thousand-parameter model with the base wiring pattern, for tests."""
        return cls(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            v_feature_size=12,
            v_target_size=7,
            v_hidden_size=20,
            v_num_hidden_layers=3,
            v_num_attention_heads=2,
            v_intermediate_size=20,
            bi_hidden_size=8,
            bi_num_attention_heads=2,
            v_biattention_id=[0, 1, 2],
            t_biattention_id=[1, 2, 3],
            vqa_labels=11,
            gqa_labels=5,
        ).for_checkpoint(checkpoint)

    def for_checkpoint(self, checkpoint: str) -> "ViLBERTConfig":
        """Copy of this config with the heads of one of the released checkpoints."""
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, not {checkpoint!r}")
        multi = checkpoint == "multi_task_model.bin"
        return dataclasses.replace(self, task_specific_tokens=multi, task_heads=multi)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "ViLBERTConfig":
        """Read a reference JSON config (unknown keys such as ``hidden_act`` are ignored).

        Parameters
        ----------
        path
            A file like ``config/bert_base_6layer_6conect.json``.
        **overrides
            Fields to set on top (e.g. ``task_specific_tokens=True``).
        """
        raw = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        if raw.get("pooling_method") in ("mul", "sum") and "fusion_method" not in raw:
            values["fusion_method"] = raw["pooling_method"]
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------- wiring
    @property
    def n_coattention_layers(self) -> int:
        """Number of co-attention (connection) layers."""
        return len(self.v_biattention_id)

    def run_order(self) -> list[tuple[str, int]]:
        """The order in which layers run in the published forward pass.

        For each co-attention layer ``k``: the text layers from where the text stream
        stopped up to (not including) ``t_biattention_id[k]``, then the image layers up
        to (not including) ``v_biattention_id[k]``, then co-attention layer ``k``.
        Afterwards the remaining image layers run, then the remaining text layers.

        Returns
        -------
        list of (stream, index)
            ``stream`` is ``"text"``, ``"image"`` or ``"co"``.
        """
        order: list[tuple[str, int]] = []
        t_start = v_start = 0
        for k, (v_end, t_end) in enumerate(zip(self.v_biattention_id, self.t_biattention_id)):
            order += [("text", i) for i in range(t_start, t_end)]
            order += [("image", i) for i in range(v_start, v_end)]
            order.append(("co", k))
            t_start, v_start = t_end, v_end
        order += [("image", i) for i in range(v_start, self.v_num_hidden_layers)]
        order += [("text", i) for i in range(t_start, self.num_hidden_layers)]
        return order
