"""Write synthetic recordings through the real writer (tests and benchmarks).

:func:`write_recording` lays out a file exactly as ``neuroprobe record`` does
(:class:`~neuroprobe.recording.writer.RecordingWriter`: same chunking, attributes
and commit protocol), with responses that come from arrays or from a function that
generates them a batch of stimuli at a time (so files larger than memory can be
written).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from neuroprobe.recording import schema
from neuroprobe.recording.writer import BatchResult, RecordingWriter
from neuroprobe.subjects.base import Site

Rows = Callable[[int, int], Mapping[str, np.ndarray]]


def write_recording(
    path: str | Path,
    stimuli: pd.DataFrame,
    sites: Mapping[str, np.ndarray | int],
    *,
    rows: Rows | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    subject: str = "synthetic",
    init: str = "pretrained",
    battery: str = "synthetic",
    kind: str = "mlp",
) -> Path:
    """Write a complete recording.

    Parameters
    ----------
    path
        Output file (replaced).
    stimuli
        Battery table (``id, concept, modality, form, split`` at least).
    sites
        Site name -> ``[n_stimuli, n_units]`` array, or -> ``n_units`` when ``rows`` generates the data.
    rows
        ``rows(offset, n) -> {site: [n, n_units]}`` for stimuli ``offset:offset+n``.
    batch_size
        Stimuli per written batch (and the chunk height, as in the recorder).
    dtype
        Storage dtype.
    subject, init, battery, kind
        Provenance and unit kind.
    """
    path = Path(path)
    if path.exists():
        path.unlink()
    n = len(stimuli)
    widths = {s: (v if isinstance(v, (int, np.integer)) else np.asarray(v).shape[1]) for s, v in sites.items()}
    site_objs = [(Site(name, name, "output", kind, "text", "BU"), int(w)) for name, w in widths.items()]
    prov = {key: "" for key in schema.PROVENANCE_KEYS}
    prov.update(subject=subject, init=init, battery=battery, battery_hash=f"{battery}-hash", dtype=dtype,
                montage="all", pooling="mean", tokens=False, batch_size=batch_size, seed=0,
                sites_list=list(widths), format=schema.FORMAT, format_version=schema.FORMAT_VERSION,
                n_stimuli=n, command="neuroprobe.analysis.synthetic.write_recording")
    writer = RecordingWriter.create(path, prov, stimuli, site_objs, pooling_per_site={s: "mean" for s in widths},
                                    tokens=False, dtype=dtype, compression=None, chunk_rows=batch_size)
    np_dtype = np.dtype(dtype)
    try:
        for off in range(0, n, batch_size):
            m = min(batch_size, n - off)
            if rows is not None:
                block = rows(off, m)
            else:
                block = {s: np.asarray(v)[off : off + m] for s, v in sites.items()}
            writer.write(BatchResult(offset=off, n=m, pooled={s: np.asarray(a, dtype=np_dtype) for s, a in block.items()}))
        writer.finish()
    finally:
        writer.close()
    return path


def make_stimuli(n_concepts: int, per_concept: int, forms: tuple[tuple[str, str], ...] = (("photo", "image"),
                 ("text-name", "text")), seed: int = 0) -> pd.DataFrame:
    """A balanced battery table: ``per_concept`` stimuli per concept, forms cycling, splits alternating."""
    rows = []
    for c in range(n_concepts):
        for i in range(per_concept):
            form, modality = forms[(i // 2) % len(forms)]
            rows.append(dict(id=f"c{c}-{i}", concept=f"c{c}", modality=modality, form=form,
                             split="screening" if i % 2 == 0 else "testing", text="", image="", cloze="", target=""))
    return pd.DataFrame(rows)
