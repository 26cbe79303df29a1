"""Shards and the virtual recording: one recording stored as several files.

A data-parallel recording (``torchrun ... neuroprobe record``, see
:mod:`neuroprobe.recording.distributed`) writes one **shard** per rank::

    <out>.shards/rank-<i>-of-<n>.h5     a recording file of the ordinary schema

Every shard allocates the whole battery (``/stimuli`` and every ``responses`` array
have ``n_stimuli`` rows; chunks never written take no space) but records only its
**span**, the contiguous, batch-aligned stimuli ``[shard_start, shard_stop)``; its
batches are cut at the same stimulus boundaries as a one-process recording.  Its
per-token rows start at 0 and its ``offsets`` are local to the shard; the
``stimulus`` column of its token table is the global stimulus index.  Extra root
attributes: ``shard_rank``, ``shard_world_size``, ``shard_start``, ``shard_stop``;
``n_done`` is the global stimulus index the shard is committed up to.

When every shard is complete, rank 0 writes ``<out>.h5``: the **virtual
recording**.  Its big datasets are HDF5 virtual datasets that map, without a copy,

* ``sites/<site>/responses`` rows ``[start, stop)`` onto the same rows of each shard;
* ``sites/<site>/tokens`` and ``tokens/<stream>/{token_ids,stimulus,position}``
  onto the shards' token rows, concatenated in rank order;

and its small datasets are real: ``/stimuli`` (copied) and ``tokens/<stream>/offsets``,
which are made **global** here (each shard's local offsets plus the tokens of the
shards before it), since a plain concatenation of local offsets would be wrong.
Source files are stored relative to the virtual file, so the recording moves with
its ``.shards`` folder.  Root attributes: the shards' provenance plus ``virtual``
(True), ``world_size`` and ``shards`` (JSON: file, rank, start, stop, device,
n_tokens per stream).  :func:`merge` materialises it into one self-contained file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
from tqdm.auto import tqdm

from neuroprobe.errors import RecordingError
from neuroprobe.recording import schema
from neuroprobe.recording.reader import is_virtual, listed_shards, open_h5
from neuroprobe.recording.reader import raw_attr as _attr

#: Root attributes a shard carries beyond the ordinary provenance.
SHARD_KEYS = ("shard_rank", "shard_world_size", "shard_start", "shard_stop")

_NAME = re.compile(r"^rank-(\d+)-of-(\d+)\.h5$")

#: Bytes of one block copied by :func:`merge` (memory stays flat whatever the recording's size).
MERGE_BLOCK_BYTES = 64 << 20


# ------------------------------------------------------------------ layout


def shard_dir(out: str | Path) -> Path:
    """The folder of ``out``'s shards: ``x.h5`` -> ``x.shards``."""
    out = Path(out)
    return out.with_suffix(".shards") if out.suffix == ".h5" else out.with_name(out.name + ".shards")


