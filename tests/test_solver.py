"""The programmatic arithmetic teacher (teacher.engine=solver): its worked solutions are right and
read by the env's grader, it reads the question from the conversation (feedback turns included),
and configs that cannot use it are refused."""

from __future__ import annotations

import pytest

from rise_ray.config import ConfigError, load_config
from rise_ray.envs.arithmetic import make_arithmetic
from rise_ray.rollout import make_engine
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import build_conversation
from rise_ray.rollout.solver import worked_solution


def test_worked_solutions_split_the_larger_factor_and_box_the_product():
    assert worked_solution(7, "*", 23) == "7*23 = 7*20 + 7*3 = 140 + 21 = 161. The answer is \\boxed{161}."
    assert worked_solution(14, "*", 3) == "14*3 = 3*10 + 3*4 = 30 + 12 = 42. The answer is \\boxed{42}."
    assert worked_solution(6, "*", 20) == "6*20 = 120. The answer is \\boxed{120}."
    assert worked_solution(47, "+", 8) == "47+8 = 55. The answer is \\boxed{55}."


@pytest.mark.parametrize("task,b_range", [("mul", (2, 25)), ("add", (1, 9))])
def test_the_solver_is_right_on_every_problem_at_every_turn(task, b_range):
    env = make_arithmetic(task=task, num_train=40, num_test=0, b_range=b_range, seed=3,
                          system_prompt="Put your final answer in \\boxed{}.")
    solver = make_engine("solver", "solver", max_model_len=1024, dtype="auto")
    convs = [build_conversation(env, p, ["\\boxed{1}"] * k, None) for k, p in enumerate(env.train[:40:4])]
    outs = solver.generate(convs, 2, SamplingParams())
    assert all(len(o) == 2 for o in outs)
    for p, (c, _) in zip(env.train[:40:4], outs, strict=True):
        assert env.grade_problem(c.text, p).correct, (p.question, c.text)


def test_a_question_it_cannot_read_gets_a_reply_graded_wrong_not_an_error():
    env = make_arithmetic(task="mul", num_train=4, num_test=0, b_range=(2, 25), seed=3)
    solver = make_engine("solver", "solver")
    ((reply,),) = solver.generate([[{"role": "user", "content": "What is seven times eight?"}]], 1, SamplingParams())
    assert "can only solve" in reply.text and not env.grade_problem(reply.text, env.train[0]).correct


def test_configs_that_cannot_use_the_solver_are_refused():
    solver = ["rollout.improve_with=teacher", "teacher.engine=solver"]
    with pytest.raises(ConfigError, match="solver.*arithmetic"):
        load_config(None, ["env.name=gsm8k", *solver])
    # The arithmetic env's default task is linear ("Solve for x: ..."), which the solver cannot read:
    # every answer it gave would be graded wrong in silence.
    for task in ([], ["env.options.task=linear"], ["env.options.task=muladd"]):
        with pytest.raises(ConfigError, match="teacher.engine 'solver'.*env.options.task '(linear|muladd)'"):
            load_config(None, ["env.name=arithmetic", *solver, *task])
    with pytest.raises(ConfigError, match="teacher.num_gpus_per_engine=0"):
        load_config(None, ["env.name=arithmetic", "env.options.task=mul", *solver, "teacher.num_gpus_per_engine=1"])
    for task in ("mul", "add"):
        cfg = load_config(None, ["env.name=arithmetic", f"env.options.task={task}", *solver])
        assert cfg.teacher.path is None  # no model to name


@pytest.mark.timeout(300)
def test_a_pool_run_with_the_solver_as_teacher_gives_its_worked_solutions_after_the_first_turn(
    ray_local, tiny_model_dir
):
    """Through Ray Data and the engine actors as a collection runs them: the policy answers turn
    1, the solver every later turn (its prompt lengths counted on its own actor: no tokenizer)."""
    from rise_ray.rollout.episodes import EpisodeSpec
    from rise_ray.rollout.pool import RolloutPool

    env = make_arithmetic(task="mul", num_train=0, num_test=6, b_range=(2, 25), seed=1)
    policy = RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5, engine_kwargs={"max_model_len": 512})
    teacher = RolloutPool("solver", "solver", num_engines=1, num_cpus=0.1, engine_kwargs={"max_model_len": 4096})
    try:
        spec = EpisodeSpec(turns=3, params=SamplingParams(max_tokens=8, seed=0), first_n=1, later_n=2, choose="best")
        trajs = policy.run(env.name, {"task": "mul", "b_range": [2, 25], "num_train": 0, "num_test": 0}, env.test, spec, batch_size=3,
                           teacher=teacher, progress=None)  # fmt: skip
    finally:
        policy.shutdown()
        teacher.shutdown()
    assert len(trajs) == 6
    for traj, p in zip(trajs, env.test, strict=True):
        assert [t.source for t in traj.turns] == ["policy", "teacher", "teacher"]
        assert all(t.correct and t.response.endswith(f"\\boxed{{{p.meta['a'] * p.meta['b']}}}.") for t in traj.turns[1:]), (p, traj.turns)
