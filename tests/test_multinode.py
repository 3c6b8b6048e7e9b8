"""Several Ray nodes on this machine (ray.cluster_utils.Cluster), GPUs declared but never touched.

Ray accepts `num_gpus=N` on a node without GPUs and assigns GPU ids by its own accounting, so where
engines and trainer workers land (node, GPU id) can be asserted without CUDA. The engines are the
transformers engine on CPU: their placement, not vLLM, is under test. Each cluster starts three
Ray nodes: the module is slow (CI runs it)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import pytest
import ray
from ray.cluster_utils import Cluster

from rise_ray.config import load_config
from rise_ray.train.placement import PlacementTimeout, reserve, worker_placement

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def own_ray_tmpdir():
    """Ray's own isolation: under RAY_TMPDIR go the cluster's session files and the head's address
    (ray_current_cluster, where a plain ray.init() of another process on this machine would find
    this cluster and join it). A directory of this test's own, short (Ray's unix socket paths must
    fit in 107 bytes), so nothing of the machine's default /tmp/ray is read, written or removed."""
    root = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_TMPDIR", root)
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head without GPUs (the driver's node) and two nodes of 2 declared GPUs each."""
    with own_ray_tmpdir():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _colocated_cfg(model_dir: str):
    """The shipped one-GPU colocated config, scaled to 2 engines and 2 trainer workers."""
    return load_config(os.path.join(ROOT, "configs", "gsm8k_qwen0.5b.yaml"), [
        f"model.path={model_dir}", "model.dtype=float32", "rollout.engine=hf", "rollout.num_engines=2",
        "rollout.num_cpus_per_engine=0.1", "train.num_workers=2", "train.cpus_per_worker=0.1",
    ])  # fmt: skip


def _probe_train_workers(resources: dict, labels: list[dict] | None, n: int) -> list[tuple[str, str]]:
    """Run a real Ray Train V2 worker group with the ScalingConfig rise builds; each worker reports
    its (node, GPU id). gloo, not NCCL: no CUDA is touched."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rise_ray.train.placement import STRATEGY

    out = tempfile.mkdtemp()

    def loop(_):  # each worker writes where it runs (same machine: a shared folder)
        ctx = ray.get_runtime_context()
        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(out, f"{rank}.txt"), "w") as f:
            f.write(f"{ctx.get_node_id()}|{','.join(str(g) for g in ray.get_gpu_ids())}")

    trainer = TorchTrainer(
        loop,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=n, use_gpu=True, resources_per_worker=resources, label_selector=labels,
            placement_strategy=STRATEGY,
        ),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(),
                                       failure_config=ray.train.FailureConfig(controller_failure_limit=0)),
    )  # fmt: skip
    trainer.fit()
    return [tuple(open(os.path.join(out, f"{r}.txt")).read().split("|")) for r in range(n)]


@pytest.mark.timeout(300)
def test_colocated_engines_take_a_gpu_each_and_trainer_workers_join_them(gpu_cluster, tiny_model_dir):
    from rise_ray.session import make_pool

    cfg = _colocated_cfg(tiny_model_dir)
    pool = make_pool(cfg.rollout, cfg.model, tiny_model_dir, 0, sync_method="files")
    try:
        engines = [(i["node_id"], ",".join(i["gpu_ids"])) for i in pool.infos()]
        assert len(set(engines)) == 2, f"two engines on one GPU: {engines}"  # Ray packs 0.4s best-fit
        head = ray.get_runtime_context().get_node_id()
        assert all(node != head for node, _ in engines)  # the driver's node has no GPU
        resources, labels = worker_placement(cfg, pool.node_ids())
        assert resources["GPU"] == pytest.approx(1 - cfg.rollout.num_gpus_per_engine)
        reserve(resources, cfg.train.num_workers, labels, timeout=60)  # fits: no error
        workers = _probe_train_workers(resources, labels, cfg.train.num_workers)
        assert sorted(workers) == sorted(engines)  # each worker on an engine's GPU, one per GPU
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_train_placement_has_a_deadline_naming_what_it_waited_for(gpu_cluster):
    # 5 whole GPUs in a 4-GPU cluster: Ray Train would retry this placement forever
    with pytest.raises(PlacementTimeout, match=r"5 worker\(s\) of \{'CPU': 0.1, 'GPU': 1.0\} could not be placed"):
        reserve({"CPU": 0.1, "GPU": 1.0}, 5, None, timeout=3)
    # per node: two workers pinned to a node with 2 GPUs fit; three do not, though the cluster has 4
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
    reserve({"CPU": 0.1, "GPU": 1.0}, 2, [{"ray.io/node-id": node}] * 2, timeout=60)
    with pytest.raises(PlacementTimeout, match="on the node of engine i"):
        reserve({"CPU": 0.1, "GPU": 1.0}, 3, [{"ray.io/node-id": node}] * 3, timeout=3)


# --- issue 36: placement held for the actors' life, the sender placed, the storage checked --------


@pytest.mark.timeout(300)
def test_a_pool_holds_its_placement_group_with_engine_i_in_bundle_i(gpu_cluster, tiny_model_dir, tmp_path):
    """Until the pool shuts down, its group holds the engines' capacity (nothing else can take a
    GPU from under it between stages) and each engine runs in its own bundle; shutdown frees it."""
    from rise_ray.models.placement import write_run_marker
    from rise_ray.rollout.pool import RolloutPool

    pool = RolloutPool("hf", tiny_model_dir, num_engines=2, num_cpus=0.1, num_gpus=1,
                       storage=write_run_marker(str(tmp_path)))  # fmt: skip
    try:
        table = ray.util.placement_group_table(pool.placement)
        assert table["state"] == "CREATED" and len(table["bundles"]) == 2
        infos = pool.infos()
        assert [table["bundles_to_node_id"][i] for i in range(2)] == [i["node_id"] for i in infos]
        # Ray accounts a bundle's GPU as GPU_group_<i>_<group id>: each bundle's is taken by its engine
        free, total = ray.available_resources(), ray.cluster_resources()
        for i in range(2):
            key = f"GPU_group_{i}_{pool.placement.id.hex()}"
            assert total[key] == 1 and free.get(key, 0) == 0, (key, free.get(key))
        assert ray.available_resources().get("GPU", 0) == 2  # 4 declared, 2 held by the group
    finally:
        pool.shutdown()
    time.sleep(1.0)
    assert ray.util.placement_group_table(pool.placement)["state"] == "REMOVED"


@pytest.mark.timeout(180)
def test_the_nccl_sender_waits_for_placement_like_every_actor(gpu_cluster, tiny_model_dir, tmp_path):
    """With every GPU taken, the sender is a demand an autoscaler can act on, waited for up to
    cluster.scale_up_timeout_s and then named; not a fixed 300 s on an actor no group asked for."""
    from rise_ray.cluster import PlacementTimeout
    from rise_ray.rollout.pool import RolloutPool

    pool = RolloutPool("hf", tiny_model_dir, num_engines=4, num_cpus=0.1, num_gpus=1, scale_up_timeout_s=4,
                       engine_kwargs={}, storage=None)  # fmt: skip
    pool.engine_kwargs["weight_transfer"] = "nccl"  # as make_pool builds GPU engines for nccl
    try:
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeout, match=r"nccl weight sender .* could not be placed within 4 s"):
            pool.sync_native(tiny_model_dir, "v1", "nccl", 2**20)
        assert time.monotonic() - t0 < 60
    finally:
        pool.shutdown()


@pytest.mark.timeout(180)
def test_an_engine_on_a_node_without_the_run_storage_fails_naming_the_node(gpu_cluster, tiny_model_dir, tmp_path):
    from rise_ray.rollout.pool import RolloutPool

    marker = (str(tmp_path / "elsewhere" / ".rise-storage-marker.json"), "token-of-the-driver")
    with pytest.raises(Exception, match=r"node [\d.]+ does not see the run directory the driver writes: .*elsewhere"):
        RolloutPool("hf", tiny_model_dir, num_engines=1, num_cpus=0.1, num_gpus=1, storage=marker)
