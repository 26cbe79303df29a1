"""Make tests/data/cells_reference/: frozen concept-cell tables that tests/test_cells_speed.py compares against.

Run from a checkout whose analysis code is the reference (the tables in this folder were made at
main ``bd2d012``, before the single-core speed-up of issue 23 item 4):

    PYTHONPATH=. python tests/data/make_cells_reference.py tests/data/cells_reference

Every case is a recording and a call (``concept_cells`` with some options, ``unit_indices`` or
``population_sparseness``).
The recordings are built by :func:`build` here and again by the test:

* ``mixed``: synthetic (:mod:`neuroprobe.analysis.synthetic`), values from integer hashing (the same
  bits on every machine, no random-number stream): noise, rectified units (ties at zero), quantised
  units (many ties), tuned units (invariant, image-only, weak, two concepts), dead units (constant,
  NaN, inf), an image-only site (NaN rows for the text stimuli) and a mostly silent site (exact
  p-values on heavily tied units);
* ``heavy``: synthetic, 330 screening stimuli with 33 per concept and weakly tuned units, so that
  dozens of exact p-values near the cut-off need large deficit programs, split into several batches;
* ``planted``: the planted subject (:mod:`neuroprobe.planted`) recorded through the real recorder;
* ``organism``: the organism on the digits battery, every site (the quick start's recording).

The last two come from torch forward passes, whose last bits may differ on other machines; their
responses' SHA-256 is stored, and the test skips a case whose recording differs.

Each case gives ``<case>.parquet`` (the table) and an entry of ``manifest.json`` (the call, the
recording's digest and the table's attributes but the recording path).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

FORMS = (("photo", "image"), ("drawing", "image"), ("written-name", "image"), ("text-name", "text"),
         ("text-definition", "text"))


# ---------------------------------------------------------------- deterministic values
def hashed_uniform(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Uniform [0, 1) values from splitmix64 of the element index: the same bits everywhere."""
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x632BE59BD9B4E019)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) / float(2**53)).reshape(shape)


