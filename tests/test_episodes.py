"""Episode logic with a scripted engine: oracle stop, best-of-N choice, context window, records."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rise_ray.data.store import read_trajectories, write_trajectories
from rise_ray.envs.base import Env, Problem
from rise_ray.rollout.engine import Completion, SamplingParams
from rise_ray.rollout.episodes import (
    EpisodeSpec,
    build_conversation,
    is_degenerate,
    run_episodes,
)


class BoxedEnv(Env):
    """Integer answers in \\boxed{}; the reference is the integer itself."""

    def extract(self, response):
        if "\\boxed{" not in response:
            return None
        return response.rsplit("\\boxed{", 1)[1].split("}", 1)[0]

    def gold(self, reference):
        return reference

    def is_equivalent(self, answer, gold):
        return answer.strip() == gold.strip()


class ScriptedEngine:
    """Answers from a script: script[question][turn] is the list of candidates to return."""

    max_model_len = 10_000

    def __init__(self, script, prompt_len=None):
        self.script = script
        self.calls: list[tuple[int, int]] = []  # (number of conversations, n) per call
        self.seen: list[list[dict]] = []
        self._prompt_len = prompt_len

    def prompt_len(self, conv):
        return self._prompt_len(conv) if self._prompt_len else sum(len(m["content"]) for m in conv)

    def generate(self, convs, n, params):
        self.calls.append((len(convs), n))
        out = []
        for conv in convs:
            self.seen.append(conv)
            turn = sum(m["role"] == "assistant" for m in conv)
            cands = self.script[conv[0]["content"]][turn]
            out.append([c if isinstance(c, Completion) else Completion(c) for c in cands[:n]])
        return out

    def update_weights(self, weights):
        pass

    def top_logprobs(self, conv, k=8):
        return []


def box(x):
    return f"so \\boxed{{{x}}}"


ENV = BoxedEnv(name="boxed")
P = [Problem("p1", "q1", "5"), Problem("p2", "q2", "7")]


def test_oracle_stops_at_first_correct_and_batches_turns():
    script = {"q1": [[box(1)], [box(5)], [box(9)]], "q2": [[box(7)], [box(0)], [box(0)]]}
    eng = ScriptedEngine(script)
    trajs = run_episodes(eng, ENV, P, EpisodeSpec(turns=3, oracle=True))
    assert [len(t.turns) for t in trajs] == [2, 1]
    assert [t.stop_reason for t in trajs] == ["correct", "correct"]
    assert eng.calls == [(2, 1), (1, 1)]  # all live conversations of a turn go in one call


def test_no_oracle_runs_all_turns_with_incorrect_feedback():
    script = {"q1": [[box(5)], [box(5)], [box(3)]], "q2": [[box(1)], [box(7)], [box(7)]]}
    eng = ScriptedEngine(script)
    trajs = run_episodes(eng, ENV, P, EpisodeSpec(turns=3, oracle=False))
    assert [len(t.turns) for t in trajs] == [3, 3]
    assert [x.correct for x in trajs[0].turns] == [True, True, False]
    last_prompt = [c for c in eng.seen if c[0]["content"] == "q1"][-1]
    assert [m["role"] for m in last_prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert last_prompt[2]["content"].startswith("The answer is incorrect. Please try again.")
    assert last_prompt[2]["content"].endswith("q1")  # the question is repeated after the feedback


def test_best_of_n_keeps_best_reward_and_first_on_ties():
    script = {"q1": [["no answer", box(2), box(5), box(5)]], "q2": [[box(1), box(2), "none", box(3)]]}
    trajs = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=1, first_n=4, choose="best"))
    t1, t2 = trajs[0].turns[0], trajs[1].turns[0]
    assert t1.response == box(5) and t1.correct and t1.reward == 1.0
    assert t1.candidate_rewards == [-1.0, 0.0, 1.0, 1.0]
    assert t2.response == box(1) and t2.reward == 0.0  # ties: the earliest candidate
    # evaluation never chooses by reward: the first candidate is kept
    t_eval = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=1, first_n=4, choose="first"))
    assert t_eval[0].turns[0].response == "no answer"


def test_first_n_and_later_n_and_teacher_improves_later_turns():
    script = {"q1": [[box(1), box(2)], [box(3), box(4), box(5)]], "q2": [[box(7), box(0)], [box(0)] * 3]}
    teacher_script = {"q1": [None, [box(8), box(5), box(9)]], "q2": [None, [box(0)] * 3]}
    policy, teacher = ScriptedEngine(script), ScriptedEngine(teacher_script)
    spec = EpisodeSpec(turns=2, first_n=1, later_n=3, choose="best", oracle=True)
    trajs = run_episodes(policy, ENV, P, spec, improver=teacher)
    assert policy.calls == [(2, 1)] and teacher.calls == [(1, 3)]
    assert [x.source for x in trajs[0].turns] == ["policy", "teacher"]
    assert trajs[0].turns[1].response == box(5) and trajs[0].turns[1].correct


def test_context_window_keeps_latest_attempts():
    conv = build_conversation(ENV, P[0], ["a1", "a2", "a3"], window=2)
    assert [m["content"] for m in conv if m["role"] == "assistant"] == ["a2", "a3"]
    assert conv[0] == {"role": "user", "content": "q1"}  # the question always stays
    full = build_conversation(ENV, P[0], ["a1", "a2", "a3"], window=None)
    assert len([m for m in full if m["role"] == "assistant"]) == 3


def official_prompt(question: str, attempts: list[str], context_window: int) -> list[str]:
    """The prompt of the paper's evaluation (cmu-mind/RISE workflow_eval.py), as its contents:
    before turn `context_window` the whole history, then the question and the latest
    context_window - 1 attempts, each followed by its feedback."""
    kept = attempts if len(attempts) < context_window else attempts[len(attempts) - context_window + 1:]
    out = [question]
    for a in kept:
        out += [a, f"{ENV.feedback}\n\n{question}"]
    return out


@pytest.mark.parametrize("official", [2, 3, 5])
def test_context_window_counts_attempts_kept_and_matches_the_paper_shifted_by_one(official):
    """Ours counts attempts; the paper's --context_window c counts the question too (c - 1 attempts)."""
    attempts = ["a1", "a2", "a3", "a4"]
    for t in range(len(attempts) + 1):  # the prompt of turn t + 1
        ours = [m["content"] for m in build_conversation(ENV, P[0], attempts[:t], window=official - 1)]
        assert ours == official_prompt("q1", attempts[:t], official), (official, t)
    # the paper configs' evaluation: --context_window 2 = the question and the latest attempt
    conv = build_conversation(ENV, P[0], attempts, window=1)
    assert [m["content"] for m in conv] == ["q1", "a4", f"{ENV.feedback}\n\nq1"]


