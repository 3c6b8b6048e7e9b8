"""Episodes that advance on their own (EpisodeSpec.schedule="async") beside turn-synchronous waves."""

from __future__ import annotations

import threading

import pytest
from test_episodes import ENV, P, ScriptedEngine, box

from rise_ray.envs.base import Problem
from rise_ray.rollout.engine import Completion, SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec, run_episodes


def _plain(trajs):
    return [t.to_record() for t in trajs]


# q3's first reply makes its next prompt too long (prompt length: characters; the limit: LIMIT).
SCRIPT = {
    "q1": [[box(1), box(5)], [box(5)], [box(3)]],
    "q2": [[box(2), box(2)], [box(4)], [box(7)]],
    "q3": [["x" * 200], [box(0)], [box(0)]],
}
PROBLEMS = [*P, Problem("p3", "q3", "0")]
LIMIT = 150
SPECS = [EpisodeSpec(turns=3, params=SamplingParams(max_tokens=5), first_n=2, **kw)
         for kw in ({"oracle": True}, {"oracle": False, "choose": "best", "later_n": 1})]


def scripted(script, cls=ScriptedEngine):
    engine = cls(script, lambda conv: sum(len(m["content"]) for m in conv))
    engine.max_model_len = LIMIT
    return engine


def asynchronous(spec: EpisodeSpec) -> EpisodeSpec:
    return EpisodeSpec(**{**spec.__dict__, "schedule": "async"})


def test_async_gives_the_waves_trajectories_with_oracle_teacher_and_too_long_prompts():
    teacher = {q: [c[:1] for c in cands] for q, cands in SCRIPT.items()}
    for spec in SPECS:
        waves = run_episodes(scripted(SCRIPT), ENV, PROBLEMS, spec, improver=scripted(teacher))
        each = run_episodes(scripted(SCRIPT), ENV, PROBLEMS, asynchronous(spec), improver=scripted(teacher))
        assert _plain(each) == _plain(waves)
        assert waves[2].stop_reason == "prompt_too_long" and len(waves[2].turns) == 1


class SteppingEngine(ScriptedEngine):
    """generate_continuous as a FIFO of single requests: a follow-up goes to the back of the queue,
    so episodes interleave (q1 turn 1, q2 turn 1, q3 turn 1, q1 turn 2, ...)."""

    def generate_continuous(self, first, follow_up):
        queue = list(enumerate(first))
        self.order = []
        while queue:
            k, (conv, n, params) = queue.pop(0)
            self.order.append((conv[0]["content"], sum(m["role"] == "assistant" for m in conv)))
            (cands,) = self.generate([conv], n, params)
            nxt = follow_up(k, cands)
            if nxt is not None:
                queue.append((k, nxt))


def test_continuous_engine_gives_the_waves_trajectories_interleaved():
    for spec in SPECS:
        waves = run_episodes(scripted(SCRIPT), ENV, PROBLEMS, spec)
        engine = scripted(SCRIPT, SteppingEngine)
        each = run_episodes(engine, ENV, PROBLEMS, asynchronous(spec))
        assert _plain(each) == _plain(waves)
        assert engine.order[:4] == [("q1", 0), ("q2", 0), ("q3", 0), ("q1", 1)]  # no barrier per turn
        assert each[2].stop_reason == "prompt_too_long"


class GatedEngine(ScriptedEngine):
    """A concurrent engine whose reply to q2's first turn waits until q1 has asked for its third
    turn: only episodes that advance on their own get there."""

    concurrent = True

    def __init__(self, script):
        super().__init__(script)
        self.q1_turn3 = threading.Event()
        self.lock = threading.Lock()

    def generate(self, convs, n, params):
        (conv,) = convs
        turn = sum(m["role"] == "assistant" for m in conv)
        if conv[0]["content"] == "q1" and turn == 2:
            self.q1_turn3.set()
        if conv[0]["content"] == "q2" and turn == 0:
            assert self.q1_turn3.wait(timeout=20), "q1 waited for q2's turn: a barrier per turn"
        with self.lock:
            return super().generate(convs, n, params)


def test_an_episode_takes_its_next_turn_without_waiting_for_the_others():
    script = {"q1": [[box(1)], [box(2)], [box(5)]], "q2": [[box(7)], [box(7)], [box(7)]]}
    engine = GatedEngine(script)
    trajs = run_episodes(engine, ENV, P, EpisodeSpec(turns=3, schedule="async"))
    assert [len(t.turns) for t in trajs] == [3, 3]
    assert [t.turns[-1].correct for t in trajs] == [True, True]


def test_a_failing_engine_call_fails_the_async_run():
    class Wrong(ScriptedEngine):
        def generate(self, convs, n, params):
            return [[Completion("a")], [Completion("b")]]  # two lists for one conversation

    with pytest.raises(ValueError):
        run_episodes(Wrong({}), ENV, P, EpisodeSpec(turns=1, schedule="async"))


@pytest.mark.timeout(300)
def test_greedy_hf_engine_gives_the_same_trajectories_either_way(tiny_model_dir):
    from rise_ray.envs import get_env
    from rise_ray.rollout.hf import HFEngine

    engine = HFEngine(tiny_model_dir, max_model_len=512)
    env = get_env("search", num_train=0, num_test=6)
    spec = EpisodeSpec(turns=3, params=SamplingParams(temperature=0, max_tokens=12), first_n=1)
    waves = run_episodes(engine, env, env.test, spec)
    each = run_episodes(engine, env, env.test, EpisodeSpec(**{**spec.__dict__, "schedule": "async"}))
    assert _plain(each) == _plain(waves)


def test_rollout_schedule_reaches_the_collection_spec():
    from rise_ray.collect import collect_spec
    from rise_ray.config import load_config

    cfg = load_config(overrides=["rollout.schedule=async", "rollout.engine=vllm"])
    assert collect_spec(cfg.rollout, 1).schedule == "async"
    assert collect_spec(load_config().rollout, 1).schedule == "waves"
