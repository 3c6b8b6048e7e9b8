"""Where the CPU goes while `rise serve` answers chat requests, beside vLLM's own OpenAI server: CPU
seconds by process during the same closed-loop load, for each serve.proxy (HAProxy, Ray's proxy).

Steps:
  1. the model (a name for `rise model get`, or a model directory) and the search env's questions;
  2. start vLLM's own OpenAI server (bench/vllm_server.py), then, for each --proxies value, `rise
     serve` with serve.proxy=<value> in a Ray of its own (same engine settings as bench/serve.py);
  3. per --rounds round: --requests chat requests at --clients closed-loop clients against each
     system in turn, CPU seconds of every process (user + system, psutil) read before and after;
  4. print requests/s and the CPU seconds by process (summed over rounds, by process title), and
     write bench/results/serve_cpu.json: per system, req/s, the engine's CPU, the request path's
     (the server's own processes: proxy, ingress and LLMServer replicas, or vLLM's API server) and
     the rest (Ray's own processes, the load generator).

    python bench/serve_cpu.py --model smollm2-135m-instruct [--proxies haproxy ray] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter

import psutil

from rise_ray.config import load_config
from rise_ray.envs import get_env
from rise_ray.files import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from serve import free_port, model_path, run_http, start_vllm_server  # noqa: E402  (bench/serve.py)

ENGINE = ("VLLM::Worker", "VLLM::EngineCore")
REQUEST_PATH = ("ray::ServeReplica", "ray::ProxyActor", "ray::HAProxyManager", "haproxy", "vllm_server.py")


def cpu_by_process(vllm_pids: set[int]) -> dict[int, tuple[str, float]]:
    """{pid: (title, CPU seconds)}; the titles of vLLM's server and its engine start with "vllm server: "
    (both systems' engines are titled VLLM::Worker / VLLM::EngineCore)."""
    out = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            t = p.cpu_times()
            title = " ".join(p.info["cmdline"] or [p.info["name"] or "?"]).split(" --")[0][:70]
            out[p.pid] = (("vllm server: " if p.pid in vllm_pids else "") + title, t.user + t.system)
        except (psutil.Error, OSError):
            continue
    return out


def measured(url: str, convs: list, clients: int, vllm_pids: set[int]) -> tuple[float, Counter]:
    """(requests/s, CPU seconds by process title) for one closed-loop round."""
    before = cpu_by_process(vllm_pids)
    _, wall = asyncio.run(run_http(url, "bench", convs, clients, 32, 900))
    cpu: Counter = Counter()
    for pid, (title, s) in cpu_by_process(vllm_pids).items():
        cpu[title] += s - before.get(pid, (title, 0.0))[1]
    return len(convs) / wall, cpu


def kind(title: str, system: str) -> str:
    """engine (the measured system's), request_path (its server processes), idle_engine (the other
    system's engine, spinning while idle), or rest (Ray's own processes, the load generator)."""
    own = title.startswith("vllm server: ") == (system == "vllm")
    if any(k in title for k in ENGINE):
        return "engine" if own else "idle_engine"
    return "request_path" if own and any(k in title for k in REQUEST_PATH) else "rest"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--proxies", nargs="+", default=["haproxy", "ray"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve_cpu.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from rise_ray.serve.deploy import serve_command

    base = ["serve.model_name=bench", "serve.num_cpus_per_replica=1", "serve.max_ongoing_requests=64",
            "serve.max_queued_requests=-1", "serve.max_tokens_limit=32", "model.max_model_len=2048"]
    cfg = load_config(overrides=base)
    model_dir = model_path(args.model, cfg.model.tiny.model_dump())
    env = get_env("search", num_train=0, num_test=args.requests)
    convs = [env.first_prompt(p) for p in env.test]
    results: dict[str, dict] = {}
    proc, vllm_url = start_vllm_server(model_dir, "bench", 2048, cfg.rollout.kv_cache_memory_bytes,
                                       os.path.join(tempfile.mkdtemp(), "vllm_server.log"))
    vllm_pids = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    try:
        for proxy in args.proxies:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            try:
                url = serve_command({"bench": model_dir}, load_config(overrides=[*base, f"serve.proxy={proxy}"]),
                                    "127.0.0.1", free_port(), blocking=False)
                systems = {f"rise ({proxy})": url, "vllm": vllm_url}
                for u in systems.values():  # warm up
                    asyncio.run(run_http(u, "bench", convs[:8], 4, 32, 900))
                time.sleep(5)
                for _ in range(args.rounds):
                    for name, u in systems.items():
                        rps, cpu = measured(u, convs, args.clients, vllm_pids)
                        r = results.setdefault(name, {"requests_per_s": [], "cpu_s": Counter()})
                        r["requests_per_s"].append(round(rps, 3))
                        r["cpu_s"].update(cpu)
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        proc.terminate()
        proc.wait(60)

    out = {"model": args.model, "clients": args.clients, "requests": args.requests, "rounds": args.rounds}
    for name, r in results.items():
        n = args.requests * len(r["requests_per_s"])
        by_kind: Counter = Counter()
        for title, s in r["cpu_s"].items():
            by_kind[kind(title, name)] += s
        top = {t: round(s, 2) for t, s in r["cpu_s"].most_common(12) if s >= 0.05}
        per_request = {k: round(1000 * v / n, 1) for k, v in sorted(by_kind.items())}
        out[name] = {"requests_per_s": r["requests_per_s"], "cpu_ms_per_request": per_request, "cpu_s_by_process": top}
        print(f"{name}: req/s {r['requests_per_s']}; CPU ms per request: "
              + ", ".join(f"{k} {v}" for k, v in per_request.items()))
        for t, s in top.items():
            print(f"    {s:7.2f}  {t}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns worker processes: keep module import side-effect free
    main()
