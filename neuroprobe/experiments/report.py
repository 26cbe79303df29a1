"""An experiment's outputs: every number in ``results.csv``, the finding in ``results.md``, the figures.

A :class:`Report` collects the numbers an experiment measured (each with its condition:
the effect, or one of its controls), its figures and three sentences — the question, the
finding (null results included) and the published number it is compared with — and
writes them together, with the run's conditions (date, machine, command, time).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

#: Columns of ``results.csv`` (long format: one measured number per row).
COLUMNS = ("experiment", "subject", "condition", "site", "concept", "measure", "x", "value", "ci_low", "ci_high",
           "n", "note")


class Report:
    """Collect an experiment's numbers and figures; write ``results.csv``, ``results.md`` and PNGs.

    Parameters
    ----------
    name
        The experiment (the script's stem).
    out
        Output folder.
    question
        The question the experiment asks, one sentence.
    args
        The parsed command line (recorded in ``results.md``).

    Examples
    --------
    >>> rep = Report("rotation", out, "Are concept cells aligned with the unit axes?")  # doctest: +SKIP
    >>> rep.add("cells", 30, condition="trained", x=0.0)                                 # doctest: +SKIP
    >>> rep.figure(fig, "rotation_curve")                                                # doctest: +SKIP
    >>> rep.write(finding="...", control="...", published="Bau et al. 2017: ...")        # doctest: +SKIP
    """

    def __init__(self, name: str, out: str | Path, question: str, *, args: Any = None) -> None:
        self.name = name
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.question = question
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.figures: list[Path] = []
        self.tables: list[Path] = []
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    # ------------------------------------------------------------------ numbers
    def add(self, measure: str, value: float, *, condition: str = "trained", subject: str | None = None,
            site: str | None = None, concept: str | None = None, x: float | str | None = None,
            ci: tuple[float, float] | None = None, n: int | None = None, note: str | None = None) -> None:
        """Record one measured number (with its condition: the effect or a control)."""
        self.rows.append(dict(experiment=self.name, subject=subject or getattr(self.args, "model", None),
                              condition=condition, site=site, concept=concept, measure=measure, x=x,
                              value=float(value), ci_low=None if ci is None else float(ci[0]),
                              ci_high=None if ci is None else float(ci[1]), n=n, note=note))

    def add_frame(self, frame: pd.DataFrame, *, measures: list[str], **fixed: Any) -> None:
        """Record every ``measures`` column of ``frame`` (other known columns become the row's keys)."""
        keys = [c for c in ("subject", "condition", "site", "concept", "x", "n", "note") if c in frame.columns]
        for _, r in frame.iterrows():
            base = {k: r[k] for k in keys}
            base.update(fixed)
            for m in measures:
                if pd.notna(r[m]):
                    self.add(m, float(r[m]), **base)

    def table(self, frame: pd.DataFrame, name: str) -> Path:
        """Write an extra table (``<name>.csv``) beside the results."""
        from neuroprobe.output import write_csv

        path = write_csv(frame, self.out / f"{name}.csv")
        self.tables.append(path)
        return path

    @property
    def results(self) -> pd.DataFrame:
        """Every number recorded so far (the contents of ``results.csv``)."""
        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def value(self, measure: str, **where: Any) -> float:
        """The one recorded number matching ``measure`` and ``where`` (raises if none or several)."""
        df = self.results
        sel = df["measure"] == measure
        for k, v in where.items():
            sel &= df[k] == v
        hits = df[sel]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} rows for {measure} {where}")
        return float(hits["value"].iloc[0])

    # ------------------------------------------------------------------ figures
    def figure(self, fig: Any, name: str, *, dpi: int = 150, main: bool = False) -> Path:
        """Save a matplotlib figure as ``<name>.png`` and close it.

        The first figure saved (or the one with ``main=True``) is the experiment's main
        figure: with ``--gallery DIR`` a 480-pixel-wide thumbnail of it is written as
        ``DIR/<experiment>.png``.
        """
        import matplotlib.pyplot as plt

        from neuroprobe.output import save_figure

        path = save_figure(fig, self.out / f"{name}.png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        if main:
            self.figures.insert(0, path)
        else:
            self.figures.append(path)
        return path

    def _thumbnail(self) -> Path | None:
        gallery = getattr(self.args, "gallery", None)
        if gallery is None or not self.figures:
            return None
        from PIL import Image

        from neuroprobe.output import atomic_path

        Path(gallery).mkdir(parents=True, exist_ok=True)
        dest = Path(gallery) / f"{self.name}.png"
        with Image.open(self.figures[0]) as im:
            im = im.convert("RGB")
            width = min(480, im.width)
            im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
            with atomic_path(dest) as tmp:
                im.save(tmp, format="PNG", optimize=True)
        return dest

    # ------------------------------------------------------------------ writing
    def conditions(self) -> dict[str, str]:
        """The run's conditions: date, machine, command, wall and CPU time, peak memory."""
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._c0
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        return {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f} at the end",
            "command": " ".join(["python"] + sys.argv) if sys.argv and sys.argv[0] else "python API",
            "time": f"{wall:.0f} s wall, {cpu:.0f} CPU-s in this process, peak RSS {rss / 1024:.2f} GB",
        }

    def write(self, *, finding: str, control: str, published: str | None = None,
              summary: pd.DataFrame | None = None) -> Path:
        """Write ``results.csv`` and ``results.md``; return the markdown file.

        Parameters
        ----------
        finding
            What the run found, in a few sentences; a null result is stated as one.
        control
            What the controls gave beside it.
        published
            The published number(s) it compares with, cited.
        summary
            A small table printed in ``results.md`` (default: the results, if short).
        """
        from neuroprobe.output import write_csv

        write_csv(self.results, self.out / "results.csv")
        cond = self.conditions()
        quick = bool(getattr(self.args, "quick", False))
        lines = [f"# {self.name}", "", f"**Question.** {self.question}", "", f"**Finding.** {finding}", "",
                 f"**Control.** {control}", ""]
        if published:
            lines += [f"**Published.** {published}", ""]
        if quick:
            lines += ["*This was a `--quick` run (reduced sizes, for tests): its numbers are not the experiment's.*", ""]
        table = summary if summary is not None else (self.results if len(self.results) <= 40 else None)
        if table is not None and len(table):
            lines += [_markdown(table), ""]
        if self.figures:
            lines += ["Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in self.figures), ""]
        lines += ["Every number: [results.csv](results.csv)" + (
            ", " + ", ".join(f"[{p.name}]({p.name})" for p in self.tables) if self.tables else ""), ""]
        lines += [f"Run: {cond['date']}; {cond['machine']}; {cond['time']}.", "", f"    {cond['command']}", ""]
        from neuroprobe.output import write_text

        self._thumbnail()
        return write_text(self.out / "results.md", "\n".join(lines))

    def conclude(self, *, finding: str, control: str, published: str | None = None,
                 summary: pd.DataFrame | None = None) -> Path:
        """:meth:`write`, then print where ``results.md`` is, the finding and the control (a script's last step)."""
        path = self.write(finding=finding, control=control, published=published, summary=summary)
        print(self.out / "results.md")
        print(finding)
        print(control)
        return path


def _markdown(frame: pd.DataFrame) -> str:
    """A small DataFrame as a GitHub markdown table (no extra dependency)."""
    df = frame.reset_index(drop=True)
    df = df.loc[:, [c for c in df.columns if df[c].notna().any()]]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
