"""The recording file, version 1: the one place that knows the HDF5 layout.

Layout (see ``recordings/README.md`` for an example)::

    /                          attrs: provenance (PROVENANCE_KEYS), complete, n_done
    /stimuli/<column>          one 1-D dataset per battery column (UTF-8 strings), plus ``index``
    /sites/<site>/responses    float [n_stimuli, n_units], chunked along stimuli
                               attrs: module, direction, kind, stream, layout, call, index, n_heads, pooling
    /sites/<site>/tokens       float [n_tokens(stream), n_units]            (with --tokens)
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
)

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


def site_path(site: str) -> str:
    """HDF5 group of a site (site names may hold dots and '#', never '/')."""
    if "/" in site:
        raise ValueError(f"site names cannot contain '/': {site!r}")
    return f"/{SITES}/{site}"
