"""Benchmark: report.html for a run of GSM8K's size, opened in headless Chromium.

  1. synthesise a run directory of GSM8K's size (no model): 1,319 test problems evaluated with
     5 sequential turns and 5 parallel first answers at iterations 0..4 (4 RISE iterations), and
     collection for training at iterations 1..4 (--collected problems each, 5 turns, best-of-5);
     replies of GSM8K's length (a chat model's chain of thought: ~800 characters on average, 200 to
     2,400), built from the sentences of GSM8K's own solutions when --gsm8k names its jsonl files,
     else from a word list (text that gzip packs about as well as English);
  2. write its report (rise_ray.report.write_report: metrics.json, report.md, turns.png, report.html);
  3. open report.html in headless Chromium (--dump-dom) and read the time at which the page drew its
     first view (body[data-first-draw-ms]: performance.now(), from navigation start), and the wall
     time of the whole Chromium run against the same for an empty page.

Targets (issue 38): the file under 25 MB, the first view drawn in under 2 s; exit 1 if either misses.

    python bench/report_size.py                                  # word-list replies
    python bench/report_size.py --gsm8k /path/to/gsm8k           # replies from GSM8K's solutions
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from rise_ray.data.store import write_trajectories
from rise_ray.eval.metrics import compute_metrics
from rise_ray.report import write_report
from rise_ray.rollout.episodes import Trajectory, Turn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAX_MB, MAX_FIRST_DRAW_MS = 25.0, 2000.0
WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the a of to and in is it that for on with as was at by an be this from or have are not but had his "
    "they which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three total cost each per "
    "apples dollars hours minutes miles pages eggs cookies tickets students books marbles cups boxes week month "
    "half twice price left spent earned bought sold gave shared remaining altogether difference sum product"
).split()


def _gsm8k_sentences(path: str) -> tuple[list[str], list[str]]:
    """(questions, solution sentences) of GSM8K's jsonl files under path, calculator notes removed."""
    questions, sentences = [], []
    for name in ("test.jsonl", "train.jsonl"):
        with open(os.path.join(path, name), encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                questions.append(rec["question"])
                body = re.sub(r"<<[^>]*>>", "", rec["answer"].split("####")[0])
                sentences += [s.strip() for s in body.split("\n") if s.strip()]
    return questions, sentences


class Text:
    """Questions and replies of GSM8K's length, from GSM8K's own sentences or from WORDS."""

    def __init__(self, rng: random.Random, gsm8k: str | None):
        self.rng = rng
        self.questions, self.sentences = _gsm8k_sentences(gsm8k) if gsm8k else ([], [])

    def _sentence(self) -> str:
        if self.sentences:
            return self.rng.choice(self.sentences)
        r = self.rng
        a, b = r.randint(2, 500), r.randint(2, 60)
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(6, 16)))
        return f"{words.capitalize()} {a} * {b} = {a * b}, so {r.choice(WORDS)} {a * b - r.randint(0, a)}."

    def reply(self, answer: str) -> str:
        # log-normal around 800 characters (a chat model's GSM8K chain of thought), 200..2,400
        target = min(2400, max(200, int(self.rng.lognormvariate(math.log(750), 0.45))))
        parts, n = [], 0
        while n < target:
            s = self._sentence()
            parts.append(s)
            n += len(s) + 1
        return " ".join(parts) + f" The answer is \\boxed{{{answer}}}."

    def question(self, k: int) -> str:
        if self.questions:
            return self.questions[k % len(self.questions)]
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(25, 70))).capitalize() + "?"


def _turn(text: Text, gold: str, right: bool, cands: int, source: str = "policy") -> Turn:
    rng = text.rng
    answers = [gold if (right if i == 0 else rng.random() < 0.5) else str(int(gold) + rng.randint(1, 40)) for i in range(cands)]
    replies = [text.reply(a) for a in answers]
    return Turn(replies[0], answers[0], float(right), right, source, rng.random() > 0.03, False, replies if cands > 1 else [],
                answers if cands > 1 else [], [float(a == gold) for a in answers] if cands > 1 else [],
                [a == gold for a in answers] if cands > 1 else [])


