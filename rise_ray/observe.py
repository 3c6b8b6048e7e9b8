"""Observability: per-stage metrics for the Ray dashboard / Prometheus, and optional experiment
tracking (TensorBoard, MLflow or Weights & Biases), chosen by the config's `observe` section.

The driver hands every stage that runs to `Observer.stage(stage, output, seconds)` (the manifest's
`on_stage` hook) and calls `Observer.finish(wall_s)` after the report. Stages skipped on resume are
not recorded again: their measurements belong to the process that ran them and are already in the
tracking run, which a resumed run continues; exporting them again would add their tokens to the
counters twice and show work that did not happen now. The hook still hands them over, with seconds
None, for what later stages read (the base model's path: its tokenizer counts rollout tokens).

Ray metrics (`observe.ray_metrics`) are recorded in the driver with `ray.util.metrics` and served by
the node's metrics agent at http://<node>:<metrics_export_port>/metrics in Prometheus format (the
dashboard lists those endpoints at /api/prometheus/sd for Prometheus to scrape; its charts read from
that Prometheus). Ray prefixes every name with `ray_`; tag `run` is the run's name, `stage` e.g.
`collect`, `iteration` the RISE iteration (0: the base model):
  ray_rise_stage_seconds{run,stage,iteration}                 wall seconds of each stage
  ray_rise_rollout_tokens_per_second{run,stage,iteration}     collect and eval: generated tokens / s
  ray_rise_rollout_tokens_total{run,stage}                    counter of generated tokens
  ray_rise_rollout_answers{run,stage,iteration,turn}          answers generated at each turn
  ray_rise_train_loss{run,iteration}                          last logged training loss
  ray_rise_train_tokens_per_second{run,iteration}
  ray_rise_train_step_seconds{run}                            histogram of the logged steps' times
  ray_rise_sync_seconds{run,iteration}                        weight update of the live engines
  ray_rise_eval_accuracy{run,iteration,turn}
While a rollout runs (collect, eval), its progress is set every second by the driver's reporter
(rise_ray.progress), tag `stage` only:
  ray_rise_progress_problems_finished, ray_rise_progress_fraction (0..1), ray_rise_progress_samples,
  ray_rise_progress_tokens_per_second, ray_rise_progress_eta_seconds (-1: unknown),
  ray_rise_progress_turn (the highest turn in progress)
Generated tokens are the ids the engine sampled where a turn kept them (one candidate); other
candidates, and turns recorded without ids, are tokenized with the base model's tokenizer.
The embedded Ray ends with the run: scrape while it runs, or use tracking for a lasting record.

Nothing here fails a run: a metric that cannot be recorded is a warning. Only a tracking backend
whose package is missing stops the run, at its start.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from rise_ray.config import RunConfig
from rise_ray.tracking import open_tracker

log = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "report.html", "metrics.json", "turns.png", "config.yaml")
# The train stage's metrics files, in the directory above its model: rise_ray.train.trainer writes
# them under these names (rank 0's per-step log, and the summary at the end) and reads the log back
# with read_train_log (re-exported as rise_ray.train.progress.read_log); train_stats reads both here.
TRAIN_LOG_FILE = "train_log.jsonl"
TRAIN_SUMMARY_FILE = "train_summary.json"
STEP_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]


def split_stage(stage: str) -> tuple[str, int]:
    """'iter_2/train' -> ('train', 2); 'base_model' -> ('base_model', 0)."""
    m = re.fullmatch(r"iter_(\d+)/(.+)", stage)
    return (m.group(2), int(m.group(1))) if m else (stage, 0)


def scalars_of(prefix: str, output: Any) -> dict[str, float]:
    """The numbers in a stage's output dict: lists as name_1.., booleans as 0/1, '@' as '_at_'."""
    out: dict[str, float] = {}
    if not isinstance(output, dict):
        return out
    for key, v in output.items():
        name = f"{prefix}/{key}".replace("@", "_at_")
        if key == "iteration":
            continue
        if isinstance(v, (bool, int, float)):
            out[name] = float(v)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{name}_{i + 1}": float(x) for i, x in enumerate(v)})
    return out


