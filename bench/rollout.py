"""Rollout throughput, measured side by side in one run on the same tiny model and workload.

Steps:
  1. build the tiny model; start a RolloutPool with one engine actor, then one engine in this
     process (after ray.init, so the actor's environment is the one `rise run` gives it);
  2. --repeats times, in turn: "direct" (run_episodes on the in-process engine, all problems in
     one batch), "pipeline" (the same episodes through Ray Data and the persistent actor) and
     "sequential" (one request at a time, the way the paper's code calls its FastChat worker; on a
     subset, since only the rate matters); the best time of each counts, since the machine's noise
     only ever adds time;
     With --engine vllm, also "async": the same episodes on the same in-process engine, each
     advancing on its own (EpisodeSpec.schedule="async": its next turn joins the running batch as
     soon as its reply is graded) against "direct"'s turn-synchronous waves (async_vs_waves);
  3. print generated tokens/s and the ratios; write bench/results/rollout.json.

    python bench/rollout.py [--engine vllm|hf] [--problems 256] [--turns 3] [--n 4] [--repeats 2]
    python bench/rollout.py --model smollm2-135m-instruct --problems 32 --max-tokens 128 --max-model-len 2048
    python bench/rollout.py --turns 5 --max-tokens 128 --n 1   # async_vs_waves: varied reply lengths
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from rise_ray.demo.tiny import build_tiny_model
from rise_ray.envs import get_env
from rise_ray.files import atomic_write_json
from rise_ray.models.source import get_model
from rise_ray.rollout import make_engine
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes
from rise_ray.rollout.pool import RolloutPool


def generated_tokens(trajs, tokenizer) -> int:
    return sum(len(tokenizer(c)["input_ids"]) for t in trajs for turn in t.turns for c in turn.candidates)


class OneRequestAtATime:
    """The engine driven the way the paper's code drives its worker: one request per sample."""

    def __init__(self, engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len

    def prompt_len(self, conversation):
        return self.engine.prompt_len(conversation)

    def generate(self, convs, n, params):
        return [[self.engine.generate([c], 1, params)[0][0] for _ in range(n)] for c in convs]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--sequential-problems", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--n", type=int, default=4, help="samples at turn 1")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three modes; the best of each counts")
    ap.add_argument("--batch-size", type=int, default=0, help="Ray Data batch (0: all problems in one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPUs for the engine, both ways")
    ap.add_argument("--model", help="a model source (smollm2-135m-instruct, a directory, a .gguf) instead of the tiny "
                    "model; its problems come from --data (GSM8K JSONL); writes results/rollout_<name>.json")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k",
                                                   "test.jsonl"))
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()
    suffix = f"_{args.model.rstrip('/').split('/')[-1].split('-')[0]}" if args.model else ""
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"rollout{suffix}.json")

    import ray
    import torch
    from transformers import AutoTokenizer

    # Ray gives an actor holding N CPUs N torch/OpenMP threads: the in-process engine gets the
    # same, or the comparison measures thread settings instead of the pipeline.
    torch.set_num_threads(args.threads)
    if args.model:
        model_dir = get_model(args.model)
        env = get_env("gsm8k", test_path=args.data, num_test=args.problems)
    else:
        model_dir = build_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"))
        env = get_env("arithmetic", num_train=0, num_test=args.problems)
    tok = AutoTokenizer.from_pretrained(model_dir)
    problems = env.test
    spec = EpisodeSpec(turns=args.turns, params=SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0),
                       first_n=args.n, later_n=1, choose="first", oracle=False)
    kw = {"max_model_len": args.max_model_len}

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    pool = RolloutPool(args.engine, model_dir, num_engines=1, num_cpus=args.threads, engine_kwargs=kw)
    batch = args.batch_size or len(problems)
    env_opts = {}  # the env's defaults: what get_env gave this process
    pool.run(env.name, env_opts, problems[:8], spec, batch_size=8)  # warm up the actor and Ray Data
    engine = make_engine(args.engine, model_dir, **kw)  # idle while the actor runs, and vice versa
    run_episodes(engine, env, problems[:8], spec)  # warm up
    async_spec = EpisodeSpec(**{**spec.__dict__, "schedule": "async"}) if args.engine == "vllm" else None

    seq_problems = problems[: args.sequential_problems]
    best = {"direct": float("inf"), "pipeline": float("inf"), "sequential": float("inf")}
    for r in range(args.repeats):
        direct, t = timed(lambda: run_episodes(engine, env, problems, spec))
        best["direct"] = min(best["direct"], t)
        piped, t = timed(lambda: pool.run(env.name, env_opts, problems, spec, batch_size=batch))
        best["pipeline"] = min(best["pipeline"], t)
        sequential, t = timed(lambda: run_episodes(OneRequestAtATime(engine), env, seq_problems, spec))
        best["sequential"] = min(best["sequential"], t)
        if async_spec is not None:
            each, t = timed(lambda: run_episodes(engine, env, problems, async_spec))
            best["async"] = min(best.get("async", float("inf")), t)
        print(f"repeat {r + 1}/{args.repeats}, best so far: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), flush=True)
    ray.shutdown()

    rate = {
        "direct": generated_tokens(direct, tok) / best["direct"],
        "pipeline": generated_tokens(piped, tok) / best["pipeline"],
        "sequential": generated_tokens(sequential, tok) / best["sequential"],
    }
    if async_spec is not None:
        rate["async"] = generated_tokens(each, tok) / best["async"]
    result = {
        "engine": args.engine,
        "model": args.model or "rise_ray.demo.tiny",
        "problems": len(problems),
        "turns": args.turns,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "ray_data_batch": batch,
        "engine_threads": args.threads,
        "repeats": args.repeats,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "overhead_vs_direct": round(rate["direct"] / rate["pipeline"], 3),
        "speedup_vs_sequential": round(rate["pipeline"] / rate["sequential"], 1),
    }
    if "async" in rate:  # episodes on their own (continuous batching) / turn-synchronous waves
        result["async_vs_waves"] = round(rate["async"] / rate["direct"], 3)
    print(f"{'mode':<12}{'tokens/s':>12}{'seconds':>10}")
    for k in rate:
        print(f"{k:<12}{rate[k]:>12.0f}{result['seconds'][k]:>10.2f}")
    print(f"overhead vs direct (direct/pipeline tokens/s): {result['overhead_vs_direct']}  (target <= 1.15)")
    print(f"speed-up vs one request at a time:            {result['speedup_vs_sequential']}x  (target >= 20x)")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
