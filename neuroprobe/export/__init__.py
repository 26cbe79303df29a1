"""Share a recording in other formats: ``neuroprobe export REC.h5 --to nwb`` (:func:`export_nwb`)."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "export_nwb": "neuroprobe.export.nwb",
    "inspect_nwb": "neuroprobe.export.nwb",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["export_nwb", "inspect_nwb"]
