"""One writer per recording: an advisory lock file beside the output.

``WriterLock(path)`` takes an exclusive ``flock`` on ``<path>.lock`` (created
beside the recording) and writes the holder's pid, host and start time into it.
A second writer — another process, or another ``Recorder`` in the same process —
cannot take the lock and is refused with one sentence naming the holder.  The
lock dies with its process (the kernel drops it, even after ``SIGKILL``), so a
stale lock file never blocks anyone; the file is removed on release.

``flock`` is honoured by every local Linux filesystem and emulated with POSIX
record locks on NFS (Linux >= 2.6.12), so the lock also holds across machines
that share an NFS export.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path

from neuroprobe.errors import RecordingError

try:  # pragma: no cover - every POSIX system has fcntl
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
    fcntl = None  # type: ignore[assignment]


def lock_path(path: str | Path) -> Path:
    """The lock file of a recording: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def holder(path: str | Path) -> str:
    """Who holds the lock of ``path`` (``"process 123 on host x since ..."``), as far as the file says."""
    try:
        info = json.loads(lock_path(path).read_text(encoding="utf-8"))
        return f"process {info['pid']} on host {info['host']} (since {info['since']})"
    except Exception:  # noqa: BLE001 - the holder may not have written its name yet
        return "another process"


class WriterLock:
    """Exclusive advisory lock on a recording path (a context manager).

    Parameters
    ----------
    path
        The recording the lock protects.

    Raises
    ------
    RecordingError
        When another writer holds the lock (the message names it), or the lock
        file cannot be created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = lock_path(self.path)
        self.fd: int | None = None

    def acquire(self) -> "WriterLock":
        if fcntl is None:  # pragma: no cover
            return self
        try:  # the recording's folder (e.g. the default recordings/) may not exist yet
            self.file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecordingError(f"cannot create the folder {self.file.parent} ({err.strerror}).") from None
        for _ in range(20):  # retry when the holder released (and unlinked) between our open and lock
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RecordingError(f"cannot create the lock file {self.file} ({err.strerror}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RecordingError(
                        f"{self.path} is being written by {holder(self.path)}; wait for it to finish or stop it "
                        f"(lock file {self.file.name})."
                    ) from None
                raise RecordingError(f"cannot lock {self.file} ({err.strerror}).") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just unlinked: try the new one
                os.close(fd)
                continue
            info = dict(pid=os.getpid(), host=socket.gethostname(),
                        since=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self.fd = fd
            return self
        raise RecordingError(f"cannot lock {self.file}: it keeps being replaced by another process.")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.file.unlink(missing_ok=True)  # while still holding it: a waiter then retries on a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
