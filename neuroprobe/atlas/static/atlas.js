/* neuroprobe atlas: sortable, filterable tables from data shipped beside the page (works from file://). */
(function () {
  "use strict";
  function fmt(v, kind) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "";
    if (kind === "bool") return v ? "yes" : "no";
    if (typeof v === "number") {
      if (!isFinite(v)) return v > 0 ? "\u221e" : "\u2212\u221e";
      if (kind === "int") return String(v);
      var a = Math.abs(v);
      if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
      return v.toFixed(a >= 100 ? 1 : 3);
    }
    return String(v);
  }
  /* true when `neuroprobe atlas --serve` serves the atlas (it writes any unit's page on demand) */
  function live() { return window.ATLAS_LIVE === true; }
  var NO_PAGE = "no page in this atlas: rerun neuroprobe atlas with --units all, or browse it with --serve";
  function missing(v) { return v === null || v === undefined || (typeof v === "number" && isNaN(v)); }
  function cmp(a, b) {
    if (typeof a === "number" && typeof b === "number") return a === b ? 0 : (a < b ? -1 : 1);
    if (typeof a === "boolean") return (a === b) ? 0 : (a ? -1 : 1);
    return String(a).localeCompare(String(b), undefined, {numeric: true});
  }
  /* spec: {columns: [{key, label, kind, link}], rows: [[...]], pageSize} */
  function CellTable(root, spec) {
    var cols = spec.columns, page = spec.pageSize || 200, shown = page;
    var sortKey = spec.sort || null, sortDir = spec.sortDir || -1, filtered = rows;
    var idx = {}; cols.forEach(function (c, i) { idx[c.key] = i; });
    /* JSON has no infinity: the atlas writes "inf" / "-inf" in numeric columns */
    var rows = spec.rows.map(function (r) {
      return r.map(function (v, j) {
        if (cols[j].kind === "num" && (v === "inf" || v === "-inf")) return v === "inf" ? Infinity : -Infinity;
        return v;
      });
    });
    var q = root.querySelector("input[type=search]"), verdict = root.querySelector("select.verdict");
    var conceptSel = root.querySelector("select.concept"), siteSel = root.querySelector("select.site");
    var tbody = root.querySelector("tbody"), thead = root.querySelector("thead tr");
    var count = root.querySelector(".count"), more = root.querySelector("button.more");
    function fill(sel, key) {
      if (!sel || idx[key] === undefined) return;
      var seen = {}; rows.forEach(function (r) { seen[r[idx[key]]] = 1; });
      Object.keys(seen).sort(function (a, b) { return a.localeCompare(b, undefined, {numeric: true}); }).forEach(function (v) {
        var o = document.createElement("option"); o.value = v; o.textContent = v; sel.appendChild(o);
      });
    }
    fill(conceptSel, "concept"); fill(siteSel, "site");
    cols.forEach(function (c) {
      if (c.kind === "link") return;
      var th = document.createElement("th"); th.textContent = c.label; th.className = "sortable" + (c.kind === "str" ? " l" : "");
      th.title = c.title || ("sort by " + c.label); th.dataset.key = c.key;
      th.addEventListener("click", function () {
        if (sortKey === c.key) sortDir = -sortDir; else { sortKey = c.key; sortDir = c.kind === "str" ? 1 : -1; }
        apply();
      });
      thead.appendChild(th);
    });
    function apply() {
      var text = q ? q.value.trim().toLowerCase() : "", v = verdict ? verdict.value : "";
      var cc = conceptSel ? conceptSel.value : "", ss = siteSel ? siteSel.value : "";
      filtered = rows.filter(function (r) {
        if (v && idx.verdict !== undefined && r[idx.verdict] !== v) return false;
        if (cc && r[idx.concept] !== cc) return false;
        if (ss && r[idx.site] !== ss) return false;
        if (text) {
          for (var i = 0; i < r.length; i++) if (String(r[i]).toLowerCase().indexOf(text) >= 0) return true;
          return false;
        }
        return true;
      });
      if (sortKey !== null && idx[sortKey] !== undefined) {
        var k = idx[sortKey];
        filtered = filtered.slice().sort(function (a, b) {
          var ma = missing(a[k]), mb = missing(b[k]);
          if (ma || mb) return ma === mb ? 0 : (ma ? 1 : -1);  /* blanks last in either direction */
          return sortDir * cmp(a[k], b[k]);
        });
      }
      Array.prototype.forEach.call(thead.children, function (th) {
        th.classList.remove("asc", "desc");
        if (th.dataset.key === sortKey) th.classList.add(sortDir > 0 ? "asc" : "desc");
      });
      render();
    }
    function render() {
      var frag = document.createDocumentFragment(), n = Math.min(shown, filtered.length);
      for (var i = 0; i < n; i++) {
        var r = filtered[i], tr = document.createElement("tr");
        cols.forEach(function (c, j) {
          var td = document.createElement("td"), v = r[j];
          if (c.kind === "str") td.className = "l";
          if (c.kind === "bool") td.className = v ? "yes" : "no";
          var link = c.link !== undefined ? r[idx[c.link]] : null;
          if (!link && c.live !== undefined && live()) link = r[idx[c.live]];
          if (link) { var a = document.createElement("a"); a.href = link; a.textContent = fmt(v, c.kind); td.appendChild(a); }
          else {
            td.textContent = fmt(v, c.kind);
            if (c.live !== undefined) { td.className += " nopage"; td.title = spec.noPage || NO_PAGE; }
          }
          if (c.kind !== "link") tr.appendChild(td);
        });
        frag.appendChild(tr);
      }
      tbody.innerHTML = ""; tbody.appendChild(frag);
      if (count) count.textContent = "showing " + n + " of " + filtered.length + " (" + rows.length + " in all)";
      if (more) more.style.display = n < filtered.length ? "" : "none";
    }
    [q, verdict, conceptSel, siteSel].forEach(function (el) {
      if (el) el.addEventListener("input", function () { shown = page; apply(); });
    });
    if (more) more.addEventListener("click", function () { shown += page; render(); });
    apply();
  }
  /* Where the "any unit" box goes: {href} of a unit's page, or {error} saying why there is none (data/units.js). */
  function unitTarget(siteSlug, unitText) {
    var data = window.ATLAS_UNITS || {sites: {}}, s = data.sites[siteSlug];
    if (!s) return {error: "unknown site " + siteSlug + "."};
    var text = String(unitText).trim();
    if (!/^[0-9]+$/.test(text)) return {error: "a unit is a whole number from 0 to " + (s.n_units - 1) + "."};
    var u = parseInt(text, 10);
    if (u >= s.n_units) return {error: s.name + " has " + s.n_units + " units (0 to " + (s.n_units - 1) + "); there is no unit " + u + "."};
    var href = "units/" + siteSlug + "/" + u + ".html";
    if (live() || s.pages === "all" || s.pages.indexOf(u) >= 0) return {href: href};
    return {error: s.name + " #" + u + " has " + (data.noPage || NO_PAGE) + "."};
  }
  function UnitBox(form) {
    var msg = form.querySelector(".unitmsg");
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var t = unitTarget(form.elements.site.value, form.elements.unit.value);
      if (t.href) { window.location.href = t.href; return; }
      if (msg) { msg.textContent = t.error; msg.classList.add("warn"); }
    });
  }
  window.NeuroprobeAtlas = {CellTable: CellTable, unitTarget: unitTarget};
  document.addEventListener("DOMContentLoaded", function () {
    var specs = window.ATLAS_TABLES || {};
    Object.keys(specs).forEach(function (id) {
      var root = document.getElementById(id);
      if (root) CellTable(root, specs[id]);
    });
    Array.prototype.forEach.call(document.querySelectorAll("form.unitbox"), UnitBox);
    if (live()) {  /* served: units without a static page get one on demand, so link them */
      Array.prototype.forEach.call(document.querySelectorAll(".nopage[data-href]"), function (el) {
        var a = document.createElement("a"); a.href = el.getAttribute("data-href"); a.textContent = el.textContent;
        el.parentNode.replaceChild(a, el);
      });
    }
    /* how long the page took to become usable (read by bench/atlas.py from the rendered DOM) */
    document.body.setAttribute("data-ready-ms", String(Math.round(performance.now())));
  });
})();
