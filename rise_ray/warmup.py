"""Warm-up SFT for the embedded default: a tiny base model that attempts, but never self-corrects.

Demonstrations for "Solve for x: a*x+b=c" show guess-and-check attempts, "7*6+3=45<52 \\boxed{6}":
the guess is right with probability p_correct, else off by 1..max_offset, and the written check
is always right. Each later attempt is a fresh, independent guess: no copying of the previous
answer and no correction from it, so whatever use of earlier attempts the model shows after
RISE was learned by RISE. A demonstration stops at its first correct attempt.
"""

from __future__ import annotations

import os
import random

from pydantic import ValidationError

from rise_ray.config import ConfigError, RunConfig, TrainConfig
from rise_ray.envs.arithmetic import check_line
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.episodes import Trajectory, Turn, write_trajectories


def attempt(meta: dict, guess: int) -> str:
    return f"{check_line(meta['a'], meta['b'], meta['c'], guess)} \\boxed{{{guess}}}"


def demonstration(problem: Problem, rng: random.Random, turns: int, p_correct: float, max_offset: int) -> Trajectory:
    x = problem.meta["x"]
    traj = Trajectory(problem.id, problem.question, problem.reference)
    for _ in range(turns):
        right = rng.random() < p_correct
        guess = x if right else x + rng.choice([-1, 1]) * rng.randint(1, max_offset)
        # reward 0 for every attempt: weight exp(0) = 1, plain imitation of noisy attempts
        text = attempt(problem.meta, guess)
        traj.turns.append(Turn(text, str(guess), 0.0, right, "demo", True, False, [text], [str(guess)], [0.0], [right]))
        if right:
            break
    return traj


def demonstrations(env: Env, n: int, turns: int, p_correct: float, max_offset: int, seed: int) -> list[Trajectory]:
    if getattr(env, "task", None) != "linear":
        raise ValueError("warm-up demonstrations exist for env arithmetic with options.task=linear only; "
                         "set warmup.enabled=false for other envs")
    rng = random.Random(seed)
    trajs = []
    for i in range(n):
        p = env.train[i % len(env.train)]
        t = demonstration(p, rng, turns, p_correct, max_offset)
        t.problem_id = f"{p.id}-demo{i // len(env.train)}"  # distinct ids: several demos per problem
        trajs.append(t)
    return trajs


def warmup(cfg: RunConfig, env: Env, model_path: str, out_dir: str) -> str:
    """Write demonstrations, build the weighted dataset and train; returns the warmed-up model."""
    from rise_ray.train.trainer import prepare_dataset, train

    w = cfg.warmup
    trajs = demonstrations(env, w.num_problems, w.turns, w.p_correct, w.max_offset, w.seed)
    traj_dir = os.path.join(out_dir, "trajectories")
    write_trajectories(trajs, os.path.join(traj_dir, "part-00000.parquet"))
    try:
        train_cfg = TrainConfig.model_validate({**cfg.train.model_dump(), **w.train})
    except ValidationError as e:
        raise ConfigError(f"warmup.train: {e}") from None
    data_cfg = cfg.data.model_copy(update={"criteria": "all", "center_rewards": False, "dedupe": False})
    wcfg = cfg.model_copy(update={"train": train_cfg, "data": data_cfg})
    data_dir = os.path.join(out_dir, "dataset")
    prepare_dataset(wcfg, traj_dir, model_path, data_dir)
    return train(wcfg, data_dir, model_path, os.path.join(out_dir, "model"))
