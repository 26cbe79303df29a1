"""The atlas, looked at in a real browser (headless Chromium): planted cells listed, top stimuli shown, tokens shaded."""
from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from neuroprobe import record
from neuroprobe.analysis import concept_cells
from neuroprobe.atlas import build_atlas
from neuroprobe.atlas import tables as T
from neuroprobe.atlas.browser import dump_dom, find_chromium
from neuroprobe.errors import NeuroprobeError
from neuroprobe.lesions.forgetting import LesionStudy, summarize
from neuroprobe.planted import make_planted
from neuroprobe.recording.reader import open_recording

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="headless Chromium is not installed (Debian: apt-get install chromium)")
CLI = [sys.executable, "-m", "neuroprobe.cli"]


class Rows(HTMLParser):
    """Rows of the rendered cell table (``#cells tbody``) and every element's attributes, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: list[list[str]] = []
        self.depth_cells = 0
        self.in_body = False
        self.cell: list[str] | None = None
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "div" and a.get("id") == "cells":
            self.depth_cells = 1
        if self.depth_cells and tag == "tbody":
            self.in_body = True
        if self.in_body and tag == "tr":
            self.rows.append([])
            self.links.append([])
        if self.in_body and tag == "td":
            self.cell = []
        if self.in_body and tag == "a" and self.links:
            self.links[-1].append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        if self.in_body and tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse(html: str) -> Rows:
    p = Rows()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted recording, its cells table (with its untrained control) and a real lesion table."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("atlas")
    p = make_planted(root / "battery", seed=0)
    rec = record(p.subject, p.battery, root / "planted.h5", montage="mlp", quiet=True)
    cells = concept_cells(rec, n_perm=200)
    cells.to_csv(root / "cells.csv", index=False)
    q = make_planted(root / "battery-random", seed=0, init="random")
    rrec = record(q.subject, q.battery, root / "planted-random.h5", montage="mlp", quiet=True)
    concept_cells(rrec, n_perm=0).to_csv(root / "cells.untrained.csv", index=False)
    rrec.close()
    study = LesionStudy(p.subject, p.battery, cells, quiet=True)
    dose = study.dose_response("concept0", [1, 2], ("zero",), random_draws=5, orders=("top", "random"))
    summarize(dose).to_csv(root / "forgetting.csv", index=False)
    rec.close()
    out = root / "site"
    res = subprocess.run(CLI + ["atlas", str(root / "planted.h5"), "--cells", str(root / "cells.csv"), "--lesions",
                                str(root / "forgetting.csv"), "--battery", str(root / "battery"), "--out", str(out), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return dict(root=root, out=out, truth=p.truth, cells=cells, stdout=res.stdout)


def test_atlas_files_and_summary(planted):
    out = planted["out"]
    assert "wrote" in planted["stdout"] and "open file://" in planted["stdout"]
    assert (out / "index.html").exists() and (out / "static" / "atlas.js").exists() and (out / "data" / "cells.js").exists()
    # nothing leaves the disk: no http(s) URL is loaded by any page
    for page in [out / "index.html", *out.glob("concepts/*.html"), *out.glob("units/*/*.html")]:
        text = page.read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), page
    cells = planted["cells"]
    for r in cells[cells["is_cell"]].itertuples():
        assert (out / T.unit_href(r.site, int(r.unit))).exists()
    assert len(list((out / "concepts").glob("*.html"))) == planted["truth"]["concept"].nunique()


@needs_chromium
def test_index_lists_planted_cells_when_rendered(planted):
    """The cell table is built by the page's script: the source lacks the rows, the rendered DOM has them."""
    out, truth, cells = planted["out"], planted["truth"], planted["cells"]
    source = parse((out / "index.html").read_text())
    assert source.rows == []
    dom = parse(dump_dom(out / "index.html"))
    listed = {(r[0], int(r[1])): (r[2], r[3]) for r in dom.rows}
    invariant = truth[truth["kind"] == "invariant"]
    assert len(invariant) >= 4
    for r in invariant.itertuples():  # every planted invariant cell, with its concept, as a cell
        assert listed.get((r.site, int(r.unit))) == (r.concept, "cell"), (r.site, r.unit)
    assert sum(v[1] == "cell" for v in listed.values()) == int(cells["is_cell"].sum())
    # each row links to its unit page and its concept page
    for links in dom.links:
        assert any(h.startswith("units/") for h in links) and any(h.startswith("concepts/") for h in links)
    ready = [a for tag, a in dom.elements if tag == "body"][0].get("data-ready-ms")
    assert ready is not None and float(ready) >= 0


@needs_chromium
def test_unit_page_shows_top_stimulus_and_lesions(planted):
    out, truth = planted["out"], planted["truth"]
    r = truth[truth["kind"] == "invariant"].iloc[0]
    site, unit = str(r["site"]), int(r["unit"])
    with open_recording(planted["root"] / "planted.h5") as rec:
        x = rec.responses(site)[:, unit]
        stim = rec.stimuli.reset_index(drop=True)
    best = stim.loc[int(np.nanargmax(x))]
    dom = parse(dump_dom(out / T.unit_href(site, unit)))
    cards = [a for tag, a in dom.elements if tag == "div" and "data-stimulus" in a]
    assert cards[0]["data-stimulus"] == best["id"]  # the first top-driving stimulus is the unit's strongest
    assert best["concept"] == r["concept"]
    imgs = [a["src"] for tag, a in dom.elements if tag == "img"]
    page = out / T.unit_href(site, unit)
    assert imgs and all((page.parent / s).resolve().exists() for s in imgs)  # thumbnails on disk
    # the Quiroga panel has one bar per stimulus the site saw
    html = (out / T.unit_href(site, unit)).read_text()
    assert html.count("<rect") >= int(np.isfinite(x).sum())
    # concept0's top-k lesions silenced its best units: the unit page says so
    if r["concept"] == "concept0":
        les = pd.read_csv(planted["root"] / "forgetting.csv")
        if any((site, unit) in T.parse_units(u) for u in les["units"]):
            assert "Lesions that silenced this unit" in html and "no lesion in the lesion table" not in html


