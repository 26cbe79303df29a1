"""Benchmark: recording all six MLP sites of the real MiniLM, side by side with peers.

Run by hand (``pip install -e ".[bench]"`` first)::

    python bench/record.py [--n 1024] [--batch-size 32] [--repeats 8] [--shares] [--real-size] [--append bench/RESULTS.md]

Every contender processes the same 1024 sentences in the same batches on the same
model, in one process, interleaved over ``--repeats`` rounds; times are reported as
ratios to the bare forward pass measured in the same run: the best-of ratio (``x_bare``)
and the median and quartiles of the per-round ratios (``x_bare_median``), which cancel
the drift of a noisy machine.  ``--shares`` splits per-token recording into its steps;
``--real-size`` repeats pooled and per-token recording on real-size random-init models;
``--compare DIR`` runs this checkout against another one (alternating fresh processes).  Peak memory is the RSS
high-water mark of a fresh subprocess per contender (``--memory``), so one contender's
allocations do not hide another's.

Contenders
----------
bare            model forward only (inference mode), no hooks
neuroprobe-pool neuroprobe Recorder, mean pooling, float32, writer thread
neuroprobe-tok  neuroprobe Recorder, per-token traces + pooled, float32
neuroprobe-tok16 same in float16
torch-h5py      plain torch forward hooks; per-token activations copied to numpy and
                appended to h5py datasets in the main thread after each batch
nnsight-save    nnsight ``model.trace`` + ``.save()`` of each MLP input, then h5py
nnsight-cache   nnsight ``tracer.cache`` of the MLP modules, then h5py
tlens           TransformerLens ``run_with_cache`` (if it can load this architecture)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

import neuroprobe as npb
from neuroprobe.stimuli.battery import Battery

SITES = [f"encoder.layer.{i}.output.dense" for i in range(6)]


def sentences(n: int) -> pd.DataFrame:
    base = Battery.load("kinship").table
    rows = []
    for i in range(n):
        r = base.iloc[i % len(base)].to_dict()
        r["id"] = f"s{i}"
        r["text"] = f"{r['text']} ({i})" if i >= len(base) else r["text"]
        rows.append(r)
    return pd.DataFrame(rows)


def _append(d: h5py.Dataset, x: np.ndarray) -> None:
    """Append rows to a resizable dataset (what the peers' recording loops do per batch)."""
    n0 = d.shape[0]
    d.resize((n0 + len(x), d.shape[1]))
    d[n0:] = x


def bare(subject, table, bs, out):
    with torch.inference_mode():
        for a in range(0, len(table), bs):
            enc = subject.tokenizer(table["text"].iloc[a : a + bs].tolist(), padding=True, return_tensors="pt")
            subject.model(**enc)


_BATTERIES: dict[int, tuple[pd.DataFrame, Battery]] = {}


def bench_battery(table: pd.DataFrame) -> Battery:
    """The battery of ``table``, built once (like the bare pass's table, it is input, not recording work)."""
    key = id(table)
    if key not in _BATTERIES or _BATTERIES[key][0] is not table:
        _BATTERIES[key] = (table, Battery.from_table(table, concepts=Battery.load("kinship").concepts, name="bench"))
    return _BATTERIES[key][1]


def neuro(tokens: bool, dtype: str):
    def run(subject, table, bs, out):
        npb.Recorder(subject, bench_battery(table), montage="mlp", tokens=tokens, dtype=dtype, batch_size=bs,
                     quiet=True).run(out)
    return run


def torch_h5py(subject, table, bs, out):
    with h5py.File(out, "w") as f:
        ds = {s: f.create_dataset(s, shape=(0, 1536), maxshape=(None, 1536), dtype="f4", chunks=(1024, 1536)) for s in SITES}
        store = {}
        handles = [subject.model.get_submodule(s).register_forward_pre_hook(
            lambda m, args, _s=s: store.__setitem__(_s, args[0].detach())) for s in SITES]
        try:
            with torch.inference_mode():
                for a in range(0, len(table), bs):
                    enc = subject.tokenizer(table["text"].iloc[a : a + bs].tolist(), padding=True, return_tensors="pt")
                    subject.model(**enc)
                    m = enc["attention_mask"].bool()
                    for s in SITES:
                        x = store[s][m].numpy()
                        _append(ds[s], x)
        finally:
            for h in handles:
                h.remove()


_BOOTED: dict = {}


def _nnsight_model(subject):
    from nnsight import NNsight

    if "nnsight" not in _BOOTED:
        _BOOTED["nnsight"] = NNsight(subject.model)
    return _BOOTED["nnsight"]


def nnsight_save(subject, table, bs, out):
    model = _nnsight_model(subject)
    with h5py.File(out, "w") as f:
        ds = {s: f.create_dataset(s, shape=(0, 1536), maxshape=(None, 1536), dtype="f4", chunks=(1024, 1536)) for s in SITES}
        for a in range(0, len(table), bs):
            enc = subject.tokenizer(table["text"].iloc[a : a + bs].tolist(), padding=True, return_tensors="pt")
            saved = {}
            with torch.inference_mode(), model.trace(**enc):
                for i, s in enumerate(SITES):
                    saved[s] = model.encoder.layer[i].E_output.dense.input.save()
            m = enc["attention_mask"].bool()
            for s in SITES:
                v = saved[s]
                v = getattr(v, "value", v)
                x = v[m].numpy()
                _append(ds[s], x)


def nnsight_cache(subject, table, bs, out):
    model = _nnsight_model(subject)
    with h5py.File(out, "w") as f:
        ds = {s: f.create_dataset(s, shape=(0, 1536), maxshape=(None, 1536), dtype="f4", chunks=(1024, 1536)) for s in SITES}
        for a in range(0, len(table), bs):
            enc = subject.tokenizer(table["text"].iloc[a : a + bs].tolist(), padding=True, return_tensors="pt")
            with torch.inference_mode(), model.trace(**enc) as tracer:
                cache = tracer.cache(modules=[model.encoder.layer[i].E_output.dense for i in range(6)], include_inputs=True).save()
            m = enc["attention_mask"].bool()
            for i, s in enumerate(SITES):
                entry = cache[f"model.encoder.layer.{i}.output.dense"]
                x = entry.inputs[0][0] if isinstance(entry.inputs, tuple) else entry.input
                x = x[m].numpy()
                _append(ds[s], x)


def tlens(subject, table, bs, out):
    # TransformerLens 4 boots BERT through its bridge (it builds the masked-LM head too)
    from transformer_lens.model_bridge import TransformerBridge

    if "tlens" not in _BOOTED:  # booting is set-up, not recording: done once, outside the best-of timing
        _BOOTED["tlens"] = TransformerBridge.boot_transformers(subject.checkpoint, tokenizer=subject.tokenizer, device="cpu")
    model = _BOOTED["tlens"]
    names = [f"blocks.{i}.mlp.hook_post" for i in range(6)]
    with h5py.File(out, "w") as f:
        ds = {s: f.create_dataset(s, shape=(0, 1536), maxshape=(None, 1536), dtype="f4", chunks=(1024, 1536)) for s in SITES}
        for a in range(0, len(table), bs):
            enc = subject.tokenizer(table["text"].iloc[a : a + bs].tolist(), padding=True, return_tensors="pt")
            with torch.inference_mode():
                _, cache = model.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                names_filter=lambda n: n in names)
            m = enc["attention_mask"].bool()
            for i, s in enumerate(SITES):
                x = cache[names[i]][m].numpy()
                _append(ds[s], x)


