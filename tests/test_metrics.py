"""Metric definitions on hand-computed cases."""

import pytest

from rise_ray.eval.metrics import compute_metrics, majority_index, vote
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


def test_vote_scores_ties_as_expected_accuracy():
    assert vote(["1", "2"], [False, True], key) == (0.5, 2)  # whatever the order
    assert vote(["2", "1"], [True, False], key) == (0.5, 2)
    assert vote(["2", "1", "2"], [True, False, True], key) == (1.0, 1)
    assert vote(["2", "1", "2"], [False, True, False], key) == (0.0, 1)
    assert vote(["1", "2", "3"], [False, False, True], key) == pytest.approx((1 / 3, 3))
    assert vote(["1", "1", "2", "2", "3"], [True, True, False, False, False], key) == (0.5, 2)
    assert vote([None, None], [False, False], key) == (0.0, 0)  # nothing readable: wrong, no tie
    assert vote([None, "3", None], [False, True, False], key) == (1.0, 1)  # unreadable never votes
    assert vote([], [], key) == (0.0, 0)
    # keys decide what counts as the same answer
    assert vote(["7", " 7", "8"], [True, True, False], str.strip) == (1.0, 1)


def test_majority_index_still_picks_one_for_serving():
    assert majority_index(["1", "2"], key) == 1 and majority_index(["2", "1", "2"], key) == 2
    assert majority_index([None], key) is None


# Five problems, T = 3 turns, k = 4 parallel first answers, worked out by hand:
#            sequential answers (correct?)     vote            parallel answers        vote
#   A        4 F, 5 T, 5 T                     5 wins: 1       4 F, 5 T, 4 F, 5 T       tie 2: 1/2
#   B        7 T, 1 F, 2 F                     tie 3: 1/3      7 T, 7 T, 3 F, -         7 wins: 1
#   C        0 F, 1 F, 0 F                     0 wins: 0       0 F, 9 T, 8 F, 6 F       tie 4: 1/4
#   E        2 F, 6 T, (cut short)             tie 2: 1/2      2 F, 6 T, 2 F, 6 T       tie 2: 1/2
#   F        (cut short before turn 1)         nothing: 0      none                     nothing: 0
# Padding E with its last answer would have made 6 win (score 1); its missing turn abstains.
def five_problems():
    a = traj([turn("4", False, [("4", False), ("5", True), ("4", False), ("5", True)]), turn("5", True),
              turn("5", True)])
    b = traj([turn("7", True, [("7", True), ("7", True), ("3", False), (None, False)]), turn("1", False),
              turn("2", False)])
    c = traj([turn("0", False, [("0", False), ("9", True), ("8", False), ("6", False)]), turn("1", False),
              turn("0", False)])
    e = traj([turn("2", False, [("2", False), ("6", True), ("2", False), ("6", True)]), turn("6", True)],
             stop="prompt_too_long")
    f = traj([], stop="prompt_too_long")
    return [a, b, c, e, f]


def test_hand_computed_with_ties_and_cut_short_episodes():
    m = compute_metrics(five_problems(), key, turns=3, parallel=4)
    assert m["m1@t1"] == pytest.approx(1 / 5)  # B
    assert m["m4@t1"] == pytest.approx((1 / 2 + 1 + 1 / 4 + 1 / 2 + 0) / 5)
    assert m["p4@t1"] == pytest.approx(4 / 5)  # all but F
    assert m["m1@t3"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2 + 0) / 5)
    assert m["p1@t3"] == pytest.approx(3 / 5)  # A, B, E
    assert m["tie_rate"] == pytest.approx(2 / 5)  # B, E
    assert m["tie_rate_parallel"] == pytest.approx(3 / 5)  # A, C, E
    # turn 3 of E was never taken: not correct there (it counts as a lost right answer)
    assert m["acc_by_turn"] == pytest.approx([1 / 5, 2 / 5, 1 / 5])
    assert m["wrong_to_right_by_turn"] == pytest.approx([2 / 5, 0])  # A, E
    assert m["right_to_wrong_by_turn"] == pytest.approx([1 / 5, 1 / 5])  # B; E
    assert m["wrong_to_right"] == pytest.approx(1 / 5) and m["right_to_wrong"] == pytest.approx(1 / 5)
    assert m["prompt_too_long"] == 2 and m["num_problems"] == 5


def test_sequential_and_parallel_votes_use_the_same_rule():
    """The same answers score the same as T sequential turns or as k parallel first answers, in
    any order: no rule may favour one protocol (ties to the latest turn did)."""
    answers = [("3", False), ("5", True), ("3", False), ("5", True)]
    for order in (answers, answers[::-1], answers[1:] + answers[:1]):
        seq = traj([turn(order[0][0], order[0][1], order)] + [turn(a, c) for a, c in order[1:]])
        m = compute_metrics([seq], key, turns=4, parallel=4)
        assert m["m1@t4"] == m["m4@t1"] == 0.5
        assert m["tie_rate"] == m["tie_rate_parallel"] == 1.0


def test_cut_short_episode_abstains():
    t = traj([turn("3", True)], stop="prompt_too_long")
    m = compute_metrics([t], key, turns=3, parallel=1)
    assert m["acc_by_turn"] == [1.0, 0.0, 0.0] and m["prompt_too_long"] == 1
    assert m["m1@t3"] == 1.0 and m["tie_rate"] == 0.0  # its one answer is the majority
    empty = compute_metrics([traj([], stop="prompt_too_long")], key, turns=2, parallel=1)
    assert empty["m1@t1"] == 0 and empty["p1@t2"] == 0 and empty["m1@t2"] == 0


def test_keys_follow_turns_and_parallel():
    m = compute_metrics([traj([turn("1", True)] * 5)], key, turns=5, parallel=5)
    for k in ("m1@t1", "m5@t1", "p5@t1", "m1@t5", "p1@t5", "acc_by_turn", "wrong_to_right", "right_to_wrong",
              "tie_rate", "tie_rate_parallel"):
        assert k in m
    with pytest.raises(ValueError):
        compute_metrics([], key, turns=5, parallel=5)


def test_report_carries_tie_rates_and_the_protocol(tmp_path):
    import json

    from rise_ray.config import RunConfig, dump_config
    from rise_ray.report import write_report

    cfg = RunConfig.model_validate({"eval": {"turns": 3, "parallel": 4, "split": "val", "context_window": 1}})
    dump_config(cfg, str(tmp_path / "config.yaml"))
    for k in (0, 1):
        (tmp_path / f"iter_{k}" / "eval").mkdir(parents=True)
        m = compute_metrics(five_problems(), key, turns=3, parallel=4)
        (tmp_path / f"iter_{k}" / "eval" / "metrics.json").write_text(json.dumps(m))
    write_report(str(tmp_path), wall_s=1.0)
    rows = json.loads((tmp_path / "metrics.json").read_text())["iterations"]
    assert [r["tie_rate"] for r in rows] == pytest.approx([2 / 5, 2 / 5])
    assert [r["tie_rate_parallel"] for r in rows] == pytest.approx([3 / 5, 3 / 5])
    md = (tmp_path / "report.md").read_text()
    assert "| tie_rate | tie_rate_parallel |" in md and "| 40.0 | 60.0 |" in md
    assert "of the val split" in md and "the latest 1 attempt(s)" in md and "temperature 1.0" in md
