"""The cluster files: the launcher configs pass Ray's own schema and the checks `ray up` runs
before it creates anything; the KubeRay RayJob has the structure KubeRay and rise-ray need; every
file they name exists."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rise_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = "cluster/kuberay-rayjob.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def schema_errors(cfg: dict) -> list[str]:
    """Every violation of Ray's cluster-config schema, as 'path: message'."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(cfg)]


def ray_up_checks(cfg: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: merge the provider's defaults,
    fill the per-type worker bounds, validate (schema + head type + worker counts)."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def rise_run_config(command: str):
    """The RunConfig a `rise run CONFIG k=v ...` command line would run (`python -m rise_ray.cli
    run` counts too); the config path must exist relative to the repository root."""
    args = shlex.split(command)
    start = next(i for i in range(len(args)) if args[i : i + 2] in (["rise", "run"], ["rise_ray.cli", "run"]))
    path, overrides = args[start + 2], args[start + 3 :]
    assert "=" not in path and (REPO / path).is_file(), f"{command!r}: no config file {path}"
    return path, load_config(str(REPO / path), overrides)


# --- cloud launcher configs (ray up) -------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_config_passes_rays_schema_and_ray_up_checks(path):
    cfg = load(path)
    assert schema_errors(cfg) == []
    prepared = ray_up_checks(cfg)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0, "a CPU head node"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}, "1-GPU and 8-GPU worker types"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert prepared["idle_timeout_minutes"] > 0 and prepared["upscaling_speed"] > 0


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_config_runs_this_ray_this_project_and_token_auth(path):
    cfg = load(path)
    # A node whose Ray differs from the client's cannot take jobs: the image is the installed version.
    assert re.search(rf":{re.escape(ray.__version__)}-py3\d+-gpu$", cfg["docker"]["image"]), cfg["docker"]
    assert any(f"ray[data,train,serve]=={ray.__version__}" in c for c in cfg["setup_commands"])
    # The checkout is mounted and installed with its GPU extra.
    mounts = cfg["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    checkout = next(remote for remote, local in mounts.items() if (REPO / local).resolve() == REPO)
    assert any(f"cd {checkout}" in c and "pip install" in c and ".[gpu]" in c for c in cfg["setup_commands"])
    assert ".gitignore" in cfg["rsync_filter"], "the upload must leave .venv/ and runs/ behind"
    # Token auth on every node, with the same token file everywhere.
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key, flag in (("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address")):
        start = [c for c in cfg[key] if "ray start" in c]
        assert len(start) == 1 and "RAY_AUTH_MODE=token ray start" in start[0] and flag in start[0], cfg[key]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cfg["head_start_ray_commands"][-1]


@pytest.mark.parametrize(
    "breakage, named",
    [
        (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute"),  # a typo'd top-level key
        (lambda c: c["available_node_types"]["gpu1"]["resources"].update(GPU="1"), "gpu1.resources.GPU"),
        (lambda c: c["available_node_types"]["gpu8"].update(max_worker=2), "max_worker"),
        (lambda c: c["docker"].update(imag="rayproject/ray"), "imag"),
        (lambda c: c.pop("provider"), "provider"),
    ],
)
def test_a_broken_launcher_config_fails_naming_the_field(breakage, named):
    cfg = load("cluster/aws.yaml")
    breakage(cfg)
    errors = schema_errors(cfg)
    assert errors and any(named in e for e in errors), errors
    with pytest.raises(jsonschema.ValidationError):  # Ray's own check fails too
        validate_config(cfg)


def test_ray_up_rejects_more_minimum_workers_than_the_cluster_maximum():
    cfg = load("cluster/gcp.yaml")
    cfg["available_node_types"]["gpu1"]["min_workers"] = cfg["max_workers"] + 1
    assert schema_errors(cfg) == []  # a consistency rule the schema cannot express
    with pytest.raises(ValueError, match="max_workers"):
        ray_up_checks(cfg)


# --- KubeRay RayJob ------------------------------------------------------------------------------


CUDA_INDEX = "--extra-index-url https://download.pytorch.org/whl/cu129"  # vLLM 0.32's wheels: CUDA 12.9


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_config_mounts_shared_storage_pins_cuda_and_checks_each_gpu_node(path):
    """Every node mounts the shared file system at /shared (a placeholder that stops `ray up` until
    it is filled in), the CUDA build of torch comes from vLLM's index, and every worker proves
    torch sees its GPUs before Ray starts there."""
    cfg = load(path)
    init = " ".join(cfg["initialization_commands"])
    assert "mount" in init and " /shared" in init and "REPLACE-ME" in init and "exit 1" in init, init
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]
    (install,) = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert CUDA_INDEX in " ".join(install.split()) and "-c constraints.txt" in install
    check = " ".join(cfg["worker_setup_commands"])
    assert "torch.cuda.is_available()" in check and "import torch, vllm" in check
    types = cfg["available_node_types"]
    big = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 8]
    assert big and all(types[n]["resources"].get("accelerator_type:A100-80G") for n in big), big


