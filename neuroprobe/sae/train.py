"""Train an SAE on a recorded site, streaming the recording from disk.

Two training objectives, each after its paper:

``topk`` (Gao et al. 2024)
    ``f = ReLU(TopK(pre))``; loss = normalised MSE (MSE over the variance of the
    batch) + ``aux_coef`` × the AuxK loss (the ``k_aux = d_in / 2`` largest
    pre-activations of *dead* features — silent for a whole pass over the data —
    reconstruct the residual); decoder rows renormalised to unit norm after every
    step; ``W_enc`` initialised as ``W_dec.T``, ``b_dec`` as the data mean.
``relu`` (ReLU + L1, Anthropic's April 2024 update)
    ``f = ReLU((x) @ W_enc + b_enc)`` (no pre-encoder bias); loss = squared error
    summed over units + ``l1`` × ``Σ_i f_i ‖W_dec_i‖`` (ramped up over the first 5 %
    of steps); decoder rows start with norm 0.1 and are free.

For both, inputs are scaled by one number so that ``E ‖x‖ = √d_in`` (the scale then
folded back into the weights, so the saved SAE reads raw activations), Adam, and the
learning rate decays linearly to 0 over the last 20 % of steps.

Streaming: the rows (per-token traces ``/sites/S/tokens`` when the recording has
them, else the pooled ``responses``) are read in blocks of at most ``block_mb``; each
epoch visits the blocks in a random order and shuffles rows within a block, so memory
is one block plus the model whatever the number of stimuli.  Statistics (mean, scale,
variance, FVE, dead features) are streamed too.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.sae.model import SparseAutoencoder

OBJECTIVES = ("topk", "relu")


@dataclass
class TrainConfig:
    """Settings of :func:`train_sae` (all written to ``training.json``)."""

    features: int
    objective: str = "topk"
    k: int = 32
    l1: float = 5.0
    epochs: float = 10.0
    max_steps: int | None = None
    batch_size: int = 1024
    lr: float | None = None
    aux_coef: float = 1 / 32
    seed: int = 0
    block_mb: float = 64.0
    log_every: int = 10

    def learning_rate(self) -> float:
        """``lr``, or the default: Gao et al.'s ``2e-4 / sqrt(d_sae / 2^14)`` (at most 1e-3) for topk, 1e-3 for relu."""
        if self.lr is not None:
            return float(self.lr)
        if self.objective == "topk":
            return min(1e-3, 2e-4 / math.sqrt(self.features / 2**14))
        return 1e-3


# ------------------------------------------------------------------ data


