"""SAE training: the cost of ``neuroprobe sae train`` and neuroprobe's trainer against SAELens' and sparsify's.

    python bench/sae.py cost [--stimuli 2500,10000,40000] [--features 3072] [--epochs 3] [--append bench/RESULTS.md]
    python bench/sae.py libraries --recording REC.h5 --site S [--features 1536] [--k 32] [--epochs 20] [--append ...]
    python bench/sae.py roundtrip --sae DIR --recording REC.h5 --site S [--append ...]

``cost`` writes synthetic recordings of N stimuli x 1,536 units with neuroprobe's own
writer (rows: sparse non-negative codes over 4,096 random directions plus noise) and
runs ``neuroprobe sae train`` on each in a fresh process, reading that process's wall
time, CPU time (user + system) and peak RSS from ``wait4``; memory should not grow
with N (the trainer streams blocks of --block-mb).

``libraries`` needs ``sae-lens`` and ``eai-sparsify`` importable (they are not
neuroprobe dependencies: run it in a separate environment).  On the same rows (the
site's per-token traces, read once into memory), the same dictionary size, k, batch,
number of steps and learning rate, it trains a TopK SAE with neuroprobe's trainer,
with SAELens' ``SAETrainer`` (``TopKTrainingSAE``, rows fed by a data provider) and
with sparsify's ``SparseCoder`` (its forward's FVU + AuxK loss, decoder renormalised
and parallel gradient removed as its trainer does, Adam); each result is saved by its
own library, loaded back by ``neuroprobe.sae.load_sae`` and scored by one function:
FVE, L0 and dead features over every row.
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def header(title: str) -> list[str]:
    load = os.getloadavg()[0]
    return [f"## {title}", "",
            f"Run {dt.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} CPUs (shared), load {load:.1f}; "
            f"Python {platform.python_version()}.", ""]


# ------------------------------------------------------------------ cost


def synthetic(path: Path, n: int, d_in: int = 1536, atoms: int = 4096, k: int = 24, seed: int = 0) -> None:
    from neuroprobe.analysis.synthetic import make_stimuli, write_recording

    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(atoms, d_in)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

    def rows(offset: int, m: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng([seed, offset])
        idx = np.argsort(r.random((m, atoms)), axis=1)[:, :k]  # k distinct directions per row
        w = r.exponential(1.0, (m, k)).astype(np.float32)
        return {"site": np.einsum("mk,mkd->md", w, dirs[idx]) + 0.05 * r.normal(size=(m, d_in)).astype(np.float32)}

    stim = make_stimuli(max(1, n // 10), 10, forms=(("text-name", "text"),)).iloc[:n]
    write_recording(path, stim, {"site": d_in}, rows=rows, batch_size=256)


def run_wait4(cmd: list[str]) -> tuple[float, float, float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        out, err = so.read(), se.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, out


def cost(args: argparse.Namespace) -> list[str]:
    lines = header("SAE training cost: `neuroprobe sae train` streamed from disk (`bench/sae.py cost`)")
    lines += [f"Synthetic recordings written with neuroprobe's writer: N stimuli x 1,536 units (float32), rows = "
              f"sparse codes (24 of 4,096 random directions, exponential weights) + noise. `neuroprobe sae train "
              f"--features {args.features} --k {args.k} --epochs E --batch-size 1024 --block-mb {args.block_mb}` in a fresh "
              f"process (`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`); wall, CPU (user+system) and peak RSS "
              f"of that process from `wait4`. Baseline: the same interpreter importing neuroprobe's trainer and its "
              f"libraries only.", "",
              "| stimuli | file | epochs | steps | wall | CPU | peak RSS | FVE | L0 | dead features |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = run_wait4([sys.executable, "-c", "import neuroprobe.sae.train, neuroprobe.recording.reader, torch, pandas, h5py"])
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.stimuli:
            rec = Path(tmp) / f"syn{n}.h5"
            t0 = time.perf_counter()
            synthetic(rec, n)
            written = time.perf_counter() - t0
            epochs = args.epochs if n <= 10000 else max(args.epochs * 10000 / n, 0.25)
            out = Path(tmp) / f"sae{n}"
            wall, cpu, rss, _ = run_wait4([sys.executable, "-m", "neuroprobe.cli", "sae", "train", str(rec), "--site", "site",
                                           "--features", str(args.features), "--k", str(args.k), "--epochs", f"{epochs:g}",
                                           "--batch-size", "1024", "--block-mb", str(args.block_mb), "--out", str(out), "-q"])
            s = json.loads((out / "training.json").read_text())
            lines.append(f"| {n:,} | {rec.stat().st_size / 2**20:.0f} MiB (written in {written:.0f} s) | {epochs:g} | {s['steps']} | "
                         f"{wall:.1f} s | {cpu:.1f} s | {rss:.0f} MiB | {s['fve']:.3f} | {s['l0']:.1f} | {s['dead']} |")
            print(lines[-1], flush=True)
    lines += ["", f"Baseline process (imports only): peak RSS {base[2]:.0f} MiB, {base[1]:.1f} s CPU. "
              f"Epochs are cut above 10,000 stimuli to keep the run short (the same number of steps as 10,000 stimuli); "
              f"the peak RSS column is what grows or not with the number of stimuli.", ""]
    return lines


# ------------------------------------------------------------- libraries


def rows_of(recording: Path, site: str) -> np.ndarray:
    from neuroprobe.recording.reader import open_recording
    from neuroprobe.sae.train import RowSource

    with open_recording(recording) as rec:
        return np.concatenate(list(RowSource(rec, site).iter_blocks()))


def score(folder: Path, x: np.ndarray) -> dict[str, float]:
    import torch

    from neuroprobe.sae import load_sae

    sae = load_sae(folder)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        f = sae.encode(xt)
        sse = float(((sae.decode(f) - xt).double() ** 2).sum())
    sst = float(((x.astype(np.float64) - x.mean(0)) ** 2).sum())
    return {"fve": 1 - sse / sst, "l0": float((f > 0).sum(-1).float().mean()), "dead": int(((f > 0).sum(0) == 0).sum()),
            "format": sae.meta["format"]}


def libraries(args: argparse.Namespace) -> list[str]:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    x = rows_of(args.recording, args.site)
    n, d_in = x.shape
    steps = int(args.epochs * int(np.ceil(n / args.batch_size)))
    lr = args.lr
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        # neuroprobe (from disk, as the CLI does)
        from neuroprobe.recording.reader import open_recording
        from neuroprobe.sae.train import TrainConfig, train_sae, write_result

        t0, c0 = time.perf_counter(), time.process_time()
        with open_recording(args.recording) as rec:
            res = train_sae(rec, args.site, TrainConfig(features=args.features, k=args.k, epochs=args.epochs,
                                                        batch_size=args.batch_size, lr=lr, seed=0))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_result(res, tmp / "neuroprobe")
        results.append(("neuroprobe (streamed from the HDF5 file)", wall, cpu, res.summary["steps"], score(tmp / "neuroprobe", x)))

        # SAELens
        import sae_lens
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.features, k=args.k))
        xt = torch.from_numpy(x)

        def provider():
            g = torch.Generator().manual_seed(0)
            while True:
                perm = torch.randperm(n, generator=g)
                for a in range(0, n - args.batch_size + 1, args.batch_size):
                    yield xt[perm[a : a + args.batch_size]]

        cfg = SAETrainerConfig(total_training_samples=steps * args.batch_size, train_batch_size_samples=args.batch_size,
                               lr=lr, lr_end=0.0, lr_scheduler_name="constant", lr_decay_steps=steps // 5, device="cpu",
                               dead_feature_window=max(1, n // args.batch_size), feature_sampling_window=10**9,
                               n_batches_for_norm_estimate=10)
        t0, c0 = time.perf_counter(), time.process_time()
        trained = SAETrainer(cfg, sae, provider()).fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trained.save_inference_model(tmp / "saelens") if hasattr(trained, "save_inference_model") else trained.save_model(tmp / "saelens")
        results.append((f"SAELens {sae_lens.__version__} (`SAETrainer`, TopKTrainingSAE, rows in memory)", wall, cpu, steps,
                        score(tmp / "saelens", x)))

        # sparsify
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        coder = SparseCoder(d_in, SparseCoderConfig(num_latents=args.features, k=args.k))
        with torch.no_grad():
            coder.b_dec.copy_(torch.from_numpy(x.mean(0)))
        opt = torch.optim.Adam(coder.parameters(), lr=lr)
        last = torch.zeros(args.features, dtype=torch.long)
        seen = 0
        g = torch.Generator().manual_seed(0)
        t0, c0 = time.perf_counter(), time.process_time()
        step = 0
        while step < steps:
            perm = torch.randperm(n, generator=g)
            for a in range(0, n, args.batch_size):
                if step >= steps:
                    break
                xb = xt[perm[a : a + args.batch_size]]
                dead = (seen - last) > n
                out = coder(xb, dead_mask=dead if seen > n else None)
                loss = out.fvu + (1 / 32) * out.auxk_loss
                opt.zero_grad()
                loss.backward()
                coder.remove_gradient_parallel_to_decoder_directions()
                opt.step()
                coder.set_decoder_norm_to_unit_norm()
                seen += len(xb)
                last[out.latent_indices.flatten().unique()] = seen
                step += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        coder.save_to_disk(tmp / "sparsify")
        results.append((f"eai-sparsify {version('eai-sparsify')} (`SparseCoder`, FVU + AuxK, Adam, rows in memory)", wall, cpu,
                        steps, score(tmp / "sparsify", x)))

    lines = header("SAE trainers on the same rows: neuroprobe, SAELens, sparsify (`bench/sae.py libraries`)")
    lines += [f"Rows: {n:,} per-token traces x {d_in} units of `{args.site}` from `{Path(args.recording).name}`. TopK, "
              f"{args.features} features, k={args.k}, batch {args.batch_size}, {steps} steps, Adam lr {lr:g}, torch threads "
              f"{torch.get_num_threads()}. Every SAE is saved by its own library and scored after loading with "
              f"`neuroprobe.sae.load_sae` (FVE, L0, dead = never active, over all rows).", "",
              "| trainer | wall | CPU | steps | FVE | L0 | dead features | saved as |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, wall, cpu, st, s in results:
        lines.append(f"| {name} | {wall:.1f} s | {cpu:.1f} s | {st} | {s['fve']:.4f} | {s['l0']:.1f} | {s['dead']} | {s['format']} |")
    lines.append("")
    print("\n".join(lines))
    return lines


def roundtrip(args: argparse.Namespace) -> list[str]:
    """An SAE trained here, saved, loaded by SAELens' own loader: the same encoder and decoder on real rows."""
    import torch
    from sae_lens import SAE

    from neuroprobe.sae import load_sae

    x = torch.from_numpy(rows_of(args.recording, args.site))
    ours = load_sae(args.sae)
    theirs = SAE.load_from_disk(str(args.sae))
    with torch.inference_mode():
        f, g = ours.encode(x), theirs.encode(x)
        df = float((f - g).abs().max())
        dr = float((ours.decode(f) - theirs.decode(g)).abs().max())
    import sae_lens

    lines = header("Round trip: an SAE trained by `neuroprobe sae train`, loaded by SAELens (`bench/sae.py roundtrip`)")
    lines += [f"`sae_lens.SAE.load_from_disk` (SAELens {sae_lens.__version__}) read `{Path(args.sae).name}` "
              f"({ours.describe()}) as `{type(theirs).__name__}`; on the {len(x):,} rows of `{args.site}`: max |feature "
              f"activation difference| {df:.3g} (largest activation {float(f.abs().max()):.3g}), max |reconstruction difference| "
              f"{dr:.3g}, float32.", ""]
    print("\n".join(lines))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--stimuli", type=lambda s: [int(v) for v in s.split(",")], default=[2500, 10000, 40000])
    c.add_argument("--features", type=int, default=3072)
    c.add_argument("--k", type=int, default=32)
    c.add_argument("--epochs", type=float, default=3)
    c.add_argument("--block-mb", type=float, default=64)
    lib = sub.add_parser("libraries")
    lib.add_argument("--recording", type=Path, required=True)
    lib.add_argument("--site", required=True)
    lib.add_argument("--features", type=int, default=1536)
    lib.add_argument("--k", type=int, default=32)
    lib.add_argument("--epochs", type=float, default=20)
    lib.add_argument("--batch-size", type=int, default=256)
    lib.add_argument("--lr", type=float, default=1e-3)
    rt = sub.add_parser("roundtrip")
    rt.add_argument("--sae", type=Path, required=True)
    rt.add_argument("--recording", type=Path, required=True)
    rt.add_argument("--site", required=True)
    for p in (c, lib, rt):
        p.add_argument("--append", type=Path, default=None)
        p.add_argument("--tmp", default=None, help="Folder for temporary files.")
    args = ap.parse_args()
    lines = {"cost": cost, "libraries": libraries, "roundtrip": roundtrip}[args.what](args)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
