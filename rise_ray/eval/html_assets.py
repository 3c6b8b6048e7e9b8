"""The style and script of `report.html` (rise_ray/eval/html_report.py), kept apart from the data code.

The script reads the embedded JSON (`#rise-data`) and builds the trajectory browser. Model text
only ever reaches the page through `textContent`, never as markup. Its state (view, filter,
search, page) lives in the URL's hash, `#view=eval-1&filter=fixed-3&q=12&page=0`, so a filtered
view can be linked, reloaded, or opened headless by a test.
"""

from __future__ import annotations

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d232b; background: #f6f7f9; }
header { background: #22313f; color: #fff; padding: 14px 24px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header .note { color: #cdd6df; margin: 0; }
main { padding: 8px 24px 40px; max-width: 1400px; }
h2 { margin: 28px 0 8px; font-size: 17px; border-bottom: 1px solid #d5dae0; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.note { color: #5a6572; font-size: 12.5px; margin: 4px 0; }
.warn { color: #8a4b00; background: #fff4e0; padding: 4px 8px; border-radius: 4px; }
table { border-collapse: collapse; background: #fff; margin: 4px 0; }
th, td { border: 1px solid #d5dae0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 560px; display: block; margin: 8px 0; border: 1px solid #d5dae0; background: #fff; }
#controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; background: #fff;
  border: 1px solid #d5dae0; padding: 8px 10px; border-radius: 6px; position: sticky; top: 0; z-index: 1; }
#controls label { font-weight: 600; }
#controls select, #controls input { font: inherit; padding: 2px 4px; }
#controls input[type=search] { width: 18em; }
#count { color: #3c4650; }
.pager button { font: inherit; margin: 0 2px; }
.problem { background: #fff; border: 1px solid #d5dae0; border-radius: 6px; margin: 10px 0; padding: 8px 12px; }
.phead { display: flex; flex-wrap: wrap; gap: 6px; align-items: baseline; }
.pid { font-weight: 700; font-family: ui-monospace, monospace; }
.badge { font-size: 12px; padding: 0 6px; border-radius: 9px; background: #e7ebef; }
.badge.fixed { background: #d8f0dc; color: #17612a; }
.badge.broken { background: #fbe0de; color: #8c1d17; }
.badge.never { background: #ececec; color: #555; }
pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.question { background: #f8f9fb; padding: 4px 6px; border-left: 3px solid #8aa0b5; }
pre.reply { max-height: 14em; overflow: auto; }
table.turns { width: 100%; margin-top: 6px; }
table.turns td.ok { color: #17612a; font-weight: 700; }
table.turns td.bad { color: #8c1d17; font-weight: 700; }
table.turns td.reply { width: 72%; }
table.turns td:not(.reply) { white-space: nowrap; }
.cands { font-size: 12px; color: #3c4650; margin-top: 3px; }
.cands .ok { color: #17612a; } .cands .bad { color: #8c1d17; }
details summary { cursor: pointer; color: #3c4650; font-size: 12.5px; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("rise-data").textContent);
  var PAGE = 50;
  var root = document.getElementById("browser");
  var state = {view: "", filter: "all", q: "", page: 0};
  var lastHash = null;

  // Elements are built with text only: model text never becomes markup.
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function view() {
    for (var i = 0; i < DATA.views.length; i++) if (DATA.views[i].id === state.view) return DATA.views[i];
    return DATA.views[DATA.views.length - 1];
  }

  // fixed at turn k: wrong at k-1, right at k; broken at turn k: right at k-1, wrong at k (k from 2).
  function flips(p) {
    if (p._flips) return p._flips;
    var f = {fixed: [], broken: [], ever: false};
    for (var i = 0; i < p.t.length; i++) {
      if (p.t[i].c) f.ever = true;
      if (i > 0 && p.t[i].c && !p.t[i - 1].c) f.fixed.push(i + 1);
      if (i > 0 && !p.t[i].c && p.t[i - 1].c) f.broken.push(i + 1);
    }
    p._flips = f;
    return f;
  }

  function producers(p) {
    return p.t.map(function (t) { return t.p || ""; });
  }

  function matches(p, filter) {
    var f = flips(p), m;
    if (filter === "all") return true;
    if (filter === "never") return !f.ever;
    if (filter === "first-right") return p.t.length > 0 && p.t[0].c;
    if (filter === "fixed-any") return f.fixed.length > 0;
    if (filter === "broken-any") return f.broken.length > 0;
    if ((m = /^(fixed|broken)-(\d+)$/.exec(filter))) return f[m[1]].indexOf(Number(m[2])) >= 0;
    if (filter === "by-teacher") return producers(p).indexOf("teacher") >= 0;
    if (filter === "by-best-of-n") return producers(p).some(function (s) { return s.indexOf("best-of-") === 0; });
    return false;
  }

  function haystack(p) {
    if (p._text === undefined) {
      var parts = [p.id, p.q, p.ref];
      p.t.forEach(function (t) { parts.push(t.r, t.a || ""); });
      p._text = parts.join("\n").toLowerCase();
    }
    return p._text;
  }

  function filters(v) {
    var out = [["all", "all problems"], ["never", "never right"], ["first-right", "right at turn 1"],
               ["fixed-any", "fixed at any turn"], ["broken-any", "broken at any turn"]];
    for (var k = 2; k <= v.turns; k++) out.push(["fixed-" + k, "fixed at turn " + k]);
    for (k = 2; k <= v.turns; k++) out.push(["broken-" + k, "broken at turn " + k]);
    if (v.kind === "collected") out.push(["by-best-of-n", "improved by best-of-N"], ["by-teacher", "improved by the teacher"]);
    return out;
  }

  function readHash() {
    var h = new URLSearchParams(location.hash.replace(/^#/, ""));
    // by default the last iteration's evaluation: the trained model, the one people look at first
    var evals = DATA.views.filter(function (v) { return v.kind === "eval"; });
    var fallback = evals.length ? evals[evals.length - 1] : DATA.views[0];
    state.view = h.get("view") || (fallback ? fallback.id : "");
    state.filter = h.get("filter") || "all";
    state.q = h.get("q") || "";
    state.page = Math.max(0, parseInt(h.get("page") || "0", 10) || 0);
  }

  function writeHash() {
    var h = new URLSearchParams();
    h.set("view", state.view);
    h.set("filter", state.filter);
    if (state.q) h.set("q", state.q);
    if (state.page) h.set("page", String(state.page));
    lastHash = "#" + h.toString();
    if (location.hash !== lastHash) location.replace(lastHash);  // no new history entry per keystroke
  }

  function option(value, label, selected) {
    var o = el("option", null, label);
    o.value = value;
    o.selected = selected;
    return o;
  }

  function controls(v) {
    var box = el("div");
    box.id = "controls";
    var vs = el("select");
    vs.id = "view";
    DATA.views.forEach(function (x) { vs.appendChild(option(x.id, x.label, x.id === v.id)); });
    vs.onchange = function () { state.view = vs.value; state.filter = "all"; state.page = 0; update(); };
    var fs = el("select");
    fs.id = "filter";
    filters(v).forEach(function (f) {
      var n = v.problems.filter(function (p) { return matches(p, f[0]); }).length;
      fs.appendChild(option(f[0], f[1] + " (" + n + ")", f[0] === state.filter));
    });
    fs.onchange = function () { state.filter = fs.value; state.page = 0; update(); };
    var qs = el("input");
    qs.type = "search";
    qs.id = "search";
    qs.placeholder = "search id, question, replies, answers";
    qs.value = state.q;
    qs.oninput = function () { state.q = qs.value; state.page = 0; update(true); };
    [["view", vs], ["filter", fs], ["search", qs]].forEach(function (pair) {
      var l = el("label", null, pair[0] + " ");
      l.appendChild(pair[1]);
      box.appendChild(l);
    });
    var count = el("span");
    count.id = "count";
    box.appendChild(count);
    var pager = el("span", "pager");
    box.appendChild(pager);
    return box;
  }

  function turnRow(v, t, i) {
    var tr = el("tr");
    tr.appendChild(el("td", null, i + 1));
    if (v.kind === "collected") tr.appendChild(el("td", null, t.p));
    tr.appendChild(el("td", null, t.a === null || t.a === undefined ? "(none)" : t.a));
    tr.appendChild(el("td", null, t.w));
    tr.appendChild(el("td", t.c ? "ok" : "bad", t.c ? "\u2713 right" : "\u2717 wrong"));
    var td = el("td", "reply");
    td.appendChild(el("pre", "reply", t.r));
    var flags = [];
    if (t.cut) flags.push("cut at max_tokens");
    if (t.deg) flags.push("runaway repetition");
    if (flags.length) td.appendChild(el("div", "cands", flags.join(", ")));
    if (t.k) {
      var c = el("div", "cands", v.kind === "eval" ? "parallel first answers: " : "chosen from " + t.k.length + ": ");
      t.k.forEach(function (k, j) {
        if (j) c.appendChild(document.createTextNode(", "));
        c.appendChild(el("span", k[1] ? "ok" : "bad", (k[0] === null ? "(none)" : k[0]) + (k[1] ? " \u2713" : " \u2717")
          + (v.kind === "collected" ? " r=" + k[2] : "")));
      });
      td.appendChild(c);
    }
    tr.appendChild(td);
    return tr;
  }

  function card(v, p) {
    var a = el("article", "problem");
    a.setAttribute("data-problem-id", p.id);
    var head = el("div", "phead");
    head.appendChild(el("span", "pid", p.id));
    var f = flips(p);
    if (!f.ever) head.appendChild(el("span", "badge never", "never right"));
    f.fixed.forEach(function (k) { head.appendChild(el("span", "badge fixed", "fixed at turn " + k)); });
    f.broken.forEach(function (k) { head.appendChild(el("span", "badge broken", "broken at turn " + k)); });
    if (p.stop && p.stop !== "turns") head.appendChild(el("span", "badge", "stopped: " + p.stop));
    a.appendChild(head);
    a.appendChild(el("pre", "question", p.q));
    var ref = el("details");
    ref.appendChild(el("summary", null, "reference"));
    ref.appendChild(el("pre", null, p.ref));
    a.appendChild(ref);
    var table = el("table", "turns");
    var hr = el("tr");
    var cols = ["turn"].concat(v.kind === "collected" ? ["by"] : [], ["answer", "reward", "correct", "reply"]);
    cols.forEach(function (h) { hr.appendChild(el("th", null, h)); });
    var thead = el("thead");
    thead.appendChild(hr);
    table.appendChild(thead);
    var body = el("tbody");
    p.t.forEach(function (t, i) { body.appendChild(turnRow(v, t, i)); });
    table.appendChild(body);
    a.appendChild(table);
    return a;
  }

  function update(keepFocus) {
    writeHash();
    render(keepFocus);
  }

  function render(keepFocus) {
    if (!DATA.views.length) {
      root.textContent = "No trajectory records found in this run directory.";
      document.body.setAttribute("data-ready", "1");
      return;
    }
    var v = view();
    state.view = v.id;
    var q = state.q.toLowerCase();
    var hits = v.problems.filter(function (p) { return matches(p, state.filter) && (!q || haystack(p).indexOf(q) >= 0); });
    var pages = Math.max(1, Math.ceil(hits.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var old = root.querySelector("#controls"), box;
    if (keepFocus && old) {  // typing in the search box: keep the box (and its focus), redo the rest
      box = old;
      while (box.nextSibling) root.removeChild(box.nextSibling);
    } else {
      root.textContent = "";
      box = controls(v);
      root.appendChild(box);
    }
    var start = state.page * PAGE, end = Math.min(hits.length, start + PAGE);
    var more = v.total > v.problems.length ? " (the page keeps the first " + v.problems.length + " of " + v.total + ")" : "";
    box.querySelector("#count").textContent = hits.length ? "showing " + (start + 1) + "\u2013" + end + " of "
      + hits.length + " matching, " + v.problems.length + " in all" + more : "no problem matches" + more;
    var pager = box.querySelector(".pager");
    pager.textContent = "";
    if (pages > 1) {
      [["\u2039 prev", state.page - 1], ["next \u203a", state.page + 1]].forEach(function (b) {
        var btn = el("button", null, b[0]);
        btn.disabled = b[1] < 0 || b[1] >= pages;
        btn.onclick = function () { state.page = b[1]; update(); window.scrollTo(0, root.offsetTop); };
        pager.appendChild(btn);
      });
      pager.appendChild(document.createTextNode(" page " + (state.page + 1) + " of " + pages));
    }
    var list = el("div");
    list.id = "problems";
    hits.slice(start, end).forEach(function (p) { list.appendChild(card(v, p)); });
    root.appendChild(list);
    document.body.setAttribute("data-ready", "1");  // tests wait for this: the script ran to the end
  }

  window.addEventListener("hashchange", function () {
    if (location.hash === lastHash) return;  // our own write
    readHash();
    render();
  });
  readHash();
  render();
})();
"""
