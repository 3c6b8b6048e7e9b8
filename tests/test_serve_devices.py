"""Where `rise serve`'s replicas run: decided from the config and the cluster (issue 36 item 1),
never from the hardware of the process that builds the app (on a cluster: the GPU-less head). This
machine has no CUDA, so every GPU answer below is one today's code (torch.cuda.is_available()
in the builder) got wrong. Also HAProxy only where it reaches every ingress replica (item 8)."""

from __future__ import annotations

import pytest

from rise_ray.config import load_config
from rise_ray.serve.deploy import serve_proxy_env
from rise_ray.serve.llm_config import ServeDevices, llm_config, serve_devices

CPU_NODE = {"CPU": 8.0, "memory": 16e9}  # the cluster files' heads: no GPU


def gpu_config_checks(c) -> None:
    """An LLMConfig for a GPU replica: a GPU bundle, vLLM's dtype and memory defaults, none of the
    CPU levers (fp32, eager, fixed KV cache, CPU accelerator)."""
    assert c.placement_group_config["bundles"] == [{"GPU": 1.0, "CPU": 1.0}]
    assert c.accelerator_config is None or c.accelerator_config.kind != "cpu"
    engine = c.engine_kwargs
    assert "dtype" not in engine  # model.dtype=auto: vLLM's (half precision on GPU), not float32
    for lever in ("enforce_eager", "kv_cache_memory_bytes", "block_size", "enable_chunked_prefill"):
        assert lever not in engine, lever


def test_a_config_asking_for_gpus_gets_gpu_bundles_from_a_builder_without_cuda():
    import torch

    assert not torch.cuda.is_available()  # the builder is GPU-less, as a cluster's head is
    cfg = load_config(overrides=["serve.num_gpus_per_replica=1"])
    devices = serve_devices(cfg, CPU_NODE)  # no GPU node up yet: the autoscaler adds one for the bundle
    assert devices == ServeDevices(gpus=1.0, cpus=1.0) and not devices.cpu
    gpu_config_checks(llm_config("/models/m", "m", cfg, devices))


def test_a_run_whose_engines_had_gpus_is_served_on_gpus():
    cfg = load_config(overrides=["rollout.num_gpus_per_engine=0.6"])  # e.g. configs/gsm8k_qwen0.5b.yaml
    assert serve_devices(cfg, CPU_NODE) == ServeDevices(gpus=1.0, cpus=1.0)


def test_a_cluster_with_gpus_gets_gpu_replicas_and_a_cpu_cluster_cpu_replicas():
    cfg = load_config(overrides=["serve.num_cpus_per_replica=2"])
    assert serve_devices(cfg, {**CPU_NODE, "GPU": 8.0}) == ServeDevices(gpus=1.0, cpus=2.0)
    devices = serve_devices(cfg, CPU_NODE)
    assert devices.cpu
    c = llm_config("/models/m", "m", cfg, devices)
    assert c.placement_group_config["bundles"] == [{"CPU": 2.0}] and c.accelerator_config.kind == "cpu"
    assert c.engine_kwargs["dtype"] == "float32" and c.engine_kwargs["enforce_eager"] is True
    assert c.engine_kwargs["kv_cache_memory_bytes"] == cfg.rollout.kv_cache_memory_bytes


@pytest.mark.slow
def test_rise_serve_app_asks_ray_serve_for_a_gpu_bundle_on_a_ray_with_declared_gpus(tmp_path, monkeypatch):
    """A real Ray declaring a GPU this machine does not have: the app built here asks Serve for a GPU
    bundle per engine replica and gives the ingress a CPU. Nothing is deployed (a GPU replica would
    wait for a GPU forever). The same Ray is one node that stays one; joined at RAY_ADDRESS it is not."""
    import ray

    from rise_ray.demo.tiny import build_tiny_model
    from rise_ray.serve.deploy import make_app, single_node_cluster
    from rise_ray.serve.llm_server import RiseLLMServer

    model = build_tiny_model(str(tmp_path / "tiny"), hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(overrides=["model.max_model_len=256"])  # no serve.num_gpus_per_replica: the cluster's GPU
        devices = serve_devices(cfg, ray.cluster_resources())
        c = llm_config(model, "m", cfg, devices)
        gpu_config_checks(c)
        options = RiseLLMServer.get_deployment_options(c)  # what Serve LLM gives Serve for the replica
        assert options["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 1.0}], options
        app = make_app({"m": model}, cfg)
        ingress = app._bound_deployment  # the built app, read back (Serve has no public reader)
        assert ingress.ray_actor_options["num_cpus"] == 1
        (engine,) = ingress.init_kwargs["llm_deployments"].values()
        assert engine._bound_deployment._replica_config.placement_group_bundles == [{"GPU": 1.0, "CPU": 1.0}]
        assert single_node_cluster()
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as a Ray job's driver on a cluster sees it
        assert not single_node_cluster()
    finally:
        ray.shutdown()


def test_haproxy_only_where_it_reaches_every_ingress_replica():
    from rise_ray.serve.deploy import proxy_env

    haproxy = proxy_env("auto")
    if not haproxy:
        pytest.skip("no HAProxy binary here (ray[serve] bundles one on Linux)")
    # One node: the replicas bind the loopback address HAProxy connects to.
    assert serve_proxy_env("auto", "127.0.0.1", single_node=True) == haproxy
    # More nodes: a loopback-bound replica elsewhere is unreachable, so Ray's proxy ...
    assert serve_proxy_env("auto", "127.0.0.1", single_node=False) == {}
    # ... unless the replicas bind every interface.
    assert serve_proxy_env("auto", "0.0.0.0", single_node=False) == haproxy
    with pytest.raises(ValueError, match=r"serve.proxy=haproxy with serve.host=127.0.0.1.*serve.host=0.0.0.0"):
        serve_proxy_env("haproxy", "127.0.0.1", single_node=False)
    assert serve_proxy_env("ray", "0.0.0.0", single_node=True) == {}
