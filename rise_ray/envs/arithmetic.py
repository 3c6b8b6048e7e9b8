"""Synthetic arithmetic problems, generated from a seed: a task small enough for a tiny model.

"linear": "Solve for x: 7*x+3=52" (answer 7); "muladd": "Compute: 7*8+3" (answer 59). Questions
are kept short because a character-level model reads them. Each problem's meta carries its
integers (a, b, c, and x for "linear"), so demonstrations such as `check_line` can be built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rise_ray.envs.base import Problem
from rise_ray.envs.gsm8k import NumericEnv

TASKS = ("linear", "muladd")
# inclusive ranges of the sampled integers (for "linear", c = a*x+b is computed)
DEFAULT_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "linear": {"a": (2, 9), "x": (0, 99), "b": (0, 99)},
    "muladd": {"a": (2, 9), "b": (0, 99), "c": (0, 99)},
}


def _plus(b: int) -> str:
    return f"+{b}" if b >= 0 else f"-{-b}"


def _num(v: int) -> str:
    return str(v) if v >= 0 else f"({v})"


def check_line(a: int, b: int, c: int, guess: int) -> str:
    """The check of a guess for a*x+b=c, compactly: "7*6+3=45<52", "7*8+3=59>52", "7*7+3=52=52"."""
    v = a * guess + b
    rel = "<" if v < c else ">" if v > c else "="
    return f"{a}*{_num(guess)}{_plus(b)}={v}{rel}{c}"


def linear_question(a: int, b: int, c: int) -> str:
    return f"Solve for x: {a}*x{_plus(b)}={c}"


def muladd_question(a: int, b: int, c: int) -> str:
    return f"Compute: {a}*{_num(b)}{_plus(c)}"


def generate(
    task: str, seed: int, num_train: int, num_test: int, ranges: dict[str, tuple[int, int]]
) -> tuple[list[Problem], list[Problem]]:
    """(train, test): distinct problems drawn without replacement, so the splits never share a question."""
    names = list(ranges)
    sizes = [hi - lo + 1 for lo, hi in (ranges[k] for k in names)]
    space = 1
    for n in sizes:
        space *= n
    if num_train + num_test > space:
        raise ValueError(f"arithmetic/{task}: only {space} distinct problems in {ranges}, "
                         f"asked for {num_train} train + {num_test} test")
    picks = random.Random(seed).sample(range(space), num_test + num_train)
    problems = []
    for n, idx in enumerate(picks):
        v: dict[str, int] = {}
        for k, size in zip(names, sizes, strict=True):
            v[k] = ranges[k][0] + idx % size
            idx //= size
        split, i = ("test", n) if n < num_test else ("train", n - num_test)
        if task == "linear":
            a, x, b = v["a"], v["x"], v["b"]
            c = a * x + b
            question, answer, meta = linear_question(a, b, c), x, {"a": a, "b": b, "c": c, "x": x}
        else:
            a, b, c = v["a"], v["b"], v["c"]
            question, answer, meta = muladd_question(a, b, c), a * b + c, {"a": a, "b": b, "c": c}
        meta.update(task=task, answer=answer)
        problems.append(Problem(f"arithmetic-{task}-{split}-{i}", question, f"#### {answer}", meta))
    return problems[num_test:], problems[:num_test]


@dataclass
class ArithmeticEnv(NumericEnv):
    name: str = "arithmetic"
    system_prompt: str | None = None  # prompts stay short for the tiny model
    task: str = "linear"

    def demo_attempt(self, problem: Problem, offset: int) -> str | None:
        """A demonstrated guess-and-check attempt for "linear": "7*6+3=45<52 \\boxed{6}", the guess
        `offset` from x (None: a negative guess, or another task)."""
        m = problem.meta
        if self.task != "linear" or m["x"] + offset < 0:
            return None
        guess = m["x"] + offset
        return f"{check_line(m['a'], m['b'], m['c'], guess)} \\boxed{{{guess}}}"



def make_arithmetic(
    task: str = "linear",
    seed: int = 0,
    num_train: int | None = 2000,
    num_test: int | None = 500,
    a_range: tuple[int, int] | None = None,
    b_range: tuple[int, int] | None = None,
    c_range: tuple[int, int] | None = None,
    x_range: tuple[int, int] | None = None,
    train_path: str | None = None,
    test_path: str | None = None,
    **env_fields,
) -> ArithmeticEnv:
    """The arithmetic env. Ranges are inclusive (lo, hi); "linear" uses a, b, x and "muladd" a, b, c.
    train_path/test_path are accepted only as None (the problems are generated, not read)."""
    if task not in TASKS:
        raise ValueError(f"arithmetic: unknown task {task!r}; known tasks: {list(TASKS)}")
    if train_path is not None or test_path is not None:
        raise ValueError("arithmetic: problems are generated from `seed`; train_path/test_path must be None")
    given = {"a": a_range, "b": b_range, "c": c_range, "x": x_range}
    ranges = dict(DEFAULT_RANGES[task])
    for k, r in given.items():
        if r is None:
            continue
        if k not in ranges:
            raise ValueError(f"arithmetic/{task}: option {k}_range is not used (uses {sorted(ranges)})")
        lo, hi = (int(r[0]), int(r[1])) if len(r) == 2 else (0, -1)
        if lo > hi:
            raise ValueError(f"arithmetic: {k}_range must be (lo, hi) with lo <= hi, got {r!r}")
        ranges[k] = (lo, hi)
    if task == "linear" and ranges["a"][0] <= 0 <= ranges["a"][1]:
        raise ValueError(f"arithmetic/linear: a_range {ranges['a']} includes 0 (x would not be determined)")
    n_train = 2000 if num_train is None else int(num_train)
    n_test = 500 if num_test is None else int(num_test)
    if n_train < 0 or n_test < 0:
        raise ValueError("arithmetic: num_train and num_test must be >= 0")
    train, test = generate(task, int(seed), n_train, n_test, ranges)
    return ArithmeticEnv(train=train, test=test, task=task, **env_fields)
