"""Write a recording as an NWB file (Neurodata Without Borders) with pynwb, streamed.

The mapping (also in ``recordings/README.md``):

=====================  =========================================================================
neuroprobe             NWB
=====================  =========================================================================
provenance             ``NWBFile`` (session description, start time = ``created``, notes = the
                       provenance as JSON; ``experimenter`` and ``institution`` when given),
                       ``Subject`` (subject name, checkpoint, revision, init; species
                       :data:`SPECIES` unless given, age "P0D/" = unknown, sex "O" = other)
                       and one ``Device`` (the model and its checkpoint)
site                   one ``ElectrodeGroup`` per site (location = module path; description =
                       direction, kind, stream, pooling) and one row of the electrodes table
unit                   one row of the table ``units`` in processing module ``neuroprobe`` (NWB's
                       ``Units`` type is for spike trains): ``site``, ``unit`` (index at its site),
                       ``kind``, ``head``, ``electrode_group``, ``electrodes``; with a cells table
                       also ``concept``, ``is_candidate``, ``is_cell``, ``invariant``,
                       ``multimodal``, ``z``, ``q``, ``q_test``, ``si``, ``d_prime``
stimulus               one row of the ``trials`` table: ``stimulus_id``, ``concept``, ``form``,
                       ``modality``, ``split``, ``text``, ``image``; ``start_time`` = row,
                       ``stop_time`` = row + 1 (a network has no clock: time is stimulus order)
responses              processing module ``neuroprobe``, table ``responses``: one row per trial
                       (``trial`` references it), one column per site, ``[n_stimuli, n_units]``,
                       written chunk by chunk from the HDF5 recording (NaN kept); a feature
                       site ``S:sae`` is named ``S|sae`` (NWB names cannot hold ':')
=====================  =========================================================================

Not exported: per-token traces (``/tokens``, ``/sites/<site>/tokens``) — ragged token
streams have no NWB type that the inspector and readers understand without an
extension; use the HDF5 recording for them.
"""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from neuroprobe.errors import NeuroprobeError, option
from neuroprobe.output import UNCLOSABLE, atomic_path, claim_space, quiet_close_errors, release_past_end, require_free
from neuroprobe.recording.reader import Recording, open_recording

#: NWB's ``Subject.species`` for a network: NCBI Taxonomy's "synthetic construct" (taxon 32630, the taxon
#: GenBank gives man-made sequences). NWB's species is an animal's, and nwbinspector accepts only a Latin
#: binomial or an NCBI taxon IRI; a model has no species, and this is the one taxon for things made, not born.
SPECIES = "http://purl.obolibrary.org/obo/NCBITaxon_32630"

#: cells-table columns copied into the units table when present (name, description).
CELL_COLUMNS = (
    ("concept", "the unit's concept (its best concept for units that are not cells)"),
    ("is_candidate", "passes the screening criterion (k SD effect and rank-sum under FDR)"),
    ("is_cell", "concept cell: candidate confirmed on the testing split"),
    ("invariant", "cell whose response holds in every form of its concept"),
    ("multimodal", "cell that answers in every modality"),
    ("z", "screening effect: (median - baseline mean) / baseline SD"),
    ("q", "screening q-value (FDR over every unit x concept test)"),
    ("q_test", "confirmation q-value on the testing split"),
    ("si", "selectivity index of the unit's concept"),
    ("d_prime", "d-prime of the unit's concept"),
)
STIMULUS_COLUMNS = (
    ("id", "stimulus_id", "stimulus id in the battery"),
    ("concept", "concept", "the stimulus's concept"),
    ("form", "form", "the stimulus's form (photo, drawing, written-name, text-name, ...)"),
    ("modality", "modality", "text, image or pair"),
    ("split", "split", "screening or testing"),
    ("text", "text", "text payload (text and pair stimuli)"),
    ("image", "image", "image path relative to the battery folder (image and pair stimuli)"),
)



def nwb_name(site: str) -> str:
    """An NWB object name for ``site`` (NWB names cannot hold ':': a feature site ``S:sae`` becomes ``S|sae``)."""
    return site.replace(":", "|")

def _need_pynwb():
    try:
        import pynwb  # noqa: F401
    except ImportError:
        raise NeuroprobeError("NWB export needs pynwb: pip install 'neuroprobe-cells[nwb]'.") from None


