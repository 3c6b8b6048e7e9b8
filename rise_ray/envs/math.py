"""MATH (Hendrycks et al.): competition problems whose gold is the last \\boxed{} of the solution.

Equivalence is decided in three steps, cheapest first: equal after light LaTeX normalisation,
equal as exact numbers, then symbolic equality with `math-verify`. math-verify can raise or hang
on odd input, so it runs under a time limit and any failure counts as "not equivalent".
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rise_ray.envs.answers import format_number, last_boxed, parse_number
from rise_ray.envs.base import Env, Grade, Problem, load_problems, load_splits
from rise_ray.envs.gsm8k import BOXED_SYSTEM_PROMPT
from rise_ray.envs.paper_grading import grade_math

MAX_SYMBOLIC_CHARS = 500  # longer answers are only compared as strings (sympy cost grows fast)

_SPACES = re.compile(r"\\[,;:! ]|\\q?quad|\s+")
_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")


def _fix_fracs(s: str) -> str:
    """Give every \\frac its braces ("\\frac \\pi4" -> "\\frac{\\pi}{4}"): math-verify misreads the
    brace-less form (it parsed the gold "\\frac \\pi4 + 2 - \\sqrt2" as 2)."""
    out: list[str] = []
    i = 0
    for m in re.finditer(r"\\[dt]?frac(?![A-Za-z])", s):
        if m.start() < i:
            continue
        j, args = m.end(), []
        while len(args) < 2:
            while j < len(s) and s[j] == " ":
                j += 1
            if j >= len(s):
                break
            if s[j] == "{":
                depth, k = 0, j
                while k < len(s):
                    depth += {"{": 1, "}": -1}.get(s[k], 0)
                    if depth == 0:
                        break
                    k += 1
                if k >= len(s):
                    break
                args.append(s[j + 1 : k])
                j = k + 1
            elif s[j] == "\\":
                cmd = re.match(r"\\[A-Za-z]+|\\.", s[j:])
                tok = cmd.group(0) if cmd else s[j]
                args.append(tok)
                j += len(tok)
            else:
                args.append(s[j])
                j += 1
        if len(args) == 2:
            out.append(s[i : m.start()] + "\\frac{" + args[0] + "}{" + args[1] + "}")
            i = j
    return "".join(out) + s[i:]


def normalize_latex(s: str) -> str:
    """A light canonical form: no spacing commands, \\left/\\right, \\dfrac, text wrappers,
    degree marks or outer "$"; numbers in canonical form ("0.5" and "\\frac12" both give "0.5")."""
    v = parse_number(s)
    if v is not None:
        return format_number(v)
    t = s.strip().strip("$").strip()
    t = _WRAP.sub(r"\1", t)
    t = t.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = _DEGREES.sub("", t).replace("\\$", "").replace("\\%", "").replace("\\displaystyle", "")
    t = _SPACES.sub("", t).rstrip(".")
    return _fix_fracs(t)


class _Timeout(BaseException):
    """Raised by our alarm inside math-verify; BaseException so its `except Exception` lets it by."""


try:  # math-verify catches its own TimeoutException and returns "no result": reuse it when present
    from math_verify.errors import TimeoutException as _MVTimeout
except ImportError:  # pragma: no cover
    _MVTimeout = _Timeout  # type: ignore[misc,assignment]


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise a timeout in the block after `seconds` (main thread only; elsewhere no limit).

    Unlike math-verify's own signal.alarm, this restores an outer timer (pytest-timeout, an
    outer limit) instead of silently cancelling it, and never fires after an earlier outer one.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer and outer <= seconds:  # an outer alarm comes first: let it do the job
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _MVTimeout("math answer check timed out")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)  # re-fires until cleared, in case one is swallowed
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def _mv():
    """math-verify, imported on first use (it pulls in sympy), with its no-timeout warning off:
    we pass timeout=None on purpose and apply `time_limit` around the calls instead."""
    import math_verify
    from math_verify import grader, parser

    grader.TIMEOUT_WARNING_SHOWN = True
    parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


@lru_cache(maxsize=8192)
def _parse_boxed(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of one boxed answer (cached: gold answers are graded many times)."""
    return tuple(_mv().parse("$\\boxed{" + answer + "}$", parsing_timeout=None))


def symbolic_equal(answer: str, gold: str, timeout_seconds: float | None = 5.0) -> bool:
    """math-verify's verdict, False on any error or timeout."""
    if len(answer) > MAX_SYMBOLIC_CHARS or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    try:
        with time_limit(timeout_seconds):
            g, a = _parse_boxed(_fix_fracs(gold)), _parse_boxed(_fix_fracs(answer))
            if not g or not a:
                return False
            return bool(_mv().verify(list(g), list(a), timeout_seconds=None))
    except (Exception, _Timeout, _MVTimeout):
        return False


@dataclass
class MathEnv(Env):
    name: str = "math"
    system_prompt: str | None = BOXED_SYSTEM_PROMPT
    timeout_seconds: float | None = 5.0  # per answer check (math-verify); None = no limit

    def gold(self, reference: str) -> str:
        g = last_boxed(reference)
        return g.strip() if g is not None else reference.strip()

    def is_equivalent(self, answer: str, gold: str) -> bool:
        if normalize_latex(answer) == normalize_latex(gold):
            return True
        a, g = parse_number(answer), parse_number(gold)
        if a is not None and g is not None:
            return a == g
        return symbolic_equal(answer, gold, self.timeout_seconds)

    def answer_key(self, answer: str | None) -> str | None:
        return None if answer is None else normalize_latex(answer)

    def paper_grade(self, response: str, reference: str) -> Grade:
        return grade_math(self, response, reference)


def load_math(path: str, split: str, limit: int | None = None, hub_config: str | None = None) -> list[Problem]:
    """Problems from a local JSONL (or a hub name); rows need `problem` and a `solution` with a \\boxed{}."""

    def check(solution: str) -> str | None:
        return None if (last_boxed(solution) or "").strip() else "has no \\boxed{...} final answer"

    return load_problems(path, split, limit, hub_config, "math", ("problem", "solution"), check)


def make_math(train_path: str | None = None, test_path: str | None = None, num_train: int | None = None,
              num_test: int | None = None, hub_config: str | None = None, timeout_seconds: float | None = 5.0,
              **env_fields) -> MathEnv:
    """The MATH env; a split whose path is None stays empty (the caller names the data)."""
    splits = load_splits(load_math, train_path, test_path, num_train, num_test, hub_config)
    return MathEnv(**splits, timeout_seconds=timeout_seconds, **env_fields)
