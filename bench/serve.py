"""Serving throughput side by side in one run: `rise serve` (Ray Serve LLM), vLLM's own OpenAI
server, and vLLM's engine called directly, on the same model and the same chat requests; and the
solve endpoint of `rise serve` against the one before Ray Serve LLM (--old-ref).

Steps:
  1. the model (--model tiny: built here; else a name for `rise model get`, or a model directory);
     the requests: search questions as chat messages, temperature 1, unseeded, --max-tokens each;
  2. start `rise serve` (Ray Serve LLM: one LLMServer replica, 1 CPU, behind RiseIngress; HAProxy in
     front where Ray finds a binary, serve.proxy=auto), vLLM's own OpenAI server
     (bench/vllm_server.py) and vLLM's AsyncLLM in this process, all with the same engine
     settings: fp32, eager, the same KV-cache bytes, 32-token blocks, whole prefills;
  3. at 1, 8 and 32 closed-loop clients (each sends its next request when its last one returns):
     "rise" and "vllm" over HTTP on 127.0.0.1 (httpx), "direct" as coroutines awaiting AsyncLLM;
     the three alternate for --rounds rounds per level (shared CPUs: interleaving spreads the
     noise), latencies pooled over the rounds;
  4. solve: the old `rise serve` (--old-ref, a git worktree of this repository, serve.engine=vllm)
     is started beside the new one; --solve-requests 3-turn /v1/rise/solve requests at 8 clients
     alternate between the two for --rounds rounds (vLLM server and direct engine stopped first);
  5. print p50/p99 and requests/s; write bench/results/serve.json with vs_vllm_server_c8 and
     vs_vllm_server_c32 (rise req/s / vLLM's, pooled over the rounds; rounds_vs_vllm_server_c*: each
     round's), p99_vs_vllm_server_c32 (rise p99 / vLLM's),
     overhead_vs_direct (direct req/s / rise req/s at 8 clients) and solve_vs_old_c8 (new solve
     req/s / old's).

    python bench/serve.py --model smollm2-135m-instruct [--max-tokens 32] [--requests 16 64 128] [--rounds 2]

At 2 rounds the ratios move by about +-5% from run to run on a 2-core machine; issue 29's results
use --rounds 4 --old-ref '' (docs/history.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from rise_ray.config import load_config
from rise_ray.envs import get_env
from rise_ray.files import atomic_write_json

CLIENTS = (1, 8, 32)
SYSTEMS = ("rise", "vllm", "direct")
HERE = os.path.dirname(os.path.abspath(__file__))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    return {
        "requests": len(latencies_s),
        "p50_ms": round(1000 * percentile(latencies_s, 50), 2),
        "p99_ms": round(1000 * percentile(latencies_s, 99), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies_s), 2),
        "requests_per_s": round(len(latencies_s) / wall_s, 3),
        "wall_s": round(wall_s, 3),
    }


async def closed_loop(send, convs: list, clients: int) -> tuple[list[float], float]:
    """`clients` workers, each awaiting send(conv) for its next request; (latencies, wall s)."""
    queue: asyncio.Queue = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    latencies: list[float] = []

    async def worker() -> None:
        while not queue.empty():
            conv = queue.get_nowait()
            t = time.perf_counter()
            await send(conv)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, time.perf_counter() - start


async def run_http(url: str, model: str, convs: list, clients: int, max_tokens: int, deadline_s: float):
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s, limits=limits) as client:

        async def send(conv: list) -> None:
            body = {"model": model, "messages": conv, "max_tokens": max_tokens, "temperature": 1.0}
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")

        return await asyncio.wait_for(closed_loop(send, convs, clients), deadline_s)


class DirectEngine:
    """vLLM's AsyncLLM in this process, on an event loop of its own that every round reuses (its
    output handler lives on the loop that first used it)."""

    def __init__(self, model_dir: str, max_model_len: int, kv_bytes: int, seed: int) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.loop = asyncio.new_event_loop()
        args = AsyncEngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                               kv_cache_memory_bytes=kv_bytes, block_size=32, enable_chunked_prefill=False, seed=seed)

        async def make() -> AsyncLLM:
            return AsyncLLM.from_engine_args(args)

        self.llm = self.loop.run_until_complete(make())

    def run(self, convs: list, clients: int, max_tokens: int):
        import uuid

        from vllm import SamplingParams as VllmParams

        params = VllmParams(temperature=1.0, max_tokens=max_tokens)

        async def send(conv: list) -> None:
            prompt = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            async for _ in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                pass

        return self.loop.run_until_complete(closed_loop(send, convs, clients))

    def close(self) -> None:
        self.llm.shutdown()
        self.loop.close()


async def run_solve(url: str, problems: list[str], clients: int, max_tokens: int, deadline_s: float):
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s, limits=limits) as client:

        async def send(problem: str) -> None:
            body = {"problem": problem, "turns": 3, "max_tokens": max_tokens, "temperature": 1.0}
            r = await client.post("/v1/rise/solve", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")

        return await asyncio.wait_for(closed_loop(send, problems, clients), deadline_s)


def start_old_rise(ref: str, model_dir: str, args: argparse.Namespace, log: str) -> tuple[subprocess.Popen, str, str]:
    """`rise serve` as it was at `ref`, from a git worktree, in a Ray of its own; (proc, url, tree)."""
    tree = tempfile.mkdtemp(prefix="rise-old-serve-")
    subprocess.run(["git", "-C", os.path.dirname(HERE), "worktree", "add", "-f", "--detach", tree, ref], check=True,
                   capture_output=True)
    port = free_port()
    cmd = [sys.executable, "-m", "rise_ray.cli", "serve", model_dir, "--port", str(port), "serve.engine=vllm",
           "serve.model_name=bench", "serve.num_cpus_per_replica=1", "serve.max_ongoing_requests=64",
           "serve.max_queued_requests=-1", f"serve.max_tokens_limit={args.max_tokens}",
           f"model.max_model_len={args.max_model_len}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = tree
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tree, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url + "/healthz", log, f"rise serve at {ref}")
    return proc, url, tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_server(model_dir: str, name: str, max_model_len: int, kv_bytes: int, log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, os.path.join(HERE, "vllm_server.py"), "--model", model_dir, "--served-model-name", name,
           "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
           "--kv-cache-memory-bytes", str(kv_bytes), "--block-size", "32", "--no-enable-chunked-prefill",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url + "/health", log, "vLLM's server")
    return proc, url


def wait_healthy(proc: subprocess.Popen, health_url: str, log: str, what: str, timeout_s: float = 900) -> None:
    """Until health_url answers 200; the server is killed and RuntimeError raised when it exits or
    times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(health_url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{what} did not answer {health_url} within {timeout_s:.0f} s; see {log}")


def model_path(model: str, tiny_dims: dict) -> str:
    if model == "tiny":
        from rise_ray.demo.tiny import build_tiny_model

        return build_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), **tiny_dims)
    if os.path.isdir(model):
        return model
    from rise_ray.models.source import get_model

    return get_model(model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct", help="tiny, a model name, or a directory")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, nargs=3, default=[16, 64, 128], help="requests at 1, 8, 32 clients")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per level, the systems alternating")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--deadline-s", type=float, default=900, help="per round")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    ap.add_argument("--old-ref", default="ce380d4", help="the commit of the old `rise serve` (before Ray Serve LLM); "
                    "'' skips the solve comparison")
    ap.add_argument("--solve-requests", type=int, default=32)
    ap.add_argument("overrides", nargs="*", help="config key=value for rise serve")
    args = ap.parse_args()

    cfg = load_config(overrides=[
        "serve.model_name=bench", "serve.num_cpus_per_replica=1",
        "serve.max_ongoing_requests=64", "serve.max_queued_requests=-1",  # measure latency, never reject
        f"serve.max_tokens_limit={args.max_tokens}", f"model.max_model_len={args.max_model_len}", *args.overrides,
    ])
    model_dir = model_path(args.model, cfg.model.tiny.model_dump())
    env = get_env("search", num_train=0, num_test=max(args.requests))
    convs = [env.first_prompt(p) for p in env.test]
    kv_bytes = cfg.rollout.kv_cache_memory_bytes

    import ray
    from ray import serve

    from rise_ray.serve.deploy import proxy_env, serve_command

    os.environ.pop(cfg.serve.token_env, None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(HERE)}})
    log = os.path.join(tempfile.mkdtemp(), "vllm_server.log")
    vllm_proc, engine, old = None, None, None
    startup: dict[str, float] = {}
    solve_raw: dict[str, list] = {"rise": [], "old": []}
    try:
        t = time.perf_counter()
        rise_url = serve_command({"bench": model_dir}, cfg, "127.0.0.1", free_port(), blocking=False)
        startup["rise"] = time.perf_counter() - t
        t = time.perf_counter()
        vllm_proc, vllm_url = start_vllm_server(model_dir, "bench", args.max_model_len, kv_bytes, log)
        startup["vllm"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = DirectEngine(model_dir, args.max_model_len, kv_bytes, cfg.seed)
        startup["direct"] = time.perf_counter() - t

        def once(system: str, c: int, n: int):
            if system == "direct":
                return engine.run(convs[:n], c, args.max_tokens)
            url = rise_url if system == "rise" else vllm_url
            return asyncio.run(run_http(url, "bench", convs[:n], c, args.max_tokens, args.deadline_s))

        for system in SYSTEMS:  # warm up each
            once(system, 4, 8)
        raw: dict[str, dict[int, list]] = {s: {c: [] for c in CLIENTS} for s in SYSTEMS}
        for c, n in zip(CLIENTS, args.requests, strict=True):
            for _ in range(args.rounds):
                for system in SYSTEMS:
                    raw[system][c].append(once(system, c, n))
        engine.close()
        engine = None
        vllm_proc.terminate()
        vllm_proc.wait(60)
        vllm_proc = None
        if args.old_ref:
            t = time.perf_counter()
            old = start_old_rise(args.old_ref, model_dir, args, os.path.join(os.path.dirname(log), "old_rise.log"))
            startup["old"] = time.perf_counter() - t
            problems = [p.question for p in env.test[: args.solve_requests]]
            for url in (rise_url, old[1]):  # warm up each
                asyncio.run(run_solve(url, problems[:4], 4, args.max_tokens, args.deadline_s))
            for _ in range(args.rounds):
                for name, url in (("rise", rise_url), ("old", old[1])):
                    solve_raw[name].append(asyncio.run(run_solve(url, problems, 8, args.max_tokens, args.deadline_s)))
    finally:
        if engine is not None:
            engine.close()
        if vllm_proc is not None:
            vllm_proc.terminate()
            vllm_proc.wait(60)
        if old is not None:
            old[0].terminate()
            old[0].wait(120)
            subprocess.run(["git", "-C", os.path.dirname(HERE), "worktree", "remove", "--force", old[2]], check=False)
        serve.shutdown()
        ray.shutdown()

    def pooled(rounds: list) -> dict[str, float]:
        return summary([x for lat, _ in rounds for x in lat], sum(wall for _, wall in rounds))

    res = {s: {c: pooled(raw[s][c]) for c in CLIENTS} for s in SYSTEMS}
    print(f"model={args.model} max_tokens={args.max_tokens} start-up s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in startup.items()))
    print(f"{'clients':>7} | " + " | ".join(f"{s + ' p50/p99 ms':>20} {'req/s':>6}" for s in SYSTEMS))
    for c in CLIENTS:
        print(f"{c:>7} | " + " | ".join(
            f"{res[s][c]['p50_ms']:>9.0f} /{res[s][c]['p99_ms']:>9.0f} {res[s][c]['requests_per_s']:>6.2f}" for s in SYSTEMS))

    def rps(s: str, c: int) -> float:
        return res[s][c]["requests_per_s"]

    solve = {k: pooled(v) for k, v in solve_raw.items() if v}
    if solve:
        print("solve (3 turns, 8 clients): " + ", ".join(
            f"{k} p50 {v['p50_ms']:.0f} ms, {v['requests_per_s']:.2f} req/s" for k, v in solve.items()))

    proxy = "HAProxy" if proxy_env(cfg.serve.proxy) else "Ray Serve's proxy"  # serve.proxy, as rise serve resolved it
    result = {
        "model": args.model,
        "proxy": proxy,
        "max_tokens": args.max_tokens,
        "vs_vllm_server_c8": round(rps("rise", 8) / rps("vllm", 8), 3),
        "vs_vllm_server_c32": round(rps("rise", 32) / rps("vllm", 32), 3),
        "p99_vs_vllm_server_c32": round(res["rise"][32]["p99_ms"] / res["vllm"][32]["p99_ms"], 3),
        "overhead_vs_direct": round(rps("direct", 8) / rps("rise", 8), 3),
        # the same ratios round by round (each round: the systems back to back): the spread is the noise
        **{f"rounds_vs_vllm_server_c{c}": [round(len(r[0]) / r[1] / (len(v[0]) / v[1]), 3)
                                           for r, v in zip(raw["rise"][c], raw["vllm"][c], strict=True)]
           for c in (8, 32)},
        "solve_vs_old_c8": round(solve["rise"]["requests_per_s"] / solve["old"]["requests_per_s"], 3) if solve else None,
        "solve": solve,
        "old_ref": args.old_ref,
        **{s: {str(c): res[s][c] for c in CLIENTS} for s in SYSTEMS},
        "startup_s": {k: round(v, 1) for k, v in startup.items()},
        "rounds": args.rounds,
        "overrides": args.overrides,
        "setup": {
            "requests": "search questions as chat messages, temperature 1, unseeded, n=1, closed-loop clients",
            "rise": f"httpx -> {proxy} -> RiseIngress (Ray Serve LLM's OpenAiIngress) -> LLMServer (1 CPU), "
                    "vLLM's serving code",
            "vllm": "httpx -> vllm.entrypoints.openai.api_server (same engine settings)",
            "direct": "vllm AsyncLLM.generate in this process, no HTTP",
            "solve": "/v1/rise/solve, 3 turns, temperature 1, 8 closed-loop clients; old = rise serve at old_ref",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns worker processes: keep module import side-effect free
    main()