def hashed_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Roughly standard-normal noise: a centred sum of 4 uniforms, scaled (exact float64 arithmetic)."""
    u = sum(hashed_uniform(shape, seed * 4 + i) for i in range(4))
    return (u - 2.0) * np.sqrt(3.0)


# ---------------------------------------------------------------- recordings
def mixed(path: Path) -> Path:
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    st = make_stimuli(6, 20, forms=FORMS)  # 120 stimuli, 10 screening + 10 testing per concept
    n = len(st)
    codes = st["concept"].str[1:].astype(int).to_numpy()
    image = (st["modality"] == "image").to_numpy()
    on = codes[:, None] == np.arange(6)[None, :]

    x = hashed_noise((n, 160), 1)
    for u in range(0, 40, 5):  # invariant cells, strong
        x[:, u] += 6.0 * on[:, u % 6]
    for u in range(41, 60, 6):  # image-only cells
        x[:, u] += 6.0 * (on[:, u % 6] & image)
    x[:, 61] += 1.5 * on[:, 1]  # weak
    x[:, 62] += 5.0 * (on[:, 2] | on[:, 3])  # two concepts
    x[:, 80:130] = np.maximum(x[:, 80:130] - 0.8, 0.0)  # rectified: ties at zero
    x[:, 80:130:7] += 4.0 * on[:, 4][:, None]
    x[:, 130:145] = np.round(x[:, 130:145] * 2.0) / 2.0  # quantised: many ties
    x[:, 150:153] = 0.0  # silent
    x[:, 153] = 1.5  # constant
    x[7, 154] = np.nan  # non-finite in one live row: dead
    x[9, 155] = np.inf
    x[:, 156] = -x[:, 3]  # negatively tuned

    y = hashed_noise((n, 48), 2)  # an image-only site: NaN rows for the text stimuli
    y[:, ::4] += 5.0 * on[:, 0][:, None]
    y[:, 1::8] = np.maximum(y[:, 1::8], 0.0)
    y[~image] = np.nan

    z = np.zeros((n, 64))  # mostly silent units: a few positive responses, heavily tied
    u = hashed_uniform((n, 64), 3)
    z[u < 0.12] = 1.0
    z += 0.25 * (on[:, 5][:, None] & (u < 0.5))
    z[:, 32:] = np.round(z[:, 32:] + 0.6 * on[:, 0][:, None] * (hashed_uniform((n, 32), 4) < 0.6), 1)
    return write_recording(path, st, {"mixed": x.astype(np.float32), "images": y.astype(np.float32),
                                      "silent": z.astype(np.float32)}, batch_size=16)


def heavy(path: Path) -> Path:
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    st = make_stimuli(10, 66, forms=(("photo", "image"), ("text-name", "text")))  # 33 screening per concept
    n = len(st)
    codes = st["concept"].str[1:].astype(int).to_numpy()
    on = codes[:, None] == np.arange(10)[None, :]
    x = hashed_noise((n, 56), 5)
    x[:, :40] += np.linspace(1.3, 2.3, 40)[None, :] * on[:, 0][:, None]  # weakly tuned: p near the cut-off, large deficits
    x[:, 40:48] += 0.7 * on[:, 3][:, None]
    x[:, 20:48] = np.maximum(x[:, 20:48] - 0.3, 0.0)  # with ties
    x[:, 48:] += 3.0 * on[:, 7][:, None]
    return write_recording(path, st, {"heavy": x.astype(np.float32)}, batch_size=64)


def planted(path: Path) -> Path:
    import torch

    from neuroprobe import record
    from neuroprobe.planted import make_planted

    torch.set_num_threads(1)
    p = make_planted(path.parent / "planted-battery", seed=3)
    record(p.subject, p.battery, path, montage="all", quiet=True).close()
    return path


def organism(path: Path) -> Path:
    import torch

    import neuroprobe as npb

    torch.set_num_threads(1)
    subject = npb.load_subject("organism", device="cpu")
    npb.record(subject, npb.load_battery("digits"), path, montage="all", quiet=True).close()
    return path


RECORDINGS: dict[str, Callable[[Path], Path]] = {"mixed": mixed, "heavy": heavy, "planted": planted,
                                                 "organism": organism}
#: How the tables are stored (small: no statistics, no pandas schema; values and column types stay exact).
PARQUET = dict(compression="zstd", compression_level=19, write_statistics=False, store_schema=False)
#: Recordings whose bits depend on torch kernels (checked by digest, skipped when they differ).
MACHINE_DEPENDENT = ("planted", "organism")


def shuffled_labels(path: Path) -> list[str]:
    """A fixed relabelling of the recording's stimuli (the label-shuffle control's input)."""
    from neuroprobe.recording.reader import open_recording

    with open_recording(path) as rec:
        concepts = rec.stimuli["concept"].astype(str).to_numpy()
    order = np.argsort(hashed_uniform((len(concepts),), 9), kind="stable")
    return list(concepts[order])


#: case -> (recording, call, options); ``labels="shuffled"`` stands for :func:`shuffled_labels`.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixed-default": ("mixed", "concept_cells", dict(block_units=24)),
    "mixed-pairs-by": ("mixed", "concept_cells", dict(family="pairs", method="by", k=3.0, fdr=0.1, n_perm=300,
                                                      seed=4)),
    "mixed-asymptotic-clip": ("mixed", "concept_cells", dict(exact=False, transform="clip", k=2.0)),
    "mixed-labels": ("mixed", "concept_cells", dict(labels="shuffled", n_perm=200)),
    "mixed-jobs": ("mixed", "concept_cells", dict(jobs=2, read_bytes=4096, block_units=16, n_perm=0)),
    "mixed-indices": ("mixed", "unit_indices", dict(block_units=40)),
    "mixed-population": ("mixed", "population_sparseness", dict()),
    "heavy-default": ("heavy", "concept_cells", dict()),
    "planted-default": ("planted", "concept_cells", dict(n_perm=200)),
    "organism-default": ("organism", "concept_cells", dict()),
}


def digest(path: Path) -> str:
    """SHA-256 of every site's responses (name, shape, bytes)."""
    from neuroprobe.recording.reader import open_recording

    h = hashlib.sha256()
    with open_recording(path) as rec:
        for site in rec.site_names:
            a = np.ascontiguousarray(rec.responses(site)[...])
            h.update(f"{site}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def run(case: str, path: Path) -> pd.DataFrame:
    """The table of ``case`` on its recording ``path``, by the code on ``sys.path``."""
    from neuroprobe.analysis import concept_cells, population_sparseness, unit_indices

    _, call, options = CASES[case]
    options = dict(options)
    if options.get("labels") == "shuffled":
        options["labels"] = np.asarray(shuffled_labels(path), dtype=object)
    if call == "unit_indices":
        return unit_indices(path, **options)
    if call == "population_sparseness":
        return population_sparseness(path, **options)
    return concept_cells(path, **options)


def attrs_of(table: pd.DataFrame) -> dict[str, Any]:
    """The table's attributes but where the recording lives, as JSON would give them back."""
    return json.loads(json.dumps({k: v for k, v in table.attrs.items() if k != "recording"}, default=str))


def normalise(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the reference file gives it back (a Parquet round trip, no attributes)."""
    import io

    buf = io.BytesIO()
    frame = table.copy()
    frame.attrs = {}
    frame.to_parquet(buf, index=False, **PARQUET)
    return pd.read_parquet(io.BytesIO(buf.getvalue()))


def main(out: Path) -> None:
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: build(Path(tmp) / f"{name}.h5") for name, build in RECORDINGS.items()}
        digests = {name: digest(p) for name, p in paths.items()}
        for case, (rec, call, options) in CASES.items():
            table = run(case, paths[rec])
            frame = table.copy()
            frame.attrs = {}
            frame.to_parquet(out / f"{case}.parquet", index=False, **PARQUET)
            manifest[case] = dict(recording=rec, call=call, options=options, digest=digests[rec],
                                  attrs=attrs_of(table), rows=len(table))
            print(f"{case}: {len(table)} rows, {(out / f'{case}.parquet').stat().st_size / 1024:.0f} KiB")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("cells_reference"))
