"""GSM8K answers as a real chat model writes them: 48 replies of SmolLM2-135M-Instruct to the
first 24 GSM8K test problems (vLLM CPU build, temperature 0.7, 320 tokens), kept as fixtures with
the answer a reader should take from each (checked by hand)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rise_ray.envs.answers import last_boxed
from rise_ray.envs.gsm8k import GSM8KEnv, after_answer_is, after_hashes

REPLIES = [json.loads(line) for line in (Path(__file__).parent / "fixtures" / "smollm2_gsm8k_replies.jsonl").open()]
ENV = GSM8KEnv(train=[], test=[])


def test_every_reply_reads_as_checked_and_unreadable_ones_get_the_unparsed_reward():
    kinds = Counter()
    for r in REPLIES:
        got = ENV.extract(r["response"])
        assert got == r["expected"], r["id"]
        grade = ENV.grade(r["response"], f"#### {r['gold']}")
        if got is None:
            assert grade.reward == ENV.unparsed_reward and not grade.correct
        kinds["boxed" if last_boxed(r["response"]) else "hashes" if after_hashes(r["response"])
              else "answer is" if after_answer_is(r["response"]) else "none"] += 1
    # The fixtures hold every form the model writes: the reader must take each of them.
    assert kinds["boxed"] >= 1 and kinds["hashes"] >= 5 and kinds["answer is"] >= 5 and kinds["none"] >= 10


@pytest.mark.parametrize("reply, expected", [
    ("so she makes 9 * 2 = 18.\n#### 18\nThe answer is: 18", "18"),            # hashes before "answer is"
    ("#### 2800\nsold 96 donuts.\n#### 96\nThe answer is \\boxed{96}.", "96"),  # the box wins
    ("The answer is: 520.", "520"),
    ("So, the answer is $1,200.", "1,200"),
    ("The final answer is: **42**", "42"),
    ("So, the answer is: 2x.\n\nThe answer is 2x.", None),                     # glued to letters: no number
    ("Here is the final answer: 4 bolts in total.", None),
])
def test_reading_order_box_then_hashes_then_answer_is(reply, expected):
    assert ENV.extract(reply) == expected


def test_a_right_answer_in_each_form_is_correct():
    for reply in ("\\boxed{18}", "#### 18", "The answer is: 18.", "the answer is $18.00"):
        assert ENV.grade(reply, "Janet sells 9 eggs.\n#### 18").correct, reply
