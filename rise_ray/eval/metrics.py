"""RISE evaluation metrics, computed from no-oracle trajectories.

Each evaluation trajectory has T sequential turns (feedback always "incorrect") and k parallel
candidates at turn 1, the first of which is the sequential turn 1 (so m1@t1 is shared):
  m1@t1   the first answer is correct
  m{k}@t1 majority of the k parallel first answers is correct (the equal-compute baseline)
  p{k}@t1 any of the k parallel first answers is correct
  m1@t{T} majority over the T sequential answers is correct (no oracle)
  p1@t{T} correct at any of the T turns (what an oracle that stops at the first correct gets)
  acc_by_turn[i]   accuracy of turn i+1
  wrong_to_right / right_to_wrong  share of problems whose answer flips between consecutive
                                   turns, averaged over the T-1 turn pairs (SCoRe's Δi→c, Δc→i)
  tie_rate / tie_rate_parallel     share of problems whose sequential / parallel vote was a tie

Both majorities use one neutral rule: the expected accuracy under a uniform random tie-break. The
answers with the most votes win; a tie of j answers that holds the correct one scores 1/j. (A
rule that sends ties to the latest turn would favour the sequential protocol over the parallel
baseline, whose candidates have no order.) Unreadable answers never vote; a problem where nothing
was readable scores 0 and is no tie. An episode cut short (prompt too long) has no answer at the
turns it could not take: those turns abstain from the vote and count as not correct at their turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rise_ray.rollout.episodes import Trajectory

Key = Callable[[str | None], str | None]


def vote(answers: Sequence[str | None], correct: Sequence[bool], key: Key) -> tuple[float, int]:
    """(score, j): the expected correctness of the majority answer under a uniform random tie-break,
    and the number j of answers sharing the most votes (j >= 2: a tie; 0: nothing readable).

    An answer key counts as correct when any answer with that key was graded correct."""
    counts: dict[str, int] = {}
    right: dict[str, bool] = {}
    for a, c in zip(answers, correct, strict=True):
        k = key(a)
        if k is None:
            continue
        counts[k] = counts.get(k, 0) + 1
        right[k] = right.get(k, False) or bool(c)
    if not counts:
        return 0.0, 0
    top = max(counts.values())
    winners = [k for k, n in counts.items() if n == top]
    return sum(right[k] for k in winners) / len(winners), len(winners)


def majority_index(answers: Sequence[str | None], key: Key) -> int | None:
    """Index of one winning answer, for a caller that must pick one (serving): the most frequent
    readable key, ties to the latest; the index is that key's latest occurrence. None when no
    answer was readable. Metrics do not use this pick: they score ties neutrally (`vote`)."""
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


def _turns(traj: Trajectory, turns: int) -> tuple[list[str | None], list[bool]]:
    """Answers and correctness of the first `turns` turns; a turn never taken abstains (None, False)."""
    answers: list[str | None] = [t.answer for t in traj.turns[:turns]]
    correct = [bool(t.correct) for t in traj.turns[:turns]]
    missing = turns - len(answers)
    return answers + [None] * missing, correct + [False] * missing


def compute_metrics(trajs: Sequence[Trajectory], answer_key: Key, turns: int, parallel: int) -> dict:
    n = len(trajs)
    if n == 0:
        raise ValueError("no trajectories to score")
    m1t1 = mkt1 = pkt1 = m1tT = p1tT = 0.0
    ties = ties_par = 0
    acc = [0] * turns
    w2r = [0] * max(turns - 1, 0)
    r2w = [0] * max(turns - 1, 0)
    degenerate = too_long = 0
    for tr in trajs:
        answers, correct = _turns(tr, turns)
        first = tr.turns[0] if tr.turns else None
        par_a = list(first.candidate_answers[:parallel]) if first else []
        par_c = list(first.candidate_correct[:parallel]) if first else []
        m1t1 += correct[0]
        score, j = vote(par_a, par_c, answer_key)
        mkt1 += score
        ties_par += j >= 2
        pkt1 += any(par_c)
        score, j = vote(answers, correct, answer_key)
        m1tT += score
        ties += j >= 2
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
        "tie_rate": ties / n,
        "tie_rate_parallel": ties_par / n,
        "num_problems": n,
        "turns": turns,
        "parallel": parallel,
        "unfinished_answers": degenerate,
        "prompt_too_long": too_long,
    }
