"""Engines that keep failing end the stage with an error instead of hanging (bounded restarts,
deadlines on every wait)."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from rise_ray.envs import get_env
from rise_ray.rollout import pool as pool_mod
from rise_ray.rollout.engine import SamplingParams
from rise_ray.rollout.episodes import EpisodeSpec
from rise_ray.rollout.hf import HFEngine
from rise_ray.rollout.pool import RolloutPool

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the engine class below travels by value


class CrashingEngine(HFEngine):
    """A real engine whose process dies on every request (as on a CUDA fault)."""

    def generate(self, conversations, n, params):
        print("CrashingEngine: about to die", flush=True)
        os._exit(3)


@pytest.mark.slow  # four engine start-ups: the first and Ray's three restarts (CI runs it)
@pytest.mark.timeout(240)
def test_an_engine_that_crashes_on_every_request_fails_the_stage(ray_local, tiny_model_dir):
    pool = RolloutPool(CrashingEngine, tiny_model_dir, num_engines=1, num_cpus=0.5)
    env = get_env("search", num_train=0, num_test=4)
    spec = EpisodeSpec(turns=1, params=SamplingParams(max_tokens=4, seed=0), first_n=1)
    with pytest.raises(Exception, match="(?s)died|exited"):
        pool.run(env.name, {}, env.test, spec, batch_size=4)
    pool.shutdown()


@pytest.mark.timeout(120)
def test_engines_that_cannot_be_placed_fail_at_the_scale_up_deadline_naming_them(ray_local, tiny_model_dir):
    from rise_ray.cluster import PlacementTimeout

    with pytest.raises(PlacementTimeout, match=r"1 hf engine\(s\) .*'GPU': 1.*within 3 s \(cluster.scale_up_timeout_s\)"):
        RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5, num_gpus=1, scale_up_timeout_s=3)  # no GPU here


def test_a_ray_of_our_own_refuses_engines_no_node_can_hold_at_once(ray_local, tiny_model_dir, monkeypatch):
    import time

    from rise_ray import cluster

    monkeypatch.setattr(cluster, "OWN_RAY", ray_local.get_runtime_context().gcs_address)  # as init_ray sets it
    t0 = time.monotonic()
    with pytest.raises(cluster.PlacementTimeout, match=r"no node holds \{'CPU': 0.5, 'GPU': 1\}.*adds no nodes"):
        RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5, num_gpus=1, scale_up_timeout_s=600)
    assert time.monotonic() - t0 < 60  # not the 600 s wait for an autoscaler


@pytest.mark.timeout(120)
def test_engine_start_up_has_a_deadline_naming_what_it_waited_for(ray_local, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(pool_mod, "READY_TIMEOUT_S", 0.01)  # placed at once, never ready that fast
    with pytest.raises(pool_mod.EngineTimeout, match=r"engine start-up: 1 of 1 hf engine\(s\).*'CPU': 0.5"):
        RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5)


@pytest.mark.timeout(180)
def test_a_weight_transfer_past_its_deadline_fails_and_restarts_the_engines(ray_local, tiny_model_dir, monkeypatch):
    """An NCCL / IPC transfer that never ends (an engine stuck in a broadcast): the stage fails
    naming it, and the engines are restarted rather than left inside the collective."""
    monkeypatch.setattr(pool_mod, "SYNC_TIMEOUT_S", 1.0)
    pool = RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.5)
    pid = pool.infos()[0]["pid"]
    conv = [{"role": "user", "content": "Find x: x * 7 = 91"}]
    # busy for several seconds (and once more: Ray retries it on the restarted engine)
    stuck = pool.actors[0].generate.remote([conv] * 32, 4, SamplingParams(max_tokens=128, seed=0))
    with pytest.raises(pool_mod.EngineTimeout, match=r"weight transfer \(test\): no answer within 1 s .*RISE_SYNC_TIMEOUT_S"):
        pool._transfer([stuck], "weight transfer (test)")
    assert pool.infos()[0]["pid"] != pid  # a fresh engine process
    pool.shutdown()
