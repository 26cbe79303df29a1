"""What the figures, the atlas and the README promise, checked on what is drawn, written and printed (issue 24).

* lesion figures: every legend entry is drawn (also for a single lesion size ``k``), the y label names the
  readout; cell-count ticks are whole numbers; legends sit beside the data, not on it;
* the atlas: every link of every written page resolves to a written file, units without a page say why,
  the "any unit" box opens a page only when it exists (and under ``--serve`` for any unit);
* the README's paper snippet runs and writes under ``recordings/``; API errors name API arguments,
  CLI errors name flags; NWB export options; ``steer`` prints small masses legibly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.markers import MarkerStyle  # noqa: E402

from neuroprobe import record  # noqa: E402
from neuroprobe.analysis import concept_cells  # noqa: E402
from neuroprobe.analysis import figures as cell_figures  # noqa: E402
from neuroprobe.atlas.browser import dump_dom, find_chromium  # noqa: E402
from neuroprobe.errors import NeuroprobeError, RecordingError  # noqa: E402
from neuroprobe.lesions.figures import plot_dose_response  # noqa: E402
from neuroprobe.lesions.forgetting import LesionStudy, summarize  # noqa: E402
from neuroprobe.planted import make_planted  # noqa: E402

CLI = [sys.executable, "-m", "neuroprobe.cli"]
ROOT = Path(__file__).resolve().parents[1]
needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="headless Chromium is not installed (Debian: apt-get install chromium)")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted recording, its cells, one-k and two-k dose-response tables, and a static atlas.

    In the atlas's cells table concept0's three cells are demoted to candidates (as when confirmation
    fails) and only the top unit of each concept gets a page (``--top 1 --per-site 0``), so its concept
    page lists candidates without a page; the lesion table has a single ``k``.
    """
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("issue24")
    p = make_planted(root / "battery", seed=0)
    rec = record(p.subject, p.battery, root / "planted.h5", montage="mlp", quiet=True)
    cells = concept_cells(rec, n_perm=200)
    rec.close()
    study = LesionStudy(p.subject, p.battery, cells, quiet=True)
    one_k = study.dose_response("concept0", [2], ("zero",), random_draws=8, orders=("top", "bottom", "random"))
    two_k = study.dose_response("concept0", [1, 2], ("zero",), random_draws=8, orders=("top", "bottom", "random"))
    summarize(one_k).to_csv(root / "forgetting.csv", index=False)
    demoted = cells.copy()
    demoted.loc[(demoted["concept"] == "concept0") & demoted["is_cell"], "is_cell"] = False
    demoted.to_csv(root / "cells.csv", index=False)
    out = root / "site"
    res = subprocess.run(CLI + ["atlas", str(root / "planted.h5"), "--cells", str(root / "cells.csv"), "--lesions",
                                str(root / "forgetting.csv"), "--battery", str(root / "battery"), "--out", str(out),
                                "--top", "1", "--per-site", "0", "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return dict(root=root, planted=p, cells=cells, demoted=demoted, study=study, one_k=one_k, two_k=two_k, out=out)


# ------------------------------------------------------ matplotlib: what is drawn
def _invisible(colour, background) -> bool:
    rgba = to_rgba(colour)
    return rgba[3] == 0 or np.allclose(rgba[:3], to_rgba(background)[:3])


def _drawn(artist, background) -> bool:
    """Whether ``artist`` puts data on the canvas: a line through 2+ points, a visible marker, an area, a segment."""
    if not artist.get_visible() or artist.get_alpha() == 0:
        return False
    if isinstance(artist, Line2D):
        xy = np.asarray(artist.get_xydata(), dtype=float)
        xy = xy[np.isfinite(xy).all(1)]
        if not len(xy):
            return False
        line = (artist.get_linestyle() not in ("None", "", " ", "none") and artist.get_linewidth() > 0
                and len(np.unique(xy, axis=0)) >= 2 and not _invisible(artist.get_color(), background))
        marker = artist.get_marker()
        if line or marker in (None, "None", "", " ", "none") or artist.get_markersize() <= 0:
            return line
        if MarkerStyle(marker).is_filled() and not _invisible(artist.get_markerfacecolor(), background):
            return True
        return artist.get_markeredgewidth() > 0 and not _invisible(artist.get_markeredgecolor(), background)
    if isinstance(artist, LineCollection):
        colours = artist.get_colors()
        return any(len(seg) >= 2 and np.ptp(np.asarray(seg), axis=0).max() > 0 for seg in artist.get_segments()) \
            and max(artist.get_linewidths()) > 0 and not all(_invisible(c, background) for c in colours)
    if isinstance(artist, PolyCollection):
        def area(v):
            x, y = v[:, 0], v[:, 1]
            return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))

        return any(len(p.vertices) >= 3 and area(np.asarray(p.vertices)) > 0 for p in artist.get_paths()) \
            and not all(_invisible(c, background) for c in artist.get_facecolors())
    return False


