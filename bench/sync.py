"""Weight sync into live engines versus rebuilding them, side by side in one run.

Steps, for the embedded default's tiny model and a larger CPU-sized model (~100M parameters), or
for one real model (--model smollm2-135m-instruct):
  1. build the model and a "trained" copy (perturbed weights) saved as an HF checkpoint;
  2. start a RolloutPool (persistent engine actors) on the base weights;
  3. in place, as the driver syncs: `update_weights(checkpoint_dir)` (engines on this node read
     the checkpoint's files), then check logprobs against the checkpoint; beside it the route
     engines on other nodes take (the state dict once through the object store);
  4. rebuild: kill the engines and start new ones from the checkpoint (what a loop without
     in-place sync does every iteration), until they answer;
  5. print both times and the ratio; write bench/results/sync.json.

    python bench/sync.py [--engine vllm|hf] [--repeats 3] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

CPU_100M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072}


def models() -> dict[str, dict]:
    """The embedded default's tiny model (its shape read from the default config) and ~100M."""
    from rise_ray.config import load_config

    tiny = load_config(None).model.tiny.model_dump(exclude={"max_position_embeddings", "seed"})
    return {"default_tiny": tiny, "cpu_100m": CPU_100M}


def make_checkpoints(name: str, sizes: dict | str, root: str) -> tuple[str, str, int]:
    """(base, trained, parameters): sizes builds a tiny-model shape; a str is a model source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rise_ray.demo.tiny import build_tiny_model
    from rise_ray.models.source import get_model

    if isinstance(sizes, str):
        base = get_model(sizes)
    else:
        base = build_tiny_model(os.path.join(root, name, "base"), **sizes)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trained = os.path.join(root, name, "trained")
    model.save_pretrained(trained)
    AutoTokenizer.from_pretrained(base).save_pretrained(trained)
    return base, trained, sum(p.numel() for p in model.parameters())


def bench_model(engine: str, base: str, trained: str, repeats: int) -> dict:
    from rise_ray.rollout.pool import RolloutPool
    from rise_ray.rollout.sync import check_engines, load_state_dict

    kw = {"max_model_len": 512, "dtype": "float32"}
    pool = RolloutPool(engine, base, num_engines=1, num_cpus=1, engine_kwargs=kw)
    in_place, object_store = [], []
    for i in range(repeats):
        start = time.perf_counter()
        pool.update_weights(load_state_dict(trained if i % 2 == 0 else base), f"o{i}")
        object_store.append(time.perf_counter() - start)
        in_place.append(pool.update_weights(base if i % 2 == 0 else trained, f"v{i}"))
    pool.update_weights(trained, "final")
    err = check_engines(pool, trained, tolerance=1e-3)["max_logprob_error"]
    rebuild = []
    for _ in range(repeats):
        start = time.perf_counter()
        pool.shutdown()
        pool = RolloutPool(engine, trained, num_engines=1, num_cpus=1, engine_kwargs=kw)  # waits until ready
        rebuild.append(time.perf_counter() - start)
    pool.shutdown()
    return {
        "in_place_s": round(statistics.median(in_place), 3),
        "in_place_object_store_s": round(statistics.median(object_store), 3),
        "rebuild_s": round(statistics.median(rebuild), 3),
        "speedup": round(statistics.median(rebuild) / statistics.median(in_place), 1),
        "max_logprob_error": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="a model source (smollm2-135m-instruct, a directory, a .gguf) instead of the "
                    "built-in shapes; writes results/sync_<name>.json")
    ap.add_argument("--out")
    args = ap.parse_args()
    shapes = {args.model.rstrip("/").split("/")[-1]: args.model} if args.model else models()
    suffix = f"_{next(iter(shapes)).split('-')[0]}" if args.model else ""
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"sync{suffix}.json")

    import ray

    from rise_ray.files import atomic_write_json

    root = tempfile.mkdtemp(prefix="rise-sync-bench-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {}
    for name, sizes in shapes.items():
        base, trained, params = make_checkpoints(name, sizes, root)
        results[name] = {"parameters": params, **bench_model(args.engine, base, trained, args.repeats)}
    ray.shutdown()
    out = {
        "engine": args.engine,
        "repeats": args.repeats,
        "models": results,
        "sync_speedup_vs_rebuild": results[list(shapes)[-1]]["speedup"],  # the larger (or the given) model
    }
    print(f"{'model':<14}{'params':>12}{'in place (s)':>14}{'object store (s)':>18}{'rebuild (s)':>13}{'speed-up':>10}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['parameters']:>12,}{r['in_place_s']:>14.3f}{r['in_place_object_store_s']:>18.3f}"
            f"{r['rebuild_s']:>13.2f}{r['speedup']:>9.1f}x"
        )
    print("target: in-place sync >= 5x faster than rebuilding, on the larger (or the given) model")
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