def _start_time(created: Any) -> datetime:
    try:
        t = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return datetime(1970, 1, 1, tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _iterator(dataset, buffer_mb: int):
    """Chunks of a recording's ``[n_stimuli, n_units]`` dataset, read as they are written."""
    from hdmf.data_utils import GenericDataChunkIterator

    class _Responses(GenericDataChunkIterator):
        def __init__(self, ds, **kw):
            self._ds = ds
            super().__init__(**kw)

        def _get_data(self, selection):
            return self._ds[selection]

        def _get_maxshape(self):
            return self._ds.shape

        def _get_dtype(self):
            return self._ds.dtype

    n, m = dataset.shape
    rows = max(1, min(n, int(dataset.chunks[0]) if dataset.chunks else 256))
    row_bytes = max(1, m * dataset.dtype.itemsize)
    buf_rows = max(rows, (buffer_mb * 2**20 // row_bytes) // rows * rows)
    return _Responses(dataset, chunk_shape=(rows, m), buffer_shape=(min(n, buf_rows), m), display_progress=False)


def export_nwb(
    recording: Recording | str | Path,
    out: str | Path,
    *,
    cells: pd.DataFrame | str | Path | None = None,
    buffer_mb: int = 64,
    overwrite: bool = False,
    experimenter: str | Sequence[str] | None = None,
    institution: str | None = None,
    species: str = SPECIES,
) -> Path:
    """Write ``recording`` as an NWB file (see the module docstring for the mapping).

    Parameters
    ----------
    recording
        A recording or its path.
    out
        The ``.nwb`` file to write.
    cells
        A cells table (``neuroprobe cells --out``) whose labels join the units table.
    buffer_mb
        Responses held in memory at a time while writing (the writing is streamed).
    overwrite
        Replace an existing file.
    experimenter
        Who ran the experiment, one name or several, each as DANDI asks: ``"Last, First"``.
    institution
        Where it was run.
    species
        ``Subject.species``: a Latin binomial or an NCBI taxon IRI (default :data:`SPECIES`, "synthetic
        construct": a network has no species).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    _need_pynwb()
    from hdmf.common import DynamicTable, DynamicTableRegion, VectorData
    from pynwb import NWBFile
    from pynwb.file import Subject

    out = Path(out)
    if out.exists() and not overwrite:
        raise NeuroprobeError(f"{out} exists; pass {option('overwrite')} to replace it.")
    own = not isinstance(recording, Recording)
    rec = open_recording(recording) if own else recording
    try:
        if not rec.complete:
            raise NeuroprobeError(f"{rec.path} is incomplete ({rec.n_done} stimuli recorded); resume it before exporting.")
        a = rec.attrs
        if cells is not None and not isinstance(cells, pd.DataFrame):
            from neuroprobe.analysis.criterion import load_cells

            cells = load_cells(cells)
        stim = rec.stimuli.reset_index(drop=True)
        sites = rec.sites
        n_stim = len(stim)
        created = _start_time(a.get("created"))
        ident = str(uuid.uuid5(uuid.NAMESPACE_URL, f"neuroprobe:{a.get('subject')}:{a.get('checkpoint')}:"
                                                   f"{a.get('init')}:{a.get('battery_hash')}:{a.get('created')}"))
        nwb = NWBFile(
            session_description=f"neuroprobe recording of {a.get('subject')} ({a.get('init')}) shown battery "
                                f"{a.get('battery')}: one trial per stimulus, one unit per recorded channel",
            identifier=ident,
            session_start_time=created,
            session_id=rec.path.stem,
            notes=json.dumps({k: (v if isinstance(v, (str, int, float, bool, list, dict)) or v is None else str(v))
                              for k, v in a.items()}, ensure_ascii=False),
            source_script=str(a.get("command") or ""),
            source_script_file_name="neuroprobe",
            keywords=["neuroprobe", "concept cells", "artificial neural network"],
            experiment_description=f"pooling {a.get('pooling')}, montage {a.get('montage')}, dtype {a.get('dtype')}",
            experimenter=[experimenter] if isinstance(experimenter, str) else (list(experimenter) if experimenter else None),
            institution=institution or None,
        )
        # The subject is a model.  NWB's Subject describes an animal; nwbinspector requires its age and sex:
        # age "P0D/" (zero days or older: unknown) and sex "O" (other) are the true answers for a network,
        # and its species is NCBI's "synthetic construct" (SPECIES) unless the caller names one.
        nwb.subject = Subject(
            subject_id=str(a.get("subject")),
            description=(f"artificial neural network {a.get('subject')}: checkpoint {a.get('checkpoint') or '-'}, "
                         f"revision {a.get('revision') or '-'}, init {a.get('init')}"),
            species=species, age="P0D/", sex="O",
        )
        device = nwb.create_device(
            name=str(a.get("subject")) or "model",
            description=(f"artificial neural network {a.get('subject')}: checkpoint {a.get('checkpoint') or '-'}, "
                         f"revision {a.get('revision') or '-'}, init {a.get('init')}, dtype {a.get('dtype')}; "
                         "recorded by neuroprobe electrodes (forward hooks)"))
        groups = {}
        nwb.add_electrode_column("site", "the site (module) this electrode records")
        for i, r in enumerate(sites.itertuples(index=False)):
            g = nwb.create_electrode_group(
                name=nwb_name(r.site), device=device, location=r.module,
                description=f"site {r.site}: {r.direction} of module {r.module}, kind {r.kind}, stream {r.stream}, "
                            f"pooling {r.pooling}, {r.n_units} units")
            groups[r.site] = (g, i)
            nwb.add_electrode(group=g, location=r.module, site=r.site)
        # units: built column-wise (a recording can have many)
        units = rec.units
        n_units = len(units)
        cols = [
            VectorData(name="site", description="site (electrode group) of the unit", data=units["site"].astype(str).tolist()),
            VectorData(name="unit", description="index of the unit at its site (column of its responses)",
                       data=units["unit"].to_numpy(np.int64)),
            VectorData(name="kind", description="unit kind (mlp, resid, attn, conv, fc, embed)", data=units["kind"].astype(str).tolist()),
            VectorData(name="head", description="attention head of the unit (-1: not an attention site)",
                       data=units["head"].to_numpy(np.int64)),
            VectorData(name="electrode_group", description="the unit's site as an electrode group",
                       data=[groups[s][0] for s in units["site"]]),
        ]
        if cells is not None:
            if not {"site", "unit"} <= set(cells.columns):
                raise NeuroprobeError("the cells table has no site/unit columns; give a table written by `neuroprobe cells --out`.")
            joined = units[["site", "unit"]].merge(cells.assign(site=cells["site"].astype(str)), on=["site", "unit"],
                                                   how="left", validate="one_to_one")
            for name, desc in CELL_COLUMNS:
                if name not in joined:
                    continue
                v = joined[name]
                if name in ("is_candidate", "is_cell", "invariant", "multimodal"):
                    data = v.fillna(False).astype(bool).to_numpy()
                elif name == "concept":
                    data = v.fillna("").astype(str).tolist()
                else:
                    data = pd.to_numeric(v, errors="coerce").to_numpy(np.float64)
                cols.append(VectorData(name=name, description=desc, data=data))
        cols.append(DynamicTableRegion(name="electrodes", data=np.array([groups[s][1] for s in units["site"]]),
                                       description="the unit's site in the electrodes table", table=nwb.electrodes))
        unit_table = DynamicTable(name="units", description="every recorded unit: one scalar channel at a site "
                                  "(not NWB's Units type, which is for spike trains)", id=list(range(n_units)), columns=cols)
        # stimuli as trials
        from pynwb.epoch import TimeIntervals

        tcols = [VectorData(name="start_time", description="stimulus order (s); a network has no clock",
                            data=np.arange(n_stim, dtype=np.float64)),
                 VectorData(name="stop_time", description="start_time + 1", data=np.arange(1, n_stim + 1, dtype=np.float64))]
        for src, name, desc in STIMULUS_COLUMNS:
            if src in stim:
                tcols.append(VectorData(name=name, description=desc, data=stim[src].fillna("").astype(str).tolist()))
        nwb.trials = TimeIntervals(name="trials", description="one trial per stimulus of the battery, in recording order",
                                   id=list(range(n_stim)), columns=tcols)
        # responses: one row per trial, one column per site, streamed from the recording
        rcols = [DynamicTableRegion(name="trial", data=np.arange(n_stim), description="the trial (stimulus) of each row",
                                    table=nwb.trials)]
        for r in sites.itertuples(index=False):
            rcols.append(VectorData(name=nwb_name(r.site), data=_iterator(rec.responses(r.site), buffer_mb),
                                    description=f"pooled ({r.pooling}) responses of the {r.n_units} units of site {r.site}: "
                                                f"[n_trials, n_units]; NaN where the site did not see the stimulus"))
        table = DynamicTable(name="responses", description="each unit's pooled response to each stimulus (row = trial)",
                             id=list(range(n_stim)), columns=rcols)
        module = nwb.create_processing_module("neuroprobe", "responses recorded by neuroprobe")
        module.add(unit_table)
        module.add(table)
        # The file is written under a temporary name and renamed when complete.  A disk too small for a generous
        # estimate is refused before anything is written, and the estimate is claimed as the file's own blocks
        # before HDF5 writes (so it never meets a full disk half-way: HDF5 cannot close a file after that, and
        # the dataset ids it leaves crash the interpreter at exit).  See docs/GUARANTEES.md.
        need = estimate_bytes(rec, stimuli=stim, with_cells=cells is not None)
        require_free(out, need)
        with atomic_path(out) as tmp:
            _write(nwb, tmp, need)
    finally:
        if own:
            rec.close()
    return out


def _write(nwb: Any, path: Path, need: int) -> None:
    """Write ``nwb`` to ``path`` with pynwb into ``need`` bytes claimed up front (see :func:`export_nwb`)."""
    import h5py
    from pynwb import NWBHDF5IO

    f = h5py.File(path, "w")
    try:
        fd = int(f.id.get_vfd_handle())
    except Exception:  # noqa: BLE001 - another HDF5 driver: the free-space check stands alone
        fd = None
    io = None
    try:
        with quiet_close_errors():
            if fd is not None:
                claim_space(fd, need, path)
            io = NWBHDF5IO(mode="w", file=f)
            io.write(nwb)
            f.flush()
            if fd is not None:
                release_past_end(fd)  # give back what the file did not use
            io.close()
    except BaseException:
        # Only when the estimate fell short of what HDF5 wrote (or another process took the space where
        # fallocate is missing).  The file is discarded: free its blocks so that HDF5 finds room to flush
        # and close it; if it still cannot, keep its objects referenced and let the CLI skip HDF5's exit.
        try:
            os.truncate(path, 0)
        except OSError:
            pass
        with quiet_close_errors():
            try:
                (io or f).close()
                f.close()
            except Exception:  # noqa: BLE001 - the write error is the one to report
                UNCLOSABLE.append((io, f))
        raise


def estimate_bytes(rec: Recording, *, stimuli: pd.DataFrame | None = None, with_cells: bool = False) -> int:
    """Bytes the NWB file of ``rec`` needs, generously: responses in whole chunks, tables, HDF5 overhead.

    Measured (2026-12-07): a 200-stimulus, 16,000-unit float32 recording with 12.8 MB of
    responses gave a 15.1 MB file (about 135 bytes of tables per unit); this estimate says 19.9 MB.
    """
    responses, n_units = 0, 0
    for name in rec.site_names:
        ds = rec.responses(name)
        n, m = ds.shape
        rows = max(1, min(n, int(ds.chunks[0]) if ds.chunks else 256))  # the chunk height _iterator writes
        responses += -(-n // rows) * rows * m * ds.dtype.itemsize
        n_units += m
    stim = rec.stimuli if stimuli is None else stimuli
    text = sum(int(stim[c].astype(str).str.len().sum()) for c, _, _ in STIMULUS_COLUMNS if c in stim)
    tables = (256 + (256 if with_cells else 0)) * n_units + 256 * len(stim) + 2 * text
    return int(1.1 * (responses + tables)) + (4 << 20)


def inspect_nwb(path: str | Path) -> list:
    """nwbinspector's messages for a file (importance ``CRITICAL`` means it is not shareable as is)."""
    try:
        from nwbinspector import inspect_nwbfile
    except ImportError:
        raise NeuroprobeError("validation needs nwbinspector: pip install 'neuroprobe-cells[nwb]'.") from None
    return list(inspect_nwbfile(nwbfile_path=str(path)))