def _legend_entries_drawn(fig) -> dict[str, bool]:
    """Each text of the figure's legend -> whether an artist of that label draws data in the first axes."""
    ax = fig.axes[0]
    bg = ax.get_facecolor()
    legend = fig.legends[0] if fig.legends else ax.get_legend()
    out = {}
    for text in legend.get_texts():
        label = text.get_text()
        artists = [a for a in ax.get_children() if getattr(a, "get_label", lambda: None)() == label]
        out[label] = any(_drawn(a, bg) for a in artists)
    return out


def test_dose_response_draws_every_legend_entry(planted):
    """With one k the random band and the other concepts were in the legend but drew nothing (zero-width band,
    a one-point median line without markers, white-edged x markers); with two k they are drawn as lines."""
    for which in ("one_k", "two_k"):
        fig = plot_dose_response(planted[which])
        drawn = _legend_entries_drawn(fig)
        assert any(label.startswith("random-k") and "%" in label for label in drawn)  # the band is in the legend
        assert any("other concepts" in label for label in drawn)
        assert all(drawn.values()), (which, drawn)


def test_dose_response_y_label_names_the_readout(planted):
    fig = plot_dose_response(planted["one_k"])
    readout = planted["study"].readout
    assert readout == "classify"
    assert all(readout in ax.get_ylabel() for ax in fig.axes), [ax.get_ylabel() for ax in fig.axes]


def test_cell_counts_have_whole_number_ticks(planted):
    cells = planted["cells"]
    fig = cell_figures.plot_cells_per_layer(cells, cells.assign(is_cell=False))
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def _data_points(ax) -> np.ndarray:
    """Display coordinates of every point and vertex the axes' collections, patches and lines draw."""
    pts = []
    for c in ax.collections:
        if len(c.get_offsets()):
            pts.append(c.get_offset_transform().transform(c.get_offsets()))
        for path in c.get_paths():
            if len(path.vertices):
                pts.append(c.get_transform().transform(path.vertices))
    for patch in ax.patches:
        pts.append(patch.get_transform().transform(patch.get_path().vertices))
    for line in ax.lines:
        xy = np.asarray(line.get_xydata(), dtype=float)
        if len(xy) and line.get_transform() is ax.transData:
            pts.append(ax.transData.transform(xy[np.isfinite(xy).all(1)]))
    return np.concatenate(pts) if pts else np.zeros((0, 2))


@pytest.mark.parametrize("plot", ["selectivity", "invariance"])
def test_legends_do_not_cover_the_data(plot):
    """Data that fills the axes (as MiniLM's and the organism's did): the legend sits beside it, inside the figure."""
    rng = np.random.default_rng(0)
    n = 400
    cells = pd.DataFrame({"site": rng.choice(["encoder.layer.0.mlp", "encoder.layer.1.mlp"], n), "unit": np.arange(n),
                          "dead": False, "is_cell": np.arange(n) % 2 == 0, "si": rng.uniform(-1, 1, n), "concept": "x",
                          "invariant": rng.random(n) < 0.5, "auc_form:name": rng.uniform(0, 1, n),
                          "auc_form:photo": rng.uniform(0, 1, n)})
    fig = cell_figures.plot_selectivity(cells, "si") if plot == "selectivity" else cell_figures.plot_invariance(cells)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    box = legend.get_window_extent()
    pts = _data_points(ax)
    inside = (pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)
    assert not inside.any(), f"{int(inside.sum())} data points under the legend"
    assert not box.overlaps(ax.get_window_extent())
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off in the PNG


