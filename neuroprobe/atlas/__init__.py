"""A browsable atlas of a recording: index, a page per concept, a page per unit; static files that open from disk.

``neuroprobe atlas REC.h5 [--cells cells.csv] [--lesions forgetting.csv] --out atlas/``
(:func:`build_atlas`); ``--serve`` serves it on 127.0.0.1 and writes the pages of
other units when they are first asked for (:func:`serve`).
"""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "Atlas": "neuroprobe.atlas.build",
    "AtlasSummary": "neuroprobe.atlas.build",
    "build_atlas": "neuroprobe.atlas.build",
    "serve": "neuroprobe.atlas.serve",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Atlas", "AtlasSummary", "build_atlas", "serve"]
