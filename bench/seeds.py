"""Benchmark: a config's RISE table over several full seeds, as mean ± sd.

Steps:
  1. for each seed K, `rise run` in its own run directory with every seed the run has drawn from K:
     model initialisation, warm-up data, rollouts, training order, data shuffling and evaluation
     sampling (the problems stay the same: the env's split is fixed);
  2. read each run's metrics.json (a seed whose run already finished is read, not rerun: `rise run`
     resumes a run directory and redoes nothing);
  3. print mean ± sd (sample sd over seeds) per iteration, check the default's targets on the
     means and on each seed, and write JSON (with the git commit measured) and a plot of accuracy
     by turn (mean over the seeds).

The README's table of the embedded default is generated from bench/results/seeds_default.json
(`python bench/seeds.py --readme` rewrites it; tests/test_readme_table.py fails when they differ).

    python bench/seeds.py                                   # seeds 0 1 2 of the embedded default
    python bench/seeds.py --label paper rollout.stop_when_correct=true data.stop_at_correct=true data.dedupe=true
    python bench/seeds.py --seeds 0 eval.split=val          # tuning: the validation split only
    python bench/seeds.py --readme                          # README's table from seeds_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METRICS = ("m1@t1", "m5@t1", "m1@t5", "p1@t5", "wrong_to_right", "right_to_wrong", "tie_rate", "tie_rate_parallel")
SEEDED = ("seed", "model.tiny.seed", "warmup.seed", "rollout.seed", "train.seed", "data.seed")


def seed_overrides(k: int) -> list[str]:
    # eval.seed keeps its offset from the others (default 1234) so evaluation never replays a
    # rollout's sampling stream.
    return [f"{key}={k}" for key in SEEDED] + [f"eval.seed={1234 + k}"]


def run_seed(k: int, label: str, run_dir: str, config: str | None, overrides: list[str]) -> dict[str, Any]:
    name = f"{label}-seed{k}"
    if finished(os.path.join(run_dir, name)):  # read, not resumed: resuming would start the engines first
        print(f"{name}: finished earlier, read from {run_dir}", flush=True)
        with open(os.path.join(run_dir, name, "metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "rise_ray.cli", "run", *([config] if config else []),
           *overrides, *seed_overrides(k), f"name={name}", f"run_dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, name, "metrics.json"), encoding="utf-8") as f:
        out = json.load(f)
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


def finished(path: str) -> bool:
    """A run directory whose last stage (the report) is recorded in its manifest."""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            return "report" in json.load(f)["stages"] and os.path.exists(os.path.join(path, "metrics.json"))
    except (OSError, KeyError, ValueError):
        return False


def mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per iteration: mean and sd over seeds of each metric and of each turn's accuracy."""
    iters = min(len(r["iterations"]) for r in runs)
    rows = []
    for i in range(iters):
        its = [r["iterations"][i] for r in runs]
        row: dict[str, Any] = {"iteration": i}
        for m in METRICS:
            if all(m in it for it in its):
                row[m] = mean_sd([it[m] for it in its])
        turns = min(len(it["acc_by_turn"]) for it in its)
        row["acc_by_turn"] = [mean_sd([it["acc_by_turn"][t] for it in its]) for t in range(turns)]
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]], wall: dict[str, float], max_wall_s: float = 600) -> dict[str, Any]:
    """The claims, on the means: the last iteration against the base (row 0)."""
    base, last = rows[0], rows[-1]
    gain = last["m1@t5"]["mean"] - last["m1@t1"]["mean"]
    base_gain = base["m1@t5"]["mean"] - base["m1@t1"]["mean"]
    return {
        "m1@t5_minus_m1@t1": gain,
        "base_m1@t5_minus_m1@t1": base_gain,
        "gain_at_least_5_points": gain >= 0.05,
        "gain_above_base": round(gain, 9) > round(base_gain, 9),  # float sums of equal shares differ in the last bit
        "m1@t5_above_m5@t1": last["m1@t5"]["mean"] > last["m5@t1"]["mean"],
        "p1@t5_not_below_base": last["p1@t5"]["mean"] >= base["p1@t5"]["mean"],
        "m1@t1_at_most_2_points_below_base": last["m1@t1"]["mean"] >= base["m1@t1"]["mean"] - 0.02,
        f"wall_at_most_{max_wall_s:g}_s": wall["mean"] <= max_wall_s,
    }


