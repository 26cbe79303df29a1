"""Many lesions in one pass: replicas along the batch, resumed at the first lesioned block.

A lesion study evaluates many lesions (every random draw of the control is one)
on the same evaluation stimuli.  Two facts make that cheap:

* **Replicas.**  ``L`` lesions are evaluated in one forward pass by stacking ``L``
  copies of the evaluation batch along the batch axis, replica-major (rows
  ``l*B .. l*B+B-1`` are replica ``l``); each replica carries its own unit mask
  through the one electrode edit (:func:`replica_edits`, an ordinary edit
  function given to :class:`~neuroprobe.electrodes.Electrodes`).
* **Prefix caching.**  Nothing upstream of the earliest lesioned block changes, so
  the intact pass is run once per evaluation batch and recorded, and each group of
  lesions resumes at its first lesioned block.  A tower that no lesion of the group
  reaches (and that reads no tower one reaches) is not rerun at all: its intact
  output is reused for every replica.

Subjects declare their blocks as data (:attr:`Subject.block_order`, and the chains
a chain reads, :attr:`Subject.block_inputs`); a runner turns them into scores:

==============  ==============================================  ===============================
runner          subjects                                        readouts
==============  ==============================================  ===============================
``generic``     every subject                                   any marked
                                                                :func:`~neuroprobe.subjects.base.replica_safe`
``organism``    ``organism``                                    ``zero_shot``, ``zero_shot_correct``
==============  ==============================================  ===============================

:class:`GenericRunner` calls the subject's own readout once on the stimuli tiled
per lesion (:mod:`~neuroprobe.lesions.replicas`) and stands in for the blocks
upstream of the cut with their recorded intact outputs; it needs nothing per family
and evaluates every mode, ``resample`` included (each replica draws from its own
generator exactly what its single run draws).  Without a declared block order (an
``hf:`` model of a structure neuroprobe does not know) it is batched but not cached.
:class:`OrganismRunner` is the organism's hand-written runner, kept because it is
about 4 times cheaper than the generic runner on the organism (whose readout
encodes every tiled row again; ``bench/RESULTS.md``); it runs the passes of the
organism's readout in the same order on the same rows, so it evaluates every mode
too.  Any other readout is evaluated one lesion at a time through
:func:`~neuroprobe.lesions.lesion.lesion`; :func:`make_runner` says why.

Equality: replica edits set exactly the values the single-lesion edit sets, and
the readout scores each copy with the single path's shapes (a replica-safe readout
pads a tiled batch as it pads the batch), so results equal one-at-a-time
evaluation up to the backend's rounding of matrix products whose batch size
differs (bitwise in ``bench/RESULTS.md``; tested to 1e-5 of the readout's scale in
``tests/test_lesions_generic.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.electrodes import Electrodes, stand_ins, watch_calls
from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Site, Subject, _compile_glob

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

#: modes :func:`replica_edits` edits (``resample``: each replica draws, from its own generator, what its
#: single run draws, when the passes hold each copy's rows in the single run's order, as both runners' do)
REPLICA_MODES = ("zero", "mean", "scale", "resample")
#: the modes a :class:`BatchedEvaluator` evaluates in replicas (every runner takes all of them)
BATCHED_MODES = REPLICA_MODES


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


class ReplicaEdits(dict):
    """Site name -> edit of a stacked batch (a dict), plus each replica's ``resample`` generator."""

    generators: list[torch.Generator | None]

    def rng_states(self) -> list[torch.Tensor | None]:
        """The generators' states (to replay a pass that must be run again)."""
        return [g.get_state() if g is not None else None for g in self.generators]

    def set_rng_states(self, states: Sequence[torch.Tensor | None]) -> None:
        """Restore states from :meth:`rng_states`."""
        for g, s in zip(self.generators, states):
            if g is not None and s is not None:
                g.set_state(s)


