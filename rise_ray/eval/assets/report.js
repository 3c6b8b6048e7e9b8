// report.html's script (rise_ray/eval/html_report.py inlines it into the page).
//
// The page carries an index (#rise-data: the run's name and its views) and each view's problems as
// gzip-compressed JSON in base64 (<script type="application/gzip" id="rise-view-ID">): a view is
// unpacked (DecompressionStream) the first time it is shown, so opening the page costs one view,
// not the whole run. Model text only ever reaches the page through textContent, never as markup.
// The state (view, filter, search, page) lives in the URL's hash,
// #view=eval-1&filter=fixed-3&q=12&page=0, so a filtered view can be linked, reloaded, or opened
// headless by a test. body[data-ready] is set once a view is drawn; body[data-first-draw-ms] holds
// performance.now() at the first one (bench/report_size.py reads it).
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("rise-data").textContent);
  var PAGE = 50;
  var root = document.getElementById("browser");
  var state = {view: "", filter: "all", q: "", page: 0};
  var lastHash = null;
  var unpacking = {};  // view id -> Promise of its problems

  // base64 -> gzip -> JSON, in the page (no network: the bytes are in the page itself)
  function unpack(v) {
    if (!unpacking[v.id]) {
      var bin = atob(document.getElementById("rise-view-" + v.id).textContent.trim());
      var bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      var text = new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
      unpacking[v.id] = text.then(function (t) { v.problems = JSON.parse(t); return v.problems; });
    }
    return unpacking[v.id];
  }

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
    if (!v.problems) {  // unpacked on first use; drawn when it is (unless another view was chosen)
      root.textContent = "Unpacking " + v.label + "\u2026";
      unpack(v).then(function () { if (state.view === v.id) render(); }, function (e) {
        root.textContent = "Could not unpack " + v.label + ": " + e;
        document.body.setAttribute("data-ready", "1");
      });
      return;
    }
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
    if (!document.body.hasAttribute("data-ready")) {  // tests wait for this: the first view is drawn
      document.body.setAttribute("data-first-draw-ms", String(Math.round(performance.now())));
      document.body.setAttribute("data-ready", "1");
    }
  }

  window.addEventListener("hashchange", function () {
    if (location.hash === lastHash) return;  // our own write
    readHash();
    render();
  });
  readHash();
  render();
})();
