"""Where this process sits in a ``torchrun`` job, its device, and the few collectives neuroprobe uses.

One module for everything that runs on several processes: data-parallel recording
(:mod:`neuroprobe.recording.distributed`: one shard per rank) and lesion sweeps
(:mod:`neuroprobe.lesions.sweep`: each rank evaluates its share of the lesions).  It knows
nothing of either.

A job is launched by ``torchrun`` (one node or many) or by any launcher that sets the
usual ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
variables (e.g. Slurm ``srun``).  Coordination uses the ``gloo`` backend (a few small
pickled messages), so it works the same on CPUs and GPUs; each rank computes on its own
device (``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

from neuroprobe.errors import NeuroprobeError

#: How long a rank waits for the others at a collective (a resumed recording can leave one
#: rank with far more work than the rest).
BARRIER_TIMEOUT = _dt.timedelta(days=7)


@dataclass(frozen=True)
class World:
    """Where this process sits in a data-parallel job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one process that writes results and prints them."""
        return self.rank == 0


def world(env: dict[str, str] | None = None) -> World:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (as torchrun sets them); one process otherwise.

    Raises
    ------
    NeuroprobeError
        When the variables are not integers, ``RANK`` is out of range, or ``WORLD_SIZE``
        is above 1 without ``MASTER_ADDR``/``MASTER_PORT``.
    """
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
    """The device of this rank: ``cuda:<LOCAL_RANK>`` for ``None``/``cuda`` when CUDA is there, else ``device``."""
    if not w.distributed:
        return device
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        dev = f"cuda:{w.local_rank % n}"
        torch.cuda.set_device(dev)
        return dev
    return device


def share(n: int, w: World) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items: balanced (sizes differ by at most 1), in rank order."""
    return w.rank * n // w.size, (w.rank + 1) * n // w.size


class Group:
    """The gloo process group of a job (initialised here unless the caller already did).

    Use as a context manager, or call :meth:`close`; a group this object initialised is
    destroyed on close.
    """

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
        """Every rank's ``value``, in rank order, on every rank (also a barrier)."""
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, value, group=self.pg)
        return out

    def close(self) -> None:
        """Destroy the process group if this object initialised it."""
        if self.own and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
