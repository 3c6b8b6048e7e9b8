"""Collection: on-policy multi-turn rollouts with an improved answer at every wrong turn.

Turn 1 is the learner's own answer. After a wrong turn, the next answer is the best of N
candidates, drawn from the learner itself (self-distillation) or from a teacher (distillation).
With `stop_when_correct` (the paper's protocol) a trajectory ends at its first correct answer;
without it, trajectories run all turns so the data also shows keeping a right answer.
"""

from __future__ import annotations

from rise_ray.config import RolloutConfig
from rise_ray.envs.base import Problem
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, Trajectory
from rise_ray.rollout.pool import RolloutPool


def collect_spec(cfg: RolloutConfig, iteration: int) -> EpisodeSpec:
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed + 1000 * iteration
    )
    return EpisodeSpec(
        turns=cfg.turns,
        params=params,
        first_n=1,
        later_n=cfg.best_of_n,
        choose="best",
        oracle=cfg.stop_when_correct,
        context_window=cfg.context_window,
        drop_degenerate=True,
        schedule=cfg.schedule,
        improve_distinct=cfg.improve_distinct,
    )


def problems_for_iteration(problems: list[Problem], per_iteration: int | None, iteration: int) -> list[Problem]:
    """Iteration k takes the k-th slice of the training problems (wrapping around)."""
    if not per_iteration or per_iteration >= len(problems):
        return problems
    start = ((iteration - 1) * per_iteration) % len(problems)
    picked = problems[start : start + per_iteration]
    return picked + problems[: per_iteration - len(picked)]


def collect(
    policy: RolloutPool,
    teacher: RolloutPool | None,
    env_name: str,
    env_options: dict,
    problems: list[Problem],
    cfg: RolloutConfig,
    iteration: int,
) -> list[Trajectory]:
    spec = collect_spec(cfg, iteration)
    return policy.run(env_name, env_options, problems, spec, batch_size=cfg.batch_size, teacher=teacher, progress="collect")


def collection_stats(trajs: list[Trajectory]) -> dict:
    n = len(trajs)
    turns = [len(t.turns) for t in trajs]
    return {
        "trajectories": n,
        "turns": sum(turns),
        "first_turn_correct": sum(bool(t.turns) and t.turns[0].correct for t in trajs) / max(n, 1),
        "ends_correct": sum(bool(t.turns) and t.turns[-1].correct for t in trajs) / max(n, 1),
        "degenerate_dropped": sum(t.degenerate_dropped for t in trajs),
        "prompt_too_long": sum(t.stop_reason == "prompt_too_long" for t in trajs),
    }
