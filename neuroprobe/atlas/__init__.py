"""A browsable atlas of a recording: index, a page per concept, a page per unit; static files that open from disk.

``neuroprobe atlas REC.h5 [--cells cells.csv] [--lesions forgetting.csv] --out atlas/``
(:func:`build_atlas`); ``--serve`` serves it on 127.0.0.1 and writes the pages of
other units when they are first asked for (:func:`serve`).
"""
from neuroprobe.atlas.build import Atlas, AtlasSummary, build_atlas
from neuroprobe.atlas.serve import serve

__all__ = ["Atlas", "AtlasSummary", "build_atlas", "serve"]
