"""Metric definitions on hand-computed cases."""

import pytest

from rise_ray.eval.metrics import compute_metrics, majority_correct
from rise_ray.rollout.episodes import Trajectory, Turn


def turn(answer, correct, cands=None):
    cands = cands or [(answer, correct)]
    return Turn(
        response=f"\\boxed{{{answer}}}", answer=answer, reward=float(correct), correct=correct, source="policy",
        finished=True, degenerate=False, candidates=["" for _ in cands],
        candidate_answers=[a for a, _ in cands], candidate_rewards=[float(c) for _, c in cands],
        candidate_correct=[c for _, c in cands],
    )


def traj(turns, stop="turns"):
    return Trajectory("p", "q", "r", turns=turns, stop_reason=stop)


def key(a):
    return a


def test_majority_ties_go_to_latest():
    assert majority_correct(["1", "2"], [False, True], key)
    assert not majority_correct(["2", "1"], [True, False], key)
    assert majority_correct(["2", "1", "2"], [True, False, True], key)
    assert not majority_correct([None, None], [False, False], key)
    assert majority_correct([None, "3", None], [False, True, False], key)  # unreadable never votes


def test_hand_computed():
    # A: wrong, right, right  (first answer also in a parallel set with majority right)
    a = traj([turn("4", False, [("4", False), ("5", True), ("5", True)]), turn("5", True), turn("5", True)])
    # B: right, wrong, wrong  (parallel: all right)
    b = traj([turn("7", True, [("7", True), ("7", True), ("7", True)]), turn("1", False), turn("2", False)])
    # C: wrong, wrong, wrong  (parallel: one right)
    c = traj([turn("0", False, [("0", False), ("9", True), ("8", False)]), turn("1", False), turn("0", False)])
    m = compute_metrics([a, b, c], key, turns=3, parallel=3)
    assert m["m1@t1"] == pytest.approx(1 / 3)  # only B
    assert m["m3@t1"] == pytest.approx(2 / 3)  # A (5,5 vs 4) and B
    assert m["p3@t1"] == pytest.approx(1.0)
    assert m["m1@t3"] == pytest.approx(1 / 3)  # A: 5 twice; B: 7,1,2 tie -> latest 2 wrong; C wrong
    assert m["p1@t3"] == pytest.approx(2 / 3)
    assert m["acc_by_turn"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert m["wrong_to_right_by_turn"] == pytest.approx([1 / 3, 0])
    assert m["right_to_wrong_by_turn"] == pytest.approx([1 / 3, 0])
    assert m["wrong_to_right"] == pytest.approx(1 / 6) and m["right_to_wrong"] == pytest.approx(1 / 6)


def test_short_episode_keeps_last_answer():
    t = traj([turn("3", True)], stop="prompt_too_long")
    m = compute_metrics([t], key, turns=3, parallel=1)
    assert m["acc_by_turn"] == [1.0, 1.0, 1.0] and m["prompt_too_long"] == 1
    empty = compute_metrics([traj([], stop="prompt_too_long")], key, turns=2, parallel=1)
    assert empty["m1@t1"] == 0 and empty["p1@t2"] == 0


def test_keys_follow_turns_and_parallel():
    m = compute_metrics([traj([turn("1", True)] * 5)], key, turns=5, parallel=5)
    for k in ("m1@t1", "m5@t1", "p5@t1", "m1@t5", "p1@t5", "acc_by_turn", "wrong_to_right", "right_to_wrong"):
        assert k in m
    with pytest.raises(ValueError):
        compute_metrics([], key, turns=5, parallel=5)
