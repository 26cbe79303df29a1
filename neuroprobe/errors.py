"""User-facing errors.

Every error a user can cause (unknown subject, missing weights, malformed battery,
a recording from another subject, a full disk, ...) is raised as a
:class:`NeuroprobeError` whose message is one clear sentence.  The CLI prints that
sentence on stderr and exits non-zero; the library lets it propagate.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

#: How messages name an option: ``api`` (``resume=True``) unless the command line runs (``cli``: ``--resume``).
#: A plain module global, not a context variable: writer threads compose messages too.
_SPELLING = {"style": "api"}


def option(name: str, value: object = True) -> str:
    """An option as the user gives it: ``--resume`` on the command line, ``resume=True`` in Python.

    Parameters
    ----------
    name
        The Python keyword (``allow_incomplete``); its flag has ``-`` for ``_``.
    value
        The value the keyword takes to ask for it.
    """
    if _SPELLING["style"] == "cli":
        return "--" + name.replace("_", "-")
    return f"{name}={value!r}"


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, messages name options as command-line flags (the CLI runs its commands in it)."""
    old = _SPELLING["style"]
    _SPELLING["style"] = "cli"
    try:
        yield
    finally:
        _SPELLING["style"] = old


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
