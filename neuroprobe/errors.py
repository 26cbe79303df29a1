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


def is_refused_pickle(err: BaseException) -> bool:
    """Whether ``err`` is torch's ``weights_only`` loader refusing a pickle that would run code."""
    import pickle

    return isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err)


def refused_pickle(where: object) -> NeuroprobeError:
    """The one sentence for a weight file that is a pickle asking to run code (never loaded)."""
    return MissingWeightsError(
        f"{where} holds a pickle that asks to run code when loaded (torch's weights_only loader refused it); "
        f"neuroprobe will not load it — use a safetensors or plain state-dict checkpoint from a source you trust."
    )
