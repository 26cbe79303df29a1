"""User-facing errors.

Every error a user can cause (unknown subject, missing weights, malformed battery,
a recording from another subject, a full disk, ...) is raised as a
:class:`NeuroprobeError` whose message is one clear sentence.  The CLI prints that
sentence on stderr and exits non-zero; the library lets it propagate.
"""
from __future__ import annotations


class NeuroprobeError(Exception):
    """An error caused by the user's input, with a one-sentence message."""


class MissingWeightsError(NeuroprobeError):
    """Weights for a subject (or a detector/tokenizer) are not available offline."""


class BatteryError(NeuroprobeError):
    """A probe battery is malformed; the message names the file and the row."""


class RecordingError(NeuroprobeError):
    """A recording cannot be written, resumed or read as asked."""
