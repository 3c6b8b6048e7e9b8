"""The evaluation stage: run no-oracle episodes on evaluation problems, score and record them.

Steps:
  1. one episode per problem of eval.split (test, or val for tuning): k parallel samples at turn 1 (the first continues the
     conversation), then T-1 more turns with "incorrect" feedback (no oracle);
     (progress lines while it runs: rise_ray.progress);
  2. write records.parquet (every turn and candidate), metrics.json, turns.png;
  3. print the table.
"""

from __future__ import annotations

import os

from rise_ray.config import EvalConfig
from rise_ray.data.store import write_trajectories
from rise_ray.envs.base import Env, Problem
from rise_ray.eval.metrics import compute_metrics
from rise_ray.eval.report import format_table, plot_turns
from rise_ray.files import atomic_write_json
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec
from rise_ray.rollout.pool import RolloutPool


def eval_spec(cfg: EvalConfig) -> EpisodeSpec:
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed)
    return EpisodeSpec(
        turns=cfg.turns,
        params=params,
        first_n=cfg.parallel,
        later_n=1,
        choose="first",  # never by reward: that would peek at the gold answer
        oracle=False,
        context_window=cfg.context_window,
        drop_degenerate=False,
    )


def eval_problems(env: Env, cfg: EvalConfig) -> list[Problem]:
    """The problems of eval.split: test, or val (tuning happens on val; test is for the report)."""
    return env.split(cfg.split)


def evaluate(
    pool: RolloutPool,
    env: Env,
    env_options: dict,
    problems: list[Problem],
    cfg: EvalConfig,
    out_dir: str,
    label: dict | None = None,
) -> dict:
    """Evaluate the pool's current weights; writes out_dir/{records.parquet,metrics.json,turns.png}."""
    trajs = pool.run(env.name, env_options, problems, eval_spec(cfg), batch_size=cfg.batch_size, progress="eval")
    metrics = {**(label or {}), **compute_metrics(trajs, env.answer_key, cfg.turns, cfg.parallel), "split": cfg.split}
    write_trajectories(trajs, os.path.join(out_dir, "records.parquet"))
    plot_turns([metrics], os.path.join(out_dir, "turns.png"))
    atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    print(format_table([metrics]))
    return metrics
