"""Stimulus batteries: load, validate, render."""
from neuroprobe.stimuli.battery import Battery, probes_root

load_battery = Battery.load

__all__ = ["Battery", "load_battery", "probes_root"]
