"""Benchmark: per-unit indices and the concept-cell criterion streamed from a large recording.

Writes a synthetic recording through neuroprobe's own writer (same layout and
chunking as ``neuroprobe record``): ``--sites`` sites x ``--units`` units each,
``--concepts`` x ``--per-concept`` stimuli in 5 forms (3 image, 2 text), half the
units rectified (many exact zeros, the tie path), 1% of units tuned to a concept.
Then it measures, each phase on its own:

1. ``unit_indices`` over the first ``--index-sites`` sites (default: all);
2. ``concept_cells`` (criterion, FDR, confirmation, invariance with 1000 permutations)
   over the first ``--cell-sites`` sites, twice, side by side: with exact rank-sum
   p-values where they can matter (the default) and with the normal approximation only
   (``exact=False``, the asymptotic-only path);
3. the same statistics computed unit by unit with scipy (``mannwhitneyu``,
   ``np.median``, ``scipy.stats.kurtosis``...) on ``--loop-units`` units already in
   memory (the per-unit loop a user would write), checked against phase 2's values.

Reports wall and CPU time, units/s, peak traced heap (tracemalloc) and peak RSS
growth (psutil, sampled every 10 ms), and extrapolates a partial phase to all units.
Results are appended to bench/RESULTS.md with ``--write``.

``--compare REF`` measures instead this checkout's ``concept_cells`` against an older one side
by side: ``REF`` is a folder holding a checkout, or a commit (checked out for the run with
``git worktree add --detach`` and removed after).  On the synthetic recording above (one site by
default there, ``--cell-sites``) and, with ``--organism FILE``, on the quick start's organism
recording (recorded first if the file does not exist) and any ``--recording FILE``, each round runs
``concept_cells`` once per
side, each in a fresh process (``PYTHONPATH`` = the checkout, one BLAS thread), alternating which
side goes first; a process reports the CPU time of the call.  The tables of both sides must be
equal (every column, exactly).  Medians over ``--rounds`` rounds give units per CPU-second and
their ratio (``--write``: a section of bench/RESULTS.md).

``--dask`` runs instead ``concept_cells`` side by side on one recording (10 sites x ``--units`` x 10,000
stimuli by default: 100,000 units, 4 GB): ``jobs=1`` (one process, no Dask), a 2-worker ``LocalCluster``
(``jobs=2``), and 2 single-threaded ``dask worker`` processes of a separately started ``dask scheduler``
(``client=``), each in a fresh process (one BLAS thread), plus, with ``--compare REF``, ``jobs=1`` of the
checkout ``REF`` (before the single-core speed-up).  It checks that every table is the same, exactly, and
reports wall and CPU time (driver + workers + scheduler), units per CPU-second, and the peak RSS of every
process (sampled every 20 ms with psutil).  The recording is deleted afterwards unless ``--keep``.

    python bench/cells.py --write            # 10 sites x 10k units x 10k stimuli (4 GB on disk)
    nice python bench/cells.py --dask --compare bd2d012 --write   # 100k units x 10k stimuli: jobs 1 / Dask
    python bench/cells.py --units 500 --sites 2 --per-concept 40   # a quick smoke run
    nice python bench/cells.py --compare bd2d012 --sites 1 --units 2000 --organism /tmp/organism.h5 --write
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
from scipy import stats  # noqa: E402

from neuroprobe.analysis import concept_cells, unit_indices  # noqa: E402
from neuroprobe.analysis.synthetic import make_stimuli, write_recording  # noqa: E402

FORMS = (("photo", "image"), ("drawing", "image"), ("written-name", "image"), ("text-name", "text"),
         ("text-definition", "text"))


class Peak:
    """Peak RSS growth (sampled) and peak traced heap during a ``with`` block."""

    def __init__(self, trace: bool = True) -> None:
        self.proc = psutil.Process()
        self.trace = trace

    def __enter__(self) -> "Peak":
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        if self.trace:
            tracemalloc.start()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        if self.trace:
            self.heap = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            self.heap = float("nan")
        self._stop.set()
        self._t.join()
        self.rss = self.peak - self.base


def generator(stimuli: pd.DataFrame, sites: int, units: int, seed: int):
    codes = stimuli["concept"].str[1:].astype(int).to_numpy()
    n_concepts = codes.max() + 1
    tuned = np.arange(0, units, 100)  # 1% of units per site
    concept_of = tuned % n_concepts

    def rows(off: int, m: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, off])
        out = {}
        for s in range(sites):
            x = rng.standard_normal((m, units), dtype=np.float32)
            x[:, tuned] += 8.0 * (codes[off : off + m, None] == concept_of[None, :])
            half = units // 2
            np.maximum(x[:, half:] - 0.5, 0.0, out=x[:, half:])
            out[f"layer{s:02d}"] = x
        return out

    return rows


def loop_reference(x: np.ndarray, st: pd.DataFrame, k: float = 5.0) -> pd.DataFrame:
    """The per-unit scipy loop: the criterion's statistics plus the indices, one unit at a time."""
    concepts = list(dict.fromkeys(st["concept"]))
    lab = st["concept"].to_numpy()
    scr = (st["split"] == "screening").to_numpy()
    test = ~scr
    forms = st["form"].to_numpy()
    rows = []
    for u in range(x.shape[1]):
        v = x[:, u].astype(np.float64)
        r = v - v.min()
        mu = np.array([r[lab == c].mean() for c in concepts])
        top = mu.argmax()
        row = dict(unit=u, si=(mu.max() - mu.mean()) / (mu.max() + mu.mean()),
                   si_morcos=(mu[top] - np.delete(mu, top).mean()) / (mu[top] + np.delete(mu, top).mean()),
                   lifetime_sparseness=(1 - r.mean() ** 2 / (r * r).mean()) / (1 - 1 / len(r)),
                   kurtosis=stats.kurtosis(v))
        best, best_p = None, np.inf
        for c in concepts:
            m = lab == c
            for name, s in (("scr", scr), ("test", test)):
                a, b = v[s & m], v[s & ~m]
                med, thr = np.median(a), b.mean() + k * b.std(ddof=1)
                p = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic").pvalue
                if name == "scr":
                    row[f"p:{c}"] = p
                    if med > thr and p < best_p:
                        best, best_p = c, p
        if best is not None:
            for f in dict.fromkeys(forms):
                s = test & (forms == f)
                a, b = v[s & (lab == best)], v[s & (lab != best)]
                row[f"auc_form:{f}"] = stats.mannwhitneyu(a, b).statistic / (len(a) * len(b))
        rows.append(row)
    return pd.DataFrame(rows)


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--units", type=int, default=10_000, help="units per site")
    ap.add_argument("--concepts", type=int, default=50)
    ap.add_argument("--per-concept", type=int, default=200)
    ap.add_argument("--index-sites", type=int, default=None, help="sites for phase 1 (default all)")
    ap.add_argument("--cell-sites", type=int, default=1, help="sites for phase 2")
    ap.add_argument("--loop-units", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/neuroprobe-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the recording")
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--compare", default=None, metavar="REF",
                    help="concept_cells of this checkout against REF (a folder or a git commit), side by side")
    ap.add_argument("--organism", type=Path, default=None, help="with --compare: also the organism's recording")
    ap.add_argument("--recording", type=Path, action="append", default=[],
                    help="with --compare: also this recording (repeatable)")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: rounds (one process per side each)")
    ap.add_argument("--dask", action="store_true", help="jobs 1 / LocalCluster / dask scheduler, side by side")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)  # RECORDING TABLE: one measured run
    ap.add_argument("--child-mode", default="one", help=argparse.SUPPRESS)  # one | local | ADDRESS
    ap.add_argument("--child-sites", type=int, default=0, help=argparse.SUPPRESS)  # the first N sites (0: all)
    ap.add_argument("--ref-sites", type=int, default=0,
                    help="with --dask --compare: the before/after pair on the first N sites only (0: all)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]), args.child_mode, args.child_sites)
    if args.dask:
        return dask_sides(args)
    if args.compare:
        return compare(args)

    st = make_stimuli(args.concepts, args.per_concept, forms=FORMS)
    n, total = len(st), args.sites * args.units
    names = [f"layer{s:02d}" for s in range(args.sites)]
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "bench.h5"
    print(f"recording: {args.sites} sites x {args.units:,} units = {total:,} units, {n:,} stimuli "
          f"({total * n * 4 / 2**30:.1f} GiB float32)", flush=True)
    with Peak(trace=False) as w:
        write_recording(path, st, {s: args.units for s in names}, rows=generator(st, args.sites, args.units, 0),
                        batch_size=32)
    print(f"  written in {w.wall:.1f} s ({path.stat().st_size / 2**30:.2f} GiB on disk)", flush=True)

    # 1. indices
    isites = names[: args.index_sites or args.sites]
    with Peak() as p1:
        ind = unit_indices(path, sites=isites)
    u1 = len(ind)
    print(f"indices: {u1:,} units in {p1.wall:.1f} s wall / {p1.cpu:.1f} s CPU = {u1 / p1.wall:,.0f} units/s; "
          f"peak heap {fmt_bytes(p1.heap)}, peak RSS growth {fmt_bytes(p1.rss)}", flush=True)

    # 2. concept cells: the asymptotic-only path, then the exact path (same sites, same process)
    csites = names[: args.cell_sites]
    with Peak() as p2a:
        asym = concept_cells(path, sites=csites, exact=False)
    print(f"concept_cells (asymptotic only): {len(asym):,} units in {p2a.wall:.1f} s wall / {p2a.cpu:.1f} s CPU; "
          f"peak heap {fmt_bytes(p2a.heap)}, peak RSS growth {fmt_bytes(p2a.rss)}; "
          f"{int(asym['is_cell'].sum())} cells", flush=True)
    with Peak() as p2:
        cells = concept_cells(path, sites=csites)
    u2 = len(cells)
    print(f"concept_cells (exact): {u2:,} units in {p2.wall:.1f} s wall / {p2.cpu:.1f} s CPU = {u2 / p2.wall:,.0f} units/s; "
          f"peak heap {fmt_bytes(p2.heap)}, peak RSS growth {fmt_bytes(p2.rss)}; "
          f"{int(cells['is_cell'].sum())} cells (planted {len(csites) * len(range(0, args.units, 100))}); "
          f"{cells.attrs['n_exact']:,} exact screening p-values, {cells.attrs['n_over_budget']:,} over the budget, "
          f"{cells.attrs['n_exact_test']:,} exact testing p-values; "
          f"ratio exact/asymptotic {p2.wall / p2a.wall:.2f}x wall, {p2.cpu / p2a.cpu:.2f}x CPU", flush=True)

    # 3. per-unit scipy loop on a subset already in memory
    from neuroprobe.recording.reader import open_recording

    with open_recording(path) as rec:
        x = np.asarray(rec.responses(names[0])[:, : args.loop_units], dtype=np.float32)
    t, c0 = time.perf_counter(), time.process_time()
    ref = loop_reference(x, st)
    t_loop, c_loop = time.perf_counter() - t, time.process_time() - c0
    per_loop = t_loop / args.loop_units
    mine = cells[cells["site"] == names[0]].set_index("unit").loc[: args.loop_units - 1]
    ok = ~mine["dead"].to_numpy()
    check = {name: float(np.nanmax(np.abs(ref[name].to_numpy()[ok] - mine[name].to_numpy()[ok])))
             for name in ("si", "si_morcos", "lifetime_sparseness", "kurtosis")}
    p_me = np.array([[mine.loc[u, "p"]] for u in mine.index[ok]])[:, 0]
    p_ref = np.array([ref.loc[u, f"p:{mine.loc[u, 'concept']}"] for u in mine.index[ok]])
    p_me = np.array([[mine.loc[u, "p_asymptotic"]] for u in mine.index[ok]])[:, 0]
    check["p (unit's concept)"] = float(np.nanmax(np.abs(np.log10(p_me) - np.log10(p_ref))))
    print(f"scipy loop: {args.loop_units} units in {t_loop:.1f} s = {per_loop * 1e3:.1f} ms/unit; "
          f"max |difference| vs streamed: {check}", flush=True)

    per_ind, per_cells = p1.wall / u1, p2.wall / u2
    est_ind, est_cells = per_ind * total, per_cells * total
    summary = dict(
        date=dt.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"load {os.getloadavg()[0]:.1f}", python=platform.python_version(), numpy=np.__version__,
        n_stimuli=n, units_total=total, write_s=w.wall, file_gib=path.stat().st_size / 2**30,
        indices_units=u1, indices_wall=p1.wall, indices_cpu=p1.cpu, indices_heap=p1.heap, indices_rss=p1.rss,
        cells_units=u2, cells_wall=p2.wall, cells_cpu=p2.cpu, cells_heap=p2.heap, cells_rss=p2.rss,
        loop_units=args.loop_units, loop_ms=per_loop * 1e3, loop_cpu=c_loop, est_ind=est_ind, est_cells=est_cells,
        loop_total=per_loop * total, check=check, passes=cells.attrs.get("passes", 0) // max(1, len(csites)),
        asym_wall=p2a.wall, asym_cpu=p2a.cpu, asym_heap=p2a.heap, asym_rss=p2a.rss,
        n_exact=cells.attrs["n_exact"], n_over=cells.attrs["n_over_budget"], n_exact_test=cells.attrs["n_exact_test"],
        n_tests=cells.attrs["n_tests"], cells_exact=int(cells["is_cell"].sum()), cells_asym=int(asym["is_cell"].sum()),
        uptime=os.popen("uptime").read().strip(),
    )
    print(f"extrapolated to {total:,} units: indices {est_ind:.0f} s, concept_cells {est_cells:.0f} s, "
          f"scipy loop {per_loop * total:.0f} s (ratio loop/streamed: indices+criterion "
          f"{per_loop / per_cells:.1f}x)", flush=True)
    if args.write:
        write_results(summary)
    if not args.keep:
        path.unlink()


def _usage() -> dict:
    """This process's CPU seconds and peak RSS (run on a Dask worker by ``client.run``)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return dict(cpu=r.ru_utime + r.ru_stime, maxrss=r.ru_maxrss * 1024, pid=os.getpid(),
                rss=psutil.Process().memory_info().rss)


def child(recording: Path, table: Path, mode: str = "one", n_sites: int = 0) -> None:
    """One measured ``concept_cells`` in this fresh process (``--child``): CPU seconds and the table.

    ``mode``: ``one`` (this process), ``local`` (a 2-worker ``LocalCluster`` started here, not timed), or the
    address of a running scheduler; then the CPU seconds of the workers during the call are added.
    """
    import neuroprobe

    workers_cpu, workers = 0.0, {}
    rss0 = psutil.Process().memory_info().rss
    sites = None
    if n_sites:
        from neuroprobe.recording.reader import open_recording

        with open_recording(recording) as rec:
            sites = rec.site_names[:n_sites]
    if mode == "one":
        t, c = time.perf_counter(), time.process_time()
        cells = concept_cells(recording, sites=sites)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
    else:
        import contextlib

        from neuroprobe.analysis.parallel import cluster

        t0 = time.perf_counter()
        with (cluster(2) if mode == "local" else cluster(scheduler=mode)) as client:
            start = time.perf_counter() - t0
            before = client.run(_usage)
            t, c = time.perf_counter(), time.process_time()
            cells = concept_cells(recording, client=client, sites=sites)
            cpu, wall = time.process_time() - c, time.perf_counter() - t
            after = client.run(_usage)
            workers = {a: dict(cpu=after[a]["cpu"] - before[a]["cpu"], maxrss=after[a]["maxrss"], pid=after[a]["pid"],
                               rss0=before[a]["rss"]) for a in after}
            workers_cpu = sum(w["cpu"] for w in workers.values())
            with contextlib.suppress(Exception):
                client.run(lambda: __import__("gc").collect())
    frame = cells.copy()
    frame.attrs = {}
    frame.to_parquet(table, index=False)
    print(json.dumps(dict(cpu=cpu, wall=wall, units=len(cells), cells=int(cells["is_cell"].sum()),
                          n_exact=int(cells.attrs.get("n_exact", 0)), package=neuroprobe.__file__,
                          workers=workers, workers_cpu=workers_cpu, driver_cpu=cpu,
                          start=start if mode != "one" else 0.0, pid=os.getpid(), rss0=rss0)))


def checkout(ref: str, tmp: Path) -> tuple[Path, str, bool]:
    """A folder with the code of ``ref`` (a folder, or a commit checked out as a detached worktree)."""
    if Path(ref).is_dir():
        root = Path(ref).resolve()
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or str(root)
        return root, rev, False
    root = tmp / "reference"
    subprocess.run(["git", "worktree", "add", "--detach", str(root), ref], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parent)
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return root, rev, True


def side_env(root: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(root), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run_side(root: Path, recording: Path, table: Path, mode: str = "one", watch: "Watch | None" = None,
             n_sites: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(recording), str(table), "--child-mode", mode,
           "--child-sites", str(n_sites)]
    proc = subprocess.Popen(cmd, env=side_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if watch is not None:
        watch.add(proc.pid, "driver", children=True)
    stdout, stderr = proc.communicate()
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if out.returncode:
        raise SystemExit(f"the run with {root} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(root):
        raise SystemExit(f"the run meant for {root} imported {result['package']}")
    return result


def compare(args: argparse.Namespace) -> None:
    """``--compare``: this checkout against a reference checkout, side by side (see the module docstring)."""
    here = Path(__file__).resolve().parents[1]
    args.dir.mkdir(parents=True, exist_ok=True)
    recordings: dict[str, tuple[str, Path]] = {}  # label -> (description, file)
    if args.cell_sites and args.units:
        st = make_stimuli(args.concepts, args.per_concept, forms=FORMS)
        sites = [f"layer{s:02d}" for s in range(args.cell_sites)]
        path = args.dir / "compare.h5"
        write_recording(path, st, {s: args.units for s in sites}, rows=generator(st, len(sites), args.units, 0),
                        batch_size=32)
        recordings["synthetic"] = (f"synthetic (`bench/cells.py` generator): {len(sites)} site(s) x {args.units:,} "
                                   f"units, {len(st):,} stimuli ({args.concepts} concepts x {args.per_concept}, "
                                   f"5 forms)", path)
    if args.organism is not None:
        if not args.organism.exists():
            import neuroprobe as npb

            npb.record(npb.load_subject("organism", device="cpu"), npb.load_battery("digits"), args.organism,
                       montage="all", quiet=True).close()
        recordings["organism"] = ("organism, digits battery, every site (the quick start's recording)", args.organism)
    for path in args.recording:
        from neuroprobe.recording.reader import open_recording

        with open_recording(path) as rec:
            recordings[path.name] = (f"`{path.name}`: {rec.attrs.get('subject')} ({rec.attrs.get('init')}), "
                                     f"{rec.attrs.get('battery')} battery, {len(rec.site_names)} sites", path)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ref_root, ref_rev, made = checkout(args.compare, tmp)
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "neuroprobe"],
                                    capture_output=True, text=True).stdout.strip())
        sides = {"before": ref_root, "after": here}
        try:
            for name, (description, rec) in recordings.items():
                cpu: dict[str, list[float]] = {"before": [], "after": []}
                wall: dict[str, list[float]] = {"before": [], "after": []}
                info: dict[str, dict] = {}
                for r in range(args.rounds):
                    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                    for side in order:
                        res = run_side(sides[side], rec, tmp / f"{side}.parquet")
                        cpu[side].append(res["cpu"])
                        wall[side].append(res["wall"])
                        info[side] = res
                    if r == 0:  # the same table, every column, exactly
                        pd.testing.assert_frame_equal(pd.read_parquet(tmp / "after.parquet"),
                                                      pd.read_parquet(tmp / "before.parquet"), check_exact=True)
                    print(f"{name}: round {r + 1}: CPU s before {cpu['before'][-1]:.2f}, after {cpu['after'][-1]:.2f}",
                          flush=True)
                units = info["after"]["units"]
                med = {side: float(np.median(v)) for side, v in cpu.items()}
                rows.append(dict(label=name, recording=description, units=units, cells=info["after"]["cells"],
                                 n_exact=info["after"]["n_exact"], cpu_before=med["before"], cpu_after=med["after"],
                                 wall_before=float(np.median(wall["before"])), wall_after=float(np.median(wall["after"])),
                                 ups_before=units / med["before"], ups_after=units / med["after"],
                                 ratio=med["before"] / med["after"], all_before=cpu["before"], all_after=cpu["after"]))
                print(f"{name}: {units:,} units, median CPU {med['before']:.2f} s -> {med['after']:.2f} s: "
                      f"{units / med['before']:,.0f} -> {units / med['after']:,.0f} units per CPU-second "
                      f"({med['before'] / med['after']:.2f}x); tables equal", flush=True)
        finally:
            if made:
                subprocess.run(["git", "worktree", "remove", "--force", str(ref_root)], capture_output=True,
                               cwd=Path(__file__).resolve().parent)
    summary = dict(date=dt.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                   python=platform.python_version(), numpy=np.__version__, ref=ref_rev,
                   head=head + (" + uncommitted changes" if dirty else ""), rounds=args.rounds, rows=rows,
                   uptime=os.popen("uptime").read().strip(), nice=os.nice(0),
                   command="python bench/cells.py " + " ".join(sys.argv[1:]))
    if args.write:
        write_compare_results(summary)


class Watch:
    """Peak RSS of processes (and, for some, their descendants), sampled every 20 ms with psutil."""

    def __init__(self) -> None:
        self.roots: dict[int, tuple[str, bool]] = {}
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def add(self, pid: int, role: str, children: bool = False) -> None:
        with self._lock:
            self.roots[pid] = (role, children)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                roots = dict(self.roots)
            for pid, (role, children) in roots.items():
                try:
                    proc = psutil.Process(pid)
                    procs = [(proc, role)] + ([(c, role + "/child") for c in proc.children(recursive=True)]
                                              if children else [])
                except psutil.Error:
                    continue
                for pr, r in procs:
                    try:
                        rss = pr.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peak[pr.pid] = max(self.peak.get(pr.pid, 0), rss)
                    self.role.setdefault(pr.pid, r)
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_scheduler(root: Path, folder: Path, watch: Watch) -> tuple[str, list[subprocess.Popen]]:
    """A ``dask scheduler`` and two ``dask worker --nthreads 1`` processes on this machine (this checkout's code)."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    dask = dask if Path(dask).exists() else "dask"
    env = side_env(root)
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    watch.add(procs[0].pid, "scheduler")
    for i in range(2):
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                       "--name", f"w{i}", "--local-directory", str(folder / f"w{i}")],
                                      env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        watch.add(procs[-1].pid, f"dask worker w{i}")
    deadline = time.time() + 120
    while True:
        try:
            with Client(address, timeout=5, set_as_default=False) as client:
                client.wait_for_workers(2, timeout=max(1.0, deadline - time.time()))
                return address, procs
        except (OSError, TimeoutError):
            if time.time() > deadline:
                raise SystemExit("the dask scheduler and workers did not start")
            time.sleep(0.5)


def stop(procs: list[subprocess.Popen]) -> None:
    """End the processes this benchmark started (workers before their scheduler), by pid."""
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def dask_sides(args: argparse.Namespace) -> None:
    """``--dask``: jobs 1, a 2-worker LocalCluster and a separately started scheduler, side by side."""
    import shutil

    here = Path(__file__).resolve().parents[1]
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    st = make_stimuli(args.concepts, args.per_concept, forms=FORMS)
    n, total = len(st), args.sites * args.units
    need = total * n * 4
    if need * 1.2 > free:
        raise SystemExit(f"{args.dir} has {free / 2**30:.1f} GiB free; the recording needs {need / 2**30:.1f} GiB: "
                         f"use fewer --units")
    names = [f"layer{s:02d}" for s in range(args.sites)]
    path = args.dir / "dask.h5"
    print(f"recording: {args.sites} sites x {args.units:,} units = {total:,} units, {n:,} stimuli "
          f"({need / 2**30:.1f} GiB float32; {free / 2**30:.0f} GiB free in {args.dir})", flush=True)
    t = time.perf_counter()
    write_recording(path, st, {s: args.units for s in names}, rows=generator(st, args.sites, args.units, 0),
                    batch_size=32)
    write_s = time.perf_counter() - t
    print(f"  written in {write_s:.0f} s ({path.stat().st_size / 2**30:.2f} GiB on disk)", flush=True)
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "neuroprobe"],
                                capture_output=True, text=True).stdout.strip())
    watch = Watch()
    rows: list[dict] = []
    loads = {}
    procs: list[subprocess.Popen] = []
    made_ref = None
    tables = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        try:
            sides = [("jobs 1 (one process, no Dask)", here, "one", 0),
                     ("2-worker LocalCluster (jobs 2)", here, "local", 0),
                     ("2 workers of a separately started dask scheduler", here, "scheduler", 0)]
            if args.compare:
                ref_root, ref_rev, made = checkout(args.compare, tmp)
                made_ref = ref_root if made else None
                sub = args.ref_sites if 0 < args.ref_sites < args.sites else 0
                part = f", first {sub} sites" if sub else ""
                if sub:
                    sides.append((f"jobs 1{part} (this code)", here, "one", sub))
                sides.append((f"jobs 1{part} at main {ref_rev} (before the single-core speed-up)", ref_root, "one", sub))
            for label, root, mode, n_sites in sides:
                if mode == "scheduler":
                    address, procs = start_scheduler(root, tmp, watch)
                    sched = psutil.Process(procs[0].pid)
                    sched_cpu0 = sum(sched.cpu_times()[:2])
                    mode = address
                loads[label] = os.getloadavg()
                table = tmp / f"side{len(rows)}.parquet"
                print(f"{label}: running (load {loads[label][0]:.2f})", flush=True)
                res = run_side(root, path, table, mode=mode, watch=watch, n_sites=n_sites)
                extra = 0.0
                if mode not in ("one", "local"):
                    extra = sum(sched.cpu_times()[:2]) - sched_cpu0
                    stop(procs)
                    procs = []
                tables[label] = (table, n_sites)
                drv = res["pid"]
                worker_peaks, worker_rss0 = {}, []
                for w in res["workers"].values():
                    worker_peaks[w["pid"]] = max(watch.peak.get(w["pid"], 0), w["maxrss"])
                    worker_rss0.append(w["rss0"])
                cpu = res["driver_cpu"] + res["workers_cpu"] + extra
                rows.append(dict(label=label, units=res["units"], cells=res["cells"], wall=res["wall"], cpu=cpu,
                                 driver_cpu=res["driver_cpu"], workers_cpu=res["workers_cpu"], scheduler_cpu=extra,
                                 ups=res["units"] / cpu, start=res["start"], driver_peak=watch.peak.get(drv, 0),
                                 worker_peaks=sorted(worker_peaks.values()), driver_rss0=res["rss0"],
                                 worker_rss0=sorted(worker_rss0),
                                 worker_cpus=sorted(w["cpu"] for w in res["workers"].values()),
                                 load=loads[label]))
                print(f"{label}: {res['units']:,} units, wall {res['wall']:.1f} s, CPU {cpu:.1f} s "
                      f"(driver {res['driver_cpu']:.1f}, workers {res['workers_cpu']:.1f}, scheduler {extra:.1f}) = "
                      f"{res['units'] / cpu:,.0f} units/CPU-s; peak RSS driver {fmt_bytes(watch.peak.get(drv, 0))}, "
                      f"workers {', '.join(fmt_bytes(v) for v in sorted(worker_peaks.values())) or '-'}", flush=True)
            firsts: dict[int, pd.DataFrame] = {}
            for label, (table, n_sites) in tables.items():  # each table against the first one over the same sites
                frame = pd.read_parquet(table)
                if n_sites not in firsts:
                    firsts[n_sites] = frame
                else:
                    pd.testing.assert_frame_equal(frame, firsts[n_sites], check_exact=True)
            if 0 in firsts and len(firsts) > 1:  # the subset's rows are those of the whole recording
                sub = min(k for k in firsts if k)
                whole = firsts[0][firsts[0]["site"].isin(names[:sub])].reset_index(drop=True)
                same = [c for c in ("site", "unit", "concept", "z", "p", "p_asymptotic", "median") if c in whole]
                pd.testing.assert_frame_equal(firsts[sub][same], whole[same], check_exact=True)
            print("tables equal, every column exactly", flush=True)
        finally:
            watch.close()
            stop(procs)
            if made_ref is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(made_ref)], capture_output=True,
                               cwd=Path(__file__).resolve().parent)
            if not args.keep:
                path.unlink(missing_ok=True)
    summary = dict(date=dt.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                   python=platform.python_version(), numpy=np.__version__, head=head + (" + uncommitted changes" if dirty
                                                                                      else ""),
                   sites=args.sites, units=args.units, total=total, n_stimuli=n, gib=need / 2**30, write_s=write_s,
                   rows=rows, uptime=os.popen("uptime").read().strip(), nice=os.nice(0),
                   command="python bench/cells.py " + " ".join(sys.argv[1:]))
    if args.write:
        write_dask_results(summary)