def git_commit() -> dict[str, Any]:
    """The commit the runs measured, and whether tracked files differed from it (results aside)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                            cwd=root, capture_output=True, text=True, check=True)  # fmt: skip
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


README = os.path.join(os.path.dirname(RESULTS), os.pardir, "README.md")
README_BEGIN = "<!-- table: bench/results/seeds_default.json (python bench/seeds.py --readme) -->"
README_END = "<!-- end of table -->"


def readme_table(result: dict[str, Any]) -> str:
    """The README's table: every seed's iterations (0: the base), then the mean, and the commit."""
    last = result["iterations"][-1]["iteration"]
    out = ["| seed | iter | m1@t1 | m5@t1 | m1@t5 | p1@t5 | m1@t5 − m1@t1 | wall |", "|---|---|---|---|---|---|---|---|"]
    for s in result["per_seed"]:
        for it in s["iterations"][: last + 1]:
            gain = 100 * (it["m1@t5"] - it["m1@t1"])
            wall = f"{s['wall_s']:.0f} s" if it["iteration"] == last and s.get("wall_s") else ""
            out.append(f"| {s['seed']} | {it['iteration']} | {100 * it['m1@t1']:.1f} | {100 * it['m5@t1']:.1f} | "
                       f"{100 * it['m1@t5']:.1f} | {100 * it['p1@t5']:.1f} | {gain:+.1f} | {wall} |")  # fmt: skip
    for r in result["iterations"] if len(result["per_seed"]) > 1 else []:
        gain = 100 * (r["m1@t5"]["mean"] - r["m1@t1"]["mean"])
        out.append(f"| mean | {r['iteration']} | {pm(r['m1@t1'])} | {pm(r['m5@t1'])} | {pm(r['m1@t5'])} | "
                   f"{pm(r['p1@t5'])} | {gain:+.1f} | |")  # fmt: skip
    commit = result.get("commit", {})
    out.append("")
    out.append(f"Measured at commit {commit.get('commit', 'unknown')[:12]}{' (with local changes)' if commit.get('dirty') else ''}, "
               f"{result['config']}{' ' + ' '.join(result['overrides']) if result['overrides'] else ''}.")  # fmt: skip
    return "\n".join(out)


def readme_block(text: str) -> str:
    """The generated part of the README (between its markers)."""
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"README.md lacks the markers {README_BEGIN!r} ... {README_END!r}")
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


def write_readme(result_path: str, readme: str = README) -> None:
    with open(result_path, encoding="utf-8") as f:
        table_text = readme_table(json.load(f))
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    readme_block(text)  # the markers are there
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    text = head + README_BEGIN + "\n" + table_text + "\n" + README_END + tail
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)


def pm(x: dict[str, float]) -> str:
    return f"{100 * x['mean']:.1f} ± {100 * x['sd']:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| iter | m1@t1 | m5@t1 | m1@t5 | p1@t5 | accuracy by turn (mean) |", "|---|---|---|---|---|---|"]
    for r in rows:
        turns = " ".join(f"{100 * t['mean']:.0f}" for t in r["acc_by_turn"])
        out.append(f"| {r['iteration']} | {pm(r['m1@t1'])} | {pm(r['m5@t1'])} | {pm(r['m1@t5'])} | {pm(r['p1@t5'])} | {turns} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", help="a config file (default: the embedded default)")
    ap.add_argument("--label", default="default", help="names the runs and the result file")
    ap.add_argument("--run-dir", default="runs/seeds")
    ap.add_argument("--out", help="JSON path (default: bench/results/seeds_<label>.json)")
    ap.add_argument("--max-wall-s", type=float, default=600, help="the wall-time target per run")
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md's table from seeds_default.json")
    ns, overrides = ap.parse_known_args()
    if ns.readme:
        write_readme(os.path.join(RESULTS, "seeds_default.json"))
        print("wrote README.md's table")
        return 0
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"not a key=value override: {bad[0]}")
    commit = git_commit()
    runs = [run_seed(k, ns.label, ns.run_dir, ns.config, overrides) for k in ns.seeds]
    rows = summarize(runs)
    wall = mean_sd([r["wall_s"] for r in runs if r.get("wall_s")] or [float("nan")])
    result = {
        "label": ns.label,
        "config": ns.config or "embedded default",
        "overrides": overrides,
        "commit": commit,
        "seeds": ns.seeds,
        "iterations": rows,
        "wall_s": wall,
        "targets": targets(rows, wall, ns.max_wall_s),
        "per_seed": [{"seed": k, "wall_s": r.get("wall_s"), "process_s": r.get("process_s"), "iterations": r["iterations"],
                      "targets": targets(summarize([r]), mean_sd([r.get("wall_s") or float("nan")]), ns.max_wall_s)}
                     for k, r in zip(ns.seeds, runs, strict=True)],  # fmt: skip
    }
    print(table(rows))
    print(f"wall per run: {wall['mean']:.0f} ± {wall['sd']:.0f} s")
    print(json.dumps(result["targets"], indent=2))
    for s in result["per_seed"]:
        missed = [k for k, v in s["targets"].items() if v is False]
        print(f"seed {s['seed']}: gain {100 * s['targets']['m1@t5_minus_m1@t1']:+.1f}, "
              + (f"misses {missed}" if missed else "meets every target"))
    out = ns.out or os.path.join(RESULTS, f"seeds_{ns.label}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("wrote", out)
    from rise_ray.eval.report import plot_turns  # accuracy by turn, mean over the seeds

    means = [{"iteration": r["iteration"], "acc_by_turn": [t["mean"] for t in r["acc_by_turn"]], "parallel": 5,
              "m5@t1": r["m5@t1"]["mean"]} for r in rows]  # fmt: skip
    plot_turns(means, out.removesuffix(".json") + ".png",
               f"{ns.label}: accuracy per turn, mean of {len(ns.seeds)} seed(s), no oracle")
    print("wrote", out.removesuffix(".json") + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
