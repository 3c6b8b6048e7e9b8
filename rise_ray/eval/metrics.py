"""RISE evaluation metrics, computed from no-oracle trajectories (DESIGN.md defines each).

Each evaluation trajectory has T sequential turns (feedback always "incorrect") and k parallel
candidates at turn 1, the first of which is the sequential turn 1 (so m1@t1 is shared):
  m1@t1   the first answer is correct
  m{k}@t1 majority of the k parallel first answers is correct (the equal-compute baseline)
  p{k}@t1 any of the k parallel first answers is correct
  m1@t{T} majority over the T sequential answers is correct (no oracle; ties go to the latest)
  p1@t{T} correct at any of the T turns (what an oracle that stops at the first correct gets)
  acc_by_turn[i]   accuracy of turn i+1
  wrong_to_right / right_to_wrong  share of problems whose answer flips between consecutive
                                   turns, averaged over the T-1 turn pairs (SCoRe's Δi→c, Δc→i)
An episode cut short (prompt too long) keeps its last answer for the turns it could not take.
Unreadable answers never win a vote; a problem where nothing was readable counts as wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rise_ray.rollout.episodes import Trajectory


def majority_index(answers: Sequence[str | None], key: Callable[[str | None], str | None]) -> int | None:
    """Index of the winning answer: the most frequent readable key, ties to the latest; the index
    is that key's latest occurrence. None when no answer was readable."""
    counts: dict[str, int] = {}
    last_seen: dict[str, int] = {}
    for i, a in enumerate(answers):
        k = key(a)
        if k is None:
            continue
        counts[k] = counts.get(k, 0) + 1
        last_seen[k] = i
    if not counts:
        return None
    return last_seen[max(counts, key=lambda k: (counts[k], last_seen[k]))]


def majority_correct(
    answers: Sequence[str | None], correct: Sequence[bool], key: Callable[[str | None], str | None]
) -> bool:
    """Whether the majority answer is correct (unreadable answers never win)."""
    i = majority_index(answers, key)
    return i is not None and bool(correct[i])


def _padded(traj: Trajectory, turns: int) -> tuple[list[str | None], list[bool]]:
    answers = [t.answer for t in traj.turns]
    correct = [t.correct for t in traj.turns]
    if not answers:  # not even turn 1 fitted the context: wrong, unreadable
        return [None] * turns, [False] * turns
    pad = turns - len(answers)
    return answers + [answers[-1]] * pad, correct + [correct[-1]] * pad


def compute_metrics(
    trajs: Sequence[Trajectory], answer_key: Callable[[str | None], str | None], turns: int, parallel: int
) -> dict:
    n = len(trajs)
    if n == 0:
        raise ValueError("no trajectories to score")
    m1t1 = mkt1 = pkt1 = m1tT = p1tT = 0
    acc = [0] * turns
    w2r = [0] * max(turns - 1, 0)
    r2w = [0] * max(turns - 1, 0)
    degenerate = too_long = 0
    for tr in trajs:
        answers, correct = _padded(tr, turns)
        first = tr.turns[0] if tr.turns else None
        par_a = first.candidate_answers[:parallel] if first else []
        par_c = first.candidate_correct[:parallel] if first else []
        m1t1 += correct[0]
        mkt1 += majority_correct(par_a, par_c, answer_key)
        pkt1 += any(par_c)
        m1tT += majority_correct(answers, correct, answer_key)
        p1tT += any(correct)
        for i in range(turns):
            acc[i] += correct[i]
        for i in range(turns - 1):
            w2r[i] += (not correct[i]) and correct[i + 1]
            r2w[i] += correct[i] and not correct[i + 1]
        degenerate += sum(t.degenerate or not t.finished for t in tr.turns)
        too_long += tr.stop_reason == "prompt_too_long"
    pairs = max(turns - 1, 1)
    return {
        "m1@t1": m1t1 / n,
        f"m{parallel}@t1": mkt1 / n,
        f"p{parallel}@t1": pkt1 / n,
        f"m1@t{turns}": m1tT / n,
        f"p1@t{turns}": p1tT / n,
        "acc_by_turn": [a / n for a in acc],
        "wrong_to_right": sum(w2r) / n / pairs,
        "right_to_wrong": sum(r2w) / n / pairs,
        "wrong_to_right_by_turn": [x / n for x in w2r],
        "right_to_wrong_by_turn": [x / n for x in r2w],
        "num_problems": n,
        "turns": turns,
        "parallel": parallel,
        "unfinished_answers": degenerate,
        "prompt_too_long": too_long,
    }
