"""Benchmark: `packed` vs `prefix` layouts, and our Ray Train + DeepSpeed loop vs transformers' Trainer.

One run, the same 5-turn trajectories and the tiny model, on this machine's CPUs:
  1. build the training set in both layouts (same examples, same weights, same loss);
  2. train each layout with our loop (Ray Train, 1 worker, DeepSpeed ZeRO-0, fp32); both get the
     same optimizer steps, each step holding about the same number of prefix examples (the
     prefix micro-batch has `examples per packed row` times more rows);
  3. train the packed set with a plain transformers `Trainer` (same batch, lr, schedule, loss) and
     compare tokens/s with our loop's on the same data.
Tokens are input tokens through forward + backward (padding excluded); wall is the training loop
(steps, data fetching included; start-up excluded, reported separately). Both loops use the same
CPU threads (--threads), the same CPU priority, and a fresh process per repeat (ours: a new Ray
Train worker; HF: a spawned process). The machine may be shared, so the three runs are repeated back to back
(--repeats) and each ratio is the median of the per-repeat ratios; throughput is the median
per-step tokens/s (steady state), with the whole-loop ratio reported beside it.

    python bench/train.py                      # writes bench/results/train.json
    python bench/train.py --trajectories 64    # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.json")


def build_sets(work: str, model: str, n: int, turns: int, seed: int) -> dict[str, str]:
    from rise_ray.config import DataConfig
    from rise_ray.data.builder import build_dataset
    from rise_ray.envs.base import Env
    from tests.synthetic import arithmetic_trajectories  # hand-made trajectories (test helpers)

    trajs = arithmetic_trajectories(n, turns=turns, seed=seed, solve_last=0.5)
    assert all(len(t.turns) == turns for t in trajs)
    env = Env()  # the default feedback, question repeated (the paper's prompt)
    out = {}
    for layout in ("packed", "prefix"):
        out[layout] = os.path.join(work, f"data-{layout}")
        build_dataset(trajs, env, model, DataConfig(layout=layout, seed=seed), out[layout])
    return out


def run_ours(work: str, model: str, data: str, name: str, micro: int, epochs: int, cpus: int) -> dict[str, Any]:
    from rise_ray.config import load_config
    from rise_ray.train.loop import read_log
    from rise_ray.train.trainer import train

    cfg = load_config(
        None,
        [
            f"train.micro_batch_size={micro}",
            f"train.epochs={epochs}",
            f"train.cpus_per_worker={cpus}",
            "train.lr=1e-3",
            "train.log_every_steps=1",
        ],
    )
    out = os.path.join(work, f"ours-{name}")
    t0 = time.perf_counter()
    train(cfg, data, model, out)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "train_summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    recs = read_log(os.path.join(out, "train_log.jsonl"))
    return {
        "step_tokens_per_s": steady_rate([r["tokens"] for r in recs], [r["step_time_s"] for r in recs]),
        "steps": s["steps"],
        "tokens": s["tokens"],
        "padded_tokens": s["padded_tokens"],
        "train_time_s": s["train_time_s"],
        "tokens_per_s": s["tokens_per_s"],
        "end_to_end_s": round(wall, 2),
        "first_loss": s["first_loss"],
        "last_loss": s["last_loss"],
        "model": os.path.join(out, "model"),
    }


def run_hf_trainer(work: str, model_path: str, data: str, micro: int, epochs: int, threads: int) -> dict[str, Any]:
    """transformers.Trainer on the same rows, the same loss (sum w x CE / units per batch) written
    as a Trainer user writes it (the model's logits at every position, then the weighted CE; ours
    projects to the vocabulary only at trained positions), the same number of CPU threads as our
    worker."""
    import torch

    import rise_ray  # noqa: F401  (first: in a fresh process it hides the CUDA-built torchvision from transformers)

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from rise_ray.data.builder import read_rows
    from rise_ray.train.loop import collate, plan_steps

    rows = read_rows(data)
    counted: dict[str, Any] = {"tokens": 0, "per_batch": []}

    def collator(batch: list[dict]) -> dict:
        b = collate(
            {k: [r[k] for r in batch] for k in ("input_ids", "weights", "units")},
            pad_id=0,
            device="cpu",
        )
        counted["tokens"] += b["tokens"]
        counted["per_batch"].append(b["tokens"])
        return {
            "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"],
            "weights": b["weights"],
            "units": torch.tensor(b["units"]),
        }

    class WeightedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            units = inputs.pop("units").sum()
            ids, w = inputs["input_ids"], inputs["weights"][:, 1:]
            logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (ce * w).sum() / units
            return (loss, None) if return_outputs else loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

    plan = plan_steps(
        len(rows),
        {"num_workers": 1, "micro_batch_size": micro, "grad_accum": 1, "epochs": epochs, "warmup_ratio": 0.04},
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=os.path.join(work, "hf"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=plan.warmup_steps,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    clock = Clock()
    trainer = WeightedTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[clock])
    trainer.train()
    dt = clock.t1 - clock.t0
    step_times = [b - a for a, b in zip([clock.t0, *clock.ends[:-1]], clock.ends, strict=True)]
    return {
        "step_tokens_per_s": steady_rate(counted["per_batch"], step_times),
        "steps": trainer.state.global_step,
        "tokens": counted["tokens"],
        "train_time_s": round(dt, 3),
        "tokens_per_s": counted["tokens"] / dt,
    }


def steady_rate(tokens: list[int], seconds: list[float]) -> float:
    """Median of per-step tokens/s, the first (warm-up) step left out: robust to the bursts of
    load a shared machine adds to some steps."""
    rates = sorted(t / s for t, s in zip(tokens[1:], seconds[1:], strict=True) if s > 0)
    if not rates:
        return float("nan")
    mid = len(rates) // 2
    return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def median(xs: list[float]) -> float:
    return steady_rate([0, *xs], [1.0] * (len(xs) + 1)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=192)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (= Ray CPUs) per trainer, both loops")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; ratios are medians over them")
    ap.add_argument("--model", help="a model source (smollm2-135m-instruct, a directory, a .gguf) instead of the tiny "
                    "model; writes results/train_<name>.json")
    ap.add_argument("--out")
    ns = ap.parse_args()
    ns.out = ns.out or (RESULTS.replace("train.json", f"train_{ns.model.rstrip('/').split('/')[-1].split('-')[0]}.json")
                        if ns.model else RESULTS)

    import ray

    from rise_ray.data.builder import read_stats
    from rise_ray.demo.tiny import build_tiny_model
    from rise_ray.train.loop import setup_environment

    setup_environment(use_gpu=False)
    cpus = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="rise-bench-train-")
    try:
        if ns.model:
            from rise_ray.models.source import get_model

            model = get_model(ns.model)
        else:
            model = build_tiny_model(os.path.join(work, "tiny"))
        sets = build_sets(work, model, ns.trajectories, ns.turns, ns.seed)
        stats = {k: read_stats(v) for k, v in sets.items()}
        per_row = stats["packed"]["examples"] / stats["packed"]["rows"]
        prefix_micro = max(1, round(ns.micro_batch * per_row))

        # Interleaved repeats (this machine's CPUs are shared, so single runs are noisy): each repeat
        # runs the three back to back, and the ratios are medians over repeats of paired ratios.
        # Ray starts its workers niced (worker_niceness 15): on a machine with any other load our
        # loop would lose CPU to the HF Trainer in this (un-niced) driver. Same priority for both.
        os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray reads this exact name)
        ray.init(address="local", num_cpus=max(2, cpus, ns.threads), include_dashboard=False, log_to_driver=False)
        runs: dict[str, list[dict[str, Any]]] = {"hf": [], "packed": [], "prefix": []}
        for r in range(ns.repeats):
            # HF Trainer in a fresh process each repeat, as ours gets a fresh Ray Train worker: a
            # second Trainer in this process would start with its allocator and thread pools warm.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                args = (work, model, sets["packed"], ns.micro_batch, ns.epochs, ns.threads)
                runs["hf"].append(pool.submit(run_hf_trainer, *args).result())
            for layout, micro in (("packed", ns.micro_batch), ("prefix", prefix_micro)):
                runs[layout].append(
                    run_ours(work, model, sets[layout], f"{layout}-{r}", micro, ns.epochs, ns.threads)
                )
            print(
                f"[bench] repeat {r + 1}/{ns.repeats}: steady tokens/s ours {runs['packed'][-1]['step_tokens_per_s']:,.0f}"
                f" HF {runs['hf'][-1]['step_tokens_per_s']:,.0f}; whole loop ours "
                f"{runs['packed'][-1]['tokens_per_s']:,.0f} HF {runs['hf'][-1]['tokens_per_s']:,.0f}; "
                f"train s packed {runs['packed'][-1]['train_time_s']:.2f} prefix {runs['prefix'][-1]['train_time_s']:.2f}",
                flush=True,
            )
        ray.shutdown()
        pairs = list(zip(runs["packed"], runs["prefix"], runs["hf"], strict=True))
        p, q = runs["packed"][0], runs["prefix"][0]  # token counts are the same in every repeat
        result = {
            "packed_token_reduction": q["tokens"] / p["tokens"],
            "packed_wall_speedup": median([b["train_time_s"] / a["train_time_s"] for a, b, _ in pairs]),
            "vs_hf_trainer_throughput": median([a["step_tokens_per_s"] / h["step_tokens_per_s"] for a, _, h in pairs]),
            "vs_hf_trainer_throughput_whole_loop": median([a["tokens_per_s"] / h["tokens_per_s"] for a, _, h in pairs]),
            "packed_padded_token_reduction": q["padded_tokens"] / p["padded_tokens"],
            "setup": {
                "trajectories": ns.trajectories,
                "turns": ns.turns,
                "model": ns.model or "rise_ray.demo.tiny (Llama, tiny tokenizer)",
                "epochs": ns.epochs,
                "micro_batch_rows": {"packed": ns.micro_batch, "prefix": prefix_micro},
                "workers": 1,
                "cpu_threads_per_trainer": ns.threads,
                "machine_cpus": cpus,
                "zero_stage": 0,
                "dtype": "float32",
                "tokens": "input tokens through forward+backward, padding excluded (padded_tokens: with it)",
                "wall": "training loop (steps incl. data fetching); start-up in end_to_end_s",
                "repeats": ns.repeats,
                "aggregate": "median over interleaved repeats of the paired ratios",
                "vs_hf_trainer_throughput": "median per-step tokens/s (first step excluded), ours / HF Trainer",
                "vs_hf_trainer_throughput_whole_loop": "total tokens / total loop time, ours / HF Trainer",
            },
            "data": {
                k: {f: s[f] for f in ("rows", "examples", "input_tokens", "trained_tokens")} for k, s in stats.items()
            },
            "runs": {
                k: [{f: x[f] for f in x if f != "model"} for x in v] for k, v in runs.items()
            },
        }
        def med(layout: str, field: str) -> float:
            return median([r[field] for r in runs[layout]])

        print()
        print(f"median of {ns.repeats} interleaved repeats")
        print(f"{'':26s}{'packed':>14s}{'prefix':>14s}{'prefix/packed':>15s}")
        print(f"{'rows':26s}{stats['packed']['rows']:>14d}{stats['prefix']['rows']:>14d}")
        print(f"{'optimizer steps':26s}{p['steps']:>14d}{q['steps']:>14d}")
        print(f"{'loss tokens':26s}{stats['packed']['trained_tokens']:>14,d}{stats['prefix']['trained_tokens']:>14,d}")
        print(f"{'tokens trained':26s}{p['tokens']:>14,d}{q['tokens']:>14,d}{result['packed_token_reduction']:>14.2f}x")
        print(
            f"{'  with padding':26s}{p['padded_tokens']:>14,d}{q['padded_tokens']:>14,d}"
            f"{result['packed_padded_token_reduction']:>14.2f}x"
        )
        print(
            f"{'train loop wall (s)':26s}{med('packed', 'train_time_s'):>14.2f}{med('prefix', 'train_time_s'):>14.2f}"
            f"{result['packed_wall_speedup']:>14.2f}x"
        )
        print(f"{'end-to-end wall (s)':26s}{med('packed', 'end_to_end_s'):>14.2f}{med('prefix', 'end_to_end_s'):>14.2f}")
        print()
        print(f"{'tokens/s on packed data':26s}{'ours':>14s}{'HF Trainer':>14s}{'ours/HF':>15s}")
        print(
            f"{'  steady (median step)':26s}{med('packed', 'step_tokens_per_s'):>14,.0f}"
            f"{med('hf', 'step_tokens_per_s'):>14,.0f}{result['vs_hf_trainer_throughput']:>14.2f}x"
        )
        print(
            f"{'  whole loop':26s}{med('packed', 'tokens_per_s'):>14,.0f}{med('hf', 'tokens_per_s'):>14,.0f}"
            f"{result['vs_hf_trainer_throughput_whole_loop']:>14.2f}x"
        )
        from rise_ray.files import atomic_write_json

        atomic_write_json(ns.out, result)
        print(f"\nwrote {ns.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = (
        result["packed_token_reduction"] >= 2.5
        and result["packed_wall_speedup"] >= 2.0
        and result["vs_hf_trainer_throughput"] >= 1.0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
