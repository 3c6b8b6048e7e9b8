"""`report.html`: one self-contained page to look at a run, opened from disk (no server, no network).

What it holds:
  1. the metrics per iteration (and mean ± sd over sibling seed runs, `NAME-seed<k>` as
     bench/seeds.py lays them out, whose config.yaml is this run's but for the seeds);
  2. accuracy by turn per iteration and the flip matrix per turn pair, counted from the records;
  3. a trajectory browser over every evaluated problem (iter_<k>/eval/records.parquet) and the
     collected training trajectories (iter_<k>/trajectories/*.parquet): each turn's reply,
     extracted answer, reward, correctness and producer; filters (fixed / broken at turn k, never
     right) and search run in the page's own script (rise_ray/eval/assets/report.js, report.css).

Each browser view travels as gzip-compressed JSON in base64 inside its own `<script
type="application/gzip">`, unpacked by the page (DecompressionStream) when first shown: a GSM8K-size
run (1,319 problems, 5 turns, 5 parallel answers, 5 evaluations) makes a page of ~21 MB (its JSON:
~45 MB) that draws its first view in about half a second (bench/report_size.py measures it).
base64 holds no `<`, `>` or `&`, so model text (`</script>`, tags) can neither end that element
nor become markup; the script only ever puts text into the page with `textContent`.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import re
import statistics
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from rise_ray.eval.report import summary_columns
from rise_ray.protocol import flatten
from rise_ray.rollout.episodes import Trajectory

# Collection can hold every training problem of an iteration (7,473 for GSM8K): the page keeps the
# first ones so it stays quick to open; evaluation records are kept whole (the filters count them).
MAX_COLLECTED = 1000


@cache
def asset(name: str) -> str:
    """A file of rise_ray/eval/assets (package data), inlined into the page: it opens from disk."""
    text = resources.files("rise_ray.eval").joinpath("assets", name).read_text(encoding="utf-8")
    if "</" in text:  # would end the inline <script>/<style> element early
        raise ValueError(f"rise_ray/eval/assets/{name}: contains '</', which would end its inline element")
    return text


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _producer(turn: Any) -> str:
    """Who made a collected turn: the teacher, best-of-N over the learner's samples, or the learner."""
    if turn.source == "teacher":
        return "teacher"
    n = len(turn.candidates)
    return f"best-of-{n}" if n > 1 else "policy"


def _turn_json(turn: Any, kind: str, first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"r": turn.response, "a": turn.answer, "w": turn.reward, "c": bool(turn.correct)}
    if not turn.finished:
        out["cut"] = True  # hit max_tokens
    if turn.degenerate:
        out["deg"] = True
    if kind == "collected":
        out["p"] = _producer(turn)
    # The other candidates' answers (not their text, to keep the page small): evaluation's turn 1
    # holds the parallel first answers (m{k}@t1); collection's best-of-N holds what was chosen from.
    if len(turn.candidates) > 1 and (kind == "collected" or first):
        out["k"] = [[a, bool(c), float(w)] for a, c, w in zip(
            turn.candidate_answers, turn.candidate_correct, turn.candidate_rewards, strict=False)]
    return out


def _problem_json(t: Trajectory, kind: str) -> dict[str, Any]:
    return {"id": t.problem_id, "q": t.question, "ref": t.reference, "stop": t.stop_reason,
            "t": [_turn_json(x, kind, i == 0) for i, x in enumerate(t.turns)]}


def flip_matrix(trajs: Sequence[Trajectory], turns: int) -> list[dict[str, int]]:
    """Per turn pair (t, t+1): problems right→right, wrong→right, right→wrong, wrong→wrong. A turn
    never taken (prompt too long) counts as wrong, as in the metrics."""
    rows = []
    for i in range(max(turns - 1, 0)):
        cell = {"rr": 0, "wr": 0, "rw": 0, "ww": 0}
        for t in trajs:
            a = i < len(t.turns) and bool(t.turns[i].correct)
            b = i + 1 < len(t.turns) and bool(t.turns[i + 1].correct)
            cell[("r" if a else "w") + ("r" if b else "w")] += 1
        rows.append(cell)
    return rows


def _read(path: str) -> tuple[list[Trajectory], str | None]:
    """Trajectories under `path`, or ([], why not): a bad file must not cost the run its report."""
    from rise_ray.data.store import read_trajectories

    if not os.path.exists(path):
        return [], None
    try:
        return read_trajectories(path), None
    except Exception as e:  # DataError, or a parquet that pyarrow cannot read
        return [], f"{path}: {e}"


