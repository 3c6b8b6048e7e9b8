"""Ray Train driver side: a TorchTrainer running rise_ray.train.loop on every worker.

`train(cfg, dataset_dir, init_model_path, out_dir)` trains one RISE iteration and returns the HF
model directory `out_dir/model` (safetensors, tokenizer included). It is idempotent and
resumable: a finished `out_dir/model` is returned as is; otherwise Ray Train runs under
`out_dir/ray_train/sft`, so running it again after a crash resumes from the latest checkpoint
(Ray Train V2 resumes a run with the same name and storage path), and a worker that dies is
restarted by Ray Train (`FailureConfig.max_failures`) from the latest checkpoint.

Files under out_dir:
  model/               the final HF model (or LoRA adapter with train.lora.merge=false)
  train_log.jsonl      one record per step: loss, lr, tokens, tokens/s, grad norm, ...
  train_summary.json   steps, first/last loss, tokens, tokens/s, data stats
  ray_train/           Ray Train storage (checkpoints)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from rise_ray.config import RunConfig, TrainConfig
from rise_ray.observe import TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE
from rise_ray.train.checkpoint import MARKER_FILE, MODEL_DIR
from rise_ray.train.loop import WorkerConfig, train_loop_per_worker
from rise_ray.train.placement import STRATEGY, PlacementTimeout, reserve, worker_placement
from rise_ray.train.progress import plan_steps, read_log

log = logging.getLogger(__name__)

RUN_NAME = "sft"
RUN_FILE = "train_run.json"  # what this out_dir trains: resuming anything else is refused
DATASET_NAME = "train"


class TrainError(RuntimeError):
    """A training run that failed or cannot start; the message says why."""


def is_finished(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER_FILE))


def check_same_run(out_dir: str, stats: dict[str, Any], plan: dict[str, Any], model: str, tcfg: TrainConfig) -> None:
    """A run resumes only what it started: the same data, plan, model and settings. Anything
    else in out_dir is an error, not a silent resume of someone else's checkpoints."""
    from rise_ray.files import atomic_write_json

    ident = {
        "data": {k: stats.get(k) for k in ("rows", "examples", "input_tokens", "trained_tokens", "layout", "source")},
        "plan": plan,
        "model": os.path.abspath(model),
        "train": tcfg.model_dump(mode="json", exclude={"max_failures", "log_every_steps"}),
    }
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != json.loads(json.dumps(ident)):
            diff = sorted(k for k in ident if old.get(k) != json.loads(json.dumps(ident[k])))
            raise TrainError(
                f"{out_dir} holds a training run with different {', '.join(diff)}; "
                "use another output directory or delete this one to start over"
            )
    else:
        atomic_write_json(path, ident)


