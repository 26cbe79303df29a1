"""Share a recording in other formats: ``neuroprobe export REC.h5 --to nwb`` (:func:`export_nwb`)."""
from neuroprobe.export.nwb import export_nwb, inspect_nwb

__all__ = ["export_nwb", "inspect_nwb"]
