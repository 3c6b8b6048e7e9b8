"""A quick task probe for a model on the arithmetic env's validation split: how often the first
answer is right, how often it cannot be read, how long replies run.

Steps:
  1. the model's engine (vLLM, the same engine arguments a run uses);
  2. for each variant (env options as JSON: task, ranges, system_prompt; optional max_tokens): the
     first prompt of --problems validation problems, --samples samples each at --temperature;
  3. grade every sample with the env's grader; print one JSON line per variant.

    python bench/task_probe.py '[{"env": {"task": "mul", "a_range": [2, 9], "b_range": [2, 9],
        "system_prompt": "Put your final answer in \\\\boxed{}."}}]' --problems 40
"""

from __future__ import annotations

import argparse
import json
import time

from rise_ray.envs import get_env
from rise_ray.models.source import get_model
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.vllm import VLLMEngine, vllm_engine_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", help="JSON list of {env: {...arithmetic options}, max_tokens?: int}")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    path = get_model(args.model)
    engine_args = vllm_engine_args(path, max_model_len=1024, kv_cache_memory_bytes=4 << 30)
    engine_args.pop("model")
    engine = VLLMEngine(path, **engine_args)
    for v in json.loads(args.variants):
        env = get_env("arithmetic", num_train=0, num_test=0, num_val=args.problems, **v["env"])
        params = SamplingParams(temperature=args.temperature, max_tokens=v.get("max_tokens", 96), seed=0)
        t0 = time.time()
        outs = engine.generate([env.first_prompt(p) for p in env.val], args.samples, params)
        grades = [(env.grade(c.text, p.reference), len(c.token_ids)) for p, cands in zip(env.val, outs, strict=True)
                  for c in cands]
        n = len(grades)
        print(json.dumps({"variant": v, "right": round(sum(g.correct for g, _ in grades) / n, 3),
                          "unreadable": round(sum(g.answer is None for g, _ in grades) / n, 3),
                          "tokens_per_reply": round(sum(k for _, k in grades) / n, 1),
                          "seconds": round(time.time() - t0, 1), "examples": [o[0].text for o in outs[:3]]}), flush=True)


if __name__ == "__main__":
    main()
