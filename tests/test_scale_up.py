"""A stage waits for nodes that do not exist yet (a cluster scaling from zero): the engines' bundles
are asked of Ray first, and their start-up deadline counts only from when a node holds them.

The node is added by the test, as an autoscaler would add it (ray.cluster_utils.Cluster, its own
temp dir). Slow: it starts a cluster and waits ~35 s for the late node (CI runs it)."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from rise_ray import cluster as cluster_mod
from rise_ray.rollout import pool as pool_mod

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_engines_wait_for_a_late_node_and_their_start_up_deadline_starts_when_it_is_up(
    tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("RAY_TMPDIR", tmp := tempfile.mkdtemp(prefix="rsu", dir="/tmp"))
    monkeypatch.setattr(pool_mod, "READY_TIMEOUT_S", 25.0)  # shorter than the wait for the node
    monkeypatch.setattr(cluster_mod, "PROGRESS_EVERY_S", 5.0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # the engine needs 1.5
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        # What an autoscaler (v1) reports, read where `ray status` reads it.
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_put

        report = {"autoscaler_report": {"pending_launches": {"gpu_worker": 2},
                                        "pending_nodes": [["192.0.2.7", "cpu_worker", "setting-up"]]}}
        _internal_kv_put(ray_constants.DEBUG_AUTOSCALING_STATUS, json.dumps(report), overwrite=True)
        assert cluster_mod.autoscaler_pending() == "launching 2 gpu_worker, 1 cpu_worker starting"

        made: dict = {}

        def make_pool() -> None:  # Cluster.add_node must run on the main thread (it sets signal handlers)
            try:
                made["pool"] = pool_mod.RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=1.5,
                                                    scale_up_timeout_s=120)  # fmt: skip
            except Exception as e:  # raised below
                made["error"] = e
            made["seconds"] = time.monotonic() - t0

        t0 = time.monotonic()
        maker = threading.Thread(target=make_pool, daemon=True)
        maker.start()
        time.sleep(35)
        assert maker.is_alive()  # still waiting: no node holds 1.5 CPUs
        node = cluster.add_node(num_cpus=2)
        maker.join(timeout=150)
        if "error" in made:
            raise made["error"]
        pool = made["pool"]
        try:
            assert made["seconds"] >= 35  # it waited for the node, past READY_TIMEOUT_S
            assert [i["node_id"] for i in pool.infos()] == [node.node_id]
        finally:
            pool.shutdown()
        out = capsys.readouterr().out
        # (the head's own monitor soon overwrites the report above with its own: nothing pending)
        assert "[rise] waiting for nodes: 1 hf engine(s)" in out and "{'CPU': 1.5}" in out

        # Nothing ever holds 3 CPUs: the wait ends at cluster.scale_up_timeout_s, naming the engines.
        with pytest.raises(cluster_mod.PlacementTimeout, match=r"1 hf engine\(s\) .*'CPU': 3.*within 4 s"):
            pool_mod.RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=3, scale_up_timeout_s=4)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