def _settings_but_seeds(run_dir: str) -> dict[str, Any] | None:
    """The run's config.yaml as dotted keys, less its name, run_dir and every `seed` field (seed,
    model.tiny.seed, warmup.seed, rollout.seed, train.seed, data.seed, eval.seed: bench/seeds.py
    varies them all); None without a readable config.yaml."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    return {k: v for k, v in flatten(cfg).items() if k not in ("name", "run_dir") and k.rsplit(".", 1)[-1] != "seed"}


def seed_runs(run_dir: str) -> tuple[list[str], list[str]]:
    """(the runs to average, why other seed runs were left out): this run and the `LABEL-seed<k>`
    directories beside it (bench/seeds.py's layout) with metrics whose config.yaml matches this
    one's in everything but the seeds. ([run_dir], []) when there are no siblings."""
    run_dir = os.path.abspath(run_dir)
    m = re.fullmatch(r"(.+)-seed(\d+)", os.path.basename(run_dir))
    if not m:
        return [run_dir], []
    parent = os.path.dirname(run_dir)
    pat = re.compile(re.escape(m.group(1)) + r"-seed(\d+)")
    found = sorted((int(mm.group(1)), os.path.join(parent, d)) for d in os.listdir(parent) if (mm := pat.fullmatch(d)))
    others = [d for _, d in found if d != run_dir and os.path.exists(os.path.join(d, "metrics.json"))]
    if not others:
        return [run_dir], []
    mine = _settings_but_seeds(run_dir)
    if mine is None:
        return [run_dir], [f"{os.path.basename(d)}: this run has no config.yaml to compare with" for d in others]
    same, left_out = [], []
    for d in others:
        theirs = _settings_but_seeds(d)
        if theirs is None:
            left_out.append(f"{os.path.basename(d)}: no config.yaml")
        elif theirs != mine:
            diff = sorted(k for k in mine.keys() | theirs.keys() if k not in mine or k not in theirs or mine[k] != theirs[k])
            left_out.append(f"{os.path.basename(d)}: its config differs in {', '.join(diff[:5])}"
                            + (f" and {len(diff) - 5} more" if len(diff) > 5 else ""))
        else:
            same.append(d)
    order = {d: k for k, d in found}
    return sorted([run_dir, *same], key=order.__getitem__), left_out


def _seed_rows(dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Per iteration (those every seed reached): mean and sample sd over seeds of each metric."""
    runs = []
    for d in dirs:
        with open(os.path.join(d, "metrics.json"), encoding="utf-8") as f:
            runs.append(json.load(f).get("iterations", []))
    out = []
    for i in range(min(len(r) for r in runs)):
        its = [r[i] for r in runs]
        row: dict[str, Any] = {"iteration": i}
        for c in [*summary_columns(its[0]), *(f"acc_t{j + 1}" for j in range(len(its[0]["acc_by_turn"])))]:
            xs = [it["acc_by_turn"][int(c[5:]) - 1] if c.startswith("acc_t") else it.get(c) for it in its]
            if all(x is not None for x in xs):
                row[c] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append(row)
    return out


def _table(head: Sequence[str], body: Sequence[Sequence[str]], cls: str = "") -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{rows}</tbody></table>")


def _metrics_section(rows: Sequence[dict], seed_dirs: Sequence[str], left_out: Sequence[str]) -> str:
    cols = summary_columns(rows[0])
    turns = max(len(m["acc_by_turn"]) for m in rows)
    body = [[str(m["iteration"]), *(_pct(m.get(c)) for c in cols), str(m.get("num_problems", "-"))] for m in rows]
    out = ["<h2>Metrics per iteration</h2>", _table(["iteration", *cols, "problems"], body, "num"),
           '<p class="note">Percent of evaluation problems; no oracle (the feedback is always "incorrect"). '
           "A majority's j-way tie that holds the correct answer scores 1/j.</p>"]
    if len(seed_dirs) > 1:
        srows = _seed_rows(seed_dirs)
        scols = [c for c in [*cols, *(f"acc_t{j + 1}" for j in range(turns))] if all(c in r for r in srows)]
        sbody = [[str(r["iteration"]), *(f"{100 * r[c][0]:.1f} ± {100 * r[c][1]:.1f}" for c in scols)] for r in srows]
        names = ", ".join(os.path.basename(d) for d in seed_dirs)
        out += [f"<h3>Mean ± sd over {len(seed_dirs)} seeds</h3>", _table(["iteration", *scols], sbody, "num"),
                f'<p class="note">Averaged: {html.escape(names)} (the same config but for the seeds; sample sd).</p>']
    out += [f'<p class="warn">Seed run not averaged: {html.escape(why)}.</p>' for why in left_out]
    return "\n".join(out)


def _turns_section(rows: Sequence[dict], run_dir: str) -> str:
    turns = max(len(m["acc_by_turn"]) for m in rows)
    head = ["iteration", *(f"turn {j + 1}" for j in range(turns))]
    body = [[str(m["iteration"]), *(_pct(a) for a in m["acc_by_turn"])] for m in rows]
    out = ["<h2>Accuracy by turn</h2>", _table(head, body, "num")]
    png = os.path.join(run_dir, "turns.png")
    if os.path.exists(png):  # embedded, so the page still needs no other file
        with open(png, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        out.append(f'<img class="plot" alt="accuracy per turn" src="data:image/png;base64,{data}">')
    return "\n".join(out)


def _flip_section(flips: dict[int, list[dict[str, int]]], sizes: dict[int, int]) -> str:
    out = ["<h2>Flips between turns</h2>",
           '<p class="note">Evaluation problems per consecutive turn pair: wrong→right is a fix, right→wrong '
           "a broken answer (share of problems in brackets).</p>"]
    if not flips:
        return "\n".join([*out, '<p class="note">No evaluation records found.</p>'])
    body = []
    for k, pairs in sorted(flips.items()):
        n = max(sizes[k], 1)
        for i, c in enumerate(pairs):
            body.append([str(k), f"{i + 1} → {i + 2}",
                         *(f"{c[x]} ({100 * c[x] / n:.1f}%)" for x in ("wr", "rw", "rr", "ww"))])
    head = ["iteration", "turns", "wrong → right", "right → wrong", "right → right", "wrong → wrong"]
    return "\n".join([*out, _table(head, body, "num flips")])


def embed_json(data: Any) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` is left to end it or start markup."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def pack_view(problems: list[dict]) -> str:
    """A view's problems as the page carries them: JSON, gzip (mtime 0: the same run gives the same
    page), base64."""
    raw = json.dumps(problems, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


def browser_views(run_dir: str, iterations: Sequence[int]) -> tuple[list[dict], dict, dict, list[str]]:
    """The browser's views (evaluation and collection per iteration), the flip matrices and
    problem counts per evaluated iteration, and notes on files that could not be read."""
    views: list[dict] = []
    flips: dict[int, list[dict[str, int]]] = {}
    sizes: dict[int, int] = {}
    notes: list[str] = []
    for k in iterations:
        trajs, err = _read(os.path.join(run_dir, f"iter_{k}", "eval", "records.parquet"))
        notes += [err] if err else []
        if trajs:
            turns = max(len(t.turns) for t in trajs)
            flips[k], sizes[k] = flip_matrix(trajs, turns), len(trajs)
            views.append({"id": f"eval-{k}", "label": f"Evaluation, iteration {k}", "kind": "eval", "turns": turns,
                          "total": len(trajs), "problems": [_problem_json(t, "eval") for t in trajs]})
        trajs, err = _read(os.path.join(run_dir, f"iter_{k}", "trajectories"))
        notes += [err] if err else []
        if trajs:
            views.append({"id": f"collected-{k}", "label": f"Collected for training, iteration {k}",
                          "kind": "collected", "turns": max(len(t.turns) for t in trajs), "total": len(trajs),
                          "problems": [_problem_json(t, "collected") for t in trajs[:MAX_COLLECTED]]})
    return views, flips, sizes, notes


def render_html(run_dir: str, rows: Sequence[dict], protocol: str = "", wall_s: float | None = None) -> str:
    """The page for a run directory whose iterations' metrics are `rows` (rise_ray.report)."""
    name = os.path.basename(os.path.abspath(run_dir))
    views, flips, sizes, notes = browser_views(run_dir, [m["iteration"] for m in rows])
    e = html.escape
    meta = " ".join(x for x in (protocol, f"Wall time: {wall_s:.0f} s." if wall_s else "") if x)
    index = [{k: v for k, v in view.items() if k != "problems"} | {"shown": len(view["problems"])} for view in views]
    packed = [f'<script type="application/gzip" id="rise-view-{e(v["id"])}">{pack_view(v["problems"])}</script>'
              for v in views]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network: nothing may be fetched, and only this page's own script and style run.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>RISE run {e(name)}</title><style>{asset('report.css')}</style></head><body>",
        f"<header><h1>RISE run <span class=\"name\">{e(name)}</span></h1>"
        f"<p class=\"note\">{e(meta)}</p></header><main>",
        _metrics_section(rows, *seed_runs(run_dir)), _turns_section(rows, run_dir), _flip_section(flips, sizes),
        '<h2 id="browser-title">Trajectories</h2>',
        *(f'<p class="warn">Not shown: {e(n)}</p>' for n in notes),
        '<div id="browser"><noscript>The trajectory browser needs JavaScript.</noscript></div>',
        f'</main><script type="application/json" id="rise-data">{embed_json({"run": name, "views": index})}</script>',
        *packed, f"<script>{asset('report.js')}</script></body></html>", "",
    ]
    return "\n".join(parts)


def write_html_report(run_dir: str, rows: Sequence[dict], protocol: str = "", wall_s: float | None = None) -> str:
    """Write run_dir/report.html; returns its path."""
    from rise_ray.files import atomic_write_text

    path = os.path.join(run_dir, "report.html")
    atomic_write_text(path, render_html(run_dir, rows, protocol, wall_s))
    return path
