"""The first GPU cluster run, rehearsed on the cluster twin (tests/twin.py): each shipped cluster
file's node types as Ray's fake autoscaling cluster, GPUs declared, the driver on the GPU-less head.

1. Every shipped GPU config's demands (policy and teacher engines, Ray Train workers, the NCCL
   sender) go through Ray's autoscaler as the code asks for them (one placement group per stage,
   the engines' held), and the node types it launches are the ones the config is meant for, and
   the ones `rise run --dry-run --cluster-yaml` names (rise_ray.plan.launch_plan).
2. A small real `rise run` in a GPU config's shape on the AWS file's twin: engines ask for the
   GPUs and the accelerator type the fake nodes declare (the engine itself runs on CPU).

Nothing here reads this machine's hardware. Slow: the twins start Ray nodes (CI runs it)."""

from __future__ import annotations

import json
import os
import time

import pytest
import ray
import yaml
from twin import REPO, TwinCluster, node_type_of

from rise_ray.cluster import place, release
from rise_ray.config import load_config
from rise_ray.plan import launch_plan, stage_demands

pytestmark = pytest.mark.slow

# The node type each shipped GPU config is meant for, in the order the twin places them (small
# first: a later config's bundles may use the nodes an earlier one launched, as on a real cluster).
MEANT_FOR = {
    "gsm8k_qwen0.5b": "gpu1", "gsm8k_qwen1.5b": "gpu1",
    "gsm8k_mistral7b_self": "gpu8", "math_llama3_8b_self": "gpu8",
    "gsm8k_mistral7b_distill": "gpu8", "gsm8k_llama3_8b_distill": "gpu8", "math_mistral7b_distill": "gpu8",
}  # fmt: skip
FILES = ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay-rayjob.yaml"]


def _bundle_node_types(pg, twin: TwinCluster) -> list[str]:
    table = ray.util.placement_group_table(pg)
    by_id = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    return sorted({node_type_of(by_id[nid], twin.types) for nid in table["bundles_to_node_id"].values()})


@pytest.fixture
def twin_of(request):
    twins = []

    def start(path: str, **kw) -> TwinCluster:
        twin = TwinCluster(path, **kw).start()
        twins.append(twin)
        ray.init(address=twin.address, log_to_driver=False)
        return twin

    yield start
    ray.shutdown()
    for t in twins:
        t.shutdown()


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", FILES)
def test_each_shipped_config_launches_the_node_type_it_is_meant_for(path, twin_of, capsys):
    twin = twin_of(path)
    assert twin.live_types(ray) == {twin.head_type: 1}  # workers start at zero
    t0, report = time.monotonic(), []
    for name, meant in MEANT_FOR.items():
        cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
        predicted = {p["what"]: p["on"] for p in launch_plan(cfg, _launcher(path))}
        held, seen = [], {}
        for what, bundles, keep in stage_demands(cfg):
            pg = place(bundles, f"{name}: {what}", timeout=300)
            seen[what] = _bundle_node_types(pg, twin)
            (held.append(pg) if keep else release(pg))
        for pg in held:
            release(pg)
        assert all(on == [meant] for on in seen.values()), (name, seen)
        assert seen == predicted, (name, "the twin's autoscaler and --dry-run's plan disagree", seen, predicted)
        live = twin.live_types(ray)
        if meant == "gpu8":  # a 7-8B stage never gets a 24 GB node: only configs meant for gpu1 launched those
            assert live.get("gpu8", 0) >= 1
        report.append(f"{name}: {seen}")
    with capsys.disabled():
        print(f"\n{path}: {time.monotonic() - t0:.0f} s, nodes up {twin.live_types(ray)}\n  " + "\n  ".join(report))


def test_without_the_accelerator_type_a_7b_config_would_land_on_24gb_gpus():
    """What item 5 fixes: Ray's autoscaler rates the 1-GPU type above the 8-GPU one for single-GPU
    bundles, so a 7B config that does not name its accelerator type gets A10G / L4 nodes."""
    for path in ("cluster/aws.yaml", "cluster/gcp.yaml"):
        cfg = load_config(str(REPO / "configs" / "gsm8k_mistral7b_self.yaml"), ["cluster.accelerator_type=null"])
        assert launch_plan(cfg, _launcher(path))[0]["on"] == ["gpu1"]