@pytest.fixture(scope="module")
def organism_text(tmp_path_factory):
    """The organism shown ASCII text stimuli with per-token traces (one UTF-8 byte per token)."""
    import neuroprobe as npb
    from neuroprobe.stimuli.battery import Battery

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("atlas_text")
    full = npb.load_battery("digits")
    t = full.table
    sub = t[t["form"].isin(["text-name", "text-roman", "text-numeral"])].groupby(["concept", "form", "split"]).head(1)
    battery = Battery.from_table(sub, full.concepts, name="digits-ascii", root=full.root)
    subject = npb.load_subject("organism", device="cpu", quiet=True)
    site = "text.layers.1.mlp.act"
    rec = npb.record(subject, battery, root / "org.h5", montage=site, tokens=True, quiet=True)
    rec.close()
    out = root / "site"
    summary = build_atlas(root / "org.h5", out, units="all", battery=full.root, quiet=True)
    return dict(root=root, out=out, site=site, summary=summary)


@needs_chromium
def test_text_stimulus_tokens_are_shaded_by_the_units_trace(organism_text):
    out, site = organism_text["out"], organism_text["site"]
    with open_recording(organism_text["root"] / "org.h5") as rec:
        x = rec.responses(site)[()]
        unit = int(np.nanargmax(np.nanmax(x, 0) - np.nanmin(x, 0)))
        stim = rec.stimuli.reset_index(drop=True)
        i = int(np.nanargmax(x[:, unit]))
        off = rec.token_offsets("text")
        trace = rec.tokens(site)[off[i]:off[i + 1], unit]
    text = stim.loc[i, "text"]
    dom = parse(dump_dom(out / T.unit_href(site, unit)))
    first = [j for j, (tag, a) in enumerate(dom.elements) if tag == "div" and a.get("data-stimulus") == stim.loc[i, "id"]][0]
    toks = []
    for tag, a in dom.elements[first + 1:]:
        if tag == "div" and "data-stimulus" in a:
            break
        if tag == "span" and a.get("class") == "tok":
            toks.append(a)
    assert len(toks) == len(text.encode()) == len(trace)  # one shaded span per token (byte) of the text
    acts = np.array([float(a["data-act"]) for a in toks])
    np.testing.assert_allclose(acts, trace, rtol=1e-3, atol=1e-3 * float(np.abs(trace).max()))
    alphas = np.array([float(re.search(r"rgba\([^)]*,([0-9.]+)\)", a["style"]).group(1)) for a in toks])
    assert alphas.max() > alphas.min()  # the shading follows the activation, not one colour
    assert int(np.argmax(alphas * np.sign(acts))) == int(np.argmax(trace))
    assert organism_text["summary"].n_unit_pages == x.shape[1]  # --units all: every unit has a page


def test_serve_writes_unit_pages_on_demand(planted):
    out = planted["root"] / "served"
    proc = subprocess.Popen(CLI + ["atlas", str(planted["root"] / "planted.h5"), "--out", str(out), "--serve", "--port", "0",
                                   "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        t0 = time.time()
        while url is None and time.time() - t0 < 120:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"serving (http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url, proc.stderr.read() if proc.poll() is not None else "no serving line"
        page = out / "units" / "hidden" / "63.html"
        assert not page.exists()  # a dead unit: no page until asked for
        body = urllib.request.urlopen(f"{url}/units/hidden/63.html", timeout=30).read().decode()
        assert "hidden · unit 63" in body and page.exists()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/units/hidden/9999.html", timeout=30)
        assert "<h1>" in urllib.request.urlopen(f"{url}/index.html", timeout=30).read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_user_errors(planted, tmp_path, monkeypatch, capsys):
    from neuroprobe.cli import main

    bad = planted["cells"].assign(site="nowhere")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    monkeypatch.setattr(sys, "argv", ["neuroprobe", "atlas", str(planted["root"] / "planted.h5"), "--cells",
                                      str(tmp_path / "bad.csv"), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("neuroprobe: error:") and "nowhere" in err and len(err.splitlines()) == 1
    with pytest.raises(NeuroprobeError, match="cells"):
        build_atlas(planted["root"] / "planted.h5", tmp_path / "b", units="some")


def test_byte_tokens_group_into_characters_and_lesion_units_parse():
    from neuroprobe.atlas.stimuli import token_decoder

    ids = np.frombuffer("영 7".encode(), dtype=np.uint8).astype(np.int64)
    segs = token_decoder({"subject": "organism"})(ids)
    assert segs == [("영", [0, 1, 2]), (" ", [3]), ("7", [4])]
    assert T.parse_units("a.b#0:1,2;c:3") == [("a.b#0", 1), ("a.b#0", 2), ("c", 3)]
    assert T.parse_units(float("nan")) == []
    assert T.slug("layer.1") == "layer.1" and T.slug("x#0") != T.slug("x_0")