class RowSource:
    """Rows of a site in a recording, read block by block (one block in memory at a time).

    Parameters
    ----------
    recording
        An open :class:`~neuroprobe.recording.reader.Recording`.
    site
        The site.
    data
        ``tokens`` (per-token traces), ``responses`` (pooled, one row per stimulus) or
        ``auto`` (tokens when recorded).
    split
        Keep only rows of stimuli of this split (``None``: all).
    block_mb
        Largest block read at once.
    """

    def __init__(self, recording: Any, site: str, *, data: str = "auto", split: str | None = None,
                 block_mb: float = 64.0) -> None:
        if data not in ("auto", "tokens", "responses"):
            raise NeuroprobeError(f"data {data!r} is not one of auto, tokens, responses.")
        self.recording = recording
        self.site = site
        if site not in recording.site_names:
            raise NeuroprobeError(f"{recording.path} has no site {site!r}; it has {', '.join(recording.site_names[:6])}...")
        info = recording.sites.set_index("site").loc[site]
        has_tokens = bool(info["tokens"])
        if data == "tokens" and not has_tokens:
            raise NeuroprobeError(f"{recording.path} has no per-token traces of {site!r}; record with --tokens, or train on --data responses.")
        self.data = "tokens" if (data == "tokens" or (data == "auto" and has_tokens)) else "responses"
        self.ds = recording.tokens(site) if self.data == "tokens" else recording.responses(site)
        self.n_rows = int(self.ds.shape[0])
        self.width = int(self.ds.shape[1])
        self.split = split
        self._keep_stimulus = None
        if split is not None:
            stim = recording.stimuli
            if split not in set(stim["split"]):
                raise NeuroprobeError(f"{recording.path} has no {split!r} stimuli; its splits are {', '.join(sorted(set(stim['split'])))}.")
            self._keep_stimulus = (stim["split"].to_numpy() == split)
        if self.data == "tokens":
            self._stimulus_of = recording.token_stimulus(str(info["stream"]))
        self.block_rows = max(1, int(block_mb * 2**20 // (4 * max(self.width, 1))))
        self.blocks = [(a, min(a + self.block_rows, self.n_rows)) for a in range(0, self.n_rows, self.block_rows)]

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` that are finite and in the split, as float32."""
        x = np.asarray(self.ds[a:b], dtype=np.float32)
        keep = np.isfinite(x).all(axis=1)
        if self._keep_stimulus is not None:
            stim = (np.arange(a, b) if self.data == "responses" else np.asarray(self._stimulus_of[a:b]))
            keep &= self._keep_stimulus[stim]
        return x if keep.all() else x[keep]

    def iter_blocks(self, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
        """Every block once (in a random order, rows shuffled, when ``rng`` is given)."""
        order = rng.permutation(len(self.blocks)) if rng is not None else range(len(self.blocks))
        for i in order:
            x = self.read(*self.blocks[i])
            if rng is not None and len(x):
                x = x[rng.permutation(len(x))]
            if len(x):
                yield x


@dataclass
class Stats:
    """Streamed statistics of the rows: count, mean, mean norm and total variance (float64)."""

    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean_norm: float = 0.0
    variance: float = 0.0  # E ||x - mean||^2


def row_stats(source: RowSource) -> Stats:
    """Mean, mean norm and total variance of every row, in one streamed pass (Chan's pairwise update)."""
    n = 0
    mean = np.zeros(source.width)
    m2 = 0.0
    norm_sum = 0.0
    step = max(1, (8 << 20) // (8 * max(source.width, 1)))  # float64 work in pieces of <= 8 MiB
    for block in source.iter_blocks():
        for a in range(0, len(block), step):
            x = block[a : a + step].astype(np.float64)
            nb = len(x)
            mb = x.mean(0)
            m2b = float(((x - mb) ** 2).sum())
            delta = mb - mean
            tot = n + nb
            m2 += m2b + float(delta @ delta) * n * nb / tot
            mean = mean + delta * nb / tot
            norm_sum += float(np.linalg.norm(x, axis=1).sum())
            n = tot
    if n == 0:
        raise NeuroprobeError(f"site {source.site!r} has no finite rows{' in split ' + repr(source.split) if source.split else ''} to train on.")
    return Stats(n=n, mean=mean, mean_norm=norm_sum / n, variance=m2 / n)


# ---------------------------------------------------------------- trainer


class _Trainable(torch.nn.Module):
    def __init__(self, d_in: int, cfg: TrainConfig, mean: torch.Tensor, gen: torch.Generator) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.features
        w = torch.randn(d, d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        if cfg.objective == "relu":
            w = w * 0.1
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d))
        self.b_dec = torch.nn.Parameter(mean.clone() if cfg.objective == "topk" else torch.zeros(d_in))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.objective == "topk":
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def acts(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.objective == "relu":
            return torch.relu(pre)
        values, idx = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    @torch.no_grad()
    def renormalise(self) -> None:
        if self.cfg.objective == "topk":
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@dataclass
class TrainResult:
    """What :func:`train_sae` made: the SAE, its training curve and its summary."""

    sae: SparseAutoencoder
    curve: pd.DataFrame
    summary: dict[str, Any]


def _evaluate(sae: SparseAutoencoder, source: RowSource, stats: Stats, batch: int) -> dict[str, Any]:
    """FVE, mean L0, dead features and firing frequency over every row (streamed)."""
    sse = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    with torch.inference_mode():
        for x in source.iter_blocks():
            for a in range(0, len(x), batch):
                xb = torch.from_numpy(x[a : a + batch])
                f = sae.encode(xb)
                sse += float(((sae.decode(f) - xb).double() ** 2).sum())
                active = f > 0
                l0 += float(active.sum())
                fired += active.sum(0).double()
                n += len(xb)
    return {"fve": 1.0 - sse / (stats.variance * n), "l0": l0 / n, "dead": int((fired == 0).sum()),
            "frequency": (fired / n).numpy(), "rows": n}


def train_sae(
    recording: Any,
    site: str,
    config: TrainConfig,
    *,
    data: str = "auto",
    split: str | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an SAE on ``site`` of ``recording`` (streamed from disk).

    Parameters
    ----------
    recording
        An open recording (complete).
    site
        The site whose units the SAE reconstructs.
    config
        Sizes and optimisation settings.
    data, split
        Which rows: see :class:`RowSource`.
    progress
        Called as ``progress(step, metrics)`` at every logged step.

    Returns
    -------
    TrainResult
        The SAE (in raw activation units), its training curve (one row per logged
        step: ``step, rows, loss, nmse, l0, aux, lr, dead``) and a summary
        (``fve``, ``l0``, ``dead``, rows, steps, wall/CPU seconds, peak RSS, settings).
    """
    if config.objective not in OBJECTIVES:
        raise NeuroprobeError(f"objective {config.objective!r} is not one of {', '.join(OBJECTIVES)}.")
    if config.features < 1:
        raise NeuroprobeError("--features must be at least 1.")
    if config.objective == "topk" and not 0 < config.k <= config.features:
        raise NeuroprobeError(f"--k must be between 1 and --features ({config.features}), not {config.k}.")
    if config.batch_size < 1 or config.epochs <= 0:
        raise NeuroprobeError("--batch-size must be at least 1 and --epochs positive.")
    t0, c0 = time.perf_counter(), time.process_time()
    source = RowSource(recording, site, data=data, split=split, block_mb=config.block_mb)
    stats = row_stats(source)
    d_in = source.width
    scale = math.sqrt(d_in) / max(stats.mean_norm, 1e-12)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = _Trainable(d_in, config, torch.from_numpy(stats.mean * scale).float(), gen)
    lr = config.learning_rate()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    steps_per_epoch = max(1, math.ceil(stats.n / config.batch_size))
    total = max(1, int(round(config.epochs * steps_per_epoch)))
    if config.max_steps is not None:
        total = max(1, min(total, int(config.max_steps)))
    decay_from = int(0.8 * total)
    warm = max(1, int(0.05 * total))
    last_fired = torch.zeros(config.features, dtype=torch.long)  # rows seen when each feature last fired
    var_scaled = stats.variance * scale**2 / d_in  # per-unit variance of the scaled rows
    k_aux = max(1, d_in // 2)
    rows_seen = 0
    step = 0
    curve: list[dict[str, float]] = []
    acc = {"loss": 0.0, "nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0}
    model.train()
    while step < total:
        for block in source.iter_blocks(rng):
            xs = torch.from_numpy(block).mul_(scale)  # the block is this loop's own copy
            for a in range(0, len(xs), config.batch_size):
                if step >= total:
                    break
                x = xs[a : a + config.batch_size]
                if len(x) < 2 and len(xs) >= 2:
                    continue
                for g in opt.param_groups:
                    g["lr"] = lr * (1.0 if step < decay_from else max(0.0, (total - step) / max(1, total - decay_from)))
                pre = model.pre(x)
                f = model.acts(pre)
                x_hat = f @ model.W_dec + model.b_dec
                err = x - x_hat
                mse = (err**2).mean()
                aux = torch.zeros(())
                if config.objective == "topk":
                    loss = mse / var_scaled
                    dead = (rows_seen - last_fired) > stats.n
                    if dead.any() and config.aux_coef > 0:
                        masked = pre.masked_fill(~dead, float("-inf"))
                        kk = min(k_aux, int(dead.sum()))
                        v, idx = torch.topk(masked, kk, dim=-1, sorted=False)
                        e_hat = torch.zeros_like(pre).scatter(-1, idx, v.relu()) @ model.W_dec
                        e = err.detach()
                        aux = ((e_hat - e) ** 2).mean() / (e**2).mean().clamp_min(1e-12)
                        loss = loss + config.aux_coef * aux
                else:
                    ramp = min(1.0, (step + 1) / warm)
                    penalty = (f * model.W_dec.norm(dim=1)).sum(-1).mean()
                    loss = (err**2).sum(-1).mean() + config.l1 * ramp * penalty
                    aux = penalty.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                model.renormalise()
                with torch.no_grad():
                    rows_seen += len(x)
                    fired = (f > 0).any(0)
                    last_fired[fired] = rows_seen
                    acc["loss"] += float(loss)
                    acc["nmse"] += float(mse) / var_scaled
                    acc["l0"] += float((f > 0).sum(-1).float().mean())
                    acc["aux"] += float(aux)
                    acc["n"] += 1
                step += 1
                if step % config.log_every == 0 or step == total:
                    n = acc.pop("n")
                    row = {"step": step, "rows": rows_seen, **{k: v / n for k, v in acc.items()},
                           "lr": opt.param_groups[0]["lr"], "dead": int(((rows_seen - last_fired) > stats.n).sum())
                           if rows_seen > stats.n else -1}
                    curve.append(row)
                    acc = {"loss": 0.0, "nmse": 0.0, "l0": 0.0, "aux": 0.0, "n": 0}
                    if progress is not None:
                        progress(step, row)
            if step >= total:
                break
    with torch.no_grad():  # fold the input scale back: the saved SAE reads raw activations
        sae = SparseAutoencoder(
            model.W_enc.detach() * scale, model.b_enc.detach(), model.W_dec.detach() / scale, model.b_dec.detach() / scale,
            architecture="topk" if config.objective == "topk" else "standard", k=config.k if config.objective == "topk" else None,
            apply_b_dec_to_input=config.objective == "topk",
            meta={"hook_name": site, "model_name": recording.attrs.get("subject")},
        )
    ev = _evaluate(sae, source, stats, config.batch_size)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "site": site, "recording": str(Path(recording.path).resolve()), "subject": recording.attrs.get("subject"),
        "init": recording.attrs.get("init"), "battery": recording.attrs.get("battery"),
        "battery_hash": recording.attrs.get("battery_hash"), "data": source.data, "split": split,
        "rows": stats.n, "d_in": d_in, "d_sae": config.features, "steps": step, "input_scale": scale,
        "fve": ev["fve"], "l0": ev["l0"], "dead": ev["dead"], "dead_fraction": ev["dead"] / config.features,
        "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
        "peak_rss_mib": usage.ru_maxrss / 1024.0, "torch_threads": torch.get_num_threads(),
        "config": {**asdict(config), "lr": lr}, "sae_hash": sae.content_hash(),
    }
    sae.meta["frequency"] = ev["frequency"]
    return TrainResult(sae=sae, curve=pd.DataFrame(curve), summary=summary)


def write_result(result: TrainResult, out: str | Path) -> Path:
    """Save the SAE (SAELens format), ``sparsity.safetensors``, ``training.csv`` and ``training.json`` into ``out``."""
    from safetensors.torch import save_file

    from neuroprobe.sae.io import save_sae

    out = Path(out).expanduser()
    s = result.summary
    save_sae(result.sae, out, hook_name=s["site"], model_name=s.get("subject"), neuroprobe_recording=s["recording"],
             neuroprobe_init=s.get("init"), neuroprobe_battery=s.get("battery"), neuroprobe_data=s["data"])
    freq = np.asarray(result.sae.meta.get("frequency", np.zeros(result.sae.d_sae)), dtype=np.float64)
    # SAELens' sparsity file: log10 of each feature's firing frequency
    save_file({"sparsity": torch.from_numpy(np.log10(freq + 1e-10)).float()}, str(out / "sparsity.safetensors"))
    result.curve.to_csv(out / "training.csv", index=False)
    (out / "training.json").write_text(json.dumps(s, indent=2, default=float) + "\n", encoding="utf-8")
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