def resample_pools(units: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``resample`` reference rows per site, ``[n_ref, n_lesioned]``, as :class:`~neuroprobe.lesions.lesion.Lesion` keeps them."""
    out = {}
    for site, idx in units.items():
        r = np.asarray(reference[site], dtype=np.float64)
        if r.ndim != 2:
            raise NeuroprobeError("a resample lesion needs per-stimulus reference responses, not means.")
        if int(idx.max()) >= r.shape[1]:
            raise NeuroprobeError(f"unit {int(idx.max())} is out of range for site {site!r}, which has {r.shape[1]} units.")
        sub = r[:, idx]
        sub = sub[np.all(np.isfinite(sub), axis=1)]
        if len(sub) == 0:
            raise NeuroprobeError(f"the reference has no stimulus with finite responses at {site!r}.")
        out[site] = sub
    return out


def replica_edits(
    lesions: Sequence[Mapping[str, np.ndarray]],
    mode: str,
    *,
    factor: float | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> ReplicaEdits:
    """Electrode edits that lesion replica ``l`` of a stacked batch with ``lesions[l]``.

    Parameters
    ----------
    lesions
        One ``site -> unit indices`` mapping per replica.
    mode
        ``zero``, ``mean`` (needs ``reference``), ``scale`` (needs ``factor``) or
        ``resample`` (needs per-stimulus ``reference`` responses).
    factor, reference
        As for :func:`~neuroprobe.lesions.lesion.lesion`.
    seed
        ``resample``: every replica draws from its own generator seeded with ``seed``,
        one draw per row of its copy at each edit of a site it lesions, in call order,
        as :class:`~neuroprobe.lesions.lesion.Lesion` draws for that lesion alone: when
        the passes hold the single run's rows for every copy (a replica-safe readout
        on the same evaluation batches), each replica draws exactly its single run's
        reference rows and the values it sets are the same.

    Returns
    -------
    ReplicaEdits
        Site name -> edit ``f(x, site)`` for every site any replica lesions.  ``x``
        must have ``L * B`` rows, replica-major.
    """
    if mode not in REPLICA_MODES:
        raise NeuroprobeError(f"mode {mode!r} cannot be evaluated in replicas; use one of {', '.join(REPLICA_MODES)}.")
    if mode == "scale":
        from neuroprobe.lesions.lesion import scale_factor

        factor = scale_factor(factor)
    n_rep = len(lesions)
    sites = list(dict.fromkeys(s for les in lesions for s in les))
    values = [lesion_values(les, reference) for les in lesions] if mode == "mean" else None
    pools = [resample_pools(les, reference) for les in lesions] if mode == "resample" else None
    edits = ReplicaEdits()
    edits.generators = [torch.Generator().manual_seed(int(seed)) if mode == "resample" else None for _ in lesions]
    for site in sites:
        per = [(les[site] if site in les and len(les[site]) else None) for les in lesions]
        vals = [v.get(site) for v in values] if values is not None else None

        def edit(x: torch.Tensor, s: Site, _per=per, _vals=vals, _site=site, _cache={}) -> torch.Tensor:
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
            parts = getattr(x, "_parts", None)  # a recorded output not copied yet: edit its copies in one pass
            if isinstance(x, _Tiled) and parts[1] == 0 and parts[2] == n_rep:
                x4 = parts[0].unsqueeze(0).expand(n_rep, *parts[0].shape)
            else:
                x4 = x.reshape(n_rep, n // n_rep, *x.shape[1:])
            shape = (n_rep,) + (1,) * (x4.dim() - 2) + (u,)
            m = mask.view(shape)
            if mode == "zero":
                y = torch.where(m, torch.zeros((), dtype=x4.dtype, device=x4.device), x4)
            elif mode == "mean":
                y = torch.where(m, fill.view(shape), x4)
            elif mode == "scale":
                y = torch.where(m, x4 * factor, x4)
            else:  # resample: replica r draws its copy's rows from its own generator, as its single run does
                b = n // n_rep
                drawn = torch.zeros((n_rep, b, u), dtype=x.dtype)
                for r, idx in enumerate(_per):
                    if idx is None:
                        continue
                    pool = pools[r][_site]
                    draw = torch.randint(pool.shape[0], (b,), generator=edits.generators[r])
                    drawn[r][:, torch.as_tensor(idx)] = torch.as_tensor(pool, dtype=x.dtype)[draw]
                drawn = drawn.to(x.device).view((n_rep, b) + (1,) * (x4.dim() - 3) + (u,))
                y = torch.where(m, drawn, x4)
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
    per_replica: int = 0  # bytes of the largest activation of one replica (0: the largest block input)
    held: int = 0  # bytes of the recorded intact pass it holds

    def nbytes(self) -> int:
        """Largest block input of one replica (bytes)."""
        if self.per_replica:
            return self.per_replica
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
    #: where a group starts when nothing upstream may be reused
    start: Any = 0

    def __init__(self, subject: Subject, battery: "Battery", readout: str) -> None:
        self.subject = subject
        self.battery = battery
        self.readout = readout
        self.blocks = resolve_blocks(subject)

    def intact(self, prep: Prepared) -> np.ndarray:
        """The unlesioned readout of one prepared batch."""
        return self.run(prep, {c: None for c in self.blocks}, 1)[0]

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


# ------------------------------------------------------------------ the generic runner


class CacheMiss(Exception):
    """The tiled pass did not call a cached block as the intact pass did; the group runs without the cache."""


#: why a recorded call cannot stand in for a block (its output has no batch axis to tile): the block runs
_UNTILEABLE = "untileable"
_PRIMITIVES = (type(None), bool, int, float, str)


def _tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors among a call's arguments (and one level into tuples and lists), in order."""
    out: list[torch.Tensor] = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class _Untileable(Exception):
    pass


