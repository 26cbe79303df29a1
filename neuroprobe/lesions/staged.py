"""Many lesions in one pass: replicas along the batch, resumed at the first lesioned block.

A lesion study evaluates many lesions (every random draw of the control is one)
on the same evaluation stimuli.  Two facts make that cheap:

* **Replicas.**  ``L`` lesions are evaluated in one forward pass by stacking ``L``
  copies of the evaluation batch along the batch axis, replica-major (rows
  ``l*B .. l*B+B-1`` are replica ``l``); each replica carries its own unit mask
  through the one electrode edit (:func:`replica_edits`, an ordinary edit
  function given to :class:`~neuroprobe.electrodes.Electrodes`).
* **Prefix caching.**  Nothing upstream of the earliest lesioned block changes, so
  the intact pass is run once per evaluation batch, the input of every block is
  kept, and each group of lesions resumes at its first lesioned block.  A tower
  that no lesion of the group reaches is not rerun at all: its intact output (for
  example the organism's text prompts when only image units are lesioned) is
  reused for every replica.

Subjects declare their blocks as data (:attr:`Subject.block_order`); a runner
here knows how to call one family's blocks and score its readout from the last
block's output:

=================  ==============================  =============================
runner             subjects                        readouts
=================  ==============================  =============================
``organism``       ``organism``                    ``zero_shot``, ``zero_shot_correct``
``hf-encoder``     ``minilm``, ``bert``, ``roberta``  ``prototype``
=================  ==============================  =============================

Every other subject or readout, and the ``resample`` mode (whose draws depend on
the batch composition), is evaluated one lesion at a time through
:func:`~neuroprobe.lesions.lesion.lesion`; :func:`make_runner` says why.

Equality: replica edits set exactly the values the single-lesion edit sets, and
scoring runs per replica with the single path's shapes, so results equal
one-at-a-time evaluation up to the backend's rounding of matrix products whose
batch size differs (measured in ``bench/lesion.py``; tested to a relative
tolerance of 1e-5 of the readout's scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.electrodes import Electrodes, capture_calls
from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Site, Subject, _compile_glob

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

#: replica modes (``resample`` draws depend on the batch, so it runs one lesion at a time)
BATCHED_MODES = ("zero", "mean", "scale")


# ------------------------------------------------------------------ edits


def lesion_values(units: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean-ablation values per site, computed as :class:`~neuroprobe.lesions.lesion.Lesion` does."""
    out = {}
    for site, idx in units.items():
        r = np.asarray(reference[site], dtype=np.float64)
        v = (r[idx] if r.ndim == 1 else np.nanmean(r[:, idx], axis=0)).astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise NeuroprobeError(f"the reference has no finite responses for some units of {site!r}.")
        out[site] = v
    return out


