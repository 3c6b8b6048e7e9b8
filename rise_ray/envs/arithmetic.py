"""Synthetic arithmetic problems, generated from a seed: tasks small enough for a tiny model, and
for a small real chat model.

"linear": "Solve for x: 7*x+3=52" (answer 7); "muladd": "Compute: 7*8+3" (answer 59); "add":
"What is 47+8?"; "mul": "What is 7*14?". linear and muladd are kept short because a
character-level model reads them; add and mul are worded as a chat model is asked. Each problem's
meta carries its integers (a, b, c, and x for "linear"), so demonstrations such as `check_line`
can be built. Train, test and val (`num_val`, for tuning) share no question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rise_ray.envs.base import Problem
from rise_ray.envs.gsm8k import NumericEnv, read_numeric_answer

TASKS = ("linear", "muladd", "add", "mul")
# inclusive ranges of the sampled integers (for "linear", c = a*x+b is computed)
DEFAULT_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "linear": {"a": (2, 9), "x": (0, 99), "b": (0, 99)},
    "muladd": {"a": (2, 9), "b": (0, 99), "c": (0, 99)},
    "add": {"a": (10, 99), "b": (1, 9)},
    "mul": {"a": (2, 9), "b": (10, 99)},
}
# "43 + 2 = 45", "71+1 equals 72.", "The answer to 64+7 is 121.": the number after the last "=",
# "equals" or "is" (not one glued to letters, nor one that starts another expression).
_EQUALS = re.compile(r"(?:=|\bequals|\bis)\s*\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?)(?![\w.]*\w|\s*[-+*/×x^])")
_CHAT_TASKS = {"add": ("+", lambda a, b: a + b), "mul": ("*", lambda a, b: a * b)}


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
    task: str, seed: int, num_train: int, num_test: int, ranges: dict[str, tuple[int, int]], num_val: int = 0
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, test, val): distinct problems drawn without replacement, so the splits never share a
    question. val is drawn after the others, so train and test stay the same whatever num_val is."""
    names = list(ranges)
    sizes = [hi - lo + 1 for lo, hi in (ranges[k] for k in names)]
    space = 1
    for n in sizes:
        space *= n
    if num_train + num_test + num_val > space:
        raise ValueError(f"arithmetic/{task}: only {space} distinct problems in {ranges}, "
                         f"asked for {num_train} train + {num_test} test + {num_val} val")
    rng = random.Random(seed)
    picks = rng.sample(range(space), num_test + num_train)
    if num_val:
        taken = set(picks)
        picks += rng.sample([i for i in range(space) if i not in taken], num_val)
    splits: dict[str, list[Problem]] = {"train": [], "test": [], "val": []}
    for n, idx in enumerate(picks):
        v: dict[str, int] = {}
        for k, size in zip(names, sizes, strict=True):
            v[k] = ranges[k][0] + idx % size
            idx //= size
        split = "test" if n < num_test else "train" if n < num_test + num_train else "val"
        question, answer, meta = _question(task, v)
        meta.update(task=task, answer=answer)
        i = len(splits[split])
        splits[split].append(Problem(f"arithmetic-{task}-{split}-{i}", question, f"#### {answer}", meta))
    return splits["train"], splits["test"], splits["val"]


def _question(task: str, v: dict[str, int]) -> tuple[str, int, dict[str, int]]:
    """(question, answer, meta) for the sampled integers `v`."""
    if task == "linear":
        a, x, b = v["a"], v["x"], v["b"]
        c = a * x + b
        return linear_question(a, b, c), x, {"a": a, "b": b, "c": c, "x": x}
    if task == "muladd":
        a, b, c = v["a"], v["b"], v["c"]
        return muladd_question(a, b, c), a * b + c, {"a": a, "b": b, "c": c}
    op, fn = _CHAT_TASKS[task]
    a, b = v["a"], v["b"]
    return f"What is {a}{op}{b}?", fn(a, b), {"a": a, "b": b}


@dataclass
class ArithmeticEnv(NumericEnv):
    name: str = "arithmetic"
    system_prompt: str | None = None  # prompts stay short for the tiny model
    task: str = "linear"

    def extract(self, response: str) -> str | None:
        """The last \\boxed{} answer, else the last "#### N", else the number after the last "The
        answer is", else the number after the last "=": the forms a chat model writes
        (tests/fixtures/smollm2_arithmetic_replies.jsonl)."""
        answer = read_numeric_answer(response)
        if answer is None and isinstance(response, str) and (found := _EQUALS.findall(response)):
            return found[-1]
        return answer

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
    num_val: int = 0,
    train_path: str | None = None,
    test_path: str | None = None,
    **env_fields,
) -> ArithmeticEnv:
    """The arithmetic env. Ranges are inclusive (lo, hi); "linear" uses a, b, x, "muladd" a, b, c,
    "add" and "mul" a, b. `num_val`: validation problems, held out from train and test.
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
    if isinstance(num_val, bool) or not isinstance(num_val, int) or num_val < 0:
        raise ValueError(f"arithmetic: num_val must be a non-negative int, got {num_val!r}")
    train, test, val = generate(task, int(seed), n_train, n_test, ranges, num_val)
    return ArithmeticEnv(train=train, test=test, val=val, task=task, **env_fields)
