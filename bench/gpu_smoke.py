"""The first GPU run, in one command: does the GPU path of rise work on this machine?

Needs: one or more NVIDIA GPUs and the `gpu` extra (vLLM 0.32.x, its CUDA torch, Ray, DeepSpeed).
No downloads: a random-weight model shaped like Qwen2.5-0.5B (24 layers, hidden 896, 14 heads,
2 KV heads, vocab 151,936) and the embedded default's character tokenizer are built locally, and
HF_HUB_OFFLINE=1 is set. Within ~8 minutes on one GPU it runs:
  1. a colocated `rise run` of one iteration on the `search` task: vLLM engine (bf16, sleep mode)
     and Ray Train + DeepSpeed worker on one GPU, placed together: evaluation and collection
     through the pool (generation), sleep -> train -> CUDA IPC sync -> wake, and the weight-sync
     check against the fp32 reference (bf16 tolerance; whether training moved the probe enough
     to tell a no-op sync from rounding is recorded as `conclusive`);
  2. with two or more GPUs: an NCCL sync (a sender on its own GPU broadcasting to an engine on
     another) of the trained checkpoint, checked the same way.
It writes what each step took and the check's figures as JSON (bench/results/gpu_smoke.json): for
each bf16 sync check, the measured logprob error beside its bound (`bf16_checks`). It exits non-zero
on the first failure, naming the step.

Every run starts clean: the work directory is emptied first (a finished run left there would
otherwise be resumed, its stages skipped, and nothing tested), unless --keep. Only a directory this
script made (it holds a marker file) or an empty one is emptied.

    python bench/gpu_smoke.py [--out bench/results/gpu_smoke.json] [--work /tmp/rise-gpu-smoke] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback

QWEN_0_5B = dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)  # fmt: skip


MARKER = ".rise-gpu-smoke"  # in a work directory this script made: it may empty it


def prepare_work(work: str, keep: bool) -> str:
    """The work directory, fresh unless `keep`. A non-empty directory without the marker is not
    ours: refused rather than deleted."""
    if os.path.isdir(work) and not keep and os.listdir(work):
        if not os.path.exists(os.path.join(work, MARKER)):
            raise RuntimeError(f"{work} is not empty and was not made by this script: "
                             "pass another --work (or --keep to run in it as it is)")
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    open(os.path.join(work, MARKER), "a").close()
    return work


def check_figures(check: dict) -> dict:
    """A sync check's measured logprob error beside its bound (rise_ray.rollout.sync.check_engines)."""
    err, tol = check.get("max_logprob_error"), check.get("tolerance")
    return {"max_logprob_error": err, "tolerance": tol, "within": None if err is None or tol is None else err <= tol,
            "engine_dtypes": check.get("engine_dtypes"), "max_logit": check.get("max_logit"),
            "conclusive": check.get("conclusive")}  # fmt: skip


