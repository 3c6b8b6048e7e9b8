"""Is the trained model still a working chat model? The base model and a RISE run's trained model,
each served by `rise serve`, answer the same unseen problems over HTTP.

Steps:
  1. the problems: the run's test and validation problems, then the run's env drawn with another
     seed, never a question the run trained on;
  2. for each target (the base model, then the run directory's latest trained model): start
     `rise serve` with the run's config on a free 127.0.0.1 port and wait for /healthz;
  3. every problem through POST /v1/rise/solve (its gold answer given, so attempts are graded; no
     oracle: all --turns turns run, feedback always "incorrect"), --clients at a time; and the
     first --chat problems through plain POST /v1/chat/completions (one answer, graded here);
  4. print turn-1 accuracy, accuracy by turn, the majority over the turns (m1@tT) and any-turn
     (p1@tT) for both; write bench/results/serve_accuracy_<label>.json.

    python bench/serve_accuracy.py runs/smollm2-arithmetic --base smollm2-135m-instruct [--problems 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve import free_port, wait_healthy  # bench/serve.py

from rise_ray.config import load_config
from rise_ray.files import atomic_write_json
from rise_ray.session import make_env

HERE = os.path.dirname(os.path.abspath(__file__))


def unseen_problems(cfg, n: int) -> list:
    """n problems the run never trained on: its test and validation problems, then problems of the
    same env drawn with another seed, none of them a training question."""
    env = make_env(cfg.env)
    options = {**cfg.env.options, "seed": int(cfg.env.options.get("seed", 0)) + 1000}
    fresh = make_env(cfg.env.model_copy(update={"options": options}))
    trained, out = {p.question for p in env.train}, {}
    for p in env.test + env.val + fresh.test + fresh.train + fresh.val:
        if p.question not in trained:
            out.setdefault(p.question, p)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} problems outside the run's training set; ask for fewer (--problems)")
    return list(out.values())[:n]


def start(target: str, config: str, log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["rise", "serve", target, config, "--port", str(port), "serve.max_ongoing_requests=64"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/healthz", log, f"rise serve {target}")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(url: str, env, problems: list, turns: int, chat: int, clients: int) -> dict:
    def solve(p) -> dict:
        r = httpx.post(f"{url}/v1/rise/solve", timeout=600,
                       json={"problem": p.question, "answer": env.gold(p.reference), "turns": turns})
        r.raise_for_status()
        return r.json()

    def ask(p) -> bool:
        messages = env.first_prompt(p)
        # 256 new tokens: the old server's default (vLLM's is the whole context left)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={"messages": messages, "max_tokens": 256})
        r.raise_for_status()
        return env.grade(r.json()["choices"][0]["message"]["content"], p.reference).correct

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        solved = list(pool.map(solve, problems))
        chat_ok = list(pool.map(ask, problems[:chat]))
    n = len(solved)
    by_turn = [sum(s["attempts"][t]["correct"] for s in solved if len(s["attempts"]) > t) / n for t in range(turns)]
    return {
        "problems": n,
        "turn1": by_turn[0],
        "acc_by_turn": by_turn,
        f"m1@t{turns}": sum(bool(s["final_correct"]) for s in solved) / n,
        f"p1@t{turns}": sum(any(a["correct"] for a in s["attempts"]) for s in solved) / n,
        "chat_problems": len(chat_ok),
        "chat_turn1": sum(chat_ok) / max(1, len(chat_ok)),
        "wall_s": round(time.monotonic() - t0, 1),
        "example": solved[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a RISE run directory (its config.yaml and latest trained model)")
    ap.add_argument("--base", required=True, help="the base model source (as model.path takes it)")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--chat", type=int, default=50, help="problems also asked through /v1/chat/completions")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--label", default="smollm2")
    args = ap.parse_args()
    config = os.path.join(args.run, "config.yaml")
    cfg = load_config(config)
    env = make_env(cfg.env)
    problems = unseen_problems(cfg, args.problems)
    results = {}
    for name, target in (("base", args.base), ("trained", args.run)):
        proc, url = start(target, config, f"/tmp/serve_accuracy_{name}.log")
        try:
            results[name] = measure(url, env, problems, args.turns, args.chat, args.clients)
        finally:
            stop(proc)
        r = results[name]
        print(f"{name:8s} turn 1 {100 * r['turn1']:5.1f}  by turn "
              + " ".join(f"{100 * a:.0f}" for a in r["acc_by_turn"])
              + f"  m1@t{args.turns} {100 * r[f'm1@t{args.turns}']:5.1f}  p1@t{args.turns} "
              f"{100 * r[f'p1@t{args.turns}']:5.1f}  chat turn 1 {100 * r['chat_turn1']:5.1f}  ({r['wall_s']} s)")
    out = os.path.join(HERE, "results", f"serve_accuracy_{args.label}.json")
    atomic_write_json(out, {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "run": args.run,
                            "base": args.base, "machine": platform.machine(), "cpus": os.cpu_count(), **results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
