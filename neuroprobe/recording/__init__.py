"""Recording: stream responses to HDF5 (schema, writer, reader, recorder)."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "Recording": "neuroprobe.recording.reader",
    "open_recording": "neuroprobe.recording.reader",
    "Recorder": "neuroprobe.recording.recorder",
    "record": "neuroprobe.recording.entry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Recorder", "Recording", "open_recording", "record"]
