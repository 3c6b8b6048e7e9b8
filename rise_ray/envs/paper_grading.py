"""Grading as the paper's code does it (github.com/cmu-mind/RISE, environments/gsm8k.py and math.py),
for `env.grading: paper`: numbers then compare with the paper's tables.

GSM8K: the model's answer is the content of the last `\\boxed{...}` without nested braces, commas
removed, read as an integer (anything else is no answer: reward -1); the gold is the first number
after "####" in the reference; equal as numbers.
MATH: the model's and the gold answer are each the last `\\boxed{...}` (one level of nested braces),
compared as strings after the MATH benchmark's normalisation (Hendrycks et al.'s `strip_string`:
no spaces, units, `\\left`/`\\right`, degree marks or dollar signs; `\\dfrac` -> `\\frac`;
`\\frac12` -> `\\frac{1}{2}`; `0.5` and `1/2` -> `\\frac{1}{2}`; a short `x =` prefix dropped).
"""

from __future__ import annotations

import re

from rise_ray.envs.base import Env, Grade

_GSM8K_BOX = re.compile(r"boxed\{([^}]+)\}")
_GSM8K_GOLD = re.compile(r"####\s*([-+]?\d+(?:\.\d+)?)")
_MATH_BOX = re.compile(r"boxed\{((?:[^{}]|(?:\{[^}]*\}))*)\}")


def gsm8k_answer(response: str) -> str | None:
    """The integer in the last brace-free \\boxed{} (commas dropped), as text; None otherwise."""
    found = _GSM8K_BOX.findall(response) if isinstance(response, str) else []
    if not found:
        return None
    text = found[-1].replace(",", "")
    try:
        return str(int(text))
    except ValueError:
        return None


def gsm8k_gold(reference: str) -> str | None:
    m = _GSM8K_GOLD.search(reference)
    return m.group(1) if m else None


def gsm8k_equal(answer: str, gold: str | None) -> bool:
    return gold is not None and float(answer) == float(gold)


def math_boxed(text: str) -> str | None:
    """The content of the last \\boxed{} that the paper's pattern matches (one nesting level)."""
    found = _MATH_BOX.findall(text) if isinstance(text, str) else []
    return found[-1] if found else None


def _braced_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3} (only the next character is taken as the argument)."""
    head, *parts = s.split("\\sqrt")
    out = head
    for p in parts:
        if not p:
            raise ValueError("\\sqrt without an argument")
        out += "\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:])
    return out


def _braced_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; unchanged when a \\frac has under two characters."""
    head, *parts = s.split("\\frac")
    out = head
    for p in parts:
        out += "\\frac"
        if not p:
            raise ValueError("\\frac without arguments")
        if p[0] == "{":
            out += p
            continue
        if len(p) < 2:
            return s
        a, b, rest = p[0], p[1], p[2:]
        out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
    return out


def _slash_fraction(s: str) -> str:
    """"3/4" (two plain integers) -> \\frac{3}{4}."""
    parts = s.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return s
    a, b = int(parts[0]), int(parts[1])
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def math_normalize(s: str) -> str:
    """The MATH benchmark's string normalisation (see the module docstring). ValueError where the
    benchmark's own code raises (e.g. two "\\text{ " unit markers): the caller then compares raw strings."""
    for a, b in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(a, b)
    if "\\text{ " in s:  # units written after the answer
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise ValueError("more than one unit marker")
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=3"
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_fraction(s)


def math_equal(answer: str | None, gold: str | None) -> bool:
    """The paper's check: both missing counts as equal, one missing as not; else normalised strings."""
    if answer is None or gold is None:
        return answer is None and gold is None
    try:
        return math_normalize(answer) == math_normalize(gold)
    except ValueError:
        return answer == gold


def _grade(env: Env, answer: str | None, ok: bool) -> Grade:
    if answer is None:
        return Grade(False, None, env.unparsed_reward)
    return Grade(ok, answer, env.correct_reward if ok else env.wrong_reward)


def grade_gsm8k(env: Env, response: str, reference: str) -> Grade:
    answer = gsm8k_answer(response)
    return _grade(env, answer, answer is not None and gsm8k_equal(answer, gsm8k_gold(reference)))


def grade_math(env: Env, response: str, reference: str) -> Grade:
    """The paper's MATH code rewards 0 for an unreadable answer: env.unparsed_reward says what we give."""
    answer = math_boxed(response)
    return _grade(env, answer, answer is not None and math_equal(answer, math_boxed(reference)))
