"""Benchmark: one config's RISE table from two code trees, the same seeds, side by side (issue 16:
the code before the token-id and lean-core work against today's).

Steps:
  1. for each seed K, `rise run` with the before tree's code (a checkout of the older commit, e.g. a
     git worktree) and with this tree's, each with bench/seeds.py's seed overrides K and its own
     overrides; a run that already finished is read, not rerun;
  2. per iteration and metric: each side's mean ± sd over the seeds, and after - before paired by
     seed: mean, sd and standard error of the difference, and whether the mean is within --within;
  3. print both tables and the differences; write JSON.

    git worktree add /tmp/before 4ced921
    python bench/compare_code.py --before /tmp/before --seeds 3 4 5 6 7 8 9 10 11 \\
        --after data.turns_after_correct=null data.after_correct_weight=1.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

from seeds import RESULTS, run_seed, summarize, table

SHOWN = ("m1@t1", "m5@t1", "m1@t5", "p1@t5")


def commit(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def paired(before: list[dict], after: list[dict], within: float) -> list[dict]:
    """Per iteration and metric: after - before over the seeds, in points."""
    rows = []
    for i in range(min(min(len(r["iterations"]) for r in runs) for runs in (before, after))):
        row: dict = {"iteration": i}
        for m in SHOWN:
            d = [100 * (a["iterations"][i][m] - b["iterations"][i][m]) for a, b in zip(after, before, strict=True)]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            mean = statistics.fmean(d)
            row[m] = {"mean": mean, "sd": sd, "se": sd / math.sqrt(len(d)), "per_seed": d,
                      "within": abs(mean) <= within}
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the older code")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--before-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--after", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for this tree's runs")
    ap.add_argument("--run-dir", default="runs/compare")
    ap.add_argument("--within", type=float, default=3.0, help="points the mean difference may be")
    ap.add_argument("--out", default=os.path.join(RESULTS, "lean_core_compare_runs.json"))
    ns = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = [run_seed(k, "before", ns.run_dir, None, ns.before_overrides, tree=ns.before) for k in ns.seeds]
    after = [run_seed(k, "after", ns.run_dir, None, ns.after) for k in ns.seeds]
    diff = paired(before, after, ns.within)
    result = {
        "before": {"commit": commit(ns.before), "overrides": ns.before_overrides, "iterations": summarize(before),
                   "wall_s": [r.get("wall_s") for r in before]},
        "after": {"commit": commit(here), "overrides": ns.after, "iterations": summarize(after),
                  "wall_s": [r.get("wall_s") for r in after]},
        "seeds": ns.seeds,
        "after_minus_before_points": diff,
        "within_points": ns.within,
        "all_within": all(r[m]["within"] for r in diff for m in SHOWN),
    }
    for side in ("before", "after"):
        print(f"{side} ({result[side]['commit']}), seeds {ns.seeds}:\n{table(result[side]['iterations'])}")
    print("after - before, points (mean ± standard error over seeds, paired by seed):")
    for r in diff:
        print(f"  iter {r['iteration']}: " + ", ".join(f"{m} {r[m]['mean']:+.1f} ± {r[m]['se']:.1f}" for m in SHOWN))
    walls = [[w for w in result[s]["wall_s"] if w] for s in ("before", "after")]
    if all(walls):
        print(f"wall per run: before {statistics.fmean(walls[0]):.0f} s, after {statistics.fmean(walls[1]):.0f} s")
    os.makedirs(os.path.dirname(ns.out), exist_ok=True)
    with open(ns.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("wrote", ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
