"""A lesion sweep in one process against the same sweep under ``torchrun --nproc-per-node 2`` (gloo, CPU).

    python bench/lesion_sweep.py [--concepts 5] [--draws 100] [--rounds 2] [--without-two-threads] [--append bench/RESULTS.md]

Each contender is the whole ``neuroprobe lesion`` command on the organism (committed weights, digits
battery) run as a fresh process (group): start-up, model load, the study's intact passes and the
sweep — per concept and mode (zero, mean) a dose-response at k = 1, 4, 16 with ``--draws`` fixed random
lesions and 10 keep-random complements per k, then each mode's forgetting matrix.  The same command with
one concept, k = 1, one random draw and no matrix gives the fixed cost (everything but the sweep).
Wall time and CPU time (user + system of every process of the command) are measured; the tables
(every CSV) of each contender are compared with those of one process at one thread, byte for byte.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the command and all its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _tables(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.csv"))}


def _largest_difference(a: bytes, b: bytes) -> float:
    """The largest |difference| between two CSV tables' numeric cells (same shape)."""
    import io

    import numpy as np
    import pandas as pd

    x, y = pd.read_csv(io.BytesIO(a)), pd.read_csv(io.BytesIO(b))
    num = [c for c in x.columns if pd.api.types.is_numeric_dtype(x[c])]
    d = np.abs(x[num].to_numpy(float) - y[num].to_numpy(float))
    return float(np.nanmax(d)) if d.size else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=5, help="how many of the digits' concepts to lesion (1-10)")
    ap.add_argument("--draws", type=int, default=100, help="fixed random lesions per concept, k and mode")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the table shows the best)")
    ap.add_argument("--without-two-threads", action="store_true",
                    help="skip one process at two threads (on a loaded machine its threads spin for minutes)")
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args()

    concepts = CONCEPTS[: args.concepts]
    base = ["lesion", "--model", "organism", "--probe", "digits", "--device", "cpu", "--mode", "zero,mean", "--quiet"]
    full = [*base, "--concept", ",".join(concepts), "--k", "1,4,16", "--random-draws", str(args.draws),
            "--keep-draws", "10"]
    fixed = [*base, "--concept", concepts[0], "--k", "1", "--random-draws", "1", "--keep-draws", "0", "--no-matrix"]
    n_lesions = len(concepts) * 2 * 3 * (3 + args.draws + 10) + 2 * len(CONCEPTS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one = [sys.executable, "-m", "neuroprobe"]
    contenders = [
        ("1 process, 1 thread (`OMP_NUM_THREADS=1`)", lambda: one, {"OMP_NUM_THREADS": "1"}),
        ("1 process, 2 threads", lambda: one, {"OMP_NUM_THREADS": "2"}),
        ("`torchrun --nproc-per-node 2` (gloo), 1 thread each", lambda: [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", _port(), "-m", "neuroprobe"], {"OMP_NUM_THREADS": "1"}),
    ]
    if args.without_two_threads:
        contenders = [c for c in contenders if c[0] != "1 process, 2 threads"]
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    tables: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, launcher, extra) in enumerate(contenders):
                for size, cmd in (("full", full), ("fixed", fixed)):
                    out = Path(tmp) / f"{i}-{size}-{r}"
                    w, c = _timed([*launcher(), *cmd, "--out", str(out)], {**env, **extra})
                    wall.setdefault((name, size), []).append(w)
                    cpu.setdefault((name, size), []).append(c)
                    if size == "full":
                        tables.setdefault(name, _tables(out))
                    print(f"round {r} {size} {name}: {w:.1f} s wall, {c:.1f} s CPU, load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
    load1 = os.getloadavg()
    ref = tables[contenders[0][0]]
    rows = []
    for name, _, _ in contenders:
        t = tables[name]
        same = sorted(t) == sorted(ref) and all(t[k] == ref[k] for k in ref)
        differ = [k for k in ref if t.get(k) != ref[k]]
        fw, xw = min(wall[(name, "full")]), min(wall[(name, "fixed")])
        fc, xc = min(cpu[(name, "full")]), min(cpu[(name, "fixed")])
        rows.append(f"| {name} | {fw:.1f} | {xw:.1f} | {fw - xw:.1f} | {fc:.1f} | {xc:.1f} | {fc - xc:.1f} | "
                    + ("byte-identical" if same else "differ, largest |difference| "
                       + f"{max(_largest_difference(ref[k], t[k]) for k in differ):.1e}") + " |")
    text = (
        f"Run {started} UTC on {platform.machine()}, {os.cpu_count()} CPUs (shared with other sessions), niceness "
        f"{os.nice(0)}; Python {platform.python_version()}. Load average (1, 5, 15 min) {load0[0]:.2f}, {load0[1]:.2f}, "
        f"{load0[2]:.2f} at the start and {load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f} at the end. Sweep: "
        f"organism x digits, concepts {', '.join(concepts)}; modes zero, mean; k = 1, 4, 16; {args.draws} random "
        f"and 10 keep-random lesions per k; both forgetting matrices (k = 16): {n_lesions:,} lesions. Best of "
        f"{args.rounds} interleaved rounds. Command: `python bench/lesion_sweep.py --concepts {args.concepts} "
        f"--draws {args.draws} --rounds {args.rounds}{' --without-two-threads' if args.without_two_threads else ''}`.\n\n"
        "| contender | wall s, sweep | wall s, fixed | wall s, sweep phase | CPU s, sweep | CPU s, fixed | "
        "CPU s, sweep phase | tables vs 1 process, 1 thread |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows) + "\n\n"
        "Every run: " + "; ".join(
            f"{name}: sweep {', '.join(f'{w:.1f}' for w in wall[(name, 'full')])} s wall / "
            f"{', '.join(f'{c:.1f}' for c in cpu[(name, 'full')])} s CPU, fixed "
            f"{', '.join(f'{w:.1f}' for w in wall[(name, 'fixed')])} s wall / "
            f"{', '.join(f'{c:.1f}' for c in cpu[(name, 'fixed')])} s CPU" for name, _, _ in contenders) + ".\n"
    )
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write("\n## Lesion sweeps under torchrun (`bench/lesion_sweep.py`)\n\n" + text)


if __name__ == "__main__":
    main()
