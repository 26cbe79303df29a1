"""What every subject is: a model, its preprocessing, its sites and its readouts.

A :class:`Subject` wraps one loaded model.  Per-architecture knowledge lives in
data — :attr:`Subject.site_patterns` (where the units are) and
:attr:`Subject.readouts` (how behaviour is scored) — not in copy-pasted code.

The three pieces the rest of neuroprobe relies on:

* :class:`Site` — a named place in the model that carries units.
* :class:`Batch` — one batch of stimuli turned into model inputs, plus per-stream
  masks that say which positions are real tokens (padding is never pooled or stored).
* :class:`Subject` — ``sites(montage)``, ``encode(stimuli, battery)``, ``forward(batch)``,
  ``readout(stimuli, battery, name)``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import NeuroprobeError

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

#: Montages every subject understands; ``all`` is the union of the others.
MONTAGES = ("mlp", "resid", "attn", "all")

LAYOUTS = ("BTU", "TBU", "BU", "BCHW")


@dataclass(frozen=True)
class Site:
    """A named place in a model that carries units.

    Parameters
    ----------
    name
        Unique within a subject, e.g. ``"encoder.layer.3.mlp"``.
    module
        Dotted path of the module in ``subject.model``.
    direction
        ``"output"`` (forward hook on the module's output) or ``"input"``
        (forward pre-hook on its first positional input).
    kind
        What a unit is here: ``"mlp"`` (post-activation MLP neuron), ``"resid"``
        (residual-stream dimension), ``"attn"`` (a dimension of the concatenated
        head outputs, head = unit // head_dim), ``"conv"`` (a channel), ``"fc"``.
    stream
        Which position stream its tokens belong to (``"text"``, ``"image"``,
        ``"decoder"``...).  Masks in a :class:`Batch` are keyed by stream.
    layout
        ``"BTU"`` batch-first tokens, ``"TBU"`` time-major (XLNet), ``"BU"`` one
        vector per stimulus, ``"BCHW"`` convolution maps (units are channels,
        tokens are the H·W positions).
    call
        For a module that fires more than once per forward pass (XLNet's two
        streams, LXMERT's shared cross-attention): which call this site is.
        ``None`` means the module must fire exactly once.
    index
        Which element of a tuple output (or of the positional inputs) carries units.
    n_heads
        Number of attention heads for ``kind="attn"`` sites.
    sae
        A *feature site* (``kind="sae"``, named ``<source>:sae``): the sparse autoencoder
        (:class:`~neuroprobe.sae.model.SparseAutoencoder`) whose features are this site's
        units, computed from the module's activation at the source site; electrodes read
        the features and turn an edit of them into an edit of the source activation
        (:mod:`neuroprobe.sae.sites`).  ``None`` for a module's own units.
    """

    name: str
    module: str
    direction: str = "output"
    kind: str = "resid"
    stream: str = "text"
    layout: str = "BTU"
    call: int | None = None
    index: int = 0
    n_heads: int | None = None
    sae: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        """The site whose activation a feature site's units are computed from (its own name otherwise)."""
        return self.name.rsplit(":sae", 1)[0] if self.sae is not None else self.name

    def __post_init__(self) -> None:
        if self.direction not in ("output", "input"):
            raise ValueError(f"site {self.name}: direction must be 'output' or 'input', not {self.direction!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"site {self.name}: layout must be one of {LAYOUTS}, not {self.layout!r}")


@dataclass(frozen=True)
class SitePattern:
    """A rule that turns module names into sites (per-architecture data).

    ``glob`` is matched against ``model.named_modules()`` names; ``*`` matches one
    dotted path segment.  ``name`` is an optional
    template for the site name using ``{module}`` and the ``*`` captures
    ``{0}``, ``{1}``...; by default the site is named after the module.
    A module that fires ``calls`` times per forward pass yields one site per call,
    named ``<name>#<call>``; ``stream`` may then list one stream per call
    separated by ``|`` (e.g. ``"text|image"``).
    """

    glob: str
    direction: str = "output"
    kind: str = "resid"
    stream: str = "text"
    layout: str = "BTU"
    calls: int = 1
    index: int = 0
    name: str | None = None
    n_heads: int | None = None


@dataclass
class Batch:
    """One batch of stimuli turned into model inputs.

    Attributes
    ----------
    inputs
        Whatever :meth:`Subject.forward` needs (usually the tokenizer's output).
    masks
        Stream name -> bool tensor ``[B, T]``; ``True`` marks real (unpadded) positions.
    token_ids
        Stream name -> int tensor ``[B, T]`` (token ids; region or patch index for images).
    concept_masks
        Stream name -> bool tensor ``[B, T]`` marking the tokens of the stimulus's
        concept word, used by ``concept-token`` pooling.
    """

    inputs: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    concept_masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor input to ``device`` (masks stay where they are)."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.inputs.items()}
        return Batch(moved, self.masks, self.token_ids, self.concept_masks)


Readout = Callable[["Subject", pd.DataFrame, "Battery"], np.ndarray]


def replica_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a readout function as safe to score many lesions in one call (replicas).

    A readout is replica-safe when, called with its stimuli tiled ``L`` times
    (replica-major: rows ``l*B .. l*B+B-1`` are copy ``l``), every forward pass it
    makes over stimulus rows holds the same number of rows of each copy, copy after
    copy (one pass over all rows it was given, or over the rows a per-row predicate
    selects), any state it does not compute from those rows comes from the intact
    model (e.g. prompts or prototypes cached by ``prepare_readout``), and it returns
    one score per row, in order.  Then ``L`` lesions, each editing its own copy's rows
    (:func:`neuroprobe.lesions.staged.replica_edits`), are scored in one call
    (:mod:`neuroprobe.lesions.replicas`).
    """
    fn.replica_safe = True  # type: ignore[attr-defined]
    return fn


def _compile_glob(glob: str) -> re.Pattern[str]:
    # '*' matches one dotted path segment (a layer number, a module name) and is captured
    parts = [re.escape(p) for p in glob.split("*")]
    return re.compile("^" + "([^.]+)".join(parts) + "$")


class Subject:
    """A loaded model plus its preprocessing, its sites and its readouts.

    Subclasses implement :meth:`encode` and :meth:`forward` and fill
    :attr:`site_patterns` and :attr:`readouts`.  Everything else (site discovery,
    recording, lesions) is shared.

    Attributes
    ----------
    name
        Registry name (``"bert"``, ``"organism"``, ``"hf:..."``).
    model
        The ``torch.nn.Module``; in eval mode.
    device
        Where the model lives.
    init
        ``"pretrained"`` or ``"random"`` (the untrained control).
    checkpoint, revision
        What was loaded (recorded in provenance).
    site_patterns
        Montage name -> list of :class:`SitePattern`.
    block_order
        Chain name -> module globs of the blocks a forward pass runs, in order
        (e.g. ``{"text": ["encoder.layer.*"]}``); chains are independent towers.
        Batched lesions resume a pass at the first lesioned block and reuse what
        runs before it (:mod:`neuroprobe.lesions.staged`); empty means the subject
        cannot be split this way and lesions are evaluated one at a time.
    block_inputs
        Chain -> the chains its blocks read besides their own (e.g.
        ``{"decoder": ("encoder",)}``: every decoder block reads the encoder's output;
        LXMERT's cross layers read both streams).  A lesion in a chain changes every
        chain that reads it, directly or through others, so the batched prefix cache
        (:class:`~neuroprobe.lesions.staged.GenericRunner`) reuses a chain's intact
        blocks only when no lesion reaches a chain it reads.  Default: none (chains
        are independent towers).
    readouts
        Readout name -> ``fn(subject, stimuli, battery) -> scores`` (one float per
        stimulus; higher means the subject knows the stimulus's concept better).
    """

    site_patterns: dict[str, list[SitePattern]] = {}
    block_order: dict[str, list[str]] = {}
    block_inputs: dict[str, tuple[str, ...]] = {}
    readouts: dict[str, Readout] = {}
    #: readout name -> ``fn(subject, stimuli, battery) -> torch.Tensor``: the same score as
    #: :attr:`readouts` but as a tensor that keeps its graph (attribution needs its gradient)
    tensor_readouts: dict[str, Callable[..., torch.Tensor]] = {}
    default_readout: str | None = None
    modalities: tuple[str, ...] = ("text",)

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        device: torch.device | str = "cpu",
        init: str = "pretrained",
        checkpoint: str = "",
        revision: str = "",
        seed: int = 0,
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.device = torch.device(device)
        self.init = init
        self.checkpoint = checkpoint
        self.revision = revision
        self.seed = seed

    # ------------------------------------------------------------------ sites
    def sites(self, montage: str | Sequence[str] = "mlp") -> list[Site]:
        """Resolve a montage into sites, in model order.

        Parameters
        ----------
        montage
            ``"mlp"``, ``"resid"``, ``"attn"``, ``"all"``, a comma-separated list of
            those, or explicit glob patterns over site or module names
            (e.g. ``"encoder.layer.1*"``).  A list is the union.

        Returns
        -------
        list of Site
            Unique sites ordered by module order in the model.
        """
        items = [montage] if isinstance(montage, str) else list(montage)
        names: list[str] = []
        for item in items:
            names.extend(p.strip() for p in item.split(",") if p.strip())
        available = self._all_sites()
        features = self.feature_sites()
        chosen: dict[str, Site] = {}
        for item in names:
            if item == "sae":  # every attached SAE's feature site
                if not features:
                    raise NeuroprobeError(f"montage 'sae' selects the feature sites of attached SAEs, and subject "
                                          f"{self.name!r} has none; attach one (record --sae DIR).")
                for site in features:
                    chosen.setdefault(site.name, site)
                continue
            if item == "all":
                keys = [k for k in self.site_patterns]
            elif item in self.site_patterns:
                keys = [item]
            else:
                keys = []
            if keys:
                for key in keys:
                    for site in available[key]:
                        chosen.setdefault(site.name, site)
                continue
            # explicit pattern over site names (and module names) of every montage
            matched = False
            for sites in available.values():
                for site in sites:
                    if fnmatch.fnmatchcase(site.name, item) or fnmatch.fnmatchcase(site.module, item):
                        chosen.setdefault(site.name, site)
                        matched = True
            for site in features:  # feature sites match by their own name only
                if fnmatch.fnmatchcase(site.name, item):
                    chosen.setdefault(site.name, site)
                    matched = True
            if not matched:
                raise NeuroprobeError(
                    f"montage {item!r} matches no site of subject {self.name!r}; "
                    f"use one of {', '.join(sorted(self.site_patterns) + ['all'])} or a glob over "
                    f"the names listed by `neuroprobe subjects {self.name} --sites all`."
                )
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        return sorted(chosen.values(), key=lambda s: (order.get(s.module, 0), s.call or 0, s.name))

    def feature_sites(self) -> list[Site]:
        """Feature sites of the SAEs attached to this subject (:func:`neuroprobe.sae.sites.attach`), in attach order."""
        return list(getattr(self, "_feature_sites", {}).values())

    def add_feature_site(self, site: Site) -> None:
        """Register a feature site (``site.sae`` set); :func:`neuroprobe.sae.sites.attach` makes one."""
        if site.sae is None:
            raise ValueError(f"site {site.name} has no SAE; only feature sites are added this way")
        sites = getattr(self, "_feature_sites", None)
        if sites is None:
            sites = self._feature_sites = {}
        if site.name in sites or any(s.name == site.name for group in self._all_sites().values() for s in group):
            raise NeuroprobeError(f"subject {self.name!r} already has a site {site.name!r}; name the second SAE's site differently.")
        sites[site.name] = site

    def _all_sites(self) -> dict[str, list[Site]]:
        cached = getattr(self, "_site_cache", None)
        if cached is not None:
            return cached
        modules = [n for n, _ in self.model.named_modules() if n]
        out: dict[str, list[Site]] = {}
        for montage, patterns in self.site_patterns.items():
            sites: list[Site] = []
            for pat in patterns:
                rx = _compile_glob(pat.glob)
                for mod in modules:
                    m = rx.match(mod)
                    if not m:
                        continue
                    base = (pat.name or "{module}").format(*m.groups(), module=mod)
                    streams = pat.stream.split("|")
                    for call in range(pat.calls):
                        name = base if pat.calls == 1 else f"{base}#{call}"
                        sites.append(
                            Site(
                                name=name,
                                module=mod,
                                direction=pat.direction,
                                kind=pat.kind,
                                stream=streams[min(call, len(streams) - 1)],
                                layout=pat.layout,
                                call=None if pat.calls == 1 else call,
                                index=pat.index,
                                n_heads=pat.n_heads,
                            )
                        )
            out[montage] = sites
        self._site_cache = out
        return out

    # ------------------------------------------------------- subclass contract
    def encode(self, stimuli: pd.DataFrame, battery: "Battery") -> Batch:
        """Turn one batch of stimuli (rows of ``battery.table``) into a :class:`Batch`."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> Any:
        """Run the model on an encoded batch (gradient mode is the caller's)."""
        raise NotImplementedError

    def check_battery(self, battery: "Battery") -> None:
        """Raise a :class:`NeuroprobeError` if this subject cannot take the battery's modalities."""
        have = set(battery.table["modality"].unique())
        missing = have - set(self.modalities)
        if missing:
            raise NeuroprobeError(
                f"subject {self.name!r} takes {', '.join(self.modalities)} stimuli but battery "
                f"{battery.name!r} has {', '.join(sorted(missing))} stimuli; choose a matching --probe."
            )

    # --------------------------------------------------------------- readouts
    def readout(
        self,
        stimuli: pd.DataFrame,
        battery: "Battery",
        name: str | None = None,
        *,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Score how well the subject knows each stimulus's concept.

        Parameters
        ----------
        stimuli
            Rows of ``battery.table``.
        battery
            The battery they come from (for concept prompts, cloze targets...).
        name
            Readout name; defaults to :attr:`default_readout`.
        batch_size
            Stimuli per forward pass.

        Returns
        -------
        numpy.ndarray
            One float per stimulus, higher = better known.
        """
        name = name or self.default_readout
        if name not in self.readouts:
            raise NeuroprobeError(
                f"subject {self.name!r} has no readout {name!r}; it has {', '.join(self.readouts) or 'none'}."
            )
        fn = self.readouts[name]
        parts = []
        with torch.inference_mode():
            for start in range(0, len(stimuli), batch_size):
                parts.append(np.asarray(fn(self, stimuli.iloc[start : start + batch_size], battery), dtype=np.float64))
        return np.concatenate(parts) if parts else np.zeros(0)

    def readout_tensor(self, stimuli: pd.DataFrame, battery: "Battery", name: str | None = None) -> torch.Tensor:
        """The readout's scores as a differentiable tensor (one per stimulus, in order).

        The same numbers as :meth:`readout` in one forward pass of all ``stimuli``; gradient
        mode is the caller's (integrated gradients run it under ``torch.enable_grad``).

        Raises
        ------
        NeuroprobeError
            When the readout has no differentiable form for this subject.
        """
        name = name or self.default_readout
        if name not in self.readouts:
            raise NeuroprobeError(
                f"subject {self.name!r} has no readout {name!r}; it has {', '.join(self.readouts) or 'none'}."
            )
        fn = self.tensor_readouts.get(name)
        if fn is None:
            have = ", ".join(self.tensor_readouts) or "none"
            raise NeuroprobeError(
                f"readout {name!r} of subject {self.name!r} has no differentiable form (those with one: {have})."
            )
        return fn(self, stimuli, battery)

    # ------------------------------------------------------------------ misc
    @property
    def n_parameters(self) -> int:
        """Number of parameters of the loaded model."""
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        return f"<Subject {self.name} ({self.checkpoint or 'custom'}, init={self.init}, {self.n_parameters:,} params, {self.device})>"


def tokens_in_spans(offsets: np.ndarray, spans: list[list[tuple[int, int]]]) -> np.ndarray:
    """``[B, T]`` mask of the tokens (character ``offsets [B, T, 2]``) that overlap any of stimulus i's ``spans[i]``.

    Special and padding tokens (empty offsets) are never marked.
    """
    mask = np.zeros(offsets.shape[:2], dtype=bool)
    start, end = offsets[..., 0], offsets[..., 1]
    real = end > start
    for i, row in enumerate(spans):
        for a, b in row:
            mask[i] |= (start[i] < b) & (end[i] > a) & real[i]
    return mask


def single_modality(stimuli: pd.DataFrame, subject: str) -> str:
    """The one modality of a batch, for subjects that encode one modality per batch (CLIP towers).

    Raises
    ------
    NeuroprobeError
        When the batch mixes modalities.
    """
    kinds = set(stimuli["modality"])
    if len(kinds) != 1:
        raise NeuroprobeError(
            f"subject {subject!r} encodes one modality per batch but got {', '.join(sorted(kinds))}; "
            f"group the stimuli by modality (the Recorder does this for CLIP)."
        )
    return kinds.pop()


def encode_dual_encoder(
    stimuli: pd.DataFrame,
    battery: Any,
    subject: str,
    tokenize: Callable[..., Any],
    preprocess: Callable[[list], torch.Tensor],
    image_streams: dict[str, int],
) -> Batch:
    """Encode a one-modality batch for a CLIP-style dual encoder.

    Parameters
    ----------
    tokenize
        ``tokenize(texts, concepts, battery) -> (encoding, concept_mask)``.
    preprocess
        PIL images -> pixel tensor.
    image_streams
        Image stream name -> number of positions it carries (one per grid for a ResNet).
    """
    kind = single_modality(stimuli, subject)
    batch = Batch(inputs={})
    n = len(stimuli)
    if kind in ("text", "pair"):
        enc, cmask = tokenize(stimuli["text"].astype(str).tolist(), stimuli["concept"].tolist(), battery)
        batch.inputs.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        batch.masks["text"] = enc["attention_mask"].bool()
        batch.token_ids["text"] = enc["input_ids"]
        batch.concept_masks["text"] = cmask
    if kind in ("image", "pair"):
        images = [battery.load_image(row) for _, row in stimuli.iterrows()]
        batch.inputs["pixel_values"] = preprocess(images)
        for stream, positions in image_streams.items():
            batch.masks[stream] = torch.ones(n, positions, dtype=torch.bool)
            batch.token_ids[stream] = torch.arange(positions).expand(n, positions).clone()
    return batch


def iter_batches(table: pd.DataFrame, batch_size: int, start: int = 0) -> Iterable[tuple[int, pd.DataFrame]]:
    """Yield ``(offset, rows)`` batches of a stimulus table from ``start`` on."""
    for offset in range(start, len(table), batch_size):
        yield offset, table.iloc[offset : offset + batch_size]


def site_globs(sites: Sequence[Site]) -> list[str]:
    """Short globs covering ``sites`` (layer numbers become ``*``), in order: ``vision.0.mlp`` -> ``vision.*.mlp``."""
    out: dict[str, None] = {}
    for site in sites:
        out.setdefault(".".join("*" if part.split("#")[0].isdigit() else part for part in site.name.split(".")), None)
    return list(out)


def suggest_sites(fired: Sequence[Site], montage: str) -> str:
    """A clause for the "never fired" message: which ``--sites`` this battery does reach."""
    if not fired:
        return (f"no site of montage {montage!r} fires for these stimuli; choose a battery whose modalities the "
                f"recorded sites take (--probe)")
    globs = site_globs(fired)
    return (f"the sites this battery reaches are recorded with --sites '{','.join(globs)}' "
            f"({len(fired)} sites), or choose a battery with the other modality (--probe)")
