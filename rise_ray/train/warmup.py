"""Warm-up SFT for the embedded default, a stage of rise_ray.driver: a tiny base model that
attempts, but never self-corrects.

Demonstrations show guess-and-check attempts written by the env (`env.demo_attempt`), e.g. for
sorted-list search "d31<47 \\boxed{d}": the guess is right with probability p_correct, else 1..max_offset
away, and the written check is always right. Each later attempt is a fresh, independent guess:
no copying of the previous answer and no correction from it, so any use of earlier attempts the
model shows after RISE was learned by RISE. A demonstration stops at its first correct attempt.
"""

from __future__ import annotations

import os
import random

from rise_ray.config import RunConfig
from rise_ray.data.builder import prepare_dataset
from rise_ray.data.store import write_trajectories
from rise_ray.demo.warmup import warmup_train_config
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.episodes import Trajectory, Turn
from rise_ray.train.trainer import train


def demonstration(env: Env, problem: Problem, rng: random.Random, turns: int, p_correct: float, max_offset: int) -> Trajectory:
    traj = Trajectory(problem.id, problem.question, problem.reference)
    offsets = [o for d in range(1, max_offset + 1) for o in (-d, d)]
    for _ in range(turns):
        if rng.random() < p_correct:
            text = env.demo_attempt(problem, 0)
        else:  # off by 1..max_offset, among the guesses the problem allows (e.g. not past the last key)
            wrong = [t for o in offsets if (t := env.demo_attempt(problem, o)) is not None]
            text = rng.choice(wrong)
        grade = env.grade(text, problem.reference)
        # reward 0 for every attempt: weight exp(0) = 1, plain imitation of noisy attempts
        traj.turns.append(Turn(text, grade.answer, 0.0, grade.correct, "demo", True, False,
                               [text], [grade.answer], [0.0], [grade.correct]))
        if grade.correct:
            break
    return traj


def demonstrations(env: Env, n: int, turns: int, p_correct: float, max_offset: int, seed: int) -> list[Trajectory]:
    if not hasattr(env, "demo_attempt") or not env.train or env.demo_attempt(env.train[0], 0) is None:
        raise ValueError(f"env {env.name!r} has no demonstrations for a warm-up (envs search and arithmetic "
                         "with task=linear have); set warmup.enabled=false")
    rng = random.Random(seed)
    trajs = []
    for i in range(n):
        p = env.train[i % len(env.train)]
        t = demonstration(env, p, rng, turns, p_correct, max_offset)
        t.problem_id = f"{p.id}-demo{i // len(env.train)}"  # distinct ids: several demos per problem
        trajs.append(t)
    return trajs


def warmup(cfg: RunConfig, env: Env, model_path: str, out_dir: str) -> str:
    """Write demonstrations, build the weighted dataset and train; returns the warmed-up model."""
    w = cfg.warmup
    trajs = demonstrations(env, w.num_problems, w.turns, w.p_correct, w.max_offset, w.seed)
    traj_dir = os.path.join(out_dir, "trajectories")
    write_trajectories(trajs, os.path.join(traj_dir, "part-00000.parquet"))
    train_cfg = warmup_train_config(cfg)
    data_cfg = cfg.data.model_copy(
        update={"criteria": "all", "center_rewards": False, "dedupe": False, "turns_after_correct": None,
                "after_correct_weight": 1.0, "first_turn_weight": 1.0}
    )
    wcfg = cfg.model_copy(update={"train": train_cfg, "data": data_cfg})
    data_dir = os.path.join(out_dir, "dataset")
    prepare_dataset(wcfg, traj_dir, model_path, data_dir)
    return train(wcfg, data_dir, model_path, os.path.join(out_dir, "model"))