# ----------------------------------------------------------------- the atlas
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.nopage: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key):
                self.refs.append((tag, a[key]))
        if "nopage" in (a.get("class") or "").split():
            self.nopage.append(a)


def _refs(html: str) -> _Refs:
    p = _Refs()
    p.feed(html)
    return p


def _broken_links(out: Path) -> list[str]:
    bad = []
    for page in sorted(out.rglob("*.html")):
        for tag, ref in _refs(page.read_text(encoding="utf-8")).refs:
            url = urlparse(ref)
            if url.scheme or ref.startswith("#"):
                continue
            target = (page.parent / unquote(url.path)).resolve()
            if not target.is_file():
                bad.append(f"{page.relative_to(out)}: <{tag}> {ref}")
    return bad


def test_atlas_every_link_resolves_and_units_without_a_page_say_why(planted):
    out = planted["out"]
    assert len(list(out.rglob("*.html"))) > 5
    assert _broken_links(out) == []
    # concept0's candidates (demoted cells) are listed; those without a page are plain text that says why
    page = (out / "concepts" / "concept0.html").read_text(encoding="utf-8")
    refs = _refs(page)
    demoted = planted["demoted"]
    listed = demoted[(demoted["concept"] == "concept0") & demoted["is_candidate"]]
    unlinked = [a for a in refs.nopage if a.get("data-href")]
    assert len(unlinked) >= 1 and len(unlinked) + sum("units/" in r for _, r in refs.refs) >= len(listed)
    assert all("--units all" in a["title"] and "--serve" in a["title"] for a in unlinked)
    assert "--units all" in page.split("<h2>Forgetting</h2>")[0].split("Its strongest units")[1]


def test_atlas_unit_box_data_lists_exactly_the_written_pages(planted):
    out = planted["out"]
    text = (out / "data" / "units.js").read_text(encoding="utf-8")
    spec = json.loads(re.match(r"window\.ATLAS_UNITS = (.*);\s*$", text, re.S).group(1))
    written = {(d.name, int(f.stem)) for d in (out / "units").iterdir() for f in d.glob("*.html")}
    listed = {(slug, int(u)) for slug, s in spec["sites"].items() for u in s["pages"]}
    assert listed == written and spec["sites"]["hidden"]["n_units"] == 64
    assert (out / "data" / "live.js").read_text().strip() == "window.ATLAS_LIVE = false;"


def _submit_unit_box(out: Path, name: str, site: str, unit: str) -> str:
    """The DOM shown after typing ``site``/``unit`` into the index's "any unit" box and pressing open."""
    html = (out / "index.html").read_text(encoding="utf-8")
    probe = ("<script>document.addEventListener('DOMContentLoaded', function () { setTimeout(function () {"
             "var f = document.querySelector('form.unitbox') || document.forms[0];"
             f"f.elements.site.value = {json.dumps(site)}; f.elements.unit.value = {json.dumps(unit)};"
             "f.requestSubmit(); }, 50); });</script>")
    (out / name).write_text(html.replace("</body>", probe + "</body>"), encoding="utf-8")
    try:
        return dump_dom(out / name, budget_ms=3000)
    finally:
        (out / name).unlink()


