"""How many steps a run takes, and the per-step metrics log (train_log.jsonl) that the trainer's
summary, `rise report` and the benches read.

Rank 0 prints a line per logged step: step, loss, lr, tokens/s, the training time so far and an ETA
(the mean step time so far times the steps left).

The log stays a file written by rank 0 rather than a stream of `ray.train.report` calls: every
report is a barrier across the workers (Ray Train syncs a checkpoint name on each), and a file
can be trimmed to the checkpoint a restarted run resumes from, so each step is recorded once.
The log's name and reader live in rise_ray.observe (TRAIN_LOG_FILE, read_train_log), which reads
it for the run's metrics and sits below the trainer.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from rise_ray.config import TrainConfig
from rise_ray.observe import read_train_log as read_log
from rise_ray.progress import fmt_duration


@dataclass(frozen=True)


class StepPlan:
    rows_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(rows: int, tcfg: TrainConfig | dict[str, Any]) -> StepPlan:
    """Steps a run takes. Ray Train gives each worker rows // num_workers rows (equal shards)."""
    t = tcfg if isinstance(tcfg, TrainConfig) else TrainConfig.model_validate(tcfg)
    per_worker = rows // t.num_workers
    if per_worker < 1:
        raise ValueError(f"train.num_workers={t.num_workers} is more than the {rows} row(s) of the data set")
    mbs = math.ceil(per_worker / t.micro_batch_size)
    spe = math.ceil(mbs / t.grad_accum)
    total = spe * t.epochs
    warmup = math.ceil(t.warmup_ratio * total) if t.warmup_ratio > 0 else 0
    return StepPlan(per_worker, mbs, spe, total, min(warmup, total))


def micro_batches_in_step(plan: StepPlan, step_in_epoch: int, grad_accum: int) -> int:
    return min(grad_accum, plan.micro_batches_per_epoch - step_in_epoch * grad_accum)


def log_step(log_path: str | None, rec: dict[str, Any], plan: StepPlan) -> None:
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
    tps = rec.get("tokens_per_s") or 0.0
    step, total = rec["step"], plan.total_steps
    print(
        f"[rise train] step {step}/{total} ({step / max(total, 1):.0%}) epoch {rec['epoch']} loss {rec['loss']:.4f} "
        f"lr {rec['lr']:.2e} {tps:,.0f} tok/s | {fmt_duration(rec.get('train_time_s'))} "
        f"ETA {fmt_duration(step_eta(rec, total))}",
        file=sys.stderr,  # Ray Train prints a worker's stdout twice
        flush=True,
    )


def step_eta(rec: dict[str, Any], total_steps: int) -> float | None:
    """Seconds left at the mean step time so far (train_time_s: the steps' time, resumed ones included)."""
    step, spent = rec.get("step") or 0, rec.get("train_time_s")
    if not step or spent is None:
        return None
    return spent / step * max(total_steps - step, 0)


def trim_log(log_path: str, step: int) -> None:
    """Keep the records up to `step` (the checkpoint resumed from), dropping what will be redone."""
    from rise_ray.files import atomic_write_text

    kept = [r for r in read_log(log_path) if r["step"] <= step]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
