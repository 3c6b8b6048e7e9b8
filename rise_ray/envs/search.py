"""Sorted-list search: a synthetic task where checking an attempt is easier than producing one.

"Find 47: a12 b19 c23 d31 e47 f55" -> e. An attempt writes the check of its guess, "d31<47
\\boxed{d}": reading d's number and comparing it with the target is a lookup a tiny model learns
fast, and because the list is sorted the check says which way the right key lies ("<": further
right, ">": further left, "=": found). So the previous attempt's work shows how to fix it, the
property RISE needs to improve without an oracle. Problems are generated from a seed.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass

from rise_ray.envs.base import Env, Grade, Problem


def check_line(keys: str, values: list[int], target: int, guess: int) -> str:
    v, t = values[guess], values[target]
    rel = "<" if v < t else ">" if v > t else "="
    return f"{keys[guess]}{v}{rel}{t}"


@dataclass
class SearchEnv(Env):
    name: str = "search"
    system_prompt: str | None = None  # prompts stay short for the tiny model
    # Subtracted from the reward of an attempt whose written check is wrong (a wrong number or
    # comparison). The answer alone rewards a right key with a wrong check just as much, and RISE
    # then trains the checks away, which leaves later turns nothing true to correct from.
    check_penalty: float = 0.0

    def gold(self, reference: str) -> str:
        return reference.rsplit("####", 1)[-1].strip()

    def is_equivalent(self, answer: str, gold: str) -> bool:
        return answer.strip() == gold

    def grade_problem(self, response: str, problem: Problem) -> Grade:
        g = self.grade(response, problem.reference)
        if self.check_penalty and g.answer is not None and not self.check_is_right(response, problem):
            return Grade(g.correct, g.answer, g.reward - self.check_penalty)
        return g

    def check_is_right(self, response: str, problem: Problem) -> bool:
        """Whether the attempt's check ("d31<47") is the true check of the key it answers."""
        m = problem.meta
        answer = self.extract(response)
        if answer is None or len(answer) != 1 or answer not in m["keys"]:
            return False
        line = check_line(m["keys"], m["values"], m["target"], m["keys"].index(answer))
        return re.match(re.escape(line) + r"(?!\d)", response.strip()) is not None

    def demo_attempt(self, problem: Problem, offset: int) -> str | None:
        """A demonstrated attempt whose guess is `offset` keys from the answer (None: no such key)."""
        m = problem.meta
        guess = m["target"] + offset
        if not 0 <= guess < len(m["values"]):
            return None
        return f"{check_line(m['keys'], m['values'], m['target'], guess)} \\boxed{{{m['keys'][guess]}}}"


def make_search(
    seed: int = 0,
    num_train: int | None = 2000,
    num_test: int | None = 500,
    num_keys: int = 6,
    low: int = 10,
    high: int = 99,
    train_path: str | None = None,
    test_path: str | None = None,
    check_penalty: float = 0.0,
    num_val: int = 500,
    **env_fields,
) -> SearchEnv:
    """`num_keys` sorted distinct values in [low, high] labelled a, b, c, ...; train, test and val
    (`num_val` problems for tuning) share no question. The val problems are drawn after the others,
    so train and test stay the same whatever num_val is. `check_penalty`: reward taken off an
    attempt whose written check is wrong."""
    if train_path is not None or test_path is not None:
        raise ValueError("search: problems are generated from `seed`; train_path/test_path must be None")
    if not 2 <= num_keys <= 26:
        raise ValueError(f"search: num_keys must be in 2..26, got {num_keys}")
    if high - low + 1 < num_keys:
        raise ValueError(f"search: [{low}, {high}] holds fewer than num_keys={num_keys} values")
    n_train = 2000 if num_train is None else int(num_train)
    n_test = 500 if num_test is None else int(num_test)
    if isinstance(num_val, bool) or not isinstance(num_val, int) or num_val < 0:
        raise ValueError(f"search: num_val must be a non-negative int, got {num_val!r}")
    keys = string.ascii_lowercase[:num_keys]
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    n = n_test + n_train
    distinct = math.comb(high - low + 1, num_keys) * num_keys
    if n + num_val > distinct:
        raise ValueError(f"search: {n + num_val} problems asked, only {distinct} distinct questions exist")
    while len(problems) < n + num_val:
        values = sorted(rng.sample(range(low, high + 1), num_keys))
        target = rng.randrange(num_keys)
        question = f"Find {values[target]}: " + " ".join(f"{k}{v}" for k, v in zip(keys, values, strict=True))
        if question in seen:
            continue
        seen.add(question)
        i = len(problems)
        split, start = ("test", 0) if i < n_test else ("train", n_test) if i < n else ("val", n)
        meta = {"keys": keys, "values": values, "target": target}
        problems.append(Problem(f"search-{split}-{i - start}", question, f"#### {keys[target]}", meta))
    return SearchEnv(train=problems[n_test:n], test=problems[:n_test], val=problems[n:],
                     check_penalty=float(check_penalty), **env_fields)