def shard_name(rank: int, world_size: int) -> str:
    """``rank-<i>-of-<n>.h5``."""
    return f"rank-{rank}-of-{world_size}.h5"


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its shard of ``out``."""
    return shard_dir(out) / shard_name(rank, world_size)


def spans(n_stimuli: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous, batch-aligned ``[start, stop)`` stimulus spans, one per rank.

    Whole batches are dealt out as evenly as possible (ranks differ by at most one
    batch), so every batch boundary is the one a one-process recording cuts.
    """
    n_batches = -(-n_stimuli // batch_size)
    out = []
    for r in range(world_size):
        b0, b1 = r * n_batches // world_size, (r + 1) * n_batches // world_size
        out.append((min(b0 * batch_size, n_stimuli), min(b1 * batch_size, n_stimuli)))
    return out


def shard_attrs(rank: int, world_size: int, span: tuple[int, int]) -> dict[str, int]:
    """The root attributes that make a recording file a shard."""
    return dict(shard_rank=rank, shard_world_size=world_size, shard_start=span[0], shard_stop=span[1])


def world_sizes_in(folder: Path) -> set[int]:
    """World sizes of the shard files present in ``folder``."""
    if not folder.is_dir():
        return set()
    return {int(m.group(2)) for p in folder.iterdir() if (m := _NAME.match(p.name))}


# ------------------------------------------------------------- shard facts


@dataclass
class Shard:
    """What a shard file says about itself (read by :func:`read_shard`)."""

    path: Path
    rank: int
    world_size: int
    start: int
    stop: int
    n_stimuli: int
    n_done: int
    complete: bool
    identity: dict[str, Any]
    device: str = ""
    n_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def read_shard(path: Path) -> Shard:
    """Read a shard's attributes (one clear error if it is not a shard)."""
    if not path.exists():
        raise RecordingError(f"shard {path.name} is missing from {path.parent}.")
    with open_h5(path) as f:  # shards are written in SWMR mode: readable even while (or after) a rank dies
        if _attr(f, "format") != schema.FORMAT or any(k not in f.attrs for k in SHARD_KEYS):
            raise RecordingError(f"{path} is not a shard of a neuroprobe recording.")
        n_tokens = {}
        if schema.TOKENS in f:
            n_tokens = {s: int(g.attrs["n_tokens"]) for s, g in f[schema.TOKENS].items()}
        return Shard(
            path=path, rank=int(_attr(f, "shard_rank")), world_size=int(_attr(f, "shard_world_size")),
            start=int(_attr(f, "shard_start")), stop=int(_attr(f, "shard_stop")),
            n_stimuli=int(_attr(f, "n_stimuli")), n_done=int(_attr(f, "n_done", 0)),
            complete=bool(_attr(f, "complete", False)),
            identity={k: _attr(f, k) for k in schema.IDENTITY_KEYS}, device=str(_attr(f, "device", "")),
            n_tokens=n_tokens,
        )


def check_shards(paths: Iterable[Path], *, require_complete: bool = True) -> list[Shard]:
    """Validate a shard set; return its shards in rank order.

    Checks, in order: every rank ``0..n-1`` of one world size is present and
    readable; every shard has the identity of rank 0 (subject, checkpoint, battery
    hash, montage, pooling, dtype, tokens, batch size, seed, sites); the spans tile
    ``[0, n_stimuli)`` with no gap and no overlap; every shard is complete.

    Raises
    ------
    RecordingError
        With one sentence naming the first problem found.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise RecordingError("there are no shards to check.")
    worlds = set()
    for p in paths:
        m = _NAME.match(p.name)
        if not m:
            raise RecordingError(f"{p.name} is not a shard file name (rank-<i>-of-<n>.h5).")
        worlds.add(int(m.group(2)))
    if len(worlds) > 1:
        raise RecordingError(
            f"the shards mix recordings made by {' and '.join(map(str, sorted(worlds)))} processes; "
            f"keep one set (or record again with --overwrite)."
        )
    world = worlds.pop()
    folder = paths[0].parent
    by_name = {p.name: p for p in paths}
    shards = [read_shard(by_name.get(shard_name(r, world), folder / shard_name(r, world))) for r in range(world)]
    first = shards[0]
    for s in shards:
        if s.rank != int(_NAME.match(s.name).group(1)) or s.world_size != world:
            raise RecordingError(
                f"shard {s.name} says it is rank {s.rank} of {s.world_size}; it was renamed or belongs elsewhere."
            )
        for key in schema.IDENTITY_KEYS:
            if s.identity[key] != first.identity[key]:
                raise RecordingError(
                    f"shard {s.name} belongs to another recording: its {key} is {s.identity[key]!r}, "
                    f"not {first.identity[key]!r} as in {first.name}."
                )
        if s.n_stimuli != first.n_stimuli:
            raise RecordingError(f"shard {s.name} has {s.n_stimuli} stimuli, not {first.n_stimuli} as {first.name}.")
    expect = 0
    for s in shards:
        if s.start < expect:
            raise RecordingError(
                f"shards overlap: {s.name} starts at stimulus {s.start}, before the previous shard ends ({expect})."
            )
        if s.start > expect:
            raise RecordingError(f"shards leave a gap: stimuli {expect}..{s.start - 1} are in no shard ({s.name} starts at {s.start}).")
        if s.stop < s.start:
            raise RecordingError(f"shard {s.name} has an empty-negative span {s.start}..{s.stop}.")
        expect = s.stop
    if expect != first.n_stimuli:
        raise RecordingError(f"the shards end at stimulus {expect}, not at the battery's end ({first.n_stimuli}).")
    if require_complete:
        for s in shards:
            if not s.complete or max(s.n_done, s.start) < s.stop:
                raise RecordingError(
                    f"shard {s.name} is incomplete (committed up to stimulus {max(s.n_done, s.start)} of "
                    f"{s.start}..{s.stop}); rerun the same command with --resume."
                )
    return shards


# ----------------------------------------------------------- virtual file


def _copy_attrs(src: h5py.AttributeManager, dst: h5py.AttributeManager, skip: Iterable[str] = ()) -> None:
    skip = set(skip)
    for k, v in src.items():
        if k not in skip:
            dst[k] = v


def _layout_attrs(shards: list[Shard], relative_to: Path) -> dict[str, Any]:
    rows = [dict(file=os.path.relpath(s.path, relative_to), rank=s.rank, start=s.start, stop=s.stop,
                 device=s.device, n_tokens=s.n_tokens) for s in shards]
    devices = list(dict.fromkeys(s.device for s in shards))
    return dict(world_size=len(shards), shards=json.dumps(rows), device=",".join(devices))


def write_virtual(out: str | Path, shards: list[Shard]) -> Path:
    """Write ``out``: one recording whose datasets are virtual datasets over ``shards``.

    ``shards`` must come from :func:`check_shards`.  The file is written beside
    ``out`` and moved into place, so ``out`` is never a half-written file.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".virtual-tmp")
    tmp.unlink(missing_ok=True)
    base = out.parent
    live = [s for s in shards if s.stop > s.start]
    rel = {s.rank: os.path.relpath(s.path, base) for s in shards}
    with h5py.File(shards[0].path, "r") as f0, h5py.File(tmp, "w", track_order=True) as v:
        _copy_attrs(f0.attrs, v.attrs, skip=SHARD_KEYS)
        for k, val in _layout_attrs(shards, base).items():
            v.attrs[k] = val
        v.attrs["virtual"] = True
        v.attrs["complete"] = True
        v.attrs["n_done"] = int(f0.attrs["n_stimuli"])
        v.copy(f0[schema.STIMULI], schema.STIMULI)
        n = int(f0.attrs["n_stimuli"])
        # token streams: global offsets (real data), token rows concatenated (virtual)
        token_base: dict[str, dict[int, int]] = {}
        if schema.TOKENS in f0:
            for stream, g0 in f0[schema.TOKENS].items():
                offsets = np.zeros(n + 1, dtype=np.int64)
                bases, total = {}, 0
                for s in shards:
                    bases[s.rank] = total
                    if s.stop > s.start:
                        with h5py.File(s.path, "r") as fs:
                            local = fs[f"{schema.TOKENS}/{stream}/offsets"][s.start + 1 : s.stop + 1]
                        offsets[s.start + 1 : s.stop + 1] = local + total
                    total += s.n_tokens.get(stream, 0)
                token_base[stream] = bases
                tg = v.create_group(f"{schema.TOKENS}/{stream}")
                _copy_attrs(g0.attrs, tg.attrs)
                tg.attrs["n_tokens"] = total
                tg.create_dataset("offsets", data=offsets, chunks=True)
                for name in ("token_ids", "stimulus", "position"):
                    _virtual_rows(tg, name, g0[name], f"{schema.TOKENS}/{stream}/{name}", live, rel, bases,
                                  {s.rank: s.n_tokens.get(stream, 0) for s in shards}, total)
        for site, g0 in f0[schema.SITES].items():
            sg = v.create_group(schema.site_path(site))
            _copy_attrs(g0.attrs, sg.attrs)
            ds0 = g0[schema.RESPONSES]
            lay = h5py.VirtualLayout(shape=ds0.shape, dtype=ds0.dtype)
            for s in live:
                src = h5py.VirtualSource(rel[s.rank], f"{schema.site_path(site)}/{schema.RESPONSES}", shape=ds0.shape)
                lay[s.start : s.stop] = src[s.start : s.stop]
            sg.create_virtual_dataset(schema.RESPONSES, lay, fillvalue=np.nan)
            if schema.SITE_TOKENS in g0:
                stream = _attr(g0, "stream")
                counts = {s.rank: s.n_tokens.get(stream, 0) for s in shards}
                _virtual_rows(sg, schema.SITE_TOKENS, g0[schema.SITE_TOKENS],
                              f"{schema.site_path(site)}/{schema.SITE_TOKENS}", live, rel, token_base[stream],
                              counts, sum(counts.values()))
    os.replace(tmp, out)
    return out