def load_train_dataset(dataset_dir: str) -> Any:
    """The examples as a Ray Dataset, built from the parquet file read once on the driver: blocks
    in a fixed order, so shards are the same on every attempt (a resumed run skips exactly what
    it trained) and no read task competes with the training workers for CPUs."""
    import pyarrow.parquet as pq
    import ray.data

    from rise_ray.data.store import EXAMPLES_FILE

    table = pq.read_table(os.path.join(dataset_dir, EXAMPLES_FILE), columns=["input_ids", "weights", "units"])
    n = table.num_rows
    per_block = max(1, min(4096, -(-n // 16)))
    blocks = [table.slice(i, per_block) for i in range(0, n, per_block)]
    ds = ray.data.from_arrow(blocks)
    ds.context.enable_progress_bars = False
    return ds


def _pad_id(model_path: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    for v in (tok.pad_token_id, tok.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def train(
    cfg: RunConfig, dataset_dir: str, init_model_path: str, out_dir: str, engine_nodes: list[str] | None = None,
    storage: tuple[str, str] | None = None,
) -> str:
    """Train on the data set directory from `init_model_path`; returns `out_dir/model`.
    `engine_nodes`: colocated, the node of each policy engine (rise_ray.train.placement).
    `storage`: the run's marker, which every worker checks on its own node."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from rise_ray.data.store import read_stats
    from rise_ray.files import atomic_write_json

    out_dir = os.path.abspath(out_dir)
    model_dir = os.path.join(out_dir, MODEL_DIR)
    if not os.path.isfile(os.path.join(init_model_path, "config.json")):
        raise TrainError(f"model path {init_model_path}: no config.json (expected an HF model directory)")
    tcfg = cfg.train
    stats = read_stats(dataset_dir)
    plan = plan_steps(stats["rows"], tcfg)
    os.makedirs(out_dir, exist_ok=True)
    check_same_run(out_dir, stats, plan.__dict__, init_model_path, tcfg)
    if is_finished(model_dir):
        log.info("train: %s is already trained", model_dir)
        return model_dir
    if not ray.is_initialized():
        from rise_ray.ray_init import init_ray

        init_ray()
    resources, labels = worker_placement(cfg, engine_nodes)
    try:
        reserve(resources, tcfg.num_workers, labels, cfg.cluster.scale_up_timeout_s)
    except PlacementTimeout as e:
        raise TrainError(str(e)) from None

    log_path = os.path.join(out_dir, TRAIN_LOG_FILE)
    job = WorkerConfig(os.path.abspath(init_model_path), tcfg, plan, _pad_id(init_model_path), log_path, storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(job.__dict__),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=resources,
            label_selector=labels,
            placement_strategy=STRATEGY,
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=os.path.join(out_dir, "ray_train"),
            # controller failures include a worker group that could not be placed: bounded, not retried forever
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
        ),
        datasets={DATASET_NAME: load_train_dataset(dataset_dir)},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    print(
        f"[rise train] {stats['rows']} rows ({stats['layout']}, {stats['examples']} examples) -> "
        f"{plan.total_steps} steps on {tcfg.num_workers} worker(s), ZeRO-{tcfg.zero_stage}"
        f"{', LoRA' if tcfg.lora.enabled else ''}",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train wraps worker errors; keep the cause in the message
        raise TrainError(f"training failed: {e}") from e
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint")
    tmp = model_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        src = os.path.join(d, MODEL_DIR)
        if not is_finished(src):
            raise TrainError(f"the last checkpoint {d} holds no final model")
        shutil.copytree(src, tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    summary = summarize(read_log(log_path), result.metrics or {}, plan.total_steps, stats, tcfg, wall, model_dir)
    atomic_write_json(os.path.join(out_dir, TRAIN_SUMMARY_FILE), summary)
    return model_dir


def summarize(
    records: list[dict[str, Any]],
    final: dict[str, Any],
    total_steps: int,
    stats: dict[str, Any],
    tcfg: TrainConfig,
    wall: float,
    model_dir: str,
) -> dict[str, Any]:
    """Totals from the run's final metrics (rank 0's, over every step: the count survives restarts
    in the checkpointed state); the first loss from the log (every log_every_steps-th step)."""
    tokens = int(final.get("tokens", sum(r.get("tokens", 0) for r in records)))
    train_time = float(final.get("train_time_s", sum(r.get("step_time_s", 0.0) for r in records)))
    return {
        "model_dir": model_dir,
        "steps": int(final.get("step", records[-1]["step"] if records else 0)),
        "total_steps": total_steps,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": final.get("loss", records[-1]["loss"] if records else None),
        "tokens": tokens,
        "padded_tokens": int(final.get("padded_tokens", 0)),
        "train_time_s": round(train_time, 3),
        "tokens_per_s": tokens / train_time if train_time > 0 else None,
        "wall_s": round(wall, 3),
        "num_workers": tcfg.num_workers,
        "zero_stage": tcfg.zero_stage,
        "lora": tcfg.lora.enabled,
        "data": {k: stats.get(k) for k in ("layout", "rows", "examples", "input_tokens", "trained_tokens", "truncated", "dropped_too_long", "replies_from_text", "contexts_not_engine_prompt")},
    }


# --- the CLI entry ----------------------------------------------------------------------------------


def train_command(cfg: RunConfig, data_path: str, out_dir: str) -> str:
    """`rise train CONFIG data=PATH model.path=PATH`: PATH is a built data set directory
    (examples.parquet + stats.json) or trajectories (a parquet file or a directory searched
    recursively), built first into out_dir/dataset. Trains from model.path (or the tiny model)
    and returns the final model directory; out_dir gets train_log.jsonl and train_summary.json."""
    from rise_ray.data.builder import is_dataset_dir, prepare_dataset
    from rise_ray.models.placement import resolve_model
    from rise_ray.ray_init import init_ray

    init_ray()  # first: resolve_model checks that every node reads the model
    model_path = resolve_model(cfg.model, os.path.join(cfg.run_dir, cfg.name))
    if is_dataset_dir(data_path):
        dataset_dir = data_path
    else:
        dataset_dir = prepare_dataset(cfg, data_path, model_path, os.path.join(out_dir, "dataset"))
    path = train(cfg, dataset_dir, model_path, out_dir)
    with open(os.path.join(out_dir, TRAIN_SUMMARY_FILE), encoding="utf-8") as f:
        s = json.load(f)
    tps = s["tokens_per_s"] or 0.0
    print(
        f"[rise train] done: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}, "
        f"{tps:,.0f} tok/s; model: {path}; log: {os.path.join(out_dir, TRAIN_LOG_FILE)}",
        flush=True,
    )
    return path
