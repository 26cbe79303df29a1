"""Features are units: an SAE's features as a site of their own.

A **feature site** ``S:sae`` is a :class:`~neuroprobe.subjects.base.Site` with the
module, hook, stream and layout of its source site ``S`` and ``kind="sae"``, whose
``sae`` holds the autoencoder.  The one electrode mechanism
(:class:`~neuroprobe.electrodes.Electrodes`) handles it:

* **read**: when ``S``'s module fires, the canonical activation ``x`` ``[B, T, d_in]``
  is encoded, ``f = sae.encode(x)`` ``[B, T, d_sae]``, and ``f`` is what the site's
  reader sees — so the recorder pools, stores per-token traces and writes it with
  the same schema as any site;
* **edit** (feature lesions): an edit function sees ``f`` like any site's units and
  returns ``f'``; the source activation becomes ``x + (f' - f) @ directions``
  (:func:`edit_source`).  Only the decoder contribution of the changed features
  moves; the SAE's error term ``x - x_hat`` is kept, so an edit that changes nothing
  leaves ``x`` bit for bit, and zeroing feature ``i`` subtracts exactly ``f_i d_i``.

Every lesion mode, random-feature controls and batched, prefix-cached lesion
studies (:mod:`neuroprobe.lesions.staged`) therefore work on features unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.subjects.base import Site, Subject

#: suffix of a feature site's name
SUFFIX = ":sae"


def feature_site(source: Site, sae: Any, name: str | None = None) -> Site:
    """The feature site of ``sae`` reading ``source`` (named ``<source>:sae`` unless ``name``)."""
    if source.sae is not None:
        raise NeuroprobeError(f"site {source.name!r} is already a feature site; an SAE reads a module's own units.")
    name = name or f"{source.name}{SUFFIX}"
    if not name.startswith(source.name + SUFFIX):
        raise NeuroprobeError(f"a feature site's name starts with its source and ':sae' ({source.name}{SUFFIX}...), not {name!r}.")
    return dataclasses.replace(source, name=name, kind="sae", n_heads=None, sae=sae)


def attach(subject: Subject, sae: Any, site: str | None = None, *, name: str | None = None) -> Site:
    """Attach ``sae`` to ``subject`` at ``site``; return the new feature site.

    Parameters
    ----------
    subject
        The subject (its :meth:`~neuroprobe.subjects.base.Subject.sites` then know the
        feature site by name and through the ``sae`` montage).
    sae
        A :class:`~neuroprobe.sae.model.SparseAutoencoder`.
    site
        The source site; default: the SAE's ``hook_name`` (the site it was trained on).
    name
        The feature site's name (default ``<site>:sae``).

    Raises
    ------
    NeuroprobeError
        An unknown site (an SAE whose width does not fit the site is refused at the
        first forward pass, when the width is known).
    """
    site = site or sae.meta.get("hook_name")
    if not site:
        raise NeuroprobeError("the SAE does not say which site it reads (no hook_name in its cfg.json); give the site (DIR@SITE).")
    available = {s.name: s for s in subject.sites("all")}
    if site not in available:
        some = ", ".join(list(available)[:5])
        raise NeuroprobeError(f"the SAE reads site {site!r}, which subject {subject.name!r} does not have (its sites look like "
                              f"{some}...); give the site explicitly (DIR@SITE).")
    fs = feature_site(available[site], sae, name)
    subject.add_feature_site(fs)
    return fs


def edit_source(sae: Any, x: torch.Tensor, f: torch.Tensor, f_new: torch.Tensor) -> torch.Tensor:
    """The source activation after features ``f`` were edited to ``f_new``: ``x + (f_new - f) @ directions``.

    Only features whose value changed contribute, and entries the change does not
    reach keep ``x``'s exact bits (so an edit that changes nothing returns ``x`` itself).
    """
    diff = f_new - f
    changed = diff.reshape(-1, diff.shape[-1]).ne(0).any(0)
    if not bool(changed.any()):
        return x
    idx = torch.nonzero(changed).squeeze(1)
    delta = diff.index_select(-1, idx) @ sae.directions(x).index_select(0, idx)
    return torch.where(delta == 0, x, x + delta)


def check_width(site: Site, x: torch.Tensor) -> None:
    """One sentence when a feature site's SAE does not fit the activation it reads."""
    if x.shape[-1] != site.sae.d_in:
        raise NeuroprobeError(f"the SAE of {site.name} reads {site.sae.d_in} units but site {site.source!r} has "
                              f"{x.shape[-1]}; it was trained on another site or model.")


def attach_recorded(subject: Subject, recording: Any, sites: Any = None) -> list[Site]:
    """Attach the SAEs behind a recording's feature sites to ``subject`` (for lesions of recorded features).

    Each SAE is loaded from the folder the recording names and must have the hash it
    was recorded with.

    Parameters
    ----------
    subject
        The subject to lesion.
    recording
        An open recording (or its path).
    sites
        Only these feature sites (default: every feature site of the recording).

    Raises
    ------
    NeuroprobeError
        When an SAE folder is gone or holds another SAE than the one recorded.
    """
    from neuroprobe.recording.reader import Recording, open_recording
    from neuroprobe.sae.io import load_sae

    if not isinstance(recording, Recording):
        with open_recording(recording) as rec:
            return attach_recorded(subject, rec, sites)
    rec = recording
    have = {s.name for s in subject.feature_sites()}
    out = []
    for row in rec.sites.itertuples(index=False):
        if row.kind != "sae" or (sites is not None and row.site not in set(sites)) or row.site in have:
            continue
        a = rec.site_attrs(row.site)
        path = str(a.get("sae_path", ""))
        if not path:
            raise NeuroprobeError(f"{rec.path}: feature site {row.site!r} does not say where its SAE is.")
        sae = load_sae(path)
        if sae.content_hash() != a.get("sae_hash"):
            raise NeuroprobeError(f"the SAE in {path} is not the one feature site {row.site!r} of {rec.path} was recorded with "
                                  f"(its hash differs); restore that SAE or record again.")
        out.append(attach(subject, sae, str(a["source"]), name=row.site))
    return out