def write_dask_results(s: dict) -> None:
    out = Path(__file__).with_name("RESULTS.md")
    text = out.read_text()
    head = "## Concept cells on Dask (`bench/cells.py --dask`)"
    lines = [f"| {r['label']} | {r['units']:,} | {r['cells']} | {r['wall']:.0f} s | {r['cpu']:.0f} s "
             f"({r['driver_cpu']:.0f} + {r['workers_cpu']:.0f} + {r['scheduler_cpu']:.0f}) | **{r['ups']:,.0f}** | "
             f"{fmt_bytes(r['driver_peak'])} ({fmt_bytes(r['driver_rss0'])}) | "
             f"{', '.join(fmt_bytes(v) for v in r['worker_peaks']) or '-'}"
             f"{' (' + ', '.join(fmt_bytes(v) for v in r['worker_rss0']) + ')' if r['worker_rss0'] else ''} | "
             f"{r['load'][0]:.2f} |" for r in s["rows"]]
    section = f"""{head}

Run {s['date']} on {s['machine']}, niceness {s['nice']}; Python {s['python']}, numpy {s['numpy']}; code `{s['head']}`.
Synthetic recording written with neuroprobe's writer: {s['sites']} sites x {s['units']:,} units = {s['total']:,} units x
{s['n_stimuli']:,} stimuli, float32, {s['gib']:.1f} GiB (written in {s['write_s']:.0f} s, under /tmp, deleted after).
`concept_cells(recording)` with its defaults (exact p-values, 1000 invariance permutations, 256 MiB read buffer),
each side in a fresh process with one BLAS thread, one after the other in one run. CPU = driver + workers +
scheduler during the call (cluster start-up not counted: the LocalCluster took {s['rows'][1]['start']:.1f} s to start).
Peak RSS sampled every 20 ms with psutil (workers: also their `ru_maxrss`); in brackets, the RSS just before the
call (imports, and for the forked LocalCluster workers the pages shared with their parent). Every table equal to the first
one over the same sites (`jobs 1`), every column exactly (a subset's per-unit statistics before the FDR also equal
those of the whole recording). Command: `{s['command']}`.

| side | units | cells | wall | CPU (driver + workers + scheduler) | units / CPU-s | peak RSS driver | peak RSS per worker | load (1 min) at start |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

`uptime` at the end: {s['uptime']}.

"""
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        first = text.find("\n## ")
        text = text[: first + 1] + section + text[first + 1:] if first != -1 else text.rstrip() + "\n\n" + section
    out.write_text(text)
    print(f"wrote {out}")


