"""One writer per recording: an advisory lock file beside the output, and a lock on the file itself.

``WriterLock(path)`` takes an exclusive ``flock`` on ``<real path>.lock``, where the
real path is ``path`` with every symbolic link resolved (of the file and of its
folders), so the same file reached through a symlink has the same lock.  It writes
the holder's pid, host and start time into it.  A second writer — another process,
or another ``Recorder`` in the same process — cannot take the lock and is refused
with one sentence naming the holder.  The lock dies with its process (the kernel
drops it, even after ``SIGKILL``), so a stale lock file never blocks anyone; the
file is removed on release.

A hard link is another name of the same file with no symlink to resolve, so once
the recording file exists the writer also *claims the file itself*
(:meth:`WriterLock.claim`): an open-file-description lock (``F_OFD_SETLK``, Linux)
on one byte far past any data (offset 2**62) of the recording.  It belongs to the
inode, whatever name leads to it; it is independent of HDF5's own ``flock`` (which
live SWMR readers take), so readers are not affected.  The claimer's device and inode
go into its lock file, so a writer refused through a hard link is told who holds it
when the holder's lock file lies in the same folder.

``flock`` is honoured by every local Linux filesystem and emulated with POSIX
record locks on NFS (Linux >= 2.6.12), so the name lock also holds across machines
that share an NFS export.  The claim is skipped on network file systems (there
``flock`` is emulated with the same record locks and HDF5's own lock would collide
with it) and where ``F_OFD_SETLK`` does not exist.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import struct
from pathlib import Path

from neuroprobe.errors import RecordingError

try:  # pragma: no cover - every POSIX system has fcntl
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
    fcntl = None  # type: ignore[assignment]

#: The byte of a recording file that its writer locks (never data: files stay far smaller).
CLAIM_OFFSET = 1 << 62

#: File system types where the claim is not taken (``flock`` is emulated with record locks there).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "afs", "9p", "fuse")


def real_path(path: str | Path) -> Path:
    """``path`` absolute, with every symbolic link resolved (the file's one name for locking)."""
    return Path(os.path.realpath(path))


def lock_path(path: str | Path) -> Path:
    """The lock file of a recording: ``<real path>.lock`` beside the file the path leads to."""
    path = real_path(path)
    return path.with_name(path.name + ".lock")


def _describe(info: dict) -> str:
    return f"process {info['pid']} on host {info['host']} (since {info['since']})"


def holder(path: str | Path) -> str:
    """Who holds the lock of ``path`` (``"process 123 on host x since ..."``), as far as the file says."""
    try:
        return _describe(json.loads(lock_path(path).read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - the holder may not have written its name yet
        return "another process"


def _holder_of_file(st: os.stat_result, folders: list[Path]) -> tuple[str, str] | None:
    """(recording name, holder) from a lock file in ``folders`` that claims the file ``st`` describes."""
    for folder in dict.fromkeys(folders):
        try:
            candidates = sorted(folder.glob("*.lock"))
        except OSError:
            continue
        for lock in candidates:
            try:
                info = json.loads(lock.read_text(encoding="utf-8"))
                if (info.get("dev"), info.get("ino")) == (st.st_dev, st.st_ino):
                    return lock.name[: -len(".lock")], _describe(info)
            except Exception:  # noqa: BLE001 - not one of ours, or being written
                continue
    return None


def _on_network_fs(path: Path) -> bool:
    """Whether ``path`` lies on a network (or FUSE) file system, from ``/proc/self/mountinfo``."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    best, kind = "", ""
    target = str(path)
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or not rest:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, rest[0]
    return kind.split(".")[0] in NETWORK_FS


class WriterLock:
    """Exclusive advisory lock on a recording (a context manager).

    Parameters
    ----------
    path
        The recording the lock protects (symbolic links are resolved).

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
        self.claim_fd: int | None = None
        self.info: dict = {}

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
                        f"(lock file {self.file})."
                    ) from None
                raise RecordingError(f"cannot lock {self.file} ({err.strerror}).") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just unlinked: try the new one
                os.close(fd)
                continue
            self.fd = fd
            self.info = dict(pid=os.getpid(), host=socket.gethostname(),
                             since=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            self._write_info()
            return self
        raise RecordingError(f"cannot lock {self.file}: it keeps being replaced by another process.")

    def _write_info(self) -> None:
        if self.fd is None:
            return
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def claim(self, recording: str | Path) -> None:
        """Lock the recording file itself (its inode), so no other name of it (a hard link) gets a second writer.

        Call it, holding the lock, before anything reads or writes the file, and again
        for each new file (a fresh recording's temporary file); it lasts until
        :meth:`release`.  Skipped where the platform or file system cannot do it.

        Raises
        ------
        RecordingError
            Another writer has claimed the file (through any of its names).
        """
        if fcntl is None or not hasattr(fcntl, "F_OFD_SETLK") or self.fd is None:
            return
        recording = Path(recording)
        if _on_network_fs(real_path(recording)):
            return
        try:
            fd = os.open(recording, os.O_RDWR)
        except OSError as err:
            raise RecordingError(f"cannot open {recording} for writing ({err.strerror}).") from None
        request = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, CLAIM_OFFSET, 1, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        except OSError as err:
            st = os.fstat(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                return  # this file system has no such locks: the name lock is all there is
            found = _holder_of_file(st, [real_path(recording).parent, self.path.parent])
            who = f"{found[1]} as {found[0]} (another name of the same file)" if found else \
                "another process under another name (a hard link to the same file)"
            raise RecordingError(f"{self.path} is being written by {who}; wait for it to finish or stop it.") from None
        if self.claim_fd is not None:
            os.close(self.claim_fd)
        self.claim_fd = fd
        st = os.fstat(fd)
        self.info.update(dev=st.st_dev, ino=st.st_ino)
        self._write_info()

    def release(self) -> None:
        if self.claim_fd is not None:
            os.close(self.claim_fd)
            self.claim_fd = None
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
