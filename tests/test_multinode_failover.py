"""A whole `rise run` across three Ray nodes on this machine (ray.cluster_utils.Cluster), one of
them removed mid-collection. A module of its own: its cluster must be the only one this process is
connected to (a module-scoped cluster of another test, still up, would take the run: CI saw the
engine wait 900 s for 1.5 CPUs on that cluster's 1-CPU nodes)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import ray
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.slow

TINY_RUN = [
    "iterations=1", "env.num_train=32", "env.num_test=8",
    "warmup.num_problems=64", "warmup.train={epochs: 1, lr: 0.003, micro_batch_size: 32}",
    "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=12", "rollout.batch_size=4",
    "rollout.num_cpus_per_engine=1.5", "rollout.cpu_threads=1", "eval.turns=2", "eval.parallel=2",
    "eval.max_tokens=12", "eval.batch_size=8", "train.micro_batch_size=16", "train.cpus_per_worker=0.5",
]  # fmt: skip


@pytest.mark.timeout(1500)
def test_rise_run_with_engines_off_the_driver_node_survives_losing_their_node(tmp_path, monkeypatch):
    """Engines need 1.5 CPUs: the driver's node (1 CPU) cannot hold them, so they run elsewhere and
    get weights through the object store. Mid-collection their node is removed: the engine comes
    back on the other node with the synced weights and no problem is lost. The node is the one Ray's
actor table puts an engine on, and it goes while the collect stage runs (the manifest's times)."""
    import json
    import threading
    import time

    from rise_ray import driver
    from rise_ray.config import load_config

    monkeypatch.setenv("RAY_TMPDIR", tmp := tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # as own_ray_tmpdir
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    run_dir = tmp_path / "mn"
    seen: dict = {}

    def remove_engine_node():
        try:
            from ray._private.state import actors

            manifest = run_dir / "manifest.json"
            while "iter_0/eval" not in (json.loads(manifest.read_text())["stages"] if manifest.exists() else {}):
                time.sleep(0.2)
            time.sleep(1.0)  # let the collection's first requests reach the engine (checked below)
            # the engines' nodes, from Ray's actor table (EngineActor: rise_ray.rollout.pool)
            seen["engine_nodes"] = {a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
                                    if a["ActorClassName"] == "EngineActor"}
            victim = next(n for n in nodes if n.node_id in seen["engine_nodes"])
            seen["stages_before"] = set(json.loads(manifest.read_text())["stages"])
            seen["removed_at"] = time.time()
            cluster.remove_node(victim)
            seen["removed"] = victim.node_id
        except Exception as e:  # shown by the assertion below
            seen["error"] = repr(e)

    try:
        cfg = load_config(None, [f"run_dir={tmp_path}", "name=mn", *TINY_RUN])
        watcher = threading.Thread(target=remove_engine_node, daemon=True)
        watcher.start()
        driver.run(cfg, str(run_dir))
        watcher.join(timeout=5)
        head = cluster.head_node.node_id
        assert seen.get("removed"), f"the engine's node was not removed during the run: {seen}"
        assert seen["engine_nodes"] and head not in seen["engine_nodes"]  # engines never on the driver's node
        manifest = json.loads((run_dir / "manifest.json").read_text())
        # mid-collection: the collect stage had started (iter_0/eval done) and had not finished
        collect = manifest["stages"]["iter_1/collect"]
        assert "iter_1/collect" not in seen["stages_before"], seen["stages_before"]
        assert collect["finished_at"] - collect["seconds"] < seen["removed_at"] < collect["finished_at"], (collect, seen)
        assert manifest["stages"]["iter_1/collect"]["output"]["trajectories"] == 32  # none lost
        check = manifest["stages"]["iter_1/sync"]["output"]["check"]
        assert check["max_logprob_error"] <= check["tolerance"] and check["reference_node"]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_a_trainer_workers_node_removed_mid_epoch_resumes_from_its_checkpoint_on_the_node_left(
    tmp_path, monkeypatch, tiny_model_dir
):
    """The training worker needs 1.5 CPUs, so it runs on one of two worker nodes. After a
    checkpoint and two more steps that node is removed: Ray Train (FailureConfig) restarts the worker
    on the other node from the checkpoint, every step is trained once, and the final weights equal
    an uninterrupted run's (same data order, same steps)."""
    import threading
    import time

    import torch
    from safetensors.torch import load_file
    from synthetic import arithmetic_trajectories

    from rise_ray.config import DataConfig, load_config
    from rise_ray.data.builder import build_dataset
    from rise_ray.envs.base import Env
    from rise_ray.train import train
    from rise_ray.train.progress import read_log

    monkeypatch.setenv("RAY_TMPDIR", tmp := tempfile.mkdtemp(prefix="rmt", dir="/tmp"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ds = str(tmp_path / "dataset")
        build_dataset(arithmetic_trajectories(32, turns=3, seed=7), Env(feedback="Wrong. Try again."),
                      tiny_model_dir, DataConfig(), ds)  # fmt: skip
        cfg = load_config(None, [
            f"run_dir={tmp_path}", f"model.path={tiny_model_dir}", "train.lr=3e-3", "train.warmup_ratio=0",
            "train.micro_batch_size=2", "train.epochs=2", "train.cpus_per_worker=1.5",
            "train.save_every_steps=4", "train.max_failures=2",
        ])  # fmt: skip
        reference = train(cfg, ds, tiny_model_dir, str(tmp_path / "uninterrupted"))

        out = str(tmp_path / "interrupted")
        seen: dict = {}

        def remove_worker_node() -> None:
            from ray._private.state import available_resources_per_node

            log = os.path.join(out, "train_log.jsonl")
            deadline = time.time() + 400
            while time.time() < deadline:
                recs = read_log(log) if os.path.exists(log) else []
                ckpts = sorted(int(d.split("-")[-1]) for d in _checkpoint_dirs(out))
                if ckpts and recs and recs[-1]["step"] >= ckpts[-1] + 2:
                    free = available_resources_per_node()
                    victim = min(nodes, key=lambda n: free.get(n.node_id, {}).get("CPU", 2.0))
                    cluster.remove_node(victim)
                    seen.update(node=victim.node_id, at_step=recs[-1]["step"], checkpoint=ckpts[-1], time=time.time())
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=remove_worker_node, daemon=True)
        watcher.start()
        path = train(cfg, ds, tiny_model_dir, out)
        watcher.join(timeout=5)
        assert seen, "training ended before the worker's node could be removed"
        recs = read_log(os.path.join(out, "train_log.jsonl"))
        total = len(read_log(os.path.join(tmp_path / "uninterrupted", "train_log.jsonl")))
        assert [r["step"] for r in recs] == list(range(1, total + 1))  # each step once, none missing
        assert seen["checkpoint"] < seen["at_step"] < total
        assert any(r["time"] > seen["time"] for r in recs)  # steps after the removal: resumed, not done
        got, want = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(reference, "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_dirs(out: str) -> list[str]:
    """The step-N checkpoint directories Ray Train has written under the stage's storage."""
    import glob

    return glob.glob(os.path.join(out, "ray_train", "*", "step-*"))