CONTENDERS = {
    "bare": bare,
    "neuroprobe-pool": neuro(False, "float32"),
    "neuroprobe-tok": neuro(True, "float32"),
    "neuroprobe-tok16": neuro(True, "float16"),
    "torch-h5py": torch_h5py,
    "nnsight-save": nnsight_save,
    "nnsight-cache": nnsight_cache,
    "tlens": tlens,
}


def interleaved(contenders: dict, subject, table, bs: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Wall seconds of each contender over ``repeats`` interleaved rounds (after one warm-up each).

    Every run writes a new file, deleted outside the timed region: replacing or
    truncating a file of hundreds of MB costs the file system real time (with
    ``discard`` mounts, tens of ms), which is not recording work.
    """
    times: dict[str, list[float]] = {n: [] for n in contenders}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, fn in contenders.items():  # warm-up (and one-off set-up such as booting a bridge)
            try:
                fn(subject, table.iloc[: 2 * bs], bs, f"{d}/warm-{name}.h5")
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        for r in range(repeats):
            for name, fn in contenders.items():
                if name in errors:
                    continue
                out = Path(d) / f"{name}-{r}.h5"
                gc.collect()
                t = time.perf_counter()
                try:
                    fn(subject, table, bs, str(out))
                except Exception as err:  # a peer that cannot run this model is reported, not fatal
                    errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    continue
                times[name].append(time.perf_counter() - t)
                out.unlink(missing_ok=True)
                print(f"round {r} {name:18s} {times[name][-1]:.2f}s", file=sys.stderr)
    return times, errors


def ratios(times: dict[str, list[float]], name: str, base: str = "bare") -> dict[str, float]:
    """Best-of seconds, best-of ratio to ``base``, and the median and quartiles of the per-round ratios.

    The per-round ratio divides each round's time by the ``base`` run of the same round,
    which cancels the drift of a noisy machine; both summaries are reported.
    """
    per_round = np.array(times[name]) / np.array(times[base][: len(times[name])])
    return {"seconds": round(min(times[name]), 3), "x_bare": round(min(times[name]) / min(times[base]), 3),
            "x_bare_median": round(float(np.median(per_round)), 3),
            "x_bare_q25": round(float(np.quantile(per_round, 0.25)), 3),
            "x_bare_q75": round(float(np.quantile(per_round, 0.75)), 3)}


def discarding(run):
    """``run`` with a recording writer that discards every batch (bench instrumentation: the writer's share)."""
    from neuroprobe.recording import writer as W

    def wrapped(subject, table, bs, out):
        real_write = W.RecordingWriter.write
        W.RecordingWriter.write = lambda self, r: None
        try:
            run(subject, table, bs, out)
        finally:
            W.RecordingWriter.write = real_write
    return wrapped


def shares(subject, table, args) -> str:
    """Each step's share of per-token recording: the hooks and pooling, the device-to-host copy, the writer.

    Measured by switching steps off in this process (bench instrumentation only):
    ``hooks`` records pooled responses with a writer that discards every batch,
    ``+ token copy`` also copies every real token's activations out of the hook,
    ``+ writer`` is the full recording.  Differences of the median per-round ratios
    give each step's share of the forward pass.
    """
    steps = {"bare": bare, "hooks + pooling": discarding(neuro(False, "float32")),
             "+ token copy": discarding(neuro(True, "float32")),
             "+ writer (= neuroprobe-tok)": neuro(True, "float32")}
    times, errors = interleaved(steps, subject, table, args.batch_size, args.repeats)
    if errors:
        return f"shares: {errors}"
    rows, prev = [], 1.0
    for name in steps:
        r = ratios(times, name)
        rows.append({"step": name, "x_bare_median": r["x_bare_median"], "share": round(r["x_bare_median"] - prev, 3),
                     "x_bare": r["x_bare"]})
        prev = r["x_bare_median"]
    return "each step's share (median per-round ratio to bare; share = difference to the step before)\n" + \
        pd.DataFrame(rows).to_string(index=False)


def real_size(args) -> str:
    """Pooled and per-token recording against the subject's own bare forward pass, on real-size random-init models.

    The models are built offline from the published configs neuroprobe ships
    (``load_subject(name, init="random")``), so their compute is that of the real
    models; the kinship battery's texts are the stimuli (CLIP: its text tower's MLP sites;
    LXMERT: its language stream with no regions, as offline without a detector).
    """
    from neuroprobe.stimuli.battery import Battery as Bat

    kin = Bat.load("kinship")
    table = kin.table.iloc[: args.real_n].reset_index(drop=True)
    battery = Bat.from_table(table, concepts=kin.concepts, name="bench-real", root=kin.root)
    rows = []
    for label, name, montage in (("BERT-base", "bert", "mlp"), ("GPT-2 medium", "pplm", "mlp"),
                                 ("CLIP ViT-B/32 (text tower)", "clip", "text.*mlp"), ("LXMERT (language)", "lxmert", "mlp")):
        torch.manual_seed(0)
        subj = npb.load_subject(name, init="random", device="cpu", quiet=True)

        def subject_bare(s, tab, bs, out):
            with torch.inference_mode():
                for a in range(0, len(tab), bs):
                    s.forward(s.encode(battery.table.iloc[a : a + bs], battery))

        def rec(tokens, montage=montage):
            def run(s, tab, bs, out):
                npb.Recorder(s, battery, montage=montage, tokens=tokens, batch_size=bs, quiet=True).run(out)
            return run

        contenders = {"bare": subject_bare, "neuroprobe-pool": rec(False),
                      "neuroprobe-tok, writer discards": discarding(rec(True)), "neuroprobe-tok": rec(True)}
        times, errors = interleaved(contenders, subj, table, args.batch_size, max(2, args.repeats // 2))
        for c in list(contenders)[1:]:
            if c in errors:
                rows.append({"architecture": label, "contender": c, "note": errors[c]})
                continue
            r = ratios(times, c)
            rows.append({"architecture": label, "params_M": round(subj.n_parameters / 1e6), "sites": len(subj.sites(montage)),
                         "contender": c, "bare_s": round(min(times["bare"]), 2), "x_bare": r["x_bare"],
                         "x_bare_median": r["x_bare_median"], "note": ""})
        print(pd.DataFrame(rows).tail(3).to_string(index=False), file=sys.stderr)
        del subj
        gc.collect()
    return (f"real-size architectures (random init from shipped published configs), {len(table)} kinship texts, "
            f"montage mlp, float32\n" + pd.DataFrame(rows).to_string(index=False))


def compare(args) -> str:
    """This checkout against another neuroprobe (``--compare DIR``, e.g. a ``git worktree`` of an older commit).

    Each round starts one fresh process per checkout, alternating, and each process times
    ``bare`` and the chosen contenders once after a warm-up; a round's ratios divide by
    the bare pass of the same process, so machine drift between rounds cancels.
    """
    import neuroprobe

    here = str(Path(neuroprobe.__file__).resolve().parents[1])
    names = [c for c in (args.only.split(",") if args.only else CONTENDERS) if c != "bare"]
    per: dict[str, dict[str, list[float]]] = {"this": {n: [] for n in names}, "other": {n: [] for n in names}}
    for r in range(args.repeats):
        for label, root in (("other", args.compare), ("this", here)) if r % 2 else (("this", here), ("other", args.compare)):
            env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            res = subprocess.run([sys.executable, __file__, "--round", ",".join(["bare", *names]), "--n", str(args.n),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            t = json.loads(res.stdout.strip().splitlines()[-1])
            for n in names:
                per[label][n].append(t[n] / t["bare"])
            print(f"round {r} {label}: " + " ".join(f"{n} {t[n] / t['bare']:.3f}" for n in names), file=sys.stderr)
    rows = []
    for n in names:
        for label, root in (("other", args.compare), ("this", here)):
            v = np.array(per[label][n])
            rows.append({"contender": n, "checkout": f"{label} ({root})", "x_bare_median": round(float(np.median(v)), 3),
                         "x_bare_q25": round(float(np.quantile(v, 0.25)), 3),
                         "x_bare_q75": round(float(np.quantile(v, 0.75)), 3), "x_bare_best": round(float(v.min()), 3)})
    return (f"this checkout against {args.compare}: {args.repeats} alternating rounds, one fresh process per checkout "
            f"and round\n" + pd.DataFrame(rows).to_string(index=False))


def one_round(names: list[str], n: int, bs: int) -> dict[str, float]:
    """Seconds of each contender, run once after a warm-up, in this process (for ``--compare``)."""
    subject = npb.load_subject("minilm", device="cpu", quiet=True)
    table = sentences(n)
    times, errors = interleaved({c: CONTENDERS[c] for c in names}, subject, table, bs, 1)
    if errors:
        raise RuntimeError(str(errors))
    return {c: v[0] for c, v in times.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(name: str, n: int, bs: int, out: str) -> dict:
    """Run one contender once in this process; return seconds, peak RSS and file size."""
    subject = npb.load_subject("minilm", device="cpu", quiet=True)
    table = sentences(n)
    base = peak_rss_mb()
    t = time.perf_counter()
    CONTENDERS[name](subject, table, bs, out)
    dt = time.perf_counter() - t
    size = os.path.getsize(out) / 2**20 if os.path.exists(out) else 0.0
    return {"seconds": dt, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "file_mb": size}


# ---------------------------------------------------------------- scaling out


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, every process of the command)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _data_bytes(path: Path) -> int:
    total = 0

    def add(name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset) and not name.startswith("stimuli/"):
            total += obj.size * obj.dtype.itemsize

    with h5py.File(path, "r") as f:
        f.visititems(add)
    return total


def scaling(args) -> str:
    """1 vs 2 processes of ``neuroprobe record`` (torchrun, gloo), then the virtual file and merge per GB.

    Each contender is the whole command (start-up, model load, recording, and for torchrun the
    virtual file), run as a fresh process group; a 64-stimulus run of the same command gives the
    fixed start-up cost, which the table subtracts to show the recording phase alone.
    """
    from neuroprobe.recording import shards as S

    n, bs = args.n, args.batch_size
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp or None) as d:
        d = Path(d)
        for size in (64, n):
            folder = d / f"battery{size}"
            folder.mkdir()
            meta = json.loads((Path(Battery.load("kinship").root) / "battery.json").read_text())
            meta["name"] = f"bench{size}"
            (folder / "battery.json").write_text(json.dumps(meta))
            sentences(size).to_csv(folder / "stimuli.csv", index=False)
        common = ["record", "--model", "minilm", "--sites", "mlp", "--tokens", "--dtype", "float16",
                  "--batch-size", str(bs), "--device", "cpu", "--quiet"]
        one = [sys.executable, "-m", "neuroprobe"]
        two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", "29733", "-m", "neuroprobe"]
        contenders = [
            ("1 process, 2 threads", one, {}),
            ("1 process, 1 thread", one, {"OMP_NUM_THREADS": "1"}),
            ("2 processes (torchrun, gloo), 1 thread each", two, {"OMP_NUM_THREADS": "1"}),
        ]
        times: dict[tuple[str, int], list[float]] = {}
        cpus: dict[tuple[str, int], list[float]] = {}
        for r in range(args.repeats):
            for size in (64, n):
                for name, launcher, extra in contenders:
                    out = d / f"out-{size}.h5"
                    t, c = _timed([*launcher, *common, "--probe", str(d / f"battery{size}"), "--out", str(out),
                                   "--overwrite"], {**env, **extra})
                    times.setdefault((name, size), []).append(t)
                    cpus.setdefault((name, size), []).append(c)
                    print(f"round {r} n={size} {name}: {t:.1f}s wall, {c:.1f}s CPU, load {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
        first = contenders[0][0]
        base = min(times[(first, n)]) - min(times[(first, 64)])
        for name, _, _ in contenders:
            total, fixed = min(times[(name, n)]), min(times[(name, 64)])
            rows.append({"contender": name, f"wall s (n={n})": round(total, 1), "wall s (n=64)": round(fixed, 1),
                         "wall, recording phase": round(total - fixed, 1),
                         "speed-up": round(base / max(total - fixed, 1e-9), 2),
                         f"CPU s (n={n})": round(min(cpus[(name, n)]), 1),
                         "CPU s (n=64)": round(min(cpus[(name, 64)]), 1)})
        table = pd.DataFrame(rows).to_string(index=False)
        # the virtual file and merge, on the shards of the last two-process run
        out = d / f"out-{n}.h5"
        shards = S.check_shards(S.shard_path(out, r, 2) for r in range(2))
        gb = _data_bytes(out) / 1e9
        tv = []
        for _ in range(3):
            t = time.perf_counter()
            S.write_virtual(d / "again.h5", shards)
            tv.append(time.perf_counter() - t)
        t = time.perf_counter()
        S.merge(out, d / "merged.h5")
        tm = time.perf_counter() - t
        site = "encoder.layer.3.mlp"
        reads = {}
        for label, path in (("virtual", out), ("merged", d / "merged.h5")):
            t = time.perf_counter()
            with h5py.File(path, "r") as f:
                f[f"sites/{site}/tokens"][()]
            reads[label] = time.perf_counter() - t
        with h5py.File(out, "r") as f:
            ntok = int(f["tokens/text"].attrs["n_tokens"])
    text = (f"{table}\n\nrecording data: {gb:.3f} GB ({n} stimuli, {ntok} tokens, 6 sites, float16)\n"
            f"virtual file: {min(tv) * 1000:.0f} ms (best of 3) = {min(tv) / gb:.3f} s/GB\n"
            f"merge: {tm:.1f} s = {tm / gb:.1f} s/GB\n"
            f"reading one site's per-token traces ({site}): virtual {reads['virtual']:.2f} s, merged {reads['merged']:.2f} s")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scaling", action="store_true", help="1 vs 2 processes under torchrun, virtual file and merge cost")
    ap.add_argument("--tmp", default="", help="folder for the scaling run's files (default: system temp)")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 8; 2 with --scaling)")
    ap.add_argument("--only", default="")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS in a fresh subprocess per contender")
    ap.add_argument("--shares", action="store_true", help="each step's share of neuroprobe-tok's overhead")
    ap.add_argument("--real-size", action="store_true",
                    help="pooled and per-token ratios on random-init BERT-base, GPT-2 medium, CLIP ViT-B/32, LXMERT")
    ap.add_argument("--real-n", type=int, default=128, help="stimuli per real-size recording")
    ap.add_argument("--compare", default="", help="a folder holding another neuroprobe checkout to compare against")
    ap.add_argument("--round", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child", default="")
    ap.add_argument("--append", default="")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.scaling else 8
    if args.round:
        print(json.dumps(one_round(args.round.split(","), args.n, args.batch_size)))
        return
    if args.compare:
        text = compare(args)
        print(text)
        if args.append:
            with open(args.append, "a") as fh:
                fh.write(f"\n### bench/record.py --compare — {time.strftime('%Y-%m-%d %H:%M')}, n={args.n}, "
                         f"batch {args.batch_size}\n\n```\n{text}\n```\n")
        return
    if args.child:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(args.child, args.n, args.batch_size, f"{d}/out.h5")))
        return
    if args.scaling:
        text = scaling(args)
        print(text)
        if args.append:
            load = os.getloadavg()
            head = (f"\n### bench/record.py --scaling — {time.strftime('%Y-%m-%d %H:%M')}, minilm mlp per-token float16, "
                    f"n={args.n}, batch {args.batch_size}, best of {args.repeats}, {os.cpu_count()} CPU cores, "
                    f"load average {load[0]:.1f} at the end\n\n")
            with open(args.append, "a") as fh:
                fh.write(head + "```\n" + text + "\n```\n")
        return
    names = [c for c in CONTENDERS if not args.only or c in args.only.split(",")]
    subject = npb.load_subject("minilm", device="cpu", quiet=True)
    table = sentences(args.n)
    times, errors = interleaved({n: CONTENDERS[n] for n in names}, subject, table, args.batch_size, args.repeats)
    rows = []
    for name in names:
        if name in errors:
            rows.append({"contender": name, "seconds": np.nan, "x_bare": np.nan, "note": errors[name]})
            continue
        rows.append({"contender": name, **ratios(times, name), "note": ""})
    if args.memory:
        for row in rows:
            if row["note"]:
                continue
            res = subprocess.run([sys.executable, __file__, "--child", row["contender"], "--n", str(args.n),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            try:
                m = json.loads(res.stdout.strip().splitlines()[-1])
                row["peak_rss_mb"] = round(m["peak_rss_mb"])
                row["file_mb"] = round(m["file_mb"], 1)
            except Exception:
                row["peak_rss_mb"] = np.nan
    df = pd.DataFrame(rows)
    text = df.to_string(index=False)
    print(text)
    sections = [text]
    if args.shares:
        sections.append(shares(subject, table, args))
        print(sections[-1])
    if args.real_size:
        sections.append(real_size(args))
        print(sections[-1])
    if args.append:
        load = os.getloadavg()
        head = (f"\n### bench/record.py — {time.strftime('%Y-%m-%d %H:%M')}, n={args.n}, batch {args.batch_size}, "
                f"{args.repeats} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
                f"{os.cpu_count()} CPU cores, load average {load[0]:.1f} at the end\n\n")
        with open(args.append, "a") as fh:
            fh.write(head + "```\n" + "\n\n".join(sections) + "\n```\n")


if __name__ == "__main__":
    main()
