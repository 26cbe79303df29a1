"""Build the atlas: an index, a page per concept and a page per unit, as static files.

Memory stays bounded: unit pages are written site by site from blocks of units
(``n_stimuli x block`` responses at a time, sized by ``memory_mb``), and the index
carries only the cells table (as a script beside the page, so it opens from disk).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from neuroprobe.analysis.scan import battery_concepts, site_order
from neuroprobe.atlas import experiments as E
from neuroprobe.atlas import svg
from neuroprobe.atlas import tables as T
from neuroprobe.atlas.html import js_data, kv, num, page, pill, stim_card, table, token_html
from neuroprobe.atlas.stimuli import Thumbnails, find_battery, token_decoder
from neuroprobe.errors import NeuroprobeError
from neuroprobe.output import staged_folder, write_text
from neuroprobe.recording import schema
from neuroprobe.recording.reader import Recording, open_recording

#: criterion threshold drawn on Quiroga panels (baseline mean + K SD), as in ``neuroprobe cells`` by default.
K_SD = 5.0
#: what a unit without a page says (static atlas; ``--serve`` writes every unit's page on demand).
NO_PAGE = "no page in this atlas: rerun neuroprobe atlas with --units all, or browse it with --serve"


@dataclass
class AtlasSummary:
    """What :func:`build_atlas` wrote."""

    out: Path
    n_unit_pages: int
    n_concept_pages: int
    seconds: float
    bytes: int = 0
    files: int = 0
    index: Path = field(init=False)

    def __post_init__(self) -> None:
        self.index = self.out / "index.html"


def _clean(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if np.isinf(v):
            return "inf" if v > 0 else "-inf"  # JSON has no infinity; atlas.js reads these back
        return float(v) if np.isfinite(v) else None
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v if isinstance(v, (int, str)) else str(v)


class Atlas:
    """Everything the pages need, gathered once; writes pages on request (bulk or lazily for ``--serve``).

    Parameters
    ----------
    rec
        The recording.
    out
        The atlas folder.
    cells
        Cells table of the recording (``None``: units are ranked by d′ computed here).
    controls
        Name -> cells table of a control (``untrained``, ``rotated``), shown beside the subject.
    lesions
        Lesion summary (``forgetting.csv``).
    battery
        Battery name or folder for image thumbnails (default: the recording's, when found).
    top
        Units per concept that get a page besides the cells (the strongest anywhere).
    per_site
        And the strongest ``per_site`` units of every concept at every site.
    n_show
        Top- and bottom-driving stimuli per unit page.
    memory_mb
        Budget for one block of responses (and per-token traces) read at a time.
    experiments
        Experiments of ``analyses/`` whose results name a concept (:func:`neuroprobe.atlas.experiments.load_experiments`):
        the concept pages link them.
    """

    def __init__(self, rec: Recording, out: Path, *, cells: pd.DataFrame | None = None,
                 controls: dict[str, pd.DataFrame] | None = None, lesions: pd.DataFrame | None = None,
                 battery: str | Path | None = None, top: int = 3, per_site: int = 1, n_show: int = 8,
                 memory_mb: int = 128, quiet: bool = True, experiments: list[E.Experiment] | None = None) -> None:
        self.rec, self.out, self.quiet = rec, Path(out), quiet
        self.experiments = list(experiments or [])
        self.sites = site_order(rec)
        self.site_info = rec.sites.set_index("site")
        self.stim = rec.stimuli.reset_index(drop=True)
        self.stim_rows = self.stim.to_dict("records")
        self.concepts = battery_concepts(self.stim)
        self.cells = T.check_cells(cells, self.sites) if cells is not None else None
        self.controls = {k: T.check_cells(v, self.sites, k) for k, v in (controls or {}).items() if v is not None}
        self.lesions = T.check_lesions(lesions) if lesions is not None else None
        self.lesion_rows = T.lesion_index(self.lesions)
        self.battery = find_battery(rec.attrs, battery)
        self.thumbs = Thumbnails(self.battery, self.out / "stimuli")
        self.decoder = token_decoder(rec.attrs)
        self.top, self.per_site, self.n_show = top, per_site, n_show
        self.budget = max(1, memory_mb) * 2**20
        self.cell_rows: dict[tuple[str, int], dict] = {}
        self._pos: dict[tuple[str, int], int] = {}
        if self.cells is not None:
            self.cells = self.cells.reset_index(drop=True)
            self._pos = {(s, int(u)): i for i, (s, u) in enumerate(zip(self.cells["site"], self.cells["unit"]))}
            self.cells["verdict"] = T.verdict(self.cells)
            keep = self.cells[self.cells["is_cell"] | self.cells["is_candidate"]]
            self.cell_rows = {(r["site"], int(r["unit"])): r for r in keep.to_dict("records")}
        self.top_units = self._top_units()
        for r in self.top_units.to_dict("records"):
            key = (r["site"], int(r["unit"]))
            if key not in self.cell_rows and key in self._pos:
                self.cell_rows[key] = self.cells.iloc[self._pos[key]].to_dict()
        self._offsets: dict[str, np.ndarray] = {}
        self._token_ids: dict[str, np.ndarray] = {}
        #: units whose page this atlas wrote (links go only there; ``--serve`` writes the others on demand)
        self.pages: set[tuple[str, int]] = set()
        self._directions: dict[str, np.ndarray | None] = {}
        self.n_dictionary = 10  # top neurons of a feature / top features of a neuron shown

    # ------------------------------------------------------------ selection
    def _top_units(self) -> pd.DataFrame:
        """Top units per concept: from the cells table, or by d′ over all stimuli (one bounded pass)."""
        if self.cells is not None:
            return T.top_units_from_cells(self.cells, self.top, self.per_site)
        if self.top <= 0 and self.per_site <= 0:
            return pd.DataFrame(columns=["site", "unit", "concept", "d_prime"])
        conc = self.stim["concept"].astype(str).to_numpy()
        onehot = np.stack([conc == c for c in self.concepts], 1).astype(np.float64)
        best: list[pd.DataFrame] = []
        for site in self.sites:
            for sl, x in self.rec.iter_chunks(site, chunk_units=self._block(site)):
                ok = np.isfinite(x)
                x0 = np.where(ok, x, 0.0)
                n_in = onehot.T @ ok
                n_all = ok.sum(0)
                s_in = onehot.T @ x0
                q_in = onehot.T @ (x0 * x0)
                s_all, q_all = x0.sum(0), (x0 * x0).sum(0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    m_in, m_out = s_in / n_in, (s_all - s_in) / (n_all - n_in)
                    v_in = q_in / n_in - m_in**2
                    v_out = (q_all - q_in) / (n_all - n_in) - m_out**2
                    d = (m_in - m_out) / np.sqrt(np.maximum((v_in + v_out) / 2, 1e-12))
                d = np.where(np.isfinite(d), d, -np.inf)
                for ci, c in enumerate(self.concepts):
                    k = min(max(self.top, self.per_site), d.shape[1])
                    idx = np.argpartition(-d[ci], k - 1)[:k]
                    best.append(pd.DataFrame({"site": site, "unit": np.arange(sl.start, sl.stop)[idx], "concept": c,
                                              "d_prime": d[ci, idx]}))
        if not best:
            return pd.DataFrame(columns=["site", "unit", "concept", "d_prime"])
        allb = pd.concat(best, ignore_index=True)
        allb = allb[np.isfinite(allb["d_prime"])]
        keep = T.top_units(allb, "d_prime", self.top, self.per_site)
        return keep.merge(allb, on=["site", "unit", "concept"], how="left")

    def page_units(self, units: Literal["cells", "all"] = "cells") -> dict[str, np.ndarray]:
        """Site -> sorted units that get a page."""
        if units == "all":
            return {s: np.arange(int(self.site_info.loc[s, "n_units"])) for s in self.sites}
        keys = set(self.cell_rows) if self.cells is None else {k for k, r in self.cell_rows.items() if r.get("is_cell")}
        keys |= {(r.site, int(r.unit)) for r in self.top_units.itertuples()}
        out: dict[str, list[int]] = {}
        for s, u in keys:
            out.setdefault(s, []).append(u)
        return {s: np.array(sorted(out[s]), dtype=np.int64) for s in self.sites if s in out}

    def _block(self, site: str) -> int:
        n_rows = len(self.stim)
        if bool(self.site_info.loc[site, "tokens"]):
            n_rows += int(self.rec.tokens(site).shape[0])
        return int(max(1, min(int(self.site_info.loc[site, "n_units"]), self.budget // (8 * max(n_rows, 1)))))

    # ---------------------------------------------------------------- static
    def write_static(self) -> None:
        dst = self.out / "static"
        dst.mkdir(parents=True, exist_ok=True)
        pkg = resources.files("neuroprobe.atlas") / "static"
        for name in ("atlas.css", "atlas.js"):
            (dst / name).write_bytes((pkg / name).read_bytes())
        # from disk the atlas is static; `--serve` answers this file with ATLAS_LIVE = true (pages on demand)
        (self.out / T.LIVE_JS).parent.mkdir(parents=True, exist_ok=True)
        (self.out / T.LIVE_JS).write_text("window.ATLAS_LIVE = false;\n", encoding="utf-8")

    # ----------------------------------------------------------------- index
    def write_index(self, have_pages: dict[str, np.ndarray]) -> None:
        a = self.rec.attrs
        n_units = int(self.site_info["n_units"].sum())
        body = [f"<h1>{escape(str(a.get('subject')))} <span class='sub'>({escape(str(a.get('init')))})</span> × "
                f"{escape(str(a.get('battery')))}</h1>",
                f"<p class='sub'>{escape(self.rec.path.name)}: {len(self.sites)} sites, {n_units:,} units, "
                f"{len(self.stim):,} stimuli, {len(self.concepts)} concepts, pooling {escape(str(a.get('pooling')))}"
                f"{'' if self.rec.complete else ', INCOMPLETE'}.</p>"]
        # sites
        counts = {"subject": T.per_site_counts(self.cells, self.sites)}
        counts.update({name: T.per_site_counts(c, self.sites) for name, c in self.controls.items()})
        header = ["site", "kind", "stream", "units"]
        cols: list[np.ndarray] = []
        if self.cells is not None:
            header += ["dead", "candidates", "cells"]
            cols += [counts["subject"]["dead"], counts["subject"]["candidates"], counts["subject"]["cells"]]
            for name in self.controls:
                header += [f"cells ({name})"]
                cols.append(counts[name]["cells"])
        rows = []
        for i, s in enumerate(self.sites):
            info = self.site_info.loc[s]
            rows.append([escape(s), escape(str(info["kind"])), escape(str(info["stream"])), int(info["n_units"])]
                        + [int(c[i]) for c in cols])
        body.append("<h2>Sites</h2><div class='cols'><div>" + table(header, rows, left=3) + "</div>")
        if self.cells is not None:
            series = {"subject": counts["subject"]["cells"]}
            series.update({name: counts[name]["cells"] for name in self.controls})
            body.append("<div class='card'><h3>Concept cells per site"
                        + (" beside the controls" if self.controls else "") + "</h3>"
                        + svg.bars(self.sites, series, width=430, label_width=170) + "</div>")
        body.append("</div>")
        # concepts
        crow = []
        for c in self.concepts:
            n_stim = int((self.stim["concept"].astype(str) == c).sum())
            line = [f"<a href='{escape(T.concept_href(c))}'>{escape(c)}</a>", n_stim]
            if self.cells is not None:
                sub = self.cells[self.cells["concept"].astype(str) == c]
                line += [int(sub["is_candidate"].sum()), int(sub["is_cell"].sum()), int(sub["invariant"].sum()),
                         int(sub["multimodal"].sum())]
                line += [int((ctrl["concept"].astype(str) == c).mul(ctrl["is_cell"]).sum()) for ctrl in self.controls.values()]
            crow.append(line)
        ch = ["concept", "stimuli"] + (["candidates", "cells", "invariant", "multimodal"] + [f"cells ({n})" for n in self.controls]
                                       if self.cells is not None else [])
        body.append("<h2>Concepts</h2>" + table(ch, crow))
        # cells table (rendered by atlas.js from data/cells.js)
        spec = self._cell_table_spec(have_pages)
        title = "Cells" if self.cells is not None else "Top units per concept"
        note = ("candidates pass screening; cells are confirmed on the testing split. " if self.cells is not None else
                "no cells table given (--cells): the strongest units per concept by d\u2032 over all stimuli. ")
        body.append(
            f"<h2>{title}</h2><p class='note'>{note}Click a column to sort; type to filter. Unit pages exist for every cell, "
            f"the top {self.top} units of each concept and its best unit at each site ({sum(len(v) for v in have_pages.values()):,} pages); "
            "<code>--units all</code> or <code>--serve</code> gives every unit a page.</p>"
            "<div id='cells' class='tablebox'><div class='controls'><input type='search' placeholder='filter (any column)'>"
            + ("<select class='verdict'><option value=''>cells and candidates</option><option value='cell'>cells</option>"
               "<option value='candidate'>candidates only</option><option value='top unit'>top units</option></select>")
            + "<select class='concept'><option value=''>every concept</option></select>"
            "<select class='site'><option value=''>every site</option></select><span class='count'></span></div>"
            "<table class='data'><thead><tr></tr></thead><tbody></tbody></table><button class='more'>show more</button></div>")
        # unit lookup (atlas.js opens a unit's page, or says why there is none, from data/units.js)
        opts = "".join(f"<option value='{escape(T.slug(s))}'>{escape(s)} ({int(self.site_info.loc[s, 'n_units'])})</option>"
                       for s in self.sites)
        n_pages = sum(len(v) for v in have_pages.values())
        body.append("<h2>Any unit</h2><form class='controls unitbox' action='#'><select name='site'>" + opts + "</select>"
                    "<input name='unit' type='number' min='0' value='0' style='width:90px'><button>open</button>"
                    f"<span class='note unitmsg'>{n_pages:,} of {n_units:,} units have a page here (every unit with "
                    "<code>--units all</code>, or on demand with <code>--serve</code>).</span></form>")
        prov = [(k, escape(str(a.get(k)))) for k in ("checkpoint", "revision", "init", "dtype", "montage", "pooling", "tokens",
                                                       "seed", "created", "command") if a.get(k) not in (None, "")]
        body.append("<h2>Provenance</h2>" + kv(prov))
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "cells.js").write_text("window.ATLAS_TABLES = window.ATLAS_TABLES || {};\n"
                                       + js_data("ATLAS_TABLES.cells", spec), encoding="utf-8")
        (data / "units.js").write_text(js_data("ATLAS_UNITS", self._units_spec(have_pages)), encoding="utf-8")
        (self.out / "index.html").write_text(page(f"atlas: {a.get('subject')} × {a.get('battery')}", "".join(body), 0,
                                                  scripts=[T.LIVE_JS, "data/cells.js", "data/units.js"]),
                                             encoding="utf-8")

    def _units_spec(self, have_pages: dict[str, np.ndarray]) -> dict:
        """What the "any unit" box reads: per site slug, its name, unit count and the units with a page ("all" or a list)."""
        sites = {}
        for s in self.sites:
            n = int(self.site_info.loc[s, "n_units"])
            us = np.unique(np.asarray(have_pages.get(s, []), dtype=np.int64))
            sites[T.slug(s)] = dict(name=s, n_units=n, pages="all" if len(us) == n else [int(u) for u in us])
        return dict(sites=sites, noPage=NO_PAGE)

    def _cell_table_spec(self, have_pages: dict[str, np.ndarray]) -> dict:
        pages = {(s, int(u)) for s, us in have_pages.items() for u in us}
        cols = [dict(key="site", label="site", kind="str", link="href"), dict(key="unit", label="unit", kind="int", link="href"),
                dict(key="concept", label="concept", kind="str", link="chref"), dict(key="verdict", label="verdict", kind="str")]
        if self.cells is not None:
            rows_df = self.cells[self.cells["is_cell"] | self.cells["is_candidate"]].copy()
            extra = self.top_units.merge(rows_df[["site", "unit"]], how="left", indicator=True)
            extra = extra[extra["_merge"] == "left_only"].drop(columns="_merge")
            if len(extra):
                add = self.cells.merge(extra[["site", "unit"]], on=["site", "unit"])
                add["verdict"] = "top unit"
                rows_df = pd.concat([rows_df, add], ignore_index=True)
            cols += [dict(key=c, label=lab, kind=kind, title=tip) for c, lab, kind, tip in T.CELL_COLUMNS if c in rows_df]
        else:
            rows_df = self.top_units.assign(verdict="top unit")
            cols += [dict(key="d_prime", label="d\u2032", kind="num", title="d-prime over all stimuli")]
        cols += [dict(key="href", label="", kind="link"), dict(key="chref", label="", kind="link"),
                 dict(key="uhref", label="", kind="link")]
        cols[0]["live"] = cols[1]["live"] = "uhref"  # served (--serve): every unit's page exists on demand
        rows_df = rows_df.assign(
            href=[T.unit_href(s, u) if (s, int(u)) in pages else None for s, u in zip(rows_df["site"], rows_df["unit"])],
            uhref=[T.unit_href(s, u) for s, u in zip(rows_df["site"], rows_df["unit"])],
            chref=[T.concept_href(c) if isinstance(c, str) else None for c in rows_df["concept"]])
        rows = [[_clean(v) for v in r] for r in rows_df[[c["key"] for c in cols]].itertuples(index=False, name=None)]
        return dict(columns=cols, rows=rows, pageSize=200, noPage=NO_PAGE,
                    sort="z" if "z" in rows_df else cols[4]["key"] if len(cols) > 7 else None)

    # -------------------------------------------------------------- concepts
    def write_concepts(self) -> int:
        folder = self.out / "concepts"
        folder.mkdir(parents=True, exist_ok=True)
        for c in self.concepts:
            (self.out / T.concept_href(c)).write_text(self._concept_page(c), encoding="utf-8")
        return len(self.concepts)

    def _concept_page(self, c: str) -> str:
        body = [f"<h1>{escape(c)}</h1>"]
        mine = self.stim[self.stim["concept"].astype(str) == c]
        body.append(f"<p class='sub'>{len(mine)} stimuli in {mine['form'].nunique()} forms "
                    f"({', '.join(escape(str(f)) for f in dict.fromkeys(mine['form']))}).</p>")
        examples = []
        for f in dict.fromkeys(mine["form"]):
            i = int(mine.index[mine["form"] == f][0])
            examples.append(stim_card(self.stim_rows[i], float("nan"), thumb=self.thumbs(i, self.stim_rows[i]), text_html=None, depth=1)
                            .replace("<div class=\"resp\">response </div>", ""))
        body.append("<h2>Its forms</h2><div class='stims'>" + "".join(examples) + "</div>")
        if self.cells is not None:
            series = {"subject": self._concept_counts(self.cells, c)}
            series.update({n: self._concept_counts(ctrl, c) for n, ctrl in self.controls.items()})
            body.append("<h2>Cells across layers</h2><div class='card'>" + svg.bars(self.sites, series, width=560, label_width=200)
                        + "</div>")
            sub = self.cells[(self.cells["concept"].astype(str) == c) & (self.cells["is_cell"] | self.cells["is_candidate"])]
            col = T.score_column(self.cells)
            if col:
                sub = sub.sort_values(col, ascending=False)
            rows = [[self._unit_link(r["site"], int(r["unit"]), depth=1), pill(r["verdict"], "cell" if r["is_cell"] else "cand")]
                    + [r.get(k) for k, *_ in T.CELL_COLUMNS if k in sub] for r in sub.to_dict("records")]
            body.append(f"<h2>Its cells and candidates ({int(sub['is_cell'].sum())} cells)</h2>"
                        + (table(["unit", "verdict"] + [lab for k, lab, *_ in T.CELL_COLUMNS if k in sub], rows, left=2)
                           if rows else "<p class='note'>none</p>"))
        top = self.top_units[self.top_units["concept"].astype(str) == c]
        body.append(f"<h2>Its strongest units</h2><p class='note'>the {self.top} strongest anywhere and the best at each "
                    "site, strongest first.</p><p>" + " ".join(self._unit_link(r.site, int(r.unit), depth=1) for r in top.itertuples()) + "</p>")
        if any("class='nopage'" in part for part in body):
            body.append(f"<p class='note'>Units shown in grey have no page: {NO_PAGE}.</p>")
        if self.lesions is not None:
            les = self.lesions[self.lesions["concept"].astype(str) == c]
            body.append("<h2>Forgetting</h2>")
            if les.empty:
                body.append("<p class='note'>no lesion of this concept in the lesion table.</p>")
            else:
                curves = {}
                for mode, g in les.groupby(les["mode"] if "mode" in les else pd.Series("zero", index=les.index), sort=False):
                    g = g.sort_values("k")
                    curves[str(mode)] = {key: g[col].astype(float).tolist() if col in g else [np.nan] * len(g)
                                         for key, col in (("k", "k"), ("target", "target_change"), ("other", "other_change"),
                                                          ("random", "random_target_change"), ("random_sd", "random_target_sd"))}
                readout = ", ".join(map(str, dict.fromkeys(les["readout"].dropna()))) if "readout" in les else None
                body.append("<div class='card'>" + svg.forgetting_curve(curves, readout=readout or None) + "</div>")
                body.append(self._lesion_table(les, depth=1))
        body.append(E.section(self.experiments, c, self.out, depth=1))
        return page(f"concept {c}", "".join(body), 1, crumbs=[(f"concept {c}", T.concept_href(c))],
                    scripts=[T.LIVE_JS])

    def _concept_counts(self, cells: pd.DataFrame, c: str) -> np.ndarray:
        sub = cells[(cells["concept"].astype(str) == c) & cells["is_cell"]]
        return sub.groupby("site").size().reindex(self.sites).fillna(0).astype(int).to_numpy()

    def _unit_link(self, site: str, unit: int, depth: int) -> str:
        """A link to a unit's page when this atlas wrote it; else the unit in grey, saying why (atlas.js links it under --serve)."""
        href = escape(("../" * depth) + T.unit_href(site, unit))
        if (site, int(unit)) in self.pages:
            return f"<a href='{href}'>{escape(site)} #{unit}</a>"
        return f"<span class='nopage' data-href='{href}' title='{escape(NO_PAGE)}'>{escape(site)} #{unit}</span>"

    def _concept_link(self, concept: str, depth: int) -> str:
        """A link to a concept's page (every battery concept has one); a concept outside the battery is plain text."""
        if concept not in self.concepts:
            return escape(concept)
        return f"<a href='{'../' * depth}{escape(T.concept_href(concept))}'>{escape(concept)}</a>"

    def _lesion_table(self, les: pd.DataFrame, depth: int) -> str:
        cols = [c for c in ("concept", "mode", "k", "target_change", "other_change", "specificity", "random_target_change",
                            "p_random", "p_random_specific", "most_hit_other") if c in les]
        rows = []
        for r in les.to_dict("records"):
            line = []
            for c in cols:
                v = r[c]
                if c == "concept":
                    v = self._concept_link(str(v), depth)
                elif isinstance(v, str):
                    v = escape(v)
                line.append(v)
            rows.append(line)
        return table(cols, rows, left=2)

    # ----------------------------------------------------------------- units
    def _stream_tokens(self, stream: str) -> tuple[np.ndarray, np.ndarray]:
        if stream not in self._offsets:
            self._offsets[stream] = self.rec.token_offsets(stream)
            n = int(self._offsets[stream][-1])
            self._token_ids[stream] = self.rec._f[f"{schema.TOKENS}/{stream}/token_ids"][:n]
        return self._offsets[stream], self._token_ids[stream]

    def write_units(self, units: dict[str, np.ndarray]) -> int:
        """Write the pages of ``units`` (site -> unit indices), one bounded block of responses at a time."""
        total = sum(len(v) for v in units.values())
        bar = tqdm(total=total, desc="atlas unit pages", unit="page", disable=self.quiet, dynamic_ncols=True)
        n = 0
        try:
            for site, us in units.items():
                (self.out / "units" / T.slug(site)).mkdir(parents=True, exist_ok=True)
                block = self._block(site)
                ds = self.rec.responses(site)
                i = 0
                while i < len(us):
                    lo = int(us[i])
                    hi = min(lo + block, ds.shape[1])
                    j = int(np.searchsorted(us, hi))
                    x = np.asarray(ds[:, lo:hi], dtype=np.float64)
                    for u in us[i:j]:
                        self._write_unit(site, int(u), x[:, int(u) - lo])
                        n += 1
                        bar.update(1)
                    del x
                    i = j
        finally:
            bar.close()
        return n

    def write_unit(self, site: str, unit: int) -> Path:
        """Write one unit's page (used lazily by ``--serve``)."""
        if site not in self.site_info.index:
            raise NeuroprobeError(f"the recording has no site {site!r}.")
        n = int(self.site_info.loc[site, "n_units"])
        if not 0 <= unit < n:
            raise NeuroprobeError(f"site {site} has {n} units; unit {unit} does not exist.")
        (self.out / "units" / T.slug(site)).mkdir(parents=True, exist_ok=True)
        return self._write_unit(site, unit, np.asarray(self.rec.responses(site)[:, unit], dtype=np.float64), atomic=True)

    def _write_unit(self, site: str, unit: int, x: np.ndarray, atomic: bool = False) -> Path:
        path = self.out / T.unit_href(site, unit)
        if atomic:  # --serve writes pages into a finished atlas: never a half-written page
            write_text(path, self._unit_page(site, unit, x))
        else:  # a build writes into its staging folder, which is discarded whole on failure
            path.write_text(self._unit_page(site, unit, x), encoding="utf-8")
        self.pages.add((site, int(unit)))
        return path

    def _unit_page(self, site: str, unit: int, x: np.ndarray) -> str:
        info = self.site_info.loc[site]
        row = self.cell_rows.get((site, unit))
        if row is None and (site, unit) in self._pos:
            row = self.cells.iloc[self._pos[(site, unit)]].to_dict()
        concept = row.get("concept") if row is not None else None
        concept = concept if isinstance(concept, str) else None
        verdict = None
        if row is not None:
            verdict = "concept cell" if row.get("is_cell") else "candidate" if row.get("is_candidate") else "not a cell"
        head = [f"<h1>{escape(site)} · unit {unit}</h1><p class='sub'>{escape(str(info['kind']))} unit of stream "
                f"{escape(str(info['stream']))} ({int(info['n_units'])} units at this site)"]
        if concept:
            head.append(f" — {self._concept_link(concept, depth=2)} "
                        + pill(verdict or "", "cell" if verdict == "concept cell" else "cand" if verdict == "candidate" else ""))
        head.append("</p>")
        body = ["".join(head)]
        if row is not None:
            items = [(lab, row.get(k)) for k, lab, *_ in T.CELL_COLUMNS if k in row]
            items += [(k, row.get(k)) for k in ("auc", "lifetime_sparseness", "kurtosis", "n_forms", "n_modalities") if k in row]
            if isinstance(row.get("concepts"), str) and row.get("concepts"):
                items.append(("passes screening for", escape(row["concepts"].replace(";", ", "))))
            stats = "<div class='card'>" + kv([(k, v if isinstance(v, str) else num(v)) for k, v in items]) + "</div>"
        else:
            stats = "<div class='card note'>not in the cells table (no --cells, or a unit outside it)</div>"
        thr = None
        if row is not None and concept:
            bm, bs = row.get("baseline_mean"), row.get("baseline_sd")
            if bm is not None and bs is not None and np.isfinite(float(bm)) and np.isfinite(float(bs)):
                thr = float(bm) + K_SD * float(bs)
        body.append("<h2>Responses to every stimulus</h2><p class='note'>grouped by concept, coloured by form"
                    + (f"; dashed: screening baseline + {K_SD:g} SD" if thr is not None else "") + ".</p>"
                    + "<div class='card' style='overflow-x:auto'>"
                    + svg.quiroga_panel(x, self.stim["concept"].astype(str).to_numpy(), self.stim["form"].astype(str).to_numpy(),
                                        self.concepts, threshold=thr, highlight=concept) + "</div>")
        body.append(self._modality_panels(x, row, thr, concept))
        # per-form AUCs, beside the unit's indices
        auc = ""
        if row is not None:
            forms = [(k.split(":", 1)[1], row[k]) for k in row if k.startswith("auc_form:")]
            forms = [(f, float(v)) for f, v in forms if v is not None and np.isfinite(float(v))]
            if forms:
                auc = ("<div class='card'><h3>AUC per form</h3><p class='note'>the concept's stimuli of each form against "
                       "every other concept's (0.5 = chance: dashed).</p>"
                       + svg.bars([f for f, _ in forms], {"AUC": [v for _, v in forms]}, xmax=1.0, reference=0.5,
                                  fmt="{:.2f}", width=460, label_width=150) + "</div>")
        body.insert(1, "<div class='cols'>" + stats + auc + "</div>")
        # top and bottom stimuli
        ok = np.flatnonzero(np.isfinite(x))
        order = ok[np.argsort(-x[ok], kind="mergesort")]
        top, bottom = order[: self.n_show], order[::-1][: self.n_show]
        shown = np.unique(np.r_[top, bottom])
        texts = self._token_texts(site, unit, shown)
        scale = max([float(np.nanmax(np.abs(v))) for _, v in texts.values() if np.isfinite(v).any()] or [0.0])
        for title, idx in (("Top-driving stimuli", top), ("Bottom-driving stimuli", bottom)):
            cards = []
            for i in idx:
                i = int(i)
                th = self.thumbs(i, self.stim_rows[i]) if str(self.stim_rows[i].get("modality")) in ("image", "pair") else None
                t = texts.get(i)
                cards.append(stim_card(self.stim_rows[i], float(x[i]), thumb=th,
                                       text_html=token_html(t[0], t[1], scale) if t is not None else None, depth=2))
            body.append(f"<h2>{title}</h2>" + (f"<p class='note'>each token shaded by this unit's activation at it "
                                                  f"(orange +, blue \u2212; full colour = {scale:.3g}).</p>" if texts else "")
                        + f"<div class='stims {'top' if title.startswith('Top') else 'bottom'}'>" + "".join(cards) + "</div>")
        dictionary = self._dictionary_card(site, unit)
        if dictionary:
            body.append(dictionary)
        # lesions
        if self.lesions is not None:
            hits = self.lesion_rows.get((site, unit), [])
            body.append("<h2>Lesions that silenced this unit</h2>"
                        + (self._lesion_table(self.lesions.iloc[hits], depth=2) if hits else
                           "<p class='note'>no lesion in the lesion table included this unit.</p>"))
        crumbs = [(f"{site} #{unit}", T.unit_href(site, unit))]
        if concept in self.concepts:
            crumbs.insert(0, (f"concept {concept}", T.concept_href(concept)))
        return page(f"{site} unit {unit}", "".join(body), 2, crumbs=crumbs)

    # ------------------------------------------------------------ dictionaries
    def _decoder(self, feature_site: str) -> np.ndarray | None:
        """Decoder directions ``[d_sae, d_in]`` of a feature site's SAE (``None`` when its folder is gone or changed)."""
        if feature_site not in self._directions:
            from neuroprobe.sae.io import load_sae

            a = self.rec.site_attrs(feature_site)
            try:
                sae = load_sae(str(a.get("sae_path", "")))
                ok = sae.content_hash() == a.get("sae_hash")
            except NeuroprobeError:
                ok = False
            self._directions[feature_site] = sae.directions().double().numpy() if ok else None
        return self._directions[feature_site]

    def _dictionary_card(self, site: str, unit: int) -> str:
        """A feature's page: its decoder direction's top neurons; a neuron's page: the features that write to it most."""
        info = self.site_info
        rows: list[list[str]] = []
        if str(info.loc[site, "kind"]) == "sae":
            source = str(self.rec.site_attrs(site).get("source", ""))
            d = self._decoder(site)
            if d is None or source not in info.index:
                return ("<h2>Decoder direction</h2><p class='note'>the SAE this feature site was recorded with is not at its "
                        "recorded folder (or changed since); its decoder cannot be shown.</p>")
            w = d[unit]
            for u in np.argsort(-np.abs(w), kind="mergesort")[: self.n_dictionary]:
                rows.append([self._unit_link(source, int(u), 2), num(float(w[u]))])
            return ("<h2>Decoder direction: top neurons</h2><p class='note'>the source site's neurons this feature writes "
                    "to most (|decoder weight|; the feature's contribution to a neuron is activation × weight).</p>"
                    + table(["neuron", "decoder weight"], rows))
        readers = [f for f in self.sites if f in info.index and str(info.loc[f, "kind"]) == "sae"
                   and self.rec.site_attrs(f).get("source") == site]
        for f in readers:
            d = self._decoder(f)
            if d is None:
                continue
            col = d[:, unit]
            for i in np.argsort(-np.abs(col), kind="mergesort")[: self.n_dictionary]:
                rows.append([self._unit_link(f, int(i), 2), num(float(col[i]))])
        if not rows:
            return ""
        return ("<h2>Top features writing to this neuron</h2><p class='note'>features of the SAEs recorded at this site "
                "whose decoder direction has the largest |weight| on this neuron.</p>" + table(["feature", "decoder weight"], rows))

    def _modality_panels(self, x: np.ndarray, row: dict | None, thr: float | None, concept: str | None) -> str:
        """The unit's responses to each modality side by side (a unit that sees images, texts and pairs)."""
        modality = self.stim["modality"].astype(str).to_numpy() if "modality" in self.stim else None
        if modality is None:
            return ""
        seen = [m for m in dict.fromkeys(modality) if np.isfinite(x[modality == m]).any()]
        if len(seen) < 2:
            return ""
        cards = []
        width = max(300, 960 // len(seen))
        names = {"image": "image alone", "text": "text alone", "pair": "image and text together"}
        for m in seen:
            xm = np.where(modality == m, x, np.nan)
            z = (row or {}).get(f"z_modality:{m}")
            note = f"; the concept's testing effect {float(z):.1f} SD" if z is not None and np.isfinite(float(z)) else ""
            top = float(np.nanmax(xm))
            cards.append(f"<div class='card' style='overflow-x:auto'><h3>{escape(names.get(m, m))}</h3>"
                         f"<p class='note'>{int(np.isfinite(xm).sum())} stimuli, largest response {top:.3g}{escape(note)}</p>"
                         + svg.quiroga_panel(xm, self.stim["concept"].astype(str).to_numpy(),
                                             self.stim["form"].astype(str).to_numpy(), self.concepts, threshold=thr,
                                             highlight=concept, width=width, height=200) + "</div>")
        flag = " — a multimodal cell" if (row or {}).get("multimodal") is True or (row or {}).get("multimodal") == 1 else ""
        return (f"<h2>By modality{escape(flag)}</h2><p class='note'>the same responses, one panel per modality "
                "(each on its own value axis: a unit may answer to a text more weakly than to an image and still "
                "stand out among texts).</p><div class='cols'>" + "".join(cards) + "</div>")

    def _token_texts(self, site: str, unit: int, stimuli: Iterable[int]) -> dict[int, tuple[list, np.ndarray]]:
        """Stimulus -> (token segments, this unit's activation per token) for text stimuli with traces."""
        info = self.site_info.loc[site]
        if not bool(info["tokens"]):
            return {}
        stream = str(info["stream"])
        try:
            offsets, ids = self._stream_tokens(stream)
        except Exception:  # noqa: BLE001 - no traces for this stream
            return {}
        if int(np.diff(offsets).max(initial=0)) <= 1:  # a pooled stream: one row per stimulus, nothing to shade
            return {}
        ds = self.rec.tokens(site)
        out = {}
        for i in stimuli:
            if str(self.stim_rows[int(i)].get("modality")) not in ("text", "pair"):
                continue
            a, b = int(offsets[i]), int(offsets[i + 1])
            if b <= a:
                continue
            vals = np.asarray(ds[a:b, unit], dtype=np.float64)
            out[int(i)] = (self.decoder(ids[a:b]), vals)
        return out


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    n = b = 0
    for p in path.rglob("*"):
        if p.is_file():
            n += 1
            b += p.stat().st_size
    return b, n


def build_atlas(
    recording: Recording | str | Path,
    out: str | Path,
    *,
    cells: pd.DataFrame | str | Path | None = None,
    lesions: pd.DataFrame | str | Path | None = None,
    untrained: pd.DataFrame | str | Path | None = None,
    rotation: pd.DataFrame | str | Path | None = None,
    battery: str | Path | None = None,
    units: Literal["cells", "all"] = "cells",
    top: int = 3,
    per_site: int = 1,
    n_show: int = 8,
    memory_mb: int = 128,
    experiments: str | Path | bool | None = None,
    overwrite: bool = True,
    quiet: bool = True,
) -> AtlasSummary:
    """Write the atlas of a recording as static files that open from disk.

    Parameters
    ----------
    recording
        The recording (or its path).
    out
        Folder for the atlas (``index.html`` is its front page).
    cells
        Cells table (``neuroprobe cells --out``), a DataFrame or a path. When it is a path,
        the controls ``<cells>.untrained.<ext>`` / ``<cells>.rotation.<ext>`` beside it are used too.
    lesions
        Lesion summary (``forgetting.csv`` of ``neuroprobe lesion``).
    untrained, rotation
        Cells tables of the controls (override the siblings of ``cells``).
    battery
        Battery name or folder for the image thumbnails (default: the recording's, when found).
    units
        ``cells``: pages for every cell and the top units of every concept; ``all``: every unit.
    top
        Top units per concept that get a page.
    per_site
        And the best ``per_site`` units of every concept at every site.
    n_show
        Top- and bottom-driving stimuli per unit page.
    memory_mb
        Budget for one block of responses read at a time.
    experiments
        Where the ``analyses/`` scripts wrote their outputs (``DIR/<experiment>/results.csv`` ...): each concept
        page gets a section "Experiments" linking those whose results name the concept, for this subject
        (:mod:`neuroprobe.atlas.experiments`).  ``None`` (default): ``figures/analyses`` if it exists (under the
        working directory, else under the checkout); ``False``: none.

    Returns
    -------
    AtlasSummary
        Where it is, how many pages, how long it took, how big it is.
    """
    t0 = time.perf_counter()
    if units not in ("cells", "all"):
        raise NeuroprobeError(f"--units is 'cells' or 'all', not {units!r}.")
    out = Path(out)
    own = not isinstance(recording, Recording)
    rec = open_recording(recording) if own else recording  # a damaged recording is refused before anything is written
    try:
        ctrl_paths: dict[str, Any] = {"untrained": untrained, "rotated": rotation}
        if isinstance(cells, (str, Path)):
            ctrl_paths["untrained"] = untrained if untrained is not None else T.control_sibling(Path(cells), "untrained")
            ctrl_paths["rotated"] = rotation if rotation is not None else T.control_sibling(Path(cells), "rotation")
        if experiments is None:
            experiments = E.default_folder() or False
        found = E.load_experiments(experiments, str(rec.attrs.get("subject"))) if experiments is not False else []
        read = lambda v, what: v if isinstance(v, pd.DataFrame) or v is None else T.read_table(v, what)  # noqa: E731
        # written into a hidden staging folder inside ``out`` and moved into place when complete (index.html
        # last): a failure (a full disk) leaves the old atlas as it was and nothing half-written
        with staged_folder(out, replace=overwrite) as stage:
            atlas = Atlas(rec, stage, cells=read(cells, "cells"), lesions=read(lesions, "lesion"),
                          controls={k: read(v, f"{k} control cells") for k, v in ctrl_paths.items() if v is not None},
                          battery=battery, top=top, per_site=per_site, n_show=n_show, memory_mb=memory_mb,
                          quiet=quiet, experiments=found)
            atlas.write_static()
            chosen = atlas.page_units(units)
            n_units = atlas.write_units(chosen)
            n_concepts = atlas.write_concepts()
            atlas.write_index(chosen)
    finally:
        if own:
            rec.close()
    size, files = folder_size(out)
    return AtlasSummary(out=out, n_unit_pages=n_units, n_concept_pages=n_concepts, seconds=time.perf_counter() - t0,
                        bytes=size, files=files)