def _launcher(path: str) -> dict:
    from twin import launcher_node_types

    head, types = launcher_node_types(path)
    total = sum(t["max_workers"] for n, t in types.items() if n != head)
    spec = yaml.safe_load((REPO / path).read_text()) if path.endswith(("aws.yaml", "gcp.yaml")) else {}
    return {"head_node_type": head, "available_node_types": types, "max_workers": spec.get("max_workers", total)}


TINY_GPU_SHAPED_RUN = [
    "iterations=1", "env.num_train=16", "env.num_test=8",
    "warmup.num_problems=64", "warmup.train={epochs: 1, lr: 0.003, micro_batch_size: 32}",
    "rollout.best_of_n=2", "rollout.turns=2", "rollout.max_tokens=12", "rollout.batch_size=8",
    "rollout.num_engines=2", "rollout.num_gpus_per_engine=1", "rollout.num_cpus_per_engine=1", "rollout.cpu_threads=1",
    "eval.turns=2", "eval.parallel=2", "eval.max_tokens=12", "eval.batch_size=8",
    "train.micro_batch_size=16", "train.cpus_per_worker=1",
    "cluster.accelerator_type=A10G",
]  # fmt: skip


@pytest.mark.timeout(1500)
def test_a_small_rise_run_on_the_aws_twin_from_its_gpu_less_head(twin_of, tmp_path, monkeypatch, capsys):
    from rise_ray import driver

    twin = twin_of("cluster/aws.yaml")
    monkeypatch.setenv("RAY_ADDRESS", twin.address)
    t0 = time.monotonic()
    cfg = load_config(None, [f"run_dir={tmp_path}", "name=twin", *TINY_GPU_SHAPED_RUN])
    driver.run(cfg, str(tmp_path / "twin"))
    wall = time.monotonic() - t0
    run = tmp_path / "twin"
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("iter_0/eval", "iter_1/collect", "iter_1/train", "iter_1/sync", "iter_1/eval", "report"):
        assert stage in manifest["stages"], stage
    assert manifest["stages"]["iter_1/collect"]["output"]["trajectories"] == 16
    assert (run / "iter_1" / "checkpoint" / "model" / "config.json").exists()
    assert json.loads((run / ".rise-storage-marker.json").read_text())["token"]
    live = twin.live_types(ray)
    assert live.get("gpu1", 0) >= 1 and "gpu8" not in live, live  # A10G engines: gpu1 nodes only
    with capsys.disabled():
        print(f"\ntwin rise run: {wall:.0f} s, nodes up {live}")
    assert os.path.exists(run / "report.html")


@pytest.mark.timeout(600)
def test_rise_serve_built_on_the_gpu_less_head_asks_for_gpu_bundles_the_autoscaler_launches(
    twin_of, tiny_model_dir, monkeypatch
):
    """`rise serve` builds its app on the head (no GPU, no GPU node up yet): the engine replicas'
    placement bundles it hands Ray Serve LLM ask for a GPU of the config's accelerator type, and
    Ray's autoscaler launches the node type that has it for them."""
    from rise_ray.serve import deploy, llm_config

    twin = twin_of("cluster/aws.yaml")
    assert ray.cluster_resources().get("GPU", 0) == 0  # only the head is up
    built, real = [], llm_config.llm_config

    def spy(*args, **kw):  # the real llm_config; the test keeps what make_app built
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(llm_config, "llm_config", spy)
    for overrides, meant in ((["rollout.num_gpus_per_engine=1"], "gpu1"),
                             (["rollout.num_gpus_per_engine=1", "cluster.accelerator_type=A100-80G"], "gpu8")):
        cfg = load_config(None, overrides)
        deploy.make_app({"m": tiny_model_dir}, cfg)  # what `rise serve RUN_DIR` builds, here on the head
        (bundle,) = built[-1].placement_group_config["bundles"]
        assert bundle["GPU"] == 1 and (meant == "gpu1" or bundle["accelerator_type:A100-80G"] > 0), bundle
        pg = place([bundle], f"serve replica ({meant})", timeout=300)
        try:
            assert _bundle_node_types(pg, twin) == [meant]
        finally:
            release(pg)
