"""A programmatic teacher for the arithmetic env's chat tasks, behind the Engine protocol.

Distillation (rollout.improve_with=teacher, teacher.engine=solver) needs a teacher stronger on the
task than the learner. For "What is 7*23?" the solver writes a short worked solution the way a
chat model would, splitting the larger factor into tens and ones, and ends with a boxed answer:

    7*23 = 7*20 + 7*3 = 140 + 21 = 161. The answer is \\boxed{161}.

It reads the question from the conversation's first user message, as a model would, and never
sees the reference answer.
"""

from __future__ import annotations

import re
from typing import Any

from rise_ray.rollout.engine import Completion, Conversation, SamplingParams

_QUESTION = re.compile(r"What is (\d+)\s*([*+])\s*(\d+)\?")


def worked_solution(a: int, op: str, b: int) -> str:
    """The solver's reply to "What is {a}{op}{b}?"."""
    value = a * b if op == "*" else a + b
    if op == "+":
        steps = f"{a}+{b} = {value}"
    else:
        small, big = sorted((a, b))
        tens, ones = divmod(big, 10)
        if tens and ones:  # 7*23 = 7*20 + 7*3 = 140 + 21 = 161
            steps = (f"{a}*{b} = {small}*{tens * 10} + {small}*{ones} = {small * tens * 10} + {small * ones}"
                     f" = {value}")
        else:
            steps = f"{a}*{b} = {value}"
    return f"{steps}. The answer is \\boxed{{{value}}}."


class ArithmeticSolver:
    """Engine protocol: every sample is the worked solution (no sampling, no weights)."""

    def __init__(self, model_path: str = "solver", max_model_len: int | None = None, **_: Any) -> None:
        self.max_model_len = max_model_len or 4096
        self.dtype = "none"

    def generate(self, conversations: list[Conversation], n: int, params: SamplingParams) -> list[list[Completion]]:
        return [[Completion(self._reply(c))] * n for c in conversations]

    def _reply(self, conversation: Conversation) -> str:
        question = next((m["content"] for m in conversation if m["role"] == "user"), "")
        if not (m := _QUESTION.search(question)):
            return "I can only solve questions of the form 'What is a*b?' or 'What is a+b?'."
        return worked_solution(int(m[1]), m[2], int(m[3]))

    def prompt_len(self, conversation: Conversation) -> int:
        return sum(len(m["content"]) for m in conversation) // 4  # no tokenizer: a count that only bounds

    def update_weights(self, weights: Any) -> None:
        raise RuntimeError("the arithmetic solver has no weights to update (a teacher is never synced)")

    def top_logprobs(self, conversation: Conversation, k: int = 8) -> list[tuple[int, float]]:
        raise RuntimeError("the arithmetic solver has no logprobs")