@needs_chromium
def test_atlas_unit_box_opens_written_pages_and_says_when_there_is_none(planted):
    out = planted["out"]
    have = sorted(int(f.stem) for f in (out / "units" / "hidden").glob("*.html"))
    missing = next(u for u in range(64) if u not in have)
    dom = _submit_unit_box(out, "probe-have.html", "hidden", str(have[0]))
    assert f"hidden · unit {have[0]}" in dom  # navigated to the page
    dom = _submit_unit_box(out, "probe-missing.html", "hidden", str(missing))
    msg = re.search(r"class=\"note unitmsg[^\"]*\">([^<]*)<", dom)
    assert msg and f"hidden #{missing} has no page" in msg.group(1) and "--units all" in msg.group(1), dom[-1500:]
    dom = _submit_unit_box(out, "probe-range.html", "hidden", "64")
    assert re.search(r"hidden has 64 units \(0 to 63\)", dom)


@needs_chromium
def test_served_atlas_links_every_unit(planted, tmp_path):
    """Under --serve the pages learn it (data/live.js) and link units without a static page; those pages are written."""
    from neuroprobe.atlas import Atlas
    from neuroprobe.atlas.serve import make_server
    from neuroprobe.recording.reader import open_recording

    root = planted["root"]
    out = tmp_path / "site"
    shutil.copytree(planted["out"], out)  # the static site as built; the server writes more pages into it
    static = [a["data-href"] for a in _refs((out / "concepts" / "concept0.html").read_text()).nopage]
    assert static and not any((out / "concepts" / h).resolve().exists() for h in static)
    with open_recording(root / "planted.h5") as rec:
        live = Atlas(rec, out, cells=planted["demoted"], lesions=pd.read_csv(root / "forgetting.csv"),
                     battery=str(root / "battery"), top=1, per_site=0, quiet=True)
        server = make_server(live, 0, quiet=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            assert "ATLAS_LIVE = true" in urllib.request.urlopen(f"{url}/data/live.js", timeout=30).read().decode()
            dom = dump_dom(f"{url}/concepts/concept0.html")
            for href in static:  # every unit without a static page is now a link, and the link answers
                assert f'href="{href}"' in dom
                page = urllib.request.urlopen(urljoin(f"{url}/concepts/concept0.html", href), timeout=30).read().decode()
                assert "hidden · unit" in page
                assert (out / "concepts" / href).resolve().is_file()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=30)


def test_atlas_forgetting_chart_draws_every_legend_entry_for_one_k(planted):
    page = (planted["out"] / "concepts" / "concept0.html").read_text(encoding="utf-8")
    svg = re.search(r"<svg class=\"forgetting\".*?</svg>", page, re.S).group(0)
    assert "classify" in re.search(r"class=\"ylabel\"[^>]*>([^<]*)<", svg).group(1)  # the y label names the readout

    class Marks(HTMLParser):
        def __init__(self):
            super().__init__()
            self.legend, self.marks = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "data-legend" in a:
                self.legend.append(a["data-legend"])
            if "data-series" in a:
                self.marks.append((tag, a))

    m = Marks()
    m.feed(svg)

    def extent(tag, a) -> bool:
        f = lambda k: float(a.get(k, 0))  # noqa: E731
        if tag == "circle":
            return f("r") > 0
        if tag == "rect":
            return f("width") > 0 and f("height") > 0
        if tag == "line":
            return (f("x1"), f("y1")) != (f("x2"), f("y2"))
        pts = {tuple(p.split(",")) for p in a.get("points", "").split()}
        return len(pts) >= 2 and len({x for x, _ in pts}) >= (2 if tag == "polygon" else 1)

    assert set(m.legend) == {"target", "other", "random"}
    for key in m.legend:
        assert any(extent(tag, a) for tag, a in m.marks if a["data-series"] == key), key


# ----------------------------------------------------- README, API errors, NWB, steer
def _readme_python_block(start: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if b.startswith(start))


