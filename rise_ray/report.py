"""The run report: metrics.json across iterations, report.md, turns.png and the terminal table."""

from __future__ import annotations

import json
import os

from rise_ray.eval.report import format_table, plot_turns, summary_columns
from rise_ray.files import atomic_write_json, atomic_write_text


def iteration_metrics(run_dir: str) -> list[dict]:
    rows = []
    k = 0
    while os.path.exists(path := os.path.join(run_dir, f"iter_{k}", "eval", "metrics.json")):
        with open(path) as f:
            rows.append({"iteration": k, **json.load(f)})
        k += 1
    return rows


def write_report(run_dir: str, wall_s: float | None = None) -> list[dict]:
    """Regenerate metrics.json, report.md and turns.png from the iterations' eval outputs."""
    rows = iteration_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no iter_*/eval/metrics.json yet")
    summary_path = os.path.join(run_dir, "metrics.json")
    if wall_s is None and os.path.exists(summary_path):
        with open(summary_path) as f:
            wall_s = json.load(f).get("wall_s")
    atomic_write_json(summary_path, {"iterations": rows, "wall_s": wall_s})
    plot_turns(rows, os.path.join(run_dir, "turns.png"))
    table = format_table(rows, title=f"RISE run {os.path.basename(os.path.abspath(run_dir))}")
    cols = summary_columns(rows[0])
    md = ["# RISE run report", "", "| iteration | " + " | ".join(cols) + " | accuracy by turn |",
          "|---" * (len(cols) + 2) + "|"]
    for m in rows:
        cells = " | ".join(f"{100 * m[c]:.1f}" for c in cols)
        md.append(f"| {m['iteration']} | {cells} | {' '.join(f'{100 * a:.0f}' for a in m['acc_by_turn'])} |")
    md += ["", "Percent of test problems. No oracle: the feedback is always \"incorrect\".", "",
           f"Wall time: {wall_s:.0f} s" if wall_s else "", "", "![accuracy per turn](turns.png)", ""]
    atomic_write_text(os.path.join(run_dir, "report.md"), "\n".join(md))
    print(table)
    return rows
