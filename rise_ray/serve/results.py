"""The body of a /v1/rise/solve response: the attempts, their answers, and the final answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rise_ray.envs.base import Env
from rise_ray.eval.metrics import majority_index
from rise_ray.rollout.episodes import Trajectory


def majority_answer(answers: Sequence[str | None], key: Callable[[str | None], str | None]) -> str | None:
    """The majority answer (rise_ray.eval.metrics.majority_index): the most frequent readable
    answer, ties to the latest (a reply must pick one; the metrics score ties as 1/j); None when
    no answer was readable."""
    i = majority_index(answers, key)
    return None if i is None else answers[i]


def solve_result(traj: Trajectory, env: Env, turns: int, graded: bool) -> dict[str, Any]:
    """The body of a solve response: every attempt, its answer, and the final answer: the majority
    over the attempts (m1@tT, ties to the latest), or the correct attempt's answer when the oracle
    stopped the episode there."""
    answers = [t.answer for t in traj.turns]
    keys = [env.answer_key(a) for a in answers]
    if traj.stop_reason == "correct":
        final, rule = answers[-1], "oracle"
    else:
        final, rule = majority_answer(answers, env.answer_key), f"m1@t{turns}"
    final_correct = None
    if graded:  # the vote's answer is correct when the attempts giving it were graded correct
        final_key = env.answer_key(final)
        final_correct = any(t.correct for t, k in zip(traj.turns, keys, strict=True) if k is not None and k == final_key)
    return {
        "turns": turns,
        "turns_used": len(traj.turns),
        "stop_reason": traj.stop_reason,  # turns | correct | prompt_too_long
        "attempts": [
            {"turn": i + 1, "response": t.response, "answer": t.answer,
             "correct": t.correct if graded else None, "finished": t.finished}
            for i, t in enumerate(traj.turns)
        ],
        "answers": answers,
        "final_answer": final,
        "final_correct": final_correct,
        "rule": rule,
        "answer_changes": sum(a != b for a, b in zip(keys, keys[1:], strict=False)),
    }


class ServeMetrics:
    """The app's Prometheus metrics (exported by Ray as ray_rise_*)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.solve = metrics.Counter("rise_solve_requests", "Solve requests served.", tag_keys=("env", "oracle"))
        self.turns = metrics.Counter("rise_solve_turns", "Turns (attempts) used by solve requests.", tag_keys=("env",))
        self.changes = metrics.Counter(
            "rise_solve_answer_changes", "Answer changes between consecutive attempts.", tag_keys=("env",)
        )
        self.turns_used = metrics.Histogram(
            "rise_solve_turns_used", "Turns used per solve request.", boundaries=[1, 2, 3, 4, 5, 8, 12, 16],
            tag_keys=("env",),
        )

    def solved(self, env: str, oracle: bool, out: dict[str, Any]) -> None:
        tags = {"env": env}
        self.solve.inc(tags={**tags, "oracle": str(oracle).lower()})
        self.turns.inc(out["turns_used"], tags=tags)
        self.turns_used.observe(out["turns_used"], tags=tags)
        if out["answer_changes"]:
            self.changes.inc(out["answer_changes"], tags=tags)
