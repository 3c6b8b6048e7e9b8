"""The persistent rollout pool: in-place weight sync with the logprob check, and a dead actor.

Where a test needs an engine call in flight (to kill its actor, or to keep a batch busy), the
engine is the real transformers engine behind a gate: each generate call reports to a Gate actor
and waits there until the test opens it. The test acts on that event, not on a guess of how long
the work takes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time

import pytest
import ray
from conftest import perturbed_copy

from rise_ray.envs import get_env
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec
from rise_ray.rollout.hf import HFEngine
from rise_ray.rollout.pool import RolloutPool
from rise_ray.rollout.sync import check_engines, load_state_dict

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the engine class below travels by value


@ray.remote(num_cpus=0)
class Gate:
    """Engine calls wait here until `open`; `wait_entered` returns once one has arrived."""

    def __init__(self):
        self.opened, self.entered = asyncio.Event(), asyncio.Event()
        self.calls = 0

    async def enter(self) -> None:
        self.calls += 1
        self.entered.set()
        await self.opened.wait()

    async def wait_entered(self) -> int:
        await self.entered.wait()
        return self.calls

    async def open(self) -> None:
        self.opened.set()


class GatedEngine(HFEngine):
    """The transformers engine; every generate call first passes the gate."""

    def __init__(self, model_path, gate=None, **kw):
        super().__init__(model_path, **kw)
        self.gate = gate

    def generate(self, conversations, n, params):
        ray.get(self.gate.enter.remote())
        return super().generate(conversations, n, params)


@pytest.fixture(scope="module")
def perturbed_ckpt(tiny_model_dir, tmp_path_factory) -> str:
    return perturbed_copy(tiny_model_dir, str(tmp_path_factory.mktemp("perturbed") / "model"), 0.05, seed=1)


@pytest.mark.timeout(300)
def test_sync_in_place_and_logprob_check(ray_local, tiny_model_dir, perturbed_ckpt, tmp_path):
    pointer = str(tmp_path / "weights.json")
    pool = RolloutPool("hf", tiny_model_dir, num_engines=2, num_cpus=0.5, pointer_path=pointer)
    pids = {info["pid"] for info in ray_local.get([a.info.remote() for a in pool.actors])}
    assert check_engines(pool, tiny_model_dir, tolerance=1e-4)["max_logprob_error"] < 1e-4
    with pytest.raises(RuntimeError, match="weight sync check failed"):
        check_engines(pool, perturbed_ckpt, tolerance=1e-4)  # engines still hold the old weights
    seconds = pool.update_weights(load_state_dict(perturbed_ckpt), "v1", checkpoint_dir=perturbed_ckpt)
    assert seconds > 0
    assert check_engines(pool, perturbed_ckpt, tolerance=1e-4)["max_logprob_error"] < 1e-4
    infos = ray_local.get([a.info.remote() for a in pool.actors])
    assert {i["pid"] for i in infos} == pids  # in place: the same engine processes
    assert {i["weights_version"] for i in infos} == {"v1"}
    assert os.path.exists(pointer)
    pool.update_weights(tiny_model_dir, "v2")  # a checkpoint dir: engines on this node read its files
    assert check_engines(pool, tiny_model_dir, tolerance=1e-4)["max_logprob_error"] < 1e-4
    with open(pointer) as f:
        assert json.load(f)["checkpoint"] == tiny_model_dir
    pool.shutdown()


@pytest.mark.timeout(400)
# async: the episodes run inside the actor (slow: a second engine start and restart; CI runs it)
@pytest.mark.parametrize("schedule", ["waves", pytest.param("async", marks=pytest.mark.slow)])
def test_dead_actor_is_replaced_and_no_problem_lost(ray_local, tiny_model_dir, perturbed_ckpt, tmp_path, schedule):
    gate = Gate.remote()
    pool = RolloutPool(GatedEngine, tiny_model_dir, num_engines=1, num_cpus=0.5, pointer_path=str(tmp_path / "w.json"),
                       engine_kwargs={"gate": gate})  # fmt: skip
    pool.update_weights(perturbed_ckpt, "v1", checkpoint_dir=perturbed_ckpt)
    env = get_env("search", num_train=0, num_test=16)
    spec = EpisodeSpec(turns=3, params=SamplingParams(max_tokens=12, seed=0), first_n=2, schedule=schedule)
    pid = ray_local.get(pool.actors[0].info.remote())["pid"]
    killed = threading.Event()

    def kill_in_flight():
        try:
            ray_local.get(gate.wait_entered.remote())  # an engine call of the run is in the actor
            os.kill(pid, signal.SIGKILL)
            killed.set()
        finally:
            gate.open.remote()  # the call retried on the restarted actor goes through

    threading.Thread(target=kill_in_flight, daemon=True).start()
    trajs = pool.run(env.name, {}, env.test, spec, batch_size=8)
    assert killed.is_set()
    assert [t.problem_id for t in trajs] == [p.id for p in env.test]  # every problem, once, in order
    assert all(len(t.turns) == 3 for t in trajs)
    info = ray_local.get(pool.actors[0].info.remote())
    assert info["pid"] != pid  # replaced by Ray
    assert info["weights_version"] == "v1"  # and it came back with the synced weights
    assert check_engines(pool, perturbed_ckpt, tolerance=1e-4)["max_logprob_error"] < 1e-4
    pool.shutdown()


@pytest.mark.timeout(300)
def test_async_schedule_in_the_actor_gives_the_waves_trajectories(ray_local, tiny_model_dir):
    pool = RolloutPool("hf", tiny_model_dir, num_engines=2, num_cpus=0.5)
    env = get_env("search", num_train=0, num_test=12)
    spec = EpisodeSpec(turns=3, params=SamplingParams(temperature=0.0, max_tokens=12), first_n=1)
    waves = pool.run(env.name, {}, env.test, spec, batch_size=4)
    each = pool.run(env.name, {}, env.test, EpisodeSpec(**{**spec.__dict__, "schedule": "async"}), batch_size=4)
    assert [t.to_record() for t in each] == [t.to_record() for t in waves]
    assert all(len(t.turns) == 3 for t in each)
    pool.shutdown()


@pytest.mark.timeout(300)
def test_a_batch_slower_than_ray_datas_no_progress_guard_still_finishes(ray_local, tiny_model_dir):
    """Ray Data stops an execution that shows no progress for execution_no_progress_timeout_s
    (30 min by default); a batch of long CPU episodes shows none until it is done. Here the guard
    is 1 s and the batch is held at its first engine call for five times that: the pool's own
    engine-call deadlines are what bound it, so the batch finishes with every trajectory."""
    guard_s, ctx = 1, ray.data.DataContext.get_current()
    default, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, guard_s
    gate = Gate.remote()
    pool = RolloutPool(GatedEngine, tiny_model_dir, num_engines=1, num_cpus=0.5, engine_kwargs={"gate": gate})
    env = get_env("search", num_train=0, num_test=24)
    spec = EpisodeSpec(turns=3, params=SamplingParams(max_tokens=8, seed=0), first_n=2)
    held = threading.Event()

    def hold():
        try:
            ray.get(gate.wait_entered.remote())  # the batch is inside its first engine call
            time.sleep(5 * guard_s)  # no progress to show meanwhile
            held.set()
        finally:
            gate.open.remote()

    threading.Thread(target=hold, daemon=True).start()
    try:
        trajs = pool.run(env.name, {}, env.test, spec, batch_size=24)  # one batch
    finally:
        ctx.execution_no_progress_timeout_s = default
    assert held.is_set()
    assert [t.problem_id for t in trajs] == [p.id for p in env.test] and all(len(t.turns) == 3 for t in trajs)
    pool.shutdown()