def rollout_stats(path: str, tokenizer: Any = None) -> dict[str, Any]:
    """From trajectory parquet (a file or a directory): answers generated at each turn and the tokens
    of every generated candidate: a turn's stored ids where it has one candidate, else the texts
    tokenized (`tokenizer`: a tokenizer, or a function returning one or None; None: not counted)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["turns"])
    col = table.column("turns").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    turns = pc.list_flatten(col)
    cands = pc.struct_field(turns, "candidates")
    counts = pc.fill_null(pc.list_value_length(cands), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    pos = np.arange(len(counts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # turn index
    per_turn = np.bincount(pos, weights=counts).astype(np.int64).tolist() if len(pos) else []
    out: dict[str, Any] = {"answers_by_turn": per_turn, "answers": int(counts.sum())}
    if tokenizer is None:
        return out
    names = turns.type.names if hasattr(turns.type, "names") else [f.name for f in turns.type]
    if "token_ids" in names:
        n_ids = pc.fill_null(pc.list_value_length(pc.struct_field(turns, "token_ids")), 0)
        n_ids = n_ids.to_numpy(zero_copy_only=False).astype(np.int64)
    else:  # written before turns kept their ids
        n_ids = np.zeros(len(counts), dtype=np.int64)
    stored = (counts == 1) & (n_ids > 0)
    texts = [t for c, s in zip(cands.to_pylist(), stored, strict=True) if not s for t in c or [] if t]
    tokens = int(n_ids[stored].sum())
    if texts:
        tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "encode") else tokenizer
        if tok is None:
            return out
        tokens += sum(
            len(ids)
            for i in range(0, len(texts), 4096)
            for ids in tok(texts[i : i + 4096], add_special_tokens=False)["input_ids"]
        )
    out["tokens"] = tokens
    return out


def read_train_log(log_path: str) -> list[dict[str, Any]]:
    """The train log's step records; a line cut short by a killed worker is skipped."""
    out = []
    if not os.path.exists(log_path):
        return out
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def train_stats(model_dir: str) -> dict[str, Any]:
    """Loss and throughput of a train stage from its metrics log (train_log.jsonl) and summary."""
    out_dir = os.path.dirname(os.path.abspath(model_dir))
    records = read_train_log(os.path.join(out_dir, TRAIN_LOG_FILE))
    summary: dict[str, Any] = {}
    if os.path.exists(p := os.path.join(out_dir, TRAIN_SUMMARY_FILE)):
        with open(p, encoding="utf-8") as f:
            summary = json.load(f)
    tps = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {
        "records": records,
        "loss": summary.get("last_loss", records[-1]["loss"] if records else None),
        "first_loss": summary.get("first_loss", records[0]["loss"] if records else None),
        "tokens_per_s": summary.get("tokens_per_s") or (sum(tps) / len(tps) if tps else None),
        "steps": summary.get("steps", records[-1]["step"] if records else None),
    }


