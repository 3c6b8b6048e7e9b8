"""env.grading: paper grades as the paper's code (cmu-mind/RISE environments/gsm8k.py, math.py)."""

from __future__ import annotations

import json
import random

import pytest
from test_envs import GARBAGE, GSM8K_TEST, MATH_TEST, need, write_jsonl

from rise_ray.config import EnvConfig
from rise_ray.envs import Grade, env_options, get_env
from rise_ray.envs.paper_grading import math_boxed, math_equal, math_normalize
from rise_ray.session import make_env

GSM8K_REF = "She pays 3 * 5 = <<3*5=15>>15.\n#### 15"


@pytest.fixture
def gsm8k(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"question": "q?", "answer": GSM8K_REF})])
    return get_env("gsm8k", test_path=path, grading="paper"), get_env("gsm8k", test_path=path)


@pytest.mark.parametrize("response, paper, default", [
    ("so \\boxed{15}", Grade(True, "15", 1.0), Grade(True, "15", 1.0)),
    ("\\boxed{1,5}", Grade(True, "15", 1.0), Grade(False, "1,5", 0.0)),  # every comma dropped
    ("\\boxed{15.0}", Grade(False, None, -1.0), Grade(True, "15.0", 1.0)),  # not an integer: no answer
    ("\\boxed{\\$15}", Grade(False, None, -1.0), Grade(True, "\\$15", 1.0)),
    ("Step.\n#### 15", Grade(False, None, -1.0), Grade(True, "15", 1.0)),  # only \boxed{} counts
    ("\\boxed{\\frac{30}{2}}", Grade(False, None, -1.0), Grade(True, "\\frac{30}{2}", 1.0)),
    ("\\boxed{15} no, \\boxed{16}", Grade(False, "16", 0.0), Grade(False, "16", 0.0)),  # the last box
    ("\\boxed{-15}", Grade(False, "-15", 0.0), Grade(False, "-15", 0.0)),
    ("no answer", Grade(False, None, -1.0), Grade(False, None, -1.0)),
])
def test_gsm8k_paper_grading(gsm8k, response, paper, default):
    env_paper, env_default = gsm8k
    ref = env_paper.test[0].reference
    assert env_paper.grade(response, ref) == paper
    assert env_default.grade(response, ref) == default


def test_gsm8k_paper_gold_stops_at_a_comma():
    """As the paper's code: "#### 2,125" reads as 2, so such a problem is lost (14 of GSM8K's 1,319
    test golds carry a comma); comparable numbers need the same quirk."""
    env = get_env("gsm8k", grading="paper")
    assert not env.grade("\\boxed{2125}", "x\n#### 2,125").correct
    assert env.grade("\\boxed{2}", "x\n#### 2,125").correct


def test_gsm8k_paper_grading_on_every_test_reference():
    env = get_env("gsm8k", test_path=need(GSM8K_TEST), grading="paper")
    lost = 0
    for p in env.test:
        n = int(env.gold(p.reference).replace(",", "")) if "," not in p.reference.split("####")[-1] else None
        if n is None:
            lost += 1
            continue
        assert env.grade(f"so \\boxed{{{n}}}", p.reference) == Grade(True, str(n), 1.0), p.id
        assert env.grade(f"so \\boxed{{{n + 1}}}", p.reference).reward == 0.0, p.id
        assert env.grade(f"#### {n}", p.reference) == Grade(False, None, -1.0), p.id
    assert lost == 14


@pytest.mark.parametrize("answer, gold", [
    ("\\dfrac{1}{2}", "\\frac12"), ("0.5", "\\frac{1}{2}"), ("3/4", "\\frac{3}{4}"), ("x = 3", "3"),
    ("3\\text{ cm}", "3"), ("\\sqrt3", "\\sqrt{3}"), ("10,\\!080", "10,080"), ("90^\\circ", "90"),
    ("\\left( 1, 2 \\right)", "(1,2)"), (".5", "0.5"), ("\\$5", "5"), ("50\\%", "50"),
])
def test_math_paper_normalisation_equates(answer, gold):
    assert math_equal(answer, gold)


@pytest.mark.parametrize("answer, gold", [
    ("10080", "10,\\!080"),  # no numeric parsing: the default grading says equal, the paper's does not
    ("\\frac{2}{4}", "\\frac{1}{2}"), ("2x", "x2"), ("y = 3", "x = 3 + 0"),
])
def test_math_paper_normalisation_keeps_apart(answer, gold):
    assert not math_equal(answer, gold)


def test_math_paper_edge_cases():
    assert math_boxed("so \\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}"  # one nesting level, as the paper
    assert math_boxed("\\boxed{1} then \\boxed{2}") == "2" and math_boxed("none") is None
    assert math_equal(None, None) and not math_equal("1", None) and not math_equal(None, "1")
    with pytest.raises(ValueError):
        math_normalize("1\\text{ m}\\text{ s}")
    assert math_equal("1\\text{ m}\\text{ s}", "1\\text{ m}\\text{ s}")  # the raw strings then decide
    assert not math_equal("\\sqrt", "\\sqrt{}")


def test_math_paper_grading_on_every_test_solution():
    env = get_env("math", test_path=need(MATH_TEST), grading="paper", unparsed_reward=0.0)
    assert len(env.test) == 1000
    right = sum(env.grade(p.reference, p.reference).correct for p in env.test)
    assert right == 1000  # a solution is graded right against itself
    p = env.test[0]  # gold 1000000
    assert env.grade("so \\boxed{1000000}", p.reference) == Grade(True, "1000000", 1.0)
    assert env.grade("so \\boxed{10^6}", p.reference) == Grade(False, "10^6", 0.0)  # default: right
    assert get_env("math", timeout_seconds=1.0).grade("so \\boxed{10^6}", p.reference).correct
    assert env.grade("no box", p.reference) == Grade(False, None, 0.0)


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_paper_grading_never_raises(name):
    env = get_env(name, grading="paper")
    rng = random.Random(0)
    alphabet = "\\{}$#0123456789+-*/^_.,()[]= xabcdefrbox\n"
    randoms = ["\\boxed{" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) + "}" for _ in range(300)]
    for response in GARBAGE + randoms:
        for ref in ("#### 1,000", "so $\\boxed{\\frac{1}{2}}$", "", "garbage {"):
            g = env.grade(response, ref)
            assert isinstance(g, Grade) and g.reward in (1.0, 0.0, -1.0)


def test_grading_option_is_checked_and_reaches_the_env():
    with pytest.raises(ValueError, match="grading must be one of \\['default'\\]"):
        get_env("search", num_train=1, num_test=1, grading="paper")
    with pytest.raises(ValueError, match="grading must be one of"):
        get_env("gsm8k", grading="papers")
    assert make_env(EnvConfig(name="gsm8k", grading="paper")).grading == "paper"
    assert "grading" not in env_options(EnvConfig(name="search"))  # custom envs need not know it
    with pytest.raises(ValueError, match="grading"):
        EnvConfig(name="gsm8k", grading="official")