def _virtual_rows(group: h5py.Group, name: str, ds0: h5py.Dataset, dpath: str, live: list[Shard],
                  rel: dict[int, str], bases: dict[int, int], counts: dict[int, int], total: int) -> None:
    """A virtual dataset that concatenates each shard's first ``counts[rank]`` rows of ``dpath``."""
    tail = tuple(ds0.shape[1:])
    if total == 0:
        group.create_dataset(name, shape=(0,) + tail, dtype=ds0.dtype)
        return
    lay = h5py.VirtualLayout(shape=(total,) + tail, dtype=ds0.dtype)
    for s in live:
        c = counts[s.rank]
        if c:
            src = h5py.VirtualSource(rel[s.rank], dpath, shape=(c,) + tail)
            lay[bases[s.rank] : bases[s.rank] + c] = src[0:c]
    group.create_virtual_dataset(name, lay, fillvalue=np.nan if ds0.dtype.kind == "f" else 0)


# ----------------------------------------------------------------- merge


def _dataset_like(dst: h5py.Group, name: str, proto: h5py.Dataset, shape: tuple[int, ...]) -> h5py.Dataset:
    """Create ``name`` with the storage settings of the shard dataset ``proto`` and ``shape``."""
    kw: dict[str, Any] = {}
    if proto.chunks is not None:
        kw["chunks"] = tuple(min(c, max(1, s)) if i == 0 and proto.maxshape[0] is not None else c
                             for i, (c, s) in enumerate(zip(proto.chunks, shape)))
        if proto.compression:
            kw.update(compression=proto.compression, compression_opts=proto.compression_opts)
        if proto.shuffle:
            kw["shuffle"] = True
        if proto.fletcher32:
            kw["fletcher32"] = True
        if proto.maxshape is not None:
            kw["maxshape"] = proto.maxshape
    fill = proto.fillvalue
    if fill is not None:
        kw["fillvalue"] = fill
    return dst.create_dataset(name, shape=shape, dtype=proto.dtype, **kw)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, bar: tqdm | None) -> None:
    """Copy ``src`` into ``dst`` a block of rows at a time (blocks of whole chunks, <= MERGE_BLOCK_BYTES)."""
    n = src.shape[0]
    row_bytes = int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize or 1
    rows = max(1, MERGE_BLOCK_BYTES // row_bytes)
    if dst.chunks is not None and rows > dst.chunks[0]:
        rows -= rows % dst.chunks[0]
    for a in range(0, n, rows):
        b = min(n, a + rows)
        dst[a:b] = src[a:b]
        if bar is not None:
            bar.update((b - a) * row_bytes)


def shards_of(path: Path) -> list[Path]:
    """The shard files behind ``path``: those a virtual file lists, or those in ``<path>.shards/``."""
    if path.exists():
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise RecordingError(f"{path} cannot be opened as HDF5 ({str(err).splitlines()[0]}).") from None
        with f:
            if _attr(f, "format") != schema.FORMAT:
                raise RecordingError(f"{path} is not a neuroprobe recording.")
            if not is_virtual(f):
                raise RecordingError(f"{path} is already one self-contained recording; there is nothing to merge.")
            return listed_shards(f, path)
    folder = shard_dir(path)
    found = sorted(p for p in folder.iterdir() if _NAME.match(p.name)) if folder.is_dir() else []
    if not found:
        raise RecordingError(f"{path} does not exist and {folder} holds no shards.")
    return found


def merge(path: str | Path, out: str | Path | None = None, *, quiet: bool = True) -> Path:
    """Materialise a virtual recording into one self-contained file.

    Parameters
    ----------
    path
        A virtual recording (``<out>.h5`` of a sharded recording), or the ``<out>.h5``
        of a sharded recording whose virtual file was never written (its shards are
        then taken from ``<out>.shards/``).
    out
        Where to write (default: replace ``path`` in place).  The shards are left
        alone; once merged they are no longer needed.
    quiet
        No progress bar.

    Returns
    -------
    Path
        The self-contained recording; it equals the virtual one dataset by dataset.

    Raises
    ------
    RecordingError
        If the shards are missing, incomplete, from different recordings, or their
        spans leave gaps or overlap (checked before anything is written).
    """
    path = Path(path)
    shards = check_shards(shards_of(path))
    out = Path(out) if out is not None else path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".merge-tmp")
    tmp.unlink(missing_ok=True)
    virtual_tmp = None
    src_path = path
    if not path.exists():  # no virtual file yet: build one to read through
        virtual_tmp = path.with_name(path.name + ".virtual-read")
        src_path = write_virtual(virtual_tmp, shards)
    try:
        with h5py.File(src_path, "r") as v, h5py.File(shards[0].path, "r") as proto, \
                h5py.File(tmp, "w", track_order=True) as m:
            _copy_attrs(v.attrs, m.attrs, skip=("virtual",))
            if virtual_tmp is not None:  # describe the layout relative to the real output
                for k, val in _layout_attrs(shards, out.parent).items():
                    m.attrs[k] = val
            m.attrs["virtual"] = False
            m.attrs["merged_from"] = path.name
            m.copy(v[schema.STIMULI], schema.STIMULI)
            items: list[tuple[str, h5py.Dataset]] = []
            v.visititems(lambda name, obj: items.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
            big = [(n, d) for n, d in items if not n.startswith(schema.STIMULI + "/")]
            total = sum(int(np.prod(d.shape, dtype=np.int64)) * d.dtype.itemsize for _, d in big)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merge {path.name}", disable=quiet)
            try:
                for name, ds in big:
                    parent = name.rsplit("/", 1)[0]
                    if parent not in m:
                        g = m.create_group(parent)
                        _copy_attrs(v[parent].attrs, g.attrs)
                    dst = _dataset_like(m[parent], name.rsplit("/", 1)[1], proto[name] if name in proto else ds,
                                        ds.shape)
                    _copy_rows(ds, dst, bar)
            finally:
                bar.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if virtual_tmp is not None:
            virtual_tmp.unlink(missing_ok=True)
    return out


def remove_shards(out: str | Path) -> None:
    """Delete ``out``'s shard folder (``--overwrite`` of a sharded recording)."""
    folder = shard_dir(out)
    if folder.is_dir():
        shutil.rmtree(folder)
