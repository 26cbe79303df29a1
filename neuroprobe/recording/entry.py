"""The one entry of a recording: one process, or one shard per rank under ``torchrun``.

:func:`run` (what ``neuroprobe record`` calls) and :func:`record` (the API) read the job's
world (:func:`neuroprobe.distributed.world`) and either hand the recorder the whole
battery (:meth:`~neuroprobe.recording.recorder.Recorder.run`) or record this rank's shard
and the virtual recording over all of them
(:func:`neuroprobe.recording.distributed.record_sharded`).  Neither the recorder nor the
shards know which was chosen; the modules import in one direction::

    entry -> distributed (sharded) -> shards -> reader
      \\-> recorder -> writer
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroprobe.distributed import world
from neuroprobe.recording import distributed
from neuroprobe.recording.recorder import Recorder, default_output
from neuroprobe.stimuli.battery import Battery

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.recording.reader import Recording
    from neuroprobe.subjects.base import Subject


def run(recorder: Recorder, out: str | Path | None = None, *, resume: bool = False,
        overwrite: bool = False) -> Path:
    """Record ``recorder``'s battery: one process, or sharded when launched with ``WORLD_SIZE > 1``; return the path.

    ``out`` defaults to ``recordings/<subject>_<battery>_<montage>.h5``.
    """
    path = Path(out) if out is not None else default_output(recorder.subject, recorder.battery, recorder.montage)
    w = world()
    if w.distributed:
        return distributed.record_sharded(recorder, path, resume=resume, overwrite=overwrite, w=w)
    distributed.check_single_process(path, resume, overwrite)
    return recorder.run(path, resume=resume, overwrite=overwrite)


def record(
    subject: "Subject",
    battery: Battery | str,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> "Recording":
    """Record ``subject``'s responses to ``battery`` and open the result.

    Parameters
    ----------
    subject
        A loaded subject.
    battery
        A :class:`Battery` or the name/folder of one.
    out
        Output path (default ``recordings/<subject>_<battery>_<montage>.h5``).
    resume, overwrite
        What to do when ``out`` exists.
    **options
        :class:`~neuroprobe.recording.recorder.Recorder` options (montage, pooling, tokens,
        dtype, batch_size, ...).

    Returns
    -------
    Recording
        The finished recording, opened for reading.
    """
    from neuroprobe.recording.reader import open_recording

    if not isinstance(battery, Battery):
        battery = Battery.load(battery)
    path = run(Recorder(subject, battery, **options), out, resume=resume, overwrite=overwrite)
    return open_recording(path)