def test_paper_configs_evaluate_as_the_paper_code():
    """temperature 1.0 and 1,000 new tokens (policies.py), the question + latest attempt
    (workflow_eval.py --context_window 2), its grading; collection keeps the whole history."""
    import glob
    import os

    from rise_ray.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = [p for p in glob.glob(os.path.join(root, "*.yaml"))
             if any(m in os.path.basename(p) for m in ("mistral7b", "llama3_8b", "math_eval"))]
    assert len(paths) == 6
    for path in paths:
        cfg = load_config(path)
        ev = cfg.eval
        assert (ev.temperature, ev.top_p, ev.max_tokens, ev.context_window) == (1.0, 1.0, 1000, 1), path
        assert cfg.env.grading == "paper" and cfg.rollout.context_window is None, path
        if cfg.env.name == "math":
            assert cfg.env.test_path == "DigitalLearningGmbH/MATH-lighteval" and cfg.env.unparsed_reward == 0.0, path


def test_context_window_is_applied_in_episodes():
    script = {"q1": [[box(1)], [box(2)], [box(3)], [box(4)]], "q2": [[box(1)], [box(2)], [box(3)], [box(4)]]}
    eng = ScriptedEngine(script)
    run_episodes(eng, ENV, P[:1], EpisodeSpec(turns=4, context_window=1))
    assert max(sum(m["role"] == "assistant" for m in c) for c in eng.seen) == 1


