"""From a config to live pieces: Ray, the environment, the model directory and engine pools."""

from __future__ import annotations

from typing import Any

from rise_ray.config import ClusterConfig, ModelConfig, RolloutConfig

# Imported from here by cli.py; they live lower down, where the layers below the session reach them
# (rise_ray.data and rise_ray.serve read env_options, rise_ray.preflight make_env, rise_ray.train and
# rise_ray.serve the others).
from rise_ray.envs import env_options as env_options
from rise_ray.envs import make_env as make_env
from rise_ray.models.placement import resolve_model as resolve_model
from rise_ray.ray_init import init_ray as init_ray


def context_length(cfg_len: int | None, model_path: str | None) -> int:
    """The engines' max_model_len: the model's own context (config.json), capped by the config's."""
    from rise_ray.config import ConfigError
    from rise_ray.models.source import model_context_length

    own = model_context_length(model_path) if model_path else None
    if cfg_len is None:
        if own is None:
            raise ConfigError(f"model {model_path!r}: its config.json names no context length: set model.max_model_len")
        return own
    return min(cfg_len, own) if own else cfg_len


def engine_kwargs(
    rollout: RolloutConfig, model: ModelConfig, seed: int, sync_method: str | None = None,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Engine constructor arguments. `sync_method` (sync.method) builds vLLM engines on GPUs for
    vLLM's weight transfer (nccl / ipc) and, when they share the trainer's GPUs, with sleep mode;
    None: neither (an engine that is never synced, e.g. serving). `model_path` gives the model's
    own context length where model.max_model_len leaves it open."""
    kw: dict[str, Any] = {"max_model_len": context_length(model.max_model_len, model_path), "dtype": model.dtype}
    if rollout.engine == "vllm":
        kw.update(
            seed=seed,
            tensor_parallel_size=rollout.tensor_parallel_size,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=rollout.kv_cache_memory_bytes if rollout.num_gpus_per_engine == 0 else None,
        )
        if sync_method is not None:
            from rise_ray.rollout.weight_transfer import NATIVE_METHODS, resolve_method

            method = resolve_method(sync_method, rollout)
            if method in NATIVE_METHODS:
                kw["weight_transfer"] = method
            if rollout.colocate_with_trainer:
                kw["sleep_mode"] = True
    return kw


def make_pool(
    rollout: RolloutConfig,
    model: ModelConfig,
    model_path: str,
    seed: int,
    pointer_path: str | None = None,
    sync_method: str | None = "auto",
    cluster: ClusterConfig | None = None,
    storage: tuple[str, str] | None = None,
):
    """The engine actors of `rollout`, placed as one group on the nodes `cluster` asks for;
    `storage`: the run's marker (path, token) each engine checks on its node."""
    from rise_ray.rollout.pool import RolloutPool

    cluster = cluster or ClusterConfig()

    return RolloutPool(
        rollout.engine,
        model_path,
        num_engines=rollout.num_engines,
        num_cpus=rollout.num_cpus_per_engine,
        num_gpus=rollout.num_gpus_per_engine,
        engine_kwargs=engine_kwargs(rollout, model, seed, sync_method, model_path),
        pointer_path=pointer_path,
        cpu_threads=rollout.cpu_threads,
        scale_up_timeout_s=cluster.scale_up_timeout_s,
        accelerator_type=cluster.accelerator_type,
        storage=storage,
    )
