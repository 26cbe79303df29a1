"""Subjects: models with their preprocessing, sites and readouts, behind one registry."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "Batch": "neuroprobe.subjects.base",
    "Site": "neuroprobe.subjects.base",
    "SitePattern": "neuroprobe.subjects.base",
    "Subject": "neuroprobe.subjects.base",
    "REGISTRY": "neuroprobe.subjects.registry",
    "SubjectSpec": "neuroprobe.subjects.registry",
    "default_device": "neuroprobe.subjects.registry",
    "get_spec": "neuroprobe.subjects.registry",
    "load_subject": "neuroprobe.subjects.registry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Batch", "REGISTRY", "Site", "SitePattern", "Subject", "SubjectSpec", "default_device", "get_spec", "load_subject"]
