"""Writing output files: whole or not at all, a full disk in one sentence, CSV cells that stay text.

Every file a command writes (tables, figures, the NWB export, the atlas) goes through this
module (the recording writer keeps its own resumable protocol, ``recording/writer.py``):

* :func:`atomic_path` gives a temporary name beside the target (``.<stem>.<pid>.<n>.partial<suffix>``)
  and moves the file into place only when the block that writes it ends without error; on
  any error the temporary file is removed, so a file at its final name is always complete.
  Inside :func:`staged_outputs` the moves wait for the end of the whole block, so the files
  of one command appear together or not at all (``neuroprobe cells`` writes a table, its
  controls and a sidecar; ``neuroprobe figures`` a folder of figures).
* :func:`staged_folder` does the same for a folder of many files (the atlas).
* An error that comes from a full disk (``ENOSPC``/``EDQUOT`` anywhere in the exception's
  chain, or HDF5's text for it) becomes :func:`disk_full`, one sentence; any other
  ``OSError`` while writing becomes "cannot write PATH (reason)".
* A library that cannot survive a full disk half-way through a file (HDF5: the NWB export)
  writes into space claimed up front as the file's own blocks (:func:`claim_space`, given
  back with :func:`release_past_end`); HDF5 objects that still could not be closed are kept
  in :data:`UNCLOSABLE`, and the CLI then ends the process after its message without
  HDF5's exit handler, which would crash on them.
* :func:`write_csv` escapes cells against spreadsheet formula injection as OWASP's
  "CSV Injection" page says: a text cell (or column or index label) that begins with
  ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a single quote ``'`` in
  front.  A cell that begins with ``'`` followed by one of those (or by another ``'``)
  gets one too, so that :func:`read_csv` can take exactly one quote off and give every
  name back unchanged (round trip).  Numbers are never touched (``-0.5`` stays a number).
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from neuroprobe.errors import NeuroprobeError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: First characters that make a spreadsheet read a cell as a formula (OWASP, CSV Injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: After a leading quote, these mean the quote is ours (added by :func:`escape_cell`).
_ESCAPED_NEXT = FORMULA_START + ("'",)

_COUNTER = itertools.count()
#: Files written inside :func:`staged_outputs`, waiting to be moved into place: [(temporary, final)].
_STAGE: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("neuroprobe_staged_outputs", default=None)


# ------------------------------------------------------------------ errors


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or any exception in its ``__cause__``/``__context__`` chain) is a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: str | Path) -> NeuroprobeError:
    """The one sentence for a full disk while writing ``path`` (nothing half-written is left)."""
    return NeuroprobeError(f"the disk is full: {path} could not be written and nothing half-written was left; "
                           f"free some space and rerun.")


def output_error(err: BaseException, path: str | Path) -> BaseException:
    """One sentence for an error while writing ``path``; errors that are not about the file system pass through."""
    if isinstance(err, NeuroprobeError):
        return err
    if is_disk_full(err):
        return disk_full(path)
    if isinstance(err, OSError):
        reason = err.strerror or (str(err).splitlines()[0] if str(err) else type(err).__name__)
        return NeuroprobeError(f"cannot write {path} ({reason}).")
    return err


#: HDF5 files (h5py/pynwb objects) that could not be closed after a write error.  They stay referenced
#: (collecting them crashes HDF5), and HDF5's own exit handler would crash on their dataset ids: the
#: CLI ends a run that added to this list with ``os._exit`` after its one-line message.
UNCLOSABLE: list[Any] = []


@contextmanager
def quiet_close_errors() -> Iterator[None]:
    """Hold back the tracebacks h5py prints when objects collected during a failed write cannot be closed.

    h5py reports them through ``sys.excepthook`` and ``sys.unraisablehook`` ("Exception
    ignored in ...ObjectID.__dealloc__"); a full disk among them is reported once, as the
    one sentence, by the caller.  Other errors are printed as before.
    """
    import sys

    hooks = sys.excepthook, sys.unraisablehook

    def excepthook(kind: Any, value: BaseException, tb: Any) -> None:
        if not is_disk_full(value):
            hooks[0](kind, value, tb)

    def unraisablehook(unraisable: Any) -> None:
        if not is_disk_full(unraisable.exc_value):
            hooks[1](unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = hooks


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged user may still write where ``path`` is (or would be); ``None`` if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _load_libc() -> Any:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        return libc
    except (OSError, AttributeError):  # not Linux/glibc: free-space checks stand in
        return None


#: The C library when it has ``fallocate`` (Linux), else ``None``.
LIBC = _load_libc()
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


def fallocate_keep_size(fd: int, offset: int, length: int) -> int:
    """Allocate ``length`` bytes past ``offset`` without changing the file's size; 0 or an errno."""
    import ctypes

    if LIBC is None:
        return errno.EOPNOTSUPP
    if LIBC.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return 0
    return ctypes.get_errno() or errno.EOPNOTSUPP


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """Free blocks from ``offset`` on, keeping the size (the unused part of a claim)."""
    if LIBC is not None:
        LIBC.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def release_past_end(fd: int) -> None:
    """Give back the blocks claimed past the end of the open file ``fd`` (the unused part of :func:`claim_space`).

    Punching a hole frees them on tmpfs; ext4 ignores holes past the end of a file
    and frees them only on a truncate, so the file is also truncated to its own size.
    """
    size = os.fstat(fd).st_size
    fallocate_punch(fd, size, 1 << 40)
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


def claim_space(fd: int, nbytes: int, path: str | Path) -> None:
    """Make the next ``nbytes`` the open file ``fd`` grows by the file's own blocks already, or stop with "disk full".

    A library that then writes into the file (HDF5) never meets ``ENOSPC`` half-way, and
    no other process can take the space.  Where ``fallocate`` is missing the free space is
    checked instead.  Give the unused part back with :func:`release_past_end`.
    """
    err = fallocate_keep_size(fd, os.fstat(fd).st_size, nbytes)
    if err == 0:
        return
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise disk_full(path)
    require_free(path, nbytes)


def require_free(path: str | Path, nbytes: int) -> None:
    """Refuse (with :func:`disk_full`) before writing ``nbytes`` to ``path`` when the disk cannot hold them."""
    free = free_bytes(path)
    if free is not None and free < nbytes:
        raise NeuroprobeError(f"the disk is full: {path} needs about {nbytes / 2**20:.1f} MB and only "
                              f"{free / 2**20:.1f} MB are free; nothing was written — free some space and rerun.")


# ------------------------------------------------------------------ files


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside ``path`` (hidden, same file system): ``.<stem>.<pid>.<n>.partial<suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.{next(_COUNTER)}.partial{path.suffix}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def make_folder(path: str | Path) -> Path:
    """``mkdir -p`` with a full disk or an unwritable place in one sentence."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, path) from None
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; it takes ``path``'s name only if the block succeeds.

    On any error the temporary file is removed and a full disk or another ``OSError``
    becomes one sentence (:func:`output_error`).  Inside :func:`staged_outputs` the
    file is moved into place when that block ends.
    """
    path = Path(path)
    make_folder(path.parent)
    tmp = temp_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise NeuroprobeError(f"{path} was not written.")
    except BaseException as err:
        _remove(tmp)
        mapped = output_error(err, path)
        if mapped is err:
            raise
        raise mapped from None
    stage = _STAGE.get()
    if stage is not None:
        stage.append((tmp, path))
    else:
        _move(tmp, path)


def _move(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise output_error(err, path) from None


@contextmanager
def staged_outputs() -> Iterator[None]:
    """Files written through :func:`atomic_path` inside the block appear together when it ends, or none do.

    Nested blocks join the outermost one.
    """
    if _STAGE.get() is not None:
        yield
        return
    staged: list[tuple[Path, Path]] = []
    token = _STAGE.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        raise
    finally:
        _STAGE.reset(token)
    for i, (tmp, path) in enumerate(staged):
        try:
            _move(tmp, path)
        except BaseException:
            for t, _ in staged[i + 1:]:
                _remove(t)
            raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (the format comes from ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


@contextmanager
def staged_folder(out: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out``; when the block succeeds its entries move into ``out``.

    Each top-level entry of the staging folder replaces the entry of the same name in
    ``out`` (a whole subfolder when ``replace``, else merged file by file); other files
    in ``out`` are left alone.  On any error the staging folder is removed and ``out`` is
    as it was (removed again if this call created it).  Staging folders left by killed
    processes are removed first.
    """
    out = Path(out)
    created = not out.exists()
    make_folder(out)
    for stale in out.glob(".staging.*.partial"):
        pid = stale.name.split(".")[2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
    stage = out / f".staging.{os.getpid()}.{next(_COUNTER)}.partial"
    try:
        make_folder(stage)
        yield stage
    except BaseException as err:
        _remove(stage)
        if created:  # a folder this call made and left empty goes too
            try:
                out.rmdir()
            except OSError:
                pass
        # the block also reads (a recording, tables): only errors of writing into the stage are about ``out``
        writing = isinstance(err, OSError) and str(getattr(err, "filename", "") or "").startswith(str(stage))
        if is_disk_full(err) or writing:
            raise output_error(err, out) from None
        raise
    trash = out / f".staging.{os.getpid()}.{next(_COUNTER)}.old.partial"
    try:
        for entry in sorted(stage.iterdir(), key=lambda p: p.is_file()):  # folders first, files (index.html) last
            dest = out / entry.name
            if entry.is_dir() and dest.is_dir() and not replace:
                _merge(entry, dest)
                continue
            if dest.is_dir() and not dest.is_symlink():
                trash.mkdir(exist_ok=True)
                os.replace(dest, trash / entry.name)
            os.replace(entry, dest)
    except OSError as err:
        raise output_error(err, out) from None
    finally:
        _remove(stage)
        _remove(trash)


def _merge(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge(entry, target)
        else:
            os.replace(entry, target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ------------------------------------------------------------------ CSV


def escape_cell(value: Any) -> Any:
    """A text cell as it must be written so that no spreadsheet runs it as a formula (see the module docstring)."""
    if isinstance(value, str) and value and (
            value[0] in FORMULA_START or (value[0] == "'" and len(value) > 1 and value[1] in _ESCAPED_NEXT)):
        return "'" + value
    return value


def unescape_cell(value: Any) -> Any:
    """The inverse of :func:`escape_cell`: ``unescape_cell(escape_cell(s)) == s`` for every string."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1] in _ESCAPED_NEXT:
        return value[1:]
    return value


def _map_text(column: "pd.Series", fn: Any) -> "pd.Series":
    """Apply ``fn`` to the text cells of ``column`` (object, string or categorical columns; numbers untouched)."""
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        cats = column.cat.categories
        if cats.dtype == object or pd.api.types.is_string_dtype(cats.dtype):
            return column.cat.rename_categories([fn(c) for c in cats])
        return column
    if column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
        return column.map(fn, na_action="ignore")
    return column


def escape_frame(frame: "pd.DataFrame", *, index: bool = False) -> "pd.DataFrame":
    """A copy of ``frame`` whose text cells, column labels (and index, when written) are escaped."""
    out = frame.copy()
    out.attrs = {}
    for i in range(out.shape[1]):
        out.isetitem(i, _map_text(out.iloc[:, i], escape_cell))
    out.columns = [escape_cell(c) for c in out.columns]
    if index:
        out.index = out.index.map(escape_cell)
        out.index.name = escape_cell(frame.index.name)
    return out


def unescape_frame(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Undo :func:`escape_frame` on a table read back (text cells and column labels)."""
    for i in range(frame.shape[1]):
        frame.isetitem(i, _map_text(frame.iloc[:, i], unescape_cell))
    frame.columns = [unescape_cell(c) for c in frame.columns]
    return frame


def write_csv(frame: "pd.DataFrame", path: str | Path, *, index: bool = False, sep: str | None = None,
              **kwargs: Any) -> Path:
    """Write ``frame`` as CSV (TSV for a ``.tsv`` path) with formula-safe cells, atomically.

    Parameters
    ----------
    frame
        The table.
    path
        The file; written under a temporary name and moved into place when complete.
    index
        Write the index as the first column (escaped like the cells).
    sep
        Field separator (default: tab for ``.tsv``, else comma).
    **kwargs
        Passed to :meth:`pandas.DataFrame.to_csv`.
    """
    import csv

    path = Path(path)
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    safe = escape_frame(frame, index=index)
    if "quoting" not in kwargs and _has_carriage_return(safe, index):
        # pandas quotes a field holding "\n" but not one holding a bare "\r", which readers take for a line
        # break (RFC 4180 wants both quoted): such a table quotes every text field
        kwargs["quoting"] = csv.QUOTE_NONNUMERIC
    with atomic_path(path) as tmp:
        safe.to_csv(tmp, index=index, sep=sep, **kwargs)
    return path


def _has_carriage_return(frame: "pd.DataFrame", index: bool) -> bool:
    """Whether a text cell or label of ``frame`` holds a carriage return."""
    import pandas as pd

    labels = list(frame.columns) + (list(frame.index) if index else [])
    if any(isinstance(x, str) and "\r" in x for x in labels):
        return True
    for i in range(frame.shape[1]):
        column = frame.iloc[:, i]
        if isinstance(column.dtype, pd.CategoricalDtype):
            values = column.cat.categories
        elif column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
            values = column
        else:
            continue
        if any(isinstance(v, str) and "\r" in v for v in values):
            return True
    return False


def read_csv(path: str | Path, **kwargs: Any) -> "pd.DataFrame":
    """Read a CSV (TSV for a ``.tsv`` path) written by :func:`write_csv`, giving the original text back."""
    import pandas as pd

    path = Path(path)
    kwargs.setdefault("sep", "\t" if path.suffix.lower() == ".tsv" else ",")
    return unescape_frame(pd.read_csv(path, **kwargs))