def _trajectory(text: Text, k: int, turns: int, parallel: int, p_right: float, collected: bool) -> Trajectory:
    rng, gold = text.rng, str(text.rng.randint(1, 2000))
    ts, right = [], rng.random() < p_right
    for t in range(turns):
        if t:  # a later turn keeps a right answer mostly, fixes a wrong one sometimes
            right = rng.random() < (0.9 if right else 0.15)
        ts.append(_turn(text, gold, right, parallel if t == 0 else 1, "teacher" if collected and right and rng.random() < 0.2 else "policy"))
        if collected and right:  # collection stops at the first right answer
            break
    return Trajectory(f"gsm8k-{k}", text.question(k), f"#### {gold}", ts, stop_reason="correct" if collected and right else "turns")


def build_run(run_dir: str, problems: int = 1319, turns: int = 5, parallel: int = 5, iterations: int = 4,
              collected: int = 2000, gsm8k: str | None = None, seed: int = 0) -> str:
    """A run directory of that size (no model); returns it."""
    text = Text(random.Random(seed), gsm8k)
    for k in range(iterations + 1):
        trajs = [_trajectory(text, i, turns, parallel, 0.35 + 0.05 * k, False) for i in range(problems)]
        out = os.path.join(run_dir, f"iter_{k}", "eval")
        os.makedirs(out, exist_ok=True)
        write_trajectories(trajs, os.path.join(out, "records.parquet"))
        metrics = {**compute_metrics(trajs, lambda a: a, turns=turns, parallel=parallel), "split": "test"}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        if k:
            trajs = [_trajectory(text, i, turns, parallel, 0.4, True) for i in range(collected)]
            write_trajectories(trajs, os.path.join(run_dir, f"iter_{k}", "trajectories", "part-00000.parquet"))
    return run_dir


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    return path


def open_in_chromium(page: str, profile: str) -> tuple[str, float]:
    """(the DOM once the page's script has drawn, Chromium's wall time in seconds)."""
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--virtual-time-budget=30000", "--dump-dom", "file://" + os.path.abspath(page)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return out.stdout, wall


def measure(page: str) -> dict:
    """The page's size and, in headless Chromium, its first draw (ms from navigation start)."""
    with tempfile.TemporaryDirectory(prefix="rise-report-") as tmp:
        empty = os.path.join(tmp, "empty.html")
        with open(empty, "w") as f:
            f.write("<!DOCTYPE html><html><body>empty</body></html>")
        open_in_chromium(empty, os.path.join(tmp, "profile"))  # a warm profile for both runs below
        _, empty_wall = open_in_chromium(empty, os.path.join(tmp, "profile"))
        dom, wall = open_in_chromium(page, os.path.join(tmp, "profile"))
    m = re.search(r'data-first-draw-ms="(\d+)"', dom)
    return {"bytes": os.path.getsize(page), "mb": round(os.path.getsize(page) / 1e6, 2),
            "first_draw_ms": int(m.group(1)) if m else None, "cards_drawn": dom.count('<article class="problem"'),
            "chromium_wall_s": round(wall, 2), "chromium_empty_page_wall_s": round(empty_wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gsm8k", help="a directory with GSM8K's test.jsonl and train.jsonl: replies from its solutions")
    ap.add_argument("--collected", type=int, default=2000, help="problems collected per iteration (the page keeps 1,000)")
    ap.add_argument("--run-dir", help="where to build the run (default: a temporary directory, removed)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "report_size.json"))
    ns = ap.parse_args()
    tmp = None if ns.run_dir else tempfile.mkdtemp(prefix="rise-gsm8k-size-")
    run_dir = ns.run_dir or os.path.join(tmp, "gsm8k-size")
    try:
        t0 = time.perf_counter()
        build_run(run_dir, collected=ns.collected, gsm8k=ns.gsm8k)
        t1 = time.perf_counter()
        write_report(run_dir)
        t2 = time.perf_counter()
        result = {"problems": 1319, "turns": 5, "parallel": 5, "iterations": 4, "collected_per_iteration": ns.collected,
                  "replies": "GSM8K solutions' sentences" if ns.gsm8k else "word list",
                  "build_s": round(t1 - t0, 1), "write_report_s": round(t2 - t1, 1),
                  **measure(os.path.join(run_dir, "report.html"))}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(ns.out), exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(result, f, indent=1)
    ok = result["mb"] < MAX_MB and result["first_draw_ms"] is not None and result["first_draw_ms"] < MAX_FIRST_DRAW_MS
    print(f"report.html {result['mb']} MB (target < {MAX_MB:g}), first view drawn at {result['first_draw_ms']} ms "
          f"(target < {MAX_FIRST_DRAW_MS:g}): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
