"""/v1/rise/solve requests/s of this tree's `rise serve` against another commit's (--base-ref), both
up at once, each in a Ray of its own, rounds alternating: bench/serve.py's solve part (3-turn
solves of search questions, 8 closed-loop clients, max_tokens 32) without its chat part.

    python bench/serve_solve_ab.py [--base-ref main] [--rounds 4] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench.serve import run_solve  # noqa: E402
from rise_ray.envs import get_env  # noqa: E402
from rise_ray.models.source import cache_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, tree: str, model: str):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=tree, RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
               RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "rise_ray.cli", "serve", model, "--port", str(port), "serve.model_name=bench",
           "serve.num_cpus_per_replica=1", "serve.max_ongoing_requests=64", "serve.max_queued_requests=-1",
           "serve.max_tokens_limit=32", "model.max_model_len=2048"]
    with open(os.path.join(tempfile.gettempdir(), f"rise-solve-ab-{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait(proc, url: str) -> None:
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}: not healthy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(cache_dir(), "smollm2-135m-instruct"))
    ap.add_argument("--base-ref", default="main", help="the commit to compare with (git archive of it)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="rise-solve-ab-")
    archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", args.base_ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    trees = {"base": base, "this": os.path.dirname(HERE)}
    env = get_env("search", num_train=0, num_test=args.requests)
    problems = [p.question for p in env.test[: args.requests]]
    servers = {}
    try:
        for name, tree in trees.items():
            servers[name] = start(name, tree, args.model)
        for name, (proc, url) in servers.items():
            wait(proc, url)
            print(name, "up", flush=True)
        for _, url in servers.values():  # warm up each
            asyncio.run(run_solve(url, problems[:4], 4, 32, 600))
        rps: dict[str, list[float]] = {n: [] for n in servers}
        for r in range(args.rounds):
            for name, (_, url) in (servers.items() if r % 2 == 0 else reversed(servers.items())):
                lat, wall = asyncio.run(run_solve(url, problems, 8, 32, 900))
                rps[name].append(len(lat) / wall)
                print(name, r, round(len(lat) / wall, 3), flush=True)
        total = {n: sum(v) / len(v) for n, v in rps.items()}
        print(json.dumps({"rps": rps, "this_vs_base": round(total["this"] / total["base"], 3)}), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
