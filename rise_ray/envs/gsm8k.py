"""GSM8K: grade-school word problems with one numeric answer ("#### N" in the reference).

Answers are compared as exact numbers (Fraction), so "1,000", "$1000" and "1000.00" all match
the gold 1000 and no float rounding can make two different integers equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rise_ray.envs.answers import last_boxed, normalize_number, parse_number
from rise_ray.envs.base import DataError, Env, Problem, iter_rows, require_fields

BOXED_SYSTEM_PROMPT = (
    "Solve the problem step by step. Put your final answer in \\boxed{}, e.g. \\boxed{42}."
)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")


def after_hashes(text: str) -> str | None:
    """What follows the last "####" on its line (GSM8K's answer marker), or None."""
    found = _HASHES.findall(text)
    return found[-1].strip() if found else None


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
        """The last \\boxed{} answer; failing that, the last "#### N" line."""
        if not isinstance(response, str):
            return None
        ans = last_boxed(response)
        if ans is None:
            ans = after_hashes(response)
        return ans.strip() if ans and ans.strip() else None


def load_gsm8k(path: str, split: str, limit: int | None = None, hub_config: str | None = "main") -> list[Problem]:
    """Problems from a local JSONL (or a hub name); rows must have a question and a "#### N" answer."""
    out: list[Problem] = []
    for where, index, row in iter_rows(path, split, hub_config):
        if limit is not None and len(out) >= limit:
            break
        require_fields(row, ("question", "answer"), where)
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{where}: fields 'question' and 'answer' must be strings")
        gold = after_hashes(answer)
        if gold is None:
            raise DataError(f"{where}: field 'answer' has no '#### N' final answer")
        if normalize_number(gold) is None:
            raise DataError(f"{where}: field 'answer': final answer {gold!r} is not a number")
        meta = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(Problem(f"gsm8k-{split}-{index}", question, answer, meta))
    return out


def make_gsm8k(
    train_path: str | None = None,
    test_path: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    hub_config: str | None = "main",
    **env_fields,
) -> GSM8KEnv:
    """The GSM8K env; a split whose path is None stays empty (the caller names the data)."""
    train = load_gsm8k(train_path, "train", num_train, hub_config) if train_path else []
    test = load_gsm8k(test_path, "test", num_test, hub_config) if test_path else []
    return GSM8KEnv(train=train, test=test, **env_fields)
