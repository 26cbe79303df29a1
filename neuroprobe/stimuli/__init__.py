"""Stimulus batteries: load, validate, render."""
from __future__ import annotations

from neuroprobe._lazy import lazy_exports

# names load on first use: importing the package stays cheap (see neuroprobe/_lazy.py)
_EXPORTS = {
    "Battery": "neuroprobe.stimuli.battery",
    "probes_root": "neuroprobe.stimuli.battery",
    "load_battery": "neuroprobe.stimuli.battery:Battery.load",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["Battery", "load_battery", "probes_root"]