def test_degenerate_outputs_are_dropped_and_counted():
    loop = Completion("abc" + "xy" * 40, finished=False)
    assert is_degenerate(loop.text, finished=False)
    assert not is_degenerate("xy" * 40, finished=True)  # it ended on its own
    assert not is_degenerate("the answer is 12345", finished=False)  # cut, but not a loop
    script = {"q1": [[loop, box(5)]], "q2": [[loop, loop]]}
    trajs = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=1, first_n=2, choose="first", drop_degenerate=True))
    assert trajs[0].turns[0].response == box(5) and trajs[0].degenerate_dropped == 1
    assert trajs[1].turns[0].degenerate and trajs[1].degenerate_dropped == 2


def test_prompt_too_long_ends_episode_and_is_recorded():
    script = {"q1": [[box(1)], [box(2)]], "q2": [[box(1)], [box(2)]]}
    eng = ScriptedEngine(script, prompt_len=lambda conv: 100 * len(conv))
    eng.max_model_len = 150 + 16
    trajs = run_episodes(eng, ENV, P, EpisodeSpec(turns=2, params=SamplingParams(max_tokens=16)))
    assert [len(t.turns) for t in trajs] == [1, 1]
    assert all(t.stop_reason == "prompt_too_long" for t in trajs)


def test_records_round_trip_through_parquet(tmp_path):
    script = {"q1": [[box(1), "x"], [box(5)]], "q2": [[box(7), box(2)], [box(0)]]}
    trajs = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=2, first_n=2, oracle=True))
    path = str(tmp_path / "t.parquet")
    write_trajectories(trajs, path)
    assert pq.read_table(path).num_rows == 2
    assert read_trajectories(path) == trajs
    assert read_trajectories(str(tmp_path)) == trajs


@pytest.mark.parametrize("bad", [None, 3])
def test_generate_must_return_one_list_per_conversation(bad):
    class Short(ScriptedEngine):
        def generate(self, convs, n, params):
            return [] if bad is None else [[Completion("x")]] * bad

    with pytest.raises(ValueError):
        run_episodes(Short({}), ENV, P, EpisodeSpec(turns=1))


def test_improve_distinct_never_picks_a_repeat_of_a_wrong_earlier_answer_and_marks_all_repeats():
    # q1: turn 2's candidates are [wrong 1 again, wrong 3]; turn 3's are all repeats of wrong answers.
    # q2: turn 1 right (7); turn 2 may repeat the right 7: only wrong answers are excluded.
    script = {"q1": [[box(1)], [box(1), box(3)], [box(3), box(1)]], "q2": [[box(7)], [box(7), box(0)], [box(0), box(7)]]}
    spec = EpisodeSpec(turns=3, later_n=2, choose="best", improve_distinct=True)
    t1, t2 = run_episodes(ScriptedEngine(script), ENV, P, spec)
    assert [t.answer for t in t1.turns] == ["1", "3", "3"]
    assert [t.repeats_wrong for t in t1.turns] == [False, False, True]
    assert [t.answer for t in t2.turns] == ["7", "7", "7"] and not any(t.repeats_wrong for t in t2.turns)
    # without the lever the first of equally rewarded candidates is kept: the copy of wrong 1
    (plain, _) = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=3, later_n=2, choose="best"))
    assert [t.answer for t in plain.turns] == ["1", "1", "3"] and not any(t.repeats_wrong for t in plain.turns)


def test_repeats_wrong_survives_the_parquet_round_trip(tmp_path):
    script = {"q1": [[box(1)], [box(1)]], "q2": [[box(7)], [box(7)]]}
    trajs = run_episodes(ScriptedEngine(script), ENV, P, EpisodeSpec(turns=2, choose="best", improve_distinct=True))
    write_trajectories(trajs, str(tmp_path / "part-00000.parquet"))
    back = read_trajectories(str(tmp_path))
    assert [[t.repeats_wrong for t in tr.turns] for tr in back] == [[False, True], [False, False]]
