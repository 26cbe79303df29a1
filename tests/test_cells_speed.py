"""The faster single-core concept cells give the very same tables (issue 23, item 4).

The reference tables in ``tests/data/cells_reference/`` were computed by the code before the
speed-up (``tests/data/make_cells_reference.py``); here the current code runs the same calls on the
same recordings and every column must be equal, exactly (NaNs equal, signs of zeros equal), as must
the table's attributes (exact p-value counts, cut-offs, the design check).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "cells_reference"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_cells_reference", DATA / "make_cells_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Recording name -> path, each built once (by the same code that built the reference's)."""
    root = tmp_path_factory.mktemp("cells-reference")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = maker.RECORDINGS[name](root / f"{name}.h5")
        return built[name]

    return get


def assert_same_table(new: pd.DataFrame, ref: pd.DataFrame) -> None:
    """Every column equal, exactly: values, NaN positions, dtypes, column order, and the sign of zeros."""
    pd.testing.assert_frame_equal(new, ref, check_exact=True)
    for col in ref.columns:
        if ref[col].dtype.kind == "f":
            a, b = new[col].to_numpy(), ref[col].to_numpy()
            assert np.array_equal(np.signbit(a) & ~np.isnan(a), np.signbit(b) & ~np.isnan(b)), col


@pytest.mark.parametrize("case", list(maker.CASES))
def test_table_equals_the_reference(case, recordings):
    entry = MANIFEST[case]
    assert (entry["recording"], entry["call"]) == maker.CASES[case][:2]
    path = recordings(entry["recording"])
    digest = maker.digest(path)
    if digest != entry["digest"]:
        assert entry["recording"] in maker.MACHINE_DEPENDENT, "the synthetic recording changed"
        pytest.skip(f"the {entry['recording']} recording differs on this machine (torch kernels) from the "
                    f"one the reference was computed on; its table cannot be compared bit for bit")
    table = maker.run(case, path)
    ref = pd.read_parquet(REFERENCE / f"{case}.parquet")
    assert_same_table(maker.normalise(table), ref)
    assert maker.attrs_of(table) == entry["attrs"]
