"""Data-parallel recording with ``torch.distributed``: one shard per rank, one virtual recording.

The same ``neuroprobe record`` command runs unchanged under ``torchrun`` (one node
or many) or under any launcher that sets the usual ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` variables (e.g. Slurm ``srun``).
With ``WORLD_SIZE`` above 1, :func:`run`:

1. checks the output collectively (rank 0 decides, every rank raises the same
   one-sentence error: an existing output without ``--resume``/``--overwrite``, a
   resume with another world size, ...);
2. records on each rank its contiguous, batch-aligned span of the battery into
   ``<out>.shards/rank-<i>-of-<n>.h5`` (see :mod:`neuroprobe.recording.shards`),
   resuming that shard from its own committed progress with ``--resume``;
3. waits for every rank, then rank 0 validates the shard set and writes
   ``<out>.h5``, whose datasets are HDF5 virtual datasets over the shards.

Coordination uses the ``gloo`` backend (a few small messages and barriers), so it
works the same on CPUs and GPUs; each rank computes on its own device
(``cuda:<LOCAL_RANK>`` when CUDA is available).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroprobe.errors import NeuroprobeError, RecordingError, option
from neuroprobe.recording import shards as S

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.recording.recorder import Recorder

#: How long a rank waits for the others at a barrier (a resumed job can leave one rank
#: with far more work than the rest).
BARRIER_TIMEOUT = _dt.timedelta(days=7)


@dataclass(frozen=True)
class World:
    """Where this process sits in a data-parallel job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(env: dict[str, str] | None = None) -> World:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them); one process otherwise."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", env.get("RANK", "0") if size > 1 else "0"))
    except ValueError:
        raise NeuroprobeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers.") from None
    if size > 1 and not 0 <= rank < size:
        raise NeuroprobeError(f"RANK={rank} is not in 0..{size - 1} (WORLD_SIZE={size}).")
    if size > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise NeuroprobeError(
            "WORLD_SIZE is above 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun or export them."
        )
    return World(rank=rank, size=max(1, size), local_rank=local)


def local_device(device: str | None, w: World) -> str | None:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` for ``None``/``cuda`` when CUDA is there."""
    if not w.distributed:
        return device
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        dev = f"cuda:{w.local_rank % n}"
        torch.cuda.set_device(dev)
        return dev
    return device


class _Group:
    """The gloo process group of a recording (created here unless the caller made one)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.own = not dist.is_initialized()
        if self.own:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        self.pg = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT) if not self.own else None

    def agree(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank (also a barrier)."""
        box = [value]
        self.dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (also a barrier)."""
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, value, group=self.pg)
        return out

    def close(self) -> None:
        if self.own and self.dist.is_initialized():
            self.dist.destroy_process_group()


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
                virtual = S.is_virtual(f)
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


def record_sharded(recorder: "Recorder", out: str | Path | None, *, resume: bool = False,
                   overwrite: bool = False, w: World | None = None) -> Path:
    """Record this rank's shard, then (rank 0) write the virtual recording; return its path.

    Every rank returns only once ``<out>.h5`` exists (or every rank raises the same error).
    """
    from neuroprobe.recording.recorder import default_output

    w = w or world()
    path = Path(out) if out is not None else default_output(recorder.subject, recorder.battery, recorder.montage)
    group = _Group()
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


def run(recorder: "Recorder", out: str | Path | None = None, *, resume: bool = False,
        overwrite: bool = False) -> Path:
    """Record ``recorder``'s battery: one process, or sharded when launched with ``WORLD_SIZE > 1``."""
    from neuroprobe.recording.recorder import default_output

    w = world()
    if w.distributed:
        return record_sharded(recorder, out, resume=resume, overwrite=overwrite, w=w)
    path = Path(out) if out is not None else default_output(recorder.subject, recorder.battery, recorder.montage)
    check_single_process(path, resume, overwrite)
    return recorder.run(path, resume=resume, overwrite=overwrite)
