"""GSM8K: grade-school word problems with one numeric answer ("#### N" in the reference).

Answers are compared as exact numbers (Fraction), so "1,000", "$1000" and "1000.00" all match
the gold 1000 and no float rounding can make two different integers equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rise_ray.envs.answers import last_boxed, normalize_number, parse_number
from rise_ray.envs.base import Env, Grade, Problem, load_problems, load_splits
from rise_ray.envs.paper_grading import grade_gsm8k

BOXED_SYSTEM_PROMPT = (
    "Solve the problem step by step. Put your final answer in \\boxed{}, e.g. \\boxed{42}."
)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# "The answer is: 520.", "the final answer is $18": how chat models without \boxed{} end.
_ANSWER_IS = re.compile(
    r"answer is[:\s]*(?:\*\*)?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)(?![\w.]*\w)", re.IGNORECASE
)  # a number glued to letters ("2x", "3rd") is not an answer


def after_hashes(text: str) -> str | None:
    """What follows the last "####" on its line (GSM8K's answer marker), or None."""
    found = _HASHES.findall(text)
    return found[-1].strip() if found else None


def after_answer_is(text: str) -> str | None:
    """The number after the last "The answer is", or None."""
    found = _ANSWER_IS.findall(text)
    return found[-1] if found else None


def read_numeric_answer(response: str) -> str | None:
    """The last \\boxed{} answer; failing that, the last "#### N" line; failing that, the number
    after the last "The answer is" (the ways GSM8K evaluations commonly read answers)."""
    if not isinstance(response, str):
        return None
    for read in (last_boxed, after_hashes, after_answer_is):
        ans = read(response)
        if ans is not None and ans.strip():
            return ans.strip()
    return None


@dataclass
class NumericEnv(Env):
    """Base of the environments whose answer is one number written after "####" in the reference."""

    def gold(self, reference: str) -> str:
        g = after_hashes(reference)
        return (normalize_number(g) or g) if g is not None else reference.strip()

    def is_equivalent(self, answer: str, gold: str) -> bool:
        a, g = parse_number(answer), parse_number(gold)
        return a is not None and g is not None and a == g

    def answer_key(self, answer: str | None) -> str | None:
        if answer is None:
            return None
        return normalize_number(answer) or answer.strip()


@dataclass
class GSM8KEnv(NumericEnv):
    name: str = "gsm8k"
    system_prompt: str | None = BOXED_SYSTEM_PROMPT

    def extract(self, response: str) -> str | None:
        return read_numeric_answer(response)

    def paper_grade(self, response: str, reference: str) -> Grade:
        return grade_gsm8k(self, response, reference)


def load_gsm8k(path: str, split: str, limit: int | None = None, hub_config: str | None = "main") -> list[Problem]:
    """Problems from a local JSONL (or a hub name); rows must have a question and a "#### N" answer."""

    def check(answer: str) -> str | None:
        gold = after_hashes(answer)
        if gold is None:
            return "has no '#### N' final answer"
        return f"has a final answer {gold!r} that is not a number" if normalize_number(gold) is None else None

    return load_problems(path, split, limit, hub_config, "gsm8k", ("question", "answer"), check)


def make_gsm8k(train_path: str | None = None, test_path: str | None = None, num_train: int | None = None,
               num_test: int | None = None, hub_config: str | None = "main", **env_fields) -> GSM8KEnv:
    """The GSM8K env; a split whose path is None stays empty (the caller names the data)."""
    splits = load_splits(load_gsm8k, train_path, test_path, num_train, num_test, hub_config)
    return GSM8KEnv(**splits, **env_fields)
