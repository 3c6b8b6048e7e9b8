"""From a config to live pieces: Ray, the environment, the model directory and engine pools."""

from __future__ import annotations

import os
from typing import Any

from rise_ray.config import ClusterConfig, EnvConfig, ModelConfig, RolloutConfig
from rise_ray.envs import env_options as env_options  # it lives with the envs (rise_ray.data reads it too)


def init_ray(num_cpus: int | None = None) -> str | None:
    """Join the cluster at RAY_ADDRESS, or start an embedded local Ray; returns the dashboard's URL
    when it started one."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return None
    # With the dashboard (on 127.0.0.1; the next free port if 8265 is taken): users watch runs
    # there, and Ray Train's placement-group cleaner polls the state API it serves (without it, a
    # warning every second of training).
    # address="local": a new Ray of our own. Without it ray.init joins whatever cluster was started
    # last on this machine (another user's run, a test's), which can vanish mid-run.
    from rise_ray import cluster

    ctx = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
    cluster.OWN_RAY = ray.get_runtime_context().gcs_address  # no autoscaler behind a Ray of our own
    return ctx.dashboard_url


def make_env(cfg: EnvConfig):
    """The environment with its problems; a bad name or option is a ConfigError naming it."""
    from rise_ray.config import ConfigError
    from rise_ray.envs import get_env

    try:
        return get_env(cfg.name, **env_options(cfg))
    except (TypeError, ValueError) as e:
        if type(e).__name__ == "DataError":
            raise
        raise ConfigError(f"env (name={cfg.name!r}, options={cfg.options}): {e}") from None


def resolve_model(cfg: ModelConfig, work_dir: str) -> str:
    """The model directory: cfg.path (any source `rise model get` takes), or the tiny model built
    (once) under work_dir; with a chat template either way (model.chat_template).

    Every node reads the same directory: a model that was fetched or converted (the hub's cache,
    ~/.cache/rise-ray: download caches on this node) is placed under work_dir's models/ (or
    $RISE_MODELS_DIR), on the run's storage; a local HF directory the user named stays as it is.
    With Ray up, every node that may host an engine or trainer is then checked to read it."""
    from rise_ray.models.placement import check_model_on_nodes, model_slug, models_dir, place_model
    from rise_ray.models.source import get_model, with_chat_template

    if cfg.path:
        path = with_chat_template(get_model(cfg.path), cfg.chat_template)
        own = os.path.isdir(cfg.path) and os.path.abspath(path) == os.path.abspath(cfg.path)
        if work_dir and not own:
            path = place_model(path, os.path.join(models_dir(work_dir), model_slug(cfg.path, path)))
        check_model_on_nodes(path)
        return path
    from rise_ray.demo.tiny import build_tiny_model

    out = os.path.join(work_dir, "base_model")
    if not os.path.exists(os.path.join(out, "config.json")):
        tmp = out + ".tmp"
        build_tiny_model(tmp, **cfg.tiny.model_dump())
        os.replace(tmp, out)
    check_model_on_nodes(out)
    return out


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