def replica_edits(
    lesions: Sequence[Mapping[str, np.ndarray]],
    mode: str,
    *,
    factor: float | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Callable[[torch.Tensor, Site], torch.Tensor]]:
    """Electrode edits that lesion replica ``l`` of a stacked batch with ``lesions[l]``.

    Parameters
    ----------
    lesions
        One ``site -> unit indices`` mapping per replica.
    mode
        ``zero``, ``mean`` (needs ``reference``) or ``scale`` (needs ``factor``).
    factor, reference
        As for :func:`~neuroprobe.lesions.lesion.lesion`.

    Returns
    -------
    dict
        Site name -> edit ``f(x, site)`` for every site any replica lesions.  ``x``
        must have ``L * B`` rows, replica-major.
    """
    if mode not in BATCHED_MODES:
        raise NeuroprobeError(f"mode {mode!r} cannot be evaluated in replicas; use one of {', '.join(BATCHED_MODES)}.")
    if mode == "scale":
        from neuroprobe.lesions.lesion import scale_factor

        factor = scale_factor(factor)
    n_rep = len(lesions)
    sites = list(dict.fromkeys(s for les in lesions for s in les))
    values = [lesion_values(les, reference) for les in lesions] if mode == "mean" else None
    edits = {}
    for site in sites:
        per = [(les[site] if site in les and len(les[site]) else None) for les in lesions]
        vals = [v.get(site) for v in values] if values is not None else None

        def edit(x: torch.Tensor, s: Site, _per=per, _vals=vals, _cache={}) -> torch.Tensor:
            n, u = x.shape[0], x.shape[-1]
            if n % n_rep:
                raise RuntimeError(f"site {s.name}: {n} rows are not {n_rep} replicas")
            key = (x.device, x.dtype, u)
            if key not in _cache:
                mask = torch.zeros(n_rep, u, dtype=torch.bool)
                fill = torch.zeros(n_rep, u, dtype=x.dtype)
                for r, idx in enumerate(_per):
                    if idx is None:
                        continue
                    if int(idx.max()) >= u:
                        raise NeuroprobeError(f"unit {int(idx.max())} is out of range for site {s.name!r}, which has {u} units.")
                    mask[r, torch.as_tensor(idx)] = True
                    if _vals is not None:
                        fill[r, torch.as_tensor(idx)] = torch.as_tensor(_vals[r], dtype=x.dtype)
                _cache[key] = (mask.to(x.device), fill.to(x.device))
            mask, fill = _cache[key]
            x4 = x.reshape(n_rep, n // n_rep, *x.shape[1:])
            shape = (n_rep,) + (1,) * (x4.dim() - 2) + (u,)
            m = mask.view(shape)
            if mode == "zero":
                y = x4.masked_fill(m, 0.0)
            elif mode == "mean":
                y = torch.where(m, fill.view(shape), x4)
            else:
                y = torch.where(m, x4 * factor, x4)
            return y.reshape(x.shape)

        edits[site] = edit
    return edits


# ------------------------------------------------------------------ blocks


def resolve_blocks(subject: Subject) -> dict[str, list[str]]:
    """The subject's :attr:`~neuroprobe.subjects.base.Subject.block_order` as module names, in order."""
    modules = [n for n, _ in subject.model.named_modules() if n]
    out: dict[str, list[str]] = {}
    for chain, globs in (subject.block_order or {}).items():
        names: list[str] = []
        for g in globs:
            rx = _compile_glob(g)
            names += [m for m in modules if rx.match(m) and m not in names]
        out[chain] = names
    return out


def stage_of(blocks: Mapping[str, list[str]], site: Site) -> tuple[str, int] | None:
    """``(chain, block index)`` of the block that holds ``site`` (``None`` if no declared block does)."""
    for chain, names in blocks.items():
        for i, name in enumerate(names):
            if site.module == name or site.module.startswith(name + "."):
                return chain, i
    return None


def _rep(x: Any, n_rep: int, rows: int) -> Any:
    """Tile every tensor whose first axis is the batch (``rows``) ``n_rep`` times, replica-major."""
    if n_rep == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(n_rep, *([1] * (x.dim() - 1))) if x.dim() and x.shape[0] == rows else x
    if isinstance(x, tuple):
        return tuple(_rep(v, n_rep, rows) for v in x)
    if isinstance(x, list):
        return [_rep(v, n_rep, rows) for v in x]
    if isinstance(x, dict):
        return {k: _rep(v, n_rep, rows) for k, v in x.items()}
    return x


@dataclass
class Prepared:
    """One evaluation batch: inputs, the intact input of every block, and what scoring needs."""

    rows: int
    states: dict[str, list[Any]] = field(default_factory=dict)  # chain -> intact input of each block
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # chain -> intact output of the chain
    extra: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Largest block input of one replica (bytes)."""
        best = 0
        for states in self.states.values():
            for s in states:
                t = s
                while isinstance(t, tuple) and t:  # (args, kwargs) of a captured call: its first argument
                    t = t[0]
                if isinstance(t, torch.Tensor):
                    best = max(best, t.numel() * t.element_size())
        return best


class Runner:
    """Runs one family's blocks from a cached state and scores its readout per replica."""

    name = ""
    readouts: tuple[str, ...] = ()

    def __init__(self, subject: Subject, battery: "Battery", readout: str) -> None:
        self.subject = subject
        self.battery = battery
        self.readout = readout
        self.blocks = resolve_blocks(subject)

    def cut_of(self, site: Site) -> tuple[str, int] | None:
        """Where replicas lesioning ``site`` must start: ``(chain, position)`` (default: its block's index)."""
        return stage_of(self.blocks, site)

    def prepare(self, rows: pd.DataFrame) -> Prepared:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, prep: Prepared, cuts: Mapping[str, int | None], n_rep: int) -> np.ndarray:  # pragma: no cover
        """Scores ``[n_rep, rows]``; ``cuts[chain]`` is where replicas start (``None``: reuse the intact output)."""
        raise NotImplementedError


