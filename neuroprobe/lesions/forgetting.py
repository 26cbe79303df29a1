"""Forgetting: what a subject's behaviour loses when units are lesioned, with controls.

A :class:`LesionStudy` holds what every lesion experiment on one subject and
battery shares: the intact readout on the evaluation split (``testing``), the
units' responses on the ranking split (``screening``: they rank units, tell active
from dead units, and give mean/resample ablation its reference values), and the
ranking of units per concept (from a cells table, a recording, or d′ computed
here; see :mod:`neuroprobe.lesions.ranking`).

Readout change is ``lesioned - intact`` per evaluation stimulus (the readout's
own units, e.g. nats for log-probability readouts; negative = forgotten), then
averaged per tested concept.  For a lesion aimed at concept ``c``:

``target_change``
    the mean change over ``c``'s stimuli;
``other_change``
    the mean over every other concept of its mean change (each concept weighs the same);
``specificity``
    target drop over non-target drop, ``-target_change / max(-other_change, floor)``
    with ``floor`` = :data:`SPECIFICITY_FLOOR` (> 1: the target lost more than
    the others; negative: the target gained).  The floor keeps the ratio finite
    and sign-stable when the other concepts do not move at all (numerical noise
    of either sign); a specificity near ``-target_change / floor`` means "the
    others did not measurably change";
``gap``
    ``target_change - other_change`` (negative: the lesion hit the target harder);
``p_random``
    ``(1 + #{random lesions with target_change <= observed}) / (1 + n)``: random
    lesions of the same number of units at the same sites (the same count per
    site), drawn from units that are active on the ranking split;
``p_random_specific``
    the same for ``gap``;
``target_rank``
    1 when the target lost more than every other concept (2 when one other
    concept lost more, ...); ``most_hit_other`` names the other concept that lost most.

Orders of a dose-response (``k`` units each):

``top``          the ``k`` best-ranked units for the concept;
``bottom``       the ``k`` least selective active units (smallest ``|d′|`` on the
                 ranking split), with top-``k``'s count per site;
``random``       ``random_draws`` random active units with top-``k``'s count per site;
``keep_top``     every unit of top-``k``'s sites is lesioned except the top ``k``
                 (does the concept survive on its cells alone?);
``keep_random``  the same keeping random active units instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from neuroprobe.errors import NeuroprobeError
from neuroprobe.lesions import sweep
from neuroprobe.lesions.lesion import count_units, lesion, resolve_sites, site_responses
from neuroprobe.lesions.ranking import active_mask, cells_ranking, dprime, rank_units
from neuroprobe.lesions.staged import BATCHED_MODES, BatchedEvaluator, make_runner
from neuroprobe.subjects.base import Subject

if TYPE_CHECKING:  # pragma: no cover
    from neuroprobe.stimuli.battery import Battery

ORDERS = ("top", "bottom", "random", "keep_top", "keep_random")
DEFAULT_K = 8
#: non-target drops below this (in readout units) count as this in ``specificity``
SPECIFICITY_FLOOR = 1e-3


def _load_cells(cells: Any) -> Any:
    if isinstance(cells, (str, Path)):
        path = Path(cells)
        if not path.exists():
            raise NeuroprobeError(f"cells file {path} does not exist; give a CSV from `neuroprobe cells` or a recording (.h5).")
        if path.suffix in (".h5", ".hdf5"):
            from neuroprobe.recording.reader import open_recording

            return open_recording(path)
        try:
            from neuroprobe.output import read_csv

            return read_csv(path)
        except Exception as err:  # pandas names the problem
            raise NeuroprobeError(f"cells file {path} cannot be read as CSV ({err}).") from None
    return cells


class LesionStudy:
    """Lesion experiments on one subject and battery, sharing baseline and rankings.

    Parameters
    ----------
    subject
        The subject (its readouts score behaviour).
    battery
        Stimuli; the ``split`` rows are evaluated, the ``rank_split`` rows rank units.
    cells
        Where the ranking comes from: a cells DataFrame (or its CSV path), a
        recording (or its ``.h5`` path: d′ on ``rank_split``), or ``None`` (d′ of
        the subject's own responses on ``rank_split`` at ``sites``).
    sites
        Montage or site globs to lesion (default: the sites of the cells table or
        recording; ``mlp`` when ranking here).
    readout
        Readout name (default: the subject's default readout).
    split, rank_split
        Evaluation and ranking splits; they must differ (no double dipping).
    columns
        Column names of a cells table: keys ``site``, ``unit``, ``concept``, ``score``.
    seed
        Seeds random lesions and resample draws.
    quiet
        No progress bars.
    batch_size
        Stimuli per forward pass.
    batched
        Evaluate many lesions per pass (replicas along the batch, resumed at the
        first lesioned block; see :mod:`neuroprobe.lesions.staged`) when the readout
        is replica-safe (or the organism's), in every mode; otherwise one at a time.
        :attr:`engine` says which: the runner, and whether it is prefix-cached (not
        for a subject without a block order, such as an ``hf:`` model of unknown
        structure).
    prefix_cache
        With ``batched``: reuse the intact pass upstream of the first lesioned block
        (``False`` replicates the raw inputs; for benchmarks).
    memory_mb
        Activation budget of one batched pass (replicas are chunked to fit).
    modality
        Evaluate only the stimuli of this modality (or these, comma-separated): the
        image-side (``image``) or text-side (``text``) readout of a cross-modal subject.
        Units are still ranked, and random lesions drawn, on every stimulus of ``rank_split``,
        so studies that differ only in ``modality`` lesion the same units.
    """

    def __init__(
        self,
        subject: Subject,
        battery: "Battery",
        cells: Any = None,
        *,
        sites: str | Sequence[str] | None = None,
        readout: str | None = None,
        split: str = "testing",
        rank_split: str = "screening",
        columns: Mapping[str, str] | None = None,
        seed: int = 0,
        quiet: bool = False,
        batch_size: int = 32,
        batched: bool = True,
        prefix_cache: bool = True,
        memory_mb: float = 512,
        modality: str | Sequence[str] | None = None,
    ) -> None:
        if split == rank_split:
            raise NeuroprobeError(
                f"units must be ranked on one split and lesions evaluated on the other; both are {split!r}."
            )
        subject.check_battery(battery)
        self.subject = subject
        self.battery = battery
        self.cells = _load_cells(cells)
        self.columns = dict(columns or {})
        self.seed = int(seed)
        self.quiet = quiet
        self.batch_size = batch_size
        self.split, self.rank_split = split, rank_split
        self.readout = readout or subject.default_readout
        if self.readout not in subject.readouts:
            raise NeuroprobeError(
                f"subject {subject.name!r} has no readout {self.readout!r}; it has {', '.join(subject.readouts) or 'none'}."
            )
        self.test = battery.split(split)
        self.modality = _modalities(modality, self.test, battery.name)
        if self.modality:
            self.test = self.test[self.test["modality"].isin(self.modality)]
        self.rank_rows = battery.split(rank_split)
        if len(self.test) == 0 or len(self.rank_rows) == 0:
            raise NeuroprobeError(f"battery {battery.name!r} needs both {rank_split!r} and {split!r} stimuli for lesion studies.")
        self.site_names = self._choose_sites(sites)
        # the readout's intact state (e.g. concept prototypes) comes from the unlesioned model
        prepare = getattr(subject, "prepare_readout", None)
        if prepare is not None:
            prepare(battery, self.readout)
        self.screen = site_responses(subject, battery, self.rank_rows, self.site_names, batch_size=batch_size)
        self.n_units = {s: r.shape[1] for s, r in self.screen.items()}
        self.active = {s: active_mask(r) for s, r in self.screen.items()}
        self._engine: BatchedEvaluator | None = None
        if batched:
            runner, why = make_runner(subject, battery, self.readout)
            if runner is not None:
                self._engine = BatchedEvaluator(runner, self.test, batch_size=batch_size, memory_mb=memory_mb,
                                                prefix_cache=prefix_cache, seed=self.seed)
                cached = ", prefix-cached" if prefix_cache and runner.blocks else ""
                self.engine = f"batched ({why}{cached}; {', '.join(BATCHED_MODES)} in replicas)"
            else:
                self.engine = f"one lesion at a time ({why})"
                warnings.warn(f"lesions are evaluated one at a time: {why}.", stacklevel=2)
        else:
            self.engine = "one lesion at a time (batched=False)"
        self._single_baseline: np.ndarray | None = None
        self.baseline = self._engine.intact() if self._engine is not None else self._baseline_single()
        self.test_concepts = self.test["concept"].to_numpy()
        self.concepts = [c for c in battery.concept_names if c in set(self.test_concepts)]
        self._selectivity: dict[str, pd.DataFrame] = {}
        self._top: dict[str, pd.DataFrame] = {}

    # ------------------------------------------------------------- set-up
    def _choose_sites(self, sites: str | Sequence[str] | None) -> list[str]:
        cells = self.cells
        if cells is not None and hasattr(cells, "site_names"):  # a recording: its feature sites' SAEs come along
            from neuroprobe.sae.sites import attach_recorded

            attach_recorded(self.subject, cells)
        if isinstance(cells, pd.DataFrame):
            col = self.columns.get("site", "site")
            if col not in cells.columns:
                raise NeuroprobeError(f"the cells table has no {col!r} column; name it with --site-col.")
            names = list(dict.fromkeys(cells[col].astype(str)))
        elif cells is not None and hasattr(cells, "site_names"):
            names = list(cells.site_names)
        else:
            names = [s.name for s in self.subject.sites(sites or "mlp")]
            sites = None
        resolve_sites(self.subject, names)  # one clear error for a site the subject lacks
        if sites is not None:
            wanted = {s.name for s in self.subject.sites(sites)}
            names = [n for n in names if n in wanted]
            if not names:
                raise NeuroprobeError(f"no site of the cells is in montage {sites!r}; widen --sites.")
        return names

    def _score(self) -> np.ndarray:
        return self.subject.readout(self.test, self.battery, self.readout, batch_size=self.batch_size)

    def _baseline_single(self) -> np.ndarray:
        if self._single_baseline is None:
            self._single_baseline = self._score()
        return self._single_baseline

    def check_concept(self, concept: str) -> None:
        """Raise a clear error for a concept the battery cannot test."""
        if concept not in self.battery.concepts:
            raise NeuroprobeError(
                f"concept {concept!r} is not in battery {self.battery.name!r}; it has {', '.join(self.battery.concept_names)}."
            )
        if concept not in self.concepts:
            raise NeuroprobeError(f"concept {concept!r} has no {self.split!r} stimuli in battery {self.battery.name!r}.")

    # ------------------------------------------------------------- rankings
    def selectivity(self, concept: str) -> pd.DataFrame:
        """d′ of every unit at the study's sites for ``concept`` on the ranking split."""
        if concept not in self._selectivity:
            labels = self.rank_rows["concept"].to_numpy()
            parts = []
            for s in self.site_names:
                parts.append(pd.DataFrame({"site": s, "unit": np.arange(self.n_units[s]),
                                           "dprime": dprime(self.screen[s], labels == concept), "active": self.active[s]}))
            self._selectivity[concept] = pd.concat(parts, ignore_index=True)
        return self._selectivity[concept]

    def ranking(self, concept: str) -> pd.DataFrame:
        """Active units at the study's sites, best for ``concept`` first (``site, unit, score``)."""
        self.check_concept(concept)
        if concept in self._top:
            return self._top[concept]
        cells = self.cells
        if isinstance(cells, pd.DataFrame):
            order = cells_ranking(cells, concept, columns=self.columns)[["site", "unit", "score"]]
            if order.empty:
                raise NeuroprobeError(f"the cells table lists no units for concept {concept!r}; choose another --concept.")
        elif cells is not None and hasattr(cells, "responses"):
            r = rank_units(cells, concept, split=self.rank_split, sites=self.site_names)
            order = r.rename(columns={"dprime": "score"})[["site", "unit", "score"]]
        else:
            r = self.selectivity(concept).sort_values("dprime", ascending=False, kind="mergesort")
            order = r.rename(columns={"dprime": "score"})[["site", "unit", "score"]]
        order = order[order["site"].isin(self.site_names)]
        for s, g in order.groupby("site"):
            bad = g["unit"][g["unit"] >= self.n_units[s]]
            if len(bad):
                raise NeuroprobeError(f"unit {int(bad.iloc[0])} of the cells is out of range for site {s!r} ({self.n_units[s]} units).")
        keep = np.array([self.active[s][u] for s, u in zip(order["site"], order["unit"])], dtype=bool)
        order = order[keep].reset_index(drop=True)
        self._top[concept] = order
        return order

    def top(self, concept: str, k: int) -> dict[str, np.ndarray] | None:
        """The ``k`` best-ranked units (``None`` when fewer are ranked)."""
        order = self.ranking(concept)
        if k > len(order):
            return None
        return _group(order.iloc[:k])

    def bottom(self, concept: str, template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The least selective active units (smallest ``|d′|``), with ``template``'s count per site."""
        sel = self.selectivity(concept)
        out = {}
        for s, units in template.items():
            g = sel[(sel["site"] == s) & sel["active"]]
            g = g.assign(a=g["dprime"].abs()).sort_values(["a", "unit"], kind="mergesort")
            out[s] = np.sort(g["unit"].to_numpy()[: len(units)])
        return out

    def random(self, template: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random active units with ``template``'s count per site."""
        out = {}
        for s, units in template.items():
            pool = np.flatnonzero(self.active[s])
            if len(units) > len(pool):
                raise NeuroprobeError(f"site {s!r} has only {len(pool)} active units; cannot draw {len(units)} at random.")
            out[s] = np.sort(rng.choice(pool, size=len(units), replace=False))
        return out

    def complement(self, kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every unit of ``kept``'s sites except the kept ones."""
        return {s: np.setdiff1d(np.arange(self.n_units[s]), units) for s, units in kept.items()}

    # ----------------------------------------------------------- evaluation
    def evaluate(self, units: Mapping[str, np.ndarray], mode: str = "zero", *, factor: float | None = None) -> pd.Series:
        """Mean readout change per tested concept under one lesion (``lesioned - intact``), one forward pass per batch.

        The reference path: :meth:`evaluate_many` gives the same numbers for many lesions at once.
        """
        if count_units(units) == 0:
            return pd.Series(0.0, index=self.concepts)
        ref = self.screen if mode in ("mean", "resample") else None
        with lesion(self.subject, units, mode, factor=factor if mode == "scale" else None, reference=ref, seed=self.seed):
            scores = self._score()
        return self._change(scores, self._baseline_single(), mode, factor)

    def _change(self, scores: np.ndarray, baseline: np.ndarray, mode: str = "zero", factor: float | None = None) -> pd.Series:
        bad = ~np.isfinite(np.asarray(scores, dtype=np.float64)) & np.isfinite(np.asarray(baseline, dtype=np.float64))
        if bad.any():
            why = (f"a scale factor of {factor:g} overflows the subject's activations; use a smaller --factor"
                   if mode == "scale" else "the lesioned subject computes no number for them")
            raise NeuroprobeError(f"the {mode} lesion made the readout NaN or infinite for {int(bad.sum())} of "
                                  f"{len(bad)} stimuli: {why}.")
        change = pd.Series(scores - baseline).groupby(self.test_concepts).mean()
        return change.reindex(self.concepts)

    def evaluate_many(self, lesions: Sequence[Mapping[str, np.ndarray]], mode: str = "zero", *,
                      factor: float | None = None, progress: Any = None) -> list[pd.Series]:
        """:meth:`evaluate` for many lesions: batched and prefix-cached when :attr:`engine` allows.

        Parameters
        ----------
        lesions
            ``site -> unit indices`` per lesion.
        mode, factor
            As for :meth:`evaluate` (one mode for all).
        progress
            Called with the number of lesions finished (e.g. a tqdm bar's ``update``).

        Returns
        -------
        list of pandas.Series
            Mean readout change per tested concept, one per lesion, in order.
        """
        out: list[pd.Series | None] = [None] * len(lesions)
        todo = []
        for i, units in enumerate(lesions):
            if count_units(units) == 0:
                out[i] = pd.Series(0.0, index=self.concepts)
            else:
                todo.append(i)
        if self._engine is None or mode not in BATCHED_MODES:

            def one_by_one(part: Sequence[Mapping[str, np.ndarray]], done: Any) -> list[pd.Series]:
                changes = []
                for units in part:
                    changes.append(self.evaluate(units, mode, factor=factor))
                    if done is not None:
                        done(1)
                return changes

            for i, change in zip(todo, sweep.evaluate(one_by_one, [lesions[i] for i in todo], progress)):
                out[i] = change  # under torchrun, each rank evaluates its share (neuroprobe.lesions.sweep)
        elif todo:
            scores = self.scores_many([lesions[i] for i in todo], mode, factor=factor, progress=progress)
            for j, i in enumerate(todo):
                out[i] = self._change(scores[j], self.baseline, mode, factor)
        if progress is not None and len(lesions) > len(todo):
            progress(len(lesions) - len(todo))
        return out  # type: ignore[return-value]

    def scores_many(self, lesions: Sequence[Mapping[str, np.ndarray]], mode: str = "zero", *,
                    factor: float | None = None, progress: Any = None) -> np.ndarray:
        """The readout of every evaluation stimulus under each lesion, ``[n_lesions, n_stimuli]``.

        Stimuli are the rows of :attr:`test` in order; :attr:`baseline` holds the intact
        scores they compare with (``lesioned - baseline`` is what :meth:`evaluate_many`
        averages per concept).  Batched like :meth:`evaluate_many` when :attr:`engine` allows;
        under ``torchrun`` each rank scores its share (:mod:`neuroprobe.lesions.sweep`).
        """
        return sweep.evaluate(lambda part, done: self._scores_here(part, mode, factor, done), lesions, progress)

    def _scores_here(self, lesions: Sequence[Mapping[str, np.ndarray]], mode: str, factor: float | None,
                     progress: Any) -> np.ndarray:
        """:meth:`scores_many` in this process."""
        if self._engine is None or mode not in BATCHED_MODES:
            ref = self.screen if mode in ("mean", "resample") else None
            out = np.full((len(lesions), len(self.test)), np.nan)
            for i, units in enumerate(lesions):
                if count_units(units) == 0:
                    out[i] = self._baseline_single()
                else:
                    with lesion(self.subject, units, mode, factor=factor if mode == "scale" else None, reference=ref,
                                seed=self.seed):
                        out[i] = self._score()
                if progress is not None:
                    progress(1)
            return out
        names = list(dict.fromkeys(s for units in lesions for s in units))
        sites = {s.name: s for s in resolve_sites(self.subject, names)}
        return self._engine.scores(list(lesions), mode, factor=factor if mode == "scale" else None,
                                   reference=self.screen if mode in ("mean", "resample") else None, sites=sites,
                                   progress=progress)

    def _row(self, concept: str, change: pd.Series, **extra: Any) -> dict[str, Any]:
        others = change.drop(concept)
        worst = others.idxmin() if others.notna().any() else None  # a readout may be NaN (e.g. an overflowing scale)
        return dict(concept=concept, readout=self.readout, **extra, target_change=float(change[concept]),
                    other_change=float(others.mean()) if len(others) else np.nan,
                    most_hit_other=worst, most_hit_other_change=float(others.min()) if len(others) else np.nan,
                    target_rank=1 + int((others < change[concept]).sum()))

    # ------------------------------------------------------------ experiments
    def dose_response(
        self,
        concept: str,
        ks: Iterable[int] = (1, 2, 4, 8, 16),
        modes: str | Sequence[str] = ("zero", "mean"),
        *,
        random_draws: int = 100,
        keep_draws: int = 10,
        orders: Sequence[str] = ORDERS,
        factor: float | None = None,
        sequential: bool = False,
        alpha: float = 0.05,
    ) -> pd.DataFrame:
        """Readout change for top-, bottom-, random-``k`` lesions and keep-only-``k`` complements.

        Parameters
        ----------
        concept, ks, modes, keep_draws, orders, factor
            What to lesion and how (see the module docstring for the orders).
        random_draws
            Random lesions per ``k`` and mode: exactly this many, or with
            ``sequential`` at most this many.
        sequential
            Stop drawing random lesions once the decisions ``p_random <= alpha`` and
            ``p_random_specific <= alpha`` are both settled (Besag & Clifford 1991;
            see :func:`sequential_p`): the decisions are those of all
            ``random_draws`` draws, and a null lesion costs a few draws instead of
            ``random_draws``.  Needs ``top`` in ``orders``.
        alpha
            The level the sequential decisions are settled at.

        Returns
        -------
        pandas.DataFrame
            One row per evaluated lesion: ``concept, readout, mode, order, k, draw`` (-1 for
            deterministic orders), ``n_units, n_sites, units`` (top only),
            ``target_change, other_change, most_hit_other, most_hit_other_change, target_rank``;
            random rows also ``max_draws`` and ``alpha`` (``NaN`` when the draws were fixed).
        """
        modes = [modes] if isinstance(modes, str) else list(modes)
        bad = set(orders) - set(ORDERS)
        if bad:
            raise NeuroprobeError(f"unknown lesion order(s) {', '.join(sorted(bad))}; use {', '.join(ORDERS)}.")
        if sequential and ("top" not in orders or "random" not in orders):
            raise NeuroprobeError("sequential random draws compare against the top-k lesion; keep 'top' and 'random' in orders.")
        if not 0 < alpha < 1:
            raise NeuroprobeError(f"alpha must be between 0 and 1, not {alpha}.")
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise NeuroprobeError("k must be positive integers, e.g. --k 1,2,4,8,16.")
        order = self.ranking(concept)
        usable = [k for k in ks if k <= len(order)]
        if not usable:
            raise NeuroprobeError(f"only {len(order)} active unit(s) are ranked for {concept!r}; choose k <= {len(order)}.")
        if len(usable) < len(ks):
            warnings.warn(f"{concept}: only {len(order)} ranked units; skipping k = {[k for k in ks if k > len(order)]}.", stacklevel=2)
        per_k = sum(1 for o in ("top", "bottom", "keep_top") if o in orders)
        per_k += random_draws * ("random" in orders) + keep_draws * ("keep_random" in orders)
        bar = tqdm(total=per_k * len(usable) * len(modes), unit="lesion", desc=f"lesion {concept}", disable=self.quiet,
                   dynamic_ncols=True)
        rows = []
        try:
            for k in usable:
                top = self.top(concept, k)
                assert top is not None
                plans: list[tuple[str, int, dict[str, np.ndarray]]] = []
                if "top" in orders:
                    plans.append(("top", -1, top))
                if "bottom" in orders:
                    plans.append(("bottom", -1, self.bottom(concept, top)))
                if "keep_top" in orders:
                    plans.append(("keep_top", -1, self.complement(top)))
                rng = np.random.default_rng([self.seed, k])  # the same random lesions for every mode
                randoms = [self.random(top, rng) for _ in range(random_draws)] if "random" in orders else []
                if "keep_random" in orders:
                    plans += [("keep_random", d, self.complement(self.random(top, rng))) for d in range(keep_draws)]
                if not sequential:
                    plans += [("random", d, u) for d, u in enumerate(randoms)]
                for mode in modes:
                    changes = self.evaluate_many([u for _, _, u in plans], mode, factor=factor, progress=bar.update)
                    for (name, draw, units), change in zip(plans, changes):
                        rows.append(self._row(
                            concept, change, mode=mode, order=name, k=k, draw=draw, n_units=count_units(units),
                            n_sites=len(units), units=_describe(units) if name == "top" else "",
                        ))
                    if "random" in orders:
                        if sequential:
                            top_row = next(r for r in rows[::-1] if r["order"] == "top" and r["mode"] == mode and r["k"] == k)
                            for d, change in enumerate(self._sequential(concept, randoms, mode, factor, top_row, alpha, bar)):
                                rows.append(self._row(concept, change, mode=mode, order="random", k=k, draw=d,
                                                      n_units=count_units(randoms[d]), n_sites=len(randoms[d]), units="",
                                                      max_draws=random_draws, alpha=alpha))
                        else:
                            for r in rows[-random_draws:] if random_draws else []:
                                r.update(max_draws=random_draws, alpha=np.nan)
        finally:
            bar.close()
        return pd.DataFrame(rows)

    def _sequential(self, concept: str, randoms: list[dict[str, np.ndarray]], mode: str, factor: float | None,
                    top_row: Mapping[str, Any], alpha: float, bar: Any) -> list[pd.Series]:
        """Random lesions evaluated in order until both p-value decisions at ``alpha`` are settled."""
        n_max = len(randoms)
        h = sequential_h(alpha, n_max)
        t_obs = top_row["target_change"]
        gap_obs = top_row["target_change"] - top_row["other_change"]
        got: list[pd.Series] = []
        hits_t = hits_g = 0
        chunk = max(10, 2 * h)
        while len(got) < n_max:
            batch = randoms[len(got) : len(got) + chunk]
            for change in self.evaluate_many(batch, mode, factor=factor):
                got.append(change)
                row = self._row(concept, change)
                hits_t += row["target_change"] <= t_obs
                hits_g += row["target_change"] - row["other_change"] <= gap_obs
                if hits_t >= h and hits_g >= h:
                    break
            if hits_t >= h and hits_g >= h:
                break
            chunk *= 2
        bar.total = (bar.total or 0) - (n_max - len(got))  # draws not needed leave the bar's total
        bar.update(len(got))
        return got

    def forgetting_matrix(self, concepts: Sequence[str] | None = None, k: int = DEFAULT_K, mode: str = "zero",
                          *, factor: float | None = None) -> pd.DataFrame:
        """Readout change of every tested concept (columns) when each concept's top-``k`` is lesioned (rows)."""
        concepts = list(concepts or self.concepts)
        rows = {}
        tops = {}
        for c in concepts:
            try:
                top = self.top(c, k)
            except NeuroprobeError:  # the cells table has no units for this concept
                top = None
            if top is None:
                warnings.warn(f"{c}: fewer than {k} ranked units; its row of the forgetting matrix is left empty.", stacklevel=2)
                rows[c] = pd.Series(np.nan, index=self.concepts)
            else:
                tops[c] = top
        with tqdm(total=len(tops), desc=f"matrix {mode}", unit="concept", disable=self.quiet, dynamic_ncols=True) as bar:
            for c, change in zip(tops, self.evaluate_many(list(tops.values()), mode, factor=factor, progress=bar.update)):
                rows[c] = change
        rows = {c: rows[c] for c in concepts}
        m = pd.DataFrame(rows).T.reindex(columns=self.concepts)
        m.index.name, m.columns.name = "lesioned", "tested"
        return m

    def class_selectivity(self, transform: str = "shift") -> pd.DataFrame:
        """Morcos et al.'s (2018) class selectivity index of every unit at the study's sites, on the ranking split.

        ``(mu_max - mu_rest) / (mu_max + mu_rest)`` over the concepts' mean responses
        (``mu_rest``: the mean of the other concepts' means) of the non-negative
        transform of the responses (see :mod:`neuroprobe.analysis.indices`), from the
        stimuli that reach each site (an image site has no response to a text).

        Parameters
        ----------
        transform
            ``shift`` (each unit's least response becomes 0) or ``clip``.

        Returns
        -------
        pandas.DataFrame
            ``site, unit, active, si_morcos, pref_concept`` (the concept of ``mu_max``);
            inactive units have NaN ``si_morcos``.
        """
        from neuroprobe.analysis.indices import class_means, morcos_si, nonneg

        labels = self.rank_rows["concept"].to_numpy()
        parts = []
        for s in self.site_names:
            r = np.asarray(self.screen[s], dtype=np.float64)
            reach = ~np.isnan(r).all(axis=1)
            concepts = [c for c in self.concepts if (labels[reach] == c).any()]
            onehot = (labels[reach][:, None] == np.asarray(concepts, dtype=object)[None, :]).astype(np.float64)
            x = np.nan_to_num(r[reach].T, nan=0.0)
            means = class_means(nonneg(x, transform), onehot) if len(concepts) else np.full((len(x), 0), np.nan)
            active = self.active[s]
            si = np.where(active, morcos_si(means), np.nan) if means.shape[1] else np.full(len(x), np.nan)
            pref = np.asarray(concepts, dtype=object)[np.nanargmax(np.where(np.isfinite(means), means, -np.inf), axis=1)] \
                if means.shape[1] else np.full(len(x), None, dtype=object)
            parts.append(pd.DataFrame({"site": s, "unit": np.arange(len(x)), "active": active, "si_morcos": si,
                                       "pref_concept": np.where(active, pref, None)}))
        return pd.concat(parts, ignore_index=True)

    def single_unit_changes(self, mode: str = "zero", *, units: pd.DataFrame | None = None,
                            factor: float | None = None) -> pd.DataFrame:
        """Lesion units one at a time: the readout change of every tested concept per unit.

        Parameters
        ----------
        mode, factor
            Lesion mode (see :meth:`evaluate`).
        units
            Rows with ``site, unit`` to lesion (default: every active unit at the study's sites).

        Returns
        -------
        pandas.DataFrame
            ``site, unit`` and one column per tested concept (mean ``lesioned - intact``).
        """
        if units is None:
            units = pd.DataFrame([(s, int(u)) for s in self.site_names for u in np.flatnonzero(self.active[s])],
                                 columns=["site", "unit"])
        pairs = [(str(s), int(u)) for s, u in zip(units["site"], units["unit"])]
        for s, u in pairs:
            if s not in self.n_units or not 0 <= u < self.n_units[s]:
                raise NeuroprobeError(f"unit {u} of site {s!r} is not among the study's units.")
        with tqdm(total=len(pairs), desc="single units", unit="lesion", disable=self.quiet, dynamic_ncols=True) as bar:
            changes = self.evaluate_many([{s: np.array([u])} for s, u in pairs], mode, factor=factor, progress=bar.update)
        frame = pd.DataFrame([c.to_numpy() for c in changes], columns=self.concepts) if pairs else \
            pd.DataFrame(columns=self.concepts, dtype=float)
        frame.insert(0, "unit", [u for _, u in pairs])
        frame.insert(0, "site", [s for s, _ in pairs])
        return frame

    def keep_only(self, concept: str, ks: Iterable[int], site: str, mode: str = "zero", *, draws: int = 10,
                  factor: float | None = None) -> pd.DataFrame:
        """Keep only ``k`` units of one site: every other unit of ``site`` is lesioned.

        ``keep_top`` keeps the ``k`` best-ranked units of ``site`` for ``concept``;
        ``keep_random`` keeps ``k`` random active units of ``site`` (``draws`` per ``k``,
        seeded by the study's seed and ``k``).  Unlike the ``keep_top`` order of
        :meth:`dose_response` (whose top ``k`` may span several sites), the kept units
        are all at one site, so every ``k`` lesions the same site.

        Parameters
        ----------
        concept
            The concept whose units are kept.
        ks
            Units kept (values above the site's ranked units are skipped).
        site
            One of the study's sites.
        mode, factor
            Lesion mode (see :meth:`evaluate`).
        draws
            Random keep-``k`` lesions per ``k``.

        Returns
        -------
        pandas.DataFrame
            One row per lesion: ``concept, site, mode, order, k, draw`` (-1 for ``keep_top``),
            ``n_units`` (lesioned), ``target_change, other_change, most_hit_other,
            most_hit_other_change, target_rank``.
        """
        if site not in self.site_names:
            raise NeuroprobeError(f"site {site!r} is not one of the study's sites ({', '.join(self.site_names)}).")
        order = self.ranking(concept)
        ranked = order[order["site"] == site]["unit"].to_numpy().astype(np.int64)
        pool = np.flatnonzero(self.active[site])
        plans: list[tuple[str, int, int, dict[str, np.ndarray]]] = []
        for k in sorted({int(k) for k in ks}):
            if k < 1 or k > len(ranked):
                continue
            plans.append(("keep_top", k, -1, self.complement({site: np.sort(ranked[:k])})))
            rng = np.random.default_rng([self.seed, 15485863, k])
            for d in range(draws):
                kept = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))
                plans.append(("keep_random", k, d, self.complement({site: kept})))
        with tqdm(total=len(plans), desc=f"keep only {concept}", unit="lesion", disable=self.quiet,
                  dynamic_ncols=True) as bar:
            changes = self.evaluate_many([u for *_, u in plans], mode, factor=factor, progress=bar.update)
        rows = [self._row(concept, change, site=site, mode=mode, order=name, k=k, draw=d, n_units=count_units(u))
                for (name, k, d, u), change in zip(plans, changes)]
        return pd.DataFrame(rows)

    def forgetting_null(self, concepts: Sequence[str] | None = None, k: int = DEFAULT_K, mode: str = "zero", *,
                        draws: int = 50, factor: float | None = None) -> pd.DataFrame:
        """Random lesions matched to each concept's top-``k`` (same count per site): the forgetting matrix's null.

        Parameters
        ----------
        concepts, k, mode, factor
            As for :meth:`forgetting_matrix`.
        draws
            Random lesions per lesioned concept (seeded by the study's seed, the concept's
            position and ``k``).

        Returns
        -------
        pandas.DataFrame
            Long format: ``lesioned, draw, tested, change`` (concepts with fewer than ``k``
            ranked units are left out).
        """
        concepts = list(concepts or self.concepts)
        plans = []
        for i, c in enumerate(concepts):
            try:
                top = self.top(c, k)
            except NeuroprobeError:
                top = None
            if top is None:
                continue
            rng = np.random.default_rng([self.seed, 104729, i, k])
            plans += [(c, d, self.random(top, rng)) for d in range(draws)]
        rows = []
        with tqdm(total=len(plans), desc=f"matrix null {mode}", unit="lesion", disable=self.quiet,
                  dynamic_ncols=True) as bar:
            changes = self.evaluate_many([u for _, _, u in plans], mode, factor=factor, progress=bar.update)
        for (c, d, _), change in zip(plans, changes):
            rows += [(c, d, t, float(v)) for t, v in change.items()]
        return pd.DataFrame(rows, columns=["lesioned", "draw", "tested", "change"])

    def selectivity_vs_importance(self, concept: str, mode: str = "zero", *, n_top: int = 8, n_random: int = 24,
                                  factor: float | None = None) -> pd.DataFrame:
        """Single-unit lesions per site: each unit's d′ beside what its removal costs.

        At every site the ``n_top`` most selective active units and ``n_random``
        other active units (seeded) are lesioned one at a time.
        """
        self.check_concept(concept)
        sel = self.selectivity(concept)
        rng = np.random.default_rng([self.seed, 7919])
        chosen = []
        for s in self.site_names:
            g = sel[(sel["site"] == s) & sel["active"]].sort_values("dprime", ascending=False, kind="mergesort")
            top = g["unit"].to_numpy()[:n_top]
            rest = np.setdiff1d(g["unit"].to_numpy(), top)
            rand = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else np.array([], int)
            chosen += [(s, int(u), "top") for u in top] + [(s, int(u), "random") for u in np.sort(rand)]
        d = sel.set_index(["site", "unit"])["dprime"]
        rows = []
        with tqdm(total=len(chosen), desc=f"single units {concept}", unit="lesion", disable=self.quiet,
                  dynamic_ncols=True) as bar:
            changes = self.evaluate_many([{s: np.array([u])} for s, u, _ in chosen], mode, factor=factor, progress=bar.update)
        for (s, u, how), change in zip(chosen, changes):
            rows.append(self._row(concept, change, mode=mode, site=s, unit=u, chosen=how, dprime=float(d[(s, u)])))
        return pd.DataFrame(rows)


def _modalities(modality: str | Sequence[str] | None, test: pd.DataFrame, battery: str) -> list[str]:
    """The evaluation modalities asked for (empty: all), checked against the evaluation split."""
    if modality is None:
        return []
    wanted = [m.strip() for m in (modality.split(",") if isinstance(modality, str) else modality) if m.strip()]
    have = set(test["modality"])
    missing = [m for m in wanted if m not in have]
    if not wanted or missing:
        raise NeuroprobeError(f"battery {battery!r} has no {', '.join(missing) or '(empty)'} stimuli to evaluate; "
                              f"its modalities are {', '.join(sorted(have))}.")
    return wanted


def _group(df: pd.DataFrame) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for s, u in zip(df["site"], df["unit"]):
        out.setdefault(str(s), []).append(int(u))
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}


def _describe(units: Mapping[str, np.ndarray]) -> str:
    return ";".join(f"{s}:{','.join(map(str, u))}" for s, u in units.items())


# ---------------------------------------------------------------- summaries


def sequential_h(alpha: float, n_max: int) -> int:
    """Exceedances after which a sequential random-lesion test stops: ``floor(alpha (n_max + 1)) + 1``.

    With this ``h`` the decision ``p <= alpha`` of :func:`sequential_p` is the
    decision of the fixed test with all ``n_max`` draws, ``(1 + g) / (1 + n_max)``:
    ``h`` exceedances already make the fixed p-value exceed ``alpha``, and so does
    the sequential one, ``h / l >= h / n_max > alpha``.
    """
    return int(np.floor(alpha * (n_max + 1))) + 1


def sequential_p(exceed: np.ndarray, n_max: int, alpha: float) -> tuple[float, int]:
    """Besag–Clifford (1991) sequential Monte Carlo p-value.

    Parameters
    ----------
    exceed
        Per random draw, in drawing order: was it at least as extreme as the observed lesion?
    n_max
        The most draws the procedure may take.
    alpha
        The level whose decision the stopping settles (sets ``h``, see :func:`sequential_h`).

    Returns
    -------
    p, draws
        ``h / l`` when the ``h``-th exceedance came at draw ``l`` (sampling stops
        there; a valid p-value, Besag & Clifford 1991), else ``(1 + g) / (1 + n)``
        over the ``n`` draws with ``g`` exceedances; and the draws it used.
    """
    exceed = np.asarray(exceed, dtype=bool)
    h = sequential_h(alpha, n_max)
    hits = np.cumsum(exceed)
    where = np.flatnonzero(hits >= h)
    if len(where):
        stop = int(where[0]) + 1
        return h / stop, stop
    return (1 + int(hits[-1] if len(hits) else 0)) / (1 + len(exceed)), len(exceed)


def specificity(target_change: float, other_change: float, floor: float = SPECIFICITY_FLOOR) -> float:
    """Target drop over non-target drop (the latter floored at ``floor``); see the module docstring."""
    return float(-target_change / max(-other_change, floor))


def summarize(dose: pd.DataFrame) -> pd.DataFrame:
    """The forgetting table: each top-``k`` lesion against its controls.

    Parameters
    ----------
    dose
        Output of :meth:`LesionStudy.dose_response` (needs ``top`` and ``random`` rows).

    Returns
    -------
    pandas.DataFrame
        One row per ``(concept, mode, k)``: ``target_change, other_change,
        specificity, gap, most_hit_other(_change), target_rank``, the random lesions' mean and SD
        of ``target_change`` and mean ``other_change``, ``p_random``,
        ``p_random_specific``, ``n_random`` (the draws used), ``p_method``
        (``fixed``: ``(1 + g) / (1 + n)``; ``sequential``: :func:`sequential_p`), and when present ``bottom_target_change``,
        ``keep_top_target_change``/``keep_top_other_change`` and
        ``keep_random_target_change``; plus ``units`` (the top-``k`` lesion) and ``readout`` (its name).
    """
    rows = []
    for (concept, mode, k), g in dose.groupby(["concept", "mode", "k"], sort=False):
        top = g[g["order"] == "top"]
        if top.empty:
            continue
        t = top.iloc[0]
        rnd = g[g["order"] == "random"]
        gap = t.target_change - t.other_change
        row = dict(concept=concept, mode=mode, k=int(k), target_change=t.target_change, other_change=t.other_change,
                   specificity=specificity(t.target_change, t.other_change), gap=gap,
                   most_hit_other=t.most_hit_other, most_hit_other_change=t.most_hit_other_change,
                   target_rank=int(t.target_rank))
        n = len(rnd)
        if n:
            rnd = rnd.sort_values("draw", kind="mergesort")
            rgap = rnd["target_change"] - rnd["other_change"]
            alpha = float(rnd["alpha"].iloc[0]) if "alpha" in rnd.columns else np.nan
            if np.isfinite(alpha):  # sequential draws: Besag-Clifford p-values
                n_max = int(rnd["max_draws"].iloc[0])
                p_t, _ = sequential_p((rnd["target_change"] <= t.target_change).to_numpy(), n_max, alpha)
                p_g, _ = sequential_p((rgap <= gap).to_numpy(), n_max, alpha)
                method = "sequential"
            else:
                p_t = (1 + int((rnd["target_change"] <= t.target_change).sum())) / (1 + n)
                p_g = (1 + int((rgap <= gap).sum())) / (1 + n)
                method = "fixed"
            row.update(random_target_change=rnd["target_change"].mean(), random_target_sd=rnd["target_change"].std(ddof=1) if n > 1 else np.nan,
                       random_other_change=rnd["other_change"].mean(),
                       p_random=p_t, p_random_specific=p_g, n_random=n, p_method=method)
        else:
            row.update(random_target_change=np.nan, random_target_sd=np.nan, random_other_change=np.nan,
                       p_random=np.nan, p_random_specific=np.nan, n_random=0, p_method="")
        for order in ("bottom", "keep_top", "keep_random"):
            sub = g[g["order"] == order]
            if len(sub):
                row[f"{order}_target_change"] = sub["target_change"].mean()
                row[f"{order}_other_change"] = sub["other_change"].mean()
        row["units"] = t["units"]
        if "readout" in t.index:
            row["readout"] = t["readout"]
        rows.append(row)
    return pd.DataFrame(rows)


def importance_summary(units: pd.DataFrame) -> pd.DataFrame:
    """Per site: does a unit's selectivity predict what its removal costs?

    Spearman correlation between d′ and the target drop (``-target_change``) of
    single-unit lesions (output of :meth:`LesionStudy.selectivity_vs_importance`),
    and the same for the selective drop (``other_change - target_change``).
    """
    from scipy.stats import spearmanr

    rows = []
    for (concept, mode, site), g in units.groupby(["concept", "mode", "site"], sort=False):
        drop = -g["target_change"]
        sel_drop = g["other_change"] - g["target_change"]
        ok = len(g) >= 3 and g["dprime"].nunique() > 1
        rho, p = spearmanr(g["dprime"], drop) if ok and drop.nunique() > 1 else (np.nan, np.nan)
        rho2, p2 = spearmanr(g["dprime"], sel_drop) if ok and sel_drop.nunique() > 1 else (np.nan, np.nan)
        top, rnd = g[g["chosen"] == "top"], g[g["chosen"] == "random"]
        rows.append(dict(concept=concept, mode=mode, site=site, n_units=len(g), spearman_drop=rho, p_drop=p,
                         spearman_selective_drop=rho2, p_selective_drop=p2,
                         top_mean_target_change=top["target_change"].mean(), random_mean_target_change=rnd["target_change"].mean()))
    return pd.DataFrame(rows)


# ------------------------------------------------------------- public calls


def _study(subject, battery, cells, **kw) -> LesionStudy:
    study = kw.pop("study", None)
    return study if study is not None else LesionStudy(subject, battery, cells, **kw)


def _default_k(cells: Any, concept: str, columns: Mapping[str, str] | None) -> int:
    if isinstance(cells, pd.DataFrame) and "is_cell" in cells.columns:
        r = cells_ranking(cells, concept, columns=columns)
        return max(1, int(r["is_cell"].sum()))
    return DEFAULT_K


def forgetting(
    subject: Subject,
    battery: "Battery",
    cells: Any = None,
    concept: str | None = None,
    *,
    k: int | Sequence[int] | None = None,
    mode: str | Sequence[str] = ("zero", "mean"),
    factor: float | None = None,
    random_draws: int = 100,
    sequential: bool = False,
    alpha: float = 0.05,
    split: str = "testing",
    rank_split: str = "screening",
    sites: str | Sequence[str] | None = None,
    readout: str | None = None,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    quiet: bool = False,
    study: LesionStudy | None = None,
) -> pd.DataFrame:
    """Lesion a concept's top-ranked units and measure what the subject forgets.

    Parameters
    ----------
    subject, battery
        The subject and the battery (units ranked on ``rank_split``, evaluated on ``split``).
    cells
        A cells table (DataFrame or CSV path), a recording, or ``None`` (rank by d′ here).
    concept
        The concept whose units are lesioned.
    k
        Units lesioned (an int or several); default: the table's cells for the
        concept when it flags ``is_cell``, else 8.
    mode
        Lesion mode(s): ``zero``, ``mean``, ``resample``, ``scale`` (with ``factor``).
        Zero and mean by default: zeroing shifts every embedding, so both are reported.
    random_draws
        Random lesions of the same count per site (active units only) for the p-value
        (with ``sequential``: at most this many).
    sequential, alpha
        Stop drawing once the decisions at ``alpha`` are settled (see :meth:`LesionStudy.dose_response`).
    split, rank_split, sites, readout, columns, seed, quiet
        See :class:`LesionStudy`.
    study
        Reuse an existing :class:`LesionStudy` (its subject, battery and ranking).

    Returns
    -------
    pandas.DataFrame
        The forgetting table (see :func:`summarize`), one row per mode and ``k``.
    """
    if concept is None:
        raise NeuroprobeError("give the concept whose units to lesion.")
    s = _study(subject, battery, cells, study=study, sites=sites, readout=readout, split=split, rank_split=rank_split,
               columns=columns, seed=seed, quiet=quiet)
    ks = [k] if isinstance(k, (int, np.integer)) else (list(k) if k is not None else [_default_k(s.cells, concept, columns)])
    dose = s.dose_response(concept, ks, mode, random_draws=random_draws, orders=("top", "random"), factor=factor,
                           sequential=sequential, alpha=alpha)
    return summarize(dose)


def dose_response(
    subject: Subject,
    battery: "Battery",
    cells: Any = None,
    concept: str | None = None,
    *,
    ks: Iterable[int] = (1, 2, 4, 8, 16),
    mode: str | Sequence[str] = ("zero", "mean"),
    factor: float | None = None,
    random_draws: int = 100,
    keep_draws: int = 10,
    orders: Sequence[str] = ORDERS,
    sequential: bool = False,
    alpha: float = 0.05,
    split: str = "testing",
    rank_split: str = "screening",
    sites: str | Sequence[str] | None = None,
    readout: str | None = None,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    quiet: bool = False,
    study: LesionStudy | None = None,
) -> pd.DataFrame:
    """Dose-response over ``k`` for top-, bottom- and random-``k`` lesions and keep-only-top-``k``.

    Returns one row per evaluated lesion (see :meth:`LesionStudy.dose_response`);
    :func:`summarize` turns it into the forgetting table and
    :func:`~neuroprobe.lesions.figures.plot_dose_response` into the figure.
    """
    if concept is None:
        raise NeuroprobeError("give the concept whose units to lesion.")
    s = _study(subject, battery, cells, study=study, sites=sites, readout=readout, split=split, rank_split=rank_split,
               columns=columns, seed=seed, quiet=quiet)
    return s.dose_response(concept, ks, mode, random_draws=random_draws, keep_draws=keep_draws, orders=orders, factor=factor,
                           sequential=sequential, alpha=alpha)


def forgetting_matrix(
    subject: Subject,
    battery: "Battery",
    cells: Any = None,
    concepts: Sequence[str] | None = None,
    *,
    k: int = DEFAULT_K,
    mode: str = "zero",
    factor: float | None = None,
    split: str = "testing",
    rank_split: str = "screening",
    sites: str | Sequence[str] | None = None,
    readout: str | None = None,
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
    quiet: bool = False,
    study: LesionStudy | None = None,
) -> pd.DataFrame:
    """Lesioned-concept × tested-concept matrix of mean readout change (top-``k`` lesions).

    A diagonal more negative than its row means the lesions are concept-specific.
    """
    s = _study(subject, battery, cells, study=study, sites=sites, readout=readout, split=split, rank_split=rank_split,
               columns=columns, seed=seed, quiet=quiet)
    return s.forgetting_matrix(concepts, k, mode, factor=factor)


def selectivity_vs_importance(
    subject: Subject,
    battery: "Battery",
    concept: str,
    cells: Any = None,
    *,
    mode: str = "zero",
    n_top: int = 8,
    n_random: int = 24,
    factor: float | None = None,
    split: str = "testing",
    rank_split: str = "screening",
    sites: str | Sequence[str] | None = None,
    readout: str | None = None,
    seed: int = 0,
    quiet: bool = False,
    study: LesionStudy | None = None,
) -> pd.DataFrame:
    """Single-unit lesions per site, d′ beside cost (see :func:`importance_summary` for the per-site relation)."""
    s = _study(subject, battery, cells, study=study, sites=sites, readout=readout, split=split, rank_split=rank_split,
               seed=seed, quiet=quiet)
    return s.selectivity_vs_importance(concept, mode, n_top=n_top, n_random=n_random, factor=factor)
