"""Serving latency and throughput: the Ray Serve app over HTTP vs the engine called directly.

Steps:
  1. build the tiny model; make the chat requests (search questions, unseeded, max_tokens each);
     start the app (one replica, one CPU) and, in this process, the same engine;
  2. "direct": the engine in this process, no HTTP: at c clients the requests go in waves of c,
     each wave one engine.generate call (the batching a server could at best do), a request's
     latency its wave's time;
  3. "served": the same requests to POST /v1/chat/completions on 127.0.0.1 from c concurrent
     clients (httpx, each sends its next request when the last one returns);
  4. direct and served alternate for --rounds rounds per level (the CPUs are shared with other
     jobs: interleaving spreads their noise over both), latencies pooled over the rounds;
  5. print p50/p99 latency and requests/s at 1, 8 and 32 clients, and the overhead ratio
     (direct requests/s / served requests/s); write bench/results/serve.json.

    python bench/serve.py [--engine hf|vllm] [--max-tokens 16] [--requests 32 96 192] [--rounds 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import tempfile
import time

from rise_ray.config import load_config
from rise_ray.demo.tiny import build_tiny_model
from rise_ray.envs import get_env
from rise_ray.files import atomic_write_json
from rise_ray.rollout import make_engine
from rise_ray.rollout.engine import SamplingParams

CLIENTS = (1, 8, 32)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    return {
        "requests": len(latencies_s),
        "p50_ms": round(1000 * percentile(latencies_s, 50), 2),
        "p99_ms": round(1000 * percentile(latencies_s, 99), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies_s), 2),
        "requests_per_s": round(len(latencies_s) / wall_s, 2),
        "wall_s": round(wall_s, 3),
    }


def run_direct(engine, convs: list, clients: int, params: SamplingParams) -> tuple[list[float], float]:
    """(latencies, wall seconds)."""
    latencies: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(convs), clients):
        wave = convs[i : i + clients]
        t = time.perf_counter()
        engine.generate(wave, 1, params)
        latencies += [time.perf_counter() - t] * len(wave)
    return latencies, time.perf_counter() - start


async def run_served(
    url: str, model: str, convs: list, clients: int, max_tokens: int, deadline_s: float
) -> tuple[list[float], float]:
    """(latencies, wall seconds); any status but 200 is an error."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                conv = queue.get_nowait()
                body = {"model": model, "messages": conv, "max_tokens": max_tokens, "temperature": 1.0}
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), deadline_s)
        wall = time.perf_counter() - start
    if codes != {200: len(convs)}:
        raise RuntimeError(f"{clients} clients: expected only 200s, got {codes}")
    return latencies, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, nargs=3, default=[32, 96, 192], help="requests at 1, 8, 32 clients")
    ap.add_argument("--rounds", type=int, default=2, help="direct/served rounds per level, alternating")
    ap.add_argument("--deadline-s", type=float, default=300, help="per served round")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serve.json"))
    ap.add_argument("overrides", nargs="*", help="config key=value, e.g. serve.batch_wait_timeout_s=0.01")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the replica gets one CPU (one torch thread): so does the direct engine
    cfg = load_config(
        overrides=[
            f"serve.engine={args.engine}",
            "serve.model_name=tiny",
            "serve.num_cpus_per_replica=1",
            "serve.max_ongoing_requests=64",
            "serve.max_queued_requests=-1",  # measure latency, never reject
            "serve.max_batch_size=32",
            f"serve.max_tokens_limit={args.max_tokens}",
            "model.max_model_len=512",
            *args.overrides,
        ]
    )
    model_dir = build_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), **cfg.model.tiny.model_dump())
    env = get_env("search", num_train=0, num_test=max(args.requests))
    convs = [env.first_prompt(p) for p in env.test]
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    levels = dict(zip(CLIENTS, args.requests, strict=True))

    import ray
    from ray import serve

    from rise_ray.serve.app import serve_command
    from rise_ray.session import engine_kwargs

    os.environ.pop(cfg.serve.token_env, None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    engine = None
    try:
        t = time.perf_counter()
        url = serve_command(model_dir, cfg, "127.0.0.1", free_port(), blocking=False)
        startup_s = time.perf_counter() - t
        rollout = cfg.rollout.model_copy(update={"engine": args.engine})
        engine = make_engine(args.engine, model_dir, **engine_kwargs(rollout, cfg.model, cfg.seed, model_path=model_dir))
        engine.generate(convs[:8], 1, params)  # warm up both
        asyncio.run(run_served(url, "tiny", convs[:16], 8, args.max_tokens, args.deadline_s))
        raw: dict[str, dict[int, list]] = {"direct": {c: [] for c in CLIENTS}, "served": {c: [] for c in CLIENTS}}
        for c, n in levels.items():
            for _ in range(args.rounds):
                raw["direct"][c].append(run_direct(engine, convs[:n], c, params))
                raw["served"][c].append(
                    asyncio.run(run_served(url, "tiny", convs[:n], c, args.max_tokens, args.deadline_s))
                )
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()
        serve.shutdown()
        ray.shutdown()

    def pooled(rounds: list[tuple[list[float], float]]) -> dict[str, float]:
        return summary([x for lat, _ in rounds for x in lat], sum(wall for _, wall in rounds))

    direct = {c: pooled(raw["direct"][c]) for c in CLIENTS}
    served = {c: pooled(raw["served"][c]) for c in CLIENTS}

    print(f"engine={args.engine} max_tokens={args.max_tokens} (app start-up {startup_s:.1f} s)")
    print(f"{'clients':>7} | {'served p50/p99 ms':>18} {'req/s':>7} | {'direct p50/p99 ms':>18} {'req/s':>7} | overhead")
    ratios = {}
    for c in CLIENTS:
        s, d = served[c], direct[c]
        ratios[c] = round(d["requests_per_s"] / s["requests_per_s"], 3)
        print(
            f"{c:>7} | {s['p50_ms']:>8.1f} /{s['p99_ms']:>8.1f} {s['requests_per_s']:>7.1f} | "
            f"{d['p50_ms']:>8.1f} /{d['p99_ms']:>8.1f} {d['requests_per_s']:>7.1f} | {ratios[c]:.2f}x"
        )
    result = {
        "engine": args.engine,
        "max_tokens": args.max_tokens,
        "overhead_vs_direct": ratios[8],  # direct req/s / served req/s at 8 clients (>1: serving costs)
        "p99_ms_c32": served[32]["p99_ms"],
        "overhead_by_clients": {str(c): ratios[c] for c in CLIENTS},
        "served": {str(c): served[c] for c in CLIENTS},
        "direct": {str(c): direct[c] for c in CLIENTS},
        "startup_s": round(startup_s, 1),
        "rounds": args.rounds,
        "overrides": args.overrides,
        "setup": {
            "model": "rise_ray.demo.tiny (random Llama, char tokenizer), default config dims",
            "requests": "search questions, temperature 1, unseeded, n=1",
            "direct": "engine.generate in waves of `clients` conversations, in-process, no HTTP",
            "served": "httpx clients -> Serve proxy -> 1 replica (1 CPU), @serve.batch up to 32",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "torch_threads": 1,
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns worker processes: keep module import side-effect free
    main()