class Observer:
    def __init__(self, cfg: RunConfig, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir
        self.ray_metrics = cfg.observe.ray_metrics
        self._metrics: _RayMetrics | None = None
        self._base: str | None = None  # the base model: its tokenizer counts rollout tokens
        self._tokenizer: Any = None
        self.tracker = open_tracker(cfg, run_dir) if cfg.observe.tracking != "none" else None

    @property
    def enabled(self) -> bool:
        return self.ray_metrics or self.tracker is not None

    def stage(self, stage: str, output: Any, seconds: float | None) -> None:
        """Record a stage that just finished; a failure here is a warning, never the run's end.
        seconds None: a stage done earlier, skipped on resume: nothing is recorded, only its output
        is noted for the stages after it."""
        if not self.enabled:
            return
        try:
            if seconds is None:
                if split_stage(stage)[0] == "base_model":
                    self._base = output
                return
            self._stage(stage, output, seconds)
        except Exception as e:
            log.warning("observe: could not record stage %s: %s: %s", stage, type(e).__name__, e)

    def finish(self, wall_s: float) -> None:
        """After the report: the wall time, the report files, and the tracking run closed."""
        if self.tracker is None:
            return
        try:
            self.tracker.scalars({"run/wall_s": wall_s}, self.cfg.iterations)
            self.tracker.files(
                [p for f in REPORT_FILES if os.path.exists(p := os.path.join(self.run_dir, f))]
            )
            self.tracker.close()
        except Exception as e:
            log.warning("observe: could not finish tracking: %s: %s", type(e).__name__, e)

    # --- one stage -----------------------------------------------------------------------------

    def _stage(self, stage: str, output: Any, seconds: float) -> None:
        kind, k = split_stage(stage)
        values = {f"stage_seconds/{kind}": seconds, **scalars_of(kind, output)}
        ray_m = self._ray()
        if ray_m:
            ray_m.stage_seconds.set(seconds, {"stage": kind, "iteration": str(k)})
        if kind == "base_model":
            self._base = output
        elif kind == "collect":
            values.update(self._rollout(kind, k, output["path"], seconds, ray_m))
        elif kind == "eval":
            values.update(
                self._rollout(
                    kind,
                    k,
                    os.path.join(self.run_dir, f"iter_{k}", "eval", "records.parquet"),
                    seconds,
                    ray_m,
                )
            )
            for t, acc in enumerate(output.get("acc_by_turn", []) if ray_m else []):
                ray_m.eval_accuracy.set(acc, {"iteration": str(k), "turn": str(t + 1)})
        elif kind == "train" and isinstance(output, str):
            values.update(self._train(k, output, ray_m))
        elif kind == "sync" and ray_m:
            sync_s = output.get("seconds", seconds) if isinstance(output, dict) else seconds
            ray_m.sync_seconds.set(sync_s, {"iteration": str(k)})
        if self.tracker:
            self.tracker.scalars(values, k)

    def _rollout(
        self, kind: str, k: int, path: str, seconds: float, ray_m: _RayMetrics | None
    ) -> dict[str, float]:
        stats = rollout_stats(path, self._tokenizer_for_counts)
        tags = {"stage": kind, "iteration": str(k)}
        values = {f"{kind}/answers_turn_{t + 1}": float(n) for t, n in enumerate(stats["answers_by_turn"])}
        if "tokens" in stats:
            values[f"{kind}/tokens"] = float(stats["tokens"])
            values[f"{kind}/tokens_per_s"] = stats["tokens"] / seconds if seconds > 0 else 0.0
        if ray_m:
            for t, n in enumerate(stats["answers_by_turn"]):
                ray_m.answers.set(n, {**tags, "turn": str(t + 1)})
            if stats.get("tokens"):
                ray_m.tokens.inc(stats["tokens"], {"stage": kind})
                ray_m.tokens_per_s.set(values[f"{kind}/tokens_per_s"], tags)
        return values

    def _train(self, k: int, model_dir: str, ray_m: _RayMetrics | None) -> dict[str, float]:
        st = train_stats(model_dir)
        values = {
            f"train/{n}": float(st[n])
            for n in ("loss", "first_loss", "tokens_per_s", "steps")
            if st[n] is not None
        }
        if ray_m:
            if st["loss"] is not None:
                ray_m.train_loss.set(st["loss"], {"iteration": str(k)})
            if st["tokens_per_s"] is not None:
                ray_m.train_tps.set(st["tokens_per_s"], {"iteration": str(k)})
            for r in st["records"]:
                if r.get("step_time_s") is not None:
                    ray_m.step_seconds.observe(r["step_time_s"])
        if self.tracker and st["records"]:
            self.tracker.series(
                f"train/iter_{k}/step_loss", [(r["step"], r["loss"]) for r in st["records"]], "train/step"
            )
        return values

    def _ray(self) -> _RayMetrics | None:
        if not self.ray_metrics:
            return None
        if self._metrics is None:
            import ray

            if not ray.is_initialized():
                return None
            self._metrics = _RayMetrics(self.cfg.name)
        return self._metrics

    def _tokenizer_for_counts(self) -> Any:
        """The base model's tokenizer (the policy's never changes); None where it cannot load."""
        if self._tokenizer is None:
            self._tokenizer = False
            path = self._base  # the base_model stage's output, whether it ran or was skipped on resume
            if isinstance(path, str):
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(path)
                except Exception as e:
                    log.warning("observe: no tokenizer at %s (%s): rollout tokens are not counted", path, e)
        return self._tokenizer or None


class _RayMetrics:
    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        def made(metric):
            metric.set_default_tags({"run": run})
            return metric

        def gauge(name: str, desc: str, *keys: str):
            return made(Gauge(name, desc, tag_keys=("run", *keys)))

        self.stage_seconds = gauge("rise_stage_seconds", "Wall seconds of a RISE stage", "stage", "iteration")
        self.tokens_per_s = gauge(
            "rise_rollout_tokens_per_second",
            "Generated tokens per second of a rollout stage",
            "stage",
            "iteration",
        )
        self.answers = gauge(
            "rise_rollout_answers",
            "Answers generated at a turn of a rollout stage",
            "stage",
            "iteration",
            "turn",
        )
        self.train_loss = gauge("rise_train_loss", "Last logged training loss of an iteration", "iteration")
        self.train_tps = gauge(
            "rise_train_tokens_per_second", "Training tokens per second of an iteration", "iteration"
        )
        self.sync_seconds = gauge(
            "rise_sync_seconds", "Seconds to load trained weights into the engines", "iteration"
        )
        self.eval_accuracy = gauge(
            "rise_eval_accuracy", "Evaluation accuracy at a turn (no oracle)", "iteration", "turn"
        )
        self.tokens = made(
            Counter(
                "rise_rollout_tokens_total", "Generated tokens of rollout stages", tag_keys=("run", "stage")
            )
        )
        self.step_seconds = made(
            Histogram(
                "rise_train_step_seconds",
                "Seconds of the logged training steps",
                boundaries=STEP_BUCKETS,
                tag_keys=("run",),
            )
        )