class OrganismRunner(Runner):
    """The organism's towers block by block; the zero-shot readouts of :mod:`~neuroprobe.subjects.organism.subject`."""

    name = "organism"
    readouts = ("zero_shot", "zero_shot_correct")

    def prepare(self, rows: pd.DataFrame) -> Prepared:
        from neuroprobe.subjects.organism import data as D
        from neuroprobe.subjects.organism.subject import OrganismSubject

        subj: OrganismSubject = self.subject  # type: ignore[assignment]
        battery = self.battery
        concepts = list(battery.concepts)
        modality = rows["modality"].to_numpy()
        n_img = int((modality == "image").sum())
        has_text = bool((modality == "text").any())
        if has_text and [c for c in concepts if c not in D.CONCEPTS]:
            raise NeuroprobeError("text-to-image retrieval needs digit concepts; use the digits battery.")
        batch = subj.encode(rows, battery)
        prompts = [str(battery.concepts[c].get("prompt") or D.PROMPT_TEMPLATE.format(c)) for c in concepts]
        ref_images, ref_labels = subj.reference()
        images = [batch.inputs["images"]] if n_img else []
        texts = rows.loc[modality == "text", "text"].astype(str).tolist()
        if has_text:
            images.append(ref_images)
        all_texts = texts + (prompts if n_img else [])
        ids, mask = D.tokenize(all_texts, subj.config.max_bytes) if all_texts else (None, None)
        dtype = next(subj.model.parameters()).dtype
        prep = Prepared(rows=len(rows))
        prep.extra = dict(modality=modality, n_img=n_img, n_txt=len(texts), has_text=has_text,
                          target=np.array([concepts.index(c) for c in rows["concept"]], dtype=np.int64),
                          digits=[D.CONCEPTS.index(c) for c in concepts] if has_text else [],
                          labels=ref_labels.to(subj.device), n_concepts=len(concepts),
                          mask=mask.to(subj.device) if mask is not None else None)
        inputs = {"image": torch.cat(images).to(subj.device, dtype) if images else None,
                  "text": ids.to(subj.device) if ids is not None else None}
        with torch.inference_mode():
            for chain in ("image", "text"):
                x = inputs[chain]
                if x is None:
                    continue
                states = []
                for i in range(len(self.blocks[chain])):
                    states.append(x)
                    x = self._step(chain, i, x, prep)
                prep.states[chain], prep.outputs[chain] = states, x
        return prep

    def _step(self, chain: str, i: int, x: torch.Tensor, prep: Prepared) -> torch.Tensor:
        name = self.blocks[chain][i]
        module = self.subject.model.get_submodule(name)
        if chain == "text" and ".layers." in name:
            mask = prep.extra["mask"]
            return module(x, _rep(mask, x.shape[0] // mask.shape[0], mask.shape[0]))
        y = module(x)
        if name == "text.ln_final":  # max pooling over real tokens, as TextTower.forward does
            mask = prep.extra["mask"]
            mask = _rep(mask, y.shape[0] // mask.shape[0], mask.shape[0])
            y = y.masked_fill(~mask[..., None], float("-inf")).amax(1)
        return y

    def run(self, prep: Prepared, cuts: Mapping[str, int | None], n_rep: int) -> np.ndarray:
        model = self.subject.model
        out: dict[str, torch.Tensor] = {}
        for chain in ("image", "text"):
            if chain not in prep.states:
                continue
            cut = cuts.get(chain)
            if cut is None:
                out[chain] = prep.outputs[chain]
                continue
            x = prep.states[chain][cut]
            x = _rep(x, n_rep, x.shape[0])
            for i in range(cut, len(self.blocks[chain])):
                x = self._step(chain, i, x, prep)
            out[chain] = x
        parts = {}
        if cuts.get("joint") is not None:  # the shared embedding is lesioned: one call over every replica
            pieces = []
            for chain in ("image", "text"):
                if chain in out:
                    y = out[chain]
                    pieces.append(y.view(-1, prep.states[chain][0].shape[0], y.shape[-1]).expand(n_rep, -1, -1))
            sizes = [p.shape[1] for p in pieces]
            joint = torch.nn.functional.normalize(model.embed(torch.cat(pieces, 1).reshape(-1, pieces[0].shape[-1])), dim=-1)
            joint = joint.view(n_rep, sum(sizes), -1)
            k = 0
            for chain in ("image", "text"):
                if chain in out:
                    n = prep.states[chain][0].shape[0]
                    parts[chain] = joint[:, k : k + n]
                    k += n
        else:
            for chain, y in out.items():
                n = prep.states[chain][0].shape[0]
                parts[chain] = torch.nn.functional.normalize(y, dim=-1).view(-1, n, y.shape[-1])
        return self._score(prep, parts, n_rep)

    def _score(self, prep: Prepared, parts: Mapping[str, torch.Tensor], n_rep: int) -> np.ndarray:
        e = prep.extra
        scale = self.subject.model.scale()
        modality, n_img, n_txt = e["modality"], e["n_img"], e["n_txt"]
        target = e["target"]
        scores = np.zeros((n_rep, prep.rows))
        protos_cache: dict[int, torch.Tensor] = {}
        for r in range(n_rep):
            img = parts["image"][min(r, parts["image"].shape[0] - 1)] if "image" in parts else None
            txt = parts["text"][min(r, parts["text"].shape[0] - 1)] if "text" in parts else None
            logp = np.zeros((prep.rows, e["n_concepts"]))
            if n_img:
                p_emb = txt[n_txt:]
                logp[modality == "image"] = (scale * img[:n_img] @ p_emb.T).log_softmax(-1).float().cpu().numpy()
            if e["has_text"]:
                ri = min(r, parts["image"].shape[0] - 1)
                if ri not in protos_cache:
                    ref = img[n_img:]
                    labels = e["labels"]
                    protos_cache[ri] = torch.nn.functional.normalize(
                        torch.stack([ref[labels == d].mean(0) for d in e["digits"]]), dim=-1)
                logp[modality == "text"] = (scale * txt[:n_txt] @ protos_cache[ri].T).log_softmax(-1).float().cpu().numpy()
            if self.readout == "zero_shot_correct":
                scores[r] = (logp.argmax(1) == target).astype(np.float64)
            else:
                scores[r] = logp[np.arange(len(target)), target]
        return scores


class HFEncoderRunner(Runner):
    """BERT-family encoders layer by layer (arguments captured from the intact pass); the ``prototype`` readout."""

    name = "hf-encoder"
    readouts = ("prototype",)
    #: a layer's last sub-block, ``f(mlp hidden, attention output) -> layer output``: a site inside it
    #: resumes there (positions: ``2 i`` = layer ``i``, ``2 i + 1`` = its output sub-block)
    tail = "output"

    def cut_of(self, site: Site) -> tuple[str, int] | None:
        where = stage_of(self.blocks, site)
        if where is None:
            return None
        chain, i = where
        tail = f"{self.blocks[chain][i]}.{self.tail}"
        inside = site.module == tail or site.module.startswith(tail + ".")
        return chain, 2 * i + int(inside)

    def prepare(self, rows: pd.DataFrame) -> Prepared:
        from neuroprobe.subjects.hf import _forward_args, _prototypes

        subj = self.subject
        concepts, protos = getattr(subj, "_prototypes", None) or _prototypes(subj, self.battery)
        enc = subj.tokenizer(rows["text"].tolist(), padding=True, truncation=True, return_tensors="pt").to(subj.device)
        inputs = {k: v for k, v in enc.items() if k in _forward_args(subj.model)}
        layers = self.blocks["text"]
        tails = [f"{name}.{self.tail}" for name in layers]
        prep = Prepared(rows=len(rows))
        with torch.inference_mode():
            calls = capture_calls(subj.model, layers + tails, lambda: prep.outputs.__setitem__(
                "text", subj.model(**inputs).last_hidden_state))
        for name in layers + tails:
            if len(calls[name]) != 1:
                raise NeuroprobeError(f"block {name} ran {len(calls[name])} times in one pass; it cannot be resumed.")
        prep.states["text"] = [calls[name][0] for pair in zip(layers, tails) for name in pair]
        prep.extra = dict(inputs=inputs, mask=enc["attention_mask"], protos=protos,
                          target=torch.tensor([concepts.index(c) for c in rows["concept"]], device=protos.device))
        return prep

    def run(self, prep: Prepared, cuts: Mapping[str, int | None], n_rep: int) -> np.ndarray:
        from neuroprobe.subjects.hf import PROTOTYPE_TEMPERATURE

        model = self.subject.model
        rows = prep.rows
        cut = cuts.get("text")
        if cut is None:
            hidden = prep.outputs["text"]
        elif cut == 0 and not cuts.get("_resume", True):
            hidden = model(**_rep(prep.extra["inputs"], n_rep, rows)).last_hidden_state
        else:
            layers = self.blocks["text"]
            start = cut // 2
            if cut % 2:  # resume at the layer's output sub-block with its captured (MLP hidden, attention output)
                args, kwargs = prep.states["text"][cut]
                out = model.get_submodule(f"{layers[start]}.{self.tail}")(*_rep(args, n_rep, rows), **_rep(kwargs, n_rep, rows))
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                start += 1
            else:
                hidden = _rep(prep.states["text"][cut][0][0], n_rep, rows)
            for j in range(start, len(layers)):
                args, kwargs = prep.states["text"][2 * j]
                out = model.get_submodule(layers[j])(hidden, *_rep(args[1:], n_rep, rows), **_rep(kwargs, n_rep, rows))
                hidden = out[0] if isinstance(out, (tuple, list)) else out
        hidden = hidden.float()
        m = _rep(prep.extra["mask"], hidden.shape[0] // rows, rows).unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)
        emb = emb.view(-1, rows, emb.shape[-1])
        protos, target = prep.extra["protos"], prep.extra["target"]
        scores = np.zeros((n_rep, rows))
        for r in range(n_rep):
            logp = (emb[min(r, emb.shape[0] - 1)] @ protos.T / PROTOTYPE_TEMPERATURE).log_softmax(-1)
            scores[r] = logp[torch.arange(rows), target].cpu().numpy()
        return scores


RUNNERS: dict[str, type[Runner]] = {"organism": OrganismRunner, "hf-encoder": HFEncoderRunner}


def make_runner(subject: Subject, battery: "Battery", readout: str) -> tuple[Runner | None, str]:
    """The runner for ``subject`` and ``readout``, or ``None`` and the reason lesions run one at a time."""
    from neuroprobe.subjects.hf import HFSubject
    from neuroprobe.subjects.organism.subject import OrganismSubject

    if not subject.block_order:
        return None, f"subject {subject.name!r} declares no block order"
    if isinstance(subject, OrganismSubject):
        cls: type[Runner] = OrganismRunner
    elif isinstance(subject, HFSubject) and subject.arch.kind == "encoder" and not getattr(subject, "split_by_modality", False):
        cls = HFEncoderRunner
    else:
        return None, f"no batched runner knows how to resume subject {subject.name!r}"
    if readout not in cls.readouts:
        return None, f"the {cls.name} runner scores {', '.join(cls.readouts)}, not readout {readout!r}"
    return cls(subject, battery, readout), f"{cls.name} runner"


class BatchedEvaluator:
    """Scores of many lesions on fixed evaluation stimuli: replicas, chunked to a memory budget, prefix-cached.

    Parameters
    ----------
    runner
        From :func:`make_runner`.
    stimuli
        The evaluation rows (in the order scores are returned).
    batch_size
        Evaluation stimuli per pass (each pass holds ``batch_size`` × replicas rows).
    memory_mb
        Budget for one pass's activations: replicas per pass are
        ``memory_mb / (4 × largest block input of one replica)`` (at least 1).
    prefix_cache
        Resume each lesion at its first lesioned block and reuse the towers it does
        not reach (``False``: replicate the raw inputs and run every block; for
        benchmarks).
    """

    def __init__(self, runner: Runner, stimuli: pd.DataFrame, *, batch_size: int = 32, memory_mb: float = 512,
                 prefix_cache: bool = True) -> None:
        self.runner = runner
        self.stimuli = stimuli
        self.batch_size = int(batch_size)
        self.memory = float(memory_mb) * 2**20
        self.prefix_cache = prefix_cache
        self._prepared: list[Prepared] | None = None

    def prepared(self) -> list[Prepared]:
        """The intact pass of every evaluation batch (computed once)."""
        if self._prepared is None:
            self._prepared = [self.runner.prepare(self.stimuli.iloc[a : a + self.batch_size])
                              for a in range(0, len(self.stimuli), self.batch_size)]
        return self._prepared

    def intact(self) -> np.ndarray:
        """Readout scores of the unlesioned subject through the same runner (the baseline of :meth:`scores`)."""
        cuts = {c: None for c in self.runner.blocks}
        with torch.inference_mode():
            return np.concatenate([self.runner.run(p, cuts, 1)[0] for p in self.prepared()])

    def cuts(self, units: Mapping[str, np.ndarray], sites: Mapping[str, Site]) -> tuple[tuple[str, int | None], ...]:
        """Where a lesion's replicas start in each chain."""
        blocks = self.runner.blocks
        cut: dict[str, int | None] = {c: None for c in blocks}
        for name in units:
            where = self.runner.cut_of(sites[name])
            if where is None:  # a site outside every declared block: run everything
                return tuple((c, 0) for c in blocks)
            chain, i = where
            cut[chain] = i if cut[chain] is None else min(cut[chain], i)
        if not self.prefix_cache:
            return tuple((c, 0) for c in blocks) + (("_resume", False),)
        return tuple(cut.items())

    def scores(self, lesions: Sequence[Mapping[str, np.ndarray]], mode: str, *, factor: float | None = None,
               reference: Mapping[str, np.ndarray] | None = None, sites: Mapping[str, Site],
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Readout scores ``[len(lesions), n_stimuli]`` under each lesion."""
        preps = self.prepared()
        n = len(self.stimuli)
        out = np.full((len(lesions), n), np.nan)
        groups: dict[tuple, list[int]] = {}
        for i, les in enumerate(lesions):
            groups.setdefault(self.cuts(les, sites), []).append(i)
        per_rep = max(max(p.nbytes() for p in preps), 1) * 4
        chunk = max(1, int(self.memory // per_rep))
        model = self.runner.subject.model
        for cut, members in groups.items():
            cuts = dict(cut)
            for a in range(0, len(members), chunk):
                idx = members[a : a + chunk]
                chosen = [lesions[i] for i in idx]
                edits = replica_edits(chosen, mode, factor=factor, reference=reference)
                site_objs = [sites[s] for s in edits]
                offset = 0
                with torch.inference_mode(), Electrodes(model, site_objs, read=False, edits=edits):
                    for prep in preps:
                        out[idx, offset : offset + prep.rows] = self.runner.run(prep, cuts, len(idx))
                        offset += prep.rows
                if progress is not None:
                    progress(len(idx))
        return out