def kuberay_docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((REPO / KUBERAY).read_text()) if d]
    return {d["kind"]: d for d in docs}


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_rayjob_runs_rise_on_gpu_workers_with_autoscaling_and_token_auth():
    job = kuberay_docs()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    assert spec["shutdownAfterJobFinishes"] is True

    head = cluster["headGroupSpec"]["template"]
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(head)), "CPU head"
    gpus_per_pod = []
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group[
            "groupName"
        ]
        (worker,) = containers(group["template"])
        limits = worker["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        gpus_per_pod.append(int(limits["nvidia.com/gpu"]))
    assert {1, 8} <= set(gpus_per_pod), "1-GPU and 8-GPU worker groups"
    # One baked image everywhere (cluster/Dockerfile: Ray's image at this version + rise-ray + vLLM).
    images = {c["image"] for c in containers(head) + [containers(g["template"])[0] for g in cluster["workerGroupSpecs"]]}
    assert len(images) == 1 and "rise-ray" in images.pop()
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "-c constraints.txt" in dockerfile and CUDA_INDEX in dockerfile
    for group in cluster["workerGroupSpecs"]:  # every GPU pod checks CUDA and vLLM before Ray starts
        (check,) = group["template"]["spec"]["initContainers"]
        assert "torch.cuda.is_available()" in " ".join(check["command"]) and "vllm" in " ".join(check["command"])

    # The entrypoint runs `rise run` on a GPU config of this repository that loads.
    path, cfg = rise_run_config(spec["entrypoint"])
    assert cfg.rollout.num_gpus_per_engine > 0 and cfg.train.use_gpu, f"{path} is not a GPU config"
    need = cfg.rollout.num_gpus_per_engine * cfg.rollout.tensor_parallel_size
    assert need <= max(gpus_per_pod), f"{path}: an engine needs {need} GPUs on one node"

    # run_dir is on the volume every pod mounts: the head reads what the workers' trainers write.
    pods = [head] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        mounts = [m["mountPath"] for c in containers(pod) for m in c.get("volumeMounts", [])]
        assert any(cfg.run_dir.startswith(m + "/") for m in mounts), (cfg.run_dir, mounts)
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [kuberay_docs()["PersistentVolumeClaim"]["metadata"]["name"]]

    # Nothing to install at job start (Ray's runtime-env setup times out at 600 s): no pip, no conda.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not {"pip", "conda", "uv"} & set(runtime_env), runtime_env
    assert "ReadWriteMany" in kuberay_docs()["PersistentVolumeClaim"]["spec"]["accessModes"]


# --- files the cluster and job files name --------------------------------------------------------


def test_every_config_the_cluster_and_job_files_name_exists_and_loads():
    texts = {p: (REPO / p).read_text() for p in [*LAUNCHER, KUBERAY, "cluster/README.md", "jobs/README.md"]}
    named = {
        m
        for text in texts.values()
        for m in re.findall(r"\b(?:configs|jobs|cluster)/[\w./-]+\.ya?ml\b", text)
    }
    assert {"configs/gsm8k_qwen0.5b.yaml", "jobs/runtime_env.yaml", "cluster/aws.yaml"} <= named
    for path in sorted(named):
        assert (REPO / path).is_file(), f"{path} is named but does not exist"
        if path.startswith("configs/") and not path.startswith("configs/serve/"):
            load_config(str(REPO / path))
    runtime_env = yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())
    assert "working_dir" not in runtime_env, "the recipe passes --working-dir"
    assert "pip" not in runtime_env and "DS_ACCELERATOR" not in runtime_env.get("env_vars", {})
    assert os.path.isfile(REPO / ".gitignore") and ".venv/" in (REPO / ".gitignore").read_text()