def write_compare_results(s: dict) -> None:
    out = Path(__file__).with_name("RESULTS.md")
    text = out.read_text()
    head = "## Concept cells on one core, before and after (`bench/cells.py --compare`)"
    lines = [f"| {r['recording']} | {r['units']:,} | {r['n_exact']:,} | {r['cells']} | {r['cpu_before']:.2f} s | "
             f"{r['cpu_after']:.2f} s | {r['ups_before']:,.0f} | {r['ups_after']:,.0f} | **{r['ratio']:.2f}x** |"
             for r in s["rows"]]
    every = "; ".join(f"{r['label']}: before " + ", ".join(f"{v:.2f}" for v in r["all_before"])
                      + ", after " + ", ".join(f"{v:.2f}" for v in r["all_after"]) for r in s["rows"])
    section = f"""{head}

Run {s['date']} on {s['machine']}, niceness {s['nice']}; Python {s['python']}, numpy {s['numpy']}.
`concept_cells(recording)` with its defaults (exact p-values, 1000 invariance permutations), one BLAS
thread, each run in a fresh process; before = main `{s['ref']}`, after = `{s['head']}`; {s['rounds']} rounds,
alternating which side runs first; medians of the CPU time of the call. The tables of both sides were equal,
every column exactly. Command: `{s['command']}`.

| recording | units | exact p (screening) | cells | CPU before | CPU after | units / CPU-s before | after | ratio |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

CPU seconds of every run: {every}. `uptime` at the end: {s['uptime']}.

"""
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        first = text.find("\n## ")
        text = text[: first + 1] + section + text[first + 1:] if first != -1 else text.rstrip() + "\n\n" + section
    out.write_text(text)
    print(f"wrote {out}")


