"""How many units a site carries, read from the model's modules without running it.

``neuroprobe sites`` lists a montage before anything is recorded, often of a model built
on the meta device (no weights, no memory), where a forward pass cannot run
(transformers' attention masks read tensor values).  The width of the tensor a site
hooks is read from the shapes of the modules instead:

* a module with a known width (``Linear``, transformers' ``Conv1D``, a convolution, a
  normalisation, an embedding) gives its output or input size, by the site's direction;
* a block (a module with children) gives the output width of its last module that has
  one, in registration order (a transformer block's final norm or down-projection, a
  bottleneck's last batch norm); its input width is that of its first such module;
* a pooling layer keeps the channels of the module registered just before it in its
  parent (a ResNet stem's convolutions, then its pool).

:func:`site_units` returns ``None`` where these rules find nothing (an ``nn.Identity`` used
as a tap point says nothing about its input).  When the model has real weights,
:func:`measured_units` runs one stimulus per modality and reads the widths off the
electrodes for the sites the shapes leave open.  The tests check the widths against
recordings (``tests/test_subject_fidelity.py``); by hand (2026-12-07) every ``all`` site of
the registered subjects at their published sizes (DALL·E as Mini, PPLM as GPT-2 small)
matched one forward pass, except the organism's activation and ``nn.Identity`` taps, which
are measured.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from neuroprobe.subjects.base import Site

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _own_width(module: nn.Module, direction: str) -> int | None:
    """The width of a module that has one of its own (``None`` for containers and parameter-free modules)."""
    if isinstance(module, nn.Linear):
        return module.out_features if direction == "output" else module.in_features
    if isinstance(module, _CONV):
        return module.out_channels if direction == "output" else module.in_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if direction == "output" else None
    if isinstance(module, _BATCHNORM):
        return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    shape = getattr(module, "normalized_shape", None)  # nn.LayerNorm, nn.RMSNorm and look-alikes
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        # transformers' Conv1D (GPT-2): weight [in, out]
        return int(weight.shape[1] if direction == "output" else weight.shape[0])
    if type(module).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return int(weight.shape[0])  # RMS norms of other libraries (T5LayerNorm, LlamaRMSNorm ...)
    return None


def module_width(module: nn.Module, direction: str) -> int | None:
    """The width of ``module``'s output (``direction="output"``) or first input, by the rules above."""
    own = _own_width(module, direction)
    if own is not None:
        return own
    inner = [m for m in module.modules() if m is not module]
    for m in (reversed(inner) if direction == "output" else inner):
        own = _own_width(m, direction)
        if own is not None:
            return own
    return None


def site_units(model: nn.Module, site: Site) -> int | None:
    """Units (channels, features) of the tensor ``site`` hooks, or ``None`` when the shapes do not tell."""
    try:
        module = model.get_submodule(site.module)
    except AttributeError:
        return None
    width = module_width(module, site.direction)
    if width is not None or not site.module or not isinstance(module, _POOL):
        return width
    # a pooling layer: the channels of the module before it in its parent
    parent_name, _, child = site.module.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = [name for name, _ in parent.named_children()]
    for name in reversed(names[: names.index(child)] if child in names else []):
        width = module_width(getattr(parent, name), "output")
        if width is not None:
            return width
    return None


def units_of(model: nn.Module, sites: Sequence[Site]) -> list[int | None]:
    """:func:`site_units` of each site, in order."""
    return [site_units(model, s) for s in sites]


def measured_units(subject, sites: Sequence[Site], battery) -> dict[str, int]:
    """Site name -> units, read off the electrodes while the subject sees one stimulus per modality.

    Only for a model with real weights (a meta-device model cannot run); a modality whose
    stimulus cannot be encoded or run here (e.g. images without the region detector) is
    skipped, so its sites are missing from the result.
    """
    from neuroprobe.electrodes import Electrodes

    widths: dict[str, int] = {}
    if any(p.is_meta for p in subject.model.parameters()):
        return widths
    table = battery.table
    for modality in subject.modalities:
        rows = table[table["modality"] == modality].head(1)
        if rows.empty:
            continue
        try:
            batch = subject.encode(rows, battery)
            with Electrodes(subject.model, sites,
                            on_read=lambda site, x: widths.setdefault(site.name, int(x.shape[-1]))):
                with torch.inference_mode():
                    subject.forward(batch)
        except Exception:  # noqa: BLE001 - this modality cannot run here; its widths come from the shapes
            continue
    return widths
