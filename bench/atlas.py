"""Benchmark: time and size of the atlas, and how fast its index opens in headless Chromium.

Two recordings:

1. the organism quick start (``recordings/organism_digits_all.h5`` and its cells table,
   as written by ``python analyses/quickstart.py``; recorded here when missing);
2. a synthetic recording of ``--units`` units (default 100,000: 10 sites x 10,000) written
   through neuroprobe's writer, 1% of them tuned to a concept, with its cells table
   (``concept_cells``, 100 permutations; timed separately: it is not part of the atlas).

For each: wall and CPU time of ``neuroprobe atlas`` run as a subprocess (the command a
user runs; its peak RSS, sampled), pages written, size on disk, the index's size
(``index.html`` + ``data/cells.js``), and the index's load time in headless Chromium
(``data-ready-ms``: from navigation start until the cell table is rendered, read from
the rendered DOM; median of 3 cold starts).

    python bench/atlas.py [--units 100000] [--write]   # --write appends to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run_atlas(rec: Path, cells: Path, out: Path, extra: list[str] = ()) -> dict:
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "neuroprobe.cli", "atlas", str(rec), "--cells", str(cells), "--out",
                             str(out), "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(stderr)
    pages = int(re.search(r"\((\d+) unit pages", stdout).group(1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    files = sum(1 for p in out.rglob("*") if p.is_file())
    index = (out / "index.html").stat().st_size + (out / "data" / "cells.js").stat().st_size
    return dict(wall=wall, cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                rss_mb=peak / 2**20, pages=pages, size=size, files=files, index=index)


def index_ready(out: Path, n: int = 3) -> tuple[float, float, int]:
    """(median data-ready-ms, median chromium wall s, rows rendered) over ``n`` cold starts."""
    from neuroprobe.atlas.browser import dump_dom

    ready, wall, rows = [], [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        dom = dump_dom(out / "index.html", timeout=300)
        wall.append(time.perf_counter() - t0)
        ready.append(float(re.search(r'data-ready-ms="(\d+)"', dom).group(1)))
        body = dom.split('id="cells"', 1)[1].split("</tbody>", 1)[0]
        rows = body.count("<tr>")
    return float(np.median(ready)), float(np.median(wall)), rows


def organism(work: Path, rec: Path, cells: Path) -> tuple[Path, Path, str]:
    import neuroprobe as npb

    if not (rec.exists() and cells.exists()):
        rec, cells = work / "organism_digits_all.h5", work / "organism_cells.csv"
        subject = npb.load_subject("organism", device="cpu")
        r = npb.record(subject, npb.load_battery("digits"), rec, montage="all", overwrite=True, quiet=True)
        npb.concept_cells(r).to_csv(cells, index=False)
        r.close()
    with npb.open_recording(rec) as r:
        what = f"organism x digits: {len(r.site_names)} sites, {len(r.units):,} units, {len(r.stimuli):,} stimuli"
    return rec, cells, what


def synthetic(work: Path, units: int, sites: int, concepts: int, per_concept: int,
              reuse: bool = False) -> tuple[Path, Path, str, float]:
    from neuroprobe.analysis import concept_cells
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    forms = (("photo", "image"), ("drawing", "image"), ("written-name", "image"), ("text-name", "text"), ("text-def", "text"))
    stim = make_stimuli(concepts, per_concept, forms)
    width = units // sites
    conc = stim["concept"].str.slice(1).astype(int).to_numpy()
    rng0 = np.random.default_rng(0)
    tuned = {f"layer{s}": rng0.choice(width, size=width // 100, replace=False) for s in range(sites)}

    def rows(off: int, n: int) -> dict:
        rng = np.random.default_rng(off)
        out = {}
        for s in range(sites):
            x = rng.standard_normal((n, width)).astype(np.float32)
            t = tuned[f"layer{s}"]
            x[:, t] += 8.0 * (conc[off:off + n, None] == (t[None, :] % concepts))
            out[f"layer{s}"] = x
        return out

    rec, path = work / "synthetic.h5", work / "synthetic_cells.csv"
    if reuse and rec.exists() and path.exists():
        cells, t_cells = pd.read_csv(path, usecols=["is_cell"]), float("nan")
    else:
        write_recording(rec, stim, {f"layer{s}": width for s in range(sites)}, rows=rows, batch_size=64)
        t0 = time.perf_counter()
        cells = concept_cells(rec, n_perm=100)
        t_cells = time.perf_counter() - t0
        cells.to_csv(path, index=False)
    what = (f"synthetic: {sites} sites x {width:,} = {sites * width:,} units, {len(stim):,} stimuli "
            f"({concepts} concepts x 5 forms), 1% tuned; {int(cells['is_cell'].sum()):,} cells")
    return rec, path, what, t_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--concepts", type=int, default=20)
    ap.add_argument("--per-concept", type=int, default=20)
    ap.add_argument("--organism", type=Path, default=ROOT / "recordings" / "organism_digits_all.h5",
                    help="the quick start's recording (recorded here when missing)")
    ap.add_argument("--organism-cells", type=Path, default=ROOT / "figures" / "quickstart" / "cells_pretrained.csv")
    ap.add_argument("--work", type=Path, default=Path("/tmp/neuroprobe-bench-atlas"))
    ap.add_argument("--reuse", action="store_true", help="reuse the synthetic recording and cells table in --work")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    rec, cells, what = organism(args.work, args.organism, args.organism_cells)
    notes.append(what)
    r = run_atlas(rec, cells, args.work / "atlas_organism")
    r.update(zip(("ready_ms", "chromium_s", "rows"), index_ready(args.work / "atlas_organism")))
    rows.append(("organism", r))
    rec, cells, what, t_cells = synthetic(args.work, args.units, args.sites, args.concepts, args.per_concept, args.reuse)
    notes.append(what + (f" (cells table: {t_cells:.0f} s, not part of the atlas)" if np.isfinite(t_cells) else
                         " (recording and cells table reused from --work)"))
    r = run_atlas(rec, cells, args.work / "atlas_synthetic")
    r.update(zip(("ready_ms", "chromium_s", "rows"), index_ready(args.work / "atlas_synthetic")))
    rows.append((f"synthetic {args.units:,} units", r))

    load = os.getloadavg()[0]
    lines = [
        "", "## Atlas: time, size, index load (`bench/atlas.py`)", "",
        f"Run {dt.date.today()} on {platform.machine()}, {os.cpu_count()} CPUs (shared), load {load:.1f}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}.",
        *[f"- {n}" for n in notes], "",
        "| recording | atlas wall | CPU | peak RSS | unit pages | files | size | index + cells.js | index ready in Chromium | chromium run | rows rendered |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['wall']:.1f} s | {r['cpu']:.1f} s | {r['rss_mb']:.0f} MiB | {r['pages']:,} | {r['files']:,} | "
                     f"{r['size'] / 2**20:.1f} MiB | {r['index'] / 2**10:.0f} KiB | {r['ready_ms']:.0f} ms | "
                     f"{r['chromium_s']:.1f} s | {r['rows']} |")
    lines += ["", "Atlas time is the `neuroprobe atlas` command end to end (Python start-up and imports included); "
              "wall is several times CPU because the 2 cores were shared (load in the header); peak RSS is that process's (sampled every 20 ms). \"Index ready\" is the page's own clock "
              "(navigation start to the rendered cell table, which shows 200 rows at a time); \"chromium run\" is the "
              "whole headless browser start-up, render and exit. Median of 3 cold starts.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