def _map(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a block's output (tuples, lists, dicts); other objects stop it."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, _PRIMITIVES):
        return x
    if isinstance(x, tuple):
        return type(x)(*(_map(v, fn) for v in x)) if hasattr(x, "_fields") else tuple(_map(v, fn) for v in x)
    if isinstance(x, list):
        return [_map(v, fn) for v in x]
    if isinstance(x, dict):
        items = {k: _map(v, fn) for k, v in x.items()}
        if type(x) is dict:
            return items
        try:
            return type(x)(**items)  # e.g. a transformers ModelOutput
        except Exception:  # noqa: BLE001 - a mapping type that cannot be rebuilt so: the block runs
            raise _Untileable(type(x).__name__) from None
    raise _Untileable(type(x).__name__)  # e.g. a key/value cache object: the block runs


def _tiled_axis(actual: torch.Size, recorded: torch.Size, n_rep: int) -> int | None:
    """The axis along which ``actual`` is ``recorded`` stacked ``n_rep`` times (``None``: same shape; -1: neither)."""
    if actual == recorded:
        return None
    if len(actual) != len(recorded):
        return -1
    diff = [d for d in range(len(actual)) if actual[d] != recorded[d]]
    return diff[0] if len(diff) == 1 and actual[diff[0]] == n_rep * recorded[diff[0]] else -1


def _same(actual: torch.Tensor, recorded: torch.Tensor, axis: int | None, n_rep: int, tol: float) -> bool:
    """Whether every copy of ``actual`` equals ``recorded`` (floats to ``tol`` of its largest magnitude)."""
    if actual.dtype != recorded.dtype:
        return False
    x, r = actual, recorded
    if axis is not None:
        x = actual.reshape(actual.shape[:axis] + (n_rep, recorded.shape[axis]) + actual.shape[axis + 1 :])
        r = recorded.unsqueeze(axis)
    if torch.equal(x, r.expand_as(x)):
        return True
    if not r.is_floating_point():
        return False
    finite = r[torch.isfinite(r)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.isclose(x, r, rtol=0.0, atol=tol * scale, equal_nan=True).all())


class _Tiled(torch.Tensor):
    """A recorded output stacked ``n`` times along ``axis``, made only when an operation reads it.

    A stand-in's output usually goes straight into the next stand-in, which only looks at its
    shape; the copy is made the first time anything else (the first block that runs) uses it.
    """

    @staticmethod
    def __new__(cls, recorded: torch.Tensor, axis: int, n: int) -> "_Tiled":
        shape = list(recorded.shape)
        shape[axis] *= n
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=recorded.dtype, device=recorded.device)
        t._parts = (recorded, axis, n)
        t._made = None
        return t

    def made(self) -> torch.Tensor:
        if self._made is None:
            recorded, axis, n = self._parts
            self._made = recorded.repeat(*[n if d == axis else 1 for d in range(recorded.dim())])
        return self._made

    # what reads memory directly instead of through an operation gets the copy
    def numpy(self, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        return self.made().numpy(*args, **kwargs)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        return self.made().__array__(*args, **kwargs)

    def tolist(self) -> Any:  # type: ignore[override]
        return self.made().tolist()

    def contiguous(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self.made().contiguous(*args, **kwargs)

    def data_ptr(self) -> int:  # type: ignore[override]
        return self.made().data_ptr()

    def untyped_storage(self) -> Any:  # type: ignore[override]
        return self.made().untyped_storage()

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return repr(self.made())

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        from torch.utils._pytree import tree_map

        def made(x: Any) -> Any:
            return x.made() if isinstance(x, _Tiled) else x

        return func(*tree_map(made, args), **tree_map(made, kwargs or {}))


@dataclass
class _Call:
    """One call of a block in the intact pass: its tensor arguments and its output (copies)."""

    inputs: list[torch.Tensor]
    output: Any
    tileable: bool = True


def _replay(call: _Call, args: tuple, kwargs: Mapping[str, Any], n_rep: int, tol: float,
            given: Mapping[int, torch.Tensor]) -> Any:
    """The recorded output tiled ``n_rep`` times when this call's arguments are the recorded ones tiled;
    else a string saying why not (:data:`_UNTILEABLE`: the block must run; anything else: the cache is wrong).

    ``given``: tensors earlier stand-ins returned (by ``id``); an argument that is one of them is only
    checked for its shape (its values are a recorded output, compared when it was recorded)."""
    actual = _tensors(args, kwargs)
    if len(actual) != len(call.inputs):
        return f"called with {len(actual)} tensors, not {len(call.inputs)}"
    axis: int | None = None
    for k, (a, r) in enumerate(zip(actual, call.inputs)):
        ax = _tiled_axis(a.shape, r.shape, n_rep)
        if ax == -1:
            return f"argument {k} has shape {tuple(a.shape)}, not {n_rep} x {tuple(r.shape)}"
        if given.get(id(a)) is not a and not _same(a, r, ax, n_rep, tol):
            return f"argument {k} differs from the intact pass (a lesioned chain it reads is not declared in block_inputs?)"
        if k == 0:
            axis = ax
    if not call.tileable:
        return _UNTILEABLE
    if n_rep == 1:
        return _map(call.output, torch.clone)
    if axis is None:  # the first argument carries no batch axis: where the batch is in the output is unknown
        return _UNTILEABLE
    rows = call.inputs[0].shape[axis]

    def tile(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > axis and t.shape[axis] == rows:
            return _Tiled(t, axis, n_rep)
        if t.dim() <= axis or t.shape[axis] == 1:  # no batch axis (shared across rows, e.g. a position bias)
            return t.clone()
        raise _Untileable(f"shape {tuple(t.shape)}")

    try:
        return _map(call.output, tile)
    except _Untileable:
        return _UNTILEABLE


def _recorder(store: dict[str, list[_Call]], seen: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., Any]:
    """A hook ``(name, args, kwargs, output)`` keeping copies of each call's tensors in ``store``."""

    def keep(t: torch.Tensor) -> torch.Tensor:
        got = seen.get(id(t))
        if got is None or got[0] is not t:
            got = seen[id(t)] = (t, t.detach().clone())
        return got[1]

    def hook(name: str, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = [keep(t) for t in _tensors(args, kwargs)]
        try:
            out, ok = _map(output, keep), True
        except _Untileable:
            out, ok = None, False
        store.setdefault(name, []).append(_Call(inputs, out, ok))

    return hook


class GenericRunner(Runner):
    """Any subject whose readout is :func:`~neuroprobe.subjects.base.replica_safe`: the readout itself, called once
    on the stimuli tiled per lesion, with the blocks upstream of the first lesioned one answered from the intact pass.

    The intact pass of each evaluation batch (the readout on its rows) records every declared block's
    tensor arguments and output per call, in call order, and the same for the direct children of each
    block (the sub-blocks it calls, e.g. a layer's attention and MLP).  A group of lesions whose earliest
    lesioned block in chain ``c`` is ``i`` (its lesioned site inside child ``j`` of that block) then runs
    the readout once on ``L`` copies of the rows with ``forward`` of blocks ``0 .. i-1`` of ``c``, of the
    children block ``i`` calls before ``j``, and of every block of a chain no lesion reaches (unless it
    reads, through :attr:`~neuroprobe.subjects.base.Subject.block_inputs`, a chain one reaches) swapped for
    a function that returns the recorded output tiled ``L`` times along the batch axis of its first
    argument (replica-major; ``[T, B, D]`` time-major blocks included).  Before answering, the function
    checks the call's tensor arguments are the recorded ones tiled (to ``1e-5`` of their magnitude): a
    chain read without being declared, a block called in another order, or more or fewer times than in
    the intact pass, raise :class:`CacheMiss` after the pass and the group is run again without the cache
    (correct, slower).  A call whose output has no batch axis to tile (a cache object) runs the block.
    Embeddings, masks and the readout's own scoring run on the tiled rows as the readout makes them.

    With ``prefix_cache=False`` (subjects with no declared block order, such as ``hf:`` models of a
    structure neuroprobe does not know) every block runs on the tiled rows: batched, not cached.
    """

    name = "generic"
    start = (0, 0)
    #: the tolerance of the argument check, relative to the recorded argument's largest magnitude
    tolerance = 1e-5

    def __init__(self, subject: Subject, battery: "Battery", readout: str, *, prefix_cache: bool = True) -> None:
        from neuroprobe.lesions.replicas import readout_function

        super().__init__(subject, battery, readout)
        self.fn = readout_function(subject, readout)
        if not prefix_cache:
            self.blocks = {}
        self.depends = _reads(getattr(subject, "block_inputs", None) or {}, list(self.blocks))
        self.child_order: dict[str, list[str] | None] = {}
        self.misses: list[str] = []

    def cut_of(self, site: Site) -> tuple[str, tuple[int, int]] | None:
        """``(chain, (block index, position of the site's sub-block in the block's calls))``."""
        where = stage_of(self.blocks, site)
        if where is None:
            return None
        chain, i = where
        block = self.blocks[chain][i]
        pos = 0
        if site.module != block:
            child = site.module[len(block) + 1 :].split(".")[0]
            order = self.child_order.get(block)
            if order and child in order:
                pos = order.index(child)
        return chain, (i, pos)

    def prepare(self, rows: pd.DataFrame) -> Prepared:
        model = self.subject.model
        blocks: dict[str, list[_Call]] = {}
        children: dict[str, list[_Call]] = {}
        seqs: dict[str, list[list[str]]] = {}
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        record_block, record_child = _recorder(blocks, seen), _recorder(children, seen)
        biggest = [0]

        def measure(output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                biggest[0] = max(biggest[0], t.numel() * t.element_size())

        names = [n for chain in self.blocks.values() for n in chain]
        parent = {f"{n}.{c}": (n, c) for n in names for c, _ in model.get_submodule(n).named_children()}

        def on_call(name: str, args: tuple, kwargs: dict, output: Any) -> None:
            if name in parent:  # a block's sub-block
                block, child = parent[name]
                if seqs.get(block):
                    seqs[block][-1].append(child)
                record_child(name, args, kwargs, output)
            else:
                record_block(name, args, kwargs, output)

        def readout() -> np.ndarray:
            with torch.inference_mode():
                return watch_calls(model, [n for n, _ in model.named_modules()], lambda: np.asarray(
                    self.fn(self.subject, rows, self.battery), dtype=np.float64), lambda n, a, k, o: measure(o))

        scores = watch_calls(model, names + list(parent), readout, on_call,
                               on_start=lambda n: None if n in parent else seqs.setdefault(n, []).append([]))
        held = sum(t.numel() * t.element_size() for _, t in seen.values())
        seen.clear()
        for name, calls in seqs.items():  # a block's sub-blocks in call order, if every call of it agrees
            order = calls[0] if calls and all(c == calls[0] for c in calls) else None
            if name in self.child_order and self.child_order[name] != order:
                order = None
            self.child_order[name] = order
        return Prepared(rows=len(rows), per_replica=biggest[0], held=held,
                        extra=dict(rows=rows, scores=scores.reshape(len(rows)), blocks=blocks, children=children))

    def intact(self, prep: Prepared) -> np.ndarray:
        return prep.extra["scores"]

    def plan(self, prep: Prepared, cuts: Mapping[str, Any]) -> dict[str, list[_Call]]:
        """Module name -> the recorded calls that stand in for it when a group starts at ``cuts``."""
        reached = {c for c, v in cuts.items() if v is not None and c in self.blocks}
        plan: dict[str, list[_Call]] = {}
        for chain, names in self.blocks.items():
            if self.depends.get(chain, set()) & reached:  # it reads a lesioned chain: every block runs
                continue
            cut = cuts.get(chain)
            i, pos = (len(names), 0) if cut is None else cut
            for name in names[:i]:
                plan[name] = prep.extra["blocks"].get(name, [])
            order = self.child_order.get(names[i]) if i < len(names) and pos else None
            if order:
                last = {c: k for k, c in enumerate(order)}
                for child, k in last.items():
                    if k < pos:
                        plan[f"{names[i]}.{child}"] = prep.extra["children"].get(f"{names[i]}.{child}", [])
        # a module inside another one that is answered from the record is never called
        return {n: c for n, c in plan.items() if not any(n.startswith(m + ".") for m in plan)}

    def run(self, prep: Prepared, cuts: Mapping[str, Any], n_rep: int) -> np.ndarray:
        from neuroprobe.lesions.replicas import tile

        rows = prep.extra["rows"]
        tiled = tile(rows, n_rep)
        plan = {} if cuts.get("_nocache") or not self.blocks else self.plan(prep, cuts)
        counts = {name: 0 for name in plan}
        given: dict[int, torch.Tensor] = {}  # what stand-ins returned (kept alive so ids stay theirs)
        miss: list[str] = []

        def stand_in(name: str, recorded: list[_Call]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def make(original: Callable[..., Any]) -> Callable[..., Any]:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    k = counts[name]
                    counts[name] = k + 1
                    if not miss:
                        if k >= len(recorded):
                            miss.append(f"{name} ran more often than in the intact pass")
                        else:
                            out = _replay(recorded[k], args, kwargs, n_rep, self.tolerance, given)
                            if not isinstance(out, str):
                                _map(out, lambda t: given.setdefault(id(t), t))
                                return out
                            if out != _UNTILEABLE:
                                miss.append(f"{name}, call {k}: {out}")
                    return original(*args, **kwargs)

                return forward

            return make

        with stand_ins(self.subject.model, {name: stand_in(name, recorded) for name, recorded in plan.items()}):
            scores = np.asarray(self.fn(self.subject, tiled, self.battery), dtype=np.float64)
        if not miss:
            miss += [f"{n} ran {counts[n]} times, not {len(plan[n])}" for n in plan if counts[n] != len(plan[n])]
        if miss:
            self.misses.append(miss[0])
            raise CacheMiss(miss[0])
        return scores.reshape(n_rep, len(rows))


def _reads(block_inputs: Mapping[str, Sequence[str]], chains: Sequence[str]) -> dict[str, set[str]]:
    """Chain -> every chain it reads, directly or through others (from ``Subject.block_inputs``)."""
    out: dict[str, set[str]] = {}
    for chain in chains:
        todo, got = list(block_inputs.get(chain, ())), set()
        while todo:
            c = todo.pop()
            if c not in got and c != chain:
                got.add(c)
                todo += list(block_inputs.get(c, ()))
        out[chain] = got
    return out


RUNNERS: dict[str, type[Runner]] = {"generic": GenericRunner, "organism": OrganismRunner}


def make_runner(subject: Subject, battery: "Battery", readout: str) -> tuple[Runner | None, str]:
    """The runner for ``subject`` and ``readout``, or ``None`` and the reason lesions run one at a time.

    The organism's zero-shot readouts keep their hand-written :class:`OrganismRunner` (the generic
    runner equals it but encodes every tiled stimulus again: about 4 times its cost for 100
    last-layer lesions, ``bench/RESULTS.md``); any other readout marked
    :func:`~neuroprobe.subjects.base.replica_safe` gets the :class:`GenericRunner`, prefix-cached
    when the subject declares a block order (without one, e.g. an ``hf:`` model of a structure
    neuroprobe does not know, it is batched but every block runs); other readouts run one lesion at
    a time.
    """
    from neuroprobe.lesions.replicas import is_replica_safe
    from neuroprobe.subjects.organism.subject import OrganismSubject

    if readout not in subject.readouts:
        return None, f"subject {subject.name!r} has no readout {readout!r}"
    if type(subject) is OrganismSubject and subject.block_order and readout in OrganismRunner.readouts:
        return OrganismRunner(subject, battery, readout), "organism runner"
    if is_replica_safe(subject, readout):
        if subject.block_order:
            return GenericRunner(subject, battery, readout), "generic runner"
        why = (f"generic runner without prefix cache: subject {subject.name!r} declares no block order, so "
               f"nothing upstream of a lesion is known to be unchanged and every block runs")
        return GenericRunner(subject, battery, readout, prefix_cache=False), why
    if not subject.block_order and subject.name.startswith("hf:"):
        return None, (f"readout {readout!r} of {subject.name!r} is not marked replica-safe and neuroprobe does not "
                      f"know the model's structure (no block order), so its lesions cannot share a forward pass")
    return None, (f"readout {readout!r} of subject {subject.name!r} is not marked replica-safe (its forward passes "
                  f"are not known to hold every lesion's copy of the stimuli alike), so its lesions cannot share "
                  f"a forward pass")


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
        ``memory_mb / (4 × largest activation of one replica)`` (at least 1).  The
        recorded intact pass is kept between calls when it fits this budget too;
        otherwise each batch's is recorded again when it is needed (one intact
        evaluation more per :meth:`scores`).
    prefix_cache
        Resume each lesion at its first lesioned block and reuse the towers it does
        not reach (``False``: replicate the raw inputs and run every block; for
        benchmarks).
    seed
        Seed of ``resample`` draws (each lesion's, as :func:`~neuroprobe.lesions.lesion.lesion` seeds it).
    """

    def __init__(self, runner: Runner, stimuli: pd.DataFrame, *, batch_size: int = 32, memory_mb: float = 512,
                 prefix_cache: bool = True, seed: int = 0) -> None:
        self.runner = runner
        self.stimuli = stimuli
        self.batch_size = int(batch_size)
        self.memory = float(memory_mb) * 2**20
        self.prefix_cache = prefix_cache
        self.seed = int(seed)
        self._prepared: list[Prepared] | None = None
        self._intact: np.ndarray | None = None
        self._per_rep = 1

    def batches(self) -> list[pd.DataFrame]:
        """The evaluation batches (rows of :attr:`stimuli`)."""
        return [self.stimuli.iloc[a : a + self.batch_size] for a in range(0, len(self.stimuli), self.batch_size)]

    def prepared(self) -> list[Prepared]:
        """The intact pass of every evaluation batch, computed once and kept when it fits the memory budget."""
        if self._prepared is not None:
            return self._prepared
        preps = [self.runner.prepare(rows) for rows in self.batches()]
        self._intact = np.concatenate([self.runner.intact(p) for p in preps]) if preps else np.zeros(0)
        self._per_rep = max((p.nbytes() for p in preps), default=1)
        if sum(p.held for p in preps) <= self.memory:
            self._prepared = preps
        return preps

    def _each_prepared(self) -> Iterator[Prepared]:
        """The prepared batches one by one: the kept ones, or each recomputed when they do not fit the budget."""
        if self._prepared is not None:
            yield from self._prepared
        else:
            for rows in self.batches():
                yield self.runner.prepare(rows)

    def intact(self) -> np.ndarray:
        """Readout scores of the unlesioned subject through the same runner (the baseline of :meth:`scores`)."""
        with torch.inference_mode():
            if self._intact is None:
                self.prepared()
            assert self._intact is not None
            return self._intact

    def cuts(self, units: Mapping[str, np.ndarray], sites: Mapping[str, Site]) -> tuple[tuple[str, Any], ...]:
        """Where a lesion's replicas start in each chain (the key that groups lesions)."""
        blocks = self.runner.blocks
        start = self.runner.start
        cut: dict[str, Any] = {c: None for c in blocks}
        for name in units:
            where = self.runner.cut_of(sites[name])
            if where is None:  # a site outside every declared block: run everything
                return tuple((c, start) for c in blocks) + (("_nocache", True),)
            chain, i = where
            cut[chain] = i if cut[chain] is None else min(cut[chain], i)
        if not self.prefix_cache:
            return tuple((c, start) for c in blocks) + (("_nocache", True),)
        return tuple(cut.items())

    def scores(self, lesions: Sequence[Mapping[str, np.ndarray]], mode: str, *, factor: float | None = None,
               reference: Mapping[str, np.ndarray] | None = None, sites: Mapping[str, Site],
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Readout scores ``[len(lesions), n_stimuli]`` under each lesion."""
        n = len(self.stimuli)
        out = np.full((len(lesions), n), np.nan)
        groups: dict[tuple, list[int]] = {}
        self.intact()  # the intact pass, run (and kept, if it fits) once
        per_rep = max(self._per_rep, 1) * 4
        for i, les in enumerate(lesions):
            groups.setdefault(self.cuts(les, sites), []).append(i)
        chunk = max(1, int(self.memory // per_rep))
        model = self.runner.subject.model
        # every chunk of replicas keeps its edits (and resample generators) across the evaluation batches
        plans = []
        for cut, members in groups.items():
            for a in range(0, len(members), chunk):
                idx = members[a : a + chunk]
                plans.append((dict(cut), idx, replica_edits([lesions[i] for i in idx], mode, factor=factor,
                                                            reference=reference, seed=self.seed)))
        offset, last = 0, len(self.batches()) - 1
        for b, prep in enumerate(self._each_prepared()):
            for cuts, idx, edits in plans:
                with torch.inference_mode(), Electrodes(model, [sites[s] for s in edits], read=False, edits=edits):
                    states = edits.rng_states()
                    try:
                        part = self.runner.run(prep, cuts, len(idx))
                    except CacheMiss:  # the cache does not fit this pass: the same replicas without it
                        edits.set_rng_states(states)
                        part = self.runner.run(prep, dict(cuts, _nocache=True), len(idx))
                    out[idx, offset : offset + prep.rows] = part
                if progress is not None and b == last:
                    progress(len(idx))
            offset += prep.rows
        return out