def test_record_api_error_names_arguments_and_cli_error_names_flags(planted, tmp_path):
    p = planted["planted"]
    out = tmp_path / "rec.h5"
    record(p.subject, p.battery, out, montage="mlp", quiet=True).close()
    with pytest.raises(RecordingError) as err:
        record(p.subject, p.battery, out, montage="mlp", quiet=True)
    assert "resume=True" in str(err.value) and "overwrite=True" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(NeuroprobeError) as err:
        record(p.subject, p.battery, out, montage="mlp", quiet=True, resume=True, overwrite=True)
    assert "resume=True" in str(err.value) and "--resume" not in str(err.value)
    res = subprocess.run(CLI + ["record", "--model", "organism", "--out", str(out), "-q"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "--resume" in res.stderr and "--overwrite" in res.stderr and "=True" not in res.stderr


@pytest.mark.slow
def test_readme_paper_snippet_runs_prints_and_writes_under_recordings(tmp_path):
    """The README's snippet, verbatim, in an empty folder: it prints the cells and the forgetting table."""
    code = _readme_python_block("import neuroprobe as npb")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recordings"]
    assert (tmp_path / "recordings" / "organism_digits_all.h5").is_file()
    assert "image.fc" in res.stdout and "target_change" in res.stdout and "seven" in res.stdout


def test_export_nwb_options_reach_the_file_and_the_inspector_accepts_them(planted, tmp_path):
    pynwb = pytest.importorskip("pynwb")
    pytest.importorskip("nwbinspector")
    from neuroprobe.export import inspect_nwb

    root = planted["root"]
    out = tmp_path / "planted.nwb"
    res = subprocess.run(CLI + ["export", str(root / "planted.h5"), "--to", "nwb", "--out", str(out),
                                "--experimenter", "Quiroga, Rodrigo", "--experimenter", "Berry, Halle",
                                "--institution", "University of Leicester"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        assert list(nwb.experimenter) == ["Quiroga, Rodrigo", "Berry, Halle"]
        assert nwb.institution == "University of Leicester"
        assert nwb.subject.species == "http://purl.obolibrary.org/obo/NCBITaxon_32630"  # "synthetic construct"
    flagged = [m.check_function_name for m in inspect_nwb(out)]
    assert not [c for c in flagged if "species" in c or "experimenter" in c or "institution" in c], flagged
    res = subprocess.run(CLI + ["export", str(root / "planted.h5"), "--to", "nwb", "--out", str(out), "--no-inspect",
                                "--overwrite", "--species", "Mus musculus"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        assert io.read().subject.species == "Mus musculus"


def test_steer_prints_small_bag_masses_legibly(tmp_path):
    """A Korean bag on a tiny byte-level model has a whole-word mass near 1e-5: it was printed as 0.0000."""
    typer = pytest.importorskip("typer")
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from neuroprobe.steering.commands import register

    corpus = ["우주 에는 행성 과 은하 가 있다", "밤 하늘 에 달 과 별 이 빛난다", "어머니 와 아버지 는 시장 에 갔다",
              "the planet and the moon"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.save_pretrained(tmp_path / "ko")
    tok.save_pretrained(tmp_path / "ko")
    (tmp_path / "family.txt").write_text("할머니\n할아버지\n", encoding="utf-8")  # rare words: many pieces each
    (tmp_path / "space.txt").write_text("우주\n행성\n", encoding="utf-8")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["steer", "--model", "pplm", "--weights", str(tmp_path / "ko"), "--bag",
                                   str(tmp_path / "family.txt"), "--bag", str(tmp_path / "space.txt"), "--prompt", "밤 하늘 에",
                                   "--length", "3", "--device", "cpu", "--quiet", "--out", str(tmp_path / "mass.csv")])
    assert res.exit_code == 0, res.output
    mass = pd.read_csv(tmp_path / "mass.csv")
    lines = [ln for ln in res.output.splitlines() if re.search(r"unsteered \S+, steered \S+$", ln)]
    assert len(lines) == 3  # the total and one line per bag
    for line in lines:
        printed = re.search(r"unsteered (\S+), steered (\S+)$", line)
        label = line.split(":")[0].strip()
        column = "bag_mass" if label.startswith("mean bag") else f"bag_mass[{label}]"
        truth = mass.groupby("run")[column].mean()
        for run, text in zip(("unsteered", "steered"), printed.groups()):
            assert 0 < truth[run] < 1e-3  # the regime in which four decimals print 0.0000 or one digit
            assert float(text) == pytest.approx(truth[run], rel=5e-3), (line, truth[run])
