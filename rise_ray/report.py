"""The run report: metrics.json across iterations, report.md, turns.png, report.html and the terminal table."""

from __future__ import annotations

import json
import os

from rise_ray.eval.html_report import write_html_report
from rise_ray.eval.report import format_table, percent, plot_turns, summary_columns
from rise_ray.files import atomic_write_json, atomic_write_text


def iteration_metrics(run_dir: str) -> list[dict]:
    rows = []
    k = 0
    while os.path.exists(path := os.path.join(run_dir, f"iter_{k}", "eval", "metrics.json")):
        with open(path) as f:
            rows.append({"iteration": k, **json.load(f)})
        k += 1
    return rows


def protocol(run_dir: str, row: dict) -> str:
    """The evaluation protocol in one sentence, from the run's config.yaml ("" when it is missing)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return ""
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    ev, env = cfg.get("eval", {}), cfg.get("env", {})
    window = ev.get("context_window")
    kept = "every earlier attempt" if window is None else f"the latest {window} attempt(s)"
    return (f"Protocol: {row.get('num_problems', '?')} {env.get('name', '?')} problems of the "
            f"{row.get('split', ev.get('split', 'test'))} split, {row['turns']} sequential turns and {row['parallel']} parallel "
            f"first answers, temperature {ev.get('temperature')}, top_p {ev.get('top_p')}, at most "
            f"{ev.get('max_tokens')} new tokens, prompts keep the question and {kept}, "
            f"{env.get('grading', 'default')} grading, seed {ev.get('seed')}.")


def write_report(run_dir: str, wall_s: float | None = None) -> list[dict]:
    """Regenerate metrics.json, report.md, turns.png and report.html from the iterations' eval outputs."""
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
        cells = " | ".join(percent(m, c) for c in cols)
        md.append(f"| {m['iteration']} | {cells} | {' '.join(f'{100 * a:.0f}' for a in m['acc_by_turn'])} |")
    md += ["", "Percent of evaluation problems. No oracle: the feedback is always \"incorrect\". Majorities "
           "(m1@tT, mk@t1) score a j-way tie that holds the correct answer as 1/j (the expected accuracy of a "
           "random tie-break); tie_rate / tie_rate_parallel: share of problems whose sequential / parallel "
           "vote was a tie. Turns an episode could not take (prompt too long) abstain and count as wrong.", "",
           protocol(run_dir, rows[0]), "", f"Wall time: {wall_s:.0f} s" if wall_s else "", "",
           "![accuracy per turn](turns.png)", "",
           "Every evaluated and collected trajectory, turn by turn: [report.html](report.html).", ""]
    atomic_write_text(os.path.join(run_dir, "report.md"), "\n".join(md))
    write_html_report(run_dir, rows, protocol(run_dir, rows[0]), wall_s)
    print(table)
    return rows