def build_model(out: str) -> str:
    """Random Qwen2-shaped weights in bf16 + the character tokenizer (ids below its size are used).
    The final norm is scaled so logits reach a trained model's magnitude (max |logit| ~28), where
    bf16 rounding matters to the check."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rise_ray.demo.tiny import build_tokenizer

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = build_tokenizer()
    cfg = Qwen2Config(**QWEN_0_5B, tie_word_embeddings=True, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


def overrides(model: str, work: str) -> list[str]:
    return [
        f"run_dir={work}", "name=colocated", f"model.path={model}", "model.dtype=bfloat16", "model.max_model_len=512",
        "iterations=1", "warmup.enabled=false", "env.name=search", "env.num_train=64", "env.num_test=32",
        "rollout.engine=vllm", "rollout.num_engines=1", "rollout.num_gpus_per_engine=0.6",
        "rollout.num_cpus_per_engine=1", "rollout.colocate_with_trainer=true", "rollout.gpu_memory_utilization=0.3",
        "rollout.turns=2", "rollout.best_of_n=2", "rollout.max_tokens=32", "rollout.batch_size=32",
        "eval.turns=2", "eval.parallel=2", "eval.max_tokens=32", "eval.batch_size=32",
        "train.use_gpu=true", "train.num_workers=1", "train.cpus_per_worker=1", "train.zero_stage=3",
        "train.micro_batch_size=8", "train.lr=1e-4", "data.max_length=512", "sync.method=auto",
    ]  # fmt: skip


def step(report: dict, name: str, fn):
    print(f"[gpu_smoke] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:
        report["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                 "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        raise
    report["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **(out or {})}
    print(f"[gpu_smoke] {name}: ok in {report['steps'][name]['seconds']} s", flush=True)
    return out


def colocated_run(model: str, work: str) -> dict:
    from rise_ray import driver
    from rise_ray.config import load_config

    cfg = load_config(None, overrides(model, work))
    driver.run(cfg, os.path.join(work, "colocated"))
    with open(os.path.join(work, "colocated", "manifest.json")) as f:
        stages = json.load(f)["stages"]
    sync = stages["iter_1/sync"]["output"]
    if sync["method"] != "ipc":
        raise RuntimeError(f"colocated sync used {sync['method']!r}, expected ipc")
    # sync["check"]["conclusive"] says whether training moved the probe's logprobs clearly past bf16
    # rounding (only then could a no-op sync have been caught); recorded, not required.
    return {"stages": {k: {"seconds": v.get("seconds")} for k, v in stages.items()}, "sync": sync,
            "checkpoint": stages["iter_1/train"]["output"]}  # fmt: skip


def nccl_sync(model: str, checkpoint: str, work: str) -> dict:
    from rise_ray.config import ModelConfig, RolloutConfig
    from rise_ray.rollout.sync import check_engines
    from rise_ray.session import make_pool

    rollout = RolloutConfig(engine="vllm", num_gpus_per_engine=1, num_cpus_per_engine=1, gpu_memory_utilization=0.3)
    pool = make_pool(rollout, ModelConfig(path=model, dtype="bfloat16", max_model_len=512), model, 0,
                     os.path.join(work, "nccl_weights.json"), sync_method="nccl")
    try:
        seconds = pool.sync_native(checkpoint, "nccl-1", "nccl", bucket_bytes=256 * 2**20)
        check = check_engines(pool, checkpoint, previous=model)
    finally:
        pool.shutdown()
    return {"sync_seconds": round(seconds, 2), "check": check}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_smoke.json"))
    ap.add_argument("--work", default="/tmp/rise-gpu-smoke")
    ap.add_argument("--keep", action="store_true", help="reuse the work directory as it is (its model, its run)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    report: dict = {"python": platform.python_version(), "torch": torch.__version__, "steps": {}, "bf16_checks": {}}
    if not torch.cuda.is_available():
        print("[gpu_smoke] no CUDA device: this smoke test is for a GPU machine", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    report.update(gpus=gpus, gpu=torch.cuda.get_device_name(0))
    t0 = time.perf_counter()
    ok = True
    try:
        import ray
        import vllm

        report.update(ray=ray.__version__, vllm=vllm.__version__)
        report.update(work=prepare_work(args.work, args.keep), kept=args.keep)
        model = step(report, "build_model", lambda: {"path": build_model(os.path.join(args.work, "qwen0.5b-shaped"))})
        run = step(report, "colocated_run", lambda: colocated_run(model["path"], args.work))
        if run["sync"].get("check"):
            report["bf16_checks"]["colocated_ipc"] = check_figures(run["sync"]["check"])
        if gpus >= 2:
            nccl = step(report, "nccl_sync", lambda: nccl_sync(model["path"], run["checkpoint"], args.work))
            report["bf16_checks"]["nccl"] = check_figures(nccl["check"])
        else:
            report["steps"]["nccl_sync"] = {"ok": None, "skipped": "one GPU: NCCL needs the sender on a second"}
    except Exception as e:
        ok = False
        print(f"[gpu_smoke] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["ok"] = ok
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"[gpu_smoke] {'ok' if ok else 'FAILED'} in {report['wall_s']} s -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