def write_results(s: dict) -> None:
    out = Path(__file__).with_name("RESULTS.md")
    text = out.read_text() if out.exists() else "# Benchmarks\n\nEach section is written by its benchmark script.\n"
    head = "## Concept cells: indices and criterion streamed from disk (`bench/cells.py`)"
    section = f"""{head}

Run {s['date']} on {s['machine']}; Python {s['python']}, numpy {s['numpy']}.
Synthetic recording written with neuroprobe's writer (the layout of `neuroprobe record`):
{s['units_total']:,} units (10 sites) x {s['n_stimuli']:,} stimuli, float32, {s['file_gib']:.2f} GiB on disk
(written in {s['write_s']:.0f} s); 50 concepts x 5 forms, half the units rectified (ties), 1% tuned.

| phase | units | wall | CPU | units/s | peak heap (tracemalloc) | peak RSS growth |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| `unit_indices` (SI, Morcos SI, sparseness, kurtosis, class means, d'/AUC) | {s['indices_units']:,} | {s['indices_wall']:.0f} s | {s['indices_cpu']:.0f} s | {s['indices_units'] / s['indices_wall']:,.0f} | {fmt_bytes(s['indices_heap'])} | {fmt_bytes(s['indices_rss'])} |
| `concept_cells(exact=False)`: the asymptotic-only path (screening/testing rank-sum for every unit x concept by the normal approximation, FDR, confirmation, invariance with 1000 permutations, LOFO) | {s['cells_units']:,} | {s['asym_wall']:.0f} s | {s['asym_cpu']:.0f} s | {s['cells_units'] / s['asym_wall']:,.0f} | {fmt_bytes(s['asym_heap'])} | {fmt_bytes(s['asym_rss'])} |
| `concept_cells` (default: + exact permutation p-values where they can matter) | {s['cells_units']:,} | {s['cells_wall']:.0f} s | {s['cells_cpu']:.0f} s | {s['cells_units'] / s['cells_wall']:,.0f} | {fmt_bytes(s['cells_heap'])} | {fmt_bytes(s['cells_rss'])} |
| per-unit scipy loop (same statistics without permutations, data already in RAM) | {s['loop_units']} | {s['loop_ms'] * s['loop_units'] / 1e3:.1f} s | {s['loop_cpu']:.1f} s | {1e3 / s['loop_ms']:,.1f} | | |

{'Measured on all' if s['indices_units'] == s['units_total'] else 'Extrapolated (linearly) to all'} {s['units_total']:,} units: `unit_indices` {s['est_ind'] / 60:.1f} min; extrapolated:
`concept_cells` {s['est_cells'] / 60:.1f} min, the scipy loop {s['loop_total'] / 3600:.1f} h.  Each site is read in
{s['passes']} pass(es) through the 256 MiB read buffer.  Per unit, the streamed criterion is
**{s['loop_ms'] / 1e3 / (s['cells_wall'] / s['cells_units']):.0f}x** faster than the loop in wall time
({s['loop_cpu'] / s['loop_units'] / (s['cells_cpu'] / s['cells_units']):.0f}x in CPU time) while also running the
invariance permutations the loop skips.  Wall is {s['cells_wall'] / s['cells_cpu']:.0f}x CPU because the 2 cores were
shared with other jobs (load in the header): compare CPU times.  Peak memory is the read buffer plus the
block temporaries (~10 float64 arrays of 16 MiB), independent of the number of units
and of the file size.
Exact p-values against the asymptotic-only path, measured side by side in one process: **{s['cells_wall'] / s['asym_wall']:.2f}x**
wall time ({s['cells_cpu'] / s['asym_cpu']:.2f}x CPU), peak heap {fmt_bytes(s['cells_heap'])} vs {fmt_bytes(s['asym_heap'])};
{s['n_exact']:,} of {s['n_tests']:,} screening tests got the exact p (every one with asymptotic p <= 0.01 whose
deficit program fits the budget; {s['n_over']:,} were over it and kept the normal approximation), plus
{s['n_exact_test']:,} testing p-values; cells found: {s['cells_exact']} exact, {s['cells_asym']} asymptotic-only.
`uptime` at the end: {s['uptime']}.
Agreement with the loop on its units (max |difference|): {', '.join(f'{k} {v:.1e}' for k, v in s['check'].items())}
(p compared as |log10 p|, the normal approximation on both sides).

"""
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
