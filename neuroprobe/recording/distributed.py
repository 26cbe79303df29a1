"""Data-parallel recording with ``torch.distributed``: one shard per rank, one virtual recording.

The same ``neuroprobe record`` command runs unchanged under ``torchrun`` (one node
or many) or under any launcher that sets the usual ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` variables (e.g. Slurm ``srun``).
:func:`neuroprobe.recording.entry.run` decides between one process and shards; with
``WORLD_SIZE`` above 1 it calls :func:`record_sharded`, which:

1. checks the output collectively (rank 0 decides, every rank raises the same
   one-sentence error: an existing output without ``--resume``/``--overwrite``, a
   resume with another world size, ...);
2. records on each rank its contiguous, batch-aligned span of the battery into
   ``<out>.shards/rank-<i>-of-<n>.h5`` (see :mod:`neuroprobe.recording.shards`),
   resuming that shard from its own committed progress with ``--resume``;
3. waits for every rank, then rank 0 validates the shard set and writes
   ``<out>.h5``, whose datasets are HDF5 virtual datasets over the shards.

Ranks, devices and the gloo collectives are :mod:`neuroprobe.distributed`'s (shared with
lesion sweeps); the recorder itself knows nothing of ranks: it records a ``span`` into a
file with extra root ``attrs``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from neuroprobe.distributed import Group, World, world
from neuroprobe.errors import NeuroprobeError, RecordingError, option
from neuroprobe.recording import shards as S
from neuroprobe.recording.reader import is_virtual

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.recording.recorder import Recorder


def _precheck(path: Path, w: World, resume: bool, overwrite: bool) -> str | None:
    """Rank 0's verdict on the output before anyone writes (an error sentence, or None)."""
    folder = S.shard_dir(path)
    if resume and overwrite:
        return f"give either {option('resume')} or {option('overwrite')}, not both."
    if overwrite:
        return None
    worlds = S.world_sizes_in(folder)
    if not resume:
        if path.exists() or worlds:
            return f"{path} already exists; pass {option('resume')} to continue it or {option('overwrite')} to replace it."
        return None
    if path.exists():
        import h5py

        try:
            with h5py.File(path, "r") as f:
                virtual = is_virtual(f)
                complete = bool(f.attrs.get("complete", False))
        except OSError:
            return f"cannot resume {path}: it is not a readable recording; use {option('overwrite')} to start over."
        if not virtual:
            return (f"cannot resume {path} with {w.size} processes: it was recorded by one process; "
                    f"resume it without torchrun, or use {option('overwrite')}.")
        if complete and worlds == {w.size}:
            return f"{path} is already complete; nothing to resume (use {option('overwrite')} to record again)."
    other = sorted(worlds - {w.size})
    if other:
        return (f"cannot resume {path} with {w.size} processes: its shards in {folder} were recorded by "
                f"{other[0]} processes; rerun with {other[0]} processes (torchrun --nproc-per-node {other[0]}) "
                f"or use {option('overwrite')}.")
    return None


def check_single_process(path: Path, resume: bool, overwrite: bool) -> None:
    """A one-process run must not resume (or silently shadow) a sharded recording."""
    folder = S.shard_dir(path)
    worlds = S.world_sizes_in(folder)
    if not worlds:
        return
    if overwrite:
        S.remove_shards(path)
        return
    if resume:
        n = sorted(worlds)[0]
        raise RecordingError(
            f"cannot resume {path} with one process: it was recorded by {n} processes (shards in {folder}); "
            f"rerun under torchrun --nproc-per-node {n}, or use {option('overwrite')}."
        )
    raise RecordingError(f"{path} already exists as shards in {folder}; pass {option('resume')} to continue it or "
                         f"{option('overwrite')} to replace it.")


def record_sharded(recorder: "Recorder", path: str | Path, *, resume: bool = False,
                   overwrite: bool = False, w: World | None = None) -> Path:
    """Record this rank's shard, then (rank 0) write the virtual recording ``path``; return it.

    Every rank returns only once ``path`` exists (or every rank raises the same error).
    """
    w = w or world()
    path = Path(path)
    group = Group()
    try:
        verdict = group.agree(_precheck(path, w, resume, overwrite) if w.rank == 0 else None)
        if verdict:
            raise RecordingError(verdict)
        if overwrite and w.rank == 0:
            path.unlink(missing_ok=True)
            S.remove_shards(path)
        group.gather(None)  # nobody writes before the old output is gone
        span = S.spans(len(recorder.battery), recorder.batch_size, w.size)[w.rank]
        mine = S.shard_path(path, w.rank, w.size)
        mine.parent.mkdir(parents=True, exist_ok=True)
        error = None
        try:
            _record_shard(recorder, mine, span, w)
        except NeuroprobeError as err:
            error = str(err)
        errors = [e for e in group.gather(error) if e]
        if errors:
            raise RecordingError(errors[0])
        result = None
        if w.rank == 0:
            try:
                S.write_virtual(path, S.check_shards(S.shard_path(path, r, w.size) for r in range(w.size)))
            except NeuroprobeError as err:
                result = str(err)
        result = group.agree(result)
        if result:
            raise RecordingError(result)
        return path
    finally:
        group.close()


def _record_shard(recorder: "Recorder", mine: Path, span: tuple[int, int], w: World) -> None:
    attrs = S.shard_attrs(w.rank, w.size, span)
    resume = mine.exists()
    if resume:
        s = S.read_shard(mine)
        if (s.start, s.stop) != span:
            raise RecordingError(
                f"shard {mine.name} covers stimuli {s.start}..{s.stop}, not {span[0]}..{span[1]}; "
                f"resume with the same battery and batch size, or use --overwrite."
            )
        if s.complete:
            return
    recorder.quiet = recorder.quiet or w.rank != 0
    recorder.run(mine, resume=resume, span=span, attrs=attrs)

