"""A cluster that scales from zero, on one machine: Ray's own fake multi-node autoscaler
(ray.cluster_utils.AutoscalingCluster: the provider Ray tests its autoscaler with). The head has 1
CPU and no GPU; the one worker type declares 1 GPU and 2 CPUs and starts at min_workers 0. A whole
`rise run` at small sizes must get its engine and trainer nodes launched on demand.

AutoscalingCluster starts and stops with `ray stop --force`, which ends every Ray process on the
machine: this module runs alone (CI runs it in the slow suite, one test at a time)."""

from __future__ import annotations

import json
import time

import pytest
import ray
from ray.cluster_utils import AutoscalingCluster

pytestmark = pytest.mark.slow

TINY_RUN = [
    "iterations=1", "env.num_train=16", "env.num_test=8",
    "warmup.num_problems=64", "warmup.train={epochs: 1, lr: 0.003, micro_batch_size: 32}",
    "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=12", "rollout.batch_size=8",
    "rollout.num_gpus_per_engine=1", "rollout.num_cpus_per_engine=1", "rollout.cpu_threads=1",
    "eval.turns=2", "eval.parallel=2", "eval.max_tokens=12", "eval.batch_size=8",
    "train.micro_batch_size=16", "train.cpus_per_worker=1.5",
]  # fmt: skip


class FakeAutoscalingCluster(AutoscalingCluster):
    """Ray's AutoscalingCluster, with the base config it reads from fake_multi_node/example.yaml
    given here: the PyPI wheel does not ship that file."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = {
            "cluster_name": "rise-fake", "max_workers": 4, "head_node_type": "ray.head.default",
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "available_node_types": {**worker_node_types,
                                     "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}},
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 10, "docker": {},
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }  # fmt: skip
        config.update(config_kwargs)
        return config


@pytest.mark.timeout(1500)
def test_rise_run_on_a_cluster_whose_workers_start_at_zero(tmp_path, monkeypatch, capsys):
    from rise_ray import driver
    from rise_ray.config import load_config


    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                                          "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=10,
    )  # fmt: skip
    cluster.start()
    try:
        ray.init(address="auto", log_to_driver=False)
        workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        assert workers == []  # nothing but the head until the run asks
        monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        t0 = time.monotonic()
        cfg = load_config(None, [f"run_dir={tmp_path}", "name=as", *TINY_RUN])
        driver.run(cfg, str(tmp_path / "as"))
        wall = time.monotonic() - t0
        manifest = json.loads((tmp_path / "as" / "manifest.json").read_text())
        assert manifest["stages"]["iter_1/collect"]["output"]["trajectories"] == 16
        assert (tmp_path / "as" / "iter_1" / "checkpoint" / "model" / "config.json").exists()
        launched = [n for n in ray.nodes() if n["Resources"].get("GPU")]
        assert launched, "no GPU worker was launched"
        with capsys.disabled():
            print(f"\nautoscaling rise run: {wall:.0f} s, {len(launched)} worker node(s) launched")
        # (no assertion on the "waiting for nodes" lines: a fake node is up within a second or two;
        # tests/test_scale_up.py checks them with a node that comes late)
    finally:
        ray.shutdown()
        cluster.shutdown()
