"""The recording file, version 1: the one place that knows the HDF5 layout.

Layout (see ``recordings/README.md`` for an example)::

    /                          attrs: provenance (PROVENANCE_KEYS), complete, n_done
    /stimuli/<column>          one 1-D dataset per battery column (UTF-8 strings), plus ``index``
    /sites/<site>/responses    float [n_stimuli, n_units], chunked along stimuli
                               attrs: module, direction, kind, stream, layout, call, index, n_heads, pooling
    /sites/<site>/tokens       float [n_tokens(stream), n_units]            (with --tokens)
    /sites/<site>:sae/...      a feature site (record --sae): units are an SAE's features of <site>;
                               extra attrs FEATURE_SITE_ATTRS (source, sae_hash, ...)
    /tokens/<stream>/offsets   int64 [n_stimuli + 1]: stimulus i owns rows offsets[i]:offsets[i+1]
    /tokens/<stream>/token_ids int64 [n_tokens]: the token (or region/patch index) behind each row
    /tokens/<stream>/stimulus  int64 [n_tokens]: row -> stimulus index
    /tokens/<stream>/position  int64 [n_tokens]: row -> position in the stimulus's padded input
                               attrs: n_tokens (committed count)

Per-token traces are ragged and keyed by *stream* (text, image, decoder...) because
sites of different streams have different token counts; every site of a stream
shares its stream's offsets.  Padding is never stored.

Progress: ``n_done`` (root) and ``n_tokens`` (per stream) are written after the
batch's data and the file is flushed, so an interrupted file is valid up to
``n_done`` and ``--resume`` continues from there.
"""
from __future__ import annotations

FORMAT = "neuroprobe-recording"
FORMAT_VERSION = 1

#: Root attributes that say what a recording is (must match to resume).
IDENTITY_KEYS = (
    "subject",
    "checkpoint",
    "revision",
    "init",
    "dtype",
    "battery",
    "battery_hash",
    "montage",
    "pooling",
    "tokens",
    "batch_size",
    "seed",
    "sites_list",
    "saes",
)

#: Identity keys newer than format 1's first files: a file without one has the value "" (nothing of it).
OPTIONAL_IDENTITY_KEYS = ("saes",)

#: Every root attribute written at creation.
PROVENANCE_KEYS = IDENTITY_KEYS + (
    "format",
    "format_version",
    "device",
    "n_stimuli",
    "library_versions",
    "command",
    "created",
)

POOLINGS = ("mean", "max", "first", "last", "concept-token")

STIMULI = "stimuli"
SITES = "sites"
TOKENS = "tokens"
RESPONSES = "responses"
SITE_TOKENS = "tokens"

#: Stimulus columns every reader relies on (``index`` plus the battery's required columns).
STIMULUS_COLUMNS = ("index", "id", "concept", "modality", "form", "split")

SITE_ATTRS = ("module", "direction", "kind", "stream", "layout", "call", "index", "n_heads", "pooling", "n_units")

#: Extra attributes of a feature site (``kind="sae"``: its units are an SAE's features of ``source``'s activation).
FEATURE_SITE_ATTRS = ("source", "sae_hash", "sae_path", "sae_format", "sae_architecture", "sae_d_in", "sae_k")


def feature_site_attrs(site: object) -> dict[str, object]:
    """:data:`FEATURE_SITE_ATTRS` of a feature site (``site.sae`` set), for the writer."""
    sae = site.sae  # type: ignore[attr-defined]
    return {"source": site.source, "sae_hash": sae.content_hash(), "sae_path": str(sae.meta.get("path", "")),  # type: ignore[attr-defined]
            "sae_format": str(sae.meta.get("format", "")), "sae_architecture": sae.architecture,
            "sae_d_in": sae.d_in, "sae_k": int(sae.k or 0)}


def site_path(site: str) -> str:
    """HDF5 group of a site (site names may hold dots and '#', never '/')."""
    if "/" in site:
        raise ValueError(f"site names cannot contain '/': {site!r}")
    return f"/{SITES}/{site}"
